"""GLUE: readers for the benchmark's TSV files, sentence(-pair) features, decoding, submissions.

Files are read as GLUE's own reference code reads them: tab-separated, `csv.QUOTE_NONE` (MRPC
and QQP contain unbalanced double quotes), UTF-8 with an optional byte-order mark (MRPC's train
and dev files start with one). Columns are found by header name, so MNLI's train (12 columns),
dev (16) and test (10) files share one layout; CoLA's labelled files have no header and get
fixed column names.

A row with the wrong number of fields or an unknown label raises `TaskDataError` naming the file
and line, except in QQP, whose official train/dev files contain a few rows broken by embedded
newlines (e.g. train.tsv line 97,931): those are skipped, counted and logged, as GLUE's
reference loaders skip them; more than a few (over 10 and over 1%) means a wrong file and raises.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import fsspec
import numpy as np

from bertray.errors import TaskDataError
from bertray.tasks import metrics
from bertray.wordpiece import encode_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueExample:
    guid: str                      # "train-12" for labelled files; the file's index/id column for test files
    text_a: str
    text_b: str | None
    label: str | float | None      # label string, STS-B score, or None in a test file


@dataclass(frozen=True)
class Layout:
    """Where the fields of one kind of file are; names refer to the file's header row."""

    text_a: str
    text_b: str | None = None
    label: str | None = None
    index: str | None = None                  # id column of test files, written back in submissions
    columns: tuple[str, ...] | None = None    # fixed names for a file without a header row


@dataclass(frozen=True)
class GlueFormat:
    labels: tuple[str, ...]                   # empty: regression (STS-B)
    labeled: Layout
    test: Layout
    submissions: Mapping[str, str]            # test split -> file name GLUE's server expects
    skip_malformed: bool = False


FEATURIZE_CHUNK = 8192
_MAX_SKIPPED = 10     # QQP's official files have a handful of broken rows; many more means a wrong file
_NLI = ("entailment", "not_entailment")
_BINARY = ("0", "1")

GLUE_FORMATS: dict[str, GlueFormat] = {
    "cola": GlueFormat(_BINARY,
                       Layout("sentence", label="label", columns=("source", "label", "original_label", "sentence")),
                       Layout("sentence", index="index"), {"test": "CoLA.tsv"}),
    "sst2": GlueFormat(_BINARY, Layout("sentence", label="label"), Layout("sentence", index="index"),
                       {"test": "SST-2.tsv"}),
    "mrpc": GlueFormat(_BINARY, Layout("#1 String", "#2 String", label="Quality"),
                       Layout("#1 String", "#2 String", index="index"), {"test": "MRPC.tsv"}),
    "stsb": GlueFormat((), Layout("sentence1", "sentence2", label="score"),
                       Layout("sentence1", "sentence2", index="index"), {"test": "STS-B.tsv"}),
    "qqp": GlueFormat(_BINARY, Layout("question1", "question2", label="is_duplicate"),
                      Layout("question1", "question2", index="id"), {"test": "QQP.tsv"}, skip_malformed=True),
    "mnli": GlueFormat(("contradiction", "entailment", "neutral"), Layout("sentence1", "sentence2", label="gold_label"),
                       Layout("sentence1", "sentence2", index="index"),
                       # AX: GLUE's diagnostic set (glue/diagnostic/diagnostic.tsv), labelled by the MNLI model
                       {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv", "test_ax": "AX.tsv"}),
    "qnli": GlueFormat(_NLI, Layout("question", "sentence", label="label"),
                       Layout("question", "sentence", index="index"), {"test": "QNLI.tsv"}),
    "rte": GlueFormat(_NLI, Layout("sentence1", "sentence2", label="label"),
                      Layout("sentence1", "sentence2", index="index"), {"test": "RTE.tsv"}),
    "wnli": GlueFormat(_BINARY, Layout("sentence1", "sentence2", label="label"),
                       Layout("sentence1", "sentence2", index="index"), {"test": "WNLI.tsv"}),
}


# --------------------------------------------------------------------------------------------
# Reading


def read_glue(path: str | os.PathLike, task: str, *, test: bool = False) -> tuple[list[GlueExample], dict[str, int]]:
    """Read one GLUE TSV file of `task` (a key of `GLUE_FORMATS`); `test=True` for the unlabelled
    test files. Returns the examples and counts: `rows`, `skipped_malformed`, `blank_lines`."""
    fmt = GLUE_FORMATS[task]
    layout = fmt.test if test else fmt.labeled
    path = os.fspath(path)
    examples: list[GlueExample] = []
    counts = {"rows": 0, "skipped_malformed": 0, "blank_lines": 0}
    skipped_lines: list[int] = []
    with fsspec.open(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = layout.columns or next(reader, None)
        if columns is None:
            raise TaskDataError(f"{path}: the file is empty; expected a header row")
        where = _column_indices(path, columns, layout)
        split = "test" if test else "row"
        for row in reader:
            line = reader.line_num
            if not row:
                counts["blank_lines"] += 1
                continue
            if len(row) != len(columns):
                if fmt.skip_malformed:
                    counts["skipped_malformed"] += 1
                    skipped_lines.append(line)
                    continue
                raise TaskDataError(f"{path}:{line}: expected {len(columns)} tab-separated fields "
                                    f"({', '.join(columns)}), found {len(row)}")
            label = None if layout.label is None else _parse_label(path, line, row[where["label"]], fmt.labels)
            guid = row[where["index"]] if layout.index else f"{split}-{len(examples)}"
            text_b = row[where["text_b"]] if layout.text_b else None
            examples.append(GlueExample(guid, row[where["text_a"]], text_b, label))
    counts["rows"] = len(examples)
    if len(skipped_lines) > max(_MAX_SKIPPED, 0.01 * (len(examples) + len(skipped_lines))):
        raise TaskDataError(f"{path}:{skipped_lines[0]}: {len(skipped_lines)} of {len(examples) + len(skipped_lines)} "
                            f"rows have the wrong number of fields; is this the official {task} file?")
    if skipped_lines:
        log.warning("%s: skipped %d malformed rows (wrong field count) at lines %s%s", path, len(skipped_lines),
                    ", ".join(map(str, skipped_lines[:10])), " ..." if len(skipped_lines) > 10 else "")
    log.info("%s: %d examples (%s)", path, len(examples), ", ".join(f"{k}={v}" for k, v in counts.items()))
    return examples, counts


def _column_indices(path: str, columns: Sequence[str], layout: Layout) -> dict[str, int]:
    where = {}
    for role in ("text_a", "text_b", "label", "index"):
        name = getattr(layout, role)
        if name is None:
            continue
        if name not in columns:
            raise TaskDataError(f"{path}:1: header has no column {name!r}; found {', '.join(map(repr, columns))}. "
                                "Is this the right task and split?")
        where[role] = list(columns).index(name)
    return where


def _parse_label(path: str, line: int, value: str, labels: tuple[str, ...]) -> str | float:
    if not labels:
        try:
            return float(value)
        except ValueError:
            raise TaskDataError(f"{path}:{line}: score {value!r} is not a number") from None
    if value not in labels:
        raise TaskDataError(f"{path}:{line}: unknown label {value!r}; expected one of {', '.join(labels)}")
    return value


# --------------------------------------------------------------------------------------------
# Features


def encode_texts(examples: Sequence, tokenizer, max_seq_len: int) -> dict[str, np.ndarray]:
    """`input_ids`, `token_type_ids`, `attention_mask` of examples with `text_a` and `text_b`
    (None for single sentences), tokenized `FEATURIZE_CHUNK` examples at a time into arrays
    allocated once: a large file's features are never held twice (as chunks and as their join)."""
    pairs = bool(examples) and examples[0].text_b is not None
    out: dict[str, np.ndarray] = {}
    for start in range(0, max(1, len(examples)), FEATURIZE_CHUNK):
        chunk = examples[start:start + FEATURIZE_CHUNK]
        part = encode_pairs(tokenizer, [e.text_a for e in chunk], [e.text_b for e in chunk] if pairs else None,
                            max_seq_len)
        if not out:
            out = {k: np.empty((len(examples),) + v.shape[1:], dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][start:start + len(chunk)] = v
    return out


def featurize_glue(examples: Sequence[GlueExample], tokenizer, max_seq_len: int = 128,
                   labels: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Features of a sentence or sentence-pair task. `labels` is the task's label list (empty
    for regression); test examples (label None) get label -1 / NaN. Examples are tokenized
    `FEATURIZE_CHUNK` at a time, so a large training file never has all its tokenizer encodings
    (tokens, offsets: many times the text) alive at once."""
    features = encode_texts(examples, tokenizer, max_seq_len)
    if labels:
        ids = {label: i for i, label in enumerate(labels)}
        features["labels"] = np.array([-1 if e.label is None else ids[e.label] for e in examples], dtype=np.int64)
    else:
        features["labels"] = np.array([np.nan if e.label is None else e.label for e in examples], dtype=np.float32)
    features["example_index"] = np.arange(len(examples), dtype=np.int64)
    return features


# --------------------------------------------------------------------------------------------
# Decoding, scoring, submissions


def decode_glue(logits: np.ndarray, labels: Sequence[str] = ()) -> list[str] | list[float]:
    """Label strings (argmax) for classification; the single output as a float for regression."""
    logits = np.asarray(logits)
    if not labels:
        return [float(x) for x in logits.reshape(len(logits), -1)[:, 0]]
    return [labels[i] for i in np.argmax(logits, axis=-1)]


def positive_label(labels: Sequence[str]) -> str | None:
    """The class whose F1 a binary task reports: the second label ("1" of GLUE's ("0", "1"); a
    task card orders its labels to choose it); None with more than two classes."""
    return labels[1] if len(labels) == 2 else None


# name -> (function of gold, predictions and the label list, scale): percent, as the paper's
# tables, except the mean squared error, which stays in the label's own units.
_METRICS = {
    "accuracy": (lambda t, p, labels: metrics.accuracy(t, p), 100.0),
    "f1": (lambda t, p, labels: metrics.binary_f1(t, p, positive=positive_label(labels)), 100.0),
    "macro_f1": (lambda t, p, labels: metrics.macro_f1(t, p), 100.0),
    "mcc": (lambda t, p, labels: metrics.matthews_corrcoef(t, p), 100.0),
    "pearson": (lambda t, p, labels: metrics.pearson(t, p), 100.0),
    "spearman": (lambda t, p, labels: metrics.spearman(t, p), 100.0),
    "mse": (lambda t, p, labels: metrics.mean_squared_error(t, p), 1.0),
}
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "mse")


def evaluate_glue(examples: Sequence[GlueExample], logits: np.ndarray, labels: Sequence[str],
                  names: Sequence[str]) -> dict[str, float]:
    """The metrics `names` (accuracy, f1 of the positive class, macro_f1, mcc; pearson, spearman,
    mse) in percent as the paper's tables (mse in the label's units)."""
    predictions = decode_glue(logits, labels)
    gold = [e.label for e in examples]
    if any(g is None for g in gold):
        raise ValueError("cannot score a test split: its examples have no labels")
    return {name: _METRICS[name][1] * _METRICS[name][0](gold, predictions, labels) for name in names}


def write_submission(task: str, predictions: Sequence | Mapping, out_dir: str | os.PathLike,
                     split: str = "test", examples: Sequence[GlueExample] | None = None) -> str:
    """Write GLUE's `index<TAB>prediction` file (`SST-2.tsv`, `MNLI-m.tsv`, ...) and return its path.

    `predictions` is a mapping index -> prediction, or a sequence aligned with `examples` (their
    index column is written) or, without examples, with indices 0..n-1. Predictions are label
    strings (`entailment`, `1`) or, for STS-B, scores."""
    fmt = GLUE_FORMATS[task]
    if split not in fmt.submissions:
        raise ValueError(f"{task} has no submission for split {split!r}; use one of {', '.join(fmt.submissions)}")
    if isinstance(predictions, Mapping):
        rows = list(predictions.items())
    else:
        ids = [e.guid for e in examples] if examples is not None else range(len(predictions))
        if len(ids) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(ids)} examples")
        rows = list(zip(ids, predictions))
    path = f"{os.fspath(out_dir).rstrip('/')}/{fmt.submissions[split]}"
    with fsspec.open(path, "w", encoding="utf-8", newline="") as f:
        f.write("index\tprediction\n")
        for index, value in rows:
            f.write(f"{index}\t{_submission_value(value, fmt.labels)}\n")
    return path


def _submission_value(value, labels: tuple[str, ...]) -> str:
    if not labels:
        return f"{float(value):.3f}"
    if str(value) not in labels:
        raise ValueError(f"prediction {value!r} is not a label; expected one of {', '.join(labels)}")
    return str(value)
