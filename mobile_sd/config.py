"""Frozen, typed configuration loaded from YAML/dicts.

`from_dict` turns plain data into nested frozen dataclasses. It is strict like the recipes of
ExecuTorch and the compression configs of coremltools: an unknown key is an error listing the
valid keys, a value of the wrong type or outside a ``Literal`` is an error listing what is
allowed, and every message carries the path of the key (``unet.down[1].channels``).

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Point:
...     x: int
...     y: int = 0
>>> from_dict(Point, {"x": 1})
Point(x=1, y=0)
"""
from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from mobile_sd.errors import SpecError

T = TypeVar("T")


def one_line(text: object) -> str:
    """``text`` on a single line (errors are printed as one line by the CLI)."""
    return " ".join(str(text).split())


def read_text(path: Path, error: type[Exception]) -> str:
    """The UTF-8 text of ``path``; unreadable or non-UTF-8 files raise ``error`` naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                    f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({one_line(exc.strerror or exc)})") from None


def read_json_object(path: Path, error: type[Exception], label: str | None = None) -> dict:
    """The JSON object in ``path`` (UTF-8); any other content raises ``error`` on one line,
    naming ``label`` (default: the path)."""
    import json

    label = label or str(path)
    try:
        text = read_text(path, error)
    except error as exc:
        raise error(str(exc).replace(str(path), label, 1)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{label}: invalid JSON ({one_line(exc)})") from None
    except RecursionError:
        raise error(f"{label}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise error(f"{label}: expected a JSON object, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(x for x in (exc.context, exc.problem) if x)
        if "python/" in what:
            what += " (only plain YAML is read: python/* tags are refused)"
        return one_line(where + what)
    return one_line(exc)


def load_yaml(path: str | Path, error: type[SpecError] = SpecError) -> dict:
    """Read a YAML mapping, with one-line errors that name the file.

    Only plain YAML (``yaml.safe_load``): ``!!python/...`` tags are refused; so are files that are
    not UTF-8 or are nested too deeply to parse.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    text = read_text(path, error)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise error(f"{path}: invalid YAML: nested too deeply to read") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, where: str = "", error: type[SpecError] = SpecError) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, strictly (see module docstring)."""
    return _convert(cls, data, where or cls.__name__, error)


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: plain dicts/lists, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, collections.abc.Mapping):  # dict, and the MappingProxyType of frozen configs
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str, error: type[SpecError]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, error)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise error(f"{where}: invalid value {value!r}; valid values: "
                        + ", ".join(repr(a) for a in allowed))
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise error(f"{where}: must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, error)
            except SpecError as exc:
                errors.append(str(exc))
        raise error(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of "
                    + ", ".join(_type_name(a) for a in args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise error(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]", error)
                         for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]", error) for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {type(value).__name__}")
        key_t, val_t = get_args(tp) or (Any, Any)
        return types.MappingProxyType({
            _convert(key_t, k, f"{where}", error): _convert(val_t, v, f"{where}.{k}", error)
            for k, v in value.items()})
    return _convert_scalar(tp, value, where, error)


def _convert_scalar(tp: Any, value: Any, where: str, error: type[SpecError]) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise error(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise error(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _convert_dataclass(cls: Any, value: Any, where: str, error: type[SpecError]) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise error(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise error(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}", error)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise error(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, ArithmeticError) as exc:  # __post_init__ validation
        raise error(one_line(f"{where}: {exc}")) from None


__all__ = ["from_dict", "to_dict", "load_yaml", "one_line", "read_text", "typing"]
