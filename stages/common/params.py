"""Typed params: each stage's params.yaml section becomes a frozen dataclass, strictly checked.

An unknown key, a wrong type or a value outside a `Literal` fails with a `StageError` that names the
key and what is allowed, so a typo in params.yaml never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from stages.common.errors import StageError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with the safe loader; a missing or malformed file is a StageError."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"params file not found: {path}; pass --params with the path to params.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise StageError(f"{path} must hold a mapping of sections, found {type(data).__name__}")
    return data


def _check_value(where: str, value: Any, tp: Any) -> Any:
    """Check (and lightly coerce) one value against a type annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise StageError(f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(where, value, arm)
            except StageError as exc:
                errors.append(str(exc))
        raise StageError(errors[0] if errors else f"{where}: {value!r} has the wrong type")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise StageError(f"{where}: expected a list, got {value!r}")
        (arm, *_rest) = get_args(tp) or (Any,)
        return type(value)(_check_value(f"{where}[{i}]", v, arm) for i, v in enumerate(value)) if origin is list \
            else tuple(_check_value(f"{where}[{i}]", v, arm) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise StageError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StageError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise StageError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise StageError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def require(params: Any, checks: list[tuple[bool, str, str]]) -> None:
    """In a params dataclass's __post_init__: the first failed (ok, key, what is required) raises ValueError.

    `build` turns it into a StageError naming the params section, e.g. "params.yaml:synth: fps: 0 must be positive".
    """
    for ok, key, what in checks:
        if not ok:
            raise ValueError(f"{key}: {getattr(params, key)!r} {what}")


def build(cls: type[T], section: dict | None, where: str) -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad values raise StageError."""
    section = section or {}
    if not isinstance(section, dict):
        raise StageError(f"{where}: expected a mapping of params, got {section!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise StageError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(fields))}"
        )
    kwargs = {k: _check_value(f"{where}.{k}", v, hints[k]) for k, v in section.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StageError(f"{where}: {exc}") from None
    return obj


SHARED_KEYS = ("seed", "device")
"""Top-level params.yaml keys every stage with a field of that name takes, unless its own section sets it."""


def load_section(params_path: str | Path, section: str, cls: type[T]) -> T:
    """Load section `section` of params.yaml as `cls`, with the shared top-level keys (SHARED_KEYS) filled in
    where `cls` has them and the section does not set them; a missing section uses the defaults."""
    data = read_yaml(params_path)
    values = data.get(section)
    if values is None or isinstance(values, dict):
        fields = {f.name for f in dataclasses.fields(cls)}
        shared = {k: data[k] for k in SHARED_KEYS if k in data and k in fields and k not in (values or {})}
        values = {**shared, **(values or {})}
    return build(cls, values, f"{Path(params_path).name}:{section}")
