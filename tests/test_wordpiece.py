"""bertray/wordpiece.py against the Python reference (Google's rules as `transformers` keeps them
in `BertTokenizerLegacy`) on real text, plus training, save/load and the build_vocab flow."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pathlib
import pickle
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from bertray import wordpiece
from bertray.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]

TARGETED = [
    "Café naïve résumé à la crème brûlée, Ångström, Øresund, Dvořák, Łódź, İstanbul",
    "Cafe\u0301 decomposed e\u0301te\u0301 vs composed été",
    "北京大学 東京 東京タワー 한국어 日本語のテキスト 中文，标点。",
    "a" * 150,
    "a" * 100,
    "a" * 101,
    "é" * 101,
    "x" + "é" * 99,
    "control\x00chars\x01here\x07and\x7f\x1b[0m escape, tab\there, new\nline, cr\rhere",
    "soft\u00adhyphen in\u00ad-side",
    "zero\u200bwidth\u200cnon\u200djoiner\u2060word\ufeffbom \u200e\u200f marks",
    "emoji 😀🎉👍🏽 👨‍👩‍👧 flags 🇫🇷 ❤️ ✨",
    "no-break\u00a0space thin\u2009space ideographic\u3000space line\u2028sep para\u2029sep",
    "Greek ΟΔΟΣ ΣΑΣ Σ ΑΣ' ΟΔΌΣ ΟΔΟ\u0301Σ Ὀδυσσεύς ΣΟΦΟΣ.",
    "punctuation!!! ??? ... --- (((nested))) [brackets] {braces} <angle> «guillemets» „quotes“ ¿qué? ¡sí!",
    "math ∑∫√∞ ≠ ≤ ≥ ± × ÷ ℝ ℕ ½ ² ³ ⅓ and currency $ € £ ¥ ₹ ₿",
    "ﬁ ligature ﬂ ﬀ, fullwidth ＡＢＣ１２３, compat ㎏ ㍿ ① Ⅻ",
    "the [MASK] sat on the [SEP] mat [CLS] [UNK] [PAD] [mask] [ MASK ]",
    "replacement \ufffd char and private \ue000 use area",
    "Cyrillic Москва ЁЛКА, Arabic العربية, Hebrew עִבְרִית, Hindi हिन्दी, Thai ภาษาไทย",
    "MiXeD CaSe UPPER lower Title ß ẞ ǅ ǈ ǋ Kelvin K Ohm Ω Angstrom Å",
    "",
    "   ",
    "\t\n",
]


# --------------------------------------------------------------------------------------------
# Real text


def _tsv_column(path: pathlib.Path, column: str | int) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if isinstance(column, str):
        header, rows = rows[0], rows[1:]
        column = header.index(column)
    return [row[column] for row in rows if len(row) > column]


@pytest.fixture(scope="module")
def real_lines(shared_data) -> list[str]:
    """About 9,000 real texts (2 M characters): WikiText, SQuAD paragraphs (accents, CJK, IPA, zero-width
    characters), GLUE sentences and the openings of the Gutenberg books."""
    lines: list[str] = []
    for split, step in (("wiki.valid.raw", 1), ("wiki.test.raw", 3)):
        text = (shared_data / "corpus" / "wikitext-2-raw" / split).read_text(encoding="utf-8")
        lines += [line for line in text.split("\n") if line.strip()][::step]
    squad = json.loads((shared_data / "squad" / "v1.1" / "dev-v1.1.json").read_text(encoding="utf-8"))
    paragraphs = [p for article in squad["data"] for p in article["paragraphs"]]
    lines += [p["context"] for p in paragraphs[::2]]
    lines += [qa["question"] for p in paragraphs[::8] for qa in p["qas"]]
    glue = shared_data / "glue"
    lines += _tsv_column(glue / "SST-2" / "dev.tsv", "sentence")
    lines += _tsv_column(glue / "CoLA" / "dev.tsv", 3)
    for book in sorted((shared_data / "corpus" / "gutenberg").glob("*.txt")):
        lines += [line for line in book.read_text(encoding="utf-8", errors="replace").split("\n")[:150] if line.strip()]
    return lines


@pytest.fixture(scope="module")
def real_pairs(shared_data) -> list[tuple[str, str]]:
    mrpc, stsb = shared_data / "glue" / "MRPC" / "dev.tsv", shared_data / "glue" / "STS-B" / "dev.tsv"
    return (list(zip(_tsv_column(mrpc, "#1 String"), _tsv_column(mrpc, "#2 String")))
            + list(zip(_tsv_column(stsb, "sentence1"), _tsv_column(stsb, "sentence2"))))


def _long_words(lines: list[str]) -> list[str]:
    """Real characters run together into single words around the 100-character limit."""
    words = []
    for line in lines:
        letters = "".join(ch for ch in line if ch.isalnum())
        if len(letters) > 101:
            words += [letters[:99], letters[:100], letters[:101], letters[:300]]
    return words


# --------------------------------------------------------------------------------------------
# Parity with the Python reference


@pytest.fixture(scope="module")
def vocab_path(minilm_dir) -> str:
    return str(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def legacy(vocab_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return {lower: BertTokenizerLegacy(vocab_path, do_lower_case=lower) for lower in (True, False)}


def _legacy_ids(reference, texts: list[str]) -> list[list[int]]:
    return [reference.convert_tokens_to_ids(reference.tokenize(text)) for text in texts]


def _our_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def _assert_same(tokenizer, reference, texts: list[str]) -> None:
    ours, theirs = _our_ids(tokenizer, texts), _legacy_ids(reference, texts)
    diffs = [(t, reference.convert_ids_to_tokens(r), [tokenizer.id_to_token(i) for i in o])
             for t, o, r in zip(texts, ours, theirs) if o != r]
    assert not diffs, f"{len(diffs)} of {len(texts)} texts differ; first: {diffs[:3]}"


def test_real_text_has_the_hard_cases(real_lines):
    """The parity corpus really contains what makes tokenization differ."""
    assert len(real_lines) >= 5000
    non_ascii = [set(t) for t in real_lines if not t.isascii()]
    assert sum(any(unicodedata.decomposition(c)[:1] not in ("", "<") for c in chars) for chars in non_ascii) > 100
    assert sum(any(0x4E00 <= ord(c) <= 0x9FFF for c in chars) for chars in non_ascii) > 10
    assert sum(bool(chars & {"\u200b", "\u200e", "\ufeff"}) for chars in non_ascii) > 0
    assert sum(_punctuation(t) >= max(10, 0.1 * len(t)) for t in real_lines) > 20
    assert len(_long_words(real_lines[:200])) > 100


def _punctuation(text: str) -> int:
    return sum(unicodedata.category(c).startswith("P") or c in "$+<=>^`|~" for c in text)


def test_uncased_ids_match_reference_on_real_text(vocab_path, legacy, real_lines):
    tokenizer = wordpiece.from_vocab(vocab_path)
    _assert_same(tokenizer, legacy[True], real_lines + _long_words(real_lines[:200]))


def test_ids_match_reference_on_targeted_strings(vocab_path, legacy):
    for lower in (True, False):
        _assert_same(wordpiece.from_vocab(vocab_path, lowercase=lower), legacy[lower], TARGETED)


def test_cased_ids_match_reference_on_real_text(vocab_path, legacy, real_lines):
    _assert_same(wordpiece.from_vocab(vocab_path, lowercase=False), legacy[False], real_lines[::8])


def test_unassigned_code_points_are_the_one_known_difference(vocab_path, legacy):
    """The reference deletes code points its Python's Unicode tables call unassigned (U+0378 in
    every version; new emoji on older Pythons); the Rust pipeline keeps them and they make the
    word `[UNK]`. Documented in bertray.wordpiece; this test notices if either side changes."""
    tokenizer, reference = wordpiece.from_vocab(vocab_path), legacy[True]
    assert reference.tokenize("unassigned \u0378 char") == ["una", "##ssi", "##gned", "char"]
    assert tokenizer.encode("unassigned \u0378 char", add_special_tokens=False).tokens == \
        ["una", "##ssi", "##gned", "[UNK]", "char"]


def test_long_words_become_unk(vocab_path):
    tokenizer = wordpiece.from_vocab(vocab_path)
    unk = wordpiece.special_tokens(tokenizer).unk
    assert tokenizer.encode("a" * 101, add_special_tokens=False).ids == [unk]
    assert unk not in tokenizer.encode("a" * 100, add_special_tokens=False).ids


# Blocks that real text draws on. The only differences allowed there are code points that
# Python's unicodedata (Unicode 14.0 on Python 3.11) calls unassigned: the reference deletes
# them, the Rust pipeline keeps them (as [UNK]). See the module docstring of bertray.wordpiece.
TEXT_BLOCKS = [(0x0000, 0x05FF), (0x1E00, 0x2E42), (0x3000, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF),
               (0xF900, 0xFAFF), (0xFB00, 0xFB4F), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x1F900, 0x1FAFF)]


@pytest.mark.parametrize("lower", [True, False])
def test_every_code_point_of_text_blocks_matches_reference(vocab_path, legacy, lower):
    tokenizer = wordpiece.from_vocab(vocab_path, lowercase=lower)
    chars = [chr(cp) for lo, hi in TEXT_BLOCKS for cp in range(lo, hi + 1) if not 0xD800 <= cp <= 0xDFFF]
    texts = [f"Ab{c}Cd e{c} {c}" for c in chars]
    ours, theirs = _our_ids(tokenizer, texts), _legacy_ids(legacy[lower], texts)
    differing = [c for c, o, r in zip(chars, ours, theirs) if o != r]
    assert [f"U+{ord(c):04X}" for c in differing if unicodedata.category(c) != "Cn"] == []


def test_pairs_match_reference_template_and_segments(vocab_path, legacy, real_pairs):
    tokenizer, reference = wordpiece.from_vocab(vocab_path), legacy[True]
    assert len(real_pairs) > 1500
    encodings = tokenizer.encode_batch(real_pairs)
    for (a, b), enc in zip(real_pairs, encodings):
        ids_a, ids_b = _legacy_ids(reference, [a, b])
        assert enc.ids == reference.build_inputs_with_special_tokens(ids_a, ids_b)
        assert enc.type_ids == reference.create_token_type_ids_from_sequences(ids_a, ids_b)
    single = tokenizer.encode(real_pairs[0][0])
    ids_a = _legacy_ids(reference, [real_pairs[0][0]])[0]
    assert single.ids == reference.build_inputs_with_special_tokens(ids_a)
    assert single.type_ids == [0] * len(single.ids)


def test_hugging_face_tokenizer_json_agrees_on_real_text(vocab_path, minilm_dir, real_lines):
    """The checkpoint's own tokenizer.json (plain BertNormalizer) and ours give the same ids on
    real text, and loading drops its fixed 128-token padding and truncation."""
    shipped = wordpiece.load(minilm_dir)
    assert shipped.padding is None and shipped.truncation is None
    texts = real_lines[::4]
    assert _our_ids(shipped, texts) == _our_ids(wordpiece.from_vocab(vocab_path), texts)


# --------------------------------------------------------------------------------------------
# Vocabulary facts


def test_casing_is_inferred_from_the_vocabulary(vocab_path, tmp_path, real_lines):
    uncased = wordpiece.from_vocab(vocab_path)
    assert uncased.encode("HELLO World").ids == uncased.encode("hello world").ids
    cased = wordpiece.train(iter(real_lines[:3000]), vocab_size=1500, lowercase=False)
    wordpiece.save(cased, tmp_path)
    reread = wordpiece.from_vocab(tmp_path / "vocab.txt")
    assert reread.encode("The Hello").ids != reread.encode("the hello").ids
    assert _our_ids(reread, real_lines[:500]) == _our_ids(cased, real_lines[:500])


def test_special_tokens_and_subword_mask(vocab_path):
    tokenizer = wordpiece.from_vocab(vocab_path)
    assert wordpiece.special_tokens(tokenizer) == wordpiece.SpecialTokens(pad=0, unk=100, cls=101, sep=102, mask=103)
    mask = wordpiece.subword_mask(tokenizer)
    assert mask.dtype == np.bool_ and mask.shape == (30522,)
    tokens = pathlib.Path(vocab_path).read_text(encoding="utf-8").split("\n")[:-1]
    assert mask.tolist() == [t.startswith("##") and len(t) > 2 for t in tokens]
    assert mask[tokenizer.token_to_id("##ing")] and not mask[tokenizer.token_to_id("the")]


def test_a_tokenizer_survives_pickling(vocab_path, real_lines):
    """Ray ships a tokenizer to each actor by pickling: every actor gets its own copy."""
    tokenizer = wordpiece.from_vocab(vocab_path)
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert _our_ids(copy, real_lines[:300]) == _our_ids(tokenizer, real_lines[:300])


# --------------------------------------------------------------------------------------------
# Training


class _OnePass:
    """An iterator with no length and no way back: training must stream it."""

    def __init__(self, lines, limit: int):
        self._lines = lines
        self._limit = limit
        self.pulled = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pulled >= self._limit:
            raise StopIteration
        self.pulled += 1
        return next(self._lines)


@pytest.fixture(scope="module")
def trained(shared_data):
    with open(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw", encoding="utf-8") as f:
        texts = _OnePass((line.strip() for line in f if line.strip()), limit=2000)
        return wordpiece.train(texts, vocab_size=2000), texts


def test_training_streams_the_corpus_and_hits_the_size(trained):
    tokenizer, texts = trained
    assert texts.pulled == 2000 and next(texts, None) is None
    assert tokenizer.get_vocab_size() == 2000
    assert wordpiece.special_tokens(tokenizer) == wordpiece.SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(2000))
    assert wordpiece.subword_mask(tokenizer).sum() == sum(t.startswith("##") for t in vocab) > 100
    enc = tokenizer.encode("The tower was built in 1889.", "It is tall.")
    assert enc.tokens[0] == "[CLS]" and enc.tokens.count("[SEP]") == 2
    assert enc.type_ids == [0] * (enc.tokens.index("[SEP]") + 1) + [1] * (len(enc.ids) - enc.tokens.index("[SEP]") - 1)


def test_save_load_round_trip(trained, tmp_path, real_lines, real_pairs):
    tokenizer, _ = trained
    directory = tmp_path / "tok"
    wordpiece.save(tokenizer, directory)
    assert sorted(os.listdir(directory)) == ["tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    vocab_lines = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab_lines == [tokenizer.id_to_token(i) for i in range(2000)]
    inputs = real_lines[:1000] + real_pairs[:200]
    expected = [(e.ids, e.type_ids) for e in tokenizer.encode_batch(inputs)]
    for path in (directory, directory / "tokenizer.json", directory / "vocab.txt", str(directory)):
        assert [(e.ids, e.type_ids) for e in wordpiece.load(path).encode_batch(inputs)] == expected, path


def test_hugging_face_loads_what_we_save(trained, tmp_path, real_lines):
    from transformers import AutoTokenizer

    tokenizer, _ = trained
    wordpiece.save(tokenizer, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = real_lines[:300]
    assert hf(texts)["input_ids"] == [e.ids for e in tokenizer.encode_batch(texts)]


def test_save_and_load_through_s3(trained, s3_bucket, real_lines):
    tokenizer, _ = trained
    url = f"s3://{s3_bucket}/runs/vocab"
    wordpiece.save(tokenizer, url)
    for path in (url, url + "/tokenizer.json", url + "/vocab.txt"):
        assert _our_ids(wordpiece.load(path), real_lines[:300]) == _our_ids(tokenizer, real_lines[:300]), path
    with pytest.raises(ConfigError, match=f"s3://{s3_bucket}/nothing"):
        wordpiece.load(f"s3://{s3_bucket}/nothing")


def test_training_refuses_sizes_the_corpus_cannot_fill(shared_data):
    lines = (shared_data / "corpus" / "gutenberg" / "blake-poems.txt").read_text(encoding="utf-8").split("\n")
    with pytest.raises(ConfigError, match="yields only"):
        wordpiece.train((line for line in lines), vocab_size=50_000)
    with pytest.raises(ConfigError, match="limit_alphabet"):
        wordpiece.train((line for line in lines), vocab_size=20)
    with pytest.raises(ConfigError, match="vocab_size"):
        wordpiece.train(lines, vocab_size=5)
    with pytest.raises(ConfigError, match="not one string"):
        wordpiece.train("a whole corpus in one string", vocab_size=100)


# --------------------------------------------------------------------------------------------
# Errors


def test_load_errors_name_the_path(tmp_path, minilm_dir):
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=str(missing)):
        wordpiece.load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"{empty}.*neither tokenizer.json nor vocab.txt"):
        wordpiece.load(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{broken / 'tokenizer.json'}.*not a valid tokenizer.json"):
        wordpiece.load(broken)
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        wordpiece.load(minilm_dir / "config.json")


def test_vocab_errors(tmp_path, vocab_path):
    no_unk = tmp_path / "no_unk.txt"
    no_unk.write_text("[PAD]\nthe\n##s\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{no_unk}.*\\[UNK\\]"):
        wordpiece.from_vocab(no_unk)
    duplicate = tmp_path / "duplicate.txt"
    duplicate.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lines 6 and 7"):
        wordpiece.from_vocab(duplicate)
    no_mask = tmp_path / "no_mask" / "vocab.txt"
    no_mask.parent.mkdir()
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lacks the BERT special token.*\\[MASK\\]"):
        wordpiece.load(no_mask.parent)


# --------------------------------------------------------------------------------------------
# flows/build_vocab.py


def _run_flow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(REPO / "flows" / "build_vocab.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_build_vocab_flow(shared_data, tmp_path):
    wiki = (shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with gzip.open(corpus / "wiki.txt.gz", "wt", encoding="utf-8") as f:
        f.write(wiki)
    blake = shared_data / "corpus" / "gutenberg" / "blake-poems.txt"
    out = tmp_path / "vocab"
    result = _run_flow("--corpus", str(corpus / "*.gz"), str(blake), "--vocab-size", "1500",
                       "--max-lines", "2500", "--cased", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "Read 2,500 lines" in result.stdout and "Saved to" in result.stdout
    tokenizer = wordpiece.load(out)
    assert tokenizer.get_vocab_size() == 1500
    assert wordpiece.special_tokens(tokenizer) == wordpiece.SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
    assert tokenizer.encode("The").ids != tokenizer.encode("the").ids

    failed = _run_flow("--corpus", str(blake), "--vocab-size", "100000", "--output", str(tmp_path / "no"))
    assert failed.returncode == 2 and "yields only" in failed.stderr


def test_build_vocab_help_documents_every_flag():
    result = _run_flow("--help")
    assert result.returncode == 0
    for flag in ("--corpus", "--vocab-size", "--lowercase", "--cased", "--min-frequency", "--limit-alphabet",
                 "--max-lines", "--output"):
        line = next((l for l in result.stdout.splitlines() if l.strip().startswith(flag)), None)
        assert line is not None, flag
    assert result.stdout.count("default") >= 4
