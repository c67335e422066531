"""The examples' configs (``examples/_config.py``): TOML into typed frozen dataclasses,
overrides, and the errors."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _config import config_from_argv, load_config  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Model:
    width: int = 16
    activation: Literal["relu", "gelu"] = "relu"


@dataclasses.dataclass(frozen=True)
class Config:
    epochs: int
    learning_rate: float = 0.1
    use_bn: bool = True
    out_dir: str = "out"
    sizes: tuple[int, ...] = (8, 16)
    seed: int | None = None
    model: Model = Model()
    name: str | None = "run"
    weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0; got {self.epochs}")


def _write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_values_and_defaults(tmp_path):
    path = _write(tmp_path, "epochs = 3\nlearning_rate = 1\nsizes = [1, 2]\n[model]\nwidth = 4\n")
    cfg = load_config(Config, path)
    assert cfg == Config(epochs=3, learning_rate=1.0, sizes=(1, 2), model=Model(width=4))
    assert isinstance(cfg.learning_rate, float)
    assert isinstance(cfg.sizes, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4


def test_overrides_parse_toml_literals(tmp_path):
    path = _write(tmp_path, "epochs = 3\n")
    cfg = load_config(
        Config,
        path,
        [
            "epochs=5",
            "learning_rate=2e-3",
            "use_bn=false",
            "out_dir=out/run 1",
            "sizes=[4]",
            "seed=7",
            "model.width=32",
            'model.activation="gelu"',
            "epochs = 6",
        ],
    )
    assert cfg == Config(
        epochs=6,
        learning_rate=2e-3,
        use_bn=False,
        out_dir="out/run 1",
        sizes=(4,),
        seed=7,
        model=Model(width=32, activation="gelu"),
    )


def test_bare_word_for_str_field_even_if_it_looks_like_a_number(tmp_path):
    path = _write(tmp_path, "epochs = 1\n")
    assert load_config(Config, path, ["out_dir=123"]).out_dir == "123"
    assert load_config(Config, path, ['out_dir="q"']).out_dir == "q"


@pytest.mark.parametrize(
    "text, kind, words",
    [
        ("epochs = 1\nepoch = 2\n", ValueError, ["unknown key 'epoch'"]),
        ("learning_rate = 0.1\n", ValueError, ["missing required key 'epochs'"]),
        ('epochs = "3"\n', ValueError, ["key 'epochs'", "integer", "'3'"]),
        ("epochs = 3.5\n", ValueError, ["key 'epochs'", "integer"]),
        ("epochs = true\n", ValueError, ["key 'epochs'", "integer"]),
        ("epochs = 1\nuse_bn = 1\n", ValueError, ["key 'use_bn'", "boolean"]),
        ('epochs = 1\nsizes = [1, "a"]\n', ValueError, ["key 'sizes.1'", "integer"]),
        ("epochs = 1\n[model]\ndepth = 2\n", ValueError, ["unknown key 'model.depth'"]),
        ('epochs = 1\n[model]\nactivation = "tanh"\n', ValueError, ["activation", "'tanh'"]),
        ("epochs = 1\nmodel = 3\n", ValueError, ["key 'model'"]),
        ('epochs = 1\n[weights]\na = "x"\n', ValueError, ["key 'weights.a'", "number", "'x'"]),
        ("epochs = 1\nweights = [1, 2]\n", ValueError, ["key 'weights'", "TOML table"]),
        ("epochs = -1\n", ValueError, ["epochs must be >= 0"]),
        ("epochs = \n", ValueError, ["not valid TOML"]),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, text, kind, words):
    path = _write(tmp_path, text)
    with pytest.raises(kind) as info:
        load_config(Config, path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "override, kind, words",
    [
        ("epochz=3", ValueError, ["unknown key 'epochz'"]),
        ("epochs=abc", ValueError, ["key 'epochs'", "integer", "'abc'"]),
        ("epochs=1.5", ValueError, ["key 'epochs'", "integer"]),
        ("learning_rate=fast", ValueError, ["'fast'"]),
        ("use_bn=yes", ValueError, ["'yes'"]),
        ("model.depth=2", ValueError, ["unknown key 'model.depth'"]),
        ("epochs.x=2", ValueError, ["key 'epochs'", "integer"]),
        ("weights={a='x'}", ValueError, ["key 'weights.a'", "number"]),
        ("epochs", ValueError, ["key=value"]),
        ("=3", ValueError, ["key=value"]),
        ("epochs=-2", ValueError, ["epochs must be >= 0"]),
    ],
)
def test_override_errors_name_key_and_file(tmp_path, override, kind, words):
    path = _write(tmp_path, "epochs = 1\n")
    with pytest.raises(kind) as info:
        load_config(Config, path, [override])
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_override_sets_none_where_the_field_allows_it(tmp_path):
    path = _write(tmp_path, "epochs = 1\nseed = 4\n")
    cfg = load_config(Config, path, ["name=None", "seed=null", "weights={a=1, b=2.5}"])
    assert (cfg.name, cfg.seed, cfg.weights) == (None, None, {"a": 1.0, "b": 2.5})
    assert load_config(Config, path, ["out_dir=None"]).out_dir == "None"  # str only


def test_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("epochs = 1\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8") as info:
        load_config(Config, path)
    assert str(path) in str(info.value)


def test_help_lists_keys_and_values_and_errors_print_without_traceback(tmp_path, capsys):
    default = _write(tmp_path, "epochs = 7\n", "default.toml")
    with pytest.raises(SystemExit) as info:
        config_from_argv(Config, default, ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for line in ("epochs = 7  (int)", "learning_rate = 0.1  (float)", "model.width = 16  (int)"):
        assert line in out
    with pytest.raises(SystemExit) as info:
        config_from_argv(Config, default, ["epochs=abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "key 'epochs'" in err and "'abc'" in err and "Traceback" not in err


def test_missing_file_and_non_dataclass(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(Config, tmp_path / "nope.toml")
    with pytest.raises(TypeError, match="cls must be a dataclass"):
        load_config(dict, _write(tmp_path, ""))


def test_config_from_argv(tmp_path):
    default = _write(tmp_path, "epochs = 1\n", "default.toml")
    other = _write(tmp_path, "epochs = 9\n", "other.toml")
    assert config_from_argv(Config, default, []).epochs == 1
    assert config_from_argv(Config, default, ["epochs=2"]).epochs == 2
    cfg = config_from_argv(Config, default, ["--config", str(other), "use_bn=false"])
    assert (cfg.epochs, cfg.use_bn) == (9, False)
    cfg = config_from_argv(Config, default, ["seed=3", "--config", str(other)])
    assert (cfg.epochs, cfg.seed) == (9, 3)
    with pytest.raises(SystemExit):
        config_from_argv(Config, default, ["--bogus"])


def test_fixed_length_tuple(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Pair:
        pair: tuple[int, str] = (0, "a")

    assert load_config(Pair, _write(tmp_path, 'pair = [3, "b"]\n')).pair == (3, "b")
    with pytest.raises(ValueError, match="key 'pair'"):
        load_config(Pair, _write(tmp_path, 'pair = [3, "b", 4]\n'))
    with pytest.raises(ValueError, match=r"key 'pair.1'"):
        load_config(Pair, _write(tmp_path, "pair = [3, 4]\n"))
