"""The examples' configs: a TOML file read into a frozen dataclass, checked by pydantic.

Every example runs as ``python examples/NAME.py [--config PATH] [key=value ...]``. The
file gives the values, ``key=value`` overrides change them (dotted keys reach into nested
tables: ``model.width=64``), and pydantic checks every value against the dataclass's
annotations in strict mode (an int is accepted for a float, a TOML array for a tuple;
nothing else is converted), so a typo in a key or a quoted number stops the run at start-up
with the key and the file in the message. ``--help`` lists the keys and their values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import pydantic
import tomllib


def load_config(cls: type, path, overrides: Sequence[str] = ()):
    """Reads the TOML file ``path`` into the dataclass ``cls``, then applies ``overrides``.

    Args:
      cls: a dataclass type; its annotations are what pydantic checks (nested dataclasses
        are TOML tables).
      path: the TOML file (UTF-8).
      overrides: ``"key=value"`` strings applied in order. ``value`` is a TOML literal
        (``lr=1e-3``, ``sizes=[8, 16]``, ``name="a b"``); a bare word is taken as a string
        (``out_dir=out/run1``) and ``None`` (or ``null``) as None where the field allows it.

    Returns:
      An instance of ``cls``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      TypeError: ``cls`` is not a dataclass.
      ValueError: the file is not UTF-8 TOML, an override is not ``key=value``, or a key
        or value is wrong (the message names the file, the key, the value and the
        expected type).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type; got {cls!r}")
    where = os.fspath(path)
    values = _read(Path(path))
    for item in overrides:
        values = _override(cls, values, item, f"{where} (override {item!r})")
    return _validate(cls, values, where)


def config_from_argv(cls: type, default_path, argv: Sequence[str] | None):
    """Parses ``[--config PATH] [key=value ...]`` and loads the config.

    Args:
      cls: the config dataclass.
      default_path: the TOML file used when ``--config`` is not given.
      argv: the arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
      An instance of ``cls``.

    Raises:
      SystemExit: ``--help``, an unknown option, or a wrong config (the message is
        printed without a traceback).
    """
    parser = argparse.ArgumentParser(
        description=cls.__doc__,
        epilog=_keys_help(cls, default_path),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=os.fspath(default_path), help="TOML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return load_config(cls, args.config, args.overrides)
    except (OSError, TypeError, ValueError) as e:
        parser.error(str(e))


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start}); "
            "expected a TOML file saved as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid TOML: {e}") from None


_STRICT = pydantic.ConfigDict(strict=True, extra="forbid")


def _adapter(cls: type) -> pydantic.TypeAdapter:
    """A strict validator for the dataclass ``cls``: pydantic reads a plain dataclass's
    settings from its ``__pydantic_config__`` (nested dataclasses included)."""
    for tp in _dataclasses_in(cls):
        if "__pydantic_config__" not in vars(tp):
            tp.__pydantic_config__ = _STRICT
    return pydantic.TypeAdapter(cls)


def _dataclasses_in(cls: type) -> list[type]:
    found = [cls]
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls).get(field.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            found += _dataclasses_in(hint)
    return found


def _validate(cls: type, values: dict, where: str):
    """``cls`` built from ``values``, or a ValueError naming every wrong key."""
    try:
        # Through JSON: a TOML array is a JSON array (tuple or list), and strict mode
        # still accepts an int for a float.
        return _adapter(cls).validate_json(json.dumps(values, default=str))
    except pydantic.ValidationError as e:
        problems = "; ".join(_describe(error) for error in e.errors())
        raise ValueError(f"{where}: {problems}") from None


def _describe(error) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ").replace("an object", "a TOML table")
    if not key:  # raised by the dataclass itself (``__post_init__``)
        return message
    if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key {key!r} (--help lists the keys)"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    return f"key {key!r}: {message}; got {error['input']!r}"


def _override(cls: type, values: dict, item: str, where: str) -> dict:
    """``values`` with one ``key=value`` override, its value read as the field expects."""
    if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
        raise ValueError(f"{where}: not of the form key=value")
    key, text = (part.strip() for part in item.split("=", 1))
    dotted = key.split(".")
    candidates = []
    with contextlib.suppress(tomllib.TOMLDecodeError):
        candidates.append(tomllib.loads(f"v = {text}")["v"])
    if text in ("None", "null"):
        candidates.append(None)
    candidates.append(text)
    first_error = None
    for value in candidates:  # the first reading that the config accepts
        new = _set(values, dotted, value)
        try:
            _validate(cls, new, where)
            return new
        except ValueError as e:
            first_error = first_error or e
    raise first_error


def _set(values: dict, dotted: list[str], value) -> dict:
    out = dict(values)
    node = out
    for part in dotted[:-1]:
        child = node.get(part, {})
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[dotted[-1]] = value
    return out


def _keys_help(cls: type, default_path) -> str:
    """The config's keys with their types and values from ``default_path``."""
    try:
        values = _read(Path(default_path))
    except (OSError, ValueError):
        values = {}
    lines = [f"config keys (values from {os.fspath(default_path)}):"]
    lines += _field_lines(cls, values, prefix="")
    return "\n".join(lines)


def _field_lines(cls: type, values: dict, prefix: str) -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = hints.get(field.name, typing.Any)
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        if field.name in values and not isinstance(values[field.name], dict):
            value = values[field.name]
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = "(required)"
        nested = hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None
        if nested is not None:
            lines += _field_lines(nested, values.get(field.name, {}), f"{prefix}{field.name}.")
        else:
            lines.append(f"  {prefix}{field.name} = {value!r}  ({kind})")
    return lines
