"""Elastic training on a real multi-node Ray (`ray.cluster_utils.Cluster`, three raylets on this
machine): a node holding one of two Train workers is removed mid-run; the run goes on with one
worker, keeps the global batch, and trains on every instance of the pass once.

The cluster runs in a subprocess: it needs a Ray of its own, and the rest of the suite shares one."""

from __future__ import annotations

import json
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
    from ray.cluster_utils import Cluster

    from bertray.config import load_config
    from bertray.train.config import PretrainConfig
    from bertray.train.pretrain import run_pretraining

    corpus, output = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer_node": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False

    cfg = load_config(PretrainConfig, "flows/configs/embedded.yaml", {
        "data.corpus": [corpus], "data.eval_corpus": [], "data.vocab_size": 2000, "data.layout": "wikitext",
        "data.docs_per_batch": 16, "data.shuffle_buffer": 64, "data.read_cpus": 0.2, "data.tokenizer_cpus": 0.2,
        "train.max_steps": 10000, "train.log_every": 2, "train.eval_every": 0, "train.eval_batches": 1,
        "train.checkpoint_every": 4, "train.keep_checkpoints": 1000, "train.warmup_steps": 2,
        "train.corpus_passes": 1, "train.record_instances": True,
        "train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 8}],
        "scaling.num_workers": [1, 2], "scaling.cpus_per_worker": 0.4,
        "scaling.worker_resources": {"trainer_node": 1},
        "run.output": str(output), "run.name": "elastic", "run.max_failures": 3, "run.tensorboard": False})

    def remove_a_node():
        """Once `latest` names the step-8 checkpoint (uploaded whole), the node of one Train worker
        goes, as a lost machine does."""
        latest = output / "elastic" / "latest"
        while not (latest.exists() and latest.read_text().strip() >= "checkpoint_00000008"):
            time.sleep(0.1)
        workers = [a for a in ray.util.state.list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=1000)
                   if "RayTrainWorker" in a.class_name]
        doomed = next(n for n in nodes if n.node_id in {w.node_id for w in workers})
        cluster.remove_node(doomed)
        print("REMOVED", doomed.node_id, flush=True)

    threading.Thread(target=remove_a_node, daemon=True).start()
    result = run_pretraining(cfg)
    print("RESULT", json.dumps({"metrics": result.metrics, "counters": result.counters}, default=float), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


def test_a_lost_worker_node_shrinks_the_group_and_the_run_trains_every_instance_once(tmp_path):
    from tokenizers import Tokenizer

    from bertray.data.config import DataSection, PhaseConfig
    from bertray.data.pipeline import iter_local
    from bertray.data.stream_spec import PROVENANCE_COLUMNS, stream_spec
    from bertray.data.sources import resolve_corpus

    text = (REPO / "samples/corpus/wikitext-2/wiki.valid.raw").read_text()
    articles = [a for a in text.split("\n = ") if len(a) > 400][:64]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(16):
        (corpus / f"part-{i:02d}.txt").write_text(" = " + "\n = ".join(articles[i * 4:(i + 1) * 4])[:6000] + "\n")
    script = tmp_path / "elastic.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(corpus), str(tmp_path / "runs")], cwd=REPO,
                          capture_output=True, text=True, timeout=840)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "REMOVED" in done.stdout, log[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    run = tmp_path / "runs" / "elastic"
    history = json.loads((run / "history.json").read_text())
    workers = [h["workers"] for h in history if "workers" in h]
    assert workers[0] == 2 and workers[-1] == 1, workers          # two workers, then one after the loss
    assert result["metrics"]["start_step"] >= 8                   # resumed from the newest checkpoint
    # what the console line, the Ray metrics and the Grafana panel show of the loss
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] == 1
    assert history[-1]["resumed_from_step"] == result["metrics"]["start_step"]

    parts = [dict(np.load(p)) for p in sorted(run.glob("checkpoint_[0-9]*/trained_instances.npz"))]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    steps = Counter(rows["step"].tolist())
    assert set(steps.values()) == {8}                             # the global batch, before and after

    files = resolve_corpus(str(corpus))
    tokenizer = Tokenizer.from_file(str(run / "checkpoint_00000004" / "tokenizer.json"))
    data = DataSection(corpus=(str(corpus),), layout="wikitext", vocab_size=2000, docs_per_batch=16)
    spec = stream_spec(data, PhaseConfig(max_seq_len=64, max_predictions_per_seq=10, batch_size=8),
                       tokenizer.to_str(), seed=0, generation=0, passes=1)
    key = ("doc_id", "a_start", "a_end", "b_doc_id", "b_start", "b_end", "pass_index")
    every = Counter(t for part in iter_local(files, spec, columns=PROVENANCE_COLUMNS)
                    for t in zip(*(part[k].tolist() for k in key)))
    trained = Counter(zip(*(rows[k].tolist() for k in key)))
    assert max(trained.values()) == 1                              # nothing twice
    assert not trained - every                                     # nothing that is not in the pass
    assert sum((every - trained).values()) < 2 * 8                 # nothing skipped but the stream's tail
