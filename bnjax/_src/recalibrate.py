"""Precise-BN recalibration: exact population statistics of every BatchNorm layer's input.

Running averages lag behind the weights they were collected with. Recalibration (Wu and
Johnson, 2021, "Rethinking Batch in BatchNorm") replaces them by exact statistics over a
set of batches, computed with the final weights.

:func:`recalibrate` swaps every :class:`BatchNormState` in the model's state for a
:class:`PopulationAccumulator` and runs the unchanged model in training mode.
``BatchNorm.apply`` recognises the accumulator: it normalizes exactly as in training
(batch statistics, so every layer sees the inputs it saw in training) and merges the
batch's count, mean and second central moment into the accumulator with Chan's parallel
formula. Each accumulator then becomes a ``BatchNormState`` holding the exact mean and
the exact **population variance** of the layer's input over all batches (times
``n / (n - 1)`` for ``running_var="unbiased"``), not a mean of batch variances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnjax._src import validation as v
from bnjax._src.moments import batch_moments
from bnjax._src.reduction import Reduction, expand_mask
from bnjax._src.types import BatchNormState


class PopulationAccumulator(NamedTuple):
    """Exact moments of everything a layer saw, in feature shape.

    The mean is held as ``pivot + delta`` (``pivot`` the first batch's shift, fixed
    afterwards), so merging many batches of offset data rounds it once, at the end, not
    at every batch.

    Attributes:
      state: the ``BatchNormState`` being recalibrated (used to normalize when
        ``training=False``, and kept for a layer that sees no data).
      count: elements seen, per feature (float).
      pivot: the per-feature shift of the accumulated mean.
      delta: the accumulated mean minus ``pivot``.
      m2: the sum of squared deviations from the mean.
      batches: int32 scalar, batches merged.
      ddof: float scalar, 1 for ``running_var="unbiased"`` else 0 (set by ``apply``).
    """

    state: BatchNormState
    count: jax.Array
    pivot: jax.Array
    delta: jax.Array
    m2: jax.Array
    batches: jax.Array
    ddof: jax.Array

    @property
    def mean(self) -> jax.Array:
        """The accumulated mean, ``pivot + delta``."""
        return self.pivot + self.delta


def start(state: BatchNormState) -> PopulationAccumulator:
    """An empty accumulator for the layer whose running state is ``state``."""
    zeros = jnp.zeros_like(state.mean)
    return PopulationAccumulator(
        state=state,
        count=zeros,
        pivot=zeros,
        delta=zeros,
        m2=zeros,
        batches=jnp.zeros((), jnp.int32),
        ddof=jnp.zeros((), state.mean.dtype),
    )


def finish(acc: PopulationAccumulator) -> BatchNormState:
    """The running state holding the accumulated population mean and variance.

    A layer that merged no batch keeps its original state.
    """
    n = acc.count
    var = acc.m2 / jnp.maximum(n - acc.ddof, 1)
    new = BatchNormState(mean=acc.mean, var=var, count=acc.batches.astype(acc.state.count.dtype))
    seen = acc.batches > 0
    return jax.tree.map(lambda a, b: jnp.where(seen, a, b).astype(b.dtype), new, acc.state)


def _merge(acc: PopulationAccumulator, moments, skip_nonfinite: bool) -> PopulationAccumulator:
    """Chan's formula: ``acc`` with one batch's (count, mean, variance) merged in."""
    shape, dtype = acc.delta.shape, acc.delta.dtype
    nb = jnp.broadcast_to(moments.count, moments.var.shape).reshape(shape).astype(dtype)
    batch_pivot = moments.pivot.reshape(shape).astype(dtype)
    pivot = jnp.where(acc.count > 0, acc.pivot, batch_pivot)
    # Batch mean minus accumulated mean, without ever forming either mean.
    offset = ((batch_pivot - pivot) + moments.delta.reshape(shape).astype(dtype)) - acc.delta
    n = acc.count + nb
    w = nb / jnp.maximum(n, 1)
    m2b = moments.var.reshape(shape).astype(dtype) * nb
    new = acc._replace(
        count=n,
        pivot=pivot,
        delta=acc.delta + offset * w,
        m2=acc.m2 + m2b + offset * offset * acc.count * w,
        batches=acc.batches + 1,
    )
    ok = jnp.all(nb > 0)
    if skip_nonfinite:
        ok = ok & jnp.all(jnp.isfinite(new.mean)) & jnp.all(jnp.isfinite(new.m2))
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, acc)


def accumulate(bn, params, acc: PopulationAccumulator, x, *, training, mask=None):
    """``BatchNorm.apply`` on an accumulator: normalize, and merge this batch's moments.

    Args:
      bn: the ``BatchNorm`` config.
      params: its ``BatchNormParams``.
      acc: the layer's :class:`PopulationAccumulator`.
      x: the layer's input.
      training: normalize with batch statistics (True, as :func:`recalibrate` calls it)
        or with ``acc.state`` (False).
      mask: optional bool mask, as for ``BatchNorm.apply``.

    Returns:
      ``(y, new_acc)``.
    """
    y, _ = bn.apply(params, acc.state, x, training=training, update_stats=False, mask=mask)
    x = jax.lax.stop_gradient(jnp.asarray(x))
    feat_axes = v.feature_axes(bn.axis, x.ndim, x.shape)
    red_axes = tuple(i for i in range(x.ndim) if i not in feat_axes)
    mask = expand_mask(mask, x.shape, feat_axes)
    red = Reduction(red_axes, mask, bn.axis_name, bn.axis_index_groups)
    moments = batch_moments(x, red, statistics=bn.statistics)
    ddof = jnp.asarray(1.0 if bn.running_var == "unbiased" else 0.0, acc.ddof.dtype)
    return y, _merge(acc._replace(ddof=ddof), moments, bn.skip_nonfinite)


def _is_state(leaf) -> bool:
    return isinstance(leaf, BatchNormState)


def recalibrate(model_apply: Callable, params, state, batches: Iterable, *, jit: bool = True):
    """Replaces every running state in ``state`` by exact population statistics.

    The model runs in training mode (batch statistics, as in training) over ``batches``
    with the given ``params``; every :class:`BatchNormState` in ``state``, nested anywhere
    in the pytree, comes back with the exact mean and population variance of its layer's
    input over all the batches, and ``count`` set to the number of batches.

    Args:
      model_apply: ``(params, state, x, *, training) -> (y, new_state)``, the signature
        of ``BatchNorm.apply``; any model that threads its BatchNorm states through
        ``BatchNorm.apply`` works unchanged.
      params: the model's parameters.
      state: the model's state pytree containing ``BatchNormState`` leaves.
      batches: an iterable of model inputs ``x``.
      jit: compile one step per batch shape with ``jax.jit`` (default True).

    Returns:
      The state pytree with every ``BatchNormState`` recalibrated.

    Raises:
      ValueError: ``state`` contains no ``BatchNormState``, or ``batches`` is empty.

    Example:
      >>> import jax, bnjax
      >>> bn = bnjax.BatchNorm()
      >>> params, state = bn.init((16, 3))
      >>> data = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
      >>> state = bnjax.recalibrate(bn.apply, params, state, data)
      >>> int(state.count)
      4
    """
    leaves = jax.tree.leaves(state, is_leaf=_is_state)
    if not any(_is_state(leaf) for leaf in leaves):
        raise ValueError(
            f"state contains no BatchNormState (got {type(state).__name__}); expected the "
            "state pytree of a model with at least one BatchNorm"
        )
    accs = jax.tree.map(lambda s: start(s) if _is_state(s) else s, state, is_leaf=_is_state)

    def step(p, a, x):
        return model_apply(p, a, x, training=True)[1]

    step = jax.jit(step) if jit else step
    seen = 0
    for x in batches:
        accs = step(params, accs, x)
        seen += 1
    if not seen:
        raise ValueError("batches is empty; expected at least one batch to recalibrate on")

    def is_acc(leaf):
        return isinstance(leaf, PopulationAccumulator)

    return jax.tree.map(lambda a: finish(a) if is_acc(a) else a, accs, is_leaf=is_acc)
