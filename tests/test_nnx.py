"""bnjax.nnx.BatchNorm against the real flax.nnx.BatchNorm and numpy float64 references."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx

import bnjax
import bnjax.nnx as bx


def _rngs(seed=0):
    # "rbg" keys: threefry costs seconds of compilation per new shape on CPU.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _data(shape, seed=0, loc=0.5, scale=1.5):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def _flax(fn, *args, **kwargs):
    """Runs Flax itself under standard promotion: it mixes dtypes that strict mode refuses."""
    with jax.numpy_dtype_promotion("standard"):
        return fn(*args, **kwargs)


def _close(a, b, tol):
    assert jnp.shape(a) == jnp.shape(b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a64, b64, rtol=tol, atol=tol)


def _describe(module):
    return {
        path: (type(var).__name__, var.get_value().shape, var.get_value().dtype)
        for path, var in nnx.to_flat_state(nnx.state(module))
    }


# -- the interface --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["__init__", "__call__"])
def test_accepts_every_flax_argument_with_its_default(method):
    theirs = inspect.signature(getattr(nnx.BatchNorm, method)).parameters
    ours = inspect.signature(getattr(bx.BatchNorm, method)).parameters
    key = jax.random.key(0)
    for name, p in theirs.items():
        assert name in ours, f"flax.nnx.BatchNorm.{method}({name}) is not accepted"
        mine = ours[name]
        assert mine.kind == p.kind, name
        if name.endswith("_init"):  # initializers: compare what they produce
            np.testing.assert_array_equal(
                mine.default(key, (3,), jnp.float32), p.default(key, (3,), jnp.float32)
            )
        else:
            assert mine.default == p.default, name


def test_bnjax_options_have_the_core_defaults():
    core, bn = bnjax.BatchNorm(), bx.BatchNorm(2, rngs=_rngs())
    for name in ("averaging", "running_var", "skip_nonfinite", "renorm", "virtual_batch_size"):
        assert getattr(bn, name) == getattr(core, name)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"use_bias": False, "param_dtype": jnp.bfloat16}, {"use_scale": False, "momentum": 0.9}],
)
def test_same_state_as_flax(kwargs):
    theirs = nnx.BatchNorm(4, rngs=_rngs(), **kwargs)
    ours = bx.BatchNorm(4, rngs=_rngs(), **kwargs)
    assert _describe(ours) == _describe(theirs)
    assert ours.count is None


def test_invalid_arguments_fail_when_built():
    with pytest.raises(ValueError, match="averaging='mean'"):
        bx.BatchNorm(3, averaging="mean", rngs=_rngs())
    with pytest.raises(TypeError, match="num_features"):
        bx.BatchNorm(3.0, rngs=_rngs())
    with pytest.raises(TypeError, match="use_fast_variance"):
        bx.BatchNorm(3, use_fast_variance=None, rngs=_rngs())


def test_no_mode_anywhere_fails_with_the_remedy():
    bn = bx.BatchNorm(3, use_running_average=None, rngs=_rngs())
    with pytest.raises(ValueError, match="use_running_average"):
        bn(jnp.ones((4, 3)))


# -- parity with flax.nnx.BatchNorm -----------------------------------------------------

# make test runs four of the cases; make test-all every one.
GRID = [
    dict(shape=(16, 5)),
    pytest.param(dict(shape=(8, 4, 4, 3), momentum=0.9, epsilon=1e-3), marks=pytest.mark.slow),
    pytest.param(dict(shape=(6, 3, 5), axis=1, use_bias=False, features=3), marks=pytest.mark.slow),
    dict(shape=(16, 6), mask=(16, 1), use_scale=False),
    dict(shape=(8, 4, 3), mask=(4, 3)),  # lower rank: aligned on trailing dimensions
    pytest.param(dict(shape=(16, 5), dtype=jnp.bfloat16), marks=pytest.mark.slow),
    dict(shape=(16, 5), x_dtype=jnp.bfloat16),
    pytest.param(dict(shape=(16, 5), x_dtype=jnp.int32), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_flax_in_both_modes_and_in_the_update(case):
    case = dict(case)
    shape, mask_shape = case.pop("shape"), case.pop("mask", None)
    features = case.pop("features", shape[-1])
    x_dtype = case.pop("x_dtype", jnp.float32)
    x = _data(shape, seed=1).astype(x_dtype)
    mask = None
    if mask_shape is not None:
        mask = jnp.asarray(np.random.default_rng(2).random(mask_shape) < 0.7)
        counted = np.broadcast_to(mask, shape).reshape(-1, shape[-1]).any(0)
        assert counted.all(), "every feature needs a counted element (Flax gives NaN)"
    tol = 2e-2 if jnp.bfloat16 in (case.get("dtype"), x_dtype) else 1e-5
    theirs = nnx.BatchNorm(features, rngs=_rngs(), **case)
    ours = bx.BatchNorm(features, rngs=_rngs(), **case)
    nnx.update(ours, nnx.state(theirs))  # Flax's own state loads unchanged

    @nnx.jit
    def run(bn, x, mask):
        train = bn(x, mask=mask)
        return train, bn(x, use_running_average=True)

    y_ref, e_ref = _flax(run, theirs, x, mask)
    y, e = run(ours, x, mask)
    for a, b in ((y, y_ref), (e, e_ref), (ours.mean[...], theirs.mean[...])):
        assert a.dtype == b.dtype
        _close(a, b, tol)
    _close(ours.var[...], theirs.var[...], tol)


def test_lower_rank_mask_follows_flax_and_a_bad_one_is_refused_by_name():
    x = _data((6, 4), seed=8)
    mask = jnp.asarray([True, True, False, True])  # selects features, as in numpy
    theirs = nnx.BatchNorm(4, momentum=0.5, rngs=_rngs())
    ours = bx.BatchNorm(4, momentum=0.5, rngs=_rngs())
    y_ref, y = _flax(theirs, x, mask=mask), ours(x, mask=mask)
    _close(y[:, mask], y_ref[:, mask], 1e-5)
    assert np.isnan(y_ref[:, 2]).all() and np.isnan(theirs.mean[...][2])
    _close(y[:, 2], x[:, 2] / np.sqrt(1 + 1e-5), 1e-6)  # the running statistics
    assert ours.mean[...][2] == 0 and ours.var[...][2] == 1  # a feature left empty
    _close(ours.mean[...][mask], theirs.mean[...][mask], 1e-6)  # the others as in Flax
    _close(ours.var[...][mask], theirs.var[...][mask], 1e-6)
    with pytest.raises(ValueError, match=r"mask of shape \(5,\) does not broadcast to x"):
        bx.BatchNorm(4, rngs=_rngs())(_data((6, 4)), mask=jnp.ones(5, bool))
    with pytest.raises(ValueError, match=r"mask of shape \(4,\) .* is ambiguous"):
        bx.BatchNorm(4, rngs=_rngs())(_data((4, 4)), mask=jnp.ones(4, bool))


@pytest.mark.filterwarnings("error::bnjax.CheckWarning")
def test_checks_after_loading_a_flax_state_judge_the_statistics():
    """The count stays 0 through nnx.update from Flax: the loaded statistics decide."""
    x = _data((16, 3), seed=9)
    flax_bn = nnx.BatchNorm(3, momentum=0.5, rngs=_rngs())
    ours = bx.BatchNorm(3, checks=True, use_running_average=True, rngs=_rngs())
    with pytest.warns(bnjax.CheckWarning, match="never updated"):
        ours(x)  # fresh: mean 0, var 1, count 0
        jax.effects_barrier()
    _flax(flax_bn, x)
    nnx.update(ours, nnx.state(flax_bn))
    assert int(ours.count[...]) == 0
    _close(ours(x), _flax(flax_bn, x, use_running_average=True), 1e-6)
    ours.var[...] = ours.var[...].at[0].set(jnp.nan)
    with pytest.warns(bnjax.CheckWarning, match="state.var"):
        ours(x)
        jax.effects_barrier()


def test_custom_initializers_and_metadata_match_flax():
    settings = dict(
        scale_init=nnx.initializers.normal(0.5),
        bias_init=nnx.initializers.uniform(2.0),
        scale_metadata={"tag": "bn-scale"},
        bias_metadata={"tag": "bn-bias"},
    )
    theirs = nnx.BatchNorm(4, rngs=_rngs(), **settings)
    ours = bx.BatchNorm(4, rngs=_rngs(), **settings)
    for name in ("scale", "bias"):
        mine, flax_var = getattr(ours, name), getattr(theirs, name)
        np.testing.assert_array_equal(mine[...], flax_var[...])
        assert mine.get_metadata() == flax_var.get_metadata()
        assert mine.get_metadata()["tag"] == f"bn-{name}"
    assert not np.allclose(ours.scale[...], 1) and not np.allclose(ours.bias[...], 0)
    x = _data((16, 4), seed=10)
    y_ref, y = _flax(theirs, x), ours(x)
    _close(y, y_ref, 1e-5)
    _close(ours(x, use_running_average=True), _flax(theirs, x, use_running_average=True), 1e-5)


def _to_bfloat16(args, /, *, dtype=None, inexact=True):
    """A promote_dtype that ignores ``dtype`` and computes in bfloat16."""
    del dtype, inexact
    return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)


@pytest.mark.slow
def test_custom_promote_dtype_matches_flax():
    x = _data((16, 5), seed=11)
    theirs = nnx.BatchNorm(5, momentum=0.9, promote_dtype=_to_bfloat16, rngs=_rngs())
    ours = bx.BatchNorm(5, momentum=0.9, promote_dtype=_to_bfloat16, rngs=_rngs())
    for use_running_average in (False, True):
        y_ref = _flax(theirs, x, use_running_average=use_running_average)
        y = ours(x, use_running_average=use_running_average)
        assert y.dtype == y_ref.dtype == jnp.bfloat16
        _close(y, y_ref, 2e-2)
        for name in ("mean", "var"):
            a, b = getattr(ours, name)[...], getattr(theirs, name)[...]
            assert a.dtype == b.dtype == jnp.float32
            _close(a, b, 1e-2)  # bnjax reduces the bfloat16 input in float32, as Flax does


def test_axis_index_groups_match_flax_under_pmap():
    """``shard_map`` does not implement ``axis_index_groups``; ``jax.pmap`` does."""
    x = _data((8, 4, 3), seed=12)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    out = []
    for cls in (nnx.BatchNorm, bx.BatchNorm):
        bn = cls(3, momentum=0.5, axis_name="data", axis_index_groups=groups, rngs=_rngs())
        graphdef, state = nnx.split(bn)

        def step(state, x, graphdef=graphdef):
            module = nnx.merge(graphdef, state)
            y = module(x)
            return y, module.mean[...], module.var[...]

        out.append(_flax(jax.pmap(step, axis_name="data", in_axes=(None, 0)), state, x))
    jax.tree.map(lambda a, b: _close(a, b, 1e-5), out[1], out[0])
    y, mean, var = out[1]
    for group in map(np.asarray, groups):
        _, m, v = ref.moments(np.asarray(x[group], np.float64).reshape(-1, 3), -1)
        np.testing.assert_allclose(y[group], ref.normalize(x[group], m, v, 1e-5), atol=1e-5)
        np.testing.assert_allclose(mean[group], np.broadcast_to(0.5 * m, (4, 3)), atol=1e-6)
        np.testing.assert_allclose(var[group], np.broadcast_to(0.5 + 0.5 * v, (4, 3)), atol=1e-6)


def test_train_and_eval_switch_modes_and_match_numpy():
    x = _data((32, 3), seed=3)
    bn = bx.BatchNorm(3, momentum=0.9, epsilon=1e-3, rngs=_rngs())
    y = bn(x)  # training by default, as in Flax
    _, mean, var = ref.moments(np.asarray(x, np.float64), -1)
    np.testing.assert_allclose(
        y, ref.normalize(np.asarray(x, np.float64), mean, var, 1e-3), atol=1e-5
    )
    np.testing.assert_allclose(bn.mean[...], 0.1 * mean, atol=1e-6)
    bn.eval()
    assert bn.use_running_average is True
    stats = (bn.mean[...], bn.var[...])
    y = bn(x)
    expected = ref.normalize(np.asarray(x, np.float64), 0.1 * mean, 0.9 + 0.1 * var, 1e-3)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], stats[0])
    bn.train()
    assert bn.use_running_average is False
    assert nnx.view(bn, use_running_average=True).use_running_average is True


def test_debiased_count_is_a_batch_stat():
    x = _data((16, 3), seed=4)
    bn = bx.BatchNorm(3, averaging="debiased", momentum=0.9, rngs=_rngs())
    assert set(nnx.state(bn, nnx.BatchStat)) == {"mean", "var", "count"}
    nnx.update(bn, nnx.state(nnx.BatchNorm(3, rngs=_rngs())))  # Flax state, no count
    bn(x)
    _, mean, _ = ref.moments(np.asarray(x, np.float64), -1)
    np.testing.assert_allclose(bn.mean[...], mean, atol=1e-6)  # first batch taken whole
    assert int(bn.count[...]) == 1
    plain = bx.BatchNorm(3, rngs=_rngs())
    plain.averaging = "debiased"  # no count was made for "ema"
    with pytest.raises(ValueError, match="averaging='debiased'"):
        plain(x)


# -- NNX transforms ------------------------------------------------------------------------


def _ensemble(cls, n):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return cls(5, momentum=0.9, rngs=rngs)

    return create(_rngs())


@pytest.mark.slow
def test_vmap_over_an_ensemble_in_train_mode():
    x = _data((4, 16, 5), seed=5)
    ours, theirs = _ensemble(bx.BatchNorm, 4), _ensemble(nnx.BatchNorm, 4)

    @nnx.vmap(in_axes=(0, 0))
    def forward(bn, x):
        return bn(x)

    for _ in range(2):
        y_ref, y = _flax(forward, theirs, x), forward(ours, x)
    _close(y, y_ref, 1e-5)
    _close(ours.mean[...], theirs.mean[...], 1e-5)
    _close(ours.var[...], theirs.var[...], 1e-5)
    for i in range(4):  # each member has the statistics of its own batches only
        _, mean, _ = ref.moments(np.asarray(x[i], np.float64), -1)
        np.testing.assert_allclose(ours.mean[...][i], (1 - 0.81) * mean, atol=1e-6)


def test_vmap_with_axis_name_shares_statistics_of_the_whole_batch():
    x = _data((4, 8, 3), seed=6)
    bn = bx.BatchNorm(3, momentum=0.0, axis_name="members", rngs=_rngs())

    @nnx.vmap(in_axes=(None, 0), axis_name="members")
    def forward(bn, x):
        return bn(x)

    y = forward(bn, x)
    flat = np.asarray(x, np.float64).reshape(-1, 3)
    _, mean, var = ref.moments(flat, -1)
    np.testing.assert_allclose(y.reshape(-1, 3), ref.normalize(flat, mean, var, 1e-5), atol=1e-5)
    np.testing.assert_allclose(bn.var[...], var, atol=1e-5)


class _Model(nnx.Module):
    def __init__(self, norm, rngs):
        self.linear = nnx.Linear(5, 4, rngs=rngs)
        self.norm = norm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


def test_eval_shape_of_a_model_holding_a_batch_norm():
    abstract = nnx.eval_shape(lambda: _Model(bx.BatchNorm, _rngs()))
    assert _describe(abstract) == _describe(_Model(nnx.BatchNorm, _rngs()))
    model = _Model(bx.BatchNorm, _rngs())
    out = nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((8, 5)))
    assert (out.shape, out.dtype) == ((8, 4), jnp.float32)
    np.testing.assert_array_equal(model.norm.mean[...], np.zeros(4))  # nothing ran


def _stack(cls, n):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs):
        return cls(4, momentum=0.8, rngs=rngs)

    return create(_rngs(1))


def test_scan_over_layers_matches_flax():
    x = _data((8, 4), seed=7)

    @nnx.jit
    def forward(stack, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, h):
            return jnp.tanh(layer(h)) * 2.0 + 0.5

        return body(stack, x)

    theirs, ours = _stack(nnx.BatchNorm, 3), _stack(bx.BatchNorm, 3)
    y_ref = _flax(forward, theirs, x)
    y = forward(ours, x)
    _close(y, y_ref, 1e-5)
    assert ours.mean[...].shape == (3, 4)
    _close(ours.mean[...], theirs.mean[...], 1e-5)
    _close(ours.var[...], theirs.var[...], 1e-5)


def test_one_element_batches_are_silent_as_in_flax():
    x = _data((1, 4), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bx.BatchNorm(4, rngs=_rngs())(x)
    with pytest.warns(UserWarning, match="equals bias"):
        bx.BatchNorm(4, checks=True, rngs=_rngs())(x)


def test_view_info_describes_use_running_average():
    """``nnx.view_info`` parses ``set_view``'s Args section (it raised KeyError)."""

    class Model(nnx.Module):
        def __init__(self):
            self.bn = bx.BatchNorm(3, rngs=_rngs())

    info = str(nnx.view_info(Model()))
    assert "use_running_average" in info and "stored batch statistics" in info


def test_dtype_is_the_output_dtype_whatever_the_promotion():
    """With ``dtype=float16`` and a ``promote_dtype`` that returns float32, Flax returns
    float16; so does bnjax (it returned float32)."""

    def promote(args, dtype=None):
        return tuple(None if a is None else jnp.asarray(a, jnp.float32) for a in args)

    x = _data((8, 3), seed=5)
    kwargs = dict(dtype=jnp.float16, promote_dtype=promote, rngs=_rngs())
    ours, theirs = bx.BatchNorm(3, **kwargs), nnx.BatchNorm(3, **kwargs)
    y, y_ref = ours(x), _flax(theirs, x)
    assert y.dtype == y_ref.dtype == jnp.float16
    _close(y.astype(jnp.float32), y_ref.astype(jnp.float32), 1e-3)
