"""The data section of pretraining's configuration (`data.*`, each field a documented flag of
`flows/pretrain.py`) and the phases of the sequence-length schedule (`train.phases`): what the
corpus is, how it is read, paired and masked, and the sequence shape each phase streams."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from bertray.config import check_no_credentials, doc
from bertray.data.documents import DocumentBoundary, LineUnit
from bertray.data.masking import MaskingStrategy, Objective
from bertray.errors import ConfigError, check
from bertray.labels import selector_problem
from bertray.storage import credential_keys


@dataclass(frozen=True)
class DataSection:
    corpus: tuple[str, ...] = doc((), "corpus URLs, globs or directories: local paths, s3://, gs://, any fsspec URL")
    eval_corpus: tuple[str, ...] = doc((), "held-out files for the fixed-mask evaluation, metrics eval_* (empty: "
                                           "the documents data.holdout_fraction keeps out of training, or no "
                                           "evaluation); its files must not be training files")
    holdout_fraction: float = doc(0.0, "share of data.corpus documents (chosen by a hash of file name and position) "
                                       "never trained on; they are the held-out evaluation set (eval_*), or with "
                                       "data.eval_corpus a second one (heldout_*)")
    format: Literal["auto", "text", "jsonl", "parquet"] = doc("auto", "file format (auto: by extension)")
    layout: str = doc("bert", "corpus layout preset: bert (sentence per line, blank line between documents), "
                              "wikitext, gutenberg, paragraphs")
    document_boundary: DocumentBoundary | None = doc(
        None, "override the preset: blank_line (a blank line ends a document), file (a file or JSONL/Parquet "
              "row is one document), pattern (a line matching boundary_pattern starts one)")
    boundary_pattern: str | None = doc(None, "override the preset: regex (re.search) of the line that starts a "
                                             "document, with document_boundary: pattern; the line itself is dropped")
    line_unit: LineUnit | None = doc(
        None, "override the preset: sentence (a line is a sentence), paragraph (a line is a paragraph, split "
              "into sentences), wrapped (hard-wrapped lines re-joined until a blank line, then split)")
    skip_pattern: str | None = doc(None, "override the preset: regex of lines to drop (headings)")
    text_field: str = doc("text", "JSONL field / Parquet column holding a document's text")
    tokenizer: str | None = doc(None, "tokenizer.json, vocab.txt or a checkpoint directory; null: train a WordPiece "
                                      "vocabulary on the corpus (cached under the output directory)")
    vocab_size: int = doc(30522, "size of a vocabulary trained on the corpus (when tokenizer is null)")
    objective: Objective = doc(
        "mlm_nsp", "mlm_nsp: the paper's MLM + NSP; mlm: 'No NSP' ablation (packed sequences); "
                   "ltr: 'LTR & No NSP' ablation (left-to-right LM, causal attention)")
    short_seq_prob: float = doc(0.1, "probability of a shorter target length per document (paper: 0.1)")
    mask_prob: float = doc(0.15, "share of tokens to predict")
    masking_strategy: MaskingStrategy = doc("exact", "exact: round(15%) per sequence as the reference; "
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
