"""Which fine-tuned models a sweep keeps, and where they go.

Every trial of a sweep that saves models writes its model into its Tune checkpoint (under
`model/`, beside the prediction files), because no trial knows whether it will win. What
survives depends on `save_models`:

    none      trials save no model; no `<sweep>/models/` is made
    winners   per (checkpoint row, task) the winner's model moves to `<sweep>/models/<row>/<task>/`
              (<sweep>: the sweep's own folder under its output); every other
              trial's model is deleted, most of them while the sweep still runs (`RunningBest`)
    all       as winners, and every trial's model moves to `<sweep>/models/<row>/<task>/trials/<trial id>/`

The winner is the results table's (`results.select_best`). Models move with the file system of
the output (fsspec): a rename on a local disk, copies then deletes in object storage. No model is
left inside Tune's trial directories (`<output>/tune/`) once the sweep is done.

A winner that ASHA stopped before its last epoch has no model (trials attach their files to the
last epoch's report only), exactly as it has no prediction files; that (row, task) gets no folder
and the sweep logs why.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence, get_args

import fsspec

from bertray.storage import is_local
from bertray.tune import export
from bertray.tune.results import FAILED, TrialRecord, slug
from bertray.tune.trainer import MODEL_DIR, trial_spec

log = logging.getLogger("bertray.tune")

SaveMode = Literal["none", "winners", "all"]
SAVE_MODES = get_args(SaveMode)
Group = tuple[str, str]          # (row label, task)


def model_folder(root: str, row: str, task: str) -> str:
    """`<root>/models/<row>/<task>`: where the winner of (row, task) goes (`root`: the output's path)."""
    return f"{root.rstrip('/')}/models/{slug(row)}/{task}"


def trial_folder(root: str, row: str, task: str, trial_id: str) -> str:
    return f"{model_folder(root, row, task)}/trials/{trial_id}"


@dataclass
class RunningBest:
    """The best score so far per (row, task), and the saved models that could still win.

    `offer` takes a finished trial and returns the checkpoints whose models can be deleted now:
    those below the running best can no longer be the winner, whatever finishes later. Ties are
    kept, because the results table breaks them by trial order, not by finishing order."""

    best: dict[Group, float] = field(default_factory=dict)
    kept: dict[Group, list[tuple[float, str]]] = field(default_factory=dict)

    def offer(self, group: Group, score: float | None, checkpoint: str | None) -> list[str]:
        if score is None:                                   # no score: it cannot win
            return [checkpoint] if checkpoint else []
        best = self.best.get(group)
        if best is not None and score < best:
            return [checkpoint] if checkpoint else []
        self.best[group] = score
        kept = self.kept.setdefault(group, [])
        drop = [path for s, path in kept if s < score]
        kept[:] = [(s, path) for s, path in kept if s >= score]
        if checkpoint:
            kept.append((score, checkpoint))
        return drop


def drop_model(fs: fsspec.AbstractFileSystem, checkpoint: str) -> bool:
    """Delete the model inside a trial's checkpoint directory; False when there was none."""
    path = posixpath.join(checkpoint, MODEL_DIR)
    if not fs.exists(path):
        return False
    fs.rm(path, recursive=True)
    return True


def _move_tree(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move the folder `source` to `target` (which must not exist): a rename on a local disk,
    copies (server-side in object storage) and then a delete elsewhere."""
    if is_local(fs):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)
        return
    _copy_tree(fs, source, target)
    fs.rm(source, recursive=True)


def _copy_tree(fs: fsspec.AbstractFileSystem, source: str, target: str, *, skip: str | None = None) -> None:
    """Copy every file under `source` to the same relative path under `target` (except the
    subfolder `skip`)."""
    source = source.rstrip("/")
    fs.makedirs(target, exist_ok=True)
    for path in sorted(fs.find(source)):
        relative = path[len(source):].lstrip("/")
        if skip and (relative == skip or relative.startswith(skip + "/")):
            continue
        if "/" in relative:
            fs.makedirs(posixpath.join(target, posixpath.dirname(relative)), exist_ok=True)
        fs.copy(path, posixpath.join(target, relative))


def _write_card(fs: fsspec.AbstractFileSystem, folder: str, record: TrialRecord, settings: Mapping[str, Any],
                selection: str) -> None:
    spec = trial_spec(record.task, settings.get("card"))       # your own task: its card travels in the settings
    text = export.model_card(spec, settings, record.metrics, row=record.row,
                             trial_id=record.trial_id, selection=selection)
    with fs.open(posixpath.join(folder, export.CARD_NAME), "w", encoding="utf-8") as f:
        f.write(text)


def _selection(record: TrialRecord, members: Sequence[TrialRecord], winner: bool) -> str:
    failed = sum(r.status == FAILED for r in members)
    of = f"{len(members)} trial{'s' if len(members) != 1 else ''}" + (f", {failed} failed" if failed else "")
    return f"the best of {of}" if winner else f"one of {of}, not the winner"


def keep_models(output: str, mode: str, records: Sequence[TrialRecord], best: Mapping[Group, TrialRecord],
                checkpoints: Mapping[str, str | None], settings: Mapping[str, Mapping[str, Any]]
                ) -> dict[Group, str]:
    """Move the models `mode` keeps out of the trials' checkpoints and delete the rest.

    `output`: the sweep's output (local path or fsspec URL); `checkpoints`: trial id -> its Tune
    checkpoint path on the output's file system (None: the trial attached none); `settings`: trial
    id -> its `TrialConfig` fields (for the model cards). Returns (row, task) -> the winner's
    folder and sets `record.model` on every record whose model was kept (a winner's: the winner's
    folder, not its copy under trials/)."""
    if mode not in SAVE_MODES:
        raise ValueError(f"save_models: {mode!r} is not one of {', '.join(SAVE_MODES)}")
    if mode == "none":                    # the trials saved nothing
        return {}
    fs, root = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()                 # the trials wrote through other processes' clients
    root = root.rstrip("/")

    def url(path: str) -> str:
        return path if is_local(fs) else fs.unstrip_protocol(path)

    groups: dict[Group, list[TrialRecord]] = {}
    for record in records:
        groups.setdefault((record.row, record.task), []).append(record)
    out: dict[Group, str] = {}
    for (row, task), members in groups.items():
        try:
            folder = _keep_group(fs, root, mode, members, best.get((row, task)), checkpoints, settings)
        except OSError as exc:            # the results are still written; the models of this task are not
            log.warning("%s / %s: could not keep the models (%s: %s); they may remain under tune/", row, task,
                        type(exc).__name__, exc)
            continue
        for record in members:            # their folders under trials/ (mode all)
            if record.model is not None:
                record.model = url(record.model)
        if folder is not None:
            out[(row, task)] = best[(row, task)].model = url(folder)
    return out


def _keep_group(fs: fsspec.AbstractFileSystem, root: str, mode: str, members: Sequence[TrialRecord],
                winner: TrialRecord | None, checkpoints: Mapping[str, str | None],
                settings: Mapping[str, Mapping[str, Any]]) -> str | None:
    """`keep_models` for the trials of one (row, task); the winner's folder, None when it has no model."""
    row, task = members[0].row, members[0].task
    folder = model_folder(root, row, task)
    if fs.exists(folder):                 # an earlier sweep's into the same output
        fs.rm(folder, recursive=True)
    kept = None
    for record in members:
        checkpoint = checkpoints.get(record.trial_id)
        if not checkpoint or not fs.exists(posixpath.join(checkpoint, MODEL_DIR)):
            continue
        source = posixpath.join(checkpoint, MODEL_DIR)
        is_winner = record is winner
        if mode == "all":
            target = trial_folder(root, row, task, record.trial_id)
            _move_tree(fs, source, target)
            _write_card(fs, target, record, settings.get(record.trial_id, {}), _selection(record, members, is_winner))
            record.model = target
            if is_winner:
                _copy_tree(fs, target, folder)
        elif is_winner:
            _move_tree(fs, source, folder)
        else:
            drop_model(fs, checkpoint)
            continue
        if is_winner:
            _write_card(fs, folder, record, settings.get(record.trial_id, {}), _selection(record, members, True))
            kept = folder
    if winner is not None and kept is None:
        reason = ("it stopped before its last epoch (ASHA)" if winner.metrics.get("epoch", 0)
                  < (winner.config.get("epochs") or 0) else "its trial saved none")
        log.warning("no model kept for %s / %s: the winning trial %s has none (%s)", row, task, winner.trial_id,
                    reason)
    return kept


__all__ = ["SAVE_MODES", "RunningBest", "drop_model", "keep_models", "model_folder", "trial_folder"]
