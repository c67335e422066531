"""``bnjax.BatchNorm``: the init/apply contract, every field and mode, against float64 numpy."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import full_mask, moments, normalize, running_average, running_stats, train_forward

import bnjax

RNG = np.random.default_rng(0)
X = RNG.normal(2.0, 3.0, (8, 3)).astype(np.float32)
LAYOUTS = {  # name: (shape, axis)
    "channels_last": ((8, 3), -1),
    "nchw": ((4, 3, 2, 2), 1),
    "tuple_axes": ((5, 3, 4), (1, 2)),
}


def _call(bn, maybe_jit, **kwargs):
    """``bn.apply`` with keyword settings bound, eager or jitted (the mask is an argument)."""

    def run(params, state, x, mask=None):
        return bn.apply(params, state, x, mask=mask, **kwargs)

    return maybe_jit(run)


def _state(mean, var, count=3):
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return bnjax.BatchNormState(f32(mean), f32(var), jnp.asarray(count, jnp.int32))


def _assert_y(y, want):
    # float32 normalization of O(1) values: a few ulps.
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)


def _assert_state(state, mean, var, count):
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, var, rtol=1e-5, atol=1e-6)
    assert int(state.count) == count


def test_config_is_frozen_hashable_and_static():
    bn = bnjax.BatchNorm(axis=(1, 2), momentum=0.9, epsilon=1e-3, averaging="debiased")
    assert bn == bnjax.BatchNorm(axis=[1, 2], momentum=0.9, epsilon=1e-3, averaging="debiased")
    assert hash(bn) == hash(dataclasses.replace(bn))
    assert "averaging='debiased'" in repr(bn)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bn.momentum = 0.5
    assert dataclasses.replace(bn, momentum=0.5).momentum == 0.5
    f = jax.jit(lambda bn, x: bn.init(x)[1].mean, static_argnames="bn")
    assert f(bn, jnp.zeros((2, 3, 4))).shape == (3, 4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_init_defaults(layout):
    shape, axis = LAYOUTS[layout]
    bn = bnjax.BatchNorm(axis=axis)
    feat = tuple(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    for arg in (jnp.zeros(shape), shape, list(shape)):
        params, state = bn.init(arg)
        np.testing.assert_array_equal(params.scale, np.ones(feat))
        np.testing.assert_array_equal(params.bias, np.zeros(feat))
        np.testing.assert_array_equal(state.mean, np.zeros(feat))
        np.testing.assert_array_equal(state.var, np.ones(feat))
        assert params.scale.dtype == params.bias.dtype == state.mean.dtype == jnp.float32
        assert state.count.shape == () and state.count.dtype == jnp.int32
        assert int(state.count) == 0
    assert bnjax.BatchNormState._fields == ("mean", "var", "count")
    assert bnjax.BatchNormParams._fields == ("scale", "bias")


def test_init_options():
    params, state = bnjax.BatchNorm(center=False, scale=False).init((4, 3))
    assert params.scale is None and params.bias is None
    params, state = bnjax.BatchNorm(param_dtype=jnp.bfloat16).init((4, 3))
    assert params.scale.dtype == params.bias.dtype == jnp.bfloat16
    assert state.mean.dtype == state.var.dtype == jnp.float32


def test_initializers_with_key():
    seen = []

    def recording(key, shape, dtype):
        seen.append((shape, jnp.dtype(dtype)))
        return jax.random.normal(key, shape, dtype)

    bn = bnjax.BatchNorm(scale_init=recording, bias_init=recording, param_dtype=jnp.bfloat16)
    params, state = bn.init((4, 3), key=jax.random.key(0))
    assert seen == [((3,), jnp.dtype(jnp.bfloat16))] * 2
    assert params.scale.dtype == params.bias.dtype == jnp.bfloat16
    assert not np.array_equal(params.scale, params.bias)  # each got its own key
    again, _ = bn.init((4, 3), key=jax.random.key(0))
    other, _ = bn.init((4, 3), key=jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, again, params)
    assert not np.array_equal(other.scale, params.scale)
    np.testing.assert_array_equal(state.var, np.ones(3))  # statistics are not initialized


# center/scale alone are covered with their gradients in test_normalize.py.
FIELDS = [
    {},
    {"center": False, "scale": False},
    {"averaging": "debiased", "momentum": 0.9},
    {"averaging": "cumulative", "running_var": "unbiased"},
    {"running_var": "unbiased", "epsilon": 0.5},
    {"momentum": 0.0, "epsilon": 0.0},
]


# Every field on channels-last inputs; the other layouts with defaults and a mixed config.
LAYOUT_FIELDS = [("channels_last", f) for f in FIELDS] + [
    (layout, f) for layout in ("nchw", "tuple_axes") for f in (FIELDS[0], FIELDS[3])
]


@pytest.mark.parametrize(
    ("layout", "fields"),
    LAYOUT_FIELDS,
    ids=[f"{lay}-" + ",".join(f"{k}={v}" for k, v in f.items()) for lay, f in LAYOUT_FIELDS],
)
def test_training_two_batches(maybe_jit, layout, fields):
    shape, axis = LAYOUTS[layout]
    bn = bnjax.BatchNorm(axis=axis, **fields)
    params, state = bn.init(shape)
    feat = bn.feature_shape(shape)
    if bn.scale:
        params = params._replace(scale=jnp.asarray(RNG.uniform(0.5, 2, feat), jnp.float32))
    if bn.center:
        params = params._replace(bias=jnp.asarray(RNG.normal(size=feat), jnp.float32))
    p64 = [None if a is None else np.asarray(a, np.float64) for a in params]
    step = _call(bn, maybe_jit, training=True)
    batches = [RNG.normal(1.0, 2.0, shape).astype(np.float32) for _ in range(2)]
    for x in batches:
        y, state = step(params, state, jnp.asarray(x))
        assert y.shape == shape and y.dtype == jnp.float32
        _assert_y(y, train_forward(x, bn.epsilon, *p64, axis=axis))
    mean, var = running_stats(
        batches, momentum=bn.momentum, averaging=bn.averaging, running_var=bn.running_var, axis=axis
    )
    _assert_state(state, mean, var, 2)
    y, same = _call(bn, maybe_jit, training=False)(params, state, jnp.asarray(batches[0]))
    _assert_y(y, normalize(batches[0], mean, var, bn.epsilon, *p64, axis=axis))


MODES = {  # the README's modes table: (training, update_stats) -> (batch stats?, updated?)
    "train": ((True, None), (True, True)),
    "evaluate": ((False, None), (False, False)),
    "local_stats": ((True, False), (True, False)),
    "recalibrate": ((False, True), (False, True)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_table(maybe_jit, mode):
    (training, update_stats), (batch_stats, folded) = MODES[mode]
    bn = bnjax.BatchNorm(momentum=0.9, epsilon=1e-3)
    params, _ = bn.init(X)
    state = _state([1.0, -2.0, 0.5], [2.0, 0.5, 4.0])

    def run(params, state, x):
        y, new = bn.apply(params, state, x, training=training, update_stats=update_stats)
        if not folded:  # the very input state, leaf for leaf (checked at trace time in jit)
            assert new is state and all(a is b for a, b in zip(new, state, strict=True))
        return y, new

    y, new = maybe_jit(run)(params, state, jnp.asarray(X))
    _, mean, var = moments(X)
    stats = (mean, var) if batch_stats else (np.asarray(state.mean), np.asarray(state.var))
    _assert_y(y, normalize(X, *stats, 1e-3))
    if folded:
        _assert_state(
            new,
            running_average([mean], 0.9, "ema", state.mean),
            running_average([var], 0.9, "ema", state.var),
            4,
        )
    else:
        jax.tree.map(np.testing.assert_array_equal, new, state)


def test_training_is_required():
    bn = bnjax.BatchNorm()
    params, state = bn.init(X)
    with pytest.raises(TypeError, match="training"):
        bn.apply(params, state, X)


MASKS = {  # name: (x shape, axis, mask shape)
    "reduced": ((8, 3), -1, (8,)),
    "flax_full_shape": ((8, 3), -1, (8, 3)),
    "flax_broadcast": ((6, 2, 3), -1, (6, 2, 1)),
    "per_example_3d": ((6, 2, 3), -1, (6,)),
    "sequence": ((6, 2, 3), -1, (6, 2)),
    "nchw_reduced": ((4, 3, 2, 2), 1, (4, 2, 2)),
    "tuple_axes": ((5, 3, 4), (1, 2), (5,)),
}


@pytest.mark.parametrize("case", list(MASKS))
def test_masks_with_nan_in_masked_out_entries(maybe_jit, case):
    shape, axis, mask_shape = MASKS[case]
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    mask = rng.random(mask_shape) < 0.6
    mask.reshape(-1)[:2] = [False, True]
    full = full_mask(mask, shape, axis)
    x[~full] = np.nan
    bn = bnjax.BatchNorm(axis=axis, momentum=0.5, running_var="unbiased", epsilon=1e-3)
    params, state = bn.init(x)
    y, state = _call(bn, maybe_jit, training=True)(params, state, jnp.asarray(x), mask)
    _assert_y(np.where(full, y, 0), np.where(full, train_forward(x, 1e-3, axis=axis, mask=mask), 0))
    mean, var = running_stats(
        [x], momentum=0.5, averaging="ema", running_var="unbiased", axis=axis, masks=[mask]
    )
    _assert_state(state, mean, var, 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(maybe_jit, dtype):
    x = jnp.asarray(RNG.normal(2.0, 3.0, (16, 3)), dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    bn = bnjax.BatchNorm(momentum=0.5)
    params, state = bn.init(x)
    y, state = _call(bn, maybe_jit, training=True)(params, state, x)
    assert y.dtype == dtype and state.mean.dtype == state.var.dtype == jnp.float32
    # The output is rounded once to the input dtype: half an ulp (at most 2^-8 bf16, 2^-11 f16).
    half_ulp = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
    want = train_forward(x64, bn.epsilon)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=half_ulp, atol=1e-6)
    # The statistics of the exact low-precision values, in float32.
    _assert_state(
        state, *running_stats([x64], momentum=0.5, averaging="ema", running_var="biased"), 1
    )
    y, _ = _call(bn, maybe_jit, training=False)(params, state, x)
    assert y.dtype == dtype


def test_dtype_override(maybe_jit):
    x16 = jnp.asarray(X, jnp.bfloat16)
    want = train_forward(np.asarray(x16.astype(jnp.float32)), 1e-5)
    bn = bnjax.BatchNorm(dtype=jnp.float32)
    params, state = bn.init(x16)
    y, _ = _call(bn, maybe_jit, training=True)(params, state, x16)
    assert y.dtype == jnp.float32
    _assert_y(y, want)  # no bfloat16 rounding of the output
    bn = bnjax.BatchNorm(dtype=jnp.bfloat16)
    y, _ = _call(bn, maybe_jit, training=True)(params, state, jnp.asarray(X))
    assert y.dtype == jnp.bfloat16


def test_empty_and_fully_masked_batches_leave_state(maybe_jit):
    bn = bnjax.BatchNorm(epsilon=1e-3)
    params, _ = bn.init(X)
    state = _state([1.0, -2.0, 0.5], [2.0, 0.5, 4.0], count=2)
    running = (np.asarray(state.mean), np.asarray(state.var))
    train = _call(bn, maybe_jit, training=True)
    y, new = train(params, state, jnp.zeros((0, 3), jnp.float32))
    assert y.shape == (0, 3)
    jax.tree.map(np.testing.assert_array_equal, new, state)
    x = X.copy()
    x[:2] = np.nan  # masked out: must not leak into output or state
    mask = np.zeros(8, bool)
    for fn in (train, _call(bn, maybe_jit, training=False, update_stats=True)):
        y, new = fn(params, state, jnp.asarray(x), mask)
        jax.tree.map(np.testing.assert_array_equal, new, state)  # count stays 2, no NaN
        _assert_y(y[2:], normalize(x[2:], *running, 1e-3))  # nothing to learn: running stats


def test_one_element_per_feature_warns(maybe_jit):
    bn = bnjax.BatchNorm(epsilon=1e-3)
    params, state = bn.init((1, 3))
    params = params._replace(bias=jnp.asarray([0.5, -1.0, 2.0], jnp.float32))
    x = jnp.asarray([[-10.0, 0.0, 10.0]], jnp.float32)
    with pytest.warns(UserWarning, match="bias"):
        y, _ = _call(bn, maybe_jit, training=True)(params, state, x)
    np.testing.assert_array_equal(y, params.bias[None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(bn, maybe_jit, training=False)(params, state, x)
        _call(bn, maybe_jit, training=True)(params, state, jnp.asarray(X))


@pytest.mark.parametrize("skip", [True, False, "default"])
def test_skip_nonfinite(maybe_jit, skip):
    bn = bnjax.BatchNorm() if skip == "default" else bnjax.BatchNorm(skip_nonfinite=skip)
    params, state = bn.init(X)
    x = X.copy()
    x[3, 1] = np.nan
    y, new = _call(bn, maybe_jit, training=True)(params, state, jnp.asarray(x))
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, [0, 2]]))  # shows the NaN
    if skip:
        jax.tree.map(np.testing.assert_array_equal, new, state)
    else:
        assert int(new.count) == 1 and np.isnan(new.mean[1]) and np.isnan(new.var[1])
        np.testing.assert_allclose(new.mean[0], 0.01 * moments(X)[1][0], rtol=1e-5)


def _named_vmap_loss(statistics):
    bn = bnjax.BatchNorm(axis=0, axis_name="b", statistics=statistics)
    params, state = bn.init((3, 4))

    def loss(params, x):
        y, _ = jax.vmap(lambda x: bn.apply(params, state, x, training=True), axis_name="b")(x)
        return jnp.sum(y**2 * jnp.arange(4.0))

    return params, loss


@pytest.mark.parametrize("statistics", ["auto", "checked", "branchless"])
def test_grad_inside_jit_over_a_named_vmap(statistics):
    """The documented way (docs/equinox.md): differentiate inside the jit."""
    params, loss = _named_vmap_loss(statistics)
    x = jax.random.normal(jax.random.key(0), (8, 3, 4)) + 2
    inside = jax.jit(jax.grad(loss))(params, x)
    eager = jax.grad(loss)(params, x)
    np.testing.assert_allclose(inside.scale, eager.scale, rtol=1e-5, atol=1e-5)
    if statistics == "branchless":
        outside = jax.grad(jax.jit(loss))(params, x)
        np.testing.assert_allclose(outside.scale, eager.scale, rtol=1e-5, atol=1e-5)


@pytest.mark.xfail(raises=NameError, strict=True,
                   reason="JAX 0.10: grad of a jit over a custom_vjp holding a switch with a "
                   "psum loses the vmap's axis name (docs/equinox.md)")  # fmt: skip
def test_grad_of_jit_over_a_named_vmap_checked_path():
    params, loss = _named_vmap_loss("checked")
    jax.grad(jax.jit(loss))(params, jnp.ones((8, 3, 4)))


@pytest.mark.parametrize(
    ("example", "x64", "want"),
    [
        (np.zeros((4, 3), np.int32), False, jnp.float32),
        (np.zeros((4, 3), bool), False, jnp.float32),
        (jnp.zeros((4, 3), jnp.bfloat16), False, jnp.float32),
        ((4, 3), False, jnp.float32),
        (np.zeros((4, 3), np.float64), False, jnp.float32),  # held as float32 without x64
        (np.zeros((4, 3), np.float64), True, jnp.float64),
    ],
)
def test_statistics_dtype_follows_the_example_batch(example, x64, want):
    """The running statistics are kept in the widest of float32 and a float example's
    dtype as JAX holds it; an integer or bool example, or a bare shape, gives float32."""
    with jax.enable_x64(x64):
        params, state = bnjax.BatchNorm().init(example)
        assert state.mean.dtype == state.var.dtype == want
        assert params.scale.dtype == jnp.float32 and state.count.dtype == jnp.int32
