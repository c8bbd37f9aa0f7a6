"""Training checkpoints: a Hugging Face-layout model directory plus the training state beside it.

    config.json, model.safetensors          the model (transformers.BertForPreTraining loads these)
    tokenizer.json, vocab.txt               the WordPiece vocabulary the model was trained with
    training_state.pt                       optimizer, scheduler, RNG states, fp16 loss scale
    bertray_state.json                      step, phase, data position, metrics, the run's config

Ray moves these directories to storage (`ray.train.report`) and hands them back on resume
(`ray.train.get_checkpoint`); this module only reads and writes local directories.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from bertray.errors import CheckpointError

LATEST = "latest"          # a text file in the run directory naming its newest checkpoint
TRAINING_STATE = "training_state.pt"
RUN_STATE = "bertray_state.json"


@dataclass
class RunState:
    """Where training stands. The data position is `step`/`sequences_seen`: a resumed stream starts
    a new generation of draws (see `bertray.data.pipeline`) rather than replaying the old one."""

    step: int = 0
    sequences_seen: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)   # logged intervals up to `step`


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, tokenizer: Any,
                             optimizer: torch.optim.Optimizer, scheduler: Any, run_state: RunState,
                             step_state: dict[str, Any] | None = None) -> Path:
    """Write a complete checkpoint into `directory` (created if needed). `step_state`: the training
    step's own state (the fp16 loss scale)."""
    from bertray import tokenizer as wordpiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    wordpiece.save(tokenizer, directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "step": step_state or {}},
               directory / TRAINING_STATE)
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


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Optimizer, scheduler and RNG states, or a `CheckpointError` saying why they are unusable."""
    path = Path(directory) / TRAINING_STATE
    if not path.exists():
        raise CheckpointError(f"{path}: missing; cannot resume the optimizer from {directory}")
    try:
        # RNG states hold numpy arrays and Python tuples; the file is our own, written by this module.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated ({type(exc).__name__}: {exc})") from None


def resolve_checkpoint(url: str) -> str:
    """A checkpoint directory URL; a run directory or a `latest` file is followed to its newest checkpoint."""
    fs, path = fsspec.core.url_to_fs(url)
    pointer = path if path.endswith("/" + LATEST) else path.rstrip("/") + "/" + LATEST
    if not fs.isfile(pointer):
        return url
    name = fs.cat_file(pointer).decode().strip()
    directory = os.path.dirname(pointer) + "/" + name
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return directory if local else fs.unstrip_protocol(directory)
