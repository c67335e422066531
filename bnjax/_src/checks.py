"""Opt-in runtime checks (``BatchNorm(checks=True)``), reported by a host callback.

Shape and dtype mistakes are caught when ``apply`` is traced, from static shapes. Some
mistakes only show in the values: inference with statistics that were never updated, a
NaN batch in training, a running variance that went negative or non-finite, a batch whose
statistics overflow the state's dtype. With ``checks=True`` ``apply`` computes a
predicate for each (a few reductions per call) and hands the predicates and the numbers
of the messages to one ``jax.debug.callback`` per check site. On the host, a failed check
issues a :class:`CheckWarning`; a passed one returns at once. The checks are off by
default, and when off nothing is traced at all.

This works the same eagerly and under ``jax.jit``, ``vmap``, ``lax.scan``, ``grad`` and
``shard_map``, without any wrapping:

>>> import warnings, jax, jax.numpy as jnp, bnjax
>>> bn = bnjax.BatchNorm(checks=True)
>>> params, state = bn.init((4, 2))
>>> infer = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=False))
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     y, _ = infer(params, state, jnp.ones((4, 2)))  # a state fresh from init
...     jax.effects_barrier()  # callbacks run asynchronously: wait for them
>>> [message] = [w.message for w in caught if w.category is bnjax.CheckWarning]
>>> print(message)  # doctest: +ELLIPSIS
BatchNorm.apply(training=False) got a state whose count is 0 and ... were never updated, ...

Callbacks run asynchronously: the warning may come after the jitted call returns, and
``jax.effects_barrier()`` waits for it. Under ``vmap`` the callback takes the whole
batch at once and the message starts with the first failing index
(``at vmapped index 3 (and 2 more): ...``). Inside ``shard_map`` each device reports its
own shard (the warning does not name the device; checkify's error does). Python's default
filter shows a warning once per distinct message; use
``warnings.simplefilter("always", bnjax.CheckWarning)`` to see every one.

To make a failed check an error, ``warnings.simplefilter("error", bnjax.CheckWarning)``.
Eagerly the :class:`CheckWarning` is then raised by ``apply`` itself. Under ``jax.jit``
the callback raises it on the host, and the jitted call (or, callbacks being
asynchronous, a later call or ``jax.effects_barrier()``) raises
``jax.errors.JaxRuntimeError`` (a ``RuntimeError``) whose message contains the callback's
traceback, ending in ``CheckWarning: <message>``; JAX also logs that traceback
(``jax.debug.callback failed``).

Under ``checkify.checkify(f, errors=checkify.user_checks)`` each check is also a
``checkify.debug_check``: the failed checks come back in ``err`` as before (inside
``shard_map``, ``at mapped index 1: ...`` names the device; build the mesh with
``AxisType.Auto`` axes, since on ``Explicit`` axes JAX 0.10's checkify fails while
gathering the devices' errors). The warning is issued as well. Outside ``checkify``,
``debug_check`` does nothing.

A program with a host callback cannot be serialized by ``jax.export``: export a model
built with ``checks=False``.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax.experimental import checkify


class CheckWarning(UserWarning):
    """A ``BatchNorm(checks=True)`` runtime check failed; the message says which and why.

    Make it an error with ``warnings.simplefilter("error", bnjax.CheckWarning)``: eagerly
    ``apply`` raises it, under ``jax.jit`` the call raises ``jax.errors.JaxRuntimeError``
    with this warning's message in it.
    """


NEVER_UPDATED = (
    "BatchNorm.apply(training=False) got a state whose count is {count} and whose running "
    "statistics are still exactly at their init values (mean 0, var 1): they were never "
    "updated, so the output is barely normalized. Pass the state returned by "
    "apply(..., training=True) to later calls, or estimate the statistics first with "
    "apply(..., training=False, update_stats=True)."
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


class Check(NamedTuple):
    """One runtime check: ``ok`` (a bool scalar), its message and the message's numbers."""

    ok: jax.Array
    message: str
    numbers: dict[str, jax.Array]


def _count(condition) -> jnp.ndarray:
    return jnp.sum(condition, dtype=jnp.int32)


def warn_failed(messages, oks, numbers) -> None:
    """The host side of :func:`report`: one :class:`CheckWarning` per failed check.

    A passed check returns at once, its message unformatted. Under ``vmap`` every value
    carries the mapped axes in front (see :func:`_reporter`); the message then reports the
    numbers of the first failing index.
    """
    for message, ok, values in zip(messages, oks, numbers, strict=True):
        failed = np.argwhere(~np.asarray(ok))
        if not len(failed):
            continue
        first = tuple(int(i) for i in failed[0])
        text = message.format(**{k: np.asarray(v)[first].item() for k, v in values.items()})
        if first:
            where = first[0] if len(first) == 1 else first
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            text = f"at vmapped index {where}{more}: {text}"
        warnings.warn(CheckWarning(text), stacklevel=1)


@functools.cache
def _reporter(messages: tuple[str, ...]):
    """The traced side of :func:`report` for one tuple of messages.

    ``jax.debug.callback`` alone is batched by unrolling: one callback per mapped index,
    which takes seconds to compile for a vmap of a few hundred. Under ``custom_vmap`` the
    mapped values go to one callback instead, every one broadcast to the mapped axes so
    that the host indexes them alike; nested vmaps stack their axes in front.
    """

    @custom_batching.custom_vmap
    def callback(oks, numbers):
        jax.debug.callback(functools.partial(warn_failed, messages), oks, numbers)
        return oks

    @callback.def_vmap
    def _batched(axis_size, in_batched, oks, numbers):
        def spread(value, batched):
            return value if batched else jnp.broadcast_to(value, (axis_size, *value.shape))

        oks, numbers = jax.tree.map(spread, (oks, numbers), tuple(in_batched))
        return callback(oks, numbers), jax.tree.map(lambda _: True, oks)

    return callback


def report(checks: list[Check]) -> None:
    """Reports failed checks: a ``checkify.debug_check`` each, and one host callback.

    Args:
      checks: the checks of one call site; each ``ok`` a bool scalar, each number an
        int scalar.
    """
    for check in checks:
        checkify.debug_check(check.ok, check.message, **check.numbers)
    oks, messages, numbers = zip(*checks, strict=True)
    _reporter(messages)(oks, numbers)


def check_update(state, moments) -> None:
    """Checks that a batch's statistics fit the state's dtype, so the update is not skipped.

    Args:
      state: the ``BatchNormState`` given to ``apply``.
      moments: the batch ``Moments`` about to be averaged in (any leading chunk axis).
    """
    # The state's largest value, in the moments' dtype (no implicit promotion): a float16
    # state's range is smaller than float32 moments', a float64 state's larger.
    acc = jnp.result_type(moments.var)
    big = jnp.asarray(min(float(jnp.finfo(jnp.result_type(state.var)).max),
                          float(jnp.finfo(acc).max)), acc)  # fmt: skip
    overflow = moments.finite() & ((moments.var > big) | (jnp.abs(moments.mean) > big))
    # Without a mask each chunk's count is a scalar: stacked over virtual batches it is
    # (chunks,), which must pair with the chunk axis of the keep-dims moments.
    count = jnp.asarray(moments.n)
    count = jnp.reshape(count, count.shape + (1,) * (moments.var.ndim - count.ndim))
    flagged = overflow & (count > 0)
    # A feature counts once, however many of its virtual batches overflow.
    chunk_axes = tuple(range(flagged.ndim - jnp.ndim(state.var)))
    bad = _count(jnp.any(flagged, axis=chunk_axes))
    report([Check(bad == 0, UNREPRESENTABLE, {"bad": bad})])


def check_apply(state, x, mask, *, training: bool, update_stats: bool) -> None:
    """All runtime checks of one ``apply`` call before its update, in one callback.

    The running statistics ``apply`` is about to use or update must be finite (and the
    variance >= 0), and so must every element of ``x`` counted in the batch statistics
    when the call computes them. The never-updated check fires only on a count of 0 with
    the statistics still exactly at init (mean all 0, var all 1). Statistics imported
    without a count (``interop.from_flax``, ``from_keras``, Flax variables) come with a
    count of 0 but trained values, and pass. ``training=False, update_stats=True`` on a
    fresh state is recalibration, the way to estimate statistics without using batch
    statistics, so it is not checked for that.

    Args:
      state: the ``BatchNormState`` given to ``apply``; ``mean`` and ``var`` of the
        feature shape, ``count`` an int scalar.
      x: the input, any shape.
      mask: None, or a bool mask already reshaped to broadcast against ``x``; elements
        it leaves out may hold anything, NaN included.
      training: the ``training`` argument of ``apply``.
      update_stats: the resolved ``update_stats`` argument of ``apply``.
    """
    mean, var = jnp.asarray(state.mean), jnp.asarray(state.var)
    checks = []
    if not training and not update_stats:
        count = jnp.asarray(state.count, jnp.int32)
        at_init = (count == 0) & jnp.all(mean == 0) & jnp.all(var == 1)
        checks.append(Check(~at_init, NEVER_UPDATED, {"count": count}))
    var_numbers = {"negative": _count(var < 0), "nonfinite": _count(~jnp.isfinite(var))}
    checks.append(Check(sum(var_numbers.values()) == 0, BAD_RUNNING_VAR, var_numbers))
    nonfinite_mean = _count(~jnp.isfinite(mean))
    checks.append(Check(nonfinite_mean == 0, BAD_RUNNING_MEAN, {"nonfinite": nonfinite_mean}))
    if training or update_stats:
        bad = _count(~jnp.isfinite(x) if mask is None else ~jnp.isfinite(x) & mask)
        checks.append(Check(bad == 0, NONFINITE_INPUT, {"bad": bad}))
    report(checks)
