"""Batch prediction (flows/predict.py) on a real local Ray, input and output on the loopback S3
server: predictions equal to the model run one text at a time by `transformers`, malformed rows
skipped, counted and named, and a job that died re-run to completion without duplicating or
losing a row. Also the inner loop alone (no Ray): pairs, questions, embeddings, file formats."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def sst2_sentences(shared_data, n: int) -> list[str]:
    lines = (shared_data / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    return [line.split("\t")[0] for line in lines]


def hf_probabilities(model_dir, texts, pairs=None) -> np.ndarray:
    """Class probabilities from `transformers`, one input at a time (no batching, no padding)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            encoded = tokenizer(text, pairs[i] if pairs else None, truncation=True, max_length=128,
                                return_tensors="pt")
            out.append(torch.softmax(model(**encoded).logits, -1)[0].numpy())
    return np.array(out)


def load_flow():
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_flow", REPO / "flows" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_output(fs, prefix: str):
    import pyarrow.parquet as pq

    names = sorted(p for p in fs.ls(prefix, refresh=True) if p.endswith(".parquet"))
    tables = [pq.read_table(fs.open(p, "rb")) for p in names]
    rows = [row for t in tables for row in t.to_pylist()]
    return names, rows


@pytest.fixture
def s3_inputs(s3_bucket, shared_data):
    """On S3: a text file (a blank line in it), a JSONL file with ids and two malformed rows, a
    Parquet file of 3 row groups (a null text in it). Returns (fs, bucket, {id: text}, bad rows)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    texts = sst2_sentences(shared_data, 30)
    expected = {}
    plain = texts[:8]
    fs.pipe(f"{s3_bucket}/in/reviews.txt", ("\n".join(plain[:4]) + "\n\n" + "\n".join(plain[4:]) + "\n").encode())
    for i, text in enumerate(plain):
        expected[f"s3://{s3_bucket}/in/reviews.txt:{i + 1 + (i >= 4)}"] = text
    jsonl = [json.dumps({"id": f"j{i}", "text": t}) for i, t in enumerate(texts[8:16])]
    jsonl.insert(3, '{"id": "broken", "text": ')                    # line 4: malformed JSON
    jsonl.insert(6, json.dumps({"id": "no-text", "body": "x"}))     # line 7: no text field
    fs.pipe(f"{s3_bucket}/in/tickets.jsonl", ("\n".join(jsonl) + "\n").encode())
    expected.update({f"j{i}": t for i, t in enumerate(texts[8:16])})
    column = texts[16:30] + [None]
    ids = [f"p{i}" for i in range(len(column))]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "text": column}), buffer, row_group_size=5)
    fs.pipe(f"{s3_bucket}/in/more.parquet", buffer.getvalue())
    expected.update({i: t for i, t in zip(ids, column) if t is not None})
    bad = [f"s3://{s3_bucket}/in/tickets.jsonl:4", f"s3://{s3_bucket}/in/tickets.jsonl:7",
           f"s3://{s3_bucket}/in/more.parquet:row 15"]
    return fs, s3_bucket, expected, bad


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_predict_on_s3_matches_transformers_and_names_bad_rows(ray_cluster, s3_inputs, sst2_model):
    fs, bucket, expected, bad = s3_inputs
    flow = load_flow()
    code = flow.main(["--model", str(sst2_model), "--input", f"s3://{bucket}/in/", "--output",
                      f"s3://{bucket}/out", "--cpus-per-actor", "0.5", "--actors", "2", "--rows-per-unit", "5",
                      "--batch-size", "4", "--chunk-rows", "7", "--embeddings", "mean"])
    assert code == 0
    names, rows = read_output(fs, f"{bucket}/out")
    assert len(names) == 1 + 1 + 3                          # text, JSONL, Parquet in 3 units of 5 rows
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == set(expected)
    order = sorted(expected)
    by_id = {r["id"]: r for r in rows}
    probabilities = hf_probabilities(str(sst2_model), [expected[i] for i in order])
    labels = ["negative", "positive"]
    assert [by_id[i]["prediction"] for i in order] == [labels[k] for k in probabilities.argmax(1)]
    np.testing.assert_allclose([by_id[i]["score"] for i in order], probabilities.max(1), atol=1e-4)
    assert len(by_id[order[0]]["embedding"]) == 384

    summary = json.loads(fs.cat(f"{bucket}/out/_summary.json"))
    assert summary["rows"] == len(expected) and summary["skipped_rows"] == 3
    assert [b.split(": ")[0] for b in sorted(summary["bad_rows"])] == sorted(bad)
    assert any("malformed JSON" in b for b in summary["bad_rows"])
    assert not [p for p in fs.find(f"{bucket}/out") if ".tmp" in p]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rerun_after_a_crash_neither_duplicates_nor_loses_rows(ray_cluster, s3_inputs, sst2_model):
    from bertray.errors import ConfigError
    from bertray.predict.job import PredictConfig, run_prediction

    fs, bucket, expected, _ = s3_inputs
    cfg = PredictConfig(model=str(sst2_model), input=(f"s3://{bucket}/in/",), output=f"s3://{bucket}/out",
                        rows_per_unit=5, cpus_per_actor=0.5, actors=1, fail_units=(2,))
    with pytest.raises(Exception, match="injected failure of unit 2"):
        run_prediction(cfg)
    written, rows = read_output(fs, f"{bucket}/out")
    assert 0 < len(written) < 5                       # the job died part-way
    assert not [p for p in fs.find(f"{bucket}/out") if ".tmp" in p]   # and left no half-written shard
    before = {p: fs.info(p)["LastModified"] for p in written}
    time.sleep(1.1)                                    # LastModified has whole seconds

    summary = run_prediction(PredictConfig(**{**cfg.__dict__, "fail_units": ()}))
    assert summary["shards_skipped"] == len(written) and summary["shards_written"] == 5 - len(written)
    names, rows = read_output(fs, f"{bucket}/out")
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == set(expected)
    assert summary["rows"] == len(expected)
    assert {p: fs.info(p)["LastModified"] for p in written} == before   # finished shards were not rewritten

    with pytest.raises(ConfigError, match="embeddings"):       # another job into the same output
        run_prediction(PredictConfig(**{**cfg.__dict__, "fail_units": (), "embeddings": "cls"}))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_token_model_on_ray_writes_entities(ray_cluster, ner_model, shared_data, tmp_path):
    """flows/predict.py with the sweep's NER model: one `entities` list per row, equal to the
    model run directly; a pair column is refused for it (exit code 2, the reason named)."""
    import pyarrow.parquet as pq

    from bertray.predict.model import load_model
    from bertray.predict.tagging import tag

    texts = conll_texts(shared_data, 40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "news.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "text": t, "other": t}) + "\n"
                                                        for i, t in enumerate(texts)))
    flow = load_flow()
    args = ["--model", str(ner_model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--actors", "1", "--cpus-per-actor", "1", "--batch-size", "8", "--chunk-rows", "16"]
    assert flow.main(args + ["--pair-field", "other"]) == 2
    assert flow.main(args) == 0
    tables = [pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))]
    assert len(tables) == 1 and tables[0].column_names == ["id", "entities"]
    rows = {r["id"]: r["entities"] for r in tables[0].to_pylist()}
    expected = tag(load_model(ner_model, device="cpu"), texts).entities
    assert sum(map(len, expected)) > 20
    for i, entities in enumerate(expected):
        got = rows[f"s{i}"]
        assert [{**e, "score": 0} for e in got] == [{**e.as_dict(), "score": 0} for e in entities]
        np.testing.assert_allclose([e["score"] for e in got], [e.score for e in entities], atol=1e-5)


# --------------------------------------------------------------------------------------------
# The inner loop and the readers, without Ray


def test_pairs_from_tsv_and_questions_from_jsonl(tmp_path, sst2_model, qa_model, shared_data):
    import pyarrow.parquet as pq

    from bertray.predict import shards
    from bertray.predict.inference import answer
    from bertray.predict.job import PredictConfig, predict_unit
    from bertray.predict.model import load_model

    texts = sst2_sentences(shared_data, 6)
    (tmp_path / "pairs.tsv").write_text("id\tfirst\tsecond\n" + "".join(
        f"{i}\t{a}\t{b}\n" for i, (a, b) in enumerate(zip(texts[:3], texts[3:]))) + "9\tonly one field\n")
    cfg = PredictConfig(model=str(sst2_model), input=(str(tmp_path),), output=str(tmp_path / "out"),
                        text_field="first", pair_field="second", batch_size=2)
    unit = shards.Unit(str(tmp_path / "pairs.tsv"), 0, shards.shard_name(str(tmp_path / "pairs.tsv"), 0))
    stats = predict_unit(load_model(sst2_model, device="cpu"), cfg, unit, 0)
    assert stats["rows"] == 3 and stats["skipped"] == 1 and stats["bad_rows"][0].startswith(f"{unit.url}:5: ")
    table = pq.read_table(tmp_path / "out" / unit.shard).to_pylist()
    probabilities = hf_probabilities(str(sst2_model), texts[:3], texts[3:])
    np.testing.assert_allclose([r["score"] for r in table], probabilities.max(1), atol=1e-4)
    assert shards.shard_stats(str(tmp_path / "out"), unit.shard)["skipped"] == 1

    context = ("Normandy is a region in France. The Normans gave their name to it in the 10th century, "
               "descended from Norse raiders.")
    rows = [{"question": "Where is Normandy?", "context": context, "id": "q1"},
            {"question": "Who were the Normans descended from?", "context": context}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = load_model(qa_model, device="cpu")
    cfg = PredictConfig(model=str(qa_model), input=(str(tmp_path),), output=str(tmp_path / "qa-out"))
    unit = shards.Unit(str(tmp_path / "qa.jsonl"), 0, "qa.parquet")
    predict_unit(qa, cfg, unit, 0)
    table = pq.read_table(tmp_path / "qa-out" / "qa.parquet").to_pylist()
    assert [r["id"] for r in table] == ["q1", f"{unit.url}:2"]
    direct = answer(qa, [r["question"] for r in rows], [context] * 2, batch_size=1)
    assert [r["prediction"] for r in table] == direct.prediction
    assert all(r["prediction"] in context and 0 <= r["score"] <= 1 for r in table)


def test_pairs_from_csv_the_way_task_cards_read_it(tmp_path, sst2_model, shared_data):
    """A CSV that fine-tuned a model predicts with it: RFC 4180 quoting (commas, a line break in a
    field), ids from the id column, an empty field skipped and named by the line its record starts."""
    import csv

    import pyarrow.parquet as pq

    from bertray.predict import shards
    from bertray.predict.job import PredictConfig, predict_unit
    from bertray.predict.model import load_model

    texts = sst2_sentences(shared_data, 6)
    first = [texts[0] + ", with a comma", texts[1] + "\nand a second line", texts[2]]
    with open(tmp_path / "pairs.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["id", "first", "second"], *([f"r{i}", a, b] for i, (a, b) in enumerate(zip(first, texts[3:]))),
                          ["r9", "", "an empty first field"]])
    cfg = PredictConfig(model=str(sst2_model), input=(str(tmp_path),), output=str(tmp_path / "out"),
                        text_field="first", pair_field="second", batch_size=2)
    unit = shards.Unit(str(tmp_path / "pairs.csv"), 0, "pairs.parquet")
    stats = predict_unit(load_model(sst2_model, device="cpu"), cfg, unit, 0)
    assert stats["rows"] == 3 and stats["bad_rows"] == [f"{unit.url}:6: field 'first' is empty"]
    table = pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist()
    assert [r["id"] for r in table] == ["r0", "r1", "r2"]
    np.testing.assert_allclose([r["score"] for r in table], hf_probabilities(str(sst2_model), first, texts[3:]).max(1),
                               atol=1e-4)


def test_sorted_batches_give_the_same_outputs_as_one_by_one(sst2_model, shared_data):
    """Sorting, packing and un-sorting change nothing: batch 16 equals batch 1, embeddings too."""
    from bertray.predict.inference import classify
    from bertray.predict.model import load_model

    loaded = load_model(sst2_model, device="cpu")
    texts = sst2_sentences(shared_data, 40)
    batched = classify(loaded, texts, batch_size=16, embeddings="mean")
    single = classify(loaded, texts, batch_size=1, embeddings="mean")
    np.testing.assert_allclose(batched.probabilities, single.probabilities, atol=1e-5)
    np.testing.assert_allclose(batched.embedding, single.embedding, atol=1e-4)
    cls = classify(loaded, texts[:3], batch_size=16, embeddings="cls").embedding
    assert not np.allclose(cls, batched.embedding[:3], atol=1e-3)


def test_models_without_a_prediction_format_are_refused(tmp_path, minilm_dir):
    """A saved multiple-choice model is refused by predict and serve alike, saying why."""
    from bertray.errors import ConfigError
    from bertray.model.heads import BertForMultipleChoice
    from bertray.predict.job import PredictConfig, run_prediction
    from bertray.predict.kinds import read_head
    from bertray.predict.model import load_model

    BertForMultipleChoice.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    for attempt in (lambda: read_head(tmp_path), lambda: load_model(tmp_path, device="cpu"),
                    lambda: run_prediction(PredictConfig(model=str(tmp_path), input=("x.txt",), output="out"))):
        with pytest.raises(ConfigError, match="BertForMultipleChoice is not supported for prediction: "
                                              "a multiple-choice model"):
            attempt()
    with pytest.raises(ConfigError, match="pretraining checkpoint|not a fine-tuned head"):
        read_head(minilm_dir)


# --------------------------------------------------------------------------------------------
# Token classification (NER) and multilabel models, against transformers' pipelines


def conll_texts(shared_data, n: int) -> list[str]:
    """The first `n` CoNLL-2003 dev sentences, their words joined by spaces (read in place)."""
    from bertray.tasks import ner

    examples, _ = ner.read_conll(shared_data / "conll2003" / "valid.txt")
    return [" ".join(e.words) for e in examples[:n]]


# Texts beyond CoNLL's tokenized sentences: spacing, accents, a character the vocabulary lacks
# ([UNK]), a literal special token, an empty text, several sentences in one text.
ODD_TEXTS = ["Angela Merkel met  Emmanuel Macron in Paris on Tuesday.", "",
             "Zoë Saldaña visited Köln and São Paulo \u2603 with U.N. officials from Nairobi,Kenya.",
             "EU rejects German call to boycott British lamb . [SEP] Peter Blackburn of Reuters reported",
             "   ", "Mr. O'Neill (Chicago Bulls) told ESPN: 'we won!' -- Michael Jordan-like."]


def test_token_model_matches_the_transformers_pipeline(ner_model, shared_data):
    """The sweep's saved NER model: bertray's entities equal `pipeline("token-classification",
    aggregation_strategy="simple")` on the same folder: groups, tags, words and character
    offsets exactly, scores to 1e-4."""
    import transformers

    from bertray.predict.model import load_model
    from bertray.predict.tagging import tag

    texts = conll_texts(shared_data, 300)
    texts += ODD_TEXTS + [" ".join(texts[:4])]
    pipe = transformers.pipeline("token-classification", model=str(ner_model), aggregation_strategy="simple",
                                 device=-1)
    theirs = pipe(texts, batch_size=16)
    loaded = load_model(ner_model, device="cpu")
    assert loaded.kind == "token" and loaded.labels[0] == "O"
    ours = tag(loaded, texts, batch_size=32).entities
    assert sum(map(len, theirs)) > 200                        # the model does tag entities
    assert len({g["entity_group"] for t in theirs for g in t}) >= 2
    assert any(" " in g["word"] for t in theirs for g in t)   # groups of several words
    for text, mine, reference in zip(texts, ours, theirs):
        assert [(e.entity_group, e.word, e.start, e.end) for e in mine] == \
            [(g["entity_group"], g["word"], g["start"], g["end"]) for g in reference], text
        np.testing.assert_allclose([e.score for e in mine], [float(g["score"]) for g in reference], atol=1e-4)


def test_long_texts_are_tagged_through_in_windows(ner_model, shared_data):
    """A text over max_seq_len tokens is tagged to its end, window by window, with offsets into
    the whole text; a text that fits gets the same entities at any window size."""
    import re

    from bertray.predict.model import load_model
    from bertray.predict.tagging import tag

    sentences = conll_texts(shared_data, 60)
    text = " ".join(sentences)
    loaded = load_model(ner_model, device="cpu", max_seq_len=64)
    assert len(loaded.tokenizer.encode(text, add_special_tokens=False).ids) > 10 * 62
    entities = tag(loaded, [text]).entities[0]
    squash = lambda s: re.sub(r"[\s#]", "", s).lower()      # noqa: E731
    assert all(squash(e.word) == squash(text[e.start:e.end]) for e in entities)
    assert all(a.end <= b.start for a, b in zip(entities, entities[1:]))
    assert entities[-1].start > len(text) * 0.9              # entities all the way to the end
    short = sentences[1]
    assert tag(loaded, [short]).entities == tag(load_model(ner_model, device="cpu"), [short]).entities


def test_feature_based_tagger_is_served_as_a_token_model(tmp_path, minilm_dir):
    """The sweep's other token head (frozen encoder + BiLSTM; no transformers class) predicts
    entities through the same path; its spans point into the text."""
    import re

    from bertray import wordpiece
    from bertray.model.heads import BertFeatureBasedTagger
    from bertray.predict.model import load_model
    from bertray.predict.tagging import tag

    import torch

    tags = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}
    torch.manual_seed(0)
    BertFeatureBasedTagger.from_pretrained(minilm_dir, id2label=tags, lstm_hidden_size=32, num_lstm_layers=1,
                                           num_feature_layers=2).save_pretrained(tmp_path)
    wordpiece.save(wordpiece.load(minilm_dir), tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.kind == "token" and loaded.labels == tuple(tags.values())
    texts = ["Angela Merkel met Emmanuel Macron in Paris .", "", "nothing here at all"]
    entities = tag(loaded, texts).entities
    assert len(entities) == 3 and entities[1] == [] and sum(map(len, entities)) > 0
    squash = lambda s: re.sub(r"[\s#]", "", s).lower()      # noqa: E731
    assert all(squash(e.word) == squash(text[e.start:e.end]) and e.entity_group in ("PER", "LOC")
               for text, found in zip(texts, entities) for e in found)


def test_multilabel_model_matches_the_transformers_pipeline(multilabel_model, shared_data, tmp_path):
    """Every label's sigmoid score equals `pipeline("text-classification", top_k=None,
    function_to_apply="sigmoid")`'s; the predicted labels are those over the threshold, highest
    first. The batch path writes them as `labels` and `scores` columns."""
    import pyarrow.parquet as pq
    import transformers

    from bertray.predict import shards
    from bertray.predict.inference import classify_multilabel
    from bertray.predict.job import PredictConfig, predict_unit
    from bertray.predict.model import load_model

    labels = ("sports", "politics", "business", "science")            # the fixture's id2label
    texts = sst2_sentences(shared_data, 40)
    loaded = load_model(multilabel_model, device="cpu")
    assert loaded.kind == "multilabel" and loaded.threshold == 0.5 and loaded.labels == labels
    ours = classify_multilabel(loaded, texts, batch_size=8)
    pipe = transformers.pipeline("text-classification", model=str(multilabel_model), top_k=None,
                                 function_to_apply="sigmoid", device=-1)
    theirs = [{d["label"]: d["score"] for d in row} for row in pipe(texts, truncation=True, max_length=128)]
    np.testing.assert_allclose(ours.probabilities, [[row[label] for label in labels] for row in theirs], atol=1e-5)
    assert ours.labels == [[k for k, v in sorted(row.items(), key=lambda kv: -kv[1]) if v > 0.5] for row in theirs]
    assert any(0 < len(chosen) < len(labels) for chosen in ours.labels)      # the threshold splits
    loaded.threshold = 0.0
    assert all(len(chosen) == 4 for chosen in classify_multilabel(loaded, texts[:3]).labels)
    loaded.threshold = 0.5

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n"
                                               for i, t in enumerate(texts[:6])))
    cfg = PredictConfig(model=str(multilabel_model), input=(str(tmp_path),), output=str(tmp_path / "out"),
                        embeddings="cls")
    unit = shards.Unit(str(tmp_path / "in.jsonl"), 0, "in.parquet")
    assert predict_unit(loaded, cfg, unit, 0)["rows"] == 6
    table = pq.read_table(tmp_path / "out" / "in.parquet")
    assert table.column_names == ["id", "labels", "scores", "embedding"]
    rows = table.to_pylist()
    assert [r["labels"] for r in rows] == ours.labels[:6]
    np.testing.assert_allclose([[r["scores"][label] for label in labels] for r in rows], ours.probabilities[:6],
                               atol=1e-6)
