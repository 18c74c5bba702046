"""The mask report against Keras itself, on a zoo of everyday model shapes.

Ground truth: `model.compile(loss="mse")`, then `evaluate` equals either the
NumPy mean of the per-step squared error over the real steps (the loss saw
the mask) or over every step (it did not). The report's verdict must be that
one with a batch, and that one or `None` without.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from keras import layers, ops
from packaging.version import Version

import kmask
from kmask.layers import AttachMask, LengthMask
from kmask.report import mask_report

pytestmark = pytest.mark.filterwarnings(
    # Keras says a layer destroys the mask; that is what the zoo measures.
    "ignore:.*does not support masking:UserWarning"
)

# Keras 3.16 (keras-team/keras #23235): RNNs no longer carry the mask on.
RNNS_KEEP_MASK = Version(keras.__version__) < Version("3.16.0.dev0")
SEED_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed_seq2seq.py"
TOLERANCE = 1e-4
MASKED, UNMASKED = True, False
BATCH, STEPS, FEATURES, VOCABULARY = 2, 5, 2, 16


@dataclasses.dataclass
class Case:
    """A model, a batch and the real steps each output's loss should keep.

    `real[i]` is a `[batch, steps]` boolean array for output `i`, or `None`
    for an output with no time axis. `keras_masks[i]` is what Keras's loss
    does on this Keras line: `MASKED` or `UNMASKED`.
    """

    model: keras.Model
    x: Any
    real: list
    keras_masks: tuple[bool, ...]


def _padded_steps(features: int = FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences, the second with its last two steps all zeros."""
    x = np.random.RandomState(0).uniform(0.5, 1.5, (BATCH, STEPS, features))
    real = np.ones((BATCH, STEPS), bool)
    real[1, -2:] = False
    return np.where(real[..., None], x, 0.0).astype("float32"), real


def _token_ids() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(1).randint(1, VOCABULARY, (BATCH, STEPS))
    real = np.ones((BATCH, STEPS), bool)
    real[0, -3:] = False
    return np.where(real, ids, 0).astype("int32"), real


def _sequential(*stack, keras_masks) -> Case:
    x, real = _padded_steps()
    model = keras.Sequential([keras.Input((STEPS, FEATURES)), *stack])
    return Case(model, x, [real], keras_masks)


def _seed_model() -> keras.Model:
    spec = importlib.util.spec_from_file_location("seed_seq2seq", SEED_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.build_seed_model()


def seed() -> Case:
    module, model = _seed_model()
    x = np.asarray(module.X, "float32")
    return Case(model, x, [x.any(-1)], (UNMASKED,))


def rnn_tagger() -> Case:
    rnn_keeps = MASKED if RNNS_KEEP_MASK else UNMASKED
    return _sequential(
        layers.Masking(),
        layers.LSTM(3, return_sequences=True),
        layers.Dense(2),
        keras_masks=(rnn_keeps,),
    )


def bidirectional_rnn() -> Case:
    rnn_keeps = MASKED if RNNS_KEEP_MASK else UNMASKED
    return _sequential(
        layers.Masking(),
        layers.Bidirectional(layers.GRU(2, return_sequences=True)),
        layers.Dense(2),
        keras_masks=(rnn_keeps,),
    )


def attention_with_residual_add() -> Case:
    ids, real = _token_ids()
    tokens = keras.Input((STEPS,), dtype="int32")
    embedded = layers.Embedding(VOCABULARY, 4, mask_zero=True)(tokens)
    attended = layers.MultiHeadAttention(2, 2)(embedded, embedded)
    residual = layers.Add()([embedded, attended])
    outputs = layers.Dense(2)(layers.LayerNormalization()(residual))
    return Case(keras.Model(tokens, outputs), ids, [real], (UNMASKED,))


def nested_sequential() -> Case:
    x, real = _padded_steps()
    inputs = keras.Input((STEPS, FEATURES))
    inner = keras.Sequential([layers.Masking(), layers.Dense(3)], name="inner")
    model = keras.Model(inputs, layers.Dense(2)(inner(inputs)))
    return Case(model, x, [real], (MASKED,))


def nested_functional() -> Case:
    x, real = _padded_steps()
    inner_inputs = keras.Input((STEPS, FEATURES))
    inner = keras.Model(
        inner_inputs, layers.Dense(3)(layers.Masking()(inner_inputs)), name="inner"
    )
    inputs = keras.Input((STEPS, FEATURES))
    model = keras.Model(inputs, layers.Dense(2)(inner(inputs)))
    return Case(model, x, [real], (MASKED,))


def time_distributed_then_conv1d() -> Case:
    return _sequential(
        layers.Masking(),
        layers.TimeDistributed(layers.Dense(3)),
        layers.Conv1D(2, 3, padding="same"),
        keras_masks=(UNMASKED,),
    )


def op_on_symbolic_tensors() -> Case:
    x, real = _padded_steps()
    inputs = keras.Input((STEPS, FEATURES))
    scaled = layers.Masking()(inputs) * 2.0
    return Case(keras.Model(inputs, layers.Dense(2)(scaled)), x, [real], (UNMASKED,))


def dropout_chain() -> Case:
    return _sequential(
        layers.Masking(),
        layers.Dropout(0.5),
        layers.Dense(3),
        layers.Dropout(0.5),
        layers.Dense(2),
        keras_masks=(MASKED,),
    )


def embedding_then_conv1d() -> Case:
    ids, real = _token_ids()
    model = keras.Sequential(
        [
            keras.Input((STEPS,), dtype="int32"),
            layers.Embedding(VOCABULARY, 4, mask_zero=True),
            layers.Conv1D(2, 3, padding="same"),
        ]
    )
    return Case(model, ids, [real], (UNMASKED,))


def concatenate_with_unmasked_branch() -> Case:
    x, real = _padded_steps()
    inputs = keras.Input((STEPS, FEATURES))
    joined = layers.Concatenate()([layers.Masking()(inputs), layers.Dense(2)(inputs)])
    return Case(keras.Model(inputs, layers.Dense(2)(joined)), x, [real], (UNMASKED,))


def attach_mask_restores_the_seed() -> Case:
    module, base = _seed_model()
    restored = AttachMask()([base.output, base.get_layer("masking").output])
    x = np.asarray(module.X, "float32")
    return Case(keras.Model(base.input, restored), x, [x.any(-1)], (MASKED,))


def length_mask_then_attach_mask() -> Case:
    x, real = _padded_steps()
    steps = keras.Input((STEPS, FEATURES))
    lengths = keras.Input((), dtype="int32")
    masked = LengthMask()([steps, lengths])
    encoded = layers.LSTM(3, return_sequences=True)(masked)
    outputs = layers.Dense(2)(AttachMask()([encoded, masked]))
    batch = [x, real.sum(-1).astype("int32")]
    return Case(keras.Model([steps, lengths], outputs), batch, [real], (MASKED,))


def multi_output() -> Case:
    x, real = _padded_steps()
    inputs = keras.Input((STEPS, FEATURES))
    masked = layers.Masking()(inputs)
    tokens = layers.Dense(2, name="tokens")(masked)
    summary = layers.RepeatVector(STEPS, name="summary")(layers.LSTM(2)(masked))
    model = keras.Model(inputs, [tokens, summary])
    return Case(model, x, [real, real], (MASKED, UNMASKED))


class SubclassedTagger(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.masking = layers.Masking()
        self.dense = layers.Dense(2)

    def call(self, inputs):
        return self.dense(self.masking(inputs))


def subclassed() -> Case:
    x, real = _padded_steps()
    return Case(SubclassedTagger(), x, [real], (MASKED,))


def dict_inputs_and_a_shared_layer() -> Case:
    x, real = _padded_steps()
    first = keras.Input((STEPS, FEATURES), name="first")
    second = keras.Input((STEPS, FEATURES), name="second")
    shared = layers.Dense(3, name="shared")
    added = layers.Add()(
        [shared(layers.Masking()(first)), shared(layers.Masking()(second))]
    )
    model = keras.Model({"first": first, "second": second}, layers.Dense(2)(added))
    # `Add` keeps a step that either input keeps: the sequences are padded
    # differently, so the mask it makes marks no padding.
    return Case(model, {"first": x, "second": x[::-1]}, [real], (UNMASKED,))


def _keras_hub():
    """keras-hub, or a skip: it is an optional test dependency, and 0.32.0
    imports `get_keras_mask` from where keras-nightly 3.16 no longer has it."""
    try:
        import keras_hub
    except ImportError as error:
        pytest.skip(f"keras-hub does not import on Keras {keras.__version__}: {error}")
    return keras_hub


def _hub_batch(**extra) -> tuple[dict, np.ndarray]:
    ids, real = _token_ids()
    return {"token_ids": ids, "padding_mask": real.astype("int32"), **extra}, real


# The smallest configs that build: one layer, random weights, no download.
TINY = {"vocabulary_size": VOCABULARY, "num_layers": 1, "hidden_dim": 8}
TINY_ENCODER = {**TINY, "num_heads": 2, "intermediate_dim": 16}


def gemma_causal_lm() -> Case:
    hub = _keras_hub().models
    backbone = hub.GemmaBackbone(
        **TINY,
        num_query_heads=2,
        num_key_value_heads=1,
        intermediate_dim=16,
        head_dim=4,
    )
    batch, real = _hub_batch()
    model = hub.GemmaCausalLM(backbone=backbone, preprocessor=None)
    return Case(model, batch, [real], (UNMASKED,))


def gpt2_causal_lm() -> Case:
    hub = _keras_hub().models
    backbone = hub.GPT2Backbone(**TINY_ENCODER, max_sequence_length=8)
    batch, real = _hub_batch()
    model = hub.GPT2CausalLM(backbone=backbone, preprocessor=None)
    return Case(model, batch, [real], (UNMASKED,))


def bert_text_classifier() -> Case:
    hub = _keras_hub().models
    backbone = hub.BertBackbone(**TINY_ENCODER, max_sequence_length=8)
    batch, _ = _hub_batch(segment_ids=np.zeros((BATCH, STEPS), "int32"))
    model = hub.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None)
    # One output per sequence: no padded steps for a loss to leave out.
    return Case(model, batch, [None], (UNMASKED,))


ZOO: tuple[Callable[[], Case], ...] = (
    seed,
    rnn_tagger,
    bidirectional_rnn,
    attention_with_residual_add,
    nested_sequential,
    nested_functional,
    time_distributed_then_conv1d,
    op_on_symbolic_tensors,
    dropout_chain,
    embedding_then_conv1d,
    concatenate_with_unmasked_branch,
    attach_mask_restores_the_seed,
    length_mask_then_attach_mask,
    multi_output,
    subclassed,
    dict_inputs_and_a_shared_layer,
    gemma_causal_lm,
    gpt2_causal_lm,
    bert_text_classifier,
)


def _flat_numpy(outputs) -> list[np.ndarray]:
    return [ops.convert_to_numpy(x) for x in keras.tree.flatten(outputs)]


def what_keras_does(case: Case) -> tuple[bool, ...]:
    """Compiles with `loss="mse"`, evaluates once, and names for each output
    the NumPy mean `evaluate` equals: over the real steps or over all."""
    predictions = _flat_numpy(case.model(case.x, training=False))
    rng = np.random.RandomState(2)
    targets = [rng.normal(size=p.shape).astype("float32") for p in predictions]
    # Targets far off at the padded steps, so the two means always differ
    # clearly, whatever weights the backend drew for the model.
    for target, real in zip(targets, case.real, strict=True):
        if real is not None:
            target[~real] += 10.0
    # keras.Model's own compile and evaluate, with no metrics: keras-hub's
    # tasks compile default metrics when built (Keras keeps them unless
    # replaced) and evaluate through a preprocessing pipeline; neither is
    # under test. (Keras before 3.15 takes no empty list for several outputs.)
    no_metrics = [] if len(targets) == 1 else None
    keras.Model.compile(
        case.model, loss="mse", metrics=no_metrics, weighted_metrics=no_metrics
    )
    y = targets[0] if len(targets) == 1 else targets
    losses = keras.Model.evaluate(case.model, case.x, y, verbose=0)
    losses = [losses] if len(targets) == 1 else losses[1:]
    verdicts = []
    for loss, prediction, target, real in zip(
        losses, predictions, targets, case.real, strict=True
    ):
        per_step = np.mean((target - prediction) ** 2, axis=-1)
        unmasked = per_step.mean()
        masked = per_step[real].mean() if real is not None else unmasked
        if real is not None:
            assert abs(masked - unmasked) > 10 * TOLERANCE, "the case cannot tell"
        if np.isclose(loss, masked, rtol=TOLERANCE) and real is not None:
            verdicts.append(MASKED)
        else:
            np.testing.assert_allclose(loss, unmasked, rtol=TOLERANCE)
            verdicts.append(UNMASKED)
    return tuple(verdicts)


@pytest.mark.parametrize("build", ZOO, ids=lambda build: build.__name__)
def test_the_report_agrees_with_keras(build):
    case = build()

    with_batch = mask_report(case.model, case.x)
    without_batch = mask_report(case.model)
    keras_does = what_keras_does(case)

    assert keras_does == case.keras_masks
    assert tuple(out.loss_sees_mask for out in with_batch.outputs) == keras_does
    for out, truth in zip(without_batch.outputs, keras_does, strict=True):
        assert out.loss_sees_mask in (truth, None), str(without_batch)
    assert with_batch.loss_sees_mask is all(keras_does)
    if hasattr(case.model, "output_names"):
        assert [out.name for out in with_batch.outputs] == case.model.output_names


def test_a_compiled_kmask_loss_finds_the_padding_the_model_loses():
    module, model = _seed_model()
    x = np.asarray(module.X, "float32")
    y = np.asarray(module.Y_TRUE, "float32")
    model.compile(loss=kmask.MaskedCategoricalCrossentropy(mask_value=[0, 0, 1]))

    report = mask_report(model, x)

    (output,) = report.outputs
    assert output.loss_sees_mask is True
    assert output.dropped_by == ("encoder",)
    assert (
        "the propagated mask is lost at `encoder`, but the compiled kmask loss "
        "finds the padding through mask_value=[0, 0, 1]"
    ) in output.verdict
    probs = np.clip(ops.convert_to_numpy(model(x)), 1e-7, 1 - 1e-7)
    per_step = -(y * np.log(probs)).sum(-1)
    real = ~np.all(y == [0, 0, 1], axis=-1)
    evaluated = model.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(evaluated, per_step[real].mean(), rtol=TOLERANCE)


def _words(report) -> str:
    """The report's verdicts, one per output, in the words of the zoo table
    (docs/guides/mask-report.md)."""
    words = []
    for output in report.outputs:
        if output.loss_sees_mask is None:
            words.append("None")
        elif output.loss_sees_mask:
            words.append("sees the mask")
        elif "marks no padding" in output.verdict:
            words.append("a mask that marks no padding")
        else:
            words.append("NO mask")
    return " / ".join(words)


def print_table() -> None:
    """The zoo as a Markdown table, for this Keras and backend."""
    print(f"Keras {keras.__version__}, {keras.backend.backend()}")
    print("| model | Keras's loss | report with a batch | report without a batch |")
    print("|---|---|---|---|")
    for build in ZOO:
        try:
            case = build()
        except pytest.skip.Exception as skipped:
            print(f"| {build.__name__} | skipped: {skipped} | | |")
            continue
        with_batch, without_batch = (
            mask_report(case.model, case.x),
            mask_report(case.model),
        )
        keras_does = " / ".join(
            "masked" if masked else "unmasked" for masked in what_keras_does(case)
        )
        row = (build.__name__, keras_does, _words(with_batch), _words(without_batch))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    # Keras warns at each layer that destroys a mask; the table says so.
    warnings.simplefilter("ignore", UserWarning)
    print_table()
