"""Property tests of state threading through ``BatchNorm.apply`` (hypothesis).

Inference and frozen calls return the state untouched; ``lax.scan`` over batches equals a
Python loop; ``jax.vmap`` over a stack of models equals a loop over them; all against the
float64 closed forms of ``reference``. The closed form after k batches for every averaging
mode and variance convention is in ``test_averaging.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import moments, normalize, running_average, running_stats, train_forward

import bnjax

# maybe_jit is a stateless function-scoped fixture, safe to share across examples.
PROPERTY = settings(
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ]
)
# Each example of these compiles a scan or a vmapped apply: fewer, still every config.
COSTLY = settings(PROPERTY, max_examples=8)
# A few configurations covering every mode, so jitted functions are reused across examples.
CONFIGS = [
    bnjax.BatchNorm(momentum=0.9, averaging="ema", running_var="biased"),
    bnjax.BatchNorm(momentum=0.5, epsilon=0.1, averaging="ema", running_var="unbiased"),
    bnjax.BatchNorm(momentum=0.99, averaging="debiased", running_var="biased"),
    bnjax.BatchNorm(momentum=0.0, epsilon=1e-3, averaging="debiased", running_var="unbiased"),
    bnjax.BatchNorm(momentum=1.0, averaging="cumulative", running_var="biased"),
    bnjax.BatchNorm(averaging="cumulative", running_var="unbiased"),
]
configs = st.sampled_from(CONFIGS)


def _apply(bn, training, update_stats, params, state, x, mask):
    y, new = bn.apply(params, state, x, training=training, update_stats=update_stats, mask=mask)
    if update_stats is False or (update_stats is None and not training):
        assert new is state  # at trace time under jit: the input state itself
    return y, new


def _scan(bn, params, state, xs, masks):
    def step(state, xm):
        y, state = bn.apply(params, state, xm[0], training=True, mask=xm[1])
        return state, y

    return jax.lax.scan(step, state, (xs, masks))


_SCAN = jax.jit(_scan, static_argnums=0)


def _vmapped(bn, x_axis, params, state, x):
    return jax.vmap(functools.partial(_apply, bn, True, None), in_axes=(0, 0, x_axis, None))(
        params, state, x, None
    )


def _random_state(rng, c, count):
    return bnjax.BatchNormState(
        mean=jnp.asarray(rng.normal(size=c), jnp.float32),
        var=jnp.asarray(rng.uniform(0.1, 3.0, c), jnp.float32),
        count=jnp.asarray(count, jnp.int32),
    )


def _assert_same(got, want):
    # The same float32 maths, possibly fused or ordered differently by XLA: a few ulps of
    # the O(1) values (absolute near zero).
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _assert_close(got, want):
    # float32 results of O(1) float64 references, a few ulps.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@PROPERTY
@given(
    bn=configs,
    mode=st.sampled_from([(False, None), (False, False), (True, False)]),
    count=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_inference_and_frozen_calls_return_the_state(maybe_jit, bn, mode, count, seed):
    training, update_stats = mode
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (4, 3)).astype(np.float32)
    params, _ = bn.init(x)
    state = _random_state(rng, 3, count)
    run = maybe_jit(_apply, static_argnums=(0, 1, 2))
    y, new = run(bn, training, update_stats, params, state, jnp.asarray(x), None)
    jax.tree.map(np.testing.assert_array_equal, new, state)
    if training:
        want = train_forward(x, bn.epsilon)
    else:
        want = normalize(x, np.asarray(state.mean), np.asarray(state.var), bn.epsilon)
    _assert_close(y, want)


@COSTLY
@given(bn=configs, masked=st.booleans(), seed=st.integers(0, 2**16))
def test_scan_over_batches_equals_python_loop(maybe_jit, bn, masked, seed):
    k, n = 4, 5
    rng = np.random.default_rng(seed)
    xs = rng.normal(rng.uniform(-2, 2), rng.uniform(0.5, 2), (k, n, 2)).astype(np.float32)
    masks = np.ones((k, n), bool)
    if masked:
        masks[:, 2:] = rng.random((k, n - 2)) < 0.5  # at least two counted per batch
    params, state0 = bn.init(xs[0])
    # lax.scan compiles its body in any case: one jitted scan, compared with the eager (or
    # jitted) step-by-step loop.
    state_scan, ys = _SCAN(bn, params, state0, jnp.asarray(xs), jnp.asarray(masks))
    state_loop, step = state0, maybe_jit(_apply, static_argnums=(0, 1, 2))
    for i in range(k):
        y, state_loop = step(
            bn, True, None, params, state_loop, jnp.asarray(xs[i]), jnp.asarray(masks[i])
        )
        # Same operations, possibly fused differently by XLA: equal to float32 rounding.
        np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
        want = train_forward(xs[i], bn.epsilon, mask=masks[i])
        _assert_close(np.where(masks[i][:, None], y, 0), np.where(masks[i][:, None], want, 0))
    jax.tree.map(_assert_same, state_scan, state_loop)
    mean, var = running_stats(
        list(xs),
        momentum=bn.momentum,
        averaging=bn.averaging,
        running_var=bn.running_var,
        masks=list(masks),
    )
    _assert_close(state_scan.mean, mean)
    _assert_close(state_scan.var, var)
    assert int(state_scan.count) == k


@pytest.mark.slow
@COSTLY
@given(bn=configs, shared_x=st.booleans(), seed=st.integers(0, 2**16))
def test_vmap_over_stacked_models_equals_loop(maybe_jit, bn, shared_x, seed):
    models, c = 3, 3
    rng = np.random.default_rng(seed)
    xs = rng.normal(1.0, 2.0, (models, 5, c)).astype(np.float32)
    if shared_x:
        xs[:] = xs[0]
    params = bnjax.BatchNormParams(
        scale=jnp.asarray(rng.uniform(0.5, 2.0, (models, c)), jnp.float32),
        bias=jnp.asarray(rng.normal(size=(models, c)), jnp.float32),
    )
    states = [_random_state(rng, c, int(rng.integers(0, 5))) for _ in range(models)]
    state = jax.tree.map(lambda *a: jnp.stack(a), *states)
    x_axis = None if shared_x else 0
    ys, new = maybe_jit(_vmapped, static_argnums=(0, 1))(
        bn, x_axis, params, state, jnp.asarray(xs[0] if shared_x else xs)
    )
    one = maybe_jit(_apply, static_argnums=(0, 1, 2))
    for i in range(models):
        p_i = jax.tree.map(lambda a, i=i: a[i], params)
        y_i, s_i = one(bn, True, None, p_i, states[i], jnp.asarray(xs[i]), None)
        np.testing.assert_allclose(ys[i], y_i, rtol=1e-6, atol=1e-6)
        jax.tree.map(lambda a, b, i=i: _assert_same(a[i], b), new, s_i)
        p64 = [np.asarray(a, np.float64) for a in p_i]
        _assert_close(ys[i], train_forward(xs[i], bn.epsilon, *p64))
        _, mean, var = (np.asarray(a) for a in _stats(xs[i], bn))
        w_count = int(states[i].count)
        _assert_close(new.mean[i], _fold_once(states[i].mean, mean, bn, w_count))
        _assert_close(new.var[i], _fold_once(states[i].var, var, bn, w_count))


def _stats(x, bn):
    n, mean, var = moments(x)
    if bn.running_var == "unbiased":
        var = var * n / (n - 1)
    return n, mean, var


def _fold_once(old, batch, bn, count):
    """One running-average step from a state that has already seen ``count`` batches."""
    old = np.asarray(old, np.float64)
    if bn.averaging == "ema":
        return running_average([batch], bn.momentum, "ema", old)
    m = bn.momentum if bn.averaging == "debiased" else 1.0
    # ``old`` stands for ``count`` earlier batches: with weights m^(count-i), their sum is
    # old * sum_{j<count} m^j; the new batch enters with weight 1.
    prior = sum(m**j for j in range(1, count + 1))
    return (old * prior + batch) / (prior + 1.0)
