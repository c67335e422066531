"""JAX transformations compose around every BatchNorm in any order.

Each case composes transformations around one training-mode loss (the core, the core
under a named ``vmap``, and the linen, NNX and Equinox wrappers) and compares it with the
same composition around a textbook batch norm written in plain ``jax.numpy``: the values
must agree to float32 rounding, so a transformation that is refused, or that changes the
numbers, fails. No custom batching or custom JVP rule sits in bnjax's training pass, so
``jax.grad(jax.jit(jax.vmap(f, axis_name=...)))`` works as it does for any JAX function.
"""

from __future__ import annotations

import inspect
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from test_lowering import conditionals

import bnjax
import bnjax.equinox
import bnjax.linen
import bnjax.nnx

N, C, MEMBERS = 6, 3, 2
X = jax.random.normal(jax.random.key(0), (N, C)) * jnp.array([1.0, 3.0, 0.5]) + 2.0
W = jax.random.normal(jax.random.key(1), (N, C))


def _textbook(x):
    """Training-mode batch norm of ``x`` (N, C), scale 1 and bias 0, in plain jnp."""
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)
    return (x - mean) * lax.rsqrt(var + 1e-5)


def _core(x):
    bn = bnjax.BatchNorm()
    params, state = bn.init(x)
    return bn.apply(params, state, x, training=True)[0]


def _core_named(x):
    """The core over one example at a time, the batch a named ``vmap`` axis."""
    bn = bnjax.BatchNorm(axis_name="batch")
    params, state = bn.init(x[0])
    row = lambda r: bn.apply(params, state, r, training=True)[0]  # noqa: E731
    return jax.vmap(row, axis_name="batch")(x)


def _linen(x):
    bn = bnjax.linen.BatchNorm(use_running_average=False)
    variables = {"params": {"scale": jnp.ones(C), "bias": jnp.zeros(C)}}
    variables["batch_stats"] = {"mean": jnp.zeros(C), "var": jnp.ones(C)}
    return bn.apply(variables, x, mutable=["batch_stats"])[0]


def _nnx(x):
    return bnjax.nnx.BatchNorm(C, rngs=nnx.Rngs(0))(x)


_EQX, _EQX_STATE = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(C, "batch", mode="batch")


def _equinox(x):
    """Equinox's usual pattern: the layer vmapped over the batch with its axis name."""
    layer = jax.vmap(_EQX, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return layer(x, _EQX_STATE)[0]


MODELS = {
    "core": _core,
    "core_named_vmap": _core_named,
    "linen": _linen,
    "nnx": _nnx,
    "equinox": _equinox,
}


def _loss(normalize):
    return lambda x: jnp.sum(jnp.tanh(normalize(x)) * W)


# Each transformation maps a function of ``x`` to a scalar to another such function; the
# ensemble ones (vmap, scan) give it a leading axis of MEMBERS inputs.
TRANSFORMS = {
    "jit": jax.jit,
    "grad": lambda f: lambda x: jnp.sum(jnp.sin(jax.grad(f)(x))),
    "hessian": lambda f: lambda x: jnp.sum(jnp.cos(jax.hessian(f)(x))),
    "checkpoint": jax.checkpoint,
    "vmap": lambda f: lambda xs: jnp.sum(jax.vmap(f)(xs)),
    "scan": lambda f: lambda xs: lax.scan(lambda c, x: (c + f(x), None), 0.0, xs)[0],
}
ENSEMBLE = ("vmap", "scan")


def _compose(names, f):
    """``names[0](names[1](...(f)))`` and the input it takes."""
    x = X
    for name in reversed(names):
        f = TRANSFORMS[name](f)
        if name in ENSEMBLE:
            x = jnp.stack([x * (1.0 + 0.5 * m) + m for m in range(MEMBERS)])
    return f, x


def _check(names, model):
    got_f, x = _compose(names, _loss(MODELS[model]))
    want_f, _ = _compose(names, _loss(_textbook))
    np.testing.assert_allclose(got_f(x), want_f(x), rtol=2e-4, atol=2e-4)


PAIRS = list(itertools.permutations(TRANSFORMS, 2))


# Hessians compile slowly (10-20 s each here): one stays in the fast tier.
CORE_PAIRS = [
    pytest.param(n, marks=pytest.mark.slow) if "hessian" in n and n != ("jit", "hessian") else n
    for n in PAIRS
]


@pytest.mark.parametrize("names", CORE_PAIRS, ids="-".join)
def test_every_ordered_pair_of_transformations_composes_around_the_core(names):
    _check(names, "core")


# Differentiated through a scan, the platform index of the "auto" statistics is hoisted
# out of the loop body as a loop-invariant operand: the constant reaches the conditional
# only through the while loop, which StableHLO's canonicalizer does not see through
# (XLA's while-loop constant sinking does, before its conditional simplifier).
_HOISTED = pytest.mark.xfail(
    strict=True, reason="a constant index hoisted out of a scan body is not folded here"
)
TRIPLES = [("grad", "jit", "vmap"), ("jit", "grad", "checkpoint"), ("grad", "scan", "jit")]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("names", TRIPLES, ids="-".join)
def test_grad_of_jit_of_vmap_and_other_triples_compose_around_every_layer(names, model):
    """``grad(jit(vmap(...)))`` around a layer whose batch is itself a named ``vmap``
    (the core with ``axis_name``, Equinox's pattern) is the case a custom batching rule
    used to break with ``NameError: unbound axis name``."""
    _check(names, model)


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in MODELS if m != "core"])
@pytest.mark.parametrize("names", PAIRS, ids="-".join)
def test_every_ordered_pair_composes_around_every_wrapper(names, model):
    _check(names, model)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("names", TRIPLES, ids="-".join)
def test_compositions_lowered_for_gpu_hold_no_conditional(names, model, request):
    """The same compositions exported for CUDA: no data-dependent conditional is left
    (``test_lowering.conditionals``), whatever order the transformations come in, but for
    a scan differentiated from outside (below)."""
    if names[:2] == ("grad", "scan") and model in ("core", "linen", "nnx"):
        request.applymarker(_HOISTED)
    fn, x = _compose(names, _loss(MODELS[model]))
    assert conditionals(fn, x, platform="cuda") == 0


LOWERED_PAIRS = [
    pytest.param(names, marks=_HOISTED) if names in (("grad", "scan"), ("hessian", "scan"))
    else names
    for names in PAIRS
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("names", LOWERED_PAIRS, ids="-".join)
def test_every_ordered_pair_lowered_for_gpu_and_tpu_holds_no_conditional(names):
    fn, x = _compose(names, _loss(MODELS["core"]))
    for platform in ("cuda", "tpu"):
        assert conditionals(fn, x, platform=platform) == 0


def test_a_training_call_reaches_its_first_reduction_of_x_in_five_frames(monkeypatch):
    """From ``apply`` to the first ``reduce_sum`` over an ``x``-sized array: at most five
    bnjax frames (``apply`` included), eagerly and under ``jax.jit`` (the caches cleared, so
    that the eager reductions are traced again)."""
    bn = bnjax.BatchNorm()
    params, state = bn.init(X)
    original = lax.reduce_sum_p.bind
    stacks = []

    def recording(*args, **kwargs):
        if not stacks and getattr(args[0], "shape", None) == X.shape:
            stacks.append([f.function for f in inspect.stack() if "/bnjax/" in f.filename])
        return original(*args, **kwargs)

    monkeypatch.setattr(lax.reduce_sum_p, "bind", recording)
    for run in (bn.apply, jax.jit(bn.apply, static_argnames="training")):
        stacks.clear()
        jax.clear_caches()
        run(params, state, X, training=True)
        (frames,) = stacks
        assert frames[-1] == "apply" and len(frames) <= 5, frames
