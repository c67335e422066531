"""The hypothesis strategies of ``bnjax/_src/strategies.py``: every drawn configuration is
valid, every drawn batch, mask and state is one ``apply`` accepts in training and in
inference, the outputs are finite, and importing without hypothesis says what to install."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnjax
from bnjax._src.batchnorm import OneElementWarning
from bnjax._src.reduction import expand_mask
from bnjax._src.strategies import SEEDS, Inputs, configs, inputs, masks, states, values
from bnjax._src.validation import feature_axes

# Each example of an applying property compiles apply for a new configuration and shape.
COMPILING = settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Drawing alone is cheap: many more examples.
DRAWING = settings(COMPILING, max_examples=40)
FLOATS = {jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)}


@functools.partial(jax.jit, static_argnums=0)
def _train_and_eval(bn, params, state, x, mask):
    training = bn.apply(params, state, x, training=True, mask=mask)
    inference = bn.apply(params, state, x, training=False, mask=mask)
    return training, inference


def _wide(dtype) -> bool:
    """float32's range: a finite normalized value stays finite (not float16's 65504)."""
    return jnp.finfo(dtype).max >= jnp.finfo(jnp.float32).max


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
@COMPILING
@given(data=st.data(), bn=configs())
def test_apply_takes_every_draw_and_its_outputs_are_finite(data, bn):
    x, mask = data.draw(inputs(bn), label="inputs")
    params, state = data.draw(states(bn, x.shape, max_updates=3), label="params, state")
    with warnings.catch_warnings():
        warnings.simplefilter("error", OneElementWarning)  # inputs() avoids them
        (y, new), (y_eval, same) = _train_and_eval(bn, params, state, x, mask)
    out_dtype = bn.dtype or x.dtype
    assert y.shape == y_eval.shape == x.shape and y.dtype == y_eval.dtype == out_dtype
    assert jax.tree.structure(new) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, same, state)
    assert _finite(params) and _finite(state) and _finite(new)
    # epsilon=0 divides 0 by 0 on a constant feature (documented). A feature that the
    # mask leaves empty, and inference, normalize with the running statistics: far from
    # x, that can overflow float16.
    if bn.epsilon > 0 and (_wide(out_dtype) or mask is None):
        assert _finite(y), (bn, x, mask, y)
    if (bn.epsilon > 0 or bool(jnp.all(state.var > 0))) and _wide(out_dtype):
        assert _finite(y_eval), (bn, x, state, y_eval)


@DRAWING
@given(bn=configs())
def test_every_drawn_config_is_valid(bn):
    assert isinstance(bn, bnjax.BatchNorm)
    fields = {f.name: getattr(bn, f.name) for f in dataclasses.fields(bn)}
    assert bnjax.BatchNorm(**fields) == bn  # passes BatchNorm's checks again
    assert bn.axis_name is None and bn.axis_index_groups is None and bn.checks is False
    assert bn.dtype in FLOATS | {None} and bn.param_dtype in FLOATS
    inputs(bn, max_rank=4)  # some input of the default rank fits it
    assert bn.renorm is None or isinstance(bn.renorm, bnjax.Renorm)


@DRAWING
@given(data=st.data(), bn=configs(), max_side=st.integers(2, 5))
def test_inputs_fit_the_config(data, bn, max_side):
    batch = data.draw(inputs(bn, max_rank=4, max_side=max_side))
    x, mask = batch
    assert isinstance(batch, Inputs) and x.dtype in FLOATS
    assert np.isfinite(np.asarray(x)).all()
    feat = feature_axes(bn.axis, x.ndim, x.shape)  # the axes fit, distinct
    assert 2 <= x.ndim <= 4 and len(feat) < x.ndim
    vbs = bn.virtual_batch_size
    sides = x.shape[1:] if vbs else x.shape
    assert all(1 <= d <= max_side for d in sides)
    reduced = math.prod(x.shape) // math.prod(x.shape[a] for a in feat)
    if vbs is not None:
        assert 0 not in feat and x.shape[0] % vbs == 0
        assert 0 < x.shape[0] <= max(vbs, max_side)
        reduced //= x.shape[0] // vbs
    assert reduced >= 2  # two elements per feature in each (virtual) batch
    if mask is not None:
        assert mask.dtype == jnp.bool_
        # expand_mask refuses an ambiguous mask; abstractly, to compile nothing.
        read = jax.eval_shape(lambda m: expand_mask(m, x.shape, feat), mask)
        want = mask.shape + (1,) * (x.ndim - mask.ndim)  # of x's rank, or leading axes
        assert read.shape == want
        assert all(m in (1, d) for m, d in zip(want, x.shape, strict=True))


@pytest.mark.slow
def test_inputs_cover_the_cases_that_matter():
    """Per-example masks, all-False masks, constant features, every dtype: all drawn."""
    bn = bnjax.BatchNorm(axis=1)
    seen = set()

    @settings(max_examples=100, deadline=None, database=None)
    @given(inputs(bn, max_rank=3, max_side=4))
    def collect(batch):
        x, mask = (None if a is None else np.asarray(a) for a in batch)
        seen.add(str(x.dtype))
        if mask is not None:
            seen.add("per_example" if mask.ndim < x.ndim else "full_rank")
            seen.add("all_false" if not mask.any() else "some_true")
        if x.size > 1 and (x == x.flat[0]).all():
            seen.add("constant")

    collect()
    wanted = {"float32", "float16", "bfloat16", "per_example", "full_rank", "all_false"}
    assert wanted | {"some_true", "constant"} <= seen


@settings(COMPILING, max_examples=4)
@given(data=st.data())
def test_states_count_their_updates(data):
    bn = data.draw(configs())
    x, _ = data.draw(inputs(bn, max_side=4))
    params, state = data.draw(states(bn, x.shape, max_updates=2))
    chunks = x.shape[0] // bn.virtual_batch_size if bn.virtual_batch_size else 1
    assert 0 <= int(state.count) <= 2 * chunks
    assert state.mean.shape == state.var.shape == bn.feature_shape(x.shape)
    if bn.scale:
        assert params.scale.dtype == bn.param_dtype


def test_fixed_fields_are_kept():
    @settings(max_examples=20, deadline=None, database=None)
    @given(configs(axis=(1, -1), virtual_batch_size=2, averaging="debiased", renorm=bnjax.Renorm()))
    def check(bn):
        assert bn.axis == (1, -1) and bn.virtual_batch_size == 2
        assert bn.averaging == "debiased" and bn.renorm == bnjax.Renorm()

    check()


def test_a_fixed_axis_gets_only_the_virtual_batch_sizes_it_fits():
    @settings(max_examples=30, deadline=None, database=None)
    @given(configs(axis=0), configs(axis=(1, -1, 2)), configs(axis=7))
    def check(first, second, third):
        assert first.virtual_batch_size is None  # axis 0 is never split into chunks
        # Rank 4 leaves axis 0 alone reduced: one element per virtual batch of 1.
        assert second.virtual_batch_size in (None, 2, 3)
        inputs(second)
        inputs(third, max_rank=8)

    check()


def test_configs_refuses_what_is_not_a_config():
    with pytest.raises(TypeError, match=r"\['axes'\], which are not BatchNorm fields"):
        configs(axes=1)
    with pytest.raises(ValueError, match=r"momentum=2.0 is out of range"):
        configs(momentum=2.0)


def test_inputs_refuses_configs_no_input_fits():
    with pytest.raises(ValueError, match=r"no input of rank <= max_rank=4 fits axis=0 with "):
        inputs(bnjax.BatchNorm(axis=0, virtual_batch_size=2))
    with pytest.raises(ValueError, match=r"max_rank=4 fits axis=-5"):
        inputs(bnjax.BatchNorm(axis=-5))
    inputs(bnjax.BatchNorm(axis=-5), max_rank=5)
    with pytest.raises(ValueError, match=r"max_side=1 is out of range"):
        inputs(bnjax.BatchNorm(), max_side=1)
    with pytest.raises(TypeError, match=r"config must be a bnjax.BatchNorm; got 'bn' \(str\)"):
        inputs("bn")


def test_states_refuses_shapes_the_config_cannot_train_on():
    with pytest.raises(ValueError, match=r"batch size 4 .* not a multiple of virtual_batch_s"):
        states(bnjax.BatchNorm(virtual_batch_size=3), (4, 2))
    with pytest.raises(ValueError, match=r"axis=2 is out of range for x of shape \(4, 3\)"):
        states(bnjax.BatchNorm(axis=2), (4, 3))
    with pytest.raises(TypeError, match=r"shape must be a tuple of ints; got '4x3' \(str\)"):
        states(bnjax.BatchNorm(), "4x3")
    for shape in [(4, "3"), (4, True), np.array([4, 3])]:
        with pytest.raises(TypeError, match=r"shape must be a tuple of ints; got "):
            states(bnjax.BatchNorm(), shape)
    with pytest.raises(ValueError, match=r"max_updates=-1 is out of range"):
        states(bnjax.BatchNorm(), (4, 3), max_updates=-1)


def test_import_without_hypothesis_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.delitem(sys.modules, "bnjax._src.strategies")
    match = r"^bnjax.testing.strategies needs hypothesis: pip install 'bnjax\[testing\]'$"
    with pytest.raises(ImportError, match=match) as info:
        importlib.import_module("bnjax._src.strategies")
    cause = info.value.__cause__
    assert isinstance(cause, ImportError) and "hypothesis" in str(cause)


# Reach: each strategy draws every region its docstring promises. A strategy that narrows
# its draws (a sign never drawn, offsets never large, counts never advanced) passes the
# validity properties above, so each region is collected over many cheap draws.


def _draws(strategy, n, **options):
    """``n`` examples of ``strategy`` (hypothesis's own choice of them, not shrunk)."""
    found = []

    @settings(max_examples=n, deadline=None, database=None, **options)
    @given(strategy)
    def take(value):
        found.append(value)

    take()
    return found


@pytest.mark.slow
def test_configs_draw_every_form_of_axis_and_each_fits_rank_4():
    seen = set()
    for bn, one in _draws(st.tuples(configs(), configs(virtual_batch_size=1)), 300):
        for config in (bn, one):
            inputs(config, max_rank=4)  # refuses an axis no input of rank <= 4 fits
        axis = bn.axis
        if isinstance(axis, int):
            seen.add("int")
        else:
            seen.add("1-tuple" if len(axis) == 1 else "tuple")
            if list(axis) != sorted(axis):
                seen.add("unordered")
        axes = (axis,) if isinstance(axis, int) else axis
        seen.update("negative" if a < 0 else "positive" for a in axes)
        if not isinstance(one.axis, int) and len(one.axis) == 2:
            seen.add("two axes with virtual batches of 1")
    want = {"int", "1-tuple", "tuple", "unordered", "negative", "positive"}
    assert want | {"two axes with virtual batches of 1"} <= seen


def test_inputs_fit_the_highest_rank_exactly_and_no_higher():
    x, _ = _draws(inputs(bnjax.BatchNorm(axis=-2), max_rank=2), 1)[0]
    assert x.ndim == 2  # -2 fits rank 2, the highest
    x, _ = _draws(inputs(bnjax.BatchNorm(axis=(0, 3)), max_rank=4), 1)[0]
    assert x.ndim == 4
    for axis in (2, -3):
        with pytest.raises(ValueError, match=rf"max_rank=2 fits axis={axis} with "):
            inputs(bnjax.BatchNorm(axis=axis), max_rank=2)


@pytest.mark.slow
def test_inputs_draw_every_size_of_a_reduced_axis():
    """Sizes 1 to max_side on the batch axis: only a batch of one element per feature
    in all is grown to two."""
    plain = _draws(inputs(bnjax.BatchNorm(axis=-1), max_rank=3, max_side=4), 200)
    virtual = inputs(bnjax.BatchNorm(axis=-1, virtual_batch_size=2), max_rank=3, max_side=4)
    sizes = {
        None: {b.x.shape[0] for b in plain},
        2: {b.x.shape[1] for b in _draws(virtual, 200) if b.x.ndim == 3},
    }
    assert sizes == {None: {1, 2, 3, 4}, 2: {1, 2, 3, 4}}


# The largest offset / spread per dtype, as inputs() documents it.
MAX_RATIO = {"float32": 1e6, "float16": 1e2, "bfloat16": 1e2}
# The powers of ten of the spread: 1e-3 to 1e3, float16's 1e-2 to 1e2.
SPREAD_EXPONENTS = {"float32": (-3, 3), "float16": (-2, 2), "bfloat16": (-3, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_values_reach_both_signs_and_every_size_of_offset_and_spread(dtype):
    """Per feature of 16 draws (the range of z is then >= 1 but for odds below 1e-4):
    |mean| / range stays within the largest offset ratio, and reaches it on both signs;
    the range spans the powers of ten of the spread; ties and constants are drawn."""
    seen = set()
    worst = 0.0
    top = MAX_RATIO[dtype]
    low, high = SPREAD_EXPONENTS[dtype]
    for x in _draws(values((16, 3), (1,), jnp.dtype(dtype)), 200):
        for f in np.asarray(x, np.float64).T:
            width, mean = f.max() - f.min(), f.mean()
            if width == 0:
                seen.add("constant")
                continue
            ratio = abs(mean) / width
            worst = max(worst, ratio)
            if ratio >= top / 10:
                seen.add("large positive offset" if mean > 0 else "large negative offset")
            if ratio < 1:
                if width < 10.0 ** (low + 1):
                    seen.add("tiny spread")
                if width >= 10.0**high:
                    seen.add("huge spread")
                if dtype == "float32" and len(np.unique(f)) <= 5:
                    seen.add("ties")
    assert worst <= 2 * top  # bfloat16 rounds a range of 1 spread down to 1/2
    want = {"constant", "large positive offset", "large negative offset", "tiny spread"}
    want |= {"huge spread"} | ({"ties"} if dtype == "float32" else set())
    assert want <= seen


def test_masks_draw_every_density():
    """All False, about half, about 80% (most examples kept), all True."""
    seen = set()
    for mask in _draws(masks((8, 8), (1,)), 200):
        if mask is not None and mask.size >= 32:
            share = float(np.mean(np.asarray(mask)))
            seen.add(min((0.0, 0.5, 0.8, 1.0), key=lambda d: abs(d - share)))
    assert seen == {0.0, 0.5, 0.8, 1.0}


def test_states_advance_the_count_and_draw_params_of_either_sign():
    bn = bnjax.BatchNorm(momentum=0.5)
    init_params, init_state = bn.init((4, 3))
    counts, seen = set(), set()
    drawn = _draws(
        states(bn, (4, 3), max_updates=2), 25, suppress_health_check=[HealthCheck.too_slow]
    )
    for params, state in drawn:
        counts.add(int(state.count))
        if int(state.count) and not np.array_equal(state.var, init_state.var):
            seen.add("updated")
        scale = np.asarray(params.scale)
        if not np.array_equal(scale, init_params.scale):
            seen.update("negative scale" if s < 0 else "positive scale" for s in scale)
    assert counts == {0, 1, 2}
    assert seen == {"updated", "negative scale", "positive scale"}


def test_noise_seeds_span_32_bits():
    """The numpy noise of values, masks and parameters comes from one seed per draw: a
    narrow seed range would repeat the same noise across examples."""
    seeds = set(_draws(SEEDS, 100))
    assert min(seeds) >= 0 and max(seeds) >= 2**24 and len(seeds) > 64
    np.random.default_rng(2**32 - 1)  # the largest is a seed numpy takes
