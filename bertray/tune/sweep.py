"""Fine-tuning sweeps on Ray Tune: checkpoints x tasks x learning rates x batch sizes x epochs x seeds.

The only module that imports `ray.tune`; the sweep's plan (its config, rows, tasks, trials and
their resources, the sweep folders) is `bertray.tune.sweep_plan`, free of Ray. One Tune trial is
one grid point of one task, run by the
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
from typing import Any, Sequence

import fsspec

from bertray.config import from_mapping, to_mapping
from bertray.storage import absolute_url, is_local_url, join_url, ray_storage
from bertray.tasks import confusion
from bertray.tasks.registry import TaskSpec
from bertray.tune import results as tables
from bertray.tune import saved_models
from bertray.tune.results import FAILED, OK, STOPPED, TrialRecord
from bertray.tune.sweep_plan import (FinetuneConfig, point_latest, prepare_tasks, resolve_rows, setting_note,
                                     trial_configs, trial_resources)

log = logging.getLogger("bertray.tune")


TUNE_DIR = "tune"            # <sweep>/tune: Tune's trial directories


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
    label_scores = {key: scores for key, folder in predictions.items()
                    if (scores := confusion.read_folder_label_scores(folder)) is not None}
    models = saved_models.keep_models(sweep_folder, cfg.save_models, records, best, checkpoints, settings)
    setting = {**to_mapping(cfg), "rows": [dataclasses.asdict(r) for r in rows], "resources_per_trial": resources,
               "experiment": join_url(sweep_folder, TUNE_DIR)}
    notes = [setting_note(cfg, rows, specs, resources, len(trials))]
    by_name = {spec.name: spec for spec in specs}
    files = tables.write_results(records, sweep_folder, setting=setting, title=title, notes=notes,
                                 confusions=confusions, specs=by_name, label_scores=label_scores)
    point_latest(output, experiment)
    return SweepResult(records=records, best=best, files=files, predictions=predictions, models=models,
                       markdown=tables.markdown(records, title=title, notes=notes, confusions=confusions,
                                                specs=by_name, label_scores=label_scores),
                       folder=sweep_folder,
                       experiment=join_url(sweep_folder, TUNE_DIR), resources=resources,
                       elapsed_s=time.perf_counter() - started)


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


__all__ = ["FinetuneConfig", "SweepResult", "finetune_trial", "run_sweep"]
