"""Fine-tuning sweeps on Ray Tune: checkpoints x tasks x learning rates x batch sizes x epochs x seeds.

The only module that imports `ray.tune`. One Tune trial is one grid point of one task, run by the
Ray-free loop in `bertray.tune.trainer` inside a plain function trainable (not Tune-over-Train:
the paper's fine-tuning is single-device):

    trial resources  {"cpu": c, "gpu": 1} on a cluster with GPUs, else {"cpu": c} (c = cpus_per_trial,
                     auto: 1 on CPU-only clusters, CPUs/GPUs up to 8 on GPU clusters); trials run
                     concurrently as far as the cluster's resources (and max_concurrent_trials) allow
    reports          `tune.report` after every epoch: `score` (the task's primary dev metric, which
                     selection and ASHA use, mode max), `epoch`, `train_loss`, every `{split}_{metric}`;
                     the last epoch's report carries the trial's prediction files and (unless
                     save_models is none) its model as its checkpoint
    tuners           one Tuner runs every trial; with `scheduler: asha`, one Tuner per (checkpoint, task),
                     run one after another, so that ASHA compares only trials of the same task and row
                     (CoLA's Matthews correlation is no SST-2 accuracy, random init no pretrained start)
    failures         `FailureConfig(max_failures=N)` reruns a failed trial from scratch; a trial that
                     still fails is listed as FAILED with its error in every results file
    selection        per (checkpoint, task) the trial with the best `score` (`results.select_best`)
    models           the winner's model in the Hugging Face layout at <sweep>/models/<row>/<task>/
                     (`save_models`; `bertray.tune.saved_models` says which models survive, and when)

Checkpoints reach the trials as follows: the driver resolves `--init-from` (a run directory or its
`latest` file becomes the newest checkpoint's URL) and checks that it exists; every trial then
opens the URL itself. An object-storage URL (s3://, gs://, ...) is downloaded by the first trial
on each node into a node-local cache (model and tokenizer files only), which the node's later
trials reuse. A local path is used in place, so on a multi-node cluster it must be visible at the
same path on every node (shared file system); otherwise put the checkpoint in object storage.
The same holds for `--data`. Every sweep writes into a folder of its own, <sweep> =
`<output>/<name>-<date>-<time>-<id>/` (results tables, predictions/, models/, tune/), and
`<output>/latest` names the newest, so a second sweep into the same output leaves the first one's
files alone. Prediction files and models travel back as Tune checkpoints under `<sweep>/tune/`,
which therefore must be shared storage on multi-node clusters (as Ray requires).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import fsspec

from bertray.config import check_folder_name, check_no_credentials, doc, from_mapping, to_mapping
from bertray.errors import CheckpointError, ConfigError, TaskDataError, check
from bertray.model.hf_format import verify_checkpoint
from bertray.storage import absolute_url, is_local_url, join_url, ray_storage, write_text
from bertray.tasks import confusion
from bertray.tasks.card import TaskCard, card_mapping, card_spec, load_cards, unique_names
from bertray.tasks.checks import check_cards
from bertray.tasks.registry import TASKS, TaskSpec, resolve_tasks
from bertray.train.checkpoints import resolve_checkpoint
from bertray.train.config import Precision
from bertray.tune import results as tables
from bertray.tune import saved_models
from bertray.tune.results import FAILED, OK, STOPPED, TrialRecord
from bertray.tune.trainer import TrialConfig

log = logging.getLogger("bertray.tune")

RANDOM_INIT = "random init"
LATEST = "latest"            # <output>/latest: the newest sweep's folder
TUNE_DIR = "tune"            # <sweep>/tune: Tune's trial directories
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
# Driver: paths, rows, trials


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
# The Tune trial (runs on a worker)


def finetune_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one grid point of one task (`config["job"]`, an entry of
    `trial_configs`); reports after every epoch."""
    import ray.tune as tune

    from bertray.tune.trainer import TrialConfig, run_trial

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    trial = from_mapping(TrialConfig, config["job"]["trial"])

    def report(metrics: dict[str, Any], files: str | None) -> None:
        if files is None:
            tune.report(metrics)
        else:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(files))

    with tempfile.TemporaryDirectory(prefix="bertray-trial-") as files:
        run_trial(trial, report=report, files_dir=files)


# --------------------------------------------------------------------------------------------
# The sweep (runs on the driver)


@dataclass
class SweepResult:
    records: list[TrialRecord]
    best: dict[tuple[str, str], TrialRecord]
    files: dict[str, str]                    # results.md/.csv/.json URLs
    predictions: dict[tuple[str, str], str]  # (row, task) -> the winner's predictions folder
    models: dict[tuple[str, str], str]       # (row, task) -> the winner's model folder (Hugging Face layout)
    markdown: str
    folder: str                              # the sweep's own folder under the output (`latest` names it)
    experiment: str                          # Tune's experiment directory, <folder>/tune
    resources: dict[str, float]
    elapsed_s: float


def _status(result: Any, epochs: int) -> str:
    if result.error is not None:
        return FAILED
    return OK if result.metrics.get("epoch", 0) >= epochs else STOPPED


def _failed_attempts(result: Any) -> int:
    """How many attempts of the trial raised: Tune appends one "Failure # n" entry per failure to
    the trial directory's error.txt, also for trials that later succeeded on a retry."""
    try:
        with result.filesystem.open_input_stream(f"{result.path}/error.txt") as f:
            return f.read().decode("utf-8", "replace").count("Failure # ")
    except (FileNotFoundError, OSError):
        return 0


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the trial's exception: keep its own last line (type and message) first.
    return (lines[-1] if lines else type(error).__name__)[:500]


def _groups(trials: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The trials by (row, task), in sweep order. ASHA may only compare trials of one group (one
    task's metric, one starting point), so with it each group gets its own Tuner and scheduler."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault((t["row"], t["trial"]["task"]), []).append(t)
    return groups


def _model_pruner(output: str) -> Any:
    """A Tune callback that deletes, as trials finish, the saved models that can no longer win
    (`saved_models.RunningBest`), so that a sweep holds about one model per (row, task) plus the
    running trials' instead of one per trial. Runs on the driver; never fails the sweep."""
    from ray.tune import Callback

    fs, _ = fsspec.core.url_to_fs(output)
    running = saved_models.RunningBest()

    class PruneModels(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            job = (trial.config or {}).get("job") or {}
            group = (job.get("row", "?"), (job.get("trial") or {}).get("task", "?"))
            score = (trial.last_result or {}).get("score")
            score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
            checkpoint = trial.checkpoint.path if trial.checkpoint is not None else None
            for path in running.offer(group, score, checkpoint):
                try:
                    fs.invalidate_cache()
                    if saved_models.drop_model(fs, path):
                        log.info("%s / %s: deleted the model of a trial that can no longer win (%s)", *group, path)
                except OSError as exc:            # the final pass (keep_models) tries again
                    log.warning("%s / %s: could not delete the model in %s: %s", *group, path, exc)

    return PruneModels()


def _trial_lines(total: int) -> Any:
    """A Tune callback printing one line as each trial starts and ends, the ends counted against
    the sweep's `total` trials: the console of a sweep whose Tune tables and trial output stay in
    Ray's logs. It prints to the `sys.stdout` of the moment (Tune pickles its callbacks; a stream
    does not pickle)."""
    from ray.tune import Callback

    def what(trial: Any) -> str:
        job = (trial.config or {}).get("job") or {}
        t = job.get("trial") or {}
        return (f"{t.get('task', '?')} ({job.get('row', '?')}) lr {t.get('learning_rate', 0):g} batch "
                f"{t.get('batch_size', '?')} epochs {t.get('epochs', '?')} seed {t.get('seed', '?')}")

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.ended = 0

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"started  {what(trial)}", flush=True)

        def _end(self, trial: Any, how: str) -> None:
            self.ended += 1
            score = (trial.last_result or {}).get("score")
            shown = f"score {score:.4f}" if isinstance(score, (int, float)) else "no score"
            print(f"{how:<8} {what(trial)}: {shown}  [{self.ended}/{total} trials done]", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "finished")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._end(trial, "FAILED")

    return TrialLines()


def _fit(cfg: FinetuneConfig, trials: Sequence[dict[str, Any]], resources: dict[str, float], storage_path: str,
         storage_fs: Any, name: str, verbose: int, callbacks: Sequence[Any] = ()) -> Any:
    """Build and fit one Tuner over `trials` (a fresh ASHA scheduler with `scheduler: asha`); the ResultGrid."""
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max(t["trial"]["epochs"] for t in trials), grace_period=1,
                               reduction_factor=2) if cfg.scheduler == "asha" else None)
    tuner = tune.Tuner(
        tune.with_resources(finetune_trial, resources),
        param_space={"job": tune.grid_search(list(trials))},
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=cfg.max_concurrent_trials or None,
                                    trial_dirname_creator=lambda t: f"{t.config['job']['trial']['task']}_{t.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  callbacks=list(callbacks), verbose=verbose),
    )
    return tuner.fit()


def run_sweep(cfg: FinetuneConfig, *, verbose: int = 1, title: str = "Fine-tuning results",
              trial_lines: bool = False, specs: Sequence[TaskSpec] | None = None) -> SweepResult:
    """Run every trial of `cfg` on the connected Ray cluster (call `ray.init` first) and write the
    results. `verbose`: Tune's own progress tables (0: none); `trial_lines`: print a line per
    trial start and end; `specs`: the tasks as `prepare_tasks(cfg)` returned them (None: prepared
    here, its lines logged)."""
    import ray

    started = time.perf_counter()
    if specs is None:
        specs, lines = prepare_tasks(cfg)
        for line in lines:
            log.info("%s", line)
    specs = list(specs)
    rows = resolve_rows(cfg)
    resources = trial_resources(cfg, ray.cluster_resources())
    output = absolute_url(cfg.output)
    cache_dir = cfg.cache_dir or (os.path.join(output, "cache") if is_local_url(output)
                                  else os.path.join(tempfile.gettempdir(), "bertray-cache"))
    trials = trial_configs(cfg, rows, specs, cache_dir=absolute_url(cache_dir),
                           threads=max(1, int(resources["cpu"])))
    # Every sweep in a folder of its own, so a second sweep with the same output never overwrites
    # or deletes the first one's tables, predictions or models; `latest` names the newest.
    experiment = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    sweep_folder = join_url(output, experiment)
    storage_path, storage_fs = ray_storage(sweep_folder)
    log.info("%d trials (%s), %s per trial, into %s", len(trials), ", ".join(s.name for s in specs), resources,
             sweep_folder)

    callbacks = [_model_pruner(sweep_folder)] if cfg.save_models == "winners" else []
    if trial_lines:
        callbacks.append(_trial_lines(len(trials)))
    results: list[Any] = []
    if cfg.scheduler != "asha":     # one Tuner, every trial concurrent as resources allow
        results.extend(_fit(cfg, trials, resources, storage_path, storage_fs, TUNE_DIR, verbose, callbacks))
    else:                           # one Tuner per (row, task) in turn, at <sweep>/tune/<i>-<row>-<task>/
        groups = _groups(trials)
        for i, ((row, task), members) in enumerate(groups.items(), 1):
            log.info("asha group %d/%d: %s / %s, %d trials", i, len(groups), row, task, len(members))
            results.extend(_fit(cfg, members, resources, f"{storage_path}/{TUNE_DIR}", storage_fs,
                                f"{i}-{tables.slug(row)}-{task}", verbose, callbacks))

    records = []
    checkpoints: dict[str, str | None] = {}
    settings: dict[str, dict[str, Any]] = {}
    for result in results:
        job = (result.config or {}).get("job") or {}
        trial = job.get("trial", {})
        reported = result.metrics or {}
        metrics = {k: v for k, v in reported.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TUNE_KEYS}
        records.append(TrialRecord(
            row=job.get("row", "?"), task=trial.get("task", "?"), trial_id=str(reported.get("trial_id", "")),
            status=_status(result, trial.get("epochs", 0)),
            config={k: trial.get(k) for k in tables.GRID_KEYS}, metrics=metrics, error=_error_text(result.error),
            predictions=result.checkpoint.path if result.checkpoint is not None else None,
            failures=_failed_attempts(result)))
        checkpoints[records[-1].trial_id] = records[-1].predictions
        settings[records[-1].trial_id] = trial
    row_order = {row.label: i for i, row in enumerate(rows)}
    task_order = {spec.name: i for i, spec in enumerate(specs)}
    records.sort(key=lambda r: (row_order.get(r.row, len(rows)), task_order.get(r.task, len(specs)),
                                *(r.config.get(k) or 0 for k in tables.GRID_KEYS)))
    best = tables.select_best(records)
    predictions = _collect_predictions(best, results, sweep_folder, single_row=len(rows) == 1) if cfg.predictions else {}
    for key, folder in predictions.items():
        best[key].predictions = folder
    # The winners' confusion matrices (trials wrote confusion.csv): drawn beside them, tabled per class
    first_split = {spec.name: spec.dev_splits[0] for spec in specs}
    confusions = {(row, task): confusion.draw_folder(folder, first_split[task], f"{row} / {task}")
                  for (row, task), folder in predictions.items()}
    models = saved_models.keep_models(sweep_folder, cfg.save_models, records, best, checkpoints, settings)
    setting = {**to_mapping(cfg), "rows": [dataclasses.asdict(r) for r in rows], "resources_per_trial": resources,
               "experiment": join_url(sweep_folder, TUNE_DIR)}
    notes = [_setting_note(cfg, rows, specs, resources, len(trials))]
    by_name = {spec.name: spec for spec in specs}
    files = tables.write_results(records, sweep_folder, setting=setting, title=title, notes=notes,
                                 confusions=confusions, specs=by_name)
    point_latest(output, experiment)
    return SweepResult(records=records, best=best, files=files, predictions=predictions, models=models,
                       markdown=tables.markdown(records, title=title, notes=notes, confusions=confusions,
                                                specs=by_name),
                       folder=sweep_folder,
                       experiment=join_url(sweep_folder, TUNE_DIR), resources=resources,
                       elapsed_s=time.perf_counter() - started)


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


_TUNE_KEYS = frozenset({"timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration",
                        "time_since_restore", "iterations_since_restore", "checkpoint_dir_name", "done"})


def _collect_predictions(best: dict[tuple[str, str], TrialRecord], results: Sequence[Any], output: str, *,
                         single_row: bool) -> dict[tuple[str, str], str]:
    """Copy each winner's prediction files (the files at the top of its Tune checkpoint, which
    lives on the output's file system; its model/ is left to `saved_models`) to
    <sweep>/predictions/[<row>/]<task>/; `results` are the Tune results of all the sweep's Tuners
    (trial ids are unique across them)."""
    by_id = {str((r.metrics or {}).get("trial_id", "")): r for r in results}
    out = {}
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()                 # the trials wrote through other processes' clients
    for (row, task), record in best.items():
        result = by_id.get(record.trial_id)
        if result is None or result.checkpoint is None:
            continue
        folder = f"{root.rstrip('/')}/predictions/" + (task if single_row else f"{tables.slug(row)}/{task}")
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
        fs.makedirs(folder, exist_ok=True)
        for info in sorted(fs.ls(result.checkpoint.path, detail=True), key=lambda i: i["name"]):
            name = posixpath.basename(info["name"].rstrip("/"))
            if info["type"] == "file" and not name.startswith("."):
                fs.copy(info["name"], f"{folder}/{name}")
        out[(row, task)] = fs.unstrip_protocol(folder) if not is_local_url(output) else folder
    return out


def _setting_note(cfg: FinetuneConfig, rows: Sequence[Row], specs: Sequence[TaskSpec], resources: dict[str, float],
                  n_trials: int) -> str:
    grids = "; ".join(
        f"{s.name}: lr {{{', '.join(f'{x:g}' for x in (cfg.learning_rates or s.grid.learning_rates))}}} x batch "
        f"{{{', '.join(map(str, cfg.batch_sizes or s.grid.batch_sizes))}}} x epochs "
        f"{{{', '.join(map(str, cfg.epochs or s.grid.epochs))}}}" for s in specs)
    limits = []
    if cfg.max_train_examples:
        limits.append(f"first {cfg.max_train_examples:,} training examples")
    if cfg.max_eval_examples:
        limits.append(f"first {cfg.max_eval_examples:,} dev and test examples (so test predictions are partial, "
                      "not a complete GLUE submission)")
    if cfg.max_seq_len:
        limits.append(f"max_seq_len {cfg.max_seq_len}")
    data = cfg.data if any(s.source is None for s in specs) else "the task cards' files"
    return (f"Setting: {n_trials} trials; data {data}; seeds {list(cfg.seeds)}; grid {grids}"
            + (f"; {', '.join(limits)}" if limits else "")
            + f"; AdamW (weight decay {cfg.weight_decay:g}), warmup {cfg.warmup_proportion:.0%} then linear decay, "
              f"dropout {cfg.dropout}; per trial {resources}. Rows: "
            + "; ".join(f"{r.label} = {'random weights, architecture of ' if r.random_init else ''}{r.checkpoint}"
                        for r in rows) + ". Cells are dev-set scores (percent) of the best grid point per task.")


__all__ = ["FinetuneConfig", "Row", "SweepResult", "check_data", "finetune_trial", "resolve_rows",
           "run_sweep", "trial_configs", "trial_resources"]
