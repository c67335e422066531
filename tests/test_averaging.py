"""Running averages (``bnjax._src.averaging``) against their float64 closed forms."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import moments, running_average, running_stats

import bnjax
from bnjax._src.averaging import update
from bnjax._src.moments import Moments
from bnjax._src.types import BatchNormState

# maybe_jit is a stateless function-scoped fixture, safe to share across examples.
PROPERTY = settings(
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ]
)
# Each example compiles apply for its configuration: fewer examples than the profile's 25.
COSTLY = settings(PROPERTY, max_examples=10)
MODES = ["ema", "debiased", "cumulative", "ema_from_first"]


def _step(bn, params, state, x, mask):
    return bn.apply(params, state, x, training=True, mask=mask)


def _train(bn, batches, maybe_jit, masks=None):
    """Folds ``batches`` one by one through ``apply(training=True)``; returns the state."""
    params, state = bn.init(batches[0])
    step = functools.partial(maybe_jit(_step, static_argnames=("bn",)), bn)
    for x, m in zip(batches, masks or [None] * len(batches), strict=True):
        _, state = step(params, state, jnp.asarray(x), None if m is None else jnp.asarray(m))
    return state


def _assert_state(state, mean, var, count):
    # float32 state after a handful of float32 updates: a few ulps of the O(1) values.
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, var, rtol=1e-5, atol=1e-6)
    assert int(state.count) == count and state.count.dtype == jnp.int32


@COSTLY
@given(
    averaging=st.sampled_from(MODES),
    running_var=st.sampled_from(["biased", "unbiased"]),
    momentum=st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99, 1.0]),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_state_after_k_batches_is_the_closed_form(
    maybe_jit, averaging, running_var, momentum, k, seed
):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), (5, 3)) for _ in range(k)]
    batches = [b.astype(np.float32) for b in batches]
    bn = bnjax.BatchNorm(momentum=momentum, averaging=averaging, running_var=running_var)
    state = _train(bn, batches, maybe_jit)
    mean, var = running_stats(
        batches, momentum=momentum, averaging=averaging, running_var=running_var
    )
    _assert_state(state, mean, var, k)


def test_closed_forms_by_hand():
    # The reference closed forms themselves, on numbers small enough to check by hand.
    b = np.array([2.0, 4.0, 8.0])
    assert running_average(b, 0.5, "ema", 1.0) == pytest.approx(0.125 + 0.25 + 1.0 + 4.0)
    assert running_average(b, 0.5, "debiased", 1.0) == pytest.approx((0.5 + 2 + 8) / 1.75)
    assert running_average(b, 0.5, "cumulative", 1.0) == pytest.approx(14 / 3)
    # 2, then 2 + (4 - 2) / 2 = 3, then 3 + (8 - 3) / 2 = 5.5: the first batch taken whole.
    assert running_average(b, 0.5, "ema_from_first", 1.0) == pytest.approx(5.5)


@pytest.mark.parametrize("averaging", MODES)
def test_unbiased_uses_the_count_after_masking(maybe_jit, averaging):
    rng = np.random.default_rng(1)
    batches = [rng.normal(1.0, 2.0, (8, 2)).astype(np.float32) for _ in range(3)]
    masks = [np.arange(8) < c for c in (3, 8, 5)]  # n = 3, 8, 5 counted elements
    bn = bnjax.BatchNorm(momentum=0.9, averaging=averaging, running_var="unbiased")
    state = _train(bn, batches, maybe_jit, masks)
    mean, var = running_stats(
        batches, momentum=0.9, averaging=averaging, running_var="unbiased", masks=masks
    )
    _assert_state(state, mean, var, 3)
    # Bessel's factor of the first batch is 3/2, not 8/7: check it moved the result.
    wrong = running_average([moments(b)[2] * 8 / 7 for b in batches], 0.9, averaging, np.ones(2))
    assert np.all(np.abs(np.asarray(state.var) - wrong) > 1e-3)


@pytest.mark.parametrize("averaging", MODES)
def test_momentum_zero_keeps_only_the_last_batch(maybe_jit, averaging):
    rng = np.random.default_rng(2)
    batches = [rng.normal(2.0, 3.0, (6, 4)).astype(np.float32) for _ in range(3)]
    state = _train(bnjax.BatchNorm(momentum=0.0, averaging=averaging), batches, maybe_jit)
    if averaging == "cumulative":  # momentum plays no part: the mean of the batches
        expected = [np.mean([moments(b)[i] for b in batches], 0) for i in (1, 2)]
    else:
        expected = moments(batches[-1])[1:]
    _assert_state(state, *expected, 3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_weight_of_one_takes_the_batch_exactly(maybe_jit, momentum):
    """momentum=0 (every mode but cumulative) and the first batch of "debiased" (w = 1):
    the stored statistics are the batch's own, bit for bit, even far from the initial
    mean 0 and variance 1 (``old + w * (batch - old)`` would round them)."""
    x = np.random.default_rng(4).normal(1e3, 0.01, (64, 3)).astype(np.float32)
    averaging = "ema" if momentum == 0.0 else "debiased"
    bn = bnjax.BatchNorm(momentum=momentum, averaging=averaging)
    params, state = bn.init(x)
    run = maybe_jit(lambda p, s, x: bn.apply(p, s, x, training=True)[1])
    new = run(params, state, jnp.asarray(x))
    # The batch statistics as the recalibration accumulator sees them (no averaging).
    acc = bnjax.recalibrate(bn.apply, params, state, [jnp.asarray(x)])
    np.testing.assert_array_equal(np.asarray(new.mean), np.asarray(acc.mean))
    np.testing.assert_array_equal(np.asarray(new.var), np.asarray(acc.var))
    _, mean, var = moments(x)
    np.testing.assert_allclose(np.asarray(new.var), var, rtol=2e-6)


@pytest.mark.parametrize("averaging", MODES)
def test_momentum_one(maybe_jit, averaging):
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, (6, 4)).astype(np.float32) for _ in range(3)]
    state = _train(bnjax.BatchNorm(momentum=1.0, averaging=averaging), batches, maybe_jit)
    if averaging == "ema":  # the initial statistics are never left
        expected = (np.zeros(4), np.ones(4))
    elif averaging == "ema_from_first":  # the first batch is never left
        expected = moments(batches[0])[1:]
    else:  # debiased EMA tends to the equal-weight mean as momentum -> 1
        expected = [np.mean([moments(b)[i] for b in batches], 0) for i in (1, 2)]
    _assert_state(state, *expected, 3)


def test_ema_from_first_is_its_closed_form_in_float64():
    """Equinox's ``mode="ema"``: the first batch taken whole, then weight ``1 - m``; in
    float64 (state and data) it is the float64 closed form to rounding, from any start."""
    rng = np.random.default_rng(7)
    batches = [rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), (6, 3)) for _ in range(4)]
    bn = bnjax.BatchNorm(momentum=0.8, averaging="ema_from_first")
    with jax.enable_x64(True):
        params, state = bn.init(batches[0])
        assert state.mean.dtype == jnp.float64
        state = state._replace(mean=state.mean + 5.0, var=state.var * 7.0)  # never seen
        for k, x in enumerate(batches, 1):
            _, state = bn.apply(params, state, jnp.asarray(x), training=True)
            mean, var = running_stats(
                batches[:k], momentum=0.8, averaging="ema_from_first", running_var="biased"
            )
            np.testing.assert_allclose(state.mean, mean, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(state.var, var, rtol=1e-13, atol=1e-13)
            assert int(state.count) == k
        # At count 0 the batch replaces any state exactly, as the first batch of
        # "cumulative" does (a weight of exactly 1).
        first = jnp.asarray(batches[1])
        fresh = state._replace(count=jnp.zeros((), jnp.int32))
        ours = bn.apply(params, fresh, first, training=True)[1]
        whole = dataclasses.replace(bn, averaging="cumulative")
        for a, b in zip(ours, whole.apply(params, fresh, first, training=True)[1], strict=True):
            np.testing.assert_array_equal(a, b)


def _moments_of(x):
    """Moments of a (n, c) float32 batch in keep-dims shape, from the float64 reference."""
    n, mean, var = moments(x)
    as32 = lambda a: jnp.asarray(a.reshape(1, -1), jnp.float32)  # noqa: E731
    zeros = jnp.zeros_like(as32(mean))
    return Moments(n=as32(n), pivot=as32(mean), delta=zeros, scaled_var=as32(var), unit=zeros + 1)


def _update(state, mom, **kwargs):
    options = dict(momentum=0.9, averaging="ema", running_var="biased", skip_nonfinite=True)
    return update(state, mom, **(options | kwargs))


def _state(mean, var, count):
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return BatchNormState(f32(mean), f32(var), jnp.asarray(count, jnp.int32))


def test_fold_one_step_from_any_count(maybe_jit):
    x = np.random.default_rng(4).normal(1.0, 2.0, (5, 3))
    _, mean, var = moments(x)
    state = _state([0.5, -1.0, 2.0], [1.5, 0.5, 3.0], 4)
    weights = (("ema", 0.1), ("debiased", 0.1 / (1 - 0.9**5)), ("cumulative", 0.2),
               ("ema_from_first", 0.1))  # fmt: skip
    for averaging, w in weights:
        new = maybe_jit(lambda s, m, a=averaging: _update(s, m, averaging=a))(state, _moments_of(x))
        np.testing.assert_allclose(new.mean, state.mean + w * (mean - state.mean), rtol=1e-6)
        np.testing.assert_allclose(new.var, state.var + w * (var - state.var), rtol=1e-6)
        assert int(new.count) == 5


def test_update_skips_unusable_batches(maybe_jit):
    state = _state([0.5, -1.0], [1.5, 0.5], 2)
    x = np.random.default_rng(5).normal(size=(4, 2))
    bad = [
        # A feature without data under a count-weighted average: the batch is left out.
        (_moments_of(x)._replace(n=jnp.asarray([[4.0, 0.0]], jnp.float32)), "debiased"),
        (_moments_of(x)._replace(n=jnp.asarray([[0.0, 4.0]], jnp.float32)), "cumulative"),
        (_moments_of(x)._replace(n=jnp.asarray([[4.0, 0.0]], jnp.float32)), "ema_from_first"),
        (_moments_of(x)._replace(n=jnp.asarray([[0.0, 0.0]], jnp.float32)), "ema"),
        (_moments_of(x)._replace(scaled_var=jnp.asarray([[1.0, np.nan]], jnp.float32)), "ema"),
        (_moments_of(x)._replace(delta=jnp.asarray([[np.inf, 0.0]], jnp.float32)), "ema"),
    ]
    for mom, averaging in bad:
        new = maybe_jit(lambda s, m, a=averaging: _update(s, m, averaging=a))(state, mom)
        for got, want in zip(new, state, strict=True):
            np.testing.assert_array_equal(got, want)
    # Without skip_nonfinite, a NaN batch is averaged in (and counted).
    mom = _moments_of(x)._replace(scaled_var=jnp.asarray([[1.0, np.nan]], jnp.float32))
    new = maybe_jit(lambda s, m: _update(s, m, skip_nonfinite=False))(state, mom)
    assert np.isnan(new.var[1]) and int(new.count) == 3


@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_ema_averages_the_features_with_data_and_keeps_the_others(maybe_jit, running_var):
    """A feature with no counted element (two for the unbiased variance) keeps its
    statistics; the features with data take the batch as if it had been alone."""
    state = _state([0.5, -1.0, 2.0], [1.5, 0.5, 3.0], 2)
    x = np.random.default_rng(6).normal(size=(4, 3))
    short = 1.0 if running_var == "unbiased" else 0.0
    mom = _moments_of(x)._replace(n=jnp.asarray([[4.0, short, 4.0]], jnp.float32))
    full = maybe_jit(lambda s, m: _update(s, m, running_var=running_var))(state, _moments_of(x))
    new = maybe_jit(lambda s, m: _update(s, m, running_var=running_var))(state, mom)
    pairs = ((new.mean, full.mean, state.mean), (new.var, full.var, state.var))
    for got, whole, old in (tuple(np.asarray(a) for a in p) for p in pairs):
        np.testing.assert_array_equal(got[[0, 2]], whole[[0, 2]])
        np.testing.assert_array_equal(got[1], old[1])
    assert int(new.count) == 3


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8])
def test_count_saturates_instead_of_wrapping(dtype):
    """At the largest value of its dtype the count stays there: wrapped (negative int32,
    0 for uint8) it froze the running statistics or restarted them."""
    top = int(jnp.iinfo(dtype).max)
    bn = bnjax.BatchNorm(averaging="cumulative")
    params, state = bn.init((8, 2))
    state = state._replace(mean=jnp.ones(2), var=jnp.full(2, 2.0), count=jnp.asarray(top, dtype))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 2)), jnp.float32)
    _, new = bn.apply(params, state, x, training=True)
    assert new.count.dtype == dtype and int(new.count) == top
    w = 1.0 / (top + 1.0)  # the batch still moves the average by its tiny weight
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(new.mean, 1 + w * (x64.mean(0) - 1), rtol=1e-6)
