"""A wrapper's arguments, resolved once when it is built: what a loss or
metric wraps (a name, a `keras.losses.Loss` or a callable, resolved to
`(y_true, y_pred) -> per-step values`) and its pad value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np

from kmask.ops.crossentropy import crossentropy, sparse_crossentropy


class Wrapped(NamedTuple):
    """What a loss or metric wraps, resolved once when it is built."""

    fn: Any  # the function, name or instance (a class is instantiated)
    kwargs: dict  # its keyword arguments (an instantiated class owns them)
    name: str  # the default name of the wrapper
    class_axis: int  # the axis of `y_pred` the function reduces
    per_step: Callable  # `(y_true, y_pred) -> per-step values`, class axis last
    sparse_labels: bool  # whether it takes integer labels (see `takes_sparse_labels`)
    target_kind: str | None  # see `target_kind`
    ignore_class: int | None  # see `ignore_class`


def wrapped(
    fn: Any,
    fn_kwargs: dict,
    argument: str = "loss",
    by_name: Callable[[str], Any] | None = None,
) -> Wrapped:
    """Everything a wrapper needs to know about `fn` and its keyword
    arguments (see `per_step_function` for `argument` and `by_name`). The
    per-step function takes its class axis last: the pipeline moves it
    there."""
    fn, fn_kwargs = instantiate_class(fn, fn_kwargs)
    return Wrapped(
        fn,
        fn_kwargs,
        default_name(fn),
        class_axis(fn, fn_kwargs),
        per_step_function(
            class_last(fn), class_last_kwargs(fn_kwargs), argument, by_name
        ),
        takes_sparse_labels(fn),
        target_kind(fn),
        ignore_class(fn, fn_kwargs),
    )


def pad_values(mask_value: Any) -> float | tuple[float, ...]:
    """`mask_value` as a Python float, or a tuple of floats for a vector.

    Plain Python rather than NumPy: `torch.compile` traces NumPy calls as
    tensor operations, and a branch on one would break its graph.

    Raises:
        ValueError: naming `mask_value`, for anything but a number or a
            vector of numbers (a string, a nested list, a dict...).
    """
    values = mask_value.tolist() if hasattr(mask_value, "tolist") else mask_value
    try:
        if isinstance(values, str):
            raise TypeError(values)
        if isinstance(values, (list, tuple)):
            return tuple(float(value) for value in values)
        return float(values)
    except (TypeError, ValueError):
        raise ValueError(
            "Invalid value for argument `mask_value`. Expected a number, "
            "float('nan') or a vector of numbers (a one-hot pad such as "
            f"[0, 0, 1]). Received: mask_value={mask_value!r}"
        ) from None


def default_name(fn: Any) -> str:
    """`masked_` and the wrapped function's name; a kmask loss's name already
    says it."""
    if isinstance(fn, str):
        base = fn
    elif isinstance(fn, keras.losses.Loss):
        base = fn.name
    else:
        base = getattr(fn, "__name__", type(fn).__name__)
    return base if base.startswith("masked_") else f"masked_{base}"


def instantiate_class(loss: Any, loss_kwargs: dict) -> tuple[Any, dict]:
    """A Loss class is instantiated with the kwargs, which it then owns."""
    if isinstance(loss, type) and issubclass(loss, keras.losses.Loss):
        return loss(**loss_kwargs), {}
    return loss, dict(loss_kwargs)


def per_step_function(
    fn: Any,
    fn_kwargs: dict,
    argument: str = "loss",
    by_name: Callable[[str], Any] | None = None,
) -> Callable:
    """Resolves `fn` to `(y_true, y_pred) -> per-step values`: a Keras loss
    name (or whatever `by_name` finds for a name), a `keras.losses.Loss`
    instance or class, or a callable taking `fn_kwargs`. Errors name the
    constructor's `argument`."""
    if isinstance(fn, str):
        resolved = _loss_by_name(fn)
        if resolved is None and by_name is not None:
            resolved = by_name(fn)
        if resolved is None:
            kinds = "Keras loss" if by_name is None else "Keras loss or metric function"
            raise ValueError(
                f"Invalid value for argument `{argument}`: not a {kinds} name. "
                f"Received: {argument}={fn!r}"
            )
        if isinstance(resolved, keras.losses.Loss) and fn_kwargs:
            resolved = type(resolved)(**fn_kwargs)
            fn_kwargs = {}
        fn = resolved
    fn, fn_kwargs = instantiate_class(fn, fn_kwargs)
    if isinstance(fn, keras.losses.Loss):
        if fn_kwargs:
            raise ValueError(
                "Keyword arguments configure a loss given by name or class, not "
                f"an instance. Received: {argument}={fn!r}, "
                f"{argument}_kwargs={fn_kwargs}"
            )
        return fn.call
    if not callable(fn) or isinstance(fn, type):
        raise ValueError(
            f"Invalid value for argument `{argument}`: expected a Keras loss "
            "name, a keras.losses.Loss instance or class, or a callable "
            f"(y_true, y_pred) -> per-step values. Received: {argument}={fn!r}"
        )

    def per_step(y_true, y_pred):
        return fn(y_true, y_pred, **fn_kwargs)

    return per_step


def class_axis(fn: Any, fn_kwargs: dict) -> int:
    """The class axis the wrapped function reduces: from the keyword
    arguments, else the loss's own (`axis` of a Keras loss, a kmask loss's
    kwargs)."""
    if "axis" in fn_kwargs:
        return fn_kwargs["axis"]
    axis = getattr(fn, "loss_kwargs", {}).get("axis", getattr(fn, "axis", None))
    if axis is None and isinstance(fn, keras.losses.Loss):
        # Keras's wrapped losses keep it in their config only.
        axis = fn.get_config().get("axis")
    return -1 if axis is None else axis


# Keras's functions and losses that take integer labels.
SPARSE_LABEL_NAMES = frozenset(
    {
        "sparse_categorical_crossentropy",
        "sparse_categorical_accuracy",
        "sparse_top_k_categorical_accuracy",
    }
)


def takes_sparse_labels(fn: Any) -> bool:
    """Whether `fn` takes integer labels (checked against the number of
    classes): a Keras sparse loss or metric by name, function or instance,
    kmask's cross-entropy ops, or a kmask loss that does."""
    if isinstance(fn, str):
        return fn in SPARSE_LABEL_NAMES
    if getattr(fn, "_sparse_labels", False):
        return True
    if isinstance(fn, keras.losses.SparseCategoricalCrossentropy):
        return True
    sparse_functions = (
        keras.losses.sparse_categorical_crossentropy,
        keras.metrics.sparse_categorical_accuracy,
        keras.metrics.sparse_top_k_categorical_accuracy,
        sparse_crossentropy,
        crossentropy,
    )
    return any(fn is function for function in sparse_functions)


# Keras's functions and losses that take one-hot (or soft) targets only.
ONE_HOT_NAMES = frozenset(
    {
        "categorical_crossentropy",
        "categorical_focal_crossentropy",
        "categorical_accuracy",
        "top_k_categorical_accuracy",
    }
)


def target_kind(fn: Any) -> str | None:
    """`"labels"` when `fn` takes integer labels only, `"one_hot"` when it
    takes targets of the predictions' shape only (one-hot or soft), `None`
    when it takes either or dense targets. A kmask loss or metric says its
    own."""
    if isinstance(fn, str):
        if fn in SPARSE_LABEL_NAMES:
            return "labels"
        return "one_hot" if fn in ONE_HOT_NAMES else None
    kind = getattr(fn, "_target_kind", None)
    if kind is not None:
        return kind
    if isinstance(fn, keras.losses.SparseCategoricalCrossentropy) or any(
        fn is function
        for function in (
            keras.losses.sparse_categorical_crossentropy,
            keras.metrics.sparse_categorical_accuracy,
            keras.metrics.sparse_top_k_categorical_accuracy,
        )
    ):
        return "labels"
    one_hot_classes = (
        keras.losses.CategoricalCrossentropy,
        keras.losses.CategoricalFocalCrossentropy,
    )
    if isinstance(fn, one_hot_classes) or any(
        fn is function
        for function in (
            keras.losses.categorical_crossentropy,
            keras.losses.categorical_focal_crossentropy,
            keras.metrics.categorical_accuracy,
            keras.metrics.top_k_categorical_accuracy,
        )
    ):
        return "one_hot"
    return None


def ignore_class(fn: Any, fn_kwargs: dict) -> int | None:
    """The `ignore_class` the wrapped function was given (as a keyword
    argument, or in a Keras loss's config), or `None`; a kmask loss finds
    its own padding."""
    if "ignore_class" in fn_kwargs:
        return fn_kwargs["ignore_class"]
    if isinstance(fn, keras.losses.Loss) and not hasattr(fn, "target_mask"):
        return fn.get_config().get("ignore_class")
    return None


def class_last_kwargs(fn_kwargs: dict) -> dict:
    """`fn_kwargs` with `axis=-1` where they have an axis: the pipeline
    moves the class axis last before the per-step function runs."""
    if "axis" not in fn_kwargs:
        return fn_kwargs
    return {**fn_kwargs, "axis": -1}


def class_last(fn: Any) -> Any:
    """A `keras.losses.Loss` instance with another `axis` rebuilt with
    `axis=-1` (see `class_last_kwargs`); anything else as it is."""
    # A kmask loss moves its own class axis.
    if not isinstance(fn, keras.losses.Loss) or hasattr(fn, "target_mask"):
        return fn
    config = fn.get_config()
    if config.get("axis", -1) == -1:
        return fn
    return type(fn).from_config({**config, "axis": -1})


def plain(value: Any) -> Any:
    """`value` as plain Python for a config: NumPy arrays as lists, NumPy
    scalars as Python numbers, tuples as lists (Keras's JSON has no tuples
    or arrays that come back as themselves), recursively."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def wrapper_config(key: str, fn: Any, fields: dict, fn_kwargs: dict) -> dict:
    """The `get_config` of a wrapper: its function under `key` (a name stays a
    name), its own `fields`, then the function's keyword arguments."""
    if not isinstance(fn, str):
        fn = keras.saving.serialize_keras_object(fn)
    return {key: fn, **plain(fields), **plain(fn_kwargs)}


def deserialize_wrapped(config: dict[str, Any], key: str) -> dict[str, Any]:
    """`config` with its wrapped function (under `key`) deserialized."""
    config = dict(config)
    if isinstance(config.get(key), dict):
        config[key] = keras.saving.deserialize_keras_object(config[key])
    return config


def _loss_by_name(name: str) -> Any:
    """A Keras loss function or Loss instance by name (aliases such as
    `"mae"` included), or `None`."""
    try:
        return keras.losses.get(name)
    except ValueError:
        return None
