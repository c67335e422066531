"""The exact population statistics of many batches, merged one batch at a time.

A :class:`PopulationAccumulator` stands in for a layer's ``BatchNormState`` during
recalibration (``recalibrate.py``): each batch's count, mean and second central moment are
merged in with Chan's parallel formula, and :func:`finish` turns the result into the
``BatchNormState`` holding the exact mean and population variance of everything the layer
saw.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bnjax._src.averaging import all_or_nothing
from bnjax._src.moments import Moments
from bnjax._src.types import BatchNormState


class PopulationAccumulator(NamedTuple):
    """Exact moments of everything a layer saw, in feature shape.

    The mean is held as ``pivot + delta`` (``pivot`` the first batch's mean, fixed
    afterwards), so merging many batches of offset data rounds it once, at the end, not
    at every batch.

    ``BatchNorm.apply`` takes one in place of a ``BatchNormState``, through the same two
    members: it normalizes as with :attr:`running` and :meth:`fold` merges the batch's
    moments in instead of averaging them.

    Attributes:
      state: the ``BatchNormState`` being recalibrated (used to normalize when
        ``training=False``, and kept for a layer that sees no data).
      n: elements seen, per feature (float).
      pivot: the per-feature shift of the accumulated mean.
      delta: the accumulated mean minus ``pivot``.
      m2: the sum of squared deviations from the mean.
      count: int32 scalar, batches merged.
      ddof: float scalar, 1 for ``running_var="unbiased"`` else 0 (set by :func:`merge`).
    """

    state: BatchNormState
    n: jax.Array
    pivot: jax.Array
    delta: jax.Array
    m2: jax.Array
    count: jax.Array
    ddof: jax.Array

    accumulates = True  # marks.py: its count is of merged batches, its leaves not a state's

    @property
    def mean(self) -> jax.Array:
        """The accumulated mean, ``pivot + delta``."""
        return self.pivot + self.delta

    @property
    def running(self) -> BatchNormState:
        """The statistics to normalize with in inference: the state being recalibrated."""
        return self.state

    def fold(self, moments: Moments, bn) -> PopulationAccumulator:
        """This accumulator with one batch's ``moments`` merged in (:func:`merge`)."""
        return merge(
            self,
            moments,
            unbiased=bn.running_var == "unbiased",
            skip_nonfinite=bn.skip_nonfinite,
        )


def start(state: BatchNormState) -> PopulationAccumulator:
    """An empty accumulator for the layer whose running state is ``state``."""
    zeros = jnp.zeros_like(state.mean)
    return PopulationAccumulator(
        state=state,
        n=zeros,
        pivot=zeros,
        delta=zeros,
        m2=zeros,
        count=jnp.zeros((), jnp.int32),
        ddof=jnp.zeros((), state.mean.dtype),
    )


def finish(population: PopulationAccumulator) -> BatchNormState:
    """The running state holding the accumulated population mean and variance.

    A feature that counted no element in any batch (one, for the unbiased variance, which
    needs two), and a layer that merged no batch, keep their original statistics.
    """
    old = population.state
    seen = population.n > population.ddof
    var = population.m2 / jnp.maximum(population.n - population.ddof, 1)
    new = BatchNormState(
        mean=jnp.where(seen, population.mean, old.mean),
        var=jnp.where(seen, var, old.var),
        count=population.count,
    )
    return all_or_nothing(population.count > 0, new, old)


def merge(
    population: PopulationAccumulator, moments: Moments, *, unbiased: bool, skip_nonfinite: bool
) -> PopulationAccumulator:
    """Chan's formula: ``population`` with one batch's (n, mean, variance) merged in.

    Args:
      population: the accumulator so far.
      moments: the batch's :class:`Moments`, in keep-dims shape.
      unbiased: the finished variance divides by ``n - 1`` (``running_var="unbiased"``).
      skip_nonfinite: a batch whose merge is not finite leaves the accumulator unchanged.

    Returns:
      The new accumulator. A feature that counted nothing in this batch is unchanged (its
      n adds 0); a batch in which no feature counted anything is not merged.
    """
    old = population._replace(ddof=jnp.asarray(1.0 if unbiased else 0.0, population.ddof.dtype))
    shape, dtype = old.delta.shape, old.delta.dtype
    nb = jnp.broadcast_to(moments.n, moments.var.shape).reshape(shape).astype(dtype)
    has_data = nb > 0  # a feature without data adds nothing, whatever its moments hold
    batch_mean = moments.mean.reshape(shape).astype(dtype)
    pivot = jnp.where((old.n > 0) | ~has_data, old.pivot, batch_mean)
    # Batch mean minus accumulated mean, without ever forming either mean.
    offset = moments.offset_from(pivot.reshape(moments.mean.shape)).reshape(shape)
    offset = jnp.where(has_data, offset.astype(dtype) - old.delta, 0)
    n = old.n + nb
    w = nb / jnp.maximum(n, 1)
    m2b = jnp.where(has_data, moments.var.reshape(shape).astype(dtype) * nb, 0)
    new = old._replace(
        n=n,
        pivot=pivot,
        delta=old.delta + offset * w,
        m2=old.m2 + m2b + offset * offset * old.n * w,
        count=old.count + 1,
    )
    ok = jnp.any(has_data)
    if skip_nonfinite:
        ok = ok & jnp.all(jnp.isfinite(new.mean)) & jnp.all(jnp.isfinite(new.m2))
    return all_or_nothing(ok, new, old)
