"""Checkpoint conversion between bnjax and ``eqx.nn.BatchNorm`` (or ``bnjax.equinox``).

An Equinox BatchNorm keeps ``weight`` and ``bias`` in the module and its statistics in an
``eqx.nn.State``, in one of two layouts. ``mode="ema"``: a first-time flag and the running
``(mean, var)``, copied bit for bit. ``mode="batch"``: a counter and the raw averages
``hidden`` (the mean's started at 0, the variance's at 1), which Equinox divides by ``1 -
momentum**counter`` in inference; bnjax keeps the quotient, the statistics Equinox
normalizes with, computed with Equinox's own formula, so a converted layer gives Equinox's
outputs and continues its averages exactly. The meaning of each mode comes from
``bnjax.equinox.BatchNorm`` with the same ``mode`` (:mod:`bnjax._src.equinox`).

Nothing here imports Equinox until a module is converted back (``to_equinox``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src.interop import as_count, as_pytrees, as_shaped, raw_average
from bnjax._src.types import BatchNormParams, BatchNormState

# The attribute naming the ``eqx.nn.State`` index of each layout's ``(mean, var)``.
_STATS_INDEX = {"bnjax": "state_index", "batch": "batch_state_index", "ema": "ema_state_index"}


def _kind(bn_module) -> str:
    """``"bnjax"``, ``"batch"`` or ``"ema"``: whose layout ``bn_module``'s state has."""
    kind = "bnjax" if hasattr(bn_module, "state_index") else getattr(bn_module, "mode", None)
    if kind not in ("bnjax", "batch", "ema") or not hasattr(bn_module, _STATS_INDEX[kind]):
        raise TypeError(
            "bn_module must be an eqx.nn.BatchNorm or a bnjax.equinox.BatchNorm; got "
            f"{type(bn_module).__name__}"
        )
    return kind


@functools.partial(jax.jit, static_argnums=2)
def _equinox_average(hidden, counter, momentum: float):
    """The statistic ``eqx.nn.BatchNorm(mode="batch")`` normalizes with in inference, by
    Equinox's own formula."""
    with jax.numpy_dtype_promotion("standard"):  # Equinox's formula mixes int and float
        return hidden / jnp.where(counter == 0, 1, 1 - momentum**counter)


def from_equinox(
    bn_module: Any, state: Any, *, count: int | None = None
) -> tuple[BatchNormParams, BatchNormState]:
    """Reads an Equinox BatchNorm's parameters and its entries of an ``eqx.nn.State``.

    Args:
      bn_module: an ``eqx.nn.BatchNorm`` (``mode="batch"`` or ``"ema"``), or a
        ``bnjax.equinox.BatchNorm``.
      state: the ``eqx.nn.State`` holding its statistics (it stays valid).
      count: ``mode="ema"`` keeps only whether a batch was seen: the ``state.count`` for
        a layer that has seen one (default 1; a fresh layer gives 0). Must be None for
        the other layouts, which keep their count.

    Returns:
      ``(params, state)`` for ``bnjax.equinox.BatchNorm`` with the same ``mode`` (or the
      core with ``axis=0``): ``scale``/``bias`` are ``weight``/``bias`` (None without
      ``channelwise_affine``); with ``mode="batch"`` the statistics are the ones Equinox
      normalizes with in inference, ``hidden / (1 - momentum**counter)``, and ``count``
      is its counter.

    Raises:
      TypeError: ``bn_module`` is not an Equinox BatchNorm, or ``count`` not an int.
      ValueError: ``count`` is given where the layer keeps its own, or is not 0 for a
        layer that has seen no batch.

    Example:
      >>> import equinox as eqx, bnjax
      >>> bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
      >>> params, bn_state = bnjax.interop.from_equinox(bn, state)
      >>> bn_state.var.tolist(), int(bn_state.count)
      ([1.0, 1.0, 1.0], 0)
    """
    kind = _kind(bn_module)
    if kind != "ema" and count is not None:
        raise ValueError(
            f"count={count!r} is given, but this layer ({kind!r} layout) keeps its own count; "
            "expected count=None"
        )
    stats = state.get(getattr(bn_module, _STATS_INDEX[kind]))
    mean, var = stats[:2]
    if kind == "bnjax":
        count = stats.count
    elif kind == "batch":
        count = state.get(bn_module.batch_counter)
        mean, var = (_equinox_average(h, count, float(bn_module.momentum)) for h in stats)
    elif state.get(bn_module.ema_first_time_index):  # it has seen no batch
        if count not in (None, 0):
            raise ValueError(
                f"count={count!r}, but this layer has seen no batch (its first-time flag is "
                "set); expected None or 0"
            )
        count = 0
    elif count is None:
        count = 1
    names = ("weight", "bias", "mean", "var", "counter" if kind == "batch" else "count")
    return as_pytrees(names, (bn_module.weight, bn_module.bias, mean, var, count))


def to_equinox(
    params: BatchNormParams, bn_state: BatchNormState, bn_module: Any, state: Any
) -> tuple[Any, Any]:
    """Writes bnjax's parameters and statistics into an Equinox BatchNorm and its state.

    Args:
      params: ``BatchNormParams``; ``scale`` and ``bias`` of shape ``(input_size,)``, or
        None for a layer without ``channelwise_affine``.
      bn_state: ``BatchNormState`` with ``mean`` and ``var`` of shape ``(input_size,)``.
      bn_module: the ``eqx.nn.BatchNorm`` (``mode="batch"`` or ``"ema"``) or
        ``bnjax.equinox.BatchNorm`` to fill; its dtypes are kept.
      state: an ``eqx.nn.State`` holding its entries (it stays valid: a copy is set).

    Returns:
      ``(bn_module, state)``, new objects. ``mode="ema"``: the first-time flag is
      ``count == 0``, the statistics are copied. ``mode="batch"``: the counter is
      ``count`` and ``hidden`` the value nearest ``average * (1 - momentum**count)``
      that Equinox's debiasing maps back to ``average`` exactly (its division is not
      one-to-one, so this is within 1 ulp of the ``hidden`` Equinox had).

    Raises:
      TypeError: ``bn_module`` is not an Equinox BatchNorm.
      ValueError: a leaf is missing, present where the layer has none, or of the wrong
        shape.
    """
    import equinox as eqx

    kind = _kind(bn_module)
    if bn_module.channelwise_affine:
        weight = _leaf(params.scale, "params.scale", bn_module.weight)
        bias = _leaf(params.bias, "params.bias", bn_module.bias)
        bn_module = eqx.tree_at(lambda m: (m.weight, m.bias), bn_module, (weight, bias))
    elif params.scale is not None or params.bias is not None:
        raise ValueError(
            "params has a scale or bias, but bn_module has channelwise_affine=False; "
            "expected BatchNormParams(scale=None, bias=None)"
        )
    count = as_count(bn_state.count, "bn_state.count")
    state = jax.tree.unflatten(*reversed(jax.tree.flatten(state)))  # State.set voids its input
    index = getattr(bn_module, _STATS_INDEX[kind])
    old = state.get(index)
    stats = (
        _leaf(bn_state.mean, "bn_state.mean", old[0]),
        _leaf(bn_state.var, "bn_state.var", old[1]),
    )
    if kind == "bnjax":
        stats = BatchNormState(*stats, count.astype(old.count.dtype))
    elif kind == "ema":
        state = state.set(bn_module.ema_first_time_index, jnp.asarray(int(count) == 0))
    else:
        # The counter keeps Equinox's type: its dtype, and weakly typed if it is (as
        # ``jnp.array(0)`` makes it), since ``State.set`` refuses any other type.
        was = state.get(bn_module.batch_counter)
        counter = jnp.array(int(count)) if was.weak_type else jnp.asarray(count, was.dtype)
        # At counter 0 Equinox divides by 1, and raw_average gives each average back.
        momentum = float(bn_module.momentum)
        debias = functools.partial(_equinox_average, counter=counter, momentum=momentum)
        stats = tuple(jnp.asarray(raw_average(np.asarray(a), debias)) for a in stats)
        state = state.set(bn_module.batch_counter, counter)
    return bn_module, state.set(index, stats)


def _leaf(value, name: str, like) -> jax.Array:
    """``value`` as an array of ``like``'s shape and dtype, or a ValueError naming it."""
    if value is None:
        raise ValueError(f"{name} is None; expected an array of shape {like.shape}")
    return as_shaped(value, name, like.shape, "the layer's input_size").astype(like.dtype)
