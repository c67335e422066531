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
    """Reads ``mask`` against ``x``: returns it with ``x.ndim`` dimensions, each 1 or
    equal to ``x``'s, so that it broadcasts to ``x``.

    One rule for the core and the Flax wrappers. A mask with the rank of ``x`` broadcasts
    with numpy's rules. A mask of lower rank can be read three ways, each placing its axes
    on axes of ``x``:

    * numpy's: trailing axes aligned (Flax's reading: ``(C,)`` against ``(N, C)`` selects
      features);
    * per example: leading axes aligned (``(N,)`` for any rank of ``x``, ``(N, L)`` for
      sequences);
    * ``x`` without its feature axes: one mask axis per reduced axis, in order (``(N, H,
      W)`` against NCHW ``x``).

    (Broadcasting against ``x`` without its feature axes, which would place ``(N,)`` on
    the W axis of NHWC ``x``, is not a reading: with a batch as wide as the image it would
    make the commonest mask ambiguous.)

    The readings that fit the shapes (every mask dimension 1 or the size of the axis it
    lands on) must place the mask's non-1 axes alike; a mask that fits two different ways
    is refused, naming both, rather than guessed.

    Raises:
      TypeError: ``mask`` is not a bool array.
      ValueError: ``mask`` fits no reading, or fits two that differ.
    """
    if mask is None:
        return None
    shape = tuple(getattr(mask, "shape", ()))
    dtype = getattr(mask, "dtype", None)
    if dtype is None or dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array; got dtype {dtype} ({type(mask).__name__})")
    x_shape = tuple(x_shape)
    fits = {}
    for name, axes in _readings(len(shape), len(x_shape), feat_axes).items():
        if all(m in (1, x_shape[a]) for m, a in zip(shape, axes, strict=True)):
            placed = tuple((a, m) for m, a in zip(shape, axes, strict=True) if m != 1)
            fits.setdefault(placed, (name, axes))
    if not fits:
        reduced = tuple(d for i, d in enumerate(x_shape) if i not in feat_axes)
        raise ValueError(
            f"mask of shape {shape} does not broadcast to x of shape {x_shape}; expected a "
            f"shape broadcastable to x (numpy's rules), x's leading dimensions (one flag per "
            f"example, e.g. {x_shape[:1]}), or x without its feature axes {reduced}"
        )
    if len(fits) > 1:
        (a, b), (c, d) = list(fits.values())[:2]
        raise ValueError(
            f"mask of shape {shape} against x of shape {x_shape} is ambiguous: read {a} it "
            f"lies on axes {b} of x, read {c} on axes {d}, which select different elements. "
            f"Give it x's rank to say which: for axes {b} reshape it to "
            f"{_full(shape, b, len(x_shape))}, for axes {d} to {_full(shape, d, len(x_shape))}"
        )
    ((_, axes),) = fits.values()
    return jnp.reshape(mask, _full(shape, axes, len(x_shape)))


def _readings(k: int, ndim: int, feat_axes) -> dict[str, tuple[int, ...]]:
    """The axes of ``x`` that a rank-``k`` mask's axes land on, for each reading."""
    if k > ndim:
        return {}
    readings = {"as numpy broadcasts (trailing axes aligned)": tuple(range(ndim - k, ndim))}
    if k < ndim:
        readings["per example (leading axes aligned)"] = tuple(range(k))
        reduced = tuple(i for i in range(ndim) if i not in feat_axes)
        if k == len(reduced):
            readings["as x without its feature axes"] = reduced
    return readings


def _full(shape, axes, ndim) -> tuple[int, ...]:
    """The rank-``ndim`` shape that puts a mask of ``shape`` on ``axes``."""
    full = [1] * ndim
    for m, a in zip(shape, axes, strict=True):
        full[a] = m
    return tuple(full)


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

    def masked(self, *values):
        """``values`` with the masked-out elements set to 0."""
        if self.mask is None:
            return values
        return tuple(jnp.where(self.mask, v, 0) for v in values)

    def sums(self, *values):
        """Per-feature sums (keep-dims) of ``values`` over the axes, masked; local only."""
        return tuple(jnp.sum(v, axis=self.axes, keepdims=True) for v in self.masked(*values))

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
                f"axis_index_groups. ({type(e).__name__}: {str(e) or 'no message'})"
            ) from e

    def local_n(self, x_shape, dtype):
        """Counted elements per feature on this device: a constant without mask."""
        full = math.prod(x_shape[a] for a in self.axes)
        if self.mask is None:
            return jnp.asarray(full, dtype)
        count = jnp.sum(self.mask, axis=self.axes, keepdims=True, dtype=dtype)
        return count * math.prod(x_shape[a] for a in self.axes if self.mask.shape[a] == 1)
