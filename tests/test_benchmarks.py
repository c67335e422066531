"""The benchmark harness (a CI-sized run), retracing, and the fast paths against float64.

The fast paths are the compiled training and inference passes whose arithmetic is arranged
for XLA (barriers that keep each reduction's arithmetic private, float32 conversions done
inside the fusions); they must still compute the textbook batch norm, which these tests
check on fresh random inputs with a numpy float64 reference, eagerly and under jit.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_CHECK = BENCH / "gpu_check.py"


def _load_harness():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bnjax_bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- float64 references ---------------------------------------------------------------


def _stats(x, axes):
    x = np.asarray(x, np.float64)
    return x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)


def _reference(x, scale, bias, mean, var, eps):
    x = np.asarray(x, np.float64)
    xhat = (x - mean) / np.sqrt(var + eps)
    return xhat * np.asarray(scale, np.float64) + np.asarray(bias, np.float64), xhat


def _reference_grads(x, g, scale, eps, axes):
    """Textbook batch-norm gradients (x, scale, bias) for the cotangent ``g``, in float64."""
    mean, var = _stats(x, axes)
    _, xhat = _reference(x, 1.0, 0.0, mean, var, eps)
    g = np.asarray(g, np.float64)
    k = np.asarray(scale, np.float64) / np.sqrt(var + eps)
    g_mean = g.mean(axis=axes, keepdims=True)
    gx_mean = (g * xhat).mean(axis=axes, keepdims=True)
    dx = k * (g - g_mean - xhat * gx_mean)
    return dx, (g * xhat).sum(axis=axes), g.sum(axis=axes)


def _inputs(rng, shape, dtype, offset=1.0, spread=2.0):
    c = shape[-1]
    x = jnp.asarray(rng.normal(offset, spread, shape).astype(np.float32)).astype(dtype)
    params = bnjax.BatchNormParams(
        scale=jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
        bias=jnp.asarray(rng.normal(0.0, 1.0, c), jnp.float32),
    )
    state = bnjax.BatchNormState(
        mean=jnp.asarray(rng.normal(0.0, 1.0, c), jnp.float32),
        var=jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        count=jnp.asarray(3, jnp.int32),
    )
    return x, params, state


# Relative tolerance of one output element: float32 arithmetic, or the rounding of a
# bfloat16 output (8 significant bits).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2**-7}
SHAPES = [(16, 6, 5, 8), (256, 24)]
DTYPES = [jnp.float32, jnp.bfloat16]


def _close(actual, expected, dtype, scale=1.0):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    atol = TOL[dtype] * scale
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_matches_float64(maybe_jit, shape, dtype):
    rng = np.random.default_rng([11, len(shape), np.dtype(dtype).itemsize])
    x, params, state = _inputs(rng, shape, dtype)
    bn = bnjax.BatchNorm(epsilon=1e-3)
    f = maybe_jit(lambda p, s, x: bn.apply(p, s, x, training=False))
    y, new = f(params, state, x)
    assert y.dtype == dtype
    for got, want in zip(new, state, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref, _ = _reference(x64, params.scale, params.bias, state.mean, state.var, 1e-3)
    _close(y, ref, dtype, scale=np.max(np.abs(ref)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_matches_float64(maybe_jit, shape, dtype):
    rng = np.random.default_rng([12, len(shape), np.dtype(dtype).itemsize])
    x, params, state = _inputs(rng, shape, dtype)
    bn = bnjax.BatchNorm(momentum=0.9, epsilon=1e-4)
    f = maybe_jit(lambda p, s, x: bn.apply(p, s, x, training=True))
    y, new = f(params, state, x)
    axes = tuple(range(len(shape) - 1))
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    mean, var = _stats(x64, axes)
    ref, _ = _reference(x64, params.scale, params.bias, mean, var, 1e-4)
    assert y.dtype == dtype
    _close(y, ref, dtype, scale=np.max(np.abs(ref)))
    want_mean = 0.9 * np.asarray(state.mean, np.float64) + 0.1 * mean.ravel()
    want_var = 0.9 * np.asarray(state.var, np.float64) + 0.1 * var.ravel()
    np.testing.assert_allclose(np.asarray(new.mean), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.var), want_var, rtol=1e-5, atol=1e-6)
    assert int(new.count) == 4 and new.count.dtype == jnp.int32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_float64(maybe_jit, shape, dtype):
    rng = np.random.default_rng([13, len(shape), np.dtype(dtype).itemsize])
    x, params, state = _inputs(rng, shape, dtype)
    g = jnp.asarray(rng.normal(0.0, 1.0, shape).astype(np.float32)).astype(dtype)
    bn = bnjax.BatchNorm(epsilon=1e-4)

    def step(params, state, x, g):
        def f(x, params):
            return bn.apply(params, state, x, training=True)

        y, vjp, new = jax.vjp(f, x, params, has_aux=True)
        return vjp(g)

    dx, dparams = maybe_jit(step)(params, state, x, g)
    axes = tuple(range(len(shape) - 1))
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    g64 = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
    want_dx, want_dscale, want_dbias = _reference_grads(x64, g64, params.scale, 1e-4, axes)
    assert dx.dtype == dtype
    _close(dx, want_dx, dtype, scale=np.max(np.abs(want_dx)))
    n = x.size // shape[-1]
    # Per-feature sums of n float32 terms: tolerance grows like sqrt(n).
    for got, want in ((dparams.scale, want_dscale), (dparams.bias, want_dbias)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.sqrt(n))


def test_offset_data_stays_exact(maybe_jit):
    """Mean 1e3, std 0.1 in float32: variance, output and gradient stay close to float64."""
    rng = np.random.default_rng(14)
    shape = (64, 4, 4, 16)
    x, params, state = _inputs(rng, shape, jnp.float32, offset=1e3, spread=0.1)
    state = bnjax.BatchNorm().init(shape)[1]
    bn = bnjax.BatchNorm(momentum=0.0)
    y, new = maybe_jit(lambda p, s, x: bn.apply(p, s, x, training=True))(params, state, x)
    axes = (0, 1, 2)
    x64 = np.asarray(x, np.float64)
    mean, var = _stats(x64, axes)
    # README: variance within 1e-5 relative and output within 1e-5 (measured 2e-7, 5e-7).
    np.testing.assert_allclose(np.asarray(new.var), var.ravel(), rtol=1e-5)
    ref, _ = _reference(x64, params.scale, params.bias, mean, var, 1e-5)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5 * float(np.max(params.scale)))


# -- retracing --------------------------------------------------------------------------


def test_same_shapes_do_not_retrace():
    """Threading the state through a jitted step traces once, for every mode."""
    traces = []

    def step(bn, params, state, x, training):
        traces.append(training)
        return bn.apply(params, state, x, training=training)

    f = jax.jit(step, static_argnames=("bn", "training"))
    rng = np.random.default_rng(15)
    x, params, state = _inputs(rng, (8, 3, 3, 4), jnp.float32)
    for training in (True, False, True, False):
        for _ in range(3):
            # A new but equal config each call: the frozen dataclass hashes by value.
            _, state = f(bnjax.BatchNorm(momentum=0.9), params, state, x + 1.0, training)
    assert traces == [True, False]


def test_documented_jit_form_does_not_retrace():
    bn = bnjax.BatchNorm()
    traces = []

    def apply(params, state, x, training):
        traces.append(1)
        return bn.apply(params, state, x, training=training)

    step = jax.jit(apply, static_argnames=("training",))
    params, state = bn.init((32, 8))
    for i in range(4):
        x = jnp.full((32, 8), float(i), jnp.float32).at[0].set(-1.0)
        _, state = step(params, state, x, training=True)
    assert len(traces) == 1 and int(state.count) == 4


# -- the harness ------------------------------------------------------------------------


@pytest.mark.slow
def test_harness_smoke(tmp_path):
    """One round on a tiny shape, every peer that imports; writes the Markdown report."""
    run = _load_harness()
    out = tmp_path / "RESULTS.md"
    argv = ["--shapes", "8,2,2,4", "--rounds", "1", "--repeats", "1", "--output", str(out)]
    with jax.numpy_dtype_promotion("standard"):  # the peers mix dtypes freely
        results = run.main(argv)
    rows = results[run.Case((8, 2, 2, 4), "float32")]
    names = [impl.name for impl in run.peers.available()]
    assert {"bnjax", "bnjax checked", "bnjax branchless"} <= set(names)
    assert set(names) | {"roofline"} == set(rows)
    for name in names:
        assert set(rows[name]["time"]) == {"inference", "training", "fwd+bwd"}
        assert all(t > 0 for t in rows[name]["time"].values())
        assert np.isfinite(rows[name]["var_error"])
    assert rows["bnjax"]["var_error"] < 1e-3
    text = out.read_text()
    assert "## (8, 2, 2, 4) float32, centred" in text and "| bnjax | " in text
    assert "branchless / checked time" in text
    for name in names:
        assert f"| {name} | " in text


def _gpu_check(out, budget_s):
    """``gpu_check.py --smoke`` in a subprocess; returns it and its report's text."""
    argv = [sys.executable, str(GPU_CHECK), "--smoke", "--out", str(out), "--budget-s", budget_s]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("RESULTS-gpu-*.md")
    assert re.fullmatch(r"RESULTS-gpu-\d{4}-\d{2}-\d{2}\.md", path.name)
    text = path.read_text()
    assert text.strip() in done.stdout  # printed as written
    return done, text


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """The GPU check end to end on CPU (about 25 s): both dtypes, the conditionals column."""
    _, text = _gpu_check(tmp_path, "45")
    for dtype in ("float32", "bfloat16"):
        assert f"## (8, 4, 4, 8) {dtype}" in text and f"## (64, 16) {dtype}" in text
    assert "| conditionals (train / fwd+bwd) |" in text
    assert "bnjax conditionals in the compiled HLO** (8 functions)" in text
    # bnjax's row of the first case is timed, and its own ratio is 1.
    first = text.split("## (8, 4, 4, 8) float32", 1)[1].split("##", 1)[0]
    assert re.search(r"\| bnjax \| \d+\.\d{3} \| 1\.00 \| \d+\.\d{3} \| 1\.00 \|", first)
    assert "| flax.linen |" in first


def test_gpu_check_stops_within_its_budget(tmp_path):
    """A budget spent before the first compile: the report still comes, saying so."""
    _, text = _gpu_check(tmp_path, "1")
    assert "**stopped early**" in text and "NOT MEASURED" in text
    assert text.count("(not timed)") == 4  # every case listed, none reached


@pytest.mark.parametrize("ratio", [0.0, 5.5, 6.0, 1e4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_match_float64_from_centred_to_offset(maybe_jit, ratio, dtype):
    """Running statistics after one batch whose mean is ``ratio`` standard deviations."""
    rng = np.random.default_rng([16, int(ratio), np.dtype(dtype).itemsize])
    std = 0.1 if ratio > 100 else 1.0
    x = jnp.asarray(rng.normal(ratio * std, std, (512, 7)).astype(np.float32)).astype(dtype)
    bn = bnjax.BatchNorm(momentum=0.0)
    params, state = bn.init(x)
    _, new = maybe_jit(lambda p, s, x: bn.apply(p, s, x, training=True))(params, state, x)
    mean, var = _stats(jnp.asarray(x, jnp.float32), (0,))
    np.testing.assert_allclose(np.asarray(new.var), var.ravel(), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(new.mean), mean.ravel(), rtol=2e-7, atol=1e-6 * std)
