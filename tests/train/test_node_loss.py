"""Nodes lost mid-run on a real multi-node Ray (`ray.cluster_utils.Cluster`: four raylets on this
machine, the shape of the cluster files: a head with no CPUs, one trainer node whose custom
resource `fake_gpu` stands in for a GPU, two CPU-only data nodes; labelled as `ray_cluster.yaml`
labels them and placed by `data.node_labels` / `scaling.node_labels`).

- the data node that runs the tokenizer actor is removed as the stream starts, then the second
  data node too, so no data node is left: the run finishes, the stream goes on elsewhere and says
  so, and (data position in every checkpoint) no instance is skipped or trained twice;
- the tokenizer actor's node is removed while its object store holds blocks the trainer has not
  taken yet (blocks of hundreds of KB, in flight): no hang, and no instance lost or repeated;
- the trainer node is removed and a new one added: training resumes on the new node from the
  newest checkpoint, losing at most the steps since it; the tokenizer actors and read tasks ran
  only on data nodes, the Train workers only on trainer nodes (read from Ray's state API).

Each cluster runs in a subprocess (it needs a Ray of its own; the rest of the suite shares one)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys, threading, time
    from pathlib import Path

    import ray
    from ray._private.internal_api import node_stats
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from bertray.config import load_config
    from bertray.train.config import PretrainConfig
    from bertray.train.pretrain import run_pretraining

    corpus, output, events, passes = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    stream = json.loads(Path(sys.argv[5]).read_text())          # the stream's shape, as run_with_faults wrote it
    overrides = {k: v for k, v in stream.items() if "." in k}
    TRAINER = {"num_cpus": 2, "resources": {"fake_gpu": 1}, "labels": {"bertray-role": "trainer"}}
    DATA = {"num_cpus": 1, "labels": {"bertray-role": "data"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    roles = {}
    def add(role, args):
        node = cluster.add_node(**args)
        roles[node.node_id] = role
        return node
    nodes = {"trainer": [add("trainer", TRAINER)], "data": [add("data", DATA), add("data", DATA)]}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # A small object-store budget for the stream, so the data stages run only a little ahead of the
    # trainer and a node's loss catches blocks in flight (a big cluster's corpus dwarfs any budget).
    context.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=32 * 1024)

    cfg = load_config(PretrainConfig, "flows/configs/embedded.yaml", {
        "data.corpus": [corpus], "data.eval_corpus": [], "data.vocab_size": 2000, "data.layout": "wikitext",
        "data.docs_per_batch": 8, "data.shuffle_buffer": 32, "data.files_per_read_task": 1,
        "data.read_cpus": 0.25, "data.tokenizer_cpus": 0.5, "data.tokenizer_actors": 1,
        "data.node_labels": {"bertray-role": "data"},
        "train.max_steps": 10000, "train.log_every": 2, "train.eval_every": 0, "train.eval_batches": 1,
        "train.checkpoint_every": 4, "train.keep_checkpoints": 1000, "train.warmup_steps": 2,
        "train.corpus_passes": passes, "train.record_instances": True,
        "train.batch_wait_warn_s": 5, "train.batch_wait_fail_s": 15,
        "train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 8}],
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 0.5, "scaling.worker_resources": {"fake_gpu": 1},
        "scaling.node_labels": {"bertray-role": "trainer"},
        "run.output": str(output), "run.name": "node-loss", "run.max_failures": 3, "run.tensorboard": False,
        **overrides})

    def state(listing, **kw):
        """Ray's state API, retried: on a loaded machine a query can time out inside the GCS."""
        for attempt in range(30):
            try:
                return listing(address=cluster.address, limit=10000, detail=True, **kw)
            except Exception as exc:
                print("state API:", exc, flush=True)
                time.sleep(1)
        raise RuntimeError("the state API did not answer")

    def primary_copies(node):
        """The blocks in `node`'s shared object store that were made there and are still referenced
        (Ray keeps objects over 100 KiB there, smaller ones go inline to their owner)."""
        stats = node_stats(node.node_ip_address, node.node_manager_port, include_memory_info=False).store_stats
        return {"objects": stats.num_object_store_primary_copies, "bytes": stats.object_store_bytes_primary_copy}

    def actors(kind):
        """Actors of `kind`, alive or not: a tokenizer actor that has worked through a small corpus
        is gone, but the blocks it made stay in its node's object store until the trainer takes them."""
        return [a for a in state(list_actors) if kind in f"{a.class_name} {a.repr_name}" and a.node_id]

    def stream_started():
        """The tokenizer actor is up and a unit read has finished (its files are in the counters)."""
        return (any(a.state == "ALIVE" for a in actors("TokenizePairMask"))
                and any("read_units" in t.name for t in state(list_tasks, filters=[("state", "=", "FINISHED")])))

    def inject():
        """Each event waits until `latest` names its checkpoint (uploaded whole), or with `after` 0
        until the stream has started, then removes a node (the data node of the tokenizer actor, any
        data node left, or the trainer node) and may add one. With `holding`, the removal waits until
        the node's object store holds blocks of the stream that the trainer has not released yet."""
        latest = output / "node-loss" / "latest"
        for event in events:
            while not (latest.exists() and latest.read_text().strip() >= f"checkpoint_{event['after']:08d}"
                       or event["after"] == 0 and stream_started()):
                time.sleep(0.1)
            if event["remove"] == "tokenizer_node":
                held = {a.node_id for a in actors("TokenizePairMask") if a.state == "ALIVE"}
                held = held or {a.node_id for a in actors("TokenizePairMask")}
                doomed = next(n for n in nodes["data"] if n.node_id in held)
            else:
                doomed = nodes[event["remove"]][0]
            if event.get("holding"):
                deadline, stored = time.monotonic() + 120, primary_copies(doomed)
                while not stored["objects"] and time.monotonic() < deadline:
                    time.sleep(0.02)
                    stored = primary_copies(doomed)
                print("HELD", json.dumps(stored), flush=True)
            nodes[roles[doomed.node_id]].remove(doomed)
            cluster.remove_node(doomed)
            removed_at, before = time.monotonic(), latest.read_text().strip() if latest.exists() else ""
            print("REMOVED", json.dumps({"role": roles[doomed.node_id], "node": doomed.node_id,
                                         "latest": latest.read_text().strip() if latest.exists() else None}),
                  flush=True)
            if event.get("add"):
                node = add(event["add"], TRAINER if event["add"] == "trainer" else DATA)
                nodes[event["add"]].append(node)
                print("ADDED", json.dumps({"role": event["add"], "node": node.node_id}), flush=True)
        # the cost of the last loss: seconds until the run has written its next checkpoint
        while not (latest.exists() and latest.read_text().strip() > before):
            time.sleep(0.1)
        print("RECOVERED", json.dumps({"seconds": round(time.monotonic() - removed_at, 1),
                                       "checkpoint": latest.read_text().strip()}), flush=True)

    # Ray starts and stops raylets only from the main thread: the run goes in a thread of its own.
    outcome = []
    training = threading.Thread(target=lambda: outcome.append(run_pretraining(cfg)), daemon=True)
    training.start()
    inject()
    training.join()
    result = outcome[0]
    placement = {}
    for kind in ("TokenizePairMask", "RayTrainWorker"):
        placement[kind] = [[roles.get(a.node_id, "head"), a.node_id] for a in actors(kind)]
    for t in state(list_tasks):
        if (t.name.startswith("Read") or "read_units" in t.name) and t.node_id:   # plan and unit reads
            placement.setdefault("read task", []).append([roles.get(t.node_id, "head"), t.node_id])
    print("RESULT", json.dumps({"metrics": result.metrics, "counters": result.counters, "placement": placement},
                               default=float), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


def corpus(tmp_path: Path, files: int, chars: int) -> Path:
    text = (REPO / "samples/corpus/wikitext-2/wiki.valid.raw").read_text()
    articles = [a for a in text.split("\n = ") if len(a) > 400]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(files):
        chunk, n = [], i * 3
        while sum(map(len, chunk)) < chars:
            chunk.append(articles[n % len(articles)])
            n += 1
        (folder / f"part-{i:02d}.txt").write_text(" = " + "\n = ".join(chunk)[:chars] + "\n")
    return folder


# The stream of the tests: small files, one per unit, a few documents per buffer (blocks of a few KB,
# which Ray returns inline to their owner rather than through a node's object store).
SMALL_STREAM = {"files": 24, "chars": 5000, "data.docs_per_batch": 8, "data.files_per_read_task": 1}


def run_with_faults(tmp_path: Path, events: list[dict], stream: dict | None = None) -> tuple[dict, list[dict], str]:
    stream = stream or SMALL_STREAM
    folder = corpus(tmp_path, stream["files"], stream["chars"])
    (tmp_path / "stream.json").write_text(json.dumps(stream))     # read by the script and by trained_against_the_pass
    script = tmp_path / "node_loss.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "runs"), json.dumps(events), "1",
                           str(tmp_path / "stream.json")], cwd=REPO, capture_output=True, text=True, timeout=840)
    log = done.stdout + done.stderr
    (tmp_path / "run.log").write_text(log)       # kept under pytest's basetemp for a failed run
    assert done.returncode == 0, log[-8000:]
    assert "RESULT " in done.stdout, log[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    history = json.loads((tmp_path / "runs" / "node-loss" / "history.json").read_text())
    return result, history, log


def trained_against_the_pass(tmp_path: Path) -> tuple[Counter, Counter]:
    """(trained, every): the instances the run trained on (from its checkpoints' records) and every
    instance of the pass, computed without Ray from the same tokenizer and settings."""
    from tokenizers import Tokenizer

    from bertray.data.config import DataSection, PhaseConfig
    from bertray.data.pipeline import iter_local
    from bertray.data.stream_spec import PROVENANCE_COLUMNS, stream_spec
    from bertray.data.sources import resolve_corpus

    run = tmp_path / "runs" / "node-loss"
    parts = [dict(np.load(p)) for p in sorted(run.glob("checkpoint_[0-9]*/trained_instances.npz"))]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    folder = tmp_path / "corpus"
    tokenizer = Tokenizer.from_file(str(next(run.glob("checkpoint_[0-9]*")) / "tokenizer.json"))
    stream = json.loads((tmp_path / "stream.json").read_text())
    data = DataSection(corpus=(str(folder),), layout="wikitext", vocab_size=2000,
                       docs_per_batch=stream["data.docs_per_batch"],
                       files_per_read_task=stream["data.files_per_read_task"])
    spec = stream_spec(data, PhaseConfig(max_seq_len=64, max_predictions_per_seq=10, batch_size=8),
                       tokenizer.to_str(), seed=0, generation=0, passes=1)
    key = ("doc_id", "a_start", "a_end", "b_doc_id", "b_start", "b_end", "pass_index")
    every = Counter(t for part in iter_local(resolve_corpus(str(folder)), spec, columns=PROVENANCE_COLUMNS)
                    for t in zip(*(part[k].tolist() for k in key)))
    return Counter(zip(*(rows[k].tolist() for k in key))), every


def removals(log: str) -> list[dict]:
    return [json.loads(line.split("REMOVED ", 1)[1]) for line in log.splitlines() if line.startswith("REMOVED ")]


def recovery(log: str) -> dict:
    """Seconds from the last loss until the run wrote its next checkpoint (printed for the
    operations guide's table of recovery costs)."""
    found = json.loads(log.split("RECOVERED ", 1)[1].splitlines()[0])
    print("recovery:", found)
    return found


def roles_of(placement: dict, kind: str) -> set[str]:
    return {role for role, _ in placement.get(kind, [])}


def assert_every_instance_once(tmp_path: Path) -> None:
    trained, every = trained_against_the_pass(tmp_path)
    assert max(trained.values()) == 1                              # nothing twice
    assert not trained - every                                     # nothing that is not in the pass
    assert sum((every - trained).values()) < 2 * 8                 # nothing skipped but the stream's tail


def test_losing_the_data_nodes_mid_stream_loses_no_instance_and_the_stream_moves_on(tmp_path):
    """Both data nodes go while the stream starts, the one running the tokenizer actor first: Ray
    retries the lost read tasks; with no data node left the stages cannot be placed, the batch-wait
    watchdog fails the attempt with its diagnosis, and the restarted worker group (from scratch: no
    checkpoint was written yet) plans the stream on the trainer node (data.node_labels_fallback),
    saying so. Measured on 2 cores: about 2.5 minutes,
    two stalls of 45 s, every instance of the pass trained once."""
    result, history, log = run_with_faults(tmp_path, [{"after": 0, "remove": "tokenizer_node"},
                                                      {"after": 0, "remove": "data"}])
    assert [r["role"] for r in removals(log)] == ["data", "data"], removals(log)
    assert "DataStall" in log                                        # no silent hang: the watchdog named it
    assert "no live node with CPUs has the data labels (bertray-role=data)" in log   # the stream moved, and said so
    placement = result["placement"]
    assert roles_of(placement, "RayTrainWorker") == {"trainer"}
    assert roles_of(placement, "TokenizePairMask") == {"data", "trainer"}          # before and after the fallback
    assert result["counters"]["files"] > 24                          # the re-done reads show in the counters
    assert result["metrics"]["step"] >= 38
    assert recovery(log)["seconds"] > 0
    assert_every_instance_once(tmp_path)


def test_losing_the_trainer_node_resumes_on_a_new_one_from_the_newest_checkpoint(tmp_path):
    """The trainer node goes after checkpoint 8 and a new one joins: the worker group restarts on the
    new node from the newest checkpoint, redoing only the steps after it. Placement from Ray's state
    API: the tokenizer actors and read tasks ran only on data nodes, the Train workers only on the
    two trainer nodes, one after the other."""
    result, history, log = run_with_faults(tmp_path, [{"after": 8, "remove": "trainer", "add": "trainer"}])
    (removed,) = removals(log)
    assert removed["role"] == "trainer"
    resumed = result["metrics"]["start_step"]
    assert resumed >= int(removed["latest"].split("_")[1])           # from the newest checkpoint at the loss
    assert history[-1]["restarts"] == 1 and history[-1]["resumed_from_step"] == resumed
    logged = Counter(int(n) for n in re.findall(r"step (\d+)/10000 ", log))
    redone = sorted(step for step, times in logged.items() if times > 1)
    assert all(resumed < step <= resumed + 4 for step in redone), (resumed, redone)   # at most checkpoint_every
    placement = result["placement"]
    assert roles_of(placement, "TokenizePairMask") == {"data"} and roles_of(placement, "read task") == {"data"}
    assert roles_of(placement, "RayTrainWorker") == {"trainer"}
    assert len({node for _, node in placement["RayTrainWorker"]}) == 2       # the lost node, then the new one
    print("redone steps:", redone)
    assert recovery(log)["checkpoint"] > removed["latest"]
    assert_every_instance_once(tmp_path)


# Blocks of hundreds of KB, which live in the object store of the node that made them: four 40 KB
# files per unit, the whole unit in one buffer.
BIG_BLOCKS = {"files": 12, "chars": 40_000, "data.docs_per_batch": 256, "data.files_per_read_task": 4,
              "train.checkpoint_every": 20}


def test_losing_the_node_that_holds_blocks_in_flight_loses_no_instance(tmp_path):
    """After checkpoint 20, the tokenizer actor's node is removed at a moment its object store holds
    blocks of the stream that the trainer has not released (made there, in flight to the trainer):
    their primary copies go with the node. No hang (the batch-wait watchdog, the test's timeout) and
    no silent loss: every instance of the pass is trained once, however the blocks come back (Ray
    resubmits the tasks that made them or promotes a copy already pulled to the trainer's node, or
    the worker group restarts from the checkpoint)."""
    result, history, log = run_with_faults(tmp_path, [{"after": 20, "holding": True, "remove": "tokenizer_node"}],
                                           BIG_BLOCKS)
    held = json.loads(log.split("HELD ", 1)[1].splitlines()[0])
    assert held["objects"] > 0 and held["bytes"] > 100 * 1024, held
    (removed,) = removals(log)
    assert removed["role"] == "data" and removed["latest"] >= "checkpoint_00000020"
    assert result["metrics"]["step"] > 20
    print("in flight:", held, "restarts:", history[-1]["restarts"], "files read:", result["counters"]["files"],
          "recovery:", recovery(log), "Ray:", re.findall(r"Attempting to recover \d+ lost objects", log))
    assert_every_instance_once(tmp_path)
