"""Tests of bertray/data/masking.py against the reference procedure (Google's create_pretraining_data).

Statistical checks use fixed seeds and 5-sigma binomial bounds computed from the counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bertray.data.masking import TABLE8_MIXES, MaskingConfig, causal_lm_targets, mask_tokens, num_to_predict
from bertray.data.seeding import derive_rng
from bertray.errors import ConfigError

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIALS = (PAD, CLS, SEP)
VOCAB = 30522
SUBWORD_FROM = 20000            # in these tests, ids >= 20000 are "##" continuation pieces


def binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(max(n * p * (1 - p), 1e-12)) + 1e-9


def make_batch(rng: np.random.Generator, n: int, seq: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` rows of random lengths, some [UNK]s, padded with [PAD]; read-only."""
    ids = np.full((n, seq), PAD, dtype=np.int32)
    lengths = rng.integers(5, seq + 1, size=n).astype(np.int32)
    for i, length in enumerate(lengths):
        body = rng.integers(1000, 29000, size=length).astype(np.int32)
        body[rng.random(length) < 0.02] = UNK
        split = int(rng.integers(1, length - 3))
        body[0], body[split + 1], body[length - 1] = CLS, SEP, SEP
        ids[i, :length] = body
    ids.setflags(write=False)
    lengths.setflags(write=False)
    return ids, lengths


def candidates(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return (np.arange(ids.shape[1]) < lengths[:, None]) & ~np.isin(ids, SPECIALS)


def check_layout(ids, lengths, out, cfg: MaskingConfig) -> None:
    """Shapes, sorting, padding, labels, and that only picked candidates changed."""
    n, seq = ids.shape
    width = cfg.max_predictions_per_seq
    pos, lab, w = out["masked_lm_positions"], out["masked_lm_ids"], out["masked_lm_weights"]
    assert pos.shape == lab.shape == w.shape == (n, width)
    assert pos.dtype == np.int32 and lab.dtype == np.int32 and w.dtype == np.float32
    assert out["input_ids"].shape == ids.shape and out["input_ids"].dtype == np.int32
    cand = candidates(ids, lengths)
    for i in range(n):
        k = int(w[i].sum())
        assert np.all(w[i, :k] == 1.0) and np.all(w[i, k:] == 0.0)
        assert np.all(pos[i, k:] == 0) and np.all(lab[i, k:] == 0)
        real = pos[i, :k]
        assert np.all(np.diff(real) > 0), "positions ascending and distinct"
        assert np.all(cand[i, real]), "only non-special tokens below the length are picked"
        assert np.array_equal(lab[i, :k], ids[i, real]), "labels are the original tokens"
        changed = np.flatnonzero(out["input_ids"][i] != ids[i])
        assert np.all(np.isin(changed, real)), "nothing but picked positions changes"


# --------------------------------------------------------------------------------------------


def test_config_validation_and_table8():
    with pytest.raises(ConfigError, match="random_token_prob"):
        MaskingConfig(mask_token_prob=0.9, random_token_prob=0.2)
    with pytest.raises(ConfigError, match="mask_prob"):
        MaskingConfig(mask_prob=0.0)
    with pytest.raises(ConfigError, match="strategy"):
        MaskingConfig(strategy="span")
    with pytest.raises(ConfigError, match="max_predictions_per_seq"):
        MaskingConfig(max_predictions_per_seq=0)
    assert len(TABLE8_MIXES) == 6
    for mix in TABLE8_MIXES.values():
        MaskingConfig(**mix)
    assert TABLE8_MIXES["mask80_same10_rnd10"] == {"mask_token_prob": 0.8, "random_token_prob": 0.1}


def test_num_to_predict_is_the_reference_formula():
    lengths = np.arange(1, 601)
    for width in (20, 76, 80):
        cfg = MaskingConfig(max_predictions_per_seq=width)
        expected = [min(width, max(1, int(round(n * 0.15)))) for n in range(1, 601)]
        assert num_to_predict(lengths, cfg).tolist() == expected
    # round(128 * 0.15) = round(19.2) = 19 (the cap 20 is headroom); round(512 * 0.15) = 77 under P = 80.
    assert num_to_predict(np.array([128]), MaskingConfig(max_predictions_per_seq=20))[0] == 19
    assert num_to_predict(np.array([512]), MaskingConfig(max_predictions_per_seq=80))[0] == 77
    assert num_to_predict(np.array([30, 10]), MaskingConfig())[0] == 4       # 4.5 rounds half to even
    assert num_to_predict(np.array([3]), MaskingConfig())[0] == 1            # at least one


@pytest.mark.parametrize("seq,width", [(128, 20), (512, 80), (16, 20)])
def test_exact_masking_counts_and_layout(seq, width):
    ids, lengths = make_batch(np.random.default_rng(seq), 300, seq)
    cfg = MaskingConfig(max_predictions_per_seq=width)
    out = mask_tokens(ids, lengths, derive_rng(1), cfg, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    check_layout(ids, lengths, out, cfg)
    cand = candidates(ids, lengths)
    expected = np.minimum([min(width, max(1, round(int(n) * 0.15))) for n in lengths], cand.sum(axis=1))
    assert np.array_equal(out["masked_lm_weights"].sum(axis=1).astype(int), expected)
    assert out["counters"]["predictions"] == expected.sum() and out["counters"]["capped"] == 0


def test_unk_is_maskable_and_short_rows():
    ids = np.array([[CLS, UNK, SEP, PAD], [CLS, SEP, PAD, PAD]], dtype=np.int32)
    out = mask_tokens(ids, np.array([3, 2]), derive_rng(0), MaskingConfig(), mask_id=MASK, vocab_size=VOCAB,
                      special_ids=SPECIALS)
    assert out["masked_lm_positions"][0, 0] == 1 and out["masked_lm_ids"][0, 0] == UNK
    assert out["masked_lm_weights"].sum(axis=1).tolist() == [1.0, 0.0]   # nothing to pick in [CLS] [SEP]
    empty = mask_tokens(np.zeros((0, 8), np.int32), np.zeros(0, np.int32), derive_rng(0), MaskingConfig(),
                        mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    assert empty["masked_lm_positions"].shape == (0, 20)


def test_picks_are_uniform_over_candidates():
    n, seq = 4000, 64
    row = np.arange(1000, 1000 + seq, dtype=np.int32)
    row[[0, 30, 63]] = [CLS, SEP, SEP]
    ids = np.tile(row, (n, 1))
    out = mask_tokens(ids, np.full(n, seq), derive_rng(2), MaskingConfig(), mask_id=MASK, vocab_size=VOCAB,
                      special_ids=SPECIALS)
    picked = np.zeros(seq, dtype=np.int64)
    np.add.at(picked, out["masked_lm_positions"][out["masked_lm_weights"] > 0], 1)
    cand = np.flatnonzero(~np.isin(row, SPECIALS))
    p = round(seq * 0.15) / len(cand)                                       # 10 of 61 candidates
    assert picked[[0, 30, 63]].sum() == 0
    assert all(binomial_ok(int(picked[c]), n, p) for c in cand)


@pytest.mark.parametrize("mix", list(TABLE8_MIXES))
def test_replacement_mix(mix):
    """Each picked position: [MASK] w.p. mask_token_prob, a uniform random id w.p. random_token_prob,
    else unchanged; a random id equals [MASK] or the original with probability 1/V each."""
    ids, lengths = make_batch(np.random.default_rng(3), 2000)
    cfg = MaskingConfig(**TABLE8_MIXES[mix])
    out = mask_tokens(ids, lengths, derive_rng(3, 1), cfg, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    real = out["masked_lm_weights"] > 0
    rows = np.nonzero(real)[0]
    new = out["input_ids"][rows, out["masked_lm_positions"][real]]
    orig = out["masked_lm_ids"][real]
    total = int(real.sum())
    p_mask, p_rand = cfg.mask_token_prob, cfg.random_token_prob
    assert binomial_ok(int((new == MASK).sum()), total, p_mask + p_rand / VOCAB)
    assert binomial_ok(int((new == orig).sum()), total, 1 - p_mask - p_rand + p_rand / VOCAB)
    c = out["counters"]
    assert c["mask_token"] + c["random_token"] + c["kept_token"] == c["predictions"] == total
    assert c["mask_token"] <= int((new == MASK).sum()) <= c["mask_token"] + c["random_token"]


def test_random_tokens_are_uniform_over_the_vocabulary():
    vocab = 16
    rng = np.random.default_rng(4)
    ids = rng.integers(5, 16, size=(3000, 40)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    cfg = MaskingConfig(**TABLE8_MIXES["rnd100"], max_predictions_per_seq=6)
    out = mask_tokens(ids, np.full(3000, 40), derive_rng(4), cfg, mask_id=3, vocab_size=vocab, special_ids=(0, 1, 2))
    real = out["masked_lm_weights"] > 0
    new = out["input_ids"][np.nonzero(real)[0], out["masked_lm_positions"][real]]
    counts = np.bincount(new, minlength=vocab)
    assert all(binomial_ok(int(k), len(new), 1 / vocab) for k in counts)


def test_bernoulli_share_and_cap():
    ids, lengths = make_batch(np.random.default_rng(5), 1500)
    cand = int(candidates(ids, lengths).sum())
    cfg = MaskingConfig(strategy="bernoulli", max_predictions_per_seq=128)
    out = mask_tokens(ids, lengths, derive_rng(5), cfg, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    check_layout(ids, lengths, out, cfg)
    assert out["counters"]["capped"] == 0
    assert binomial_ok(int(out["masked_lm_weights"].sum()), cand, 0.15)
    capped_cfg = MaskingConfig(strategy="bernoulli", max_predictions_per_seq=8)
    capped = mask_tokens(ids, lengths, derive_rng(5), capped_cfg, mask_id=MASK, vocab_size=VOCAB,
                         special_ids=SPECIALS)
    check_layout(ids, lengths, capped, capped_cfg)
    assert capped["counters"]["capped"] > 0
    assert capped["masked_lm_weights"].sum() + capped["counters"]["capped"] == out["masked_lm_weights"].sum()


def words_of(row: np.ndarray, length: int, is_subword: np.ndarray) -> list[list[int]]:
    words: list[list[int]] = []
    for p in range(length):
        if row[p] in SPECIALS:
            continue
        if is_subword[row[p]] and words and words[-1][-1] == p - 1:
            words[-1].append(p)
        else:
            words.append([p])
    return words


@pytest.mark.parametrize("strategy", ["exact", "bernoulli"])
def test_whole_word_masking_picks_whole_words(strategy):
    rng = np.random.default_rng(6)
    is_subword = np.zeros(VOCAB, dtype=bool)
    is_subword[SUBWORD_FROM:] = True
    ids, lengths = make_batch(rng, 400)
    ids = ids.copy()
    pieces = rng.random(ids.shape) < 0.3                   # about 30% of tokens continue a word
    pieces &= candidates(ids, lengths)
    ids[pieces] = rng.integers(SUBWORD_FROM, VOCAB, size=int(pieces.sum()))
    width = 20 if strategy == "exact" else 128                # no cap: Bernoulli's share is then exact
    cfg = MaskingConfig(whole_word=True, strategy=strategy, max_predictions_per_seq=width)
    out = mask_tokens(ids, lengths, derive_rng(6), cfg, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                      is_subword=is_subword)
    check_layout(ids, lengths, out, cfg)
    picked_words = 0
    total_words = 0
    for i in range(len(ids)):
        k = int(out["masked_lm_weights"][i].sum())
        chosen = set(out["masked_lm_positions"][i, :k].tolist())
        words = words_of(ids[i], int(lengths[i]), is_subword)
        total_words += len(words)
        budget = min(width, max(1, round(int(lengths[i]) * 0.15))) if strategy == "exact" else width
        assert k <= budget
        for word in words:
            inside = [p in chosen for p in word]
            assert all(inside) or not any(inside), "a word is masked whole or not at all"
            picked_words += inside[0]
            if strategy == "exact" and not inside[0]:
                assert len(word) > budget - k, "a skipped word must not fit the remaining room"
    if strategy == "bernoulli":
        assert out["counters"]["capped"] == 0
        assert binomial_ok(picked_words, total_words, 0.15)
    else:
        assert picked_words > len(ids) * 5


def test_deterministic_for_a_seed_and_new_masks_each_epoch():
    ids, lengths = make_batch(np.random.default_rng(7), 64)
    cfg = MaskingConfig()
    args = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS)
    first = mask_tokens(ids, lengths, derive_rng(42, 0, 3, 9), cfg, **args)
    again = mask_tokens(ids, lengths, derive_rng(42, 0, 3, 9), cfg, **args)
    epoch1 = mask_tokens(ids, lengths, derive_rng(42, 1, 3, 9), cfg, **args)
    for key in ("input_ids", "masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
        assert np.array_equal(first[key], again[key])
    assert np.array_equal(first["masked_lm_weights"], epoch1["masked_lm_weights"])   # same counts
    same_rows = np.all(first["masked_lm_positions"] == epoch1["masked_lm_positions"], axis=1)
    assert same_rows.mean() < 0.05                                                    # new positions


def test_causal_lm_targets():
    ids = np.array([[CLS, 5, 6, 7, SEP, PAD], [CLS, 8, SEP, PAD, PAD, PAD]], dtype=np.int32)
    out = causal_lm_targets(ids, np.array([5, 3]))
    assert np.array_equal(out["input_ids"], ids) and out["input_ids"] is not ids
    assert out["masked_lm_positions"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert out["masked_lm_ids"].tolist() == [[5, 6, 7, SEP, 0], [8, SEP, 0, 0, 0]]
    assert out["masked_lm_weights"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
