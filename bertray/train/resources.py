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

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from bertray.train.config import PretrainConfig
from bertray.errors import ConfigError
from bertray.labels import describe, matches

log = logging.getLogger(__name__)


class ResourceShortage(ConfigError):
    """The cluster cannot hold the run's Train workers and data stages at the same time."""


@dataclass(frozen=True)
class Demand:
    """One thing that must be placed on a single node."""

    what: str                       # e.g. "Train worker 2 of 2"
    resources: dict[str, float]
    selector: dict[str, str] = field(default_factory=dict)   # the node labels it needs (Ray's label selector)


def worker_resources(cfg: PretrainConfig) -> dict[str, float]:
    """What one Train worker reserves."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {}),
            **{k: float(v) for k, v in s.worker_resources.items()}}


def data_selector(cfg: PretrainConfig, labels: Sequence[Mapping[str, str]],
                  resources: Sequence[Mapping[str, float]], *, autoscaling: bool = False) -> dict[str, str]:
    """The label selector the data stages get on a cluster whose live nodes have `labels` (and
    `resources`): `data.node_labels`, or none when no node with CPUs has them, no autoscaler may
    add one (Ray's v2 autoscaler starts nodes for a pending label selector) and
    `data.node_labels_fallback` allows the stages to go elsewhere (said in a warning: a run whose
    data nodes are gone keeps going on the trainer nodes, slower, instead of waiting for them)."""
    wanted = dict(cfg.data.node_labels)
    if not wanted or any(matches(wanted, node) and res.get("CPU", 0) > 0 for node, res in zip(labels, resources)):
        return wanted
    if autoscaling:
        log.info("no data node (%s) is up yet: the autoscaler adds one for the data stages", describe(wanted))
        return wanted
    if cfg.data.node_labels_fallback:
        log.warning("no live node with CPUs has the data labels (%s): the data stages run on any node "
                    "(data.node_labels_fallback); they go back to data nodes at the next start of the workers",
                    describe(wanted))
        return {}
    return wanted


def run_demands(cfg: PretrainConfig, data_labels: Mapping[str, str] | None = None) -> list[Demand]:
    """The least the run needs at once: its Train workers, the tokenizer actors (one when the pool
    autoscales) and one read task, each with the node labels it is placed by (`data_labels`: the
    data stages' selector, `data.node_labels` unless given)."""
    worker = worker_resources(cfg)
    n = cfg.scaling.min_workers
    actors = max(1, cfg.data.tokenizer_actors)
    on_trainers = dict(cfg.scaling.node_labels)
    on_data = dict(cfg.data.node_labels if data_labels is None else data_labels)
    return ([Demand(f"Train worker {i + 1} of {n}", worker, on_trainers) for i in range(n)]
            + [Demand(f"tokenizer actor {i + 1} of {actors}", {"CPU": cfg.data.tokenizer_cpus}, on_data)
               for i in range(actors)]
            + [Demand("read task", {"CPU": cfg.data.read_cpus}, on_data)])


def place(demands: Sequence[Demand], nodes: Sequence[Mapping[str, float]],
          labels: Sequence[Mapping[str, str]] = ()) -> list[Demand]:
    """First-fit placement of `demands` (in order) on the nodes' total resources and `labels` (one
    mapping per node; none given: no labels anywhere); the ones that do not fit."""
    free = [dict(node) for node in nodes]
    labels = list(labels) or [{} for _ in nodes]
    unplaced = []
    for demand in demands:
        for node, node_labels in zip(free, labels):
            if matches(demand.selector, node_labels) and all(node.get(k, 0.0) >= v - 1e-9
                                                             for k, v in demand.resources.items()):
                for k, v in demand.resources.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            unplaced.append(demand)
    return unplaced


def _total(demands: Sequence[Demand], key: str) -> float:
    return sum(d.resources.get(key, 0.0) for d in demands)


def check_resources(cfg: PretrainConfig, nodes: Sequence[Mapping[str, float]],
                    labels: Sequence[Mapping[str, str]] = (), data_labels: Mapping[str, str] | None = None) -> None:
    """Raise `ResourceShortage` when the run's minimum cannot be placed on `nodes` (each node's total
    resources, e.g. {"CPU": 8, "GPU": 1}, and its `labels`); the message says what is short and
    which settings fix it."""
    demands = run_demands(cfg, data_labels)
    unplaced = place(demands, nodes, labels)
    if not unplaced:
        return
    labelled = [d for d in unplaced if d.selector]
    if labelled:
        d = labelled[0]
        fitting = sum(1 for n in (labels or [{} for _ in nodes]) if matches(d.selector, n))
        key = "scaling.node_labels" if d.what.startswith("Train") else "data.node_labels"
        raise ResourceShortage(
            f"the cluster cannot run this configuration: {d.what} needs a node with the labels {describe(d.selector)} "
            f"({key}) and {_node_text(d.resources)}; {fitting} live node(s) have those labels"
            f"{' but not the resources left' if fitting else ''}, and the run would wait forever. Start nodes with "
            f"those labels (ray start --labels, the node type's labels in the cluster config), or change {key}"
            + (" (data.node_labels_fallback: true runs the data stages anywhere when no data node is up)"
               if key == "data.node_labels" and not cfg.data.node_labels_fallback else "")
            + ". scaling.resource_check: warn starts anyway.")
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
