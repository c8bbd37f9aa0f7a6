"""Continued pretraining: a run with `model.init_from` takes the checkpoint as a whole.

A checkpoint's weights only mean something with its own vocabulary (row i of the embedding table
is token i of *its* `vocab.txt`) and its own architecture, so both come from the checkpoint, and a
run setting that says otherwise is refused before anything starts rather than quietly obeyed:
feeding another vocabulary's ids into those embeddings trains every token from another word's
vector, and saving that pairs the checkpoint's `config.json` with a tokenizer it never saw.

Everything here runs on the driver and reads only `config.json`, the tokenizer files and the
safetensors header (never the weights), so a mismatch costs seconds, even for a remote checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from bertray import wordpiece
from bertray.errors import ConfigError
from bertray.model.config import MODEL_PRESETS, BertConfig
from bertray.model.hf_format import fit_state_dict, load_state_dict, tensor_shapes, verify_checkpoint
from bertray.storage import absolute_url, redact_url
from bertray.runtime.checkpoint_cache import local_checkpoint
from bertray.train.checkpoints import resolve_checkpoint
from bertray.train.config import PretrainConfig

# BertConfig keys that fix the shape of the weights: a run cannot change them and keep the checkpoint.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "hidden_act")

# The pretraining heads and the key prefix of each in the Hugging Face layout.
HEADS = {"MLM": "cls.predictions.", "NSP": "cls.seq_relationship."}


@dataclass(frozen=True)
class StartingCheckpoint:
    """The checkpoint a run starts from, as the run will use it."""

    url: str                      # the checkpoint folder (a run directory or `latest` followed)
    config: BertConfig            # its architecture, with the run's dropout and attention settings
    tokenizer: Tokenizer          # its vocabulary
    loaded_heads: tuple[str, ...]     # pretraining heads whose weights the checkpoint has
    fresh_heads: tuple[str, ...]      # pretraining heads it lacks (freshly initialised)
    parameters: int               # of the model trained (the encoder and both heads)

    def describe(self) -> str:
        c = self.config
        return (f"from {redact_url(self.url)} ({c.num_hidden_layers} layers, {c.hidden_size} wide, "
                f"{self.parameters / 1e6:.1f}M parameters, vocabulary of {self.tokenizer.get_vocab_size():,})")

    def heads_line(self) -> str:
        """One line for the console: which heads carry over."""
        parts = []
        if self.loaded_heads:
            parts.append(f"{' and '.join(self.loaded_heads)} head{'s' * (len(self.loaded_heads) > 1)} loaded "
                         "from the checkpoint")
        if self.fresh_heads:
            parts.append(f"{' and '.join(self.fresh_heads)} head{'s' * (len(self.fresh_heads) > 1)} freshly "
                         "initialised (the checkpoint has none)")
        return f"init_from: encoder loaded; {'; '.join(parts)}"


def starting_checkpoint(cfg: PretrainConfig) -> StartingCheckpoint | None:
    """The run's `model.init_from` checkpoint, checked against the run's settings; None without one.

    Raises `ConfigError` naming both sides where a setting disagrees with the checkpoint (its
    vocabulary, its size, its longest sequence), and `CheckpointError` where the folder is
    incomplete or its weights do not fit its own `config.json`."""
    if not cfg.model.init_from:
        return None
    url = resolve_checkpoint(absolute_url(cfg.model.init_from))
    config = verify_checkpoint(url)
    try:
        tokenizer = wordpiece.load(url)
    except ConfigError as exc:
        raise ConfigError(f"model.init_from: {exc}. A checkpoint to continue from carries its own vocabulary "
                          "(tokenizer.json or vocab.txt beside config.json)") from None
    problems = disagreements(cfg, config, tokenizer, wordpiece.load(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if problems:
        raise ConfigError(f"model.init_from {redact_url(url)}: the run's settings disagree with the checkpoint:\n"
                          + "".join(f"  - {p}\n" for p in problems)
                          + "With model.init_from the architecture and the vocabulary are the checkpoint's: leave "
                            "model.preset, the size keys of model.overrides and data.tokenizer unset (e.g. "
                            "--model.preset null --data.tokenizer null), or start from "
                            "flows/configs/continue-pretraining.yaml")
    sized = {k: v for k, v in cfg.model.overrides.items() if k not in ARCHITECTURE_KEYS}
    config = config.replace(**sized, is_causal=cfg.data.objective == "ltr")
    with torch.device("meta"):
        from bertray.model.heads import BertForPreTraining

        model = BertForPreTraining(config)
    shapes = {name: torch.empty(shape, device="meta") for name, shape in tensor_shapes(url).items()}
    fitted = fit_state_dict(shapes, model.state_dict(), source=redact_url(url))
    fresh = tuple(head for head, prefix in HEADS.items() if any(n.startswith(prefix) for n in fitted.fresh))
    return StartingCheckpoint(url=url, config=config, tokenizer=tokenizer,
                              loaded_heads=tuple(h for h in HEADS if h not in fresh), fresh_heads=fresh,
                              parameters=sum(p.numel() for p in model.parameters()))


def load_starting_weights(model: torch.nn.Module, url: str) -> None:
    """The checkpoint's tensors into a freshly built model, on the node that trains it: heads the
    checkpoint lacks keep their initialisation (`starting_checkpoint` said which, once, on the driver)."""
    _, tensors = load_state_dict(local_checkpoint(url))
    model.load_state_dict(fit_state_dict(tensors, model.state_dict(), source=url).tensors, strict=False)


def disagreements(cfg: PretrainConfig, config: BertConfig, tokenizer: Tokenizer,
                  run_tokenizer: Tokenizer | None) -> list[str]:
    """What in the run's settings contradicts the checkpoint, each naming both sides."""
    problems = []
    if run_tokenizer is not None:
        difference = vocabulary_difference(tokenizer, run_tokenizer)
        if difference:
            problems.append(f"data.tokenizer {cfg.data.tokenizer}: {difference}")
    if tokenizer.get_vocab_size() > config.vocab_size:
        problems.append(f"the checkpoint's tokenizer has {tokenizer.get_vocab_size():,} tokens but its config.json "
                        f"vocab_size (embedding rows) is {config.vocab_size:,}")
    if cfg.model.preset is not None:
        layers, hidden, heads = MODEL_PRESETS[cfg.model.preset]
        preset = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                  "intermediate_size": 4 * hidden}
        differ = [k for k, v in preset.items() if getattr(config, k) != v]
        if differ:
            problems.append(f"model.preset {cfg.model.preset!r} has " + ", ".join(f"{k} {preset[k]}" for k in differ)
                            + "; the checkpoint has " + ", ".join(f"{k} {getattr(config, k)}" for k in differ))
    for key in ARCHITECTURE_KEYS:
        if key in cfg.model.overrides and cfg.model.overrides[key] != getattr(config, key):
            problems.append(f"model.overrides.{key} is {cfg.model.overrides[key]!r}; the checkpoint's is "
                            f"{getattr(config, key)!r}")
    for i, phase in enumerate(cfg.train.phases):
        if phase.max_seq_len > config.max_position_embeddings:
            problems.append(f"train.phases[{i}].max_seq_len {phase.max_seq_len} is longer than the checkpoint's "
                            f"max_position_embeddings {config.max_position_embeddings}")
    if cfg.data.objective == "mlm_nsp" and config.type_vocab_size < 2:
        problems.append(f"data.objective mlm_nsp needs two segment types; the checkpoint's type_vocab_size is "
                        f"{config.type_vocab_size} (use data.objective mlm)")
    return problems


def vocabulary_difference(checkpoint: Tokenizer, other: Tokenizer, shown: int = 3) -> str | None:
    """How `other` differs from the checkpoint's vocabulary (sizes, the first differing ids, casing),
    or None where the two give the same ids."""
    ours, theirs = _tokens_by_id(checkpoint), _tokens_by_id(other)
    differ = [i for i in range(min(len(ours), len(theirs))) if ours[i] != theirs[i]][:shown]
    if len(ours) == len(theirs) and not differ:
        cased = wordpiece.lowercases(checkpoint), wordpiece.lowercases(other)
        if cased[0] == cased[1]:
            return None
        return (f"the same {len(ours):,} tokens, but it {'lower-cases' if cased[1] else 'keeps the case of'} its input "
                f"and the checkpoint's tokenizer {'does' if cased[0] else 'does not'}")
    first = "; ".join(f"id {i}: {theirs[i]!r} here, {ours[i]!r} in the checkpoint" for i in differ)
    return (f"{len(theirs):,} tokens against the checkpoint's {len(ours):,}"
            + (f"; first differing ids: {first}" if first else f"; the first {min(len(ours), len(theirs)):,} agree"))


def _tokens_by_id(tokenizer: Tokenizer) -> list[Any]:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens: list[Any] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens
