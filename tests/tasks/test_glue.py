import collections

import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from bertray import wordpiece
from bertray.errors import ConfigError, TaskDataError
from bertray.tasks import glue
from bertray.tasks.registry import TASKS


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


# --------------------------------------------------------------------------------------------
# Real files: the official row counts


@pytest.mark.parametrize("task,split,rows", [
    ("sst2", "train", 67349), ("sst2", "dev", 872), ("sst2", "test", 1821),
    ("cola", "train", 8551), ("cola", "dev", 1043), ("cola", "test", 1063),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("mrpc", "test", 1725),
    ("stsb", "train", 5749), ("stsb", "dev", 1500), ("stsb", "test", 1379),
    ("wnli", "train", 635), ("wnli", "dev", 71), ("wnli", "test", 146),
])
def test_real_glue_files_have_the_official_row_counts(shared_data, task, split, rows):
    examples, counts = TASKS[task].read(shared_data, split)
    assert len(examples) == rows
    assert counts == {"rows": rows, "skipped_malformed": 0, "blank_lines": 0}
    if split == "test":
        assert all(e.label is None for e in examples)
        assert examples[0].guid == "0" and examples[-1].guid == str(rows - 1)


def test_real_label_distributions_and_fields(shared_data):
    sst2, _ = TASKS["sst2"].read(shared_data, "dev")
    assert collections.Counter(e.label for e in sst2) == {"1": 444, "0": 428}
    assert sst2[0].text_a.startswith("it 's a charming") and sst2[0].text_b is None
    mrpc, _ = TASKS["mrpc"].read(shared_data, "train")                 # starts with a UTF-8 BOM
    assert collections.Counter(e.label for e in mrpc) == {"1": 2474, "0": 1194}
    assert mrpc[0].text_a.startswith("Amrozi accused") and mrpc[0].text_b.startswith("Referring to him")
    mrpc_dev, _ = TASKS["mrpc"].read(shared_data, "dev")               # an unbalanced quote stays literal
    assert mrpc_dev[0].text_b.startswith('"The foodservice pie')
    cola, _ = TASKS["cola"].read(shared_data, "train")                 # no header row
    assert cola[0].text_a.startswith("Our friends won't buy") and cola[0].label == "1"
    stsb, _ = TASKS["stsb"].read(shared_data, "dev")
    assert stsb[0].label == pytest.approx(5.0) and all(0.0 <= e.label <= 5.0 for e in stsb)


# --------------------------------------------------------------------------------------------
# Tasks absent from shared/data: files in the exact official layout

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\t"
                   "gold_label")
MNLI_TEST_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")


def _write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mnli_parses(s1, s2):
    return (f"( {s1} )\t( {s2} )\t(ROOT (S {s1}))\t(ROOT (S {s2}))")


@pytest.fixture
def glue_root(tmp_path):
    mnli = tmp_path / "glue" / "MNLI"
    _write(mnli / "train.tsv", [
        MNLI_TRAIN_HEADER,
        f"0\t31193\t31193n\tgovernment\t{_mnli_parses('Conceptually cream skimming', 'Product and geography')}\t"
        "Conceptually cream skimming has two basic dimensions - product and geography.\t"
        "Product and geography are what make cream skimming work. \tneutral\tneutral",
        f"1\t101457\t101457e\ttelephone\t{_mnli_parses('you know', 'You lose')}\t"
        "you know during the season and i guess at at your level uh you lose them\t"
        "You lose the things to the following level if the people recall.\tentailment\tentailment",
    ])
    _write(mnli / "dev_matched.tsv", [
        MNLI_DEV_HEADER,
        f"0\t63735\t63735n\tslate\t{_mnli_parses('The new rights', 'Everyone')}\tThe new rights are nice enough\t"
        "Everyone really likes the newest benefits \tneutral\tentailment\tneutral\tneutral\tneutral\tneutral",
        f"1\t91383\t91383c\tgovernment\t{_mnli_parses('This site', 'The Government')}\t"
        "This site includes a list of all award winners.\tThe Government Executive articles housed on the website "
        "are not able to be searched.\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\t"
        "contradiction",
    ])
    _write(mnli / "dev_mismatched.tsv", [
        MNLI_DEV_HEADER,
        f"0\t75290\t75290c\tletters\t{_mnli_parses('Your contribution', 'Your contributions')}\t"
        "Your contribution helped make it possible for us to provide our students with a quality education.\t"
        "Your contributions were of no help with our students' education.\tcontradiction\tcontradiction\t"
        "contradiction\tcontradiction\tcontradiction\tcontradiction",
    ])
    _write(mnli / "test_matched.tsv", [
        MNLI_TEST_HEADER,
        f"0\t31493\t31493\ttravel\t{_mnli_parses('Hierbas', 'Hierbas is')}\tHierbas, ans seco, ans dulce, and frigola "
        "are just a few names worth keeping a look-out for.\tHierbas is a name worth looking out for.",
    ])
    # GLUE's diagnostic set (AX) sits beside the tasks, unlabelled, as in the official download
    _write(tmp_path / "glue" / "diagnostic" / "diagnostic.tsv", [
        "index\tsentence1\tsentence2",
        "0\tThe cat sat on the mat.\tThe cat did not sit on the mat.",
        "1\tThe cat did not sit on the mat.\tThe cat sat on the mat.",
    ])
    _write(tmp_path / "glue" / "QQP" / "train.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "133273\t213221\t213222\tHow is the life of a math student? Could you describe your own experiences?\t"
        "Which level of prepration is enough for the exam jlpt5?\t0",
        '402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control your horniness?\t1',
        # The official file has rows broken by an embedded newline (e.g. train.tsv line 97,931):
        "201841\t303951\t303952\tWhat can one do after MBBS?\tWhat do i do after my MBBS ?",
        '"\tWas Muhammad a real historical figure? What is the evidence for his existence?\t0',
        "360472\t364011\t490273\tWhat is the best travel website in spain?\tWhat is the best travel website?\t0",
    ])
    _write(tmp_path / "glue" / "QQP" / "test.tsv", [
        "id\tquestion1\tquestion2",
        "0\tWhy do rockets look white?\tWhy are rockets and boosters painted white?",
        "1\tWhat's causing someone to be jealous?\tWhat can I do to avoid being jealous of someone?",
    ])
    _write(tmp_path / "glue" / "QNLI" / "dev.tsv", [
        "index\tquestion\tsentence\tlabel",
        "0\tWhat came into force after the new constitution was herald?\tAs of that day, the new constitution "
        "heralding the Second Republic came into force.\tentailment",
        "1\tWhat is the first major city in the stream of the Rhine?\tThe most important tributaries in this area "
        "are the Ill below of Strasbourg, the Neckar in Mannheim and the Main across from Mainz.\tnot_entailment",
    ])
    _write(tmp_path / "glue" / "RTE" / "train.tsv", [
        "index\tsentence1\tsentence2\tlabel",
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\t"
        "not_entailment",
        "1\tA place of sorrow, after Pope John Paul II died, became a place of celebration.\t"
        "Pope Benedict XVI is the new leader of the Roman Catholic Church.\tentailment",
    ])
    _write(tmp_path / "glue" / "RTE" / "test.tsv", [
        "index\tsentence1\tsentence2",
        "0\tMaker of Hummer says rivals will follow suit.\tHummer is made by General Motors.",
    ])
    return tmp_path


def test_mnli_reads_train_dev_and_test_layouts(glue_root):
    spec = TASKS["mnli"]
    train, counts = spec.read(glue_root, "train")
    assert counts["rows"] == 2 and [e.label for e in train] == ["neutral", "entailment"]
    assert train[0].text_a.startswith("Conceptually cream") and train[0].text_b.startswith("Product and geography")
    matched, _ = spec.read(glue_root, "dev_matched")
    assert [e.label for e in matched] == ["neutral", "contradiction"]      # gold_label, not label1
    mismatched, _ = spec.read(glue_root, "dev_mismatched")
    assert mismatched[0].label == "contradiction"
    test, _ = spec.read(glue_root, "test_matched")
    assert test[0].guid == "0" and test[0].label is None and test[0].text_b.startswith("Hierbas is")
    assert spec.dev_splits == ("dev_matched", "dev_mismatched")
    # AX: the diagnostic set, predicted by the MNLI model and submitted as AX.tsv
    assert spec.path(glue_root, "test_ax") == f"{glue_root}/glue/diagnostic/diagnostic.tsv"
    ax, counts = spec.read(glue_root, "test_ax")
    assert counts["rows"] == 2 and [e.guid for e in ax] == ["0", "1"] and ax[1].label is None
    path = glue.write_submission("mnli", ["contradiction"] * 2, glue_root, split="test_ax", examples=ax)
    assert path.endswith("/AX.tsv") and open(path).read() == "index\tprediction\n0\tcontradiction\n1\tcontradiction\n"


def test_qqp_skips_and_counts_rows_broken_by_newlines(glue_root, caplog):
    examples, counts = TASKS["qqp"].read(glue_root, "train")
    assert counts == {"rows": 3, "skipped_malformed": 2, "blank_lines": 0}
    assert [e.label for e in examples] == ["0", "1", "0"]
    assert "lines 4, 5" in caplog.text
    test, _ = TASKS["qqp"].read(glue_root, "test")
    assert [e.guid for e in test] == ["0", "1"] and test[1].text_a.startswith("What's causing")


def test_a_file_with_many_broken_rows_is_not_taken_for_qqp(tmp_path):
    path = _write(tmp_path / "train.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                                           "1\t2\t3\tA?\tB?\t0", *["4\tC?\tD?\t1"] * 11])
    with pytest.raises(TaskDataError, match=f"{path}:3: 11 of 12 rows have the wrong number of fields"):
        glue.read_glue(path, "qqp")


def test_qnli_and_rte_read_their_layouts(glue_root):
    qnli, _ = TASKS["qnli"].read(glue_root, "dev")
    assert [e.label for e in qnli] == ["entailment", "not_entailment"]
    assert qnli[0].text_a.startswith("What came into force") and qnli[0].text_b.startswith("As of that day")
    rte, _ = TASKS["rte"].read(glue_root, "train")
    assert [e.label for e in rte] == ["not_entailment", "entailment"]
    rte_test, _ = TASKS["rte"].read(glue_root, "test")
    assert rte_test[0].label is None and rte_test[0].guid == "0"


# --------------------------------------------------------------------------------------------
# Malformed input


@pytest.mark.parametrize("task,lines,line,message", [
    ("sst2", ["sentence\tlabel", "good film\t1", "bad film\t0\textra"], 3, "expected 2 tab-separated fields"),
    ("sst2", ["sentence\tlabel", "good film\t1", "bad film\tnegative"], 3, "unknown label 'negative'"),
    ("cola", ["gj04\t1\t\tFine.", "gj04\t2\t*\tBad."], 2, "unknown label '2'"),
    ("cola", ["gj04\t1\t\tFine.", "gj04\t0\tBad."], 2, "expected 4 tab-separated fields"),
    ("stsb", ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
              "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\tfive"],
     2, "not a number"),
    ("mrpc", ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String", "1\t1\t2\tA"], 1, "no column '#2 String'"),
    ("rte", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tcontradiction"], 2, "unknown label 'contradiction'"),
])
def test_malformed_rows_raise_with_file_and_line(tmp_path, task, lines, line, message):
    path = _write(tmp_path / "bad.tsv", lines)
    with pytest.raises(TaskDataError, match=message) as info:
        glue.read_glue(path, task)
    assert f"{path}:{line}:" in str(info.value)


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("")
    with pytest.raises(TaskDataError, match="empty"):
        glue.read_glue(path, "sst2")


def test_blank_lines_are_counted(tmp_path):
    path = _write(tmp_path / "dev.tsv", ["sentence\tlabel", "good\t1", "", "bad\t0", ""])
    examples, counts = glue.read_glue(path, "sst2")
    assert len(examples) == 2 and counts["blank_lines"] == 2


# --------------------------------------------------------------------------------------------
# Features, decoding, scoring, submissions


def test_pair_features_layout_and_truncation(shared_data, tokenizer):
    examples, _ = TASKS["mrpc"].read(shared_data, "dev")
    settings = (tokenizer.truncation, tokenizer.padding)
    features = glue.featurize_glue(examples[:50], tokenizer, 32, glue.GLUE_FORMATS["mrpc"].labels)
    assert (tokenizer.truncation, tokenizer.padding) == settings        # caller's settings restored
    assert features["input_ids"].shape == (50, 32) and features["input_ids"].dtype == np.int32
    assert features["attention_mask"].dtype == np.int8 and features["labels"].dtype == np.int64
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    for ids, types, mask in zip(features["input_ids"], features["token_type_ids"], features["attention_mask"]):
        n = int(mask.sum())
        seps = np.flatnonzero(ids[:n] == sep)
        assert ids[0] == cls and len(seps) == 2 and seps[1] == n - 1
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:n] == 1).all() and (ids[n:] == 0).all()
    # longest_first: the longer side loses tokens first, so when both were cut they end up even.
    with wordpiece.tokenizer_truncation(tokenizer, None):
        raw = [(len(tokenizer.encode(e.text_a, add_special_tokens=False).ids),
                len(tokenizer.encode(e.text_b, add_special_tokens=False).ids)) for e in examples[:50]]
    seps = [np.flatnonzero(ids == sep) for ids in features["input_ids"]]
    kept = [(int(s[0]) - 1, int(s[1] - s[0]) - 1) for s in seps]
    assert sum(la + lb > 29 for la, lb in raw) > 40
    for (la, lb), (ka, kb) in zip(raw, kept):
        if la + lb <= 29:
            assert (ka, kb) == (la, lb)
            continue
        assert ka + kb == 29 and ka <= la and kb <= lb
        if ka < la and kb < lb:
            assert abs(ka - kb) <= 1
        else:
            assert (ka == la and ka <= kb) or (kb == lb and kb <= ka)
    np.testing.assert_array_equal(features["labels"], [int(e.label) for e in examples[:50]])


def test_single_sentence_and_regression_features(shared_data, tokenizer):
    sst2, _ = TASKS["sst2"].read(shared_data, "dev")
    features = TASKS["sst2"].featurize(sst2[:8], tokenizer)
    assert features["input_ids"].shape == (8, 128) and not features["token_type_ids"].any()
    # the same ids as the tokenizer's own template, padded to 128 as MiniLM's tokenizer.json pads
    assert features["input_ids"][0].tolist() == tokenizer.encode(sst2[0].text_a).ids
    stsb, _ = TASKS["stsb"].read(shared_data, "dev")
    features = TASKS["stsb"].featurize(stsb[:4], tokenizer, 64)
    assert features["labels"].dtype == np.float32 and features["labels"][0] == pytest.approx(5.0)
    test, _ = TASKS["stsb"].read(shared_data, "test")
    assert np.isnan(TASKS["stsb"].featurize(test[:2], tokenizer, 64)["labels"]).all()


def test_a_tokenizer_without_the_bert_template_is_refused(minilm_dir):
    bare = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    bare.post_processor = processors.ByteLevel()          # adds no [CLS]/[SEP]
    with pytest.raises(ConfigError, match="no \\[CLS\\] ... \\[SEP\\] template"):
        wordpiece.encode_pairs(bare, ["a sentence"], None, 16)


def test_evaluate_in_percent(shared_data):
    examples, _ = TASKS["mrpc"].read(shared_data, "dev")
    gold = np.array([int(e.label) for e in examples])
    logits = np.stack([-gold, gold], axis=1).astype(np.float32)
    out = TASKS["mrpc"].evaluate(examples, {}, {"logits": logits})
    assert out == {"f1": 100.0, "accuracy": 100.0}
    always_positive = np.tile([0.0, 1.0], (len(examples), 1))
    out = TASKS["mrpc"].evaluate(examples, {}, {"logits": always_positive})
    assert out["accuracy"] == pytest.approx(100 * 279 / 408)
    assert out["f1"] == pytest.approx(100 * 2 * 279 / (2 * 279 + 129))
    stsb, _ = TASKS["stsb"].read(shared_data, "dev")
    scores = np.array([e.label for e in stsb])
    out = TASKS["stsb"].evaluate(stsb, {}, {"logits": (scores ** 2)[:, None]})
    assert out["spearman"] == pytest.approx(100.0) and out["pearson"] < 100.0


def test_write_submission_files(tmp_path, shared_data):
    path = glue.write_submission("sst2", ["1", "0", "1"], tmp_path)
    assert path.endswith("SST-2.tsv")
    assert open(path).read() == "index\tprediction\n0\t1\n1\t0\n2\t1\n"
    path = glue.write_submission("mnli", {"0": "entailment", "1": "neutral"}, tmp_path, split="test_mismatched")
    assert path.endswith("MNLI-mm.tsv") and open(path).read().splitlines()[1] == "0\tentailment"
    stsb, _ = TASKS["stsb"].read(shared_data, "test")
    path = glue.write_submission("stsb", [2.5] * len(stsb), tmp_path, examples=stsb)
    lines = open(path).read().splitlines()
    assert path.endswith("STS-B.tsv") and len(lines) == 1380 and lines[1] == "0\t2.500"
    with pytest.raises(ValueError, match="not a label"):
        glue.write_submission("rte", ["yes"], tmp_path)
    with pytest.raises(ValueError, match="no submission"):
        glue.write_submission("mnli", ["neutral"], tmp_path)
