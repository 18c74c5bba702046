"""kmask: masked losses, metrics and mask tools for padded sequences in Keras 3."""

from kmask import distribute
from kmask.ctc import MaskedCTC, masked_ctc
from kmask.distillation import (
    MaskedDistiller,
    MaskedLogitsDistillation,
    fused_linear_distillation,
    masked_distillation,
)
from kmask.fused import (
    FusedLinearCrossentropy,
    fused_linear_crossentropy,
    sparse_crossentropy_with_logits,
)
from kmask.layers import AttachMask, LengthMask, ValueMask
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
from kmask.metrics import (
    HeadAccuracy,
    HeadPerplexity,
    MaskedCategoricalAccuracy,
    MaskedMeanMetricWrapper,
    MaskedSequenceAccuracy,
    MaskedSparseCategoricalAccuracy,
    Perplexity,
)
from kmask.packing import segment_weights, shift_labels
from kmask.reduce import (
    REDUCTIONS,
    accumulation_batches,
    accumulation_weights,
    masked_reduce,
)
from kmask.report import LayerMasks, MaskReport, OutputMasks, mask_report
from kmask.seq2seq import SequenceLoss, sequence_loss

__version__ = "0.2.0"

__all__ = [
    "REDUCTIONS",
    "AttachMask",
    "FusedLinearCrossentropy",
    "HeadAccuracy",
    "HeadPerplexity",
    "LayerMasks",
    "LengthMask",
    "MaskReport",
    "MaskedBinaryCrossentropy",
    "MaskedCTC",
    "MaskedCategoricalAccuracy",
    "MaskedCategoricalCrossentropy",
    "MaskedDistiller",
    "MaskedHuber",
    "MaskedLogitsDistillation",
    "MaskedLoss",
    "MaskedMeanAbsoluteError",
    "MaskedMeanMetricWrapper",
    "MaskedMeanSquaredError",
    "MaskedSequenceAccuracy",
    "MaskedSparseCategoricalAccuracy",
    "MaskedSparseCategoricalCrossentropy",
    "OutputMasks",
    "Perplexity",
    "SequenceLoss",
    "ValueMask",
    "__version__",
    "accumulation_batches",
    "accumulation_weights",
    "combine_masks",
    "distribute",
    "fused_linear_crossentropy",
    "fused_linear_distillation",
    "keras_mask",
    "mask_report",
    "masked_ctc",
    "masked_distillation",
    "masked_loss",
    "masked_reduce",
    "segment_weights",
    "sequence_loss",
    "sequence_mask",
    "shift_labels",
    "sparse_crossentropy_with_logits",
    "value_mask",
]
