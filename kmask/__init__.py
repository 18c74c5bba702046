"""kmask: masked losses, metrics and mask tools for padded sequences in Keras 3."""

from kmask import distribute
from kmask.losses import (
    MaskedBinaryCrossentropy,
    MaskedCategoricalCrossentropy,
    MaskedHuber,
    MaskedLoss,
    MaskedMeanAbsoluteError,
    MaskedMeanSquaredError,
    MaskedSparseCategoricalCrossentropy,
    masked_loss,
)
from kmask.masks import combine_masks, keras_mask, sequence_mask, value_mask
from kmask.reduce import (
    REDUCTIONS,
    accumulation_batches,
    accumulation_weights,
    masked_reduce,
)

__version__ = "0.1.0"

__all__ = [
    "REDUCTIONS",
    "MaskedBinaryCrossentropy",
    "MaskedCategoricalCrossentropy",
    "MaskedHuber",
    "MaskedLoss",
    "MaskedMeanAbsoluteError",
    "MaskedMeanSquaredError",
    "MaskedSparseCategoricalCrossentropy",
    "__version__",
    "accumulation_batches",
    "accumulation_weights",
    "combine_masks",
    "distribute",
    "keras_mask",
    "masked_loss",
    "masked_reduce",
    "sequence_mask",
    "value_mask",
]
