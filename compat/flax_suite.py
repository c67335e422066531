"""Flax's own test suite, run with bnjax's BatchNorm swapped in: ``make compat``.

1. Downloads the source distribution of the installed Flax release from the package
   index (it ships ``tests/``) into ``compat/.cache/`` (kept for the next run).
2. Runs every Flax test file that mentions ``BatchNorm`` under Flax's own pytest settings
   (its ``pyproject.toml``: warnings are errors; 4 forced CPU devices and rank promotion
   raise, as Flax's ``run_all_tests.sh``), with ``flax.linen.BatchNorm`` and
   ``flax.nnx.BatchNorm`` replaced by bnjax's (``compat/flax_swap.py``). No assertion is
   touched.
3. Judges the tests that constructed a bnjax BatchNorm: each must pass, unless it is
   listed in ``compat/expected_failures.txt`` with a reason. A listed test that passes,
   or a listed test that no longer exists, fails the run too, so the list stays true.

The tests that construct a BatchNorm are recorded in ``compat/flax_tests.txt`` for the
installed Flax release; later runs (CI) run just those, in a minute or two. A new Flax
release, or ``--select``, runs every file that mentions ``BatchNorm`` again (about 10
minutes on 2 cores) and records the selection anew.

Run: ``python compat/flax_suite.py [--select]`` from the repository root (exit status 1
on failure).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import flax

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
EXPECTED = HERE / "expected_failures.txt"
SELECTION = HERE / "flax_tests.txt"


def sdist() -> Path:
    """The extracted source distribution of the installed Flax release."""
    root = CACHE / f"flax-{flax.__version__}"
    if root.is_dir():  # complete: renamed into place only after extraction
        return root
    CACHE.mkdir(exist_ok=True)
    archive = CACHE / f"flax-{flax.__version__}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             "flax", "--dest", str(CACHE), f"flax=={flax.__version__}"],
            check=True,
        )  # fmt: skip
    partial = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    (partial / root.name).rename(root)
    shutil.rmtree(partial)
    return root


def expected_failures() -> dict[str, str]:
    """``nodeid -> reason`` from the expected-failures file (``nodeid  # reason`` lines)."""
    listed = {}
    for line in EXPECTED.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            nodeid, _, reason = line.partition("#")
            listed[nodeid.strip()] = reason.strip()
    return listed


def selection() -> list[str] | None:
    """The recorded test ids that construct a BatchNorm, if recorded for this Flax."""
    if not SELECTION.exists():
        return None
    header, *ids = SELECTION.read_text().splitlines()
    return ids if header == f"# flax {flax.__version__}" else None


def run_pytest(root: Path, targets: list[str]) -> tuple[set[str], dict[str, str]]:
    """Runs Flax's tests with the swap; the ids that constructed a bnjax BatchNorm and
    every test's outcome."""
    work = CACHE / "run"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("record-*.json"):
        old.unlink()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_NUMPY_RANK_PROMOTION="raise",
        BNJAX_COMPAT_RECORD=str(work),
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    # Run from outside the sdist: its own flax/ must not shadow the installed release.
    cmd = [
        sys.executable, "-m", "pytest", "-c", str(root / "pyproject.toml"),
        "--rootdir", str(root), "-p", "flax_swap", "-p", "no:cacheprovider", "-q",
        "-n", os.environ.get("COMPAT_WORKERS", "2"), *(str(root / t) for t in targets),
    ]  # fmt: skip
    log = work / "pytest.log"
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=work, env=env, check=False, stdout=out, stderr=out)
    if code.returncode not in (0, 1):  # 2-4: interrupted, internal or usage error
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"pytest exited with {code.returncode}; {log}:\n" + "\n".join(tail))
    constructed, outcomes = set(), {}
    for path in work.glob("record-*.json"):
        record = json.loads(path.read_text())
        constructed |= set(record["constructed"])
        for nodeid, outcome in record["outcomes"].items():
            if outcomes.get(nodeid) != "failed":
                outcomes[nodeid] = outcome
    return constructed, outcomes


def main(argv: list[str]) -> int:
    root = sdist()
    ids = None if "--select" in argv else selection()
    if ids is None:  # every file that mentions BatchNorm; record which tests construct one
        files = sorted(
            str(p.relative_to(root))
            for p in (root / "tests").rglob("*_test.py")
            if "BatchNorm" in p.read_text()
        )
        constructed, ran = run_pytest(root, files)
        ids = sorted(constructed)
        SELECTION.write_text("\n".join([f"# flax {flax.__version__}", *ids]) + "\n")
        print(f"selected {len(ids)} of {len(ran)} tests in {len(files)} files -> {SELECTION.name}")
    else:
        constructed, ran = run_pytest(root, ids)
    listed = expected_failures()
    relevant = {n: ran.get(n, "missing") for n in ids}
    failed = [n for n, o in relevant.items() if o in ("failed", "missing") and n not in listed]
    fixed = [n for n in listed if relevant.get(n) == "passed"]
    gone = [n for n in listed if n not in relevant]
    unswapped = [n for n in ids if relevant[n] == "passed" and n not in constructed]
    count = {k: sum(o == k for o in relevant.values()) for k in ("passed", "failed", "skipped")}
    print(
        f"Flax {flax.__version__}: {len(ids)} tests construct a BatchNorm, run with bnjax's: "
        f"{count['passed']} passed, {count['failed']} failed ({len(listed)} expected, "
        f"compat/expected_failures.txt), {count['skipped']} skipped"
    )
    if failed:
        print(f"pytest's output: {CACHE / 'run' / 'pytest.log'}")
    for title, names in (
        ("unexpected failures", failed),
        ("listed as expected failures but passed (remove them)", fixed),
        ("listed as expected failures but not run (remove them)", gone),
        ("no longer construct a bnjax BatchNorm (rerun with --select)", unswapped),
    ):
        if names:
            print(f"{title}:", *names, sep="\n  ")
    return 1 if failed or fixed or gone or unswapped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
