"""Pretraining on Ray Train: the per-worker loop and the `TorchTrainer` around it.

The only module that knows Ray Train. The driver (`run_pretraining`) resolves the corpus, fixes the
vocabulary, builds one streaming dataset per phase of the schedule and a fixed held-out batch set,
then starts `TorchTrainer`. Workers (`train_loop_per_worker`) read one `WorkerPlan`, resume from
the newest checkpoint of the run when there is one (after a crash or a re-run with the same output
and name), and run the same number of steps on every rank so DDP never waits on a missing peer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

import fsspec
import numpy as np
import ray
import ray.train
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bertray import wordpiece
from bertray.config import to_mapping
from bertray.model.config import BertConfig
from bertray.train.config import PretrainConfig
from bertray.data.pipeline import (INSTANCE_COLUMNS, PROVENANCE_COLUMNS, PipelineCounters, build_dataset, iter_local,
                                   stream_spec)
from bertray.data.position import POSITION_COLUMNS, DataPosition, StreamLayout, merge_all
from bertray.data.sources import CorpusFile, preflight_layout, resolve_corpus
from bertray.data.vocabulary import run_tokenizer
from bertray.errors import ConfigError, CorpusError, TrainingDiverged
from bertray.model.hf_format import verify_checkpoint
from bertray.storage import absolute_url, exists, is_local_url, join_url, ray_storage, write_text
from bertray.train.console import ConsoleFollower, ConsoleLines, forward_worker_logs
from bertray.train.checkpoints import (LATEST, RUN_STATE, RunState, check_config_change, checkpoint_step,
                                       load_run_state, load_training_state, resolve_checkpoint,
                                       save_training_checkpoint, set_rng_state)
from bertray.train.init_from import StartingCheckpoint, load_starting_weights, starting_checkpoint
from bertray.train.lease import RunLease
from bertray.train.curves import BASELINES, HISTORY, write_run_curves
from bertray.train.batches import HostBatch, pretraining_batch
from bertray.train.metrics import IntervalMeter, MetricSinks, format_line
from bertray.train.rows import concat_rows, mixed_batches
from bertray.train.optim import make_optimizer, warmup_linear_decay
from bertray.train.resources import ResourceShortage, check_resources, data_selector, worker_resources
from bertray.train.stall import BatchWatchdog, cluster_diagnosis
from bertray.train.step import DeviceMeter, TrainStep, autocast, pretraining_loss

log = logging.getLogger("bertray.train")

EVAL_SEED = 12345
FAULT_MARKER = ".fault_injected"


# --------------------------------------------------------------------------------------------
# Worker side


@dataclass
class WorkerPlan:
    """What every worker is given by the driver: fixed before the first step, the same on every rank."""

    config: PretrainConfig
    bert_config: dict[str, Any]
    tokenizer_json: str
    run_url: str
    eval_batches: list[dict[str, np.ndarray]]
    baselines: dict[str, float]          # eval_mlm_baseline, eval_nsp_majority (see `eval_baselines`)
    init_from: str | None
    tensorboard_dir: str | None       # where rank 0 writes event files on its node
    tensorboard_url: str | None       # where they are copied at every checkpoint (remote runs), or None
    corpus_files: int                    # how many files the stream's units are made of (its layout)
    console: Any = None                  # a `ConsoleLines` actor the workers' log lines go to, or None


def evaluate(model: torch.nn.Module, batches: list[dict[str, np.ndarray]], device: torch.device,
             precision: str) -> dict[str, float]:
    """Held-out MLM/NSP loss and accuracy on fixed batches (same masks every time)."""
    model.eval()
    meter = DeviceMeter()
    with torch.no_grad(), autocast(device, precision):
        for batch in batches:
            meter.add_all(pretraining_loss(model, pretraining_batch(batch).to(device))[1])
    model.train()
    return {f"eval_{k}": v for k, v in meter.read().items()}


# How a worker pulls its shard: at least this many rows per read from the stream, and this many
# reads prefetched in the background (enough to hide the object-store fetches behind a step).
ROWS_PER_READ = 256
PREFETCH_BLOCKS = 4


def _batches(shard: Any, per_worker: int, micro: int, data: Any, seed: int, device: torch.device,
             resume: DataPosition | None) -> Iterator[list[HostBatch]]:
    """A step's micro-batches at a time, mixed across NSP buffers (`bertray.train.rows`): each buffer
    holds a few documents' instances, so unmixed, consecutive steps would train on the same few
    sources. They stay on the host (pinned for a GPU) until `HostBatch.to`: see `bertray.train.batches`."""
    blocks = shard.iter_batches(batch_size=max(per_worker, ROWS_PER_READ), batch_format="numpy",
                                prefetch_batches=PREFETCH_BLOCKS)
    for batch in mixed_batches(blocks, per_worker, window=data.shuffle_buffer, seed=seed, resume=resume,
                               windows_per_unit=data.preserve_order):
        provenance = {k: batch.rows[k] for k in PROVENANCE_COLUMNS if k in batch.rows}
        micro_batches = []
        for start in range(0, per_worker, micro):
            part = slice(start, start + micro)
            host = pretraining_batch({k: batch.rows[k][part] for k in INSTANCE_COLUMNS}, pin=device.type == "cuda")
            host.rows = {**{k: batch.rows[k][part] for k in POSITION_COLUMNS},
                         **{k: v[part] for k, v in provenance.items()}}
            micro_batches.append(host)
        markers = batch.positions["buffer_items"] == 0     # markers ride with the step's first micro-batch
        if markers.any():
            first = micro_batches[0].rows
            for key in POSITION_COLUMNS:
                first[key] = np.concatenate([batch.positions[key][markers], first[key]])
            for key in provenance:
                first[key] = np.concatenate([np.full(int(markers.sum()), -1, first[key].dtype), first[key]])
        yield micro_batches


def worker_batch(global_batch: int, world: int, rank: int) -> int:
    """This worker's share of the global batch: equal shares, the remainder to the first ranks (an
    elastic group of any size keeps the configured global batch)."""
    return global_batch // world + (1 if rank < global_batch % world else 0)


def _watched(batches: Iterator[list[HostBatch]], tcfg) -> BatchWatchdog[list[HostBatch]]:
    """The batches through the stall watchdog (`bertray.train.stall`), which also moves the host-side
    preparation off the training thread."""
    return BatchWatchdog(batches, warn_after_s=tcfg.batch_wait_warn_s, fail_after_s=tcfg.batch_wait_fail_s,
                         describe=cluster_diagnosis)


def _build_model(plan: WorkerPlan, checkpoint: ray.train.Checkpoint | None):
    """The model and, when resuming, the saved run and training state."""
    from bertray.model.heads import BertForPreTraining

    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return (BertForPreTraining.from_pretrained(directory), load_run_state(directory),
                    load_training_state(directory))
    model = BertForPreTraining(BertConfig.from_dict(plan.bert_config))
    if plan.init_from:
        load_starting_weights(model, plan.init_from)
    return model, None, None


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: Ray glue around `TrainStep` (shards, reports, checkpoints). Every rank
    runs the same number of steps."""
    from tokenizers import Tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_ray_train_reports()
    plan: WorkerPlan = loop_config["plan"]
    forward_worker_logs(plan.console)
    cfg, tcfg = plan.config, plan.config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.scaling.cpu_affinity:
        os.sched_setaffinity(0, cfg.scaling.cpu_affinity)
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    tokenizer = Tokenizer.from_str(plan.tokenizer_json)

    state = RunState(config=to_mapping(cfg))
    checkpoint = _resume_checkpoint(plan.run_url)
    torch.manual_seed(tcfg.seed)
    model, saved, resumed = _build_model(plan, checkpoint)
    history = []
    resumed_from = 0
    if saved is not None:
        state.step, state.sequences_seen, history = saved.step, saved.sequences_seen, saved.history
        state.restarts, resumed_from = saved.restarts + 1, saved.step
        if rank == 0:
            log.warning("resumed at step %d from %s (restart %d of this run, %d worker(s))", state.step,
                        checkpoint.path, state.restarts, world)
    model.to(device)
    optimizer = make_optimizer(model, tcfg.optimizer, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                               betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=tcfg.warmup, total_steps=tcfg.max_steps)
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else None
    step = TrainStep(model, optimizer, scheduler, pretraining_loss, device=device, precision=tcfg.precision,
                     clip_grad_norm=tcfg.clip_grad_norm, ddp_model=ddp_model, compile=tcfg.compile)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        step.load_state_dict(resumed.get("step", {}))
        set_rng_state(resumed["rng"])
    if rank == 0:
        log.info("precision %s on %s%s", step.precision, device, ", torch.compile" if tcfg.compile else "")

    start_step = state.step
    agreement = StepAgreement(world)

    def _checkpoint(at: int) -> None:
        state.history = history
        _check_finite(step, at, plan.run_url)
        records = stream.gather(world)
        state.data_position = stream.position.to_json()
        _report_checkpoint(model, tokenizer, optimizer, scheduler, step, state, {**last, "step": at}, rank,
                           plan.run_url, keep=at in tcfg.save_at_steps, baselines=plan.baselines, records=records,
                           upload=tcfg.checkpoint_upload)
        sinks.sync()

    sinks = MetricSinks(cfg.run.name, rank, plan.tensorboard_dir, plan.tensorboard_url)
    meter = IntervalMeter()
    last: dict[str, Any] = {}
    boundaries = np.cumsum(tcfg.phase_steps()).tolist()
    layout, resume = stream_start(cfg, plan.corpus_files, saved)
    if saved is not None and resume is None and rank == 0:
        log.warning("checkpoint at step %d has no usable data position (written by an older bertray, or the corpus "
                    "layout changed): the resumed stream is a new draw (generation %d), so some data may be seen "
                    "twice and some not at all in this pass", saved.step, layout.generation)
    exhausted = False
    for phase_index, phase in enumerate(tcfg.phases):
        phase_end = boundaries[phase_index]
        if state.step >= phase_end:
            continue
        phase_resume = resume if resume is not None and resume.phase == phase_index else None
        stream = StreamTracker(copy.deepcopy(phase_resume) if phase_resume else DataPosition(layout, phase_index),
                               record=tcfg.record_instances)
        per_worker = worker_batch(phase.batch_size, world, rank)
        micro = min(tcfg.micro_batch_size or per_worker, per_worker)
        batches = _watched(_batches(ray.train.get_dataset_shard(f"train_{phase_index}"), per_worker, micro,
                                    cfg.data, seed=tcfg.seed, device=device, resume=phase_resume), tcfg)
        if rank == 0:
            log.info("phase %d: steps %d-%d, sequence %d, P %d, global batch %d (%d workers x %d, micro-batches "
                     "of %d)", phase_index, state.step + 1, phase_end, phase.max_seq_len,
                     phase.max_predictions_per_seq, phase.batch_size, world, per_worker, micro)
        meter.reset()
        while state.step < phase_end:
            micro_batches = next(batches, None)
            if micro_batches is not None:
                for batch in micro_batches:
                    meter.add_batch(batch.sequences, batch.tokens, batches.waited_s)
            if not agreement.all_ready(micro_batches is not None):
                exhausted = True
                log.warning("[rank %d] the corpus stream ended at step %d (train.corpus_passes=%d); "
                            "phase %d stops early", rank, state.step, tcfg.corpus_passes, phase_index)
                if state.step > start_step and state.step % tcfg.checkpoint_every:
                    _checkpoint(state.step)
                break
            if state.step + 1 == tcfg.nan_at_step:
                step.inject_nan()
            step([b.to(device) for b in micro_batches],
                 weights=[b.sequences * world / phase.batch_size for b in micro_batches])
            state.step += 1
            state.sequences_seen += phase.batch_size
            stream.trained(micro_batches, state.step)
            meter.add(learning_rate=scheduler.get_last_lr()[0])
            _maybe_inject_fault(tcfg.fault_steps, state.step, rank, plan.run_url)

            final = state.step == tcfg.max_steps or state.step == phase_end
            metrics: dict[str, Any] = {}
            if state.step % tcfg.log_every == 0 or final:
                metrics = {**step.meter.read(), **meter.summary(world), "step": state.step, "phase": phase_index,
                           "workers": world, "restarts": state.restarts, "resumed_from_step": resumed_from}
            if plan.eval_batches and rank == 0 and (final or (tcfg.eval_every and state.step % tcfg.eval_every == 0)):
                metrics.update(evaluate(model, plan.eval_batches, device, tcfg.precision))
            if metrics:
                _log_metrics(metrics, state.step, tcfg.max_steps, rank, sinks)
                last.update(metrics)
                history.append({"step": state.step, **{k: v for k, v in metrics.items() if k != "step"}})
            # Metric lines go to bertray's sinks only, never to a metrics-only `ray.train.report`: that
            # is a barrier across ranks that then waits until the controller (polling every 2 s) has
            # taken the previous report, so logging every few fast steps held the loop to one report
            # per poll (the embedded default logging every 2 steps: 30.6 sequences/s, 98.6 without it).
            # Ray keeps only the metrics attached to checkpoints anyway.
            if final or state.step % tcfg.checkpoint_every == 0 or state.step in tcfg.save_at_steps:
                _checkpoint(state.step)
        batches.close()
        if exhausted:
            break
    sinks.close()
    return {**last, "step": state.step, "start_step": start_step, "sequences_seen": state.sequences_seen}


class StepAgreement:
    """Whether every worker has a full step of batches. Streams split evenly by rows, but markers and
    the rows a resume drops are not even across workers, so one worker can run out a batch before
    the others; they must stop at the same step, or DDP and the checkpoint barrier wait forever. A
    one-integer all-reduce per step on a CPU (gloo) group: no device synchronisation."""

    def __init__(self, world: int) -> None:
        self.group = None
        if world > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def all_ready(self, ready: bool) -> bool:
        if self.group is None:
            return ready
        import torch.distributed as dist

        flag = torch.tensor([int(ready)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def stream_start(cfg: PretrainConfig, corpus_files: int, saved: RunState | None) -> tuple[StreamLayout, DataPosition | None]:
    """Where a (re)started stream begins, from the run state it resumes: the same generation and the
    saved position when there is one; a fresh run starts generation 0. A checkpoint without a
    position (written before positions existed), or one of another corpus layout, cannot say what
    was read: its stream is a new generation, numbered after its step so that every such restart
    draws anew. The driver (planning the read) and the workers (filtering rows) both call this."""
    layout = StreamLayout(files=corpus_files, files_per_unit=cfg.data.files_per_read_task, seed=cfg.train.seed)
    if saved is None:
        return layout, None
    if saved.data_position is not None:
        position = DataPosition.from_json(saved.data_position)
        if position.layout.same_units(layout):
            return position.layout, position
    return dataclasses.replace(layout, generation=saved.step + 1), None


class StreamTracker:
    """A worker's data position, kept up to date with every trained batch, merged across workers at
    each checkpoint; with `record`, the provenance of every trained row since the last checkpoint."""

    def __init__(self, position: DataPosition, record: bool) -> None:
        self.position = position
        self.record = record
        self.rows: list[dict[str, np.ndarray]] = []

    def trained(self, batches: list[HostBatch], step: int) -> None:
        for batch in batches:
            self.position.mark(batch.rows)
            if self.record:
                real = batch.rows["buffer_items"] > 0
                rows = {k: v[real] for k, v in batch.rows.items() if len(v) == len(real)}
                rows["step"] = np.full(int(real.sum()), step, dtype=np.int64)
                rows["digest"] = instance_digests(batch.inputs)
                self.rows.append(rows)

    def gather(self, world: int) -> dict[str, np.ndarray] | None:
        """Merge every worker's position into each (a collective: all ranks call it at the same step);
        the recorded rows of all workers, on rank 0."""
        records = concat_rows(self.rows) if self.record else None
        self.rows = []
        if world == 1:
            return records
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (self.position.to_json(), records))
        merged = merge_all(DataPosition.from_json(p) for p, _ in gathered)
        self.position = merged
        return concat_rows([r for _, r in gathered if r is not None]) if self.record else None


def instance_digests(inputs: dict[str, Any]) -> np.ndarray:
    """A 64-bit digest per sequence of what the model is given (ids, segments, masks, labels): two runs
    trained on the same batches, bit for bit, iff the digests match in order."""
    import hashlib

    columns = [inputs[k].numpy() for k in ("input_ids", "token_type_ids", "masked_lm_positions", "masked_lm_ids",
                                             "masked_lm_weights", "next_sentence_labels")]
    return np.array([int.from_bytes(hashlib.blake2b(b"".join(c[i].tobytes() for c in columns), digest_size=8)
                                    .digest(), "little") >> 1 for i in range(len(columns[0]))], dtype=np.int64)


def _check_finite(step: TrainStep, at: int, run_url: str) -> None:
    """Never save a checkpoint of a diverged model: a non-finite loss (or, without fp16 loss scaling,
    gradient norm) since the last checkpoint stops the run before it writes one."""
    bad = step.nonfinite_steps()
    if bad:
        latest = join_url(run_url, LATEST)
        newest = resolve_checkpoint(run_url) if exists(latest) else None
        raise TrainingDiverged(f"{bad} step(s) up to step {at} had a non-finite loss or gradient norm, so no "
                               f"checkpoint is written at step {at}; the newest finite checkpoint is "
                               f"{newest or '(none yet)'}. Lower train.lr, raise train.warmup_steps or use "
                               "train.precision fp32/bf16, then resume from it")


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report with its whole metrics dict at INFO ("Reporting training result
    N: TrainingReport(...)"), under a logger named after its source file rather than under
    `ray.train`; the metric line of `_log_metrics` says the same in one line."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:      # a private module: when it moves, the reports are merely verbose
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _log_metrics(metrics: dict[str, Any], step: int, total: int, rank: int, sinks: MetricSinks) -> None:
    if rank == 0:
        log.info(format_line(step, total, metrics))
        evaluation = {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")}
        if evaluation:
            log.info(format_line(step, total, evaluation, prefix="eval"))
    sinks.emit(step, metrics)


def _resume_checkpoint(run_url: str) -> ray.train.Checkpoint | None:
    """Ray's registered checkpoint, or the newer one the run's `latest` names.

    The controller registers a reported checkpoint only when it next polls the workers (every 2 s), so
    a worker that dies within that window leaves a complete upload Ray never registered (seen with Ray 2.60:
    the restart redid the step and left the upload as an orphan) and a retry from `get_checkpoint()` alone would redo those steps. Rank 0 moves `latest` only
    after its upload returned, so the checkpoint it names is whole.
    """
    registered = ray.train.get_checkpoint()
    if not exists(join_url(run_url, LATEST)):
        return registered
    pointed = resolve_checkpoint(run_url)
    if registered is not None and checkpoint_step(registered.path) >= checkpoint_step(pointed):
        return registered
    if not exists(join_url(pointed, RUN_STATE)):
        log.warning("%s names %s, which is incomplete; resuming from Ray's registered checkpoint",
                    join_url(run_url, LATEST), pointed)
        return registered
    path, filesystem = ray_storage(pointed)
    return ray.train.Checkpoint(path=path, filesystem=filesystem)


def _maybe_inject_fault(steps: tuple[int, ...], step: int, rank: int, run_url: str) -> None:
    """Crash rank 0 once at each of `steps` (a marker file in the run directory remembers them)."""
    if step not in steps or rank != 0:
        return
    marker = join_url(run_url, FAULT_MARKER)
    done = ""
    if exists(marker):
        fs, path = fsspec.core.url_to_fs(marker)
        done = fs.cat_file(path).decode()
    line = f"crashed at step {step}\n"
    if line in done:
        return
    write_text(marker, done + line)
    log.error("[rank 0] fault injection: crashing at step %d", step)
    os._exit(1)


TRAINED_INSTANCES = "trained_instances.npz"


def _report_checkpoint(model, tokenizer, optimizer, scheduler, step: TrainStep, state: RunState, metrics: dict[str, Any],
                       rank: int, run_url: str, keep: bool, baselines: dict[str, float],
                       records: dict[str, np.ndarray] | None, upload: str) -> None:
    """Every rank reports (report is a barrier); rank 0 attaches the checkpoint and redraws the run's
    learning curves (history.json is every logged interval: Ray keeps only the metrics reported with
    checkpoints). `latest` moves only once the checkpoint is whole in storage: after the upload
    returned, or, uploading in the background (`upload` "async"), from the upload thread."""
    name = f"checkpoint_{state.step:08d}"
    state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if rank != 0:
        ray.train.report(metrics)
        return
    directory = tempfile.mkdtemp(prefix="bertray-ckpt-")
    save_training_checkpoint(directory, model=model, tokenizer=tokenizer, optimizer=optimizer,
                             scheduler=scheduler, run_state=state, step_state=step.state_dict())
    if records is not None:
        np.savez(os.path.join(directory, TRAINED_INSTANCES), **records)
    if keep:
        fs, path = fsspec.core.url_to_fs(join_url(run_url, "kept", name))
        fs.put(directory.rstrip("/") + "/", path, recursive=True)
    checkpoint = ray.train.Checkpoint.from_directory(directory)
    if upload == "async":
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=functools.partial(_upload_then_point, run_url))
    else:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=True)
        write_text(join_url(run_url, LATEST), name + "\n")
    write_text(join_url(run_url, HISTORY), json.dumps(state.history, default=float) + "\n")
    try:
        write_run_curves(run_url, state.history, baselines)
    except Exception as exc:   # a picture must never cost a training run
        log.warning("could not draw %s/curves.png: %s: %s", run_url, type(exc).__name__, exc)


def _upload_then_point(run_url: str, checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray's own upload of one checkpoint (in Ray's upload thread), then `latest` pointing at it."""
    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, name)
    write_text(join_url(run_url, LATEST), name + "\n")
    return persisted


# --------------------------------------------------------------------------------------------
# Driver side


@dataclass
class PretrainResult:
    metrics: dict[str, Any]              # rank 0's final metrics (the train function's return value)
    reported: dict[str, Any]             # what Ray Train recorded with the last checkpoint
    checkpoint: str | None
    counters: dict[str, int]
    elapsed_s: float
    baselines: dict[str, float]          # eval_mlm_baseline, eval_nsp_majority (see `eval_baselines`)


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


def eval_batches(cfg: PretrainConfig, tokenizer_json: str, train_files: list[CorpusFile]) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches: pairs and masks from a fixed seed, drawn once on the driver, from
    `data.eval_corpus` or else from the documents `data.holdout_fraction` keeps out of training."""
    data = cfg.data
    if data.eval_corpus:
        files = resolve_corpus(data.eval_corpus, storage_options=data.storage_options)
        split, source = "train", f"data.eval_corpus: {list(data.eval_corpus)}"
        shared = sorted({f.url for f in files} & {f.url for f in train_files})
        if shared:
            raise ConfigError(f"data.eval_corpus: {len(shared)} of its files are also training files (e.g. "
                              f"{shared[0]}), so the held-out scores would measure memorised text; give separate "
                              "files, or leave data.eval_corpus empty and set data.holdout_fraction")
    elif data.holdout_fraction > 0:
        files, split, source = train_files, "heldout", f"data.holdout_fraction: {data.holdout_fraction}"
    else:
        return []
    phase = cfg.train.phases[0]
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


def eval_baselines(batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """What the held-out accuracies must beat: always predicting the most frequent masked token, and
    always predicting the more common NSP label (Google's procedure gives more NotNext than IsNext)."""
    if not batches:
        return {}
    ids = np.concatenate([b["masked_lm_ids"][b["masked_lm_weights"] > 0] for b in batches])
    out = {"eval_mlm_baseline": float(np.bincount(ids).max() / len(ids))} if len(ids) else {}
    labels = np.concatenate([b["next_sentence_labels"] for b in batches])
    labels = labels[labels >= 0]
    if len(labels):
        out["eval_nsp_majority"] = float(max(labels.mean(), 1 - labels.mean()))
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
    evaluation = eval_batches(cfg, tokenizer_json, files)
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
                      eval_batches=evaluation, baselines=baselines,
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
