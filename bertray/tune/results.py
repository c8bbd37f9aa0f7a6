"""The results of a fine-tuning sweep: one record per trial, the winner per (checkpoint, task) on
the dev metric, and the tables in the paper's layout (markdown), plus csv and json of every trial.

Pure Python (no Ray): `bertray.tune.sweep` turns Tune's `ResultGrid` into `TrialRecord`s and
calls `write_results`.

Layout of `results.md`:
- one table per paper table present: GLUE (Table 1), SQuAD 1.1 (Table 2), SQuAD 2.0 (Table 3),
  SWAG (Table 4), CoNLL-2003 (Table 7); rows are the checkpoints, columns the tasks' paper columns
  (MNLI shows matched/mismatched accuracy, QQP and MRPC F1, STS-B Spearman, CoLA Matthews corr.,
  SQuAD EM/F1, CoNLL-2003 dev/test F1) and GLUE's "Average";
- a "trivial baseline" row under each table: what a predictor that learned nothing scores on the
  same dev examples with the task's own scorer (majority class, mean, no entity, empty answer or
  first token, most frequent answer index: `bertray.tasks.baselines`), and a "(constant)" flag on
  every cell whose winner made one and the same prediction for every dev example of a split;
- tasks outside the paper's tables (your own) in one more table of the same kind;
- the winning grid point of every (checkpoint, task) with all its dev metrics, its baseline's and
  how many distinct predictions it made;
- per-class precision, recall and F1 of the winners of tasks with a closed label set, from their
  confusion matrices (`confusion.csv`/`.png` beside their predictions; `bertray.tasks.confusion`);
- every failed trial with its error.

Tables read the metrics the trials reported (`{split}_baseline_{metric}`,
`{split}_distinct_predictions`); a record without them (an older sweep) shows no baseline or flag.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import fsspec

from bertray.tasks import baselines, confusion
from bertray.tasks.registry import TASKS, TaskSpec

OK, STOPPED, FAILED = "OK", "STOPPED", "FAILED"
GRID_KEYS = ("learning_rate", "batch_size", "epochs", "seed")
POINT_KEYS = GRID_KEYS[:-1]          # a grid point; its seeds are restarts of it
BASELINE = "baseline"                # metric prefix of the trivial baseline: dev_baseline_accuracy
DISTINCT = "distinct_predictions"    # {split}_distinct_predictions: 1 is a constant predictor
BASELINE_ROW = "trivial baseline"
CONSTANT_FLAG = " (constant)"
Confusions = Mapping[tuple[str, str], Mapping[str, confusion.Confusion]]   # (row, task) -> split -> matrix
LabelScores = Mapping[tuple[str, str], Sequence[confusion.ClassScore]]      # (row, task) -> multilabel scores


@dataclass
class TrialRecord:
    """One trial: which checkpoint row and grid point, how it ended, its last reported metrics."""

    row: str                             # the checkpoint's label (a row of the paper tables)
    task: str
    trial_id: str
    status: str                          # OK, STOPPED (early, by the scheduler) or FAILED
    config: dict[str, Any]               # learning_rate, batch_size, epochs, seed
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    predictions: str | None = None       # where the trial's prediction files are (its Tune checkpoint)
    failures: int = 0                    # attempts that raised (Tune reran the trial after each, up to max_failures)
    model: str | None = None             # where the sweep kept the trial's model (bertray.tune.saved_models)

    @property
    def score(self) -> float | None:
        value = self.metrics.get("score")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Selection


def select_best(records: Iterable[TrialRecord]) -> dict[tuple[str, str], TrialRecord]:
    """The winner per (row, task): the highest `score` (the task's primary metric on its first dev
    split) among trials that did not fail; ties go to the earlier trial. Stopped trials compete
    with the score they reached, as ASHA intends."""
    best: dict[tuple[str, str], TrialRecord] = {}
    for record in records:
        if record.status == FAILED or record.score is None:
            continue
        key = (record.row, record.task)
        if key not in best or record.score > best[key].score:
            best[key] = record
    return best


# --------------------------------------------------------------------------------------------
# Tables

# Which tasks go in which table of the paper, and the GLUE average's members.
PAPER_TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GLUE dev (paper Table 1 layout)", ("mnli", "qqp", "qnli", "sst2", "cola", "stsb", "mrpc", "rte", "wnli")),
    ("SQuAD 1.1 dev (Table 2)", ("squad1",)),
    ("SQuAD 2.0 dev (Table 3)", ("squad2",)),
    ("SWAG dev (Table 4)", ("swag",)),
    ("CoNLL-2003 NER (Table 7)", ("conll2003", "conll2003_feature")),
)
GLUE_AVERAGE_EXCLUDES = ("wnli",)    # the paper's footnote: WNLI is left out of the average


def cell_keys(spec: TaskSpec, prefix: str = "") -> list[str]:
    """The metric keys a paper column shows for one task: the primary metric of each dev split
    (MNLI m/mm, CoNLL dev/test), or EM and F1 for SQuAD; `prefix` "baseline_": its baseline's."""
    if spec.family_info.table_metrics:
        return [f"{spec.dev_splits[0]}_{prefix}{k}" for k in spec.family_info.table_metrics]
    return [f"{split}_{prefix}{spec.metric}" for split in spec.dev_splits]


def cell_values(spec: TaskSpec, metrics: Mapping[str, Any], prefix: str = "") -> list[float | None]:
    """The numbers of `cell_keys` in `metrics` (None: missing or not finite)."""
    return [_number(metrics.get(key)) for key in cell_keys(spec, prefix)]


def constant_splits(spec: TaskSpec, metrics: Mapping[str, Any]) -> list[str]:
    """The dev splits on which a trial predicted one and the same thing for every example."""
    return [split for split in spec.dev_splits if metrics.get(f"{split}_{DISTINCT}") == 1]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _fmt(values: Sequence[float | None]) -> str:
    return "/".join("-" if v is None else f"{v:.1f}" for v in values)


def baseline_metrics(records: Iterable[TrialRecord], row: str | None = None) -> dict[str, dict[str, Any]]:
    """Per task, the metrics of a trial that reported its baseline (`{split}_baseline_{metric}`),
    preferring `row`'s: every trial of a sweep scores the same baseline on the same examples."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if any(f"_{BASELINE}_" in k for k in r.metrics) and (r.task not in out or r.row == row):
            out[r.task] = r.metrics
    return out


def _fmt_baseline(spec: TaskSpec, metrics: Mapping[str, Any] | None) -> str:
    """A baseline cell: "-" when not reported, "n/a" where the metric is undefined for a constant
    predictor (a correlation: NaN)."""
    if metrics is None:
        return "-"
    cells = []
    for key in cell_keys(spec, f"{BASELINE}_"):
        value = metrics.get(key)
        cells.append("-" if not isinstance(value, (int, float)) else "n/a" if not math.isfinite(value)
                     else f"{value:.1f}")
    return "/".join(cells)


def column_header(spec: TaskSpec) -> str:
    return spec.column + spec.family_info.column_suffix


def _table_groups(tasks: Sequence[str]) -> list[tuple[str, list[str], bool]]:
    """(title, tasks present, is GLUE) of every table to draw: the paper's, then one for the tasks
    in none of them (your own tasks), in sweep order."""
    groups = [(title, [t for t in members if t in tasks], members[0] == "mnli") for title, members in PAPER_TABLES]
    listed = {t for _, members in PAPER_TABLES for t in members}
    groups.append(("Other tasks, dev", [t for t in tasks if t not in listed], False))
    return [g for g in groups if g[1]]


def paper_tables(best: Mapping[tuple[str, str], TrialRecord], rows: Sequence[str],
                 tasks: Sequence[str], records: Sequence[TrialRecord] = (),
                 specs: Mapping[str, TaskSpec] = TASKS) -> str:
    """Markdown tables in the paper's layout for the tasks that were run, each with the trivial
    baseline's row when the trials reported it (from `records`) and constant winners flagged."""
    out = []
    reference = baseline_metrics(records)
    for title, present, glue in _table_groups(tasks):
        header = ["checkpoint", *(column_header(specs[t]) for t in present)]
        averaged = [t for t in present if t not in GLUE_AVERAGE_EXCLUDES]
        with_average = glue and len(averaged) > 1
        if with_average:
            header.append("Average")
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        flagged = False
        for row in rows:
            cells, numbers = [row], []
            for task in present:
                record = best.get((row, task))
                values = cell_values(specs[task], record.metrics) if record else [None]
                constant = bool(record and constant_splits(specs[task], record.metrics))
                flagged |= constant
                cells.append(_fmt(values) + (CONSTANT_FLAG if constant else ""))
                if task in averaged:
                    numbers.extend(values)
            if with_average:
                cells.append(_average(numbers))
            lines.append("| " + " | ".join(cells) + " |")
        with_baseline = any(t in reference for t in present)
        if with_baseline:
            cells = [BASELINE_ROW, *(_fmt_baseline(specs[t], reference.get(t)) for t in present)]
            if with_average:
                cells.append(_average([v for t in averaged for v in
                                       (cell_values(specs[t], reference[t], f"{BASELINE}_") if t in reference
                                        else [None])]))
            lines.append("| " + " | ".join(cells) + " |")
        notes = []
        if with_average:
            notes.append(f"Average: mean of the numbers shown, MNLI-m and -mm counted separately as in the "
                         f"paper's Table 1, {', '.join(t.upper() for t in GLUE_AVERAGE_EXCLUDES)} left out.")
        if with_baseline:
            notes.append(_baseline_note([specs[t] for t in present if t in reference]))
        if flagged:
            notes.append(f"{CONSTANT_FLAG.strip()}: the winner predicted one and the same thing for every example "
                         "of a dev split (one class, tag or answer): it learned nothing, whatever its score; "
                         "compare it with the trivial baseline.")
        out.append("\n".join(lines + ["", *notes] if notes else lines))
    return "\n\n".join(out)


def _average(numbers: Sequence[float | None]) -> str:
    complete = numbers and all(v is not None for v in numbers)
    return f"{sum(numbers) / len(numbers):.1f}" if complete else "-"


def _baseline_note(specs: Sequence[TaskSpec]) -> str:
    """What the baseline row predicts, task by task (grouped when the same), e.g. "SST-2, MRPC:
    majority class of train"."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        groups.setdefault(baselines.describe(spec), []).append(spec.column)
    return ("Trivial baseline: what a predictor that learned nothing scores on the same dev examples with the "
            "task's own scorer; " + "; ".join(f"{', '.join(cols)}: {what}" for what, cols in groups.items()) + ".")


def _metric_summary(spec: TaskSpec, metrics: Mapping[str, Any], prefix: str = "") -> str:
    """All dev metrics of a trial, `dev accuracy 91.2, ...` (breakdowns by entity type left out);
    `prefix` "baseline_": its baseline's (an undefined one as n/a)."""
    parts = []
    for split in spec.dev_splits:
        for name in spec.metrics:
            value = metrics.get(f"{split}_{prefix}{name}")
            if isinstance(value, (int, float)):
                parts.append(f"{split} {name} {value:.2f}" if math.isfinite(value) else f"{split} {name} n/a")
    return ", ".join(parts)


def _distinct_summary(spec: TaskSpec, metrics: Mapping[str, Any]) -> str:
    """`dev 2`, or `**dev 1: constant**` for a split with one prediction for everything."""
    parts = []
    for split in spec.dev_splits:
        value = metrics.get(f"{split}_{DISTINCT}")
        if isinstance(value, (int, float)):
            parts.append(f"**{split} 1: constant**" if value == 1 else f"{split} {int(value)}")
    return ", ".join(parts) or "-"


def winners_table(best: Mapping[tuple[str, str], TrialRecord], records: Sequence[TrialRecord],
                  specs: Mapping[str, TaskSpec] = TASKS) -> str:
    header = ["checkpoint", "task", "lr", "batch", "epochs", "seed", "trials ok/failed", "dev metrics of the winner",
              "trivial baseline, same dev examples", "distinct dev predictions"]
    lines = ["### Winning grid points (selected on " + "the first dev split's primary metric)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    counts: dict[tuple[str, str], list[int]] = {}
    for r in records:
        c = counts.setdefault((r.row, r.task), [0, 0])
        c[r.status == FAILED] += 1
    for (row, task), (ok, failed) in counts.items():
        record = best.get((row, task))
        if record is None:
            lines.append(f"| {row} | {task} | - | - | - | - | {ok}/{failed} | no trial finished | - | - |")
            continue
        c, spec = record.config, specs[task]
        lines.append(f"| {row} | {task} | {c['learning_rate']:g} | {c['batch_size']} | {c['epochs']} | "
                     f"{c['seed']} | {ok}/{failed} | {_metric_summary(spec, record.metrics)} | "
                     f"{_metric_summary(spec, record.metrics, f'{BASELINE}_') or '-'} | "
                     f"{_distinct_summary(spec, record.metrics)} |")
    return "\n".join(lines)


def class_tables(confusions: Confusions, label_scores: LabelScores | None = None) -> str:
    """Per-class precision, recall and F1 (percent) of each winner on each dev split, with the
    class's gold count and how often it was predicted; a class never predicted stands out.
    Multilabel winners (`label_scores`: (row, task) -> scores) get the same table per label."""
    if not confusions and not label_scores:
        return ""
    header = ["| class | precision | recall | F1 | support | predicted |", "|---|---|---|---|---|---|"]

    def table(scores: Sequence[confusion.ClassScore]) -> list[str]:
        return [f"| {_escape(s.label)} | {s.precision:.1f} | {s.recall:.1f} | {s.f1:.1f} | {s.support} | "
                f"{s.predicted} |" for s in scores]

    lines = ["### Per-class scores of the winners (from confusion.csv / confusion.png beside their predictions)"]
    for (row, task), splits in confusions.items():
        for split, matrix in splits.items():
            lines += ["", f"{row} / {task}, {split} ({matrix.total:,} items):", "", *header,
                      *table(confusion.per_class(matrix))]
    for (row, task), scores in (label_scores or {}).items():
        lines += ["", f"{row} / {task}, each label as a yes/no question ({confusion.LABEL_SCORES}):", "",
                  *header, *table(scores)]
    return "\n".join(lines)


def seed_means(records: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    """Mean and spread of the score over the seeds of each grid point: the winner is the best of the
    restarts, as in the paper, but one seed moves a small-data task by points, so a comparison of
    two checkpoints reads the means."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r.status != FAILED and r.score is not None:
            point = tuple(r.config.get(k) for k in POINT_KEYS)
            groups.setdefault((r.row, r.task, point), []).append(r.score)
    out = []
    for (row, task, point), scores in groups.items():
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        out.append({"row": row, "task": task, **dict(zip(POINT_KEYS, point)),
                    "seeds": len(scores), "mean": mean, "sd": sd, "min": min(scores), "max": max(scores)})
    return out


def seed_means_table(records: Sequence[TrialRecord]) -> str:
    means = seed_means(records)
    if not any(m["seeds"] > 1 for m in means):
        return ""
    lines = ["### Mean over seeds (primary metric of the first dev split, every grid point)", "",
             "| checkpoint | task | lr | batch | epochs | seeds | mean | sd | min | max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in means:
        lines.append(f"| {m['row']} | {m['task']} | {m['learning_rate']:g} | {m['batch_size']} | {m['epochs']} | "
                     f"{m['seeds']} | {m['mean']:.2f} | {m['sd']:.2f} | {m['min']:.2f} | {m['max']:.2f} |")
    return "\n".join(lines)


def failures_table(records: Sequence[TrialRecord]) -> str:
    """Trials that failed for good, and trials that succeeded only after a retry."""
    failed = [r for r in records if r.status == FAILED or r.failures]
    if not failed:
        return ""
    lines = ["### Failed and retried trials", "",
             "| checkpoint | task | trial | lr | batch | epochs | seed | status | failed attempts | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in failed:
        c = r.config
        error = (r.error or "").strip().splitlines()
        message = _escape(error[-1] if error else "-" if r.status != FAILED else "unknown error")
        lines.append(f"| {r.row} | {r.task} | {r.trial_id} | {c['learning_rate']:g} | {c['batch_size']} | "
                     f"{c['epochs']} | {c['seed']} | {r.status} | {r.failures} | {message} |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")[:300]


def markdown(records: Sequence[TrialRecord], *, title: str = "Fine-tuning results", notes: Sequence[str] = (),
             confusions: Confusions | None = None, specs: Mapping[str, TaskSpec] = TASKS,
             label_scores: LabelScores | None = None) -> str:
    """results.md; `confusions`: the winners' matrices by (row, task) and split (their per-class
    tables), `label_scores` the multilabel winners' per-label scores; `specs`: the task specs by
    name (default: the built-in table)."""
    best = select_best(records)
    rows = list(dict.fromkeys(r.row for r in records))
    tasks = list(dict.fromkeys(r.task for r in records))
    parts = [f"# {title}", *(n for n in notes if n), paper_tables(best, rows, tasks, records, specs),
             winners_table(best, records, specs), class_tables(confusions or {}, label_scores),
             seed_means_table(records),
             failures_table(records)]
    return "\n\n".join(p for p in parts if p) + "\n"


# --------------------------------------------------------------------------------------------
# Files

_CSV_FIRST = ("row", "task", "trial_id", "status", "failures", *GRID_KEYS, "score", "epoch", "train_loss")


def to_csv(records: Sequence[TrialRecord]) -> str:
    """Every trial: grid point, status, every metric it reported last (union of keys), error."""
    metric_keys = sorted({k for r in records for k, v in r.metrics.items()
                          if isinstance(v, (int, float)) and k not in _CSV_FIRST})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*_CSV_FIRST, *metric_keys, "error"])
    for r in records:
        head = [r.row, r.task, r.trial_id, r.status, r.failures, *(r.config.get(k) for k in GRID_KEYS),
                r.metrics.get("score"), r.metrics.get("epoch"), r.metrics.get("train_loss")]
        error = (r.error or "").strip().splitlines()
        writer.writerow([*("" if v is None else v for v in head), *(r.metrics.get(k, "") for k in metric_keys),
                         error[-1] if error else ""])
    return buffer.getvalue()


def to_json(records: Sequence[TrialRecord], setting: Mapping[str, Any] | None = None,
            confusions: Confusions | None = None) -> str:
    best = select_best(records)
    confusions = confusions or {}
    data = {
        "setting": dict(setting or {}),
        "best": [{"row": row, "task": task, "trial_id": r.trial_id, "config": r.config,
                  "score": r.score, "metrics": _clean(r.metrics), "model": r.model,
                  **({"confusion": {split: {"labels": list(m.labels), "counts": m.counts.tolist()}
                                    for split, m in confusions[(row, task)].items()}}
                     if confusions.get((row, task)) else {})}
                 for (row, task), r in best.items()],
        "seed_means": seed_means(records),
        "trials": [{**asdict(r), "metrics": _clean(r.metrics)} for r in records],
    }
    return json.dumps(data, indent=2, default=str) + "\n"


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool)) or v is None}


def write_results(records: Sequence[TrialRecord], output: str, *, setting: Mapping[str, Any] | None = None,
                  title: str = "Fine-tuning results", notes: Sequence[str] = (),
                  confusions: Confusions | None = None, specs: Mapping[str, TaskSpec] = TASKS,
                  label_scores: LabelScores | None = None) -> dict[str, str]:
    """Write results.md, results.csv and results.json under `output` (local path or fsspec URL);
    returns {kind: url}. `confusions`, `specs`, `label_scores`: as `markdown` takes them."""
    text = {"md": markdown(records, title=title, notes=notes, confusions=confusions, specs=specs,
                           label_scores=label_scores),
            "csv": to_csv(records), "json": to_json(records, setting, confusions)}
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    paths = {}
    for kind, content in text.items():
        path = f"{root.rstrip('/')}/results.{kind}"
        with fs.open(path, "w", encoding="utf-8") as f:
            f.write(content)
        paths[kind] = fs.unstrip_protocol(path) if "://" in output else path
    return paths


def slug(text: str) -> str:
    """A row label as one folder name: safe characters only, never `.` or `..` (no leading dots)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lstrip(".") or "row"
