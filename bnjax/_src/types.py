"""The pytrees that batch norm passes in and out: parameters and running state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BatchNormParams(NamedTuple):
    """Learned affine parameters, each of the feature shape (or ``None`` when disabled).

    Attributes:
      scale: gamma, multiplies the normalized input; ``None`` when ``scale=False``.
      bias: beta, added after scaling; ``None`` when ``center=False``.
    """

    scale: jax.Array | None
    bias: jax.Array | None


class BatchNormState(NamedTuple):
    """Running statistics, threaded explicitly through every call.

    Attributes:
      mean: running mean, of the feature shape.
      var: running variance, of the feature shape.
      count: int32 scalar, the number of batches averaged into ``mean`` and ``var``.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array


class Moments(NamedTuple):
    """Batch statistics of one call, in keep-dims shape (size 1 on reduced axes).

    The mean is kept as ``pivot + delta``: ``pivot`` is the per-feature shift the sums
    were taken around and ``delta`` the batch mean's offset from it, so ``(x - pivot) -
    delta`` stays exact on data whose mean is large compared with its spread. The plain
    sums of a well-conditioned batch give ``pivot = mean`` and ``delta = 0``.

    The variance is kept in units of ``unit**2``, ``unit`` a power of two near the spread
    of the data: ``scaled_var`` is finite (and exact) even where the variance itself is
    beyond float32's range (``|x|`` above about 1e19), so the batch still normalizes.

    Attributes:
      count: elements reduced per feature (after masking and across ``axis_name``).
      pivot: per-feature shift of the sums, identical on the devices of ``axis_name``.
      delta: mean minus pivot.
      scaled_var: biased variance (second central moment divided by ``count``) divided
        by ``unit**2``.
      unit: per-feature power of two (1 for the plain sums).
    """

    count: jax.Array
    pivot: jax.Array
    delta: jax.Array
    scaled_var: jax.Array
    unit: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.pivot + self.delta

    @property
    def var(self) -> jax.Array:
        """The biased variance; infinite where it exceeds the dtype's range."""
        return self.scaled_var * self.unit * self.unit


class Running(NamedTuple):
    """The running statistics as the training pass reads them, in keep-dims shape.

    They serve the features that count no element in a batch, and batch renormalization
    corrects towards them. They carry no gradient.
    """

    mean: jax.Array
    var: jax.Array


class Affine(NamedTuple):
    """The per-feature affine parameters of one pass; either may be None (1 and 0)."""

    scale: jax.Array | None
    bias: jax.Array | None


def all_or_nothing(ok, new, old):
    """The pytree ``new`` where the scalar ``ok`` holds, else ``old``: a state update
    that either happens whole or leaves every leaf as it was."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype), new, old)
