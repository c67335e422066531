"""Mutants that once slipped through the suite, applied one at a time: each must fail.

``make mutants`` runs this first (a few minutes), then pytest-gremlins over ``bnjax/_src``.
Each entry is a real bug that survived every test before the tests named beside it were
written: the statistics shifted by nothing, sums not combined across devices, Flax
wrappers dropping an option, recalibration merging an empty feature, a checkpoint that
is not fsynced, PyTorch's momentum not converted. Exit status 1 if any survives.

Run: ``python tests/listed_mutants.py`` from the repository root.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = [
    (
        "exact pass around 0 instead of the plain mean",
        "bnjax/_src/moments.py",
        "lambda: centred_moments(x, red, count, plain.mean, 2 * jnp.sqrt(s2)),",
        "lambda: centred_moments(x, red, count, jnp.zeros_like(plain.mean), 2 * jnp.sqrt(s2)),",
        ["tests/test_statistics.py"],
    ),
    (
        "second pass not combined across devices",
        "bnjax/_src/moments.py",
        "s1, s2 = red.psum(red.sums(u1, u2 * u2))",
        "s1, s2 = red.sums(u1, u2 * u2)",
        ["tests/test_multidevice.py"],
    ),
    (
        "plain sums not combined across devices",
        "bnjax/_src/moments.py",
        "s1, s2 = red.psum(red.sums(x1, x2 * x2))",
        "s1, s2 = red.sums(x1, x2 * x2)",
        ["tests/test_multidevice.py"],
    ),
    (
        "wrappers drop renorm",
        "bnjax/_src/flax_common.py",
        "**{name: getattr(module, name) for name in OPTIONS})",
        "**{name: getattr(module, name) for name in OPTIONS if name != 'renorm'})",
        ["tests/test_flax_options.py"],
    ),
    (
        "wrappers drop virtual_batch_size",
        "bnjax/_src/flax_common.py",
        "**{name: getattr(module, name) for name in OPTIONS})",
        "**{n: getattr(module, n) for n in OPTIONS if n != 'virtual_batch_size'})",
        ["tests/test_flax_options.py"],
    ),
    (
        "the Flax wrappers ignore update_stats",
        "bnjax/_src/flax_common.py",
        "update = not use_running_average if update_stats is None else update_stats",
        "update = not use_running_average",
        ["tests/test_flax_options.py"],
    ),
    (
        "recalibration finishes a feature that counted nothing as mean 0 (its data ignored)",
        "bnjax/_src/population.py",
        "mean=jnp.where(seen, population.mean, old.mean),",
        "mean=population.mean,",
        ["tests/test_recalibrate.py"],
    ),
    (
        "an empty feature stops the update of every feature (ema)",
        "bnjax/_src/averaging.py",
        'ok = jnp.any(has_data) if averaging == "ema" else jnp.all(has_data)',
        "ok = jnp.all(has_data)",
        ["tests/test_averaging.py"],
    ),
    (
        "fsync of files is a no-op",
        "bnjax/_src/checkpoint.py",
        "            os.fsync(fd)",
        "            pass",
        ["tests/test_checkpoint.py"],
    ),
    (
        "default keep is 3",
        "bnjax/_src/checkpoint.py",
        "def save(path, state, *, keep: int = 2)",
        "def save(path, state, *, keep: int = 3)",
        ["tests/test_checkpoint.py"],
    ),
    (
        "PyTorch momentum not converted",
        "bnjax/_src/presets.py",
        "momentum=0.0 if momentum is None else 1.0 - momentum,",
        "momentum=0.0 if momentum is None else momentum,",
        ["tests/test_interop.py"],
    ),
]


def run(name, path, old, new, tests) -> bool:
    """Applies one mutant, runs ``tests``, restores the file; True if a test failed."""
    full = ROOT / path
    source = full.read_text()
    if source.count(old) != 1:
        raise ValueError(f"{name}: {old!r} occurs {source.count(old)} times in {path}")
    full.write_text(source.replace(old, new))
    try:
        args = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider"]
        result = subprocess.run([*args, *tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        full.write_text(source)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    print(f"{'killed' if result.returncode else 'SURVIVED'}: {name}: {failed[:1]}", flush=True)
    return result.returncode != 0


def main() -> int:
    killed = [run(*mutant) for mutant in MUTANTS]
    print(f"{sum(killed)} of {len(killed)} listed mutants killed")
    return 0 if all(killed) else 1


if __name__ == "__main__":
    sys.exit(main())
