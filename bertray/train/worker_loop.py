"""Pretraining on the Ray Train workers: `train_loop_per_worker`, the loop every worker runs.

Each worker reads the `WorkerPlan` the driver (`bertray.train.pretrain`) fixed, resumes from the
newest checkpoint of the run when there is one (after a crash or a re-run with the same output and
name), and runs the same number of steps as every other rank so DDP never waits on a missing peer.
The step itself is Ray-free (`bertray.train.step.TrainStep`); the stream's bookkeeping is
`bertray.train.worker_stream`, the checkpoints' `bertray.train.worker_checkpoints`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import ray
import ray.train
import torch

from bertray.config import to_mapping
from bertray.data.position import DataPosition
from bertray.model.config import BertConfig
from bertray.runtime.autocast import autocast
from bertray.runtime.batches import pretraining_batch
from bertray.storage import exists, join_url, write_text
from bertray.train.checkpoints import RunState, load_run_state, load_training_state, set_rng_state
from bertray.train.config import PretrainConfig
from bertray.train.console import forward_worker_logs
from bertray.train.init_from import load_starting_weights
from bertray.train.metrics import IntervalMeter, MetricSinks, format_line
from bertray.train.optim import make_optimizer, warmup_linear_decay
from bertray.train.step import DeviceMeter, TrainStep, pretraining_loss
from bertray.train.worker_checkpoints import check_finite, report_checkpoint, resume_checkpoint
from bertray.train.worker_stream import StepAgreement, StreamTracker, step_batches, stream_start, watched, worker_batch

log = logging.getLogger("bertray.train")


FAULT_MARKER = ".fault_injected"


@dataclass
class WorkerPlan:
    """What every worker is given by the driver: fixed before the first step, the same on every rank."""

    config: PretrainConfig
    bert_config: dict[str, Any]
    tokenizer_json: str
    run_url: str
    eval_sets: dict[str, list[dict[str, np.ndarray]]]   # metric prefix -> fixed batches (`pretrain.eval_sets`)
    baselines: dict[str, float]          # {prefix}_mlm_baseline, _nsp_majority (see `pretrain.eval_baselines`)
    init_from: str | None
    tensorboard_dir: str | None       # where rank 0 writes event files on its node
    tensorboard_url: str | None       # where they are copied at every checkpoint (remote runs), or None
    corpus_files: int                    # how many files the stream's units are made of (its layout)
    console: Any = None                  # a `ConsoleLines` actor the workers' log lines go to, or None


def evaluate(model: torch.nn.Module, batches: list[dict[str, np.ndarray]], device: torch.device,
             precision: str, prefix: str = "eval") -> dict[str, float]:
    """Held-out MLM/NSP loss and accuracy on fixed batches (same masks every time)."""
    model.eval()
    meter = DeviceMeter()
    with torch.no_grad(), autocast(device, precision):
        for batch in batches:
            meter.add_all(pretraining_loss(model, pretraining_batch(batch).to(device))[1])
    model.train()
    return {f"{prefix}_{k}": v for k, v in meter.read().items()}


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
    checkpoint = resume_checkpoint(plan.run_url)
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
        check_finite(step, at, plan.run_url)
        records = stream.gather(world)
        state.data_position = stream.position.to_json()
        report_checkpoint(model, tokenizer, optimizer, scheduler, step, state, {**last, "step": at}, rank,
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
        batches = watched(step_batches(ray.train.get_dataset_shard(f"train_{phase_index}"), per_worker, micro,
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
            if plan.eval_sets and rank == 0 and (final or (tcfg.eval_every and state.step % tcfg.eval_every == 0)):
                for prefix, held_out in plan.eval_sets.items():
                    metrics.update(evaluate(model, held_out, device, tcfg.precision, prefix))
            if metrics:
                _log_metrics(metrics, state.step, tcfg.max_steps, rank, sinks, tuple(plan.eval_sets))
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


def _log_metrics(metrics: dict[str, Any], step: int, total: int, rank: int, sinks: MetricSinks,
                 eval_prefixes: tuple[str, ...]) -> None:
    if rank == 0:
        log.info(format_line(step, total, metrics))
        for prefix in eval_prefixes:
            evaluation = {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(f"{prefix}_")}
            if evaluation:
                log.info(format_line(step, total, evaluation, prefix=prefix))
    sinks.emit(step, metrics)


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
