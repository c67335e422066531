"""Marks that let :func:`bnjax.testing.audit` find every BatchNorm call in a jaxpr.

``apply`` passes its output and its input state through ``bnjax_mark`` with
``role="call"``, and its new state through it with ``role="update"``: one primitive,
identity on its operands, whose parameters say
which call it is (a number unique per trace), where (a Flax module path when a wrapper
knows one) and in which mode. In a jaxpr the marks are ordinary equations, so they survive
``jax.grad``, ``vmap``, ``lax.scan``, ``jax.checkpoint``, ``shard_map`` and nested
``jax.jit``: a dataflow walk over the jaxpr then sees where each update goes.

They cost nothing when the program runs: the lowering returns the operands, so no
StableHLO operation is emitted, and a mark whose outputs are unused is removed with them.
The call mark rides on ``y`` (almost always used), the update mark on the new state, so a
discarded update loses its update mark to dead-code elimination inside a transformed
``jax.jit`` but keeps its call mark, which still says an update was due.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

mark_p = jex_core.Primitive("bnjax_mark")
mark_p.multiple_results = True

_ids = itertools.count()
_label: contextvars.ContextVar[str | None] = contextvars.ContextVar("bnjax_label", default=None)


@mark_p.def_impl
def _impl(*args, **params):
    del params
    return list(args)


@mark_p.def_abstract_eval
def _abstract_eval(*avals, **params):
    del params
    return list(avals)


def _jvp(primals, tangents, **params):
    # Tangents pass through unmarked: one mark per call, on the primal computation.
    return mark_p.bind(*primals, **params), list(tangents)


def _batch(args, dims, **params):
    return mark_p.bind(*args, **params), list(dims)


def _transpose(cts, *args, **params):
    del args, params
    return list(cts)


ad.primitive_jvps[mark_p] = _jvp
ad.primitive_transposes[mark_p] = _transpose
batching.primitive_batchers[mark_p] = _batch
mlir.register_lowering(mark_p, lambda ctx, *args, **params: list(args))


@contextlib.contextmanager
def label(name: str | None):
    """Names the BatchNorm calls traced inside (a Flax wrapper's module path)."""
    token = _label.set(name)
    try:
        yield
    finally:
        _label.reset(token)


def new_call_id() -> int:
    """A number unique to one traced ``apply`` call."""
    return next(_ids)


def mark_call(y, state, *, call_id: int, training: bool, update_stats: bool, steps: int):  # noqa: PLR0913
    """``y`` marked as the output of call ``call_id``, which read ``state``.

    Args:
      y: the call's output.
      state: the state given to the call (any pytree of arrays).
      call_id: from :func:`new_call_id`.
      training: the call's ``training``.
      update_stats: whether the call updates its state.
      steps: the batches it folds into the state (the number of ghost chunks, else 1).
        A recalibration accumulator (``accumulator=True`` in the mark) has a
        structure of its own.

    Returns:
      ``y``, unchanged.
    """
    flags = {"training": training, "update_stats": update_stats, "steps": steps}
    return _bind([y, *jax.tree.leaves(state)], state, role="call", call_id=call_id, **flags)[0]


def mark_update(state, *, call_id: int):
    """The new ``state`` of call ``call_id``, marked.

    Args:
      state: the new state (a pytree of arrays).
      call_id: from :func:`new_call_id`, as given to :func:`mark_call`.

    Returns:
      ``state``, unchanged.
    """
    leaves, tree = jax.tree.flatten(state)
    flags = {"training": False, "update_stats": True, "steps": 0}
    return jax.tree.unflatten(tree, _bind(leaves, state, role="update", call_id=call_id, **flags))


def _bind(operands, state, **params):
    """The mark over ``operands``, labelled, and flagged when ``state`` is an accumulator."""
    accumulator = getattr(state, "accumulates", False)
    return mark_p.bind(*operands, label=_label.get(), accumulator=accumulator, **params)
