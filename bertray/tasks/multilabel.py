"""Multi-label classification: any number of labels per text (or text pair), a sigmoid per label.

The features are GLUE's (`glue.encode_texts`) with a [N, C] 0/1 float target, one column per
label; the sequence head sees float targets of that shape and trains with binary cross-entropy,
as transformers does for `problem_type: multi_label_classification`. A label is predicted when its
sigmoid exceeds one threshold, `THRESHOLD`, written into the exported config.json as `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from bertray.tasks import glue, metrics

THRESHOLD = 0.5
METRICS = ("micro_f1", "macro_f1", "exact_match")


@dataclass(frozen=True)
class MultiLabelExample:
    guid: str
    text_a: str
    text_b: str | None
    labels: tuple[str, ...] | None     # None in an unlabelled test file; () means "none of them"


def featurize_multilabel(examples: Sequence[MultiLabelExample], tokenizer, max_seq_len: int,
                         labels: Sequence[str]) -> dict[str, np.ndarray]:
    """GLUE's sequence features and `labels` [N, C] float32: 1 where the example has the label
    (NaN rows for unlabelled examples)."""
    features = glue.encode_texts(examples, tokenizer, max_seq_len)
    features["labels"] = indicator(examples, labels)
    features["example_index"] = np.arange(len(examples), dtype=np.int64)
    return features


def indicator(examples: Sequence[MultiLabelExample], labels: Sequence[str]) -> np.ndarray:
    ids = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(examples), len(labels)), dtype=np.float32)
    for row, example in enumerate(examples):
        if example.labels is None:
            out[row] = np.nan
            continue
        for label in example.labels:
            out[row, ids[label]] = 1.0
    return out


def decode_multilabel(logits: np.ndarray, labels: Sequence[str],
                      threshold: float = THRESHOLD) -> list[tuple[str, ...]]:
    """The labels whose sigmoid is above `threshold`, in label order."""
    chosen = _sigmoid(np.asarray(logits, dtype=np.float64)) > threshold
    return [tuple(labels[j] for j in np.nonzero(row)[0]) for row in chosen]


def evaluate_multilabel(examples: Sequence[MultiLabelExample], logits: np.ndarray, labels: Sequence[str],
                        names: Sequence[str] = METRICS) -> dict[str, float]:
    """Micro-F1, macro-F1 and exact match (all labels right) in percent."""
    if any(e.labels is None for e in examples):
        raise ValueError("cannot score an unlabelled split")
    predicted = _sigmoid(np.asarray(logits, dtype=np.float64)) > THRESHOLD
    scores = metrics.multilabel_scores(indicator(examples, labels) > 0.5, predicted)
    return {name: 100.0 * scores[name] for name in names}


def majority_outputs(spec, train: Mapping[str, np.ndarray],
                     features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trivial baseline's logits [N, C]: every label that most training rows carry (the
    majority decision per label; usually none at all), the same for every example."""
    targets = np.asarray(train["labels"], dtype=np.float64)
    targets = targets[np.isfinite(targets).all(axis=1)] if targets.ndim == 2 else targets[:0]
    chosen = targets.mean(axis=0) > 0.5 if len(targets) else np.zeros(len(spec.labels), dtype=bool)
    row = np.where(chosen, 10.0, -10.0).astype(np.float32)
    return {"logits": np.tile(row, (len(features["input_ids"]), 1))}


def gold_and_predicted(spec, examples: Sequence[MultiLabelExample], features: Mapping[str, np.ndarray],
                       outputs: Mapping[str, np.ndarray], **options) -> tuple[list, list]:
    """Each example's gold label set and the predicted one, as tuples in label order."""
    order = {label: i for i, label in enumerate(spec.labels)}
    gold = [tuple(sorted(e.labels or (), key=order.__getitem__)) for e in examples]
    return gold, list(spec.decode(examples, features, outputs))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


__all__ = ["METRICS", "THRESHOLD", "MultiLabelExample", "decode_multilabel", "evaluate_multilabel",
           "featurize_multilabel", "gold_and_predicted", "indicator", "majority_outputs"]
