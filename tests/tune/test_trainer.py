"""The Ray-free trial loop: every task family end to end on tiny models, caching, checkpoints from
object storage, the causal (LTR) ablation, and a small-but-real quality check with MiniLM."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from bertray.errors import CheckpointError, TaskDataError
from bertray.tasks import metrics, prediction_files, squad
from bertray.tasks.registry import TASKS
from bertray.runtime import checkpoint_cache
from bertray.tune import trainer
from bertray.tune.trainer import InjectedFault, TrialConfig, run_trial


def _cfg(checkpoint, data, task="sst2", **kw) -> TrialConfig:
    base = dict(task=task, init_from=str(checkpoint), data=str(data), learning_rate=1e-3, batch_size=16, epochs=2,
                max_seq_len=32, max_train_examples=48, max_eval_examples=40, threads=1)
    return TrialConfig(**{**base, **kw})


def test_reports_every_epoch_and_writes_glue_predictions(tiny_checkpoint, samples, tmp_path):
    reports = []
    files = tmp_path / "files"
    out = run_trial(_cfg(tiny_checkpoint, samples, cache_dir=str(tmp_path / "cache")),
                   report=lambda m, f: reports.append((m, f)), files_dir=str(files))
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    assert [f for _, f in reports] == [None, str(files)]          # files only with the last report
    last = reports[-1][0]
    assert last["score"] == last["dev_accuracy"] and 0 <= last["score"] <= 100
    assert last["step"] == 2 * 3 and np.isfinite(last["train_loss"])
    assert out.metrics == last and len(out.history) == 2
    with open(files / "dev_predictions.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "prediction", "label"] and len(rows) == 41
    assert {r[1] for r in rows[1:]} <= {"0", "1"}
    submission = (files / "SST-2.tsv").read_text().splitlines()    # GLUE's test submission file
    assert submission[0] == "index\tprediction" and submission[1].startswith("0\t") and len(submission) == 41
    assert json.loads((files / "metrics.json").read_text())["history"][-1]["epoch"] == 2
    # Did it learn anything: the majority class of the 48 training examples scored on the same 40
    # dev examples, the model's distinct predictions, its confusion matrix beside the predictions
    train_labels = [r[1] for r in csv.reader((samples / "glue/SST-2/train.tsv").open(encoding="utf-8"),
                                                delimiter="\t", quoting=csv.QUOTE_NONE)][1:49]
    majority = max(("0", "1"), key=lambda c: (train_labels.count(c), c == "0"))
    dev_labels = [r[2] for r in rows[1:]]
    assert all(m["dev_baseline_accuracy"] == pytest.approx(100 * dev_labels.count(majority) / 40) for m, _ in reports)
    assert last["dev_distinct_predictions"] == len({r[1] for r in rows[1:]})
    matrix = list(csv.reader((files / "confusion.csv").open(encoding="utf-8")))
    assert matrix[0] == ["gold\\predicted", "0", "1"] and sum(int(x) for r in matrix[1:] for x in r[1:]) == 40
    assert [int(matrix[1 + "01".index(r[2])][1 + "01".index(r[1])]) > 0 for r in rows[1:]] == [True] * 40


def test_regression_head_has_one_output_and_scores_correlations(tiny_checkpoint, samples, tmp_path):
    out = run_trial(_cfg(tiny_checkpoint, samples, task="stsb", epochs=1, cache_dir=str(tmp_path)), files_dir=str(tmp_path / "f"))
    assert out.model.classifier.out_features == 1
    assert {"dev_spearman", "dev_pearson"} <= set(out.metrics) and out.metrics["score"] == out.metrics["dev_spearman"]
    predictions = (tmp_path / "f" / "dev_predictions.tsv").read_text().splitlines()[1:]
    assert all(float(line.split("\t")[1]) == float(line.split("\t")[1]) for line in predictions)   # numbers
    assert (tmp_path / "f" / "STS-B.tsv").exists()


@pytest.mark.parametrize("task,files", [
    ("squad1", ["dev_predictions.json"]),
    ("squad2", ["dev_predictions.json", "dev_null_odds.json"]),
    ("swag", ["dev_predictions.tsv"]),
    ("conll2003", ["dev_predictions.txt", "test_predictions.txt"]),
    ("conll2003_feature", ["dev_predictions.txt", "test_predictions.txt"]),
])
def test_every_family_trains_scores_and_writes_predictions(tiny_checkpoint, families_root, tmp_path, task, files):
    spec = TASKS[task]
    seq = 96 if spec.family == "span" else 48
    out = run_trial(_cfg(tiny_checkpoint, families_root, task=task, epochs=1, max_seq_len=seq, batch_size=4,
                        max_train_examples=12, max_eval_examples=8, cache_dir=str(tmp_path)),
                   files_dir=str(tmp_path / "f"))
    m = out.metrics
    assert m["score"] == m[f"{spec.dev_splits[0]}_{spec.metric}"] and 0 <= m["score"] <= 100
    for split in spec.dev_splits:
        assert f"{split}_{spec.metric}" in m
        assert 0 <= m[f"{split}_baseline_{spec.metric}"] <= 100 and m[f"{split}_distinct_predictions"] >= 1
    assert (tmp_path / "f" / "confusion.csv").is_file() == bool(spec.labels)      # tags: yes; spans, choices: no
    for name in files:
        assert (tmp_path / "f" / name).stat().st_size > 0, name
    if spec.family == "span":
        predictions = json.loads((tmp_path / "f" / "dev_predictions.json").read_text())
        assert len(predictions) == 8 and all(isinstance(v, str) for v in predictions.values())
    if spec.allow_no_answer:      # SQuAD 2.0: scored and written at the tau tuned on dev
        assert m["dev_tau"] == m["dev_best_f1_thresh"] and m["dev_f1"] == m["dev_best_f1"]
        assert "dev_f1_at_0" in m and "dev_exact_match_at_0" in m
        odds = _strict_json(tmp_path / "f" / "dev_null_odds.json")
        assert set(odds) == set(predictions) and all(np.isfinite(v) for v in odds.values())
        assert all(predictions[q] == "" for q, o in odds.items() if o > m["dev_tau"])
        examples, _ = spec.read(families_root, "dev")
        gold = {e.qid: [a.text for a in e.answers] for e in examples[:8]}
        scores = metrics.squad_scores(gold, predictions)          # the written file gives the reported scores
        assert scores["f1"] == m["dev_f1"] and scores["exact_match"] == m["dev_exact_match"]
    if spec.family == "token":
        lines = (tmp_path / "f" / "dev_predictions.txt").read_text().split("\n\n")
        assert len([b for b in lines if b.strip()]) == 8
        assert all(len(line.split()) == 3 for line in lines[0].splitlines())   # word gold predicted
    if spec.feature_based:
        assert all(not p.requires_grad for p in out.model.bert.parameters())  # frozen encoder


def _strict_json(path):
    def reject(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def test_squad2_prediction_files_use_the_tuned_tau(minilm_dir, tmp_path):
    """Without training: crafted logits where tau = 0 and the tuned tau decide differently, and
    one question without any proposed span (null odds +inf)."""
    from tokenizers import Tokenizer

    spec = TASKS["squad2"]
    context = "The capital of France is Paris. The river of Paris is the Seine."
    #        gold     span     span/2 null/2: odds 1 (tuned: answer), 2 (abstain), -1 (answer), +inf
    rows = [("a", "Paris", "Paris", 2.5, 3.0), ("b", None, "Paris", 1.5, 2.5), ("c", "Seine", "Seine", 1.5, 1.0),
            ("d", None, None, 0.0, 0.0)]
    examples = [squad.SquadExample(q, "t", f"Question {q}?", context,
                                   () if g is None else (squad.Answer(g, context.index(g)),), g is None)
                for q, g, *_ in rows]
    features = squad.featurize_squad(examples, Tokenizer.from_file(str(minilm_dir / "tokenizer.json")), 64)
    start, end = np.full((4, 64), -10.0), np.full((4, 64), -10.0)
    for f, (_, _, text, span, null) in enumerate(rows):
        offsets = features["offset_mapping"][f]
        if text is None:                # the 20 best starts all outside the passage: no span at all
            start[f, offsets[:, 0] < 0] = 5.0
            continue
        start[f, int(np.flatnonzero(offsets[:, 0] == context.index(text))[0])] = span
        end[f, int(np.flatnonzero(offsets[:, 1] == context.index(text) + len(text))[0])] = span
        start[f, 0] = end[f, 0] = null
    outputs = {"start_logits": start, "end_logits": end}
    scores = spec.evaluate(examples, features, outputs)
    assert scores["tau"] == 1.0 and scores["f1"] == 100.0 and scores["f1_at_0"] == 75.0
    dev = trainer.EvalSet("dev", True, examples, features)
    for tau, expected in ((None, {"a": "Paris", "b": "", "c": "Seine", "d": ""}),     # tuned on dev itself
                          (scores["tau"], {"a": "Paris", "b": "", "c": "Seine", "d": ""}),
                          (0.0, {"a": "", "b": "", "c": "Seine", "d": ""})):
        paths = prediction_files.write(spec, dev, outputs, str(tmp_path), tau=tau)
        assert paths == [str(tmp_path / "dev_predictions.json"), str(tmp_path / "dev_null_odds.json")]
        assert _strict_json(tmp_path / "dev_predictions.json") == expected
    odds = _strict_json(tmp_path / "dev_null_odds.json")
    assert odds == {"a": 1.0, "b": 2.0, "c": -1.0, "d": squad.ODDS_LIMIT}       # +inf written as a finite number


def test_train_features_come_from_the_disk_cache(tiny_checkpoint, samples, tmp_path, monkeypatch):
    from bertray import wordpiece
    from bertray.tasks import glue

    spec, tok = TASKS["mrpc"], wordpiece.load(tiny_checkpoint)
    _, first = trainer.load_split(spec, str(samples), "train", tok, 64, limit=30, cache_dir=str(tmp_path),
                                  need_examples=False)
    assert len(list((tmp_path / "features").glob("mrpc-train-*.npz"))) == 1
    trainer._MEMORY.clear()
    monkeypatch.setattr(glue, "read_glue", lambda *a, **k: pytest.fail("the cached training split was read again"))
    _, again = trainer.load_split(spec, str(samples), "train", tok, 64, limit=30, cache_dir=str(tmp_path),
                                  need_examples=False)
    assert set(first) == set(again) and all(np.array_equal(first[k], again[k]) for k in first)
    monkeypatch.undo()
    _, other = trainer.load_split(spec, str(samples), "train", tok, 32, limit=30, cache_dir=str(tmp_path),
                                  need_examples=False)                                    # another length: new entry
    assert other["input_ids"].shape == (30, 32)


def test_batches_are_cut_to_the_longest_real_sequence():
    spec = TASKS["sst2"]
    mask = np.zeros((3, 16), dtype=np.int8)
    mask[0, :5], mask[1, :9], mask[2, :3] = 1, 1, 1
    features = {"input_ids": np.arange(48, dtype=np.int32).reshape(3, 16), "token_type_ids": np.zeros((3, 16), np.int8),
                "attention_mask": mask, "labels": np.array([0, 1, 0])}
    batch = trainer.make_batch(spec, features, np.array([0, 2]), torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [0, 0]


def test_random_init_keeps_the_architecture_and_draws_fresh_weights(tiny_checkpoint):
    spec = TASKS["sst2"]
    torch.manual_seed(0)
    pretrained = trainer.build_model(spec, tiny_checkpoint)
    torch.manual_seed(1)          # (seed 0 would redraw the tiny checkpoint itself: it is random too)
    fresh = trainer.build_model(spec, tiny_checkpoint, random_init=True)
    assert fresh.config.hidden_size == pretrained.config.hidden_size == 32
    assert fresh.config.num_labels == 2 and fresh.config.hidden_dropout_prob == 0.1
    a = pretrained.bert.embeddings.word_embeddings.weight
    b = fresh.bert.embeddings.word_embeddings.weight
    assert a.shape == b.shape and not torch.equal(a, b)


def test_same_seed_same_result_and_seeds_differ(tiny_checkpoint, samples, tmp_path):
    run = lambda seed: run_trial(_cfg(tiny_checkpoint, samples, epochs=1, seed=seed, predictions=False,
                                     cache_dir=str(tmp_path))).metrics["train_loss"]
    first = run(0)
    assert run(0) == pytest.approx(first, rel=1e-6)
    assert run(1) != pytest.approx(first, rel=1e-6)


def test_injected_fault_and_missing_inputs_raise_clear_errors(tiny_checkpoint, samples, tmp_path):
    with pytest.raises(InjectedFault, match="injected failure for sst2"):
        run_trial(_cfg(tiny_checkpoint, samples, fail=True))
    with pytest.raises(CheckpointError, match="no config.json"):
        run_trial(_cfg(tmp_path / "nowhere", samples))
    with pytest.raises(TaskDataError, match="glue/MRPC"):
        run_trial(_cfg(tiny_checkpoint, tmp_path, task="mrpc", cache_dir=str(tmp_path)))


def test_checkpoint_and_data_from_object_storage(tiny_checkpoint, samples, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in tiny_checkpoint.iterdir():
        fs.put_file(str(path), f"{s3_bucket}/ckpt/{path.name}")
    fs.put_file(str(tiny_checkpoint / "config.json"), f"{s3_bucket}/ckpt/training_state.pt")   # must not be fetched
    for split in ("train", "dev"):
        fs.put_file(str(samples / "glue" / "SST-2" / f"{split}.tsv"), f"{s3_bucket}/data/glue/SST-2/{split}.tsv")
    cache = tmp_path / "cache"
    out = run_trial(_cfg(f"s3://{s3_bucket}/ckpt", f"s3://{s3_bucket}/data", epochs=1, cache_dir=str(cache)),
                   files_dir=str(tmp_path / "f"))
    assert out.metrics["epoch"] == 1
    (local,) = (cache / "checkpoints").iterdir()
    assert sorted(p.name for p in local.iterdir()) == sorted(
        p.name for p in tiny_checkpoint.iterdir() if p.name in checkpoint_cache.CHECKPOINT_FILES)
    assert checkpoint_cache.local_checkpoint(f"s3://{s3_bucket}/ckpt", str(cache)) == local          # downloaded once
    assert not (tmp_path / "f" / "SST-2.tsv").exists()                                     # no test split there


def test_a_causal_checkpoint_fine_tunes_with_a_causal_mask(tmp_path, checkpoint_factory, samples):
    """The LTR ablation (config.json `is_decoder: true`) keeps its left-to-right attention in the
    task model: after fine-tuning, position i's output does not depend on tokens after i."""
    checkpoint = checkpoint_factory(tmp_path / "ltr", is_causal=True)
    assert json.loads((checkpoint / "config.json").read_text())["is_decoder"] is True
    out = run_trial(_cfg(checkpoint, samples, epochs=1, save_model=True, cache_dir=str(tmp_path)),
                   files_dir=str(tmp_path / "f"))
    from bertray.model.heads import BertForSequenceClassification

    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "f" / "model").eval()
    assert reloaded.config.is_causal and out.model.config.is_causal
    ids = torch.randint(1000, 2000, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(2000, 3000, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = reloaded.bert(ids, attention_mask=mask).last_hidden_state
        b = reloaded.bert(changed, attention_mask=mask).last_hidden_state
        logits_a, logits_b = reloaded(ids, attention_mask=mask).logits, reloaded(changed, attention_mask=mask).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    torch.testing.assert_close(logits_a, logits_b)    # [CLS] sits at position 0: it sees only itself
