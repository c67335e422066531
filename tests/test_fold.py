"""Folding inference-mode batch norm into Dense and Conv layers, against numpy float64."""

import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def bn_infer(y, mean, var, eps, scale=None, bias=None):
    out = (y - mean) / np.sqrt(var + eps)
    if scale is not None:
        out = out * scale
    return out if bias is None else out + bias


def conv_hwio(x, kernel, bias=None):
    """VALID, stride-1 2-D convolution of NHWC ``x`` with an HWIO kernel, in float64."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwi,io->nhwo", x[:, i : i + h, j : j + w], kernel[i, j])
    return out if bias is None else out + np.asarray(bias, np.float64)


def _bn(out, center=True, scale=True, seed=0):
    rng = np.random.default_rng(seed)
    bn = bnjax.BatchNorm(center=center, scale=scale, epsilon=1e-3)
    params, state = bn.init((1, out))
    params = bnjax.BatchNormParams(
        jnp.asarray(rng.uniform(0.5, 2, out), jnp.float32) if scale else None,
        jnp.asarray(rng.normal(size=out), jnp.float32) if center else None,
    )
    state = state._replace(
        mean=jnp.asarray(rng.normal(size=out) * 3, jnp.float32),
        var=jnp.asarray(rng.uniform(0.1, 5, out), jnp.float32),
    )
    return bn, params, state


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


@pytest.mark.parametrize(
    ("center", "scale", "with_bias"),
    [(True, True, True), (False, True, False), (True, False, True), (False, False, False)],
)
def test_fold_into_dense(center, scale, with_bias, maybe_jit):
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(5, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32) if with_bias else None
    x = rng.normal(size=(7, 5))
    bn, params, state = _bn(4, center, scale)
    fold = maybe_jit(bnjax.fold_into_dense, static_argnums=0)
    k2, b2 = fold(
        bn, params, state, jnp.asarray(kernel), None if bias is None else jnp.asarray(bias)
    )
    assert k2.shape == (5, 4) and b2.shape == (4,) and k2.dtype == jnp.float32
    y = x @ kernel.astype(np.float64) + (0 if bias is None else bias.astype(np.float64))
    expected = bn_infer(
        y, _f64(state.mean), _f64(state.var), 1e-3, _f64(params.scale), _f64(params.bias)
    )
    np.testing.assert_allclose(
        x @ np.asarray(k2, np.float64) + np.asarray(b2), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_conv(with_bias, maybe_jit):
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32) if with_bias else None
    x = rng.normal(size=(2, 6, 5, 3))
    bn, params, state = _bn(4, seed=3)
    fold = maybe_jit(bnjax.fold_into_conv, static_argnums=0)
    k2, b2 = fold(
        bn, params, state, jnp.asarray(kernel), None if bias is None else jnp.asarray(bias)
    )
    assert k2.shape == kernel.shape and b2.shape == (4,)
    expected = bn_infer(
        conv_hwio(x, kernel, bias),
        _f64(state.mean),
        _f64(state.var),
        1e-3,
        _f64(params.scale),
        _f64(params.bias),
    )
    np.testing.assert_allclose(conv_hwio(x, k2, b2), expected, rtol=1e-5, atol=1e-5)


def test_fold_after_training_steps():
    rng = np.random.default_rng(4)
    bn = bnjax.BatchNorm(momentum=0.5)
    kernel = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    params, state = bn.init((1, 2))
    for _ in range(3):
        h = jnp.asarray(rng.normal(size=(16, 3)) * 2 + 1, jnp.float32) @ kernel
        _, state = bn.apply(params, state, h, training=True)
    x = rng.normal(size=(4, 3))
    k2, b2 = bnjax.fold_into_dense(bn, params, state, kernel)
    y = x @ np.asarray(kernel, np.float64)
    expected = bn_infer(y, _f64(state.mean), _f64(state.var), 1e-5)
    np.testing.assert_allclose(
        x @ np.asarray(k2, np.float64) + np.asarray(b2), expected, rtol=1e-5, atol=1e-5
    )


def test_shape_errors():
    bn, params, state = _bn(4)
    with pytest.raises(ValueError, match=r"state.mean has shape \(4,\); expected \(3,\)"):
        bnjax.fold_into_dense(bn, params, state, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="expected a Dense kernel"):
        bnjax.fold_into_dense(bn, params, state, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="expected a Conv kernel"):
        bnjax.fold_into_conv(bn, params, state, jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="bias has shape"):
        bnjax.fold_into_dense(bn, params, state, jnp.ones((5, 4)), jnp.ones(3))
    multi = bnjax.BatchNorm(axis=(1, 2))
    with pytest.raises(ValueError, match="several axes"):
        bnjax.fold_into_conv(multi, params, state, jnp.ones((3, 3, 2, 4)))


def test_integer_bias_and_kernel_fold_into_floats(maybe_jit):
    """``jnp.arange(3)`` as the Dense bias gave an int32 folded bias ([-2, 0, 0])."""
    bn = bnjax.BatchNorm(epsilon=1e-3)
    params = bnjax.BatchNormParams(
        scale=jnp.array([1.5, 0.5, 2.0]), bias=jnp.array([0.1, 0.2, 0.3])
    )
    state = bnjax.BatchNormState(
        mean=jnp.array([2.0, -1.0, 0.5]), var=jnp.array([1.2, 2.5, 0.7]), count=jnp.array(3)
    )
    kernel = jnp.arange(6).reshape(2, 3)
    x = np.array([[0.5, -1.0], [2.0, 3.0]])
    for k, b in ((kernel.astype(jnp.float32), jnp.arange(3)), (kernel, jnp.arange(3.0))):
        new_k, new_b = maybe_jit(bnjax.fold_into_dense, static_argnums=0)(bn, params, state, k, b)
        assert new_k.dtype == jnp.float32 and new_b.dtype == jnp.float32
        ref = (
            x @ np.asarray(kernel, np.float64) + np.arange(3) - np.asarray(state.mean)
        ) / np.sqrt(np.asarray(state.var, np.float64) + 1e-3) * np.asarray(
            params.scale
        ) + np.asarray(params.bias)
        np.testing.assert_allclose(x @ np.asarray(new_k) + np.asarray(new_b), ref, rtol=1e-5)


def test_int64_kernel_under_x64_folds_into_floats():
    """Under x64 an int64 kernel made the computation dtype int64 (rsqrt of integers)."""
    import jax

    with jax.enable_x64(True):
        bn = bnjax.BatchNorm()
        params, state = bn.init((1, 3))
        kernel = jnp.arange(6, dtype=jnp.int64).reshape(2, 3)
        new_k, new_b = bnjax.fold_into_dense(bn, params, state, kernel, jnp.arange(3))
        assert jnp.issubdtype(new_k.dtype, jnp.floating)
        assert jnp.issubdtype(new_b.dtype, jnp.floating)
        want = np.arange(6).reshape(2, 3) / np.sqrt(1 + 1e-5)
        np.testing.assert_allclose(np.asarray(new_k), want, rtol=1e-6)


def test_fold_edges():
    """Survivors of the mutation run: a 1-D conv kernel (3 dims) folds; a BatchNorm over
    two axes does not."""
    bn, params, state = _bn(4, seed=5)
    kernel = jnp.asarray(np.random.default_rng(6).normal(size=(3, 2, 4)), jnp.float32)
    k2, b2 = bnjax.fold_into_conv(bn, params, state, kernel)
    assert k2.shape == (3, 2, 4) and b2.shape == (4,)
    two = bnjax.BatchNorm(axis=(1, 2))
    with pytest.raises(ValueError, match="several axes"):
        bnjax.fold_into_dense(two, params, state, jnp.ones((5, 4)))
