"""Trivial baselines and constant-prediction checks: does a fine-tuned model beat doing nothing?

A dev score means little without the score of a predictor that learned nothing: MRPC's F1 of
81.2 and CoLA's Matthews correlation of 0.0 are exactly what "always say paraphrase" and "always
say acceptable" get. So every task gets a trivial baseline, built as model *outputs* (one-hot
logits, a constant score, spans pointing at one place) and scored by the task's own
`spec.evaluate`, so that the baseline and the model are comparable by construction: same
examples, same decoding, same scorer.

    family           baseline (`Baseline.describe`)
    classification   the majority class of the training labels (ties: the lower label id)
    regression       the mean of the training scores (correlations are undefined for a
                     constant: NaN, shown as n/a; MSE is meaningful)
    token            "no entity": every word tagged O (a task without an O tag: its most
                     frequent training tag)
    span             SQuAD 2.0 style (no-answer allowed): the empty answer for every question;
                     SQuAD 1.1 style: the first token of the passage (the first span)
    multiple_choice  the answer index most frequent in the training labels
    multilabel       each label's majority decision over the training rows (usually: no label),
                     the same label set for every example (`bertray.tasks.multilabel`)

Each family names its `Baseline` and its `gold_and_predicted` function in its `Family` entry
(`bertray.tasks.registry`); this module holds most of them and the family-independent functions the
trainer calls (`baseline_scores`, `distinct_predictions`). All are pure: arrays in, arrays or
numbers out; nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:                       # the registry imports this module
    from bertray.tasks.registry import TaskSpec

Arrays = Mapping[str, np.ndarray]

# Logit of the chosen class / position; every other entry is 0. Any positive value decodes the same.
_HIGH = 10.0


@dataclass(frozen=True)
class Baseline:
    """A family's trivial predictor: what it predicts, in words for the results table, and its
    outputs for a split's features, built from the training features' targets (`train`)."""

    describe: Callable[["TaskSpec"], str]
    outputs: Callable[["TaskSpec", Arrays, Arrays], dict[str, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Family-independent: what the trainer calls


def baseline_scores(spec: "TaskSpec", train: Arrays, examples: Sequence, features: Arrays) -> dict[str, float]:
    """The task's metrics (`spec.metrics`, percent) of its trivial baseline on one labelled split,
    scored by `spec.evaluate` exactly as the model's outputs are. `train` are the training
    features (their target arrays give the majority class or mean); `features` the split's."""
    outputs = spec.family_info.baseline.outputs(spec, train, features)
    scores = spec.evaluate(examples, features, outputs)
    return {name: float(scores[name]) for name in spec.metrics if name in scores}


def distinct_predictions(spec: "TaskSpec", examples: Sequence, features: Arrays, outputs: Arrays,
                         **options: Any) -> int:
    """How many different predictions the model makes on a split: 1 means a constant predictor
    (one class, one tag, one answer for everything), whatever its score. `options` go to the
    decoder (SQuAD 2.0: the `tau` the split was scored at)."""
    _, predicted = spec.family_info.gold_and_predicted(spec, examples, features, outputs, **options)
    return len(set(predicted))


def describe(spec: "TaskSpec") -> str:
    """The task's baseline in words, e.g. "majority class of train"."""
    return spec.family_info.baseline.describe(spec)


# --------------------------------------------------------------------------------------------
# Baseline outputs, one per family


def _rows(features: Arrays) -> int:
    return len(features["input_ids"])


def _most_frequent(ids: np.ndarray, width: int, what: str) -> int:
    """The most frequent id in [0, width) (ties: the lowest); ids outside (unlabelled -1, ignored
    -100 positions) do not count."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < width)].astype(np.int64)
    if not len(ids):
        raise ValueError(f"no {what} in the training features: a baseline needs labelled training data")
    return int(np.argmax(np.bincount(ids, minlength=width)))


def _one_hot(shape: tuple[int, ...], index: int) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    out[..., index] = _HIGH
    return out


def majority_class_outputs(spec: "TaskSpec", train: Arrays, features: Arrays) -> dict[str, np.ndarray]:
    """One-hot logits of the training set's majority class for every example."""
    width = len(spec.labels)
    return {"logits": _one_hot((_rows(features), width), _most_frequent(train["labels"], width, "class labels"))}


def train_mean_outputs(spec: "TaskSpec", train: Arrays, features: Arrays) -> dict[str, np.ndarray]:
    """The mean training score for every example (the constant with the least squared error on train)."""
    scores = np.asarray(train["labels"], dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        raise ValueError("no scores in the training features: a baseline needs labelled training data")
    return {"logits": np.full((_rows(features), 1), scores.mean(), dtype=np.float32)}


def no_entity_outputs(spec: "TaskSpec", train: Arrays, features: Arrays) -> dict[str, np.ndarray]:
    """Tag logits [F, S, C] choosing O at every position (no entity at all); a tag set without O:
    the most frequent training tag."""
    width = len(spec.labels)
    tag = spec.labels.index("O") if "O" in spec.labels else _most_frequent(train["labels"], width, "tags")
    return {"logits": _one_hot((*features["input_ids"].shape[:2], width), tag)}


def no_answer_or_first_token_outputs(spec: "TaskSpec", train: Arrays, features: Arrays) -> dict[str, np.ndarray]:
    """Start/end logits [F, S] that decode to the first token of the passage (in each question's
    first window, the only place that scores above 0) and, when the task allows no answer, a
    null score ([CLS]) above it, so that every question is answered with "" at any threshold the
    scorer can tune (all null odds are equal and positive)."""
    rows, width = features["input_ids"].shape[:2]
    logits = np.zeros((rows, width), dtype=np.float32)
    in_context = features["offset_mapping"][..., 0] >= 0
    first_window = np.unique(np.asarray(features["example_index"]), return_index=True)[1]
    for f in first_window:
        positions = np.flatnonzero(in_context[f])
        if len(positions):
            logits[f, positions[0]] = _HIGH
    if spec.allow_no_answer:
        logits[:, 0] = 2 * _HIGH
    return {"start_logits": logits, "end_logits": logits.copy()}


def most_frequent_choice_outputs(spec: "TaskSpec", train: Arrays, features: Arrays) -> dict[str, np.ndarray]:
    """One-hot logits [N, choices] of the answer index most frequent in the training labels."""
    choices = features["input_ids"].shape[1]
    return {"logits": _one_hot((_rows(features), choices), _most_frequent(train["labels"], choices, "answers"))}


MAJORITY_CLASS = Baseline(lambda spec: "majority class of train", majority_class_outputs)
TRAIN_MEAN = Baseline(lambda spec: "mean of train (correlations undefined: n/a)", train_mean_outputs)
NO_ENTITY = Baseline(lambda spec: "no entity (every word O)" if "O" in spec.labels else "most frequent tag of train",
                     no_entity_outputs)
NO_ANSWER_OR_FIRST_TOKEN = Baseline(
    lambda spec: "empty answer everywhere" if spec.allow_no_answer else "first token of the passage",
    no_answer_or_first_token_outputs)
MOST_FREQUENT_CHOICE = Baseline(lambda spec: "most frequent answer index of train", most_frequent_choice_outputs)


# --------------------------------------------------------------------------------------------
# Gold and predicted items, one function per family: what "distinct predictions" and the
# confusion matrix count. Items are hashable and aligned: one per example (per word for tags).


def labels_gold_and_predicted(spec: "TaskSpec", examples: Sequence, features: Arrays, outputs: Arrays,
                              **options: Any) -> tuple[list, list]:
    """Classification and multiple choice: each example's gold label and the decoded one."""
    return [e.label for e in examples], list(spec.decode(examples, features, outputs, **options))


def scores_gold_and_predicted(spec: "TaskSpec", examples: Sequence, features: Arrays, outputs: Arrays,
                              **options: Any) -> tuple[list, list]:
    """Regression: scores, predictions rounded to the 4 places the prediction files show (a
    collapsed model's outputs differ only in float noise)."""
    return [e.label for e in examples], [round(p, 4) for p in spec.decode(examples, features, outputs, **options)]


def tags_gold_and_predicted(spec: "TaskSpec", examples: Sequence, features: Arrays, outputs: Arrays,
                            **options: Any) -> tuple[list, list]:
    """Token tagging: one item per word, gold and predicted tag."""
    predicted = spec.decode(examples, features, outputs, **options)
    return [t for e in examples for t in e.tags], [t for tags in predicted for t in tags]


def answers_gold_and_predicted(spec: "TaskSpec", examples: Sequence, features: Arrays, outputs: Arrays,
                               **options: Any) -> tuple[list, list]:
    """Extractive QA: the first gold answer ("" when unanswerable) and the predicted text."""
    predicted = spec.decode(examples, features, outputs, **options)
    return [e.answers[0].text if e.answers else "" for e in examples], [predicted.get(e.qid, "") for e in examples]
