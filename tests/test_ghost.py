"""Ghost batch norm (virtual batches) against a numpy float64 reference."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax


def bn_ref(x, g, scale, bias, eps, mask=None):
    """Batch norm over axis 0 of (N, C) in float64, and its gradient for ``sum(y * g)``.

    Rows where ``mask`` is False are left out of the statistics (their gradient
    contribution through the statistics is zero); their output still uses them.
    """
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    m = np.ones(len(x), bool) if mask is None else np.asarray(mask, bool)
    n = m.sum()
    mu = x[m].mean(0)
    var = x[m].var(0)
    inv = 1 / np.sqrt(var + eps)
    xhat = (x - mu) * inv
    y = xhat * scale + bias
    dxhat = g * scale
    gm = m[:, None]
    dx = inv * (dxhat - gm * (dxhat.sum(0) + xhat * (dxhat * xhat).sum(0)) / n)
    return y, dx, np.sum(g * xhat, 0), np.sum(g, 0), (n, mu, var)


def ghost_ref(x, g, scale, bias, eps, k, mask=None):
    """Every chunk of ``k`` rows normalized on its own; per-chunk statistics in order."""
    ys, dxs, dss, dbs, stats = [], [], [], [], []
    for i in range(0, len(x), k):
        m = None if mask is None else mask[i : i + k]
        y, dx, ds, db, st = bn_ref(x[i : i + k], g[i : i + k], scale, bias, eps, m)
        ys.append(y), dxs.append(dx), dss.append(ds), dbs.append(db), stats.append(st)
    return np.concatenate(ys), np.concatenate(dxs), sum(dss), sum(dbs), stats


def _setup(seed=0, n=12, c=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) * np.array([1.0, 3.0, 0.5]) + np.array([2.0, -1.0, 5.0])
    x = x * np.linspace(0.5, 2.0, n)[:, None]  # chunks with different statistics
    g = rng.normal(size=(n, c))
    scale, bias = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    return x.astype(np.float32), g.astype(np.float32), scale, bias


def _params(bn, scale, bias):
    return bnjax.BatchNormParams(jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))


def _grads(bn, params, state, x, g):
    def loss(p, xx):
        return jnp.sum(bn.apply(p, state, xx, training=True)[0] * g)

    return jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize(
    ("averaging", "running_var"),
    [("ema", "biased"), ("debiased", "unbiased"), ("cumulative", "biased")],
)
def test_ghost_matches_reference(averaging, running_var, maybe_jit):
    x, g, scale, bias = _setup()
    k = 4
    bn = bnjax.BatchNorm(
        momentum=0.8, virtual_batch_size=k, averaging=averaging, running_var=running_var
    )
    params, state = bn.init(x)
    params = _params(bn, scale, bias)
    step = maybe_jit(bn.apply, static_argnames=("training",))
    grads = maybe_jit(_grads, static_argnums=0)
    running, t = [np.zeros(3), np.ones(3)], 0
    for step_i in range(2):
        xs = x + step_i
        y_ref, dx_ref, ds_ref, db_ref, stats = ghost_ref(xs, g, scale, bias, 1e-5, k)
        d_params, dx = grads(bn, params, state, jnp.asarray(xs), jnp.asarray(g))
        y, state = step(params, state, xs, training=True)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d_params.scale, ds_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d_params.bias, db_ref, rtol=1e-5, atol=1e-5)
        for n, mu, var in stats:  # the chunks arrive one after another
            if running_var == "unbiased":
                var = var * n / (n - 1)
            w = {"ema": 0.2, "cumulative": 1 / (t + 1)}.get(averaging)
            if w is None:
                w = 0.2 / (1 - 0.8 ** (t + 1))
            running = [r + w * (b - r) for r, b in zip(running, (mu, var), strict=True)]
            t += 1
        np.testing.assert_allclose(state.mean, running[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.var, running[1], rtol=1e-5, atol=1e-6)
    assert int(state.count) == 2 * (len(x) // k)


def test_one_chunk_is_plain_batch_norm():
    x, g, scale, bias = _setup(1)
    bn = bnjax.BatchNorm(virtual_batch_size=len(x))
    params, state = bn.init(x)
    y, new = bn.apply(_params(bn, scale, bias), state, x, training=True)
    y_ref, *_, (_, mu, var) = bn_ref(x, g, scale, bias, 1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, 0.01 * mu, rtol=1e-5, atol=1e-7)
    assert int(new.count) == 1


def test_ghost_with_mask_and_image_layout(maybe_jit):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(6, 2, 2, 3)) * 2 + 1).astype(np.float32)
    mask = rng.uniform(size=(6, 2, 2)) > 0.3
    mask[:, 0, 0] = True
    bn = bnjax.BatchNorm(virtual_batch_size=3, momentum=0.5)
    params, state = bn.init(x)
    apply = maybe_jit(bn.apply, static_argnames=("training",))
    x_nan = np.where(mask[..., None], x, np.nan).astype(np.float32)
    y, new = apply(params, state, x_nan, training=True, mask=jnp.asarray(mask))
    mean, var = np.zeros(3), np.ones(3)
    for i in (0, 3):
        rows = x[i : i + 3].astype(np.float64)[mask[i : i + 3]]  # (counted, C)
        mu, v = rows.mean(0), rows.var(0)
        expected = (x[i : i + 3] - mu) / np.sqrt(v + 1e-5)
        got = np.asarray(y)[i : i + 3]
        np.testing.assert_allclose(got[mask[i : i + 3]], expected[mask[i : i + 3]], atol=1e-5)
        mean, var = 0.5 * mean + 0.5 * mu, 0.5 * var + 0.5 * v
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, var, rtol=1e-5, atol=1e-6)


def test_ghost_with_renorm():
    x, g, scale, bias = _setup(3)
    bn = bnjax.BatchNorm(virtual_batch_size=6, renorm=bnjax.Renorm(rmax=1.2, dmax=0.2))
    params, state = bn.init(x)
    state = state._replace(mean=jnp.full(3, 1.0), var=jnp.full(3, 2.0))
    y, _ = bn.apply(_params(bn, scale, bias), state, x, training=True)
    for i in (0, 6):
        xc = x[i : i + 6].astype(np.float64)
        mu, var = xc.mean(0), xc.var(0)
        sb, s = np.sqrt(var + 1e-5), np.sqrt(2.0 + 1e-5)
        r, d = np.clip(sb / s, 1 / 1.2, 1.2), np.clip((mu - 1.0) / s, -0.2, 0.2)
        expected = ((xc - mu) / sb * r + d) * scale + bias
        np.testing.assert_allclose(np.asarray(y)[i : i + 6], expected, rtol=1e-5, atol=1e-5)


def test_across_devices_chunk_i_of_every_device_is_one_virtual_batch():
    x, g, scale, bias = _setup(7, n=16)
    mesh = jax.make_mesh((4,), ("d",))
    bn = bnjax.BatchNorm(axis_name="d", virtual_batch_size=2, momentum=0.5)
    params, state = bn.init(x)
    params = _params(bn, scale, bias)

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
    # Device j holds rows 4j..4j+3; virtual batch i is rows 4j+2i, 4j+2i+1 of every j.
    order = np.array([4 * j + 2 * i + r for i in range(2) for j in range(4) for r in range(2)])
    y_ref, dx_ref, ds_ref, db_ref, stats = ghost_ref(x[order], g[order], scale, bias, 1e-5, 8)
    np.testing.assert_allclose(np.asarray(y)[order], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx)[order], dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_params.scale, ds_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_params.bias, db_ref, rtol=1e-5, atol=1e-5)
    mean = 0.5 * (0.5 * 0 + 0.5 * stats[0][1]) + 0.5 * stats[1][1]
    np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
    assert int(new.count) == 2


def test_virtual_batches_of_one_element_warn():
    """Chunks of one row (no other reduced axis): each chunk normalizes to its bias, which
    warns as the whole-batch case does; chunks of two rows do not."""
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)
    bn = bnjax.BatchNorm(virtual_batch_size=1)
    params, state = bn.init(x)
    params = params._replace(bias=jnp.asarray([0.5, -1.0, 2.0], jnp.float32))
    with pytest.warns(UserWarning, match="virtual batch.*equals bias"):
        y, _ = bn.apply(params, state, x, training=True)
    np.testing.assert_array_equal(y, jnp.broadcast_to(params.bias, x.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnjax.BatchNorm(virtual_batch_size=2).apply(params, state, x, training=True)
        bnjax.BatchNorm(virtual_batch_size=1).apply(
            params, state, x.reshape(2, 2, 3), training=True
        )


def test_inference_accepts_any_batch_size():
    x, _, scale, bias = _setup(4, n=7)
    bn = bnjax.BatchNorm(virtual_batch_size=4, momentum=0.5)
    params, state = bn.init(x)
    state = state._replace(mean=jnp.full(3, 0.5), var=jnp.full(3, 4.0))
    y, same = bn.apply(_params(bn, scale, bias), state, x, training=False)
    np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(4.0 + 1e-5) * scale + bias, atol=1e-5)
    assert same is state
    _, new = bn.apply(params, state, x, training=False, update_stats=True)  # whole batch
    np.testing.assert_allclose(new.mean, 0.25 + 0.5 * x.astype(np.float64).mean(0), atol=1e-6)
    assert int(new.count) == 1


def test_frozen_state_is_returned_as_is():
    x, *_ = _setup(5)
    bn = bnjax.BatchNorm(virtual_batch_size=3)
    params, state = bn.init(x)
    _, same = bn.apply(params, state, x, training=True, update_stats=False)
    assert same is state


def test_batch_not_divisible_is_an_error():
    x, *_ = _setup(6, n=10)
    bn = bnjax.BatchNorm(virtual_batch_size=4)
    params, state = bn.init(x)
    with pytest.raises(ValueError, match="virtual_batch_size=4"):
        bn.apply(params, state, x, training=True)


def test_batch_axis_must_not_be_a_feature_axis():
    bn = bnjax.BatchNorm(axis=0, virtual_batch_size=2)
    params, state = bn.init((4, 3))
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        bn.apply(params, state, jnp.ones((4, 3)), training=True)


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (2.0, TypeError), (True, TypeError), ("4", TypeError)]
)
def test_invalid_virtual_batch_size(value, error):
    with pytest.raises(error, match="virtual_batch_size"):
        bnjax.BatchNorm(virtual_batch_size=value)


@pytest.mark.slow
@settings(max_examples=12)
@given(
    chunks=st.integers(1, 4),
    k=st.integers(2, 5),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    steps=st.integers(1, 2),
    loc=st.sampled_from([0.0, 1.0, 1e3]),  # centred to offset: mean / std 0 to 3e2
    seed=st.integers(0, 2**16),
)
def test_state_threading_property(chunks, k, momentum, steps, loc, seed):
    rng = np.random.default_rng(seed)
    bn = bnjax.BatchNorm(virtual_batch_size=k, momentum=momentum)
    params, state = bn.init((chunks * k, 2))
    step = jax.jit(bn.apply, static_argnames=("training",))
    mean, var = np.zeros(2), np.ones(2)
    for _ in range(steps):
        x = (rng.normal(size=(chunks * k, 2)) * 3 + loc).astype(np.float32)
        _, state = step(params, state, x, training=True)
        for i in range(0, chunks * k, k):
            xc = x[i : i + k].astype(np.float64)
            mean = momentum * mean + (1 - momentum) * xc.mean(0)
            var = momentum * var + (1 - momentum) * xc.var(0)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(state.var, var, rtol=1e-5, atol=1e-5)
    assert int(state.count) == chunks * steps


def test_ghost_with_a_mask_shared_by_every_row(maybe_jit):
    """A mask whose axis 0 has size 1 applies to every chunk alike (a survivor of the
    mutation run: the chunking of such a mask was never exercised)."""
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(6, 4, 3)) * 2 + 1).astype(np.float32)
    mask = np.array([[True, False, True, True]])[..., None]  # (1, 4, 1): position 1 left out
    bn = bnjax.BatchNorm(virtual_batch_size=3, momentum=0.0)
    params, state = bn.init(x)
    apply = maybe_jit(bn.apply, static_argnames=("training",))
    y, new = apply(params, state, x, training=True, mask=jnp.asarray(mask))
    keep = mask[0, :, 0]
    for i in (0, 3):
        rows = x[i : i + 3][:, keep].astype(np.float64).reshape(-1, 3)
        mu, v = rows.mean(0), rows.var(0)
        expected = (x[i : i + 3] - mu) / np.sqrt(v + 1e-5)
        np.testing.assert_allclose(np.asarray(y)[i : i + 3][:, keep], expected[:, keep],
                                   atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(new.mean, mu, rtol=1e-5, atol=1e-6)  # momentum 0: last chunk
