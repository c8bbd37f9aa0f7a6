"""Will the run fit on the cluster? Checked before anything starts, so a shortage is an error, not a hang.

Ray Train reserves its workers' resources first; Ray Data then places read tasks and tokenizer
actors in what is left, and a stage that can never be placed waits forever without a word (Ray
Data plans against the whole cluster, not against what Train holds). So the driver places the
run's minimum on paper first - every Train worker on one node each can hold, then the tokenizer
actors and one read task in what remains - and names the settings that fix a shortage.

A cluster with an autoscaler may grow to fit: there the check warns instead of failing, and the
batch-wait watchdog (`bertray.train.stall`) catches a pipeline that never starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from bertray.config import PretrainConfig
from bertray.errors import ConfigError


class ResourceShortage(ConfigError):
    """The cluster cannot hold the run's Train workers and data stages at the same time."""


@dataclass(frozen=True)
class Demand:
    """One thing that must be placed on a single node."""

    what: str                       # e.g. "Train worker 2 of 2"
    resources: dict[str, float]


def worker_resources(cfg: PretrainConfig) -> dict[str, float]:
    """What one Train worker reserves."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {}),
            **{k: float(v) for k, v in s.worker_resources.items()}}


def run_demands(cfg: PretrainConfig) -> list[Demand]:
    """The least the run needs at once: its Train workers, the tokenizer actors (one when the pool
    autoscales) and one read task."""
    worker = worker_resources(cfg)
    n = cfg.scaling.min_workers
    actors = max(1, cfg.data.tokenizer_actors)
    return ([Demand(f"Train worker {i + 1} of {n}", worker) for i in range(n)]
            + [Demand(f"tokenizer actor {i + 1} of {actors}", {"CPU": cfg.data.tokenizer_cpus}) for i in range(actors)]
            + [Demand("read task", {"CPU": cfg.data.read_cpus})])


def place(demands: Sequence[Demand], nodes: Sequence[Mapping[str, float]]) -> list[Demand]:
    """First-fit placement of `demands` (in order) on the nodes' total resources; the ones that do not fit."""
    free = [dict(node) for node in nodes]
    unplaced = []
    for demand in demands:
        for node in free:
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in demand.resources.items()):
                for k, v in demand.resources.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            unplaced.append(demand)
    return unplaced


def _total(demands: Sequence[Demand], key: str) -> float:
    return sum(d.resources.get(key, 0.0) for d in demands)


def check_resources(cfg: PretrainConfig, nodes: Sequence[Mapping[str, float]]) -> None:
    """Raise `ResourceShortage` when the run's minimum cannot be placed on `nodes` (each node's total
    resources, e.g. {"CPU": 8, "GPU": 1}); the message says what is short and which settings fix it."""
    demands = run_demands(cfg)
    unplaced = place(demands, nodes)
    if not unplaced:
        return
    s, d = cfg.scaling, cfg.data
    workers = [x for x in demands if x.what.startswith("Train")]
    data = [x for x in demands if not x.what.startswith("Train")]
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    actors = max(1, d.tokenizer_actors)
    lines = [
        f"the cluster cannot run this configuration: {', '.join(x.what for x in unplaced[:3])}"
        f"{' and more' if len(unplaced) > 3 else ''} would never be placed, and the run would wait forever.",
        f"  Train needs {s.min_workers} worker(s) x {s.cpus_per_worker:g} CPU"
        + (" + 1 GPU" if s.use_gpu else "")
        + "".join(f" + {v:g} {k}" for k, v in s.worker_resources.items())
        + f" (scaling.num_workers x scaling.cpus_per_worker{', scaling.use_gpu' if s.use_gpu else ''}"
        + (", scaling.worker_resources" if s.worker_resources else "") + "), each on one node"
        + (f" (nodes with them: {sum(1 for n in nodes if all(n.get(k, 0) for k in s.worker_resources))})"
           if s.worker_resources else "") + ";",
        f"  the data stages need at least {_total(data, 'CPU'):g} CPU at the same time: data.read_cpus "
        f"{d.read_cpus:g} + {actors} tokenizer actor(s) x data.tokenizer_cpus {d.tokenizer_cpus:g}"
        + (" (data.tokenizer_actors)" if d.tokenizer_actors else " (the autoscaling pool starts with one)") + ";",
        f"  in all {_total(demands, 'CPU'):g} CPU" + (f" and {_total(workers, 'GPU'):g} GPU" if s.use_gpu else "")
        + f"; the cluster has {have['CPU']:g} CPU" + (f" and {have['GPU']:g} GPU" if s.use_gpu else "")
        + f" on {len(nodes)} node(s) ({', '.join(_node_text(n) for n in nodes[:4])}{', ...' if len(nodes) > 4 else ''}).",
        "Lower scaling.num_workers or scaling.cpus_per_worker, lower data.tokenizer_cpus / data.read_cpus "
        "(fractions are fine), or add CPUs (--num-cpus for the embedded Ray, or nodes). "
        "scaling.resource_check: warn starts anyway.",
    ]
    raise ResourceShortage("\n".join(lines))


def _node_text(node: Mapping[str, float]) -> str:
    return " + ".join(f"{node[k]:g} {k}" for k in ("CPU", "GPU") if node.get(k)) or "no CPU"
