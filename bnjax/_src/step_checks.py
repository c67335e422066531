"""``check_train_step`` and ``check_eval_step``: run a step once and check every state.

:func:`bnjax.testing.audit` reads the dataflow; these run the step (jitted) and compare
numbers: in a train step each BatchNorm's ``count`` must advance by the number of
batches its calls fold in, in an evaluation step no state may change. The trace tells
which output leaf holds which layer's state after the step (its ``lineage``,
bnjax/_src/dataflow.py), so the step may return its states in any structure.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from bnjax._src import audit as audit_lib
from bnjax._src import dataflow, tracing


def _layers(calls: list) -> dict[tuple, list[dataflow.Call]]:
    """The calls grouped by layer: the argument leaves their state descends from (a key
    of all None: states that come from no argument leaf, made inside the step or
    reshaped beyond recognition)."""
    lineages = dict.fromkeys(c.state_lineage for c in calls)  # in the order of the calls
    return {lin: [c for c in calls if c.state_lineage == lin] for lin in lineages}


def _prepare(step, args, kwargs):
    if not callable(step):
        raise TypeError(f"step must be callable; got {step!r}")
    traced = tracing.trace(step, args, kwargs)
    for name, leaf in zip(traced.in_names, traced.dynamic, strict=True):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(
                f"{name} is a jax.ShapeDtypeStruct; the step runs once, so it needs arrays "
                "(bnjax.testing.audit takes shapes and runs nothing)"
            )
    facts, calls, _ = dataflow.flow(traced.jaxpr)
    outs = [np.asarray(o) for o in jax.jit(traced.run)(*traced.dynamic)]
    ins = [np.asarray(a) for a in traced.dynamic]
    return traced, facts, calls, ins, outs


def _returned(lineage, facts) -> list[int]:
    return [i for i, f in enumerate(facts) if lineage is not None and f.lineage == lineage]


def _changed(lineage, facts, ins, outs) -> list[tuple[int, int]]:
    """The (argument leaf, output leaf) pairs of a layer's state whose values differ."""
    pairs = [(leaf, i) for leaf in lineage for i in _returned(leaf, facts)]
    return [(a, i) for a, i in pairs if not np.array_equal(outs[i], ins[a], equal_nan=True)]


def check_train_step(step: Callable, *args, **kwargs) -> None:
    """Runs ``step`` once, jitted, and checks that every BatchNorm state advanced.

    For each BatchNorm whose state comes from the arguments: it must run in training
    mode (or update its statistics), its new state must be among the outputs (or, for
    an NNX module, in the module), and a stored ``count`` must advance by exactly the
    batches folded in: 1 per call, the number of ghost chunks with
    ``virtual_batch_size``, times the length of the enclosing ``lax.scan``\\ s (at least 1
    inside a while loop). States stored without a count (the Flax wrappers' default)
    must change. A ``PopulationAccumulator`` must change. The arguments are not changed,
    NNX modules included.

    Args:
      step: the train step, as for :func:`bnjax.testing.audit`.
      *args, **kwargs: its arguments, concrete arrays (the step runs).

    Raises:
      AssertionError: naming every BatchNorm whose state did not advance as expected.
      TypeError: ``step`` is not callable, or an argument is a ``jax.ShapeDtypeStruct``.
    """
    traced, facts, calls, ins, outs = _prepare(step, args, kwargs)
    problems = [] if calls else [f"no bnjax BatchNorm call was found in {traced.fn_name}"]
    for lineage, layer in _layers(calls).items():
        name = audit_lib.where(layer[0], traced)
        problems += [f"{name}: {p}" for p in _train_problems(lineage, layer, facts, ins, outs)]
    if problems:
        raise AssertionError(_report("train step", traced.fn_name, problems))


def _train_problems(lineage, layer, facts, ins, outs) -> list[str]:
    layer = [c for c in layer if c.steps > 0]  # a zero-size batch has nothing to fold in
    updates = [c for c in layer if c.update_stats]
    if not layer:
        return []
    if not updates:
        modes = sorted({f"training={c.training}, update_stats=False" for c in layer})
        stuck = not any(c.training for c in layer)
        hint = (" (a training flag stuck at False: use_running_average=True, or an NNX "
                "module left in .eval())") if stuck else ""  # fmt: skip
        return [f"ran only with {' / '.join(modes)} in a train step: no update{hint}"]
    if all(leaf is None for leaf in lineage):
        return [
            "its state does not come from the step's arguments as they were given, so "
            "which output holds it after the step cannot be told; pass the state itself"
        ]
    returned = [_returned(leaf, facts) for leaf in lineage]
    if not any(returned):
        return ["its new state is not among the step's outputs (the update was dropped)"]
    if not updates[0].accumulator and len(lineage) == 3 and lineage[2] is not None:
        return _count_problems(lineage[2], returned[2], updates, ins, outs)
    if _changed(lineage, facts, ins, outs):
        return []
    return ["its returned statistics are the ones it was given, unchanged"]


def _count_problems(count, returned, updates, ins, outs) -> list[str]:
    """Whether the count (argument leaf ``count``, output leaves ``returned``) advanced by
    the batches ``updates`` folded in (at least 1 where a while loop hides how many)."""
    if not returned:
        return ["its count is not among the step's outputs as BatchNorm left it (dropped, "
                "or changed after the update)"]  # fmt: skip
    exact = all(c.repeats is not None for c in updates)
    expected = sum(c.steps * (c.repeats or 1) for c in updates)
    advanced = [outs[i].astype(np.int64) - ins[count].astype(np.int64) for i in returned]
    if any(np.all(a == expected) if exact else np.all(a >= 1) for a in advanced):
        return []
    got = ", ".join(str(np.unique(a).tolist()) for a in advanced)
    want = expected if exact else "at least 1"
    return [f"count advanced by {got}; expected {want} (batches folded in by "
            f"{len(updates)} call(s))"]  # fmt: skip


def check_eval_step(step: Callable, *args, **kwargs) -> None:
    """Runs ``step`` once, jitted, and checks that no BatchNorm state changed.

    Every BatchNorm must run with ``training=False`` (running statistics) and without
    an update, and every state it returns must equal, exactly, the one it was given.

    Args:
      step: the evaluation step, as for :func:`bnjax.testing.audit`.
      *args, **kwargs: its arguments, concrete arrays (the step runs).

    Raises:
      AssertionError: naming every BatchNorm that used batch statistics or whose state
        changed.
      TypeError: ``step`` is not callable, or an argument is a ``jax.ShapeDtypeStruct``.
    """
    traced, facts, calls, ins, outs = _prepare(step, args, kwargs)
    problems = [f"{audit_lib.where(c, traced)}: ran with training=True (batch statistics) "
                "in an evaluation step" for c in calls if c.training]  # fmt: skip
    for lineage, layer in _layers(calls).items():
        name = audit_lib.where(layer[0], traced)
        for leaf, i in _changed(lineage, facts, ins, outs):
            problems.append(f"{name}: {traced.out_names[i]} changed in an evaluation step (it "
                            f"was {traced.in_names[leaf]})")  # fmt: skip
    if problems:
        raise AssertionError(_report("evaluation step", traced.fn_name, problems))


def _report(kind: str, name: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
    return f"{kind} {name} mishandles BatchNorm state:\n{lines}"
