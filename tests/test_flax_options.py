"""Every bnjax option reaches the core through both Flax wrappers.

For each option, three training steps through ``bnjax.linen.BatchNorm`` and through
``bnjax.nnx.BatchNorm`` give the outputs and statistics of ``bnjax.BatchNorm`` with the
same settings, and those differ from the defaults' (so a wrapper that dropped the option
would fail). NNX's ``update_stats`` is checked on its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.linen as bl
import bnjax.nnx as bx

C = 3
RNG = np.random.default_rng(21)
BATCHES = [jnp.asarray(RNG.normal(0.5 + i, 1.5, (8, C)), jnp.float32) for i in range(3)]

OPTIONS = {
    "averaging_debiased": {"averaging": "debiased"},
    "averaging_cumulative": {"averaging": "cumulative"},
    "running_var_unbiased": {"running_var": "unbiased"},
    "renorm": {"renorm": bnjax.Renorm(rmax=1.2, dmax=0.1)},
    "renorm_ramp": {"renorm": bnjax.Renorm(ramp_start=1, ramp_steps=2)},
    "renorm_ramp_steps": {"renorm": bnjax.Renorm(ramp_steps=4)},
    "virtual_batch_size": {"virtual_batch_size": 4},
}


def _core(options):
    bn = bnjax.BatchNorm(momentum=0.9, **options)
    params, state = bn.init(BATCHES[0])
    ys = []
    for x in BATCHES:
        y, state = bn.apply(params, state, x, training=True)
        ys.append(y)
    return ys, state


def _linen(options):
    bn = bl.BatchNorm(use_running_average=False, momentum=0.9, **options)
    variables = bn.init(jax.random.key(0), BATCHES[0])
    step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
    ys = []
    for x in BATCHES:
        y, updates = step(variables, x)
        variables = {**variables, **updates}
        ys.append(y)
    return ys, variables["batch_stats"]


def _nnx(options):
    bn = bx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0), **options)
    ys = [bn(x) for x in BATCHES]
    return ys, {"mean": bn.mean[...], "var": bn.var[...]}


def _assert_same(ys, stats, want_ys, want_state, tol=1e-6):
    for y, want in zip(ys, want_ys, strict=True):
        np.testing.assert_allclose(y, want, atol=tol)
    np.testing.assert_allclose(stats["mean"], want_state.mean, atol=tol)
    np.testing.assert_allclose(stats["var"], want_state.var, atol=tol)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("wrapper", ["linen", "nnx"])
def test_option_changes_the_numbers_as_in_the_core(wrapper, name):
    options = OPTIONS[name]
    want_ys, want_state = _core(options)
    default_ys, default_state = _core({})
    changed = not np.allclose(want_ys[-1], default_ys[-1], atol=1e-4) or not np.allclose(
        want_state.var, default_state.var, atol=1e-4
    )
    assert changed, f"{name} does not change the core's numbers: the test would be blind"
    ys, stats = (_linen if wrapper == "linen" else _nnx)(options)
    _assert_same(ys, stats, want_ys, want_state)


@pytest.mark.parametrize("wrapper", ["linen", "nnx"])
def test_statistics_option_reaches_the_core(wrapper):
    """Both paths give the same numbers, so the choice is checked in the lowered program:
    the checked path has a conditional, the branchless one none."""
    from test_lowering import conditionals

    counts = {}
    for statistics in ("checked", "branchless"):
        if wrapper == "linen":
            bn = bl.BatchNorm(use_running_average=False, statistics=statistics)
            variables = bn.init(jax.random.key(0), BATCHES[0])

            def fn(v, x, bn=bn):
                return bn.apply(v, x, mutable=["batch_stats"])

            counts[statistics] = conditionals(fn, variables, BATCHES[0], platform="cpu")
        else:
            bn = bx.BatchNorm(C, statistics=statistics, rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(bn)

            def fn(state, x, graphdef=graphdef):
                model = nnx.merge(graphdef, state)
                return model(x), nnx.state(model)

            counts[statistics] = conditionals(fn, state, BATCHES[0], platform="cpu")
    assert counts == {"checked": 1, "branchless": 0}


def test_nnx_update_stats_is_honoured():
    x = BATCHES[0]
    bn = bx.BatchNorm(C, momentum=0.0, rngs=nnx.Rngs(0))
    before = (bn.mean[...], bn.var[...])
    y = bn(x, update_stats=False)  # batch statistics, state kept
    np.testing.assert_array_equal(bn.mean[...], before[0])
    np.testing.assert_array_equal(bn.var[...], before[1])
    core = bnjax.BatchNorm(momentum=0.0)
    params, state = core.init(x)
    want, _ = core.apply(params, state, x, training=True)
    np.testing.assert_allclose(y, want, atol=1e-6)
    # Running statistics for the output, this batch folded in.
    y = bn(x, use_running_average=True, update_stats=True)
    np.testing.assert_allclose(y, x / jnp.sqrt(1 + core.epsilon), atol=1e-6)
    _, new = core.apply(params, state, x, training=False, update_stats=True)
    np.testing.assert_allclose(bn.mean[...], new.mean, atol=1e-6)
    np.testing.assert_allclose(bn.var[...], new.var, atol=1e-6)
