"""Confusion matrices: counts, per-class scores against the metrics module, the CSV round trip and
the pictures the sweep draws for its winners."""

from __future__ import annotations

import numpy as np
import pytest

from bertray import wordpiece
from bertray.tasks import confusion, metrics
from bertray.tasks.registry import FAMILIES, TASKS


def test_counts_and_per_class_scores_match_the_metrics_module():
    gold = ["a", "a", "b", "c", "c", "c", "b"]
    predicted = ["a", "b", "b", "c", "a", "c", "c"]
    matrix = confusion.confusion_matrix(gold, predicted, ("a", "b", "c"))
    assert matrix.counts.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 2]] and matrix.total == len(gold)
    scores = {s.label: s for s in confusion.per_class(matrix)}
    for label in "abc":
        assert scores[label].f1 == pytest.approx(100 * metrics.binary_f1(gold, predicted, positive=label))
        assert scores[label].support == gold.count(label) and scores[label].predicted == predicted.count(label)
    assert scores["c"].precision == pytest.approx(200 / 3) and scores["c"].recall == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="outside the label set"):
        confusion.confusion_matrix(["a"], ["d"], ("a", "b"))


def test_mrpc_constant_predictor_matrix_sums_to_the_dev_size(shared_data, minilm_dir):
    spec = TASKS["mrpc"]
    tokenizer = wordpiece.load(minilm_dir)
    examples, _ = spec.read(shared_data, "dev")
    features = spec.featurize(examples, tokenizer)
    outputs = FAMILIES["classification"].baseline.outputs(spec, {"labels": np.array([1, 1, 0])}, features)
    matrix = confusion.split_confusion(spec, "dev", examples, features, outputs)
    assert matrix.total == len(examples) == 408
    assert matrix.counts[:, 0].sum() == 0                       # never predicts "0": one empty column
    positive = {s.label: s for s in confusion.per_class(matrix)}["1"]
    assert round(positive.f1, 1) == 81.2 and positive.recall == 100.0
    assert confusion.split_confusion(TASKS["stsb"], "dev", [], {}, {}) is None      # no label set, no matrix


def test_csv_round_trip_and_pictures_beside_it(tmp_path):
    matrix = confusion.Confusion(("neg", "pos"), np.array([[5, 2], [1, 7]]), "dev_matched")
    assert confusion.write_csv(matrix, str(tmp_path), first=True).endswith("/confusion.csv")
    other = confusion.Confusion(("neg", "pos"), np.array([[1, 0], [0, 1]]), "dev_mismatched")
    confusion.write_csv(other, str(tmp_path), first=False)
    assert (tmp_path / "confusion.csv").read_text().splitlines() == ["gold\\predicted,neg,pos", "neg,5,2", "pos,1,7"]
    drawn = confusion.draw_folder(str(tmp_path), "dev_matched", "bert / mnli")
    assert list(drawn) == ["dev_matched", "dev_mismatched"]
    assert drawn["dev_matched"].counts.tolist() == [[5, 2], [1, 7]] and drawn["dev_matched"].labels == ("neg", "pos")
    for name in ("confusion.png", "confusion_dev_mismatched.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a confusion matrix"):
        confusion.from_csv("index,prediction\n1,2\n")
