"""Your own tasks are the paper's tasks, trained: one real Ray Tune sweep (one `flows/finetune.py`
call) runs six built-in tasks (sst2, mrpc, stsb, conll2003, squad1, swag) beside six task cards of
the same rows written as a user would have them, from ../shared/data into a temporary folder:

    sst2_csv      SST-2 as CSV, columns renamed, labels "negative"/"positive"
    mrpc_jsonl    MRPC as JSONL (a pair), fields renamed, labels "not_equivalent"/"equivalent"
    stsb_parquet  STS-B as Parquet (regression)
    conll_jsonl   CoNLL-2003: train and dev as JSONL word/tag lists under renamed fields, test as
                  the CoNLL column file itself (labelled, so scored as the built-in's test is)
    squad_jsonl   SQuAD v1.1 as JSONL rows: question, passage and answers in Hugging Face's layout
    swag_jsonl    SWAG as JSONL with a list of choices and the right one's index

Same checkpoint, seed, single grid point and slices: every card scores exactly what its built-in
task scores (results.csv, every number to the last digit, training loss included; the printed
table cells, baselines included) and its winner's weights are the built-in's, bit for bit. How a card pins its label ids: with string labels, a card
lists `labels:` in the built-in's order (MRPC's "not_equivalent" first, as "0" is), so each
class gets the built-in's id; sorted alphabetically, "equivalent" would have come first and
the head's rows would be swapped. CoNLL's card lists the nine tags in `ner.CONLL_LABELS` order.

And, per card type (classification, regression, token, span, multiple_choice), the contract: a
trivial-baseline row in the table, the winner saved as a Hugging Face folder that `transformers`
loads with the type's Auto class, and predictions written for the card's test file. Without
Ray: a token card tags an unlabelled CoNLL file of words alone, with no made-up gold column.

CoNLL-2003 never enters the repository: its sentences are written to pytest's tmp_path only.
"""

from __future__ import annotations

import csv
import json
import pathlib
import shutil

import pytest

from bertray.tasks.ner import CONLL_LABELS
from bertray.tasks.registry import TASKS

REPO = pathlib.Path(__file__).resolve().parents[2]
N_TRAIN, N_EVAL, N_TEST, SEQ = 48, 32, 12, 64
# (card, the built-in it mirrors, its type, the Auto class, its test predictions file)
PAIRS = (
    ("sst2_csv", "sst2", "classification", "AutoModelForSequenceClassification", "test_predictions.tsv"),
    ("mrpc_jsonl", "mrpc", "classification", "AutoModelForSequenceClassification", "test_predictions.tsv"),
    ("stsb_parquet", "stsb", "regression", "AutoModelForSequenceClassification", "test_predictions.tsv"),
    ("conll_jsonl", "conll2003", "token", "AutoModelForTokenClassification", "test_predictions.txt"),
    ("squad_jsonl", "squad1", "span", "AutoModelForQuestionAnswering", "test_predictions.json"),
    ("swag_jsonl", "swag", "multiple_choice", "AutoModelForMultipleChoice", "test_predictions.tsv"),
)
# results.csv columns of what a trial learned, besides its splits' `{split}_...` metrics (not its
# identity, timings or speed)
LEARNED = ("status", "learning_rate", "batch_size", "epochs", "seed", "score", "epoch", "step", "train_loss")


# --------------------------------------------------------------------------------------------
# The built-in tasks' data root: a few rows of each official file, in its official layout


def _head_lines(source: pathlib.Path, target: pathlib.Path, rows: int) -> None:
    """The header and the first `rows` lines of a line-based file, bytes as they are (MRPC's BOM)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(source.read_bytes().splitlines(keepends=True)[:rows + 1]))


def data_root(shared: pathlib.Path, root: pathlib.Path, swag: pathlib.Path) -> pathlib.Path:
    for folder in ("SST-2", "MRPC", "STS-B"):
        _head_lines(shared / "glue" / folder / "train.tsv", root / "glue" / folder / "train.tsv", N_TRAIN + 8)
        _head_lines(shared / "glue" / folder / "dev.tsv", root / "glue" / folder / "dev.tsv", N_EVAL + 8)
    # SQuAD v1.1: only dev exists here; its first article trains, its second is dev
    squad = json.loads((shared / "squad" / "v1.1" / "dev-v1.1.json").read_text(encoding="utf-8"))
    (root / "squad" / "v1.1").mkdir(parents=True)
    for name, article, paragraphs in (("train-v1.1.json", 0, 12), ("dev-v1.1.json", 1, 8)):
        part = {**squad["data"][article], "paragraphs": squad["data"][article]["paragraphs"][:paragraphs]}
        (root / "squad" / "v1.1" / name).write_text(json.dumps({"version": "1.1", "data": [part]}), encoding="utf-8")
    # SWAG: the official CSV layout of the 10-example sample (6 train, 4 dev), as `families_root` has it
    shutil.copytree(swag, root / "swag")
    # CoNLL-2003: the first sentences of each file (a temporary copy, never in the repository)
    (root / "conll2003").mkdir()
    for name, sentences in (("train.txt", N_TRAIN + 8), ("valid.txt", N_EVAL + 8), ("test.txt", N_EVAL + 8)):
        blocks = (shared / "conll2003" / name).read_text(encoding="utf-8").split("\n\n")[:sentences]
        (root / "conll2003" / name).write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------
# The cards: the same rows, as a user's files


def _jsonl(path: pathlib.Path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _csv(path: pathlib.Path, header, rows) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def cards(root: pathlib.Path, out: pathlib.Path) -> list[dict]:
    """The six cards (see the module docstring), their rows read from `root` by the built-in readers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def read(task, split):
        return TASKS[task].read(root, split)[0]

    sentiment = {"0": "negative", "1": "positive"}
    sst_train, sst_dev = read("sst2", "train"), read("sst2", "dev")
    paraphrase = {"0": "not_equivalent", "1": "equivalent"}

    def pairs(examples, labelled=True):
        return [{"first": e.text_a, "second": e.text_b, **({"paraphrase": paraphrase[e.label]} if labelled else {})}
                for e in examples]

    mrpc_train, mrpc_dev = read("mrpc", "train"), read("mrpc", "dev")

    def similarity(examples, labelled=True):
        return pa.Table.from_pylist([{"left": e.text_a, "right": e.text_b, **({"sim": e.label} if labelled else {})}
                                     for e in examples])

    for name, examples in (("train", read("stsb", "train")), ("dev", read("stsb", "dev"))):
        pq.write_table(similarity(examples), out / f"sts-{name}.parquet")
    pq.write_table(similarity(read("stsb", "dev")[:N_TEST], labelled=False), out / "sts-test.parquet")

    def tagged(examples):
        return [{"words": list(e.words), "ner": list(e.tags)} for e in examples]

    (out / "conll-test.txt").write_bytes((root / "conll2003" / "test.txt").read_bytes())

    def questions(examples, labelled=True):
        return [{"id": e.qid, "q": e.question, "passage": e.context,
                 **({"answers": {"text": [a.text for a in e.answers], "answer_start": [a.start for a in e.answers]}}
                    if labelled else {})} for e in examples]

    squad_dev = read("squad1", "dev")

    def situations(examples, labelled=True):
        return [{"situation": e.context, "lead": e.start, "choices": list(e.endings),
                 **({"answer": e.label} if labelled else {})} for e in examples]

    swag_dev = read("swag", "dev")
    return [
        {"name": "sst2_csv", "type": "classification", "text": "review", "label": "sentiment",
         "labels": ["negative", "positive"], "metrics": list(TASKS["sst2"].metrics),
         "train": _csv(out / "sst-train.csv", ["review", "sentiment"], [[e.text_a, sentiment[e.label]]
                                                                        for e in sst_train]),
         "dev": _csv(out / "sst-dev.csv", ["review", "sentiment"], [[e.text_a, sentiment[e.label]] for e in sst_dev]),
         "test": _csv(out / "sst-test.csv", ["review"], [[e.text_a] for e in sst_dev[:N_TEST]])},
        {"name": "mrpc_jsonl", "type": "classification", "text": ["first", "second"], "label": "paraphrase",
         "labels": ["not_equivalent", "equivalent"],          # "0", "1": the built-in's order, not sorted
         "metrics": list(TASKS["mrpc"].metrics),
         "train": _jsonl(out / "mrpc-train.jsonl", pairs(mrpc_train)),
         "dev": _jsonl(out / "mrpc-dev.jsonl", pairs(mrpc_dev)),
         "test": _jsonl(out / "mrpc-test.jsonl", pairs(mrpc_dev[:N_TEST], labelled=False))},
        {"name": "stsb_parquet", "type": "regression", "text": ["left", "right"], "label": "sim",
         "metrics": list(TASKS["stsb"].metrics), "train": str(out / "sts-train.parquet"),
         "dev": str(out / "sts-dev.parquet"), "test": str(out / "sts-test.parquet")},
        {"name": "conll_jsonl", "type": "token", "text": "words", "label": "ner", "labels": list(CONLL_LABELS),
         "train": _jsonl(out / "conll-train.jsonl", tagged(read("conll2003", "train"))),
         "dev": _jsonl(out / "conll-dev.jsonl", tagged(read("conll2003", "dev"))),
         "test": str(out / "conll-test.txt")},
        {"name": "squad_jsonl", "type": "span", "text": ["q", "passage"],
         "train": _jsonl(out / "squad-train.jsonl", questions(read("squad1", "train"))),
         "dev": _jsonl(out / "squad-dev.jsonl", questions(squad_dev)),
         "test": _jsonl(out / "squad-test.jsonl", questions(squad_dev[:N_TEST], labelled=False))},
        {"name": "swag_jsonl", "type": "multiple_choice", "text": ["situation", "lead"], "choices": "choices",
         "label": "answer",
         "train": _jsonl(out / "swag-train.jsonl", situations(read("swag", "train"))),
         "dev": _jsonl(out / "swag-dev.jsonl", situations(swag_dev)),
         "test": _jsonl(out / "swag-test.jsonl", situations(swag_dev, labelled=False))},
    ]


# --------------------------------------------------------------------------------------------
# The printed tables


def table_cells(printed: str, row: str) -> dict[str, str]:
    """Column header -> cell of `row` in the printed results tables (the paper's, then your own
    tasks', above the winning grid points)."""
    out: dict[str, str] = {}
    header = None
    for line in printed.split("### Winning grid points")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[0] == "checkpoint":
            header = cells
        elif cells and header and cells[0] == row:
            out.update(zip(header[1:], cells[1:]))
        elif not cells:
            header = None
    return out


# --------------------------------------------------------------------------------------------
# The sweep


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_cards_of_the_papers_tasks_train_to_the_builtin_scores(ray_cluster, tiny_checkpoint, shared_data, flow,
                                                                 families_root,
                                                                 tmp_path, capsys):
    import numpy as np
    import transformers
    import yaml
    from safetensors.numpy import load_file

    from bertray.tasks.card import card_from_mapping
    from bertray.tasks.checks import check_card

    root = data_root(shared_data, tmp_path / "data", families_root / "swag")
    (tmp_path / "cards").mkdir()
    written = cards(root, tmp_path / "cards")
    (tmp_path / "cards.yaml").write_text(yaml.safe_dump({"tasks": written}))
    # why the MRPC card lists its labels: sorted, "equivalent" would get id 0, the built-in's "0" is not
    unpinned = {k: v for k, v in written[1].items() if k != "labels"}
    assert check_card(card_from_mapping(unpinned))[0].labels == ("equivalent", "not_equivalent")

    out = tmp_path / "out"
    code = flow("finetune").main([
        "--init-from", str(tiny_checkpoint), "--label", "tiny", "--tasks", ",".join(b for _, b, *_ in PAIRS),
        "--data", str(root), "--task-file", str(tmp_path / "cards.yaml"),
        "--lr", "1e-3", "--batch-size", "16", "--epochs", "1", "--seed", "0",
        "--max-train-examples", str(N_TRAIN), "--max-eval-examples", str(N_EVAL), "--max-seq-len", str(SEQ),
        # a trial is seconds of work after seconds of imports: four at a time on two cores
        "--cpus-per-trial", "0.5", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    latest = out / "latest"
    rows = {r["task"]: r for r in csv.DictReader((latest / "results.csv").open(encoding="utf-8"))}
    assert sorted(rows) == sorted(name for pair in PAIRS for name in pair[:2])
    assert all(r["status"] == "OK" for r in rows.values()), [(r["task"], r["error"]) for r in rows.values()]
    model_cells, baseline_cells = table_cells(printed, "tiny"), table_cells(printed, "trivial baseline")

    for card, builtin, kind, auto_class, test_file in PAIRS:
        mine, theirs = rows[card], rows[builtin]
        # every number the built-in's trial reported, as results.csv writes it (loss, scores, baselines)
        compared = [k for k, v in theirs.items() if v != "" and (
            k in LEARNED or any(k.startswith(f"{split}_") for split in TASKS[builtin].dev_splits))]
        assert {"score", "train_loss", "step", f"dev_baseline_{TASKS[builtin].metric}"} <= set(compared), builtin
        assert {k: mine[k] for k in compared} == {k: theirs[k] for k in compared}, card
        # the printed tables: the same cells, and a trivial baseline's row under the cards' columns too
        suffix = TASKS[builtin].family_info.column_suffix
        assert model_cells[card + suffix] == model_cells[TASKS[builtin].column + suffix], (card, printed)
        assert baseline_cells[card + suffix] == baseline_cells[TASKS[builtin].column + suffix] != "-", card
        # the winner: a Hugging Face folder that transformers loads with the type's Auto class, its
        # weights those of the built-in's winner, bit for bit (same examples, order, label ids)
        folder = latest / "models" / "tiny" / card
        config = json.loads((folder / "config.json").read_text())
        assert config["finetuning_task"] == card and config["bertray"]["family"] == kind
        assert type(getattr(transformers, auto_class).from_pretrained(folder)).__name__ == config["architectures"][0]
        ours, same = (load_file(f / "model.safetensors") for f in (folder, folder.parent / builtin))
        assert ours.keys() == same.keys() and all(np.array_equal(ours[k], same[k]) for k in ours), card
        # predictions for the card's test file
        assert (latest / "predictions" / card / test_file).is_file(), sorted((latest / "predictions" / card).iterdir())

    # string labels kept the built-in's ids, under the card's names
    models = latest / "models" / "tiny"
    assert json.loads((models / "mrpc_jsonl" / "config.json").read_text())["id2label"] == \
        {"0": "not_equivalent", "1": "equivalent"}
    assert json.loads((models / "conll_jsonl" / "config.json").read_text())["id2label"] == \
        {str(i): tag for i, tag in enumerate(CONLL_LABELS)}
    # what the test files' predictions say
    predictions = latest / "predictions"

    def tsv(card):
        return list(csv.reader((predictions / card / "test_predictions.tsv").open(encoding="utf-8"), delimiter="\t"))

    sst, mrpc, sts, swag = tsv("sst2_csv"), tsv("mrpc_jsonl"), tsv("stsb_parquet"), tsv("swag_jsonl")
    assert sst[0] == ["index", "prediction"] and len(sst) == 1 + N_TEST and sst[1][0] == "2"      # file lines
    assert {r[1] for r in sst[1:]} <= {"negative", "positive"}
    assert len(mrpc) == 1 + N_TEST and {r[1] for r in mrpc[1:]} <= {"not_equivalent", "equivalent"}
    assert sts[0] == ["index", "prediction"] and len(sts) == 1 + N_TEST
    assert all(np.isfinite(float(r[1])) for r in sts[1:])
    assert len(swag) == 1 + 4 and {r[1] for r in swag[1:]} <= {"0", "1", "2", "3"}
    answers = json.loads((predictions / "squad_jsonl" / "test_predictions.json").read_text())
    test_ids = [json.loads(line)["id"] for line in (tmp_path / "cards" / "squad-test.jsonl").read_text().splitlines()]
    assert list(answers) == test_ids and all(isinstance(a, str) for a in answers.values())
    tagged = [s for s in (predictions / "conll_jsonl" / "test_predictions.txt").read_text().split("\n\n") if s.strip()]
    assert len(tagged) == N_EVAL and all(len(line.split(" ")) == 3 for line in tagged[0].splitlines())


def test_a_token_card_tags_an_unlabelled_column_file_of_words(tiny_checkpoint, shared_data, tmp_path):
    """A CoNLL file of words alone (the text to tag) is an unlabelled test file of a card that names
    its own fields: its predictions are "word predicted", with no made-up gold column."""
    from bertray.tasks.card import card_from_mapping, card_mapping
    from bertray.tasks.checks import check_card
    from bertray.tasks.ner import read_conll
    from bertray.tune.trainer import TrialConfig, run_trial

    blocks = (shared_data / "conll2003" / "valid.txt").read_text(encoding="utf-8").split("\n\n")[:40]
    (tmp_path / "valid.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")   # tmp_path only
    examples, _ = read_conll(tmp_path / "valid.txt")
    train = _jsonl(tmp_path / "train.jsonl", [{"words": list(e.words), "ner": list(e.tags)} for e in examples])
    (tmp_path / "words.txt").write_text("\n\n".join("\n".join(e.words) for e in examples[:5]) + "\n",
                                        encoding="utf-8")
    settled, _ = check_card(card_from_mapping({"name": "tagger", "type": "token", "train": train, "dev": train,
                                               "test": str(tmp_path / "words.txt"), "text": "words",
                                               "label": "ner", "labels": list(CONLL_LABELS)}))
    assert settled.test_labelled is False
    cfg = TrialConfig(task="tagger", init_from=str(tiny_checkpoint), data=".", learning_rate=1e-3, batch_size=16,
                      epochs=1, max_train_examples=16, max_eval_examples=8, max_seq_len=32,
                      cache_dir=str(tmp_path / "cache"), card=card_mapping(settled))
    run_trial(cfg, files_dir=str(tmp_path / "files"))
    sentences = (tmp_path / "files" / "test_predictions.txt").read_text(encoding="utf-8").strip().split("\n\n")
    lines = [[line.split(" ") for line in s.splitlines()] for s in sentences]
    assert [[w for w, _ in s] for s in lines] == [list(e.words) for e in examples[:5]]
    assert {tag for s in lines for _, tag in s} <= set(CONLL_LABELS)
    dev = (tmp_path / "files" / "dev_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(dev[0].split(" ")) == 3                       # labelled: word gold predicted
