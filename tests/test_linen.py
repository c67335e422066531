"""bnjax.linen.BatchNorm against the real flax.linen.BatchNorm and numpy float64 references."""

import dataclasses
import inspect
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen as bl
from bnjax._src.reduction import expand_mask

# Random bits from XLA's RngBitGenerator: a threefry key costs seconds of compilation for
# every new shape on CPU, an "rbg" key a fraction of that. Data come from numpy.
KEY = jax.random.key(0, impl="rbg")


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


# -- the interface --------------------------------------------------------------------


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def test_accepts_every_flax_attribute_with_its_default():
    ours = _fields(bl.BatchNorm)
    for name, field in _fields(nn.BatchNorm).items():
        assert name in ours, f"flax.linen.BatchNorm.{name} is not accepted"
        theirs, mine = field.default, ours[name].default
        if name.endswith("_init"):  # initializers: compare what they produce
            np.testing.assert_array_equal(mine(KEY, (3,), jnp.float32), theirs(KEY, (3,)))
        else:
            assert mine == theirs, name


def test_accepts_every_flax_call_argument():
    theirs = inspect.signature(nn.BatchNorm.__call__).parameters
    ours = inspect.signature(bl.BatchNorm.__call__).parameters
    for name, p in theirs.items():
        assert name in ours, f"flax.linen.BatchNorm.__call__({name}) is not accepted"
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


def test_bnjax_options_have_the_core_defaults():
    core = bnjax.BatchNorm()
    for name in ("averaging", "running_var", "skip_nonfinite", "renorm", "virtual_batch_size"):
        assert getattr(bl.BatchNorm(), name) == getattr(core, name)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({}, (6, 5)),
        ({"use_bias": False, "param_dtype": jnp.bfloat16}, (4, 3, 3, 2)),
        (
            {"axis": (1, 2), "force_float32_reductions": False, "param_dtype": jnp.float16},
            (2, 3, 4),
        ),
        ({"use_scale": False, "averaging": "ema", "running_var": "unbiased"}, (5, 2)),
    ],
)
def test_same_variables_as_flax(kwargs, shape):
    extra = {k: kwargs.pop(k) for k in ("averaging", "running_var") if k in kwargs}
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    theirs = _flax(jax.eval_shape, nn.BatchNorm(use_running_average=False, **kwargs).init, KEY, x)
    ours = jax.eval_shape(bl.BatchNorm(use_running_average=False, **kwargs, **extra).init, KEY, x)
    assert ours == theirs


def test_invalid_settings_fail_when_built():
    with pytest.raises(ValueError, match="averaging='mean'"):
        bl.BatchNorm(averaging="mean")
    with pytest.raises(TypeError, match="use_fast_variance"):
        bl.BatchNorm(use_fast_variance="yes")
    with pytest.raises(ValueError, match="momentum=1.5"):
        bl.BatchNorm(momentum=1.5)


def test_use_running_average_given_twice_or_never_fails():
    x = jnp.ones((4, 2))
    variables = bl.BatchNorm(use_running_average=True).init(KEY, x)
    with pytest.raises(ValueError, match="use_running_average"):
        bl.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=True)
    with pytest.raises(ValueError, match="use_running_average"):
        bl.BatchNorm().apply(variables, x)


# -- parity with flax.linen.BatchNorm -----------------------------------------------

# make test runs six of the cases; make test-all every one.
GRID = [
    dict(shape=(16, 5)),
    dict(shape=(8, 4, 4, 3), momentum=0.9, epsilon=1e-3),
    dict(shape=(6, 3, 5), axis=1, use_bias=False),
    pytest.param(dict(shape=(4, 3, 3, 2), axis=(1, 3), use_scale=False), marks=pytest.mark.slow),
    pytest.param(
        dict(shape=(12, 4), use_bias=False, use_scale=False, momentum=0.5), marks=pytest.mark.slow
    ),
    dict(shape=(16, 6), mask=(16, 1)),
    pytest.param(dict(shape=(8, 3, 3, 4), mask=(8, 3, 3, 1), momentum=0.8), marks=pytest.mark.slow),
    dict(shape=(8, 4, 3), mask=(4, 3)),  # lower rank: aligned on trailing dimensions
    pytest.param(dict(shape=(16, 5), dtype=jnp.float16), marks=pytest.mark.slow),
    pytest.param(dict(shape=(16, 5), param_dtype=jnp.bfloat16), marks=pytest.mark.slow),
    dict(shape=(16, 5), x_dtype=jnp.bfloat16),
    pytest.param(dict(shape=(16, 5), x_dtype=jnp.int32), marks=pytest.mark.slow),
]


def _case(case, seed=1):
    case = dict(case)
    shape, x_dtype = case.pop("shape"), case.pop("x_dtype", jnp.float32)
    mask_shape = case.pop("mask", None)
    x = _data(shape, seed).astype(x_dtype)
    mask = None
    if mask_shape is not None:
        mask = jnp.asarray(np.random.default_rng(seed + 7).random(mask_shape) < 0.7)
        counted = np.broadcast_to(mask, shape).reshape(-1, shape[-1]).any(0)
        assert counted.all(), "every feature needs a counted element (Flax gives NaN)"
    low = {x_dtype, case.get("dtype"), case.get("param_dtype")} & {jnp.float16, jnp.bfloat16}
    return case, x, mask, (2e-2 if low else 1e-5)


def _compare(settings, x, mask, tol, wrap):
    """Train and eval passes of both modules on Flax's own variables; ``wrap`` jits or not."""
    flax_train = nn.BatchNorm(use_running_average=False, **settings)
    ours_train = bl.BatchNorm(use_running_average=False, **settings)
    variables = _flax(jax.jit(flax_train.init), KEY, x)  # Flax's variables, used by both

    def train(module, variables, x, mask):
        return module.apply(variables, x, mask=mask, mutable=["batch_stats"])

    y_ref, upd_ref = _flax(jax.jit(train, static_argnums=0), flax_train, variables, x, mask)
    y, upd = wrap(train, static_argnums=0)(ours_train, variables, x, mask)
    assert y.dtype == y_ref.dtype
    _close(y, y_ref, tol)
    for name in ("mean", "var"):
        assert upd["batch_stats"][name].dtype == upd_ref["batch_stats"][name].dtype
        _close(upd["batch_stats"][name], upd_ref["batch_stats"][name], tol)

    trained = {**variables, **upd_ref}

    def evaluate(module, variables, x):  # use_running_average as a call argument
        return module.apply(variables, x, use_running_average=True)

    y_ref = _flax(jax.jit(evaluate, static_argnums=0), nn.BatchNorm(**settings), trained, x)
    y = wrap(evaluate, static_argnums=0)(bl.BatchNorm(**settings), trained, x)
    assert y.dtype == y_ref.dtype
    _close(y, y_ref, tol)


@pytest.mark.parametrize("case", GRID, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_flax_in_both_modes_and_in_the_update(case):
    _compare(*_case(case), jax.jit)


def test_matches_flax_eagerly_and_under_jit(maybe_jit):
    _compare(*_case(dict(shape=(16, 6), mask=(16, 1), momentum=0.9)), maybe_jit)


def test_custom_initializers_match_flax():
    settings = dict(scale_init=nn.initializers.normal(0.5), bias_init=nn.initializers.uniform(2.0))
    x = _data((16, 4), seed=17)
    theirs = nn.BatchNorm(use_running_average=False, **settings)
    ours = bl.BatchNorm(use_running_average=False, **settings)
    variables = ours.init(KEY, x)
    jax.tree.map(np.testing.assert_array_equal, variables, theirs.init(KEY, x))
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    assert not np.allclose(scale, 1) and not np.allclose(bias, 0)
    _compare(
        {"scale_init": settings["scale_init"], "bias_init": settings["bias_init"]},
        x,
        None,
        1e-5,
        jax.jit,
    )


@pytest.mark.parametrize(
    "param_dtype, x_dtype",
    [
        (jnp.bfloat16, jnp.float32),
        pytest.param(jnp.float16, jnp.float16, marks=pytest.mark.slow),
        pytest.param(jnp.float32, jnp.bfloat16, marks=pytest.mark.slow),
        pytest.param(jnp.bfloat16, jnp.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_force_float32_reductions_false_matches_flax_numbers(param_dtype, x_dtype):
    """Flax reduces in the input dtype here; bnjax in float32, so it is at least as close.

    Flax's update also turns low-precision ``batch_stats`` into float32 when ``x`` is float32
    (``momentum * bf16 + (1 - momentum) * f32``); bnjax keeps the stored dtype.
    """
    settings = dict(force_float32_reductions=False, param_dtype=param_dtype, momentum=0.9)
    x = _data((16, 5), seed=18).astype(x_dtype)
    bn, flax_bn = bl.BatchNorm(**settings), nn.BatchNorm(**settings)
    variables = _flax(flax_bn.init, KEY, x, use_running_average=False)
    assert variables["batch_stats"]["mean"].dtype == param_dtype
    variables["params"] = jax.tree.map(lambda a: a * 1.5 + 0.25, variables["params"])

    def train(module, v):
        return module.apply(v, x, use_running_average=False, mutable=["batch_stats"])

    (y_ref, upd_ref), (y, upd) = _flax(train, flax_bn, variables), train(bn, variables)
    x64 = np.asarray(x, np.float64)
    _, mean, var = ref.moments(x64, -1)
    scale, bias = (np.asarray(variables["params"][k], np.float64) for k in ("scale", "bias"))
    exact = ref.normalize(x64, mean, var, 1e-5, scale, bias)
    assert y.dtype == y_ref.dtype
    _close(y, y_ref, 2e-2)
    err, err_ref = (np.max(np.abs(np.asarray(a, np.float64) - exact)) for a in (y, y_ref))
    assert err <= err_ref + 1e-6, (err, err_ref)
    for name, batch, init in (("mean", mean, 0.0), ("var", var, 1.0)):
        assert upd["batch_stats"][name].dtype == param_dtype
        _close(upd["batch_stats"][name], upd_ref["batch_stats"][name], 1e-2)
        stored_tol = 1e-5 if param_dtype == jnp.float32 else 4e-3  # one rounding
        _close(upd["batch_stats"][name], 0.9 * init + 0.1 * batch, stored_tol)

    trained = {**variables, **upd}
    y_ref = _flax(flax_bn.apply, trained, x, use_running_average=True)
    y = bn.apply(trained, x, use_running_average=True)
    assert y.dtype == y_ref.dtype
    _close(y, y_ref, 2e-2)


def test_offset_data_variance_is_exact_where_fast_variance_is_not():
    x = _data((256, 4), seed=3, loc=1e3, scale=0.1)
    _, true_var = np.mean(np.asarray(x, np.float64), 0), np.var(np.asarray(x, np.float64), 0)
    variables = bl.BatchNorm(use_running_average=False, momentum=0.0).init(KEY, x)
    _, upd = bl.BatchNorm(use_running_average=False, momentum=0.0).apply(
        variables, x, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(upd["batch_stats"]["var"], true_var, rtol=1e-5)
    _, flax_upd = nn.BatchNorm(use_running_average=False, momentum=0.0).apply(
        variables, x, mutable=["batch_stats"]
    )
    assert np.max(np.abs(flax_upd["batch_stats"]["var"] / true_var - 1)) > 1e-1


def test_lower_rank_mask_broadcasts_as_in_flax_and_a_fully_masked_feature_keeps_state():
    """A mask of shape (C,) against x of shape (N, C) selects features, as numpy does.

    Flax's statistics of a feature with no counted element are 0/0: NaN in its output and
    in ``batch_stats``. bnjax normalizes that feature with the running statistics and
    keeps its ``batch_stats``; the features with data are updated as in Flax.
    """
    x = _data((6, 4), seed=14)
    mask = jnp.asarray([True, True, False, True])
    variables = nn.BatchNorm(use_running_average=False).init(KEY, x)
    settings = dict(use_running_average=False, momentum=0.5)
    y_ref, upd_ref = _flax(
        nn.BatchNorm(**settings).apply, variables, x, mask=mask, mutable=["batch_stats"]
    )
    y, upd = bl.BatchNorm(**settings).apply(variables, x, mask=mask, mutable=["batch_stats"])
    counted = np.asarray(mask)
    _close(y[:, counted], y_ref[:, counted], 1e-5)
    assert np.isnan(y_ref[:, 2]).all() and np.isnan(upd_ref["batch_stats"]["mean"][2])
    _close(y[:, 2], x[:, 2] / np.sqrt(1 + 1e-5), 1e-6)  # the running statistics: 0 and 1
    for name in ("mean", "var"):
        ours, theirs = upd["batch_stats"][name], upd_ref["batch_stats"][name]
        _close(ours[counted], theirs[counted], 1e-6)
        assert ours[2] == variables["batch_stats"][name][2]


def test_mask_read_two_ways_is_refused_naming_both():
    """(4,) against (4, 4): Flax reads features (numpy), a per-example mask reads rows;
    the core once read rows where the wrapper read features. Both now refuse it."""
    x = _data((4, 4), seed=16)
    bn = bl.BatchNorm(use_running_average=False)
    variables = bn.init(KEY, x)
    mask = jnp.asarray([True, True, True, False])
    for run in (
        lambda: bn.apply(variables, x, mask=mask, mutable=["batch_stats"]),
        lambda: bnjax.BatchNorm().apply(*bnjax.BatchNorm().init(x), x, training=True, mask=mask),
    ):
        with pytest.raises(ValueError, match=r"mask of shape \(4,\) .* is ambiguous") as info:
            run()
        assert "(1, 4)" in str(info.value) and "(4, 1)" in str(info.value)
    y, _ = bn.apply(variables, x, mask=mask[:, None], mutable=["batch_stats"])
    y_core, _ = bnjax.BatchNorm().apply(
        *bnjax.BatchNorm().init(x), x, training=True, mask=mask[:, None]
    )
    _close(y, y_core, 1e-6)


def test_per_example_mask_means_rows_in_the_wrapper_and_the_core():
    x = _data((6, 4), seed=17)
    mask = jnp.asarray([True, True, False, True, True, False])
    bn = bl.BatchNorm(use_running_average=False, momentum=0.5)
    variables = bn.init(KEY, x)
    y, upd = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    core = bnjax.BatchNorm(momentum=0.5)
    y_core, state = core.apply(*core.init(x), x, training=True, mask=mask)
    _close(y, y_core, 1e-6)
    _close(upd["batch_stats"]["mean"], state.mean, 1e-6)
    y_rows, _ = bn.apply(variables, x, mask=mask[:, None], mutable=["batch_stats"])
    _close(y, y_rows, 1e-6)


@pytest.mark.parametrize("mask_shape", [(6, 4, 1), (2, 6, 4), (5,)])
def test_mask_that_does_not_broadcast_to_x_is_refused_by_name(mask_shape):
    x = _data((6, 4), seed=15)
    bn = bl.BatchNorm(use_running_average=False)
    variables = bn.init(KEY, x)
    with pytest.raises(ValueError, match=r"mask of shape .* does not broadcast to x"):
        bn.apply(variables, x, mask=jnp.ones(mask_shape, bool), mutable=["batch_stats"])


def test_output_matches_numpy_float64_with_masked_rows():
    x = _data((32, 3), seed=4)
    keep = np.arange(32) % 3 != 0
    mask = jnp.asarray(keep)[:, None]
    bn = bl.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
    variables = bn.init(KEY, x)
    y, upd = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    _, mean, var = ref.moments(np.asarray(x, np.float64), -1, keep)
    np.testing.assert_allclose(
        y, ref.normalize(np.asarray(x, np.float64), mean, var, 1e-3), atol=1e-5
    )
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, atol=1e-6)


# -- bnjax's extras -------------------------------------------------------------------


def test_debiased_averaging_runs_on_flax_variables_without_a_count():
    x = _data((16, 3), seed=5)
    flax_vars = nn.BatchNorm(use_running_average=False).init(KEY, x)
    eval_bn = bl.BatchNorm(use_running_average=True, averaging="debiased")
    _close(
        eval_bn.apply(flax_vars, x),
        nn.BatchNorm(use_running_average=True).apply(flax_vars, x),
        1e-6,
    )
    train_bn = bl.BatchNorm(use_running_average=False, averaging="debiased", momentum=0.9)
    _, upd = train_bn.apply(flax_vars, x, mutable=["batch_stats"])
    _, mean, var = ref.moments(np.asarray(x, np.float64), -1)
    # A missing count is 0 batches: the debiased average of one batch is that batch.
    np.testing.assert_allclose(upd["batch_stats"]["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var, atol=1e-5)
    assert int(upd["batch_stats"]["count"]) == 1
    fresh = train_bn.init(KEY, x)
    assert fresh["batch_stats"]["count"].dtype == jnp.int32


def _trained_flax_variables(x):
    bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
    variables = bn.init(KEY, x)
    _, upd = bn.apply(variables, x, mutable=["batch_stats"])
    return variables, {**variables, **upd}


@pytest.mark.filterwarnings("error::bnjax.CheckWarning")
def test_checks_on_flax_variables_without_a_count_judge_the_statistics():
    """A missing count is unknown: trained statistics pass, init values and bad ones fail."""
    x = _data((16, 3), seed=16)
    fresh, trained = _trained_flax_variables(x)
    assert "count" not in trained["batch_stats"]
    bn = bl.BatchNorm(use_running_average=True, checks=True)
    y_ref = nn.BatchNorm(use_running_average=True).apply(trained, x)
    _close(bn.apply(trained, x), y_ref, 1e-6)
    y, upd = bn.apply(trained, x, mutable=["batch_stats"])  # the count is created at 0
    _close(y, y_ref, 1e-6)
    assert int(upd["batch_stats"]["count"]) == 0
    with pytest.warns(bnjax.CheckWarning, match="never updated"):
        bn.apply(fresh, x)  # still mean 0, var 1: never updated, count or not
        jax.effects_barrier()
    bad = jax.tree.map(lambda a: a, trained)
    bad["batch_stats"]["var"] = trained["batch_stats"]["var"].at[1].set(-1.0)
    with pytest.warns(bnjax.CheckWarning, match="state.var"):
        bn.apply(bad, x)
        jax.effects_barrier()
    counted = {**trained, "batch_stats": {**trained["batch_stats"], "count": jnp.int32(0)}}
    _close(bn.apply(counted, x), y_ref, 1e-6)  # a count of 0 next to loaded statistics


def test_bnjax_options_reach_the_core():
    x = _data((10, 3), seed=13)
    bn = bl.BatchNorm(use_running_average=False, running_var="unbiased", momentum=0.0)
    _, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(bn.init(KEY, x), x)
    _, _, var = ref.moments(np.asarray(x, np.float64), -1)
    np.testing.assert_allclose(upd["batch_stats"]["var"], var * 10 / 9, rtol=1e-5)


def test_batch_statistics_without_update_need_no_mutable_collection():
    x = _data((16, 3), seed=6)
    bn = bl.BatchNorm(use_running_average=False)
    variables = bn.init(KEY, x)
    y = bn.apply(variables, x, update_stats=False)
    _, mean, var = ref.moments(np.asarray(x, np.float64), -1)
    np.testing.assert_allclose(
        y, ref.normalize(np.asarray(x, np.float64), mean, var, 1e-5), atol=1e-5
    )


def test_init_does_not_update_and_ignores_axis_name():
    x = _data((8, 3), seed=7)
    variables = bl.BatchNorm(use_running_average=False, axis_name="devices").init(KEY, x)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


# -- composition with linen transforms ------------------------------------------------


def _scan_model(bn_cls):
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(bn_cls(use_running_average=False, momentum=0.9)(nn.Dense(4)(h))), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                Layer,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                length=3,
            )
            return scan()(x, None)[0]

    return Stack()


def _vmap_model(bn_cls):
    class Ensemble(nn.Module):
        @nn.compact
        def __call__(self, x):
            member = nn.vmap(
                lambda mdl, x: bn_cls(use_running_average=False, momentum=0.8)(x),
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
            )
            return member(self, x)

    return Ensemble()


def _remat_model(bn_cls):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.tanh(bn_cls(use_running_average=False)(nn.Dense(4)(x)))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.remat(Block)()(nn.remat(Block)()(x))

    return Net()


@pytest.mark.parametrize(
    "build, shape",
    [
        (_scan_model, (8, 4)),
        pytest.param(_vmap_model, (3, 8, 4), marks=pytest.mark.slow),
        pytest.param(_remat_model, (8, 4), marks=pytest.mark.slow),
    ],
)
def test_linen_transforms_match_flax(build, shape):
    x = _data(shape, seed=8)
    theirs, ours = build(nn.BatchNorm), build(bl.BatchNorm)
    variables = jax.jit(theirs.init)(KEY, x)

    def loss(params, model):
        y, upd = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), upd

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (loss_ref, upd_ref), g_ref = grad(variables["params"], theirs)
    (loss_ours, upd), g = grad(variables["params"], ours)
    _close(loss_ours, loss_ref, 1e-5)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), g, g_ref)
    jax.tree.map(lambda a, b: _close(a, b, 1e-5), upd, upd_ref)


def _sharded(fn, mesh, *args):
    specs = tuple(P("data") if a.ndim and a.shape[0] % 8 == 0 else P() for a in args)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(P("data"), P())))(
        *placed
    )


def test_axis_name_under_shard_map_gives_whole_batch_statistics():
    mesh = jax.make_mesh((8,), ("data",))
    x = _data((64, 3), seed=9)
    keep = np.random.default_rng(2).random((64, 1)) < 0.6
    keep[:8] = False  # one device sees no counted row: uneven counts across devices
    mask = jnp.asarray(keep)
    bn = bl.BatchNorm(use_running_average=False, axis_name="data", momentum=0.9)
    variables = bn.init(KEY, x)
    stats = variables["batch_stats"]

    def step(x, mask, mean, var):
        y, upd = bn.apply(
            {**variables, "batch_stats": {"mean": mean, "var": var}},
            x,
            mask=mask,
            mutable=["batch_stats"],
        )
        return y, upd["batch_stats"]

    y, new = _sharded(step, mesh, x, mask, stats["mean"], stats["var"])
    _, mean, var = ref.moments(np.asarray(x, np.float64), -1, keep[:, 0])
    np.testing.assert_allclose(
        y, ref.normalize(np.asarray(x, np.float64), mean, var, 1e-5), atol=1e-5
    )
    np.testing.assert_allclose(new["mean"], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * var, atol=1e-6)


def test_axis_name_under_shard_map_matches_flax_on_equal_shards():
    mesh = jax.make_mesh((8,), ("data",))
    x = _data((32, 4), seed=10)
    variables = nn.BatchNorm(use_running_average=False).init(KEY, x)
    out = []
    for cls in (nn.BatchNorm, bl.BatchNorm):
        bn = cls(use_running_average=False, axis_name="data")

        def step(x, mean, var, bn=bn):
            v = {**variables, "batch_stats": {"mean": mean, "var": var}}
            y, upd = bn.apply(v, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        out.append(
            _sharded(
                step, mesh, x, variables["batch_stats"]["mean"], variables["batch_stats"]["var"]
            )
        )
    jax.tree.map(lambda a, b: _close(a, b, 1e-5), out[1], out[0])


def test_axis_index_groups_match_flax_and_give_each_group_its_statistics():
    """Under ``jax.pmap``: ``shard_map`` does not implement ``axis_index_groups``."""
    x = _data((32, 3), seed=19)
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    variables = nn.BatchNorm(use_running_average=False).init(KEY, x)
    out = []
    for cls in (nn.BatchNorm, bl.BatchNorm):
        bn = cls(use_running_average=False, axis_name="data", axis_index_groups=groups)

        def step(x, bn=bn):
            y, upd = bn.apply(variables, x, mutable=["batch_stats"])
            return y, upd["batch_stats"]

        out.append(_flax(jax.pmap(step, axis_name="data"), x.reshape(8, 4, 3)))
    jax.tree.map(lambda a, b: _close(a, b, 1e-5), out[1], out[0])
    y, new = out[1]
    shards = np.asarray(x, np.float64).reshape(8, 4, 3)
    for group in groups:
        _, mean, var = ref.moments(shards[group].reshape(-1, 3), -1)
        want = ref.normalize(shards[group], mean, var, 1e-5)
        np.testing.assert_allclose(y[np.asarray(group)], want, atol=1e-5)
        for name, want in (("mean", 0.01 * mean), ("var", 0.99 + 0.01 * var)):
            got = new[name][np.asarray(group)]
            np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)


# -- a small CNN trained with each BatchNorm -------------------------------------------


class CNN(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)  # a bias before batch norm has no gradient
        x = nn.relu(self.norm(use_running_average=not train, momentum=0.9)(x))
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _train_cnn(norm, x, labels, steps=3):
    model = CNN(norm)
    variables = jax.jit(model.init, static_argnames="train")(KEY, x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1, momentum=0.9)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt):
        def loss(params):
            logits, upd = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        (_, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt

    for _ in range(steps):
        params, stats, opt = step(params, stats, opt)
    logits = jax.jit(lambda p, s: model.apply({"params": p, "batch_stats": s}, x, train=False))(
        params, stats
    )
    return params, stats, logits


@pytest.mark.slow
def test_cnn_trained_three_steps_matches_flax():
    x = _data((16, 8, 8, 1), seed=11)
    labels = jnp.asarray(np.random.default_rng(12).integers(0, 10, 16), jnp.int32)
    with jax.numpy_dtype_promotion("standard"):  # optax and Flax mix weak types
        theirs = _train_cnn(nn.BatchNorm, x, labels)
        ours = _train_cnn(bl.BatchNorm, x, labels)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), ours, theirs)


def test_one_element_batches_are_silent_as_in_flax():
    """A dummy batch of one (Module.init, a ResNet's last stage) warns in the core only:
    Flax is silent, and projects running warnings as errors must not break on the switch.
    ``checks=True`` keeps the warning."""
    x = _data((1, 1, 1, 4), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn = bl.BatchNorm(use_running_average=False)
        variables = bn.init(KEY, x)
        bn.apply(variables, x, mutable=["batch_stats"])
    with pytest.warns(UserWarning, match="equals bias"):
        bl.BatchNorm(use_running_average=False, checks=True).init(KEY, x)
    core = bnjax.BatchNorm()
    with pytest.warns(UserWarning, match="equals bias"):
        core.apply(*core.init(x), x, training=True)


def test_tabulate_with_flops_and_repeated_calls_shows_one_batch_norm_row():
    """``nn.tabulate(..., compute_flops=True)`` raised, and ``show_repeated=True`` showed an
    extra "BatchNorm (_stat_variables)" row: the helper was a Module method."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return bl.BatchNorm(use_running_average=False)(nn.Dense(4)(x))

    with jax.numpy_dtype_promotion("standard"):  # Flax's Dense mixes dtypes
        table = nn.tabulate(Model(), KEY, compute_flops=True, show_repeated=True)(jnp.ones((8, 3)))
    assert "_stat_variables" not in table
    assert table.count("│ BatchNorm │") == 1


@st.composite
def _mask_cases(draw):
    """An input shape, a feature axis and a mask shape of any of the readings (or none)."""
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.sampled_from([2, 3, 4]), min_size=ndim, max_size=ndim)))
    axis = draw(st.sampled_from([-1, 1]))
    kind = draw(st.sampled_from(["full", "leading", "trailing", "reduced", "random"]))
    k = draw(st.integers(1, ndim))
    if kind == "full":
        mask_shape = tuple(d if draw(st.booleans()) else 1 for d in shape)
    elif kind == "leading":
        mask_shape = shape[:k]
    elif kind == "trailing":
        mask_shape = shape[ndim - k :]
    elif kind == "reduced":
        mask_shape = tuple(d for i, d in enumerate(shape) if i != axis % ndim)
    else:
        mask_shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3)))
    return shape, axis, mask_shape, draw(st.integers(0, 2**16))


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(case=_mask_cases())
def test_mask_property_core_and_linen_read_masks_alike(case):
    """Whatever the shapes: the core and the linen wrapper both refuse a mask (naming it)
    or both count the same elements, with the same output and statistics."""
    shape, axis, mask_shape, seed = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jnp.float32)
    mask = jnp.asarray(rng.random(mask_shape) < 0.8)
    core = bnjax.BatchNorm(axis=axis, momentum=0.5)
    wrapper = bl.BatchNorm(use_running_average=False, axis=axis, momentum=0.5)
    outcomes = []
    for run in (
        lambda: core.apply(*core.init(x), x, training=True, mask=mask),
        lambda: wrapper.apply(wrapper.init(KEY, x), x, mask=mask, mutable=["batch_stats"]),
    ):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "training=True with one element")
                outcomes.append(run())
        except ValueError as e:
            assert str(e).startswith("mask of shape"), e
            outcomes.append(None)
    (core_out, linen_out) = outcomes
    assert (core_out is None) == (linen_out is None)
    if core_out is None:
        return
    (y, state), (y_linen, upd) = core_out, linen_out
    _close(y, y_linen, 1e-6)
    _close(state.mean, upd["batch_stats"]["mean"], 1e-6)
    _close(state.var, upd["batch_stats"]["var"], 1e-6)
    # The reference: numpy broadcasting of the mask as the core placed it.
    placed = expand_mask(mask, shape, (axis % len(shape),))
    full = np.broadcast_to(np.asarray(placed), shape)
    n, _, _ = ref.moments(np.asarray(x, np.float64), axis, full)
    if np.all(n > 0):
        want = ref.train_forward(np.asarray(x, np.float64), 1e-5, axis=axis, mask=full)
        _close(y, want, 2e-5)


@pytest.mark.parametrize(
    "ndim", [2, 3, pytest.param(4, marks=pytest.mark.slow), pytest.param(5, marks=pytest.mark.slow)]
)
def test_per_example_mask_works_for_any_rank(ndim):
    """One flag per example, shape (N,), for 2-D to 5-D inputs (the core refused it
    beyond 2-D): the statistics of the kept examples."""
    shape = (5,) + (3,) * (ndim - 2) + (2,)
    x = _data(shape, seed=ndim)
    keep = np.array([True, False, True, True, False])
    core = bnjax.BatchNorm()
    y, state = core.apply(*core.init(x), x, training=True, mask=jnp.asarray(keep))
    full = np.broadcast_to(keep.reshape((5,) + (1,) * (ndim - 1)), shape)
    want = ref.train_forward(np.asarray(x, np.float64), 1e-5, axis=-1, mask=full)
    _close(y, want, 2e-5)
    kept = np.asarray(x, np.float64)[keep].reshape(-1, 2)
    _close(state.mean, 0.01 * kept.mean(0), 1e-6)


@pytest.mark.parametrize("kind", ["bool", "int32"])
def test_bool_and_integer_inputs_without_affine_match_flax(kind):
    """Flax normalizes bool and integer inputs in float32, also with no float parameter
    to promote to."""
    x = jnp.asarray([[1, 0], [0, 0], [1, 1]], kind)
    outs = []
    for cls, promotion in ((nn.BatchNorm, "standard"), (bl.BatchNorm, "strict")):
        m = cls(use_running_average=False, use_scale=False, use_bias=False)
        with jax.numpy_dtype_promotion(promotion):  # Flax's mixes int and float
            y, upd = m.apply(m.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        assert y.dtype == jnp.float32
        outs.append((y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]))
    for theirs, ours in zip(*outs, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_top_level_module_is_named_by_its_class_in_audit():
    from bnjax.testing import audit

    m = bl.BatchNorm(use_running_average=False)
    x = jnp.arange(12.0).reshape(4, 3)
    variables = m.init(jax.random.key(0), x)

    def dropped(variables, x):
        return m.apply(variables, x, mutable=["batch_stats"])[0]

    assert [(f.kind, f.where) for f in audit(dropped, variables, x)] == [
        ("discarded_update", "BatchNorm")
    ]
