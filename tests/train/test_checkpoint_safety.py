"""bertray/train/checkpoints.py: a resume runs no code from the bucket, old checkpoints convert on
request, `latest` stays inside its run, and config changes on resume are caught. No Ray needed."""

import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bertray.model.config import BertConfig
from bertray.errors import CheckpointError
from bertray.train.checkpoints import (CONVERT_COMMAND, RUN_STATE, TRAINING_STATE, RunState, check_config_change,
                                       checkpoint_step, config_changes, load_run_state, load_training_state,
                                       resolve_checkpoint, rng_state, save_training_checkpoint, set_rng_state,
                                       write_training_state)
from bertray.train.optim import make_optimizer, warmup_linear_decay

REPO = Path(__file__).resolve().parents[2]


def trained_optimizer(name: str = "adamw", model: torch.nn.Module | None = None):
    """A real optimizer and scheduler after two steps, so their states hold tensors and counters."""
    model = model or torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model, name, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=2, total_steps=10)
    for _ in range(2):
        sum((p * torch.randn_like(p)).sum() for p in model.parameters()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


# --------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("name", ["adamw", "bert_adam", "lamb"])
def test_training_state_round_trips_through_weights_only(tmp_path, name):
    _, optimizer, scheduler = trained_optimizer(name)
    scaler = torch.amp.GradScaler("cpu").state_dict()
    path = write_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler, step_state={"scaler": scaler})
    assert path == tmp_path / TRAINING_STATE
    raw = torch.load(path, map_location="cpu", weights_only=True)   # no extra safe globals
    assert raw["format"] == 2

    state = load_training_state(tmp_path)
    assert state["step"] == {"scaler": scaler}
    _, fresh, fresh_scheduler = trained_optimizer(name, torch.nn.Linear(4, 3))
    fresh.load_state_dict(state["optimizer"])
    fresh_scheduler.load_state_dict(state["scheduler"])
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    saved, restored = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    for index in saved:
        for key, value in saved[index].items():
            assert torch.equal(torch.as_tensor(restored[index][key]), torch.as_tensor(value)), key


def test_set_rng_state_restores_python_numpy_and_torch_streams(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()   # leaves a cached gaussian in numpy's state
    _, optimizer, scheduler = trained_optimizer()
    write_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler)
    expected = draws()
    draws()             # move every stream on
    set_rng_state(load_training_state(tmp_path)["rng"])
    assert draws() == expected
    set_rng_state(rng_state())   # the pair works without a file too
    assert draws() != expected


def test_save_training_checkpoint_writes_a_loadable_checkpoint(tmp_path):
    from bertray import wordpiece
    from bertray.model.heads import BertForPreTraining

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "##s"]) + "\n")
    tokenizer = wordpiece.from_vocab(vocab)
    model = BertForPreTraining(BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=16, max_position_embeddings=16))
    _, optimizer, scheduler = trained_optimizer(model=model)
    run_state = RunState(step=2, sequences_seen=32, data_position={"generation": 1, "files": ["a.txt"]})
    directory = save_training_checkpoint(tmp_path / "checkpoint_00000002", model=model, tokenizer=tokenizer,
                                         optimizer=optimizer, scheduler=scheduler, run_state=run_state,
                                         step_state={})
    assert {"config.json", "model.safetensors", "vocab.txt", TRAINING_STATE, RUN_STATE} <= {
        p.name for p in directory.iterdir()}
    assert load_run_state(directory) == run_state
    assert load_training_state(directory)["format"] == 2
    assert not list(directory.glob(".*partial"))


def test_save_refuses_a_state_that_would_not_load_safely(tmp_path):
    _, optimizer, scheduler = trained_optimizer()
    with pytest.raises(CheckpointError, match=r"training_state\.step\.scaler is a .*Path"):
        write_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler, step_state={"scaler": tmp_path})
    assert not (tmp_path / TRAINING_STATE).exists()


# --------------------------------------------------------------------------------------------
# Refusals


SYSTEM = f"{os.system.__module__}.system"   # posix.system: how pickle names os.system


class Payload:
    """What an attacker with write access to the bucket would plant: unpickling runs a command."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.proof))}",))


def test_a_planted_payload_is_refused_and_never_runs(tmp_path):
    proof = tmp_path / "pwned"
    directory = tmp_path / "checkpoint_00000010"
    directory.mkdir()
    torch.save({"format": 2, "optimizer": {}, "scheduler": {}, "rng": Payload(proof), "step": {}},
               directory / TRAINING_STATE)
    with pytest.raises(CheckpointError) as error:
        load_training_state(directory)
    message = str(error.value)
    assert str(directory / TRAINING_STATE) in message
    assert SYSTEM in message and "refused" in message and "not allowed" in message
    assert "convert" not in message        # converting it would run it: not suggested
    assert not proof.exists()
    torch.load(directory / TRAINING_STATE, weights_only=False)   # what the old loader did: the payload is real
    assert proof.exists()


def legacy_state(directory: Path) -> None:
    """A training state as bertray wrote it before format 2: numpy's RNG state as an array."""
    _, optimizer, scheduler = trained_optimizer()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                "step": {}}, directory / TRAINING_STATE)


def test_a_legacy_checkpoint_says_how_to_convert_it_and_converts(tmp_path):
    directory = tmp_path / "checkpoint_00000004"
    np.random.seed(7)
    legacy_state(directory)
    expected = np.random.rand(3).tolist()
    with pytest.raises(CheckpointError) as error:
        load_training_state(directory)
    assert f"{CONVERT_COMMAND} {directory}" in str(error.value)
    assert "python -m bertray.train.checkpoints convert" in str(error.value)

    done = subprocess.run([sys.executable, "-m", "bertray.train.checkpoints", "convert", str(directory)],
                          check=False, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "converted from format 1 to format 2" in done.stdout
    state = load_training_state(directory)
    assert state["format"] == 2 and isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    set_rng_state(state["rng"])
    assert np.random.rand(3).tolist() == expected
    assert not list(directory.glob(".*partial"))

    again = subprocess.run([sys.executable, "-m", "bertray.train.checkpoints", "convert", str(directory)],
                           check=False, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and "already format 2" in again.stdout


def test_convert_refuses_a_planted_payload_too(tmp_path):
    proof = tmp_path / "pwned"
    torch.save({"optimizer": {}, "scheduler": {}, "rng": Payload(proof)}, tmp_path / TRAINING_STATE)
    done = subprocess.run([sys.executable, "-m", "bertray.train.checkpoints", "convert", str(tmp_path)],
                          check=False, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert SYSTEM in done.stderr and "not converted" in done.stderr
    assert not proof.exists()


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, -10])
def test_a_truncated_file_is_corrupt(tmp_path, keep):
    _, optimizer, scheduler = trained_optimizer()
    path = write_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_training_state(tmp_path)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(CheckpointError, match=r"training_state\.pt: missing"):
        load_training_state(tmp_path)


def test_a_newer_format_is_named(tmp_path):
    torch.save({"format": 3}, tmp_path / TRAINING_STATE)
    with pytest.raises(CheckpointError, match="format 3"):
        load_training_state(tmp_path)


# --------------------------------------------------------------------------------------------
# Run state


def test_run_state_loads_files_written_before_data_position(tmp_path):
    (tmp_path / RUN_STATE).write_text(json.dumps({"step": 6, "sequences_seen": 96, "metrics": {}, "config": {},
                                                  "history": []}))
    assert load_run_state(tmp_path) == RunState(step=6, sequences_seen=96)


def test_run_state_refuses_unknown_keys(tmp_path):
    (tmp_path / RUN_STATE).write_text(json.dumps({"step": 6, "shard_cursor": 3}))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run_state(tmp_path)


# --------------------------------------------------------------------------------------------
# latest


def run_with_latest(tmp_path: Path, content: str) -> Path:
    run = tmp_path / "run"
    (run / "checkpoint_00000012").mkdir(parents=True)
    (run / "latest").write_text(content)
    return run


def test_latest_names_a_checkpoint_of_its_run(tmp_path):
    run = run_with_latest(tmp_path, "checkpoint_00000012\n")
    assert resolve_checkpoint(str(run)) == str(run / "checkpoint_00000012")
    assert resolve_checkpoint(str(run / "latest")) == str(run / "checkpoint_00000012")
    assert resolve_checkpoint(str(run / "checkpoint_00000012")) == str(run / "checkpoint_00000012")


@pytest.mark.parametrize("content", ["../other", "s3://x/y", "checkpoint_1/../../z", "", "\n", "sub/checkpoint_00000012",
                                     "checkpoint_0000001", "checkpoint_000000120", "/etc", "checkpoint_00000012/.."])
def test_latest_pointing_anywhere_else_is_refused(tmp_path, content):
    run = run_with_latest(tmp_path, content)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(str(run))
    assert str(run / "latest") in str(error.value)
    assert repr(content.strip()) in str(error.value)


@pytest.mark.parametrize(("given", "step"), [
    ("checkpoint_00000012", 12), ("s3://b/runs/x/checkpoint_00001000/", 1000), ("/r/checkpoint_00000000", 0),
    ("checkpoint_12", -1), ("checkpoint_000000012", -1), ("kept", -1), ("", -1), ("checkpoint_0000001a", -1)])
def test_checkpoint_step(given, step):
    assert checkpoint_step(given) == step


# --------------------------------------------------------------------------------------------
# Config changes


SAVED = {"model": {"hidden_size": 256, "bert": {"heads": 4, "act": "gelu"}},
         "data": {"corpus": ["a.txt"], "masking_prob": 0.15, "storage_options": {}},
         "train": {"lr": 1e-4}}


def changed(**edits):
    current = json.loads(json.dumps(SAVED))
    for dotted, value in edits.items():
        section, *path = dotted.split("__")
        target = current[section]
        for part in path[:-1]:
            target = target[part]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return current


def test_config_changes_lists_dotted_keys_within_the_sections():
    assert config_changes(SAVED, json.loads(json.dumps(SAVED))) == []
    assert config_changes(SAVED, changed(train__lr=1.0)) == []                     # not a compared section
    assert config_changes(SAVED, changed(train__lr=1.0), sections=("train",)) == ["train.lr"]
    assert config_changes(SAVED, changed(model__hidden_size=512, data__masking_prob=0.2)) == [
        "model.hidden_size", "data.masking_prob"]
    assert config_changes(SAVED, changed(model__bert__heads=8)) == ["model.bert.heads"]
    assert config_changes(SAVED, changed(model__bert__act=None)) == ["model.bert.act"]          # one side only
    assert config_changes(SAVED, changed(data__new_key=1)) == ["data.new_key"]
    assert config_changes(SAVED, changed(data__corpus=("a.txt",))) == []                        # tuple == list
    assert config_changes(SAVED, changed(data__corpus=["b.txt"])) == ["data.corpus"]
    assert config_changes(SAVED, changed(model__bert=3)) == ["model.bert"]
    assert config_changes({"model": {}}, {}) == ["model"]
    assert config_changes({}, {}) == []


def test_check_config_change_allows_named_keys_and_sections():
    current = changed(model__hidden_size=512, data__corpus=["b.txt"], data__masking_prob=0.2)
    check_config_change(SAVED, SAVED, [])
    check_config_change(SAVED, current, ["model", "data"])
    check_config_change(SAVED, current, ["model.hidden_size", "data"])
    check_config_change(SAVED, current, "model.hidden_size,data.corpus,data.masking_prob")
    with pytest.raises(CheckpointError) as error:
        check_config_change(SAVED, current, ["data.corpus"], where="runs/x/checkpoint_00000006")
    message = str(error.value)
    assert message.startswith("runs/x/checkpoint_00000006")
    assert "model.hidden_size: 256 -> 512" in message and "data.masking_prob: 0.15 -> 0.2" in message
    assert "data.corpus" not in message                          # allowed, so not listed
    assert "--run.allow_config_change model.hidden_size,data.masking_prob" in message
    assert "run.name" in message
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        check_config_change(SAVED, current, ["model.hidden", "data"])   # a prefix of a name is not its parent


def test_check_config_change_shortens_long_values():
    current = changed(data__corpus=[f"s3://bucket/corpus/part-{i:05d}.jsonl" for i in range(200)])
    with pytest.raises(CheckpointError) as error:
        check_config_change(SAVED, current, [])
    assert len(str(error.value)) < 400 and "..." in str(error.value)
