"""Each family's prediction files, in the format its benchmark or tool reads: GLUE's submission
TSVs, the official SQuAD script's predictions.json (and null odds), conlleval's columns, and a
`<split>_predictions.tsv` for everything else. `write` picks the family's writer; the writers are
the `write_predictions` of the families in `bertray.tasks.registry`: (spec, s, outputs, directory,
tau) -> paths written, where `s` is an evaluated split (`.split`, `.labelled`, `.examples`,
`.features`: `bertray.tune.trainer.EvalSet`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bertray.tasks import glue, squad

if TYPE_CHECKING:
    from bertray.tasks.registry import TaskSpec


def write(spec: TaskSpec, s, outputs: Mapping[str, np.ndarray], directory: str, *,
          tau: float | None = None) -> list[str]:
    """The split's predictions in the task's customary format (its family's `write_predictions`);
    GLUE test splits as the benchmark server's submission files (`SST-2.tsv`, `MNLI-m.tsv`, ...).
    Returns the paths written.

    SQuAD 2.0 answers are decoded at the no-answer threshold `tau`, which should be the one the
    dev metrics report (`run_trial` passes the tuned `{split}_tau`); None: tuned on `s` itself
    when it is labelled (what `spec.evaluate` does), else 0. The null odds file does not depend on
    it (+/-inf odds are written as large finite numbers)."""
    return spec.family_info.write_predictions(spec, s, outputs, str(directory), tau)


def write_glue(spec: TaskSpec, s, outputs: Mapping[str, np.ndarray], directory: str, tau: float | None) -> list[str]:
    """A GLUE test split as the benchmark server's submission file (`SST-2.tsv`, `MNLI-m.tsv`,
    ...); other splits, and your own tasks' test files, as `<split>_predictions.tsv` (index: the
    row's line in its file for your own tasks)."""
    predictions = spec.decode(s.examples, s.features, outputs)
    if not s.labelled and spec.source is None:
        return [glue.write_submission(spec.name, predictions, directory, s.split, s.examples)]
    rows = [("index", "prediction", "label")] + [(e.guid, _text(p), _text(e.label))
                                                  for e, p in zip(s.examples, predictions)]
    if not s.labelled:
        rows = [row[:2] for row in rows]
    return [_write_tsv(f"{directory}/{s.split}_predictions.tsv", rows)]


def write_multilabel(spec: TaskSpec, s, outputs: Mapping[str, np.ndarray], directory: str,
                      tau: float | None) -> list[str]:
    """`<split>_predictions.tsv`: index, the predicted labels and (labelled splits) the gold ones,
    each as a JSON list."""
    width = 3 if s.labelled else 2
    rows = [("index", "prediction", "label")[:width]]
    for e, p in zip(s.examples, spec.decode(s.examples, s.features, outputs)):
        rows.append((e.guid, json.dumps(list(p), ensure_ascii=False),
                     json.dumps(list(e.labels or ()), ensure_ascii=False))[:width])
    return [_write_tsv(f"{directory}/{s.split}_predictions.tsv", rows)]


def write_squad(spec: TaskSpec, s, outputs: Mapping[str, np.ndarray], directory: str, tau: float | None) -> list[str]:
    """The official script's predictions.json and, for SQuAD 2.0, null odds; answers at `tau`
    (None: tuned on `s` when it is labelled, as `evaluate` does, else 0)."""
    start, end = outputs["start_logits"], outputs["end_logits"]
    if spec.allow_no_answer and tau is None:
        tau = squad.best_tau(s.examples, s.features, start, end) if s.labelled else 0.0
    predictions, odds = squad.decode_squad(s.examples, s.features, start, end,
                                           allow_no_answer=spec.allow_no_answer, tau=tau or 0.0)
    paths = [f"{directory}/{s.split}_predictions.json"]
    squad.write_predictions(predictions, paths[0])
    if odds:
        paths.append(f"{directory}/{s.split}_null_odds.json")
        squad.write_predictions(odds, paths[1])
    return paths


def write_swag(spec: TaskSpec, s, outputs: Mapping[str, np.ndarray], directory: str, tau: float | None) -> list[str]:
    predictions = spec.decode(s.examples, s.features, outputs)
    rows = [("guid", "prediction", "label")] + [(e.guid, str(p), "" if e.label is None else str(e.label))
                                                for e, p in zip(s.examples, predictions)]
    return [_write_tsv(f"{directory}/{s.split}_predictions.tsv", rows)]


def write_conll(spec: TaskSpec, s, outputs: Mapping[str, np.ndarray], directory: str, tau: float | None) -> list[str]:
    """conlleval's input: "word gold predicted" per line, a blank line between sentences; an
    unlabelled split (your own task's test file) has no gold tags to show: "word predicted"."""
    predictions = spec.decode(s.examples, s.features, outputs)
    path = f"{directory}/{s.split}_predictions.txt"
    with open(path, "w", encoding="utf-8") as f:
        for example, tags in zip(s.examples, predictions):
            columns = zip(example.words, example.tags, tags) if s.labelled else zip(example.words, tags)
            f.writelines(" ".join(line) + "\n" for line in columns)
            f.write("\n")
    return [path]


def _text(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_tsv(path: str, rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerows(rows)
    Path(path).write_text(buffer.getvalue(), encoding="utf-8")
    return path
