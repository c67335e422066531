"""Every configuration and apply-time error: its type, and a message naming the argument,
the value received and what was expected."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

X = jnp.ones((4, 3), jnp.float32)


def _config(**kwargs):
    return lambda: bnjax.BatchNorm(**kwargs)


CONFIG_ERRORS = {  # name: (kwargs, exception, regex: argument, value, expectation)
    "momentum_high": ({"momentum": 1.5}, ValueError, r"momentum=1\.5 .*expected .*\[0\.0, 1\.0\]"),
    "momentum_low": ({"momentum": -0.1}, ValueError, r"momentum=-0\.1 .*expected .*\[0\.0, 1\.0\]"),
    "momentum_nan": ({"momentum": float("nan")}, ValueError, r"momentum must be finite; got nan"),
    "momentum_str": ({"momentum": "0.9"}, TypeError, r"momentum must be a real number; got '0\.9'"),
    "momentum_bool": ({"momentum": True}, TypeError, r"momentum must be a real number; got True"),
    "epsilon_negative": (
        {"epsilon": -1e-3},
        ValueError,
        r"epsilon=-0\.001 .*expected .*\[0\.0, 3\.40.*e\+38\]",
    ),
    "epsilon_inf": ({"epsilon": float("inf")}, ValueError, r"epsilon must be finite; got inf"),
    "epsilon_none": ({"epsilon": None}, TypeError, r"epsilon must be a real number; got None"),
    "center": ({"center": 1}, TypeError, r"center must be a Python bool; got 1 \(int\)"),
    "scale": ({"scale": "yes"}, TypeError, r"scale must be a Python bool; got 'yes' \(str\)"),
    "skip_nonfinite": (
        {"skip_nonfinite": None},
        TypeError,
        r"skip_nonfinite must be a Python bool; got None",
    ),
    "averaging": (
        {"averaging": "mean"},
        ValueError,
        r"averaging='mean' is not supported; expected one of "
        r"\['ema', 'debiased', 'cumulative', 'ema_from_first'\]",
    ),
    "running_var": (
        {"running_var": "bessel"},
        ValueError,
        r"running_var='bessel' is not supported; expected one of \['biased', 'unbiased'\]",
    ),
    "axis_float": (
        {"axis": 1.0},
        TypeError,
        r"axis must be an int or a non-empty tuple of ints; got 1\.0",
    ),
    "axis_bool": (
        {"axis": True},
        TypeError,
        r"axis must be an int or a non-empty tuple of ints; got True",
    ),
    "axis_empty": (
        {"axis": ()},
        TypeError,
        r"axis must be an int or a non-empty tuple of ints; got \(\)",
    ),
    "axis_str": (
        {"axis": "-1"},
        TypeError,
        r"axis must be an int or a non-empty tuple of ints; got '-1'",
    ),
    "axis_repeated": (
        {"axis": (1, 1)},
        ValueError,
        r"axis=\(1, 1\) repeats an axis; expected distinct axes",
    ),
    "axis_name_unhashable": (
        {"axis_name": ["batch"]},
        TypeError,
        r"axis_name must be hashable; got \['batch'\]",
    ),
    "groups_without_name": (
        {"axis_index_groups": [[0, 1]]},
        ValueError,
        r"axis_index_groups is set but axis_name is None; set both",
    ),
    "groups_not_nested": (
        {"axis_name": "i", "axis_index_groups": [0, 1]},
        TypeError,
        r"axis_index_groups must be None or a sequence of sequences of ints; got \[0, 1\]",
    ),
    "groups_not_ints": (
        {"axis_name": "i", "axis_index_groups": [[0, "a"]]},
        TypeError,
        r"axis_index_groups must be None or a sequence of sequences of ints; got \[\[0, 'a'\]\]",
    ),
    "groups_empty": (
        {"axis_name": "i", "axis_index_groups": [[0], []]},
        ValueError,
        r"axis_index_groups=\[\[0\], \[\]\] has an empty group; expected non-empty",
    ),
    "dtype_int": ({"dtype": jnp.int32}, TypeError, r"dtype must be a floating dtype; got int32"),
    "dtype_garbage": ({"dtype": "nope"}, TypeError, r"dtype must be a floating dtype; got 'nope'"),
    "param_dtype_bool": (
        {"param_dtype": bool},
        TypeError,
        r"param_dtype must be a floating dtype; got bool",
    ),
    "scale_init": (
        {"scale_init": 1.0},
        TypeError,
        r"scale_init must be callable \(key, shape, dtype\); got 1\.0",
    ),
    "bias_init": (
        {"bias_init": "zeros"},
        TypeError,
        r"bias_init must be callable \(key, shape, dtype\); got 'zeros'",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors(case):
    kwargs, exc, regex = CONFIG_ERRORS[case]
    with pytest.raises(exc, match=regex):
        bnjax.BatchNorm(**kwargs)


def test_config_edges_are_accepted():
    for kwargs in ({"momentum": 0}, {"momentum": 1}, {"epsilon": 0.0}, {"axis": np.int64(1)}):
        bnjax.BatchNorm(**kwargs)
    assert bnjax.BatchNorm(axis=[0, 2]).axis == (0, 2)
    assert bnjax.BatchNorm(axis_name="i", axis_index_groups=[[0, 1], [2, 3]]).axis_index_groups == (
        (0, 1),
        (2, 3),
    )


def _init(x_or_shape, bn=None, **kwargs):
    return lambda: (bn or bnjax.BatchNorm()).init(x_or_shape, **kwargs)


def _wrong_shape(key, shape, dtype):
    return jnp.ones((5,), dtype)


INIT_ERRORS = {
    "shape_str": (
        _init("4, 3"),
        TypeError,
        r"x_or_shape must be an array or a shape \(tuple of non-negative ints\); got '4, 3'",
    ),
    "shape_negative": (
        _init((4, -3)),
        TypeError,
        r"x_or_shape must be .*non-negative ints\); got \(4, -3\)",
    ),
    "axis_out_of_range": (
        _init((4, 3), bnjax.BatchNorm(axis=2)),
        ValueError,
        r"axis=2 is out of range for x of shape \(4, 3\); expected axes in \[-2, 2\)",
    ),
    "axis_same_twice": (
        _init((4, 3), bnjax.BatchNorm(axis=(1, -1))),
        ValueError,
        r"axis=\(1, -1\) names the same axis twice for x of shape \(4, 3\)",
    ),
    "missing_key": (
        _init((4, 3), bnjax.BatchNorm(scale_init=_wrong_shape)),
        TypeError,
        r"key is None, but scale_init or bias_init needs a PRNG key",
    ),
    "init_shape": (
        _init((4, 3), bnjax.BatchNorm(bias_init=_wrong_shape), key=jax.random.key(0)),
        ValueError,
        r"bias_init returned shape \(5,\); expected \(3,\)",
    ),
}


@pytest.mark.parametrize("case", list(INIT_ERRORS))
def test_init_errors(case):
    fn, exc, regex = INIT_ERRORS[case]
    with pytest.raises(exc, match=regex):
        fn()


BN = bnjax.BatchNorm()
PARAMS, STATE = BN.init(X)


def _apply(x=X, params=PARAMS, state=STATE, bn=BN, **kwargs):
    kwargs.setdefault("training", True)
    return lambda: bn.apply(params, state, x, **kwargs)


APPLY_ERRORS = {
    "training_int": (
        _apply(training=1),
        TypeError,
        r"training must be a Python bool; got 1 \(int\)",
    ),
    "training_none": (
        _apply(training=None),
        TypeError,
        r"training must be a Python bool; got None",
    ),
    "update_stats_str": (
        _apply(update_stats="no"),
        TypeError,
        r"update_stats must be a Python bool; got 'no' \(str\)",
    ),
    "x_int": (
        _apply(x=jnp.ones((4, 3), jnp.int32)),
        TypeError,
        r"x must have a floating-point dtype; got int32.*astype",
    ),
    "x_list": (_apply(x=[[1.0, 2.0, 3.0]]), TypeError, r"x must be an array; got list"),
    "axis_out_of_range": (
        _apply(x=jnp.ones((3,), jnp.float32), bn=bnjax.BatchNorm(axis=1)),
        ValueError,
        r"axis=1 is out of range for x of shape \(3,\); expected axes in \[-1, 1\)",
    ),
    "scale_shape": (
        _apply(params=PARAMS._replace(scale=jnp.ones(4))),
        ValueError,
        r"params\.scale has shape \(4,\); expected \(3,\), the shape of x along the feature axes",
    ),
    "bias_none": (
        _apply(params=PARAMS._replace(bias=None)),
        ValueError,
        r"params\.bias is None but this BatchNorm needs it \(shape \(3,\)\)",
    ),
    "mean_shape": (
        _apply(x=jnp.ones((4, 5), jnp.float32)),
        ValueError,
        r"params\.scale has shape \(3,\); expected \(5,\)",
    ),
    "var_shape": (
        _apply(state=STATE._replace(var=jnp.ones((1, 3)))),
        ValueError,
        r"state\.var has shape \(1, 3\); expected \(3,\)",
    ),
    "count_shape": (
        _apply(state=STATE._replace(count=jnp.zeros(3, jnp.int32))),
        ValueError,
        r"state\.count has shape \(3,\); expected \(\)",
    ),
    "count_float": (
        _apply(state=STATE._replace(count=jnp.zeros((), jnp.float32))),
        TypeError,
        r"state\.count must be an integer scalar; got dtype float32",
    ),
    "params_dict": (
        _apply(params={"scale": 1}),
        TypeError,
        r"params must be a BatchNormParams with fields \('scale', 'bias'\); "
        r"got a dict with keys \['scale'\]\. Flax variables convert with "
        r"bnjax\.interop\.from_flax\(variables\)",
    ),
    "state_swapped": (
        _apply(state=PARAMS),
        TypeError,
        r"state must be a BatchNormState with fields \('mean', 'var', 'count'\); "
        r"got BatchNormParams without \['mean', 'var'",
    ),
    "mask_float": (
        _apply(mask=jnp.ones(4, jnp.float32)),
        TypeError,
        r"mask must be a bool array; got dtype float32",
    ),
    "mask_list": (
        _apply(mask=[True] * 4),
        TypeError,
        r"mask must be a bool array; got dtype None \(list\)",
    ),
    "mask_shape": (
        _apply(mask=jnp.ones(5, bool)),
        ValueError,
        r"mask of shape \(5,\) does not broadcast to x of shape \(4, 3\); "
        r"expected a shape broadcastable to x \(numpy's rules\), x's leading dimensions "
        r"\(one flag per example, e.g. \(4,\)\), or x without its feature axes \(4,\)",
    ),
    "mask_too_long": (
        _apply(x=jnp.ones((4, 2, 3), jnp.float32), mask=jnp.ones((4, 2, 3, 1), bool)),
        ValueError,
        r"mask of shape \(4, 2, 3, 1\) does not broadcast to x of shape \(4, 2, 3\)",
    ),
}


@pytest.mark.parametrize("case", list(APPLY_ERRORS))
def test_apply_errors(case):
    fn, exc, regex = APPLY_ERRORS[case]
    with pytest.raises(exc, match=regex):
        fn()


def test_traced_training_flag_is_refused_with_advice():
    f = jax.jit(lambda x, training: BN.apply(PARAMS, STATE, x, training=training))
    with pytest.raises(TypeError, match=re.escape("static_argnames=('training',)")):
        f(X, True)
    g = jax.jit(lambda x, u: BN.apply(PARAMS, STATE, x, training=True, update_stats=u))
    with pytest.raises(TypeError, match="update_stats must be a Python bool, not a traced value"):
        g(X, False)


def test_errors_are_raised_under_jit_too():
    # Shapes are static: the same checks fire at trace time.
    f = jax.jit(lambda params, state, x: BN.apply(params, state, x, training=True))
    with pytest.raises(ValueError, match=r"state\.mean has shape \(4,\); expected \(3,\)"):
        f(PARAMS, STATE._replace(mean=jnp.zeros(4)), X)
    with pytest.raises(TypeError, match="x must have a floating-point dtype; got int32"):
        f(PARAMS, STATE, jnp.ones((4, 3), jnp.int32))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        # 1e300 is inf in float32: every output would be 0.
        (dict(epsilon=1e300), ValueError, ["epsilon=1e+300", "out of range"]),
        # jnp.dtype(None) is float64: the parameters would silently widen.
        (dict(param_dtype=None), TypeError, ["param_dtype", "got None"]),
    ],
)
def test_settings_that_were_silently_accepted_are_refused(kwargs, error, words):
    with pytest.raises(error) as info:
        bnjax.BatchNorm(**kwargs)
    for word in words:
        assert word in str(info.value)
    assert bnjax.BatchNorm(epsilon=float(np.finfo(np.float32).max)).epsilon > 0  # the edge


WRONG_KIND_SETTINGS = {
    "virtual_batch_size_str": (dict(virtual_batch_size="4"), TypeError,
                               r"virtual_batch_size must be None or an int; got '4' \(str\)"),
    "virtual_batch_size_0": (dict(virtual_batch_size=0), ValueError,
                             r"virtual_batch_size=0 is out of range; expected an int >= 1"),
    "axis_bool": (dict(axis=True), TypeError,
                  r"axis must be an int or a non-empty tuple of ints; got True"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(WRONG_KIND_SETTINGS))
def test_a_setting_of_the_wrong_kind_is_refused_naming_it_and_its_value(case):
    kwargs, error, message = WRONG_KIND_SETTINGS[case]
    with pytest.raises(error, match=message):
        bnjax.BatchNorm(**kwargs)


def test_axis_minus_ndim_is_the_first_axis():
    params, _ = bnjax.BatchNorm(axis=-2).init((4, 3))
    assert params.scale.shape == (4,)


def test_a_dtype_given_by_name_is_kept_as_that_dtype():
    assert bnjax.BatchNorm(dtype="bfloat16").dtype == jnp.bfloat16


def test_init_takes_a_shape_with_a_zero_and_refuses_a_negative_size():
    assert bnjax.BatchNorm().init((0, 3))[1].mean.shape == (3,)
    with pytest.raises(TypeError, match=r"\(-1, 3\)"):
        bnjax.BatchNorm().init((-1, 3))


def test_something_with_a_dtype_or_shape_alone_is_not_an_array():
    params, state = bnjax.BatchNorm().init((4, 3))
    with pytest.raises(TypeError, match="x must be an array; got"):
        bnjax.BatchNorm().apply(params, state, jnp.float32, training=True)
    with pytest.raises(TypeError, match=r"state\.mean must be an array"):
        fake = type("ShapeOnly", (), {"shape": (3,)})()
        bnjax.BatchNorm().apply(params, state._replace(mean=fake), X, training=False)
