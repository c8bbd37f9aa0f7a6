"""SWAG: the official CSV (and the JSON-lines layout of Hugging Face's sample), four-way
multiple-choice features, accuracy.

As in the paper (section 4.4) each example becomes four sequences `[CLS] context [SEP] ending
[SEP]`; the context is `sent1` and the ending `sent2 + " " + endingK` (the shared start of the
second sentence, then candidate K), which is how the official files split a video caption.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import fsspec
import numpy as np

from bertray.errors import TaskDataError
from bertray.tasks import metrics
from bertray.wordpiece import encode_pairs

log = logging.getLogger(__name__)

NUM_CHOICES = 4
_LABELS = tuple(str(k) for k in range(NUM_CHOICES))
_TEXT_COLUMNS = ("sent1", "sent2", "ending0", "ending1", "ending2", "ending3")


@dataclass(frozen=True)
class SwagExample:
    guid: str
    context: str
    start: str                      # sent2: the beginning every ending continues
    endings: tuple[str, ...]        # four in SWAG; a task card's multiple-choice task may have any number
    label: int | None               # None in the unlabelled test file


def read_swag(path: str | os.PathLike) -> tuple[list[SwagExample], dict[str, int]]:
    """Read `train.csv`/`val.csv`/`test.csv` of the official release (header
    `,video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,...,ending3,label`; test has
    no label) or a `.json`/`.jsonl` file with one object per line carrying the same keys.
    Counts: `rows`, `blank_lines`."""
    path = os.fspath(path)
    is_json = path.endswith((".json", ".jsonl"))
    examples: list[SwagExample] = []
    counts = {"rows": 0, "blank_lines": 0}
    with fsspec.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = _json_rows(path, f, counts) if is_json else _csv_rows(path, f, counts)
        for line, row in rows:
            label = row.get("label")
            if label is not None:
                if str(label) not in _LABELS:
                    raise TaskDataError(f"{path}:{line}: label {label!r} is not one of {', '.join(_LABELS)}")
                label = int(label)
            guid = str(row.get("") or row.get("video-id") or f"row-{len(examples)}")
            examples.append(SwagExample(guid, row["sent1"], row["sent2"],
                                        tuple(row[f"ending{k}"] for k in range(NUM_CHOICES)), label))
    counts["rows"] = len(examples)
    log.info("%s: %d examples (%s)", path, len(examples), ", ".join(f"{k}={v}" for k, v in counts.items()))
    return examples, counts


def _csv_rows(path: str, f, counts: dict[str, int]):
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise TaskDataError(f"{path}: the file is empty; expected the SWAG header row")
    missing = [c for c in _TEXT_COLUMNS if c not in header]
    if missing:
        raise TaskDataError(f"{path}:1: header lacks {', '.join(missing)}; found {', '.join(header)}")
    for row in reader:
        if not row:
            counts["blank_lines"] += 1
            continue
        if len(row) != len(header):
            raise TaskDataError(f"{path}:{reader.line_num}: expected {len(header)} comma-separated fields, "
                                f"found {len(row)}")
        yield reader.line_num, dict(zip(header, row))


def _json_rows(path: str, f, counts: dict[str, int]):
    for line, text in enumerate(f, start=1):
        if not text.strip():
            counts["blank_lines"] += 1
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
        missing = [c for c in _TEXT_COLUMNS if c not in row] if isinstance(row, dict) else list(_TEXT_COLUMNS)
        if missing:
            raise TaskDataError(f"{path}:{line}: missing keys {', '.join(missing)}")
        yield line, row


def featurize_swag(examples: Sequence[SwagExample], tokenizer, max_seq_len: int = 128) -> dict[str, np.ndarray]:
    """`input_ids`, `token_type_ids`, `attention_mask` [N, C, S] (C = 4 in SWAG; every example of
    a task has the same number of choices); `labels` [N] (-1 unlabelled)."""
    choices = len(examples[0].endings) if examples else NUM_CHOICES
    uneven = next((e.guid for e in examples if len(e.endings) != choices), None)
    if uneven is not None:
        raise ValueError(f"example {uneven} has a number of choices other than {choices}, the first example's")
    firsts = [e.context for e in examples for _ in range(choices)]
    seconds = [f"{e.start} {ending}".strip() for e in examples for ending in e.endings]
    flat = encode_pairs(tokenizer, firsts, seconds, max_seq_len)
    features = {k: v.reshape(len(examples), choices, max_seq_len) for k, v in flat.items()}
    features["labels"] = np.array([-1 if e.label is None else e.label for e in examples], dtype=np.int64)
    features["example_index"] = np.arange(len(examples), dtype=np.int64)
    return features


def decode_swag(logits: np.ndarray) -> list[int]:
    logits = np.asarray(logits)
    return [int(k) for k in np.argmax(logits.reshape(len(logits), -1), axis=-1)]


def evaluate_swag(examples: Sequence[SwagExample], logits: np.ndarray) -> dict[str, float]:
    gold = [e.label for e in examples]
    if any(g is None for g in gold):
        raise ValueError("cannot score the SWAG test split: its examples have no labels")
    return {"accuracy": 100.0 * metrics.accuracy(gold, decode_swag(logits))}
