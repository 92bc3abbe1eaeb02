"""Commands configured by one typed dataclass: a YAML file whose keys are its fields, each of them
overridable by a flag of the same name (`rlae-train`, `rlae-compare`)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field` per field of `cls` (default None: the YAML's value stands)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name}", type=_flag_type(hints[field.name]), default=None, help=f"(config field {field.name})")


def _flag_type(hint):
    """YAML for lists and dicts (`--tasks '{a: 1, b: 2}'`), true or false for a bool, the field's own type otherwise."""
    if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:  # bool | None: None is the default, not a flag value
        return _bool
    base = typing.get_origin(hint) or hint
    if base in (list, dict) or any(typing.get_origin(a) in (list, dict) for a in typing.get_args(hint)):
        return yaml.safe_load
    for candidate in (int, float, str):
        if hint is candidate or candidate in typing.get_args(hint):
            return candidate
    return str


def _bool(text: str) -> bool:
    value = yaml.safe_load(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"{text!r}: give true or false")
    return value


def load(cls: type, path: Path | None, overrides: dict, required: tuple[str, ...]):
    """`cls` from the YAML at `path` (if any) with the flags given (not None) on top; unknown keys and
    missing required ones are refused with what to do."""
    values = yaml.safe_load(Path(path).read_text()) if path else {}
    values |= {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise SystemExit(f"unknown config keys {unknown}; known: {', '.join(sorted(fields))}")
    missing = [name for name in required if not values.get(name)]
    if missing:
        raise SystemExit(f"no {' and '.join(missing)}: give them in --config or as flags")
    return cls(**values)
