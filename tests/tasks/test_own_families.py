"""Your own tasks are the paper's tasks: a task card of SST-2, STS-B, CoNLL-2003, SQuAD v1.1 or
SWAG, written from ../shared/data as a user's file (CSV, Parquet, JSONL, column files; renamed
fields, string labels), reads into the same examples, featurizes into the same arrays and scores
the same outputs exactly as the built-in task. Also the multilabel family against scikit-learn.
No Ray, no training: outputs are random logits."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

import sklearn.metrics

from bertray.tasks import metrics, multilabel, ner
from bertray.tasks.card import card_from_mapping, card_spec
from bertray.tasks.checks import check_card
from bertray.tasks.registry import TASKS

N = 120          # rows of each dev file used


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


def settle(**card):
    settled, _ = check_card(card_from_mapping({"name": "mine", **card}))
    return card_spec(settled)


def same_features(a: dict, b: dict, keys=("input_ids", "token_type_ids", "attention_mask")) -> None:
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sst2_as_csv_with_string_labels_scores_as_sst2(tmp_path, shared_data, tokenizer):
    builtin = TASKS["sst2"]
    examples, _ = builtin.read(shared_data, "dev")
    examples = examples[:N]
    names = {"0": "negative", "1": "positive"}
    for split, part in (("train", examples[: N // 2]), ("dev", examples)):
        with open(tmp_path / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "sentiment"])
            writer.writerows([e.text_a, names[e.label]] for e in part)
    spec = settle(train=str(tmp_path / "train.csv"), dev=str(tmp_path / "dev.csv"), text="review",
                  label="sentiment")
    mine, counts = spec.read("/unused", "dev")
    assert counts == {"rows": N, "skipped": 0} and [e.text_a for e in mine] == [e.text_a for e in examples]
    ours, theirs = spec.featurize(mine, tokenizer, 64), builtin.featurize(examples, tokenizer, 64)
    same_features(ours, theirs, ("input_ids", "attention_mask", "labels"))
    logits = np.random.default_rng(0).normal(size=(N, 2))
    scores = spec.evaluate(mine, ours, {"logits": logits})
    assert scores["accuracy"] == builtin.evaluate(examples, theirs, {"logits": logits})["accuracy"]
    predicted = builtin.decode(examples, theirs, {"logits": logits})           # "0"/"1"
    gold = [e.label for e in examples]
    assert scores["f1"] == 100 * metrics.binary_f1(gold, predicted, positive="1")       # positive: the second label
    assert scores["macro_f1"] == pytest.approx(100 * sklearn.metrics.f1_score(gold, predicted, average="macro"))


def test_stsb_as_parquet_scores_as_stsb(tmp_path, shared_data, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    builtin = TASKS["stsb"]
    examples, _ = builtin.read(shared_data, "dev")
    examples = examples[:N]
    table = pa.Table.from_pylist([{"left": e.text_a, "right": e.text_b, "similarity": e.label} for e in examples])
    pq.write_table(table, tmp_path / "dev.parquet")
    spec = settle(train=str(tmp_path / "dev.parquet"), dev=str(tmp_path / "dev.parquet"), text=["left", "right"],
                  label="similarity", metrics=["spearman", "pearson"])
    assert spec.family == "regression"                              # inferred from the floats
    mine, _ = spec.read("/unused", "dev")
    ours, theirs = spec.featurize(mine, tokenizer, 64), builtin.featurize(examples, tokenizer, 64)
    same_features(ours, theirs, ("input_ids", "token_type_ids", "labels"))
    logits = np.random.default_rng(1).normal(size=(N, 1))
    assert spec.evaluate(mine, ours, {"logits": logits}) == builtin.evaluate(examples, theirs, {"logits": logits})
    default = settle(train=str(tmp_path / "dev.parquet"), dev=str(tmp_path / "dev.parquet"), text=["left", "right"],
                     label="similarity")
    assert default.metrics == ("pearson", "spearman", "mse")
    scores = default.evaluate(mine, ours, {"logits": logits})
    gold = np.array([e.label for e in examples])
    assert scores["mse"] == pytest.approx(np.mean((gold - logits[:, 0]) ** 2))     # in the label's units


def test_conll_as_jsonl_and_as_columns_scores_as_conll(tmp_path, shared_data, tokenizer):
    blocks = (shared_data / "conll2003" / "valid.txt").read_text().split("\n\n")[:N]
    (tmp_path / "valid.txt").write_text("\n\n".join(blocks) + "\n")            # a temporary copy, never in the repo
    builtin = TASKS["conll2003"]
    examples, _ = ner.read_conll(tmp_path / "valid.txt")
    with open(tmp_path / "dev.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"words": list(e.words), "ner": list(e.tags)}) + "\n")
    labels = list(ner.CONLL_LABELS)
    spec = settle(type="token", train=str(tmp_path / "dev.jsonl"), dev=str(tmp_path / "dev.jsonl"), text="words",
                  label="ner", labels=labels)
    columns = settle(train=str(tmp_path / "valid.txt"), dev=str(tmp_path / "valid.txt"), format="conll",
                     labels=labels)
    assert columns.family == "token"                               # a CoNLL file means a token task
    mine, _ = spec.read("/unused", "dev")
    assert [(e.words, e.tags) for e in mine] == [(e.words, e.tags) for e in examples]
    assert [(e.words, e.tags) for e in columns.read("/unused", "dev")[0]] == [(e.words, e.tags) for e in examples]
    ours, theirs = spec.featurize(mine, tokenizer, 64), builtin.featurize(examples, tokenizer, 64)
    same_features(ours, theirs, ("input_ids", "labels", "word_index"))
    logits = np.random.default_rng(2).normal(size=(*ours["input_ids"].shape, len(labels)))
    assert spec.evaluate(mine, ours, {"logits": logits}) == builtin.evaluate(examples, theirs, {"logits": logits})


def test_squad_as_jsonl_rows_scores_as_squad(tmp_path, shared_data, tokenizer):
    data = json.loads((shared_data / "squad" / "v1.1" / "dev-v1.1.json").read_text())
    article = {**data["data"][0], "paragraphs": data["data"][0]["paragraphs"][:3]}
    (tmp_path / "dev.json").write_text(json.dumps({"version": "1.1", "data": [article]}))
    builtin = TASKS["squad1"]
    from bertray.tasks.squad import read_squad

    examples, _ = read_squad(tmp_path / "dev.json")
    with open(tmp_path / "dev.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"id": e.qid, "q": e.question, "passage": e.context,
                                "answers": {"text": [a.text for a in e.answers],
                                            "answer_start": [a.start for a in e.answers]}}) + "\n")
    spec = settle(type="span", train=str(tmp_path / "dev.jsonl"), dev=str(tmp_path / "dev.jsonl"),
                  text=["q", "passage"])
    squad_file = settle(train=str(tmp_path / "dev.json"), dev=str(tmp_path / "dev.json"), format="squad",
                        text=["question", "context"])
    assert squad_file.family == "span" and not spec.allow_no_answer
    mine, _ = spec.read("/unused", "dev")
    assert [(e.qid, e.question, e.context, e.answers) for e in mine] == \
        [(e.qid, e.question, e.context, e.answers) for e in examples]
    ours, theirs = spec.featurize(mine, tokenizer, 128), builtin.featurize(examples, tokenizer, 128)
    same_features(ours, theirs, ("input_ids", "start_positions", "end_positions", "offset_mapping"))
    rng = np.random.default_rng(3)
    outputs = {"start_logits": rng.normal(size=ours["input_ids"].shape),
               "end_logits": rng.normal(size=ours["input_ids"].shape)}
    assert spec.evaluate(mine, ours, outputs) == builtin.evaluate(examples, theirs, outputs)


def test_unanswerable_questions_turn_on_the_no_answer_span(tmp_path):
    rows = [{"question": "who?", "context": "Ann met Bob.", "answers": [{"text": "Bob", "answer_start": 8}]},
            {"question": "where?", "context": "Ann met Bob.", "answers": []},
            {"question": "when?", "context": "Ann met Bob.", "answers": {"text": ["Ann"], "answer_start": [1]}}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settled, lines = check_card(card_from_mapping({"name": "qa", "type": "span", "train": str(tmp_path / "t.jsonl"),
                                                   "dev": str(tmp_path / "t.jsonl"), "max_bad_share": 0.5}))
    assert settled.no_answer is True and "tau" in card_spec(settled).metrics
    assert any("t.jsonl:3 (answer 'Ann' is not the context at answer_start=1)" in line for line in lines)


def test_swag_as_jsonl_with_a_choices_list_scores_as_swag(tmp_path, shared_data, tokenizer):
    from bertray.tasks.swag import read_swag

    examples, _ = read_swag(shared_data / "swag-sample" / "sample.json")
    with open(tmp_path / "mc.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"situation": e.context, "lead": e.start, "options": list(e.endings),
                                "answer": e.label}) + "\n")
    spec = settle(type="multiple_choice", train=str(tmp_path / "mc.jsonl"), dev=str(tmp_path / "mc.jsonl"),
                  text=["situation", "lead"], choices="options", label="answer")
    mine, _ = spec.read("/unused", "dev")
    assert [(e.context, e.start, e.endings, e.label) for e in mine] == \
        [(e.context, e.start, e.endings, e.label) for e in examples]
    ours, theirs = spec.featurize(mine, tokenizer, 64), TASKS["swag"].featurize(examples, tokenizer, 64)
    same_features(ours, theirs, ("input_ids", "token_type_ids", "labels"))
    logits = np.random.default_rng(4).normal(size=(len(mine), 4))
    assert spec.evaluate(mine, ours, {"logits": logits}) == TASKS["swag"].evaluate(examples, theirs,
                                                                                 {"logits": logits})


def test_three_choices_work_too(tmp_path, tokenizer):
    rows = [{"q": f"question {i}", "choices": ["red", "green", "blue"], "label": i % 3} for i in range(9)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = settle(type="multiple_choice", train=str(tmp_path / "mc.jsonl"), dev=str(tmp_path / "mc.jsonl"),
                  text="q")
    mine, _ = spec.read("/unused", "dev")
    features = spec.featurize(mine, tokenizer, 16)
    assert features["input_ids"].shape == (9, 3, 16)
    logits = np.eye(3)[[i % 3 for i in range(9)]]
    assert spec.evaluate(mine, features, {"logits": logits}) == {"accuracy": 100.0}


# --------------------------------------------------------------------------------------------
# Multilabel


def multilabel_rows(shared_data, n=200):
    with open(shared_data / "glue" / "SST-2" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    out = []
    for text, label in rows:     # topics from the words of real sentences, and the sentiment
        tags = [t for t, words in (("film", ("film", "movie")), ("people", ("he", "she", "characters")))
                if any(w in text.split() for w in words)]
        out.append({"text": text, "tags": tags + (["positive"] if label == "1" else [])})
    return out


def test_multilabel_reads_lists_and_delimited_strings_alike(tmp_path, shared_data, tokenizer):
    rows = multilabel_rows(shared_data)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "t.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "topics"])
        writer.writerows([r["text"], "|".join(r["tags"])] for r in rows)
    lists = settle(train=str(tmp_path / "t.jsonl"), text="text", label="tags")
    delimited = settle(type="multilabel", train=str(tmp_path / "t.csv"), text="sentence", label="topics",
                       label_delimiter="|")
    assert lists.family == delimited.family == "multilabel"
    assert lists.labels == delimited.labels == ("film", "people", "positive")
    assert lists.metrics == ("micro_f1", "macro_f1", "exact_match")
    a, _ = lists.read("/unused", "train")
    b, _ = delimited.read("/unused", "train")
    assert [(e.text_a, e.labels) for e in a] == [(e.text_a, e.labels) for e in b]
    features = lists.featurize(a, tokenizer, 32)
    expected = np.array([[label in e.labels for label in lists.labels] for e in a], dtype=np.float32)
    np.testing.assert_array_equal(features["labels"], expected)


def test_multilabel_decoding_and_scores_match_sklearn(shared_data):
    import sklearn.metrics as skm

    rows = multilabel_rows(shared_data)
    labels = ("film", "people", "positive")
    examples = [multilabel.MultiLabelExample(str(i), r["text"], None, tuple(r["tags"])) for i, r in enumerate(rows)]
    logits = np.random.default_rng(5).normal(size=(len(rows), 3))
    decoded = multilabel.decode_multilabel(logits, labels)
    assert decoded[0] == tuple(label for label, x in zip(labels, logits[0]) if x > 0)   # sigmoid > 0.5
    scores = multilabel.evaluate_multilabel(examples, logits, labels)
    gold = multilabel.indicator(examples, labels).astype(int)
    predicted = (logits > 0).astype(int)
    assert scores["micro_f1"] == pytest.approx(100 * skm.f1_score(gold, predicted, average="micro"))
    assert scores["macro_f1"] == pytest.approx(100 * skm.f1_score(gold, predicted, average="macro", zero_division=0))
    assert scores["exact_match"] == pytest.approx(100 * skm.accuracy_score(gold, predicted))


def test_the_sequence_head_trains_multilabel_with_binary_cross_entropy():
    import torch
    import torch.nn.functional as F

    from bertray.model.config import BertConfig
    from bertray.model.heads import BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, id2label={0: "a", 1: "b", 2: "c"})
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 100, (4, 7))
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.float32)
    out = model(ids, labels=targets)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))
    single = model(ids, labels=torch.tensor([0, 2, 1, 0]))              # class ids: still cross-entropy
    assert torch.allclose(single.loss, F.cross_entropy(single.logits, torch.tensor([0, 2, 1, 0])))
