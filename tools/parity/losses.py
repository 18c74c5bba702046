"""The losses the parity suite checks, each as a user configures it, with the
NumPy reference of its per-step loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from tools.parity.references import (
    np_absolute,
    np_binary,
    np_categorical,
    np_huber,
    np_sparse_categorical,
    np_squared,
)


@dataclass(frozen=True)
class Loss:
    """A kmask loss as a user configures it, and its NumPy reference.

    `cls` is a class of `kmask`; `keras_loss` the Keras loss name that
    `MaskedLoss` and `kmask.masked_loss` take (`None`: no Keras twin).
    `reference(y_true_rows, y_pred_rows)` gives the per-step loss and its
    gradient; a `class_weight` among `kwargs` is not the reference's: the
    cases fold it into the step weights (`np_class_step_weight`).
    """

    name: str
    cls: str
    keras_loss: str | None
    kwargs: dict[str, Any]
    target: str  # "labels", "one_hot", "binary" or "regression"
    prediction: str  # "logits", "probs" or "values"
    reference: Callable

    @property
    def class_weight(self) -> Any:
        return self.kwargs.get("class_weight")

    def spec(self) -> dict[str, Any]:
        return {"cls": self.cls, "keras_loss": self.keras_loss, "kwargs": self.kwargs}


# Keras loss name: (targets, NumPy reference).
_KINDS = {
    "categorical_crossentropy": ("one_hot", np_categorical),
    "sparse_categorical_crossentropy": ("labels", np_sparse_categorical),
    "binary_crossentropy": ("binary", np_binary),
    "mean_squared_error": ("regression", np_squared),
    "mean_absolute_error": ("regression", np_absolute),
    "huber": ("regression", np_huber),
}
_CLASS_KINDS = {
    "MaskedCategoricalCrossentropy": "categorical_crossentropy",
    "MaskedSparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "MaskedBinaryCrossentropy": "binary_crossentropy",
    "MaskedMeanSquaredError": "mean_squared_error",
    "MaskedMeanAbsoluteError": "mean_absolute_error",
    "MaskedHuber": "huber",
}


def _loss(name: str, cls: str, keras_twin: bool = True, **kwargs: Any) -> Loss:
    """`cls(**kwargs)`; `MaskedLoss` takes the Keras name as `loss=`."""
    kind = kwargs.pop("loss") if cls == "MaskedLoss" else _CLASS_KINDS[cls]
    target, reference = _KINDS[kind]
    if target == "regression":
        prediction = "values"
    else:
        prediction = "logits" if kwargs.get("from_logits") else "probs"
    return Loss(
        name,
        cls,
        kind if keras_twin else None,
        kwargs,
        target,
        prediction,
        partial(reference, **{k: v for k, v in kwargs.items() if k != "class_weight"}),
    )


_SCCE = "MaskedSparseCategoricalCrossentropy"
LOSSES = (
    _loss("cce_probs", "MaskedCategoricalCrossentropy"),
    _loss(
        "cce_logits_ls",
        "MaskedCategoricalCrossentropy",
        from_logits=True,
        label_smoothing=0.1,
    ),
    _loss("scce_probs", _SCCE),
    _loss("scce_logits", _SCCE, from_logits=True),
    # Label smoothing and z-loss are kmask's own: Keras's sparse loss has neither.
    _loss("scce_probs_ls", _SCCE, keras_twin=False, label_smoothing=0.2),
    _loss(
        "scce_logits_ls_z",
        _SCCE,
        keras_twin=False,
        from_logits=True,
        label_smoothing=0.1,
        z_loss=0.05,
    ),
    # Class weights: a vector with a zero, and a dict that leaves class 2 out.
    _loss(
        "scce_logits_ls_cw",
        _SCCE,
        keras_twin=False,
        from_logits=True,
        label_smoothing=0.1,
        class_weight=[0.5, 2.0, 1.0, 0.0, 1.5],
    ),
    _loss(
        "cce_probs_cw",
        "MaskedCategoricalCrossentropy",
        keras_twin=False,
        class_weight={0: 3.0, 1: 0.25, 3: 1.5},
    ),
    _loss("bce_probs", "MaskedBinaryCrossentropy"),
    _loss(
        "bce_logits_ls",
        "MaskedBinaryCrossentropy",
        from_logits=True,
        label_smoothing=0.2,
    ),
    _loss("mse", "MaskedMeanSquaredError"),
    _loss("mae", "MaskedMeanAbsoluteError"),
    _loss("huber", "MaskedHuber", delta=0.5),
    _loss("named_cce", "MaskedLoss", loss="categorical_crossentropy", from_logits=True),
    _loss(
        "named_scce",
        "MaskedLoss",
        loss="sparse_categorical_crossentropy",
        from_logits=True,
    ),
    _loss("named_huber", "MaskedLoss", loss="huber", delta=1.5),
)
LOSSES_BY_NAME = {loss.name: loss for loss in LOSSES}
