"""``bnjax.testing.audit``: a forgotten state update found by tracing a step, not running it.

The bug batch normalization is known for is a running average that silently never
updates (TF1's ``UPDATE_OPS``): inference then runs on the statistics of ``init``. bnjax
returns the new state from every call, but a step can still drop it. :func:`audit`
traces the step to a jaxpr (nothing runs: the arguments may be ``jax.ShapeDtypeStruct``),
finds every BatchNorm call by the marks ``apply`` leaves there, and follows where each
new state goes (bnjax/_src/tracing.py, bnjax/_src/dataflow.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from bnjax._src import dataflow, tracing


@dataclasses.dataclass(frozen=True)
class Finding:
    """One way a step mishandles a BatchNorm's state.

    Attributes:
      kind: ``"discarded_update"`` (the new statistics reach no output),
        ``"stale_state"`` (the step returns the state it was given, unchanged, although
        the layer updated it), ``"eval_updates_state"`` (an evaluation step averages its
        batches into the statistics), ``"training_in_eval"`` (an evaluation step
        normalizes with batch statistics) or ``"no_training_call"`` (a train step in
        which no BatchNorm runs in training mode).
      where: which BatchNorm: the Flax module path, else the path of its state in the
        step's arguments (``bn_state['block1']``), else the source line of the call.
      message: what happened and what to do.
    """

    kind: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}: {self.message}"


# An accumulator's ``.state``, the leaf's field, an NNX Variable's ``.value``: each optional.
_LEAF = re.compile(
    r"(\.state)?((\.|\[')(mean|var|count|pivot|delta)('\])?)?(\.value|\['value'\])?$"
)


def layer_name(leaf_name: str) -> str:
    """``bn_state['block1'].mean`` -> ``bn_state['block1']``: a state leaf's layer."""
    return _LEAF.sub("", leaf_name, count=1)


def where(call: dataflow.Call, traced: tracing.Traced) -> str:
    """The most readable name of ``call``'s BatchNorm that is known."""
    known = [traced.in_names[leaf] for leaf in call.state_lineage if leaf is not None]
    return call.label or (layer_name(known[0]) if known else call.line)


def audit(fn: Callable, *args, expect: str | None = None, **kwargs) -> list[Finding]:
    """Finds the BatchNorm state updates that ``fn`` loses, by tracing it (nothing runs).

    Every bnjax BatchNorm call inside ``fn`` is found (core, ``bnjax.linen``,
    ``bnjax.nnx``, at any depth: inside ``jax.grad``, ``jax.vmap``, ``lax.scan``,
    ``jax.checkpoint``, ``jax.jit``, ``shard_map``, ``nn.scan``), and each new state is
    followed to ``fn``'s outputs. NNX modules among the arguments count as outputs as
    they are after the call (their updates happen in place). An update counts as kept
    when an output holds the new state (returned as it is, cast, reshaped, chosen by
    ``where``/``cond`` or stacked), not when an output is merely computed from it. Flax's,
    Haiku's or Keras's own batch norms are invisible, and so are writes of a state into
    a mutable ``Ref`` (``jax.new_ref``, NNX variables made with ``ref=True``).

    Args:
      fn: the step, for example ``train_step(params, bn_state, x, y)``.
      *args: its positional arguments. Array leaves may be arrays or
        ``jax.ShapeDtypeStruct``; other leaves (Python numbers, strings, modules'
        static fields) are passed as they are.
      expect: ``"train"``: a train step, in which some BatchNorm must run in training
        mode; ``"eval"``: an evaluation step, in which none may use batch statistics or
        update its state; None: no expectation about modes.
      **kwargs: its keyword arguments.

    Returns:
      The findings, in call order; empty when ``fn`` threads every state correctly.

    Raises:
      ValueError: ``expect`` is not None, ``"train"`` or ``"eval"``.
      TypeError: ``fn`` is not callable.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax, bnjax.testing
      >>> bn = bnjax.BatchNorm()
      >>> params, state = bn.init((8, 3))
      >>> def step(params, state, x):
      ...     y, _ = bn.apply(params, state, x, training=True)  # new state dropped
      ...     return jnp.sum(y**2), state
      >>> x = jax.ShapeDtypeStruct((8, 3), jnp.float32)
      >>> [f.kind for f in bnjax.testing.audit(step, params, state, x, expect="train")]
      ['stale_state']
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (the step to audit); got {fn!r}")
    if expect not in (None, "train", "eval"):
        raise ValueError(f"expect must be None, 'train' or 'eval'; got {expect!r}")
    traced = tracing.trace(fn, args, kwargs)
    facts, calls, alias = dataflow.flow(traced.jaxpr)
    return findings(traced, facts, calls, alias, expect=expect)


def findings(traced, facts, calls, alias, *, expect) -> list[Finding]:
    """The findings of a traced and walked step (see :func:`audit`)."""
    # An update counts as kept when an output holds the new state, not when an output
    # was merely computed from it (a metric of the running variance keeps nothing).
    kept = {alias.get(uid, uid) for f in facts for uid in f.carry}  # -1: a mark of no call
    returned_same = {f.same: i for i, f in enumerate(facts) if f.same is not None}
    out: list[Finding] = []
    for call in calls:
        stale = [returned_same[s] for s in call.state_same if s in returned_same]
        if expect == "eval":
            kind = "training_in_eval" if call.training else "eval_updates_state"
            lost = call.training or call.update_stats
        else:  # update_stats: steps >= 1
            kind = "stale_state" if stale else "discarded_update"
            lost = call.update_stats and call.uid not in kept
        if lost:
            leaf = layer_name(traced.out_names[stale[0]]) if stale else None
            mode = f"training={call.training}, update_stats={call.update_stats}"
            message = _MESSAGES[kind].format(leaf=leaf, mode=mode)
            out.append(Finding(kind, where(call, traced), message))
    if expect == "train" and not any(c.training for c in calls):
        if not calls:
            return out + [Finding("no_training_call", traced.fn_name, _NO_BATCHNORM)]
        out += [Finding("no_training_call", where(c, traced), _NO_TRAINING) for c in calls]
    return out


_MESSAGES = {
    "discarded_update": (
        "this BatchNorm ran with {mode}, but its new state reaches none of the step's "
        "outputs, so the next step and evaluation see the old running statistics (the "
        "forgotten UPDATE_OPS of TF1). Return the state that apply returns (Flax linen: the "
        "updated 'batch_stats' from apply(..., mutable=['batch_stats']))."
    ),
    "stale_state": (
        "the step returns {leaf}, the state it was given, unchanged, although this "
        "BatchNorm ran with {mode} and computed a new state. Return the new state from "
        "apply instead."
    ),
    "eval_updates_state": (
        "this BatchNorm runs with training=False, update_stats=True in an evaluation step: "
        "it averages the evaluation batches into the running statistics. Pass "
        "update_stats=False (the default with training=False)."
    ),
    "training_in_eval": (
        "this BatchNorm runs with training=True in an evaluation step: it normalizes each "
        "evaluation batch with that batch's own statistics, not the running ones. Pass "
        "training=False (linen: use_running_average=True; NNX: call model.eval())."
    ),
}
_NO_TRAINING = (
    "no BatchNorm runs in training mode in this train step, and this one runs with "
    "training=False: its statistics never learn from the data. Pass training=True "
    "(linen: use_running_average=False; NNX: call model.train() after evaluating)."
)
_NO_BATCHNORM = (
    "no bnjax BatchNorm call was found in this train step (Flax's, Haiku's or Keras's own "
    "batch norms are invisible to the audit)."
)
