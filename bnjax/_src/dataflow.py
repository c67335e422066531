"""What flows where in a traced step: the walk behind :mod:`bnjax.testing`.

:func:`flow` walks a closed jaxpr (from bnjax/_src/tracing.py), into every nested jaxpr
(``jit``, ``scan``, ``while``, ``cond``, ``checkpoint``, ``custom_jvp``/``custom_vjp``,
``shard_map``, ``pmap``; an equation of any other structure, such as the tuple of jaxprs of
``custom_linear_solve``, as one whose every input may reach every output), and follows,
for every variable, a :class:`Fact`:

* ``reach``: the BatchNorm calls whose new state it depends on, by any computation;
* ``carry``: the calls whose new state it *holds*: passed on unchanged, cast, reshaped,
  selected (``where``, ``cond``) or stacked, but not computed with (a metric computed
  from the new state does not hold it);
* ``same``: the argument leaf it is, unchanged, if any (``stale`` states are these);
* ``lineage``: the argument leaf whose BatchNorm state it descends from, unchanged or
  updated by BatchNorm calls only (the same layer's state after the step).

Every BatchNorm call is found by the marks ``apply`` leaves in the jaxpr
(bnjax/_src/marks.py); each becomes a :class:`Call`. A call is a mark *at a place*: one
traced function reused (a ``jax.jit`` or ``jax.checkpoint`` applied to several layers)
holds one mark that stands for several calls, told apart by the equations around it. A
call recomputed by ``jax.checkpoint`` for the gradient is the same call again (same mark,
same input state) and counts once.

Known limit: a state kept in a mutable ``Ref`` (``jax.new_ref``, NNX variables made with
``ref=True``) is not followed through the writes to it.
"""

from __future__ import annotations

import dataclasses
import functools

from jax.extend import core as jex_core

from bnjax._src.marks import mark_p

# Outputs equal to the inputs, value for value (a reshaped state is still the state).
_IDENTITY = {
    "copy", "device_put", "optimization_barrier", "pvary", "pbroadcast", "stop_gradient",
    "sharding_constraint", "mesh_cast", "reshard", "reshape", "squeeze",
}  # fmt: skip
# Outputs that hold their array inputs' values: cast or copied (the same values) ...
_CAST = {"convert_element_type", "broadcast_in_dim", "transpose"}
# ... or stacked and updated in place.
_STACK = {"concatenate", "dynamic_update_slice", "pad"}


@dataclasses.dataclass(frozen=True)
class Fact:
    """What is known about one variable (see the module docstring)."""

    reach: frozenset = frozenset()
    carry: frozenset = frozenset()
    same: int | None = None
    lineage: int | None = None


def join(a: Fact, b: Fact) -> Fact:
    """The fact about a value that may be either ``a`` or ``b``."""
    return Fact(
        reach=a.reach | b.reach,
        carry=a.carry | b.carry,
        same=a.same if a.same == b.same else None,
        lineage=a.lineage if a.lineage == b.lineage else None,
    )


@dataclasses.dataclass
class Call:
    """One BatchNorm ``apply`` call found in a trace.

    Attributes:
      uid: the call's number in this walk, in the order calls were found.
      call_id: the number of its mark (one per traced ``apply``, shared by the calls of
        a reused trace and by recomputations).
      label: the Flax module path a wrapper gave, or None.
      training, update_stats, steps, accumulator: as marked by ``apply``.
      state_lineage: for each leaf of the state the call read, the argument leaf it
        descends from (None where unknown).
      state_same: for each leaf, the argument leaf it is unchanged, or None.
      repeats: how many times the call runs per step (product of the enclosing scans'
        lengths); None inside a while loop or a ``cond`` branch (at most once per pass).
      line: the user's source line of the call.
    """

    uid: int
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


def _frame(eqn) -> str:
    """The innermost source line outside JAX, Flax and bnjax's own modules."""
    tb = eqn.source_info.traceback
    skip = ("/jax/", "/jaxlib/", "/flax/", "/equinox/", "/bnjax/_src/", "/bnjax/testing/")
    for frame in tb.frames if tb is not None else ():
        name = frame.file_name.replace("\\", "/")
        if not any(part in name for part in skip):
            return f"{frame.file_name}:{frame.line_num}"
    return "unknown line"


def _either(index: Fact, cases) -> list[Fact]:
    """The facts of outputs chosen by ``index`` among ``cases`` (a list of facts each)."""
    joined = [functools.reduce(join, facts) for facts in zip(*cases, strict=True)]
    return [dataclasses.replace(f, reach=f.reach | index.reach) for f in joined]


def _sliced(facts) -> list[Fact]:
    """Slices of (or stacked into) ``facts``: their values held, not the leaves."""
    return [dataclasses.replace(f, same=None) for f in facts]


class _Walk:
    """One walk over a jaxpr: the facts of the outputs and the calls found."""

    def __init__(self):
        self.calls: dict[tuple, Call] = {}  # by place: enclosing equations and the mark
        self.around: list[int] = []  # ids of the equations being walked into

    def jaxpr(self, jaxpr, facts, repeats, within=None):
        self.around.append(id(within))
        env = dict(zip(jaxpr.invars, facts, strict=True))

        def read(v):
            return Fact() if isinstance(v, jex_core.Literal) else env.get(v, Fact())

        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars], repeats)
            env.update(zip(eqn.outvars, outs, strict=True))
        self.around.pop()
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins, repeats):
        name = eqn.primitive.name
        rule = {mark_p.name: self.mark, "scan": self.scan, "while": self.while_}.get(name)
        if rule is not None:
            return rule(eqn, ins, repeats)
        if name == "cond":  # each branch runs at most once
            branches = eqn.params["branches"]
            return _either(ins[0], [self.jaxpr(b.jaxpr, ins[1:], None, eqn) for b in branches])
        if name == "select_n":
            return _either(ins[0], [[f] for f in ins[1:]])
        subs = list(jex_core.jaxprs_in_params(eqn.params))
        n_in, n_out = len(ins), len(eqn.outvars)
        if len(subs) == 1 and (len(subs[0].invars), len(subs[0].outvars)) == (n_in, n_out):
            # a call: jit, checkpoint, custom_jvp/vjp, shard_map, pmap, ...
            return self.jaxpr(subs[0], ins, repeats, eqn)
        reach = frozenset().union(*(f.reach for f in ins))
        for s in subs:  # unknown structure: every input may reach every output
            got = self.jaxpr(s, [Fact(reach=reach)] * len(s.invars), repeats, eqn)
            reach = reach.union(*(f.reach for f in got))
        if name in _IDENTITY and n_in == n_out:
            return list(ins)
        if name in _CAST or name in _STACK:
            carry = frozenset().union(*(f.carry for f in ins))
            lineage = ins[0].lineage if name in _CAST else None
            return [Fact(reach=reach, carry=carry, lineage=lineage) for _ in eqn.outvars]
        return [Fact(reach=reach) for _ in eqn.outvars]

    def mark(self, eqn, ins, repeats):
        p = eqn.params
        around = tuple(self.around)
        if p["role"] == "call":
            marked = {k: v for k, v in p.items() if k != "role"}  # the rest are Call's fields
            new = Call(uid=len(self.calls), state_lineage=(), state_same=(), repeats=repeats,
                       line=_frame(eqn), **marked)  # fmt: skip
            call = self.calls.setdefault((around, id(eqn)), new)
            # Only a loop body is walked again (with wider facts): the last walk's facts.
            call.state_lineage = tuple(f.lineage for f in ins[1:])  # ins: y, then the state
            call.state_same = tuple(f.same for f in ins[1:])
            return list(ins)
        # The call of this mark beside it, else (not beside its call mark) the latest one.
        same_mark = {place: c for place, c in self.calls.items() if c.call_id == p["call_id"]}
        beside = [c for (where, _), c in same_mark.items() if where == around]
        call = max(beside or same_mark.values(), key=lambda c: c.uid, default=None)
        uid, lineage = (-1, ()) if call is None else (call.uid, call.state_lineage)
        return [
            Fact(reach=f.reach | {uid}, carry=f.carry | {uid},
                 lineage=lineage[i] if i < len(lineage) else None)
            for i, f in enumerate(ins)
        ]  # fmt: skip

    def scan(self, eqn, ins, repeats):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        inner = None if repeats is None else repeats * int(p["length"])
        consts, carry, xs = ins[:nc], ins[nc : nc + nk], _sliced(ins[nc + nk :])
        return self._loop(p["jaxpr"].jaxpr, lambda c: consts + c + xs, carry, inner, eqn)

    def while_(self, eqn, ins, _):  # repeats: None, the number of passes is unknown
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        bconsts, carry = ins[cn : cn + bn], ins[cn + bn :]
        outs = self._loop(p["body_jaxpr"].jaxpr, lambda c: bconsts + c, carry, None, eqn)
        cond = p["cond_jaxpr"].jaxpr
        self.jaxpr(cond, [Fact()] * len(cond.invars), None, eqn)
        return outs

    def _loop(self, body, inputs, carry, repeats, eqn):
        """The body walked to a fixed point of its carry: the joined carry, then the last
        walk's other outputs (a scan's stacked ys). Each round can only widen a fact, and a
        chain through the carries is at most ``len(carry)`` long, so ``len(carry) + 2``
        rounds suffice."""
        nk = len(carry)
        for _ in range(nk + 2):
            outs = self.jaxpr(body, inputs(carry), repeats, eqn)
            new = [join(c, o) for c, o in zip(carry, outs[:nk], strict=True)]
            if new == carry:
                break
            carry = new
        return carry + _sliced(outs[nk:])


def flow(jaxpr) -> tuple[list[Fact], list[Call], dict[int, int]]:
    """The facts of ``jaxpr``'s outputs, the BatchNorm calls in it, and their aliases.

    Args:
      jaxpr: a closed jaxpr whose inputs are the step's argument leaves, in order.

    Returns:
      ``(facts, calls, alias)``: a :class:`Fact` per output leaf; the calls in the order
      found, a call recomputed by ``jax.checkpoint`` (same mark, same input state) listed
      once; and ``alias``, mapping the number of every call found, recomputations
      included, to the number of the call it is (use it on ``reach`` and ``carry``).
    """
    walk = _Walk()
    outs = walk.jaxpr(jaxpr.jaxpr, [Fact(same=i, lineage=i) for i in range(len(jaxpr.in_avals))], 1)
    first: dict[tuple, int] = {}  # (mark, input state) -> the first call's number
    found = walk.calls.values()  # in the order found
    alias = {c.uid: first.setdefault((c.call_id, c.state_lineage), c.uid) for c in found}
    return outs, [c for c in found if alias[c.uid] == c.uid], alias
