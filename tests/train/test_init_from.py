"""Continued pretraining (`model.init_from`): the checkpoint is taken as a whole (its vocabulary,
its architecture, its heads where it has them), a run setting that disagrees with it is refused
before anything starts, and it loads from a path or from object storage."""

from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from bertray import wordpiece
from bertray.config import load_config
from bertray.errors import CheckpointError, ConfigError
from bertray.model.config import BertConfig
from bertray.model.heads import BertForPreTraining
from bertray.train.config import PretrainConfig
from bertray.train.init_from import starting_checkpoint

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "flows" / "configs" / "embedded.yaml"
VOCAB_8192 = REPO / "samples" / "corpus" / "wikitext-2" / "vocab-8192"
CORPUS = REPO / "samples" / "corpus" / "wikitext-2" / "wiki.valid.raw"


def run_config(init_from: Path | str, **overrides) -> PretrainConfig:
    """The embedded default continued from `init_from`, with its model size and vocabulary left to it."""
    base = {"model.init_from": str(init_from), "model.preset": None, "data.tokenizer": None,
            "data.corpus": [str(CORPUS)], "data.eval_corpus": []}
    return load_config(PretrainConfig, EMBEDDED, {**base, **overrides})


def tiny_checkpoint(folder: Path, *, heads: str = "bertray", max_positions: int = 512) -> Path:
    """A small checkpoint with the shipped 8,192-piece vocabulary: bertray's `BertForPreTraining`
    (both heads), `transformers`' `BertForMaskedLM` (MLM head only) or its bare `BertModel`."""
    torch.manual_seed(1)
    config = BertConfig.preset("tiny", vocab_size=8192, max_position_embeddings=max_positions)
    if heads == "bertray":
        BertForPreTraining(config).save_pretrained(folder)
    else:
        import transformers

        hf_config = transformers.BertConfig(**config.to_dict())
        cls = transformers.BertForMaskedLM if heads == "mlm" else transformers.BertModel
        cls(hf_config).save_pretrained(folder)
    wordpiece.save(wordpiece.load(VOCAB_8192), folder)
    return folder


def _flow():
    spec = importlib.util.spec_from_file_location("pretrain_flow", REPO / "flows" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Refused before any work


def test_a_vocabulary_or_size_that_disagrees_with_the_checkpoint_is_refused_naming_both_sides(minilm_dir):
    with pytest.raises(ConfigError) as refused:
        starting_checkpoint(run_config(minilm_dir, **{"data.tokenizer": str(VOCAB_8192), "model.preset": "tiny",
                                                      "model.overrides": {"hidden_size": 256}}))
    message = str(refused.value)
    assert "8,192 tokens against the checkpoint's 30,522" in message
    assert "id 1: '[UNK]' here, '[unused0]' in the checkpoint" in message
    assert "model.preset 'tiny' has num_hidden_layers 2, hidden_size 128" in message
    assert "the checkpoint has num_hidden_layers 6, hidden_size 384" in message
    assert "model.overrides.hidden_size is 256; the checkpoint's is 384" in message
    assert "--model.preset null --data.tokenizer null" in message


def test_the_flow_refuses_with_exit_code_2_before_ray_starts(minilm_dir, capsys, monkeypatch):
    import bertray.cli

    monkeypatch.setattr(bertray.cli, "start_ray", lambda *a, **k: pytest.fail("Ray was started"))
    code = _flow().main(["--model.init_from", str(minilm_dir), "--corpus", str(CORPUS)])   # embedded: tiny, 8,192
    err = capsys.readouterr().err
    assert code == 2 and "the run's settings disagree with the checkpoint" in err, err


def test_sequences_longer_than_the_checkpoints_positions_are_refused(tmp_path):
    short = tiny_checkpoint(tmp_path / "short", max_positions=64)
    with pytest.raises(ConfigError, match="train.phases.0..max_seq_len 128 is longer than the checkpoint's "
                                          "max_position_embeddings 64"):
        starting_checkpoint(run_config(short))
    starting_checkpoint(run_config(short, **{"train.phases": [{"max_seq_len": 64, "batch_size": 8}]}))


def test_a_tokenizer_that_agrees_is_accepted_and_casing_counts(minilm_dir, tmp_path):
    start = starting_checkpoint(run_config(minilm_dir, **{"data.tokenizer": str(minilm_dir)}))
    assert start.tokenizer.get_vocab_size() == 30522 and start.config.num_hidden_layers == 6
    assert start.describe().endswith("(6 layers, 384 wide, 22.9M parameters, vocabulary of 30,522)")

    cased = tmp_path / "cased-copy"           # the same vocab.txt, read as its tokenizer_config.json says
    cased.mkdir()
    shutil.copy(minilm_dir / "vocab.txt", cased)
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert not wordpiece.lowercases(wordpiece.load(cased))
    assert wordpiece.lowercases(wordpiece.load(minilm_dir))
    with pytest.raises(ConfigError, match="the same 30,522 tokens, but it keeps the case of its input"):
        starting_checkpoint(run_config(minilm_dir, **{"data.tokenizer": str(cased)}))


def test_a_checkpoint_without_a_vocabulary_or_with_weights_that_do_not_fit_is_refused(tmp_path, minilm_dir):
    bare = tmp_path / "no-vocab"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir / name, bare)
    with pytest.raises(ConfigError, match="carries its own vocabulary"):
        starting_checkpoint(run_config(bare))
    lying = tiny_checkpoint(tmp_path / "lying")
    config = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        starting_checkpoint(run_config(lying))


# --------------------------------------------------------------------------------------------
# Heads: loaded when the checkpoint has them


@pytest.mark.parametrize("heads, loaded, fresh", [("bertray", ("MLM", "NSP"), ()), ("mlm", ("MLM",), ("NSP",)),
                                                  ("bare", (), ("MLM", "NSP"))])
def test_heads_are_loaded_when_the_checkpoint_has_them(tmp_path, heads, loaded, fresh):
    from bertray.train.worker_loop import WorkerPlan, _build_model

    folder = tiny_checkpoint(tmp_path / heads, heads=heads)
    start = starting_checkpoint(run_config(folder))
    assert (start.loaded_heads, start.fresh_heads) == (loaded, fresh)
    assert ("loaded from the checkpoint" in start.heads_line()) == bool(loaded)
    assert ("freshly initialised" in start.heads_line()) == bool(fresh)

    plan = WorkerPlan(config=run_config(folder), bert_config=start.config.to_dict(), tokenizer_json="", run_url="",
                      eval_sets={}, baselines={}, init_from=start.url, tensorboard_dir=None, tensorboard_url=None,
                      corpus_files=1)
    model, _, _ = _build_model(plan, None)
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    prefix = "bert." if heads == "bertray" or heads == "mlm" else ""
    assert torch.equal(state["bert.encoder.layer.1.output.dense.weight"],
                       saved[f"{prefix}encoder.layer.1.output.dense.weight"])
    if "MLM" in loaded:
        assert torch.equal(state["cls.predictions.transform.dense.weight"],
                           saved["cls.predictions.transform.dense.weight"])
    if "NSP" in loaded:
        assert torch.equal(state["cls.seq_relationship.weight"], saved["cls.seq_relationship.weight"])


def fills_masks_as_bertray_does(checkpoint: Path) -> None:
    """`transformers` loads a continued checkpoint as `BertForMaskedLM` and its fill-mask pipeline
    answers from the checkpoint's own vocabulary, with the MLM head bertray trained."""
    import transformers

    text = "The game was released in [MASK] for the PlayStation."
    pipe = transformers.pipeline("fill-mask", model=str(checkpoint), tokenizer=str(checkpoint), top_k=5)
    theirs = [(a["token"], a["token_str"]) for a in pipe(text)]

    tokenizer = wordpiece.load(checkpoint)
    model = BertForPreTraining.from_pretrained(checkpoint).eval()
    ids = tokenizer.encode(text).ids
    slot = ids.index(tokenizer.token_to_id("[MASK]"))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), masked_lm_positions=torch.tensor([[slot]])).mlm_logits[0]
    ours = logits.topk(5).indices.tolist()
    assert [t for t, _ in theirs] == ours
    vocab = (VOCAB_8192 / "vocab.txt").read_text().splitlines()
    assert all(vocab[t].removeprefix("##") == s.replace(" ", "").removeprefix("##") for t, s in theirs), theirs


# --------------------------------------------------------------------------------------------
# On Ray: from object storage, and the run's own checkpoint before init_from


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_object_storage_start_checkpoints_and_resume_taking_precedence(ray_cluster, s3_bucket, tmp_path):
    """A run that starts from a checkpoint in a bucket and writes its own there: its checkpoints,
    `latest` pointer and TensorBoard events land in the bucket (TensorBoard with the writer Ray
    already installs when the `tensorboard` package is not there), the first one continues the
    start's vocabulary and heads, and a resume takes the run's own checkpoint before `init_from`,
    which it no longer needs."""
    import s3fs

    from bertray.train.pretrain import run_pretraining

    folder = tiny_checkpoint(tmp_path / "start")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(folder) + "/", f"{s3_bucket}/ckpt/", recursive=True)
    name, output = f"continued-{uuid.uuid4().hex[:6]}", f"s3://{s3_bucket}/runs"
    settings = {"train.max_steps": 3, "train.checkpoint_every": 3, "train.eval_every": 0, "train.eval_batches": 2,
                "train.log_every": 1, "train.lr": 1e-4, "run.output": output, "run.name": name,
                "run.tensorboard": True,
                "train.phases": [{"max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 8}]}
    first = run_pretraining(run_config(f"s3://{s3_bucket}/ckpt", **settings))
    assert first.metrics["step"] == 3 and first.metrics["resumed_from_step"] == 0
    assert first.checkpoint == f"{output}/{name}/checkpoint_00000003"
    saved = tmp_path / "saved"
    fs.get(first.checkpoint + "/", str(saved) + "/", recursive=True)
    assert (saved / "vocab.txt").read_text() == (VOCAB_8192 / "vocab.txt").read_text()
    assert json.loads((saved / "config.json").read_text())["vocab_size"] == 8192
    fills_masks_as_bertray_does(saved)

    fs.rm(f"{s3_bucket}/ckpt", recursive=True)       # a resume needs only the run's own checkpoint
    resumed = run_pretraining(run_config(f"s3://{s3_bucket}/ckpt", **{**settings, "train.max_steps": 5}))
    assert resumed.metrics["step"] == 5 and resumed.metrics["resumed_from_step"] == 3
    run = f"{s3_bucket}/runs/{name}"
    fs.invalidate_cache()
    assert {"checkpoint_00000003", "checkpoint_00000005", "latest"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert fs.cat_file(f"{run}/latest").decode().strip() == "checkpoint_00000005"
    files = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{run}/checkpoint_00000005")}
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "training_state.pt"} <= files
    events = fs.glob(f"{run}/tensorboard/events.out.tfevents.*")
    assert events and all(fs.size(e) > 0 for e in events)


# --------------------------------------------------------------------------------------------
# It learns: the checkpoint's weights help (and another vocabulary's ids would not)


def test_continuing_a_real_checkpoint_beats_the_same_run_from_scratch(minilm_dir):
    """benchmarks/continued_pretraining.py small: MiniLM continued MLM-only on a slice of the
    corpus against its architecture from random weights, same batches and schedule; the control
    feeds it the shipped 8,192-piece vocabulary's ids, as `init_from` did before."""
    bench = _benchmark()
    torch.set_num_threads(2)
    shape = dict(steps=60, eval_batches=8, batch_size=8, seq_len=64, predictions=10)
    own, other = wordpiece.load(minilm_dir), wordpiece.load(VOCAB_8192)
    batches, held_out = bench.mlm_batches(own.to_str(), **shape)
    wrong, wrong_held_out = bench.mlm_batches(other.to_str(), **shape)
    settings = dict(lr=3e-4, warmup=5, eval_every=60)      # at 60 steps: 8.1% against 5.9% from scratch
    adapted = bench.mlm_curve(bench.start(minilm_dir, adapted=True), batches, held_out, **settings)[-1][1]
    scratch = bench.mlm_curve(bench.start(minilm_dir, adapted=False), batches, held_out, **settings)[-1][1]
    mismatched = bench.mlm_curve(bench.start(minilm_dir, adapted=True), wrong, wrong_held_out, **settings)[-1][1]
    assert adapted > scratch * 1.2, (adapted, scratch)                  # the checkpoint's weights help ...
    assert mismatched < scratch * 1.2 and mismatched < adapted, (mismatched, scratch, adapted)   # ... with its vocabulary


def _benchmark():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("continued_pretraining", REPO / "benchmarks" / "continued_pretraining.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
