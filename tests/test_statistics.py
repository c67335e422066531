"""Both statistics paths, exact on every input: ``BatchNorm(statistics=...)`` against float64.

Each case is a batch a user meets: centred data, offset data, an outlying first row, sparse
ReLU-like features, channels-first layouts, masks (with a running mean far from the data),
bfloat16 with an offset, and float32 values up to an eighth of float32's maximum. Both
``"checked"`` and ``"branchless"`` run on the CPU here, eagerly and under ``jax.jit``; the
variance must be within 1e-5 relative and the output within 1e-5 absolute of the float64
textbook values, and the gradients within 1e-5 of float64's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from reference import moments, train_forward

import bnjax

RNG = np.random.default_rng(11)
F32_MAX = float(np.finfo(np.float32).max)


def _case(name):
    """``(x, axis, mask)`` for one named case; x is float32 unless the case says otherwise."""
    n, c = 512, 4
    z = RNG.standard_normal((n, c))
    if name == "centred":
        return z, -1, None
    if name == "offset_1e3":
        return 1e3 + 0.1 * z, -1, None
    if name == "offset_1e6":
        return 1e6 + z, -1, None
    if name == "outlier_first_row":
        x = z.copy()
        x[0] = 1e3  # a thousand standard deviations away, and the first element seen
        return x, -1, None
    if name == "sparse_relu":
        return np.where(RNG.random((n, c)) < 0.03, 50 * RNG.random((n, c)), 0.0), -1, None
    if name == "nchw_offset":
        return 100 + RNG.standard_normal((8, 3, 6, 5)), 1, None
    if name == "masked_offset":
        x = 1e3 + 0.1 * z
        mask = RNG.random(n) < 0.7
        mask[0] = False  # the first element is padding ...
        x[~mask] = -1e9  # ... and so is every masked-out one, with a fill value
        return x, -1, mask
    if name == "huge":  # |x| up to float32's max / 8
        return z / np.max(np.abs(z)) * (F32_MAX / 8), -1, None
    if name == "near_1e19":
        return 1e19 * (1 + z), -1, None
    raise ValueError(name)


CASES = [
    "centred",
    "offset_1e3",
    "offset_1e6",
    "outlier_first_row",
    "sparse_relu",
    "nchw_offset",
    "masked_offset",
    "huge",
    "near_1e19",
]


@pytest.fixture(params=["checked", "branchless"])
def statistics(request):
    return request.param


def _train(bn, x, mask, jit, state=None):
    params, init_state = bn.init(x)
    state = init_state if state is None else state

    def run(params, state, x, mask):
        return bn.apply(params, state, x, training=True, mask=mask)

    run = jax.jit(run) if jit else run
    return run(params, state, jnp.asarray(x), None if mask is None else jnp.asarray(mask))


@pytest.mark.parametrize(
    "jit", [pytest.param(False, id="eager", marks=pytest.mark.slow), pytest.param(True, id="jit")]
)
# make test runs one case of each kind (centred, offset, masked, huge); make test-all all.
@pytest.mark.parametrize(
    "name",
    [
        c
        if c in ("centred", "offset_1e6", "masked_offset", "huge", "near_1e19")
        else pytest.param(c, marks=pytest.mark.slow)
        for c in CASES
    ],
)
def test_output_and_variance_match_float64(name, statistics, jit):
    x64, axis, mask = _case(name)
    x = x64.astype(np.float32)
    bn = bnjax.BatchNorm(axis=axis, momentum=0.0, epsilon=0.0, statistics=statistics)
    y, state = _train(bn, x, mask, jit)
    _, mean_ref, var_ref = moments(x, axis, mask)
    want = train_forward(x, 0.0, axis=axis, mask=mask)
    counted = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask[:, None], x.shape)
    err = np.max(np.abs(np.where(counted, np.asarray(y, np.float64) - want, 0)))
    assert err <= 1e-5, f"output error {err:.2e}"
    if name == "huge":  # the variance (about 1e74) cannot be stored in float32: kept
        np.testing.assert_array_equal(state.var, np.ones(4, np.float32))
        assert int(state.count) == 0
        return
    np.testing.assert_allclose(state.var, var_ref, rtol=1e-5)
    # The mean: within float32's rounding of it, plus 1e-6 standard deviations.
    err = np.abs(np.asarray(state.mean, np.float64) - mean_ref)
    assert np.all(err <= 6e-8 * np.abs(mean_ref) + 1e-6 * np.sqrt(var_ref)), err


@pytest.mark.parametrize(
    "jit", [pytest.param(False, id="eager", marks=pytest.mark.slow), pytest.param(True, id="jit")]
)
# make test runs the checked path (the default on the CPU); make test-all both.
@pytest.mark.parametrize(
    "statistics", ["checked", pytest.param("branchless", marks=pytest.mark.slow)]
)
def test_mask_with_a_far_running_mean_matches_no_mask(statistics, jit):
    """A loaded running mean of 1e8 with N(0, 1) data: the statistics come from the data,
    so an all-True mask gives what no mask gives (it gave variance 0 and an output off by
    about 960 when the masked passes were shifted by the running mean)."""
    x = RNG.standard_normal((256, 3)).astype(np.float32)
    bn = bnjax.BatchNorm(momentum=0.0, statistics=statistics)
    params, state = bn.init(x)
    far = state._replace(mean=jnp.full((3,), 1e8, jnp.float32), count=jnp.asarray(5, jnp.int32))
    y0, s0 = _train(bn, x, None, jit, far)
    y1, s1 = _train(bn, x, np.ones(256, bool), jit, far)
    want = train_forward(x, bn.epsilon)
    np.testing.assert_allclose(y0, want, atol=1e-5)
    np.testing.assert_allclose(y1, want, atol=1e-5)
    np.testing.assert_allclose(s1.var, s0.var, rtol=1e-6)
    np.testing.assert_allclose(s1.var, moments(x)[2], rtol=1e-5)


@pytest.mark.parametrize(
    "jit", [pytest.param(False, id="eager", marks=pytest.mark.slow), pytest.param(True, id="jit")]
)
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_bfloat16_input_with_offset(statistics, offset, jit):
    x = (offset + RNG.standard_normal((512, 4))).astype(jnp.bfloat16)
    exact = np.asarray(x.astype(jnp.float32), np.float64)  # the values as given
    bn = bnjax.BatchNorm(momentum=0.0, epsilon=0.0, statistics=statistics)
    y, state = _train(bn, x, None, jit)
    assert y.dtype == jnp.bfloat16 and state.var.dtype == jnp.float32
    np.testing.assert_allclose(state.var, exact.var(0), rtol=1e-5)
    want = train_forward(exact, 0.0)
    # The output is bfloat16: within half a bfloat16 rounding unit of the exact value
    # (plus what float32 arithmetic adds around the offset).
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-8, atol=1e-3)


@pytest.mark.parametrize(
    "jit", [pytest.param(False, id="eager", marks=pytest.mark.slow), pytest.param(True, id="jit")]
)
@pytest.mark.parametrize(
    "name",
    [
        "offset_1e3",
        pytest.param("outlier_first_row", marks=pytest.mark.slow),
        "masked_offset",
        pytest.param("huge", marks=pytest.mark.slow),
    ],
)
def test_gradients_match_float64(name, statistics, jit):
    x64, axis, mask = _case(name)
    x = x64.astype(np.float32)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    counted = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask[:, None], x.shape)
    g = np.where(counted, g, 0).astype(np.float32)  # the loss ignores padding, as usual
    bn = bnjax.BatchNorm(axis=axis, epsilon=0.0, statistics=statistics)
    params, state = bn.init(x)
    m = None if mask is None else jnp.asarray(mask)

    def loss(x, params):
        y, _ = bn.apply(params, state, x, training=True, mask=m)
        return jnp.sum(y * g)

    grad = jax.grad(loss, argnums=(0, 1))
    dx, dp = (jax.jit(grad) if jit else grad)(jnp.asarray(x), params)
    # float64 textbook gradients through the normalized values.
    xd = x.astype(np.float64)
    n = counted.sum(0)
    mean = np.where(counted, xd, 0).sum(0) / n
    xc = np.where(counted, xd - mean, 0)
    inv = 1 / np.sqrt((xc * xc).sum(0) / n)
    xhat = xc * inv
    gd = g.astype(np.float64)
    gc = np.where(counted, gd, 0)
    want_dx = inv * (gd - (gc.sum(0) + xhat * (gc * xhat).sum(0)) / n)
    want_dx = np.where(counted, want_dx, 0)
    want_scale = (gd * xhat).sum(0)
    if name != "huge":  # there dx is about 1e-38, below float32's normal range
        # dx is in units of 1 / std: compare relative to that.
        np.testing.assert_allclose(np.asarray(dx) / inv, want_dx / inv, atol=1e-5)
    np.testing.assert_allclose(dp.scale, want_scale, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dp.bias, gd.sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "jit", [pytest.param(False, id="eager", marks=pytest.mark.slow), pytest.param(True, id="jit")]
)
def test_unrepresentable_statistics_are_reported_by_checks(statistics, jit):
    """The batch normalizes, the update is skipped, and ``checks=True`` says so."""
    x = _case("huge")[0].astype(np.float32)
    bn = bnjax.BatchNorm(checks=True, statistics=statistics)
    params, state = bn.init(x)

    def run(params, state, x):
        return bn.apply(params, state, x, training=True)

    checked = checkify.checkify(run, errors=checkify.user_checks)
    with pytest.warns(bnjax.CheckWarning, match="beyond the range of the running statistics"):
        err, (y, new) = (jax.jit(checked) if jit else checked)(params, state, jnp.asarray(x))
        jax.effects_barrier()
    assert np.all(np.isfinite(np.asarray(y)))
    assert int(new.count) == 0
    assert "beyond the range of the running statistics' dtype" in str(err.get())


@pytest.mark.parametrize("statistics", ["checked", "branchless"])
def test_recalibration_is_exact_on_offset_batches(statistics):
    """8 batches of 64 rows with mean 1e3 and std 0.1: the population variance to 1e-6."""
    xs = (1e3 + 0.1 * RNG.standard_normal((8, 64, 5))).astype(np.float32)
    bn = bnjax.BatchNorm(statistics=statistics)
    params, state = bn.init(xs[0])
    state = bnjax.recalibrate(bn.apply, params, state, [jnp.asarray(x) for x in xs])
    ref = xs.reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(state.var, ref.var(0), rtol=1e-6)
    np.testing.assert_allclose(state.mean, ref.mean(0), rtol=6e-8)


@pytest.mark.slow
def test_float64_example_gives_float64_state():
    with jax.enable_x64(True):
        x = jnp.asarray(1e4 + 1e-2 * RNG.standard_normal((256, 3)))
        bn = bnjax.BatchNorm(momentum=0.0)
        params, state = bn.init(x)
        assert state.mean.dtype == jnp.float64 and state.var.dtype == jnp.float64
        y, state = bn.apply(params, state, x, training=True)
        y_eval, _ = bn.apply(params, state, x, training=False)
        # Inference on the batch just trained on gives the training output (it differed
        # by 0.04 standard deviations with a float32 state).
        np.testing.assert_allclose(y_eval, y, atol=1e-8)
        assert bn.init(x.shape)[1].mean.dtype == jnp.float32  # a shape says nothing
