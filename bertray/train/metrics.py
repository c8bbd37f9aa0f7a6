"""Training metrics: running averages per log interval, throughput, data-wait share, and their
three sinks (Ray metrics for the dashboard/Grafana, TensorBoard event files, one printed line).

The data-wait share is the fraction of wall time a worker spent blocked on the next batch: when it
is high, the input pipeline starves the accelerator and more data CPUs (or nodes) are needed.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("bertray.train")

# Exported as Ray metrics (dashboard names get Ray's `ray_` prefix: ray_bertray_loss, ...).
GAUGES = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "learning_rate", "grad_norm",
          "sequences_per_s", "tokens_per_s", "data_wait_share", "skipped_steps", "step",
          "workers", "restarts", "resumed_from_step")   # the last three: what node losses did to the run


@dataclass
class IntervalMeter:
    """Sums over one log interval; `summary()` turns them into means and rates and resets."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sequences: int = 0
    tokens: int = 0
    wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, **values: float | None) -> None:
        for key, value in values.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def add_batch(self, sequences: int, tokens: int, wait_s: float) -> None:
        self.sequences += sequences
        self.tokens += tokens
        self.wait_s += wait_s

    def summary(self, world_size: int = 1) -> dict[str, float]:
        """Means of the interval; throughput scaled to the whole run (all workers alike)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {key: self.sums[key] / self.counts[key] for key in self.sums}
        out["sequences_per_s"] = self.sequences * world_size / elapsed
        out["tokens_per_s"] = self.tokens * world_size / elapsed
        out["data_wait_share"] = min(1.0, self.wait_s / elapsed)
        self.reset()
        return out

    def reset(self) -> None:
        self.sums, self.counts = {}, {}
        self.sequences = self.tokens = 0
        self.wait_s = 0.0
        self.started = time.perf_counter()


def summary_writer(logdir: str) -> Any:
    """A TensorBoard event writer: torch's when the `tensorboard` package is installed, otherwise
    tensorboardX's (same API and files), which Ray already installs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter(logdir)


class MetricSinks:
    """Ray metrics + TensorBoard + a log line. Created inside the worker (Ray metrics must be).

    Event files are written to `tensorboard_dir` on the worker's disk (TensorBoard's writers append,
    which object storage cannot); with `tensorboard_url`, `sync` copies them there."""

    def __init__(self, run_name: str, rank: int, tensorboard_dir: str | None, tensorboard_url: str | None = None) -> None:
        from ray.util.metrics import Gauge

        self.rank = rank
        self.tags = {"run": run_name, "rank": str(rank)}
        self.gauges = {name: Gauge(f"bertray_{name}", description=f"bertray pretraining {name.replace('_', ' ')}",
                                   tag_keys=("run", "rank")) for name in GAUGES}
        self.writer = summary_writer(tensorboard_dir) if tensorboard_dir and rank == 0 else None
        self.tensorboard_dir, self.tensorboard_url = tensorboard_dir, tensorboard_url

    def emit(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        for name, value in metrics.items():
            if name in self.gauges and isinstance(value, (int, float)):
                self.gauges[name].set(float(value), tags=self.tags)
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()

    def sync(self) -> None:
        """Copy the event files to `tensorboard_url` (at checkpoints and at the end); a failed copy
        is a warning, never the end of a run."""
        if self.writer is None or not self.tensorboard_url:
            return
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.tensorboard_url)
            fs.put(self.tensorboard_dir.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
        except Exception as exc:  # noqa: BLE001 - storage errors come in many types
            log.warning("could not copy TensorBoard events to %s: %s", self.tensorboard_url, exc)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sync()


def format_line(step: int, total: int, metrics: dict[str, Any], prefix: str = "step") -> str:
    """One concise progress line, e.g. `step 40/300 loss 7.21 mlm 6.52 (acc 0.081) nsp 0.69 ...`."""
    parts = [f"{prefix} {step}/{total}"]
    order = [("loss", "loss {:.4f}"), ("mlm_loss", "mlm {:.4f}"), ("mlm_accuracy", "mlm_acc {:.3f}"),
             ("nsp_loss", "nsp {:.4f}"), ("nsp_accuracy", "nsp_acc {:.3f}"), ("learning_rate", "lr {:.2e}"),
             ("grad_norm", "gnorm {:.2f}"), ("sequences_per_s", "{:.1f} seq/s"), ("tokens_per_s", "{:.0f} tok/s"),
             ("data_wait_share", "data-wait {:.1%}"), ("skipped_steps", "skipped {:.0f} (fp16 overflow)")]
    for key, fmt in order:
        if isinstance(metrics.get(key), (int, float)) and not (key == "skipped_steps" and not metrics[key]):
            parts.append(fmt.format(metrics[key]))
    return "  ".join(parts)
