"""What a saved model predicts, decided once from its config.json, and everything that follows
from that: the inputs it takes, the function that runs it, its batch output columns and its
service answers.

A fine-tuning sweep saves one folder per task in the Hugging Face layout; `read_head` reads its
config.json (`architectures`, `problem_type`, `id2label`, `threshold`) and returns the `Kind` of
predictor to build. Batch prediction (`bertray.predict.job`) and the service (`bertray.serve`)
only ever ask the kind, so a new head is one entry in `KINDS` and one line in `_kind_name`, not a
branch in every caller:

    architectures[0]                    problem_type                 kind
    BertForSequenceClassification       multi_label_classification   multilabel
                                        regression (or one label)    regression
                                        anything else                classification
    BertForQuestionAnswering                                         span
    BertForTokenClassification,                                      token
    BertFeatureBasedTagger
    BertForMultipleChoice                                            refused (no input format)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bertray.errors import CheckpointError, ConfigError
from bertray.predict import outputs

DEFAULT_THRESHOLD = 0.5
# Heads a sweep saves that prediction cannot take, and why.
REFUSED = {"BertForMultipleChoice": "a multiple-choice model (SWAG) scores several candidate endings of one "
                                    "example against each other; batch prediction and the service take one "
                                    "text, a pair or a question with its context per input, so it is not served "
                                    "(score it with flows/finetune.py)"}


@dataclass(frozen=True)
class Kind:
    """One kind of predictor. `inputs`: what one input may be ("texts": one text, "pairs": two,
    "question": a question and its context), in the order the service names them; `run(loaded,
    columns, batch_size=, embeddings=, batch_sizes=)` -> `Predictions` over one or two text
    columns; `columns(loaded)` -> the Parquet fields of a batch output row after `id`;
    `values(loaded, predictions)` -> those columns' values; `answers(loaded, predictions)` -> one
    JSON object per input for the service."""

    name: str
    what: str                       # in messages: "this is a <what> model"
    inputs: tuple[str, ...]
    max_seq_len: int                # default tokens per input
    embeddings: bool                # whether --embeddings applies
    min_labels: int                 # label names id2label must give
    run: Callable[..., Any]
    columns: Callable[..., list]
    values: Callable[..., dict]
    answers: Callable[..., list[dict]]

    @property
    def inputs_text(self) -> str:
        """What to send, in words: "texts or pairs", "texts", "question and context"."""
        return " or ".join("question and context" if i == "question" else i for i in self.inputs)


@dataclass(frozen=True)
class Head:
    """What a model folder's config.json says: its head class, kind, label names in id order and
    (multilabel) the score a label must exceed."""

    architecture: str
    kind: Kind
    labels: tuple[str, ...]
    threshold: float | None = None
    trained_seq_len: int | None = None   # the sequence length it was fine-tuned at (bertray's sweep records it)


def _classify(loaded, columns: Sequence[Sequence[str]], **options):
    from bertray.predict.inference import classify

    return classify(loaded, columns[0], columns[1] if len(columns) > 1 else None, **options)


def _multilabel(loaded, columns: Sequence[Sequence[str]], **options):
    from bertray.predict.inference import classify_multilabel

    return classify_multilabel(loaded, columns[0], columns[1] if len(columns) > 1 else None, **options)


def _answer(loaded, columns: Sequence[Sequence[str]], *, embeddings: str | None = None, **options):
    from bertray.predict.inference import answer

    return answer(loaded, columns[0], columns[1], **options)


def _tag(loaded, columns: Sequence[Sequence[str]], *, embeddings: str | None = None, **options):
    from bertray.predict.tagging import tag

    return tag(loaded, columns[0], **options)


_LABEL = dict(columns=outputs.label_columns, values=outputs.label_values, answers=outputs.label_answers)
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("classification", "classification", ("texts", "pairs"), 128, True, 2, _classify, **_LABEL),
    Kind("regression", "regression", ("texts", "pairs"), 128, True, 0, _classify, **_LABEL),
    Kind("multilabel", "multilabel classification", ("texts", "pairs"), 128, True, 1, _multilabel,
         columns=outputs.multilabel_columns, values=outputs.multilabel_values, answers=outputs.multilabel_answers),
    Kind("span", "question-answering", ("question",), 384, False, 0, _answer, **_LABEL),
    Kind("token", "token-classification", ("texts",), 128, False, 1, _tag,
         columns=outputs.entity_columns, values=outputs.entity_values, answers=outputs.entity_answers),
)}
_HEADS = {"BertForSequenceClassification": "sequence", "BertForQuestionAnswering": "span",
          "BertForTokenClassification": "token", "BertFeatureBasedTagger": "token"}


def head_of(config: Mapping[str, Any], where: str = "config.json") -> Head:
    """The `Head` of a parsed config.json; `ConfigError` naming `where` and the key otherwise."""
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture in REFUSED:
        raise ConfigError(f"{where}: architectures: {architecture} is not supported for prediction: "
                          f"{REFUSED[architecture]}; supported heads: {', '.join(_HEADS)}")
    if architecture not in _HEADS:
        raise ConfigError(f"{where}: architectures: {architecture!r} is not a fine-tuned head this can "
                          f"predict with; expected one of {', '.join(_HEADS)} (a pretraining checkpoint has no "
                          f"task head: fine-tune it first, flows/finetune.py)")
    id2label = config.get("id2label") or {}
    try:
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: id2label: the keys must be label ids 0, 1, ..., got {list(id2label)!r}") \
            from None
    kind = KINDS[_kind_name(_HEADS[architecture], config.get("problem_type"), labels)]
    if len(labels) < kind.min_labels:
        raise ConfigError(f"{where}: id2label: a {kind.what} head needs at least {kind.min_labels} label(s), "
                          f"got {id2label!r}")
    threshold = _threshold(config, where) if kind.name == "multilabel" else None
    trained = config.get("bertray", {}).get("max_seq_len") if isinstance(config.get("bertray"), dict) else None
    if type(trained) is not int or trained < 8:       # absent or unusable: the kind's default
        trained = None
    return Head(architecture, kind, labels, threshold, trained)


def _kind_name(head: str, problem_type: str | None, labels: tuple[str, ...]) -> str:
    if head != "sequence":
        return head
    if problem_type == "multi_label_classification":
        return "multilabel"
    if problem_type == "regression" or len(labels) == 1:
        return "regression"
    return "classification"


def _threshold(config: Mapping[str, Any], where: str) -> float:
    value = config.get("threshold", DEFAULT_THRESHOLD)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 \
            or math.isnan(value):
        raise ConfigError(f"{where}: threshold: a multilabel model's score threshold must be a number in [0, 1), "
                          f"got {value!r}")
    return float(value)


def read_head(folder: str | os.PathLike) -> Head:
    """The `Head` of a model folder, from its config.json, with errors that say what to pass."""
    config_file = Path(folder) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json; pass a fine-tuned model folder in the Hugging Face "
                              f"layout (a sweep saves them under <output>/latest/models/<row>/<task>/)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return head_of(data, str(config_file))
