"""The normalizing pass and its custom gradient, against the float64 textbook formula.

The reference is ``(x - mean) / sqrt(var + eps) * scale + bias`` with the masked batch mean
and biased variance, written in jax.numpy and differentiated by autodiff in float64
(``jax.enable_x64``), independently of bnjax's closed-form backward pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import full_mask, reduce_axes, train_forward

import bnjax
from bnjax._src.moments import Moments
from bnjax._src.normalize import affine_pass

EPS = 1e-3


def _textbook_grads(x, scale, bias, mask, g, axis, training=True, stats=None):
    """float64 gradients of ``sum(g * y)`` wrt ``x``, ``scale``, ``bias`` by autodiff."""
    with jax.enable_x64(True):
        w = jnp.asarray(full_mask(mask, x.shape, axis))
        red = reduce_axes(axis, x.ndim)
        keep = tuple(1 if i in red else d for i, d in enumerate(x.shape))
        k = lambda a: jnp.reshape(jnp.asarray(a, jnp.float64), keep)  # noqa: E731

        def loss(x, scale, bias):
            if training:
                n = jnp.sum(w, red, keepdims=True, dtype=jnp.float64)
                mean = jnp.sum(jnp.where(w, x, 0.0), red, keepdims=True) / n
                var = jnp.sum(jnp.where(w, (x - mean) ** 2, 0.0), red, keepdims=True) / n
            else:
                mean, var = k(stats[0]), k(stats[1])
            y = (x - mean) / jnp.sqrt(var + EPS)
            y = y if scale is None else y * k(scale)
            y = y if bias is None else y + k(bias)
            return jnp.sum(jnp.asarray(g, jnp.float64) * y)

        args = [None if a is None else jnp.asarray(a, jnp.float64) for a in (x, scale, bias)]
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        return [None if a is None else np.asarray(a) for a in grads]


def _bnjax_grads(bn, params, state, x, mask, g, training):
    def loss(x, params):
        y, _ = bn.apply(params, state, x, training=training, mask=mask)
        return jnp.sum(g * y.astype(jnp.float32)), y

    (_, y), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, dx, dparams.scale, dparams.bias


def _assert_close(got, want):
    # float32 forward and backward of O(1) values, sums over at most 64 terms: the
    # float64 results are met to a few float32 ulps of the largest entry.
    assert (got is None) == (want is None)
    if want is not None:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


CASES = {
    "channels_last": ((16, 3), -1, None),
    "reduced_mask": ((8, 4, 3), -1, "reduced"),
    "flax_full_mask": ((16, 3), -1, "full"),
    "nchw": ((4, 3, 2, 2), 1, "reduced"),
    "tuple_axes": ((5, 3, 4), (1, 2), "reduced"),
}


def _mask(kind, shape, axis, rng):
    if kind is None:
        return None
    red_shape = tuple(shape[i] for i in reduce_axes(axis, len(shape)))
    mask = rng.random(shape if kind == "full" else red_shape) < 0.7
    mask.reshape(-1)[0] = False  # the first element (a natural pivot) is left out
    return mask


# Every layout with both parameters, and the parameter options on one masked layout.
OPTIONS = [(case, True, True) for case in CASES] + [
    pytest.param("reduced_mask", center, scale, marks=pytest.mark.slow)  # make test-all only
    for center, scale in ((False, True), (True, False), (False, False))
]


@pytest.mark.parametrize(("case", "center", "scale"), OPTIONS)
def test_training_gradients_match_float64_textbook(maybe_jit, case, center, scale):
    shape, axis, kind = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    mask = _mask(kind, shape, axis, rng)
    g = rng.normal(size=shape).astype(np.float32)
    bn = bnjax.BatchNorm(axis=axis, epsilon=EPS, center=center, scale=scale)
    params, state = bn.init(x)
    feat = bn.feature_shape(shape)
    params = params._replace(
        scale=jnp.asarray(rng.uniform(0.5, 2, feat), jnp.float32) if scale else None,
        bias=jnp.asarray(rng.normal(size=feat), jnp.float32) if center else None,
    )
    run = maybe_jit(functools.partial(_bnjax_grads, bn, training=True))
    m = None if mask is None else jnp.asarray(mask)
    y, dx, dscale, dbias = run(params, state, jnp.asarray(x), m, jnp.asarray(g))
    p64 = [None if a is None else np.asarray(a) for a in params]
    want = _textbook_grads(x, *p64, mask, g, axis)
    _assert_close(y, train_forward(x, EPS, *p64, axis=axis, mask=mask))
    for got, ref in zip((dx, dscale, dbias), want, strict=True):
        _assert_close(got, ref)


def test_masked_out_inputs_get_only_their_direct_gradient(maybe_jit):
    # A masked-out element does not shape the statistics: its output moves with it at
    # slope scale/sqrt(var+eps). NaN and Inf padding:
    # test_masked_out_nan_and_inf_padding_leave_the_gradients_finite.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    mask = np.arange(16) < 11
    g = rng.normal(size=(16, 3)).astype(np.float32)
    bn = bnjax.BatchNorm(epsilon=EPS)
    params, state = bn.init(x)
    run = maybe_jit(functools.partial(_bnjax_grads, bn, training=True))
    _, dx, dscale, dbias = run(params, state, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(g))
    want = _textbook_grads(x, np.ones(3), np.zeros(3), mask, g, -1)
    for got, ref in zip((dx, dscale, dbias), want, strict=True):
        _assert_close(got, ref)
    slope = 1 / np.sqrt(np.var(x[mask].astype(np.float64), 0) + EPS)
    np.testing.assert_allclose(dx[~mask], g[~mask] * slope, rtol=1e-5)


def test_inference_gradients_match_float64_textbook(maybe_jit):
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (16, 3)).astype(np.float32)
    g = rng.normal(size=(16, 3)).astype(np.float32)
    bn = bnjax.BatchNorm(epsilon=EPS)
    params, state = bn.init(x)
    stats = (rng.normal(size=3), rng.uniform(0.5, 4, 3))
    state = state._replace(mean=jnp.asarray(stats[0], jnp.float32))
    state = state._replace(var=jnp.asarray(stats[1], jnp.float32))
    params = params._replace(scale=jnp.asarray([0.5, 1.0, 2.0], jnp.float32))
    run = maybe_jit(functools.partial(_bnjax_grads, bn, training=False))
    _, dx, dscale, dbias = run(params, state, jnp.asarray(x), None, jnp.asarray(g))
    stats32 = [np.asarray(a, np.float64) for a in (state.mean, state.var)]
    want = _textbook_grads(x, np.asarray(params.scale), np.zeros(3), None, g, -1, False, stats32)
    for got, ref in zip((dx, dscale, dbias), want, strict=True):
        _assert_close(got, ref)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradients_keep_dtypes(maybe_jit, dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(16, 3)), dtype)
    # The cotangent reaching y is cast to y's dtype: round it there for the reference too.
    g = np.asarray(jnp.asarray(rng.normal(size=(16, 3)), dtype).astype(jnp.float32))
    bn = bnjax.BatchNorm(epsilon=EPS)
    params, state = bn.init(x)
    run = maybe_jit(functools.partial(_bnjax_grads, bn, training=True))
    y, dx, dscale, dbias = run(params, state, x, None, jnp.asarray(g))
    assert y.dtype == dtype and dx.dtype == dtype
    assert dscale.dtype == jnp.float32 and dbias.dtype == jnp.float32
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    want = _textbook_grads(x64, np.ones(3), np.zeros(3), None, g, -1)
    # Statistics and parameter gradients are float32 sums: float32 accuracy.
    _assert_close(dscale, want[1])
    _assert_close(dbias, want[2])
    # dx is rounded once to the input dtype: half an ulp relative (2^-8 bf16, 2^-11 f16).
    rtol = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
    np.testing.assert_allclose(np.asarray(dx, np.float32), want[0], rtol=rtol, atol=1e-6)


# The fast tier runs the two ratios on either side of the plain sums' condition (2).
@pytest.mark.parametrize(
    "ratio",
    [
        pytest.param(0.0, marks=pytest.mark.slow),
        1.9,
        2.1,
        pytest.param(30.0, marks=pytest.mark.slow),
        pytest.param(1e4, marks=pytest.mark.slow),
    ],
)
def test_gradients_from_centred_to_offset_data(maybe_jit, ratio):
    """Batches whose mean is ``ratio`` standard deviations from zero, a cotangent with a
    large mean: well-conditioned batches take the plain sums forward and backward
    (``sum(g * x) - mean * sum(g)``), the others the centred ones; both meet float64."""
    rng = np.random.default_rng([4, int(ratio)])
    std = 0.1 if ratio > 100 else 1.0
    x = rng.normal(ratio * std, std, (256, 3)).astype(np.float32)
    g = rng.normal(3.0, 1.0, (256, 3)).astype(np.float32)
    bn = bnjax.BatchNorm(epsilon=EPS)
    params, state = bn.init(x)
    params = params._replace(scale=jnp.asarray([0.5, 1.0, 2.0], jnp.float32))
    run = maybe_jit(functools.partial(_bnjax_grads, bn, training=True))
    y, dx, dscale, dbias = run(params, state, jnp.asarray(x), None, jnp.asarray(g))
    p64 = [np.asarray(a, np.float64) for a in params]
    want = _textbook_grads(x, *p64, None, g, -1)
    _assert_close(y, train_forward(x, EPS, *p64))
    for got, ref in zip((dx, dscale, dbias), want, strict=True):
        _assert_close(got, ref)


@pytest.mark.slow
def test_hessian_matches_float64_and_forward_mode_is_refused():
    """Reverse mode composes (jax.hessian differentiates the closed-form backward), while
    forward mode through training mode is refused by the custom_vjp, as documented."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(1.0, 2.0, (8, 3)), jnp.float32)
    bn = bnjax.BatchNorm(epsilon=EPS)
    params, state = bn.init(x)

    def f(x):
        return jnp.sum(bn.apply(params, state, x, training=True)[0] ** 3)

    with jax.enable_x64(True):

        def textbook(x):
            mean = x.mean(0)
            return jnp.sum(((x - mean) / jnp.sqrt(((x - mean) ** 2).mean(0) + EPS)) ** 3)

        want = np.asarray(jax.hessian(textbook)(jnp.asarray(x, jnp.float64)))
    _assert_close(np.asarray(jax.jit(jax.hessian(f))(x)), want)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (x,), (x,))
    # Inference mode is plain JAX: forward mode works and equals reverse mode.
    y = lambda x: bn.apply(params, state, x, training=False)[0]  # noqa: E731
    _, tangent = jax.jvp(y, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(tangent, jax.grad(lambda x: jnp.sum(y(x)))(x), rtol=1e-6)


@pytest.mark.parametrize(
    "dtype, subtractions", [(jnp.bfloat16, 0), (jnp.float16, 0), (jnp.float32, 1)]
)
def test_coarse_inputs_take_one_multiply_add_per_element(dtype, subtractions):
    """bfloat16 and float16 inputs are normalized as ``x * a + offset``, with no
    subtraction per element (the pass runs at the speed of a plain affine); float32 inputs
    subtract the rounded mean first, so offset data lose nothing to cancellation."""
    x = jnp.ones((8, 3), dtype)
    per = jnp.ones((1, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: affine_pass(x, per, per, per, per, dtype))(x)
    full = [e.primitive.name for e in jaxpr.eqns if e.outvars[0].aval.shape == x.shape]
    assert full.count("sub") == subtractions and full.count("mul") == 1, full


def test_rounded_shift_splits_the_mean_into_its_rounding_and_the_rest():
    """``pivot + delta`` rounded to float32, and the residual the rounding left out: the two
    add up to ``pivot + delta`` to the residual's own rounding."""
    pivot = jnp.asarray([1000.0, -3.0, 0.0], jnp.float32)
    delta = jnp.asarray([5e-5, 2e-7, 0.0], jnp.float32)  # past half a rounding unit
    one = jnp.ones_like(pivot)
    mean, residual = Moments(one, pivot, delta, one, one).rounded_shift()
    want = np.float64(pivot) + np.float64(delta)
    np.testing.assert_array_equal(mean, want.astype(np.float32))
    np.testing.assert_allclose(np.float64(mean) + np.float64(residual), want, rtol=1e-13)


def test_masked_out_nan_and_inf_padding_leave_the_gradients_finite(maybe_jit):
    """Padding filled with NaN and Inf, masked out, and ignored by the loss (cotangent 0
    there): ``0 * NaN`` must not reach the sums, and a cotangent of exactly 1 or -1 counts
    like any other. Against float64 on the padding replaced by zeros."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    mask = np.arange(16) < 11
    x[11:13] = np.nan
    x[13:] = np.inf
    g = rng.normal(size=(16, 3)).astype(np.float32)
    g[:11:3] = 1.0
    g[1:11:4] = -1.0
    g[~mask] = 0.0
    bn = bnjax.BatchNorm(epsilon=EPS)
    params, state = bn.init(x)
    run = maybe_jit(functools.partial(_bnjax_grads, bn, training=True))
    _, dx, dscale, dbias = run(params, state, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(g))
    filled = np.where(mask[:, None], x, 0).astype(np.float32)
    want = _textbook_grads(filled, np.ones(3), np.zeros(3), mask, g, -1)
    for got, ref in zip((dx, dscale, dbias), want, strict=True):
        assert np.all(np.isfinite(got))
        _assert_close(got, ref)
