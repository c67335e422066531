"""Batch renormalization against a numpy float64 reference (forward, gradients, state)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax


def renorm_ref(x, g, scale, bias, run_mean, run_var, eps, rmax, dmax):
    """Textbook batch renorm on (N, C) input in float64, with its gradient for ``sum(y*g)``.

    ``r`` and ``d`` are constants for the gradient, so ``y`` is batch norm with scale
    ``r * scale`` plus the constant ``d * scale``.
    """
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    mu, var = x.mean(0), x.var(0)
    sigma_b, sigma = np.sqrt(var + eps), np.sqrt(np.asarray(run_var, np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mu - run_mean) / sigma, -dmax, dmax)
    xhat = (x - mu) / sigma_b
    y = (xhat * r + d) * scale + bias
    dxhat = g * scale * r
    dx = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) / sigma_b
    dscale = np.sum(g * (xhat * r + d), 0)
    dbias = np.sum(g, 0)
    return y, dx, dscale, dbias, (mu, var)


def _grads(bn, params, state, x, g):
    def loss(p, xx):
        return jnp.sum(bn.apply(p, state, xx, training=True)[0] * g)

    return jax.grad(loss, argnums=(0, 1))(params, x)


def _setup(seed=0, n=16, c=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) * np.array([0.5, 1, 2, 4, 8]) + np.array([0, 1, -3, 6, 2])
    g = rng.normal(size=(n, c))
    scale = rng.uniform(0.5, 1.5, c)
    bias = rng.normal(size=c)
    return x.astype(np.float32), g.astype(np.float32), scale, bias


def test_reference_gradient_matches_finite_differences():
    x, g, scale, bias = _setup(c=5)
    x, g = x[:6].astype(np.float64), g[:6].astype(np.float64)
    run_mean, run_var = np.full(5, 0.5), np.full(5, 2.0)
    args = (scale, bias, run_mean, run_var, 1e-3, 1.5, 0.5)
    mu, var = x.mean(0), x.var(0)
    sb, s = np.sqrt(var + 1e-3), np.sqrt(run_var + 1e-3)
    r, d = np.clip(sb / s, 1 / 1.5, 1.5), np.clip((mu - run_mean) / s, -0.5, 0.5)

    def f(xx):  # r and d held fixed
        return np.sum(((xx - xx.mean(0)) / np.sqrt(xx.var(0) + 1e-3) * r + d) * scale * g)

    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = 1e-6
        num[i] = (f(x + e) - f(x - e)) / 2e-6
    np.testing.assert_allclose(renorm_ref(x, g, *args)[1], num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("rmax", "dmax"),
    [
        (1.5, 0.5),
        pytest.param(3.0, 5.0, marks=pytest.mark.slow),
        pytest.param(1.0, 0.0, marks=pytest.mark.slow),
    ],
)
def test_renorm_matches_reference_over_steps(rmax, dmax, maybe_jit):
    x, g, scale, bias = _setup()
    bn = bnjax.BatchNorm(momentum=0.7, epsilon=1e-3, renorm=bnjax.Renorm(rmax=rmax, dmax=dmax))
    params, state = bn.init(x)
    params = bnjax.BatchNormParams(jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    step = maybe_jit(bn.apply, static_argnames=("training",))
    grads = maybe_jit(_grads, static_argnums=0)
    run_mean, run_var = np.zeros(5), np.ones(5)
    for t in range(3):
        xt = x * (1 + 0.3 * t) + t
        y_ref, dx_ref, ds_ref, db_ref, (mu, var) = renorm_ref(
            xt, g, scale, bias, run_mean, run_var, 1e-3, rmax, dmax
        )
        d_params, dx = grads(bn, params, state, jnp.asarray(xt), jnp.asarray(g))
        y, state = step(params, state, xt, training=True)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d_params.scale, ds_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(d_params.bias, db_ref, rtol=1e-5, atol=1e-5)
        run_mean = 0.7 * run_mean + 0.3 * mu
        run_var = 0.7 * run_var + 0.3 * var
        np.testing.assert_allclose(state.mean, run_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.var, run_var, rtol=1e-5, atol=1e-6)
    assert int(state.count) == 3


def test_renorm_without_scale_or_bias():
    x, g, _, _ = _setup(1)
    bn = bnjax.BatchNorm(scale=False, center=False, renorm=bnjax.Renorm(rmax=1.2, dmax=0.3))
    params, state = bn.init(x)
    state = state._replace(mean=jnp.full(5, 0.5), var=jnp.full(5, 3.0))
    ones, zeros = np.ones(5), np.zeros(5)
    y_ref, dx_ref, *_ = renorm_ref(x, g, ones, zeros, 0.5, 3.0, 1e-5, 1.2, 0.3)
    y, _ = bn.apply(params, state, x, training=True)
    _, dx = _grads(bn, params, state, jnp.asarray(x), jnp.asarray(g))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "count",
    [
        0,
        pytest.param(3, marks=pytest.mark.slow),
        5,
        pytest.param(9, marks=pytest.mark.slow),
        pytest.param(12, marks=pytest.mark.slow),
        40,
    ],
)
def test_ramp_schedule_follows_state_count(count, maybe_jit):
    x, g, scale, bias = _setup(2)
    bn = bnjax.BatchNorm(renorm=bnjax.Renorm(rmax=2.0, dmax=1.0, ramp_start=3, ramp_steps=8))
    params, state = bn.init(x)
    params = bnjax.BatchNormParams(jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    state = state._replace(
        mean=jnp.full(5, 4.0), var=jnp.full(5, 0.2), count=jnp.asarray(count, jnp.int32)
    )
    frac = min(max((count - 3) / 8, 0.0), 1.0)
    y_ref = renorm_ref(x, g, scale, bias, 4.0, 0.2, 1e-5, 1 + frac, frac)[0]
    y, _ = maybe_jit(bn.apply, static_argnames=("training",))(params, state, x, training=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_ramp_without_steps_switches_at_start():
    x, g, scale, bias = _setup(3)
    bn = bnjax.BatchNorm(renorm=bnjax.Renorm(rmax=2.0, dmax=1.0, ramp_start=2))
    params, state = bn.init(x)
    state = state._replace(mean=jnp.full(5, 4.0), var=jnp.full(5, 0.2))
    ones, zeros = np.ones(5), np.zeros(5)
    for count, (rmax, dmax) in ((1, (1.0, 0.0)), (2, (2.0, 1.0))):
        s = state._replace(count=jnp.asarray(count, jnp.int32))
        y, _ = bn.apply(params, s, x, training=True)
        y_ref = renorm_ref(x, g, ones, zeros, 4.0, 0.2, 1e-5, rmax, dmax)[0]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_inference_and_frozen_state_are_unaffected():
    x, _, scale, bias = _setup(4)
    bn = bnjax.BatchNorm(renorm=bnjax.Renorm(rmax=1.5, dmax=0.5))
    params, state = bn.init(x)
    params = bnjax.BatchNormParams(jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    state = state._replace(mean=jnp.full(5, 1.0), var=jnp.full(5, 2.0))
    y, same = bn.apply(params, state, x, training=False)
    y_ref = (x.astype(np.float64) - 1.0) / np.sqrt(2.0 + 1e-5) * scale + bias
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert same is state
    _, same = bn.apply(params, state, x, training=True, update_stats=False)
    assert same is state


def test_renorm_with_mask_uses_counted_rows():
    x, g, scale, bias = _setup(5)
    mask = np.arange(16) % 3 != 0
    bn = bnjax.BatchNorm(renorm=bnjax.Renorm(rmax=1.3, dmax=0.4))
    params, state = bn.init(x)
    params = bnjax.BatchNormParams(jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    x_bad = np.where(mask[:, None], x, np.nan).astype(np.float32)
    y, new = bn.apply(params, state, x_bad, training=True, mask=jnp.asarray(mask))
    y_ref, *_, (mu, var) = renorm_ref(x[mask], g[mask], scale, bias, 0.0, 1.0, 1e-5, 1.3, 0.4)
    np.testing.assert_allclose(np.asarray(y)[mask], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, 0.01 * mu, rtol=1e-5, atol=1e-6)


def test_renorm_across_devices_equals_one_device():
    x, g, scale, bias = _setup(6)
    mesh = jax.make_mesh((4,), ("d",))
    bn = bnjax.BatchNorm(axis_name="d", renorm=bnjax.Renorm(rmax=1.4, dmax=0.6))
    params, state = bn.init(x)
    params = bnjax.BatchNormParams(jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))
    state = state._replace(mean=jnp.full(5, 0.5), var=jnp.full(5, 2.0))

    def f(p, s, xx, gg):
        def loss(p, xx):
            y, new = bn.apply(p, s, xx, training=True)
            return jax.lax.psum(jnp.sum(y * gg), "d"), (y, new)

        (_, (y, new)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, xx)
        return y, new, grads

    specs = dict(in_specs=(P(), P(), P("d"), P("d")), out_specs=(P("d"), P(), (P(), P("d"))))
    sharded = jax.jit(jax.shard_map(f, mesh=mesh, **specs))
    xs, gs = (jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("d"))) for a in (x, g))
    y, new, (d_params, dx) = sharded(params, state, xs, gs)
    y_ref, dx_ref, ds_ref, db_ref, (mu, _) = renorm_ref(x, g, scale, bias, 0.5, 2.0, 1e-5, 1.4, 0.6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_params.scale, ds_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_params.bias, db_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, 0.99 * 0.5 + 0.01 * mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(rmax=0.5), ValueError, "renorm.rmax=0.5"),
        (dict(dmax=-1.0), ValueError, "renorm.dmax=-1.0"),
        (dict(ramp_steps=-1), ValueError, "renorm.ramp_steps=-1"),
        (dict(ramp_start=1.5), TypeError, "renorm.ramp_start"),
        (dict(ramp_start=None), TypeError, r"renorm.ramp_start must be an int; got None"),
        (dict(ramp_steps=True), TypeError, r"renorm.ramp_steps must be an int; got True"),
    ],
)
def test_invalid_renorm_settings_are_refused_naming_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        bnjax.Renorm(**kwargs)


@pytest.mark.parametrize("renorm", [True, "yes", {"rmax": 2.0}])
def test_renorm_must_be_a_renorm_value(renorm):
    with pytest.raises(TypeError, match=r"renorm must be None or a bnjax.Renorm; got"):
        bnjax.BatchNorm(renorm=renorm)


@pytest.mark.parametrize(("ramp_start", "ramp_steps"), [(2, 4), (1, 0), (0, 3), (0, 0)])
def test_limits_follow_the_ramp_at_every_count(ramp_start, ramp_steps):
    """The limits after ``count`` batches, against the closed form (numpy float64):
    1 and 0 for the first ``ramp_start`` batches, then linear to ``rmax``/``dmax``."""
    rmax, dmax = 3.0, 5.0
    renorm = bnjax.Renorm(rmax=rmax, dmax=dmax, ramp_start=ramp_start, ramp_steps=ramp_steps)
    for count in range(9):
        got = renorm.limits(jnp.asarray(count, jnp.int32), jnp.float32)
        t = count - ramp_start
        frac = float(t >= 0) if ramp_steps == 0 else float(np.clip(t / ramp_steps, 0, 1))
        np.testing.assert_allclose([float(g) for g in got],
                                   [1 + frac * (rmax - 1), frac * dmax], rtol=1e-6)  # fmt: skip
