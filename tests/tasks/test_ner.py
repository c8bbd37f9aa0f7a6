import collections

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertray.errors import TaskDataError
from bertray.tasks import metrics, ner
from bertray.tasks.registry import TASKS

# Never copy CoNLL-2003 into the repository: these tests read ../shared/data only.


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def dev(shared_data):
    return TASKS["conll2003"].read(shared_data, "dev")


@pytest.mark.parametrize("split,sentences,tokens,documents", [
    ("train", 14041, 203621, 946), ("dev", 3250, 51362, 216), ("test", 3453, 46435, 231),
])
def test_real_files_have_the_official_counts(shared_data, split, sentences, tokens, documents):
    examples, counts = TASKS["conll2003"].read(shared_data, split)
    assert counts == {"sentences": sentences, "tokens": tokens, "documents": documents, "iob1_converted": 0}
    assert len(examples) == sentences


def test_real_files_are_iob2_with_the_official_entity_counts(shared_data):
    examples, _ = TASKS["conll2003"].read(shared_data, "test")
    # The first sentence's words, read from the file itself (no CoNLL-2003 text in the repository)
    first = (shared_data / "conll2003" / "test.txt").read_text().split("\n\n")[1]
    assert examples[0].words == tuple(line.split()[0] for line in first.splitlines())
    # IOB2: no chunk starts with I-, so converting changes nothing
    assert all(ner.to_iob2(e.tags) == list(e.tags) for e in examples)
    kinds = collections.Counter(kind for e in examples for kind, _, _ in metrics.get_entities(e.tags))
    assert kinds == {"LOC": 1668, "ORG": 1661, "PER": 1617, "MISC": 702}     # eng.testb


def test_iob1_file_is_converted_and_counted(tmp_path):
    path = tmp_path / "eng.train"
    path.write_text("-DOCSTART- -X- O O\n\n"
                    "Acme NNP I-NP I-ORG\nsells VBZ I-VP O\nDutch JJ I-NP I-MISC\ncheese NN I-NP O\n\n"
                    "Maria NNP I-NP I-PER\nLopez NNP I-NP I-PER\nand CC O O\nAnna NNP I-NP I-PER\n"
                    "Berg NNP I-NP B-PER\n")
    examples, counts = ner.read_conll(path)
    assert counts == {"sentences": 2, "tokens": 9, "documents": 1, "iob1_converted": 4}
    assert examples[0].tags == ("B-ORG", "O", "B-MISC", "O")
    assert examples[1].tags == ("B-PER", "I-PER", "O", "B-PER", "B-PER")


@pytest.mark.parametrize("text,line,message", [
    ("Acme NNP B-NP B-ORG\nsells VBZ B-VP\n", 2, "expected 4 space-separated columns"),
    ("Acme NNP B-NP B-ORG\n\nsells VBZ B-VP B-FOO\n", 3, "unknown NER tag 'B-FOO'"),
    ("-DOCSTART- -X- -X- O\n\nAcme NNP B-NP B-ORG extra\n", 3, "found 5"),
])
def test_malformed_lines_raise_with_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(TaskDataError, match=message) as info:
        ner.read_conll(path)
    assert f"{path}:{line}:" in str(info.value)


def _round_trip(examples, features):
    """Per-word tags read back from the labels at first sub-tokens (as one-hot logits)."""
    onehot = np.eye(len(ner.CONLL_LABELS))[np.where(features["labels"] < 0, 0, features["labels"])]
    return ner.decode_ner(examples, features, onehot)


def test_first_sub_token_labels_round_trip_to_the_gold_tags(dev, tokenizer):
    examples, _ = dev
    features = TASKS["conll2003"].featurize(examples, tokenizer)
    assert features["input_ids"].shape[1] == 128 and features["labels"].dtype == np.int64
    assert _round_trip(examples, features) == [list(e.tags) for e in examples]
    # exactly one labelled position per word; [CLS], [SEP] and padding are ignored
    assert (features["labels"] >= 0).sum() == sum(len(e.words) for e in examples)
    assert (features["labels"][:, 0] == ner.IGNORE_INDEX).all()
    assert ((features["attention_mask"] == 0) <= (features["labels"] == ner.IGNORE_INDEX)).all()
    out = TASKS["conll2003"].evaluate(examples, features, {"logits": np.eye(9)[np.maximum(features["labels"], 0)]})
    assert out["f1"] == 100.0 and out["support_PER"] == 1842


def test_continuation_sub_tokens_are_ignored(tokenizer):
    example = ner.NerExample("s", ("Blackburnshire", "visits", "EU"), ("B-LOC", "O", "B-ORG"))
    features = ner.featurize_ner([example], tokenizer, 16)
    tokens = [tokenizer.id_to_token(int(i)) for i in features["input_ids"][0]]
    n_first = int(np.flatnonzero(features["word_index"][0] == 1)[0]) - 1     # sub-tokens of the first word
    assert n_first > 1 and tokens[0] == "[CLS]" and all(t.startswith("##") for t in tokens[2:1 + n_first])
    labels = features["labels"][0]
    assert labels[1] == ner.CONLL_LABELS.index("B-LOC") and (labels[2:1 + n_first] == ner.IGNORE_INDEX).all()
    assert labels[1 + n_first] == ner.CONLL_LABELS.index("O") and tokens[1 + n_first] == "visits"


def test_long_sentences_are_split_into_windows_not_truncated(dev, tokenizer):
    examples, _ = dev
    long = [e for e in examples if len(e.words) > 30][:50]
    features = ner.featurize_ner(long, tokenizer, 24)
    assert len(features["example_index"]) > len(long)
    assert (features["attention_mask"].sum(1) <= 24).all()
    assert _round_trip(long, features) == [list(e.tags) for e in long]


def test_a_word_longer_than_a_window_keeps_its_label(tokenizer):
    example = ner.NerExample("s", ("x" * 5 + "-".join(["ab"] * 20), "Paris"), ("B-MISC", "B-LOC"))
    features = ner.featurize_ner([example], tokenizer, 8)
    assert len(features["example_index"]) == 2
    assert _round_trip([example], features) == [["B-MISC", "B-LOC"]]


def _repository_text_files() -> list:
    """The files the repository ships: git's list in a checkout, else every file below the root."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        paths = [root / n for n in names.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [(p.relative_to(root).as_posix(), p.read_text("utf-8", errors="ignore")) for p in paths
            if p.is_file() and p.stat().st_size < 8 << 20]


def test_no_conll2003_text_is_shipped(shared_data):
    """Reuters' terms forbid copies of CoNLL-2003 in the repository. A copy would show as CoNLL
    column lines whose words run as in the corpus (4 in a row), or as prose with 10 words in a row
    of a corpus sentence. samples/glue is left out of the prose check: MRPC is drawn from news
    too and shares a sentence with Reuters RCV1; it ships under GLUE's terms."""
    import re

    word = re.compile(r"[A-Za-z][A-Za-z0-9'.-]*")
    column_grams, prose_grams = set(), set()
    for split in ("train", "dev", "test"):
        examples, _ = TASKS["conll2003"].read(shared_data, split)
        for e in examples:
            words = [w.lower() for w in e.words]
            column_grams.update(tuple(words[i:i + 4]) for i in range(len(words) - 3))
            alpha = [w for w in words if word.fullmatch(w)]
            prose_grams.update(tuple(alpha[i:i + 10]) for i in range(len(alpha) - 9))
    # `word POS chunk NER`, also as the start of a line of a string literal in Python source
    column_line = re.compile(r"^[\s\"'(+]*([^\s\"']+) \S+ (?:[BI]-\w+|O) (?:[BI]-\w+|O)(?=[\s\"'),]|$)", re.M)
    found = []
    for name, text in _repository_text_files():
        text = text.replace("\\n", "\n")                  # column lines written inside test strings
        column_words = [w.lower() for w in column_line.findall(text)]
        if any(tuple(column_words[i:i + 4]) in column_grams for i in range(len(column_words) - 3)):
            found.append(f"{name}: CoNLL column lines")
        if not name.startswith("samples/glue/"):
            alpha = [w.lower() for w in word.findall(text)]
            if any(tuple(alpha[i:i + 10]) in prose_grams for i in range(len(alpha) - 9)):
                found.append(f"{name}: a CoNLL-2003 sentence")
    assert not found, found
