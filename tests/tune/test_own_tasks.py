"""Your own tasks through the trainer and the whole sweep: task cards and the single-task flags
of flows/finetune.py, mixed with a built-in task, read from local files and from s3:// (the
loopback S3 server); the winners saved so that transformers loads them with the card's labels."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import pathlib

import pytest

from bertray.tasks import confusion
from bertray.tasks.card import card_from_mapping, card_mapping
from bertray.tasks.checks import check_card
from bertray.tune.trainer import TrialConfig, run_trial

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "own-task"


def _flow():
    spec = importlib.util.spec_from_file_location("finetune_flow_own", REPO / "flows" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def topics(path: pathlib.Path, n: int = 300) -> pathlib.Path:
    """A multilabel JSONL file from real SST-2 sentences: topic words and the sentiment as labels."""
    with open(SAMPLE / "train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            words = r["review"].split()
            labels = [t for t, keys in (("film", ("film", "movie")), ("people", ("he", "she", "characters")))
                      if any(k in words for k in keys)] + ([r["sentiment"]] if r["sentiment"] == "positive" else [])
            f.write(json.dumps({"sentence": r["review"], "labels": labels}) + "\n")
    return path


def test_a_multilabel_trial_exports_a_model_transformers_loads_as_multi_label(tiny_checkpoint, tmp_path):
    import transformers

    from bertray.model.config import BertConfig

    path = topics(tmp_path / "topics.jsonl")
    settled, _ = check_card(card_from_mapping({"name": "topics", "train": str(path), "text": "sentence",
                                               "label": "labels"}))
    assert settled.type == "multilabel"
    cfg = TrialConfig(task="topics", init_from=str(tiny_checkpoint), data=".", learning_rate=1e-3, batch_size=16,
                      epochs=1, max_train_examples=64, max_eval_examples=32, max_seq_len=32, save_model=True,
                      cache_dir=str(tmp_path / "cache"), card=card_mapping(settled))
    outcome = run_trial(cfg, files_dir=str(tmp_path / "files"))
    m = outcome.metrics
    assert m["score"] == m["dev_micro_f1"] and {"dev_macro_f1", "dev_exact_match"} <= set(m)
    model_dir = tmp_path / "files" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["threshold"] == 0.5
    assert config["id2label"] == {"0": "film", "1": "people", "2": "positive"}
    assert config["label2id"] == {"film": 0, "people": 1, "positive": 2}
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert loaded.config.problem_type == "multi_label_classification" and loaded.config.num_labels == 3
    assert BertConfig.from_json_file(model_dir / "config.json").num_labels == 3      # bertray reads it back
    rows = list(csv.reader((tmp_path / "files" / "dev_predictions.tsv").open(encoding="utf-8"), delimiter="\t"))
    assert rows[0] == ["index", "prediction", "label"] and len(rows) == 1 + 30      # a tenth of 300 held out
    assert all(set(json.loads(r[1])) <= {"film", "people", "positive"} for r in rows[1:])
    # each label scored as its own yes/no question, the same numbers as scikit-learn's
    import sklearn.metrics
    from sklearn.preprocessing import MultiLabelBinarizer

    scores = confusion.read_label_scores((tmp_path / "files" / confusion.LABEL_SCORES).read_text())
    assert [s.label for s in scores] == ["film", "people", "positive"]
    binarize = MultiLabelBinarizer(classes=["film", "people", "positive"])
    gold = binarize.fit_transform([json.loads(r[2]) for r in rows[1:]])
    predicted = binarize.transform([json.loads(r[1]) for r in rows[1:]])
    precision, recall, f1, support = sklearn.metrics.precision_recall_fscore_support(gold, predicted, average=None,
                                                                                    zero_division=0)
    assert [round(s.f1, 4) for s in scores] == [round(100 * x, 4) for x in f1]
    assert [s.support for s in scores] == list(support) and [round(s.recall, 4) for s in scores] == \
        [round(100 * x, 4) for x in recall]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cards_mixed_with_a_builtin_task_run_end_to_end(ray_cluster, tiny_checkpoint, samples, tmp_path, capsys):
    """sst2 (built in) beside three cards: classification from CSV with string labels, no dev file
    and an unlabelled test file; regression from Parquet; multilabel from zstd-compressed JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers
    import zstandard

    with open(samples / "glue" / "STS-B" / "train.tsv", encoding="utf-8") as f:
        sts = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:200]
    pq.write_table(pa.Table.from_pylist([{"a": r["sentence1"], "b": r["sentence2"], "sim": float(r["score"])}
                                         for r in sts]), tmp_path / "sts.parquet")
    plain = topics(tmp_path / "topics.jsonl").read_bytes()
    (tmp_path / "topics.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    (tmp_path / "cards.yaml").write_text(f"""
tasks:
  - {{name: reviews, train: {SAMPLE / 'train.csv'}, test: {SAMPLE / 'test.csv'}, text: review, label: sentiment}}
  - {{name: similarity, train: sts.parquet, dev: sts.parquet, text: [a, b], label: sim}}
  - {{name: topics, train: topics.jsonl.zst, text: sentence, label: labels}}
""")
    out = tmp_path / "out"
    code = _flow().main([
        "--init-from", str(tiny_checkpoint), "--label", "tiny", "--tasks", "sst2", "--data", str(samples),
        "--task-file", str(tmp_path / "cards.yaml"), "--lr", "1e-3", "--batch-size", "16", "--epochs", "1",
        "--max-train-examples", "64", "--max-eval-examples", "64", "--max-seq-len", "32", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "reviews: type classification (inferred from column 'sentiment': 2 distinct strings" in printed
    assert "similarity: type regression (inferred from column 'sim'" in printed
    assert "topics: type multilabel (inferred from column 'labels': lists of labels" in printed
    assert "reviews: no dev file: held out 10% of train (seed 0, stratified by class): 540 train / 60 dev" in printed
    assert "| checkpoint | SST-2 |" in printed and "| checkpoint | reviews | similarity | topics |" in printed
    latest = out / "latest"
    rows = list(csv.DictReader((latest / "results.csv").open(encoding="utf-8")))
    assert sorted(r["task"] for r in rows) == ["reviews", "similarity", "sst2", "topics"]
    assert all(r["status"] == "OK" for r in rows)
    by_task = {r["task"]: r for r in rows}
    assert float(by_task["reviews"]["score"]) == float(by_task["reviews"]["dev_accuracy"])
    assert float(by_task["similarity"]["score"]) == float(by_task["similarity"]["dev_pearson"])
    assert "dev_mse" in by_task["similarity"] and by_task["topics"]["score"] == by_task["topics"]["dev_micro_f1"]
    # the winners: Hugging Face folders with the card's labels; the unlabelled test file predicted
    reviews = latest / "models" / "tiny" / "reviews"
    config = json.loads((reviews / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["finetuning_task"] == "reviews"
    classify = transformers.pipeline("text-classification", model=str(reviews), tokenizer=str(reviews))
    assert classify("a moving, beautiful film")[0]["label"] in {"negative", "positive"}
    assert json.loads((latest / "models" / "tiny" / "topics" / "config.json").read_text())["problem_type"] \
        == "multi_label_classification"
    results_md = (latest / "results.md").read_text()
    assert "tiny / topics, each label as a yes/no question (label_scores.csv):" in results_md
    # multilabel end to end too: its baseline cell, a model transformers loads, its dev predictions
    baseline = next(line for line in printed.splitlines() if line.startswith("| trivial baseline |")
                    and line.count("|") == 5)                 # the own tasks' table: reviews, similarity, topics
    assert all(cell.strip() not in ("", "-") for cell in baseline.split("|")[2:5]), baseline
    topics_model = transformers.AutoModelForSequenceClassification.from_pretrained(latest / "models" / "tiny" / "topics")
    assert topics_model.config.problem_type == "multi_label_classification"
    assert (latest / "predictions" / "topics" / "dev_predictions.tsv").is_file()
    test = list(csv.reader((latest / "predictions" / "reviews" / "test_predictions.tsv").open(encoding="utf-8"),
                           delimiter="\t"))
    assert test[0] == ["index", "prediction"] and len(test) == 65 and test[1][0] == "2"    # file lines
    assert {r[1] for r in test[1:]} <= {"negative", "positive"}
    assert (latest / "predictions" / "sst2" / "SST-2.tsv").is_file()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_single_task_flags_read_s3_and_bad_data_stops_before_ray(ray_cluster, tiny_checkpoint, s3_bucket, tmp_path,
                                                                  capsys):
    """`--train/--dev/--test s3://... --text-field --label-field`: the issue's first command on the
    loopback S3 server, train gzip-compressed. Bad data exits 2 with the reason, before any trial."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/data/train.csv.gz", gzip.compress((SAMPLE / "train.csv").read_bytes()))
    fs.put(str(SAMPLE / "dev.csv"), f"{s3_bucket}/data/dev.csv")
    fs.put(str(SAMPLE / "test.csv"), f"{s3_bucket}/data/test.csv")
    url = f"s3://{s3_bucket}/data"
    flags = ["--init-from", str(tiny_checkpoint), "--train", f"{url}/train.csv.gz", "--dev", f"{url}/dev.csv",
             "--text-field", "review", "--output", str(tmp_path / "out")]
    assert _flow().main([*flags, "--label-field", "label"]) == 2
    assert f"own_task: {url}/train.csv.gz: no column 'label'; the columns are 'review', 'sentiment'" \
        in capsys.readouterr().err
    code = _flow().main([*flags, "--label-field", "sentiment", "--test", f"{url}/test.csv", "--task-name", "sst",
                         "--lr", "1e-3", "--batch-size", "16", "--epochs", "1", "--max-train-examples", "64",
                         "--max-eval-examples", "32", "--max-seq-len", "32"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "sst: classification, labels negative, positive; rows: train 600, dev 200, test 100" in printed
    latest = tmp_path / "out" / "latest"
    dev = list(csv.reader((latest / "predictions" / "sst" / "dev_predictions.tsv").open(encoding="utf-8"),
                          delimiter="\t"))
    gold = list(csv.DictReader((SAMPLE / "dev.csv").open(encoding="utf-8")))
    assert len(dev) == 33 and [r[2] for r in dev[1:]] == [g["sentiment"] for g in gold[:32]]
    assert len((latest / "predictions" / "sst" / "test_predictions.tsv").read_text().splitlines()) == 33
    (model,) = (latest / "models").glob("*/sst")
    assert f"{url}/train.csv.gz" in (model / "README.md").read_text()
