"""Pretraining on a real local Ray cluster: the embedded default, 2 workers, resume, a crash across
phases, ablations, metrics sinks. Small models and step counts; real corpus and Ray. (Checkpoints in
object storage: test_init_from.py; exact resume across crashes: test_resume.py.)"""

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from bertray.config import load_config
from bertray.train.config import PretrainConfig
from bertray.train.checkpoints import load_run_state, load_training_state, resolve_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "flows" / "configs" / "embedded.yaml"


def small_config(output: str, name: str | None = None, **overrides) -> PretrainConfig:
    """The embedded default, shrunk: a smaller vocabulary, short runs, frequent checkpoints."""
    base = {
        "data.corpus": [str(REPO / "samples/corpus/wikitext-2/wiki.valid.raw")],
        "data.eval_corpus": [], "data.vocab_size": 2000, "train.max_steps": 12, "train.log_every": 4, "train.eval_every": 0,
        "train.eval_batches": 2, "train.checkpoint_every": 6, "train.warmup_steps": 2, "train.corpus_passes": 2,
        "train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 16}],
        "run.output": output, "run.name": name or f"t-{uuid.uuid4().hex[:8]}", "run.tensorboard": False,
    }
    return load_config(PretrainConfig, EMBEDDED, {**base, **overrides})


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("checkpoint_[0-9]*"))


# What only Ray's own processes print: Train's controller, Data's executor and progress bars, core
# workers, deprecation notices, any process's traceback. (The raylet's warnings about the node, such
# as out-of-memory kills, still reach the console: they are the user's business.)
RAY_INTERNAL = re.compile(r"\((?:pid=|TrainController|RayTrainWorker|SplitCoordinator|DatasetManager|MapWorker|"
                          r"PlacementGroupCleaner)|core_worker\.cc|streaming_executor|Running Dataset|"
                          r"DeprecationWarning|Progress bars|Traceback|State Transition")


def test_embedded_default_flow_end_to_end(tmp_path):
    """`python flows/pretrain.py` (the no-argument default) as a user runs it, with a small step count
    and the output given as a relative path, as the default `runs` is: the workers, which run in a
    working directory of their own, must still write history, curves and `latest` beside the
    driver's checkpoints. Its console holds bertray's lines (every metric line) and none of Ray's."""
    import subprocess
    import sys

    summary = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, str(REPO / "flows" / "pretrain.py"), "--num-cpus", "2",
                          "--train.max_steps", "8", "--train.log_every", "4", "--train.eval_every", "0",
                          "--train.eval_batches", "2", "--train.checkpoint_every", "2", "--train.keep_checkpoints", "2",
                          "--output", "runs", "--name", "embedded", "--json", str(summary)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=400)
    console = run.stdout + run.stderr
    code = run.returncode
    assert code == 0, console[-3000:]
    lines = console.splitlines()
    assert [line.split("  ")[0] for line in lines if line.startswith(("step ", "eval "))] == [
        "step 4/8", "step 8/8", "eval 8/8"], console
    assert not [line for line in lines if RAY_INTERNAL.search(line)], console
    assert len(lines) <= 40, console
    assert code == 0
    result = json.loads(summary.read_text())
    assert result["steps"] == 8
    said = [line.strip() for line in lines if line.strip().startswith(("held-out NSP", "held-out MLM"))]
    assert len(said) == 2 and all(re.fullmatch(r"held-out (NSP|MLM) .*\): (learned|not learned \(needs .*\))", line)
                                  for line in said), console
    assert 0 < result["mlm_accuracy"] < 1 and result["loss"] > 0
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.name == "checkpoint_00000008"
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    assert resolve_checkpoint(str(tmp_path / "runs" / "embedded")) == str(checkpoint)
    assert checkpoint_steps(tmp_path / "runs" / "embedded") == [6, 8]      # the last train.keep_checkpoints
    assert result["pipeline"]["instances"] > 0 and result["pipeline"]["documents"] > 0
    # The learning curves beside history.json, with the baselines the held-out accuracies must beat.
    run = tmp_path / "runs" / "embedded"
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [4, 8]
    assert result["curves"] == str(run / "curves.png")
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    baselines = json.loads((run / "eval_baselines.json").read_text())
    assert baselines == {k: result[k] for k in ("eval_mlm_baseline", "eval_nsp_majority")}
    assert 0 < baselines["eval_mlm_baseline"] < 0.2 and 0.5 <= baselines["eval_nsp_majority"] < 0.8
    # TensorBoard event files under the run directory, with the interval metrics as scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "embedded" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "mlm_accuracy", "nsp_accuracy", "learning_rate", "grad_norm", "sequences_per_s",
                 "tokens_per_s", "data_wait_share"):
        assert f"train/{name}" in tags, name
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8]


def test_two_workers_learn_and_export_to_transformers(ray_cluster, tmp_path):
    from bertray.train.pretrain import run_pretraining

    transformers = pytest.importorskip("transformers")
    cfg = small_config(
        str(tmp_path), **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5, "train.max_steps": 30,
                          "train.log_every": 5, "train.checkpoint_every": 30, "train.lr": 2e-3, "train.eval_every": 15,
                          "data.eval_corpus": [str(REPO / "samples/corpus/wikitext-2/wiki.test.raw")],
                          "data.holdout_fraction": 0.2,
                          "train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10,
                                            "batch_size": 32}]})
    result = run_pretraining(cfg)
    history = json.loads((Path(tmp_path) / cfg.run.name / "history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert result.metrics["step"] == 30
    # Both held-out views, evaluated on rank 0: the held-out file (eval_*) and held-out documents (heldout_*).
    for prefix in ("eval", "heldout"):
        assert [h["step"] for h in history if f"{prefix}_mlm_accuracy" in h] == [15, 30], prefix
        assert 0 <= result.metrics[f"{prefix}_nsp_accuracy"] <= 1
        assert 0 < result.baselines[f"{prefix}_mlm_baseline"] < 0.3 and 0.5 <= result.baselines[f"{prefix}_nsp_majority"] < 1
    # Ray Train's own record of the run carries the same metrics.
    for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_accuracy", "learning_rate", "grad_norm",
                "sequences_per_s", "tokens_per_s", "data_wait_share"):
        assert key in result.reported, key
    assert result.reported["step"] == 30

    directory = resolve_checkpoint(str(Path(tmp_path) / cfg.run.name))
    from bertray.model.heads import BertForPreTraining

    ours = BertForPreTraining.from_pretrained(directory).eval()
    theirs = transformers.BertForPreTraining.from_pretrained(directory).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, ours.config.vocab_size, (4, 32), generator=g)
    types = torch.cat([torch.zeros(4, 16, dtype=torch.long), torch.ones(4, 16, dtype=torch.long)], 1)
    mask = torch.ones(4, 32, dtype=torch.long)
    positions = torch.randint(1, 31, (4, 5), generator=g)
    with torch.no_grad():
        out = ours(input_ids=ids, token_type_ids=types, attention_mask=mask, masked_lm_positions=positions,
                   masked_lm_weights=torch.ones(4, 5))
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    ref_mlm = torch.gather(ref.prediction_logits, 1, positions[..., None].expand(-1, -1, ref.prediction_logits.size(-1)))
    torch.testing.assert_close(out.mlm_logits, ref_mlm.reshape(-1, ref_mlm.size(-1)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=1e-4, rtol=1e-4)


def test_resume_continues_step_schedule_and_optimizer(ray_cluster, tmp_path):
    from bertray.train.pretrain import run_pretraining

    name = f"resume-{uuid.uuid4().hex[:6]}"
    first = small_config(str(tmp_path), name, **{"train.max_steps": 6, "train.warmup_steps": 2})
    run_pretraining(first)
    run = tmp_path / name
    assert checkpoint_steps(run) == [6]
    state_6 = load_training_state(run / "checkpoint_00000006")

    second = small_config(str(tmp_path), name, **{"train.max_steps": 12, "train.warmup_steps": 2})
    result = run_pretraining(second)
    assert result.metrics["start_step"] == 6 and result.metrics["step"] == 12
    assert checkpoint_steps(run) == [6, 12]          # nothing duplicated, nothing missing
    assert load_run_state(run / "checkpoint_00000012").step == 12
    state_12 = load_training_state(run / "checkpoint_00000012")
    # AdamW's per-parameter step counters carried on from 6 to 12: the optimizer was not reset.
    steps_6 = {float(s["step"]) for s in state_6["optimizer"]["state"].values()}
    steps_12 = {float(s["step"]) for s in state_12["optimizer"]["state"].values()}
    assert steps_6 == {6.0} and steps_12 == {12.0}
    assert state_12["scheduler"]["last_epoch"] == 12
    history = json.loads((run / "history.json").read_text())
    lr_at = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    # Step 8's interval continues the decay of the 12-step schedule; it is no fresh warmup from 0.
    peak = second.train.lr
    assert lr_at[8] == pytest.approx(peak * (12 - 7) / 10, rel=0.35)
    assert lr_at[8] > peak * 0.3


def test_two_phases_with_accumulation_continue_one_optimizer_across_a_crash(ray_cluster, tmp_path):
    """The paper's schedule in miniature: phase 0 at sequence 32, phase 1 at 64 with its own P, both
    through gradient accumulation (micro-batches of 8 of 16); a crash in phase 1 resumes from the
    checkpoint that closed phase 0, and phase 1 continues that optimizer and schedule."""
    from bertray.train.pretrain import run_pretraining

    phases = [{"fraction": 0.5, "max_seq_len": 32, "max_predictions_per_seq": 5, "batch_size": 16},
              {"fraction": 0.5, "max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 16}]
    cfg = small_config(str(tmp_path), **{"train.max_steps": 8, "train.log_every": 2, "train.checkpoint_every": 100,
                                         "train.phases": phases, "train.micro_batch_size": 8,
                                         "train.fail_at_step": 6, "run.max_failures": 1})
    result = run_pretraining(cfg)
    run = tmp_path / cfg.run.name
    assert (run / ".fault_injected").read_text().startswith("crashed at step 6")
    assert result.metrics["start_step"] == 4 and result.metrics["step"] == 8
    assert checkpoint_steps(run) == [4, 8]           # each phase's last step checkpoints
    assert result.metrics["sequences_seen"] == 8 * 16

    history = {h["step"]: h for h in json.loads((run / "history.json").read_text())}
    assert [history[s]["phase"] for s in (2, 4, 6, 8)] == [0, 0, 1, 1]
    tokens_per_sequence = {s: history[s]["tokens_per_s"] / history[s]["sequences_per_s"] for s in (2, 4, 6, 8)}
    assert max(tokens_per_sequence[2], tokens_per_sequence[4]) <= 32 < min(tokens_per_sequence[6], tokens_per_sequence[8])

    state_4 = load_training_state(run / "checkpoint_00000004")
    state_8 = load_training_state(run / "checkpoint_00000008")
    assert {float(s["step"]) for s in state_4["optimizer"]["state"].values()} == {4.0}
    assert {float(s["step"]) for s in state_8["optimizer"]["state"].values()} == {8.0}   # one optimizer, never reset
    assert state_8["scheduler"]["last_epoch"] == 8


ABLATIONS = {
    "no-nsp": {"data.objective": "mlm"},
    "ltr-no-nsp": {"data.objective": "ltr"},
    # Table 8's MASK-only mix with Bernoulli whole-word masking, another model size, and an extra
    # kept checkpoint for the steps ablation: the switches that leave the objective alone.
    "mask-mix-size-steps": {"data.mask_token_prob": 1.0, "data.random_token_prob": 0.0,
                            "data.masking_strategy": "bernoulli", "data.whole_word_masking": True,
                            "model.preset": "mini", "train.save_at_steps": [2]},
}


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablation_switches_train_and_their_checkpoints_fine_tune(ray_cluster, tmp_path, ablation):
    from bertray.model.heads import BertForPreTraining
    from bertray.train.pretrain import run_pretraining
    from bertray.tune.trainer import TrialConfig, run_trial

    overrides = ABLATIONS[ablation]
    cfg = small_config(str(tmp_path), **{"train.max_steps": 4, "train.checkpoint_every": 4, **overrides})
    result = run_pretraining(cfg)
    assert result.metrics["step"] == 4 and result.metrics["mlm_accuracy"] > 0
    with_nsp = overrides.get("data.objective", "mlm_nsp") == "mlm_nsp"
    assert (result.metrics.get("nsp_accuracy") is not None) is with_nsp
    causal = overrides.get("data.objective") == "ltr"
    model = BertForPreTraining.from_pretrained(result.checkpoint)
    assert model.config.is_causal is causal
    if "model.preset" in overrides:
        assert (model.config.num_hidden_layers, model.config.hidden_size) == (4, 256)
        assert (tmp_path / cfg.run.name / "kept" / "checkpoint_00000002" / "model.safetensors").is_file()

    trial = TrialConfig(task="sst2", init_from=result.checkpoint, data=str(REPO / "samples"),
                        learning_rate=1e-4, batch_size=16, epochs=1, max_seq_len=32, max_train_examples=64,
                        max_eval_examples=64, threads=1, cache_dir=str(tmp_path / "cache"), predictions=False)
    outcome = run_trial(trial, device="cpu")
    assert 0 <= outcome.metrics["score"] <= 100 and np.isfinite(outcome.metrics["train_loss"])
    assert outcome.model.config.is_causal is causal      # LTR keeps its left-to-right mask when fine-tuned
