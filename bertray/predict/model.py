"""A fine-tuned model folder (Hugging Face layout) loaded for inference.

The folder is what `save_pretrained` + `bertray.wordpiece.save` write, and what `transformers`
writes: `config.json` (its `architectures` names the head, `id2label` the label names,
`problem_type: regression` a one-output regression head such as STS-B's), `model.safetensors`
(or `pytorch_model.bin`) and the tokenizer files. The model runs in bertray's own encoder, whose
packed path skips padding tokens; a remote folder (s3://...) is downloaded once per machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bertray.errors import CheckpointError, ConfigError

# Head class (config.json `architectures`) -> what the model predicts.
KINDS = {"BertForSequenceClassification": "classification", "BertForQuestionAnswering": "span"}
# Heads that are saved by fine-tuning but have no prediction format here yet.
NOT_SERVED = {"BertForTokenClassification": "token tags (NER)", "BertForMultipleChoice": "multiple choice (SWAG)",
              "BertFeatureBasedTagger": "feature-based token tags"}
DEFAULT_MAX_SEQ_LEN = {"classification": 128, "regression": 128, "span": 384}


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and what its outputs mean.

    `kind`: "classification" (argmax over `labels`), "regression" (one number) or "span" (an
    answer cut out of a context). Not thread-safe: a `tokenizers.Tokenizer` must not be used by
    two threads at once, so give each actor or replica its own (`load_model` there)."""

    path: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    kind: str
    labels: tuple[str, ...]
    max_seq_len: int
    device: torch.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size


def read_head(folder: str | os.PathLike) -> tuple[str, str, tuple[str, ...]]:
    """(architecture, kind, label names) from a folder's config.json, with errors that say what to pass."""
    config_file = Path(folder) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json; pass a fine-tuned model folder in the Hugging Face "
                              f"layout (a sweep saves them under <output>/latest/models/<row>/<task>/)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    architectures = data.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture in NOT_SERVED:
        raise ConfigError(f"{config_file}: architectures: {architecture} ({NOT_SERVED[architecture]}) is not "
                          f"supported for prediction; supported heads: {', '.join(KINDS)}")
    if architecture not in KINDS:
        raise ConfigError(f"{config_file}: architectures: {architecture!r} is not a fine-tuned head this can "
                          f"predict with; expected one of {', '.join(KINDS)} (a pretraining checkpoint has no "
                          f"task head: fine-tune it first, flows/finetune.py)")
    kind = KINDS[architecture]
    id2label = data.get("id2label") or {}
    labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    if kind == "classification" and (data.get("problem_type") == "regression" or len(labels) == 1):
        kind = "regression"
    if kind == "classification" and len(labels) < 2:
        raise ConfigError(f"{config_file}: id2label: a classification head needs at least two labels, "
                          f"got {id2label!r}")
    return architecture, kind, labels


def load_model(path: str | os.PathLike, *, device: str | torch.device | None = None,
               max_seq_len: int | None = None, cache_dir: str | None = None,
               threads: int | None = None) -> LoadedModel:
    """Load a fine-tuned folder (local path or fsspec URL) onto `device` (default: a GPU if there
    is one), in eval mode, without dropout. `max_seq_len`: longer inputs are truncated (default
    128 for classification, 384 for question answering, never above the model's positions)."""
    from bertray import wordpiece
    from bertray.model import heads
    from bertray.train.checkpoints import local_checkpoint

    if threads:
        torch.set_num_threads(threads)
    folder = local_checkpoint(os.fspath(path), cache_dir)
    architecture, kind, labels = read_head(folder)
    model = getattr(heads, architecture).from_pretrained(folder, hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    limit = model.config.max_position_embeddings
    max_seq_len = max_seq_len or DEFAULT_MAX_SEQ_LEN[kind]
    if not 8 <= max_seq_len <= limit:
        raise ConfigError(f"max_seq_len: must be in [8, {limit}] (the model's max_position_embeddings), "
                          f"got {max_seq_len}")
    return LoadedModel(path=os.fspath(path), model=model, tokenizer=wordpiece.load(folder), kind=kind,
                       labels=labels, max_seq_len=max_seq_len, device=device)
