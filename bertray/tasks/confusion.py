"""Confusion matrices of a task with a closed label set: counted, scored per class, written, drawn.

One number per task hides which classes a model gets wrong; a model that learned nothing
predicts one class and its matrix has one non-empty column. Trials write the matrix of every
labelled dev split as CSV with their prediction files (cheap: counts only); the sweep draws the
winners' as PNG (matplotlib, imported only then, Agg backend: no display needed) and the results
table shows their per-class precision, recall and F1.

`confusion.csv`: rows are gold labels, columns predicted labels, in the task's label order; the
first cell is `gold\\predicted`. The first dev split's file is `confusion.csv` (the split that
selects the winner), another dev split's `confusion_<split>.csv` (MNLI's mismatched set, the
CoNLL test set). Tasks whose items are not labels of `spec.labels` (regression, spans, multiple
choice) get none. A multilabel task has no single matrix (an item carries any number of labels):
its first dev split gets `label_scores.csv` instead, each label scored as its own yes/no question.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from bertray.tasks.registry import TaskSpec

log = logging.getLogger(__name__)

CORNER = "gold\\predicted"


@dataclass(frozen=True)
class Confusion:
    """Counts [gold, predicted] over `labels`, for one split."""

    labels: tuple[str, ...]
    counts: np.ndarray
    split: str = "dev"

    @property
    def total(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class ClassScore:
    label: str
    precision: float        # percent; 0 when the class is never predicted (scikit-learn's zero_division=0)
    recall: float           # percent; 0 when the class never occurs
    f1: float               # percent
    support: int            # gold items of the class
    predicted: int          # items predicted as the class


def file_name(split: str, first: bool) -> str:
    """`confusion.csv` for the first dev split, `confusion_<split>.csv` for the others."""
    return "confusion.csv" if first else f"confusion_{split}.csv"


def confusion_matrix(gold: Sequence, predicted: Sequence, labels: Sequence[str], split: str = "dev") -> Confusion:
    """Count (gold, predicted) pairs; an item that is not a label is an error (a wrong label set)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold items but {len(predicted)} predictions")
    index = {str(label): i for i, label in enumerate(labels)}
    unknown = sorted({str(x) for x in (*gold, *predicted)} - set(index))
    if unknown:
        raise ValueError(f"items outside the label set {list(labels)}: {unknown[:5]}")
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    if len(gold):
        np.add.at(counts, ([index[str(g)] for g in gold], [index[str(p)] for p in predicted]), 1)
    return Confusion(tuple(str(label) for label in labels), counts, split)


def split_confusion(spec: "TaskSpec", split: str, examples: Sequence, features: Mapping[str, np.ndarray],
                    outputs: Mapping[str, np.ndarray], **options: Any) -> Confusion | None:
    """The matrix of one scored split, or None when the task's items are not labels of a closed
    set (regression scores, answer texts, choice indices)."""
    if not spec.labels:
        return None
    gold, predicted = spec.family_info.gold_and_predicted(spec, examples, features, outputs, **options)
    labels = set(spec.labels)
    if not all(isinstance(x, str) and x in labels for x in (*gold, *predicted)):
        return None
    return confusion_matrix(gold, predicted, spec.labels, split)


def split_label_scores(spec: "TaskSpec", examples: Sequence, features: Mapping[str, np.ndarray],
                       outputs: Mapping[str, np.ndarray]) -> list[ClassScore] | None:
    """A multilabel split's per-label scores (`label_scores`); None for every other family."""
    if not spec.family_info.label_sets:
        return None
    gold, predicted = spec.family_info.gold_and_predicted(spec, examples, features, outputs)
    return label_scores(gold, predicted, spec.labels)


def per_class(confusion: Confusion) -> list[ClassScore]:
    """Precision, recall and F1 of every class, in label order (one-vs-rest, from the counts)."""
    counts = confusion.counts
    out = []
    for i, label in enumerate(confusion.labels):
        tp, support, predicted = int(counts[i, i]), int(counts[i].sum()), int(counts[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * tp / (support + predicted) if support + predicted else 0.0
        out.append(ClassScore(label, 100 * precision, 100 * recall, 100 * f1, support, predicted))
    return out


def label_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                 labels: Sequence[str]) -> list[ClassScore]:
    """Multilabel: each label's precision, recall and F1 as its own yes/no question over the items
    (one-vs-rest, as scikit-learn's `average=None`), in label order. A multilabel task has no
    single confusion matrix: an item may carry several labels, or none."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold items but {len(predicted)} predictions")
    out = []
    for label in labels:
        is_gold = np.array([label in g for g in gold], dtype=bool)
        is_predicted = np.array([label in p for p in predicted], dtype=bool)
        tp, support, n_predicted = int((is_gold & is_predicted).sum()), int(is_gold.sum()), int(is_predicted.sum())
        out.append(ClassScore(str(label), 100 * tp / n_predicted if n_predicted else 0.0,
                              100 * tp / support if support else 0.0,
                              100 * 2 * tp / (support + n_predicted) if support + n_predicted else 0.0,
                              support, n_predicted))
    return out


# --------------------------------------------------------------------------------------------
# Files

LABEL_SCORES = "label_scores.csv"      # a multilabel winner's per-label scores, beside its predictions
_SCORE_COLUMNS = ("label", "precision", "recall", "f1", "support", "predicted")


def label_scores_csv(scores: Sequence[ClassScore]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_SCORE_COLUMNS)
    writer.writerows((s.label, f"{s.precision:.4f}", f"{s.recall:.4f}", f"{s.f1:.4f}", s.support, s.predicted)
                     for s in scores)
    return buffer.getvalue()


def write_label_scores(scores: Sequence[ClassScore], directory: str) -> str:
    path = posixpath.join(str(directory), LABEL_SCORES)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(label_scores_csv(scores))
    return path


def read_folder_label_scores(folder: str) -> list[ClassScore] | None:
    """The `label_scores.csv` of a predictions folder (local or fsspec URL), or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    path = posixpath.join(root, LABEL_SCORES)
    return read_label_scores(fs.cat_file(path).decode("utf-8")) if fs.isfile(path) else None


def read_label_scores(text: str) -> list[ClassScore]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != _SCORE_COLUMNS:
        raise ValueError(f"not a label scores file: the header should be {','.join(_SCORE_COLUMNS)}")
    return [ClassScore(r[0], float(r[1]), float(r[2]), float(r[3]), int(r[4]), int(r[5])) for r in rows[1:]]



def to_csv(confusion: Confusion) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([CORNER, *confusion.labels])
    for label, row in zip(confusion.labels, confusion.counts):
        writer.writerow([label, *map(int, row)])
    return buffer.getvalue()


def from_csv(text: str, split: str = "dev") -> Confusion:
    """Read what `to_csv` wrote; a file of another shape is an error naming what is wrong."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:1] != [CORNER]:
        raise ValueError(f"not a confusion matrix: the first cell should be {CORNER!r}")
    labels = tuple(rows[0][1:])
    body = rows[1:]
    if [r[0] for r in body] != list(labels) or any(len(r) != len(labels) + 1 for r in body):
        raise ValueError(f"not a confusion matrix: rows {[r[:1] for r in body]} do not match columns {list(labels)}")
    return Confusion(labels, np.array([[int(x) for x in r[1:]] for r in body], dtype=np.int64).reshape(
        len(labels), len(labels)), split)


def write_csv(confusion: Confusion, directory: str, first: bool) -> str:
    path = posixpath.join(str(directory), file_name(confusion.split, first))
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(to_csv(confusion))
    return path


def png_bytes(confusion: Confusion, title: str = "") -> bytes:
    """The matrix as a PNG heat map with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")               # no display; a no-op when pyplot already uses it
    import matplotlib.pyplot as plt

    k = len(confusion.labels)
    size = min(16.0, 2.5 + 0.6 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    try:
        image = ax.imshow(confusion.counts, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k), confusion.labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
        ax.set_yticks(range(k), confusion.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(title or f"{confusion.split}: {confusion.total} items")
        if k <= 30:
            peak = confusion.counts.max() or 1
            for (i, j), n in np.ndenumerate(confusion.counts):
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                        color="white" if n > peak / 2 else "black")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def draw_folder(folder: str, first_split: str, title: str = "") -> dict[str, Confusion]:
    """Read every `confusion*.csv` in a predictions folder (local or fsspec URL), write the PNG
    beside each (`confusion.png`, ...) and return the matrices by split (`confusion.csv` is
    `first_split`'s), in file order. A picture that cannot be drawn (no matplotlib) is logged and
    skipped: the end of a long sweep is no place to fail over a PNG."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder)
    out = {}
    for path in sorted(fs.glob(posixpath.join(root, "confusion*.csv"))):
        stem = posixpath.basename(path)[:-len(".csv")]
        split = stem.partition("_")[2] or first_split
        matrix = from_csv(fs.cat_file(path).decode("utf-8"), split)
        try:
            picture = png_bytes(matrix, f"{title} {split}".strip())
        except ImportError as exc:
            log.warning("%s: no %s.png (%s); %s.csv has the numbers", folder, stem, exc, stem)
        else:
            with fs.open(posixpath.join(root, f"{stem}.png"), "wb") as f:
                f.write(picture)
        out[split] = matrix
    return out

