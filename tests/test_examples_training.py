"""Smoke runs of the training examples with their tiny configs, and their default configs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bnjax.training import restore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CONFIGS = ROOT / "configs"


def load_config(cls, path):
    """The examples' own config loader (``examples/_config.py``)."""
    return load_example("_config").load_config(cls, path)


def load_example(name: str):
    """Imports ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_digits", "ensemble_vmap", "data_parallel"])
def test_default_and_tiny_configs_load(name):
    module = load_example(name)
    for suffix in ("", "_tiny"):
        cfg = load_config(module.Config, CONFIGS / f"{name}{suffix}.toml")
        assert isinstance(cfg, module.Config)
    assert load_config(module.Config, CONFIGS / f"{name}.toml") == module.Config()


@pytest.mark.slow
def test_train_digits_tiny(tmp_path, capsys):
    module = load_example("train_digits")
    out = tmp_path / "digits"
    result = module.main(["--config", str(CONFIGS / "train_digits_tiny.toml"), f"out_dir={out}"])
    cfg = result["config"]
    steps = cfg.epochs * (1437 // cfg.batch_size)
    state = result["state"]
    assert int(state.step) == steps
    assert int(state.bn_state["bn1"].count) == int(state.bn_state["bn2"].count) == steps
    assert len(result["history"]["test_accuracy"]) == cfg.epochs
    assert result["test_accuracy"] > 0.8
    assert result["restored_accuracy"] == result["test_accuracy"]
    assert result["stale_accuracy"] < result["test_accuracy"]
    assert Path(result["plot"]).stat().st_size > 0
    restored = restore(out / "checkpoint", like=state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    printed = capsys.readouterr().out
    assert "never-updated statistics" in printed and "inference mode" in printed


@pytest.mark.slow
def test_ensemble_vmap_tiny():
    module = load_example("ensemble_vmap")
    result = module.main(["--config", str(CONFIGS / "ensemble_vmap_tiny.toml")])
    assert result["ok"], result["step_diff"]
    # README: vmap(train_step) equals each member's train_step to 2.4e-7 (full config);
    # tested with a margin of 4 (measured 1.2e-7 here).
    assert result["step_diff"] < 1e-6
    assert max(result["drift"]) < 1e-6  # a few steps: no room for rounding to grow
    assert result["counts"] == [result["steps"]] * 2
    assert len(result["member_accuracy"]) == len(result["solo_accuracy"]) == 2


@pytest.mark.slow
def test_data_parallel_tiny():
    module = load_example("data_parallel")
    result = module.main(["--config", str(CONFIGS / "data_parallel_tiny.toml")])
    assert result["ok"], result["max_diff"]
    assert set(result["max_diff"]) == {"one device", "shard_map", "jit, sharded batch"}
    # README: equal to one device to 8.3e-7 and 7.5e-7 (full config; 3.6e-7 and 2.4e-7
    # measured here): a margin of 2.
    assert max(result["max_diff"].values()) < 2e-6, result["max_diff"]
    assert result["bn_count"] == 1437 // 128


@pytest.mark.slow
def test_train_digits_default_config_reaches_the_target(tmp_path, capsys):
    """`make demo`'s run: at least 97% test accuracy in inference mode with the default
    config (seed 0: 98.6%), the never-updated-statistics contrast printed, and the tqdm
    bar (on in the default config) drawn."""
    module = load_example("train_digits")
    config = str(CONFIGS / "train_digits.toml")
    result = module.main(["--config", config, f"out_dir={tmp_path / 'digits'}"])
    assert result["config"].progress
    assert result["test_accuracy"] >= 0.97
    assert result["stale_accuracy"] < result["test_accuracy"]
    captured = capsys.readouterr()
    assert "never-updated statistics" in captured.out
    assert "it/s" in captured.err  # the progress bar
