"""The layout rules that keep the code enterable: small signatures, one direction of
imports, public modules that only re-export, one ``batch_moments`` per batch."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import bnjax

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "bnjax" / "_src"
PUBLIC = sorted(p for p in (ROOT / "bnjax").rglob("*.py") if "_src" not in p.parts)


# The six-parameter rule is for bnjax's own API. A drop-in wrapper takes its host's
# constructor as the host does, positional parameters included, or it would not be a
# drop-in: each entry is (file, qualified name) of such a wrapper, and the host whose
# signature it copies (tests/test_equinox.py checks it is a prefix of the wrapper's).
HOST_SIGNATURES = {
    ("equinox.py", "BatchNorm.__init__"): "eqx.nn.BatchNorm.__init__ (8 positional)",
}


def _functions(path):
    """``(qualified name, node)`` of every function in ``path`` (``Class.method``)."""

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef):
                    yield prefix + child.name, child
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(ast.parse(path.read_text()), "")


def test_no_function_takes_more_than_six_positional_parameters():
    wide, exempt = [], set()
    for path in sorted(SRC.glob("*.py")):
        for name, fn in _functions(path):
            names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
            names = [n for n in names if n not in ("self", "cls")]
            if len(names) <= 6:
                continue
            if (path.name, name) in HOST_SIGNATURES:
                exempt.add((path.name, name))
            else:
                wide.append(f"{path.name}:{fn.lineno} {name}({', '.join(names)})")
    assert not wide, "bundle these arguments or pass them by keyword:\n" + "\n".join(wide)
    assert exempt == set(HOST_SIGNATURES), "an exemption no longer needed: remove it"


def test_one_name_per_idea():
    pattern = re.compile(r"fallback_|fb_mean|fb_var|_toolkit_train")
    found = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted((ROOT / "bnjax").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found


def _imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_the_core_does_not_call_into_its_add_ons():
    imported = set(_imported_modules(SRC / "batchnorm.py"))
    assert "bnjax._src.recalibrate" not in imported
    assert not any(m.startswith("bnjax._src.recalibrate") for m in imported)


@pytest.mark.parametrize("path", PUBLIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_public_modules_only_re_export(path):
    """A public module is a docstring, imports, ``__all__`` (and ``__version__``)."""
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        names = {getattr(t, "id", None) for t in targets}
        assert isinstance(node, (ast.Assign, ast.AnnAssign)) and names <= {
            "__all__",
            "__version__",
        }, f"{path.name}:{node.lineno} defines something; move it to bnjax/_src"


def test_recalibration_computes_each_batch_moments_once(monkeypatch):
    """One ``batch_moments`` per layer and batch: the normalizing pass's moments are the
    ones merged (before, the accumulator recomputed them)."""
    import bnjax._src.moments as moments_module

    original = moments_module.batch_moments
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("bnjax") and getattr(module, "batch_moments", None) is original:
            monkeypatch.setattr(module, "batch_moments", counted)
    bn = bnjax.BatchNorm()
    params, state = bn.init((16, 3))
    batches = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(3)]
    new = bnjax.recalibrate(bn.apply, params, state, batches, jit=False)
    assert len(calls) == 3
    data = np.concatenate([np.asarray(b, np.float64) for b in batches])
    np.testing.assert_allclose(new.mean, data.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new.var, data.var(0), rtol=1e-6)


def test_update_stats_false_leaves_an_accumulator_unchanged():
    from bnjax._src.population import start

    bn = bnjax.BatchNorm()
    params, state = bn.init((8, 2))
    population = start(state)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    y, same = bn.apply(params, population, x, training=True, update_stats=False)
    assert same is population
    y_ref, _ = bn.apply(params, state, x, training=True)
    np.testing.assert_array_equal(y, y_ref)
    _, merged = bn.apply(params, population, x, training=True)
    assert int(merged.count) == 1
