"""The README and the docs pages: every Python block runs, every public name is documented.

A block is a complete program a user can paste, run here in a fresh namespace and an
empty working directory; a block meant as a fragment says so on the line before it
(``<!-- fragment -->``).
"""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FRAGMENT = "<!-- fragment -->"
# The pages of the longer blocks (Flax, Equinox, the property checks and strategies, the
# toolkit tour) run in make test-all; make test runs the others' blocks.
SLOW_PAGES = {"equinox.md", "flax.md", "testing.md", "toolkit.md"}

PUBLIC = [
    "bnjax",
    "bnjax.linen",
    "bnjax.nnx",
    "bnjax.equinox",
    "bnjax.training",
    "bnjax.interop",
    "bnjax.presets",
    "bnjax.testing",
    "bnjax.testing.strategies",
]


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if before.strip() == FRAGMENT:
                continue
            line = text.count("\n", 0, match.start()) + 1
            marks = pytest.mark.slow if page.name in SLOW_PAGES else ()
            yield pytest.param(match.group(1), id=f"{page.relative_to(ROOT)}:{line}", marks=marks)


@pytest.mark.parametrize("code", list(_blocks()))
def test_code_block_runs(code, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, request.node.callspec.id, "exec"), {"__name__": "__main__"})


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = []
    for name in PUBLIC:
        module = importlib.import_module(name)
        for item in module.__all__:
            if item == "__version__" or isinstance(getattr(module, item), types.ModuleType):
                continue
            if f"::: {name}.{item}\n" not in api:
                missing.append(f"{name}.{item}")
    assert not missing, f"not in docs/api.md: {missing}"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = [p.name for p in (ROOT / "docs").glob("*.md")]
    assert [p for p in pages if f": {p}" not in nav] == []
