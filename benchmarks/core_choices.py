"""Measures the two design choices of the core: the variance algorithm and the backward pass.

* Variance: textbook ``E[x^2] - E[x]^2``, a one-pass form shifted by a pivot taken from
  the data (also with an outlying first element), plain two-pass ``E[(x - E[x])^2]``,
  Welford's algorithm as one variadic ``lax.reduce`` (Chan's merge as the combiner: what
  PyTorch's and Apex's GPU kernels do per thread), and bnjax's two statistics paths
  (``"checked"``, ``"branchless"``), for time under ``jax.jit`` and relative error, on
  centred data (mean 1, std 2) and on offset data (mean 1e3, std 0.1; float32).
* Backward: bnjax's closed-form ``custom_vjp`` against plain autodiff of the same forward.

Timings are medians of interleaved rounds, quoted as ratios to bnjax's choice.
Run: ``python benchmarks/core_choices.py [--shape 64,32,32,64] [--rounds 15]``
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bnjax
from bnjax._src.moments import batch_moments
from bnjax._src.normalize import affine_pass, inverse_std, multiplier
from bnjax._src.reduction import Reduction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import interleaved_medians  # noqa: E402


def textbook(x, axes):
    m = jnp.mean(x, axes, keepdims=True)
    return jnp.maximum(jnp.mean(x * x, axes, keepdims=True) - m * m, 0)


def two_pass(x, axes):
    m = jnp.mean(x, axes, keepdims=True)
    return jnp.mean(jnp.square(x - m), axes, keepdims=True)


def one_pass_pivot(x, axes):
    p = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
    d = x - p
    m = jnp.mean(d, axes, keepdims=True)
    return jnp.maximum(jnp.mean(d * d, axes, keepdims=True) - m * m, 0)


def welford(x, axes):
    """Welford/Chan as one variadic reduction: (count, mean, m2) merged pairwise."""
    xf = x.astype(jnp.float32)

    def merge(a, b):
        (na, ma, qa), (nb, mb, qb) = a, b
        n = na + nb
        w = jnp.where(n > 0, nb / jnp.where(n > 0, n, 1), 0)
        d = mb - ma
        return n, ma + d * w, qa + qb + d * d * na * w

    init = (jnp.float32(0), jnp.float32(0), jnp.float32(0))
    n, _, m2 = jax.lax.reduce((jnp.ones_like(xf), xf, jnp.zeros_like(xf)), init, merge, axes)
    return m2 / n


def bnjax_checked(x, axes):
    return batch_moments(x, Reduction(axes), statistics="checked").var


def bnjax_branchless(x, axes):
    return batch_moments(x, Reduction(axes), statistics="branchless").var


def autodiff_train(bn, params, x, axes):
    """The same forward as bnjax's training pass, differentiated by JAX."""
    keep = [1 if i in axes else d for i, d in enumerate(x.shape)]
    mom = batch_moments(x, Reduction(axes), statistics=bn.statistics)
    inv = inverse_std(mom, bn.epsilon)
    a = multiplier(params.scale.reshape(keep), inv, jnp.float32)
    return affine_pass(x, mom.pivot, mom.delta, a, params.bias.reshape(keep), x.dtype)


def _time(fns, args, rounds):
    """Interleaved medians of the best of 5 calls per round (the harness's method)."""
    return interleaved_medians({k: (f, args) for k, f in fns.items()}, rounds, repeats=5)


def variance_table(shape, rounds):
    axes = tuple(range(len(shape) - 1))
    z = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    fns = {
        n: jax.jit(lambda x, f=f: f(x, axes))
        for n, f in (
            ("bnjax checked", bnjax_checked),
            ("bnjax branchless", bnjax_branchless),
            ("plain two-pass", two_pass),
            ("Welford (variadic reduce)", welford),
            ("pivot-shifted one-pass", one_pass_pivot),
            ("textbook E[x^2]-E[x]^2", textbook),
        )
    }
    outlier = (z * 0.1 + 1e3).at[(0,) * len(shape)].set(1e3 + 100.0)
    data = (
        ("mean 1 std 2", z * 2 + 1),
        ("mean 1e3 std 0.1", z * 0.1 + 1e3),
        ("mean 1e3 std 0.1, first element 1e3 std away", outlier),
    )
    for label, x in data:
        truth = np.var(np.asarray(x, np.float64), axis=axes)
        times = _time(fns, (x,), rounds)
        base = times["bnjax checked"]
        print(f"variance of x{shape} float32, {label}")
        for n, f in fns.items():
            err = np.max(np.abs(np.asarray(f(x)).ravel() - truth) / truth)
            print(f"  {n:<26} time x{times[n] / base:5.2f}   max rel. error {err:.2e}")


def backward_table(shape, rounds):
    axes = tuple(range(len(shape) - 1))
    bn = bnjax.BatchNorm()
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    params, state = bn.init(x)
    w = jax.random.normal(jax.random.key(2), shape, jnp.float32)

    def loss_custom(params, x):
        return jnp.sum(bn.apply(params, state, x, training=True)[0] * w)

    def loss_auto(params, x):
        return jnp.sum(autodiff_train(bn, params, x, axes) * w)

    fns = {
        "custom_vjp (closed form)": jax.jit(jax.grad(loss_custom, argnums=(0, 1))),
        "autodiff": jax.jit(jax.grad(loss_auto, argnums=(0, 1))),
    }
    times = _time(fns, (params, x), rounds)
    ga, gb = (f(params, x) for f in fns.values())
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True)
    )
    print(f"training forward+backward of x{shape} float32 (max |grad diff| {diff:.1e})")
    base = times["custom_vjp (closed form)"]
    for n, t in times.items():
        mem = fns[n].lower(params, x).compile().memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20
        print(f"  {n:<26} time x{t / base:5.2f}   temp memory {temp:7.1f} MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,32,32,64")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    print(f"backend {jax.default_backend()}, jax {jax.__version__}")
    variance_table(shape, args.rounds)
    backward_table(shape, args.rounds)


if __name__ == "__main__":
    main()
