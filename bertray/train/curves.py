"""Learning curves of pretraining runs as one PNG, so a run can be judged from its directory (local
or object storage) without TensorBoard or a notebook, and several runs (ablations) side by side.

matplotlib is imported only when drawing (workers that never draw do not pay for the import), and
only through the Agg canvas, never pyplot: that works on headless workers and leaves no figures
behind in a process-wide registry. It is a core dependency; an environment that lacks it anyway
gets a warning and no picture, never a failed run.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Sequence

import fsspec

from bertray.storage import exists, join_url

log = logging.getLogger("bertray.train")

HISTORY = "history.json"
BASELINES = "eval_baselines.json"
CURVES = "curves.png"
INSTALL_HINT = "pip install matplotlib"

# (title, train key, held-out metric, baseline); held-out keys are `{prefix}_{metric}` for each
# evaluation set (`EVAL_SETS`); a key no interval has is simply not drawn.
PANELS = (
    ("loss", "loss", "loss", None),
    ("MLM accuracy", "mlm_accuracy", "mlm_accuracy", "mlm_baseline"),
    ("NSP accuracy", "nsp_accuracy", "nsp_accuracy", "nsp_majority"),
    ("learning rate", "learning_rate", None, None),
    ("sequences / s", "sequences_per_s", None, None),
    ("data wait (% of time)", "data_wait_share", None, None),
)
PARTS = {"loss": (("mlm_loss", "MLM", "-"), ("nsp_loss", "NSP", ":"))}   # thin lines under the total
BASELINE_NAMES = {"mlm_baseline": "most-frequent token", "nsp_majority": "majority class"}
# prefix -> (line style, marker, what it is when a run has both sets); `eval` alone is "held-out".
EVAL_SETS = {"eval": ("-.", "o", "held-out files"), "heldout": (":", "s", "held-out documents")}
PERCENT = {"data_wait_share"}


@dataclass(frozen=True)
class RunCurves:
    label: str
    history: list[dict]
    baselines: dict[str, float] = field(default_factory=dict)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of the intervals that have `key`: eval runs only every few intervals, NSP not
    at all in the MLM-only ablation, and a NaN loss must not wreck the axis scale."""
    scale = 100.0 if key in PERCENT else 1.0
    points = sorted((e["step"], e[key] * scale) for e in history
                    if isinstance(e, dict) and _number(e.get("step")) and _number(e.get(key)))
    return [p[0] for p in points], [p[1] for p in points]


def _figure(runs: Sequence[RunCurves]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"drawing learning curves needs matplotlib: {INSTALL_HINT}") from exc
    if not runs:
        raise ValueError("no runs to plot")
    fig = Figure(figsize=(13, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, key, eval_metric, base_metric) in zip(fig.subplots(2, 3).ravel(), PANELS):
        for i, run in enumerate(runs):
            style = {"color": f"C{i % 10}"}
            name = f"{run.label} " if len(runs) > 1 else ""
            xs, ys = _series(run.history, key)
            if xs:
                ax.plot(xs, ys, lw=1.6, label=f"{name}train", **style)
            for part, part_name, ls in PARTS.get(key, ()):
                xs, ys = _series(run.history, part)
                if xs:
                    ax.plot(xs, ys, lw=0.8, ls=ls, alpha=0.7, label=f"{name}{part_name} (train)", **style)
            both = any(k.startswith("heldout_") for k in run.baselines)
            for prefix, (ls, marker, described) in EVAL_SETS.items():
                which = described if both else "held-out"
                xs, ys = _series(run.history, f"{prefix}_{eval_metric}") if eval_metric else ([], [])
                if xs:
                    ax.plot(xs, ys, lw=1.2, ls=ls, marker=marker, ms=3.5, label=f"{name}{which}", **style)
                base = run.baselines.get(f"{prefix}_{base_metric}") if base_metric else None
                if _number(base):
                    ax.axhline(base, lw=1, ls="--" if prefix == "eval" else ":", **style,
                               label=f"{name}{which + ': ' if both else ''}{BASELINE_NAMES[base_metric]} {base:.3f}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
        elif not ax.get_lines():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    return fig


def plot_runs(runs: Sequence[RunCurves], path_or_file: str | os.PathLike | BinaryIO) -> None:
    """One colour per run on shared axes. Rendered in memory first, so a failure leaves no truncated
    PNG behind; a path may also be an fsspec URL (the run directory's own storage)."""
    buffer = io.BytesIO()
    _figure(runs).savefig(buffer, format="png")
    if hasattr(path_or_file, "write"):
        path_or_file.write(buffer.getvalue())
        return
    fs, path = fsspec.core.url_to_fs(os.fspath(path_or_file))
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())


def _read_json(url: str) -> Any:
    try:
        with fsspec.open(url, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not valid JSON: {exc}") from None


def _label(run_url: str) -> str:
    return fsspec.core.url_to_fs(run_url)[1].rstrip("/").rsplit("/", 1)[-1] or run_url


def load_run(run_url: str) -> RunCurves:
    """A run's curves as its directory holds them; the baselines file is optional (runs without a
    held-out corpus have none)."""
    if not exists(run_url):
        raise FileNotFoundError(f"{run_url}: no such run directory")
    history_url = join_url(run_url, HISTORY)
    if not exists(history_url):
        raise FileNotFoundError(f"{history_url}: no such file (has the run logged an interval yet?)")
    history = _read_json(history_url)
    if not isinstance(history, list):
        raise ValueError(f"{history_url} should be a JSON list of intervals, got {type(history).__name__}")
    bad = next((i for i, e in enumerate(history) if not isinstance(e, dict)), None)
    if bad is not None:
        raise ValueError(f"{history_url}: interval {bad} is {type(history[bad]).__name__}, not an object")
    if not history:
        raise ValueError(f"{history_url} holds no logged intervals yet")
    baselines_url = join_url(run_url, BASELINES)
    baselines = _read_json(baselines_url) if exists(baselines_url) else {}
    if not isinstance(baselines, dict):
        raise ValueError(f"{baselines_url} should be a JSON object, got {type(baselines).__name__}")
    return RunCurves(_label(run_url), history, baselines)


@functools.lru_cache(maxsize=1)
def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no curves.png for this run (%s)", INSTALL_HINT)
        return False
    return True


def write_run_curves(run_url: str, history: list[dict], baselines: dict[str, float] | None) -> bool:
    """Safe to call at every checkpoint: without matplotlib it warns once per process and returns
    False, so training never depends on the optional extra."""
    if not _matplotlib_available():
        return False
    plot_runs([RunCurves(_label(run_url), list(history), dict(baselines or {}))], join_url(run_url, CURVES))
    return True
