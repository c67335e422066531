"""Running statistics: one batch's moments averaged into the state.

Every averaging mode is the same step ``r <- r + w_t * (batch - r)`` with its own weight
(the incremental form drifts less over a long run than ``(1 - w_t) * r + w_t * batch``;
benchmarks/NOTES.md has the numbers; a weight of 1, the first batch of ``"debiased"``,
``"cumulative"`` or ``"ema_from_first"``, takes the batch's statistics exactly):

* ``"ema"``: ``w_t = 1 - momentum`` (TF, Keras, Flax, PyTorch; starts from mean 0, var 1).
* ``"ema_from_first"``: ``w_0 = 1``, then ``w_t = 1 - momentum``: the EMA that starts from
  the first batch instead of mean 0 and var 1 (Equinox's ``mode="ema"``).
* ``"debiased"``: ``w_t = (1 - m) / (1 - m**(t+1))``, Haiku's zero-debiased EMA: after
  batches ``b_1..b_t`` the average is ``sum_i m**(t-i) b_i / sum_i m**(t-i)``.
* ``"cumulative"``: ``w_t = 1 / (t + 1)``, the equal-weight mean of all batches (PyTorch's
  ``momentum=None``).

``t`` is ``state.count``, the number of batches already averaged in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bnjax._src.moments import Moments, accumulation_dtype


def weight(averaging: str, momentum: float, count, dtype):
    """The weight ``w_t`` of the new batch, as a scalar of ``dtype``."""
    t = count.astype(dtype)
    if averaging == "ema":
        return jnp.asarray(1.0 - momentum, dtype)
    if averaging == "ema_from_first":
        return jnp.where(t == 0, 1.0, 1.0 - momentum).astype(dtype)
    if averaging == "cumulative" or momentum == 1.0:  # debiased EMA tends to the mean
        return 1.0 / (t + 1.0)
    if momentum == 0.0:
        return jnp.asarray(1.0, dtype)
    log_m = jnp.log(jnp.asarray(momentum, dtype))
    # The first batch is taken whole: exactly 1, which XLA's fused expm1s need not give.
    return jnp.where(t == 0, 1.0, jnp.expm1(log_m) / jnp.expm1((t + 1.0) * log_m))


def all_or_nothing(ok, new, old):
    """The pytree ``new`` where the scalar ``ok`` holds, else ``old``: a state update
    that either happens whole or leaves every leaf as it was."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b).astype(b.dtype), new, old)


def _check_floating(state) -> None:
    for name in ("mean", "var"):
        dtype = jnp.result_type(getattr(state, name))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"state.{name} must be floating to hold a running average; got dtype {dtype}. "
                f"Cast it: state._replace({name}=state.{name}.astype(jnp.float32))"
            )


def _towards(old, batch, w):
    """``old + w * (batch - old)``; exactly ``batch`` when ``w`` is 1 (the rounding of
    ``batch - old`` would otherwise cost up to ``|old| / |batch|`` ulps)."""
    return jnp.where(w == 1, batch, old + w * (batch - old))


def _increment(count):
    """``count + 1``, saturating at the largest value of its integer dtype: a wrapped
    count (negative, or 0 for uint8) would restart the averages or freeze them."""
    count = jnp.asarray(count)
    top = jnp.iinfo(count.dtype).max
    return jnp.where(count >= top, count, count + 1).astype(count.dtype)


def update(
    state,
    moments: Moments,
    *,
    momentum: float,
    averaging: str,
    running_var: str,
    skip_nonfinite: bool,
):
    """Returns the ``BatchNormState`` ``state`` with one batch averaged in, or ``state``
    itself if the batch is unusable.

    A feature *has data* when it counted an element (two with ``running_var="unbiased"``,
    whose variance needs them). With ``"ema"`` the features with data are averaged in and
    the others keep their statistics, as each feature's average is independent of the
    others'. With ``"debiased"``, ``"cumulative"`` and ``"ema_from_first"`` the weight
    comes from the shared ``count``, which a feature that skipped a batch would no longer
    match, so a batch in which some feature has no data is left out whole. With
    ``skip_nonfinite`` a batch whose statistics (of the features with data) are not finite
    is left out whole. ``count`` moves whenever some statistic does.

    The update is computed in at least float32 and each statistic is stored back in its
    own dtype; with ``skip_nonfinite`` a result that overflows that dtype is skipped too.

    Raises:
      TypeError: ``state.mean`` or ``state.var`` is not floating (the average would be
        truncated).
    """
    _check_floating(state)
    dtype = accumulation_dtype(state.mean.dtype, state.var.dtype)
    shape = state.mean.shape
    n = jnp.broadcast_to(moments.n, moments.var.shape).reshape(shape).astype(dtype)
    mean = moments.mean.reshape(shape).astype(dtype)
    var = moments.var.reshape(shape).astype(dtype)
    if running_var == "unbiased":
        var = var * (n / jnp.maximum(n - 1, 1))
    has_data = n > (1 if running_var == "unbiased" else 0)
    ok = jnp.any(has_data) if averaging == "ema" else jnp.all(has_data)
    w = weight(averaging, momentum, state.count, dtype)
    old_mean, old_var = state.mean.astype(dtype), state.var.astype(dtype)
    new_mean = jnp.where(has_data, _towards(old_mean, mean, w), old_mean)
    new_var = jnp.where(has_data, _towards(old_var, var, w), old_var)
    new = state._replace(
        mean=new_mean.astype(state.mean.dtype),
        var=new_var.astype(state.var.dtype),
        count=_increment(state.count),
    )
    if skip_nonfinite:
        # A non-finite batch statistic makes its new value non-finite too (NaN stays NaN,
        # an infinity stays infinite or becomes NaN through 0 * inf), so checking the new
        # values covers the batch's and an overflow of the stored dtype alike.
        ok = ok & jnp.all(jnp.isfinite(new.mean)) & jnp.all(jnp.isfinite(new.var))
    return all_or_nothing(ok, new, state)
