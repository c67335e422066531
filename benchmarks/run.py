"""Side-by-side benchmark of bnjax and the batch norms of Flax, Haiku, Equinox and Keras.

For each shape and dtype, every implementation is compiled with ``jax.jit`` in three modes:
inference forward, training forward (output and new state) and training forward+backward
(gradients with respect to the input, scale and bias, with the state update), next to the
roofline op ``x * a + b``. Timings are medians over interleaved rounds: in every round each
compiled function runs ``repeats`` times, in a rotating order, so the noise of a shared
machine spreads evenly over all of them. Also recorded: compile time, compiled temporary
memory, and the relative error of the batch variance on offset data (mean 1e3, std 0.1).

Each case is a shape and dtype, the data (``centred``: mean 1, std 2; ``offset``: mean 1e3,
std 0.1 in float32, mean 64, std 1 in bfloat16, where the checked path takes its exact
passes), a number of stacked layers (3 layers of a small batch: latency bound, many small
kernels) and a number of ensemble members (``jax.vmap`` over that many independent
models). bnjax runs as ``"auto"`` and with each statistics path forced.

Run: ``python benchmarks/run.py [--shapes 64,32,32,64 2048,1024] [--dtypes float32]
[--data centred offset] [--layers 1] [--members 1] [--rounds 21] [--repeats 5]
[--output benchmarks/RESULTS.md]``. Without ``--shapes`` and ``--dtypes`` it measures
:data:`DEFAULT_CASES`. The same command runs unchanged on a GPU or TPU machine; the
backend is written into the report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402


class Case(NamedTuple):
    """One table: shape (features last), dtype, data, stacked layers, ensemble members."""

    shape: tuple[int, ...]
    dtype: str
    data: str = "centred"
    layers: int = 1
    members: int = 1

    def title(self) -> str:
        extra = [self.data]
        if self.layers > 1:
            extra.append(f"{self.layers} stacked layers")
        if self.members > 1:
            extra.append(f"vmap over an ensemble of {self.members}")
        return f"{self.shape} {self.dtype}, {', '.join(extra)}"


DEFAULT_CASES = (
    Case((64, 32, 32, 64), "float32"),
    Case((64, 32, 32, 64), "float32", "offset"),
    Case((2048, 1024), "float32"),
    Case((2048, 1024), "float32", "offset"),
    Case((64, 32, 32, 64), "bfloat16"),
    Case((64, 32, 32, 64), "bfloat16", "offset"),
    Case((8, 8, 8, 16), "float32", layers=3),
    Case((8, 8, 8, 16), "bfloat16", layers=3),
    Case((32, 16, 16, 64), "float32", members=4),
)
MODES = ("inference", "training", "fwd+bwd")
MOMENTUM = 0.99
DATA = {  # (mean, std) per data kind and dtype
    ("centred", "float32"): (1.0, 2.0),
    ("centred", "bfloat16"): (1.0, 2.0),
    ("offset", "float32"): (1e3, 0.1),
    ("offset", "bfloat16"): (64.0, 1.0),
}


def _stacked(impl, static, layers):
    """``impl.forward`` applied ``layers`` times (shared parameters and input state)."""

    def forward(params, state, x, training):
        for _ in range(layers):
            x, new_state = impl.forward(static, params, state, x, training)
        return x, new_state

    return forward


def mode_functions(impl, static, layers=1, members=1):
    """The three jittable functions of one implementation, keyed by mode.

    With ``members > 1`` each is ``jax.vmap``-ed over a leading ensemble axis of every
    argument.
    """
    forward = _stacked(impl, static, layers)

    def inference(params, state, x, ct):
        return forward(params, state, x, False)[0]

    def training(params, state, x, ct):
        return forward(params, state, x, True)

    def fwd_bwd(params, state, x, ct):
        def f(x, params):
            return forward(params, state, x, True)

        y, vjp, new_state = jax.vjp(f, x, params, has_aux=True)
        dx, dparams = vjp(ct)
        return y, new_state, dx, dparams

    fns = {"inference": inference, "training": training, "fwd+bwd": fwd_bwd}
    if members > 1:
        fns = {mode: jax.vmap(fn) for mode, fn in fns.items()}
    return fns


def compile_case(fn, args):
    """Compiles ``fn`` for ``args``; returns the executable, compile seconds, temp bytes."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return compiled, seconds, temp


def interleaved_medians(calls, rounds, repeats):
    """Median over interleaved rounds of the fastest of ``repeats`` calls, in seconds.

    Every round runs each ``(fn, args)`` of ``calls`` ``repeats`` times, starting one
    position later in the list than the round before; the fastest call of a round drops
    the calls that another process preempted, and the median over rounds the slow rounds.
    """
    keys = list(calls)
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    samples = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            fn, args = calls[k]
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                best = min(best, time.perf_counter() - t0)
            samples[k].append(best)
    return {k: float(np.median(v)) for k, v in samples.items()}


def variance_error(impl, shape):
    """Max relative error of the first batch's variance on data with mean 1e3 and std 0.1.

    The data are float32 of ``shape`` (in bfloat16 they would all round to 1000). With
    ``momentum=0`` the running variance after one training step is the batch variance in
    every library; the truth is the float64 variance of the same numbers.
    """
    x = jax.random.normal(jax.random.key(7), shape, jnp.float32) * 0.1 + 1e3
    params, state, static = impl.init(shape, jnp.float32, 0.0)
    step = jax.jit(lambda p, s, x: impl.forward(static, p, s, x, True)[1])
    var = np.asarray(impl.running_var(static, step(params, state, x)), np.float64).reshape(-1)
    xs = np.asarray(x, np.float64).reshape(-1, shape[-1])
    truth = xs.var(axis=0)
    return float(np.max(np.abs(var - truth) / truth))


def _ensemble(tree, members):
    return tree if members == 1 else jax.tree.map(lambda a: jnp.stack([a] * members), tree)


def _compile_impl(impl, case, x, ct):
    """One implementation's row (compile time, temp memory, variance error) and calls."""
    params, state, static = impl.init(case.shape, jnp.dtype(case.dtype), MOMENTUM)
    params, state = _ensemble(params, case.members), _ensemble(state, case.members)
    row, calls = {"compile": 0.0, "temp": {}}, {}
    for mode, fn in mode_functions(impl, static, case.layers, case.members).items():
        args = (params, state, x, ct)
        compiled, seconds, temp = compile_case(fn, args)
        calls[(impl.name, mode)] = (compiled, args)
        row["compile"] += seconds
        row["temp"][mode] = temp
    row["var_error"] = variance_error(impl, case.shape)
    return row, calls


def case_inputs(case):
    """The input ``x`` and cotangent of one case (with the ensemble axis, if any)."""
    shape = ((case.members,) if case.members > 1 else ()) + case.shape
    dtype = jnp.dtype(case.dtype)
    mean, std = DATA[(case.data, "bfloat16" if dtype == jnp.bfloat16 else "float32")]
    kx, kc = jax.random.split(jax.random.key(0))
    x = (jax.random.normal(kx, shape, jnp.float32) * std + mean).astype(dtype)
    return x, jax.random.normal(kc, shape, jnp.float32).astype(dtype)


def measure_case(impls, case, rounds, repeats, log=print):
    """All measurements for one :class:`Case`; returns ``{name: row}``."""
    x, ct = case_inputs(case)
    dtype = jnp.dtype(case.dtype)
    rows, calls = {}, {}
    ab = peers.roofline_init(x.shape, dtype)
    compiled, seconds, temp = compile_case(peers.roofline, (ab, x))
    calls[("roofline", "inference")] = (compiled, (ab, x))
    rows["roofline"] = {"compile": seconds, "temp": {"inference": temp}}
    for impl in impls:
        try:
            row, impl_calls = _compile_impl(impl, case, x, ct)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            log(f"  {impl.name} failed: {type(e).__name__}: {e}")
            rows[impl.name] = {"compile": 0.0, "temp": {}, "error": f"{type(e).__name__}"}
            continue
        calls.update(impl_calls)
        rows[impl.name] = row
        log(f"  compiled {impl.name} ({row['compile']:.1f} s)")
    times = interleaved_medians(calls, rounds, repeats)
    for (name, mode), t in times.items():
        rows[name].setdefault("time", {})[mode] = t
    return rows


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", help="shapes like 64,32,32,64 (features last)")
    parser.add_argument("--dtypes", nargs="+", help="dtypes like float32 bfloat16")
    parser.add_argument("--data", nargs="+", choices=["centred", "offset"], default=["centred"])
    parser.add_argument("--layers", type=int, default=1, help="stacked layers per call")
    parser.add_argument("--members", type=int, default=1, help="ensemble members (vmap)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (median)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per round")
    parser.add_argument("--impls", nargs="+", help="only these implementations")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)
    for name in ("rounds", "repeats", "layers", "members"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.shapes is None and args.dtypes is None:
        return args, list(DEFAULT_CASES)
    shapes = args.shapes or ["64,32,32,64", "2048,1024"]
    cases = [
        Case(tuple(int(d) for d in s.split(",")), dt, data, args.layers, args.members)
        for s in shapes
        for dt in (args.dtypes or ["float32"])
        for data in args.data
    ]
    return args, cases


def main(argv=None):
    """Runs the benchmark and writes the Markdown report; returns ``{case: rows}``."""
    args, cases = parse_args(argv)
    impls = peers.available(args.impls)
    print(f"backend {jax.default_backend()}; measuring {[i.name for i in impls]}")
    results = {}
    for case in cases:
        print(case.title())
        rows = measure_case(impls, case, args.rounds, args.repeats)
        results[case] = rows
        print(report.case_table(rows))
    text = report.document(results, impls, args)
    Path(args.output).write_text(text)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
