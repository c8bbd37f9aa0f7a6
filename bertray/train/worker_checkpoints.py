"""Checkpoints on the worker side: the checkpoint a (re)started worker group resumes from, the
finite-loss check before one is written, and the report that hands it to Ray Train (every rank
reports; rank 0 attaches the checkpoint, moves `latest` once it is whole in storage and redraws
the run's curves). Runs inside the Ray Train workers (`bertray.train.worker_loop`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from typing import Any

import fsspec
import numpy as np
import ray
import ray.train

from bertray.errors import TrainingDiverged
from bertray.storage import exists, join_url, ray_storage, write_text
from bertray.train.checkpoints import (LATEST, RUN_STATE, RunState, checkpoint_step, resolve_checkpoint,
                                       save_training_checkpoint)
from bertray.train.curves import HISTORY, write_run_curves
from bertray.train.step import TrainStep

log = logging.getLogger("bertray.train")


def check_finite(step: TrainStep, at: int, run_url: str) -> None:
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


def resume_checkpoint(run_url: str) -> ray.train.Checkpoint | None:
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


TRAINED_INSTANCES = "trained_instances.npz"


def report_checkpoint(model, tokenizer, optimizer, scheduler, step: TrainStep, state: RunState, metrics: dict[str, Any],
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
