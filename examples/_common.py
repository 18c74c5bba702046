"""What the examples share: epochs, NumPy weights, the per-epoch losses, a plot.

Not an example itself (the leading underscore keeps it out of the example
runs); each example imports it from its own folder.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import keras
import numpy as np

TOLERANCE = 1e-5


def epochs(default: int = 5) -> int:
    """Training epochs: `KMASK_EXAMPLE_EPOCHS`, else `default`."""
    return int(os.environ.get("KMASK_EXAMPLE_EPOCHS", default))


def set_numpy_weights(model: keras.Model, seed: int) -> None:
    """Weights drawn by NumPy, so every backend starts from the same model."""
    rng = np.random.RandomState(seed)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in model.get_weights()])


def agrees(got: float, want: float) -> bool:
    return abs(got - want) <= TOLERANCE * max(1.0, abs(want))


class EpochEndLosses(keras.callbacks.Callback):
    """Records `numpy_losses(y_pred)` (a dict of named numbers) after each epoch.

    The loss Keras logs during `fit` moves with the weights inside the epoch;
    these are the masked and unmasked losses of the weights the epoch ends with.
    """

    def __init__(self, inputs, numpy_losses: Callable[[np.ndarray], dict]):
        super().__init__()
        self.inputs = inputs
        self.numpy_losses = numpy_losses
        self.curves: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch, logs=None):
        y_pred = self.model.predict(self.inputs, verbose=0)
        for name, value in self.numpy_losses(y_pred).items():
            self.curves.setdefault(name, []).append(value)


def fit_with_curves(model, inputs, targets, numpy_losses, batch_size: int = 16):
    """`model.fit` for `epochs()` epochs in a fixed order; prints and returns
    the NumPy losses after each epoch (see `EpochEndLosses`) and the history."""
    recorder = EpochEndLosses(inputs, numpy_losses)
    history = model.fit(
        inputs,
        targets,
        batch_size=batch_size,
        epochs=epochs(),
        shuffle=False,
        verbose=0,
        callbacks=[recorder],
    )
    print_curves(recorder.curves)
    return recorder.curves, history


def print_curves(curves: dict[str, list[float]]) -> None:
    names = list(curves)
    print("epoch | " + " | ".join(names))
    for epoch, values in enumerate(zip(*curves.values(), strict=True), start=1):
        print(f"{epoch} | " + " | ".join(f"{value:.6f}" for value in values))


def save_plot(curves: dict[str, list[float]], path: str, title: str) -> None:
    """Saves the curves as a PNG when matplotlib is installed; else nothing."""
    if importlib.util.find_spec("matplotlib") is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for name, values in curves.items():
        axes.plot(range(1, len(values) + 1), values, marker="o", label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss at the end of the epoch")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    print(f"saved {path}")


def check(
    rows: list[tuple[str, float, float]], header: str = "quantity | kmask | NumPy"
) -> bool:
    """Prints `header`, then `name | got | want` rows; whether every pair
    agrees."""
    print(header)
    all_ok = True
    for name, got, want in rows:
        ok = agrees(got, want)
        all_ok &= ok
        print(f"{name} | {got:.6f} | {want:.6f}" + ("" if ok else "  <- MISMATCH"))
    return all_ok
