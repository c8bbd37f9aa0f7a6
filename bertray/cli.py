"""Command-line options made from the config dataclasses, so every field is a documented flag
(`--train.max_steps 100`, `--max-train-examples 4000`) and no flow re-declares what its config
already says: pretraining, fine-tuning, prediction and serving all take their flags from here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from bertray.config import help_of, iter_options, load_config, parse_value

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
_PREFIX = "opt:"


def _is_text(tp: Any) -> bool:
    """Whether a field holds text (str, str | None, tuple[str, ...]): its flag values stay as typed,
    so `--run.name 2024` is the name "2024", not a number."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if tp is str:
        return True
    return bool(args) and typing.get_origin(tp) in (tuple, typing.Union, types.UnionType) and all(a is str for a in args)


def add_config_options(parser: argparse.ArgumentParser, cls: type, *,
                       aliases: Mapping[str, tuple[str, ...]] | None = None, required: tuple[str, ...] = (),
                       hidden: tuple[str, ...] = ()) -> None:
    """One flag per leaf field of `cls`, with the field's help text: `--section.key` for a field of a
    section (`--train.max_steps 100`), `--field-name` for a field of a flat config
    (`--max-train-examples 4000`), plus `aliases` (`{"learning_rates": ("--lr",)}`). Values are read
    as YAML (`config_overrides`); tuple fields take several values; booleans take `--x`, `--x false`
    and, for flat configs, `--no-x`. A flag left out keeps the config file's or the default value."""
    group = parser.add_argument_group("configuration (values are read as YAML: 100, 1e-4, true, null, "
                                      "[a, b], {key: value})")
    for dotted, field, tp in iter_options(cls):
        flag = f"--{dotted}" if "." in dotted else "--" + dotted.replace("_", "-")
        flags = (flag, *(aliases or {}).get(dotted, ()))
        hide = dotted in hidden
        type_name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        kwargs: dict[str, Any] = dict(dest=_PREFIX + dotted, metavar="VALUE", required=dotted in required,
                                      help=argparse.SUPPRESS if hide else f"{help_of(field)} [{type_name}]".replace("%", "%%"))
        if tp is bool or tp == (bool | None):
            group.add_argument(*flags, nargs="?", const="true", **kwargs)
            if "." not in dotted:
                group.add_argument("--no-" + flag[2:], dest=_PREFIX + dotted, action="store_const", const="false",
                                   help=argparse.SUPPRESS)
        else:
            group.add_argument(*flags, nargs="+" if typing.get_origin(tp) is tuple else None, **kwargs)


def config_overrides(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line (`add_config_options`), dotted name -> value. Text
    fields keep what was typed (`null` aside); the rest are read as YAML; several values are a
    list, and one value that is itself a list (`--data.corpus [a, b]`) is that list."""
    types_of = {dotted: tp for dotted, _, tp in iter_options(cls)}
    out: dict[str, Any] = {}
    for key, raw in vars(args).items():
        if not key.startswith(_PREFIX) or raw is None:
            continue
        dotted = key[len(_PREFIX):]
        text = _is_text(types_of[dotted])
        read = (lambda v: None if v == "null" else v) if text else parse_value
        if isinstance(raw, list):
            values = [read(v) for v in raw]
            out[dotted] = values[0] if len(values) == 1 and isinstance(values[0], list) else values
        else:
            out[dotted] = read(raw)
    return out


def config_from_args(cls: type[T], args: argparse.Namespace, shorthands: Mapping[str, Any] | None = None,
                     path: str | None = None) -> T:
    """`cls` from a YAML file (`path`, else `args.config`, else none) plus every flag given on the
    command line and the flows' own shorthand flags (`--corpus`)."""
    overrides = config_overrides(cls, args)
    overrides.update({k: v for k, v in (shorthands or {}).items() if v is not None})
    return load_config(cls, path or getattr(args, "config", None), overrides)


def start_ray(address: str | None, num_cpus: int | None, *, quiet: bool = False) -> None:
    """Join the cluster at `address` (inside `ray job submit`: the job's own) or start a local Ray
    with `num_cpus`; nothing when this process already runs Ray (tests, notebooks). `quiet`: what
    Ray's own processes write (Train's controller, Data's executor and progress bars, every worker)
    stays in Ray's log files, and so do the driver-side INFO lines of Ray's libraries; warnings
    and errors still print."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if not address else None, log_to_driver=not quiet,
                 configure_logging=False)
    if quiet:
        for name in ("ray.data", "ray.train", "ray.tune", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR if name == "ray.data" else logging.WARNING)


def ray_logs_line(address: str | None) -> str:
    """The line a quiet flow prints about where Ray's own logs are."""
    where = "/tmp/ray/session_latest/logs" + (" on each node, and the Ray dashboard" if address else "")
    return f"  Ray's own logs: {where} (--verbose prints them here)"


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
