"""Two devices, or accumulated micro-batches, take the same step as the whole batch.

A token mean must divide by the real tokens of the whole global batch, not by
those one device or one micro-batch holds. This batch puts its long sequences
in the first half and its short ones in the second, so a per-device or
per-micro-batch mean is visibly off. A masked linear model (`Masking` then
`Dense`) takes 3 SGD steps with `kmask.MaskedMeanSquaredError`, for the
current `KERAS_BACKEND`:

- on one device, the whole batch at once;
- with `gradient_accumulation_steps=4` (micro-batches of 2), the loss summed
  and each micro-batch weighted by `kmask.accumulation_weights`;
- on 2 CPU devices: `tf.distribute.MirroredStrategy` on TensorFlow,
  `keras.distribution.DataParallel` on JAX. (PyTorch trains on several
  devices with DDP, one process per device, as the README shows; this
  one-process script runs the other setups there.)

Each run's weights are compared with a NumPy SGD run on the whole batch.
Keras's built-in `mse` runs beside kmask for contrast: it divides per device
or per micro-batch.

    KERAS_BACKEND=jax python examples/multi_device.py

Exits with 1 if kmask's weights and NumPy's disagree. Every backend and setup
(DDP and multi-worker TensorFlow included): `python -m tools.parity.devices`
from a checkout of the repository.
"""

from __future__ import annotations

import contextlib
import os
import sys

# JAX creates its CPU devices when it starts: ask for 2 before Keras imports it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import keras
import numpy as np

import kmask

LENGTHS = np.array([6, 6, 5, 6, 1, 2, 1, 1])  # long first half, short second half
STEPS, FEATURES = 6, 3
LEARNING_RATE, SGD_STEPS, ACCUMULATION = 0.1, 3, 4
TOLERANCE = 1e-5


def make_data():
    """Inputs (zero on padding, where `Masking(0.0)` finds it), targets, and
    the real steps."""
    rng = np.random.default_rng(0)
    valid = np.arange(STEPS)[None, :] < LENGTHS[:, None]
    x = rng.uniform(0.5, 1.5, (len(LENGTHS), STEPS, FEATURES)) * valid[..., None]
    y = rng.normal(size=(len(LENGTHS), STEPS, 1))
    return x.astype("float32"), y.astype("float32"), valid


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(FEATURES, 1)).astype("float32")
    return [kernel, rng.normal(size=(1,)).astype("float32")]


def numpy_full_batch_sgd(x, y, valid) -> np.ndarray:
    """The reference: SGD on the token-mean squared error of the whole batch,
    in float64; the kernel and bias, flattened."""
    kernel, bias = (w.astype("float64") for w in initial_weights())
    x, y = x.astype("float64"), y[..., 0].astype("float64")
    tokens = valid.sum()
    for _ in range(SGD_STEPS):
        error = np.where(valid, (x @ kernel)[..., 0] + bias - y, 0.0)
        kernel = (
            kernel
            - LEARNING_RATE * 2 * np.einsum("bt,btf->f", error, x)[:, None] / tokens
        )
        bias = bias - LEARNING_RATE * 2 * error.sum() / tokens
    return np.concatenate([kernel.ravel(), bias])


def two_devices():
    """What spreads `fit` over 2 CPU devices on this backend, or None. Call it
    before anything runs: TensorFlow's 2 logical CPUs must exist first."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if backend == "jax":
        devices = keras.distribution.list_devices("cpu")[:2]
        return keras.distribution.DataParallel(devices=devices)
    return None


def train(loss, x, y, batch_size, sample_weight=None, accumulation=None, devices=None):
    """`SGD_STEPS` epochs of `fit` (one optimizer step each), inside the
    devices' scope when there are some; the weights, flattened."""
    with devices.scope() if devices else contextlib.nullcontext():
        inputs = keras.Input((STEPS, FEATURES))
        outputs = keras.layers.Dense(1)(keras.layers.Masking(0.0)(inputs))
        model = keras.Model(inputs, outputs)
        model.set_weights(initial_weights())
        optimizer = keras.optimizers.SGD(
            LEARNING_RATE, gradient_accumulation_steps=accumulation
        )
        model.compile(optimizer=optimizer, loss=loss)
        model.fit(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=batch_size,
            epochs=SGD_STEPS,
            shuffle=False,
            verbose=0,
        )
    return np.concatenate([np.ravel(w) for w in model.get_weights()])


def main() -> int:
    devices = two_devices()
    x, y, valid = make_data()
    expected = numpy_full_batch_sgd(x, y, valid)
    micro_batch = len(x) // ACCUMULATION
    # Accumulation: each micro-batch's weights are normalised over its window,
    # and the loss sums them, so the window's mean is the global token mean.
    window_weights = kmask.accumulation_weights(valid, micro_batch, ACCUMULATION)
    setups = {
        "one device": (
            dict(batch_size=len(x)),
            kmask.MaskedMeanSquaredError(),
            dict(batch_size=len(x)),
        ),
        f"gradient_accumulation_steps={ACCUMULATION}": (
            dict(batch_size=micro_batch, accumulation=ACCUMULATION),
            kmask.MaskedMeanSquaredError(reduction="sum"),
            dict(
                batch_size=micro_batch,
                accumulation=ACCUMULATION,
                sample_weight=window_weights,
            ),
        ),
    }
    if devices is not None:
        on_two = dict(batch_size=len(x), devices=devices)
        setups["2 CPU devices"] = (on_two, kmask.MaskedMeanSquaredError(), on_two)

    print(f"{keras.backend.backend()}: largest weight gap to NumPy full-batch SGD")
    print("setup | Keras mse | kmask")
    all_ok = True
    for name, (builtin_options, kmask_loss, kmask_options) in setups.items():
        builtin = train(keras.losses.MeanSquaredError(), x, y, **builtin_options)
        weights = train(kmask_loss, x, y, **kmask_options)
        builtin_gap = np.abs(builtin - expected).max()
        kmask_gap = np.abs(weights - expected).max()
        ok = kmask_gap <= TOLERANCE
        all_ok &= ok
        mark = "" if ok else "  <- MISMATCH"
        print(f"{name} | {builtin_gap:.1e} | {kmask_gap:.1e}{mark}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
