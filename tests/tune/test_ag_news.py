"""A public four-class dataset, end to end, as a user with their own labelled data goes: the task
card flows/configs/ag-news.yaml on the AG News sample (samples/ag-news) -> the sweep
(flows/finetune.py, the real MiniLM checkpoint, one trial) -> the results table (trivial baseline
row, per-class scores, confusion matrix) -> the saved model (transformers loads it with the four
topics and predicts as the sweep did) -> batch prediction of the unlabelled test file
(flows/predict.py) -> the service (flows/serve.py) answering a request over HTTP.

MiniLM learns enough on 256 training rows, one epoch, to beat the majority class by far (measured
on a loaded 2-core machine: dev accuracy 79% against the baseline's 29.5%, about a minute of
training); the test asks for 20 points above the baseline."""

from __future__ import annotations

import csv
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CARD = REPO / "flows" / "configs" / "ag-news.yaml"
SAMPLE = REPO / "samples" / "ag-news"
TOPICS = ["World", "Sports", "Business", "Sci-Tech"]
MAX_SEQ_LEN = 48          # the sweep's; predict and serve read it from the saved config.json


def _tsv(path: pathlib.Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ag_news_from_task_card_to_service(ray_cluster, minilm_dir, flow, free_port, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq
    import requests
    import torch
    import transformers

    # 1. card -> sweep: one trial, the card's grid overridden for CI (lr, batch, 1 epoch, 256 rows)
    out = tmp_path / "finetune"
    code = flow("finetune").main([
        "--init-from", str(minilm_dir), "--label", "minilm", "--task-file", str(CARD), "--lr", "2e-4",
        "--batch-size", "16", "--epochs", "1", "--max-train-examples", "256", "--max-eval-examples", "200",
        "--max-seq-len", str(MAX_SEQ_LEN), "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ag_news: classification, labels World, Sports, Business, Sci-Tech; rows: train 1,200, dev 400, " \
           "test 100" in printed
    latest = out / "latest"

    # 2. the results: learned far beyond the majority class, per-class scores, confusion matrix
    rows = list(csv.DictReader((latest / "results.csv").open(encoding="utf-8")))
    assert len(rows) == 1 and rows[0]["status"] == "OK" and rows[0]["task"] == "ag_news", rows
    result = {k: float(v) for k, v in rows[0].items() if k.startswith("dev_") and v}
    assert float(rows[0]["score"]) == result["dev_accuracy"]
    assert result["dev_distinct_predictions"] == 4
    assert result["dev_accuracy"] >= result["dev_baseline_accuracy"] + 20, result
    assert result["dev_macro_f1"] >= result["dev_baseline_macro_f1"] + 20, result
    # the trial's clock (Unix times), from which benchmarks/own_task.py times the sweep's overhead
    assert 0 < float(rows[0]["train_ended_at"]) - float(rows[0]["first_step_at"]) < 600
    table = (latest / "results.md").read_text(encoding="utf-8")
    assert "| checkpoint | ag_news |" in table and "trivial baseline" in table
    assert "(constant)" not in table
    for topic in TOPICS:               # the per-class table of a classification winner
        assert f"| {topic} |" in table, table
    predictions = latest / "predictions" / "ag_news"
    confusion = list(csv.reader((predictions / "confusion.csv").open(encoding="utf-8")))   # rows: gold
    assert confusion[0][1:] == TOPICS and [r[0] for r in confusion[1:]] == TOPICS, confusion
    counts = [[int(c) for c in r[1:]] for r in confusion[1:]]
    assert sum(map(sum, counts)) == 200 and sum(counts[i][i] for i in range(4)) > 100
    assert (predictions / "confusion.png").stat().st_size > 0

    # 3. the saved model: a Hugging Face folder with the four topics, predicting as the sweep did
    model_dir = latest / "models" / "minilm" / "ag_news"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {str(i): t for i, t in enumerate(TOPICS)}
    assert config["label2id"] == {t: i for i, t in enumerate(TOPICS)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.num_labels == 4
    with open(SAMPLE / "dev.csv", encoding="utf-8", newline="") as f:
        dev = list(csv.DictReader(f))[:16]
    swept = _tsv(predictions / "dev_predictions.tsv")
    assert swept[0] == ["index", "prediction", "label"] and len(swept) == 1 + 200
    encoded = tokenizer([r["headline"] for r in dev], [r["body"] for r in dev], truncation="longest_first",
                        max_length=MAX_SEQ_LEN, padding=True, return_tensors="pt")
    with torch.no_grad():
        labels = [model.config.id2label[i] for i in model(**encoded).logits.argmax(-1).tolist()]
    assert labels == [r[1] for r in swept[1:17]]
    assert [r[2] for r in swept[1:17]] == [r["topic"] for r in dev]

    # 4. the unlabelled test file: predicted by the sweep, and by flows/predict.py the same way
    test = _tsv(predictions / "test_predictions.tsv")
    assert test[0] == ["index", "prediction"] and len(test) == 1 + 100
    assert {r[1] for r in test[1:]} <= set(TOPICS)
    code = flow("predict").main([       # no --max-seq-len: the model's own, as the sweep truncated
        "--model", str(model_dir), "--input", str(SAMPLE / "test.jsonl"), "--text-field", "headline",
        "--pair-field", "body", "--actors", "1", "--cpus-per-actor", "1", "--output", str(tmp_path / "predict")])
    assert code == 0, capsys.readouterr()
    shards = sorted((tmp_path / "predict").glob("*.parquet"))
    predicted = sorted((r for s in shards for r in pq.read_table(s).to_pylist()), key=lambda r: r["id"])
    assert [r["id"] for r in predicted] == [f"t{i:03d}" for i in range(100)]
    assert [r["prediction"] for r in predicted] == [r[1] for r in test[1:]]
    assert all(0.25 <= r["score"] <= 1 for r in predicted)
    summary = json.loads((tmp_path / "predict" / "_summary.json").read_text())
    assert summary["rows"] == 100 and summary["skipped_rows"] == 0

    # 5. the service: flows/serve.py's main, up to its wait loop, where it answers requests
    with open(SAMPLE / "test.jsonl", encoding="utf-8") as f:
        first = [json.loads(line) for line in f][:3]
    port, answers = free_port, []

    def ask_then_stop(seconds: float) -> None:        # main's `time.sleep(3600)`: the service is up
        url = f"http://127.0.0.1:{port}"
        answers.append(requests.get(f"{url}/healthz", timeout=60))
        answers.append(requests.post(f"{url}/predict", json={"pairs": [[r["headline"], r["body"]] for r in first]},
                                     timeout=120))
        raise KeyboardInterrupt                     # what Ctrl-C does: main deletes the application

    serve_flow = flow("serve")
    monkeypatch.setattr(serve_flow, "time", type("Clock", (), {"sleep": staticmethod(ask_then_stop)}))
    from ray import serve

    try:
        code = serve_flow.main(["--model", str(model_dir), "--port", str(port), "--cpus-per-replica", "0.5",
                                "--name", "ag-news"])
    finally:
        serve.shutdown()
    assert code == 0
    health, answer = answers
    assert health.status_code == 200 and health.json()["kind"] == "classification", health.text
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"]
    assert [p["label"] for p in got] == [r["prediction"] for r in predicted[:3]]
    assert [p["score"] for p in got] == pytest.approx([r["score"] for r in predicted[:3]], abs=1e-4)
    assert all(set(p["scores"]) == set(TOPICS) for p in got)
    assert f"serving {model_dir}" in capsys.readouterr().out
