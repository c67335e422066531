"""Smoke test of examples/seed_walkthrough.py with its tiny config."""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"examples_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"examples_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_walkthrough_reproduces_tf1_and_writes_plot(tmp_path, capsys):
    walkthrough = _load("seed_walkthrough")
    config = ROOT / "configs" / "seed_walkthrough_tiny.toml"
    with pytest.warns(UserWarning, match="output equals bias"):
        result = walkthrough.main(["--config", str(config), f"out_dir={tmp_path}"])
    # Each printed number agrees with TF1's published value to float32 printing precision
    # (the moving variance, 66.66382, is printed with 7 significant digits).
    for label, err in result["errors"].items():
        tol = 1e-5 if "variance" in label else 1e-6
        assert err <= tol * max(1.0, abs(walkthrough.TF1[label][0])), label
    assert result["debiased"] == pytest.approx(-1.2247357, abs=1e-6)
    assert Path(result["plot"]).stat().st_size > 10_000
    noisy = result["curves"]["noisy batches"]
    # Biased batch variances of 8 samples average 7/8 of 64; the unbiased option removes it.
    assert np.mean(noisy['"cumulative"'][-50:]) == pytest.approx(56, rel=0.12)
    assert np.mean(noisy['"cumulative", running_var="unbiased"'][-50:]) == pytest.approx(
        64, rel=0.12
    )
    # The printed line carries bnjax's own number, beside TF1's.
    out = capsys.readouterr().out
    assert re.search(r"inference after 1 update +bnjax \[-7\.76696[5-7]\d*\] +TF1", out), out
