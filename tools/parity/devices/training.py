"""The device cases' training, as a user writes it: `fit` on one device, in a
distribution scope, or with gradient accumulation. No kmask call in it knows
how many devices there are."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np

from tools.parity.devices.data import (
    EPOCHS,
    FEATURES,
    LEARNING_RATE,
    STEPS_TIME,
    flat,
    initial_weights,
    make_data,
)


def build_model(masking: bool = True):
    import keras

    inputs = keras.Input((STEPS_TIME, FEATURES))
    hidden = keras.layers.Masking(0.0)(inputs) if masking else inputs
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(inputs, outputs)
    model.set_weights(initial_weights())
    return model


def source_loss(source: str, which: str):
    """(loss, targets key, masking layer) of a mask source, for `which` loss."""
    import keras

    import kmask

    if source == "propagated_mask":
        if which == "kmask":
            return kmask.MaskedMeanSquaredError(), "y", True
        return keras.losses.MeanSquaredError(), "y", True
    if which == "builtin":
        raise ValueError("Keras's built-in mse has no mask_value")
    return kmask.MaskedMeanSquaredError(mask_value=float("nan")), "y_nan", False


def fit(
    loss,
    targets,
    masking: bool,
    batch_size: int | None = None,
    sample_weight=None,
    accumulation: int | None = None,
    scope: Any = None,
) -> tuple[np.ndarray, float, int]:
    """`model.fit` for `max(EPOCHS)` epochs, all of it inside `scope`: the
    weights after each of `EPOCHS` (flattened, `[len(EPOCHS), 4]`), the first
    logged loss, and the number of replicas `fit` ran on."""
    import keras

    x = make_data()[0]
    snapshots, replicas = [], []
    with scope or contextlib.nullcontext():
        model = build_model(masking)
        optimizer = keras.optimizers.SGD(
            LEARNING_RATE, gradient_accumulation_steps=accumulation
        )
        model.compile(optimizer=optimizer, loss=loss)
        record = keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: replicas.append(_replicas(model)),
            on_epoch_end=lambda epoch, logs: snapshots.append(
                flat(model.get_weights())
            ),
        )
        history = model.fit(
            x,
            targets,
            sample_weight=sample_weight,
            batch_size=batch_size or len(x),
            epochs=max(EPOCHS),
            shuffle=False,
            verbose=0,
            callbacks=[record],
        )
    weights = np.stack([snapshots[epochs - 1] for epochs in EPOCHS])
    return weights, float(history.history["loss"][0]), replicas[0]


def _replicas(model) -> int:
    """How many devices `fit` spreads a batch over, as training starts: the
    `tf.distribute` strategy's replicas, or the batch axis of the active
    `keras.distribution` (1 when neither is set)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return model.distribute_strategy.num_replicas_in_sync
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def two_devices_scope(backend: str):
    """The scope that spreads `fit` over 2 devices (TensorFlow and JAX)."""
    if backend == "tensorflow":
        return mirrored_strategy().scope()
    import keras

    devices = keras.distribution.list_devices("cpu")
    if len(devices) < 2:
        raise RuntimeError(
            "JAX sees one CPU device: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2 before importing it"
        )
    return keras.distribution.DataParallel(devices=devices[:2]).scope()


@functools.cache
def mirrored_strategy():
    """One strategy per process: a second one's collectives would clash."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def data_and_model_axes_scope():
    import keras

    devices = keras.distribution.list_devices("cpu")[:2]
    mesh = keras.distribution.DeviceMesh((2, 1), ("batch", "model"), devices)
    layout = keras.distribution.LayoutMap(mesh)
    layout[".*dense.*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(
        layout_map=layout, batch_dim_name="batch"
    ).scope()
