"""The state-threading checks of ``bnjax/_src/properties.py``: each passes on bnjax models
(the core ``BatchNorm`` and a two-layer network with a dict state) and fails, naming the
property and the leaf, on a model that breaks exactly what it checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from bnjax._src.properties import (
    assert_eval_is_pure,
    assert_jit_matches_eager,
    assert_scan_matches_loop,
    assert_vmap_matches_loop,
)

BN = bnjax.BatchNorm(momentum=0.9)
BN_HIDDEN = bnjax.BatchNorm(averaging="cumulative", running_var="unbiased")
XS = jax.random.normal(jax.random.key(0), (3, 8, 4)) * 2.0 + 1.0
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def _core():
    params, state = BN.init(XS[0])
    return BN.apply, params, state


def _two_layer_apply(params, state, x, *, training):
    h, first = BN.apply(params["bn1"], state["bn1"], x, training=training)
    h = jnp.tanh(h @ params["w"])
    y, second = BN_HIDDEN.apply(params["bn2"], state["bn2"], h, training=training)
    return y, {"bn1": first, "bn2": second}


def _two_layer():
    p1, s1 = BN.init((8, 4))
    p2, s2 = BN_HIDDEN.init((8, 4))  # the first layer's shapes: no new compilations
    w = jax.random.normal(jax.random.key(1), (4, 4)) / 2.0
    return _two_layer_apply, {"bn1": p1, "w": w, "bn2": p2}, {"bn1": s1, "bn2": s2}


MODELS = pytest.mark.parametrize("model", [_core, _two_layer], ids=["core", "two_layer"])


# -- bnjax models pass ------------------------------------------------------------------


@MODELS
def test_eval_is_pure_holds(model):
    apply, params, state = model()
    # A state that has seen data, so "unchanged" is not just the initial values.
    _, state = apply(params, state, XS[1], training=True)
    assert_eval_is_pure(apply, params, state, XS[0])


@MODELS
@TRAINING
def test_jit_matches_eager_holds(model, training):
    apply, params, state = model()
    assert_jit_matches_eager(apply, params, state, XS[0], training=training)


@MODELS
@TRAINING
def test_vmap_matches_loop_holds(model, training):
    apply, params, state = model()
    assert_vmap_matches_loop(apply, params, state, XS, training=training)


@MODELS
@TRAINING
def test_scan_matches_loop_holds(model, training):
    apply, params, state = model()
    assert_scan_matches_loop(apply, params, state, XS, training=training)


def test_a_pytree_of_batches_is_stacked_leaf_by_leaf():
    params, state = BN.init((8, 4))

    def apply(params, state, x, *, training):
        return BN.apply(params, state, x["image"] * x["gain"], training=training)

    xs = {"image": XS, "gain": jnp.arange(1.0, 4.0)}
    assert_vmap_matches_loop(apply, params, state, xs, training=True)
    assert_scan_matches_loop(apply, params, state, xs, training=True)


# -- models that break one property fail it ---------------------------------------------


def _eval_updates_state(params, state, x, *, training):
    return BN.apply(params, state, x, training=training, update_stats=True)


def test_eval_that_updates_state_fails_purity():
    _, params, state = _core()
    with pytest.raises(AssertionError, match=r"assert_eval_is_pure.*new_state\.mean vs state"):
        assert_eval_is_pure(_eval_updates_state, params, state, XS[0])
    # Updating in eval is wrong, but the same under jit.
    assert_jit_matches_eager(_eval_updates_state, params, state, XS[0], training=False)


def test_eval_with_a_varying_output_fails_purity():
    _, params, state = _core()
    calls = []

    def apply(params, state, x, *, training):
        calls.append(1)
        y, state = BN.apply(params, state, x, training=training)
        return y + len(calls), state

    with pytest.raises(AssertionError, match=r"same output every call.*y of the second call"):
        assert_eval_is_pure(apply, params, state, XS[0])


def test_eval_purity_is_exact_and_treats_nan_as_equal():
    _, params, state = _core()
    state = state._replace(mean=state.mean.at[0].set(jnp.nan))

    def nudges(params, state, x, *, training):
        y, _ = BN.apply(params, state, x, training=training)
        return y, state._replace(var=jnp.nextafter(state.var, 2.0))

    assert_eval_is_pure(BN.apply, params, state, XS[0])
    with pytest.raises(
        AssertionError,
        match=r"new_state\.var vs state\.var: 4 of 4 elements differ \(compared exactly\)",
    ):
        assert_eval_is_pure(nudges, params, state, XS[0])


def _branches_on_tracer(params, state, x, *, training):
    y, state = BN.apply(params, state, x, training=training)
    if isinstance(x, jax.core.Tracer):  # a traced call takes another path
        y = y * 1.001
    return y, state


@TRAINING
def test_output_that_differs_under_jit_fails(training):
    _, params, state = _core()
    with pytest.raises(AssertionError, match=r"assert_jit_matches_eager.*jitted y vs eager y"):
        assert_jit_matches_eager(_branches_on_tracer, params, state, XS[0], training=training)
    assert_eval_is_pure(_branches_on_tracer, params, state, XS[0])


def _peeks_across_the_vmap(params, state, x, *, training):
    """Rescales the output by its largest value, in a host callback that takes whatever
    it is given: under vmap, every batch of the stack at once."""
    y, state = BN.apply(params, state, x, training=training)
    y = jax.pure_callback(
        lambda a: a / np.abs(a).max(), jax.ShapeDtypeStruct(y.shape, y.dtype), y,
        vmap_method="expand_dims",
    )  # fmt: skip
    return y, state


@pytest.mark.slow
def test_output_that_mixes_the_vmapped_batches_fails():
    _, params, state = _core()
    match = r"assert_vmap_matches_loop.*vmapped y vs looped y.*\(batch \d of xs\)"
    with pytest.raises(AssertionError, match=match):
        assert_vmap_matches_loop(_peeks_across_the_vmap, params, state, XS, training=True)
    # Under scan the callback sees one batch at a time: that property holds.
    assert_scan_matches_loop(_peeks_across_the_vmap, params, state, XS, training=True)


def test_state_update_from_a_python_counter_fails_scan():
    _, params, state = _core()
    counter = [0]

    def apply(params, state, x, *, training):
        y, new = BN.apply(params, state, x, training=training)
        counter[0] += 1  # a trace-time constant inside the scan, one per call in a loop
        return y, new._replace(count=new.count + counter[0])

    match = r"assert_scan_matches_loop.*scanned new_state\.count vs looped new_state\.count"
    with pytest.raises(AssertionError, match=match):
        assert_scan_matches_loop(apply, params, state, XS, training=True)


def test_state_whose_dtype_drifts_fails_scan_naming_the_step():
    _, params, state = _core()

    def apply(params, state, x, *, training):
        y, new = BN.apply(params, state, x, training=training)
        return y, new._replace(mean=new.mean.astype(jnp.float16))

    match = r"keep its shape and dtype; after batch 0 new_state\.mean has shape \(4,\) and dtype"
    with pytest.raises(AssertionError, match=match):
        assert_scan_matches_loop(apply, params, state, XS, training=True)
    assert_jit_matches_eager(apply, params, state, XS[0], training=True)
    assert_vmap_matches_loop(apply, params, state, XS, training=True)


def test_a_difference_names_the_leaf_of_a_dict_state_and_the_largest_difference():
    apply, params, state = _two_layer()

    def drifts(params, state, x, *, training):
        y, new = apply(params, state, x, training=training)
        if isinstance(x, jax.core.Tracer):
            bn2 = new["bn2"]
            new = {**new, "bn2": bn2._replace(var=bn2.var.at[3].add(0.5))}
        return y, new

    with pytest.raises(AssertionError) as info:
        assert_jit_matches_eager(drifts, params, state, XS[0], training=True)
    message = str(info.value)
    assert "jitted new_state['bn2'].var vs eager new_state['bn2'].var" in message
    assert "1 of 4 elements differ" in message and "largest difference is 0.5" in message
    assert "at index (3,)" in message


def test_tolerances_are_honoured():
    _, params, state = _core()

    def off_by(delta):
        def apply(params, state, x, *, training):
            y, new = BN.apply(params, state, x, training=training)
            return (y + delta if isinstance(x, jax.core.Tracer) else y), new

        return apply

    apply = off_by(1e-4)
    assert_jit_matches_eager(apply, params, state, XS[0], training=True, atol=1e-3)
    with pytest.raises(AssertionError, match=r"by more than atol=1e-05 \+ rtol=0.0 \* \|eager y\|"):
        assert_jit_matches_eager(apply, params, state, XS[0], training=True, rtol=0.0, atol=1e-5)


# -- arguments --------------------------------------------------------------------------


def test_model_apply_must_be_callable():
    _, params, state = _core()
    for check in (
        lambda m: assert_eval_is_pure(m, params, state, XS[0]),
        lambda m: assert_jit_matches_eager(m, params, state, XS[0], training=True),
        lambda m: assert_vmap_matches_loop(m, params, state, XS, training=True),
        lambda m: assert_scan_matches_loop(m, params, state, XS, training=True),
    ):
        with pytest.raises(TypeError, match=r"model_apply must be callable.*got 'bn' \(str\)"):
            check("bn")


def test_model_apply_must_return_a_pair():
    _, params, state = _core()

    def only_y(params, state, x, *, training):
        return BN.apply(params, state, x, training=training)[0]

    with pytest.raises(TypeError, match=r"must return a pair \(y, new_state\); got a ArrayImpl"):
        assert_eval_is_pure(only_y, params, state, XS[0])

    def triple(params, state, x, *, training):
        return (*BN.apply(params, state, x, training=training), None)

    def stacked_pair(params, state, x, *, training):  # an array of two rows is no pair
        y, _ = BN.apply(params, state, x, training=training)
        return jnp.stack([y, y])

    with pytest.raises(TypeError, match=r"got a tuple of length 3$"):
        assert_eval_is_pure(triple, params, state, XS[0])
    with pytest.raises(TypeError, match=r"got a ArrayImpl$"):
        assert_eval_is_pure(stacked_pair, params, state, XS[0])


class _Unhashable:
    """A model object that defines equality, so Python gives it no hash."""

    __hash__ = None

    def __eq__(self, other):
        return self is other

    def __call__(self, params, state, x, *, training):
        return BN.apply(params, state, x, training=training)


def test_an_unhashable_model_apply_gets_a_fresh_scan_body():
    apply, (_, params, state) = _Unhashable(), _core()
    with pytest.raises(TypeError):
        hash(apply)
    assert_scan_matches_loop(apply, params, state, XS, training=True)


def _traced_differently(params, state, x, *, training):
    y, new = BN.apply(params, state, x, training=training)
    if isinstance(x, jax.core.Tracer):
        return y.astype(jnp.float16), new._replace(count=jnp.stack([new.count, new.count]))
    return y, new


@pytest.mark.slow
def test_a_leaf_of_another_dtype_or_shape_fails_and_names_it():
    _, params, state = _core()
    with pytest.raises(AssertionError) as e:
        assert_jit_matches_eager(_traced_differently, params, state, XS[0], training=True)
    assert str(e.value).endswith("jitted y vs eager y: dtypes differ, float16 vs float32")
    with pytest.raises(AssertionError) as e:  # values differ: where, but no batch of xs
        assert_jit_matches_eager(_branches_on_tracer, params, state, XS[0], training=True)
    assert "at index (" in str(e.value) and "of xs" not in str(e.value)

    def count_only(params, state, x, *, training):
        y, new = BN.apply(params, state, x, training=training)
        return y, _traced_differently(params, state, x, training=training)[1]

    with pytest.raises(AssertionError, match=r"new_state\.count: shapes differ, \(2,\) vs \(\)$"):
        assert_jit_matches_eager(count_only, params, state, XS[0], training=True)


def test_tolerance_is_relative_to_the_expected_value_and_inclusive():
    """|got - want| <= atol + rtol * |want|, with equality passing (numpy's rule)."""
    _, params, state = _core()

    def scaled(params, state, x, *, training):
        y, new = BN.apply(params, state, x, training=training)
        y = jnp.full_like(y, 1024.0)  # exact in float32, as is the offset below
        return (y + 0.5 if isinstance(x, jax.core.Tracer) else y), new

    # 0.5 <= 0 + 2**-10 * 1024 = 1 (a relative tolerance); 0.5 <= 0.5 (the limit itself)
    assert_jit_matches_eager(scaled, params, state, XS[0], training=True, rtol=2.0**-10, atol=0.0)
    assert_jit_matches_eager(scaled, params, state, XS[0], training=True, rtol=0.0, atol=0.5)
    with pytest.raises(AssertionError, match="by more than atol=0.25"):
        assert_jit_matches_eager(scaled, params, state, XS[0], training=True, rtol=0.0, atol=0.25)


@pytest.mark.parametrize(
    "xs, match",
    [
        (jnp.float32(1.0), r"xs has shape \(\); expected a leading axis"),
        ({"a": XS, "b": jnp.zeros(())}, r"xs\['b'\] has shape \(\)"),
        ({"a": XS, "b": XS[:2]}, r"leading axes of different sizes \{\"\['a'\]\": 3"),
        (XS[:0], r"leading axis of size 0 \(shape \(0, 8, 4\)\)"),
        ({}, r"xs has no array leaves"),
    ],
    ids=["scalar", "scalar_leaf", "ragged", "empty", "no_leaves"],
)
def test_xs_must_stack_batches_on_a_leading_axis(xs, match):
    _, params, state = _core()
    for check in (assert_vmap_matches_loop, assert_scan_matches_loop):
        with pytest.raises(ValueError, match=match):
            check(BN.apply, params, state, xs, training=True)


def test_training_and_tolerances_are_checked():
    _, params, state = _core()
    with pytest.raises(TypeError, match=r"training must be a Python bool; got 1 \(int\)"):
        assert_jit_matches_eager(BN.apply, params, state, XS[0], training=1)
    with pytest.raises(ValueError, match=r"rtol=-1.0 is out of range; expected a finite"):
        assert_vmap_matches_loop(BN.apply, params, state, XS, training=True, rtol=-1.0)
    with pytest.raises(TypeError, match=r"atol must be a real number; got '0' \(str\)"):
        assert_scan_matches_loop(BN.apply, params, state, XS, training=True, atol="0")
