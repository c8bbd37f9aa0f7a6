"""Your own task's data, read and checked once on the driver before any trial starts.

`check_card(card)` reads every file of a task card once, row by row, and either refuses it with
one clear message or settles what the card left open and says what it found:

    refused (TaskDataError)    a missing file; a missing column (the columns that exist are listed);
                               fewer than two classes in train; dev or test labels that train lacks
                               (listed with counts); more bad rows in a split than `max_bad_share`
    settled (the card)         the type, inferred from the label column when not given; the labels and
                               their order; unanswerable questions (span); whether test has labels
    said (report lines)        the inferred type, in one line; bad rows skipped, the first three as
                               `file:line` and the total; the held-out dev split and its size; rows
                               both in train and dev (a leak that inflates the dev score)

Bad rows (an empty text, a missing or unparsable label, a wrong number of fields) are skipped
the same way by every trial (`bertray.tasks.own`). Nothing is kept but counts and one 64-bit
fingerprint per row, so a large file is checked in about its size in hashes.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from bertray.errors import ConfigError, TaskDataError
from bertray.tasks import files, own
from bertray.tasks.card import DEV_SHARE, TaskCard, metrics_of

MAX_CLASS_INTEGERS = 20          # integer labels with at most this many distinct values are classes
INFER_ROWS = 1000                # rows of train the type is inferred from
SHOW_BAD = 3                     # bad rows named by file:line; the rest counted
_INTEGER = re.compile(r"\s*[-+]?\d+\s*")
_FLOAT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


@dataclass
class SplitScan:
    """What one pass over a split found."""

    split: str
    url: str
    rows: int = 0
    bad: int = 0
    first_bad: list[str] = field(default_factory=list)
    labels: collections.Counter = field(default_factory=collections.Counter)
    unanswerable: int = 0
    choices: collections.Counter = field(default_factory=collections.Counter)
    fingerprints: array.array = field(default_factory=lambda: array.array("q"))   # 8 bytes a row

    def bad_line(self) -> str:
        shown = ", ".join(self.first_bad)
        more = f", ... {self.bad:,} in all" if self.bad > len(self.first_bad) else ""
        rows = f"row{'s' if self.bad != 1 else ''}"
        return f"{self.split}: skipped {self.bad:,} bad {rows} of {self.rows + self.bad:,}: {shown}{more}"


# --------------------------------------------------------------------------------------------
# Type inference (pure)


def infer_type(labels: Sequence[Any], texts: Sequence[Any] = ()) -> tuple[str, str]:
    """(type, why) from a sample of label values: lists mean multilabel (token when the texts are
    lists too), floats mean regression, integers with at most `MAX_CLASS_INTEGERS` distinct values
    and any other strings mean classification; many distinct integers mean regression."""
    values = [v for v in labels if v is not None and not (isinstance(v, str) and not v.strip())]
    if not values:
        raise TaskDataError("no label values to infer the type from; give `type`")
    lists = [own.listish(v) for v in values if _is_list(v)]
    if lists and len(lists) == len(values):
        if texts and all(_is_list(t) for t in texts if t is not None):
            return "token", "lists of tags beside lists of tokens"
        return "multilabel", "lists of labels"
    if any(isinstance(v, bool) for v in values):
        return "classification", f"{len(set(values))} distinct booleans"
    kinds = {_kind(v) for v in values}
    distinct = len({own.class_label(v) for v in values})
    if kinds == {"int"}:
        if distinct <= MAX_CLASS_INTEGERS:
            return "classification", f"{distinct} distinct integers"
        return "regression", f"{distinct} distinct integers (more than {MAX_CLASS_INTEGERS})"
    if kinds <= {"int", "float"}:
        return "regression", "numbers with decimals"
    return "classification", f"{distinct} distinct strings"


def _is_list(value: Any) -> bool:
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist") and not isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]")


def _kind(value: Any) -> str:
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    text = str(value)
    if _INTEGER.fullmatch(text):
        return "int"
    if _FLOAT.fullmatch(text):
        return "float"
    return "str"


def label_order(values: Iterable[str]) -> tuple[str, ...]:
    """Labels sorted as a person would: integers by value, anything else alphabetically."""
    values = list(values)
    if values and all(_INTEGER.fullmatch(v) for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


def tag_order(values: Iterable[str]) -> tuple[str, ...]:
    """Tags with O first, then by entity type, B- before I- (CoNLL's own order is given by a card)."""
    def key(tag: str):
        prefix, _, kind = tag.partition("-")
        return (tag != "O", kind, "BIES".find(prefix) if prefix in "BIES" else 9, tag)

    return tuple(sorted(set(values), key=key))


# --------------------------------------------------------------------------------------------
# The check


def check_card(card: TaskCard) -> tuple[TaskCard, list[str]]:
    """Read and check every file of `card` (see the module docstring); the settled card and the
    lines to print."""
    lines: list[str] = []
    _files_exist(card)
    card = _settle_type(card, lines)
    _columns_exist(card)
    test_labelled = card.test_labelled
    if card.test and test_labelled is None:
        test_labelled = _has_labels(card, card.test)
    card = dataclasses.replace(card, test_labelled=bool(test_labelled) if card.test else None)

    scans = {split: _scan(card, split, url) for split, url in card.files.items()}
    train, dev = scans["train"], scans["dev"]
    for scan in scans.values():
        if scan.bad:
            lines.append(f"{card.name}: {scan.bad_line()}")
        total = scan.rows + scan.bad
        if total and scan.bad / total > card.max_bad_share:
            raise TaskDataError(f"{card.name}: {_where(card, scan)}: {scan.bad:,} of {total:,} rows are bad "
                                f"({scan.bad / total:.1%}, more than max_bad_share {card.max_bad_share:.0%}): "
                                f"{', '.join(scan.first_bad)}{' ...' if scan.bad > len(scan.first_bad) else ''}"
                                + _quote_hint(card, scan))
        if not scan.rows and (scan.split != "dev" or not card.holdout):
            raise TaskDataError(f"{card.name}: {_where(card, scan)}: no usable rows")
    card = _settle_labels(card, scans)
    if card.holdout:
        lines.append(f"{card.name}: no dev file: held out {DEV_SHARE:.0%} of train (seed {card.holdout_seed}"
                     f"{', stratified by class' if card.type == 'classification' else ''}): "
                     f"{train.rows:,} train / {dev.rows:,} dev rows")
        if not dev.rows:
            raise TaskDataError(f"{card.name}: {card.train}: too few rows to hold out a dev split "
                                f"({train.rows} rows); give a dev file")
    leaks = _leaks(train, dev)
    if leaks:
        lines.append(f"{card.name}: leak: {leaks:,} of {dev.rows:,} dev rows also occur in train (same text); "
                     "they inflate the dev score")
    sizes = ", ".join(f"{s.split} {s.rows:,}" for s in scans.values())
    labels = f", labels {', '.join(card.labels[:8])}{' ...' if len(card.labels) > 8 else ''}" if card.labels else ""
    lines.append(f"{card.name}: {card.type}{labels}; rows: {sizes}; metrics {', '.join(metrics_of(card))}")
    return card, lines


def check_cards(cards: Sequence[TaskCard]) -> tuple[list[TaskCard], list[str]]:
    out, lines = [], []
    for card in cards:
        settled, said = check_card(card)
        out.append(settled)
        lines.extend(said)
    return out, lines


def _where(card: TaskCard, scan: SplitScan) -> str:
    return f"{scan.url} (the dev rows held out of it)" if scan.split == "dev" and card.holdout else scan.url


def _quote_hint(card: TaskCard, scan: SplitScan) -> str:
    if files.format_of(scan.url, card.file_format) in ("csv", "tsv") and card.quote and \
            any("fields, found" in b for b in scan.first_bad):
        return ". A quote that opens a field and never closes joins lines; `quote: false` reads quotes as text"
    return ""


def _files_exist(card: TaskCard) -> None:
    splits: dict[str, list[str]] = {}
    for split, url in card.files.items():
        splits.setdefault(url, []).append(split)
    missing = []
    for url, names in splits.items():
        try:
            files.open_file(url).close()
        except TaskDataError as exc:
            missing.append(f"{'/'.join(names)}: {exc}")
    if missing:
        raise TaskDataError(f"{card.name}: {'; '.join(missing)}")


def _needed_fields(card: TaskCard, *, labelled: bool = True) -> list[str]:
    names = list(card.text)
    if card.type == "multiple_choice":
        names.append(card.choices)
    if labelled:
        names.append(card.label)
    return names


def _columns_exist(card: TaskCard) -> None:
    for split, url in card.files.items():
        if files.format_of(url, card.file_format) in ("squad", "conll"):
            continue
        present = files.columns(url, card.file_format)
        labelled = split != "test" or (card.test_labelled is not False and card.label in present)
        missing = [name for name in _needed_fields(card, labelled=labelled) if name not in present]
        if missing:
            raise TaskDataError(f"{card.name}: {url}: no column {', '.join(map(repr, missing))}; the columns are "
                                f"{', '.join(map(repr, present)) or 'none (an empty file?)'}")


def _has_labels(card: TaskCard, url: str) -> bool:
    """Whether a test file carries labels: a label column with at least one value in its first rows."""
    kind = files.format_of(url, card.file_format)
    if kind == "squad":
        return True
    if kind != "conll" and card.label not in files.columns(url, card.file_format):
        return False
    for i, row in enumerate(own.records(card, url)):
        if row.fields is not None and _is_label(row.fields.get(card.label)):
            return True
        if i >= INFER_ROWS:
            break
    return False


def _is_label(value: Any) -> bool:
    """Whether a label cell says something: not missing, not empty, and not a list of empty tags
    (what a CoNLL file of words alone, the text to tag, has in its tag column)."""
    if isinstance(value, (list, tuple)):
        return any(str(v).strip() for v in value)
    return value not in (None, "")


def _settle_type(card: TaskCard, lines: list[str]) -> TaskCard:
    if card.type is not None:
        return card
    kind = files.format_of(card.train, card.file_format)
    if kind == "squad":
        guessed, why = "span", "a SQuAD file"
    elif kind == "conll":
        guessed, why = "token", "a CoNLL column file"
    else:
        present = files.columns(card.train, card.file_format)
        missing = [name for name in (*card.text, card.label) if name not in present]
        if missing:
            raise TaskDataError(f"{card.name}: {card.train}: no column {', '.join(map(repr, missing))}; the columns "
                                f"are {', '.join(map(repr, present)) or 'none (an empty file?)'}")
        labels, texts = [], []
        for row in files.read_rows(card.train, card.file_format):
            if row.fields is not None:
                labels.append(row.fields.get(card.label))
                texts.append(row.fields.get(card.text[0]))
            if len(labels) >= INFER_ROWS:
                break
        try:
            guessed, why = infer_type(labels, texts)
        except TaskDataError as exc:
            raise TaskDataError(f"{card.name}: {card.train}: {exc}") from None
    lines.append(f"{card.name}: type {guessed} (inferred from column {card.label!r}: {why}; set `type` to change it)")
    try:
        return dataclasses.replace(card, type=guessed)
    except ConfigError as exc:
        raise ConfigError(f"{card.name}: as a {guessed} task: {exc}") from None


def _scan(card: TaskCard, split: str, url: str) -> SplitScan:
    scan = SplitScan(split, url)
    for line, example, problem in own.split_rows(card, url, split):
        if example is None:
            scan.bad += 1
            if len(scan.first_bad) < SHOW_BAD:
                scan.first_bad.append(f"{url}:{'row ' if _numbered_rows(card, url) else ''}{line} ({problem})")
            continue
        scan.rows += 1
        _count_labels(card, example, scan)
        scan.fingerprints.append(own.fingerprint(card, example))
    return scan


def _numbered_rows(card: TaskCard, url: str) -> bool:
    return files.format_of(url, card.file_format) == "parquet"


def _count_labels(card: TaskCard, example: Any, scan: SplitScan) -> None:
    if card.type == "classification" and example.label is not None:
        scan.labels[example.label] += 1
    elif card.type == "multilabel" and example.labels is not None:
        scan.labels.update(example.labels)
    elif card.type == "token" and (scan.split != "test" or card.test_labelled):
        scan.labels.update(example.tags)
    elif card.type == "span":
        scan.unanswerable += example.is_impossible
    elif card.type == "multiple_choice":
        scan.choices[len(example.endings)] += 1


def _settle_labels(card: TaskCard, scans: dict[str, SplitScan]) -> TaskCard:
    train = scans["train"]
    if card.type in ("classification", "multilabel", "token"):
        what = "tags" if card.type == "token" else "classes" if card.type == "classification" else "labels"
        if card.labels:
            unknown = {k: n for k, n in train.labels.items() if k not in card.labels}
            if unknown:
                raise TaskDataError(f"{card.name}: {card.train}: {what} not in the card's `labels`: {_counts(unknown)}")
        if len(train.labels) < 2 and card.type != "multilabel" or not train.labels:
            raise TaskDataError(f"{card.name}: {card.train}: train has {len(train.labels)} distinct {what} "
                                f"({_counts(train.labels) or 'none'}); a {card.type} task needs at least two")
        for scan in scans.values():
            unseen = {k: n for k, n in scan.labels.items() if k not in train.labels}
            if scan.split != "train" and unseen:
                raise TaskDataError(f"{card.name}: {scan.url}: {scan.split} has {what} that train lacks: "
                                    f"{_counts(unseen)}")
        order = card.labels or (tag_order(train.labels) if card.type == "token" else label_order(train.labels))
        card = dataclasses.replace(card, labels=order)
        metrics_of(card)                  # f1 asked of a task with more than two classes fails here
    if card.type == "span" and card.no_answer is None:
        card = dataclasses.replace(card, no_answer=train.unanswerable > 0)
    if card.type == "span" and not card.no_answer:
        for scan in scans.values():
            if scan.unanswerable:
                raise TaskDataError(f"{card.name}: {scan.url}: {scan.unanswerable:,} unanswerable questions, but "
                                    "`no_answer` is false")
    if card.type == "multiple_choice":
        counts = collections.Counter()
        for scan in scans.values():
            counts.update(scan.choices)
        if len(counts) > 1:
            raise TaskDataError(f"{card.name}: rows have different numbers of choices ({_counts(counts)} rows); "
                                "every row of a task needs the same number")
    return card


def _counts(counter: dict) -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return ", ".join(f"{k!r} ({n:,} row{'s' if n != 1 else ''})" for k, n in items[:20]) + \
        (f", ... {len(items)} in all" if len(items) > 20 else "")


def _leaks(train: SplitScan, dev: SplitScan) -> int:
    """Dev rows whose text also occurs in train."""
    if not train.fingerprints or not dev.fingerprints:
        return 0
    return int(np.isin(np.frombuffer(dev.fingerprints, dtype=np.int64),
                       np.frombuffer(train.fingerprints, dtype=np.int64)).sum())


__all__ = ["check_card", "check_cards", "infer_type", "label_order", "tag_order"]
