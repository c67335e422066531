"""Opt-in runtime checks: ``BatchNorm(checks=True)`` warns from a host callback, under any
transformation, and still reports to ``jax.experimental.checkify``."""

import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import bnjax
from bnjax._src import checks as runtime_checks

X = np.random.default_rng(0).normal(2.0, 3.0, (16, 3)).astype(np.float32)
F32_MAX = float(np.finfo(np.float32).max)


def _run(bn, maybe_jit, **kwargs):
    """``apply`` with fixed flags (jitted when the fixture says so)."""

    def run(params, state, x, mask=None):
        return bn.apply(params, state, x, mask=mask, **kwargs)

    return maybe_jit(run)


def _checked(bn, maybe_jit, **kwargs):
    """``apply`` functionalized by checkify (and jitted when the fixture says so)."""

    def run(params, state, x, mask=None):
        return bn.apply(params, state, x, mask=mask, **kwargs)

    return maybe_jit(checkify.checkify(run, errors=checkify.user_checks))


def _warned(call, match=None):
    """Runs ``call`` and waits for its callbacks; the CheckWarning messages it issued."""
    with pytest.warns(bnjax.CheckWarning, match=match) as record:
        out = call()
        jax.effects_barrier()  # callbacks run asynchronously under jit
    return out, [str(w.message) for w in record if issubclass(w.category, bnjax.CheckWarning)]


def _silent(call):
    """Runs ``call`` with every warning an error (a CheckWarning under jit surfaces as
    JaxRuntimeError) and waits for its callbacks."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call()
        jax.effects_barrier()
    return out


def _trained(bn, x):
    params, state = bn.init(x)
    _, state = bn.apply(params, state, x, training=True)
    return params, state


def _reference_inference(x, mean, var, eps):
    x, mean, var = (np.asarray(a, np.float64) for a in (x, mean, var))
    return (x - mean) / np.sqrt(var + eps)


def _with_nonfinite(x, *values):
    """A copy of ``x`` with ``values`` at ``[3, 1]`` and then ``[5, 0]``."""
    x = x.copy()
    places = [(3, 1), (5, 0)][: len(values)]
    for (row, col), value in zip(places, values, strict=True):
        x[row, col] = value
    return x


def _case(name):
    """``(bn, params, state, x, flags, expected message)`` for one failing check."""
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    x, flags = X, {"training": False}
    if name == "never_updated":
        params, state = bn.init(X)
        expected = "count is 0 and whose running statistics are still exactly at their init"
    elif name == "nonfinite_input":
        x, flags = _with_nonfinite(X, np.nan, np.inf), {"training": True}
        expected = "got x with 2 non-finite (NaN or Inf) element(s)"
    elif name == "bad_var":
        state = state._replace(var=jnp.asarray([1.0, -0.5, np.nan], jnp.float32))
        expected = "got state.var with 1 negative and 1 non-finite element(s)"
    elif name == "bad_mean":
        state = state._replace(mean=jnp.asarray([0.0, np.nan, 0.0], jnp.float32))
        expected = "got state.mean with 1 non-finite element(s)"
    elif name == "unrepresentable":  # variance about 1e74, beyond float32
        z = np.random.default_rng(1).standard_normal((64, 3))
        x = (z / np.max(np.abs(z)) * (F32_MAX / 8)).astype(np.float32)
        params, state = bn.init(x)
        flags = {"training": True}
        expected = "3 feature(s) of this batch have a mean or variance beyond the range"
    else:
        raise ValueError(name)
    return bn, params, state, x, flags, expected


CASES = ["never_updated", "nonfinite_input", "bad_var", "bad_mean", "unrepresentable"]


@pytest.mark.parametrize("name", CASES)
def test_each_check_warns(maybe_jit, name):
    bn, params, state, x, flags, expected = _case(name)
    run = _run(bn, maybe_jit, **flags)
    _, messages = _warned(lambda: run(params, state, x))
    assert len(messages) == 1 and expected in messages[0], messages


@pytest.mark.parametrize("name", CASES)
def test_each_check_is_returned_by_checkify_and_also_warns(maybe_jit, name):
    bn, params, state, x, flags, expected = _case(name)
    checked = _checked(bn, maybe_jit, **flags)
    (err, _), messages = _warned(lambda: checked(params, state, x))
    assert expected in str(err.get())
    assert len(messages) == 1 and expected in messages[0], messages
    with pytest.raises(checkify.JaxRuntimeError, match=r"\(`check` failed\)"):
        err.throw()


def test_inference_on_never_updated_state_warns_with_advice(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    (y, _), [message] = _warned(lambda: _run(bn, maybe_jit, training=False)(params, state, X))
    assert "count is 0" in message and "never updated" in message
    assert "update_stats=True" in message and "training=True" in message
    np.testing.assert_allclose(y, _reference_inference(X, 0.0, 1.0, 1e-5), rtol=1e-6)


def _imported(source, mean, var):
    """``(params, state)`` read from another framework's arrays; no count: count 0."""
    scale, bias = np.full(3, 1.5, np.float32), np.full(3, 0.5, np.float32)
    if source == "flax":
        return bnjax.interop.from_flax(
            {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
        )
    return bnjax.interop.from_keras([scale, bias, mean, var])


@pytest.mark.parametrize("source", ["flax", "keras"])
def test_imported_statistics_without_a_count_pass_unless_still_at_init(maybe_jit, source):
    """Count 0 alone is not "never updated": only a count of 0 with the statistics still
    exactly at init (mean all 0, var all 1) is."""
    bn = bnjax.BatchNorm(checks=True, epsilon=1e-3)
    infer = _run(bn, maybe_jit, training=False)
    mean, var = X.mean(0), X.var(0)
    params, state = _imported(source, mean, var)
    assert int(state.count) == 0
    y, _ = _silent(lambda: infer(params, state, X))
    ref = 1.5 * _reference_inference(X, mean, var, 1e-3) + 0.5
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
    for partly_trained in [(mean, ones), (zeros, var), (zeros, np.array([1, 1, 2], np.float32))]:
        params, state = _imported(source, *partly_trained)
        _silent(lambda p=params, s=state: infer(p, s, X))
    params, state = _imported(source, zeros, ones)
    _, [message] = _warned(lambda: infer(params, state, X), match="never updated")
    assert "count is 0" in message


def test_state_at_init_values_with_a_count_passes(maybe_jit):
    """momentum=1 keeps the statistics at mean 0, var 1 while the count grows: updated."""
    bn = bnjax.BatchNorm(checks=True, momentum=1.0)
    params, state = _trained(bn, X)
    assert int(state.count) == 1 and not np.any(state.mean) and np.all(state.var == 1)
    _silent(lambda: _run(bn, maybe_jit, training=False)(params, state, X))


def test_recalibration_on_never_updated_state_passes(maybe_jit):
    bn = bnjax.BatchNorm(checks=True, momentum=0.0)
    params, state = bn.init(X)
    recalibrate = _run(bn, maybe_jit, training=False, update_stats=True)
    _, new = _silent(lambda: recalibrate(params, state, X))
    np.testing.assert_allclose(new.mean, X.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(new.var, X.astype(np.float64).var(0), rtol=1e-5)


def test_healthy_calls_pass_and_match_reference(maybe_jit):
    bn = bnjax.BatchNorm(checks=True, epsilon=1e-3)
    params, state = _trained(bn, X)
    y, same = _silent(lambda: _run(bn, maybe_jit, training=False)(params, state, X))
    jax.tree.map(np.testing.assert_array_equal, same, state)
    ref = _reference_inference(X, state.mean, state.var, 1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    y, _ = _silent(lambda: _run(bn, maybe_jit, training=True)(params, state, X))
    x64 = X.astype(np.float64)
    ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("training", [True, False])
def test_nonfinite_input_warns_when_statistics_are_computed(maybe_jit, bad, training):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    x = _with_nonfinite(X, bad, bad)
    run = _run(bn, maybe_jit, training=training, update_stats=True)
    (_, new), [message] = _warned(lambda: run(params, state, x))
    assert "x with 2 non-finite" in message
    jax.tree.map(np.testing.assert_array_equal, new, state)  # skip_nonfinite: kept


def test_nonfinite_input_in_pure_inference_is_not_reported(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    x = _with_nonfinite(X, np.nan)
    y, _ = _silent(lambda: _run(bn, maybe_jit, training=False)(params, state, x))
    assert np.isnan(y[3, 1]) and np.isfinite(np.delete(np.asarray(y).ravel(), 3 * 3 + 1)).all()


def test_masked_out_nonfinite_input_passes(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    x = X.copy()
    x[4] = np.nan
    mask = np.ones(16, bool)
    mask[4] = False
    run = _run(bn, maybe_jit, training=True)
    _, new = _silent(lambda: run(params, state, x, jnp.asarray(mask)))
    kept = X.astype(np.float64)[mask]
    np.testing.assert_allclose(new.mean, 0.01 * kept.mean(0), rtol=1e-5)


@pytest.mark.parametrize(
    "var, expected",
    [([1.0, -0.5, 2.0], "1 negative and 0 non-finite"), ([np.nan, 1.0, np.inf], "2 non-finite")],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_running_variance_warns(maybe_jit, var, expected, training):
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    state = state._replace(var=jnp.asarray(var, jnp.float32))
    _, [message] = _warned(lambda: _run(bn, maybe_jit, training=training)(params, state, X))
    assert expected in message and "state.var" in message


def test_plain_jit_train_step_runs_and_a_healthy_sequence_is_silent(maybe_jit):
    """A gradient step with the state threaded through, then evaluation: no warning."""
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)

    def step(params, state, x):
        def loss(params):
            y, new = bn.apply(params, state, x, training=True)
            return jnp.mean((y - 1.0) ** 2), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), new, value

    step = maybe_jit(step)
    infer = _run(bn, maybe_jit, training=False)
    rng = np.random.default_rng(2)

    def sequence(params, state):
        for _ in range(3):
            x = rng.normal(2.0, 3.0, X.shape).astype(np.float32)
            params, state, _ = step(params, state, x)
        return infer(params, state, X), state

    (y, _), state = _silent(lambda: sequence(params, state))
    assert int(state.count) == 3 and np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_a_warning_made_an_error_raises(jitted):
    """Eagerly ``apply`` raises the CheckWarning; under jit the call (or the barrier)
    raises JaxRuntimeError carrying the warning's message."""
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    infer = _run(bn, lambda f: jax.jit(f) if jitted else f, training=False)
    expected = jax.errors.JaxRuntimeError if jitted else bnjax.CheckWarning
    with warnings.catch_warnings():
        warnings.simplefilter("error", bnjax.CheckWarning)
        with pytest.raises(expected, match="never updated") as info:
            infer(params, state, X)
            jax.effects_barrier()
    if jitted:
        assert "CheckWarning: BatchNorm.apply(training=False) got a state" in str(info.value)


def test_vmap_reports_the_first_failing_index(maybe_jit):
    bn = bnjax.BatchNorm(checks=True, axis_name="batch")
    params, state = bn.init(X)
    x = _with_nonfinite(X, np.nan, np.nan)  # rows 3 and 5
    run = jax.vmap(
        lambda x: bn.apply(params, state, x, training=True),
        axis_name="batch",
        out_axes=(0, None),
    )
    (_, new), [message] = _warned(lambda: maybe_jit(run)(x))
    assert message.startswith("at vmapped index 3 (and 1 more): BatchNorm.apply got x with 1 ")
    jax.tree.map(np.testing.assert_array_equal, new, state)
    _silent(lambda: maybe_jit(run)(X))


def test_nested_vmap_of_inference_reports_each_axis(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, fresh = bn.init(X)
    trained = _trained(bn, X)[1]

    def grid(t, f):  # (2, 3) states: only [1, 2] is fresh from init
        return jnp.stack([t] * 5 + [f]).reshape(2, 3, *t.shape)

    states = jax.tree.map(grid, trained, fresh)
    infer = jax.vmap(jax.vmap(lambda s: bn.apply(params, s, X, training=False)))
    _, [message] = _warned(lambda: maybe_jit(infer)(states))
    assert message.startswith("at vmapped index (1, 2): BatchNorm.apply(training=False)")


def test_vmap_stages_one_callback_per_check_site():
    """The callback takes the mapped values at once: ``jax.debug.callback`` alone is
    batched by unrolling, one callback per index (seconds to compile for a vmap of 256)."""
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    run = jax.vmap(lambda x: bn.apply(params, state, x, training=True))
    jaxpr = jax.make_jaxpr(run)(jnp.ones((64, *X.shape)))
    assert _primitives(jaxpr.jaxpr).count("debug_callback") == 2  # before and at the update


def test_scan_and_grad_of_a_checked_apply_run_and_warn(maybe_jit):
    bn = bnjax.BatchNorm(checks=True)
    params, state = bn.init(X)
    xs = np.stack([X, _with_nonfinite(X, np.nan), X])

    def body(state, x):
        y, state = bn.apply(params, state, x, training=True)
        return state, y

    scan = maybe_jit(lambda state, xs: jax.lax.scan(body, state, xs))
    (new, _), [message] = _warned(lambda: scan(state, xs))
    assert "x with 1 non-finite" in message
    assert int(new.count) == 2  # the NaN batch was skipped
    _silent(lambda: scan(state, np.stack([X, X])))

    def loss(params, x):
        return jnp.sum(bn.apply(params, state, x, training=True)[0] ** 2)

    grad = maybe_jit(jax.grad(loss))
    _, [message] = _warned(lambda: grad(params, _with_nonfinite(X, np.inf)))
    assert "x with 1 non-finite" in message
    grads = _silent(lambda: grad(params, X))
    assert np.all(np.isfinite(np.asarray(grads.scale)))


def test_host_callback_returns_at_once_when_every_check_passed():
    """The message is only formatted for a failed check (here it could not be)."""
    runtime_checks.warn_failed(("{absent}",), (np.bool_(True),), ({},))
    with pytest.warns(bnjax.CheckWarning, match="at vmapped index 1 \\(and 1 more\\): 2 bad"):
        runtime_checks.warn_failed(
            ("{bad} bad",), (np.array([True, False, False]),), ({"bad": np.array([0, 2, 3])},)
        )


def _primitives(jaxpr):
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names += _primitives(sub)
    return names


@pytest.mark.parametrize(
    "training, update_stats", [(True, True), (True, False), (False, False), (False, True)]
)
def test_checks_off_traces_no_callback(training, update_stats):
    x = jnp.asarray(X)
    for checks in (False, True):
        bn = bnjax.BatchNorm(checks=checks)
        params, state = bn.init(x)
        jaxpr = jax.make_jaxpr(
            lambda p, s, x, bn=bn: bn.apply(p, s, x, training=training, update_stats=update_stats)
        )(params, state, x)
        names = set(_primitives(jaxpr.jaxpr))
        assert ("debug_callback" in names) is checks and ("check" in names) is checks


def test_checks_must_be_a_bool():
    with pytest.raises(TypeError, match="checks must be a Python bool; got 'yes'"):
        bnjax.BatchNorm(checks="yes")


def _shard_map_step(bn, axis_type):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    spec = jax.sharding.PartitionSpec
    step = jax.shard_map(
        lambda p, s, x: bn.apply(p, s, x, training=True),
        mesh=mesh,
        in_specs=(spec(), spec(), spec("data")),
        out_specs=(spec("data"), spec()),
    )
    return step, lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec("data")))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_checks_inside_shard_map_warn_from_the_failing_device(axis_type):
    bn = bnjax.BatchNorm(axis_name="data", checks=True)
    x = _with_nonfinite(X, np.nan)  # row 3 lives on device 0
    params, state = bn.init(x)
    step, shard = _shard_map_step(bn, getattr(jax.sharding.AxisType, axis_type))
    step = jax.jit(step)
    (_, new), [message] = _warned(lambda: step(params, state, shard(x)))
    assert "x with 1 non-finite" in message
    jax.tree.map(np.testing.assert_array_equal, new, state)  # the NaN batch was skipped
    _, new = _silent(lambda: step(params, state, shard(X)))
    np.testing.assert_allclose(new.mean, 0.01 * X.astype(np.float64).mean(0), rtol=1e-5)


def test_checkify_inside_shard_map_reports_the_failing_device():
    # checkify gathers errors across shard_map devices on meshes with Auto axes (on
    # Explicit axes JAX 0.10 fails inside checkify, even for a plain check).
    bn = bnjax.BatchNorm(axis_name="data", checks=True)
    x = X.copy()
    x[5, 1] = np.nan  # rows 4-7 live on device 1
    params, state = bn.init(x)
    step, shard = _shard_map_step(bn, jax.sharding.AxisType.Auto)
    checked = jax.jit(checkify.checkify(step, errors=checkify.user_checks))
    (err, (_, new)), [message] = _warned(lambda: checked(params, state, shard(x)))
    assert "at mapped index 1" in str(err.get()) and "1 non-finite" in str(err.get())
    assert "1 non-finite" in message
    jax.tree.map(np.testing.assert_array_equal, new, state)
    err, _ = _silent(lambda: checked(params, state, shard(X)))
    assert err.get() is None


@pytest.mark.parametrize("masked", [False, True])
def test_checks_with_virtual_batches(maybe_jit, masked):
    """Without a mask each virtual batch's count is a scalar: the update check paired the
    stacked counts (chunks,) with the features and failed to trace (or, with as many
    chunks as features, paired chunks with features)."""
    bn = bnjax.BatchNorm(checks=True, virtual_batch_size=4)
    x = jnp.asarray(X[:8])  # 2 chunks of 4 rows, 3 features
    params, state = bn.init(x)
    mask = jnp.ones(8, bool) if masked else None
    _, new = _silent(lambda: _run(bn, maybe_jit, training=True)(params, state, x, mask))
    assert int(new.count) == 2
    ref = bnjax.BatchNorm(virtual_batch_size=4)
    _, want = ref.apply(params, state, x, training=True)
    np.testing.assert_allclose(new.mean, want.mean, rtol=1e-6)


@pytest.mark.parametrize("var", [[0.0, 0.5, 2.0], [0.0, 0.0, 0.0]])
def test_zero_or_small_running_variance_is_healthy(maybe_jit, var):
    """A dead feature's running variance is 0: not negative, so no warning."""
    bn = bnjax.BatchNorm(checks=True)
    params, state = _trained(bn, X)
    state = state._replace(var=jnp.asarray(var, jnp.float32))
    for training in (True, False):
        _silent(lambda t=training: _run(bn, maybe_jit, training=t)(params, state, X))


@pytest.mark.parametrize("virtual_batch_size", [None, 32, 16])
def test_unrepresentable_features_are_counted_once_across_virtual_batches(
    maybe_jit, virtual_batch_size
):
    """Two of three features overflow float32 in every virtual batch: 2 features, however
    many chunks; a feature with one counted element overflows too."""
    z = np.random.default_rng(1).standard_normal((64, 3))
    x = (z / np.max(np.abs(z)) * (F32_MAX / 8)).astype(np.float32)
    x[:, 2] = z[:, 2]  # a tame feature
    bn = bnjax.BatchNorm(checks=True, virtual_batch_size=virtual_batch_size)
    params, state = bn.init(x)
    _, [message] = _warned(lambda: _run(bn, maybe_jit, training=True)(params, state, x))
    assert "BatchNorm.apply: 2 feature(s) of this batch have a mean or variance beyond" in message


def test_an_unrepresentable_feature_of_one_element_is_counted(maybe_jit):
    """A float16 state; each of 12 features holds one element of 7e4, beyond 65504."""
    bn = bnjax.BatchNorm(checks=True, axis=(1, 2))
    params, state = bn.init((1, 4, 3))
    state = state._replace(mean=state.mean.astype(jnp.float16), var=state.var.astype(jnp.float16))
    big = jnp.full((1, 4, 3), 7e4, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one element per feature: y = bias
        run = _run(bn, maybe_jit, training=True)
        _, [message] = _warned(lambda: run(params, state, big))
    assert "BatchNorm.apply: 12 feature(s) of this batch have a mean or variance" in message
