"""YAML <-> config dataclasses: strict loading, dotted ``--set`` overrides, saved forms, field documentation.

Design choices
- One error for all problems: unknown keys, wrong types and invalid combinations are collected and
  raised together as ``ConfigError``, each line naming the file and the dotted key (litgpt's
  ``validate_args`` style). Nothing is taken from file names.
- Types are checked strictly (a YAML ``"3"`` is not an int); ints are accepted where a float is asked.
- ``--set`` values are parsed as YAML scalars/flow collections, then type-checked like file values.
- The steps are separate functions so each can grow on its own: ``_walk_override`` resolves a dotted key
  against the dataclasses, ``_parse_override_value`` reads the value, ``_check_value`` checks it against
  the annotation, and ``_type_name`` is how ``describe`` prints a type.

Example::

    cfg = load_config(PretrainStageConfig, "configs/tiny/pretrain.yaml", ["train.lr=1e-3"])
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dante.config.checks import validate
from dante.errors import ConfigError

# ---------------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, as YAML 1.2 does. PyYAML follows YAML 1.1, whose float
    pattern needs a dot (``1.0e-4``), so ``lr: 1e-4`` or ``--set train.lr=1e-4`` would load as a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


# ---------------------------------------------------------------------------------------------------
# Values against annotations
# ---------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert/check ``value`` against annotation ``tp``; append problems naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
            return tp()
        return _build(tp, value, key, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            problems.append(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(args[0], value, key, problems)
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return []
        return [_check_value(inner, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")  # a bug in the schema, not user input


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a raw mapping; unknown keys and wrong types become problems."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(names))})")
            continue
        kwargs[k] = _check_value(hints[k], v, key, problems)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# --set a.b.c=value
# ---------------------------------------------------------------------------------------------------


def _parse_override_value(tp: Any, raw: str) -> Any:
    """The value of one ``--set`` as YAML; a string field keeps the literal text (``run.name=2024``)."""
    value = _yaml_load(raw) if raw != "" else ""
    if tp is str and not isinstance(value, str):
        return raw
    return value


def _walk_override(data: dict, cls: type, dotted: str, problems: list[str]) -> tuple[dict, str, Any] | None:
    """Resolve ``a.b.c`` against ``cls``: the raw dict to write into (created on the way), the last key and
    its annotation (None inside a free-form dict field); None after reporting an unknown key."""
    parts = dotted.split(".")
    node: dict = data
    node_cls: type | None = cls
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if node_cls is None:
            # inside a free-form dict field: any key, any value
            if last:
                return node, part, None
            node = node.setdefault(part, {})
            continue
        names = {f.name for f in dataclasses.fields(node_cls)}
        if part not in names:
            key = ".".join(parts[: i + 1])
            problems.append(f"--set {dotted}: unknown key {key!r} (known: {', '.join(sorted(names))})")
            return None
        tp = _hints(node_cls)[part]
        if last:
            return node, part, tp
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        node_cls = tp if dataclasses.is_dataclass(tp) else None
    raise AssertionError("unreachable: a dotted key has at least one part")


def _set_dotted(data: dict, cls: type, dotted: str, raw: str, problems: list[str]) -> None:
    """Apply one ``a.b.c=value`` override onto the raw YAML dict (validated later with the rest)."""
    target = _walk_override(data, cls, dotted, problems)
    if target is not None:
        node, key, tp = target
        node[key] = _parse_override_value(tp, raw)


def parse_overrides(cls: type, data: dict, overrides: list[str], problems: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
            continue
        k, v = item.split("=", 1)
        _set_dotted(data, cls, k.strip(), v.strip(), problems)
    return data


# ---------------------------------------------------------------------------------------------------
# Loading and saved forms
# ---------------------------------------------------------------------------------------------------


def _read_yaml_mapping(path: str | Path) -> dict:
    p = Path(path)
    source = str(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p} (pass --config configs/<profile>/<stage>.yaml)"], source)
    try:
        loaded = _yaml_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"YAML syntax error: {e}"], source) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"top level must be a mapping, got {type(loaded).__name__}"], source)
    return loaded


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Fill ``cls`` from a YAML file and dotted overrides; validate; raise one ConfigError."""
    problems: list[str] = []
    source = str(path) if path else "<defaults>"
    data: dict = _read_yaml_mapping(path) if path is not None else {}
    data = parse_overrides(cls, data, list(overrides or []), problems)
    cfg = _build(cls, data, "", problems)
    try:
        problems.extend(validate(cfg))
    except (TypeError, ValueError, AttributeError):
        pass  # a field of the wrong type is already reported above; cross-checks on it are moot
    if problems:
        raise ConfigError(problems, source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def from_dict(cls: type, data: dict):
    """Rebuild a config from its saved dict (e.g. a manifest or checkpoint); strict like load_config."""
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, "<saved config>")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Documentation (--help-config)
# ---------------------------------------------------------------------------------------------------


def _own_field_docs(cls: type) -> dict[str, str]:
    """Docstrings of the fields written in ``cls``'s own body (the string literal under each field)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
            if isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
                docs[a.target.id] = str(b.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields, inherited ones included (a subclass's own doc wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key: dotted name, type, default, doc (for --help-config)."""
    lines = []
    docs = field_docs(cls)
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  ({docs.get(f.name, '')})")
            lines.extend(describe(tp, key + "."))
        else:
            lines.append(f"  {key} = {getattr(defaults, f.name)!r}  [{_type_name(tp)}]  {docs.get(f.name, '')}")
    return lines
