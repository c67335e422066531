"""What a user installing bnjax meets: the wheel's contents and the missing-extra errors."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MISSING = [
    ("flax", "import bnjax.linen", "bnjax[flax]"),
    ("flax", "import bnjax.nnx", "bnjax[flax]"),
    ("optax", "import bnjax.training", "bnjax[training]"),
    ("orbax", "from bnjax.training import save; save('/nonexistent/x', {})", "bnjax[training]"),
    ("equinox", "import bnjax.equinox", "bnjax[equinox]"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "code", "extra"), MISSING, ids=[m[1] for m in MISSING])
def test_a_missing_extra_names_it(module, code, extra):
    """Run as if the package were not installed (``sys.modules[name] = None``)."""
    program = f"import sys; sys.modules[{module!r}] = None\n{code}"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f"pip install '{extra}'" in last, last


def test_core_imports_without_any_extra():
    program = "import sys\nfor m in ('flax', 'optax', 'orbax', 'hypothesis', 'equinox'):\n"
    program += "    sys.modules[m] = None\n"
    program += "import bnjax, bnjax.interop, bnjax.presets, bnjax.testing"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_wheel_has_license_and_metadata(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("bnjax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "bnjax/testing/__init__.py" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Programming Language :: Python :: 3.11" in metadata
    for extra in ("flax", "training", "testing"):
        assert f"Provides-Extra: {extra}" in metadata


def test_missing_extra_message_names_the_module():
    from bnjax._src.extras import missing

    error = ModuleNotFoundError("No module named 'flax'", name="flax")
    assert str(missing("bnjax.linen", "flax", error)) == (
        "bnjax.linen needs Flax (bnjax.linen, bnjax.nnx), and 'flax' is not installed: "
        "pip install 'bnjax[flax]'"
    )
