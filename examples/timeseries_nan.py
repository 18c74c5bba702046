"""Variable-length time series regression, padded with NaN in inputs and targets.

`ValueMask(float("nan"))` masks the NaN steps of the inputs and replaces them by
0 before the LSTM sees them (`keras.layers.Masking` never matches NaN, and
`NaN * 0` is NaN). The targets keep their NaN: Keras's built-in `mse` then
returns NaN even with the mask propagated, while
`MaskedMeanSquaredError(mask_value=float("nan"))` is the mean over the real
steps.

    KERAS_BACKEND=torch python examples/timeseries_nan.py   # KMASK_EXAMPLE_EPOCHS=5

Prints masked and unmasked numbers beside NumPy, and exits with 1 if kmask and
NumPy disagree or a training loss is not finite.
"""

from __future__ import annotations

import math
import sys

import keras
import numpy as np
from _common import (
    check,
    fit_with_curves,
    save_plot,
    set_numpy_weights,
)

from kmask.layers import ValueMask
from kmask.losses import MaskedMeanSquaredError
from kmask.metrics import MaskedMeanMetricWrapper

NUM_SERIES, MAX_LENGTH = 48, 10
NAN = float("nan")
BATCH_SIZE = 16


def make_data(seed: int = 0):
    """Noisy series of 3 to 10 steps; the target is the running mean so far."""
    rng = np.random.RandomState(seed)
    lengths = rng.randint(3, MAX_LENGTH + 1, NUM_SERIES)
    real = np.arange(MAX_LENGTH)[None, :] < lengths[:, None]
    x = rng.normal(size=real.shape)
    running_mean = np.cumsum(x, axis=1) / np.arange(1, MAX_LENGTH + 1)
    x = np.where(real, x, np.nan)[..., None].astype("float32")
    y = np.where(real, running_mean, np.nan)[..., None].astype("float32")
    return x, y


def build_model() -> keras.Model:
    series = keras.Input((MAX_LENGTH, 1))
    masked = ValueMask(mask_value=NAN)(series)
    hidden = keras.layers.LSTM(8, return_sequences=True)(masked)
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(series, outputs)
    set_numpy_weights(model, seed=1)
    return model


def numpy_numbers(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Squared and absolute errors over the real steps, and over every step
    with the NaN targets read as 0."""
    y_true = y_true[..., 0].astype("float64")
    y_pred = y_pred[..., 0].astype("float64")
    real = ~np.isnan(y_true)
    error = np.where(real, y_true, 0.0) - y_pred
    return {
        "masked mse": np.mean(error[real] ** 2),
        "unmasked mse": np.mean(error**2),
        "masked mae": np.mean(np.abs(error[real])),
    }


def main() -> int:
    keras.utils.set_random_seed(0)
    x, y = make_data()
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=MaskedMeanSquaredError(mask_value=NAN),
        metrics=[MaskedMeanMetricWrapper("mae", mask_value=NAN)],
    )
    print(f"backend: {keras.backend.backend()}")

    def losses(y_pred):
        found = numpy_numbers(y, y_pred)
        return {name: found[name] for name in ("masked mse", "unmasked mse")}

    curves, history = fit_with_curves(model, x, y, losses, BATCH_SIZE)
    finite = all(math.isfinite(value) for value in history.history["loss"])
    print(f"every training loss finite: {finite}")
    print()

    # Evaluated in one batch: the loss is then the token mean of the data set.
    results = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    reference = numpy_numbers(y, model.predict(x, verbose=0))
    model.compile(loss="mse")
    builtin = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    print(f"Keras's built-in mse on the same model: {builtin['loss']}")
    print(f"unmasked mse, NaN targets read as 0: {reference['unmasked mse']:.6f}")
    ok = check(
        [
            ("masked mse", results["loss"], reference["masked mse"]),
            ("masked mae", results["masked_mae"], reference["masked mae"]),
        ]
    )
    save_plot(curves, "timeseries_nan_loss.png", "NaN-padded regression")
    return 0 if ok and finite else 1


if __name__ == "__main__":
    sys.exit(main())
