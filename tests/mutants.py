"""Mutation testing, module by module: each module's mutants against its own tests.

``make mutants`` runs this after ``tests/listed_mutants.py``. pytest-gremlins mutates one
source module at a time (comparisons, arithmetic, booleans, return values) and runs, for
each mutant, the tests of that module's test files that cover the mutated line, stopping
at the first failure. Pairing a module with its own test files keeps a run to minutes
per module on 2 cores (the whole suite against every mutant would take most of a day)
and asks more of the tests: a mutant counts as killed only if the module's own tests
catch it. Results are cached in ``.gremlins_cache``; a second run retests only mutants
of changed code. Reports land in ``coverage/gremlins/<module>.json``; the summary is
printed and written to ``coverage/gremlins/summary.md`` for ``tests/MUTANTS.md``.

Run: ``python tests/mutants.py [module ...]`` from the repository root.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "coverage" / "gremlins"

# Each source module and the test files that own it (for a helper module, also those of
# the modules built on it, where its behaviour is observable).
MODULES = {
    "averaging": ["test_averaging.py"],
    "population": ["test_recalibrate.py"],
    "recalibrate": ["test_recalibrate.py"],
    "reduction": ["test_reduction.py", "test_moments.py", "test_multidevice.py"],
    "moments": ["test_moments.py", "test_statistics.py", "test_lowering.py", "test_batchnorm.py"],
    "normalize": ["test_normalize.py", "test_statistics.py", "test_renorm.py", "test_batchnorm.py"],
    "renorm": ["test_renorm.py"],
    "ghost": ["test_ghost.py"],
    "batchnorm": ["test_batchnorm.py"],
    "validation": ["test_validation.py"],
    "checks": ["test_checks.py"],
    "fold": ["test_fold.py"],
    "interop": ["test_interop.py"],
    "haiku_interop": ["test_interop.py"],
    "presets": ["test_presets.py"],
    "checkpoint": ["test_checkpoint.py"],
    "train_step": ["test_training.py"],
    "train_state": ["test_training.py"],
    "flax_common": ["test_linen.py", "test_nnx.py", "test_flax_options.py"],
    "linen": ["test_linen.py", "test_flax_options.py"],
    "nnx": ["test_nnx.py", "test_flax_options.py"],
    "sharding": ["test_multidevice.py", "test_training.py"],
    "types": ["test_batchnorm.py", "test_moments.py"],
    "equinox": ["test_equinox.py"],
    "equinox_interop": ["test_equinox.py"],
    "marks": ["test_testing_audit.py"],
    "tracing": ["test_testing_audit.py"],
    "dataflow": ["test_testing_audit.py"],
    "audit": ["test_testing_audit.py"],
    "step_checks": ["test_testing_audit.py"],
    "properties": ["test_properties.py"],
    "strategies": ["test_strategies.py"],
    "extras": ["test_packaging.py"],
}


def run(module: str) -> dict:
    tests = [f"tests/{name}" for name in MODULES[module]]
    cmd = [
        sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
        *tests, "--gremlins", f"--gremlin-targets=bnjax/_src/{module}.py", "--gremlin-cache",
        "--gremlin-workers=2", "--gremlin-mutant-timeout=300", "--gremlin-report=json",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    report = REPORTS / "gremlins.json"
    if not report.exists():
        return {"module": module, "error": "no report"}
    target = REPORTS / f"{module}.json"
    shutil.move(report, target)
    return {"module": module, **json.loads(target.read_text())}


def summarize(results: list[dict]) -> str:
    """A markdown table of the scores and a list of the survivors."""
    lines = [
        "| module | tests | mutants | killed | survived | timeout | score |",
        "|---|---|---|---|---|---|---|",
    ]
    survivors, total, killed = [], 0, 0
    for r in results:
        s = r.get("summary")
        if s is None:
            lines.append(f"| {r['module']} | | error: {r.get('error')} | | | | |")
            continue
        total, killed = total + s["total"], killed + s["zapped"] + s["timeout"]
        tests = ", ".join(MODULES[r["module"]])
        lines.append(
            f"| {r['module']} | {tests} | {s['total']} | {s['zapped']} | {s['survived']} | "
            f"{s['timeout']} | {s['percentage']:.1f}% |"
        )
        for g in r["results"]:
            if g["status"] == "survived":
                where = f"{Path(g['file_path']).name}:{g['line_number']}"
                survivors.append(f"- `{where}` {g['operator']}: {g['description']}")
    score = 100.0 * killed / max(total, 1)
    lines.append(f"| **all** | | {total} | | {len(survivors)} | | **{score:.1f}%** |")
    return "\n".join(lines + ["", "Survivors:", *survivors]) + "\n"


def main(modules: list[str]) -> int:
    done = {}
    for module in modules or list(MODULES):
        done[module] = run(module)
        print(module, done[module].get("summary", done[module].get("error")), flush=True)
    # The summary covers every module with a report, so that runs of a few modules at a
    # time add up to the whole table.
    results = []
    for module in MODULES:
        report = REPORTS / f"{module}.json"
        if module in done:
            results.append(done[module])
        elif report.exists():
            results.append({"module": module, **json.loads(report.read_text())})
    text = summarize(results)
    (REPORTS / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
