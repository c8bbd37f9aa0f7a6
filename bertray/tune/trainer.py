"""One fine-tuning trial, without Ray: featurize a task, train its head, score the dev sets each epoch.

This is the loop the paper describes in section 4 and appendix A.3, for every family of the task
table (`bertray.tasks.registry`):

    model     = the task's head over the checkpoint's encoder (fresh weights with `random_init`)
    optimizer = AdamW, weight decay 0.01 except LayerNorm and biases, gradients clipped at 1.0
    schedule  = linear warmup over the first 10% of steps, then linear decay to 0
    dropout   = 0.1 everywhere (the checkpoint's own values are replaced)
    each epoch: one pass over the shuffled training features (shuffled by (seed, epoch)), then
                every labelled dev split is scored with the task's official metrics

`run_trial(TrialConfig(...), report=...)` calls `report(metrics, files)` after every epoch; `files`
is a directory with the epoch's prediction files on the last epoch (None before), and with
`save_model` the fine-tuned model in the Hugging Face layout under `model/` (`bertray.tune.export`).
The Ray Tune trial attaches it to its final report as a checkpoint so that the driver can collect
the winner's predictions and model from any node. Tests and benchmarks call it directly.

Speed-only settings (they do not change the result beyond float rounding): each batch is cut to
its longest real sequence (trailing padding carries no information under the attention mask, the
same as Hugging Face's dynamic padding), featurized arrays are cached on disk per (task, split,
file, max_seq_len, limit, tokenizer) and in memory per process, and a remote checkpoint is
downloaded once per machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import fsspec
import numpy as np
import torch

from bertray.model.config import BertConfig
from bertray.errors import TaskDataError, check
from bertray.tasks import baselines, confusion, prediction_files
from bertray.tasks.registry import TASKS, TaskSpec
from bertray.runtime.autocast import autocast
from bertray.runtime.batches import attention_inputs, to_device
from bertray.runtime.checkpoint_cache import cache_root, local_checkpoint
from bertray.runtime.precision import PRECISIONS
from bertray.tune import export
from bertray.train.optim import make_optimizer, warmup_linear_decay
from bertray.train.step import TrainStep, task_loss

log = logging.getLogger("bertray.tune")

Report = Callable[[dict[str, Any], "str | None"], None]

FEATURE_CACHE_VERSION = 1
# The folder of the fine-tuned model inside the last epoch's files (with `save_model`).
MODEL_DIR = "model"


class InjectedFault(RuntimeError):
    """Raised on purpose by a trial whose `fail` option is set (tests of failure reporting)."""


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; plain values, so Ray can ship it to any node."""

    task: str
    init_from: str                       # checkpoint directory: local path or fsspec URL (s3://...)
    data: str                            # root of the standard task layouts: local path or fsspec URL
    learning_rate: float
    batch_size: int
    epochs: int
    seed: int = 0
    random_init: bool = False            # same architecture (the checkpoint's config.json), fresh weights
    max_seq_len: int | None = None       # None: the task's (GLUE 128, SQuAD 384)
    max_train_examples: int | None = None    # the first N training examples (quick runs)
    max_eval_examples: int | None = None     # the first N examples of each dev/test split
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    dropout: float | None = 0.1          # None: keep the checkpoint's dropout
    adam_eps: float = 1e-6
    clip_grad_norm: float = 1.0
    precision: str = "auto"              # see bertray.runtime.autocast.resolve_precision
    eval_batch_size: int = 128
    threads: int = 0                     # torch intra-op threads on CPU (0: leave torch's default)
    cache_dir: str | None = None         # feature and checkpoint cache (local); None: a temp folder
    predictions: bool = True             # write prediction files on the last epoch
    save_model: bool = False             # also put the fine-tuned model (Hugging Face layout, bertray.tune.export)
                                         # into the files of the last epoch, under model/
    fail: bool = False                   # fault injection: raise InjectedFault before training
    card: dict[str, Any] | None = None   # your own task: its settled task card as plain values (None: a
                                         # task of the built-in table); the trial rebuilds its spec from it

    def __post_init__(self) -> None:
        check(self.card is not None or self.task in TASKS, "task",
              f"unknown task {self.task!r}; choose one of {', '.join(TASKS)} or describe it in a task card")
        check(self.card is None or self.card.get("name") == self.task, "card",
              f"the card describes {self.card and self.card.get('name')!r}, not the task {self.task!r}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(self.max_seq_len is None or 8 <= self.max_seq_len <= 512, "max_seq_len",
              f"must be in [8, 512] or null, got {self.max_seq_len}")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be > 0 or null, got {value}")
        check(0 <= self.warmup_proportion < 1, "warmup_proportion", f"must be in [0, 1), got {self.warmup_proportion}")
        check(self.dropout is None or 0 <= self.dropout < 1, "dropout",
              f"must be in [0, 1) or null, got {self.dropout}")
        check(self.eval_batch_size > 0, "eval_batch_size", f"must be > 0, got {self.eval_batch_size}")
        check(self.precision in PRECISIONS, "precision", f"choose one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def spec(self) -> TaskSpec:
        return trial_spec(self.task, self.card)


def trial_spec(task: str, card: Mapping[str, Any] | None = None) -> TaskSpec:
    """The spec of a trial's task: the built-in table's, or the one its task card describes."""
    if card is None:
        return TASKS[task]
    from bertray.tasks.card import card_from_mapping, card_spec

    return card_spec(card_from_mapping(card, f"trial of {task}"))


@dataclass
class TrialOutcome:
    """What `run_trial` returns: per-epoch metrics (the last entry is the trial's result)."""

    history: list[dict[str, Any]]
    model: torch.nn.Module
    elapsed_s: float
    train_examples_per_s: float

    @property
    def metrics(self) -> dict[str, Any]:
        return self.history[-1]


# --------------------------------------------------------------------------------------------
# Checkpoints and data


_MEMORY: dict[str, tuple[list, dict[str, np.ndarray]]] = {}


def _file_key(path: str) -> str:
    fs, root = fsspec.core.url_to_fs(path)
    info = fs.info(root)
    return f"{path}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"


def load_split(spec: TaskSpec, root: str, split: str, tokenizer, max_seq_len: int, *, limit: int | None = None,
               cache_dir: str | None = None, need_examples: bool = True,
               **options: Any) -> tuple[list | None, dict[str, np.ndarray]]:
    """Examples and fixed-shape features of one split (the first `limit` examples).

    Features are cached: in memory per process and as `.npz` under `<cache>/features/`, keyed by
    the task, the file (path, size, mtime), `max_seq_len`, `limit`, the featurizer options and the
    tokenizer. With `need_examples=False` (training) a cache hit skips reading the file; evaluation
    needs the examples (gold labels, contexts) and always reads it.
    """
    path = spec.path(root, split)
    try:
        file_key = _file_key(path)
    except FileNotFoundError:
        raise TaskDataError(f"{path}: no such file; {spec.name} expects {spec.data_dir}/"
                            f"{{{','.join(spec.files.values())}}} under the data root {root}") from None
    key = hashlib.sha1(json.dumps([FEATURE_CACHE_VERSION, spec.name, split, file_key, max_seq_len, limit, spec.source,
                                   sorted(options.items()), hashlib.sha1(tokenizer.to_str().encode()).hexdigest()],
                                  default=str).encode()).hexdigest()[:20]
    if key in _MEMORY:
        examples, features = _MEMORY[key]
        if examples is not None or not need_examples:
            return examples, features
    disk = cache_root(cache_dir) / "features" / f"{spec.name}-{split}-{key}.npz"
    examples = features = None
    if need_examples or not disk.is_file():
        examples, _ = spec.read(root, split)
        examples = examples[:limit] if limit else examples
    if disk.is_file():
        with np.load(disk) as data:
            features = {k: data[k] for k in data.files}
    else:
        features = spec.featurize(examples, tokenizer, max_seq_len, **options)
        disk.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=disk.name, suffix=".npz", dir=disk.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **features)
        os.replace(tmp, disk)              # atomic: concurrent trials never read a partial file
    _MEMORY[key] = (examples, features)
    return examples, features


def _split_exists(spec: TaskSpec, root: str, split: str) -> bool:
    fs, path = fsspec.core.url_to_fs(spec.path(root, split))
    return fs.isfile(path)


@dataclass
class EvalSet:
    split: str
    labelled: bool                       # a dev split (scored) or a test split (predictions only)
    examples: list
    features: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Model


def head_class(spec: TaskSpec):
    """The task's head, named by its family; imported here, so that the task table needs no torch."""
    from bertray.model import heads

    return getattr(heads, spec.family_info.head_name(spec))


def config_overrides(spec: TaskSpec, dropout: float | None) -> dict[str, Any]:
    """Label names for the head (one output for regression) and the fine-tuning dropout."""
    out: dict[str, Any] = dict(spec.family_info.config_overrides(spec))
    if dropout is not None:
        out.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return out


def build_model(spec: TaskSpec, checkpoint: str | os.PathLike, *, random_init: bool = False,
                dropout: float | None = 0.1) -> torch.nn.Module:
    """The task's head over the checkpoint's encoder; with `random_init` the same architecture
    (the checkpoint's config.json, including `is_decoder`/causal attention) with fresh weights.
    Seed torch before calling: the head (and, with `random_init`, everything) is drawn from it."""
    cls = head_class(spec)
    overrides = config_overrides(spec, dropout)
    config = BertConfig.from_json_file(Path(checkpoint) / "config.json").replace(**overrides)
    sizes = {}
    if spec.feature_based:    # the paper's last four layers; all of them in a smaller encoder
        sizes["num_feature_layers"] = min(4, config.num_hidden_layers)
    if random_init:
        return cls(config, **sizes)
    return cls.from_pretrained(checkpoint, **sizes, **overrides)


# --------------------------------------------------------------------------------------------
# Batches

_SEQUENCE_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def target_keys(spec: TaskSpec) -> tuple[str, ...]:
    return spec.family_info.target_keys


def make_batch(spec: TaskSpec, features: Mapping[str, np.ndarray], index: np.ndarray, device: torch.device,
               *, targets: bool = True, packing: bool = True) -> dict[str, Any]:
    """Model inputs for the rows `index`, cut to the longest real sequence among them. With
    `packing`, the attention mask and token packing are decided on the host (`attention_inputs`:
    no device sync in the forward pass); without, the batch is plain tensors any BERT takes."""
    mask = features["attention_mask"][index]
    length = max(1, int(mask.reshape(-1, mask.shape[-1]).sum(-1).max()))
    batch: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(features[k][index][..., :length])).long()
                             for k in _SEQUENCE_KEYS}
    if packing:
        attention, _ = attention_inputs(batch.pop("attention_mask"))
        batch.update({k: v for k, v in attention.items() if v is not None})
    if targets:
        family = spec.family_info
        for key in family.target_keys:
            value = features[key][index]
            if family.targets_per_token:
                value = value[..., :length]
            batch[key] = torch.from_numpy(np.ascontiguousarray(value)).to(getattr(torch, family.target_dtype))
    return to_device(batch, device)


@torch.no_grad()
def predict(model: torch.nn.Module, spec: TaskSpec, features: Mapping[str, np.ndarray], *,
            batch_size: int = 128, device: torch.device | None = None, precision: str = "auto") -> dict[str, np.ndarray]:
    """Model outputs over all features, in feature order, padded back to the features' length: the
    family's `output_keys`, `{"logits": ...}` or, for span tasks, `{"start_logits", "end_logits"}`
    (what `spec.evaluate` takes)."""
    device = device or next(model.parameters()).device
    family = spec.family_info
    was_training = model.training
    model.eval()
    n, seq_len = len(features["input_ids"]), features["input_ids"].shape[-1]
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, batch_size):
        batch = make_batch(spec, features, np.arange(start, min(n, start + batch_size)), device, targets=False)
        with autocast(device, precision):
            out = model(**batch)
        for key in family.output_keys:
            value = getattr(out, key).float().cpu().numpy()
            if family.pad_value is not None and value.shape[1] < seq_len:   # back to the full length
                pad = [(0, 0)] * value.ndim
                pad[1] = (0, seq_len - value.shape[1])
                value = np.pad(value, pad, constant_values=family.pad_value)
            parts.setdefault(key, []).append(value)
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------------------------
# The trial


def flat_metrics(split: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """`{"dev_accuracy": 91.2, ...}`: numeric metrics prefixed by their split (thresholds,
    counts and per-type breakdowns included, as the task's evaluate returns them)."""
    return {f"{split}_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float, np.number))}


def run_trial(cfg: TrialConfig, *, report: Report | None = None, device: torch.device | str | None = None,
             files_dir: str | None = None) -> TrialOutcome:
    """Run one trial; `report(metrics, files)` after every epoch (see the module docstring).

    Metrics per epoch: `score` (the task's primary metric on its first dev split; the key Tune
    selects and schedules on), `epoch`, `train_loss`, `step`, `{split}_{metric}` for every dev
    split, `{split}_baseline_{metric}` (the task's trivial baseline on that split) and
    `{split}_distinct_predictions` (1: a constant predictor), `train_examples_per_s`, `elapsed_s`,
    and the wall-clock times (Unix seconds) `first_step_at` (the trial's first training step began)
    and `train_ended_at` (this epoch's training pass ended), from which a sweep's overhead is timed.
    `files_dir` (default: a temporary folder) receives the prediction files of the last epoch,
    with `confusion.csv` for tasks with a closed label set (`bertray.tasks.confusion`). SQuAD 2.0
    is scored at the no-answer threshold tuned on each dev split for the best F1 (`{split}_tau`,
    the untuned `{split}_f1_at_0` beside it), and its predictions files are decoded at that same
    threshold.
    """
    if cfg.fail:
        raise InjectedFault(f"injected failure for {cfg.task} (lr={cfg.learning_rate:g}, batch={cfg.batch_size}, "
                            f"epochs={cfg.epochs}, seed={cfg.seed})")
    started = time.perf_counter()
    spec = cfg.spec
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from bertray import wordpiece

    checkpoint = local_checkpoint(cfg.init_from, cfg.cache_dir)
    tokenizer = wordpiece.load(checkpoint)
    max_seq_len = cfg.max_seq_len or spec.max_seq_len
    _, train = load_split(spec, cfg.data, "train", tokenizer, max_seq_len, limit=cfg.max_train_examples,
                          cache_dir=cfg.cache_dir, need_examples=False, **spec.family_info.train_options)
    eval_sets = [EvalSet(split, split in spec.dev_splits,
                         *load_split(spec, cfg.data, split, tokenizer, max_seq_len, limit=cfg.max_eval_examples,
                                     cache_dir=cfg.cache_dir))
                 for split in (*spec.dev_splits, *(s for s in spec.test_splits
                                                   if cfg.predictions and _split_exists(spec, cfg.data, s)))]
    n_train = len(train["input_ids"])
    if n_train == 0:
        raise TaskDataError(f"{spec.name}: no training features under {cfg.data}")
    # Did it learn anything? Each dev split's trivial baseline, scored once as the model is
    # (`{split}_baseline_{metric}`), and per epoch how many distinct predictions the model makes
    # (`{split}_distinct_predictions`: 1 is a constant predictor); see bertray.tasks.baselines.
    baseline = {f"{s.split}_baseline_{name}": value for s in eval_sets if s.labelled
                for name, value in baselines.baseline_scores(spec, train, s.examples, s.features).items()}

    torch.manual_seed(cfg.seed)
    model = build_model(spec, checkpoint, random_init=cfg.random_init, dropout=cfg.dropout).to(device)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, "adamw", lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               betas=(0.9, 0.999), eps=cfg.adam_eps)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=int(cfg.warmup_proportion * total_steps),
                                    total_steps=total_steps)
    step = TrainStep(model, optimizer, scheduler, task_loss, device=device, precision=cfg.precision,
                     clip_grad_norm=cfg.clip_grad_norm)
    log.info("%s: %d training features, %d steps (%d epochs x %d), lr %g, batch %d, seed %d, %s, %s%s",
             spec.name, n_train, total_steps, cfg.epochs, steps_per_epoch, cfg.learning_rate, cfg.batch_size,
             cfg.seed, step.precision, checkpoint, " (random init)" if cfg.random_init else "")

    history: list[dict[str, Any]] = []
    seen, train_time, first_step_at = 0, 0.0, None
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
        tick = time.perf_counter()
        first_step_at = first_step_at or time.time()
        for start in range(0, n_train, cfg.batch_size):
            batch = make_batch(spec, train, order[start:start + cfg.batch_size], device)
            step([batch])
            seen += len(batch["input_ids"])
        train_time += time.perf_counter() - tick
        train_ended_at = time.time()
        train_loss = step.meter.read()["loss"]
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{spec.name}: training loss is {train_loss} in epoch {epoch}; "
                                     f"lower the learning rate ({cfg.learning_rate:g})")
        metrics: dict[str, Any] = {"epoch": epoch, "step": step.steps, "train_loss": train_loss}
        outputs, taus = {}, {}
        for s in eval_sets:
            outputs[s.split] = predict(model, spec, s.features, batch_size=cfg.eval_batch_size, device=device,
                                       precision=cfg.precision)
            if s.labelled:
                scores = spec.evaluate(s.examples, s.features, outputs[s.split])
                metrics.update(flat_metrics(s.split, scores))
                if "tau" in scores:        # SQuAD 2.0: the no-answer threshold tuned on this split
                    taus[s.split] = scores["tau"]
                metrics[f"{s.split}_distinct_predictions"] = baselines.distinct_predictions(
                    spec, s.examples, s.features, outputs[s.split], **_at_tau(taus, s.split))
        metrics.update(baseline)
        metrics["score"] = metrics[f"{spec.dev_splits[0]}_{spec.metric}"]
        metrics["train_examples_per_s"] = seen / max(train_time, 1e-9)
        metrics["elapsed_s"] = time.perf_counter() - started
        metrics.update(first_step_at=first_step_at, train_ended_at=train_ended_at)
        history.append(metrics)
        log.info("%s epoch %d: train_loss %.4f, %s %.2f", spec.name, epoch, train_loss,
                 f"{spec.dev_splits[0]}_{spec.metric}", metrics["score"])
        files = None
        if epoch == cfg.epochs and (cfg.predictions or cfg.save_model):
            files = files_dir or tempfile.mkdtemp(prefix=f"bertray-{spec.name}-")
            os.makedirs(files, exist_ok=True)
            if cfg.predictions:
                for s in eval_sets:    # a test split is decoded with the first dev split's tau
                    prediction_files.write(spec, s, outputs[s.split], files,
                                           tau=taus.get(s.split, taus.get(spec.dev_splits[0])))
                for s in (s for s in eval_sets if s.labelled):    # confusion.csv, label_scores.csv
                    matrix = confusion.split_confusion(spec, s.split, s.examples, s.features, outputs[s.split],
                                                       **_at_tau(taus, s.split))
                    if matrix is not None:
                        confusion.write_csv(matrix, files, first=s.split == spec.dev_splits[0])
                    scores = confusion.split_label_scores(spec, s.examples, s.features, outputs[s.split])
                    if scores is not None and s.split == spec.dev_splits[0]:     # multilabel: per label
                        confusion.write_label_scores(scores, files)
            if cfg.save_model:
                folder = export.save_model(model, tokenizer, spec, Path(files) / MODEL_DIR, max_seq_len=max_seq_len)
                export.write_card(folder, export.model_card(spec, dataclasses.asdict(cfg), metrics))
            with open(Path(files) / "metrics.json", "w", encoding="utf-8") as f:
                json.dump({"trial": dataclasses.asdict(cfg), "history": history}, f, indent=2)
        if report is not None:
            report(metrics, files)
    return TrialOutcome(history=history, model=model, elapsed_s=time.perf_counter() - started,
                        train_examples_per_s=seen / max(train_time, 1e-9))


def _at_tau(taus: Mapping[str, float], split: str) -> dict[str, float]:
    """Decode options of a scored split: the no-answer threshold it was scored at, if it has one."""
    return {"tau": taus[split]} if split in taus else {}


__all__ = ["TrialConfig", "TrialOutcome", "InjectedFault", "run_trial", "build_model", "head_class", "predict",
           "make_batch", "load_split", "flat_metrics"]
