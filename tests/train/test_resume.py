"""Exact resume on a real local Ray: the data position in every checkpoint, nothing skipped or
repeated across crashes, the same batches bit for bit with `data.preserve_order`, and the guards
around a resume (one writer, one configuration, no code from the bucket, no diverged checkpoint)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bertray.config import load_config
from bertray.train.config import PretrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "flows" / "configs" / "embedded.yaml"
INSTANCE = ("doc_id", "a_start", "a_end", "b_doc_id", "b_start", "b_end", "pass_index")


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> Path:
    """24 files of a few WikiText articles each: enough units that a one-pass run crosses many of them."""
    text = (REPO / "samples/corpus/wikitext-2/wiki.valid.raw").read_text()
    articles = [a for a in text.split("\n = ") if len(a) > 400][:96]
    folder = tmp_path_factory.mktemp("many-small-files")
    for i in range(24):
        body = "\n = ".join(articles[i * 4:(i + 1) * 4])[:6000]
        (folder / f"part-{i:02d}.txt").write_text(" = " + body + "\n")
    return folder


def config(output: Path, corpus: Path, name: str | None = None, **overrides) -> PretrainConfig:
    base = {
        "data.corpus": [str(corpus)], "data.eval_corpus": [], "data.vocab_size": 2000, "data.layout": "wikitext",
        "data.docs_per_batch": 16, "data.shuffle_buffer": 64, "train.max_steps": 10_000, "train.log_every": 10,
        "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 4, "train.keep_checkpoints": 1000,
        "train.warmup_steps": 2, "train.corpus_passes": 1, "train.record_instances": True,
        "train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 8}],
        "run.output": str(output), "run.name": name or f"r-{uuid.uuid4().hex[:8]}", "run.tensorboard": False,
    }
    return load_config(PretrainConfig, EMBEDDED, {**base, **overrides})


def trained(run: Path) -> dict[str, np.ndarray]:
    """Every row the run's checkpoints say was trained (steps lost to a crash are in none of them)."""
    parts = [dict(np.load(p)) for p in sorted(run.glob("checkpoint_*/trained_instances.npz"))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def instances(rows: dict[str, np.ndarray]) -> Counter:
    return Counter(zip(*(rows[k].tolist() for k in INSTANCE)))


def test_a_one_pass_run_crashed_three_times_trains_on_every_instance_once(ray_cluster, tmp_path, small_files):
    """Crashes at steps 5, 14 and 23 (checkpoints every 4), each resumed from the newest checkpoint:
    the instances the final model was trained on are those of the uninterrupted run, each once, up
    to the rows left over at the end of the stream (fewer than a batch per run). This fails on the
    code before data positions, where each restart drew a fresh generation of pairs from pass 0.
    Measured there with the same corpus and settings (it could inject one crash only: step 14,
    resumed from step 12): the uninterrupted run trained 74 steps, the crashed one 89, its first
    12 steps' documents (96 sequences, 16% of the pass) read again under new pairs and masks, so
    the multisets differ in almost every instance."""
    from bertray.train.pretrain import run_pretraining

    plain = run_pretraining(config(tmp_path, small_files, "plain"))
    run_pretraining(config(tmp_path, small_files, "crashed", **{
        "train.fail_at_step": [5, 14, 23], "run.max_failures": 3}))
    marker = (tmp_path / "crashed" / ".fault_injected").read_text()
    assert marker.count("crashed at step") == 3
    assert plain.metrics["step"] > 30                       # the stream ran out, not max_steps
    reference, resumed = instances(trained(tmp_path / "plain")), instances(trained(tmp_path / "crashed"))
    assert max(resumed.values()) == 1 and max(reference.values()) == 1
    batch = 8
    assert sum(reference.values()) == plain.metrics["step"] * batch
    missing, extra = reference - resumed, resumed - reference
    assert sum(missing.values()) < batch and sum(extra.values()) < batch, (missing, extra)

    state = json.loads((tmp_path / "crashed" / "checkpoint_00000004" / "bertray_state.json").read_text())
    position = state["data_position"]
    assert position["layout"]["files"] == 24 and position["phase"] == 0
    assert len(json.dumps(position)) < 4000


def test_preserve_order_resumes_with_the_same_batches_bit_for_bit(ray_cluster, tmp_path, small_files):
    """One worker, `data.preserve_order`: a crash at step 7 resumes from the step-4 checkpoint and
    every step, before and after the crash, trains on the same sequences (ids, segments, masks,
    labels) in the same order as the uninterrupted run."""
    from bertray.train.pretrain import run_pretraining

    overrides = {"data.preserve_order": True, "train.max_steps": 16}
    run_pretraining(config(tmp_path, small_files, "plain", **overrides))
    run_pretraining(config(tmp_path, small_files, "crashed", **overrides,
                           **{"train.fail_at_step": 7, "run.max_failures": 1}))
    a, b = trained(tmp_path / "plain"), trained(tmp_path / "crashed")
    assert (tmp_path / "crashed" / ".fault_injected").exists()
    assert a["step"].tolist() == b["step"].tolist() == np.repeat(np.arange(1, 17), 8).tolist()
    assert a["digest"].tolist() == b["digest"].tolist()


def test_resume_guards(ray_cluster, tmp_path, small_files, capsys):
    """A second writer, a changed model on resume, a truncated `model.init_from`, `latest` pointing
    outside the run, and a planted pickle payload are each refused before anything trains, with a message that says what to do."""
    from bertray.errors import CheckpointError
    from bertray.train.lease import RunLease, RunLeaseError
    from bertray.train.pretrain import run_pretraining

    cfg = config(tmp_path, small_files, "guarded", **{"train.max_steps": 4, "train.record_instances": False})
    run_pretraining(cfg)
    run = tmp_path / "guarded"
    spec = importlib.util.spec_from_file_location("pretrain_flow", REPO / "flows" / "pretrain.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    capsys.readouterr()
    assert flow.main(["--data-position", str(run)]) == 0
    assert re.search(r"step 4, 32 sequences; phase 0, pass 0: \d+\.\d% of the pass read", capsys.readouterr().out)

    with RunLease.acquire(str(run)):
        with pytest.raises(RunLeaseError, match="run.name"):
            run_pretraining(cfg)

    changed = config(tmp_path, small_files, "guarded", **{"train.max_steps": 8, "model.preset": "mini"})
    with pytest.raises(CheckpointError, match="model.preset: 'tiny' -> 'mini'.*allow_config_change model.preset"):
        run_pretraining(changed)

    broken = tmp_path / "broken-init"             # a start from a checkpoint cut short: named before workers start
    shutil.copytree(run / "checkpoint_00000004", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"broken-init/model.safetensors is truncated"):
        run_pretraining(config(tmp_path, small_files, "from-broken", **{"model.init_from": str(broken)}))
    assert not (tmp_path / "from-broken" / "latest").exists()

    (run / "latest").write_text("../elsewhere/checkpoint_00000004\n")
    with pytest.raises(CheckpointError, match="latest"):
        run_pretraining(cfg)
    (run / "latest").write_text("checkpoint_00000004\n")

    proof = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(proof), "w"))

    torch.save({"optimizer": Payload()}, run / "checkpoint_00000004" / "training_state.pt", pickle_module=pickle)
    resumed = config(tmp_path, small_files, "guarded", **{"train.max_steps": 6, "train.record_instances": False,
                                                          "run.max_failures": 0})
    with pytest.raises(Exception, match="CheckpointError|refused"):
        run_pretraining(resumed)
    assert not proof.exists()


def test_the_console_has_one_line_per_report_not_ray_trains_dump(ray_cluster, tmp_path, small_files, capfd):
    """Ray Train logs each report's whole metrics dict ("Reporting training result N:
    TrainingReport(...)"); the workers silence it, their own metric line says the same."""
    import time

    from bertray.train.pretrain import run_pretraining

    run_pretraining(config(tmp_path, small_files, "quiet", **{"train.max_steps": 4, "train.log_every": 2,
                                                             "train.record_instances": False}))
    out = ""
    for _ in range(50):                 # worker output reaches the driver through Ray's log monitor
        out += "".join(capfd.readouterr())
        if "step 4/4" in out:
            break
        time.sleep(0.2)
    time.sleep(2)
    out += "".join(capfd.readouterr())
    assert "step 2/4" in out and "step 4/4" in out
    assert "Reporting training result" not in out


def test_a_non_finite_loss_stops_the_run_before_it_saves(ray_cluster, tmp_path, small_files):
    from bertray.train.pretrain import run_pretraining

    cfg = config(tmp_path, small_files, "diverged", **{"train.max_steps": 12, "train.nan_at_step": 6,
                                                       "run.max_failures": 0, "train.record_instances": False})
    with pytest.raises(Exception, match="non-finite.*checkpoint_00000004"):
        run_pretraining(cfg)
    run = tmp_path / "diverged"
    assert sorted(p.name for p in run.glob("checkpoint_[0-9]*")) == ["checkpoint_00000004"]
    assert (run / "latest").read_text().strip() == "checkpoint_00000004"
