"""The batch norms under comparison, each behind one functional interface.

Every implementation is an :class:`Impl`: ``init(shape, dtype, momentum)`` returns
``(params, state, static)``: two pytrees of arrays (``params`` holds only the learned scale
and bias, so gradients with respect to it are the scale and bias gradients) and the
non-array configuration, closed over when jitting. ``forward(static, params, state, x,
training)`` returns ``(y, new_state)`` with ``y`` in the dtype of ``x``, and
``running_var(static, state)`` returns the running variance as a vector of features.
Features are on the last axis. A library that does not import is left out (see
:func:`available`). bnjax appears three times: ``"bnjax"`` (``statistics="auto"``, what
users get on this backend) and each statistics path forced; ``"bnjax.equinox"`` is its
Equinox layer, built and called as the ``"equinox"`` row's.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bnjax  # noqa: E402

EPSILON = 1e-5


class Impl(NamedTuple):
    """One batch norm: its name, the package whose version is reported, and three functions."""

    name: str
    package: str
    init: Callable[..., tuple[Any, Any]]
    forward: Callable[..., tuple[jax.Array, Any]]
    running_var: Callable[[Any, Any], jax.Array]


def _bnjax(statistics="auto"):
    """bnjax with ``statistics``; the name says which path unless it is the default."""

    def init(shape, dtype, momentum):
        bn = bnjax.BatchNorm(momentum=momentum, epsilon=EPSILON, statistics=statistics)
        params, state = bn.init(shape)
        return params, state, bn

    def forward(bn, params, state, x, training):
        return bn.apply(params, state, x, training=training)

    name = "bnjax" if statistics == "auto" else f"bnjax {statistics}"
    return Impl(name, "bnjax", init, forward, lambda bn, s: s.var)


def _bnjax_checked():
    return _bnjax("checked")


def _bnjax_branchless():
    return _bnjax("branchless")


def _linen():
    import flax.linen as nn

    def module(dtype, momentum):
        return nn.BatchNorm(momentum=momentum, epsilon=EPSILON, dtype=dtype)

    def init(shape, dtype, momentum):
        v = module(dtype, momentum).init(
            jax.random.key(0), jnp.zeros(shape, dtype), use_running_average=True
        )
        return v["params"], v["batch_stats"], module(dtype, momentum)

    def forward(bn, params, stats, x, training):
        y, new = bn.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=not training,
            mutable=["batch_stats"],
        )
        return y.astype(x.dtype), new["batch_stats"]

    return Impl("flax.linen", "flax", init, forward, lambda bn, s: s["var"])


def _nnx():
    from flax import nnx

    def init(shape, dtype, momentum):
        bn = nnx.BatchNorm(
            shape[-1], momentum=momentum, epsilon=EPSILON, dtype=dtype, rngs=nnx.Rngs(0)
        )
        graph, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
        return params, stats, graph

    def forward(graph, params, stats, x, training):
        bn = nnx.merge(graph, params, stats, copy=True)
        y = bn(x, use_running_average=not training)
        _, _, new = nnx.split(bn, nnx.Param, nnx.BatchStat)
        return y.astype(x.dtype), new

    return Impl("flax.nnx", "flax", init, forward, lambda g, s: s["var"].get_value())


def _haiku():
    import haiku as hk

    def net(x, training, momentum):
        return hk.BatchNorm(True, True, momentum, eps=EPSILON)(x, training)

    def init(shape, dtype, momentum):
        f = hk.transform_with_state(lambda x, t: net(x, t, momentum))
        params, state = f.init(None, jnp.zeros(shape, dtype), True)
        return params, state, f

    def forward(f, params, state, x, training):
        y, new = f.apply(params, state, None, x, training)
        return y.astype(x.dtype), new

    def running_var(f, state):
        return state["batch_norm/~/var_ema"]["average"].reshape(-1)

    return Impl("haiku", "dm-haiku", init, forward, running_var)


def _equinox(mode="ema"):
    """Equinox's layer in ``mode`` ``"ema"`` (the ``"equinox"`` row) or ``"batch"`` (the
    mode Equinox recommends for new code: batch statistics in training, no first-call
    select; named ``"equinox batch"``)."""
    import equinox as eqx

    def init(shape, dtype, momentum):
        bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            shape[-1], "batch", eps=EPSILON, momentum=momentum, mode=mode, dtype=dtype
        )
        return (bn.weight, bn.bias), state, bn

    def forward(bn, params, state, x, training):
        bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
        # Equinox normalizes one example of shape (C, ...) under a named vmap; a
        # channels-last batch is a batch of (C,) vectors once its leading axes are merged.
        flat = x.reshape(-1, x.shape[-1])
        call = jax.vmap(
            lambda v, s: bn(v, s, inference=not training),
            axis_name="batch",
            in_axes=(0, None),
            out_axes=(0, None),
        )
        y, new = call(flat, state)
        return y.reshape(x.shape).astype(x.dtype), new

    def running_var(bn, state):
        if mode == "ema":
            return state.get(bn.ema_state_index)[1]
        # What Equinox's inference divides by: the zero-debiased hidden average.
        count = state.get(bn.batch_counter)
        debias = jnp.where(count == 0, 1.0, 1.0 - bn.momentum**count)
        return state.get(bn.batch_state_index)[1] / debias

    name = "equinox" if mode == "ema" else f"equinox {mode}"
    return Impl(name, "equinox", init, forward, running_var)


def _bnjax_equinox():
    """``bnjax.equinox.BatchNorm``, built and called exactly as the Equinox row's layer."""
    import equinox as eqx

    import bnjax.equinox

    def init(shape, dtype, momentum):
        bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(
            shape[-1], "batch", eps=EPSILON, momentum=momentum, mode="ema", dtype=dtype
        )
        return (bn.weight, bn.bias), state, bn

    def running_var(bn, state):
        return state.get(bn.state_index).var

    return Impl("bnjax.equinox", "bnjax", init, _equinox().forward, running_var)


def _keras():
    import keras

    def layer(shape, dtype, momentum):
        policy = "mixed_bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"
        bn = keras.layers.BatchNormalization(momentum=momentum, epsilon=EPSILON, dtype=policy)
        bn.build(shape)
        return bn

    def init(shape, dtype, momentum):
        bn = layer(shape, dtype, momentum)
        params = [v.value for v in bn.trainable_variables]
        stats = [v.value for v in bn.non_trainable_variables]
        return params, stats, bn

    def forward(bn, params, stats, x, training):
        y, new = bn.stateless_call(params, stats, x, training=training)
        return y.astype(x.dtype), new

    return Impl("keras", "keras", init, forward, lambda bn, s: s[1])


def roofline_init(shape, dtype):
    """Per-feature float32 ``(a, b)`` for the roofline op."""
    c = shape[-1]
    return jnp.linspace(0.5, 1.5, c, dtype=jnp.float32), jnp.linspace(-1, 1, c, dtype=jnp.float32)


def roofline(ab, x):
    """``x * a + b``: one multiply-add per element, the least an inference batch norm costs.

    Computed in float32 and cast back to the dtype of ``x``: for bfloat16 that is also the
    faster form on CPU (bfloat16 arithmetic converts each intermediate result).
    """
    a, b = ab
    return (x.astype(jnp.float32) * a + b).astype(x.dtype)


FACTORIES = (
    _bnjax,
    _bnjax_checked,
    _bnjax_branchless,
    _linen,
    _nnx,
    _haiku,
    _equinox,
    _bnjax_equinox,
    _keras,
)


def available(names=None) -> list[Impl]:
    """The implementations whose library imports, optionally only those in ``names``."""
    impls = []
    for factory in FACTORIES:
        try:
            impl = factory()
        except ImportError:
            continue
        if names is None or impl.name in names:
            impls.append(impl)
    return impls


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"
