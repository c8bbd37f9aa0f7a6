"""Training checkpoints: a Hugging Face-layout model directory plus the training state beside it.

    config.json, model.safetensors          the model (transformers.BertForPreTraining loads these)
    tokenizer.json, vocab.txt               the WordPiece vocabulary the model was trained with
    training_state.pt                       optimizer, scheduler, RNG states, fp16 loss scale
    bertray_state.json                      step, sequences seen, data position, metrics, history, restarts,
                                            the run's config

Ray moves these directories to storage (`ray.train.report`) and hands them back on resume
(`ray.train.get_checkpoint`); this module only reads and writes local directories.

`training_state.pt` holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: whoever can write to the run's bucket can spoil a resume but not
run code on the workers. Files of the earlier layout (format 1, numpy arrays in the RNG states)
are refused until converted: `python -m bertray.train.checkpoints convert <checkpoint_dir>`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from bertray.errors import CheckpointError
from bertray.storage import is_local, redact_url

LATEST = "latest"          # a text file in the run directory naming its newest checkpoint
TRAINING_STATE = "training_state.pt"
RUN_STATE = "bertray_state.json"
TRAINING_STATE_FORMAT = 2  # 1 (no "format" key): RNG states held numpy arrays, which need pickle's code path
CONVERT_COMMAND = "python -m bertray.train.checkpoints convert"

_CHECKPOINT_NAME = re.compile(r"checkpoint_\d{8}")
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)", re.IGNORECASE)
# What format 1 needs beyond weights_only's defaults: numpy's array reconstruction, nothing callable.
_FORMAT1_GLOBALS = frozenset({"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                              "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"})
# Leaf types `torch.load(weights_only=True)` accepts without extra safe globals.
_PLAIN_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
                 torch.Size)


@dataclass
class RunState:
    """Where training stands. `data_position` is the data pipeline's own JSON description of where
    a resumed stream picks up; None in checkpoints written before it existed."""

    step: int = 0
    sequences_seen: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)   # logged intervals up to `step`
    data_position: dict[str, Any] | None = None
    restarts: int = 0                                             # resumes from a checkpoint so far


def _shorten(value: Any, limit: int = 60) -> str:
    """A value fit for one line of an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# RNG states as plain values


def _plain_numpy_state(legacy: Sequence[Any]) -> dict[str, Any]:
    """numpy's (name, key, pos, has_gauss, cached_gaussian) with the key as an int64 tensor: a numpy
    array in the file would need pickle's reconstruct call, which weights_only refuses."""
    name, key, pos, has_gauss, cached = legacy
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    key = np.asarray(state["key"].numpy() if isinstance(state["key"], torch.Tensor) else state["key"],
                     dtype=np.uint32)
    np.random.set_state((state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]),
                         float(state["cached_gaussian"])))


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as tensors and plain values only."""
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": _plain_numpy_state(np.random.get_state(legacy=True)),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned, directly or after a save and `load_training_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))   # a list after a round trip through some loaders
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# training_state.pt


def _check_plain(value: Any, key: str) -> None:
    """Refuse at save time what weights_only would refuse at resume, days later, on every worker."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, key)
            _check_plain(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]")
    elif not isinstance(value, _PLAIN_LEAVES):
        raise CheckpointError(f"{TRAINING_STATE}: {key} is a {type(value).__module__}.{type(value).__qualname__}; "
                              f"the training state holds only tensors and plain Python values (convert it to one "
                              f"of those before saving) so that it loads without running code")


def _save_atomically(state: Mapping[str, Any], path: Path) -> None:
    """Write beside `path`, then rename: a crash mid-write leaves the previous file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    torch.save(dict(state), partial)
    os.replace(partial, path)


def write_training_state(directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer, scheduler: Any,
                         step_state: Mapping[str, Any] | None = None) -> Path:
    """`training_state.pt` in the current format (the RNG states are taken here, at save time)."""
    state = {"format": TRAINING_STATE_FORMAT, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": dict(step_state or {})}
    _check_plain(state, "training_state")
    path = Path(directory) / TRAINING_STATE
    _save_atomically(state, path)
    return path


def save_training_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, tokenizer: Any,
                             optimizer: torch.optim.Optimizer, scheduler: Any, run_state: RunState,
                             step_state: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint into `directory` (created if needed). `step_state`: the training
    step's own state (the fp16 loss scale)."""
    from bertray import wordpiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    wordpiece.save(tokenizer, directory)
    write_training_state(directory, optimizer=optimizer, scheduler=scheduler, step_state=step_state)
    (directory / RUN_STATE).write_text(json.dumps(asdict(run_state), indent=2, sort_keys=True, default=float))
    return directory


def load_run_state(directory: str | os.PathLike) -> RunState:
    path = Path(directory) / RUN_STATE
    try:
        data = json.loads(path.read_text())
        return RunState(**data)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {directory} is not a bertray training checkpoint") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt ({exc})") from None


def _refused_globals(path: Path, message: str) -> list[str]:
    """Every global the file asks for, read from its pickle opcodes without running any; torch's
    error names only the first (and older torch has no scanner)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is not None:
        try:
            return sorted(set(scan(path)))
        except Exception:   # a file too damaged to scan still has torch's message
            pass
    return sorted(set(_REFUSED_GLOBAL.findall(message)))


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated ({type(exc).__name__}: {_shorten(str(exc), 300)}); "
                           f"resume from an earlier checkpoint of the run or a new run.name")


def _refusal(path: Path, names: Sequence[str]) -> CheckpointError:
    """The error for a file that needs more than weights_only allows: a format-1 file gets the
    conversion command, anything else only the refusal (converting it would run its code)."""
    text = (f"{path}: refused to load: the file asks to run code or load a type that is not allowed "
            f"({', '.join(names)}); nothing in it was executed (a training state holds only tensors and plain "
            f"values).")
    if set(names) <= _FORMAT1_GLOBALS:
        text += (f" It looks like a checkpoint written by an earlier bertray (format 1, numpy arrays in the RNG "
                 f"states); if you trust where it came from, convert it once: {CONVERT_COMMAND} {path.parent}")
    else:
        text += " Do not resume from it; restore the checkpoint from a copy you trust or start a new run.name."
    return CheckpointError(text)


def _check_format(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt (holds a {type(state).__name__}, not the training state dict)")
    version = state.get("format")
    if version is None:
        raise CheckpointError(f"{path}: written by an earlier bertray (format 1); if you trust where it came from, "
                              f"convert it once: {CONVERT_COMMAND} {path.parent}")
    if version != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{path}: training state format {version!r}, this bertray reads format "
                              f"{TRAINING_STATE_FORMAT}; resume with the bertray version that wrote it")
    return state


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Optimizer, scheduler and RNG states, or a `CheckpointError` saying why they are unusable.
    Nothing in the file can run code: anything beyond tensors and plain values is refused."""
    path = Path(directory) / TRAINING_STATE
    if not path.exists():
        raise CheckpointError(f"{path}: missing; cannot resume the optimizer from {directory}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _refused_globals(path, str(exc))
        raise (_refusal(path, names) if names else _corrupt(path, exc)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from None
    return _check_format(path, state)


# --------------------------------------------------------------------------------------------
# Converting a format-1 file


def _format1_safe_globals() -> list[Any]:
    """numpy's array reconstruction under both module names (numpy 1.x wrote `numpy.core`): enough
    for format 1's RNG arrays, and still no arbitrary callable."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _load_format1(path: Path) -> Any:
    """A format-1 (or current) file, loaded with numpy's array globals allowed and nothing else."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:   # torch < 2.5: no context manager; this process only converts
            torch.serialization.add_safe_globals(_format1_safe_globals())
            return torch.load(path, map_location="cpu", weights_only=True)
        with safe_globals(_format1_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _refused_globals(path, str(exc))
        if names:
            raise CheckpointError(f"{path}: not a format-1 bertray training state: it asks for {', '.join(names)}; "
                                  f"not converted and nothing in it was executed") from None
        raise _corrupt(path, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _corrupt(path, exc) from None


def convert_training_state(directory: str | os.PathLike) -> bool:
    """Rewrite a format-1 `training_state.pt` in the current format, in place (through a renamed
    temporary file); False when it already was current. Only numpy's array globals are allowed
    while reading, so even a planted file runs no code here."""
    path = Path(directory) / TRAINING_STATE
    if not path.exists():
        raise CheckpointError(f"{path}: missing; give a checkpoint directory (one holding {TRAINING_STATE})")
    old = _load_format1(path)
    if not isinstance(old, dict) or not {"optimizer", "scheduler", "rng"} <= set(old):
        found = sorted(map(str, old)) if isinstance(old, dict) else type(old).__name__
        raise CheckpointError(f"{path}: not a bertray training state (found {found}); not converted")
    if old.get("format") == TRAINING_STATE_FORMAT:
        return False
    rng = {**old["rng"], "numpy": _plain_numpy_state(old["rng"]["numpy"])}
    state = {"format": TRAINING_STATE_FORMAT, "optimizer": old["optimizer"], "scheduler": old["scheduler"],
             "rng": rng, "step": dict(old.get("step") or {})}
    _check_plain(state, "training_state")
    _save_atomically(state, path)
    return True


# --------------------------------------------------------------------------------------------
# Run directories


def checkpoint_step(name_or_url: str) -> int:
    """The step in a `checkpoint_<8 digits>` name or URL's last part; -1 for anything else."""
    name = str(name_or_url).rstrip("/").rsplit("/", 1)[-1]
    return int(name.removeprefix("checkpoint_")) if _CHECKPOINT_NAME.fullmatch(name) else -1


def resolve_checkpoint(url: str) -> str:
    """A checkpoint directory URL; a run directory or a `latest` file is followed to its newest
    checkpoint. `latest` may only name a checkpoint inside its own run directory: a writable bucket
    must not be able to point a resume anywhere else."""
    fs, path = fsspec.core.url_to_fs(url)
    pointer = path if path.endswith("/" + LATEST) else path.rstrip("/") + "/" + LATEST
    if not fs.isfile(pointer):
        return url
    name = fs.cat_file(pointer).decode(errors="replace").strip()
    if not _CHECKPOINT_NAME.fullmatch(name):
        shown = pointer if is_local(fs) else fs.unstrip_protocol(pointer)
        raise CheckpointError(f"{redact_url(shown)}: names {_shorten(name)}, not a checkpoint of this run (expected "
                              f"checkpoint_ followed by 8 digits, e.g. checkpoint_00001000); write the name of one "
                              f"of the run's checkpoint directories into it, or delete it")
    directory = os.path.dirname(pointer) + "/" + name
    return directory if is_local(fs) else fs.unstrip_protocol(directory)


# --------------------------------------------------------------------------------------------
# Configuration changes on resume

_MISSING = object()


def _normalized(value: Any) -> Any:
    """Lists and tuples compare equal: a saved config went through JSON, a current one may not have."""
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    return value


def _changed_keys(saved: Any, current: Any, prefix: str) -> list[str]:
    if saved is _MISSING and current is _MISSING:
        return []
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = sorted(set(saved) | set(current), key=str)
        return [changed for key in keys
                for changed in _changed_keys(saved.get(key, _MISSING), current.get(key, _MISSING), f"{prefix}.{key}")]
    if saved is _MISSING or current is _MISSING or _normalized(saved) != _normalized(current):
        return [prefix]
    return []


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   sections: Sequence[str] = ("model", "data")) -> list[str]:
    """Dotted keys (`model.hidden_size`) whose values differ between two nested configs within the
    given top-level sections; a key on one side only counts as changed."""
    return [key for section in sections
            for key in _changed_keys(saved.get(section, _MISSING), current.get(section, _MISSING), section)]


def _shown_value(config: Mapping[str, Any], dotted: str) -> str:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "(absent)"
        value = value[part]
    return _shorten(value, 40)


def _is_allowed(key: str, allowed: Sequence[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in allowed)


def check_config_change(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: Sequence[str] | str = (),
                        *, sections: Sequence[str] = ("model", "data"), where: str = "the checkpoint") -> None:
    """Refuse to resume under a changed model or data config unless each change was allowed by name:
    a silently different run under the old run's name would make its curves and checkpoints lie."""
    entries = [a.strip() for a in (allowed.split(",") if isinstance(allowed, str) else allowed) if a.strip()]
    refused = [key for key in config_changes(saved, current, sections) if not _is_allowed(key, entries)]
    if not refused:
        return
    changes = "; ".join(f"{key}: {_shown_value(saved, key)} -> {_shown_value(current, key)}" for key in refused)
    raise CheckpointError(f"{where} was trained with a different configuration: {changes}. To resume anyway, pass "
                          f"`--run.allow_config_change {','.join(refused)}`; to train the new configuration "
                          f"separately, use a new run.name")


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """`convert <checkpoint_dir>`: the one way to read a format-1 training state, asked for by
    name so that a resume never does it on its own."""
    parser = argparse.ArgumentParser(prog="python -m bertray.train.checkpoints",
                                     description="Maintenance of bertray training checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help=f"rewrite a format-1 {TRAINING_STATE} in the current format")
    convert.add_argument("checkpoint_dir", help=f"a local checkpoint directory holding {TRAINING_STATE}")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint_dir) / TRAINING_STATE
    try:
        converted = convert_training_state(args.checkpoint_dir)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if converted:
        print(f"{path}: converted from format 1 to format {TRAINING_STATE_FORMAT} (numpy RNG state stored as a "
              f"tensor); it now loads with torch.load(weights_only=True)")
    else:
        print(f"{path}: already format {TRAINING_STATE_FORMAT}; left unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
