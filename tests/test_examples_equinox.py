"""Smoke run of examples/equinox_cnn.py with its tiny config, and its configs' loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_examples_training import load_config, load_example

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_and_tiny_configs_load():
    module = load_example("equinox_cnn")
    for suffix in ("", "_tiny"):
        assert isinstance(
            load_config(module.Config, CONFIGS / f"equinox_cnn{suffix}.toml"), module.Config
        )
    assert load_config(module.Config, CONFIGS / "equinox_cnn.toml") == module.Config()
    with pytest.raises(ValueError, match="mode must be 'batch' or 'ema'; got 'legacy'"):
        module.Config(mode="legacy")


@pytest.mark.slow
def test_equinox_cnn_tiny(capsys):
    module = load_example("equinox_cnn")
    result = module.main(["--config", str(CONFIGS / "equinox_cnn_tiny.toml")])
    cfg = result["config"]
    steps = cfg.epochs * (1437 // cfg.batch_size)
    model, state = result["model"], result["state"]
    for i in (1, 5):  # the two BatchNorm layers of the Sequential
        assert int(state.get(model.features[i].state_index).count) == steps
    assert result["audit"] == []
    assert len(result["history"]["test_accuracy"]) == cfg.epochs
    assert result["test_accuracy"] > 0.8
    assert "every BatchNorm state update is returned" in capsys.readouterr().out
