"""Opt-in runtime checks: ``BatchNorm(checks=True)`` with ``jax.experimental.checkify``."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import bnjax


def _checked(bn, maybe_jit, **kwargs):
    """``apply`` functionalized by checkify (and jitted when the fixture says so)."""

    def run(params, state, x, mask=None):
        return bn.apply(params, state, x, mask=mask, **kwargs)

    return maybe_jit(checkify.checkify(run, errors=checkify.user_checks))


def _trained(bn, x):
    params, state = bn.init(x)
    _, state = bn.apply(params, state, x, training=True)
    return params, state


def _reference_inference(x, mean, var, eps):
    x, mean, var = (np.asarray(a, np.float64) for a in (x, mean, var))
    return (x - mean) / np.sqrt(var + eps)


X = np.random.default_rng(0).normal(2.0, 3.0, (16, 3)).astype(np.float32)


def test_inference_on_never_updated_state_fails_with_advice(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    err, (y, _) = _checked(bn, maybe_jit, training=False)(params, state, X)
    message = str(err.get())
    assert "count is 0" in message and "never updated" in message
    assert "update_stats=True" in message and "training=True" in message
    np.testing.assert_allclose(y, _reference_inference(X, 0.0, 1.0, 1e-5), rtol=1e-6)


def test_recalibration_on_never_updated_state_passes(maybe_jit):
    bn = bnjax.BatchNorm(checks=True, momentum=0.0)
    params, state = bn.init(X)
    err, (_, new) = _checked(bn, maybe_jit, training=False, update_stats=True)(params, state, X)
    assert err.get() is None
    np.testing.assert_allclose(new.mean, X.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(new.var, X.astype(np.float64).var(0), rtol=1e-5)


def test_healthy_calls_pass_and_match_reference(maybe_jit):
    bn = bnjax.BatchNorm(checks=True, epsilon=1e-3)
    params, state = _trained(bn, X)
    err, (y, same) = _checked(bn, maybe_jit, training=False)(params, state, X)
    assert err.get() is None
    jax.tree.map(np.testing.assert_array_equal, same, state)
    ref = _reference_inference(X, state.mean, state.var, 1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    err, (y, _) = _checked(bn, maybe_jit, training=True)(params, state, X)
    assert err.get() is None
    x64 = X.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("training", [True, False])
def test_nonfinite_input_fails_when_statistics_are_computed(maybe_jit, bad, training):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    x = X.copy()
    x[3, 1] = bad
    x[5, 0] = bad
    err, _ = _checked(bn, maybe_jit, training=training, update_stats=True)(params, state, x)
    assert "2 non-finite" in str(err.get())


def test_nonfinite_input_in_pure_inference_is_not_an_error(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    x = X.copy()
    x[0, 0] = np.nan
    err, (y, _) = _checked(bn, maybe_jit, training=False)(params, state, x)
    assert err.get() is None
    assert np.isnan(y[0, 0]) and np.isfinite(np.delete(np.asarray(y).ravel(), 0)).all()


def test_masked_out_nonfinite_input_passes(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    x = X.copy()
    x[4] = np.nan
    mask = np.ones(16, bool)
    mask[4] = False
    err, (_, new) = _checked(bn, maybe_jit, training=True)(params, state, x, jnp.asarray(mask))
    assert err.get() is None
    kept = X.astype(np.float64)[mask]
    np.testing.assert_allclose(new.mean, 0.01 * kept.mean(0), rtol=1e-5)


@pytest.mark.parametrize(
    "var, expected",
    [([1.0, -0.5, 2.0], "1 negative and 0 non-finite"), ([np.nan, 1.0, np.inf], "2 non-finite")],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_running_variance_fails(maybe_jit, var, expected, training):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    state = state._replace(var=jnp.asarray(var, jnp.float32))
    err, _ = _checked(bn, maybe_jit, training=training)(params, state, X)
    assert expected in str(err.get()) and "state.var" in str(err.get())


def test_nonfinite_running_mean_fails(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    state = state._replace(mean=jnp.asarray([0.0, np.nan, 0.0], jnp.float32))
    err, _ = _checked(bn, maybe_jit, training=False)(params, state, X)
    assert "state.mean with 1 non-finite" in str(err.get())


def test_eager_call_without_checkify_raises_at_once():
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    with pytest.raises(checkify.JaxRuntimeError, match="never updated"):
        bn.apply(params, state, X, training=False)


def test_jit_without_checkify_is_refused():
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    step = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=True))
    with pytest.raises(ValueError, match="checkify"):
        step(params, state, X)


def _primitives(jaxpr):
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


@pytest.mark.parametrize(
    "training, update_stats", [(True, True), (True, False), (False, False), (False, True)]
)
def test_checks_off_traces_no_check(training, update_stats):
    x = jnp.asarray(X)
    for checks, present in ((False, False), (True, True)):
        bn = bnjax.BatchNorm(checks=checks)
        params, state = bn.init(x)
        jaxpr = jax.make_jaxpr(
            lambda p, s, x, bn=bn: bn.apply(p, s, x, training=training, update_stats=update_stats)
        )(params, state, x)
        assert ("check" in _primitives(jaxpr.jaxpr)) is present


def test_checks_must_be_a_bool():
    with pytest.raises(TypeError, match="checks must be a Python bool; got 'yes'"):
        bnjax.BatchNorm(checks="yes")


def test_checks_inside_shard_map_report_the_failing_device():
    # checkify gathers errors across shard_map devices on meshes with Auto axes (on
    # Explicit axes JAX 0.10 fails inside checkify, even for a plain check).
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    bn = bnjax.BatchNorm(axis_name="data", checks=True)
    x = X.copy()
    x[5, 1] = np.nan  # rows 4-7 live on device 1
    params, state = bn.init(x)
    spec = jax.sharding.PartitionSpec
    step = jax.shard_map(
        lambda p, s, x: bn.apply(p, s, x, training=True),
        mesh=mesh,
        in_specs=(spec(), spec(), spec("data")),
        out_specs=(spec("data"), spec()),
    )
    checked = jax.jit(checkify.checkify(step, errors=checkify.user_checks))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec("data")))
    err, (_, new) = checked(params, state, sharded)
    assert "at mapped index 1" in str(err.get()) and "1 non-finite" in str(err.get())
    jax.tree.map(np.testing.assert_array_equal, new, state)  # the NaN batch was skipped
    clean = jax.device_put(X, jax.sharding.NamedSharding(mesh, spec("data")))
    err, (_, new) = checked(params, state, clean)
    assert err.get() is None
    np.testing.assert_allclose(new.mean, 0.01 * X.astype(np.float64).mean(0), rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_checks_with_virtual_batches(maybe_jit, masked):
    """Without a mask each virtual batch's count is a scalar: the update check paired the
    stacked counts (chunks,) with the features and failed to trace (or, with as many
    chunks as features, paired chunks with features)."""
    bn = bnjax.BatchNorm(checks=True, virtual_batch_size=4)
    x = jnp.asarray(X[:8])  # 2 chunks of 4 rows, 3 features
    params, state = bn.init(x)
    mask = jnp.ones(8, bool) if masked else None
    err, (y, new) = _checked(bn, maybe_jit, training=True)(params, state, x, mask)
    assert err.get() is None
    assert int(new.count) == 2
    ref = bnjax.BatchNorm(virtual_batch_size=4)
    _, want = ref.apply(params, state, x, training=True)
    np.testing.assert_allclose(new.mean, want.mean, rtol=1e-6)
