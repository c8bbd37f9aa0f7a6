"""A fine-tuned model folder (Hugging Face layout) loaded for inference.

The folder is what `save_pretrained` + `bertray.wordpiece.save` write, and what `transformers`
writes: `config.json` (its `architectures` names the head, `id2label` the label names,
`problem_type` regression or multilabel for those sequence heads, `threshold` a multilabel
head's; `bertray.predict.kinds` reads it), `model.safetensors` (or `pytorch_model.bin`) and the
tokenizer files. The model runs in bertray's own encoder, whose packed path skips padding tokens;
a remote folder (s3://...) is downloaded once per machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from bertray.errors import ConfigError
from bertray.predict.kinds import KINDS, Kind, read_head


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and what its outputs mean.

    `kind`: a name in `bertray.predict.kinds.KINDS`: "classification" (argmax over `labels`),
    "regression" (one number), "multilabel" (every label over `threshold`), "span" (an answer cut
    out of a context) or "token" (entities of a text). Not thread-safe: a `tokenizers.Tokenizer`
    must not be used by two threads at once, so give each actor or replica its own (`load_model`
    there)."""

    path: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    kind: str
    labels: tuple[str, ...]
    max_seq_len: int
    device: torch.device
    threshold: float | None = None

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def spec(self) -> Kind:
        """The kind's entry: inputs, how to run it, its output columns and answers."""
        return KINDS[self.kind]


def load_model(path: str | os.PathLike, *, device: str | torch.device | None = None,
               max_seq_len: int | None = None, cache_dir: str | None = None,
               threads: int | None = None) -> LoadedModel:
    """Load a fine-tuned folder (local path or fsspec URL) onto `device` (default: a GPU if there
    is one), in eval mode, without dropout. `max_seq_len`: longer inputs are truncated (default:
    the length the model was fine-tuned at, as the sweep records it in config.json, else 128, 384
    for question answering; never above the model's positions); a token tagger cuts longer texts
    into windows of that many tokens instead."""
    from bertray import wordpiece
    from bertray.model import heads
    from bertray.runtime.checkpoint_cache import local_checkpoint

    if threads:
        torch.set_num_threads(threads)
    folder = local_checkpoint(os.fspath(path), cache_dir)
    head = read_head(folder)
    model = getattr(heads, head.architecture).from_pretrained(folder, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    limit = model.config.max_position_embeddings
    max_seq_len = max_seq_len or min(head.trained_seq_len or head.kind.max_seq_len, limit)
    if not 8 <= max_seq_len <= limit:
        raise ConfigError(f"max_seq_len: must be in [8, {limit}] (the model's max_position_embeddings), "
                          f"got {max_seq_len}")
    return LoadedModel(path=os.fspath(path), model=model, tokenizer=wordpiece.load(folder), kind=head.kind.name,
                       labels=head.labels, max_seq_len=max_seq_len, device=device, threshold=head.threshold)
