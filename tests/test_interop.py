"""Checkpoint conversion: exact round trips, and converted checkpoints behave like the source."""

import os
import re
import types

import haiku as hk
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import bnjax
from bnjax import interop, presets

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _assert_same_tree(a, b):
    """Equal structure, dtypes and values, bit for bit."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _trained(seed=0, c=3):
    rng = np.random.default_rng(seed)
    params = bnjax.BatchNormParams(
        jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
        jnp.asarray(rng.normal(size=c), jnp.float32),
    )
    state = bnjax.BatchNormState(
        jnp.asarray(rng.normal(size=c), jnp.float32),
        jnp.asarray(rng.uniform(0.1, 3, c), jnp.float32),
        jnp.asarray(17, jnp.int32),
    )
    return params, state


# -- PyTorch ------------------------------------------------------------------------


def _torch_state_dict(gold):
    return {
        "weight": gold["weight0"],
        "bias": gold["bias0"],
        "running_mean": gold["running_mean"][-1],
        "running_var": gold["running_var"][-1],
        "num_batches_tracked": np.asarray(int(gold["num_batches_tracked"]), np.int64),
    }


@pytest.mark.parametrize("case", ["bn1d_2d", "bn2d"])
def test_torch_checkpoint_reproduces_torch_eval(case):
    gold = np.load(os.path.join(GOLDEN, f"torch_{case}.npz"))
    params, state = interop.from_torch(_torch_state_dict(gold))
    bn = presets.torch(momentum=float(gold["momentum"]), eps=float(gold["eps"]))
    y, _ = bn.apply(params, state, gold["x_eval"], training=False)
    np.testing.assert_allclose(y, gold["y_eval"], rtol=2e-5, atol=2e-5)
    assert int(state.count) == int(gold["num_batches_tracked"])


def test_torch_round_trips_are_exact():
    gold = np.load(os.path.join(GOLDEN, "torch_bn2d.npz"))
    sd = _torch_state_dict(gold)
    back = interop.to_torch(*interop.from_torch(sd))
    assert sorted(back) == sorted(sd)
    for key in sd:
        assert back[key].dtype == sd[key].dtype
        np.testing.assert_array_equal(back[key], sd[key])
    params, state = _trained()
    _assert_same_tree(interop.from_torch(interop.to_torch(params, state)), (params, state))


def test_torch_prefix_and_no_affine():
    _, state = _trained(1)
    sd = interop.to_torch(bnjax.BatchNormParams(None, None), state, prefix="layer1.bn.")
    assert sorted(sd) == [
        "layer1.bn.num_batches_tracked",
        "layer1.bn.running_mean",
        "layer1.bn.running_var",
    ]
    model_sd = {**sd, "layer1.conv.weight": np.ones((2, 2), np.float32)}
    params, back = interop.from_torch(model_sd, prefix="layer1.bn.")
    assert params == bnjax.BatchNormParams(None, None)
    _assert_same_tree(back, state)
    with pytest.raises(KeyError, match="running_var"):
        interop.from_torch({"running_mean": np.zeros(3, np.float32)})


class _TorchLike:
    """The part of ``torch.Tensor`` that ``from_torch`` may use, without torch.

    Like torch, ``numpy()`` refuses a tensor that still requires grad, one on another
    device, and bfloat16 (numpy has no such dtype); ``float()`` widens to float32.
    """

    def __init__(self, array, dtype=None, *, requires_grad=False, device="cuda"):
        self._array = np.asarray(array)
        self.dtype = f"torch.{dtype or self._array.dtype}"
        self.requires_grad, self.device = requires_grad, device

    def detach(self):
        return _TorchLike(self._array, self.dtype[6:], device=self.device)

    def cpu(self):
        return _TorchLike(
            self._array, self.dtype[6:], requires_grad=self.requires_grad, device="cpu"
        )

    def float(self):
        return _TorchLike(
            self._array.astype(np.float32), requires_grad=self.requires_grad, device=self.device
        )

    def numpy(self):
        if self.requires_grad or self.device != "cpu":
            raise RuntimeError("Can't call numpy() on a tensor that requires grad or is on cuda")
        if self.dtype == "torch.bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self._array.copy()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_torch_tensors_are_read_exactly(dtype):
    params, state = _trained(9)
    # Values with more significant bits than float16 holds, and beyond its range.
    values = [np.asarray(a, np.float32) * 1e30 for a in (*params, state.mean, state.var)]
    stored = [np.asarray(jnp.asarray(a, dtype)) for a in values]
    name = np.dtype(dtype).name
    sd = {
        "weight": _TorchLike(stored[0].astype(np.float32), name, requires_grad=True),
        "bias": _TorchLike(stored[1].astype(np.float32), name, requires_grad=True),
        "running_mean": _TorchLike(stored[2].astype(np.float32), name),
        "running_var": _TorchLike(stored[3].astype(np.float32), name),
        "num_batches_tracked": _TorchLike(np.asarray(17, np.int64)),
    }
    got = interop.from_torch(sd)
    want = (
        bnjax.BatchNormParams(*(jnp.asarray(a) for a in stored[:2])),
        bnjax.BatchNormState(*(jnp.asarray(a) for a in stored[2:]), jnp.asarray(17, jnp.int32)),
    )
    _assert_same_tree(got, want)


# -- Keras --------------------------------------------------------------------------


def _keras_trained(center=True, scale=True):
    layer = keras.layers.BatchNormalization(momentum=0.7, center=center, scale=scale)
    rng = np.random.default_rng(2)
    layer.build((8, 3))
    for _ in range(2):
        layer((rng.normal(size=(8, 3)) * 2 + 1).astype(np.float32), training=True)
    return layer


@pytest.mark.parametrize(("center", "scale"), [(True, True), (False, True), (True, False)])
def test_keras_weights_round_trip_and_inference(center, scale):
    layer = _keras_trained(center, scale)
    weights = layer.get_weights()
    params, state = interop.from_keras(weights, center=center, scale=scale, count=2)
    assert int(state.count) == 2
    for got, want in zip(interop.to_keras(params, state), weights, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
    bn = presets.keras(momentum=0.7, center=center, scale=scale)
    y, _ = bn.apply(params, state, x, training=False)
    np.testing.assert_allclose(y, np.asarray(layer(x, training=False)), rtol=1e-6, atol=1e-6)
    fresh = keras.layers.BatchNormalization(center=center, scale=scale)
    fresh.build((8, 3))
    fresh.set_weights(interop.to_keras(params, state))
    for got, want in zip(fresh.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_keras_wrong_number_of_weights():
    with pytest.raises(ValueError, match="expected 3"):
        interop.from_keras([np.ones(3)] * 4, center=False)


# -- Haiku --------------------------------------------------------------------------


def _haiku_trained(decay, shape, steps=3, **module_kwargs):
    """An hk.BatchNorm trained (jitted, as Haiku is used) for a few steps, and its model."""

    def forward(x, is_training):
        return hk.BatchNorm(True, True, decay_rate=decay, **module_kwargs)(x, is_training)

    model = hk.transform_with_state(forward)
    rng = np.random.default_rng(4)
    xs = (rng.normal(size=(steps, *shape)) * 2 + 1).astype(np.float32)
    hk_params, hk_state = model.init(None, xs[0], True)
    hk_params = jax.tree.map(lambda a: a * 1.5 + 0.1, hk_params)
    train = jax.jit(lambda p, s, x: model.apply(p, s, None, x, True)[1])
    with jax.numpy_dtype_promotion("standard"):  # Haiku's EMA mixes int and float
        for x in xs:
            hk_state = train(hk_params, hk_state, x)
    return model, jax.tree.map(np.asarray, hk_params), jax.tree.map(np.asarray, hk_state), xs


def _assert_haiku_state_close(got, want):
    """Averages and counters bit for bit; the raw ``hidden`` within 1 ulp and consistent."""
    for ema in ("mean_ema", "var_ema"):
        g, w = got[f"batch_norm/~/{ema}"], want[f"batch_norm/~/{ema}"]
        np.testing.assert_array_equal(g["average"], w["average"])
        np.testing.assert_array_equal(g["counter"], w["counter"])
        assert g["hidden"].dtype == w["hidden"].dtype and g["hidden"].shape == w["hidden"].shape
        np.testing.assert_array_max_ulp(g["hidden"], w["hidden"], maxulp=1)


@pytest.mark.parametrize(
    ("shape", "module_kwargs", "decay", "feature_axes"),
    [
        ((6, 2, 3), {}, 0.9, (2,)),
        ((6, 2, 3), {}, 0.999, (2,)),
        ((6, 3, 2, 2), {"data_format": "channels_first"}, 0.99, (1,)),
        ((6, 4, 3), {"axis": [0]}, 0.9, (1, 2)),  # Haiku's axis lists the reduced axes
    ],
)
def test_haiku_round_trips(shape, module_kwargs, decay, feature_axes):
    model, hk_params, hk_state, xs = _haiku_trained(decay, shape, **module_kwargs)
    params, state = interop.from_haiku(hk_params, hk_state, **module_kwargs)
    feature = tuple(shape[i] for i in feature_axes)
    assert params.scale.shape == state.mean.shape == feature and int(state.count) == len(xs)
    p2, s2 = interop.to_haiku(params, state, decay_rate=decay, ndim=len(shape), **module_kwargs)
    _assert_same_tree(p2, hk_params)
    _assert_haiku_state_close(s2, hk_state)
    _assert_same_tree(interop.from_haiku(p2, s2, **module_kwargs), (params, state))
    # The rebuilt hidden is one that Haiku's own (jitted) debiasing maps to the average.
    debias = jax.jit(lambda h, c: h / (1 - jnp.power(jnp.float32(decay), c)))
    with jax.numpy_dtype_promotion("standard"):
        for ema in ("mean_ema", "var_ema"):
            e = s2[f"batch_norm/~/{ema}"]
            np.testing.assert_array_equal(debias(e["hidden"], e["counter"]), e["average"])
    x_eval = xs[0] * 0.5
    with jax.numpy_dtype_promotion("standard"):
        y_hk, _ = model.apply(hk_params, hk_state, None, x_eval, False)
    bn = bnjax.BatchNorm(axis=feature_axes, momentum=decay, averaging="debiased")
    if "axis" not in module_kwargs:
        bn = presets.haiku(decay, create_scale=True, create_offset=True, **module_kwargs)
    y, _ = bn.apply(params, state, x_eval, training=False)
    np.testing.assert_allclose(y, y_hk, rtol=1e-5, atol=1e-5)


def test_haiku_layout_must_match_the_module():
    _, hk_params, hk_state, _ = _haiku_trained(0.9, (6, 3, 2, 2), data_format="channels_first")
    with pytest.raises(ValueError, match=r"mean_ema.average has shape \(1, 3, 1, 1\); expected"):
        interop.from_haiku(hk_params, hk_state)  # read as channels_last
    params, state = interop.from_haiku(hk_params, hk_state, data_format="NCHW")
    with pytest.raises(ValueError, match="state.mean has shape"):
        interop.to_haiku(params, state, decay_rate=0.9, ndim=4, axis=[0])


def test_haiku_without_params():
    _, state = _trained(5)
    p, s = interop.to_haiku(bnjax.BatchNormParams(None, None), state, decay_rate=0.5, ndim=2)
    assert p == {} and s["batch_norm/~/mean_ema"]["average"].shape == (1, 3)
    params, back = interop.from_haiku(p, s)
    assert params == bnjax.BatchNormParams(None, None)
    _assert_same_tree(back, state)


def test_haiku_axis_edges():
    """Haiku's ``axis`` lists reduced axes; negative ones count from the end, and an axis
    outside the input or not an integer is refused."""
    params, state = _trained(5, c=4)
    as_positive = interop.to_haiku(params, state, decay_rate=0.9, ndim=2, axis=[0])
    as_negative = interop.to_haiku(params, state, decay_rate=0.9, ndim=2, axis=[-2])
    _assert_same_tree(as_negative, as_positive)
    assert as_positive[1]["batch_norm/~/mean_ema"]["average"].shape == (1, 4)
    for bad in ([2], [-3], [0.5]):
        message = re.escape(f"axis={bad!r} is not a sequence of axes of a 2-D input")
        with pytest.raises(ValueError, match=f"^{message}$"):
            interop.to_haiku(params, state, decay_rate=0.9, ndim=2, axis=bad)


def test_haiku_statistics_of_rank_one_and_zero():
    params, state = _trained(5)
    p, s = interop.to_haiku(params, state, decay_rate=0.9, ndim=1)  # a (C,) input
    assert s["batch_norm/~/var_ema"]["average"].shape == (3,)
    _assert_same_tree(interop.from_haiku(p, s), (params, state))
    scalars = jax.tree.map(lambda a: np.asarray(a).reshape(-1)[0], (p, s))
    with pytest.raises(ValueError, match="has rank 0; expected Haiku's keep-dims statistics"):
        interop.from_haiku(*scalars)


@pytest.mark.parametrize("count", [0, 1])
def test_haiku_hidden_at_the_first_counts(count):
    """Before any update Haiku's raw EMA is 0; after one it is the average times
    ``1 - decay``."""
    params, state = _trained(6)
    state = state._replace(count=jnp.asarray(count, jnp.int32))
    _, s = interop.to_haiku(params, state, decay_rate=0.9, ndim=2)
    hidden = s["batch_norm/~/mean_ema"]["hidden"]
    want = np.zeros((1, 3)) if count == 0 else np.reshape(state.mean, (1, 3)) * (1 - 0.9)
    np.testing.assert_allclose(hidden, want, rtol=1e-6, atol=0)
    assert hidden.dtype == np.float32


def test_haiku_hidden_of_bfloat16_statistics():
    params, state = _trained(7)
    state = state._replace(mean=state.mean.astype(jnp.bfloat16), var=state.var.astype(jnp.bfloat16))
    _, s = interop.to_haiku(params, state, decay_rate=0.5, ndim=2)
    hidden = s["batch_norm/~/var_ema"]["hidden"]
    assert hidden.dtype == jnp.bfloat16
    expected = np.reshape(state.var, (1, 3)).astype(np.float32) * (1 - 0.5**17)
    np.testing.assert_allclose(hidden.astype(np.float32), expected, rtol=1e-2)


# -- Flax ---------------------------------------------------------------------------


def test_flax_linen_round_trip():
    module = nn.BatchNorm(momentum=0.8)
    x = np.random.default_rng(6).normal(size=(8, 3)).astype(np.float32)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    _, upd = module.apply(variables, x * 2 + 1, use_running_average=False, mutable=["batch_stats"])
    variables = {"params": variables["params"], **upd}
    params, state = interop.from_flax(variables, count=1)
    _assert_same_tree(interop.to_flax(params, state), jax.tree.map(jnp.asarray, variables))
    params2, state2 = _trained(7)
    _assert_same_tree(
        interop.from_flax(interop.to_flax(params2, state2), count=17), (params2, state2)
    )
    y, _ = presets.flax(momentum=0.8).apply(params, state, x, training=False)
    expected = module.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_flax_nnx_module():
    layer = nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    x = (np.random.default_rng(8).normal(size=(8, 3)) * 2 + 1).astype(np.float32)
    layer(x, use_running_average=False)
    params, state = interop.from_flax(layer)
    np.testing.assert_array_equal(state.mean, layer.mean.get_value())
    np.testing.assert_array_equal(state.var, layer.var.get_value())
    np.testing.assert_array_equal(params.scale, layer.scale.get_value())
    y, _ = presets.flax(momentum=0.5).apply(params, state, x, training=False)
    np.testing.assert_allclose(y, layer(x, use_running_average=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_torch_state_trains_with_torch_momentum(momentum):
    """A PyTorch state dict, then one training step with ``presets.torch(momentum)``: the
    running statistics follow PyTorch's documented rule, ``(1 - m) * old + m * batch``
    with the unbiased batch variance (``m = 1 / (t + 1)`` for ``momentum=None``)."""
    rng = np.random.default_rng(9)
    c, t = 4, 5
    sd = {
        "weight": rng.normal(1.0, 0.1, c).astype(np.float32),
        "bias": rng.normal(0.0, 0.1, c).astype(np.float32),
        "running_mean": rng.normal(0.0, 1.0, c).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "num_batches_tracked": np.int64(t),
    }
    params, state = interop.from_torch(sd)
    x = rng.normal(2.0, 3.0, (16, c)).astype(np.float32)
    bn = presets.torch(momentum=momentum)
    y, new = jax.jit(lambda p, s, x: bn.apply(p, s, x, training=True))(params, state, x)
    m = 1.0 / (t + 1) if momentum is None else momentum
    x64 = x.astype(np.float64)
    want_mean = (1 - m) * sd["running_mean"] + m * x64.mean(0)
    want_var = (1 - m) * sd["running_var"] + m * x64.var(0, ddof=1)
    np.testing.assert_allclose(new.mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, want_var, rtol=1e-6)
    assert int(new.count) == t + 1
    xhat = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(y, xhat * sd["weight"] + sd["bias"], atol=1e-5)


def test_torch_count_beyond_int32_saturates_and_a_negative_one_is_refused():
    sd = {
        "running_mean": np.zeros(2, np.float32),
        "running_var": np.ones(2, np.float32),
        "num_batches_tracked": np.int64(2**32),  # wrapped to 0 before
    }
    assert int(interop.from_torch(sd)[1].count) == 2**31 - 1
    with pytest.raises(ValueError, match="num_batches_tracked must be >= 0"):
        interop.from_torch({**sd, "num_batches_tracked": np.int64(-1)})


def test_from_flax_whole_model_names_the_layers_and_the_call():
    """A whole model's variables raised ``KeyError: 'mean'``."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))
            return nn.BatchNorm(use_running_average=False, name="head_bn")(x)

    variables = Net().init(jax.random.key(0), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"whole model \(BatchNorm layers: \['BatchNorm_0'"):
        interop.from_flax(variables)
    with pytest.raises(ValueError, match="'batch_stats'"):
        interop.from_flax({"params": variables["params"]})
    layer = {k: v["head_bn"] for k, v in variables.items()}
    params, state = interop.from_flax(layer)
    assert state.mean.shape == (3,)


def test_core_apply_given_flax_variables_points_to_from_flax():
    bn = bnjax.BatchNorm()
    variables = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), jnp.ones((4, 3)))
    _, state = bn.init((4, 3))
    with pytest.raises(TypeError, match=r"bnjax.interop.from_flax\(variables\)") as info:
        bn.apply(variables["params"], state, jnp.ones((4, 3)), training=True)
    assert "keys ['bias', 'scale']" in str(info.value)


@pytest.mark.parametrize("center", ["no", 1, None])
def test_from_keras_flags_must_be_bools(center):
    """``center="no"`` failed with "invalid literal for int()"."""
    weights = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
    with pytest.raises(TypeError, match=rf"^center must be a Python bool; got {center!r}"):
        interop.from_keras(weights, center=center)


@pytest.mark.parametrize(
    "decay_rate, kind", [("x", TypeError), (None, TypeError), (1.5, ValueError), (-0.1, ValueError)]
)
def test_to_haiku_refuses_a_decay_rate_outside_0_1(decay_rate, kind):
    """``decay_rate=1.5`` was accepted (hidden = -2.03), "x" and None gave numpy errors."""
    params, state = bnjax.BatchNorm().init((4, 3))
    with pytest.raises(kind, match=r"^decay_rate"):
        interop.to_haiku(params, state, decay_rate=decay_rate, ndim=2)


def test_counts_must_be_integer_scalars():
    variables = {"params": {}, "batch_stats": {"mean": np.zeros(3), "var": np.ones(3)}}
    for bad in (np.array([1, 2]), np.float32(3.0)):
        with pytest.raises(TypeError, match=r"^count must be an integer scalar; got "):
            interop.from_flax(variables, count=bad)


def test_keras_defaults_read_gamma_and_beta():
    """Keras's own defaults are center=True and scale=True: four weights."""
    gamma, beta, mean, var = np.full(3, 2.0), np.full(3, 0.5), np.zeros(3), np.ones(3)
    params, state = interop.from_keras([gamma, beta, mean, var])
    np.testing.assert_array_equal(params.scale, gamma)
    np.testing.assert_array_equal(params.bias, beta)
    np.testing.assert_array_equal(state.var, var)


def test_from_flax_takes_an_object_as_an_nnx_module_only_with_mean_and_var():
    with pytest.raises(ValueError, match=r"^variables must hold one BatchNorm's 'batch_stats'"):
        interop.from_flax(types.SimpleNamespace(mean=np.zeros(3)))
