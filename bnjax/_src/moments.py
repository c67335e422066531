"""Batch statistics: exact moments, with plain sums for well-conditioned batches.

Most batches a network sees have a mean within a few standard deviations of zero. For
them the plain sums ``sum(x)`` and ``sum(x**2)`` lose at most a bit or two to
cancellation, and they are the cheapest statistics there are: two independent reductions
that XLA:CPU runs at the speed of a copy (any arithmetic inside a reduction, such as a
shift, halves its speed). So they come first, and a ``lax.cond`` checks them: when every
feature has ``mean**2 <= FAST_RATIO * var`` their moments are used (variance within
2e-6 relative of float64, measured); otherwise the exact passes run.

The exact passes sum ``x - pivot``, giving the mean's offset ``delta``, then the centred
squares ``((x - pivot) - delta)**2``: the variance never comes from a difference of large
numbers, so on offset data (mean 1e3, std 0.1 in float32) it is exact to float32 rounding
on the very first batch, where the textbook ``E[x^2] - E[x]^2`` cancels to nothing. The
pivot is the plain mean, within a few rounding units of the true one, so ``pivot +
delta`` holds the mean to about twice float32's precision and the normalized output is
exact too (with a mask, where no plain sums are taken, the pivot is the running mean).
Offset data cost one extra read of ``x``, never accuracy.

Across devices the sums are combined with ``psum`` before anything else: counts and sums
add exactly, so masks or uneven shards give the statistics of one device seeing the whole
batch, and every device takes the same branch. ``benchmarks/NOTES.md`` has the
measurements behind these choices.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from bnjax._src.types import Moments


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """The widest of float32 and ``dtypes``: statistics are reduced in at least float32.

    Chosen by width, not with ``jnp.promote_types``, which refuses to mix float widths
    (bfloat16 with float32) under ``jax_numpy_dtype_promotion="strict"``.
    """
    return max((jnp.dtype(jnp.float32), *map(jnp.dtype, dtypes)), key=lambda d: d.itemsize)


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


def _count(shape, mask, reduce_axes, dtype):
    """Counted elements per feature: a constant without mask, else the mask's sum."""
    full = math.prod(shape[a] for a in reduce_axes)
    if mask is None:
        return jnp.asarray(full, dtype)
    count = jnp.sum(mask, axis=reduce_axes, keepdims=True, dtype=dtype)
    return count * math.prod(shape[a] for a in reduce_axes if mask.shape[a] == 1)


def _masked_sum(values, mask, reduce_axes):
    if mask is not None:
        values = jnp.where(mask, values, 0)
    return jnp.sum(values, axis=reduce_axes, keepdims=True)


# The fast path's condition: every feature's ``mean**2 <= FAST_RATIO * var``.
FAST_RATIO = 4.0


def batch_moments(
    x, mask, reduce_axes, running_mean, axis_name=None, axis_index_groups=None, *, fast=True
) -> Moments:
    """Mean and biased variance of ``x`` over ``reduce_axes`` (and over ``axis_name``).

    Args:
      x: the input, any float dtype; reduced in :func:`accumulation_dtype`.
      mask: None, or a bool array already shaped by :func:`expand_mask`; False entries
        are left out (their values may be anything, NaN included).
      reduce_axes: tuple of the axes to reduce.
      running_mean: the running mean in keep-dims shape (size 1 on reduced axes); the
        shift of the exact passes where the plain mean is missing (masks) or not
        finite. Identical on every device.
      axis_name: a named axis to combine statistics over, or None.
      axis_index_groups: groups of indices of ``axis_name``, as for ``lax.psum``.
      fast: try the plain sums first (see the module docstring). Without a mask only:
        a masked sum is no cheaper than a shifted one. False always runs the exact passes
        (for callers under ``jax.vmap``, where a batched ``lax.cond`` runs both branches).

    Returns:
      :class:`Moments` in keep-dims shape. Features with no counted element get count 0,
      delta 0 and variance 0.
    """
    acc = accumulation_dtype(x.dtype)
    pivot = running_mean.astype(acc)
    count = _count(x.shape, mask, reduce_axes, acc)
    groups = axis_index_groups
    if axis_name is not None:
        count = lax.psum(count, axis_name, axis_index_groups=groups)
    if mask is not None or not fast:
        return _exact(x, mask, reduce_axes, pivot, count, axis_name, groups)
    plain = _plain(x, reduce_axes, count, axis_name, groups)
    # Offset data: shift the exact passes by the plain mean, within a few rounding units
    # of the true one, so that ``pivot + delta`` holds the mean to twice float32's
    # precision from the very first batch (the running mean only tracks it later on).
    pivot = jnp.where(jnp.isfinite(plain.pivot), plain.pivot, pivot)
    return lax.cond(
        well_conditioned(plain),
        lambda: plain,
        lambda: _exact(x, None, reduce_axes, pivot, count, axis_name, groups),
    )


def well_conditioned(moments: Moments):
    """True when every feature has a finite ``var`` and ``mean**2 <= FAST_RATIO * var``.

    Then the plain sums are safe. A sum of squares that overflowed (``|x|`` near 1e19 in
    float32) gives an infinite variance that the exact passes, on centred values, avoid.
    """
    var = moments.var
    return jnp.all((jnp.square(moments.mean) <= FAST_RATIO * var) & jnp.isfinite(var))


def _psum(values, axis_name, groups):
    return values if axis_name is None else lax.psum(values, axis_name, axis_index_groups=groups)


def _plain(x, reduce_axes, count, axis_name, groups) -> Moments:
    """Moments from ``sum(x)`` and ``sum(x**2)``: two independent plain reductions.

    Each reads ``x`` through its own barrier (the second also holds ``count``, only so that
    CSE cannot merge the two barriers): shared, the float32 conversion of a bfloat16 ``x``
    would be written to memory in full and read back.
    """
    acc = accumulation_dtype(x.dtype)
    x1 = lax.optimization_barrier(x).astype(acc)
    x2, _ = lax.optimization_barrier((x, count))
    x2 = x2.astype(acc)
    s1 = jnp.sum(x1, axis=reduce_axes, keepdims=True)
    s2 = jnp.sum(x2 * x2, axis=reduce_axes, keepdims=True)
    s1, s2 = _psum((s1, s2), axis_name, groups)
    safe = jnp.maximum(count, 1)
    mean = s1 / safe
    return Moments(count=count, pivot=mean, delta=jnp.zeros_like(mean), var=s2 / safe - mean * mean)


def _exact(x, mask, reduce_axes, pivot, count, axis_name, groups) -> Moments:
    """Moments from two passes around ``pivot``: ``sum(x - pivot)``, then the centred squares.

    ``pivot`` is per-feature in keep-dims shape, identical on every device.
    """
    acc = pivot.dtype
    # ``x - pivot`` (and, for bfloat16, the float32 conversion of ``x``) also starts the
    # normalizing pass; shared, XLA would write it to memory as a full-size array and read
    # it back. Barriers (free: no copy) keep each pass's arithmetic private to its
    # reduction, which then reads ``x`` directly.
    xb, pb = lax.optimization_barrier((x, pivot))
    s1 = _psum(_masked_sum(xb.astype(acc) - pb, mask, reduce_axes), axis_name, groups)
    safe = jnp.maximum(count, 1)
    delta = s1 / safe
    # The second pass recomputes the difference (and the conversion) behind its own
    # barrier: shared with the first pass, it would be materialized between the two.
    xf = lax.optimization_barrier(x).astype(acc)
    s2 = _masked_sum(jnp.square((xf - pivot) - delta), mask, reduce_axes)
    s2 = _psum(s2, axis_name, groups)
    return Moments(count=count, pivot=pivot, delta=delta, var=s2 / safe)
