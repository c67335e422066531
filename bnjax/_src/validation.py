"""Checks of settings and static shapes, each failing with a message that names the argument."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src.types import BatchNormParams, BatchNormState

AVERAGING = ("ema", "debiased", "cumulative", "ema_from_first")
RUNNING_VAR = ("biased", "unbiased")
_FROM_FLAX = "Flax variables convert with bnjax.interop.from_flax(variables) -> (params, state)"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _ints(items) -> tuple[int, ...] | None:
    """``items`` as a tuple of Python ints, or None if one of them is not an int."""
    items = tuple(items)
    return tuple(int(i) for i in items) if all(_is_int(i) for i in items) else None


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {list(choices)}")


def check_number(name: str, value, *, low=None, high=None, allow_none=False) -> None:
    """Checks a real number (not a bool) against an inclusive range."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {_got(value)}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    lo = -np.inf if low is None else low
    hi = np.inf if high is None else high
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range; expected a value in [{lo}, {hi}]")


def check_int(name: str, value, *, low: int = 0, allow_none: bool = False, what: str = "") -> None:
    """Checks a Python or numpy int (not a bool) of at least ``low``.

    Args:
      name: the argument's name, for the message.
      value: the value to check.
      low: the smallest value allowed.
      allow_none: accept None.
      what: what the int means, added to the messages (``"the input's rank, x.ndim"``).

    Raises:
      TypeError: ``value`` is not an int.
      ValueError: ``value`` is smaller than ``low``.
    """
    if value is None and allow_none:
        return
    meaning = f" ({what})" if what else ""
    if not _is_int(value):
        none = "None or " if allow_none else ""
        raise TypeError(f"{name} must be {none}an int{meaning}; got {_got(value)}")
    if value < low:
        raise ValueError(f"{name}={value!r} is out of range; expected an int >= {low}{meaning}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool; got {_got(value)}")


def as_axes(value) -> int | tuple[int, ...]:
    """Validates ``axis``: an int or a non-empty sequence of distinct ints (stored as a tuple)."""
    if _is_int(value):
        return int(value)
    items = _ints(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if not items:
        raise TypeError(f"axis must be an int or a non-empty tuple of ints; got {value!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"axis={value!r} repeats an axis; expected distinct axes")
    return items


def as_groups(value):
    """Validates ``axis_index_groups``: None or a sequence of sequences of ints (as tuples)."""
    if value is None:
        return None
    try:
        groups = tuple(_ints(g) for g in value)
    except TypeError:  # not a sequence of sequences
        groups = (None,)
    if None in groups:
        raise TypeError(
            f"axis_index_groups must be None or a sequence of sequences of ints; got {value!r}"
        )
    if not groups or any(not g for g in groups):
        raise ValueError(f"axis_index_groups={value!r} has an empty group; expected non-empty")
    return groups


def feature_axes(axis, ndim: int, shape) -> tuple[int, ...]:
    """Resolves ``axis`` against an input of ``ndim`` dimensions into sorted non-negative axes."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(-ndim <= a < ndim for a in axes):
        raise ValueError(
            f"axis={axis!r} is out of range for x of shape {tuple(shape)}; "
            f"expected axes in [{-ndim}, {ndim})"
        )
    resolved = {a % ndim for a in axes}
    if len(resolved) != len(axes):
        raise ValueError(f"axis={axis!r} names the same axis twice for x of shape {tuple(shape)}")
    return tuple(sorted(resolved))


def check_input(x) -> None:
    """``x`` must be a floating-point array."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        raise TypeError(f"x must be an array; got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"x must have a floating-point dtype; got {dtype}. "
            "Cast it first, e.g. x.astype(jnp.float32)"
        )


def check_leaf(name: str, leaf, shape: tuple[int, ...]) -> None:
    """A params/state leaf must exist and have the feature shape."""
    if leaf is None:
        raise ValueError(f"{name} is None but this BatchNorm needs it (shape {shape})")
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise TypeError(
            f"{name} must be an array (jax or numpy) of shape {shape}; got {_got(leaf)}"
        )
    if tuple(jnp.shape(leaf)) != shape:
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(leaf))}; expected {shape}, the shape of x "
            "along the feature axes. Was it initialized for another input or axis?"
        )


def check_static_bool(name: str, value) -> None:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python bool, not a traced value; mark it static "
            f"(jax.jit(..., static_argnames=('{name}',))) or branch outside jit"
        )
    check_bool(name, value)


def check_trees(params, state, feat, scale: bool, center: bool):
    """Checks that ``params`` and ``state`` are the NamedTuples of ``apply`` with leaves of
    the feature shape ``feat`` (``scale``/``bias`` only where enabled); returns the
    statistics ``state`` normalizes with (``state.running``)."""
    running = getattr(state, "running", state)
    trees = {"params": (params, BatchNormParams), "state": (running, BatchNormState)}
    for name, (tree, kind) in trees.items():
        missing = [f for f in kind._fields if not hasattr(tree, f)]
        if not missing:
            continue
        got = f"{type(tree).__name__} without {missing}"
        if isinstance(tree, Mapping):
            got = f"a {type(tree).__name__} with keys {sorted(map(str, tree))}. {_FROM_FLAX}"
        raise TypeError(f"{name} must be a {kind.__name__} with fields {kind._fields}; got {got}")
    if not hasattr(state, "fold"):
        raise TypeError(
            f"state must be a BatchNormState (a NamedTuple with fold and running); got "
            f"{type(state).__name__}. Build it as bnjax.BatchNormState(mean, var, count)"
        )
    if scale:
        check_leaf("params.scale", params.scale, feat)
    if center:
        check_leaf("params.bias", params.bias, feat)
    check_leaf("state.mean", running.mean, feat)
    check_leaf("state.var", running.var, feat)
    check_leaf("state.count", running.count, ())
    count_dtype = jnp.result_type(running.count)
    if not jnp.issubdtype(count_dtype, jnp.integer):
        raise TypeError(f"state.count must be an integer scalar; got dtype {count_dtype}")
    return running


def float_dtype(name, value, allow_none=False):
    """``value`` as a floating ``jnp.dtype`` (or None where allowed)."""
    if value is None:
        if allow_none:
            return None
        # jnp.dtype(None) is float64: refuse rather than silently widen.
        raise TypeError(f"{name} must be a floating dtype such as jnp.float32; got None")
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype; got {value!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype; got {dt}")
    return dt


def shape_of(x_or_shape) -> tuple[int, ...]:
    """The shape of an array, or a shape given as a tuple or list of non-negative ints."""
    if hasattr(x_or_shape, "shape"):
        return tuple(x_or_shape.shape)
    dims = _ints(x_or_shape) if isinstance(x_or_shape, (tuple, list)) else None
    if dims is not None and all(d >= 0 for d in dims):
        return dims
    raise TypeError(
        f"x_or_shape must be an array or a shape (tuple of non-negative ints); got {x_or_shape!r}"
    )
