"""Command-line options made from the config dataclasses, so every field is a documented flag
(`--train.max_steps 100`) and flows never re-declare what the config already says."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from bertray.config import help_of, iter_options, load_config, parse_value

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
_PREFIX = "opt:"


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--section.key VALUE` flag per leaf field of `cls`, with the field's help text."""
    group = parser.add_argument_group("configuration (any field; values are read as YAML: 100, 1e-4, true, "
                                      "null, [a, b], {key: value})")
    for dotted, field, tp in iter_options(cls):
        type_name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        group.add_argument(f"--{dotted}", metavar="VALUE", dest=_PREFIX + dotted,
                           help=f"{help_of(field)} [{type_name}]".replace("%", "%%"))


def config_from_args(cls: type[T], args: argparse.Namespace, shorthands: Mapping[str, Any] | None = None) -> T:
    """`cls` from `args.config` (a YAML file, or None) plus every flag given on the command line."""
    overrides = {k[len(_PREFIX):]: parse_value(v) for k, v in vars(args).items()
                 if k.startswith(_PREFIX) and v is not None}
    overrides.update({k: v for k, v in (shorthands or {}).items() if v is not None})
    return load_config(cls, getattr(args, "config", None), overrides)


def add_flat_options(parser: argparse.ArgumentParser, cls: type, *, required: tuple[str, ...] = (),
                     hidden: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of a flat config dataclass (the tools that use a saved
    model: predict, serve): tuples take several values, booleans `--x/--no-x`, the rest are typed
    by the field; a flag left out keeps the dataclass default (`flat_values`)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        kwargs = dict(dest=field.name, help=argparse.SUPPRESS if field.name in hidden else help_of(field))
        if typing.get_origin(tp) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0])
        elif tp is bool or tp == (bool | None):
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            kwargs.update(type={int: int, float: float, int | None: int, float | None: float}.get(tp, str))
        if field.name in required:
            kwargs["required"] = True
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def flat_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line (`add_flat_options`); several values as a tuple."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def start_ray(address: str | None, num_cpus: int | None, *, log_to_driver: bool = True) -> None:
    """Join the cluster at `address` (inside `ray job submit`: the job's own) or start a local Ray
    with `num_cpus`; nothing when this process already runs Ray (tests, notebooks)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if not address else None, log_to_driver=log_to_driver,
                 configure_logging=False)


def repo_path(value: Any) -> Any:
    """Shipped defaults name files in this repository (samples/...); find them when a flow runs
    from another working directory. Anything that exists as given, or is a URL, is left alone."""
    if isinstance(value, str) and not os.path.isabs(value) and "://" not in value and not os.path.exists(value):
        candidate = REPO / value
        if candidate.exists():
            return str(candidate)
    return value


def with_repo_paths(data: Any) -> Any:
    """A `DataSection` whose corpus and tokenizer paths are resolved with `repo_path`."""
    return dataclasses.replace(data, corpus=tuple(map(repo_path, data.corpus)),
                               eval_corpus=tuple(map(repo_path, data.eval_corpus)),
                               tokenizer=data.tokenizer and repo_path(data.tokenizer))
