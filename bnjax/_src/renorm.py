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
``state.count == ramp_start`` to the configured values ``ramp_steps`` batches later,
linearly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from bnjax._src import validation as v
from bnjax._src.types import BatchNormParams


@dataclasses.dataclass(frozen=True)
class Renorm:
    """Batch renormalization's settings: ``BatchNorm(renorm=bnjax.Renorm(...))``.

    Attributes:
      rmax: final limit of ``r`` (at least 1).
      dmax: final limit of ``|d|`` (at least 0).
      ramp_start: batches (``state.count``) during which the limits stay 1 and 0.
      ramp_steps: batches over which they then grow linearly to ``rmax`` and ``dmax``;
        0 makes them jump at ``ramp_start``.

    Example:
      >>> import bnjax
      >>> bn = bnjax.BatchNorm(renorm=bnjax.Renorm(rmax=3.0, dmax=5.0, ramp_steps=1000))
    """

    rmax: float = 3.0
    dmax: float = 5.0
    ramp_start: int = 0
    ramp_steps: int = 0

    def __post_init__(self):
        v.check_number("renorm.rmax", self.rmax, low=1.0)
        v.check_number("renorm.dmax", self.dmax, low=0.0)
        v.check_int("renorm.ramp_start", self.ramp_start)
        v.check_int("renorm.ramp_steps", self.ramp_steps)

    def limits(self, count, dtype):
        """The clipping limits ``(rmax_t, dmax_t)`` after ``count`` batches, as scalars of
        ``dtype``."""
        if self.ramp_start == 0 and self.ramp_steps == 0:
            return jnp.asarray(self.rmax, dtype), jnp.asarray(self.dmax, dtype)
        t = count.astype(dtype) - jnp.asarray(self.ramp_start, dtype)
        if self.ramp_steps == 0:
            frac = (t >= 0).astype(dtype)
        else:
            frac = jnp.clip(t / jnp.asarray(self.ramp_steps, dtype), 0, 1)
        one = jnp.asarray(1.0, dtype)
        return one + frac * jnp.asarray(self.rmax - 1.0, dtype), frac * jnp.asarray(
            self.dmax, dtype
        )


def corrections(mom, running, epsilon: float, limits):
    """The per-feature ``r`` and ``d`` of one batch, in keep-dims shape, without gradient.

    Args:
      mom: the batch ``Moments`` (keep-dims shape).
      running: the running ``BatchNormState`` (keep-dims shape).
      epsilon: the variance epsilon.
      limits: ``(rmax_t, dmax_t)`` from :meth:`Renorm.limits`.

    Returns:
      ``(r, d)`` in the dtype of the batch variance.
    """
    var = mom.var
    acc = var.dtype
    rmax, dmax = (jnp.asarray(c, acc) for c in limits)
    eps = jnp.asarray(epsilon, acc)
    run_var = running.var.astype(acc) + eps
    r = jnp.clip(jnp.sqrt((var + eps) / run_var), 1 / rmax, rmax)
    d = jnp.clip(mom.offset_from(running.mean.astype(acc)) * lax.rsqrt(run_var), -dmax, dmax)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def corrected(params: BatchNormParams, r, d) -> BatchNormParams:
    """``(r * scale, d * scale + bias)``; ``scale`` or ``bias`` may be None (1 and 0)."""
    scale, bias = params
    new_scale = r if scale is None else r * scale.astype(r.dtype)
    new_bias = d if scale is None else d * scale.astype(d.dtype)
    if bias is not None:
        new_bias = new_bias + bias.astype(d.dtype)
    return BatchNormParams(new_scale, new_bias)
