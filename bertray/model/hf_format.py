"""Checkpoint folders in the Hugging Face BERT layout <-> state dicts.

A checkpoint folder holds `config.json` (Hugging Face `BertConfig` keys) and `model.safetensors`
(or, from older tools, `pytorch_model.bin`) whose tensor names are those of `transformers`'
`BertModel` (no prefix) or of a model with heads (`bert.` prefix on the encoder: `BertForPreTraining`,
`BertForSequenceClassification`, ...). bertray's module names produce those keys directly, so the
only work here is the set of rules that lets one layout load into another model class
(`fit_state_dict`) and robust file I/O with errors that say what to do.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bertray.model.config import BertConfig
from bertray.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"

# The prefix of the encoder's keys in a model with heads.
ENCODER_PREFIX = "bert."

# Tensors that are the same parameter as another (the MLM decoder is the input embedding
# matrix, its bias the head's `bias`). They are not written, as Hugging Face does not write them,
# and when a checkpoint has them they are not loaded separately.
TIED_KEYS: dict[str, str] = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

# Buffers some writers save that carry no learned state.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

# A missing or unexpected tensor under these is an error: the encoder must load completely.
# The pooler is not among them: Hugging Face builds some task models without one
# (`add_pooling_layer=False`), so it is treated like a head (fresh when missing, ignored when extra).
_ENCODER_PARTS = ("embeddings.", "encoder.")


@dataclass(frozen=True)
class FittedState:
    """A checkpoint's tensors renamed for one model, and what did not carry over."""

    tensors: dict[str, torch.Tensor]
    fresh: tuple[str, ...]      # model tensors the checkpoint lacks (left as initialised)
    ignored: tuple[str, ...]    # checkpoint tensors the model has no place for


# --------------------------------------------------------------------------------------------
# Files


def load_state_dict(path: str | os.PathLike) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint folder: its config and its tensors, names as written (plus old-name fixes).

    Raises `CheckpointError` for a missing folder or file and for a corrupt or truncated one.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass the folder that holds "
                              f"{CONFIG_NAME} and {SAFETENSORS_NAME} (for example runs/pretrain/latest)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that holds {CONFIG_NAME} "
                              f"and {SAFETENSORS_NAME}, not a file inside it")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: a checkpoint folder needs the model's "
                              f"{CONFIG_NAME} next to its weights; copy it from where the checkpoint came "
                              f"from, or re-save the model with save_pretrained")
    try:
        config = BertConfig.from_json_file(config_file)
    except ConfigError as exc:
        raise CheckpointError(f"{config_file} is not a usable BERT config: {exc}") from exc
    return config, normalize_names(_read_tensors(folder))


def verify_checkpoint(url: str) -> BertConfig:
    """Check, without reading the weights, that a checkpoint folder at any fsspec URL will load: its
    config parses and its `model.safetensors` header is whole and the file as long as the header
    says (a truncated download, a partial copy). For drivers to check once what every trial or
    worker will read, before they start. Raises `CheckpointError` naming the file."""
    import json

    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    where = url.rstrip("/")
    try:
        with fs.open(f"{root}/{CONFIG_NAME}", "rb") as f:
            config = BertConfig.from_dict(json.loads(f.read()))
    except FileNotFoundError:
        raise CheckpointError(f"{where}/{CONFIG_NAME}: no such file; a checkpoint folder holds {CONFIG_NAME} "
                              f"and {SAFETENSORS_NAME}") from None
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{where}/{CONFIG_NAME} is not a usable BERT config: {exc}") from None
    weights = f"{root}/{SAFETENSORS_NAME}"
    if not fs.isfile(weights):
        if fs.isfile(f"{root}/{PYTORCH_NAME}"):
            return config
        raise CheckpointError(f"{where} has no {SAFETENSORS_NAME} (or {PYTORCH_NAME})")
    _safetensors_header(fs, weights, f"{where}/{SAFETENSORS_NAME}")
    return config


def _safetensors_header(fs: Any, path: str, where: str) -> dict[str, Any]:
    """The tensor table of a `model.safetensors` (name -> dtype, shape, offsets), read without the
    weights, after checking that the file is as long as the table says."""
    import json

    size = fs.size(path)
    try:
        with fs.open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{where} is corrupt or truncated ({exc}); re-download it "
                              f"or re-save the checkpoint") from None
    if size != 8 + length + end:
        raise CheckpointError(f"{where} is truncated or padded: {size} bytes where its "
                              f"header says {8 + length + end}; re-download it or re-save the checkpoint")
    return header


def tensor_shapes(url: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's name (after `normalize_names`) and shape in the checkpoint folder at `url`
    (any fsspec URL), without reading the weights of a `model.safetensors`: what a driver needs to
    decide, before any worker starts, whether the checkpoint fits a model and which heads it has."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root, where = root.rstrip("/"), url.rstrip("/")
    weights = f"{root}/{SAFETENSORS_NAME}"
    if fs.isfile(weights):
        header = _safetensors_header(fs, weights, f"{where}/{SAFETENSORS_NAME}")
        shapes = {name: tuple(t["shape"]) for name, t in header.items()}
    elif fs.isfile(f"{root}/{PYTORCH_NAME}"):
        with tempfile.TemporaryDirectory() as local:
            fs.get_file(f"{root}/{PYTORCH_NAME}", os.path.join(local, PYTORCH_NAME))
            shapes = {name: tuple(t.shape) for name, t in _read_tensors(Path(local)).items()}
    else:
        raise CheckpointError(f"{where} has no {SAFETENSORS_NAME} (or {PYTORCH_NAME})")
    return normalize_names(shapes)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file, pytorch_file = folder / SAFETENSORS_NAME, folder / PYTORCH_NAME
    if safetensors_file.is_file():
        try:
            return load_file(safetensors_file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{safetensors_file} is corrupt or truncated ({exc}); re-download it or "
                                  f"re-save the checkpoint") from exc
    if pytorch_file.is_file():
        try:
            tensors = torch.load(pytorch_file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{pytorch_file} is corrupt or truncated ({exc}); re-download it or "
                                  f"re-save the checkpoint") from exc
        if not isinstance(tensors, Mapping) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise CheckpointError(f"{pytorch_file} does not hold a flat state dict of tensors; save "
                                  f"model.state_dict() (or use save_pretrained)")
        return dict(tensors)
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise CheckpointError(f"{folder} has no {SAFETENSORS_NAME} (or {PYTORCH_NAME}); it holds: {present}. "
                          f"Point at a complete checkpoint folder or re-save the model with save_pretrained")


def save_state_dict(path: str | os.PathLike, config: BertConfig, tensors: Mapping[str, torch.Tensor],
                    architectures: list[str], extra_config: Mapping[str, Any] | None = None) -> None:
    """Write `config.json` and `model.safetensors` into `path` (created if needed).

    Tied duplicates (`TIED_KEYS`) are left out. Each file is written under a temporary name and
    renamed, so a crash mid-write never leaves a truncated checkpoint under the real name.
    `extra_config` adds keys to `config.json` that describe the model's use rather than its
    architecture (`problem_type`, `finetuning_task`, ...): `transformers` reads them, bertray's
    `BertConfig` ignores them when loading.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()
           if not (name in TIED_KEYS and TIED_KEYS[name] in tensors)}
    _atomic_write(folder / SAFETENSORS_NAME, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME,
                  lambda tmp: config.to_json_file(tmp, architectures=architectures, extra=extra_config))


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Key rules


def normalize_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Drop stateless buffers and rename TF-era LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        stem, _, leaf = name.rpartition(".")
        if leaf in ("gamma", "beta"):
            name = f"{stem}.{'weight' if leaf == 'gamma' else 'bias'}"
        out[name] = tensor
    return out


def _is_encoder_key(name: str, prefix: str) -> bool:
    return name.startswith(tuple(prefix + part for part in _ENCODER_PARTS))


def fit_state_dict(tensors: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor | torch.Size],
                   source: str | os.PathLike = "checkpoint") -> FittedState:
    """Rename a checkpoint's tensors for a model whose state dict has keys and shapes `target`.

    Rules:
    - a checkpoint of the bare encoder (no prefix) loads into a model with `.bert` under `bert.`;
      a checkpoint with heads (`bert.` prefix) loads into the bare encoder with the prefix stripped;
    - tied tensors (`TIED_KEYS`) are not loaded on their own; an old checkpoint that only has
      `cls.predictions.decoder.bias` gives it to `cls.predictions.bias`;
    - heads (and the pooler) the checkpoint lacks are reported as `fresh`; checkpoint tensors of
      heads the model lacks are reported as `ignored`;
    - an encoder tensor (embeddings, layers) missing from either side, or any shape mismatch,
      raises `CheckpointError` naming every such tensor.
    """
    shapes = {name: tuple(t.shape) for name, t in target.items()
              if not (name in TIED_KEYS and TIED_KEYS[name] in target)}
    prefixed = any(name.startswith(ENCODER_PREFIX) for name in shapes)
    prefix = ENCODER_PREFIX if prefixed else ""

    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if prefixed and not name.startswith(ENCODER_PREFIX) and name.startswith(("embeddings.", "encoder.", "pooler.")):
            name = ENCODER_PREFIX + name
        elif not prefixed and name.startswith(ENCODER_PREFIX):
            name = name[len(ENCODER_PREFIX):]
        renamed[name] = tensor
    for tied, owner in TIED_KEYS.items():
        if tied in renamed:
            tensor = renamed.pop(tied)
            if owner not in renamed and not _is_encoder_key(owner, ENCODER_PREFIX):
                renamed[owner] = tensor

    missing = sorted(set(shapes) - set(renamed))
    unexpected = sorted(set(renamed) - set(shapes))
    problems = []
    if lost := [n for n in missing if _is_encoder_key(n, prefix)]:
        problems.append(f"missing encoder tensor(s): {', '.join(lost)}")
    if extra := [n for n in unexpected if _is_encoder_key(n, prefix)]:
        problems.append(f"unexpected encoder tensor(s) the model has no place for: {', '.join(extra)}")
    for name in sorted(set(shapes) & set(renamed)):
        if tuple(renamed[name].shape) != shapes[name]:
            problems.append(f"shape mismatch for {name}: checkpoint has {tuple(renamed[name].shape)}, "
                            f"model expects {shapes[name]}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model ({'; '.join(problems)}). Check that "
                              f"config.json matches the weights, or pass the config the checkpoint was "
                              f"trained with")
    fresh = tuple(n for n in missing if not _is_encoder_key(n, prefix))
    ignored = tuple(n for n in unexpected if not _is_encoder_key(n, prefix))
    loaded = {name: renamed[name] for name in shapes if name in renamed}
    return FittedState(tensors=loaded, fresh=fresh, ignored=ignored)


def load_into(model: nn.Module, tensors: Mapping[str, torch.Tensor],
              source: str | os.PathLike = "checkpoint") -> FittedState:
    """Copy a checkpoint's tensors into `model` in place (ties survive), logging what did not carry over."""
    fitted = fit_state_dict(tensors, model.state_dict(), source=source)
    if fitted.fresh:
        log.warning("%s: not in %s, freshly initialised: %s", type(model).__name__, source, ", ".join(fitted.fresh))
    if fitted.ignored:
        log.info("%s: ignored tensors of %s the model has no place for: %s",
                 type(model).__name__, source, ", ".join(fitted.ignored))
    model.load_state_dict(fitted.tensors, strict=False)
    return fitted


__all__ = ["CONFIG_NAME", "SAFETENSORS_NAME", "PYTORCH_NAME", "ENCODER_PREFIX", "TIED_KEYS", "FittedState",
           "load_state_dict", "save_state_dict", "normalize_names", "fit_state_dict", "load_into"]
