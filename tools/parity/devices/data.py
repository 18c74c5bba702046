"""The device cases' data, setups and NumPy expectations (the same for every
backend; NumPy only)."""

from __future__ import annotations

import numpy as np

from tools.parity.references import numpy_sgd, numpy_token_mean

LENGTHS = np.array([6, 6, 5, 6, 1, 2, 1, 1])  # long first half, short second half
STEPS_TIME, FEATURES = 6, 3
LEARNING_RATE = 0.1
EPOCHS = (1, 3)
TOLERANCE = 1e-5
SOURCES = ("propagated_mask", "mask_value_nan")
# The setups every backend runs: `python -m tools.parity` checks these.
COMMON_SETUPS = ("one_device", "two_devices", "accumulation_2", "accumulation_4")
EXTRA_SETUPS = {"tensorflow": ("two_workers",), "jax": ("data_and_model_axes",)}
LABELS = {
    "one_device": "one device",
    "accumulation_2": "gradient_accumulation_steps=2",
    "accumulation_4": "gradient_accumulation_steps=4",
    "two_workers": "MultiWorkerMirroredStrategy, 2 processes",
    "data_and_model_axes": "ModelParallel, batch 2 x model 1",
}
TWO_DEVICES = {
    "tensorflow": "MirroredStrategy, 2 CPUs",
    "jax": "DataParallel, 2 CPUs",
    "torch": "DDP, 2 gloo processes",
}


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inputs (zero at padding), targets, targets with NaN at padding, mask."""
    rng = np.random.default_rng(0)
    valid = np.arange(STEPS_TIME)[None, :] < LENGTHS[:, None]
    x = (
        rng.uniform(0.5, 1.5, (len(LENGTHS), STEPS_TIME, FEATURES)) * valid[..., None]
    ).astype("float32")
    y = rng.normal(size=(len(LENGTHS), STEPS_TIME, 1)).astype("float32")
    y_nan = np.where(valid[..., None], y, np.nan).astype("float32")
    return x, y, y_nan, valid


def initial_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.normal(size=(FEATURES, 1)).astype("float32"),
        rng.normal(size=(1,)).astype("float32"),
    ]


def expected_weights() -> np.ndarray:
    """NumPy's weights after each of `EPOCHS` steps, flattened: `[epochs, 4]`."""
    x, y, _, valid = make_data()
    return np.stack(
        [
            flat(numpy_sgd(initial_weights(), x, y, valid, n, LEARNING_RATE))
            for n in EPOCHS
        ]
    )


def expected_loss() -> float:
    x, y, _, valid = make_data()
    return numpy_token_mean(initial_weights(), x, y, valid)


def gap(a, b) -> float:
    """The largest absolute difference between two sets of weights."""
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


def flat(weights) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(w, "float64")) for w in weights])


def setups_for(backend: str) -> tuple[str, ...]:
    return COMMON_SETUPS + EXTRA_SETUPS.get(backend, ())


def label(backend: str, setup: str) -> str:
    return TWO_DEVICES[backend] if setup == "two_devices" else LABELS[setup]
