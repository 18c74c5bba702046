"""Fused per-step ops: one pass over the logits each way, and a gradient that
selects padding away inside itself.

The sparse cross-entropy from logits, per step, is `logsumexp(x) - x[y]` and
its gradient is `softmax(x) - one_hot(y)`. Autodiff of the textbook form
keeps `log_softmax(x)` (a second `[tokens, classes]` array) for the backward
pass, and a NaN-safe mask needs a `where` over the whole logits in both
directions. `sparse_crossentropy_with_logits` keeps two numbers per step (the
row's maximum and the log of its sum of exponentials) and computes the
gradient as one expression, `where(valid, (softmax(x) - one_hot(y)) *
upstream, 0)`, which XLA (JAX, TensorFlow) fuses into a single loop: padding
costs no extra pass, and whatever it holds (NaN, inf) reaches neither the loss
nor its gradient.

`categorical_crossentropy_with_logits` (one-hot or soft targets) and
`mean_squared_error` do the same for dense targets, and `linear_crossentropy`
computes the sparse cross-entropy of `hidden @ kernel + bias` a chunk of
tokens at a time (see `kmask.fused_linear_crossentropy`).

Each op is written once in `keras.ops`; on PyTorch, which runs op by op, the
same op runs as a kernel of its own, chosen in one place
(`kmask.ops._dispatch`).
"""

from kmask.ops.crossentropy import (
    binary_crossentropy,
    categorical_crossentropy_with_logits,
    crossentropy,
    sparse_crossentropy,
    sparse_crossentropy_with_logits,
)
from kmask.ops.linear import linear_crossentropy
from kmask.ops.squared_error import mean_squared_error

__all__ = [
    "binary_crossentropy",
    "categorical_crossentropy_with_logits",
    "crossentropy",
    "linear_crossentropy",
    "mean_squared_error",
    "sparse_crossentropy",
    "sparse_crossentropy_with_logits",
]
