"""A user's step as a jaxpr, and what flows where in it, for :mod:`bnjax.testing`.

:func:`trace` turns ``fn(*args, **kwargs)`` into a closed jaxpr over the array leaves of
its arguments (other leaves stay static, as they would in a Python call), with the NNX
modules among the arguments returned after the call, so that their in-place updates are
outputs like any other. :func:`flow` walks the jaxpr, into every nested jaxpr (``jit``,
``scan``, ``while``, ``cond``, ``checkpoint``, ``custom_jvp``/``custom_vjp``,
``shard_map``, ``pmap``), and follows, for every variable:

* ``reach``: the BatchNorm updates (by call number) whose new state it depends on;
* ``same``: the argument leaf it is, unchanged, if any (``stale`` states are these);
* ``lineage``: the argument leaf whose BatchNorm state it descends from, unchanged or
  updated by BatchNorm calls only (the same layer's state after the step).

Every BatchNorm call is found by the marks ``apply`` leaves in the jaxpr
(bnjax/_src/marks.py); each becomes a :class:`Call`.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from bnjax._src.marks import mark_p

# Primitives whose outputs are their inputs, value for value (the marks' ``same`` and
# ``lineage`` pass through them).
_IDENTITY = {
    "copy",
    "copy_p",
    "device_put",
    "optimization_barrier",
    "pvary",
    "pbroadcast",
    "sharding_constraint",
    "stop_gradient",
    "mesh_cast",
    "reshard",
    "bnjax_mark",
}


@dataclasses.dataclass(frozen=True)
class Fact:
    """What is known about one variable."""

    reach: frozenset = frozenset()
    same: int | None = None
    lineage: int | None = None


_NONE = Fact()


def join(a: Fact, b: Fact) -> Fact:
    """The fact about a value that may be either ``a`` or ``b``."""
    return Fact(
        reach=a.reach | b.reach,
        same=a.same if a.same == b.same else None,
        lineage=a.lineage if a.lineage == b.lineage else None,
    )


@dataclasses.dataclass
class Call:
    """One BatchNorm ``apply`` call found in a trace.

    Attributes:
      call_id: unique per traced call.
      label: the Flax module path a wrapper gave, or None.
      training, update_stats, steps, accumulator: as marked by ``apply``.
      state_lineage: for each leaf of the state the call read, the argument leaf it
        descends from (None where unknown).
      state_same: for each leaf, the argument leaf it is unchanged, or None.
      repeats: how many times the call runs per step (product of the enclosing scans'
        lengths; None inside a while loop).
      line: the user's source line of the call.
      updated: the call's update mark was found (it is gone when its result was unused
        and dead code was removed).
    """

    call_id: int
    label: str | None
    training: bool
    update_stats: bool
    steps: int
    accumulator: bool
    state_lineage: tuple
    state_same: tuple
    repeats: int | None
    line: str
    updated: bool = False


@dataclasses.dataclass
class Traced:
    """A traced step.

    Attributes:
      jaxpr: the closed jaxpr.
      run: the flat function the jaxpr is of (array leaves in, array leaves out).
      in_names: a readable path for each input leaf (``bn_state['block1'].mean``).
      out_names: a readable path for each output leaf.
      dynamic: the input leaves (arrays or ``jax.ShapeDtypeStruct``).
      fn_name: the step's name.
    """

    jaxpr: Any
    run: Callable
    in_names: list[str]
    out_names: list[str]
    dynamic: list
    fn_name: str


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _graph_nodes(tree) -> list:
    """The NNX modules (graph nodes) among the leaves and nodes of ``tree``, if any."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return []

    def is_node(x):  # a module or optimizer; a Variable is a leaf of one
        return nnx.graph.is_graph_node(x) and not isinstance(x, nnx.Variable)

    return [n for n in jax.tree.leaves(tree, is_leaf=is_node) if is_node(n)]


def _root_names(fn, n_args: int) -> list[str]:
    """The names of ``fn``'s positional parameters where known, else ``args[i]``."""
    names = [f"args[{i}]" for i in range(n_args)]
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return names
    for i, p in enumerate(params[:n_args]):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names[i] = p.name
        else:
            break
    return names


def _name(root: str, path) -> str:
    return root + jax.tree_util.keystr(tuple(path))


def trace(fn: Callable, args: tuple, kwargs: dict) -> Traced:
    """``fn(*args, **kwargs)`` as a closed jaxpr over its array leaves; nothing runs.

    Args:
      fn: the step: any function of arrays, pytrees of arrays, NNX modules and static
        Python values.
      args, kwargs: its arguments; array leaves may be ``jax.ShapeDtypeStruct``.

    Returns:
      A :class:`Traced`. Its outputs are ``fn``'s array output leaves, then the leaves of
      the NNX modules among the arguments as they are after the call.
    """
    flat, tree = jax.tree_util.tree_flatten_with_path((args, kwargs))
    roots = _root_names(fn, len(args))
    in_names, dynamic, where = [], [], []
    for i, (path, leaf) in enumerate(flat):
        if _is_array(leaf):
            group, key, *rest = path  # (args, kwargs), then the position or the keyword
            root = roots[key.idx] if group.idx == 0 else str(key.key)
            in_names.append(_name(root, rest))
            dynamic.append(leaf)
            where.append(i)
    leaves = [leaf for _, leaf in flat]
    out_names: list[str] = []

    def run(*arrays):
        values = list(leaves)
        for i, a in zip(where, arrays, strict=True):
            values[i] = a
        a, kw = jax.tree.unflatten(tree, values)
        out = fn(*a, **kw)
        after = [jax.tree_util.tree_flatten_with_path(node)[0] for node in _graph_nodes((a, kw))]
        names, outs = [], []
        for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
            if isinstance(leaf, jax.Array):
                names.append(_name("output", path))
                outs.append(leaf)
        for k, node_leaves in enumerate(after):
            for path, leaf in node_leaves:
                if isinstance(leaf, jax.Array):
                    names.append(_name(f"module[{k}]", path))
                    outs.append(leaf)
        out_names[:] = names
        return outs

    structs = [jax.ShapeDtypeStruct(np.shape(d), d.dtype) if not isinstance(d, jax.Array) else d
               for d in dynamic]  # fmt: skip
    jaxpr = jax.make_jaxpr(run)(*structs)
    return Traced(jaxpr=jaxpr, run=run, in_names=in_names, out_names=list(out_names),
                  dynamic=dynamic, fn_name=getattr(fn, "__name__", repr(fn)))  # fmt: skip


# -- the dataflow walk ---------------------------------------------------------------


def _frame(eqn) -> str:
    """The innermost source line outside JAX, Flax and bnjax's own modules."""
    tb = eqn.source_info.traceback
    for frame in tb.frames if tb is not None else ():
        name = frame.file_name.replace("\\", "/")
        if any(part in name for part in ("/jax/", "/jaxlib/", "/flax/", "/bnjax/_src/")):
            continue
        if "/bnjax/testing/" in name:
            continue
        return f"{frame.file_name}:{frame.line_num}"
    return "unknown line"


def _sub(param):
    """``(jaxpr, consts)`` of a Jaxpr or ClosedJaxpr parameter, else None."""
    if isinstance(param, jex_core.ClosedJaxpr):
        return param.jaxpr
    if isinstance(param, jex_core.Jaxpr):
        return param
    return None


class _Walk:
    """One walk over a jaxpr: the facts of the outputs and the calls found."""

    def __init__(self):
        self.calls: dict[int, Call] = {}
        self.loops = 0  # the depth of loop bodies being walked

    def jaxpr(self, jaxpr, facts, repeats):
        env: dict = {}

        def read(v):
            if isinstance(v, jex_core.Literal):
                return _NONE
            return env.get(v, _NONE)

        for v, f in zip(jaxpr.invars, facts, strict=True):
            env[v] = f
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars], repeats)
            for v, f in zip(eqn.outvars, outs, strict=True):
                env[v] = f
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins, repeats):  # noqa: PLR0911
        name = eqn.primitive.name
        if eqn.primitive is mark_p:
            return self.mark(eqn, ins, repeats)
        if name == "scan":
            return self.scan(eqn, ins, repeats)
        if name == "while":
            return self.while_(eqn, ins)
        if name == "cond":
            index, *ops = ins
            outs = None
            for branch in eqn.params["branches"]:
                got = self.jaxpr(branch.jaxpr, ops, repeats)
                outs = got if outs is None else [join(a, b) for a, b in zip(outs, got, strict=True)]
            return [dataclasses.replace(f, reach=f.reach | index.reach) for f in outs]
        subs = [s for s in map(_sub, eqn.params.values()) if s is not None]
        n_in, n_out = len(ins), len(eqn.outvars)
        calls = [s for s in subs if len(s.invars) == n_in and len(s.outvars) == n_out]
        if len(calls) == 1 and len(subs) <= 3:  # jit, checkpoint, custom_jvp/vjp, shard_map, ...
            outs = self.jaxpr(calls[0], ins, repeats)
            for s in subs:
                if s is not calls[0]:
                    self.jaxpr(s, [_NONE] * len(s.invars), repeats)
            return outs
        reach = frozenset().union(*(f.reach for f in ins))
        for s in subs:  # unknown structure: every input may reach every output
            got = self.jaxpr(s, [Fact(reach=reach)] * len(s.invars), repeats)
            reach = reach.union(*(f.reach for f in got))
        if name in _IDENTITY and len(ins) == len(eqn.outvars):
            return [dataclasses.replace(f, reach=f.reach) for f in ins]
        if name == "convert_element_type" and eqn.invars[0].aval == eqn.outvars[0].aval:
            return [ins[0]]
        return [Fact(reach=reach) for _ in eqn.outvars]

    def mark(self, eqn, ins, repeats):
        p = eqn.params
        if p["role"] == "call":
            state = ins[1:]
            call = self.calls.get(p["call_id"])
            if call is not None and self.loops:  # a loop body walked again: wider facts
                call.state_lineage = tuple(f.lineage for f in state)
                call.state_same = tuple(f.same for f in state)
            else:
                self.calls[p["call_id"]] = Call(
                    call_id=p["call_id"],
                    label=p["label"],
                    training=p["training"],
                    update_stats=p["update_stats"],
                    steps=p["steps"],
                    accumulator=p["accumulator"],
                    state_lineage=tuple(f.lineage for f in state),
                    state_same=tuple(f.same for f in state),
                    repeats=repeats,
                    line=_frame(eqn),
                )
            return list(ins)
        call = self.calls.get(p["call_id"])
        out = []
        for i, f in enumerate(ins):
            lineage = None
            if call is not None:
                call.updated = True
                if i < len(call.state_lineage):
                    lineage = call.state_lineage[i]
            out.append(Fact(reach=f.reach | {p["call_id"]}, same=None, lineage=lineage))
        return out

    def scan(self, eqn, ins, repeats):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        body = p["jaxpr"].jaxpr
        inner = None if repeats is None else repeats * int(p["length"])
        consts, carry, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
        xs = [Fact(reach=f.reach, lineage=f.lineage) for f in xs]  # slices, not the leaves
        self.loops += 1
        for _ in range(len(carry) + 2):  # to a fixed point: each round can only widen
            outs = self.jaxpr(body, consts + carry + xs, inner)
            new = [join(c, o) for c, o in zip(carry, outs[:nk], strict=True)]
            if new == carry:
                break
            carry = new
        self.loops -= 1
        ys = [Fact(reach=f.reach, lineage=f.lineage) for f in outs[nk:]]
        return carry + ys

    def while_(self, eqn, ins):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        body = p["body_jaxpr"].jaxpr
        bconsts, carry = ins[cn : cn + bn], ins[cn + bn :]
        self.loops += 1
        for _ in range(len(carry) + 2):
            outs = self.jaxpr(body, bconsts + carry, None)
            new = [join(c, o) for c, o in zip(carry, outs, strict=True)]
            if new == carry:
                break
            carry = new
        self.loops -= 1
        cond = p["cond_jaxpr"].jaxpr
        self.jaxpr(cond, [_NONE] * len(cond.invars), None)
        return carry


def flow(traced: Traced) -> tuple[list[Fact], dict[int, Call]]:
    """The facts of ``traced``'s outputs and the BatchNorm calls in it.

    Args:
      traced: from :func:`trace`.

    Returns:
      ``(facts, calls)``: a :class:`Fact` per output leaf, and every call by its number.
    """
    walk = _Walk()
    jaxpr = traced.jaxpr.jaxpr
    facts = [Fact(same=i, lineage=i) for i in range(len(jaxpr.invars))]
    outs = walk.jaxpr(jaxpr, facts, 1)
    return outs, walk.calls


def repeats_text(n: int | None) -> str:
    return "an unknown number of times (a while loop)" if n is None else f"{n} time(s)"
