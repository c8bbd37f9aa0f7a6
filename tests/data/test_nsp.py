"""Tests of bertray/data/nsp.py against Google's create_pretraining_data.

Statistical checks use fixed seeds and 5-sigma binomial bounds computed from the counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bertray.data.documents import LAYOUT_PRESETS, CorpusCounters, iter_documents
from bertray.data.formats import iter_lines
from bertray.data.nsp import (
    IS_NEXT, NOT_NEXT, PROVENANCE_KEYS, NSPConfig, make_nsp_instances, make_packed_instances,
)
from bertray.data.seeding import derive_rng, stable_hash
from bertray.errors import ConfigError

CLS, SEP, PAD = 101, 102, 0


def unique_docs(rng: np.random.Generator, n_docs: int, sentences=(1, 40), tokens=(1, 30)) -> list[list[np.ndarray]]:
    """Documents whose every token id is unique, so any token says where it came from."""
    docs, next_id = [], 1000
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(*sentences))):
            n = int(rng.integers(*tokens))
            doc.append(np.arange(next_id, next_id + n, dtype=np.int32))
            next_id += n
        docs.append(doc)
    return docs


def reference_truncation(la: int, lb: int, max_num_tokens: int) -> tuple[int, int]:
    """The lengths left by the reference's token-by-token `truncate_seq_pair` loop."""
    while la + lb > max_num_tokens:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def locate(part: np.ndarray, whole: np.ndarray) -> int:
    """Offset of `part` as a contiguous slice of `whole` (-1 if it is not one)."""
    for front in range(len(whole) - len(part) + 1):
        if np.array_equal(whole[front:front + len(part)], part):
            return front
    return -1


def check_instances(docs, out, cfg: NSPConfig) -> dict[str, int]:
    """Every structural property of every instance; returns truncation statistics."""
    n = len(out["lengths"])
    seq = cfg.max_seq_len
    assert out["input_ids"].shape == (n, seq) and out["input_ids"].dtype == np.int32
    assert out["token_type_ids"].shape == (n, seq) and out["token_type_ids"].dtype == np.int8
    assert out["lengths"].dtype == np.int32 and out["next_sentence_labels"].dtype == np.int8
    for key in PROVENANCE_KEYS:
        assert out[key].shape == (n,) and out[key].dtype == np.int32
    stats = {"front": 0, "trimmed": 0}
    for i in range(n):
        row, types, length = out["input_ids"][i], out["token_type_ids"][i], int(out["lengths"][i])
        assert 5 <= length <= seq
        assert row[0] == CLS and row[length - 1] == SEP and np.all(row[length:] == PAD)
        seps = np.flatnonzero(row[:length] == SEP)
        assert len(seps) == 2
        la, lb = seps[0] - 1, length - seps[0] - 2
        assert la >= 1 and lb >= 1
        assert np.all(types[:seps[0] + 1] == 0) and np.all(types[seps[0] + 1:length] == 1)
        assert np.all(types[length:] == 0)
        d, a0, a1 = out["doc_index"][i], out["a_start"][i], out["a_end"][i]
        bd, b0, b1 = out["b_doc_index"][i], out["b_start"][i], out["b_end"][i]
        assert 0 <= a0 < a1 <= len(docs[d]) and 0 <= b0 < b1 <= len(docs[bd])
        full_a = np.concatenate(docs[d][a0:a1])
        full_b = np.concatenate(docs[bd][b0:b1])
        assert (la, lb) == reference_truncation(len(full_a), len(full_b), seq - 3)
        for part, whole in ((row[1:1 + la], full_a), (row[seps[0] + 1:length - 1], full_b)):
            front = locate(part, whole)
            assert front >= 0, "A or B is not a contiguous slice of its sentences"
            stats["front"] += front
            stats["trimmed"] += len(whole) - len(part)
        if out["next_sentence_labels"][i] == IS_NEXT:
            assert bd == d and b0 >= a1, "IsNext B must be the actual continuation"
            assert all(len(s) == 0 for s in docs[d][a1:b0]), "only empty sentences may lie between A and B"
        else:
            assert out["next_sentence_labels"][i] == NOT_NEXT
            assert bd != d, "NotNext B must come from another document"
    return stats


def check_coverage(docs, out, dropped: int = 0) -> None:
    """Chunks walk each document front to back: IsNext consumes A and B, NotNext puts B's side back."""
    cursor = {}
    for i in range(len(out["lengths"])):
        d = int(out["doc_index"][i])
        assert out["a_start"][i] == cursor.get(d, 0)
        cursor[d] = int(out["b_end"][i] if out["next_sentence_labels"][i] == IS_NEXT else out["a_end"][i])
    ends = [cursor.get(d, 0) for d in range(len(docs))]
    missing = sum(len(doc) - end for doc, end in zip(docs, ends))
    assert missing == dropped


def binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(max(n * p * (1 - p), 1e-12)) + 1e-9


# --------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ConfigError, match="max_seq_len"):
        NSPConfig(max_seq_len=4)
    with pytest.raises(ConfigError, match="nsp_prob"):
        NSPConfig(nsp_prob=1.5)
    with pytest.raises(ConfigError, match="short_seq_prob"):
        NSPConfig(short_seq_prob=-0.1)


@pytest.mark.parametrize("seq", [16, 128])
def test_instances_follow_the_reference_procedure(seq):
    docs = unique_docs(np.random.default_rng(1), 150)
    cfg = NSPConfig(max_seq_len=seq)
    out = make_nsp_instances(docs, derive_rng(7, 0, 0), cfg, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    stats = check_instances(docs, out, cfg)
    check_coverage(docs, out)
    counters = out["counters"]
    assert counters["instances"] == len(out["lengths"]) > 100
    assert counters["not_next"] == int((out["next_sentence_labels"] == NOT_NEXT).sum())
    assert counters["truncated_tokens"] == stats["trimmed"] > 0
    assert counters["relabelled_is_next"] == 0 and counters["unpaired_dropped"] == 0
    # Each removed token came off the front with probability 1/2.
    assert binomial_ok(stats["front"], stats["trimmed"], 0.5)


def test_not_next_share():
    """P(NotNext) = 0.5 for chunks of two or more sentences; one-sentence chunks are always NotNext."""
    not_next = forced = instances = 0
    for block in range(4):
        docs = unique_docs(np.random.default_rng(100 + block), 300)
        out = make_nsp_instances(docs, derive_rng(3, 0, block), NSPConfig(), cls_id=CLS, sep_id=SEP)
        c = out["counters"]
        not_next += c["not_next"]
        forced += c["one_sentence_chunks"]
        instances += c["instances"]
        labels, a_sizes = out["next_sentence_labels"], out["a_end"] - out["a_start"]
        assert c["one_sentence_chunks"] <= int(((labels == NOT_NEXT) & (a_sizes == 1)).sum())
    assert forced > 0
    assert binomial_ok(not_next - forced, instances - forced, 0.5)
    expected = (forced + 0.5 * (instances - forced)) / instances
    assert not_next / instances > 0.5 and abs(not_next / instances - expected) < 5 * math.sqrt(0.25 / instances)


def test_short_targets_are_drawn_once_per_document():
    """Documents of 30 ten-token sentences, IsNext only: a document's instances are shorter than
    max_seq_len exactly when its (once-drawn) short target t is at most 120; t is uniform on [2, 125]."""
    n_docs = 2000
    docs = [[np.full(10, 1000 + d, dtype=np.int32)] * 30 for d in range(n_docs)]
    cfg = NSPConfig(max_seq_len=128, short_seq_prob=0.1, nsp_prob=0.0)
    out = make_nsp_instances(docs, derive_rng(11), cfg, cls_id=CLS, sep_id=SEP)
    assert binomial_ok(out["counters"]["short_targets"], n_docs, 0.1)
    short_docs = 0
    for d in range(n_docs):
        lengths = out["lengths"][out["doc_index"] == d]
        chunk_lengths = lengths[:-1] if len(lengths) > 1 else lengths     # the last chunk may run out
        short = bool(np.all(chunk_lengths < 128))
        assert short or np.all(chunk_lengths == 128), "one target per document, not per instance"
        short_docs += short
    assert short_docs <= out["counters"]["short_targets"]
    assert binomial_ok(short_docs, n_docs, 0.1 * 119 / 124)


def test_deterministic_for_a_seed_and_different_across_epochs():
    docs = unique_docs(np.random.default_rng(5), 60)
    cfg = NSPConfig()
    first = make_nsp_instances(docs, derive_rng(1, 0, stable_hash("a.txt"), 0), cfg, cls_id=CLS, sep_id=SEP)
    again = make_nsp_instances(docs, derive_rng(1, 0, stable_hash("a.txt"), 0), cfg, cls_id=CLS, sep_id=SEP)
    other = make_nsp_instances(docs, derive_rng(1, 1, stable_hash("a.txt"), 0), cfg, cls_id=CLS, sep_id=SEP)
    for key, value in first.items():
        if key != "counters":
            assert np.array_equal(value, again[key]), key
    assert first["counters"] == again["counters"]
    assert not np.array_equal(first["input_ids"], other["input_ids"])    # a new epoch pairs anew


def test_one_document_batch_never_labels_its_own_sentences_not_next():
    docs = unique_docs(np.random.default_rng(9), 1, sentences=(60, 61), tokens=(5, 40))
    for seed in range(5):
        cfg = NSPConfig(max_seq_len=64)
        out = make_nsp_instances(docs, derive_rng(seed), cfg, cls_id=CLS, sep_id=SEP)
        c = out["counters"]
        assert np.all(out["next_sentence_labels"] == IS_NEXT)
        assert c["not_next"] == 0 and c["relabelled_is_next"] > 0
        check_instances(docs, out, cfg)
        check_coverage(docs, out, dropped=c["unpaired_dropped"])


def test_single_sentence_documents():
    lone = [[np.arange(1000, 1010, dtype=np.int32)]]
    out = make_nsp_instances(lone, derive_rng(0), NSPConfig(), cls_id=CLS, sep_id=SEP)
    assert out["input_ids"].shape == (0, 128) and out["counters"]["unpaired_dropped"] == 1
    docs = unique_docs(np.random.default_rng(2), 40, sentences=(1, 2))
    out = make_nsp_instances(docs, derive_rng(0), NSPConfig(), cls_id=CLS, sep_id=SEP)
    assert len(out["lengths"]) == 40 and np.all(out["next_sentence_labels"] == NOT_NEXT)
    assert out["counters"]["one_sentence_chunks"] == 40
    check_instances(docs, out, NSPConfig())


def test_empty_documents_and_sentences_are_ignored():
    empty = np.zeros(0, dtype=np.int32)
    docs = unique_docs(np.random.default_rng(4), 30)
    docs = [[empty, *doc[:3], empty, *doc[3:]] for doc in docs] + [[], [empty, empty]]
    out = make_nsp_instances(docs, derive_rng(4), NSPConfig(), cls_id=CLS, sep_id=SEP)
    assert out["counters"]["empty_documents"] == 2
    check_instances(docs, out, NSPConfig())
    nothing = make_nsp_instances([], derive_rng(4), NSPConfig(), cls_id=CLS, sep_id=SEP)
    assert nothing["input_ids"].shape == (0, 128) and nothing["counters"]["instances"] == 0


def test_real_text_instances(shared_data, minilm_dir):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    counters = CorpusCounters()
    with open(shared_data / "corpus/wikitext-2-raw/wiki.valid.raw", "rb") as f:
        lines = iter_lines([f.read()], counters, max_line_chars=1 << 20)
        texts = list(iter_documents(lines, LAYOUT_PRESETS["wikitext"], counters))[:8]
    docs = [[np.array(e.ids, dtype=np.int32) for e in tok.encode_batch(d, add_special_tokens=False)] for d in texts]
    cfg = NSPConfig(max_seq_len=128)
    out = make_nsp_instances(docs, derive_rng(0), cfg, cls_id=cls_id, sep_id=sep_id, pad_id=0)
    assert len(out["lengths"]) > 100
    check_coverage(docs, out)
    for i in np.flatnonzero(out["next_sentence_labels"] == IS_NEXT)[:20]:
        d, a_end, b_end = out["doc_index"][i], out["a_end"][i], out["b_end"][i]
        length = out["lengths"][i]
        text = tok.decode(out["input_ids"][i][:length].tolist(), skip_special_tokens=False)
        assert text.startswith("[CLS]") and text.endswith("[SEP]")
        b_first = tok.decode(docs[d][a_end].tolist())
        b_tokens = out["input_ids"][i][out["token_type_ids"][i] == 1][:-1]
        full_b = np.concatenate(docs[d][a_end:b_end])
        assert locate(b_tokens, full_b) >= 0 and b_first.split()[-1] in tok.decode(full_b.tolist())
    # Most instances of a long-article corpus are full length (the reference's goal).
    assert np.mean(out["lengths"] == 128) > 0.5


# --------------------------------------------------------------------------------------------
# No-NSP packing


def test_packed_instances_cover_documents_in_order():
    docs = unique_docs(np.random.default_rng(8), 50, tokens=(1, 60))
    docs[3].insert(2, np.arange(900_000, 900_150, dtype=np.int32))     # longer than a whole sequence
    seq = 64
    out = make_packed_instances(docs, max_seq_len=seq, cls_id=CLS, sep_id=SEP, pad_id=PAD)
    n = len(out["lengths"])
    assert np.all(out["next_sentence_labels"] == -1) and np.all(out["token_type_ids"] == 0)
    for key in ("b_doc_index", "b_start", "b_end"):
        assert np.all(out[key] == -1)
    assert np.all(out["lengths"] <= seq)
    packed = {d: [] for d in range(len(docs))}
    for i in range(n):
        row, length = out["input_ids"][i], out["lengths"][i]
        assert row[0] == CLS and row[length - 1] == SEP and np.all(row[length:] == PAD)
        tokens = row[1:length - 1]
        d, a0, a1 = out["doc_index"][i], out["a_start"][i], out["a_end"][i]
        assert locate(tokens, np.concatenate(docs[d][a0:a1])) >= 0
        packed[d].append(tokens)
    for d, doc in enumerate(docs):
        assert np.array_equal(np.concatenate(packed[d]), np.concatenate(doc))
    # Greedy: a sequence ends only when the next sentence does not fit.
    for i in range(n - 1):
        if out["doc_index"][i] == out["doc_index"][i + 1] and out["a_end"][i] == out["a_start"][i + 1]:
            next_sentence = docs[out["doc_index"][i]][out["a_start"][i + 1]]
            assert out["lengths"][i] - 2 + len(next_sentence) > seq - 2
    pieces = out["lengths"][(out["doc_index"] == 3) & (out["a_start"] == 2) & (out["a_end"] == 3)]
    assert list(pieces[:2]) == [seq, seq]


def test_random_b_never_comes_from_a_piece_of_the_same_source():
    """Documents 0-2 are pieces of one cut source, 3 and 4 of another: NotNext B's cross sources,
    and a pool holding one source only is a pool of one document (no NotNext at all)."""
    docs = unique_docs(np.random.default_rng(3), 5, sentences=(6, 7), tokens=(3, 8))
    cfg = NSPConfig(max_seq_len=24)
    sources = [0, 0, 0, 3, 3]
    not_next = 0
    for seed in range(30):
        out = make_nsp_instances(docs, np.random.default_rng(seed), cfg, cls_id=CLS, sep_id=SEP, sources=sources)
        random_b = out["next_sentence_labels"] == NOT_NEXT
        a_source = np.array(sources)[out["doc_index"][random_b]]
        b_source = np.array(sources)[out["b_doc_index"][random_b]]
        assert np.all(a_source != b_source)
        not_next += int(random_b.sum())
    assert not_next > 100
    one_source = make_nsp_instances(docs, np.random.default_rng(0), cfg, cls_id=CLS, sep_id=SEP, sources=[7] * 5)
    assert not np.any(one_source["next_sentence_labels"] == NOT_NEXT)
    assert one_source["counters"]["relabelled_is_next"] > 0
    # Distinct sources (in document order) draw exactly what no sources draw: the default is unchanged.
    plain = make_nsp_instances(docs, np.random.default_rng(1), cfg, cls_id=CLS, sep_id=SEP)
    distinct = make_nsp_instances(docs, np.random.default_rng(1), cfg, cls_id=CLS, sep_id=SEP, sources=[10, 20, 30, 40, 50])
    assert all(np.array_equal(plain[k], distinct[k]) for k in ("input_ids", "b_doc_index", "next_sentence_labels"))
