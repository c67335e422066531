"""Where batch statistics are reduced: the reduced axes, an optional mask, a named axis.

:func:`expand_mask` reads a user's mask once, against the static shape of ``x``;
:class:`Reduction` then sums, maxes and counts over the reduced axes (masked) and combines
across the devices of ``axis_name``, so the statistics code never repeats those rules.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax


def expand_mask(mask, x_shape, feat_axes):
    """Reshapes ``mask`` to ``x.ndim`` dimensions, each 1 or equal to ``x``'s.

    Accepted: a bool mask broadcastable to ``x`` (same number of dimensions, Flax's form),
    or one broadcastable to the shape of ``x`` without its feature axes (bnjax's form).
    """
    if mask is None:
        return None
    shape = tuple(getattr(mask, "shape", ()))
    dtype = getattr(mask, "dtype", None)
    if dtype is None or dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array; got dtype {dtype} ({type(mask).__name__})")
    ndim = len(x_shape)
    reduced = [d for i, d in enumerate(x_shape) if i not in feat_axes]
    if len(shape) == ndim:
        full = shape
    elif len(shape) <= len(reduced):
        aligned = iter((1,) * (len(reduced) - len(shape)) + shape)
        full = tuple(1 if i in feat_axes else next(aligned) for i in range(ndim))
    else:
        full = None
    if full is None or any(m not in (1, d) for m, d in zip(full, x_shape, strict=True)):
        raise ValueError(
            f"mask of shape {shape} does not broadcast to x of shape {tuple(x_shape)}; expected "
            f"the shape of x without its feature axes {tuple(reduced)}, or one broadcastable to x"
        )
    return jnp.reshape(mask, full)


class Reduction(NamedTuple):
    """Where statistics are reduced: axes of ``x``, an optional mask, a named axis.

    Attributes:
      axes: the reduced axes of ``x``.
      mask: None, or a bool mask shaped by :func:`expand_mask`; False entries are left
        out (their values may be anything, NaN included).
      axis_name: a named axis to combine statistics over, or None.
      groups: groups of indices of ``axis_name``, as for ``lax.psum``.
    """

    axes: tuple[int, ...]
    mask: Any = None
    axis_name: Hashable | None = None
    groups: Any = None

    def sums(self, *values):
        """Per-feature sums (keep-dims) of ``values`` over the axes, masked; local only."""
        if self.mask is not None:
            values = [jnp.where(self.mask, v, 0) for v in values]
        return tuple(jnp.sum(v, axis=self.axes, keepdims=True) for v in values)

    def psum(self, values):
        """``values`` summed over ``axis_name`` (unchanged without one)."""
        return self._collective(lax.psum, values)

    def pmax(self, values):
        """``values`` maximized over ``axis_name`` (unchanged without one)."""
        return self._collective(lax.pmax, values)

    def _collective(self, op, values):
        if self.axis_name is None:
            return values
        try:
            return op(values, self.axis_name, axis_index_groups=self.groups)
        except NotImplementedError as e:
            if self.groups is None:
                raise
            # JAX implements axis_index_groups under pmap only (an empty message under
            # shard_map, "not supported in vmap collectives" under vmap).
            raise NotImplementedError(
                f"axis_index_groups={self.groups!r} with axis_name={self.axis_name!r}: JAX "
                "combines groups of an axis only under jax.pmap, not under shard_map or "
                "vmap. Under shard_map, give the mesh one axis per level (e.g. "
                "('group', 'member')) and use the inner one as axis_name, without "
                f"axis_index_groups. ({type(e).__name__}: {e or 'no message'})"
            ) from e

    def maximum(self, values):
        """Per-feature maximum (keep-dims) of ``values`` >= 0 over the axes, masked; local."""
        if self.mask is not None:
            values = jnp.where(self.mask, values, 0)
        return jnp.max(values, axis=self.axes, keepdims=True)

    def local_count(self, x_shape, dtype):
        """Counted elements per feature on this device: a constant without mask."""
        full = math.prod(x_shape[a] for a in self.axes)
        if self.mask is None:
            return jnp.asarray(full, dtype)
        count = jnp.sum(self.mask, axis=self.axes, keepdims=True, dtype=dtype)
        return count * math.prod(x_shape[a] for a in self.axes if self.mask.shape[a] == 1)
