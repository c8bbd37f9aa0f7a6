"""The whole chain: the embedded pretraining default -> its checkpoint -> fine-tuning on a GLUE dev set
beats the same architecture from random weights, in the same grid with the same seeds.

The checkpoint comes from a real run of `python flows/pretrain.py` (the embedded default, unchanged:
tiny model, WikiText-2 sample, 600 steps; only --output and --name point into a temporary folder),
started once per module as a subprocess with its own local Ray (`--address local`, RAY_ADDRESS
removed from its environment), so that it never joins the session's test cluster. It costs about
3.5 minutes on an otherwise idle 2-core machine and is the most expensive test of the folder.

The probe: the SST-2 sample (samples/glue, 4,000 training examples, full dev set), lr 3e-4, batch
32, one epoch, max length 64, seeds 0-2, both rows in one Tune sweep (`--random-init`). The embedded
run is reproducible (`data.preserve_order` and the shipped vocabulary: two runs gave identical
weights), and its checkpoint reached 61.6/54.7/61.5% dev accuracy while random init stayed at the
majority class (50.9%) in all trials. The assertions (best +5 points, mean +3 points) sit inside
that. Before the run was made reproducible, one of four runs gave a checkpoint that stayed at the
majority class too: what this tiny, briefly trained checkpoint gives is a head start, not a higher
ceiling (with two epochs or lr 1e-3 random init catches up, 70-74%; docs/benchmarks.md reports both).

Deselect with `-m "not slow"` for a quick run of the folder.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MAJORITY = 50.9


@pytest.fixture(scope="module")
def embedded_pretraining(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("pretrain")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "flows" / "pretrain.py"), "--address", "local",
                           "--output", str(out), "--name", "embedded", "--json", str(out / "summary.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"embedded pretraining: {time.perf_counter() - started:.0f} s")
    assert (out / "embedded" / "latest").is_file()
    return out / "embedded"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_embedded_pretraining_learns_beyond_the_frequency_baseline(embedded_pretraining):
    """Held-out MLM accuracy (fixed masks, WikiText-2 valid) against always guessing the most frequent
    token ("the", 5.44%). Measured after the 600 default steps: 9.03%. NSP is reported, not asserted:
    in this budget the tiny model still predicts the majority label (62.1%; see docs/benchmarks.md)."""
    summary = json.loads((embedded_pretraining.parent / "summary.json").read_text())
    print({k: v for k, v in summary.items() if k.startswith("eval_")})
    assert summary["steps"] == 600
    baseline, accuracy = summary["eval_mlm_baseline"], summary["eval_mlm_accuracy"]
    assert 0.03 < baseline < 0.09, summary
    assert accuracy >= baseline + 0.01 and accuracy >= 1.15 * baseline, summary   # ~2.5 standard errors
    assert 0.5 <= summary["eval_nsp_majority"] < 0.7 and summary["eval_nsp_accuracy"] > 0.4, summary


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_embedded_pretraining_transfers_to_sst2(embedded_pretraining, ray_cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_flow", REPO / "flows" / "finetune.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    out = tmp_path / "out"
    code = flow.main(["--init-from", str(embedded_pretraining), "--label", "embedded", "--random-init",
                      "--tasks", "sst2", "--lr", "3e-4", "--batch-size", "32", "--epochs", "1", "--restarts", "3",
                      "--max-seq-len", "64", "--output", str(out), "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO((out / "latest" / "results.csv").read_text())))
    scores = {"embedded": [], "random init": []}
    for r in rows:
        assert r["status"] == "OK"
        scores[r["row"]].append(float(r["score"]))
    assert len(scores["embedded"]) == len(scores["random init"]) == 3
    best_pretrained, best_random = max(scores["embedded"]), max(scores["random init"])
    mean_pretrained = sum(scores["embedded"]) / 3
    mean_random = sum(scores["random init"]) / 3
    report = f"pretrained {scores['embedded']} vs random init {scores['random init']}"
    assert best_pretrained >= best_random + 5.0, report         # the table's cells: best of the same grid
    assert mean_pretrained >= mean_random + 3.0, report         # and on average over the seeds
    assert best_pretrained >= MAJORITY + 5.0, report
    md = (out / "latest" / "results.md").read_text()
    assert "| embedded |" in md and "| random init |" in md
