"""The divergence between a teacher's and a student's rows of logits, written
once in `keras.ops`: its value, and its gradient with respect to the
student's logits (what the chunked form, `kmask.fused_linear_distillation`,
needs in its backward pass).

With `p = softmax(teacher)`, `q = softmax(student)` (both already divided by
the temperature) and, for the generalized Jensen-Shannon divergence,
`m = beta * p + (1 - beta) * q` (Liger-Kernel's convention):

| divergence   | per row                                          |
|--------------|--------------------------------------------------|
| `kl`         | `KL(p || q) = sum(p * (log p - log q))`          |
| `reverse_kl` | `KL(q || p) = sum(q * (log q - log p))`          |
| `jsd`        | `beta * KL(p || m) + (1 - beta) * KL(q || m)`    |

As in Liger-Kernel, `jsd` with `beta=0` is the forward `kl` and with
`beta=1` the `reverse_kl` (the formula itself vanishes at both ends).

The gradient with respect to the student's logits is `q * (g - sum(q * g))`
with `g` the derivative with respect to `q`: `q - p` for `kl`,
`q * (log q - log p - KL(q || p))` for `reverse_kl`, and `g = (1 - beta) *
(log q - log m)` for `jsd`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from keras import ops

from kmask._shapes import positive_number

DIVERGENCES = ("kl", "reverse_kl", "jsd")
"""The divergences `kmask.masked_distillation` takes, by name."""


class Divergence(NamedTuple):
    """What to compute: the divergence's name (`jsd` at `beta` 0 or 1 is
    already its `kl` or `reverse_kl` end), `beta` and the temperature."""

    name: str
    beta: float
    temperature: float


def divergence_options(divergence: str, beta: float, temperature: float) -> Divergence:
    """The checked `Divergence`; a `ValueError` naming the argument else."""
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"Invalid value for argument `divergence`. Expected one of "
            f"{DIVERGENCES}. Received: divergence={divergence!r}"
        )
    number = isinstance(beta, (int, float)) and not isinstance(beta, bool)
    if not number or not 0 <= beta <= 1:
        raise ValueError(
            "Invalid value for argument `beta`. Expected a number in [0, 1]. "
            f"Received: beta={beta!r}"
        )
    positive_number("temperature", temperature)
    if divergence == "jsd" and beta in (0, 1):
        divergence = "kl" if beta == 0 else "reverse_kl"
    return Divergence(divergence, float(beta), float(temperature))


def row_divergence(
    teacher_logits: Any, student_logits: Any, options: Divergence
) -> Any:
    """The divergence of each row of `[..., classes]` logits, before the
    temperature: both are divided by `options.temperature` here.

    Returns:
        The per-row divergence, the logits' shape without the last axis.
    """
    log_p, log_q = _log_probs(teacher_logits, student_logits, options)
    if options.name == "kl":
        return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    if options.name == "reverse_kl":
        return ops.sum(ops.exp(log_q) * (log_q - log_p), axis=-1)
    log_m = _log_mixture(log_p, log_q, options.beta)
    beta = options.beta
    return beta * ops.sum(ops.exp(log_p) * (log_p - log_m), axis=-1) + (
        1.0 - beta
    ) * ops.sum(ops.exp(log_q) * (log_q - log_m), axis=-1)


def row_divergence_grad(
    teacher_logits: Any, student_logits: Any, options: Divergence, upstream: Any
) -> Any:
    """`upstream * d row_divergence / d student_logits` (`upstream` of the
    per-row shape), the temperature's `1 / T` included."""
    log_p, log_q = _log_probs(teacher_logits, student_logits, options)
    q = ops.exp(log_q)
    if options.name == "kl":
        grad = q - ops.exp(log_p)
    else:
        if options.name == "reverse_kl":
            g = log_q - log_p
        else:
            log_m = _log_mixture(log_p, log_q, options.beta)
            g = (1.0 - options.beta) * (log_q - log_m)
        grad = q * (g - ops.sum(q * g, axis=-1, keepdims=True))
    return grad * ops.expand_dims(upstream / options.temperature, -1)


def _log_probs(teacher_logits, student_logits, options: Divergence):
    temperature = options.temperature
    return (
        ops.log_softmax(teacher_logits / temperature, axis=-1),
        ops.log_softmax(student_logits / temperature, axis=-1),
    )


def _log_mixture(log_p, log_q, beta: float):
    """`log(beta * p + (1 - beta) * q)` without leaving log space."""
    return ops.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
