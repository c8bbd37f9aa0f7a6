"""The fine-tuning tasks as one table of `TaskSpec`s, and the family dispatch behind them.

A spec is data: where a task's files live under a `--data` root, its labels, metrics, the
paper's hyper-parameter grid and the column of the results table. What to *do* with a task
depends only on its family, so six `Family` entries (classification, multilabel, regression,
span, multiple_choice, token) hold everything that differs between families: the task modules'
functions, the head and its targets and outputs, the prediction files and what an exported
model says about itself. The fine-tuning loop (`bertray.tune.trainer`) and the export
(`bertray.tune.export`) read those entries and need nothing task-specific; a new family is one
task module and one entry here:

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
from bertray.tasks import baselines, glue, multilabel, ner, own, prediction_files, squad, swag

FamilyName = Literal["classification", "multilabel", "regression", "span", "multiple_choice", "token"]


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
    source: Any = field(default=None, hash=False)   # your own task: its settled card (bertray.tasks.card);
                                             # `files` are then the card's URLs and its rows are read
                                             # by the family's `read_own`

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def family_info(self) -> "Family":
        """The family's entry: how to train, predict and export this task."""
        return FAMILIES[self.family]

    @property
    def num_labels(self) -> int:
        """Width of the task head: classes or tags; 1 for regression, multiple choice (one score
        per choice) and each of the span head's start/end vectors."""
        return len(self.labels) if self.family in ("classification", "multilabel", "token") else 1

    def path(self, root: str | os.PathLike, split: str) -> str:
        """The file of `split`: under `root` in the task's standard layout, or, where the table
        names a URL or an absolute path (your own tasks' files), that file wherever `root` is."""
        if split not in self.files:
            raise ConfigError(f"{self.name}: no split {split!r}; choose one of {', '.join(self.files)}")
        file = self.files[split]
        if "://" in file or os.path.isabs(file):
            return file
        return f"{os.fspath(root).rstrip('/')}/{posixpath.normpath(f'{self.data_dir}/{file}')}"

    def read(self, root: str | os.PathLike, split: str) -> tuple[list, dict[str, int]]:
        """Examples of `split` from the standard layout under `root` (local path or fsspec URL)
        and the counts of what was read and skipped; your own task's from its card's files."""
        path = self.path(root, split)
        if self.source is not None:
            return self.family_info.read_own(self, path, split)
        try:
            return self.family_info.read(self, path, split)
        except FileNotFoundError:
            raise TaskDataError(f"{path}: no such file; {self.name} expects {self.data_dir}/"
                                f"{{{','.join(self.files.values())}}} under the data root") from None

    def featurize(self, examples: Sequence, tokenizer, max_seq_len: int | None = None,
                  **options: Any) -> dict[str, np.ndarray]:
        """Fixed-shape features padded to `max_seq_len` (default: the task's). `tokenizer` is a
        `tokenizers.Tokenizer` owned by the calling thread; its settings are restored after."""
        return self.family_info.featurize(self, examples, tokenizer, max_seq_len or self.max_seq_len, **options)

    def decode(self, examples: Sequence, features: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               **options: Any):
        """Predictions in the task's own terms: label strings, scores, choice indices, `{qid: text}`
        or per-word tag lists."""
        return self.family_info.decode(self, examples, features, outputs, **options)

    def evaluate(self, examples: Sequence, features: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 **options: Any) -> dict[str, float]:
        """The task's metrics, in percent as the paper's tables print them."""
        return self.family_info.evaluate(self, examples, features, outputs, **options)


# --------------------------------------------------------------------------------------------
# Family dispatch


@dataclass(frozen=True, kw_only=True)
class Family:
    """Everything that differs between task families, so that neither the fine-tuning loop nor
    the export switch on the family's name. Heads are named, not imported: reading the task
    table needs no torch (`bertray.tune.trainer.head_class` resolves them)."""

    # The task module's functions behind TaskSpec.read/featurize/decode/evaluate, and the
    # prediction files (bertray.tasks.prediction_files).
    read: Callable[[TaskSpec, str, str], tuple[list, dict[str, int]]]
    read_own: Callable[[TaskSpec, str, str], tuple[list, dict[str, int]]]   # a task card's files (own.py)
    featurize: Callable[..., dict[str, np.ndarray]]
    decode: Callable[..., Any]
    evaluate: Callable[..., dict[str, float]]
    write_predictions: Callable[..., list[str]]
    # The model and its batches
    head: str                                 # class name in bertray.model.heads
    feature_based_head: str | None            # the head of `feature_based` specs; None: the family has none
    config_overrides: Callable[[TaskSpec], dict[str, Any]]   # BertConfig keys of the head: its label names
    target_keys: tuple[str, ...]              # feature arrays the head's loss takes
    target_dtype: Literal["long", "float"]    # torch dtype of those targets (a name: no torch here)
    targets_per_token: bool                   # [N, S] targets, cut with the batch to its longest sequence
    output_keys: tuple[str, ...]              # model output attributes that decode and evaluate take
    pad_value: float | None                   # fill of per-token outputs padded back to the features'
                                              # length (span: never the best start); None: not per token
    train_options: Mapping[str, Any] = field(hash=False)     # featurize options of the training split
    # The exported model folder (bertray.tune.export)
    auto_class: str                           # the transformers Auto class that loads it
    pipeline_tag: str                         # the Hub's pipeline tag in the model card
    description: str                          # what the model does, in the model card
    export_config: Callable[[TaskSpec], dict[str, Any]]      # config.json keys saying what the head predicts
    # The results table (bertray.tune.results)
    table_metrics: tuple[str, ...]            # a cell's metrics on the first dev split; (): the primary
                                              # metric on every dev split (MNLI m/mm, CoNLL dev/test)
    column_suffix: str                        # after the task's column name in the table header
    # Did it learn anything? (bertray.tasks.baselines)
    baseline: baselines.Baseline              # the trivial predictor, scored as the model is
    gold_and_predicted: Callable[..., tuple[list, list]]   # (spec, examples, features, outputs, **decode
                                              # options) -> aligned hashable items: distinct predictions,
                                              # confusion matrices (when they are labels of spec.labels)
    label_sets: bool = False                  # items are sets of labels (multilabel): scored per label,
                                              # `confusion.label_scores`, not as one confusion matrix

    def head_name(self, spec: TaskSpec) -> str:
        if not spec.feature_based:
            return self.head
        if self.feature_based_head is None:
            raise ConfigError(f"{spec.name}: the {spec.family} family has no feature-based head")
        return self.feature_based_head


def _output(outputs: Mapping[str, np.ndarray], key: str, spec: TaskSpec) -> np.ndarray:
    if key not in outputs:
        raise ValueError(f"{spec.name} ({spec.family}) needs model output {key!r}; got {', '.join(outputs) or 'none'}")
    return np.asarray(outputs[key])


def _no_layout(spec: TaskSpec):
    raise ConfigError(f"{spec.name}: the {spec.family} family has no standard layout; describe the task in a "
                      "task card")


def _read_glue(spec: TaskSpec, path: str, split: str):
    return glue.read_glue(path, spec.name, test=split in spec.test_splits)


def _head_labels(spec: TaskSpec) -> dict[str, Any]:
    return {"id2label": dict(enumerate(spec.labels))}


def _exported_labels(spec: TaskSpec) -> dict[str, Any]:
    # label2id with integer ids, as transformers writes it
    return {"id2label": {str(i): label for i, label in enumerate(spec.labels)},
            "label2id": {label: i for i, label in enumerate(spec.labels)}}


# --------------------------------------------------------------------------------------------
# The families


# GLUE: classification and regression differ only in their targets and what the head's outputs mean.
_GLUE = dict(
    read=_read_glue, read_own=own.read_split,
    featurize=lambda spec, ex, tok, n, **o: glue.featurize_glue(ex, tok, n, spec.labels, **o),
    decode=lambda spec, ex, feats, out: glue.decode_glue(_output(out, "logits", spec), spec.labels),
    evaluate=lambda spec, ex, feats, out: glue.evaluate_glue(ex, _output(out, "logits", spec), spec.labels,
                                                             spec.metrics),
    write_predictions=prediction_files.write_glue,
    head="BertForSequenceClassification", feature_based_head=None,
    target_keys=("labels",), targets_per_token=False, output_keys=("logits",), pad_value=None, train_options={},
    auto_class="AutoModelForSequenceClassification", pipeline_tag="text-classification",
)

FAMILIES: dict[str, Family] = {
    "multilabel": Family(
        read=lambda spec, path, split: _no_layout(spec), read_own=own.read_split,
        featurize=lambda spec, ex, tok, n, **o: multilabel.featurize_multilabel(ex, tok, n, spec.labels, **o),
        decode=lambda spec, ex, feats, out: multilabel.decode_multilabel(_output(out, "logits", spec), spec.labels),
        evaluate=lambda spec, ex, feats, out: multilabel.evaluate_multilabel(ex, _output(out, "logits", spec),
                                                                             spec.labels, spec.metrics),
        write_predictions=prediction_files.write_multilabel,
        head="BertForSequenceClassification", feature_based_head=None,
        config_overrides=_head_labels,
        target_keys=("labels",), target_dtype="float", targets_per_token=False, output_keys=("logits",),
        pad_value=None, train_options={},
        auto_class="AutoModelForSequenceClassification", pipeline_tag="text-classification",
        description="multi-label sequence classification",
        export_config=lambda spec: {"problem_type": "multi_label_classification", **_exported_labels(spec),
                                    "threshold": multilabel.THRESHOLD},
        table_metrics=(), column_suffix="",
        baseline=baselines.Baseline(lambda spec: "labels most rows of train carry (majority per label)",
                                    multilabel.majority_outputs),
        gold_and_predicted=multilabel.gold_and_predicted, label_sets=True,
    ),
    "classification": Family(
        **_GLUE,
        config_overrides=_head_labels,
        target_dtype="long",
        description="sequence classification",
        export_config=lambda spec: {"problem_type": "single_label_classification", **_exported_labels(spec)},
        table_metrics=(), column_suffix="",
        baseline=baselines.MAJORITY_CLASS, gold_and_predicted=baselines.labels_gold_and_predicted,
    ),
    "regression": Family(
        **_GLUE,
        config_overrides=lambda spec: {"id2label": {0: "score"}},     # one output: the score
        target_dtype="float",
        description="sequence regression",
        export_config=lambda spec: {"problem_type": "regression"},
        table_metrics=(), column_suffix="",
        baseline=baselines.TRAIN_MEAN, gold_and_predicted=baselines.scores_gold_and_predicted,
    ),
    "span": Family(
        read=lambda spec, path, split: squad.read_squad(path), read_own=own.read_split,
        featurize=lambda spec, ex, tok, n, **o: squad.featurize_squad(ex, tok, n, **o),
        decode=lambda spec, ex, feats, out, **o: squad.decode_squad(
            ex, feats, _output(out, "start_logits", spec), _output(out, "end_logits", spec),
            allow_no_answer=spec.allow_no_answer, **o)[0],
        evaluate=lambda spec, ex, feats, out, **o: squad.evaluate_squad(
            ex, feats, _output(out, "start_logits", spec), _output(out, "end_logits", spec),
            allow_no_answer=spec.allow_no_answer, **o),
        write_predictions=prediction_files.write_squad,
        head="BertForQuestionAnswering", feature_based_head=None,
        config_overrides=lambda spec: {},
        target_keys=("start_positions", "end_positions"), target_dtype="long", targets_per_token=False,
        output_keys=("start_logits", "end_logits"), pad_value=-1e4,
        train_options={"keep_offsets": False},     # offsets only map dev answers back to the context
        auto_class="AutoModelForQuestionAnswering", pipeline_tag="question-answering",
        description="extractive question answering",
        export_config=lambda spec: {},
        table_metrics=("exact_match", "f1"), column_suffix="",
        baseline=baselines.NO_ANSWER_OR_FIRST_TOKEN, gold_and_predicted=baselines.answers_gold_and_predicted,
    ),
    "multiple_choice": Family(
        read=lambda spec, path, split: swag.read_swag(path), read_own=own.read_split,
        featurize=lambda spec, ex, tok, n, **o: swag.featurize_swag(ex, tok, n, **o),
        decode=lambda spec, ex, feats, out: swag.decode_swag(_output(out, "logits", spec)),
        evaluate=lambda spec, ex, feats, out: swag.evaluate_swag(ex, _output(out, "logits", spec)),
        write_predictions=prediction_files.write_swag,
        head="BertForMultipleChoice", feature_based_head=None,
        config_overrides=lambda spec: {},
        target_keys=("labels",), target_dtype="long", targets_per_token=False,
        output_keys=("logits",), pad_value=None, train_options={},
        auto_class="AutoModelForMultipleChoice", pipeline_tag="multiple-choice",
        description="multiple choice",
        export_config=lambda spec: {},
        table_metrics=(), column_suffix="",
        baseline=baselines.MOST_FREQUENT_CHOICE, gold_and_predicted=baselines.labels_gold_and_predicted,
    ),
    "token": Family(
        read=lambda spec, path, split: ner.read_conll(path, spec.labels), read_own=own.read_split,
        featurize=lambda spec, ex, tok, n, **o: ner.featurize_ner(ex, tok, n, spec.labels, **o),
        decode=lambda spec, ex, feats, out: ner.decode_ner(ex, feats, _output(out, "logits", spec), spec.labels),
        evaluate=lambda spec, ex, feats, out: ner.evaluate_ner(ex, feats, _output(out, "logits", spec), spec.labels),
        write_predictions=prediction_files.write_conll,
        head="BertForTokenClassification", feature_based_head="BertFeatureBasedTagger",
        config_overrides=_head_labels,
        target_keys=("labels",), target_dtype="long", targets_per_token=True,
        output_keys=("logits",), pad_value=0.0, train_options={},
        auto_class="AutoModelForTokenClassification", pipeline_tag="token-classification",
        description="token classification",
        export_config=_exported_labels,
        table_metrics=(), column_suffix=" dev/test",
        baseline=baselines.NO_ENTITY, gold_and_predicted=baselines.tags_gold_and_predicted,
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
