"""The BERT architecture's configuration, with Hugging Face's key names so `config.json` moves
both ways, and Google's released sizes as presets."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

from bertray.config import from_mapping, to_mapping
from bertray.errors import ConfigError, check

log = logging.getLogger(__name__)


# Google's released BERT sizes (Turc et al. 2019 for the small ones): (layers, hidden, heads).
MODEL_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}

HIDDEN_ACTS = ("gelu", "gelu_new", "relu")

# Keys that Hugging Face writes into config.json and that do not change the architecture we build.
_HF_METADATA_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "gradient_checkpointing", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "label2id", "problem_type", "finetuning_task", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript", "chunk_size_feed_forward", "num_labels", "directionality",
    "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers", "pooler_size_per_head",
    "pooler_type", "id2label_", "task_specific_params", "tokenizer_class", "bertray",
    "threshold",                  # a multi-label head's decision threshold (bertray's fine-tuning export)
})


@dataclass(frozen=True)
class BertConfig:
    """The BERT architecture, with Hugging Face's key names so `config.json` moves both ways.

    `is_causal` is bertray's left-to-right ablation (paper Table 5, "LTR & No NSP"); it is written
    to `config.json` as Hugging Face's `is_decoder`, which gives the same causal self-attention there.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    is_causal: bool = False
    classifier_dropout: float | None = None
    id2label: dict[int, str] | None = None

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                  f"must be a positive integer, got {value!r}")
        check(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
              f"must divide hidden_size={self.hidden_size}; got {self.num_attention_heads} "
              f"(allowed: a divisor of {self.hidden_size})")
        check(self.hidden_act in HIDDEN_ACTS, "hidden_act",
              f"{self.hidden_act!r} is not supported; choose one of {', '.join(HIDDEN_ACTS)}")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, key)
            check(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value!r}")
        if self.classifier_dropout is not None:
            check(0.0 <= self.classifier_dropout < 1.0, "classifier_dropout",
                  f"must be in [0, 1) or null, got {self.classifier_dropout!r}")
        check(self.initializer_range > 0, "initializer_range", f"must be > 0, got {self.initializer_range!r}")
        check(0 < self.layer_norm_eps < 1, "layer_norm_eps", f"must be in (0, 1), got {self.layer_norm_eps!r}")
        check(0 <= self.pad_token_id < self.vocab_size, "pad_token_id",
              f"must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id!r}")
        if self.id2label is not None:
            labels = {int(k): str(v) for k, v in self.id2label.items()}
            check(sorted(labels) == list(range(len(labels))), "id2label",
                  f"ids must be 0..n-1, got {sorted(labels)}")
            object.__setattr__(self, "id2label", labels)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BertConfig":
        """A Google-released size: tiny, mini, small, medium, base or large (intermediate = 4H)."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"model preset {name!r} is unknown; choose one of {', '.join(MODEL_PRESETS)}")
        layers, hidden, heads = MODEL_PRESETS[name]
        base = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                    intermediate_size=4 * hidden)
        return from_mapping(cls, {**base, **overrides})

    def replace(self, **changes: Any) -> "BertConfig":
        return from_mapping(BertConfig, {**self.to_dict(hf=False), **changes})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BertConfig":
        """From a Hugging Face `config.json` mapping. Architecture keys we do not implement raise."""
        data = dict(data)
        if data.get("model_type", "bert") != "bert":
            raise ConfigError(f"model_type: {data['model_type']!r} is not a BERT model (expected 'bert')")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type: only 'absolute' is supported, got "
                              f"{data['position_embedding_type']!r}")
        data.pop("position_embedding_type", None)
        if data.pop("add_cross_attention", False):
            raise ConfigError("add_cross_attention: cross-attention is not supported")
        if "is_decoder" in data:
            data.setdefault("is_causal", bool(data.pop("is_decoder")))
        return from_mapping(cls, data, ignore=_HF_METADATA_KEYS)

    def to_dict(self, *, hf: bool = True) -> dict[str, Any]:
        """As a Hugging Face `config.json` mapping (hf=True) or as this dataclass's fields."""
        out = to_mapping(self)
        if not hf:
            return out
        out["is_decoder"] = out.pop("is_causal")
        if out["id2label"] is None:
            out.pop("id2label")
        else:
            out["label2id"] = {v: int(k) for k, v in out["id2label"].items()}   # transformers keeps ids as given
        out.update(model_type="bert", position_embedding_type="absolute", tie_word_embeddings=True)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_json_file(self, path: str | os.PathLike, *, architectures: list[str] | None = None,
                     extra: Mapping[str, Any] | None = None) -> None:
        data = self.to_dict()
        if architectures:
            data["architectures"] = architectures
        data.update(extra or {})
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
