"""The fine-tuning tasks as one table of `TaskSpec`s, and the family dispatch behind them.

A spec is data: where a task's files live under a `--data` root, its labels, metrics, the
paper's hyper-parameter grid and the column of the results table. What to *do* with a task
depends only on its family, so five `Family` entries (classification, regression, span,
multiple_choice, token) map to the task modules' functions, and the fine-tuning loop needs
nothing task-specific:

    spec = TASKS["rte"]
    examples, counts = spec.read(root, "dev")                       # counts of what was read/skipped
    features = spec.featurize(examples, tokenizer)                  # dict of fixed-shape numpy arrays
    outputs = {"logits": ...}                                       # from the model head, in feature order
    spec.evaluate(examples, features, outputs)                      # {"accuracy": 71.2}, percent

Model outputs by family: classification, regression, multiple_choice and token take
`{"logits": [N, C] | [N] | [N, 4] | [F, S, C]}`; span takes
`{"start_logits": [F, S], "end_logits": [F, S]}`.

Hyper-parameters (paper section 4 and appendix A.3): GLUE is batch 32, 3 epochs, the best of
lr {5e-5, 4e-5, 3e-5, 2e-5} on dev; SQuAD 1.1 lr 5e-5, batch 32, 3 epochs; SQuAD 2.0 lr 5e-5,
batch 48, 2 epochs; SWAG lr 2e-5, batch 16, 3 epochs. The paper gives no values for CoNLL-2003,
so both NER variants use A.3's general grid: lr {5e-5, 3e-5, 2e-5} x batch {16, 32} x epochs
{2, 3, 4}. Warmup (10% of steps) and dropout (0.1) are the same everywhere and live in the
fine-tuning config, not here.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from bertray.errors import ConfigError, TaskDataError
from bertray.tasks import glue, ner, squad, swag

FamilyName = Literal["classification", "regression", "span", "multiple_choice", "token"]


@dataclass(frozen=True)
class Grid:
    """The paper's search space for one task; every combination is one trial (times seeds)."""

    learning_rates: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    epochs: tuple[int, ...]

    def combinations(self) -> list[dict[str, float | int]]:
        return [{"learning_rate": lr, "batch_size": bs, "epochs": ep}
                for lr in self.learning_rates for bs in self.batch_sizes for ep in self.epochs]


@dataclass(frozen=True)
class TaskSpec:
    """One row of the task table. `read`, `featurize`, `decode` and `evaluate` dispatch on
    `family`; keyword options go through to the family's function (span tasks: `doc_stride`,
    `max_query_len`, `keep_offsets` to featurize; `tau`, `n_best`, `max_answer_len` to decode
    and evaluate). The other families take none, so a misspelt option fails loudly.

    SQuAD 2.0's no-answer threshold: `evaluate` tunes it on the examples it is given unless
    `tau` is passed (the paper: tau chosen on dev for the best F1), so its `f1`/`exact_match` (and
    the trial score) are at the tuned `tau`, next to the untuned `f1_at_0`/`exact_match_at_0`;
    `decode` applies `tau` (default 0), so pass it the evaluated `tau` to get those predictions."""

    name: str
    family: FamilyName
    column: str                              # header of this task's column in the results table
    data_dir: str                            # under the --data root, e.g. "glue/SST-2"
    files: Mapping[str, str] = field(hash=False)   # split -> file name inside data_dir
    dev_splits: tuple[str, ...]              # labelled splits scored after training; the first selects trials
    metrics: tuple[str, ...]                 # all reported metrics; the first is the primary one
    grid: Grid
    max_seq_len: int
    labels: tuple[str, ...] = ()             # class / tag names in id order; () for regression and spans
    test_splits: tuple[str, ...] = ()        # splits whose files carry no labels (GLUE test: submissions)
    allow_no_answer: bool = False            # SQuAD 2.0: the [CLS] span means "no answer"
    feature_based: bool = False              # paper 5.3: frozen encoder, last four layers -> 2-layer BiLSTM

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        """Width of the task head: classes or tags; 1 for regression, multiple choice (one score
        per choice) and each of the span head's start/end vectors."""
        return len(self.labels) if self.family in ("classification", "token") else 1

    def path(self, root: str | os.PathLike, split: str) -> str:
        if split not in self.files:
            raise ConfigError(f"{self.name}: no split {split!r}; choose one of {', '.join(self.files)}")
        return f"{os.fspath(root).rstrip('/')}/{posixpath.normpath(f'{self.data_dir}/{self.files[split]}')}"

    def read(self, root: str | os.PathLike, split: str) -> tuple[list, dict[str, int]]:
        """Examples of `split` from the standard layout under `root` (local path or fsspec URL)
        and the counts of what was read and skipped."""
        path = self.path(root, split)
        try:
            return FAMILIES[self.family].read(self, path, split)
        except FileNotFoundError:
            raise TaskDataError(f"{path}: no such file; {self.name} expects {self.data_dir}/"
                                f"{{{','.join(self.files.values())}}} under the data root") from None

    def featurize(self, examples: Sequence, tokenizer, max_seq_len: int | None = None,
                  **options: Any) -> dict[str, np.ndarray]:
        """Fixed-shape features padded to `max_seq_len` (default: the task's). `tokenizer` is a
        `tokenizers.Tokenizer` owned by the calling thread; its settings are restored after."""
        return FAMILIES[self.family].featurize(self, examples, tokenizer, max_seq_len or self.max_seq_len, **options)

    def decode(self, examples: Sequence, features: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               **options: Any):
        """Predictions in the task's own terms: label strings, scores, choice indices, `{qid: text}`
        or per-word tag lists."""
        return FAMILIES[self.family].decode(self, examples, features, outputs, **options)

    def evaluate(self, examples: Sequence, features: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 **options: Any) -> dict[str, float]:
        """The task's metrics, in percent as the paper's tables print them."""
        return FAMILIES[self.family].evaluate(self, examples, features, outputs, **options)


# --------------------------------------------------------------------------------------------
# Family dispatch


@dataclass(frozen=True)
class Family:
    read: Callable[[TaskSpec, str, str], tuple[list, dict[str, int]]]
    featurize: Callable[..., dict[str, np.ndarray]]
    decode: Callable[..., Any]
    evaluate: Callable[..., dict[str, float]]


def _output(outputs: Mapping[str, np.ndarray], key: str, spec: TaskSpec) -> np.ndarray:
    if key not in outputs:
        raise ValueError(f"{spec.name} ({spec.family}) needs model output {key!r}; got {', '.join(outputs) or 'none'}")
    return np.asarray(outputs[key])


def _read_glue(spec: TaskSpec, path: str, split: str):
    return glue.read_glue(path, spec.name, test=split in spec.test_splits)


_GLUE = Family(
    read=_read_glue,
    featurize=lambda spec, ex, tok, n, **o: glue.featurize_glue(ex, tok, n, spec.labels, **o),
    decode=lambda spec, ex, feats, out: glue.decode_glue(_output(out, "logits", spec), spec.labels),
    evaluate=lambda spec, ex, feats, out: glue.evaluate_glue(ex, _output(out, "logits", spec), spec.labels,
                                                             spec.metrics),
)

FAMILIES: dict[str, Family] = {
    "classification": _GLUE,
    "regression": _GLUE,
    "span": Family(
        read=lambda spec, path, split: squad.read_squad(path),
        featurize=lambda spec, ex, tok, n, **o: squad.featurize_squad(ex, tok, n, **o),
        decode=lambda spec, ex, feats, out, **o: squad.decode_squad(
            ex, feats, _output(out, "start_logits", spec), _output(out, "end_logits", spec),
            allow_no_answer=spec.allow_no_answer, **o)[0],
        evaluate=lambda spec, ex, feats, out, **o: squad.evaluate_squad(
            ex, feats, _output(out, "start_logits", spec), _output(out, "end_logits", spec),
            allow_no_answer=spec.allow_no_answer, **o),
    ),
    "multiple_choice": Family(
        read=lambda spec, path, split: swag.read_swag(path),
        featurize=lambda spec, ex, tok, n, **o: swag.featurize_swag(ex, tok, n, **o),
        decode=lambda spec, ex, feats, out: swag.decode_swag(_output(out, "logits", spec)),
        evaluate=lambda spec, ex, feats, out: swag.evaluate_swag(ex, _output(out, "logits", spec)),
    ),
    "token": Family(
        read=lambda spec, path, split: ner.read_conll(path, spec.labels),
        featurize=lambda spec, ex, tok, n, **o: ner.featurize_ner(ex, tok, n, spec.labels, **o),
        decode=lambda spec, ex, feats, out: ner.decode_ner(ex, feats, _output(out, "logits", spec), spec.labels),
        evaluate=lambda spec, ex, feats, out: ner.evaluate_ner(ex, feats, _output(out, "logits", spec), spec.labels),
    ),
}


# --------------------------------------------------------------------------------------------
# The table

GLUE_GRID = Grid((5e-5, 4e-5, 3e-5, 2e-5), (32,), (3,))
A3_GRID = Grid((5e-5, 3e-5, 2e-5), (16, 32), (2, 3, 4))

_GLUE_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}


def _glue(name: str, folder: str, column: str, metrics: tuple[str, ...],
          family: FamilyName = "classification") -> TaskSpec:
    return TaskSpec(name, family, column, f"glue/{folder}", _GLUE_FILES, ("dev",), metrics, GLUE_GRID, 128,
                    labels=glue.GLUE_FORMATS[name].labels, test_splits=("test",))


_CONLL = dict(family="token", data_dir="conll2003",
              files={"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}, dev_splits=("dev", "test"),
              metrics=("f1", "precision", "recall"), grid=A3_GRID, max_seq_len=128, labels=ner.CONLL_LABELS)

_TABLE = (
    TaskSpec("mnli", "classification", "MNLI-(m/mm)", "glue/MNLI",
             {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv",
              "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv",
              "test_ax": "../diagnostic/diagnostic.tsv"},
             ("dev_matched", "dev_mismatched"), ("accuracy",), GLUE_GRID, 128,
             labels=glue.GLUE_FORMATS["mnli"].labels, test_splits=("test_matched", "test_mismatched", "test_ax")),
    _glue("qqp", "QQP", "QQP", ("f1", "accuracy")),
    _glue("qnli", "QNLI", "QNLI", ("accuracy",)),
    _glue("sst2", "SST-2", "SST-2", ("accuracy",)),
    _glue("cola", "CoLA", "CoLA", ("mcc",)),
    _glue("stsb", "STS-B", "STS-B", ("spearman", "pearson"), family="regression"),
    _glue("mrpc", "MRPC", "MRPC", ("f1", "accuracy")),
    _glue("rte", "RTE", "RTE", ("accuracy",)),
    _glue("wnli", "WNLI", "WNLI", ("accuracy",)),
    TaskSpec("squad1", "span", "SQuAD1.1 EM/F1", "squad/v1.1", {"train": "train-v1.1.json", "dev": "dev-v1.1.json"},
             ("dev",), ("f1", "exact_match"), Grid((5e-5,), (32,), (3,)), 384),
    TaskSpec("squad2", "span", "SQuAD2.0 EM/F1", "squad/v2.0", {"train": "train-v2.0.json", "dev": "dev-v2.0.json"},
             ("dev",), ("f1", "exact_match", "tau", "f1_at_0", "exact_match_at_0"), Grid((5e-5,), (48,), (2,)), 384,
             allow_no_answer=True),
    TaskSpec("swag", "multiple_choice", "SWAG", "swag", {"train": "train.csv", "dev": "val.csv", "test": "test.csv"},
             ("dev",), ("accuracy",), Grid((2e-5,), (16,), (3,)), 128, test_splits=("test",)),
    TaskSpec("conll2003", column="CoNLL-2003 F1", **_CONLL),
    TaskSpec("conll2003_feature", column="CoNLL-2003 F1 (feature-based)", feature_based=True, **_CONLL),
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _TABLE}

GROUPS: dict[str, tuple[str, ...]] = {
    "glue": tuple(s.name for s in _TABLE if s.data_dir.startswith("glue/")),
    "squad": ("squad1", "squad2"),
    "all": tuple(TASKS),
}


def resolve_tasks(names: str | Iterable[str]) -> list[TaskSpec]:
    """Task specs for a comma-separated list (or an iterable) of task and group names, in the
    order given, each task once: `"glue,squad1"` -> mnli, qqp, ..., wnli, squad1."""
    if isinstance(names, str):
        names = names.split(",")
    out: dict[str, TaskSpec] = {}
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name in GROUPS:
            out.update((n, TASKS[n]) for n in GROUPS[name] if n not in out)
        elif name in TASKS:
            out.setdefault(name, TASKS[name])
        else:
            close = difflib.get_close_matches(name, [*TASKS, *GROUPS], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"tasks: unknown task {raw.strip()!r}; {hint}valid tasks: {', '.join(TASKS)}; "
                              f"groups: {', '.join(GROUPS)}")
    if not out:
        raise ConfigError(f"tasks: no task given; valid tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}")
    return list(out.values())
