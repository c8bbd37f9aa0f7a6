"""Typed configuration: the model (`BertConfig`, Hugging Face key names) and the helpers that
turn plain mappings (YAML, JSON, command-line overrides) into validated dataclasses.

Validation happens once, here, at the edge: a bad value raises `ConfigError` naming the key and
what is allowed, and nothing deeper in the library re-parses configuration.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeVar

from bertray.errors import ConfigError
from bertray.labels import selector_problem
from bertray.storage import credential_keys, has_credentials, redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Generic mapping -> dataclass conversion


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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


def check(condition: bool, key: str, message: str) -> None:
    """Raise `ConfigError("key: message")` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_no_credentials(key: str, urls: str | tuple[str, ...] | None) -> None:
    """A URL with user:password would be printed, logged, shipped to every task and saved in every
    checkpoint with the run's config: refused, with the URL shown redacted."""
    for url in (urls,) if isinstance(urls, str) else (urls or ()):
        check(not has_credentials(url), key,
              f"{redact_url(url)}: credentials in a URL are refused (they would land in logs, configs and "
              "checkpoints); give them through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
              "GOOGLE_APPLICATION_CREDENTIALS) or an instance role / service account")


# --------------------------------------------------------------------------------------------
# Model configuration


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
    """A command-line value as YAML (so `100`, `1e-4`, `true`, `[a, b]` and `null` mean what they say)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """`cls` from an optional YAML file plus dotted overrides (`{"train.max_steps": 100}`)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
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


# --------------------------------------------------------------------------------------------
# Pretraining


@dataclass(frozen=True)
class ModelSection:
    preset: str = doc("tiny", "model size: tiny, mini, small, medium, base or large (Google's released sizes)")
    overrides: dict[str, Any] = doc({}, "BertConfig fields that replace the preset's (e.g. {hidden_dropout_prob: 0.0})")
    init_from: str | None = doc(None, "start from this checkpoint directory (Hugging Face layout) instead of random weights")

    def bert_config(self, vocab_size: int, *, is_causal: bool) -> BertConfig:
        return BertConfig.preset(self.preset, **{"vocab_size": vocab_size, "is_causal": is_causal, **self.overrides})

    def __post_init__(self) -> None:
        self.bert_config(30522, is_causal=False)  # validates preset and overrides at the edge
        check_no_credentials("model.init_from", self.init_from)


@dataclass(frozen=True)
class DataSection:
    corpus: tuple[str, ...] = doc((), "corpus URLs, globs or directories: local paths, s3://, gs://, any fsspec URL")
    eval_corpus: tuple[str, ...] = doc((), "held-out corpus for the fixed-mask evaluation (empty: the documents "
                                           "data.holdout_fraction keeps out of training, or no evaluation); its "
                                           "files must not be training files")
    holdout_fraction: float = doc(0.0, "share of data.corpus documents (chosen by a hash of file name and position) "
                                       "never trained on; they are the held-out evaluation set unless "
                                       "data.eval_corpus is given")
    format: Literal["auto", "text", "jsonl", "parquet"] = doc("auto", "file format (auto: by extension)")
    layout: str = doc("bert", "corpus layout preset: bert (sentence per line, blank line between documents), "
                              "wikitext, gutenberg, paragraphs")
    document_boundary: Literal["blank_line", "file", "pattern"] | None = doc(
        None, "override the preset: blank_line (a blank line ends a document), file (a file or JSONL/Parquet "
              "row is one document), pattern (a line matching boundary_pattern starts one)")
    boundary_pattern: str | None = doc(None, "override the preset: regex (re.search) of the line that starts a "
                                             "document, with document_boundary: pattern; the line itself is dropped")
    line_unit: Literal["sentence", "paragraph", "wrapped"] | None = doc(
        None, "override the preset: sentence (a line is a sentence), paragraph (a line is a paragraph, split "
              "into sentences), wrapped (hard-wrapped lines re-joined until a blank line, then split)")
    skip_pattern: str | None = doc(None, "override the preset: regex of lines to drop (headings)")
    text_field: str = doc("text", "JSONL field / Parquet column holding a document's text")
    tokenizer: str | None = doc(None, "tokenizer.json, vocab.txt or a checkpoint directory; null: train a WordPiece "
                                      "vocabulary on the corpus (cached under the output directory)")
    vocab_size: int = doc(30522, "size of a vocabulary trained on the corpus (when tokenizer is null)")
    objective: Literal["mlm_nsp", "mlm", "ltr"] = doc(
        "mlm_nsp", "mlm_nsp: the paper's MLM + NSP; mlm: 'No NSP' ablation (packed sequences); "
                   "ltr: 'LTR & No NSP' ablation (left-to-right LM, causal attention)")
    short_seq_prob: float = doc(0.1, "probability of a shorter target length per document (paper: 0.1)")
    mask_prob: float = doc(0.15, "share of tokens to predict")
    masking_strategy: Literal["exact", "bernoulli"] = doc("exact", "exact: round(15%) per sequence as the reference; "
                                                                   "bernoulli: 15% per token (Hugging Face)")
    whole_word_masking: bool = doc(False, "mask whole words (a token and its ## continuations)")
    mask_token_prob: float = doc(0.8, "share of picked tokens replaced by [MASK] (paper Table 8 mixes)")
    random_token_prob: float = doc(0.1, "share of picked tokens replaced by a random token (rest: unchanged)")
    docs_per_batch: int = doc(256, "documents per NSP buffer at most (random-next sentences come from these)")
    buffer_chars: int = doc(1_000_000, "text per NSP buffer: a buffer closes at this many characters once it "
                                       "holds 8 documents, so buffers of books and of tweets cost the same work")
    files_per_read_task: int = doc(4, "files interleaved per read task")
    preserve_order: bool = doc(False, "deliver instances in read order: a re-run sees the same data in the same "
                                      "order (reproducible), at some throughput cost on big clusters")
    shuffle_buffer: int = doc(8192, "instances each Train worker mixes before it cuts batches (0: none). The "
                                    "stream arrives an NSP buffer at a time, thousands of instances from a few "
                                    "documents; unmixed, a hundred steps in a row would see the same few books")
    read_cpus: float = doc(0.25, "CPUs per read task (fractional: leaves room for Train workers)")
    tokenizer_cpus: float = doc(1.0, "CPUs per tokenizer actor (it tokenizes, pairs and masks)")
    tokenizer_actors: int = doc(0, "tokenizer actors (0: autoscale with the cluster)")
    node_labels: dict[str, str] = doc({}, "Ray node labels the data stages (read tasks, tokenizer actors) run on, "
                                          "e.g. {bertray-role: data}, in Ray's selector syntax (value, !value, "
                                          "in(a,b), !in(a,b)); empty: any node with CPUs")
    node_labels_fallback: bool = doc(True, "when no live node has data.node_labels (the data nodes are lost or not "
                                           "up), run the data stages on any node, with a warning, instead of "
                                           "waiting for one; decided at every start of the worker group")
    max_file_bytes: int = doc(64 << 30, "bytes one text or JSONL file may hold after decompression; past it the "
                                        "rest of the file is skipped, named and counted (oversized_files): a "
                                        "decompression bomb or a runaway shard cannot fill a node")
    max_unreadable_share: float = doc(0.05, "share of file reads that may fail (unreadable, vanished, over "
                                            "max_file_bytes) before the run ends with an error instead of success")
    storage_options: dict[str, Any] = doc({}, "fsspec options for the corpus filesystem (never credentials: "
                                              "those come from the environment or the instance role)")

    def __post_init__(self) -> None:
        check(len(self.corpus) > 0, "data.corpus", "give at least one URL")
        for key in ("corpus", "eval_corpus", "tokenizer"):
            check_no_credentials(f"data.{key}", getattr(self, key))
        secrets = credential_keys(dict(self.storage_options))
        check(not secrets, "data.storage_options", f"{', '.join(secrets)}: credentials are refused here (the options "
              "are shipped to every read task and saved with the run's config in every checkpoint); give them through "
              "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or an "
              "instance role / service account")
        check(0 <= self.short_seq_prob <= 1, "data.short_seq_prob", f"must be in [0, 1], got {self.short_seq_prob}")
        check(0 < self.mask_prob < 1, "data.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        check(0 <= self.holdout_fraction <= 0.5, "data.holdout_fraction",
              f"must be in [0, 0.5], got {self.holdout_fraction}")
        check(self.vocab_size >= 100, "data.vocab_size", f"must be >= 100, got {self.vocab_size}")
        for key in ("docs_per_batch", "files_per_read_task", "buffer_chars", "max_file_bytes"):
            check(getattr(self, key) > 0, f"data.{key}", f"must be > 0, got {getattr(self, key)}")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        check(0 <= self.max_unreadable_share <= 1, "data.max_unreadable_share",
              f"must be in [0, 1], got {self.max_unreadable_share}")
        for key in ("read_cpus", "tokenizer_cpus"):
            check(getattr(self, key) > 0, f"data.{key}", f"must be > 0, got {getattr(self, key)}")
        problem = selector_problem(self.node_labels)
        check(problem is None, "data.node_labels", str(problem))
        self.corpus_layout()
        self.masking(20)

    def corpus_layout(self):
        """The preset `layout` with any of the four layout fields set here replacing its own."""
        from bertray.data.documents import LAYOUT_PRESETS

        if self.layout not in LAYOUT_PRESETS:
            raise ConfigError(f"data.layout: {self.layout!r} is unknown; choose one of {', '.join(LAYOUT_PRESETS)}")
        preset = LAYOUT_PRESETS[self.layout]
        overrides = {key: getattr(self, key) for key in ("document_boundary", "line_unit", "skip_pattern")
                     if getattr(self, key) is not None}
        boundary = overrides.get("document_boundary", preset.document_boundary)
        if self.boundary_pattern is not None or boundary != "pattern":
            overrides["boundary_pattern"] = self.boundary_pattern    # a pattern belongs to its boundary kind
        try:
            return dataclasses.replace(preset, text_field=self.text_field, **overrides)
        except ConfigError as exc:
            raise ConfigError(f"data.{exc} (layout {self.layout!r} with the data.* overrides)") from None

    def masking(self, max_predictions_per_seq: int):
        from bertray.data.masking import MaskingConfig

        return MaskingConfig(mask_prob=self.mask_prob, max_predictions_per_seq=max_predictions_per_seq,
                             strategy=self.masking_strategy, whole_word=self.whole_word_masking,
                             mask_token_prob=self.mask_token_prob, random_token_prob=self.random_token_prob)


@dataclass(frozen=True)
class PhaseConfig:
    """One stage of the paper's schedule (90% of steps at 128 tokens, then 10% at 512)."""

    fraction: float = doc(1.0, "share of train.max_steps spent in this phase")
    max_seq_len: int = doc(128, "tokens per sequence")
    max_predictions_per_seq: int = doc(20, "masked positions per sequence (P)")
    batch_size: int = doc(32, "global batch: sequences per optimizer step, across all workers")

    def __post_init__(self) -> None:
        check(0 < self.fraction <= 1, "fraction", f"must be in (0, 1], got {self.fraction}")
        check(8 <= self.max_seq_len <= 512, "max_seq_len", f"must be in [8, 512], got {self.max_seq_len}")
        check(1 <= self.max_predictions_per_seq <= self.max_seq_len, "max_predictions_per_seq",
              f"must be in [1, max_seq_len={self.max_seq_len}], got {self.max_predictions_per_seq}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")


@dataclass(frozen=True)
class TrainSection:
    seed: int = doc(0, "run seed; data and initialisation derive from it")
    max_steps: int = doc(300, "optimizer steps in all phases together")
    phases: tuple[PhaseConfig, ...] = doc((PhaseConfig(),), "the sequence-length schedule, run in order")
    micro_batch_size: int = doc(0, "sequences per worker per forward pass; 0: the whole per-worker batch "
                                   "(else gradients accumulate to reach the global batch)")
    optimizer: Literal["adamw", "bert_adam", "lamb"] = doc(
        "adamw", "adamw (bias-corrected), bert_adam (the reference, no bias correction), lamb (large batches)")
    lr: float = doc(1e-3, "peak learning rate (paper, BERT-base: 1e-4)")
    weight_decay: float = doc(0.01, "decoupled weight decay (not on LayerNorm and biases)")
    adam_beta1: float = doc(0.9, "Adam beta1")
    adam_beta2: float = doc(0.999, "Adam beta2")
    adam_eps: float = doc(1e-6, "Adam epsilon")
    warmup_steps: int | None = doc(None, "linear warmup steps, then linear decay to 0; null: 10% of max_steps "
                                         "(the paper's BERT-base schedule warms up for 10k of 1M steps)")
    clip_grad_norm: float = doc(1.0, "clip gradients to this global norm (0: off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc("auto", "autocast dtype (auto: bf16 on GPUs that have "
                                                                      "it, fp16 with loss scaling on older GPUs, "
                                                                      "fp32 on CPU)")
    compile: bool = doc(False, "torch.compile the model")
    log_every: int = doc(10, "steps between metric lines")
    batch_wait_warn_s: float = doc(120.0, "a worker waiting this long for its next batch logs what the cluster "
                                          "is doing (free resources, pending tasks and actors); the first batch "
                                          "gets 3x as long")
    batch_wait_fail_s: float = doc(900.0, "... and this long fails the run with that diagnosis, so run.max_failures "
                                          "and the checkpoint take over (0: never fail, only warn)")
    eval_every: int = doc(100, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = doc(8, "held-out batches per evaluation (fixed masks, fixed seed)")
    checkpoint_every: int = doc(100, "steps between checkpoints (always one at the end)")
    keep_checkpoints: int = doc(3, "checkpoints kept (the newest)")
    save_at_steps: tuple[int, ...] = doc((), "extra checkpoints kept at these steps (the paper's steps ablation)")
    corpus_passes: int = doc(1000, "passes over the corpus the stream may make (training stops at max_steps)")
    checkpoint_upload: Literal["async", "sync"] = doc("async", "async: training goes on while a checkpoint uploads "
                                                                "(`latest` moves once it is complete); sync: wait")
    fail_at_step: int | tuple[int, ...] | None = doc(None, "fault injection for tests: rank 0 crashes once at each "
                                                           "of these steps")
    nan_at_step: int | None = doc(None, "fault injection for tests: the loss becomes NaN at this step")
    record_instances: bool = doc(False, "for tests and audits: every checkpoint keeps the provenance of the "
                                        "instances trained since the previous one (trained_instances.npz)")

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "train.max_steps", f"must be > 0, got {self.max_steps}")
        check(len(self.phases) > 0, "train.phases", "give at least one phase")
        total = sum(p.fraction for p in self.phases)
        check(abs(total - 1.0) < 1e-6, "train.phases", f"fractions must add up to 1, got {total:g}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps is None or 0 <= self.warmup_steps <= self.max_steps, "train.warmup_steps",
              f"must be in [0, max_steps={self.max_steps}] or null, got {self.warmup_steps}")
        for key in ("log_every", "checkpoint_every", "eval_batches", "keep_checkpoints", "corpus_passes"):
            check(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        check(self.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}")
        check(self.batch_wait_warn_s > 0, "train.batch_wait_warn_s", f"must be > 0, got {self.batch_wait_warn_s}")
        check(self.batch_wait_fail_s >= 0, "train.batch_wait_fail_s", f"must be >= 0, got {self.batch_wait_fail_s}")

    @property
    def fault_steps(self) -> tuple[int, ...]:
        steps = self.fail_at_step
        return () if steps is None else (steps,) if isinstance(steps, int) else tuple(steps)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.max_steps // 10

    def phase_steps(self) -> list[int]:
        """Steps per phase; rounding goes to the last phase so they add up to max_steps."""
        steps = [int(round(p.fraction * self.max_steps)) for p in self.phases[:-1]]
        return steps + [self.max_steps - sum(steps)]


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int | tuple[int, int] = doc(1, "Ray Train workers (one per GPU); [min, max]: elastic, the run "
                                                "goes on with as few as min workers when nodes are lost and grows "
                                                "back to max; the global batch stays the same")
    use_gpu: bool = doc(False, "one GPU per worker")
    cpus_per_worker: float = doc(1.0, "CPUs reserved per Train worker (the data stages use the rest)")
    worker_resources: dict[str, float] = doc({}, "custom Ray resources each Train worker also reserves, e.g. "
                                                 "{trainer_node: 1} to keep workers on nodes started with that "
                                                 "resource (and one worker per such node)")
    node_labels: dict[str, str] = doc({}, "Ray node labels the Train workers run on, e.g. {bertray-role: trainer}, "
                                          "in Ray's selector syntax (value, !value, in(a,b), !in(a,b)); empty: any "
                                          "node with the workers' resources")
    torch_threads: int = doc(0, "intra-op threads per worker on CPU (0: Ray's default, one per reserved CPU); "
                                "more than reserved helps when the data stages leave CPUs idle")
    cpu_affinity: tuple[int, ...] = doc((), "CPU ids each Train worker process is pinned to (Linux); empty: no "
                                             "pinning. Gives a trainer its own cores beside data stages")
    resource_check: Literal["fail", "warn", "skip"] = doc(
        "fail", "before starting, place the Train workers and the data stages' minimum on the cluster's nodes: "
                "fail (stop with what is short; a warning where an autoscaler may add nodes), warn, or skip")

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def __post_init__(self) -> None:
        check(1 <= self.min_workers <= self.max_workers, "scaling.num_workers",
              f"must be >= 1, or [min, max] with 1 <= min <= max, got {self.num_workers}")
        check(all(isinstance(c, int) and c >= 0 for c in self.cpu_affinity), "scaling.cpu_affinity",
              f"must be CPU ids >= 0, got {list(self.cpu_affinity)}")
        check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        for key, amount in self.worker_resources.items():
            check(key not in ("CPU", "GPU") and isinstance(amount, (int, float)) and amount > 0,
                  f"scaling.worker_resources.{key}", f"must be a custom resource (not CPU/GPU: see cpus_per_worker "
                  f"and use_gpu) with an amount > 0, got {amount!r}")
        problem = selector_problem(self.node_labels)
        check(problem is None, "scaling.node_labels", str(problem))
        check(self.torch_threads >= 0, "scaling.torch_threads", f"must be >= 0, got {self.torch_threads}")


@dataclass(frozen=True)
class RunSection:
    name: str = doc("pretrain", "run name: the run lives in <output>/<name>; the same name resumes it")
    output: str = doc("runs", "local directory or object-storage URL (s3://bucket/prefix) for checkpoints")
    max_failures: int = doc(2, "worker-group restarts from the latest checkpoint before the run fails")
    tensorboard: bool = doc(True, "write TensorBoard event files under <output>/<name>/tensorboard")
    allow_config_change: tuple[str, ...] | str = doc((), "model.*/data.* keys a resume may change, comma-separated "
                                                         "(data.corpus,model.dropout; data: all of data); any other "
                                                         "change is refused")
    lease_stale_s: float = doc(600.0, "a run directory's writer lease counts as abandoned after this long without "
                                      "a heartbeat (a second driver on the same run is refused until then)")

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "run.name", f"must be a non-empty name without '/', got {self.name!r}")
        check_no_credentials("run.output", self.output)
        check(self.max_failures >= -1, "run.max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        check(self.lease_stale_s > 0, "run.lease_stale_s", f"must be > 0, got {self.lease_stale_s}")
        for key in self.allowed_changes:
            check(key.split(".")[0] in ("model", "data"), "run.allow_config_change",
                  f"{key!r}: only model.* and data.* keys (or model, data) can be allowed")


    @property
    def allowed_changes(self) -> tuple[str, ...]:
        keys = self.allow_config_change.split(",") if isinstance(self.allow_config_change, str) \
            else self.allow_config_change
        return tuple(k.strip() for k in keys if k.strip())


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = doc(ModelSection, "")
    data: DataSection = doc(DataSection, "")
    train: TrainSection = doc(TrainSection, "")
    scaling: ScalingSection = doc(ScalingSection, "")
    run: RunSection = doc(RunSection, "")

    def __post_init__(self) -> None:
        for i, phase in enumerate(self.train.phases):
            if self.scaling.elastic:   # any worker count in the range: uneven shares, weighted (see worker_batch)
                check(phase.batch_size >= self.scaling.max_workers, f"train.phases[{i}].batch_size",
                      f"{phase.batch_size} is less than one sequence per worker for scaling.num_workers "
                      f"{list(self.scaling.num_workers)}")
                continue
            workers = self.scaling.num_workers
            check(phase.batch_size % workers == 0, f"train.phases[{i}].batch_size",
                  f"{phase.batch_size} does not divide over scaling.num_workers={workers}")
            per_worker = phase.batch_size // workers
            micro = self.train.micro_batch_size or per_worker
            check(per_worker % micro == 0, "train.micro_batch_size",
                  f"{micro} does not divide the per-worker batch {per_worker} of phase {i}")
