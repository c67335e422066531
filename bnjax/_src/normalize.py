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
    is_concrete,
    resolved,
    well_conditioned,
)
from bnjax._src.reduction import Reduction
from bnjax._src.types import BatchNormParams


class Spec(NamedTuple):
    """Static, hashable description of one training-mode normalization."""

    reduce_axes: tuple[int, ...]
    epsilon: float
    axis_name: object
    axis_index_groups: object
    out_dtype: object
    renorm: object = None  # a ``bnjax.Renorm``, or None

    def reduction(self, mask) -> Reduction:
        """The :class:`Reduction` of this normalization for ``mask``."""
        return Reduction(self.reduce_axes, mask, self.axis_name, self.axis_index_groups)


def stacked_behind_barrier(*vectors):
    """``vectors`` (same shape and dtype, or None) computed once, behind one optimization
    barrier, before any elementwise pass.

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


def affine_pass(x, shift, residual, a, b, out_dtype):
    """``((x - shift) - residual) * a + b`` in the accumulation dtype, cast to ``out_dtype``.

    ``shift``, ``residual``, ``a`` and ``b`` are per-feature, in keep-dims shape and in the
    dtype of ``a``; ``residual`` and ``b`` may be None. For an input as precise as the
    arithmetic (float32 in float32) this is ``(x - shift) * a + (b - residual * a)``: the
    subtraction comes first, so an element equal to the mean gives exactly ``b`` (a
    one-element batch returns the bias) and offset data lose nothing to cancellation. A
    coarser input (bfloat16, float16) is computed as ``x * a + (b - shift * a)``, one
    multiply-add per element: the cancellation costs float32 rounding of ``|mean| / std``,
    2**-16 of what the input's own rounding already carries, and the pass runs at the
    speed of a plain affine.
    """
    acc = a.dtype
    offset = jnp.zeros_like(a) if b is None else b
    if jnp.dtype(x.dtype).itemsize < jnp.dtype(acc).itemsize:
        a, offset = stacked_behind_barrier(a, offset - shift * a)
        return (x.astype(acc) * a + offset).astype(out_dtype)
    if residual is not None:
        offset = offset - residual * a
    shift, a, offset = stacked_behind_barrier(shift, a, offset)
    return ((x.astype(acc) - shift) * a + offset).astype(out_dtype)


def multiplier(scale, inv, acc):
    """Per-feature ``a = scale * inv`` (``inv`` alone without a scale)."""
    return inv if scale is None else inv * scale.astype(acc)


def _coefficients(spec: Spec, mom, params: BatchNormParams, running):
    """Per-feature ``(inv, params, corrections)``: ``params`` in keep-dims shape, corrected
    by batch renormalization's ``(r, d)`` when ``spec.renorm`` is set (else None)."""
    inv = mom.inverse_std(spec.epsilon)
    keep = inv.shape
    params = BatchNormParams(*(None if p is None else jnp.reshape(p, keep) for p in params))
    if spec.renorm is None:
        return inv, params, None
    limits = spec.renorm.limits(running.count, inv.dtype)
    r_d = renorm.corrections(mom, running, spec.epsilon, limits)
    return inv, renorm.corrected(params, *r_d), r_d


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def train_normalize(spec: Spec, x, params, mask, running, statistics="branchless"):
    """Normalizes ``x`` with its own batch statistics.

    Args:
      spec: static settings.
      x: the input.
      params: the ``BatchNormParams`` in feature shape (either may be None).
      mask: None or a bool mask shaped by ``expand_mask``.
      running: the running ``BatchNormState`` in keep-dims shape; its statistics serve
        features with no counted element and batch renormalization (``spec.renorm``,
        whose limits follow its ``count``: the output becomes ``xhat * (r * scale) +
        (d * scale + bias)``, ``r`` and ``d`` without gradient); they get no gradient.
      statistics: ``"checked"``, ``"branchless"`` or ``"auto"`` (``moments.resolved``
        turns it into a path in the forward and the backward pass alike).

    Returns:
      ``(y, moments)``: the output in ``spec.out_dtype`` and the batch ``Moments``.
      The moments are statistics for the running average and carry no gradient.
    """
    red = spec.reduction(mask)
    mom = batch_moments(x, red, statistics=statistics).or_running(running.mean, running.var)
    inv, (scale, bias), _ = _coefficients(spec, mom, params, running)
    acc = inv.dtype
    shift, residual = mom.rounded_shift()
    b = None if bias is None else bias.astype(acc)
    return affine_pass(x, shift, residual, multiplier(scale, inv, acc), b, spec.out_dtype), mom


def _train_fwd(spec, x, params, mask, running, statistics):
    y, mom = train_normalize.fun(spec, x, params, mask, running, statistics)
    return (y, mom), (x, params, mask, mom, running)


def _sum_g_xhat(spec, statistics, x, g, mask, *, mom, inv, g_sum):
    """``sum(g * xhat)`` per feature, ``xhat = (x - mean) * inv``: the backward's
    one reduction of ``x``. The checked statistics take the plain form where the moments
    are well conditioned (cheaper on XLA:CPU, and needing ``g_sum = sum(g)``), the
    centred form otherwise."""
    acc = accumulation_dtype(x.dtype)
    axes = spec.reduce_axes

    def centred(x, g):
        # Private copies of the inputs and shifts: sharing ``xhat`` (or, for bfloat16,
        # the float32 conversions of ``x`` and ``g``) with ``g_sum`` and ``dx`` would make
        # XLA:CPU write it to memory and read it back.
        xb, gb, *shifts = lax.optimization_barrier((x, g, *mom.rounded_shift()))
        gb = gb.astype(acc)
        gxc = gb * (((xb.astype(acc) - shifts[0]) - shifts[1]) * inv)
        if mask is not None:
            # An output with a zero cotangent adds nothing, even where it is NaN: a
            # masked-out NaN or Inf input (padding) must not turn ``0 * NaN`` into NaN
            # gradients for all. The select costs a full-size temporary on XLA:CPU, so it
            # is skipped without a mask.
            gxc = jnp.where(gb == 0, 0, gxc)
        return jnp.sum(gxc, axis=axes, keepdims=True)

    def plain(x, g):
        # ``(sum(g * x) - mean * sum(g)) * inv``: for well-conditioned moments the
        # difference loses at most a bit or two.
        xb, gb = lax.optimization_barrier((x, g))
        gx = jnp.sum(gb.astype(acc) * xb.astype(acc), axis=axes, keepdims=True)
        return (gx - mom.mean * g_sum) * inv

    def checked(x, g):
        pick = well_conditioned(mom)
        if is_concrete(pick):  # run op by op: no conditional to compile at every call
            return plain(x, g) if pick else centred(x, g)
        return lax.cond(pick, plain, centred, x, g)

    if mask is not None:  # a masked plain sum is no cheaper: the centred form
        return centred(x, g)
    return resolved(statistics, (x, g), checked=checked, branchless=centred)


def _train_bwd(spec, statistics, res, cotangents):
    x, params, mask, mom, running = res
    g = cotangents[0]
    acc = accumulation_dtype(x.dtype)
    axes = spec.reduce_axes
    inv, _, r_d = _coefficients(spec, mom, params, running)
    g_sum = jnp.sum(lax.optimization_barrier(g).astype(acc), axis=axes, keepdims=True)
    gx_sum = _sum_g_xhat(spec, statistics, x, g, mask, mom=mom, inv=inv, g_sum=g_sum)
    r, d = (None, None) if r_d is None else r_d
    scale, bias = params
    scale_sum = gx_sum if r is None else gx_sum * r + g_sum * d
    d_scale = None if scale is None else jnp.reshape(scale_sum, scale.shape).astype(scale.dtype)
    d_bias = None if bias is None else jnp.reshape(g_sum, bias.shape).astype(bias.dtype)
    if spec.axis_name is not None:
        g_sum, gx_sum = spec.reduction(None).psum((g_sum, gx_sum))
    safe = jnp.maximum(mom.n, 1)
    k = inv if scale is None else inv * jnp.reshape(scale, inv.shape).astype(acc)
    if r is not None:
        k = k * r
    slope = inv * (gx_sum / safe)
    shift, residual = mom.rounded_shift()
    k, mean_g, slope, shift = stacked_behind_barrier(
        k, g_sum / safe - residual * slope, slope, shift
    )
    through_stats = mean_g + (x.astype(acc) - shift) * slope
    if mask is not None:
        through_stats = jnp.where(mask, through_stats, 0)
    dx = (k * (g.astype(acc) - through_stats)).astype(x.dtype)
    return dx, BatchNormParams(d_scale, d_bias), None, None


train_normalize.defvjp(_train_fwd, _train_bwd)
