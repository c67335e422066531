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
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src import validation as v

__all__ = [
    "assert_eval_is_pure",
    "assert_jit_matches_eager",
    "assert_scan_matches_loop",
    "assert_vmap_matches_loop",
]


def assert_eval_is_pure(model_apply: Callable, params, state, x) -> None:
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
    _check_args(model_apply)
    y, new_state = _call(model_apply, params, state, x, training=False)
    again, _ = _call(model_apply, params, state, x, training=False)
    prop = "assert_eval_is_pure (training=False must return the state unchanged)"
    _assert_trees_match(new_state, state, prop, "new_state", "state")
    prop = "assert_eval_is_pure (training=False must give the same output every call)"
    _assert_trees_match(again, y, prop, "y of the second call", "y of the first")


def assert_jit_matches_eager(
    model_apply: Callable, params, state, x, *, training: bool, rtol=1e-5, atol=1e-6
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
    tol = _check_args(model_apply, training, rtol, atol)
    eager = _call(model_apply, params, state, x, training=training)
    # jit of model_apply itself (not of a closure): jax reuses the compiled program on
    # the next call with the same model and shapes.
    jitted = jax.jit(model_apply, static_argnames="training")
    jitted = _call(jitted, params, state, x, training=training)
    prop = f"assert_jit_matches_eager (training={training})"
    _assert_outputs_match(jitted, eager, prop, "jitted", "eager", tol=tol)


def assert_vmap_matches_loop(
    model_apply: Callable, params, state, xs, *, training: bool, rtol=1e-5, atol=1e-6
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
    tol = _check_args(model_apply, training, rtol, atol)
    run = functools.partial(_call, model_apply, training=training)
    batches = _batches(xs)
    looped = _stack([run(params, state, x) for x in batches])
    mapped = jax.vmap(run, in_axes=(None, None, 0))(params, state, xs)
    prop = f"assert_vmap_matches_loop (training={training}, {len(batches)} batches)"
    _assert_outputs_match(mapped, looped, prop, "vmapped", tol=tol, stacked=True)


def assert_scan_matches_loop(
    model_apply: Callable, params, state, xs, *, training: bool, rtol=1e-5, atol=1e-6
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
    tol = _check_args(model_apply, training, rtol, atol)
    batches = _batches(xs)
    prop = f"assert_scan_matches_loop (training={training}, {len(batches)} batches)"
    looped, carry = [], state
    for i, x in enumerate(batches):
        y, carry = _call(model_apply, params, carry, x, training=training)
        _assert_same_carry(carry, state, prop=prop, step=i)
        looped.append((y, carry))
    try:  # the same body for the same model: lax.scan reuses its trace
        step = _scan_step(model_apply, training)
    except TypeError:  # an unhashable callable: a fresh body each time
        step = _scan_step.__wrapped__(model_apply, training)
    _, scanned = jax.lax.scan(step, (params, state), xs)
    _assert_outputs_match(scanned, _stack(looped), prop, "scanned", tol=tol, stacked=True)


# -- calling the model ------------------------------------------------------------------


def _call(model_apply, params, state, x, *, training):
    out = model_apply(params, state, x, training=training)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        size = f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""
        raise TypeError(
            f"model_apply must return a pair (y, new_state); got a {type(out).__name__}{size}"
        )
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _scan_step(model_apply, training: bool):
    """The scan body for ``model_apply``: the same function object for the same model, so
    that ``lax.scan`` reuses its trace on the next call with the same shapes."""

    def step(carry, x):
        params, state = carry
        y, new = _call(model_apply, params, state, x, training=training)
        return (params, new), (y, new)

    return step


def _stack(results):
    """Per-call pytrees stacked leaf by leaf on a new leading axis (one per call)."""
    mismatch = "the looped calls returned different tree structures: call 0 gave {want}, "
    for i, result in enumerate(results):
        _leaf_pairs(result, results[0], mismatch + "call {i} gave {got}", i=i)
    return jax.tree.map(lambda *leaves: np.stack(leaves), *results)


# -- comparing --------------------------------------------------------------------------


def _leaf_pairs(got, want, mismatch: str, **fields) -> list:
    """``(keystr path, got leaf, want leaf)`` for each leaf of two pytrees of one structure.

    Raises:
      AssertionError: the structures differ; ``mismatch`` formatted with ``got`` and
        ``want`` (the two structures) and ``fields``.
    """
    got_tree, want_tree = jax.tree.structure(got), jax.tree.structure(want)
    if got_tree != want_tree:
        raise AssertionError(mismatch.format(got=got_tree, want=want_tree, **fields))
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    leaves = zip(paths, jax.tree.leaves(got), strict=True)
    return [(jax.tree_util.keystr(path), g, w) for (path, w), g in leaves]


def _assert_same_carry(new_state, state, *, prop: str, step: int) -> None:
    """``new_state`` has the structure, shapes and dtypes of ``state`` (scan's carry)."""
    mismatch = (
        "{prop}: a scan carries the state, so new_state must keep its tree structure; "
        "batch {step} returned {got}, the state was {want}"
    )
    for key, new, old in _leaf_pairs(new_state, state, mismatch, prop=prop, step=step):
        old_type = (jnp.shape(old), jnp.result_type(old))
        new_type = (jnp.shape(new), jnp.result_type(new))
        if old_type != new_type:
            raise AssertionError(
                f"{prop}: a scan carries the state, so every leaf must keep its shape and "
                f"dtype; after batch {step} new_state{key} has shape {new_type[0]} and dtype "
                f"{new_type[1]}, state{key} had shape {old_type[0]} and dtype {old_type[1]}"
            )


def _assert_outputs_match(got, want, prop, got_how, want_how="looped", *, tol, stacked=False):
    """The ``(y, new_state)`` of two ways of running the model, named ``got_how`` and
    ``want_how``; ``stacked``: over the batches of ``xs``."""
    for part, name in enumerate(("y", "new_state")):
        names = (f"{got_how} {name}", f"{want_how} {name}")
        _assert_trees_match(got[part], want[part], prop, *names, tol=tol, stacked=stacked)


def _assert_trees_match(got, want, prop, got_name, want_name, *, tol=None, stacked=False):
    """Leaf-by-leaf comparison of two pytrees, exact when ``tol`` is None.

    Args:
      got: the pytree under test.
      want: the pytree it must equal.
      prop: the property, first in the message.
      got_name: how to call ``got`` in the message.
      want_name: how to call ``want`` in the message.
      tol: ``(rtol, atol)`` for floating leaves, or None for exact equality.
      stacked: the leaves have a leading axis of batches, named in the message.
    """
    mismatch = f"{prop}: {got_name} has tree structure {{got}}, {want_name} has {{want}}"
    for key, g, w in _leaf_pairs(got, want, mismatch):
        problem = _leaf_difference(np.asarray(g), np.asarray(w), tol, stacked, want_name + key)
        if problem:
            raise AssertionError(f"{prop}: {got_name}{key} vs {want_name}{key}: {problem}")


def _leaf_difference(got: np.ndarray, want: np.ndarray, tol, stacked: bool, want_name: str) -> str:
    """What differs between two leaves, or ``""``."""
    if got.shape != want.shape:
        return f"shapes differ, {got.shape} vs {want.shape}"
    if got.dtype != want.dtype:
        return f"dtypes differ, {got.dtype} vs {want.dtype}"
    wide = np.complex128 if jnp.issubdtype(got.dtype, jnp.complexfloating) else np.float64
    g, w = got.astype(wide), want.astype(wide)
    bad = (got != want) & ~(np.isnan(g) & np.isnan(w))  # inf == inf, NaN where NaN
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, ranked as infinite
        distance = np.abs(g - w)
    distance = np.where(np.isnan(distance), np.inf, distance)
    if tol is not None and jnp.issubdtype(got.dtype, jnp.inexact):  # integers: exactly
        bad &= ~(distance <= tol[1] + tol[0] * np.abs(w))
    if not bad.any():
        return ""
    at = np.unravel_index(np.argmax(np.where(bad, distance, -1.0)), got.shape)
    where = f" (batch {at[0]} of xs)" if stacked and at else ""
    limit = " (compared exactly)"
    if tol is not None:
        limit = f" by more than atol={tol[1]} + rtol={tol[0]} * |{want_name}|"
    return (
        f"{int(bad.sum())} of {bad.size} elements differ{limit}; the largest difference is "
        f"{distance[at]:.6g} at index {tuple(int(i) for i in at)}{where}: "
        f"{got[at]!s} vs {want[at]!s}"
    )


# -- arguments --------------------------------------------------------------------------


def _check_args(model_apply, training=False, rtol=0.0, atol=0.0) -> tuple[float, float]:
    """Checks the arguments the helpers share; returns ``(rtol, atol)`` as floats."""
    if not callable(model_apply):
        raise TypeError(
            "model_apply must be callable as model_apply(params, state, x, *, training) -> "
            f"(y, new_state); got {model_apply!r} ({type(model_apply).__name__})"
        )
    v.check_bool("training", training)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r} is out of range; expected a finite value >= 0")
    return float(rtol), float(atol)


def _batches(xs) -> list:
    """``[xs[0], xs[1], ...]``, each leaf indexed on its leading axis, of one size n >= 1."""
    leaves = jax.tree_util.tree_flatten_with_path(xs)[0]
    if not leaves:
        raise ValueError(
            f"xs has no array leaves; expected batches stacked on a leading axis, e.g. an "
            f"array of shape (n, *batch_shape); got {xs!r}"
        )
    sizes = {}
    for path, leaf in leaves:
        if not jnp.shape(leaf):
            raise ValueError(
                f"xs{jax.tree_util.keystr(path)} has shape (); expected a leading axis of "
                "batches, shape (n, *batch_shape)"
            )
        sizes[jax.tree_util.keystr(path)] = jnp.shape(leaf)[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"the leaves of xs have leading axes of different sizes {sizes}; expected one "
            "number of batches n for every leaf"
        )
    shape = jnp.shape(leaves[0][1])
    if shape[0] == 0:
        raise ValueError(
            f"xs has a leading axis of size 0 (shape {shape}); expected at least one batch"
        )
    return [jax.tree.map(operator.itemgetter(i), xs) for i in range(shape[0])]
