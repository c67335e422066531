"""Opt-in runtime checks (``BatchNorm(checks=True)``) built on ``jax.experimental.checkify``.

Shape and dtype mistakes are caught when ``apply`` is traced, from static shapes. Some
mistakes only show in the values: inference with statistics that were never updated, a
NaN batch in training, a running variance that went negative or non-finite. With
``checks=True`` ``apply`` adds a ``checkify.check`` for each of them. They cost a few
reductions per call, so they are off by default, and when off nothing is traced at all.

Eagerly, a failed check raises ``checkify.JaxRuntimeError`` at once. Under ``jax.jit``
the caller functionalizes the checks and decides what to do with the error:

>>> import jax, jax.numpy as jnp, bnjax
>>> from jax.experimental import checkify
>>> bn = bnjax.BatchNorm(checks=True)
>>> params, state = bn.init((4, 2))
>>> def infer(params, state, x):
...     return bn.apply(params, state, x, training=False)
>>> checked = jax.jit(checkify.checkify(infer, errors=checkify.user_checks))
>>> err, (y, _) = checked(params, state, jnp.ones((4, 2)))
>>> err.get() is not None  # state.count == 0: statistics never updated
True

Without ``checkify.checkify`` around it, a function that calls ``apply`` with
``checks=True`` cannot be staged by ``jax.jit`` (JAX refuses un-functionalized checks).

Inside ``jax.shard_map``, wrap the ``shard_map``-ed function with ``checkify.checkify``;
the error names the failing device (``at mapped index 1: ...``). Build the mesh with
``AxisType.Auto`` axes: on ``Explicit`` axes, JAX 0.10's checkify fails while gathering
the devices' errors, whatever the check.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import checkify

NEVER_UPDATED = (
    "BatchNorm.apply(training=False) got a state whose count is {count}: its running "
    "statistics were never updated (still mean 0, var 1 from init), so the output is barely "
    "normalized. Pass the state returned by apply(..., training=True) to later calls, or "
    "estimate the statistics first with apply(..., training=False, update_stats=True)."
)
NONFINITE_INPUT = (
    "BatchNorm.apply got x with {bad} non-finite (NaN or Inf) element(s) among those counted "
    "in the batch statistics; the output is not finite and the batch is not averaged into the "
    "running statistics (skip_nonfinite=True) or poisons them (skip_nonfinite=False)."
)
BAD_RUNNING_VAR = (
    "BatchNorm.apply got state.var with {negative} negative and {nonfinite} non-finite "
    "element(s); a running variance must be finite and >= 0. Was the state edited, restored "
    "from the wrong checkpoint, or updated with skip_nonfinite=False on a NaN batch?"
)
BAD_RUNNING_MEAN = (
    "BatchNorm.apply got state.mean with {nonfinite} non-finite element(s); a running mean "
    "must be finite. Was it updated with skip_nonfinite=False on a NaN batch?"
)

UNREPRESENTABLE = (
    "BatchNorm.apply: {bad} feature(s) of this batch have a mean or variance beyond the range "
    "of the running statistics' dtype (a float32 variance overflows above about "
    "3e38, for data spread beyond about 1e19). The output is normalized exactly, but the "
    "batch is not averaged into the running statistics. Scale the input down, or keep the "
    "state in float64."
)


def _count(condition) -> jnp.ndarray:
    return jnp.sum(condition, dtype=jnp.int32)


def check_state(state, *, training: bool, update_stats: bool) -> None:
    """Checks the running statistics that ``apply`` is about to use or update.

    ``training=False, update_stats=True`` on a count-0 state is recalibration, the way to
    estimate statistics without using batch statistics, so it passes the count check.

    Args:
      state: the ``BatchNormState`` given to ``apply``; ``mean`` and ``var`` of the
        feature shape, ``count`` an int scalar.
      training: the ``training`` argument of ``apply``.
      update_stats: the resolved ``update_stats`` argument of ``apply``.
    """
    if not training and not update_stats:
        count = jnp.asarray(state.count)
        checkify.check(count > 0, NEVER_UPDATED, count=count)
    var = jnp.asarray(state.var)
    negative, nonfinite = _count(var < 0), _count(~jnp.isfinite(var))
    checkify.check(
        (negative == 0) & (nonfinite == 0), BAD_RUNNING_VAR, negative=negative, nonfinite=nonfinite
    )
    nonfinite_mean = _count(~jnp.isfinite(jnp.asarray(state.mean)))
    checkify.check(nonfinite_mean == 0, BAD_RUNNING_MEAN, nonfinite=nonfinite_mean)


def check_input(x, mask) -> None:
    """Checks that every element counted in the batch statistics is finite.

    Args:
      x: the input of ``apply``, any shape.
      mask: None, or a bool mask already reshaped to broadcast against ``x``; elements
        it leaves out may hold anything, NaN included.
    """
    bad = ~jnp.isfinite(x)
    if mask is not None:
        bad = bad & mask
    count = _count(bad)
    checkify.check(count == 0, NONFINITE_INPUT, bad=count)


def check_update(state, moments) -> None:
    """Checks that a batch's statistics fit the state's dtype, so the update is not skipped.

    Args:
      state: the ``BatchNormState`` given to ``apply``.
      moments: the batch ``Moments`` about to be averaged in (any leading chunk axis).
    """
    dtype = jnp.result_type(state.var)
    big = jnp.finfo(dtype).max
    finite = jnp.isfinite(moments.mean) & jnp.isfinite(moments.scaled_var)
    overflow = finite & ((moments.var > big) | (jnp.abs(moments.mean) > big))
    # Without a mask each chunk's count is a scalar: stacked over virtual batches it is
    # (chunks,), which must pair with the chunk axis of the keep-dims moments.
    count = jnp.asarray(moments.count)
    count = jnp.reshape(count, count.shape + (1,) * (moments.var.ndim - count.ndim))
    bad = _count(overflow & (count > 0))
    checkify.check(bad == 0, UNREPRESENTABLE, bad=bad)


def check_apply(state, x, mask, *, training: bool, update_stats: bool) -> None:
    """All runtime checks of one ``apply`` call.

    Args:
      state: the ``BatchNormState`` given to ``apply``.
      x: the input, any shape.
      mask: None or a bool mask broadcastable to ``x``.
      training: the ``training`` argument of ``apply``.
      update_stats: the resolved ``update_stats`` argument of ``apply``.
    """
    check_state(state, training=training, update_stats=update_stats)
    if training or update_stats:
        check_input(x, mask)
