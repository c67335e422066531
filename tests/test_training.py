"""Train and eval steps: state threading, float64 references, vmap ensembles, data parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax.training import TrainState, make_eval_step, make_train_step

FEATURES, HIDDEN = 5, 4
EPS = 1e-3


def make_model(axis_name=None):
    """A linear layer, BatchNorm and a linear head: ``(batch, 5) -> (batch,)``."""
    bn = bnjax.BatchNorm(momentum=0.9, epsilon=EPS, axis_name=axis_name)

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        bn_params, bn_state = bn.init((1, HIDDEN))
        bn_params = bn_params._replace(scale=1.0 + 0.1 * jax.random.normal(k3, (HIDDEN,)))
        params = {
            "w": jax.random.normal(k1, (FEATURES, HIDDEN)) / np.sqrt(FEATURES),
            "bn": bn_params,
            "v": jax.random.normal(k2, (HIDDEN,)),
        }
        return params, bn_state

    def apply(params, bn_state, x, *, training):
        h, bn_state = bn.apply(params["bn"], bn_state, x @ params["w"], training=training)
        return jnp.tanh(h) @ params["v"], bn_state

    return init, apply


def mse(outputs, batch):
    return jnp.mean(jnp.square(outputs - batch["y"]))


def make_batch(key, n=16):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, FEATURES)) * 2.0 + 1.0
    return {"x": x, "y": jax.random.normal(ky, (n,))}


# -- float64 numpy reference --------------------------------------------------------


def ref_forward(p, x, mean, var, training):
    """The model in float64; returns (outputs, batch mean, biased batch variance)."""
    h = x @ p["w"]
    if training:
        mean, var = h.mean(0), h.var(0)
    y = (h - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]
    return np.tanh(y) @ p["v"], mean, var


def ref_loss(p, batch):
    out, _, _ = ref_forward(p, batch["x"], None, None, True)
    return np.mean((out - batch["y"]) ** 2)


def ref_grad(p, batch, h=1e-6):
    """Central finite differences of the float64 loss."""
    grads = {}
    for name, value in p.items():
        g = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            plus = {**p, name: value.copy()}
            minus = {**p, name: value.copy()}
            plus[name][i] += h
            minus[name][i] -= h
            g[i] = (ref_loss(plus, batch) - ref_loss(minus, batch)) / (2 * h)
        grads[name] = g
    return grads


def flat64(params):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    bn = params["bn"]
    return {"w": f(params["w"]), "v": f(params["v"]), "scale": f(bn.scale), "bias": f(bn.bias)}


def batch64(batch):
    return {k: np.asarray(v, np.float64) for k, v in batch.items()}


# -- tests --------------------------------------------------------------------------


def test_train_step_matches_float64_sgd(maybe_jit):
    init, apply = make_model()
    params, bn_state = init(jax.random.key(0))
    state = TrainState.create(params, bn_state, optax.sgd(0.1))
    step = maybe_jit(make_train_step(apply, mse, optax.sgd(0.1)))
    p, mean, var = flat64(params), np.zeros(HIDDEN), np.ones(HIDDEN)
    for i in range(3):
        batch = make_batch(jax.random.key(10 + i))
        b64 = batch64(batch)
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["loss"], ref_loss(p, b64), rtol=1e-5)
        _, bm, bv = ref_forward(p, b64["x"], None, None, True)
        mean, var = 0.9 * mean + 0.1 * bm, 0.9 * var + 0.1 * bv
        grads = ref_grad(p, b64)
        p = {k: p[k] - 0.1 * grads[k] for k in p}
        got = flat64(state.params)
        for k in p:
            np.testing.assert_allclose(got[k], p[k], rtol=2e-4, atol=2e-5, err_msg=k)
        np.testing.assert_allclose(state.bn_state.mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.bn_state.var, var, rtol=1e-4, atol=1e-5)
    assert int(state.step) == 3 and int(state.bn_state.count) == 3


def test_eval_step_uses_running_statistics_and_never_changes_state(maybe_jit):
    init, apply = make_model()
    params, bn_state = init(jax.random.key(1))
    state = TrainState.create(params, bn_state, optax.sgd(0.05, momentum=0.9))
    train = jax.jit(make_train_step(apply, mse, optax.sgd(0.05, momentum=0.9)))
    for i in range(4):
        state, _ = train(state, make_batch(jax.random.key(i)))
    before = jax.tree.map(np.array, state)
    evaluate = maybe_jit(make_eval_step(apply, mse))
    batch = make_batch(jax.random.key(99))
    metrics = evaluate(state, batch)
    b64 = batch64(batch)
    mean, var = (np.asarray(a, np.float64) for a in state.bn_state[:2])
    out, _, _ = ref_forward(flat64(state.params), b64["x"], mean, var, False)
    np.testing.assert_allclose(metrics["loss"], np.mean((out - b64["y"]) ** 2), rtol=1e-5)
    assert list(metrics) == ["loss"]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state.bn_state.count) == 4


@pytest.mark.slow
def test_metric_fn_dicts_and_train_metrics(maybe_jit):
    init, apply = make_model()
    params, bn_state = init(jax.random.key(2))
    state = TrainState.create(params=params, bn_state=bn_state, optimizer=optax.sgd(0.1))

    def metric_fn(outputs, batch):
        return {"mae": jnp.mean(jnp.abs(outputs - batch["y"]))}

    batch = make_batch(jax.random.key(3))
    step = maybe_jit(make_train_step(apply, mse, optax.sgd(0.1), metric_fn=metric_fn))
    _, metrics = step(state, batch)
    out, _, _ = ref_forward(flat64(params), batch64(batch)["x"], None, None, True)
    np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(out - batch64(batch)["y"])), 1e-5)
    assert set(metrics) == {"loss", "mae"}
    assert set(maybe_jit(make_eval_step(apply, metric_fn))(state, batch)) == {"mae"}
    # A scalar metric joins the train metrics as "metric", beside (not over) the loss.
    scalar = make_train_step(apply, mse, optax.sgd(0.1), metric_fn=lambda o, b: mse(o, b) * 2)
    _, metrics = maybe_jit(scalar)(state, batch)
    assert set(metrics) == {"loss", "metric"}
    np.testing.assert_allclose(metrics["metric"], 2 * metrics["loss"], rtol=1e-6)
    both = make_train_step(apply, mse, optax.sgd(0.1), metric_fn=lambda o, b: {"loss": 0.0})
    assert float(maybe_jit(both)(state, batch)[1]["loss"]) == float(metrics["loss"])


@pytest.mark.slow
def test_donated_jit_step_equals_plain_step():
    init, apply = make_model()
    params, bn_state = init(jax.random.key(4))
    make = lambda: TrainState.create(params, bn_state, optax.sgd(0.05, momentum=0.9))  # noqa: E731
    raw = make_train_step(apply, mse, optax.sgd(0.05, momentum=0.9))
    donated = jax.jit(raw, donate_argnums=0)
    plain = jax.jit(raw)
    a, b = make(), make()
    for i in range(3):
        batch = make_batch(jax.random.key(i))
        a, _ = donated(jax.tree.map(jnp.copy, a), batch)
        b, _ = plain(b, batch)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_vmap_ensemble_equals_members_trained_alone():
    init, apply = make_model()
    members, steps = 3, 3
    opt = optax.sgd(0.05, momentum=0.9)
    create = lambda key: TrainState.create(*init(key), opt)  # noqa: E731
    keys = jax.random.split(jax.random.key(5), members)
    batches = [
        jax.vmap(make_batch)(jax.random.split(jax.random.key(50 + s), members))
        for s in range(steps)
    ]
    step = make_train_step(apply, mse, opt)
    ensemble = jax.vmap(create)(keys)
    vstep = jax.jit(jax.vmap(step))
    for batch in batches:
        ensemble, metrics = vstep(ensemble, batch)
    assert metrics["loss"].shape == (members,)
    solo_step = jax.jit(step)
    for m in range(members):
        solo = create(keys[m])
        for batch in batches:
            solo, solo_metrics = solo_step(solo, jax.tree.map(lambda a, m=m: a[m], batch))
        np.testing.assert_allclose(metrics["loss"][m], solo_metrics["loss"], rtol=1e-6)
        member = jax.tree.map(lambda a, m=m: a[m], ensemble)
        for x, y in zip(jax.tree.leaves(member), jax.tree.leaves(solo), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(ensemble.bn_state.count) == steps)


def _one_device_run(steps, batches, opt):
    init, apply = make_model()
    state = TrainState.create(*init(jax.random.key(6)), opt)
    step = jax.jit(make_train_step(apply, mse, opt))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, np.asarray(losses)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 8
    return jax.make_mesh((8,), ("data",))


@pytest.mark.slow
@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "no_check_vma"])
def test_shard_map_data_parallel_equals_one_device(mesh, check_vma):
    opt, steps = optax.sgd(0.05, momentum=0.9), 3
    batches = [make_batch(jax.random.key(70 + s), n=32) for s in range(steps)]
    expected, expected_losses = _one_device_run(steps, batches, opt)
    init, apply = make_model(axis_name="data")
    state = TrainState.create(*init(jax.random.key(6)), opt)
    step = make_train_step(apply, mse, opt, axis_name="data")
    specs = dict(in_specs=(P(), P("data")), out_specs=(P(), P()), check_vma=check_vma)
    sharded = jax.jit(jax.shard_map(step, mesh=mesh, **specs))
    put = lambda t, spec: jax.device_put(t, NamedSharding(mesh, spec))  # noqa: E731
    state = put(state, P())
    losses = []
    for batch in batches:
        state, metrics = sharded(state, put(batch, P("data")))
        losses.append(metrics["loss"])
    np.testing.assert_allclose(np.asarray(losses), expected_losses, rtol=1e-5)
    _assert_trees_close(state, expected)
    evaluate = jax.jit(
        jax.shard_map(
            make_eval_step(apply, mse, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P("data")),
            out_specs=P(),
            check_vma=check_vma,
        )
    )
    got = evaluate(state, put(batches[0], P("data")))["loss"]
    want = jax.jit(make_eval_step(make_model()[1], mse))(expected, batches[0])["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_pmap_data_parallel_equals_one_device():
    opt, steps, devices = optax.sgd(0.05, momentum=0.9), 2, 8
    batches = [make_batch(jax.random.key(90 + s), n=32) for s in range(steps)]
    expected, expected_losses = _one_device_run(steps, batches, opt)
    init, apply = make_model(axis_name="data")
    state = TrainState.create(*init(jax.random.key(6)), opt)
    state = jax.tree.map(lambda a: np.broadcast_to(a, (devices, *np.shape(a))), state)
    step = jax.pmap(make_train_step(apply, mse, opt, axis_name="data"), axis_name="data")
    for batch, want in zip(batches, expected_losses, strict=True):
        split = jax.tree.map(lambda a: np.reshape(a, (devices, -1, *a.shape[1:])), batch)
        state, metrics = step(state, split)
        np.testing.assert_allclose(metrics["loss"], np.full(devices, want), rtol=1e-5)
    _assert_trees_close(jax.tree.map(lambda a: a[devices - 1], state), expected)


@pytest.mark.slow
def test_jit_over_sharded_batch_equals_one_device(mesh):
    opt, steps = optax.sgd(0.05, momentum=0.9), 3
    batches = [make_batch(jax.random.key(80 + s), n=32) for s in range(steps)]
    expected, expected_losses = _one_device_run(steps, batches, opt)
    init, apply = make_model()
    state = TrainState.create(*init(jax.random.key(6)), opt)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    step = jax.jit(make_train_step(apply, mse, opt), donate_argnums=0)
    losses = []
    for batch in batches:
        batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
        assert len(batch["x"].sharding.device_set) == 8
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    np.testing.assert_allclose(np.asarray(losses), expected_losses, rtol=1e-5)
    _assert_trees_close(state, expected)


def test_errors_name_the_argument():
    init, apply = make_model()
    params, bn_state = init(jax.random.key(0))
    state = TrainState.create(params, bn_state, optax.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation"):
        TrainState.create(params, bn_state, optimizer="sgd")
    with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation"):
        make_train_step(apply, mse, object())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        make_train_step(apply, "mse", optax.sgd(0.1))
    with pytest.raises(TypeError, match="model_apply must be callable"):
        make_eval_step(None, mse)
    with pytest.raises(TypeError, match="metric_fn must be callable"):
        make_train_step(apply, mse, optax.sgd(0.1), metric_fn=3)
    step = make_train_step(apply, mse, optax.sgd(0.1))
    with pytest.raises(TypeError, match='batch must be a dict with at least the key "x"'):
        step(state, {"inputs": jnp.ones((4, FEATURES))})
    with pytest.raises(TypeError, match='batch must be a dict with at least the key "x"'):
        step(state, jnp.ones((4, FEATURES)))
    evaluate = make_eval_step(apply, lambda out, batch: out)
    with pytest.raises(ValueError, match="metric_fn must return a scalar or a dict"):
        evaluate(state, make_batch(jax.random.key(0)))
