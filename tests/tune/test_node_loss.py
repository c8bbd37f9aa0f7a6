"""A fine-tuning sweep on a real multi-node Ray (`ray.cluster_utils.Cluster`: a head with no CPUs
and two 1-CPU worker nodes, one trial each): the node of one running trial is removed, as a lost
machine is; Tune retries that trial on the node that is left (`max_failures`), and the results
table is complete. The cluster runs in a subprocess: it needs a Ray of its own."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys, threading, time

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from bertray.tune import sweep as ft

    checkpoint, samples, output = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True)

    def trials():
        """The running trials' actors (Ray's state API, retried: on a loaded machine a query can time out)."""
        for attempt in range(30):
            try:
                return [a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000)
                        if "ImplicitFunc" in a.class_name or "finetune_trial" in a.class_name]
            except Exception as exc:
                print("state API:", exc, flush=True)
                time.sleep(1)
        raise RuntimeError("the state API did not answer")

    def remove_a_trials_node():
        """Once both trials run (and have trained a few seconds: a trial is 8 epochs of 250 steps of
        the tiny model, about half a minute), the node of one of them goes."""
        while len(trials()) < 2:
            time.sleep(0.2)
        time.sleep(8)
        running = {a.node_id for a in trials()}
        doomed = next(n for n in nodes if n.node_id in running)
        cluster.remove_node(doomed)
        print("REMOVED", doomed.node_id, flush=True)

    threading.Thread(target=remove_a_trials_node, daemon=True).start()
    cfg = ft.FinetuneConfig(init_from=(checkpoint,), labels=("tiny",), tasks="sst2", data=samples,
                            learning_rates=(1e-3, 3e-4), batch_sizes=(16,), epochs=(8,), max_train_examples=4000,
                            max_eval_examples=48, max_seq_len=32, cpus_per_trial=1, max_failures=2,
                            output=output, save_models="none")
    sweep = ft.run_sweep(cfg, verbose=0)
    print("RESULT", json.dumps([{"status": r.status, "failures": r.failures, "lr": r.config["learning_rate"]}
                                for r in sweep.records]), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


def test_a_trial_whose_node_is_lost_is_retried_elsewhere_and_the_table_is_complete(tiny_checkpoint, samples,
                                                                                   tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), str(samples), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=840)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-8000:]
    assert "REMOVED" in done.stdout, log[-4000:]
    records = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert sorted(r["lr"] for r in records) == [3e-4, 1e-3]
    assert all(r["status"] == "OK" for r in records), records
    assert sorted(r["failures"] for r in records) == [0, 1], records       # the lost trial, retried once
    rows = list(csv.DictReader((out / "latest" / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "OK" and r["epoch"] == "8" for r in rows), rows
    assert "| tiny |" in (out / "latest" / "results.md").read_text()
