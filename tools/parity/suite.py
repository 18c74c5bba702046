"""The parity suite: families of cases, each registered with `@_family`, and
`build_suite`, which runs them all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import kmask
from tools.parity.cases import (
    Case,
    distillation_case,
    fused_case,
    head_metric_case,
    layer_case,
    loss_case,
    metric_case,
)
from tools.parity.devices import data as device_data
from tools.parity.losses import LOSSES, LOSSES_BY_NAME, Loss
from tools.parity.references import np_absolute, np_squared
from tools.parity.sequences import sequence_cases
from tools.parity.sources import (
    ALL_SOURCES,
    EDGE_SOURCES,
    HALF_DTYPES,
    MASK_SOURCES,
    NAN,
    ONE_HOT_PAD,
)

_FAMILIES: list[Callable[[], list[Case]]] = []


def _family(build: Callable[[], list[Case]]) -> Callable[[], list[Case]]:
    """Registers a function that returns cases; `build_suite` runs them all."""
    _FAMILIES.append(build)
    return build


def _sources_for(loss: Loss) -> list[str]:
    return [name for name, source in MASK_SOURCES.items() if source.fits(loss)]


def _losses_for(source: str) -> list[Loss]:
    return [loss for loss in LOSSES if ALL_SOURCES[source].fits(loss)]


@_family
def _covering_families() -> list[Case]:
    """Loss x reduction, loss x mask source and mask source x reduction,
    each pair once, the third factor rotating."""
    cases = []
    for index, loss in enumerate(LOSSES):
        sources = _sources_for(loss)
        for shift, reduction in enumerate(kmask.REDUCTIONS):
            cases.append(loss_case(loss, _pick(sources, index + shift), reduction))
        for shift, source in enumerate(sources):
            cases.append(
                loss_case(loss, source, _pick(kmask.REDUCTIONS, index + shift))
            )
    for index, source in enumerate(MASK_SOURCES):
        losses = _losses_for(source)
        for shift, reduction in enumerate(kmask.REDUCTIONS):
            cases.append(loss_case(_pick(losses, index + shift), source, reduction))
    return cases


@_family
def _half_precision() -> list[Case]:
    """Every loss with float16 and bfloat16 inputs."""
    return [
        loss_case(
            loss,
            _pick(_sources_for(loss), 3 * index + shift),
            _pick(kmask.REDUCTIONS, index + 2 * shift),
            dtype,
        )
        for index, loss in enumerate(LOSSES)
        for shift, dtype in enumerate(HALF_DTYPES)
    ]


@_family
def _edge_cases() -> list[Case]:
    """Every loss on all-padding, no-padding and one-token batches."""
    return [
        loss_case(loss, source, _pick(kmask.REDUCTIONS, index + shift))
        for index, loss in enumerate(LOSSES)
        for shift, source in enumerate(EDGE_SOURCES)
    ]


@_family
def _compiled() -> list[Case]:
    """Every loss under `jax.jit` / `tf.function`, as `fit` calls it."""
    return [
        loss_case(loss, "combined", _pick(kmask.REDUCTIONS, index), compiled=True)
        for index, loss in enumerate(LOSSES)
    ]


@_family
def _metrics() -> list[Case]:
    """Every metric of `kmask.metrics`, over two batches."""
    losses = LOSSES_BY_NAME
    wrapper = "MaskedMeanMetricWrapper"
    scce = losses["scce_logits_ls_z"]
    kmask_loss = {**scce.spec(), "kwargs": {**scce.kwargs, "mask_value": -100}}

    def perplexity_of_labels(name: str, padding: str, **options: Any) -> Case:
        return metric_case(
            name,
            {
                "metric": "Perplexity",
                "kwargs": {"from_logits": True, "mask_value": -100},
            },
            losses["scce_logits"],
            lambda t, p: losses["scce_logits"].reference(t, p)[0],
            padding,
            perplexity=True,
            **options,
        )

    def mae_of_nan_targets(padding: str, **options: Any) -> Case:
        return metric_case(
            "mae/nan_targets",
            {"metric": wrapper, "kwargs": {"fn": "mae", "mask_value": NAN}},
            losses["mae"],
            lambda t, p: np_absolute(t, p)[0],
            padding,
            **options,
        )

    return [
        mae_of_nan_targets("pad"),
        metric_case(
            "mse/propagated",
            {"metric": wrapper, "kwargs": {"fn": "mse"}, "masking": 0.0},
            losses["mse"],
            lambda t, p: np_squared(t, p)[0],
            "propagated",
        ),
        metric_case(
            "kmask_loss/weights",
            {"metric": wrapper, "kwargs": {}, "fn_loss": kmask_loss},
            scce,
            lambda t, p: scce.reference(t, p)[0],
            "weights",
        ),
        metric_case(
            "sparse_accuracy/weights",
            {
                "metric": "MaskedSparseCategoricalAccuracy",
                "kwargs": {"mask_value": -100},
            },
            losses["scce_logits"],
            lambda t, p: (p.argmax(-1) == t).astype(float),
            "weights",
        ),
        metric_case(
            "categorical_accuracy/pad_vector",
            {
                "metric": "MaskedCategoricalAccuracy",
                "kwargs": {"mask_value": ONE_HOT_PAD},
            },
            losses["cce_probs"],
            lambda t, p: (p.argmax(-1) == t.argmax(-1)).astype(float),
            "pad",
        ),
        perplexity_of_labels("perplexity/labels", "pad"),
        metric_case(
            "perplexity/one_hot",
            {"metric": "Perplexity", "kwargs": {"mask_value": ONE_HOT_PAD}},
            losses["cce_probs"],
            lambda t, p: losses["cce_probs"].reference(t, p)[0],
            "weights",
            perplexity=True,
        ),
        perplexity_of_labels("perplexity/all_padding", "all_padding"),
        mae_of_nan_targets("weights", dtype="float16"),
        perplexity_of_labels("perplexity/labels", "weights", dtype="bfloat16"),
        head_metric_case("HeadAccuracy", "correct"),
        head_metric_case("HeadPerplexity", "nll", weighted=True),
    ]


@_family
def _layers() -> list[Case]:
    """Every layer of `kmask.layers` in front of a loss."""
    losses = LOSSES_BY_NAME
    post, pre = {"padding": "post"}, {"padding": "pre"}
    nan, vector = {"mask_value": NAN}, {"mask_value": [0.5, -1.0, 2.0]}
    return [
        layer_case("length_post", "LengthMask", post, losses["mse"], "token_mean"),
        layer_case(
            "length_pre", "LengthMask", pre, losses["scce_logits"], "sequence_mean"
        ),
        layer_case("value_nan", "ValueMask", nan, losses["huber"], "sum"),
        layer_case("value_vector", "ValueMask", vector, losses["mae"], "none"),
        layer_case("attach", "AttachMask", {}, losses["cce_logits_ls"], "token_mean"),
        layer_case(
            "length_post",
            "LengthMask",
            post,
            losses["bce_logits_ls"],
            "sum",
            "bfloat16",
        ),
    ]


@_family
def _fused() -> list[Case]:
    """`kmask.sparse_crossentropy_with_logits`, `kmask.fused_linear_crossentropy`
    and `kmask.FusedLinearCrossentropy`: every reduction, the mask sources,
    smoothing and z-loss, no bias, bfloat16, compiled, all padding, and the
    head's soft cap, tied (`[vocabulary, width]`) kernel and token accuracy."""
    return [
        fused_case("crossentropy", "explicit_mask"),
        fused_case("crossentropy", "pad_negative", label_smoothing=0.1, z_loss=0.05),
        fused_case("crossentropy", "explicit_mask", dtype="bfloat16", compiled=True),
        fused_case("crossentropy", "all_padding"),
        fused_case("function", "pad_negative", "token_mean"),
        fused_case("function", "explicit_mask", "sum"),
        fused_case(
            "function",
            "step_weights",
            "sequence_mean",
            label_smoothing=0.1,
            z_loss=0.05,
        ),
        fused_case(
            "function", "sequence_weights", "sum_over_batch_size", use_bias=False
        ),
        fused_case("function", "pad_negative", "none"),
        fused_case("function", "all_padding", "token_mean"),
        fused_case("function", "explicit_mask", "token_mean", dtype="bfloat16"),
        fused_case(
            "function", "step_weights", "token_mean", compiled=True, label_smoothing=0.1
        ),
        fused_case("layer", "propagated", "token_mean"),
        fused_case("layer", "pad_negative", "sequence_mean", z_loss=0.05),
        fused_case(
            "layer",
            "pad_negative",
            "token_mean",
            label_smoothing=0.1,
            softcap=0.8,
            accuracy=True,
        ),
        fused_case("layer", "propagated", "sum", accuracy=True, compiled=True),
        fused_case("function", "pad_negative", "token_mean", softcap=0.8),
        fused_case("function", "step_weights", "sum", transpose_kernel=True),
        fused_case("function", "explicit_mask", "token_mean", accuracy=True),
        fused_case(
            "function",
            "step_weights",
            "token_mean",
            compiled=True,
            softcap=0.8,
            transpose_kernel=True,
            accuracy=True,
        ),
        fused_case(
            "function",
            "pad_negative",
            "token_mean",
            dtype="bfloat16",
            softcap=0.8,
            transpose_kernel=True,
        ),
    ]


@_family
def _distillation() -> list[Case]:
    """`kmask.masked_distillation` and `kmask.fused_linear_distillation`:
    each divergence, each padding source and reduction, two temperatures,
    compiled, all padding."""
    return [
        distillation_case("explicit_mask", "token_mean", "kl"),
        distillation_case("pad_negative", "sequence_mean", "reverse_kl"),
        distillation_case("step_weights", "sum", "jsd", beta=0.3, temperature=1.0),
        distillation_case("propagated", "sum_over_batch_size", "kl", temperature=1.0),
        distillation_case("propagated", "token_mean", "jsd", compiled=True),
        distillation_case("explicit_mask", "none", "reverse_kl", compiled=True),
        distillation_case("all_padding", "token_mean", "jsd"),
        distillation_case("pad_negative", "token_mean", "kl", fused=True),
        distillation_case("propagated", "sum", "jsd", beta=0.3, fused=True),
        distillation_case("step_weights", "sequence_mean", "reverse_kl", fused=True),
        distillation_case(
            "explicit_mask", "token_mean", "jsd", compiled=True, fused=True
        ),
        distillation_case("all_padding", "token_mean", "kl", fused=True),
    ]


@_family
def _sequences() -> list[Case]:
    """Masked CTC, packed sequences and whole-sequence accuracy; see
    `tools.parity.sequences`."""
    return sequence_cases()


def _replicas(setup: str) -> int:
    return 2 if setup == "two_devices" else 1


@_family
def _devices() -> list[Case]:
    """One device against two (and against accumulated micro-batches): SGD
    steps of kmask's masked MSE in each of `devices.data.COMMON_SETUPS`,
    the weights after 1 and 3 steps and the first logged loss against NumPy's
    full-batch run. The child runs them all in one process with 2 devices
    (`devices.rows.run_backend`); see `tools/parity/devices/`."""
    expected = {
        "weights": device_data.expected_weights(),
        "loss": np.float64(device_data.expected_loss()),
    }
    return [
        Case(
            name=f"devices/{setup}/{source}",
            runner="devices",
            spec={"setup": setup, "source": source, "half": []},
            inputs={},
            # `replicas`: what `fit` ran on, so a setup that quietly fell
            # back to one device fails.
            expected={**expected, "replicas": np.float64(_replicas(setup))},
        )
        for setup in device_data.COMMON_SETUPS
        for source in device_data.SOURCES
    ]


def _pick(options: Sequence, index: int):
    return options[index % len(options)]


def build_suite(patterns: Sequence[str] = ()) -> list[Case]:
    """The parity suite, the same on every call.

    Args:
        patterns: Keep the cases whose name contains any of these; all when
            empty.

    Returns:
        The cases, in a fixed order, names unique (a case two families build
        alike is kept once).
    """
    suite: dict[str, Case] = {}
    for build in _FAMILIES:
        for case in build():
            suite.setdefault(case.name, case)
    return [
        case
        for case in suite.values()
        if not patterns or any(pattern in case.name for pattern in patterns)
    ]
