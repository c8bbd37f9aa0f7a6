"""Task cards (bertray.tasks.card) and the driver's checks of their data (bertray.tasks.checks):
validation at the edge, type inference, bad rows, held-out dev splits, leaks, unseen labels.
Pure functions, no Ray; real rows from samples/ rewritten as a user's files."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import pathlib
import re

import pytest

from bertray.errors import ConfigError, TaskDataError
from bertray.tasks import own
from bertray.tasks.card import card_from_flags, card_from_mapping, card_spec, load_cards
from bertray.tasks.checks import check_card, infer_type, label_order, tag_order

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "own-task"
STSB = REPO / "samples" / "glue" / "STS-B"


def card(**kw):
    base = {"name": "mine", "train": str(SAMPLE / "train.csv"), "text": "review", "label": "sentiment"}
    return card_from_mapping({**base, **kw})


def sample_rows(name: str = "train.csv") -> list[dict[str, str]]:
    with open(SAMPLE / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: pathlib.Path, rows: list[dict], header: list[str] | None = None) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# --------------------------------------------------------------------------------------------
# Cards


def test_a_card_is_validated_at_the_edge_with_the_key_named():
    with pytest.raises(ConfigError, match=r"unknown key 'lable'.*did you mean label"):
        card(lable="x")
    with pytest.raises(ConfigError, match=r"type: 'sentiment' is not allowed"):
        card(type="sentiment")
    with pytest.raises(ConfigError, match="text: give 1 or 2 field name"):
        card(text=["a", "b", "c"])
    with pytest.raises(ConfigError, match="text: give 2 field name.*span"):
        card(type="span", text=["question"])
    with pytest.raises(ConfigError, match="'sst2' is a built-in task"):
        card(name="sst2")
    with pytest.raises(ConfigError, match="name: must be a folder name"):
        card(name="a/b")
    with pytest.raises(ConfigError, match="mse cannot come first"):
        card(type="regression", metrics=["mse", "pearson"])
    with pytest.raises(ConfigError, match="metrics: exact_match not available for classification"):
        card(type="classification", metrics=["exact_match"])
    with pytest.raises(ConfigError, match="max_bad_share"):
        card(max_bad_share=1.5)
    with pytest.raises(ConfigError, match=r"grid.epochs: give at least one value"):
        card(grid={"epochs": []})
    with pytest.raises(ConfigError, match="label: give the label field"):
        card_from_mapping({"name": "x", "train": "t.csv", "text": "a"})


def test_type_defaults_fill_the_fields_a_type_reads():
    assert card(type="token", text=[], label=None).text == ("tokens",)
    assert card(type="span", text=[], label=None).label == "answers"
    c = card(type="multiple_choice", text="ctx", label=None)
    assert (c.choices, c.label) == ("choices", "label")


def test_card_files_one_task_a_list_or_tasks_and_paths_from_the_card_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cards"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.csv").write_text("t,l\n")
    (folder / "one.yaml").write_text("name: a\ntrain: data/train.csv\ntext: t\nlabel: l\n")
    (folder / "list.yaml").write_text("- {name: a, train: data/train.csv, text: t, label: l}\n"
                                      "- {name: b, train: s3://bucket/x.csv, text: [t, u], label: 3}\n")
    (folder / "tasks.yaml").write_text("tasks:\n  - {name: a, train: other.csv, text: t, label: l}\n")
    monkeypatch.chdir(tmp_path)
    (one,) = load_cards(folder / "one.yaml")
    assert one.train == str(folder / "data" / "train.csv")          # beside the card
    a, b = load_cards(folder / "list.yaml")
    assert (b.train, b.text, b.label) == ("s3://bucket/x.csv", ("t", "u"), "3")
    assert load_cards(folder / "tasks.yaml")[0].train == str(tmp_path / "other.csv")   # else the working dir
    (folder / "bad.yaml").write_text("- {name: a, train: t.csv, text: t, label: l, grid: {lr: [1]}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: task 1 \(a\): unknown key 'grid.lr'"):
        load_cards(folder / "bad.yaml")
    with pytest.raises(ConfigError, match="no such task file"):
        load_cards(folder / "missing.yaml")


def test_flags_make_the_same_card():
    flags = card_from_flags(train=str(SAMPLE / "train.csv"), dev=str(SAMPLE / "dev.csv"), text_fields=["review"],
                            label_field="sentiment", task_name="mine")
    assert flags == card(dev=str(SAMPLE / "dev.csv"))
    with pytest.raises(ConfigError, match="label"):
        card_from_flags(train="t.csv", text_fields=["a"])


# --------------------------------------------------------------------------------------------
# Type inference


@pytest.mark.parametrize("labels, texts, expected", [
    (["positive", "negative", "positive"], [], ("classification", "2 distinct strings")),
    ([0, 1, 2, 1], [], ("classification", "3 distinct integers")),
    (["0", "1", "1"], [], ("classification", "2 distinct integers")),
    ([True, False], [], ("classification", "2 distinct booleans")),
    (list(range(40)), [], ("regression", "40 distinct integers (more than 20)")),
    ([0.5, 1.0, 3.2], [], ("regression", "numbers with decimals")),
    (["3.800", "5.000", ""], [], ("regression", "numbers with decimals")),
    ([["a", "b"], [], ["c"]], ["x", "y", "z"], ("multilabel", "lists of labels")),
    (['["a", "b"]', "[]"], ["x", "y"], ("multilabel", "lists of labels")),
    ([["O", "B-PER"]], [["John", "Smith"]], ("token", "lists of tags beside lists of tokens")),
])
def test_the_type_is_inferred_from_the_label_column(labels, texts, expected):
    assert infer_type(labels, texts) == expected


def test_inference_on_real_files_is_printed_in_one_line(tmp_path):
    rows = list(csv.reader(open(STSB / "train.tsv", encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    records = [{"first": r[header.index("sentence1")], "second": r[header.index("sentence2")],
                "similarity": r[header.index("score")]} for r in rows[1:301]]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps({**r, "similarity": float(r["similarity"])}) + "\n" for r in records))
    settled, lines = check_card(card(train=str(path), text=["first", "second"], label="similarity"))
    assert settled.type == "regression" and settled.labels == ()
    inferred = [line for line in lines if "inferred" in line]
    assert inferred == ["mine: type regression (inferred from column 'similarity': numbers with decimals; set "
                        "`type` to change it)"]
    settled, lines = check_card(card())
    assert settled.type == "classification" and settled.labels == ("negative", "positive")
    assert "2 distinct strings" in lines[0]


def test_label_orders():
    assert label_order(["10", "2", "1"]) == ("1", "2", "10")
    assert label_order(["tech", "billing"]) == ("billing", "tech")
    assert tag_order(["I-PER", "O", "B-ORG", "B-PER", "I-ORG"]) == ("O", "B-ORG", "I-ORG", "B-PER", "I-PER")


# --------------------------------------------------------------------------------------------
# Checks


def test_missing_files_and_columns_are_named(tmp_path):
    with pytest.raises(TaskDataError, match=r"mine: train/dev: .*nothere.csv: no such file"):
        check_card(card(train=str(SAMPLE / "nothere.csv")))
    with pytest.raises(TaskDataError, match=r"train.csv: no column 'text'; the columns are 'review', 'sentiment'"):
        check_card(card(type="classification", text="text"))
    test = write_csv(tmp_path / "test.csv", [{"id": "1", "body": "fine"}])
    with pytest.raises(TaskDataError, match=r"test.csv: no column 'review'; the columns are 'id', 'body'"):
        check_card(card(type="classification", test=test))


def test_a_single_class_and_labels_train_lacks_are_refused(tmp_path):
    rows = sample_rows()
    one = write_csv(tmp_path / "one.csv", [r for r in rows if r["sentiment"] == "positive"])
    with pytest.raises(TaskDataError, match=r"train has 1 distinct classes \('positive' \(\d+ rows\)\)"):
        check_card(card(train=one))
    dev = sample_rows("dev.csv")
    dev[3]["sentiment"], dev[7]["sentiment"], dev[9]["sentiment"] = "neutral", "neutral", "mixed"
    dev_path = write_csv(tmp_path / "dev.csv", dev)
    with pytest.raises(TaskDataError, match=re.escape("dev has classes that train lacks: 'neutral' (2 rows), "
                                                      "'mixed' (1 row)")):
        check_card(card(dev=dev_path))
    with pytest.raises(TaskDataError, match=r"classes not in the card's `labels`: 'positive'"):
        check_card(card(labels=["negative", "neutral"]))


def test_bad_rows_are_skipped_counted_and_named_until_there_are_too_many(tmp_path):
    rows = sample_rows()
    for i in (4, 10, 20, 30):
        rows[i]["review"] = " "
    rows[15]["sentiment"] = ""
    path = write_csv(tmp_path / "train.csv", rows)
    text = pathlib.Path(path).read_text().splitlines()
    text[50] += ",extra"                                         # a wrong number of fields at line 51
    pathlib.Path(path).write_text("\n".join(text) + "\n")
    settled, lines = check_card(card(train=path, dev=str(SAMPLE / "dev.csv")))
    (bad,) = [line for line in lines if "bad row" in line]
    assert bad == (f"mine: train: skipped 6 bad rows of 600: {path}:6 (empty text in 'review'), {path}:12 (empty "
                   f"text in 'review'), {path}:17 (missing label), ... 6 in all")
    spec = card_spec(settled)
    examples, counts = spec.read("/unused", "train")
    assert counts == {"rows": 594, "skipped": 6} and len(examples) == 594
    with pytest.raises(TaskDataError, match=r"6 of 600 rows are bad \(1.0%, more than max_bad_share 0%\): "
                                            rf"{re.escape(path)}:6 \(empty text in 'review'\)"):
        check_card(card(train=path, dev=str(SAMPLE / "dev.csv"), max_bad_share=0.005))


def test_without_a_dev_file_a_stratified_seeded_tenth_is_held_out():
    rows = sample_rows()
    settled, lines = check_card(card())
    spec = card_spec(settled)
    train, _ = spec.read("/unused", "train")
    dev, _ = spec.read("/unused", "dev")
    assert len(train) + len(dev) == len(rows) and not {e.guid for e in train} & {e.guid for e in dev}
    whole = collections.Counter(r["sentiment"] for r in rows)
    held = collections.Counter(e.label for e in dev)
    for label, n in whole.items():                      # a tenth of every class, to within one per run of ten
        assert abs(held[label] - n / 10) <= 1, (label, held[label], n)
    assert f"held out 10% of train (seed 0, stratified by class): {len(train)} train / {len(dev)} dev rows" \
        in " ".join(lines)
    again, _ = card_spec(check_card(card())[0]).read("/unused", "dev")
    other, _ = card_spec(check_card(card(holdout_seed=1))[0]).read("/unused", "dev")
    assert [e.guid for e in again] == [e.guid for e in dev] != [e.guid for e in other]


def test_rows_in_both_train_and_dev_are_reported_as_a_leak(tmp_path):
    dev = sample_rows("dev.csv")[:50] + sample_rows()[100:105]
    path = write_csv(tmp_path / "dev.csv", dev)
    _, lines = check_card(card(dev=path))
    assert "mine: leak: 5 of 55 dev rows also occur in train (same text); they inflate the dev score" in lines


def test_an_unlabelled_test_file_is_found_and_a_labelled_one_scored():
    settled, lines = check_card(card(dev=str(SAMPLE / "dev.csv"), test=str(SAMPLE / "test.csv")))
    assert settled.test_labelled is False
    spec = card_spec(settled)
    assert spec.dev_splits == ("dev",) and spec.test_splits == ("test",)
    test, _ = spec.read("/unused", "test")
    assert len(test) == 100 and all(e.label is None for e in test)
    labelled, _ = check_card(card(dev=str(SAMPLE / "dev.csv"), test=str(SAMPLE / "dev.csv")))
    assert card_spec(labelled).dev_splits == ("dev", "test") and card_spec(labelled).test_splits == ()


def test_binary_metrics_and_their_positive_class():
    settled, _ = check_card(card(dev=str(SAMPLE / "dev.csv")))
    assert card_spec(settled).metrics == ("accuracy", "macro_f1", "f1")
    three = dataclasses.replace(settled, labels=("a", "b", "c"))
    assert card_spec(three).metrics == ("accuracy", "macro_f1")
    with pytest.raises(ConfigError, match="f1 is the positive class's F1 of a two-class task"):
        card_spec(dataclasses.replace(three, metrics=("f1",)))


def test_the_settled_card_travels_as_plain_values():
    from bertray.config import from_mapping
    from bertray.tune.trainer import TrialConfig

    settled, _ = check_card(card(dev=str(SAMPLE / "dev.csv"), grid={"learning_rates": [1e-4], "epochs": [1]}))
    trial = TrialConfig(task="mine", init_from=".", data=".", learning_rate=1e-4, batch_size=8, epochs=1,
                        card=own_mapping(settled))
    shipped = json.loads(json.dumps(dataclasses.asdict(trial)))
    again = from_mapping(TrialConfig, shipped)
    assert again.spec == card_spec(settled) and again.spec.grid.learning_rates == (1e-4,)
    assert again.spec.grid.batch_sizes == (16, 32)                     # what the card left to A.3
    with pytest.raises(ConfigError, match="the card describes 'mine', not the task 'other'"):
        TrialConfig(task="other", init_from=".", data=".", learning_rate=1e-4, batch_size=8, epochs=1,
                    card=own_mapping(settled))


def own_mapping(settled):
    from bertray.tasks.card import card_mapping

    return card_mapping(settled)


def test_held_out_is_one_of_every_ten_per_stratum():
    chosen = [i for i in range(1000) if own.held_out(0, "x", i)]
    assert len(chosen) == 100 and all(len([c for c in chosen if c // 10 == run]) == 1 for run in range(100))
