"""The normalizing pass: one fused ``(x - shift) * a + b`` per element, and its gradient.

Training-mode normalization is a ``jax.custom_vjp``: the forward pass reads ``x`` for the
statistics (``moments.py``) and once for the output; the backward pass uses the
closed-form batch-norm gradient (the per-feature sums ``sum(g)`` and ``sum(g * xhat)``,
then one elementwise pass) instead of differentiating through the moment sums. The
gradient accounts for masks (masked-out outputs still depend on the batch statistics,
masked-out inputs do not shape them) and for statistics combined across ``axis_name``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src import renorm
from bnjax._src.moments import (
    accumulation_dtype,
    batch_moments,
    by_statistics,
    is_concrete,
    well_conditioned,
)
from bnjax._src.reduction import Reduction
from bnjax._src.types import Affine, Running


class Spec(NamedTuple):
    """Static, hashable description of one training-mode normalization."""

    reduce_axes: tuple[int, ...]
    epsilon: float
    axis_name: object
    axis_index_groups: object
    out_dtype: object
    statistics: str = "auto"  # ``BatchNorm.statistics``: see ``moments.py``

    def reduction(self, mask) -> Reduction:
        """The :class:`moments.Reduction` of this normalization for ``mask``."""
        return Reduction(self.reduce_axes, mask, self.axis_name, self.axis_index_groups)


def per_feature(*vectors):
    """``vectors`` (same shape and dtype, or None) computed once, before any elementwise pass.

    XLA fuses cheap per-feature arithmetic (``scale * inv``, ``bias - mean * a``) into the
    full-size pass that consumes it, repeating it for every element; on a pass bound by
    arithmetic rather than memory (bfloat16 conversions, cache-resident batches) that
    costs time (benchmarks/NOTES.md). Stacked into one array behind a barrier, the
    vectors are computed in one small fusion and the pass only reads them.
    """
    present = [v for v in vectors if v is not None]
    stacked = lax.optimization_barrier(jnp.stack(present))
    rows = iter(stacked)
    return tuple(None if v is None else next(rows) for v in vectors)


def rounded_shift(pivot, delta):
    """The mean ``pivot + delta`` rounded, and the residual ``(pivot + delta) - mean``.

    The elementwise passes subtract the rounded mean (exact for elements near it) and move
    the residual, a fraction of a rounding unit of the mean, into their per-feature
    offsets, where it costs nothing per element and loses nothing on offset data.
    """
    mean = pivot + delta
    return mean, (pivot - mean) + delta


def affine_pass(x, shift, delta, a, b, out_dtype):
    """``((x - shift) - delta) * a + b`` in the accumulation dtype, cast to ``out_dtype``.

    ``shift``, ``delta``, ``a`` and ``b`` are per-feature, in keep-dims shape and in the
    dtype of ``a``; ``delta`` and ``b`` may be None. For an input as precise as the
    arithmetic (float32 in float32) this is ``(x - mean) * a + (b - residual * a)`` with
    the rounded mean of :func:`rounded_shift`: the subtraction comes first, so an element
    equal to the mean gives exactly ``b`` (a one-element batch returns the bias) and
    offset data lose nothing to cancellation. A coarser input (bfloat16, float16) is
    computed as ``x * a + (b - (shift + delta) * a)``, one multiply-add per element: the
    cancellation costs float32 rounding of ``|mean| / std``, 2**-16 of what the input's
    own rounding already carries, and the pass runs at the speed of a plain affine.
    """
    acc = a.dtype
    offset = jnp.zeros_like(a) if b is None else b
    if jnp.dtype(x.dtype).itemsize < jnp.dtype(acc).itemsize:
        mean = shift if delta is None else shift + delta
        a, offset = per_feature(a, offset - mean * a)
        return (x.astype(acc) * a + offset).astype(out_dtype)
    if delta is not None:
        shift, residual = rounded_shift(shift, delta)
        offset = offset - residual * a
    shift, a, offset = per_feature(shift, a, offset)
    return ((x.astype(acc) - shift) * a + offset).astype(out_dtype)


def multiplier(scale, inv, acc):
    """Per-feature ``a = scale * inv`` (``inv`` alone without a scale)."""
    return inv if scale is None else inv * scale.astype(acc)


def inverse_std(mom, epsilon):
    """Per-feature ``1 / sqrt(var + epsilon)``, computed in the moments' units.

    ``rsqrt(scaled_var + epsilon / unit**2) / unit`` is exact wherever the variance itself
    overflows float32.
    """
    inv_unit = 1 / mom.unit
    eps = jnp.asarray(epsilon, mom.scaled_var.dtype) * inv_unit * inv_unit
    return lax.rsqrt(mom.scaled_var + eps) * inv_unit


def _forward(spec: Spec, x, affine: Affine, mask, running: Running, limits=None):
    acc = accumulation_dtype(x.dtype)
    mom = batch_moments(x, spec.reduction(mask), statistics=spec.statistics)
    # A feature with nothing counted has no batch statistics: it uses the running ones.
    counted = mom.count > 0
    mom = mom._replace(
        pivot=jnp.where(counted, mom.pivot, running.mean.astype(acc)),
        delta=jnp.where(counted, mom.delta, 0),
        scaled_var=jnp.where(counted, mom.scaled_var, running.var.astype(acc)),
        unit=jnp.where(counted, mom.unit, 1),
    )
    inv = inverse_std(mom, spec.epsilon)
    keep = running.mean.shape
    affine = Affine(*(None if p is None else jnp.reshape(p, keep) for p in affine))
    corrections = None
    if limits is not None:  # batch renormalization: corrected per-feature coefficients
        corrections = renorm.corrections(mom, running, spec.epsilon, limits)
        affine = renorm.corrected_affine(affine, *corrections)
    scale, bias = affine
    b = None if bias is None else bias.astype(acc)
    y = affine_pass(x, mom.pivot, mom.delta, multiplier(scale, inv, acc), b, spec.out_dtype)
    return y, mom, inv, corrections


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def train_normalize(spec: Spec, x, affine: Affine, mask, running: Running, limits=None):
    """Normalizes ``x`` with its own batch statistics.

    Args:
      spec: static settings.
      x: the input.
      affine: the per-feature :class:`Affine` parameters in feature shape (either None).
      mask: None or a bool mask shaped by ``expand_mask``.
      running: the :class:`Running` statistics in keep-dims shape; they serve features with
        no counted element and batch renormalization, and get no gradient.
      limits: None, or ``(rmax, dmax)`` scalars for batch renormalization (``renorm.py``):
        the output becomes ``xhat * (r * scale) + (d * scale + bias)``, ``r`` and ``d``
        without gradient.

    Returns:
      ``(y, moments)``: the output in ``spec.out_dtype`` and the batch :class:`Moments`.
      The moments are statistics for the running average and carry no gradient.
    """
    y, mom, _, _ = _forward(spec, x, affine, mask, running, limits)
    return y, mom


def _train_fwd(spec, x, affine, mask, running, limits=None):
    y, mom, inv, corrections = _forward(spec, x, affine, mask, running, limits)
    return (y, mom), (x, affine, mask, mom, inv, corrections)


def _sum_g_xhat(spec, x, g, mask, *, mom, inv, g_sum):
    """``sum(g * xhat)`` per feature, ``xhat = ((x - pivot) - delta) * inv``: the backward's
    one reduction of ``x`` (see :func:`centred_sum` and :func:`plain_sum`); ``g_sum`` is
    ``sum(g)``, which the plain form needs."""

    def checked(x, g, mom, inv, g_sum):
        pick = well_conditioned(mom)
        plain = lambda: plain_sum(spec, x, g, mom, inv, g_sum)  # noqa: E731
        centred = lambda: centred_sum(spec, x, g, None, mom, inv)  # noqa: E731
        if is_concrete(pick):  # run op by op: no conditional to compile at every call
            return plain() if pick else centred()
        return lax.cond(pick, plain, centred)

    def centred(x, g, mom, inv, g_sum):
        return centred_sum(spec, x, g, None, mom, inv)

    if mask is not None:  # a masked plain sum is no cheaper: the centred form
        return centred_sum(spec, x, g, mask, mom, inv)
    args = (x, g, mom, inv, g_sum)
    return by_statistics(spec.statistics, checked, centred, args, named_axis=spec.axis_name)


def centred_sum(spec, x, g, mask, mom, inv):
    """``sum(g * xhat)`` with ``xhat`` formed per element: exact on any data, no overflow."""
    acc = accumulation_dtype(x.dtype)
    # Private copies of the inputs and shifts: sharing ``xhat`` (or, for bfloat16, the
    # float32 conversions of ``x`` and ``g``) with ``g_sum`` and ``dx`` would make XLA:CPU
    # write it to memory and read it back.
    xb, gb, pivot, delta = lax.optimization_barrier((x, g, mom.pivot, mom.delta))
    gb = gb.astype(acc)
    gxc = gb * (((xb.astype(acc) - pivot) - delta) * inv)
    if mask is not None:
        # An output with a zero cotangent adds nothing, even where it is NaN: a
        # masked-out NaN or Inf input (padding) must not turn ``0 * NaN`` into NaN
        # gradients for all. Only masked-out inputs can be NaN under finite statistics,
        # and the select costs a full-size temporary on XLA:CPU, so it is skipped
        # without a mask.
        gxc = jnp.where(gb == 0, 0, gxc)
    return jnp.sum(gxc, axis=spec.reduce_axes, keepdims=True)


def plain_sum(spec, x, g, mom, inv, g_sum):
    """``(sum(g * x) - mean * sum(g)) * inv``: safe for well-conditioned moments, where the
    difference loses at most a bit or two, and cheaper on XLA:CPU (no shift inside)."""
    acc = accumulation_dtype(x.dtype)
    xb, gb = lax.optimization_barrier((x, g))
    gx = jnp.sum(gb.astype(acc) * xb.astype(acc), axis=spec.reduce_axes, keepdims=True)
    return (gx - mom.mean * g_sum) * inv


def _train_bwd(spec, res, cotangents):
    x, (scale, bias), mask, mom, inv, corrections = res
    g = cotangents[0]
    acc = accumulation_dtype(x.dtype)
    axes = spec.reduce_axes
    g = g.astype(acc)
    g_sum = jnp.sum(lax.optimization_barrier(cotangents[0]).astype(acc), axis=axes, keepdims=True)
    gx_sum = _sum_g_xhat(spec, x, cotangents[0], mask, mom=mom, inv=inv, g_sum=g_sum)
    r, d = (None, None) if corrections is None else corrections
    scale_sum = gx_sum if r is None else gx_sum * r + g_sum * d
    d_scale = None if scale is None else jnp.reshape(scale_sum, scale.shape).astype(scale.dtype)
    d_bias = None if bias is None else jnp.reshape(g_sum, bias.shape).astype(bias.dtype)
    if spec.axis_name is not None:
        g_sum, gx_sum = spec.reduction(None).psum((g_sum, gx_sum))
    safe = jnp.maximum(mom.count, 1)
    k = inv if scale is None else inv * jnp.reshape(scale, inv.shape).astype(acc)
    if r is not None:
        k = k * r
    slope = inv * (gx_sum / safe)
    shift, residual = rounded_shift(mom.pivot, mom.delta)
    k, mean_g, slope, shift = per_feature(k, g_sum / safe - residual * slope, slope, shift)
    through_stats = mean_g + (x.astype(acc) - shift) * slope
    if mask is not None:
        through_stats = jnp.where(mask, through_stats, 0)
    dx = (k * (g - through_stats)).astype(x.dtype)
    return dx, Affine(d_scale, d_bias), None, None, None


train_normalize.defvjp(_train_fwd, _train_bwd)
