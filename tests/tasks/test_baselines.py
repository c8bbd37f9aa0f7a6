"""Trivial baselines on the real dev sets: each family's constant predictor, scored by the task's own
scorer, must equal what counting the files independently gives; constant predictions are told
apart from the model's."""

from __future__ import annotations

import collections
import csv
import json

import numpy as np
import pytest

from bertray import wordpiece
from bertray.tasks import baselines, swag
from bertray.tasks.registry import FAMILIES, TASKS


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return wordpiece.load(minilm_dir)


def _glue_labels(path, column):
    """A GLUE file's label column, read with nothing of bertray (MRPC starts with a byte-order mark)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[column] for r in rows[1:] if r]


def _split(spec, root, split, tokenizer):
    examples, _ = spec.read(root, split)
    return examples, spec.featurize(examples, tokenizer)


def test_sst2_majority_baseline_is_the_dev_share_of_the_train_majority_class(shared_data, tokenizer):
    spec = TASKS["sst2"]
    train_counts = collections.Counter(_glue_labels(shared_data / "glue/SST-2/train.tsv", 1))
    majority = train_counts.most_common(1)[0][0]
    dev = _glue_labels(shared_data / "glue/SST-2/dev.tsv", 1)
    assert len(train_counts) == 2 and len(dev) == 872
    examples, features = _split(spec, shared_data, "dev", tokenizer)
    train = {"labels": np.array([spec.labels.index(x) for x in _glue_labels(shared_data / "glue/SST-2/train.tsv", 1)])}
    scores = baselines.baseline_scores(spec, train, examples, features)
    assert scores == {"accuracy": pytest.approx(100 * dev.count(majority) / len(dev))}
    assert baselines.describe(spec) == "majority class of train"


@pytest.mark.parametrize("task,expected", [
    ("mrpc", {"f1": 81.2, "accuracy": 68.4}),     # "always a paraphrase": today's embedded MRPC F1
    ("cola", {"mcc": 0.0}),                      # "always acceptable": today's embedded CoLA MCC
])
def test_the_constant_majority_predictor_scores_what_the_embedded_table_shows(shared_data, tokenizer, task, expected):
    spec = TASKS[task]
    _, train = _split(spec, shared_data, "train", tokenizer)
    examples, features = _split(spec, shared_data, "dev", tokenizer)
    scores = baselines.baseline_scores(spec, train, examples, features)
    assert {k: round(v, 1) for k, v in scores.items()} == expected
    outputs = FAMILIES[spec.family].baseline.outputs(spec, train, features)
    assert baselines.distinct_predictions(spec, examples, features, outputs) == 1
    assert spec.decode(examples, features, outputs)[0] == "1"    # both train sets are mostly "1"
    # a predictor that follows the gold labels is not constant and beats the baseline
    gold = np.eye(2, dtype=np.float32)[[spec.labels.index(e.label) for e in examples]]
    assert baselines.distinct_predictions(spec, examples, features, {"logits": gold}) == 2
    assert spec.evaluate(examples, features, {"logits": gold})[spec.metric] == 100.0


def test_regression_baseline_is_the_train_mean_and_its_correlations_are_undefined(shared_data, tokenizer):
    spec = TASKS["stsb"]
    train_scores = [float(x) for x in _glue_labels(shared_data / "glue/STS-B/train.tsv", 9)]
    examples, features = _split(spec, shared_data, "dev", tokenizer)
    train = {"labels": np.array(train_scores, dtype=np.float32)}
    outputs = FAMILIES["regression"].baseline.outputs(spec, train, features)
    assert outputs["logits"].shape == (1500, 1)
    assert np.allclose(outputs["logits"], sum(train_scores) / len(train_scores))
    scores = baselines.baseline_scores(spec, train, examples, features)
    assert set(scores) == {"spearman", "pearson"} and all(np.isnan(v) for v in scores.values())
    assert baselines.distinct_predictions(spec, examples, features, outputs) == 1


def test_token_baseline_tags_no_entity_anywhere(shared_data, tokenizer):
    spec = TASKS["conll2003"]
    examples, _ = spec.read(shared_data, "dev")
    examples = examples[:300]
    features = spec.featurize(examples, tokenizer)
    outputs = FAMILIES["token"].baseline.outputs(spec, {}, features)
    assert all(tag == "O" for tags in spec.decode(examples, features, outputs) for tag in tags)
    assert baselines.baseline_scores(spec, {}, examples, features) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    assert baselines.distinct_predictions(spec, examples, features, outputs) == 1
    assert baselines.describe(spec) == "no entity (every word O)"


def test_squad2_baseline_answers_nothing_and_scores_the_share_of_unanswerable_questions(shared_data, tokenizer):
    spec = TASKS["squad2"]
    path = shared_data / "squad/v2.0-sample/dev-v2.0.Normans_Rhine.json"
    unanswerable = sum(q.get("is_impossible", False) for a in json.loads(path.read_text())["data"]
                       for p in a["paragraphs"] for q in p["qas"])
    examples, _ = spec.family_info.read(spec, str(path), "dev")
    features = spec.featurize(examples, tokenizer)
    scores = baselines.baseline_scores(spec, {}, examples, features)
    assert (unanswerable, len(examples)) == (320, 706)
    assert scores["f1"] == scores["exact_match"] == pytest.approx(100 * 320 / 706)
    assert scores["f1_at_0"] == scores["f1"]              # empty at the tuned threshold and at 0 alike
    outputs = FAMILIES["span"].baseline.outputs(spec, {}, features)
    assert set(spec.decode(examples, features, outputs, tau=scores["tau"]).values()) == {""}
    assert baselines.distinct_predictions(spec, examples, features, outputs, tau=scores["tau"]) == 1


def test_squad1_baseline_answers_the_first_token_of_each_passage(shared_data, tokenizer):
    spec = TASKS["squad1"]
    examples, _ = spec.family_info.read(spec, str(shared_data / "squad/v1.1/dev-v1.1.json"), "dev")
    examples = examples[:400]
    features = spec.featurize(examples, tokenizer)
    outputs = FAMILIES["span"].baseline.outputs(spec, {}, features)
    predicted = spec.decode(examples, features, outputs)
    first = [tokenizer.encode(e.context, add_special_tokens=False).offsets[0] for e in examples]
    assert [predicted[e.qid] for e in examples] == [e.context[a:b] for e, (a, b) in zip(examples, first)]
    scores = baselines.baseline_scores(spec, {}, examples, features)
    assert 0 <= scores["exact_match"] <= scores["f1"] < 10
    assert baselines.describe(spec) == "first token of the passage"


def test_multiple_choice_baseline_is_the_most_frequent_train_answer(shared_data, tokenizer):
    spec = TASKS["swag"]
    rows = [json.loads(line) for line in (shared_data / "swag-sample/sample.json").read_text().splitlines() if line]
    examples, _ = swag.read_swag(shared_data / "swag-sample/sample.json")
    train, dev = examples[:6], examples[6:]
    counts = collections.Counter(int(r["label"]) for r in rows[:6])
    majority = min(k for k, n in counts.items() if n == max(counts.values()))   # ties: the lower index
    features = spec.featurize(dev, tokenizer)
    scores = baselines.baseline_scores(spec, spec.featurize(train, tokenizer), dev, features)
    assert scores == {"accuracy": pytest.approx(100 * [int(r["label"]) for r in rows[6:]].count(majority) / 4)}


def test_every_family_has_a_baseline_and_items_to_count():
    for name, family in FAMILIES.items():
        assert isinstance(family.baseline, baselines.Baseline), name
        assert callable(family.gold_and_predicted), name
    for spec in TASKS.values():
        assert baselines.describe(spec), spec.name


def test_a_baseline_without_training_labels_says_so():
    spec = TASKS["sst2"]
    features = {"input_ids": np.zeros((3, 8), dtype=np.int32)}
    with pytest.raises(ValueError, match="no class labels in the training features"):
        FAMILIES["classification"].baseline.outputs(spec, {"labels": np.array([-1, -1])}, features)
