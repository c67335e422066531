"""bnjax.testing.audit, check_train_step and check_eval_step against broken steps.

Each broken step has a correct twin: audit must report exactly the broken ones, with the
right kind and where, and check_train_step/check_eval_step must raise on the broken ones
and pass the correct ones.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx
from bnjax._src import dataflow, marks
from bnjax._src.marks import mark_p
from bnjax.testing import audit, check_eval_step, check_train_step
from bnjax.training import TrainState, make_eval_step, make_train_step

BN = bnjax.BatchNorm()
PARAMS, STATE = BN.init((8, 3))
X = jnp.arange(24.0).reshape(8, 3) ** 1.5
XS = jnp.stack([X + i for i in range(4)])  # 4 batches


def kinds(found):
    return [(f.kind, f.where) for f in found]


def _loss_and_state(params, state, x, *, training=True, update_stats=None):
    def loss(p):
        y, new = BN.apply(p, state, x, training=training, update_stats=update_stats)
        return jnp.sum(y**2), new

    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, new


# -- core steps: (broken, correct) -------------------------------------------------------


def dropped_step(params, state, x):
    def loss(p):
        y, _ = BN.apply(p, state, x, training=True)  # the new state is dropped
        return jnp.sum(y**2)

    return jax.grad(loss)(params)


def core_step(params, state, x):
    _, grads, new = _loss_and_state(params, state, x)
    return grads, new


def stale_step(params, state, x):
    _, grads, _ = _loss_and_state(params, state, x)
    return grads, state  # the state it was given


def stuck_step(params, state, x):
    _, grads, new = _loss_and_state(params, state, x, training=False)
    return grads, new


def eval_step_updating(params, state, x):
    y, new = BN.apply(params, state, x, training=False, update_stats=True)
    return jnp.mean(y), new


def eval_step(params, state, x):
    y, new = BN.apply(params, state, x, training=False)
    return jnp.mean(y), new


def eval_step_training(params, state, x):
    y, _ = BN.apply(params, state, x, training=True, update_stats=False)
    return jnp.mean(y), state


def scan_step_broken(params, state, xs):
    def body(s, x):
        _, _, _ = _loss_and_state(params, s, x)
        return s, None  # the carry is never updated

    return jax.lax.scan(body, state, xs)[0]


def scan_step(params, state, xs):
    def body(s, x):
        _, _, new = _loss_and_state(params, s, x)
        return new, None

    return jax.lax.scan(body, state, xs)[0]


# An ensemble of 2 members, one step for all of them under vmap.
ENSEMBLE = jax.tree.map(lambda a: jnp.stack([a, a]), (PARAMS, STATE))


def vmap_step_broken(params, state, xs):
    return jax.vmap(dropped_step)(params, state, xs)


def vmap_step(params, state, xs):
    return jax.vmap(core_step)(params, state, xs)


def checkpoint_step_broken(params, state, x):
    return jax.checkpoint(dropped_step)(params, state, x)


def checkpoint_step(params, state, x):
    return jax.checkpoint(core_step)(params, state, x)


def jit_step_broken(params, state, x):
    return jax.jit(dropped_step)(params, state, x)


def jit_step(params, state, x):
    return jax.jit(core_step)(params, state, x)


CORE_TRAIN = [
    ("dropped", dropped_step, core_step, X, "discarded_update"),
    ("stale", stale_step, core_step, X, "stale_state"),
    ("scan", scan_step_broken, scan_step, XS, "stale_state"),
    ("checkpoint", checkpoint_step_broken, checkpoint_step, X, "discarded_update"),
    ("jit", jit_step_broken, jit_step, X, "discarded_update"),
]


@pytest.mark.parametrize(("name", "broken", "fixed", "x", "kind"), CORE_TRAIN,
                         ids=[c[0] for c in CORE_TRAIN])  # fmt: skip
def test_core_train_steps(name, broken, fixed, x, kind):
    assert kinds(audit(broken, PARAMS, STATE, x, expect="train")) == [(kind, "state")]
    assert audit(fixed, PARAMS, STATE, x, expect="train") == []
    with pytest.raises(AssertionError, match="state"):
        check_train_step(broken, PARAMS, STATE, x)
    check_train_step(fixed, PARAMS, STATE, x)


@pytest.mark.slow
def test_vmap_ensemble_step():
    params, state = ENSEMBLE
    xs = jnp.stack([X, X + 1])
    assert kinds(audit(vmap_step_broken, params, state, xs)) == [("discarded_update", "state")]
    assert audit(vmap_step, params, state, xs, expect="train") == []
    with pytest.raises(AssertionError, match="not among the step's outputs"):
        check_train_step(vmap_step_broken, params, state, xs)
    check_train_step(vmap_step, params, state, xs)


def test_stuck_training_flag():
    found = audit(stuck_step, PARAMS, STATE, X, expect="train")
    assert kinds(found) == [("no_training_call", "state")]
    assert "training=False" in str(found[0])
    assert audit(stuck_step, PARAMS, STATE, X) == []  # no expectation, nothing lost
    with pytest.raises(AssertionError, match="stuck at False"):
        check_train_step(stuck_step, PARAMS, STATE, X)


@pytest.mark.slow
def test_eval_steps():
    assert kinds(audit(eval_step_updating, PARAMS, STATE, X, expect="eval")) == [
        ("eval_updates_state", "state")
    ]
    assert kinds(audit(eval_step_training, PARAMS, STATE, X, expect="eval")) == [
        ("training_in_eval", "state")
    ]
    assert audit(eval_step, PARAMS, STATE, X, expect="eval") == []
    with pytest.raises(AssertionError, match="changed in an evaluation step"):
        check_eval_step(eval_step_updating, PARAMS, STATE, X)
    with pytest.raises(AssertionError, match="training=True"):
        check_eval_step(eval_step_training, PARAMS, STATE, X)
    check_eval_step(eval_step, PARAMS, STATE, X)


@pytest.mark.slow
def test_counts_multiple_batches_exactly():
    """A scan over 4 batches must advance the count by 4; ghost chunks count each."""
    check_train_step(scan_step, PARAMS, STATE, XS)
    ghost = bnjax.BatchNorm(virtual_batch_size=2)

    def ghost_step(params, state, x):
        return ghost.apply(params, state, x, training=True)

    check_train_step(ghost_step, PARAMS, STATE, X)

    def reset_count(params, state, x):  # returns the new statistics with a wrong count
        y, new = BN.apply(params, state, x, training=True)
        return y, new._replace(count=new.count + 1)

    with pytest.raises(AssertionError, match="count is not among the step's outputs"):
        check_train_step(reset_count, PARAMS, STATE, X)


def test_audit_runs_nothing():
    """Shapes are enough, and a host callback in the step is never called."""
    called = []

    def step(params, state, x):
        jax.debug.callback(lambda: called.append(1))
        return dropped_step(params, state, x)

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (PARAMS, STATE, X))
    assert kinds(audit(step, *shapes)) == [("discarded_update", "state")]
    assert called == []
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
        check_train_step(step, *shapes)


def fori_step_broken(params, state, xs, n):
    def body(i, s):
        _loss_and_state(params, s, xs[i])
        return s  # the carry is never updated

    return jax.lax.fori_loop(0, n, body, state)


def fori_step(params, state, xs, n):
    def body(i, s):
        return _loss_and_state(params, s, xs[i])[2]

    return jax.lax.fori_loop(0, n, body, state)


def fori_step_every_other(params, state, xs, n):
    def body(i, s):  # the even batches only: the update is kept on one path
        new = _loss_and_state(params, s, xs[i])[2]
        return jax.lax.cond(i % 2 == 0, lambda: new, lambda: s)

    return jax.lax.fori_loop(0, n, body, state)


@pytest.mark.slow
def test_while_loop_steps():
    """A trip count known only at run time makes a while loop, walked to a fixed point."""
    n = jnp.int32(3)
    assert kinds(audit(fori_step_broken, PARAMS, STATE, XS, n, expect="train")) == [
        ("stale_state", "state")
    ]
    assert audit(fori_step, PARAMS, STATE, XS, n, expect="train") == []
    assert audit(fori_step_every_other, PARAMS, STATE, XS, n, expect="train") == []
    with pytest.raises(AssertionError, match=r"count advanced by \[0\]; expected at least 1"):
        check_train_step(fori_step_broken, PARAMS, STATE, XS, n)
    check_train_step(fori_step, PARAMS, STATE, XS, n)  # a count of n in a while: at least 1
    check_train_step(fori_step, PARAMS, STATE, XS, jnp.int32(1))
    check_train_step(fori_step_every_other, PARAMS, STATE, XS, n)


def test_old_state_from_both_branches_of_a_cond_is_stale():
    def step(params, state, x, flag):
        _loss_and_state(params, state, x)
        return jax.lax.cond(flag, lambda: state, lambda: state)

    assert kinds(audit(step, PARAMS, STATE, X, True)) == [("stale_state", "state")]


def test_a_call_inside_a_linear_solve_cannot_keep_its_update():
    """Inside a primitive of unknown structure (a linear solve's four jaxprs), calls are
    still found, and nothing they compute is taken as held by the outputs."""

    def step(params, state, x):
        def matvec(v):
            return BN.apply(params, state, v, training=True)[0]

        return jax.lax.custom_linear_solve(matvec, x, lambda mv, b: b)

    (found,) = audit(step, PARAMS, STATE, X, expect="train")
    assert found.kind == "discarded_update"
    # Which argument the state came from is lost in there: the call's line says where.
    line = inspect.getsourcelines(step)[1] + 2
    assert found.where == f"{__file__}:{line}"


def test_join_keeps_what_both_values_agree_on():
    a = dataflow.Fact(reach=frozenset({0}), carry=frozenset({0}), same=2, lineage=2)
    b = dataflow.Fact(reach=frozenset({1}), same=3, lineage=2)
    assert dataflow.join(a, a) == a
    assert dataflow.join(a, b) == dataflow.Fact(
        reach=frozenset({0, 1}), carry=frozenset({0}), same=None, lineage=2
    )


def test_update_mark_away_from_its_call_mark():
    """A transform could leave a call's update mark in another equation than its call
    mark; it is then tied to the latest call of the same mark. An update mark whose call
    mark is gone altogether is tied to no call."""

    def step(params, state, x, keep=True):
        call_id = marks.new_call_id()

        def call(x, state):
            return marks.mark_call(x, state, call_id=call_id, training=True,
                                   update_stats=True, steps=1)  # fmt: skip

        y = jax.jit(call)(x, state)
        new = marks.mark_update(state._replace(count=state.count + 1), call_id=call_id)
        return y, (new if keep else state)

    assert audit(step, PARAMS, STATE, X) == []
    assert kinds(audit(functools.partial(step, keep=False), PARAMS, STATE, X)) == [
        ("stale_state", "state")
    ]

    def orphan(params, state, x):
        return marks.mark_update(state, call_id=marks.new_call_id())

    assert audit(orphan, PARAMS, STATE, X, expect="eval") == []


@pytest.mark.slow
def test_two_updates_from_one_state_count_both():
    """Two views of a batch each update from the same state; returning the second loses
    the first update: the count must advance by 2."""

    def step(params, state, x):
        first = _loss_and_state(params, state, x)[2]
        second = _loss_and_state(params, state, 2 * x[::-1])[2]
        return first, second

    def one_view_lost(params, state, x):
        return step(params, state, x)[1]

    def chained(params, state, x):
        first = _loss_and_state(params, state, x)[2]
        return _loss_and_state(params, first, 2 * x[::-1])[2]

    found = audit(one_view_lost, PARAMS, STATE, X, expect="train")
    assert [f.kind for f in found] == ["discarded_update"]
    with pytest.raises(AssertionError, match=r"count advanced by \[1\]; expected 2"):
        check_train_step(one_view_lost, PARAMS, STATE, X)
    check_train_step(chained, PARAMS, STATE, X)


def test_an_empty_batch_folds_nothing_in():
    assert audit(core_step, PARAMS, STATE, X[:0], expect="train") == []
    assert audit(stale_step, PARAMS, STATE, X[:0], expect="train") == []  # nothing to keep
    check_train_step(core_step, PARAMS, STATE, X[:0])


def test_a_state_made_inside_the_step_cannot_be_checked():
    def step(params, x):
        _, state = BN.init(x.shape)  # not from the arguments
        return _loss_and_state(params, state, x)[2]

    with pytest.raises(AssertionError, match="does not come from the step's arguments"):
        check_train_step(step, PARAMS, X)


def test_nan_statistics_equal_themselves():
    """A diverged model's NaN statistics returned as they were are unchanged ones."""
    nan_state = STATE._replace(mean=jnp.full_like(STATE.mean, jnp.nan))
    check_eval_step(eval_step, PARAMS, nan_state, X)
    variables = {
        "params": VARIABLES["params"],
        "batch_stats": jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), VARIABLES["batch_stats"]),
    }

    def linen_stale(variables, x):  # no count in linen's state: the values must change
        y, _ = NET.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y), variables["batch_stats"]

    with pytest.raises(AssertionError, match="the ones it was given, unchanged"):
        check_train_step(linen_stale, variables, X)


def test_numpy_arguments_are_traced_not_run():
    np_args = jax.tree.map(np.asarray, (PARAMS, STATE, X))
    assert kinds(audit(stale_step, *np_args)) == [("stale_state", "state")]


def test_findings_are_frozen_and_hashable():
    """Findings can go in sets and dict keys, and nobody edits one by accident."""
    (found,) = audit(dropped_step, PARAMS, STATE, X)
    assert {found, found} == {found}
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.kind = "stale_state"


def test_train_step_without_any_batchnorm_call():
    def step(params, state, x):  # forgot the layer altogether
        return jnp.sum(x), state

    found = audit(step, PARAMS, STATE, X, expect="train")
    assert kinds(found) == [("no_training_call", "step")]
    assert "no bnjax BatchNorm call was found" in found[0].message
    assert audit(step, PARAMS, STATE, X) == []  # no expectation: nothing to say


class _NoSignature:
    """A step whose signature inspect cannot read: arguments are named by position."""

    __signature__ = "not a signature"

    def __call__(self, params, state, x):
        return stale_step(params, state, x)


def test_step_without_a_signature_names_arguments_by_position():
    with pytest.raises(TypeError):
        inspect.signature(_NoSignature())
    assert kinds(audit(_NoSignature(), PARAMS, STATE, X)) == [("stale_state", "args[1]")]


@pytest.mark.slow
def test_audit_needs_no_flax():
    """A core-only step is audited in a process that never imports Flax."""
    code = (
        "import sys, jax.numpy as jnp, bnjax\n"
        "from bnjax.testing import audit\n"
        "bn = bnjax.BatchNorm(); p, s = bn.init((4, 2))\n"
        "def step(p, s, x):\n"
        "    return bn.apply(p, s, x, training=True)[0]\n"
        "found = audit(step, p, s, jnp.ones((4, 2)))\n"
        "print([(f.kind, f.where) for f in found], 'flax' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.split("\n")[0] == "[('discarded_update', 's')] False", out.stderr


def test_where_names_nested_states_and_keywords():
    states = {"block1": STATE, "block2": STATE}

    def step(params, states, *, x):
        y, new1 = BN.apply(params, states["block1"], x, training=True)
        _, new2 = BN.apply(params, states["block2"], y, training=True)
        del new2
        return {"block1": new1, "block2": states["block2"]}

    found = audit(step, PARAMS, states, x=X)
    assert kinds(found) == [("stale_state", "states['block2']")]
    assert "returns output['block2'], the state it was given" in found[0].message


def test_state_made_inside_is_named_by_its_line():
    def step(x):
        params, state = BN.init(x)
        y, _ = BN.apply(params, state, x, training=True)
        return y

    (found,) = audit(step, X)
    assert found.kind == "discarded_update"
    assert found.where.startswith(__file__) and found.where[len(__file__) :].startswith(":")


def test_no_batchnorm_at_all():
    (found,) = audit(lambda x: x * 2, X, expect="train")
    assert found.kind == "no_training_call" and "no bnjax BatchNorm" in found.message
    with pytest.raises(AssertionError, match="no bnjax BatchNorm"):
        check_train_step(lambda x: x * 2, X)


def test_bad_arguments():
    with pytest.raises(ValueError, match="expect must be None, 'train' or 'eval'; got 'training'"):
        audit(core_step, PARAMS, STATE, X, expect="training")
    with pytest.raises(TypeError, match="fn must be callable"):
        audit(3, X)
    with pytest.raises(TypeError, match="step must be callable"):
        check_train_step(None, X)


def test_finding_is_readable():
    (found,) = audit(dropped_step, PARAMS, STATE, X)
    assert str(found).startswith("discarded_update at state: ")
    assert "UPDATE_OPS" in str(found)


# -- TrainState and the training helpers ---------------------------------------------


def _model_apply(params, bn_state, x, *, training):
    return BN.apply(params, bn_state, x, training=training)


def _loss(outputs, batch):
    return jnp.mean(outputs**2)


@pytest.mark.slow
def test_train_state_steps():
    state = TrainState.create(PARAMS, STATE, optax.sgd(0.1))
    train = jax.jit(make_train_step(_model_apply, _loss, optax.sgd(0.1)))
    batch = {"x": X}
    assert audit(train, state, batch, expect="train") == []
    check_train_step(train, state, batch)

    def forgetful(state, batch):  # the classic: the new bn_state is thrown away
        new, metrics = train(state, batch)
        return new._replace(bn_state=state.bn_state), metrics

    assert kinds(audit(forgetful, state, batch)) == [("stale_state", "state.bn_state")]
    with pytest.raises(AssertionError, match=r"state\.bn_state: count advanced by \[0\]"):
        check_train_step(forgetful, state, batch)
    evaluate = make_eval_step(_model_apply, _loss)
    assert audit(evaluate, state, batch, expect="eval") == []
    check_eval_step(evaluate, state, batch)


# -- Flax linen ------------------------------------------------------------------------


class ThreeLayers(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        for _ in range(3):
            x = nn.Dense(4)(x)
            x = bnjax.linen.BatchNorm(use_running_average=not train)(x)
        return x


NET = ThreeLayers()
VARIABLES = NET.init(jax.random.key(0), X, train=False)


def linen_step(variables, x):
    y, updates = NET.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y), updates["batch_stats"]


def linen_step_losing_one(variables, x):
    y, updates = NET.apply(variables, x, train=True, mutable=["batch_stats"])
    stats = dict(updates["batch_stats"])
    del stats["BatchNorm_1"]  # one layer of three discarded
    return jnp.sum(y), stats


def linen_eval_training(variables, x):
    return NET.apply(variables, x, train=True, mutable=["batch_stats"])[0]


@pytest.mark.slow
def test_linen_one_layer_of_three():
    assert audit(linen_step, VARIABLES, X, expect="train") == []
    found = audit(linen_step_losing_one, VARIABLES, X, expect="train")
    assert kinds(found) == [("discarded_update", "BatchNorm_1")]
    with pytest.raises(AssertionError) as err:
        check_train_step(linen_step_losing_one, VARIABLES, X)
    assert "BatchNorm_1" in str(err.value) and "BatchNorm_0" not in str(err.value)
    check_train_step(linen_step, VARIABLES, X)


@pytest.mark.slow
def test_linen_eval_and_nn_scan():
    found = audit(linen_eval_training, VARIABLES, X, expect="eval")
    assert [f.kind for f in found] == ["training_in_eval"] * 3

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return bnjax.linen.BatchNorm(use_running_average=False)(x), None

    scanned = nn.scan(Body, variable_axes={"batch_stats": 0, "params": 0},
                      split_rngs={"params": True}, length=3)()  # fmt: skip
    variables = scanned.init(jax.random.key(0), X, None)

    def step(variables, x, keep):
        (y, _), updates = scanned.apply(variables, x, None, mutable=["batch_stats"])
        return (y, updates) if keep else y

    assert audit(step, variables, X, True) == []
    assert kinds(audit(step, variables, X, False)) == [("discarded_update", "BatchNorm_0")]


# -- Flax NNX --------------------------------------------------------------------------


class Small(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
        self.bn = bnjax.nnx.BatchNorm(4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.bn(self.dense(x))


@nnx.jit
def nnx_train_step(model, x):
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)


@pytest.mark.slow
def test_nnx_train_never_called():
    model = Small()
    assert audit(nnx_train_step, model, X, expect="train") == []
    check_train_step(nnx_train_step, model, X)
    model.eval()  # evaluated, and .train() never called again
    assert kinds(audit(nnx_train_step, model, X, expect="train")) == [
        ("no_training_call", "model.bn")
    ]
    with pytest.raises(AssertionError, match=r"model\.bn: ran only with training=False"):
        check_train_step(nnx_train_step, model, X)
    before = jax.tree.map(np.asarray, nnx.state(model))
    check_eval_step(nnx.jit(lambda m, x: m(x)), model, X)
    # the checks run on copies: the module itself is unchanged
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))


def test_nnx_functional_step_dropping_the_state():
    graphdef, state = nnx.split(Small())

    @jax.jit
    def step(state, x):
        model = nnx.merge(graphdef, state)
        return model(x)  # nnx.state(model) not returned

    @jax.jit
    def fixed(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    assert kinds(audit(step, state, X)) == [("discarded_update", "state['bn']")]
    assert audit(fixed, state, X) == []
    check_train_step(fixed, state, X)


# -- shard_map ---------------------------------------------------------------------------


@pytest.mark.slow
def test_shard_map_step():
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    bn = bnjax.BatchNorm(axis_name="data")

    def inner(params, state, x, keep):
        y, new = bn.apply(params, state, x, training=True)
        total = jax.lax.psum(jnp.sum(y), "data")
        return (total, new) if keep else total

    def step(params, state, x, keep):
        out_specs = (P(), P()) if keep else P()
        f = jax.shard_map(lambda p, s, x: inner(p, s, x, keep), mesh=mesh,
                          in_specs=(P(), P(), P("data")), out_specs=out_specs,
                          check_vma=True)  # fmt: skip
        return f(params, state, x)

    assert audit(step, PARAMS, STATE, X, True) == []
    assert kinds(audit(step, PARAMS, STATE, X, False)) == [("discarded_update", "state")]
    check_train_step(step, PARAMS, STATE, X, True)


# -- the marks ---------------------------------------------------------------------------


@pytest.mark.slow
def test_marks_cost_nothing():
    """A mark lowers to no operation at all, and apply's program carries none."""
    alone = jax.jit(lambda x: mark_p.bind(x, **MARK)[0]).lower(X).as_text()
    assert "stablehlo." not in alone and "return %arg0" in alone
    fn = jax.jit(lambda p, s, x: BN.apply(p, s, x, training=True))
    assert "bnjax_mark" not in fn.lower(PARAMS, STATE, X).as_text()
    gpu = jax.export.export(fn, platforms=["cuda"])(PARAMS, STATE, X)
    assert "bnjax_mark" not in gpu.mlir_module()
    y, new = fn(PARAMS, STATE, X)
    ref_y, _ = BN.apply(PARAMS, STATE, X, training=True)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
    assert int(new.count) == 1


MARK = dict(role="call", call_id=-1, label=None, training=True, update_stats=True, steps=1,
            accumulator=False)  # fmt: skip


# -- cases found in review: one test each ----------------------------------------------


@pytest.mark.slow
def test_one_jitted_layer_reused_on_two_states():
    """A jax.jit (or jax.checkpoint) applied to two layers holds one mark for two calls."""
    layer = jax.jit(lambda p, s, x: BN.apply(p, s, x, training=True))

    def step(params, s1, s2, x, keep_both):
        y, n1 = layer(params, s1, x)
        _, n2 = layer(params, s2, y)
        return (n1, n2) if keep_both else (s1, n2)

    assert audit(step, PARAMS, STATE, STATE, X, True) == []
    assert kinds(audit(step, PARAMS, STATE, STATE, X, False)) == [("stale_state", "s1")]
    check_train_step(step, PARAMS, STATE, STATE, X, True)
    with pytest.raises(AssertionError, match=r"s1: count advanced by \[0\]"):
        check_train_step(step, PARAMS, STATE, STATE, X, False)


def test_a_metric_of_the_new_state_does_not_keep_it():
    def step(params, state, x):
        y, new = BN.apply(params, state, x, training=True)
        return {"loss": jnp.mean(y), "running_var": jnp.mean(new.var)}, state

    assert kinds(audit(step, PARAMS, STATE, X)) == [("stale_state", "state")]

    def unary_metrics(params, state, x):  # one operand, one result, yet not the state
        y, new = BN.apply(params, state, x, training=True)
        return {"max_var": jnp.max(new.var), "std": jnp.sqrt(new.var)}

    assert kinds(audit(unary_metrics, PARAMS, STATE, X)) == [("discarded_update", "state")]


def test_a_reshaped_state_is_kept():
    def step(params, state, x, new_state=True):
        y, new = BN.apply(params, state, x, training=True)
        return jax.tree.map(lambda a: a.reshape(1, -1), new if new_state else state)

    assert audit(step, PARAMS, STATE, X, expect="train") == []
    assert kinds(audit(functools.partial(step, new_state=False), PARAMS, STATE, X)) == [
        ("stale_state", "state")
    ]


@pytest.mark.slow
def test_a_state_chosen_by_where_or_cond_is_kept():
    def skip_bad_steps(params, state, x):  # keep the old state when the loss is not finite
        y, new = BN.apply(params, state, x, training=True)
        ok = jnp.isfinite(jnp.sum(y))
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)

    def two_branches(params, state, x, flag):
        def branch(scale):
            return lambda s: BN.apply(params, s, scale * x, training=True)[1]

        return jax.lax.cond(flag, branch(1.0), branch(2.0), state)

    for step, args in ((skip_bad_steps, ()), (two_branches, (jnp.asarray(True),))):
        assert audit(step, PARAMS, STATE, X, *args, expect="train") == []
        check_train_step(step, PARAMS, STATE, X, *args)  # one branch runs: count + 1


@pytest.mark.slow
def test_recomputation_under_checkpoint_counts_once():
    def step(params, state, x):
        def fwd(p):
            y, new = BN.apply(p, state, x, training=True)
            return jnp.sum(y**2), new

        (_, new), grads = jax.value_and_grad(jax.checkpoint(fwd), has_aux=True)(params)
        return grads, new

    assert audit(step, PARAMS, STATE, X, expect="train") == []
    check_train_step(step, PARAMS, STATE, X)


@pytest.mark.slow
def test_pmap_step_returning_the_old_state():
    def step(params, state, x, keep):
        def inner(x):
            _, new = bnjax.BatchNorm(axis_name="d").apply(params, state, x, training=True)
            return new if keep else state

        return jax.pmap(inner, axis_name="d")(x)

    xs = jnp.stack([X, X + 1])
    check_train_step(step, PARAMS, STATE, xs, True)
    with pytest.raises(AssertionError, match="state"):
        check_train_step(step, PARAMS, STATE, xs, False)


@pytest.mark.slow
def test_marks_transpose_in_a_linear_map():
    """Inference is linear in x, so jax.linear_transpose goes through the call mark on y."""
    state = STATE._replace(mean=jnp.asarray([1.0, 2.0, 3.0]), var=jnp.asarray([4.0, 1.0, 9.0]))
    params = PARAMS._replace(bias=jnp.zeros(3))

    def linear(x):
        return BN.apply(params, state, x, training=False)[0] + (
            state.mean / jnp.sqrt(state.var + 1e-5)
        )

    (ct,) = jax.linear_transpose(linear, X)(jnp.ones_like(X))
    np.testing.assert_allclose(ct, jnp.ones_like(X) / jnp.sqrt(state.var + 1e-5), rtol=1e-6)


def test_count_is_checked_from_where_it_started():
    """A state that has seen 3 batches comes back at 4: the advance is 1."""
    _, state = BN.apply(PARAMS, STATE, X, training=True)
    state = state._replace(count=jnp.asarray(3, jnp.int32))
    check_train_step(core_step, PARAMS, state, X)


# -- Equinox ---------------------------------------------------------------------------


def test_equinox_ema_train_step_counts_one_batch_per_call():
    """bnjax.equinox's mode="ema" folds each batch in once (one training call; its output
    after the first batch is an inference pass on the new state, which folds nothing in):
    a correct step advances the count by 1, at the first batch and after it."""
    eqx = pytest.importorskip("equinox")
    import bnjax.equinox  # noqa: PLC0415 (Equinox is optional here)

    class Net(eqx.Module):
        linear: eqx.nn.Linear
        norm: bnjax.equinox.BatchNorm

        def __init__(self, key):
            self.linear = eqx.nn.Linear(3, 4, key=key)
            self.norm = bnjax.equinox.BatchNorm(4, "batch", momentum=0.9, mode="ema")

        def __call__(self, x, state):
            return self.norm(self.linear(x), state)

    def batched(model):
        return eqx.filter_vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))

    @eqx.filter_jit
    def step(model, state, x):
        def loss(model):
            y, new = batched(model)(x, state)
            return jnp.sum(y**2), new

        (_, new), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        return grads, new

    @eqx.filter_jit
    def forgetful(model, state, x):
        return step(model, state, x)[0], state

    model, state = eqx.nn.make_with_state(Net)(jax.random.key(0, impl="rbg"))
    check_train_step(lambda m, s, x: batched(m)(x, s), model, state, X)  # no gradient
    check_train_step(step, model, state, X)  # the first batch, taken whole
    _, later = step(model, state, X)
    check_train_step(step, model, later, X + 1)
    assert audit(step, model, later, X, expect="train") == []
    with pytest.raises(AssertionError, match="norm"):
        check_train_step(forgetful, model, later, X)
