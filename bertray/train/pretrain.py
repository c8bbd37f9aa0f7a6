"""Pretraining on Ray Train, the driver side: `run_pretraining` and the `TorchTrainer` it starts.

The driver resolves the corpus and reads its first documents (layout check), refuses a resume under
a changed config, fixes the vocabulary, draws a fixed held-out batch set, builds one streaming
dataset per phase of the schedule and starts `TorchTrainer` with a `WorkerPlan`. What runs on the
workers is `bertray.train.worker_loop` (the loop), `bertray.train.worker_stream` (the stream's
bookkeeping) and `bertray.train.worker_checkpoints` (resume and checkpoint reports).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import fsspec
import numpy as np
import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bertray import wordpiece
from bertray.config import to_mapping
from bertray.train.config import PretrainConfig
from bertray.data.formats import preflight_layout
from bertray.data.pipeline import PipelineCounters, build_dataset, iter_local
from bertray.data.position import DataPosition
from bertray.data.sources import CorpusFile, resolve_corpus
from bertray.data.stream_spec import INSTANCE_COLUMNS, stream_spec
from bertray.data.vocabulary import run_tokenizer
from bertray.errors import ConfigError, CorpusError
from bertray.model.hf_format import verify_checkpoint
from bertray.storage import absolute_url, exists, is_local_url, join_url, ray_storage, write_text
from bertray.train.console import ConsoleFollower, ConsoleLines
from bertray.train.checkpoints import (LATEST, RUN_STATE, RunState, check_config_change, load_run_state,
                                       resolve_checkpoint)
from bertray.train.init_from import StartingCheckpoint, starting_checkpoint
from bertray.train.lease import RunLease
from bertray.train.curves import BASELINES
from bertray.train.resources import ResourceShortage, check_resources, data_selector, worker_resources
from bertray.train.worker_loop import WorkerPlan, train_loop_per_worker
from bertray.train.worker_stream import stream_start

log = logging.getLogger("bertray.train")


EVAL_SEED = 12345


@dataclass
class PretrainResult:
    metrics: dict[str, Any]              # rank 0's final metrics (the train function's return value)
    reported: dict[str, Any]             # what Ray Train recorded with the last checkpoint
    checkpoint: str | None
    counters: dict[str, int]
    elapsed_s: float
    baselines: dict[str, float]          # {eval,heldout}_mlm_baseline, _nsp_majority (see `eval_baselines`)


def latest_run_state(run_url: str) -> RunState | None:
    """The run state of the checkpoint `latest` names, or None for a run without one."""
    if not exists(join_url(run_url, LATEST)):
        return None
    directory = resolve_checkpoint(run_url)
    if not exists(join_url(directory, RUN_STATE)):
        return None
    fs, path = fsspec.core.url_to_fs(join_url(directory, RUN_STATE))
    with tempfile.TemporaryDirectory() as local:
        fs.get_file(path, os.path.join(local, RUN_STATE))
        return load_run_state(local)


EVAL_FILES_PER_TASK = 64   # held-out files interleaved in one read task: the first rows span them all


def eval_sets(cfg: PretrainConfig, tokenizer_json: str, train_files: list[CorpusFile]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Fixed held-out batches by metric prefix: pairs and masks from a fixed seed, drawn once on the
    driver. `eval` is `data.eval_corpus` when it is set (files never trained on), else the documents
    `data.holdout_fraction` keeps out of training; with both set, those documents are `heldout` too.
    The two answer different questions: held-out documents come from books (or sites) the model has
    read the rest of, so they also reward recognising the source; held-out files do not."""
    data, sets = cfg.data, {}
    if data.eval_corpus:
        files = resolve_corpus(data.eval_corpus, storage_options=data.storage_options)
        shared = sorted({f.url for f in files} & {f.url for f in train_files})
        if shared:
            raise ConfigError(f"data.eval_corpus: {len(shared)} of its files are also training files (e.g. "
                              f"{shared[0]}), so the held-out scores would measure memorised text; give separate "
                              "files, or leave data.eval_corpus empty and set data.holdout_fraction")
        sets["eval"] = _fixed_batches(cfg, tokenizer_json, files, "train", f"data.eval_corpus: {list(data.eval_corpus)}")
    if data.holdout_fraction > 0:
        source = f"data.holdout_fraction: {data.holdout_fraction}"
        if not sets:
            sets["eval"] = _fixed_batches(cfg, tokenizer_json, train_files, "heldout", source)
            return sets
        try:       # the second view: too few held-out documents leave it out, they do not stop the run
            sets["heldout"] = _fixed_batches(cfg, tokenizer_json, train_files, "heldout", source)
        except ConfigError as exc:
            log.warning("no held-out documents evaluation (heldout_*), only data.eval_corpus's: %s", exc)
    return sets


def _fixed_batches(cfg: PretrainConfig, tokenizer_json: str, files: list[CorpusFile], split: str,
                   source: str) -> list[dict[str, np.ndarray]]:
    data, phase = cfg.data, cfg.train.phases[0]
    spec = dataclasses.replace(
        stream_spec(data, phase, tokenizer_json, seed=EVAL_SEED, generation=0, passes=1),
        split=split, holdout_fraction=data.holdout_fraction if split == "heldout" else 0.0, preserve_order=True,
        files_per_read_task=min(len(files), EVAL_FILES_PER_TASK))
    size = min(phase.batch_size, 64)
    # The same stages in this process, in stream order (what `preserve_order` delivers): a few batches
    # need no actors, and the set is the same on every run.
    parts, wanted = [], size * cfg.train.eval_batches
    for part in iter_local(files, spec, columns=INSTANCE_COLUMNS):
        parts.append(part)
        if sum(len(p["input_ids"]) for p in parts) >= wanted:
            break
    n = min(sum(len(p["input_ids"]) for p in parts) // size, cfg.train.eval_batches)
    if n == 0:
        raise ConfigError(f"{source} gives fewer than {size} held-out sequences")
    rows = {key: np.concatenate([p[key] for p in parts])[:n * size] for key in INSTANCE_COLUMNS}
    return [{k: np.ascontiguousarray(v[i * size:(i + 1) * size]) for k, v in rows.items()} for i in range(n)]


def eval_baselines(sets: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, float]:
    """What each set's held-out accuracies must beat (`{prefix}_mlm_baseline`, `{prefix}_nsp_majority`):
    always predicting the most frequent masked token, and always predicting the more common NSP label
    (Google's procedure gives more NotNext than IsNext)."""
    out = {}
    for prefix, batches in sets.items():
        if not batches:
            continue
        ids = np.concatenate([b["masked_lm_ids"][b["masked_lm_weights"] > 0] for b in batches])
        if len(ids):
            out[f"{prefix}_mlm_baseline"] = float(np.bincount(ids).max() / len(ids))
        labels = np.concatenate([b["next_sentence_labels"] for b in batches])
        labels = labels[labels >= 0]
        if len(labels):
            out[f"{prefix}_nsp_majority"] = float(max(labels.mean(), 1 - labels.mean()))
    return out


def on_driver_node(actor_class: Any) -> Any:
    """`actor_class` placed on the driver's node: an actor on a node that is lost would take the
    run's totals (or its console lines) with it."""
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False))


def _phase_dataset(files, cfg: PretrainConfig, phase_index: int, tokenizer_json: str, run_url: str, counters,
                   progress_bars: bool):
    """Built by Ray Train at every worker-group start, so a restarted group (after a crash) plans
    its stream from the newest checkpoint's data position: finished units are left out, and the
    workers drop the rows they already trained on (`stream_start`)."""
    layout, position = stream_start(cfg, len(files), latest_run_state(run_url))
    resume = position if position is not None and position.phase == phase_index else None
    if resume is not None:
        log.info("phase %d resumes its stream at %s", phase_index, describe_position(resume))
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    spec = stream_spec(cfg.data, cfg.train.phases[phase_index], tokenizer_json, seed=cfg.train.seed,
                       generation=layout.generation, passes=cfg.train.corpus_passes, resume=resume,
                       label_selector=data_selector(cfg, [n.get("Labels") or {} for n in nodes],
                                                    [n["Resources"] for n in nodes], autoscaling=_has_autoscaler()))
    ds = build_dataset(files, spec, counters_actor=counters, keep_provenance=cfg.train.record_instances)
    ds.context.enable_progress_bars = progress_bars    # this runs in Train's process, not the driver's
    return ds


def describe_position(position: DataPosition) -> str:
    s = position.summary()
    return (f"phase {s['phase']}, pass {s['pass']}: {s['pass_share_done']:.1%} of the pass read "
            f"({s['units_done']} units done in all, {s['units_per_pass']} per pass, {s['units_in_flight']} in flight; "
            f"{s['files']} files)")


def check_stream(cfg: PretrainConfig, metrics: dict[str, Any], pipeline: dict[str, int]) -> None:
    """A run that trained on nothing, or lost more files than `data.max_unreadable_share`, is an error
    (exit code 2 from the flow), not a success: the checkpoints it wrote are kept, the logs name each file."""
    lost = sum(pipeline.get(k, 0) for k in ("unreadable_files", "missing_files", "oversized_files"))
    counts = ", ".join(f"{k}={v:,}" for k, v in sorted(pipeline.items()) if v and k.endswith(("_files", "_rows")))
    if not metrics.get("step"):
        raise CorpusError(f"the run ended at step 0: the corpus stream gave no batch ({counts or 'no file read'}); "
                          "the driver and read-task logs name each file that failed")
    read = pipeline.get("files", 0)          # every attempt, failed ones included
    if read and lost / read > cfg.data.max_unreadable_share:
        raise CorpusError(f"{lost} of {read} file reads failed ({counts}), more than data.max_unreadable_share "
                          f"({cfg.data.max_unreadable_share:.0%}); the training itself finished and its checkpoints "
                          "are kept; the logs name each file")


def check_cluster(cfg: PretrainConfig) -> None:
    """`check_resources` against the live nodes, as `scaling.resource_check` says; a warning only
    where an autoscaler may still add nodes."""
    if cfg.scaling.resource_check == "skip":
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    resources, labels = [n["Resources"] for n in nodes], [n.get("Labels") or {} for n in nodes]
    try:
        check_resources(cfg, resources, labels, data_selector(cfg, labels, resources, autoscaling=_has_autoscaler()))
    except ResourceShortage as exc:
        if cfg.scaling.resource_check == "warn" or _has_autoscaler():
            log.warning("%s\nStarting anyway (scaling.resource_check: %s%s); the batch-wait watchdog reports a "
                        "pipeline that does not start.", exc, cfg.scaling.resource_check,
                        ", an autoscaler may add nodes" if _has_autoscaler() else "")
            return
        raise


def _has_autoscaler() -> bool:
    """Whether nodes may still be added: a `ray up` head (the launcher leaves its bootstrap config in
    the home directory), a KubeRay pod, or a monitor whose report maps nodes to named node types.
    A local Ray's monitor reports too, but maps each node to its own id (`node_<id>`)."""
    if os.path.exists(os.path.expanduser("~/ray_bootstrap_config.yaml")) or os.environ.get("RAY_CLUSTER_NAME"):
        return True
    try:
        import ast

        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
        report = status.get("autoscaler_report") or {}
        report = ast.literal_eval(report) if isinstance(report, str) else report
        types = (report.get("node_type_mapping") or {}).values()
        return any(not str(t).startswith("node_") for t in types) or bool(report.get("pending_launches"))
    except Exception:   # private API: when it moves, assume a fixed cluster (the safe side: fail early)
        return False


def run_pretraining(cfg: PretrainConfig, *, progress_bars: bool = False, console: TextIO | None = None,
                    prepare_datasets: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                    start: StartingCheckpoint | None = None) -> PretrainResult:
    """Run (or resume) pretraining as configured; returns the final metrics and checkpoint URL.

    `console`: where the workers' `bertray` log lines (metric lines, phases, warnings) are printed on
    the driver, with a progress line on a terminal, for a driver that keeps Ray's own worker output
    off its console (`ray.init(log_to_driver=False)`); None leaves them to Ray's log forwarding.

    `prepare_datasets` may replace the per-phase dataset factories (benchmarks/ingest.py feeds the
    same loop from memory to measure what the streaming pipeline costs). One driver at a time
    writes a run: a second one is refused while the first holds the run's lease (`RunLease`).

    `start`: `starting_checkpoint(cfg)` where the caller has already checked `model.init_from`."""
    # Progress bars of several streaming operators interleave badly with the metric lines in job
    # logs; Train copies the driver's DataContext to the workers when the trainer is built.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.execution_options.preserve_order = cfg.data.preserve_order   # Train splits with this one

    started = time.perf_counter()
    check_cluster(cfg)
    run_url = join_url(absolute_url(cfg.run.output), cfg.run.name)
    lease = RunLease.acquire(run_url, stale_after_s=cfg.run.lease_stale_s)
    try:
        lease.start_heartbeat(min(60.0, cfg.run.lease_stale_s / 4))
        return _run(cfg, run_url, started, progress_bars, console, prepare_datasets, start)
    finally:
        lease.release()


# Data settings that change how the stream is computed, not what it holds: a resume may change them.
RESUME_NEUTRAL_DATA = ("read_cpus", "tokenizer_cpus", "tokenizer_actors", "storage_options", "max_unreadable_share",
                       "max_file_bytes", "eval_corpus", "shuffle_buffer", "preserve_order", "node_labels",
                       "node_labels_fallback")


def check_resume_config(cfg: PretrainConfig, saved: RunState | None, where: str) -> None:
    """A resume under another model, tokenizer or data description would train the old weights
    under the new name: refused unless `run.allow_config_change` names each change."""
    if saved is None or not saved.config:
        return

    def comparable(config: dict[str, Any]) -> dict[str, Any]:
        data = {k: v for k, v in config.get("data", {}).items() if k not in RESUME_NEUTRAL_DATA}
        return {"model": config.get("model", {}), "data": data}

    check_config_change(comparable(saved.config), comparable(to_mapping(cfg)), cfg.run.allowed_changes, where=where)


def _run(cfg: PretrainConfig, run_url: str, started: float, progress_bars: bool, console: TextIO | None,
         prepare_datasets: Callable[[dict[str, Any]], dict[str, Any]] | None,
         start: StartingCheckpoint | None) -> PretrainResult:
    from ray.train.torch import TorchTrainer

    saved = latest_run_state(run_url)
    check_resume_config(cfg, saved, where=f"{run_url} (step {saved.step})" if saved else run_url)
    if cfg.model.init_from and saved is None:
        # here, once, rather than in every worker after the group started
        start = start or starting_checkpoint(cfg)
        log.info(start.heads_line())
    files = resolve_corpus(cfg.data.corpus, storage_options=cfg.data.storage_options)
    log.info("corpus: %d file(s), %s bytes", len(files), f"{sum(f.size or 0 for f in files):,}")
    warning = preflight_layout(files, cfg.data.corpus_layout(), fmt=cfg.data.format,
                               storage_options=cfg.data.storage_options)
    if warning:
        log.warning(warning)
    if cfg.model.init_from and saved is not None:   # the run's own checkpoint holds what it took from init_from
        own = resolve_checkpoint(run_url)
        tokenizer, bert_config = wordpiece.load(own), verify_checkpoint(own)
    elif start is not None:
        tokenizer, bert_config = start.tokenizer, start.config
    else:
        tokenizer = run_tokenizer(cfg.data, files, run_url)
        bert_config = cfg.model.bert_config(tokenizer.get_vocab_size(), is_causal=cfg.data.objective == "ltr")
    tokenizer_json = tokenizer.to_str()
    evaluation = eval_sets(cfg, tokenizer_json, files)
    baselines = eval_baselines(evaluation)
    write_text(join_url(run_url, BASELINES), json.dumps(baselines) + "\n")
    counters = on_driver_node(PipelineCounters).remote()
    datasets = {f"train_{i}": functools.partial(_phase_dataset, files, cfg, i, tokenizer_json, run_url, counters,
                                                progress_bars) for i in range(len(cfg.train.phases))}
    if prepare_datasets is not None:
        datasets = prepare_datasets(datasets)

    storage_path, storage_fs = ray_storage(cfg.run.output)
    tensorboard_dir, tensorboard_url = _tensorboard_dirs(run_url) if cfg.run.tensorboard else (None, None)
    plan = WorkerPlan(config=cfg, bert_config=bert_config.to_dict(), tokenizer_json=tokenizer_json, run_url=run_url,
                      eval_sets=evaluation, baselines=baselines,
                      init_from=start.url if start is not None and saved is None else None,
                      tensorboard_dir=tensorboard_dir, tensorboard_url=tensorboard_url, corpus_files=len(files),
                      console=on_driver_node(ConsoleLines).remote() if console is not None else None)
    scaling = ray.train.ScalingConfig(
        num_workers=tuple(cfg.scaling.num_workers) if cfg.scaling.elastic else cfg.scaling.max_workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker=worker_resources(cfg), label_selector=dict(cfg.scaling.node_labels) or None)
    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints))
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config={"plan": plan}, scaling_config=scaling,
                           run_config=run_config, datasets=datasets,
                           dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)))
    if console is None:
        result = trainer.fit()
    else:
        with ConsoleFollower(plan.console, out=console):
            result = trainer.fit()
    checkpoint_url = None
    if result.checkpoint is not None:
        name = os.path.basename(result.checkpoint.path.rstrip("/"))
        write_text(join_url(run_url, LATEST), name + "\n")
        checkpoint_url = join_url(run_url, name)
    metrics = dict(result.return_value or result.metrics or {})
    try:
        pipeline = ray.get(counters.get.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
        log.warning("the pipeline counters are lost (%s): the summary has none", type(exc).__name__)
        pipeline = {}
    check_stream(cfg, metrics, pipeline)
    return PretrainResult(metrics=metrics, reported=dict(result.metrics or {}), checkpoint=checkpoint_url,
                          counters=pipeline, elapsed_s=time.perf_counter() - started,
                          baselines=baselines)


def _tensorboard_dirs(run_url: str) -> tuple[str, str | None]:
    """(where rank 0 writes event files, where they are copied): the run directory itself when it is
    local; for a remote run a local folder named after the run's URL, copied to
    `<run>/tensorboard` at every checkpoint and at the end."""
    if is_local_url(run_url):
        return os.path.join(absolute_url(run_url), "tensorboard"), None
    local = re.sub(r"[^A-Za-z0-9._-]+", "_", run_url)
    return os.path.join(tempfile.gettempdir(), "bertray-tensorboard", local), join_url(run_url, "tensorboard")
