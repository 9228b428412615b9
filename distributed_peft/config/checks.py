"""The validation machinery every schema module shares: problems are collected in a list, one line each, and raised
together as one ConfigError by the caller.

A line reads `key=value is not allowed; allowed: a, b`, `key=value is invalid; it must be ...`, or names an unknown
key with the closest known one.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterable
from dataclasses import is_dataclass
from enum import Enum
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf


class Choice(str, Enum):
    """The allowed values of a config key; the schema field stays typed `str`, so a wrong value is our one line,
    not OmegaConf's multi-line error."""

    @classmethod
    def values(cls) -> list[str]:
        return [member.value for member in cls]


def check_choice(problems: list[str], key: str, value: Any, allowed: type[Choice] | Iterable[str]) -> None:
    """`key=value is not allowed; allowed: ...` unless value is one of `allowed` (a Choice or plain values)."""
    names = allowed.values() if isinstance(allowed, type) and issubclass(allowed, Choice) else list(allowed)
    if value not in names:
        problems.append(f"{key}={value!r} is not allowed; allowed: {', '.join(names)}")


def check(problems: list[str], ok: bool, key: str, value: Any, requirement: str) -> None:
    """`key=value is invalid; it must be <requirement>` unless ok."""
    if not ok:
        problems.append(f"{key}={value!r} is invalid; it must be {requirement}")


def missing_extra(module: str, extra: str, needed_by: str) -> str | None:
    """One line naming the extra to install when `module` is not importable (found without importing it)."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{needed_by} needs {module}, which is not installed; allowed: pip install 'distributed-peft[{extra}]'"


def _schema_of(annotation: Any) -> Optional[type]:
    """The dataclass a field holds (also through Optional[...]); None for free-form values (dicts, lists, scalars)."""
    if is_dataclass(annotation):
        return annotation
    if get_origin(annotation) is Union:
        return next((arg for arg in get_args(annotation) if is_dataclass(arg)), None)
    return None


def _schema_paths(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key a schema defines, nested dataclasses included."""
    paths = []
    for name, annotation in get_type_hints(schema).items():
        paths.append(prefix + name)
        nested = _schema_of(annotation)
        if nested is not None:
            paths += _schema_paths(nested, f"{prefix}{name}.")
    return paths


def _shown_value(node: DictConfig, key: str) -> str:
    try:
        value = node[key]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
    except Exception:  # an interpolation that does not resolve: the key alone is enough to name the mistake
        return key
    return f"{key}={value!r}"


def unknown_keys(cfg: DictConfig, schema: type, prefix: str = "", root: Optional[type] = None) -> list[str]:
    """One line per key that `schema` does not define (added with `+`), with the closest known key as a hint.

    Fields typed as dicts (task.data.columns, dpeft-generate's inputs) are free-form and not looked into.
    """
    root = root or schema
    hints = get_type_hints(schema)
    problems = []
    for key in cfg.keys():
        key = str(key)
        if key not in hints:
            problems.append(_unknown_key_line(cfg, key, prefix, sorted(hints), root))
            continue
        nested = _schema_of(hints[key])
        child = cfg._get_node(key)
        if nested is not None and isinstance(child, DictConfig) and not child._is_none():
            problems += unknown_keys(child, nested, f"{prefix}{key}.", root)
    return problems


def _unknown_key_line(node: DictConfig, key: str, prefix: str, known: list[str], root: type) -> str:
    """`training.lrr=1 is not a known option; did you mean training.lr?` (or the section's keys when none is close)."""
    where = f"{prefix}{_shown_value(node, key)} is not a known option"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{where}; did you mean {prefix}{close[0]}?"
    elsewhere = [p for p in _schema_paths(root) if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"{where} in {prefix.rstrip('.') or 'the top level'}; did you mean {' or '.join(elsewhere)}?"
    return f"{where}; allowed: {', '.join(prefix + k for k in known)}"
