"""Checks that a model using batch norm threads its state the way JAX's transforms expect.

A model here is any ``model_apply(params, state, x, *, training) -> (y, new_state)``,
``state`` any pytree (a ``bnjax.BatchNormState``, or a dict of them for a network).
Each helper runs the model two ways that must agree and raises ``AssertionError`` naming
the property, the leaf (its ``jax.tree_util.keystr`` path) and the largest difference:

* :func:`assert_eval_is_pure`: inference returns the state unchanged and is repeatable;
* :func:`assert_jit_matches_eager`: ``jax.jit`` changes nothing;
* :func:`assert_vmap_matches_loop`: ``jax.vmap`` over a stack of batches equals a loop;
* :func:`assert_scan_matches_loop`: ``jax.lax.scan`` threading the state equals a loop.

Example:
  >>> import jax, bnjax, bnjax.testing
  >>> bn = bnjax.BatchNorm()
  >>> params, state = bn.init((8, 4))
  >>> xs = jax.random.normal(jax.random.key(0), (3, 8, 4))
  >>> bnjax.testing.assert_eval_is_pure(bn.apply, params, state, xs[0])
  >>> bnjax.testing.assert_scan_matches_loop(bn.apply, params, state, xs, training=True)
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "assert_eval_is_pure",
    "assert_jit_matches_eager",
    "assert_scan_matches_loop",
    "assert_vmap_matches_loop",
]

ModelApply = Callable[..., tuple[Any, Any]]


def assert_eval_is_pure(model_apply: ModelApply, params, state, x) -> None:
    """Inference leaves the state as it was and gives the same output twice.

    Calls ``model_apply(params, state, x, training=False)`` twice: the returned state
    must equal ``state`` leaf by leaf, exactly (same structure, shapes, dtypes and
    values; NaN equals NaN), and the two outputs must be identical.

    Args:
      model_apply: ``model_apply(params, state, x, *, training) -> (y, new_state)``.
      params: the model's parameters (any pytree).
      state: the model's state (any pytree).
      x: a batch (any pytree the model takes).

    Raises:
      AssertionError: the state changed, or the two outputs differ.
      TypeError: ``model_apply`` is not callable or does not return a pair.
    """
    _check_callable(model_apply)
    y, new_state = _call(model_apply, (params, state, x), training=False)
    again, _ = _call(model_apply, (params, state, x), training=False)
    prop = "assert_eval_is_pure (training=False must return the state unchanged)"
    _assert_trees_match(new_state, state, prop=prop, names=("new_state", "state"))
    prop = "assert_eval_is_pure (training=False must give the same output every call)"
    _assert_trees_match(again, y, prop=prop, names=("y of the second call", "y of the first"))


def assert_jit_matches_eager(
    model_apply: ModelApply,
    params,
    state,
    x,
    *,
    training: bool,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """``jax.jit(model_apply)`` gives the output and new state of the eager call.

    Args:
      model_apply: ``model_apply(params, state, x, *, training) -> (y, new_state)``.
      params: the model's parameters (any pytree).
      state: the model's state (any pytree).
      x: a batch (any pytree the model takes).
      training: passed to ``model_apply`` (static under jit).
      rtol: relative tolerance of floating leaves (integer leaves must be equal).
      atol: absolute tolerance of floating leaves.

    Raises:
      AssertionError: a leaf of ``y`` or ``new_state`` differs in structure, shape,
        dtype, or value beyond ``atol + rtol * |eager|``.
      TypeError: ``model_apply`` is not callable or does not return a pair, ``training``
        is not a bool, or a tolerance is not a real number.
      ValueError: a tolerance is negative or not finite.
    """
    _check_callable(model_apply)
    _check_bool("training", training)
    tol = _tolerance(rtol, atol)
    eager = _call(model_apply, (params, state, x), training=training)
    # jit of model_apply itself (not of a closure): jax reuses the compiled program on
    # the next call with the same model and shapes.
    jitted = _pair(
        jax.jit(model_apply, static_argnames="training")(params, state, x, training=training)
    )
    prop = f"assert_jit_matches_eager (training={training})"
    _assert_trees_match(jitted[0], eager[0], prop=prop, names=("jitted y", "eager y"), tol=tol)
    _assert_trees_match(
        jitted[1], eager[1], prop=prop, names=("jitted new_state", "eager new_state"), tol=tol
    )


def assert_vmap_matches_loop(
    model_apply: ModelApply,
    params,
    state,
    xs,
    *,
    training: bool,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """``jax.vmap`` over a stack of batches gives what a Python loop over them gives.

    Every batch ``xs[i]`` is applied to the same ``params`` and ``state``:
    ``jax.vmap(model_apply, in_axes=(None, None, 0))`` must return, stacked on a leading
    axis, the outputs and new states of ``model_apply(params, state, xs[i])`` for each
    ``i``. With ``axis_name=None`` bnjax normalizes each mapped batch on its own.

    Args:
      model_apply: ``model_apply(params, state, x, *, training) -> (y, new_state)``.
      params: the model's parameters (any pytree).
      state: the model's state (any pytree).
      xs: batches stacked on a leading axis: every leaf of shape ``(n, ...)``, ``n >= 1``.
      training: passed to ``model_apply``.
      rtol: relative tolerance of floating leaves (integer leaves must be equal).
      atol: absolute tolerance of floating leaves.

    Raises:
      AssertionError: a leaf of the outputs or new states differs in structure, shape,
        dtype, or value beyond ``atol + rtol * |looped|``.
      TypeError: ``model_apply`` is not callable or does not return a pair, ``training``
        is not a bool, or a tolerance is not a real number.
      ValueError: ``xs`` has no leaves, a leaf without a leading axis, or leading axes of
        different or zero sizes; or a tolerance is negative or not finite.
    """
    _check_callable(model_apply)
    _check_bool("training", training)
    tol = _tolerance(rtol, atol)
    n = _leading_size(xs)

    def run(params, state, x):
        return _call(model_apply, (params, state, x), training=training)

    looped = _stack([run(params, state, _batch(xs, i)) for i in range(n)], "looped calls")
    mapped = jax.vmap(run, in_axes=(None, None, 0))(params, state, xs)
    prop = f"assert_vmap_matches_loop (training={training}, {n} batches)"
    _assert_stacks_match(mapped, looped, prop=prop, how="vmapped", tol=tol)


def assert_scan_matches_loop(
    model_apply: ModelApply,
    params,
    state,
    xs,
    *,
    training: bool,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """``jax.lax.scan`` threading the state through batches gives what a loop gives.

    The loop calls ``y_i, state = model_apply(params, state, xs[i])`` for each ``i``;
    the scan does the same inside one ``lax.scan`` with the state as its carry. The
    outputs and the state after every batch must agree. A scan also needs each new state
    to have the structure, shapes and dtypes of ``state``: a model that changes them
    fails here, with the step and the leaf.

    Args:
      model_apply: ``model_apply(params, state, x, *, training) -> (y, new_state)``.
      params: the model's parameters (any pytree).
      state: the initial state (any pytree).
      xs: batches stacked on a leading axis: every leaf of shape ``(n, ...)``, ``n >= 1``.
      training: passed to ``model_apply``.
      rtol: relative tolerance of floating leaves (integer leaves must be equal).
      atol: absolute tolerance of floating leaves.

    Raises:
      AssertionError: the loop's state changes structure, shape or dtype, or a leaf of
        the outputs or states differs beyond ``atol + rtol * |looped|``.
      TypeError: ``model_apply`` is not callable or does not return a pair, ``training``
        is not a bool, or a tolerance is not a real number.
      ValueError: ``xs`` has no leaves, a leaf without a leading axis, or leading axes of
        different or zero sizes; or a tolerance is negative or not finite.
    """
    _check_callable(model_apply)
    _check_bool("training", training)
    tol = _tolerance(rtol, atol)
    n = _leading_size(xs)
    prop = f"assert_scan_matches_loop (training={training}, {n} batches)"
    ys, states, carry = [], [], state
    for i in range(n):
        y, carry = _call(model_apply, (params, carry, _batch(xs, i)), training=training)
        _assert_same_carry(carry, state, prop=prop, step=i)
        ys.append(y)
        states.append(carry)
    looped = _stack([(y, s) for y, s in zip(ys, states, strict=True)], "looped calls")

    _, scanned = jax.lax.scan(_scan_step(model_apply, training), (params, state), xs)
    _assert_stacks_match(scanned, looped, prop=prop, how="scanned", tol=tol)


def _assert_stacks_match(got, looped, *, prop, how, tol) -> None:
    """``(ys, states)`` stacked over batches by ``how`` against the loop's, leaf by leaf."""
    for part, name in enumerate(("y", "new_state")):
        names = (f"{how} {name}", f"looped {name}")
        _assert_trees_match(got[part], looped[part], prop=prop, names=names, tol=tol, stacked=True)


# -- calling the model ------------------------------------------------------------------


def _call(model_apply, args, *, training):
    return _pair(model_apply(*args, training=training))


def _pair(out):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        size = f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""
        raise TypeError(
            f"model_apply must return a pair (y, new_state); got a {type(out).__name__}{size}"
        )
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _cached_scan_step(model_apply, training: bool):
    return _make_scan_step(model_apply, training)


def _scan_step(model_apply, training: bool):
    """The scan body for ``model_apply``, the same function object for the same model, so
    that ``lax.scan`` reuses its trace on the next call with the same shapes."""
    try:
        return _cached_scan_step(model_apply, training)
    except TypeError:  # an unhashable callable: a fresh body each time
        return _make_scan_step(model_apply, training)


def _make_scan_step(model_apply, training: bool):
    def step(carry, x):
        params, state = carry
        y, new = _call(model_apply, (params, state, x), training=training)
        return (params, new), (y, new)

    return step


def _batch(xs, i: int):
    return jax.tree.map(lambda leaf: leaf[i], xs)


def _stack(results, what: str):
    """Per-call pytrees stacked leaf by leaf on a new leading axis (one per call)."""
    first = jax.tree.structure(results[0])
    for i, result in enumerate(results[1:], 1):
        if jax.tree.structure(result) != first:
            raise AssertionError(
                f"the {what} returned different tree structures: call 0 gave {first}, "
                f"call {i} gave {jax.tree.structure(result)}"
            )
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *results)


# -- comparing --------------------------------------------------------------------------


def _assert_same_carry(new_state, state, *, prop: str, step: int) -> None:
    """``new_state`` has the structure, shapes and dtypes of ``state`` (scan's carry)."""
    want, got = jax.tree.structure(state), jax.tree.structure(new_state)
    if got != want:
        raise AssertionError(
            f"{prop}: a scan carries the state, so new_state must keep its tree structure; "
            f"batch {step} returned {got}, the state was {want}"
        )
    paths = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, old), new in zip(paths, jax.tree.leaves(new_state), strict=True):
        old_type = (jnp.shape(old), jnp.result_type(old))
        new_type = (jnp.shape(new), jnp.result_type(new))
        if old_type != new_type:
            key = jax.tree_util.keystr(path)
            raise AssertionError(
                f"{prop}: a scan carries the state, so every leaf must keep its shape and "
                f"dtype; after batch {step} new_state{key} has shape {new_type[0]} and dtype "
                f"{new_type[1]}, state{key} had shape {old_type[0]} and dtype {old_type[1]}"
            )


def _assert_trees_match(got, want, *, prop, names, tol=None, stacked=False) -> None:
    """Leaf-by-leaf comparison of two pytrees, exact when ``tol`` is None.

    Args:
      got: the pytree under test.
      want: the pytree it must equal.
      prop: the property, first in the message.
      names: how to call ``got`` and ``want`` in the message.
      tol: ``(rtol, atol)`` for floating leaves, or None for exact equality.
      stacked: the leaves have a leading axis of batches, named in the message.
    """
    got_name, want_name = names
    got_tree, want_tree = jax.tree.structure(got), jax.tree.structure(want)
    if got_tree != want_tree:
        raise AssertionError(
            f"{prop}: {got_name} has tree structure {got_tree}, {want_name} has {want_tree}"
        )
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(paths, jax.tree.leaves(got), strict=True):
        key = jax.tree_util.keystr(path)
        problem = _leaf_difference(
            np.asarray(g), np.asarray(w), tol=tol, stacked=stacked, want_name=want_name + key
        )
        if problem:
            raise AssertionError(f"{prop}: {got_name}{key} vs {want_name}{key}: {problem}")


def _leaf_difference(
    got: np.ndarray, want: np.ndarray, *, tol, stacked: bool, want_name: str
) -> str:
    """What differs between two leaves, or ``""``."""
    if got.shape != want.shape:
        return f"shapes differ, {got.shape} vs {want.shape}"
    if got.dtype != want.dtype:
        return f"dtypes differ, {got.dtype} vs {want.dtype}"
    if not jnp.issubdtype(got.dtype, jnp.inexact):
        bad = got != want
        distance = np.where(bad, 1.0, 0.0)
    else:
        wide = np.complex128 if jnp.issubdtype(got.dtype, jnp.complexfloating) else np.float64
        g, w = got.astype(wide), want.astype(wide)
        same = (g == w) | (np.isnan(g) & np.isnan(w))  # inf == inf, NaN where NaN
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, ranked as infinite below
            distance = np.abs(g - w)
        bad = ~same
        if tol is not None:
            rtol, atol = tol
            bad &= ~(distance <= atol + rtol * np.abs(w))
        distance = np.where(np.isnan(distance), np.inf, distance)
    if not bad.any():
        return ""
    at = np.unravel_index(np.argmax(np.where(bad, distance, -1.0)), got.shape)
    where = f" (batch {at[0]} of xs)" if stacked and at else ""
    if tol is None:
        limit = " (compared exactly)"
    else:
        limit = f" by more than atol={tol[1]} + rtol={tol[0]} * |{want_name}|"
    return (
        f"{int(bad.sum())} of {bad.size} elements differ{limit}; the largest difference is "
        f"{distance[at]:.6g} at index {tuple(int(i) for i in at)}{where}: "
        f"{got[at]!s} vs {want[at]!s}"
    )


# -- arguments --------------------------------------------------------------------------


def _check_callable(model_apply) -> None:
    if not callable(model_apply):
        raise TypeError(
            "model_apply must be callable as model_apply(params, state, x, *, training) -> "
            f"(y, new_state); got {model_apply!r} ({type(model_apply).__name__})"
        )


def _check_bool(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool; got {value!r} ({type(value).__name__})")


def _tolerance(rtol, atol) -> tuple[float, float]:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r} is out of range; expected a finite value >= 0")
    return float(rtol), float(atol)


def _leading_size(xs) -> int:
    """The common size of the leading axis of every leaf of ``xs``, at least 1."""
    leaves = jax.tree_util.tree_flatten_with_path(xs)[0]
    if not leaves:
        raise ValueError(
            f"xs has no array leaves; expected batches stacked on a leading axis, e.g. an "
            f"array of shape (n, *batch_shape); got {xs!r}"
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"xs{jax.tree_util.keystr(path)} has shape (); expected a leading axis of "
                "batches, shape (n, *batch_shape)"
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"the leaves of xs have leading axes of different sizes {sizes}; expected one "
            "number of batches n for every leaf"
        )
    (n,) = set(sizes.values())
    if n == 0:
        raise ValueError(
            f"xs has a leading axis of size 0 (shape {jnp.shape(leaves[0][1])}); expected at "
            "least one batch"
        )
    return int(n)
