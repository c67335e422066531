"""Smoke run of examples/forgotten_update.py: each broken step is named, the fixed one is not."""

from __future__ import annotations

from pathlib import Path

from test_examples_training import load_example

ROOT = Path(__file__).resolve().parent.parent


def test_forgotten_update_example():
    module = load_example("forgotten_update")
    tiny = ROOT / "configs" / "forgotten_update_tiny.toml"
    results = module.main(["--config", str(tiny)])
    assert results["dropped"]["kinds"] == ["discarded_update"] * 2
    assert results["stale"]["kinds"] == ["stale_state"] * 2
    assert results["stuck"]["kinds"] == ["no_training_call"] * 2
    assert results["fixed"]["kinds"] == []
    assert results["dropped"]["where"] == ["bn_state['bn1']", "bn_state['bn2']"]
    assert results["fixed"]["check"] == "passes"
    for name in ("dropped", "stale", "stuck"):
        assert results[name]["check"] != "passes"
    # the default config loads and equals the dataclass defaults
    config = load_example("_config").load_config(
        module.Config, ROOT / "configs" / "forgotten_update.toml"
    )
    assert config == module.Config()
