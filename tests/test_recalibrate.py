"""Precise-BN recalibration against numpy float64 population statistics."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnjax
from bnjax._src.population import PopulationAccumulator, start


def _batches(seed, sizes, c=3, loc=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, c)) * scale + loc).astype(np.float32) for n in sizes]


def _train_norm(x, scale, bias, eps=1e-5):
    """Training-mode batch norm over axis 0 in float64."""
    x = np.asarray(x, np.float64)
    return (x - x.mean(0)) / np.sqrt(x.var(0) + eps) * scale + bias


@pytest.mark.slow
@pytest.mark.parametrize("running_var", ["biased", "unbiased"])
def test_single_layer_population_statistics(running_var):
    bn = bnjax.BatchNorm(running_var=running_var)
    batches = _batches(0, (8, 5, 16, 3))
    params, state = bn.init(batches[0])
    state = state._replace(count=jnp.asarray(40, jnp.int32), mean=jnp.full(3, 9.0))
    new = bnjax.recalibrate(bn.apply, params, state, batches)
    data = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(new.mean, data.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, data.var(0, ddof=int(running_var == "unbiased")), rtol=1e-5)
    assert int(new.count) == len(batches)
    assert new.mean.dtype == state.mean.dtype and new.count.dtype == jnp.int32


def test_offset_data_keeps_precision():
    bn = bnjax.BatchNorm()
    batches = _batches(1, (64,) * 5, loc=1e3, scale=0.1)
    params, state = bn.init(batches[0])
    new = bnjax.recalibrate(bn.apply, params, state, batches, jit=False)
    data = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(new.var, data.var(0), rtol=1e-6)  # README: to 1e-6
    np.testing.assert_allclose(new.mean, data.mean(0), rtol=1e-7)


def _model(bn1, bn2):
    """bn1 -> dense -> relu -> bn2 (on 3-D activations), states nested in a dict."""

    def apply(params, state, x, *, training):
        h, s1 = bn1.apply(params["bn1"], state["block"]["bn1"], x, training=training)
        z = jax.nn.relu(h @ params["w"]).reshape(x.shape[0], 2, -1)
        y, s2 = bn2.apply(params["bn2"], state["bn2"], z, training=training)
        new = {"block": {"bn1": s1, "tag": state["block"]["tag"]}, "bn2": s2}
        return y, new

    return apply


@pytest.mark.slow
def test_nested_multi_layer_model():
    bn1, bn2 = bnjax.BatchNorm(), bnjax.BatchNorm(axis=-1, momentum=0.9)
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 8)).astype(np.float32)
    scale1, bias1 = np.array([1.5, 0.5, 2.0]), np.array([0.3, -0.2, 1.0])
    p1 = bnjax.BatchNormParams(jnp.asarray(scale1, jnp.float32), jnp.asarray(bias1, jnp.float32))
    params = {"bn1": p1, "w": jnp.asarray(w), "bn2": bn2.init((1, 2, 4))[0]}
    state = {
        "block": {"bn1": bn1.init((1, 3))[1], "tag": jnp.asarray(7)},
        "bn2": bn2.init((1, 2, 4))[1],
    }
    batches = _batches(3, (10, 6, 12))
    new = bnjax.recalibrate(_model(bn1, bn2), params, state, batches)
    z = [
        np.maximum(_train_norm(b, scale1, bias1) @ w.astype(np.float64), 0).reshape(-1, 4)
        for b in batches
    ]
    z = np.concatenate(z)
    x = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(new["block"]["bn1"].mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["block"]["bn1"].var, x.var(0), rtol=1e-5)
    np.testing.assert_allclose(new["bn2"].mean, z.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["bn2"].var, z.var(0), rtol=1e-4, atol=1e-5)
    assert int(new["bn2"].count) == 3 and int(new["block"]["tag"]) == 7


def test_masked_layer_and_skipped_nonfinite_batch():
    bn = bnjax.BatchNorm()

    def apply(params, state, x, *, training):
        return bn.apply(params, state, x, training=training, mask=x[:, 0] > 2.0)

    batches = _batches(4, (16, 16, 16))
    bad = batches[1].copy()
    bad[bad[:, 0] > 2.0, 1] = np.inf  # a counted non-finite value: this batch is skipped
    params, state = bn.init(batches[0])
    new = bnjax.recalibrate(apply, params, state, [batches[0], bad, batches[2]])
    kept = np.concatenate([batches[0], batches[2]]).astype(np.float64)
    rows = kept[kept[:, 0] > 2.0]
    np.testing.assert_allclose(new.mean, rows.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, rows.var(0), rtol=1e-5)
    assert int(new.count) == 2


def test_accumulator_normalizes_like_apply(maybe_jit):
    bn = bnjax.BatchNorm(epsilon=1e-3)
    x = _batches(5, (9,))[0]
    params, state = bn.init(x)
    state = state._replace(mean=jnp.full(3, 1.0), var=jnp.full(3, 4.0))
    apply = maybe_jit(bn.apply, static_argnames=("training",))
    y_train, acc = apply(params, start(state), x, training=True)
    np.testing.assert_allclose(y_train, _train_norm(x, 1.0, 0.0, 1e-3), rtol=1e-5, atol=1e-5)
    assert isinstance(acc, PopulationAccumulator) and int(acc.count) == 1
    y_eval, _ = apply(params, start(state), x, training=False)
    expected = (x.astype(np.float64) - 1.0) / np.sqrt(4.0 + 1e-3)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)


def test_layer_that_sees_no_data_keeps_its_state():
    bn = bnjax.BatchNorm()
    params, state = bn.init((4, 3))

    def apply(p, s, x, *, training):  # "unused" is never applied
        y, s1 = bn.apply(p, s["used"], x, training=training)
        return y, {"used": s1, "unused": s["unused"]}

    old = state._replace(mean=jnp.full(3, 5.0), count=jnp.asarray(12, jnp.int32))
    new = bnjax.recalibrate(apply, params, {"used": state, "unused": old}, _batches(6, (4,)))
    for got, want in zip(new["unused"], old, strict=True):
        np.testing.assert_array_equal(got, want)


def test_errors():
    bn = bnjax.BatchNorm()
    params, state = bn.init((4, 3))
    with pytest.raises(ValueError, match="batches is empty"):
        bnjax.recalibrate(bn.apply, params, state, [])
    with pytest.raises(ValueError, match="no BatchNormState"):
        bnjax.recalibrate(bn.apply, params, {"w": jnp.ones(3)}, [jnp.ones((4, 3))])


@pytest.mark.slow
@settings(max_examples=12)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    # mean / std on both sides of the checked path's condition (2), and far offset
    ratio=st.sampled_from([0.0, 1.5, 2.5, -8.0, 1e4]),
    scale=st.sampled_from([0.1, 0.5, 3.0]),
    statistics=st.sampled_from(["checked", "branchless"]),
    seed=st.integers(0, 2**16),
)
def test_population_statistics_property(sizes, ratio, scale, statistics, seed):
    bn = bnjax.BatchNorm(statistics=statistics)
    batches = _batches(seed, sizes, c=2, loc=ratio * scale, scale=scale)
    params, state = bn.init((1, 2))
    with warnings.catch_warnings():  # a batch of one row warns that its output is bias
        warnings.simplefilter("ignore", UserWarning)
        new = bnjax.recalibrate(bn.apply, params, state, batches)
    data = np.concatenate(batches).astype(np.float64)
    mean = data.mean(0)
    assert np.all(np.abs(new.mean - mean) <= 1e-7 * np.abs(mean) + 1e-6 * scale)
    np.testing.assert_allclose(new.var, data.var(0), rtol=1e-5, atol=1e-6 * scale**2)
    assert int(new.count) == len(sizes)


def test_batch_leaving_a_feature_empty_is_left_out_of_that_feature_only():
    """A feature that counts no element in a batch takes its statistics from the other
    batches; the other features take all of them (the per-feature counts make this exact)."""
    bn = bnjax.BatchNorm()
    batches = _batches(5, (16, 16, 16))
    masks = [np.ones((16, 3), bool) for _ in batches]
    masks[1][:, 2] = False  # feature 2 sees nothing in batch 1

    def apply(params, state, xm, *, training):
        x, m = xm
        return bn.apply(params, state, x, training=training, mask=m)

    params, state = bn.init(batches[0])
    data = [(jnp.asarray(x), jnp.asarray(m)) for x, m in zip(batches, masks, strict=True)]
    new = bnjax.recalibrate(apply, params, state, data)
    every = np.concatenate(batches).astype(np.float64)
    kept = np.concatenate([batches[0], batches[2]]).astype(np.float64)
    np.testing.assert_allclose(new.mean[:2], every[:, :2].mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var[:2], every[:, :2].var(0), rtol=1e-6)
    np.testing.assert_allclose(new.mean[2], kept[:, 2].mean(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var[2], kept[:, 2].var(), rtol=1e-6)
    assert int(new.count) == 3


def test_feature_that_never_counts_keeps_its_statistics():
    bn = bnjax.BatchNorm()
    batches = _batches(6, (8, 8))
    mask = np.ones((8, 3), bool)
    mask[:, 1] = False

    def apply(params, state, x, *, training):
        return bn.apply(params, state, x, training=training, mask=jnp.asarray(mask))

    params, state = bn.init(batches[0])
    state = state._replace(mean=jnp.asarray([0.0, 7.0, 0.0]), var=jnp.asarray([1.0, 3.0, 1.0]))
    new = bnjax.recalibrate(apply, params, state, [jnp.asarray(b) for b in batches])
    assert (float(new.mean[1]), float(new.var[1])) == (7.0, 3.0)
    every = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(np.asarray(new.var)[[0, 2]], every[:, [0, 2]].var(0), rtol=1e-6)


def test_virtual_batches_merge_exactly_and_count_as_batches():
    """With ``virtual_batch_size`` each chunk is merged as its own batch: the statistics
    are still those of all the data, and ``count`` is the number of chunks."""
    bn = bnjax.BatchNorm(virtual_batch_size=4)
    batches = _batches(7, (16, 16))
    params, state = bn.init(batches[0])
    new = bnjax.recalibrate(bn.apply, params, state, [jnp.asarray(b) for b in batches])
    every = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(new.mean, every.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, every.var(0), rtol=1e-6)
    assert int(new.count) == 8


def _masked_recalibration(batches, masks):
    bn = bnjax.BatchNorm()

    def apply(params, state, xm, *, training):
        x, m = xm
        return bn.apply(params, state, x, training=training, mask=m)

    params, state = bn.init(batches[0])
    data = [(jnp.asarray(x), jnp.asarray(m)) for x, m in zip(batches, masks, strict=True)]
    return bnjax.recalibrate(apply, params, state, data)


def test_fully_masked_batch_is_not_merged_nor_counted():
    batches = _batches(8, (16, 16, 16))
    masks = [np.ones((16, 3), bool) for _ in batches]
    masks[1][:] = False
    new = _masked_recalibration(batches, masks)
    kept = np.concatenate([batches[0], batches[2]]).astype(np.float64)
    np.testing.assert_allclose(new.var, kept.var(0), rtol=1e-6)
    assert int(new.count) == 2


def test_feature_with_one_element_in_a_batch_takes_it():
    batches = _batches(9, (16, 16))
    masks = [np.ones((16, 3), bool) for _ in batches]
    masks[1][1:, 2] = False  # feature 2 counts one element of batch 1
    new = _masked_recalibration(batches, masks)
    feature = np.concatenate([batches[0][:, 2], batches[1][:1, 2]]).astype(np.float64)
    np.testing.assert_allclose(new.mean[2], feature.mean(), rtol=1e-6)
    np.testing.assert_allclose(new.var[2], feature.var(), rtol=1e-6)


def test_default_compiles_one_step_per_batch_shape():
    """``jit=True`` by default: the model is traced once per batch shape, not per batch."""
    bn = bnjax.BatchNorm()
    calls = []

    def apply(params, state, x, *, training):
        calls.append(x.shape)
        return bn.apply(params, state, x, training=training)

    batches = [jnp.asarray(b) for b in _batches(10, (8, 8, 8, 4))]
    params, state = bn.init(batches[0])
    bnjax.recalibrate(apply, params, state, batches)
    assert calls == [(8, 3), (4, 3)]
    calls.clear()
    bnjax.recalibrate(apply, params, state, batches, jit=False)
    assert len(calls) == 4


def test_unbiased_feature_with_one_element_keeps_its_statistics():
    """The unbiased variance of one element is undefined: as the running average does,
    recalibration keeps that feature's statistics (it returned variance 0)."""
    bn = bnjax.BatchNorm(running_var="unbiased")
    x = jnp.asarray(_batches(11, (8,))[0])
    mask = np.ones((8, 3), bool)
    mask[1:, 1] = False  # feature 1 counts one element in all

    def apply(params, state, x, *, training):
        return bn.apply(params, state, x, training=training, mask=jnp.asarray(mask))

    params, state = bn.init(x)
    new = bnjax.recalibrate(apply, params, state, [x])
    assert (float(new.mean[1]), float(new.var[1])) == (0.0, 1.0)
    np.testing.assert_allclose(new.var[0], np.var(np.asarray(x)[:, 0], ddof=1), rtol=1e-6)
