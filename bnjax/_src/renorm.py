"""Batch renormalization (Ioffe, 2017): per-feature corrections ``r`` and ``d``.

In training, batch renormalization normalizes with the batch statistics and then corrects
the result towards what the running statistics would have given:

    y = ((x - mu_B) / sigma_B * r + d) * scale + bias
    r = clip(sigma_B / sigma, 1/rmax, rmax),   d = clip((mu_B - mu) / sigma, -dmax, dmax)

with ``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var + eps)`` and ``mu`` the
running mean. ``r`` and ``d`` are constants for the gradient. Since they are per-feature,
they only change the per-feature coefficients of the normalizing pass, ``scale`` becoming
``r * scale`` and ``bias`` becoming ``d * scale + bias``; the gradient rule in
``normalize.py`` uses the same substitution.

The limits may ramp up with training: from ``rmax = 1, dmax = 0`` (plain batch norm) at
``state.count == renorm_ramp_start`` to the configured values ``renorm_ramp_steps``
batches later, linearly.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bnjax._src.types import Affine


def limits(count, dtype, *, rmax: float, dmax: float, ramp_start: int, ramp_steps: int):
    """The clipping limits ``(rmax_t, dmax_t)`` after ``count`` batches, as scalars.

    Args:
      count: int scalar, ``state.count``.
      dtype: dtype of the returned scalars.
      rmax: final limit of ``r`` (at least 1).
      dmax: final limit of ``d`` (at least 0).
      ramp_start: number of batches during which the limits are 1 and 0.
      ramp_steps: number of batches over which they then grow linearly to ``rmax`` and
        ``dmax``; 0 means they jump at ``ramp_start``.

    Returns:
      ``(rmax_t, dmax_t)``, two scalars of ``dtype``.
    """
    if ramp_start == 0 and ramp_steps == 0:
        return jnp.asarray(rmax, dtype), jnp.asarray(dmax, dtype)
    t = count.astype(dtype) - jnp.asarray(ramp_start, dtype)
    if ramp_steps == 0:
        frac = (t >= 0).astype(dtype)
    else:
        frac = jnp.clip(t / jnp.asarray(ramp_steps, dtype), 0, 1)
    one = jnp.asarray(1.0, dtype)
    return one + frac * jnp.asarray(rmax - 1.0, dtype), frac * jnp.asarray(dmax, dtype)


def corrections(mom, running, epsilon: float, limits):
    """The per-feature ``r`` and ``d`` of one batch, in keep-dims shape, without gradient.

    Args:
      mom: the batch :class:`Moments` (keep-dims shape).
      running: the :class:`Running` statistics (keep-dims shape).
      epsilon: the variance epsilon.
      limits: ``(rmax_t, dmax_t)`` from :func:`limits`.

    Returns:
      ``(r, d)`` in the dtype of the batch variance.
    """
    var = mom.var
    acc = var.dtype
    rmax, dmax = (jnp.asarray(c, acc) for c in limits)
    eps = jnp.asarray(epsilon, acc)
    run_var = running.var.astype(acc) + eps
    r = jnp.sqrt((var + eps) / run_var)
    r = jnp.clip(r, 1 / rmax, rmax)
    offset = (mom.pivot - running.mean.astype(acc)) + mom.delta
    d = jnp.clip(offset * lax.rsqrt(run_var), -dmax, dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def corrected_affine(affine: Affine, r, d) -> Affine:
    """``Affine(r * scale, d * scale + bias)``; ``scale`` or ``bias`` may be None (1 and 0)."""
    scale, bias = affine
    new_scale = r if scale is None else r * scale.astype(r.dtype)
    new_bias = d if scale is None else d * scale.astype(d.dtype)
    if bias is not None:
        new_bias = new_bias + bias.astype(d.dtype)
    return Affine(new_scale, new_bias)
