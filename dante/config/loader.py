"""YAML <-> config dataclasses: strict loading, dotted ``--set`` overrides, saved forms, field documentation.

Design choices
- One error for all problems: unknown keys, wrong types and invalid combinations are collected and
  raised together as ``ConfigError``, each line naming the file and the dotted key (litgpt's
  ``validate_args`` style). Nothing is taken from file names.
- Types are checked strictly (a YAML ``"3"`` is not an int); ints are accepted where a float is asked.
- ``--set`` values are parsed as YAML scalars/flow collections, then type-checked like file values. A
  list takes item indices (``--set corpus.sources.0.min_chars=50``): the item must exist (in the file or
  the list's default), since an item made up from one key would miss the keys that identify it.
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
    """How ``describe`` and the errors print an annotation: an enumeration with its allowed values
    (``one of 'skip', 'error'``), lists with their item type, ``X or null`` for an optional."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin is list:
        return f"list of {_type_name((typing.get_args(tp) or (Any,))[0])}"
    if tp is dict or origin is dict:
        return "mapping"
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


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> X (what a dotted key walks into); any other annotation unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _list_item_type(tp: Any) -> Any:
    """The item annotation of a ``list[X]`` field, or None when ``tp`` is not a list."""
    tp = _unwrap_optional(tp)
    if tp is list:
        return Any
    if typing.get_origin(tp) is list:
        return (typing.get_args(tp) or (Any,))[0]
    return None


def _default_list(cls: type, name: str) -> list:
    """The default of list field ``name`` of ``cls`` in its raw (YAML) form, to index into when the file
    does not set the list."""
    return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in getattr(cls(), name)]


def _walk_override(data: dict, cls: type, dotted: str, problems: list[str]) -> tuple[Any, Any, Any] | None:
    """Resolve ``a.b.c`` against ``cls``: the raw container to write into (created on the way), the last key
    (an int for a list item) and its annotation (None inside a free-form dict field); None after reporting
    the problem. A list of sections takes item indices: ``corpus.sources.0.min_chars``."""
    parts = dotted.split(".")
    node: Any = data
    tp: Any = cls  # annotation of ``node``: a dataclass, a list type, or None (free-form mapping)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i])
        if tp is None:  # inside a free-form dict field: any key, any value
            if last:
                return node, part, None
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            continue
        item_tp = _list_item_type(tp)
        if item_tp is not None:
            n = len(node)
            span = f"indices 0..{n - 1}" if n else "no index is valid"
            if not part.isdigit():
                problems.append(f"--set {dotted}: {here} is a list, so the key after it must be an item index "
                                f"({n} item(s): {span}), got {part!r}")
                return None
            idx = int(part)
            if idx >= n:
                problems.append(f"--set {dotted}: index {idx} is out of range: {here} has {n} item(s) ({span}); "
                                f"add items to the list in the config file")
                return None
            if last:
                return node, idx, item_tp
            if dataclasses.is_dataclass(item_tp) and not isinstance(node[idx], dict):
                problems.append(f"--set {dotted}: {here}[{idx}] is {type(node[idx]).__name__}, not a mapping")
                return None
            if not dataclasses.is_dataclass(item_tp) and _list_item_type(item_tp) is None:
                problems.append(f"--set {dotted}: {here}[{idx}] is a single value; nothing to set inside it")
                return None
            node, tp = node[idx], item_tp
            continue
        names = {f.name for f in dataclasses.fields(tp)}
        if part not in names:
            key = ".".join(parts[: i + 1])
            problems.append(f"--set {dotted}: unknown key {key!r} (known: {', '.join(sorted(names))})")
            return None
        field_tp = _hints(tp)[part]
        if last:
            return node, part, field_tp
        inner = _unwrap_optional(field_tp)
        key = ".".join(parts[: i + 1])
        if _list_item_type(inner) is not None:
            if part not in node:
                node[part] = _default_list(tp, part)
            if not isinstance(node[part], list):
                problems.append(f"--set {dotted}: {key} is {type(node[part]).__name__} in the config, not a list")
                return None
            node, tp = node[part], inner
            continue
        if not (dataclasses.is_dataclass(inner) or inner is dict or typing.get_origin(inner) is dict or inner is Any):
            problems.append(f"--set {dotted}: {key} is a single value ({_type_name(field_tp)}); nothing to set inside it")
            return None
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        tp = inner if dataclasses.is_dataclass(inner) else None
    raise AssertionError("unreachable: a dotted key has at least one part")


def _set_dotted(data: dict, cls: type, dotted: str, raw: str, problems: list[str]) -> None:
    """Apply one ``a.b.c=value`` override onto the raw YAML dict (validated later with the rest)."""
    target = _walk_override(data, cls, dotted, problems)  # (dict, str) or (list, int)
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
    """One line per leaf key: dotted name, type (an enumeration with its allowed values), default, doc
    (for --help-config). A list of sections is followed by the keys of one item, as ``corpus.sources[].kind``
    (set one with ``--set corpus.sources.0.kind=local``)."""
    lines = []
    docs = field_docs(cls)
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        item = _list_item_type(tp)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  ({docs.get(f.name, '')})")
            lines.extend(describe(tp, key + "."))
        elif item is not None and dataclasses.is_dataclass(item):
            lines.append(f"  {key} = {getattr(defaults, f.name)!r}  [list of {item.__name__}]  {docs.get(f.name, '')} "
                         f"Each item has the keys {key}[].* below; --set {key}.<index>.<key>=... sets one.")
            lines.extend(describe(item, key + "[]."))
        else:
            lines.append(f"  {key} = {getattr(defaults, f.name)!r}  [{_type_name(tp)}]  {docs.get(f.name, '')}")
    return lines
