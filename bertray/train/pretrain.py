"""Pretraining on Ray Train: the per-worker loop and the `TorchTrainer` around it.

The only module that knows Ray Train. The driver (`run_pretraining`) resolves the corpus, fixes the
vocabulary, builds one streaming dataset per phase of the schedule and a fixed held-out batch set,
then starts `TorchTrainer`. Workers (`train_loop_per_worker`) read one config dict, resume from
the newest checkpoint of the run when there is one (after a crash or a re-run with the same output
and name), and run the same number of steps on every rank so DDP never waits on a missing peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import ray
import ray.train
import torch

from bertray.config import BertConfig, PretrainConfig, from_mapping, to_mapping
from bertray.data.pipeline import TRAINER_COLUMNS, PipelineCounters, build_dataset, stream_spec
from bertray.data.sources import CorpusFile, preflight_layout, resolve_corpus
from bertray.data.vocabulary import run_tokenizer
from bertray.errors import ConfigError
from bertray.storage import absolute_url, exists, is_local, join_url, write_text
from bertray.train.checkpoints import (LATEST, RUN_STATE, RunState, load_run_state, load_training_state,
                                       resolve_checkpoint, save_training_checkpoint, set_rng_state)
from bertray.train.curves import BASELINES, HISTORY, write_run_curves
from bertray.train.metrics import IntervalMeter, MetricSinks, format_line
from bertray.train.optim import make_optimizer, warmup_linear_decay

log = logging.getLogger("bertray.train")

EVAL_SEED = 12345
FAULT_MARKER = ".fault_injected"


# --------------------------------------------------------------------------------------------
# Worker side


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: batch[k].to(device, non_blocking=True) for k in TRAINER_COLUMNS}
    for key in ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
                "next_sentence_labels"):
        out[key] = out[key].long()
    out["masked_lm_weights"] = out["masked_lm_weights"].float()
    return out


def evaluate(model: torch.nn.Module, batches: list[dict[str, np.ndarray]], device: torch.device,
             precision: str) -> dict[str, float]:
    """Held-out MLM/NSP loss and accuracy on fixed batches (same masks every time)."""
    model.eval()
    meter = IntervalMeter()
    with torch.no_grad(), _autocast(device, precision):
        for batch in batches:
            out = model(**_model_inputs({k: torch.from_numpy(v) for k, v in batch.items()}, device))
            meter.add(loss=out.loss.item(), mlm_loss=out.mlm_loss.item(), mlm_accuracy=_item(out.mlm_accuracy),
                      nsp_loss=_item(out.nsp_loss), nsp_accuracy=_item(out.nsp_accuracy))
    model.train()
    summary = meter.summary()
    return {f"eval_{k}": v for k, v in summary.items() if k in meter_keys()}


def meter_keys() -> tuple[str, ...]:
    return ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")


def _item(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _batches(shard: Any, batch_size: int, shuffle_buffer: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches mixed across NSP buffers: each buffer holds a few documents' instances, so without the
    local shuffle consecutive steps would train on the same few sources (and NSP swings with them)."""
    shuffle = dict(local_shuffle_buffer_size=max(shuffle_buffer, batch_size), local_shuffle_seed=seed) \
        if shuffle_buffer else {}
    return iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=4, **shuffle))


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker. Reads only `loop_config`; every rank runs the same number of steps."""
    from tokenizers import Tokenizer

    from bertray.model.heads import BertForPreTraining

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # our own line per report is enough
    cfg = from_mapping(PretrainConfig, loop_config["config"])
    tcfg = cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.scaling.cpu_affinity:
        os.sched_setaffinity(0, cfg.scaling.cpu_affinity)
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    run_url = loop_config["run_url"]
    tokenizer = Tokenizer.from_str(loop_config["tokenizer_json"])

    state = RunState(config=loop_config["config"])
    checkpoint = _resume_checkpoint(run_url)
    resumed, history = None, []
    torch.manual_seed(tcfg.seed)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model = BertForPreTraining.from_pretrained(directory)
            saved = load_run_state(directory)
            resumed = load_training_state(directory)
        state.step, state.sequences_seen = saved.step, saved.sequences_seen
        history = saved.history
        log.info("[rank %d] resuming at step %d from %s", rank, state.step, checkpoint.path)
    elif loop_config["init_from"]:
        model = BertForPreTraining.from_pretrained(loop_config["init_from"])
    else:
        model = BertForPreTraining(BertConfig.from_dict(loop_config["bert_config"]))
    model.to(device)
    optimizer = make_optimizer(model, tcfg.optimizer, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                               betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=tcfg.warmup, total_steps=tcfg.max_steps)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        set_rng_state(resumed["rng"])
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    train_model = torch.compile(ddp_model) if tcfg.compile else ddp_model

    start_step = state.step
    sinks = MetricSinks(cfg.run.name, rank, loop_config["tensorboard_dir"])
    eval_batches = loop_config["eval_batches"]
    meter = IntervalMeter()
    last: dict[str, Any] = {}
    phase_steps = tcfg.phase_steps()
    boundaries = np.cumsum(phase_steps).tolist()
    for phase_index, phase in enumerate(tcfg.phases):
        phase_end = boundaries[phase_index]
        if state.step >= phase_end:
            continue
        per_worker = phase.batch_size // world
        micro = tcfg.micro_batch_size or per_worker
        accumulation = per_worker // micro
        batches = _batches(ray.train.get_dataset_shard(f"train_{phase_index}"), micro, cfg.data.shuffle_buffer,
                           seed=tcfg.seed * 1000 + rank)
        if rank == 0:
            log.info("phase %d: steps %d-%d, sequence %d, P %d, global batch %d (%d workers x %d x %d accumulation)",
                     phase_index, state.step + 1, phase_end, phase.max_seq_len, phase.max_predictions_per_seq,
                     phase.batch_size, world, micro, accumulation)
        meter.reset()
        while state.step < phase_end:
            exhausted = False
            for micro_index in range(accumulation):
                waited = time.perf_counter()
                batch = next(batches, None)
                waited = time.perf_counter() - waited
                if batch is None:
                    exhausted = True
                    break
                inputs = _model_inputs(batch, device)
                sync = micro_index == accumulation - 1 or world == 1
                with (contextlib.nullcontext() if sync else ddp_model.no_sync()), _autocast(device, tcfg.precision):
                    out = train_model(**inputs)
                    (out.loss / accumulation).backward()
                meter.add_batch(micro, int(inputs["attention_mask"].sum()), waited)
                meter.add(loss=out.loss.item(), mlm_loss=out.mlm_loss.item(), mlm_accuracy=_item(out.mlm_accuracy),
                          nsp_loss=_item(out.nsp_loss), nsp_accuracy=_item(out.nsp_accuracy))
            if exhausted:
                log.warning("[rank %d] the corpus stream ended at step %d (train.corpus_passes=%d); "
                            "phase %d stops early", rank, state.step, tcfg.corpus_passes, phase_index)
                optimizer.zero_grad(set_to_none=True)
                break
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad_norm)
                         if tcfg.clip_grad_norm > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.sequences_seen += phase.batch_size
            meter.add(grad_norm=_item(grad_norm), learning_rate=scheduler.get_last_lr()[0])
            _maybe_inject_fault(tcfg.fail_at_step, state.step, rank, run_url)

            final = state.step == tcfg.max_steps or state.step == phase_end
            metrics: dict[str, Any] = {}
            if state.step % tcfg.log_every == 0 or final:
                metrics = {**meter.summary(world), "step": state.step, "phase": phase_index}
            if eval_batches and rank == 0 and (final or (tcfg.eval_every and state.step % tcfg.eval_every == 0)):
                metrics.update(evaluate(model, eval_batches, device, tcfg.precision))
            if metrics:
                if rank == 0:
                    log.info(format_line(state.step, tcfg.max_steps, metrics))
                    if any(k.startswith("eval_") for k in metrics):
                        log.info(format_line(state.step, tcfg.max_steps,
                                             {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")},
                                             prefix="eval"))
                sinks.emit(state.step, metrics)
                last.update(metrics)
                history.append({"step": state.step, **{k: v for k, v in metrics.items() if k != "step"}})
            save = final or state.step % tcfg.checkpoint_every == 0 or state.step in tcfg.save_at_steps
            if save:
                state.history = history
                _report_checkpoint(model, tokenizer, optimizer, scheduler, state, {**last, "step": state.step},
                                   rank, run_url, keep=state.step in tcfg.save_at_steps,
                                   baselines=loop_config["baselines"])
            elif metrics:
                ray.train.report({**last, "step": state.step})
        if exhausted:
            break
    sinks.close()
    return {**last, "step": state.step, "start_step": start_step, "sequences_seen": state.sequences_seen}


def _checkpoint_step(url: str) -> int:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("checkpoint_")
    return int(digits) if name.startswith("checkpoint_") and digits.isdigit() else -1


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
    if registered is not None and _checkpoint_step(registered.path) >= _checkpoint_step(pointed):
        return registered
    if not exists(join_url(pointed, RUN_STATE)):
        log.warning("%s names %s, which is incomplete; resuming from Ray's registered checkpoint",
                    join_url(run_url, LATEST), pointed)
        return registered
    path, filesystem = storage_for(pointed)
    return ray.train.Checkpoint(path=path, filesystem=filesystem)


def _maybe_inject_fault(fail_at_step: int | None, step: int, rank: int, run_url: str) -> None:
    """Crash rank 0 once at `fail_at_step` (a marker file in the run directory makes it once)."""
    if fail_at_step is None or step != fail_at_step or rank != 0:
        return
    marker = join_url(run_url, FAULT_MARKER)
    if exists(marker):
        return
    write_text(marker, f"crashed at step {step}\n")
    log.error("[rank 0] fault injection: crashing at step %d", step)
    os._exit(1)


def _report_checkpoint(model, tokenizer, optimizer, scheduler, state: RunState, metrics: dict[str, Any],
                       rank: int, run_url: str, keep: bool, baselines: dict[str, float]) -> None:
    """Every rank reports (report is a barrier); rank 0 attaches the checkpoint, moves `latest` and
    redraws the run's learning curves (history.json is every logged interval: Ray keeps only the
    metrics reported with checkpoints)."""
    name = f"checkpoint_{state.step:08d}"
    state.metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="bertray-ckpt-") as directory:
        save_training_checkpoint(directory, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                 scheduler=scheduler, run_state=state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name)
        if keep:
            fs, path = fsspec.core.url_to_fs(join_url(run_url, "kept", name))
            fs.put(directory.rstrip("/") + "/", path, recursive=True)
    write_text(join_url(run_url, LATEST), name + "\n")
    write_text(join_url(run_url, HISTORY), json.dumps(state.history, default=float) + "\n")
    try:
        write_run_curves(run_url, state.history, baselines)
    except Exception as exc:   # a picture must never cost a training run
        log.warning("could not draw %s/curves.png: %s: %s", run_url, type(exc).__name__, exc)


# --------------------------------------------------------------------------------------------
# Driver side


def storage_for(output: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for `ray.train.RunConfig` from a local path or fsspec URL."""
    fs, path = fsspec.core.url_to_fs(output)
    if is_local(fs):
        return os.path.abspath(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(fs))


@dataclass
class PretrainResult:
    metrics: dict[str, Any]              # rank 0's final metrics (the train function's return value)
    reported: dict[str, Any]             # what Ray Train recorded with the last checkpoint
    checkpoint: str | None
    counters: dict[str, int]
    elapsed_s: float
    baselines: dict[str, float]          # eval_mlm_baseline, eval_nsp_majority (see `eval_baselines`)


def _next_generation(run_url: str) -> int:
    """How many times this run's data stream was started before: 0 for a fresh run."""
    url = join_url(run_url, "data_generation")
    generation = 0
    if exists(url):
        fs, path = fsspec.core.url_to_fs(url)
        generation = int(fs.cat_file(path).decode().strip() or 0) + 1
    write_text(url, f"{generation}\n")
    return generation


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
    rows = build_dataset(files, spec).take_batch(size * cfg.train.eval_batches, batch_format="numpy")
    n = len(rows["input_ids"]) // size
    if n == 0:
        raise ConfigError(f"{source} gives fewer than {size} held-out sequences")
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


def _phase_dataset(files, data, phase, tokenizer_json: str, seed: int, passes: int, run_url: str, counters):
    """Built by Ray Train at every worker-group start: a restarted group (after a crash) gets a new
    `generation`, so it draws fresh pairs and masks instead of replaying the stream from its start."""
    spec = stream_spec(data, phase, tokenizer_json, seed=seed, generation=_next_generation(run_url), passes=passes)
    return build_dataset(files, spec, counters_actor=counters)


def run_pretraining(cfg: PretrainConfig, *, progress_bars: bool = False,
                    prepare_datasets: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> PretrainResult:
    """Run (or resume) pretraining as configured; returns the final metrics and checkpoint URL.

    `prepare_datasets` may replace the per-phase dataset factories (benchmarks/ingest.py feeds the
    same loop from memory to measure what the streaming pipeline costs)."""
    from ray.train.torch import TorchTrainer

    # Progress bars of several streaming operators interleave badly with the metric lines in job
    # logs; Train copies the driver's DataContext to the workers when the trainer is built.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.execution_options.preserve_order = cfg.data.preserve_order   # Train splits with this one

    started = time.perf_counter()
    run_url = join_url(absolute_url(cfg.run.output), cfg.run.name)
    files = resolve_corpus(cfg.data.corpus, storage_options=cfg.data.storage_options)
    log.info("corpus: %d file(s), %s bytes", len(files), f"{sum(f.size or 0 for f in files):,}")
    warning = preflight_layout(files, cfg.data.corpus_layout(), fmt=cfg.data.format,
                               storage_options=cfg.data.storage_options)
    if warning:
        log.warning(warning)
    tokenizer = run_tokenizer(cfg.data, files, run_url)
    bert_config = cfg.model.bert_config(tokenizer.get_vocab_size(), is_causal=cfg.data.objective == "ltr")
    tokenizer_json = tokenizer.to_str()
    evaluation = eval_batches(cfg, tokenizer_json, files)
    baselines = eval_baselines(evaluation)
    write_text(join_url(run_url, BASELINES), json.dumps(baselines) + "\n")
    counters = PipelineCounters.remote()
    datasets = {f"train_{i}": functools.partial(_phase_dataset, files, cfg.data, phase, tokenizer_json, cfg.train.seed,
                                                cfg.train.corpus_passes, run_url, counters)
                for i, phase in enumerate(cfg.train.phases)}
    if prepare_datasets is not None:
        datasets = prepare_datasets(datasets)

    storage_path, storage_fs = storage_for(cfg.run.output)
    tensorboard_dir = _tensorboard_dir(cfg, run_url) if cfg.run.tensorboard else None
    loop_config = {
        "config": to_mapping(cfg), "bert_config": bert_config.to_dict(), "tokenizer_json": tokenizer_json,
        "run_url": run_url, "eval_batches": evaluation, "baselines": baselines,
        "init_from": resolve_checkpoint(cfg.model.init_from) if cfg.model.init_from else None,
        "tensorboard_dir": tensorboard_dir,
    }
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})})
    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints))
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=datasets,
                           dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)))
    result = trainer.fit()
    checkpoint_url = None
    if result.checkpoint is not None:
        name = os.path.basename(result.checkpoint.path.rstrip("/"))
        write_text(join_url(run_url, LATEST), name + "\n")
        checkpoint_url = join_url(run_url, name)
    metrics = dict(result.return_value or result.metrics or {})
    return PretrainResult(metrics=metrics, reported=dict(result.metrics or {}), checkpoint=checkpoint_url,
                          counters=ray.get(counters.get.remote()), elapsed_s=time.perf_counter() - started,
                          baselines=baselines)


def _tensorboard_dir(cfg: PretrainConfig, run_url: str) -> str:
    """Event files go to the run directory when it is local; remote runs log to a local folder
    named after the run (TensorBoard's writer cannot append to object storage)."""
    fs, path = fsspec.core.url_to_fs(run_url)
    if is_local(fs):
        return os.path.join(os.path.abspath(path), "tensorboard")
    return os.path.join(tempfile.gettempdir(), "bertray-tensorboard", cfg.run.name)

