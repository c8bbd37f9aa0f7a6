"""The config library: plain mappings (YAML, JSON, command-line overrides) -> validated, typed
dataclasses, and back. The configurations themselves live beside what they configure: the model's
in `bertray.model.config`, pretraining's in `bertray.train.config`, a sweep's in `bertray.tune.sweep_plan`.

Validation happens once, at the edge: a bad value raises `ConfigError` naming the key and what is
allowed, and nothing deeper in the library re-parses configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal, Mapping, TypeVar

from bertray.errors import ConfigError, check
from bertray.storage import has_credentials, redact_url

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Generic mapping -> dataclass conversion


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# A config file's value that a flag must replace (as in OmegaConf): `init_from: ???` in a recipe
# whose whole point is the user's checkpoint, so that forgetting the flag stops the run at once
# instead of silently training something else.
REQUIRED = "???"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_mapping(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-4, without a dot, as a string
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def unknown_key_error(key: str, known: typing.Iterable[str], where: str = "") -> ConfigError:
    """A `ConfigError` for an unknown key, with the closest known names as a hint."""
    known = sorted(known)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown key {key!r}{where}{hint}")


def from_mapping(cls: type[T], data: Mapping[str, Any], *, prefix: str = "", ignore: typing.Collection[str] = ()) -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type.

    `ignore` names keys that may appear and are dropped (metadata other tools write).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key in ignore:
            continue
        if key not in fields:
            raise unknown_key_error(prefix + key, fields, f" in {cls.__name__}")
        if isinstance(value, str) and value == REQUIRED:
            raise ConfigError(f"{prefix}{key}: required, and this config leaves it to you: give --{prefix}{key}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}" if prefix and not str(exc).startswith(prefix) else str(exc)) from None


def to_mapping(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of JSON/YAML-safe values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(obj)


def check_folder_name(key: str, name: str) -> None:
    """A name that becomes one folder under an output directory: not empty, no separator, not `.`
    or `..`, so a name can never climb out of the output or land in another run's folder."""
    check(bool(name) and name.strip() == name and not set(name) & set("/\\") and name not in (".", ".."),
          key, f"must be a folder name (not empty, no '/' or '\\', not '.' or '..', no surrounding spaces), "
               f"got {name!r}")


def check_no_credentials(key: str, urls: str | tuple[str, ...] | None) -> None:
    """A URL with user:password would be printed, logged, shipped to every task and saved in every
    checkpoint with the run's config: refused, with the URL shown redacted."""
    for url in (urls,) if isinstance(urls, str) else (urls or ()):
        check(not has_credentials(url), key,
              f"{redact_url(url)}: credentials in a URL are refused (they would land in logs, configs and "
              "checkpoints); give them through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
              "GOOGLE_APPLICATION_CREDENTIALS) or an instance role / service account")


# --------------------------------------------------------------------------------------------
# YAML files and command-line overrides


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def doc(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with a help text (shown by `--help` of the flows)."""
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"help": help}, **kw)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        value = default
        return field(default_factory=lambda: copy.deepcopy(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def iter_options(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type) of every leaf option of a nested config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and f.metadata.get("leaf") is not True:
            yield from iter_options(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key!r} is not a section")
    node[leaf] = value


def parse_value(text: str) -> Any:
    """A command-line value as YAML (so `100`, `1e-4`, `true`, `[a, b]` and `null` mean what they say;
    numbers first, since YAML reads `5e-5`, without a dot, as a string)."""
    import yaml

    for kind in (int, float) if any(c.isdigit() for c in text) else ():
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """A YAML file's content; `ConfigError` naming the file (`what` it should be) when it is missing
    or not YAML."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """`cls` from an optional YAML file plus dotted overrides (`{"train.max_steps": 100}`)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    known = {name for name, _, _ in iter_options(cls)}
    for dotted, value in (overrides or {}).items():
        if dotted not in known:
            raise unknown_key_error(dotted, known)
        set_dotted(data, dotted, value)
    try:
        return from_mapping(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
