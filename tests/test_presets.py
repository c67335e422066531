"""Presets against the real frameworks: PyTorch (golden files), Keras 3, Haiku and Flax (live).

Each test trains the framework's own batch norm and the preset's ``BatchNorm`` side by side
for a few steps on the same inputs and compares outputs, gradients and running statistics
after every step, then the inference output.
"""

import os

import haiku as hk
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import linen as nn

import bnjax
from bnjax import presets

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TORCH_CASES = ["bn1d_2d", "bn1d_3d_cumulative", "bn2d", "bn2d_no_affine"]
# README: outputs, input gradients and running statistics to 2e-6 (relative plus absolute),
# parameter gradients (sums over the batch) to 1e-5.
TOL = dict(rtol=2e-6, atol=2e-6)


def _data(seed, shape, steps=3):
    rng = np.random.default_rng(seed)
    xs = (rng.normal(size=(steps, *shape)) * 2 + 3).astype(np.float32)
    gs = rng.normal(size=(steps, *shape)).astype(np.float32)
    return xs, gs, (rng.normal(size=shape) * 2 + 3).astype(np.float32)


def _bnjax_step(bn, maybe_jit):
    """One training step of ``bn``: output, new state, and the VJP of ``sum(y * g)``."""

    def step(params, state, x, g):
        def f(p, xx):
            return bn.apply(p, state, xx, training=True)

        (y, new_state), vjp = jax.vjp(f, params, x)
        d_params, dx = vjp((g, jax.tree.map(jnp.zeros_like, new_state)))
        return y, new_state, d_params, dx

    return maybe_jit(step)


# -- PyTorch ------------------------------------------------------------------------


@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_golden(case, maybe_jit):
    gold = np.load(os.path.join(GOLDEN, f"torch_{case}.npz"))
    momentum = None if np.isnan(gold["momentum"]) else float(gold["momentum"])
    affine = bool(gold["affine"])
    bn = presets.torch(momentum=momentum, eps=float(gold["eps"]), affine=affine)
    params, state = bn.init(gold["x"][0])
    if affine:
        params = bnjax.BatchNormParams(jnp.asarray(gold["weight0"]), jnp.asarray(gold["bias0"]))
    step = _bnjax_step(bn, maybe_jit)
    for t in range(gold["x"].shape[0]):
        y, state, d_params, dx = step(params, state, gold["x"][t], gold["g"][t])
        np.testing.assert_allclose(y, gold["y"][t], **TOL)
        np.testing.assert_allclose(dx, gold["dx"][t], **TOL)
        if affine:
            np.testing.assert_allclose(d_params.scale, gold["dweight"][t], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(d_params.bias, gold["dbias"][t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.mean, gold["running_mean"][t], **TOL)
        np.testing.assert_allclose(state.var, gold["running_var"][t], **TOL)
    assert int(state.count) == int(gold["num_batches_tracked"])
    y_eval, _ = bn.apply(params, state, gold["x_eval"], training=False)
    np.testing.assert_allclose(y_eval, gold["y_eval"], **TOL)


def test_torch_preset_conventions():
    bn = presets.torch()
    assert (bn.axis, bn.momentum, bn.epsilon) == (1, 0.9, 1e-5)
    assert (bn.running_var, bn.averaging) == ("unbiased", "ema")
    assert presets.torch(momentum=None).averaging == "cumulative"
    no_affine = presets.torch(affine=False)
    assert not no_affine.scale and not no_affine.center
    with pytest.raises(ValueError, match="momentum"):
        presets.torch(momentum=1.5)


# -- Keras 3 (JAX backend) ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("axis", "shape"), [(-1, (6, 4)), (1, (3, 2, 4, 4))])
def test_keras_live(axis, shape):
    xs, gs, x_eval = _data(1, shape)
    layer = keras.layers.BatchNormalization(axis=axis, momentum=0.8)
    layer.build(shape)
    c = shape[axis]
    gamma = np.linspace(0.5, 1.5, c).astype(np.float32)
    beta = np.linspace(-1, 1, c).astype(np.float32)
    layer.set_weights([gamma, beta, np.zeros(c, np.float32), np.ones(c, np.float32)])
    bn = presets.keras(axis=axis, momentum=0.8)
    params, state = bn.init(shape)
    params = bnjax.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))

    def keras_loss(tv, xx, nt, g):
        y, _ = layer.stateless_call(tv, nt, xx, training=True)
        return jnp.sum(y * g)

    keras_grad = jax.jit(jax.grad(keras_loss, argnums=(0, 1)))
    step = _bnjax_step(bn, jax.jit)
    for x, g in zip(xs, gs, strict=True):
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        k_grads = keras_grad(trainable, jnp.asarray(x), non_trainable, g)
        y_keras = np.asarray(layer(x, training=True))
        y, state, d_params, dx = step(params, state, x, g)
        grads = (d_params, dx)
        np.testing.assert_allclose(y, y_keras, **TOL)
        np.testing.assert_allclose(grads[1], k_grads[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[0].scale, k_grads[0][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[0].bias, k_grads[0][1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.mean, layer.moving_mean.numpy(), **TOL)
        np.testing.assert_allclose(state.var, layer.moving_variance.numpy(), **TOL)
    y_eval, _ = bn.apply(params, state, x_eval, training=False)
    np.testing.assert_allclose(y_eval, np.asarray(layer(x_eval, training=False)), **TOL)


def test_keras_defaults():
    layer = keras.layers.BatchNormalization()
    bn = presets.keras()
    assert (bn.axis, bn.momentum, bn.epsilon) == (layer.axis, layer.momentum, layer.epsilon)
    assert (bn.running_var, bn.averaging) == ("biased", "ema")


# -- TF1 ----------------------------------------------------------------------------
# The TF1 notebook: x = [[-10], [0], [10]] (2-D, so TF1's non-fused path), momentum 0.99,
# epsilon 1e-3; after 1000 updates it printed moving variance 66.66382, inference -1.224762.
NOTEBOOK_X = np.asarray([[-10.0], [0.0], [10.0]], np.float32)


@pytest.mark.parametrize("kwargs", [{}, {"fused": None, "ndim": 2}, {"fused": True, "ndim": 2}])
def test_tf1_default_reproduces_the_notebook(kwargs, maybe_jit):
    bn = presets.tf1(**kwargs)
    params, state = bn.init(NOTEBOOK_X)

    def train(params, state, x):
        step = lambda _, s: bn.apply(params, s, x, training=True)[1]  # noqa: E731
        state = jax.lax.fori_loop(0, 1000, step, state)
        return bn.apply(params, state, x[:1], training=False)[0], state

    y, state = maybe_jit(train)(params, state, NOTEBOOK_X)
    np.testing.assert_allclose(np.ravel(state.var), [66.66382], rtol=1e-6)
    np.testing.assert_allclose(np.ravel(y), [-1.224762], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "fused_kernel"),
    [
        ({"ndim": 4}, True),  # TF1's default on 4-D input: fused
        ({"ndim": 4, "axis": 1}, True),
        ({"ndim": 4, "axis": -3}, True),
        ({"ndim": 4, "fused": True}, True),
        ({"ndim": 4, "fused": False}, False),
        ({"ndim": 4, "axis": 2}, False),  # fused only for channel axis 1 or 3
        ({"ndim": 4, "axis": (1, 3)}, False),
        ({"ndim": 3}, False),
        ({"ndim": 5, "fused": True}, False),  # TF1 falls back silently
        ({}, False),  # rank unknown: fused taken literally
        ({"fused": True}, True),
        ({"fused": False}, False),
    ],
)
def test_tf1_kernel_choice_follows_tf1(kwargs, fused_kernel):
    bn = presets.tf1(epsilon=1e-6, **kwargs)
    assert bn.running_var == ("unbiased" if fused_kernel else "biased")
    assert bn.epsilon == (1.001e-5 if fused_kernel else 1e-6)  # the fused kernel's minimum
    assert (bn.momentum, presets.tf1(**kwargs).epsilon) == (0.99, 1e-3)


def test_tf1_fused_4d_stores_the_unbiased_variance():
    x = _data(5, (2, 3, 3, 4), steps=1)[0][0]
    bn = presets.tf1(ndim=x.ndim)
    params, state = bn.init(x)
    _, state = bn.apply(params, state, x, training=True)
    ref = np.asarray(x, np.float64).reshape(-1, 4)
    np.testing.assert_allclose(state.var, 0.99 + 0.01 * ref.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(state.mean, 0.01 * ref.mean(0), rtol=1e-6)


# -- Haiku --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("create_scale", "create_offset", "shape", "data_format"),
    [
        (True, True, (8, 3), "channels_last"),
        (False, True, (4, 3, 3, 2), "channels_last"),
        (True, True, (4, 3, 2, 2), "channels_first"),
        (True, True, (4, 3, 5), "NCW"),
    ],
)
def test_haiku_live(create_scale, create_offset, shape, data_format):
    decay = 0.7

    def forward(x, is_training):
        return hk.BatchNorm(create_scale, create_offset, decay_rate=decay, data_format=data_format)(
            x, is_training
        )

    model = hk.transform_with_state(forward)
    xs, gs, x_eval = _data(2, shape)
    hk_params, hk_state = model.init(None, xs[0], True)
    hk_params = jax.tree.map(
        lambda a: a + np.linspace(0.3, 0.9, a.size).reshape(a.shape), hk_params
    )
    bn = presets.haiku(
        decay, create_scale=create_scale, create_offset=create_offset, data_format=data_format
    )
    params, state = bn.init(shape)
    params = bnjax.interop.from_haiku(hk_params, hk_state, data_format=data_format)[0]
    step = _bnjax_step(bn, jax.jit)

    def hk_loss(p, xx, s, g):
        y, new_s = model.apply(p, s, None, xx, True)
        return jnp.sum(y * g), (y, new_s)

    hk_step = jax.jit(jax.value_and_grad(hk_loss, (0, 1), has_aux=True))
    for x, g in zip(xs, gs, strict=True):
        with jax.numpy_dtype_promotion("standard"):  # Haiku's EMA mixes int and float
            (_, (y_hk, hk_state)), hk_grads = hk_step(hk_params, jnp.asarray(x), hk_state, g)
        y, state, d_params, dx = step(params, state, x, g)
        np.testing.assert_allclose(y, y_hk, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, hk_grads[1], rtol=1e-5, atol=1e-5)
        if create_scale:
            hk_dscale = hk_grads[0]["batch_norm"]["scale"].reshape(-1)
            np.testing.assert_allclose(d_params.scale, hk_dscale, rtol=1e-5, atol=1e-5)
        hk_dbias = hk_grads[0]["batch_norm"]["offset"].reshape(-1)
        np.testing.assert_allclose(d_params.bias, hk_dbias, rtol=1e-5, atol=1e-5)
        _, hk_as_bnjax = bnjax.interop.from_haiku(hk_params, hk_state, data_format=data_format)
        np.testing.assert_allclose(state.mean, hk_as_bnjax.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.var, hk_as_bnjax.var, rtol=1e-4, atol=1e-5)
        assert int(state.count) == int(hk_as_bnjax.count)
    y_eval, _ = bn.apply(params, state, x_eval, training=False)
    y_hk_eval, _ = model.apply(hk_params, hk_state, None, x_eval, False)
    np.testing.assert_allclose(y_eval, y_hk_eval, rtol=1e-5, atol=1e-5)


def test_haiku_preset_arguments():
    bn = presets.haiku(0.9, 1e-3, create_scale=False, create_offset=True)
    assert (bn.momentum, bn.epsilon, bn.averaging) == (0.9, 1e-3, "debiased")
    assert (bn.scale, bn.center, bn.axis) == (False, True, -1)
    first = presets.haiku(0.9, create_scale=True, create_offset=True, data_format="channels_first")
    assert first.axis == 1
    for data_format, axis in (("NCHW", 1), ("NC...", 1), ("NHWC", -1), ("N...C", -1)):
        assert _haiku(0.9, data_format=data_format).axis == axis
    assert _haiku(0.9, cross_replica_axis=["hosts", "cores"]).axis_name == ("hosts", "cores")


def _haiku(*args, **kwargs):
    return presets.haiku(*args, **{"create_scale": True, "create_offset": True, **kwargs})


# -- Flax ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("axis", "shape"), [(-1, (8, 5)), ((1, 2), (4, 2, 3, 2))])
def test_flax_live(axis, shape):
    module = nn.BatchNorm(axis=axis, momentum=0.6, epsilon=1e-4)
    xs, gs, x_eval = _data(3, shape)
    variables = module.init(jax.random.key(0), xs[0], use_running_average=False)
    variables = jax.tree.map(lambda a: a * 1.5 + 0.25, variables)
    bn = presets.flax(axis=axis, momentum=0.6, epsilon=1e-4)
    params, state = bnjax.interop.from_flax(variables)
    step = _bnjax_step(bn, jax.jit)

    def flax_loss(p, xx, stats, g):
        y, upd = module.apply(
            {"params": p, "batch_stats": stats}, xx, use_running_average=False, mutable=True
        )
        return jnp.sum(y * g), (y, upd)

    flax_step = jax.jit(jax.value_and_grad(flax_loss, (0, 1), has_aux=True))
    for x, g in zip(xs, gs, strict=True):
        (_, (y_fl, upd)), fl_grads = flax_step(
            variables["params"], jnp.asarray(x), variables["batch_stats"], g
        )
        variables = {"params": variables["params"], **upd}
        y, state, d_params, dx = step(params, state, x, g)
        np.testing.assert_allclose(y, y_fl, **TOL)
        np.testing.assert_allclose(dx, fl_grads[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_params.scale, fl_grads[0]["scale"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_params.bias, fl_grads[0]["bias"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.mean, variables["batch_stats"]["mean"], **TOL)
        np.testing.assert_allclose(state.var, variables["batch_stats"]["var"], **TOL)
    y_eval, _ = bn.apply(params, state, x_eval, training=False)
    np.testing.assert_allclose(
        y_eval, module.apply(variables, x_eval, use_running_average=True), **TOL
    )


def test_flax_preset_names():
    bn = presets.flax(use_bias=False, use_scale=True, axis_name="batch", dtype=jnp.bfloat16)
    assert (bn.center, bn.scale, bn.axis_name, bn.dtype) == (False, True, "batch", jnp.bfloat16)
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-5)


# -- Errors name the framework's argument ---------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: presets.torch(eps=-1), ValueError, r"^eps=-1 is out of range"),
        (lambda: presets.torch(eps="1e-5"), TypeError, r"^eps must be a real number; got '1e-5'"),
        (lambda: presets.torch(momentum=1.5), ValueError, r"^momentum=1.5 is out of range"),
        (lambda: presets.torch(affine=1), TypeError, r"^affine must be a Python bool; got 1"),
        (lambda: presets.keras(momentum=-0.5), ValueError, r"^momentum=-0.5 is out of range"),
        (lambda: presets.keras(center="no"), TypeError, r"^center must be a Python bool"),
        (lambda: presets.tf1(epsilon=-1.0), ValueError, r"^epsilon=-1.0 is out of range"),
        (lambda: presets.tf1(fused="yes"), TypeError, r"^fused must be a Python bool; got 'yes'"),
        (lambda: presets.tf1(ndim=4.0), TypeError, r"^ndim must be None or an int.*got 4.0"),
        (lambda: presets.tf1(ndim=0), ValueError, r"^ndim=0 is out of range"),
        (lambda: presets.flax(use_bias=1), TypeError, r"^use_bias must be a Python bool; got 1"),
        (lambda: presets.flax(use_scale=None), TypeError, r"^use_scale must be a Python bool"),
        (lambda: presets.flax(momentum=2), ValueError, r"^momentum=2 is out of range"),
        (lambda: _haiku(1.5), ValueError, r"^decay_rate=1.5 is out of range"),
        (lambda: _haiku(None), TypeError, r"^decay_rate must be a real number; got None"),
        (lambda: _haiku(0.9, -1.0), ValueError, r"^eps=-1.0 is out of range"),
        (
            lambda: presets.haiku(0.9, create_scale=1, create_offset=True),
            TypeError,
            r"^create_scale must be a Python bool; got 1",
        ),
        (
            lambda: presets.haiku(0.9, create_scale=True, create_offset="yes"),
            TypeError,
            r"^create_offset must be a Python bool; got 'yes'",
        ),
        (lambda: _haiku(0.9, data_format="NHWC?"), ValueError, r"^data_format='NHWC\?'"),
        (
            lambda: _haiku(0.9, cross_replica_axis={"i": 0}),
            TypeError,
            r"^cross_replica_axis must be a name or a sequence of names; got \{'i': 0\}",
        ),
        (
            lambda: _haiku(0.9, cross_replica_axis_index_groups=[[0, 1]]),
            ValueError,
            r"^cross_replica_axis_index_groups=\[\[0, 1\]\] is set but cross_replica_axis",
        ),
        (
            lambda: _haiku(0.9, cross_replica_axis="i", cross_replica_axis_index_groups=[[]]),
            ValueError,
            r"^cross_replica_axis_index_groups=\[\[\]\] has an empty group",
        ),
    ],
)
def test_preset_errors_name_the_framework_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_defaults_learn_scale_and_bias():
    """PyTorch's ``affine=True`` and TF1's ``center=True, scale=True`` by default (mutation
    survivors: no test read a preset's defaults)."""
    for bn in (bnjax.presets.torch(), bnjax.presets.tf1()):
        assert bn.center and bn.scale
