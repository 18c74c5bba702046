"""Distilling a small causal language model into a smaller one on padded
batches: Keras's `Distiller` with its `LogitsDistillation`, then with kmask's.

    KERAS_BACKEND=jax python examples/distillation.py

The two models take what a keras-hub `CausalLMPreprocessor` gives
(`{"token_ids", "padding_mask"}`, the next tokens, and a `sample_weight` of 0
where the next token is padding) and return `[batch, time, vocabulary]`
logits; they are built from a small config, nothing is downloaded. On the
same batch the example prints, from `evaluate`:

- Keras's `LogitsDistillation(temperature=2.0)`: its default
  `loss="kl_divergence"` is a string, which Keras turns into the function
  `keras.losses.kl_divergence` rather than the class `KLDivergence`, so its
  softmax-and-`T**2` branch never runs: it takes the KL of the raw scaled
  logits clipped to `[1e-7, 1]`, averaged over every step, padding included;
- Keras's `LogitsDistillation(temperature=2.0, loss=KLDivergence())`: the
  KL of the softmaxes times `T**2`, averaged over every step, padding
  included;
- `kmask.MaskedLogitsDistillation(temperature=2.0)` under
  `kmask.MaskedDistiller`, which passes the batch's `sample_weight` on: the
  KL over the real steps only;

each beside its float64 NumPy reference from the models' own logits. Then it
trains the student with kmask's distiller and checks the logged loss again.
Exits with 1 on a mismatch.
"""

from __future__ import annotations

import sys

import keras
import numpy as np
from _common import check, epochs, set_numpy_weights
from keras import ops

import kmask

VOCABULARY, SEQUENCE, BATCH, TEMPERATURE = 64, 12, 8, 2.0
CONFIGS = {"teacher": {"hidden_dim": 64}, "student": {"hidden_dim": 16}}
EPSILON = 1e-7  # keras.config.epsilon(): Keras clips to [EPSILON, 1]


def causal_lm(name: str, hidden_dim: int, seed: int) -> keras.Model:
    """`{"token_ids", "padding_mask"} -> logits`, as a keras-hub CausalLM;
    its weights drawn by NumPy, the same on every backend."""
    token_ids = keras.Input((SEQUENCE,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((SEQUENCE,), dtype="bool", name="padding_mask")
    hidden = keras.layers.Embedding(VOCABULARY, hidden_dim)(token_ids)
    hidden = keras.layers.Dense(hidden_dim, "gelu")(hidden)
    # A keras-hub backbone reads `padding_mask` in its attention; this one has
    # none, so the mask joins the graph as an exact 0 (Keras 3.12 refuses an
    # input that the outputs do not use).
    hidden = hidden + 0.0 * ops.expand_dims(ops.cast(padding_mask, "float32"), -1)
    logits = keras.layers.Dense(VOCABULARY)(hidden)
    model = keras.Model({"token_ids": token_ids, "padding_mask": padding_mask},
                        logits, name=name)  # fmt: skip
    set_numpy_weights(model, seed)
    return model


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, SEQUENCE + 2, BATCH)
    real = np.arange(SEQUENCE + 1)[None, :] < lengths[:, None]
    tokens = np.where(real, rng.integers(1, VOCABULARY, real.shape), 0)
    x = {"token_ids": tokens[:, :-1].astype("int32"), "padding_mask": real[:, :-1]}
    return x, tokens[:, 1:].astype("int32"), real[:, 1:].astype("float32")


def np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def numpy_losses(teacher, student, weights) -> dict[str, float]:
    """Keras's default (the raw clipped KL), the KL with padding counted and
    the masked KL, in float64 from the two models' logits."""
    teacher, student = teacher / TEMPERATURE, student / TEMPERATURE
    clipped_t, clipped_s = np.clip(teacher, EPSILON, 1), np.clip(student, EPSILON, 1)
    raw = (clipped_t * np.log(clipped_t / clipped_s)).sum(-1).mean()
    log_p, log_q = np_log_softmax(teacher), np_log_softmax(student)
    # Keras's KLDivergence clips the probabilities too; kmask does not.
    p, q = np.clip(np.exp(log_p), EPSILON, 1), np.clip(np.exp(log_q), EPSILON, 1)
    padded = (p * np.log(p / q)).sum(-1).mean() * TEMPERATURE**2
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1) * TEMPERATURE**2
    masked = (kl * weights).sum() / weights.sum()
    return {"keras default": raw, "KL, padding counted": padded, "masked KL": masked}


def distiller(cls, teacher, student, loss):
    model = cls(teacher=teacher, student=student, distillation_losses=loss,
                student_loss_weight=0.0)  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def logits(model, x) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(model(x)), "float64")


def main() -> int:
    teacher = causal_lm("teacher", **CONFIGS["teacher"], seed=0)
    student = causal_lm("student", **CONFIGS["student"], seed=1)
    x, y, weights = make_data()
    padding = 1 - weights.mean()
    print(f"{BATCH} sequences of {SEQUENCE} steps, {padding:.0%} of the steps padding")
    distillers = {
        "keras default": distiller(
            keras.distillation.Distiller, teacher, student,
            keras.distillation.LogitsDistillation(temperature=TEMPERATURE),
        ),
        "KL, padding counted": distiller(
            keras.distillation.Distiller, teacher, student,
            keras.distillation.LogitsDistillation(
                temperature=TEMPERATURE, loss=keras.losses.KLDivergence()
            ),
        ),
        "masked KL": distiller(
            kmask.MaskedDistiller, teacher, student,
            kmask.MaskedLogitsDistillation(temperature=TEMPERATURE),
        ),
    }  # fmt: skip
    want = numpy_losses(logits(teacher, x), logits(student, x), weights)
    rows = []
    for name, model in distillers.items():
        logged = model.evaluate(x, y, sample_weight=weights, verbose=0)[0]
        rows.append((name, float(logged), want[name]))
    ok = check(rows, "distillation loss | Keras's Distiller evaluate | NumPy")
    print(
        "\nKeras's default is not a KL of distributions, and with the class "
        f"it counts the padding: {want['KL, padding counted']:.3f} where the "
        f"real steps give {want['masked KL']:.3f}."
    )
    masked = distillers["masked KL"]
    masked.fit(x, y, sample_weight=weights, batch_size=BATCH, epochs=epochs(20),
               verbose=0)  # fmt: skip
    after = numpy_losses(logits(teacher, x), logits(student, x), weights)
    logged = masked.evaluate(x, y, sample_weight=weights, verbose=0)[0]
    print(
        f"\nafter training the student with kmask: masked KL {after['masked KL']:.4f}"
    )
    ok &= check([("masked KL", float(logged), after["masked KL"])])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
