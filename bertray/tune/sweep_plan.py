"""A fine-tuning sweep's plan, free of Ray: its configuration (`FinetuneConfig`), its rows (the
checkpoints, resolved and checked once on the driver), its tasks (built-in and your own, checked
before any trial starts), one plain dict per trial with the resources each gets, and the sweep
folders (`<output>/latest` names the newest). `bertray.tune.sweep` runs the plan on Ray Tune.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import fsspec

from bertray.config import check_folder_name, check_no_credentials, doc
from bertray.errors import CheckpointError, ConfigError, TaskDataError, check
from bertray.model.hf_format import verify_checkpoint
from bertray.runtime.precision import Precision
from bertray.storage import absolute_url, is_local_url, join_url, write_text
from bertray.tasks.card import TaskCard, card_mapping, card_spec, load_cards, unique_names
from bertray.tasks.checks import check_cards
from bertray.tasks.registry import TASKS, TaskSpec, resolve_tasks
from bertray.train.checkpoints import resolve_checkpoint
from bertray.tune import results as tables
from bertray.tune import saved_models
from bertray.tune.trainer import TrialConfig


RANDOM_INIT = "random init"
LATEST = "latest"            # <output>/latest: the newest sweep's folder
MAX_AUTO_CPUS_PER_TRIAL = 8     # a GPU trial's data loading and featurizing gain little beyond this


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning sweep. Empty grid fields mean the paper's per-task grid (registry.py)."""

    init_from: tuple[str, ...] = doc(("runs/pretrain-embedded",), "checkpoint directories (Hugging Face layout), "
                                     "local or object storage; a pretraining run directory or its `latest` "
                                     "file means its newest checkpoint; each is a row of the results tables")
    labels: tuple[str, ...] = doc((), "row labels for init_from (default: the checkpoint's last two path parts)")
    random_init: bool = doc(False, "also fine-tune the first checkpoint's architecture from random weights "
                                   "(a 'random init' row, same grid and seeds)")
    tasks: str = doc("glue", "comma-separated tasks and groups: glue, squad, all, mnli, qqp, qnli, sst2, cola, "
                             "stsb, mrpc, rte, wnli, squad1, squad2, swag, conll2003, conll2003_feature "
                             "(empty: only your own tasks)")
    task_files: tuple[str, ...] = doc((), "YAML task cards: your own tasks (one or more per file; see "
                                          "bertray/tasks/card.py), run beside `tasks`")
    own_tasks: tuple[TaskCard, ...] = doc((), "your own tasks as task cards written into this config")
    data: str = doc("samples", "root of the standard task layouts (glue/SST-2/train.tsv, squad/v1.1/..., ...): "
                               "local or object storage")
    learning_rates: tuple[float, ...] = doc((), "learning rates (empty: the task's paper grid)")
    batch_sizes: tuple[int, ...] = doc((), "batch sizes (empty: the task's paper grid)")
    epochs: tuple[int, ...] = doc((), "epoch counts (empty: the task's paper grid)")
    seeds: tuple[int, ...] = doc((0,), "seeds: random restarts of every grid point (head init, dropout, order)")
    max_seq_len: int | None = doc(None, "tokens per sequence (null: the task's: 128, SQuAD 384)")
    max_train_examples: int | None = doc(None, "use the first N training examples (null: all)")
    max_eval_examples: int | None = doc(None, "score the first N examples of each dev split and predict the "
                                              "first N of each test split (null: all)")
    warmup_proportion: float = doc(0.1, "share of steps with linear warmup; then linear decay to 0")
    weight_decay: float = doc(0.01, "AdamW decoupled weight decay (not on LayerNorm and biases)")
    dropout: float | None = doc(0.1, "dropout everywhere (null: keep the checkpoint's)")
    adam_eps: float = doc(1e-6, "AdamW epsilon")
    clip_grad_norm: float = doc(1.0, "clip gradients to this global norm (0: off)")
    precision: Precision = doc("auto", "autocast dtype (auto: bf16 on GPUs that "
                                                                      "have it, fp16 with loss scaling on older "
                                                                      "GPUs, fp32 on CPU)")
    eval_batch_size: int = doc(128, "batch size for scoring the dev sets")
    scheduler: Literal["none", "asha"] = doc("none", "none: every trial runs all its epochs; asha: stop weak "
                                                     "trials early (on `score`, after each epoch; compared per "
                                                     "(row, task), one such group after another)")
    cpus_per_trial: float = doc(0.0, "CPUs per trial (0: auto, 1 on CPU-only clusters, CPUs per GPU up to 8 "
                                     "with GPUs); torch uses that many threads")
    gpus_per_trial: float | None = doc(None, "GPUs per trial (null: 1 when the cluster has GPUs, else 0)")
    max_concurrent_trials: int = doc(0, "at most this many trials at once (0: as resources allow)")
    max_failures: int = doc(1, "reruns of a failed trial before it is reported as FAILED")
    output: str = doc("runs/finetune", "results directory (local or object storage): each sweep writes "
                                       "results.md/.csv/.json, predictions/, models/ and tune/ (Tune's trial "
                                       "directories) into <output>/<name>-<date>-<time>-<id>/, and "
                                       "<output>/latest names the newest")
    name: str = doc("finetune", "name prefix of the sweep's folder (a timestamp makes every sweep new)")
    cache_dir: str | None = doc(None, "node-local cache for featurized data and downloaded checkpoints "
                                      "(null: <output>/cache when output is local, else a temp folder)")
    predictions: bool = doc(True, "write prediction files (dev predictions, GLUE test submissions, SQuAD "
                                  "predictions.json) and copy the winners' to <sweep>/predictions/")
    save_models: saved_models.SaveMode = doc(
        "winners", "fine-tuned models to keep, in the Hugging Face layout with a model card: winners, per "
                   "(checkpoint, task) the winning trial's at <sweep>/models/<row>/<task>/; all, also every "
                   "trial's at <sweep>/models/<row>/<task>/trials/<trial id>/; none")
    fail_trials: tuple[str, ...] = doc((), "fault injection for tests: trials of TASK or TASK@LR raise")

    def __post_init__(self) -> None:
        check(len(self.init_from) > 0, "init_from", "give at least one checkpoint")
        for key in ("init_from", "data", "output", "cache_dir"):
            check_no_credentials(key, getattr(self, key))
        check(not self.labels or len(self.labels) == len(self.init_from), "labels",
              f"give one label per init_from entry ({len(self.init_from)}), got {len(self.labels)}")
        if self.tasks.strip() or not (self.task_files or self.own_tasks):
            resolve_tasks(self.tasks)
        unique_names(self.own_tasks)
        for key in ("learning_rates", "batch_sizes", "epochs"):
            check(all(v > 0 for v in getattr(self, key)), key, f"values must be > 0, got {getattr(self, key)}")
        check(len(self.seeds) > 0, "seeds", "give at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", f"seeds must differ, got {self.seeds}")
        check(self.cpus_per_trial >= 0, "cpus_per_trial", f"must be >= 0, got {self.cpus_per_trial}")
        check(self.gpus_per_trial is None or self.gpus_per_trial >= 0, "gpus_per_trial",
              f"must be >= 0 or null, got {self.gpus_per_trial}")
        check(self.max_concurrent_trials >= 0, "max_concurrent_trials",
              f"must be >= 0, got {self.max_concurrent_trials}")
        check(self.max_failures >= 0, "max_failures", f"must be >= 0, got {self.max_failures}")
        check(self.save_models in saved_models.SAVE_MODES, "save_models",
              f"choose one of {', '.join(saved_models.SAVE_MODES)}, got {self.save_models!r}")
        check_folder_name("name", self.name)
        for label in self.labels:              # a label is a folder path under models/ and predictions/
            for part in label.split("/"):
                check_folder_name("labels", part)
        for entry in self.fail_trials:
            task, _, lr = entry.partition("@")
            resolve_tasks(task)
            if lr:
                try:
                    float(lr)
                except ValueError:
                    raise ConfigError(f"fail_trials: {entry!r} is not TASK or TASK@LR") from None
        # The per-trial settings are validated once here, with the trial's own checks.
        TrialConfig(task=next(iter(TASKS)), init_from=".", data=".", learning_rate=1e-5,
                    batch_size=1, epochs=1, **self._trial_settings())

    def _trial_settings(self) -> dict[str, Any]:
        keys = ("max_seq_len", "max_train_examples", "max_eval_examples", "warmup_proportion", "weight_decay",
                "dropout", "adam_eps", "clip_grad_norm", "precision", "eval_batch_size", "predictions")
        return {**{k: getattr(self, k) for k in keys}, "save_model": self.save_models != "none"}

    def grid(self, spec: TaskSpec) -> list[dict[str, Any]]:
        """The task's grid points (lr, batch size, epochs) with the overrides applied, times the seeds."""
        lrs = self.learning_rates or spec.grid.learning_rates
        sizes = self.batch_sizes or spec.grid.batch_sizes
        epochs = self.epochs or spec.grid.epochs
        return [{"learning_rate": lr, "batch_size": bs, "epochs": ep, "seed": seed}
                for lr in lrs for bs in sizes for ep in epochs for seed in self.seeds]


# --------------------------------------------------------------------------------------------
# Rows, tasks and trials (checked once, on the driver)


@dataclass(frozen=True)
class Row:
    """One row of the results tables: a checkpoint (or its random-init twin)."""

    label: str
    checkpoint: str          # resolved checkpoint directory URL or absolute path
    random_init: bool = False


def default_label(url: str) -> str:
    parts = [p for p in url.rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if parts else url


def resolve_rows(cfg: FinetuneConfig) -> list[Row]:
    """Follow run directories and `latest` files to checkpoints and check that each will load."""
    rows = []
    for i, raw in enumerate(cfg.init_from):
        url = absolute_url(resolve_checkpoint(absolute_url(raw)))
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.isfile(path.rstrip("/") + "/config.json"):
            hint = (" Make one with `python flows/pretrain.py` (about 3 minutes on 2 CPU cores), or pass "
                    "--init-from with a checkpoint directory in the Hugging Face layout"
                    if raw == FinetuneConfig.init_from[0] else
                    " Pass a checkpoint directory in the Hugging Face layout (config.json, model.safetensors, "
                    "vocab.txt or tokenizer.json), a pretraining run directory, or its `latest` file.")
            raise CheckpointError(f"init_from: {raw} -> {url} has no config.json.{hint}")
        try:                                    # here, once, not in every trial after the fan-out
            verify_checkpoint(url)
        except CheckpointError as exc:
            raise CheckpointError(f"init_from: {raw}: {exc}") from None
        rows.append(Row(cfg.labels[i] if cfg.labels else default_label(url), url))
    if cfg.random_init:
        rows.append(Row(RANDOM_INIT, rows[0].checkpoint, random_init=True))
    labels = [r.label for r in rows]
    check(len({tables.slug(label) for label in labels}) == len(labels), "labels",
          f"rows need labels that stay distinct as folder names, got {labels}")
    return rows


def check_data(specs: Sequence[TaskSpec], data: str) -> None:
    """Every task's train and dev files exist under `data` (checked once, on the driver)."""
    missing = []
    for spec in specs:
        for split in ("train", *spec.dev_splits):
            fs, path = fsspec.core.url_to_fs(spec.path(data, split))
            if not fs.isfile(path):
                missing.append(f"{spec.name}: {spec.data_dir}/{spec.files[split]}")
    if missing:
        raise TaskDataError(f"data: {data} lacks {len(missing)} file(s): {'; '.join(missing)}. The root holds the "
                            f"standard layouts (glue/SST-2/train.tsv, squad/v1.1/dev-v1.1.json, swag/val.csv, "
                            f"conll2003/valid.txt, ...); the shipped samples have glue/SST-2, MRPC, CoLA and STS-B "
                            f"only (--data ../shared/data for the real files)")


def own_cards(cfg: FinetuneConfig) -> list[TaskCard]:
    """The config's own tasks: those of its task files, then those written into it."""
    cards = [card for path in cfg.task_files for card in load_cards(path)] + list(cfg.own_tasks)
    unique_names(cards)
    return cards


def prepare_tasks(cfg: FinetuneConfig) -> tuple[list[TaskSpec], list[str]]:
    """Every task of the sweep as a spec, checked once on the driver before any trial starts:
    the built-in tasks' files under `data` exist; your own tasks' files are read, checked and their
    cards settled (`bertray.tasks.checks`). Returns the specs and the lines to show the user
    (inferred types, bad rows, held-out dev splits, leaks, sizes)."""
    builtin = resolve_tasks(cfg.tasks) if cfg.tasks.strip() else []
    if builtin:
        check_data(builtin, absolute_url(cfg.data))
    settled, lines = check_cards(own_cards(cfg))
    return [*builtin, *(card_spec(card) for card in settled)], lines


def _fails(cfg: FinetuneConfig, task: str, lr: float) -> bool:
    for entry in cfg.fail_trials:
        name, _, value = entry.partition("@")
        if name.strip().lower() == task and (not value or math.isclose(float(value), lr, rel_tol=1e-9)):
            return True
    return False


def trial_configs(cfg: FinetuneConfig, rows: Sequence[Row], specs: Sequence[TaskSpec], *, cache_dir: str,
                  threads: int) -> list[dict[str, Any]]:
    """One plain dict per trial: the row label and the `TrialConfig` fields (what Tune ships)."""
    data = absolute_url(cfg.data)
    out = []
    for row in rows:
        for spec in specs:
            for point in cfg.grid(spec):
                trial = TrialConfig(task=spec.name, init_from=row.checkpoint, data=data, random_init=row.random_init,
                                    threads=threads, cache_dir=cache_dir, fail=_fails(cfg, spec.name,
                                                                                     point["learning_rate"]),
                                    card=card_mapping(spec.source) if spec.source is not None else None,
                                    **point, **cfg._trial_settings())
                out.append({"row": row.label, "trial": dataclasses.asdict(trial)})
    return out


def trial_resources(cfg: FinetuneConfig, cluster: dict[str, float]) -> dict[str, float]:
    """{"cpu": c, "gpu": g} per trial: one GPU per trial when the cluster has GPUs."""
    gpus = cluster.get("GPU", 0.0)
    cpus = cluster.get("CPU", 1.0)
    g = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else (1.0 if gpus >= 1 else 0.0)
    c = cfg.cpus_per_trial
    if c == 0:
        c = float(max(1, min(MAX_AUTO_CPUS_PER_TRIAL, int(cpus // gpus)))) if g and gpus else 1.0
    resources = {"cpu": c, "gpu": g}
    if g > gpus:
        raise ConfigError(f"gpus_per_trial: {g:g} requested but the cluster has {gpus:g} GPUs")
    if c > cpus:
        raise ConfigError(f"cpus_per_trial: {c:g} requested but the cluster has {cpus:g} CPUs")
    return resources


# --------------------------------------------------------------------------------------------
# The sweep's folders and its results' setting note


def point_latest(output: str, name: str) -> None:
    """`<output>/latest` names the newest sweep: a symbolic link on a local disk (so
    `<output>/latest/models/...` is a path), a one-line file in object storage (which has no links),
    as a pretraining run's `latest` names its newest checkpoint."""
    if is_local_url(output):
        link, staged = os.path.join(output, LATEST), os.path.join(output, f".{LATEST}-{os.urandom(4).hex()}")
        os.symlink(name, staged)
        os.replace(staged, link)                 # atomic: readers see the old or the new sweep, never none
    else:
        write_text(join_url(output, LATEST), name + "\n")


def latest_sweep(output: str) -> str:
    """The folder of the newest sweep under `output` (see `point_latest`)."""
    link = join_url(absolute_url(output), LATEST)
    if is_local_url(output):
        return os.path.realpath(link)
    fs, path = fsspec.core.url_to_fs(link)
    return join_url(absolute_url(output), fs.cat_file(path).decode().strip())


def setting_note(cfg: FinetuneConfig, rows: Sequence[Row], specs: Sequence[TaskSpec], resources: dict[str, float],
                 n_trials: int) -> str:
    """The results' note on how the sweep was run: trials, data, seeds, each task's grid, limits, optimizer, rows."""
    grids = "; ".join(
        f"{s.name}: lr {{{', '.join(f'{x:g}' for x in (cfg.learning_rates or s.grid.learning_rates))}}} x batch "
        f"{{{', '.join(map(str, cfg.batch_sizes or s.grid.batch_sizes))}}} x epochs "
        f"{{{', '.join(map(str, cfg.epochs or s.grid.epochs))}}}" for s in specs)
    limits = []
    if cfg.max_train_examples:
        limits.append(f"first {cfg.max_train_examples:,} training examples")
    if cfg.max_eval_examples:
        glue = any(s.source is None and s.data_dir.startswith("glue/") for s in specs)
        limits.append(f"first {cfg.max_eval_examples:,} dev and test examples (so test predictions are partial"
                      + (", not a complete GLUE submission)" if glue else ")"))
    if cfg.max_seq_len:
        limits.append(f"max_seq_len {cfg.max_seq_len}")
    data = cfg.data if any(s.source is None for s in specs) else "the task cards' files"
    return (f"Setting: {n_trials} trials; data {data}; seeds {list(cfg.seeds)}; grid {grids}"
            + (f"; {', '.join(limits)}" if limits else "")
            + f"; AdamW (weight decay {cfg.weight_decay:g}), warmup {cfg.warmup_proportion:.0%} then linear decay, "
              f"dropout {cfg.dropout}; per trial {resources}. Rows: "
            + "; ".join(f"{r.label} = {'random weights, architecture of ' if r.random_init else ''}{r.checkpoint}"
                        for r in rows) + ". Cells are dev-set scores (percent) of the best grid point per task.")


__all__ = ["FinetuneConfig", "Row", "check_data", "latest_sweep", "point_latest", "prepare_tasks", "resolve_rows",
           "trial_configs", "trial_resources"]
