"""A task card: fine-tuning on your own data, described in a few YAML keys, as one more `TaskSpec`.

    # tasks.yaml (one task, a list of tasks, or {tasks: [...]})
    - name: tickets                  # the task's name in tables and folders
      type: classification           # or multilabel, regression, token, span, multiple_choice;
                                     # left out: inferred from the label column (printed)
      train: s3://bucket/tickets/train.csv.gz
      dev: s3://bucket/tickets/dev.csv.gz     # optional: else a seeded 10% of train is held out
      test: s3://bucket/tickets/new.csv.gz    # optional, labelled or not: predictions are written
      text: [subject, body]          # one field, or two for pairs
      label: queue
      labels: [billing, tech, other] # optional: the closed set and its order (else train's, sorted)
      metrics: [accuracy, macro_f1]  # optional: the first selects the winner
      grid: {learning_rates: [5e-5, 3e-5], batch_sizes: [32], epochs: [3]}   # optional: A.3's grid
      max_seq_len: 128
      format: csv                    # optional: from the extension; csv tsv jsonl json parquet conll squad
      delimiter: ";"                 # header: false, quote: false, encoding: latin-1 as needed
      max_bad_share: 0.05            # more bad rows than this share of a split is an error

A card becomes a `TaskSpec` of the family its type names (`card_spec`): the same featurizer,
head, metrics and prediction files as the paper's tasks of that family, so a card of SST-2
scores exactly as the built-in sst2 does. What a card leaves open (the type, the labels and their
order, whether a span task has unanswerable questions, whether the test file is labelled) the
driver settles once, reading the files (`bertray.tasks.checks`), and writes back into the card;
the settled card travels to every trial as a plain mapping (`to_mapping`) and is rebuilt there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, get_args

from bertray.config import check_folder_name, doc, from_mapping, read_yaml, to_mapping
from bertray.errors import BertrayError, ConfigError, check
from bertray.tasks import glue, multilabel
from bertray.tasks.files import FORMATS, FileFormat, format_of
from bertray.tasks.registry import A3_GRID, GROUPS, TASKS, Grid, TaskSpec

TaskType = Literal["classification", "multilabel", "regression", "token", "span", "multiple_choice"]
TYPES: tuple[str, ...] = get_args(TaskType)       # each type is the registry family of that name

# Metrics a type can report, and its default list (the first selects the winner; classification
# adds the positive class's F1 when there are two classes).
KNOWN_METRICS: dict[str, tuple[str, ...]] = {
    "classification": glue.CLASSIFICATION_METRICS,
    "regression": glue.REGRESSION_METRICS,
    "multilabel": multilabel.METRICS,
    "token": ("f1", "precision", "recall"),
    "span": ("f1", "exact_match"),
    "multiple_choice": ("accuracy",),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "regression": ("pearson", "spearman", "mse"),
    "multilabel": multilabel.METRICS,
    "token": ("f1", "precision", "recall"),
    "span": ("f1", "exact_match"),
    "multiple_choice": ("accuracy",),
}
LOWER_IS_BETTER = ("mse",)           # never the selecting metric: the sweep keeps the highest score
NO_ANSWER_METRICS = ("tau", "f1_at_0", "exact_match_at_0")

# Field names a type reads when the card names none.
DEFAULT_FIELDS: dict[str, dict[str, Any]] = {
    "token": {"text": ("tokens",), "label": "tags"},
    "span": {"text": ("question", "context"), "label": "answers"},
    "multiple_choice": {"choices": "choices", "label": "label"},
}
TEXT_FIELDS = {"token": (1, 1), "span": (2, 2), "multiple_choice": (1, 2)}   # (fewest, most); others 1-2
DEV_SHARE = 0.1                      # held out of train when a card gives no dev file
_FORMAT_TYPE = {"conll": "token", "squad": "span"}    # formats that hold one type of task


def _extension_format(url: str) -> str | None:
    try:
        return format_of(url, FileFormat())
    except BertrayError:
        return None


@dataclass(frozen=True)
class GridCard:
    """A card's own search space; what it leaves out is the paper's A.3 grid."""

    learning_rates: tuple[float, ...] = doc(A3_GRID.learning_rates, "learning rates")
    batch_sizes: tuple[int, ...] = doc(A3_GRID.batch_sizes, "batch sizes")
    epochs: tuple[int, ...] = doc(A3_GRID.epochs, "epoch counts")

    def __post_init__(self) -> None:
        for key in ("learning_rates", "batch_sizes", "epochs"):
            values = getattr(self, key)
            check(len(values) > 0 and all(v > 0 for v in values), f"grid.{key}",
                  f"give at least one value, all > 0; got {list(values)}")


@dataclass(frozen=True)
class TaskCard:
    """One of your own tasks (see the module docstring). Keys the driver settles (`type`, `labels`,
    `no_answer`, `test_labelled`) may be given; those it finds are written back."""

    name: str = doc(help="the task's name: a column of the results, a folder under models/ and predictions/")
    train: str = doc(help="training file: local path or URL (s3://, gs://, ...), plain or .gz/.zst")
    text: tuple[str, ...] = doc((), "the text field, or two for pairs (token: the tokens; span: question "
                                    "and context; multiple_choice: the context, and optionally the start "
                                    "every choice continues)")
    label: str | None = doc(None, "the label field (token: the tags; span: the answers; multiple_choice: "
                                  "the right choice's index)")
    type: TaskType | None = doc(None, "classification, multilabel, regression, token, span or multiple_choice "
                                      "(null: inferred from the label column)")
    dev: str | None = doc(None, "dev file (null: a seeded 10% of train, stratified by class)")
    test: str | None = doc(None, "test file, labelled or not: predictions are written for it")
    labels: tuple[str, ...] = doc((), "the closed set of labels (or tags) and their order (empty: train's, "
                                      "sorted); of two classes the second is the positive one")
    choices: str | None = doc(None, "multiple_choice: the field with the list of choices")
    metrics: tuple[str, ...] = doc((), "metrics to report, the first selects the winner (empty: the type's)")
    grid: GridCard | None = doc(None, "learning_rates, batch_sizes, epochs (null: the paper's A.3 grid)")
    max_seq_len: int | None = doc(None, "tokens per sequence (null: 128; span 384)")
    format: str = doc("auto", "csv, tsv, jsonl, json, parquet, conll, squad (auto: from each file's extension)")
    delimiter: str | None = doc(None, "field delimiter of csv/tsv (null: ',' and tab); columns of conll")
    header: bool = doc(True, "csv/tsv: the first row names the columns (false: they are 0, 1, 2, ...)")
    quote: bool = doc(True, "csv/tsv: RFC 4180 quoting (false: quotes are plain characters)")
    encoding: str = doc("utf-8-sig", "text encoding of the files")
    label_delimiter: str = doc(",", "multilabel: what separates the labels in a text cell")
    max_bad_share: float = doc(0.05, "the share of bad rows (empty text, bad label, wrong field count) above "
                                     "which a split is refused")
    holdout_seed: int = doc(0, "seed of the 10% held out of train when there is no dev file")
    no_answer: bool | None = doc(None, "span: unanswerable questions allowed (null: when train has some)")
    test_labelled: bool | None = doc(None, "whether the test file carries labels (null: found by the driver)")

    def __post_init__(self) -> None:
        check(bool(self.name), "name", "give the task a name")
        check_folder_name("name", self.name)
        check(self.name.lower() not in TASKS and self.name.lower() not in GROUPS, "name",
              f"{self.name!r} is a built-in task or group; give your task another name")
        check(bool(self.train), "train", "give the training file")
        implied = self.type or _FORMAT_TYPE.get(self.format) or _FORMAT_TYPE.get(_extension_format(self.train))
        for key, value in DEFAULT_FIELDS.get(implied, {}).items():
            if not getattr(self, key):
                object.__setattr__(self, key, value)
        fewest, most = TEXT_FIELDS.get(implied, (1, 2))
        check(fewest <= len(self.text) <= most, "text",
              f"give {fewest if fewest == most else f'{fewest} or {most}'} field name(s)"
              f"{f' for a {implied} task' if implied else ''}, got {list(self.text)}")
        check(all(self.text), "text", f"field names must not be empty, got {list(self.text)}")
        check(bool(self.label), "label", "give the label field")
        check(self.format in FORMATS, "format", f"choose one of {', '.join(FORMATS)}, got {self.format!r}")
        check(self.format != "conll" or self.type in (None, "token"), "format", "conll files hold token tasks")
        check(self.format != "squad" or self.type in (None, "span"), "format", "squad files hold span tasks")
        check(self.delimiter is None or len(self.delimiter) == 1, "delimiter",
              f"must be one character, got {self.delimiter!r}")
        check(len(set(self.labels)) == len(self.labels), "labels", f"labels must differ, got {list(self.labels)}")
        check(0 <= self.max_bad_share < 1, "max_bad_share", f"must be in [0, 1), got {self.max_bad_share}")
        check(self.max_seq_len is None or 8 <= self.max_seq_len <= 512, "max_seq_len",
              f"must be in [8, 512] or null, got {self.max_seq_len}")
        check(self.type == "multiple_choice" or self.choices is None, "choices",
              "only multiple_choice tasks have choices")
        if self.type is not None and self.metrics:
            known = KNOWN_METRICS[self.type]
            unknown = [m for m in self.metrics if m not in known]
            check(not unknown, "metrics", f"{', '.join(unknown)} not available for {self.type}; choose from "
                                          f"{', '.join(known)}")
            check(self.metrics[0] not in LOWER_IS_BETTER, "metrics",
                  f"{self.metrics[0]} cannot come first: the first metric selects the winner, the highest "
                  "score wins, and lower is better for it")

    @property
    def file_format(self) -> FileFormat:
        return FileFormat(format=self.format, delimiter=self.delimiter, header=self.header, quote=self.quote,
                          encoding=self.encoding)

    @property
    def files(self) -> dict[str, str]:
        """split -> file; without a dev file, dev is the held-out part of train."""
        out = {"train": self.train, "dev": self.dev or self.train}
        if self.test:
            out["test"] = self.test
        return out

    @property
    def holdout(self) -> bool:
        return self.dev is None


# --------------------------------------------------------------------------------------------
# Reading cards


def card_from_mapping(data: Any, where: str = "task") -> TaskCard:
    """A card from YAML's mapping: one text field may be a string, numbers may name columns of a
    file without a header; errors say `where` (`tasks.yaml: task 2`) and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of task keys (name, train, text, label, ...), got {data!r}")
    data = dict(data)
    if isinstance(data.get("text"), (str, int)):
        data["text"] = [data["text"]]
    for key in ("text", "labels"):
        if isinstance(data.get(key), list):
            data[key] = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in data[key]]
    for key in ("label", "choices"):
        if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
            data[key] = str(data[key])
    name = data.get("name")
    try:
        return from_mapping(TaskCard, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{f' ({name})' if isinstance(name, str) else ''}: {exc}") from None


def load_cards(path: str | os.PathLike) -> list[TaskCard]:
    """The tasks of a YAML card file: one task, a list of tasks, or `{tasks: [...]}`. A relative
    file path in a card means the card's folder when the file is there, else the working directory."""
    path = os.fspath(path)
    data = read_yaml(path, "task file")
    if isinstance(data, Mapping) and "tasks" in data and "name" not in data:
        extra = sorted(set(data) - {"tasks"})
        if extra:
            raise ConfigError(f"{path}: besides `tasks` a task file holds nothing, got {', '.join(extra)}")
        data = data["tasks"]
    entries = [data] if isinstance(data, Mapping) else data
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a task (a mapping with name, train, text, label, ...) or a list of them")
    base = os.path.dirname(os.path.abspath(path))
    cards = [card_from_mapping(entry, f"{path}: task {i + 1}") for i, entry in enumerate(entries)]
    return [with_paths(card, base) for card in cards]


def with_paths(card: TaskCard, base: str | None = None) -> TaskCard:
    """The card's files as absolute paths (URLs as they are): relative to `base` (the card file's
    folder) when the file is there, else to the working directory. Ray trials run elsewhere."""

    def resolve(value: str | None) -> str | None:
        if value is None or "://" in value or os.path.isabs(value):
            return value
        if base is not None and os.path.exists(os.path.join(base, value)) and not os.path.exists(value):
            return os.path.normpath(os.path.join(base, value))
        return os.path.abspath(value)

    return dataclasses.replace(card, train=resolve(card.train), dev=resolve(card.dev), test=resolve(card.test))


def card_from_flags(*, train: str, dev: str | None = None, test: str | None = None,
                    text_fields: Sequence[str] = (), label_field: str | None = None, task_type: str | None = None,
                    task_name: str | None = None) -> TaskCard:
    """The card of `--train URL --dev URL [--test URL] --text-field F [--text-field G] --label-field L
    [--task-type T] [--task-name N]`."""
    data = {"name": task_name or "own_task", "train": train, "dev": dev, "test": test, "type": task_type,
            "text": list(text_fields), "label": label_field}
    return with_paths(card_from_mapping({k: v for k, v in data.items() if v not in (None, [])}, "flags"))


def unique_names(cards: Sequence[TaskCard]) -> None:
    seen: set[str] = set()
    for card in cards:
        check(card.name not in seen, "name", f"two of your tasks are named {card.name!r}; names must differ")
        seen.add(card.name)


# --------------------------------------------------------------------------------------------
# Card -> TaskSpec


def metrics_of(card: TaskCard) -> tuple[str, ...]:
    """The metrics a settled card reports, the selecting one first."""
    if card.type is None:
        raise ConfigError(f"{card.name}: the type is not known yet; the driver's check settles it")
    names = card.metrics or DEFAULT_METRICS[card.type]
    if card.type == "classification":
        if not card.metrics and len(card.labels) == 2:
            names = (*names, "f1")
        check(len(card.labels) == 2 or "f1" not in names, "metrics",
              f"{card.name}: f1 is the positive class's F1 of a two-class task; this one has "
              f"{len(card.labels)} classes (use macro_f1)")
    if card.type == "span" and card.no_answer:
        names = (*names, *(m for m in NO_ANSWER_METRICS if m not in names))
    return tuple(names)


def card_spec(card: TaskCard) -> TaskSpec:
    """The settled card as a task spec of its type's family; its files are the card's URLs."""
    if card.type is None:
        raise ConfigError(f"{card.name}: the type is not known yet; the driver's check settles it")
    if card.type in ("classification", "multilabel", "token"):
        check(len(card.labels) >= 2 or card.type == "multilabel" and len(card.labels) >= 1, "labels",
              f"{card.name}: a {card.type} task needs its labels (at least two); the driver's check finds them")
    grid = Grid(*dataclasses.astuple(card.grid)) if card.grid else A3_GRID
    labelled_test = bool(card.test and card.test_labelled)
    return TaskSpec(
        name=card.name, family=card.type, column=card.name, data_dir="", files=card.files,
        dev_splits=("dev", "test") if labelled_test else ("dev",), metrics=metrics_of(card), grid=grid,
        max_seq_len=card.max_seq_len or (384 if card.type == "span" else 128),
        labels=card.labels if card.type in ("classification", "multilabel", "token") else (),
        test_splits=("test",) if card.test and not labelled_test else (),
        allow_no_answer=bool(card.no_answer), source=card)


def card_mapping(card: TaskCard) -> dict[str, Any]:
    """The card as plain values, to ship inside a trial's config (`card_from_mapping` rebuilds it)."""
    return to_mapping(card)


__all__ = ["DEV_SHARE", "KNOWN_METRICS", "TYPES", "GridCard", "TaskCard", "card_from_flags",
           "card_from_mapping", "card_mapping", "card_spec", "load_cards", "metrics_of", "unique_names",
           "with_paths"]
