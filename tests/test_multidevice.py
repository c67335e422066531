"""Statistics across devices are exact: 8 forced CPU devices equal one device seeing it all.

``shard_map`` with ``axis_name`` and uneven masks (one device fully masked), ``vmap`` with
``axis_name`` over single examples, plain ``jax.jit`` over a sharded batch without
``axis_name``, and ``axis_index_groups``; outputs, new state and gradients are compared
with the float64 references and with the single-device call.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import running_stats, train_forward

import bnjax

EPS = 1e-3
DEVICES = 8
PER_DEVICE = 4
RNG = np.random.default_rng(0)
X = RNG.normal(2.0, 3.0, (DEVICES * PER_DEVICE, 3)).astype(np.float32)
G = RNG.normal(size=X.shape).astype(np.float32)
# Uneven counts per device: 4, 3, 2, 1, 0 (device 4 fully masked), 4, 2, 3.
MASK = np.concatenate([np.arange(PER_DEVICE) < c for c in (4, 3, 2, 1, 0, 4, 2, 3)])


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= DEVICES, "conftest forces 8 CPU devices"
    return jax.make_mesh((DEVICES,), ("d",))


def _put(mesh, a, spec):
    return jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))


def _loss_and_grads(bn, params, state, x, g, mask):
    """``(y, new_state)`` and the gradients of ``sum(g * y)`` wrt ``x`` and ``params``."""

    def loss(x, params):
        y, new = bn.apply(params, state, x, training=True, mask=mask)
        return jnp.sum(g * y), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, new, grads


def _single_device(bn, params, state, mask):
    one = dataclasses.replace(bn, axis_name=None, axis_index_groups=None)
    return jax.jit(functools.partial(_loss_and_grads, one))(
        params, state, jnp.asarray(X), jnp.asarray(G), None if mask is None else jnp.asarray(mask)
    )


def _sharded_step(bn, mesh):
    """``apply`` and its gradients under ``shard_map``: x, g and mask split over ``d``."""

    def body(params, state, x, g, mask):
        y, new = bn.apply(params, state, x, training=True, mask=mask)
        return y, new

    def loss(params, state, x, g, mask):
        y, new = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d"), P("d")),
            out_specs=(P("d"), P()),
        )(params, state, x, g, mask)
        return jnp.sum(g * y), (y, new)

    grad = jax.value_and_grad(loss, argnums=(2, 0), has_aux=True)
    return jax.jit(lambda *args: grad(*args))


def _assert_close(got, want):
    # float32 sums over 32 elements of O(1) values against float64: a few ulps.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


def _textbook_grads(x, g, mask):
    """float64 gradients of ``sum(g * y)`` for unit scale and zero bias (autodiff)."""
    with jax.enable_x64(True):
        w = jnp.asarray(mask)[:, None]

        def loss(x, scale, bias):
            n = jnp.sum(w, 0, dtype=jnp.float64)
            mean = jnp.sum(jnp.where(w, x, 0.0), 0) / n
            var = jnp.sum(jnp.where(w, (x - mean) ** 2, 0.0), 0) / n
            y = (x - mean) / jnp.sqrt(var + EPS) * scale + bias
            return jnp.sum(jnp.asarray(g, jnp.float64) * y)

        args = (jnp.asarray(x, jnp.float64), jnp.ones(3), jnp.zeros(3))
        return [np.asarray(a) for a in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)]


@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_with_uneven_masks_equals_one_device(mesh, masked):
    bn = bnjax.BatchNorm(epsilon=EPS, axis_name="d", running_var="unbiased", momentum=0.5)
    params, state = bn.init(X)
    mask = MASK if masked else np.ones(len(X), bool)
    step = _sharded_step(bn, mesh)
    (_, (y, new)), (dx, dparams) = step(
        params, state, _put(mesh, X, P("d")), _put(mesh, G, P("d")), _put(mesh, mask, P("d"))
    )
    counted = mask[:, None]
    want_y = train_forward(X, EPS, mask=mask)
    _assert_close(np.where(counted, y, 0), np.where(counted, want_y, 0))
    mean, var = running_stats(
        [X], momentum=0.5, averaging="ema", running_var="unbiased", masks=[mask]
    )
    _assert_close(new.mean, mean)
    _assert_close(new.var, var)
    assert int(new.count) == 1
    want_dx, want_dscale, want_dbias = _textbook_grads(X, G, mask)
    _assert_close(dx, want_dx)
    _assert_close(dparams.scale, want_dscale)
    _assert_close(dparams.bias, want_dbias)
    # The same numbers as one device running the whole batch, to float32 rounding.
    y1, new1, (dx1, dparams1) = _single_device(bn, params, state, mask)
    np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-6)
    _assert_same(new, new1)
    _assert_same((dx, dparams), (dx1, dparams1))


def _assert_same(tree, single):
    # Same maths in another summation order: equal to float32 rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), tree, single)


def test_vmap_with_axis_name_over_examples_equals_batched(maybe_jit):
    bn = bnjax.BatchNorm(epsilon=EPS, axis_name="batch", momentum=0.9)
    params, state = bn.init(X)
    x = X[:6]
    mask = np.array([True, False, True, True, False, True])

    def one_example(params, state, x, m):
        return bn.apply(params, state, x[None], training=True, mask=m[None])

    vmapped = jax.vmap(one_example, in_axes=(None, None, 0, 0), axis_name="batch")
    y, new = maybe_jit(vmapped)(params, state, jnp.asarray(x), jnp.asarray(mask))
    want = train_forward(x, EPS, mask=mask)
    _assert_close(np.where(mask[:, None], y[:, 0], 0), np.where(mask[:, None], want, 0))
    mean, var = running_stats(
        [x], momentum=0.9, averaging="ema", running_var="biased", masks=[mask]
    )
    for i in range(len(x)):  # every example returns the same, batch-wide, state
        _assert_close(new.mean[i], mean)
        _assert_close(new.var[i], var)
    np.testing.assert_array_equal(new.count, 1)
    one = dataclasses.replace(bn, axis_name=None)
    y1, new1 = maybe_jit(functools.partial(one.apply, training=True))(
        params, state, jnp.asarray(x), mask=jnp.asarray(mask)
    )
    _assert_same(y[:, 0], y1)
    _assert_same(jax.tree.map(lambda a: a[0], new), new1)


def test_jit_over_sharded_batch_without_axis_name_equals_one_device(mesh):
    bn = bnjax.BatchNorm(epsilon=EPS, momentum=0.5)
    params, state = bn.init(X)
    grads = jax.jit(functools.partial(_loss_and_grads, bn))
    sharded = [_put(mesh, a, P("d")) for a in (X, G, MASK)]
    y, new, (dx, dparams) = grads(params, state, *sharded)
    assert y.sharding.spec[0] == "d"  # the computation really ran sharded
    counted = MASK[:, None]
    _assert_close(np.where(counted, y, 0), np.where(counted, train_forward(X, EPS, mask=MASK), 0))
    mean, var = running_stats(
        [X], momentum=0.5, averaging="ema", running_var="biased", masks=[MASK]
    )
    _assert_close(new.mean, mean)
    _assert_close(new.var, var)
    want_dx, want_dscale, want_dbias = _textbook_grads(X, G, MASK)
    _assert_close(dx, want_dx)
    _assert_close(dparams.scale, want_dscale)
    _assert_close(dparams.bias, want_dbias)
    y1, new1, grads1 = _single_device(bn, params, state, MASK)
    _assert_same((y, new, (dx, dparams)), (y1, new1, grads1))


def test_axis_index_groups_give_per_group_statistics():
    # JAX 0.10 implements axis_index_groups for pmap collectives only (shard_map and vmap
    # raise NotImplementedError), so this runs under pmap over the 8 devices.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    bn = bnjax.BatchNorm(epsilon=EPS, axis_name="d", axis_index_groups=groups, momentum=0.0)
    params, state = bn.init(X)

    def body(params, state, x, mask):
        return bn.apply(params, state, x, training=True, mask=mask)

    run = jax.pmap(body, axis_name="d", in_axes=(None, None, 0, 0))
    y, new = run(
        params,
        state,
        jnp.asarray(X).reshape(DEVICES, PER_DEVICE, 3),
        jnp.asarray(MASK).reshape(DEVICES, PER_DEVICE),
    )
    y = np.asarray(y).reshape(X.shape)
    half = len(X) // 2
    for k, rows in enumerate((slice(0, half), slice(half, None))):
        x, m = X[rows], MASK[rows]
        want = train_forward(x, EPS, mask=m)
        _assert_close(np.where(m[:, None], y[rows], 0), np.where(m[:, None], want, 0))
        mean, var = running_stats(
            [x], momentum=0.0, averaging="ema", running_var="biased", masks=[m]
        )
        for d in groups[k]:  # momentum 0: the state is this group's batch statistics
            _assert_close(new.mean[d], mean)
            _assert_close(new.var[d], var)


def _unmasked_data(kind):
    """``(x, g)`` of shape (32, 3): centred, offset, or devices that would choose apart."""
    rng = np.random.default_rng([7, len(kind)])
    z = rng.standard_normal((DEVICES * PER_DEVICE, 3))
    if kind == "offset":
        x = 1e3 + 0.1 * z
    elif kind == "mixed":
        # Devices 0-3 hold N(0, 1) (well conditioned alone), devices 4-7 N(6, 1) (mean**2 >
        # 4 var alone); together mean 3, var 10: every device must take the global choice.
        x = z + np.repeat([0.0, 6.0], DEVICES * PER_DEVICE // 2)[:, None]
    else:
        x = 2.0 + 3.0 * z
    return x.astype(np.float32), rng.standard_normal(x.shape).astype(np.float32)


def _unmasked_run(transform, bn, params, state, x, g, mesh):
    """``(y, new_state, dx)`` of one training call of ``bn`` (axis_name "d") under
    ``transform``, with ``dx`` the gradient of ``sum(g * y)``; x split 8 ways."""

    def body(x, g):
        def loss(x):
            y, new = bn.apply(params, state, x, training=True)
            return jnp.sum(g * y), (y, new)

        (_, (y, new)), dx = jax.value_and_grad(loss, has_aux=True)(x)
        return y, new, dx

    if transform == "shard_map":
        run = jax.shard_map(
            body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=(P("d"), P(), P("d"))
        )
        return jax.jit(run)(_put(mesh, x, P("d")), _put(mesh, g, P("d")))
    split = lambda a: jnp.asarray(a).reshape(DEVICES, PER_DEVICE, -1)  # noqa: E731
    mapped = (
        jax.pmap(body, axis_name="d")
        if transform == "pmap"
        else jax.jit(jax.vmap(body, axis_name="d"))
    )
    y, new, dx = mapped(split(x), split(g))
    return y.reshape(x.shape), jax.tree.map(lambda a: a[0], new), dx.reshape(x.shape)


# make test runs "mixed" data (devices that would choose apart) with the "auto" choice
# (centred and offset data: on one device in test_statistics.py); make test-all all six.
@pytest.mark.parametrize("statistics", ["auto", pytest.param("branchless", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("centred", marks=pytest.mark.slow),
        pytest.param("offset", marks=pytest.mark.slow),
        "mixed",
    ],
)
@pytest.mark.parametrize("transform", ["shard_map", "pmap", "vmap"])
def test_unmasked_axis_name_equals_one_device(mesh, transform, kind, statistics):
    """No mask (the path a per-device average of moments would break): exact against
    float64 and equal to one device seeing the whole batch."""
    x, g = _unmasked_data(kind)
    bn = bnjax.BatchNorm(epsilon=EPS, axis_name="d", momentum=0.0, statistics=statistics)
    params, state = bn.init(x)
    y, new, dx = _unmasked_run(transform, bn, params, state, x, g, mesh)
    mask = np.ones(len(x), bool)
    scale = np.std(x.astype(np.float64), 0)  # compare in units of the spread
    want_y = train_forward(x, EPS)
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, atol=2e-5)
    mean, var = running_stats([x], momentum=0.0, averaging="ema", running_var="biased")
    np.testing.assert_allclose(new.var, var, rtol=1e-5)
    err = np.abs(np.asarray(new.mean, np.float64) - mean)
    assert np.all(err <= 6e-8 * np.abs(mean) + 1e-6 * scale), err  # float32's rounding
    want_dx = _textbook_grads(x, g, mask)[0]
    np.testing.assert_allclose(np.asarray(dx) * scale, want_dx * scale, atol=2e-5)
    one = dataclasses.replace(bn, axis_name=None)
    y1, new1 = jax.jit(lambda p, s, x: one.apply(p, s, x, training=True))(params, state, x)
    np.testing.assert_allclose(y, y1, atol=2e-5)
    np.testing.assert_allclose(new.var, new1.var, rtol=1e-5)


@pytest.mark.parametrize("where", ["shard_map", "vmap"])
def test_axis_index_groups_outside_pmap_says_what_to_do(mesh, where):
    """JAX raised a bare ``NotImplementedError`` with an empty message under shard_map."""
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    bn = bnjax.BatchNorm(axis_name="d", axis_index_groups=groups)
    params, state = bn.init(X)

    def body(x):
        return bn.apply(params, state, x, training=True)[0]

    if where == "shard_map":
        run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
        x = _put(mesh, X, P("d"))
    else:
        run = jax.vmap(body, axis_name="d")
        x = jnp.asarray(X).reshape(DEVICES, PER_DEVICE, 3)
    with pytest.raises(NotImplementedError, match=r"axis_index_groups=.*only under jax.pmap") as e:
        run(x)
    # JAX's own words at the end, or "no message" for its empty one.
    assert re.search(r"\(NotImplementedError: \S[^)]*\)$", str(e.value)), str(e.value)
