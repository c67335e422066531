"""The rules of ARCHITECTURE.md, each a test: imports go down its module table, every
module names test modules that exist, public modules only re-export, small signatures
(but drop-ins keep their host's), one name per idea, tests use no underscore names, and
one ``batch_moments`` per batch."""

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


def _named_tuples():
    """``{class name: its fields}`` for every NamedTuple defined in ``bnjax/_src``."""
    found = {}
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [getattr(b, "id", getattr(b, "attr", None)) for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and "NamedTuple" in bases:
                fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
                found[f"{path.stem}.{node.name}"] = fields
    return found


def test_no_named_tuple_restates_another_s_fields():
    """One name per idea: a NamedTuple whose fields are all another's restates it (as a
    ``(mean, var)`` bundle beside ``BatchNormState`` did)."""
    tuples = _named_tuples()
    assert "types.BatchNormState" in tuples and "moments.Moments" in tuples
    restated = [
        f"{a} {sorted(fa)} within {b} {sorted(fb)}"
        for a, fa in tuples.items()
        for b, fb in tuples.items()
        if a != b and fa <= fb
    ]
    assert not restated, restated


def _table_modules():
    """The module table of ARCHITECTURE.md, in order: ``[(module, [test files])]``."""
    rows = []
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        match = re.match(r"\| `(\w+)\.py` \|.*\| (.*) \|$", line)
        if match:
            rows.append((match.group(1), re.findall(r"`(test_\w+\.py)`", match.group(2))))
    return rows


def _bnjax_imports(path):
    """The ``bnjax._src`` modules that ``path`` imports."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnjax._src"):
            parts = node.module.split(".")
            yield from (a.name for a in node.names) if len(parts) == 2 else parts[2:3]


def test_imports_go_down_the_architecture_table():
    """Every module of ``bnjax/_src`` is in ARCHITECTURE.md's table, and imports only
    modules above it there: the table is the import order, checked pair by pair."""
    order = [module for module, _ in _table_modules()]
    sources = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")
    assert sorted(order) == sources, "ARCHITECTURE.md's table and bnjax/_src differ"
    upward = [
        f"{module} imports {dep}, which is not above it"
        for i, module in enumerate(order)
        for dep in _bnjax_imports(SRC / f"{module}.py")
        if dep not in order[:i]
    ]
    assert not upward, upward


def test_every_module_names_test_modules_that_exist():
    for module, tests in _table_modules():
        assert tests, f"{module}: ARCHITECTURE.md names no test module"
        for name in tests:
            assert (ROOT / "tests" / name).is_file(), f"{module}: tests/{name} is missing"


def _underscore_uses(path):
    """Where the test module ``path`` imports, reads or patches an underscore name of a
    bnjax module (``bnjax._src`` itself is the package's path, not such a name)."""
    tree = ast.parse(path.read_text())
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnjax"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"{path.name}:{node.lineno} imports {alias.name}"
                aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name.startswith("bnjax")}
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Attribute) and private(node.attr):
            target, name = node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            target, name = node.args[0], str(node.args[1].value)
        if target is not None and private(name) and ast.unparse(target) in aliases:
            yield f"{path.name}:{node.lineno} uses {ast.unparse(target)}.{name}"


def test_tests_use_no_underscore_name_of_bnjax():
    """Tests reach the code through the public API or a module's public names, so that a
    module's insides can change while its tests keep their assertions."""
    uses = [u for p in sorted((ROOT / "tests").glob("*.py")) for u in _underscore_uses(p)]
    assert not uses, uses


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
