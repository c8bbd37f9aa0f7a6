"""Masked-LM targets for a batch of sequences, as the paper (section 3.1) and Google's reference do.

Masks are drawn when a batch is produced (dynamic masking), from a generator the caller derives
from (seed, generation, pass, file, document), so every pass sees new masks and a run stays reproducible.

The default is the reference procedure of Google's `create_pretraining_data`: exactly
`n = min(P, max(1, round(len * mask_prob)))` positions per sequence (Python's half-to-even round;
`len` counts [CLS] and [SEP]; at full length 128 that is 19, at 512 it is 77, under the caps P = 20
and P = 80 the reference recommends), chosen uniformly among the non-special tokens, optionally as
whole words. "bernoulli" is Hugging Face's collator instead: each candidate independently with
`mask_prob`. Either way each picked position becomes [MASK], a random token or stays itself in
the configured mix, and the label is the original token.

The common path is vectorised over the batch: every token gets a uniform key (non-candidates an
impossible one), and the n smallest keys of a row are a uniform random n-subset of its
candidates. The same keys serve Bernoulli masking (the keys below `mask_prob` are its picks, and
the smallest P of them a uniform subset when the cap P bites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, get_args

import numpy as np

from bertray.errors import check

MaskingStrategy = Literal["exact", "bernoulli"]
Objective = Literal["mlm_nsp", "mlm", "ltr"]   # MLM + NSP (the paper), MLM alone, left-to-right LM
STRATEGIES, OBJECTIVES = get_args(MaskingStrategy), get_args(Objective)

# The paper's Table 8 (ablation over the [MASK] / same / random-token mix), as MaskingConfig fields.
TABLE8_MIXES: dict[str, dict[str, float]] = {
    "mask80_same10_rnd10": {"mask_token_prob": 0.8, "random_token_prob": 0.1},
    "mask100": {"mask_token_prob": 1.0, "random_token_prob": 0.0},
    "mask80_rnd20": {"mask_token_prob": 0.8, "random_token_prob": 0.2},
    "mask80_same20": {"mask_token_prob": 0.8, "random_token_prob": 0.0},
    "same20_rnd80": {"mask_token_prob": 0.0, "random_token_prob": 0.8},
    "rnd100": {"mask_token_prob": 0.0, "random_token_prob": 1.0},
}

_NO_KEY = np.float32(2.0)   # sorts after every uniform key and is never below mask_prob


@dataclass(frozen=True)
class MaskingConfig:
    """How many positions to predict and what they become; the defaults are BERT's.

    `max_predictions_per_seq` (P) is the width of the `masked_lm_*` arrays: 20 for 128-token
    sequences and 80 for 512 as in the reference. With "bernoulli", picks beyond P are dropped
    (counted as `capped`), so give it some headroom above `mask_prob * max_seq_len`.
    `mask_token_prob` and `random_token_prob` are the [MASK] and random-token shares of the picked
    positions; the rest keep their token (see `TABLE8_MIXES`).
    """

    mask_prob: float = 0.15
    max_predictions_per_seq: int = 20
    strategy: MaskingStrategy = "exact"
    whole_word: bool = False
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __post_init__(self) -> None:
        check(isinstance(self.mask_prob, (int, float)) and not isinstance(self.mask_prob, bool)
              and 0.0 < self.mask_prob <= 1.0, "mask_prob", f"must be in (0, 1], got {self.mask_prob!r}")
        check(isinstance(self.max_predictions_per_seq, int) and not isinstance(self.max_predictions_per_seq, bool)
              and self.max_predictions_per_seq >= 1, "max_predictions_per_seq",
              f"must be a positive integer, got {self.max_predictions_per_seq!r}")
        check(self.strategy in STRATEGIES, "strategy",
              f"{self.strategy!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
        check(isinstance(self.whole_word, bool), "whole_word", f"must be true or false, got {self.whole_word!r}")
        for key in ("mask_token_prob", "random_token_prob"):
            value = getattr(self, key)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0,
                  key, f"must be a probability in [0, 1], got {value!r}")
        check(self.mask_token_prob + self.random_token_prob <= 1.0 + 1e-9, "random_token_prob",
              f"mask_token_prob + random_token_prob must be <= 1 (the rest keep their token), got "
              f"{self.mask_token_prob} + {self.random_token_prob}")


def num_to_predict(lengths: np.ndarray, cfg: MaskingConfig) -> np.ndarray:
    """The reference's per-sequence count `min(P, max(1, round(len * mask_prob)))`.

    `np.rint` rounds half to even on the same float64 products as Python's `round(len * p)`.
    """
    n = np.rint(np.asarray(lengths, dtype=np.float64) * cfg.mask_prob).astype(np.int64)
    return np.minimum(cfg.max_predictions_per_seq, np.maximum(1, n))


def _candidates(ids: np.ndarray, lengths: np.ndarray, special_ids: Sequence[int]) -> np.ndarray:
    cand = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    for special in special_ids:
        cand &= ids != special
    return cand


def _smallest(keys: np.ndarray, n: np.ndarray, width: int) -> np.ndarray:
    """Per row, the column indices of the `n[row]` smallest keys, sorted ascending and padded with -1
    to `width` columns (`n <= width`)."""
    rows, cols = keys.shape
    k = min(width, cols)
    if k < cols:
        part = np.argpartition(keys, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(cols), (rows, cols))
    order = np.argsort(np.take_along_axis(keys, part, axis=1), axis=1, kind="stable")
    chosen = np.take_along_axis(part, order, axis=1)
    slots = np.arange(k)[None, :] < n[:, None]
    chosen = np.where(slots, chosen, cols)
    chosen.sort(axis=1)
    out = np.full((rows, width), -1, dtype=np.int64)
    out[:, :k] = np.where(chosen == cols, -1, chosen)
    return out


def _whole_word_positions(ids: np.ndarray, cand: np.ndarray, keys: np.ndarray, budget: np.ndarray,
                          cfg: MaskingConfig, is_subword: np.ndarray) -> tuple[np.ndarray, int]:
    """Whole-word picks: words (a token and the `##` pieces right after it) in random key order,
    taken while they fit in `budget` tokens; a word that would overshoot is skipped and later,
    shorter words may still fill the room, as the reference does. With "bernoulli", only words
    whose key is below `mask_prob` are eligible (the budget is then P). Returns the picked
    positions (ascending, padded with -1) and, for "bernoulli", the eligible tokens left out."""
    rows, cols = ids.shape
    pos = np.arange(cols)
    continuation = is_subword[ids] & cand
    continuation[:, 1:] &= cand[:, :-1]
    continuation[:, 0] = False
    starts = cand & ~continuation                                          # (N, S) first token of a word
    word_start = np.maximum.accumulate(np.where(starts, pos, -1), axis=1)  # (N, S) its word's first token
    flat_start = (np.arange(rows)[:, None] * cols + word_start)[cand]
    size = np.bincount(flat_start, minlength=rows * cols).reshape(rows, cols)  # word size at its start
    eligible = starts
    if cfg.strategy == "bernoulli":
        eligible = starts & (keys < cfg.mask_prob)
    order = np.argsort(np.where(eligible, keys, _NO_KEY), axis=1, kind="stable")   # words in key order
    sizes = np.take_along_axis(np.where(eligible, size, 0), order, axis=1)
    total = np.cumsum(sizes, axis=1)
    taken = total <= budget[:, None]                  # the prefix before the first overshooting word
    first_over = taken.sum(axis=1)
    room = budget - np.where(first_over > 0, np.take_along_axis(total, np.maximum(first_over - 1, 0)[:, None],
                                                                    axis=1)[:, 0], 0)
    taken &= sizes > 0
    cursor = first_over + 1
    active = (room > 0) & (cursor < cols)
    while active.any():
        fits = (pos[None, :] >= cursor[:, None]) & (sizes > 0) & (sizes <= room[:, None])
        found = active & fits.any(axis=1)
        k = fits.argmax(axis=1)
        r = np.flatnonzero(found)
        taken[r, k[r]] = True
        room[r] -= sizes[r, k[r]]
        cursor = np.where(found, k + 1, cols)
        active = found & (room > 0) & (cursor < cols)
    taken_start = np.zeros((rows, cols), dtype=bool)
    np.put_along_axis(taken_start, order, taken, axis=1)
    picked = cand & np.take_along_axis(taken_start, np.maximum(word_start, 0), axis=1)
    capped = int(sizes.sum() - picked.sum()) if cfg.strategy == "bernoulli" else 0
    out = np.full((rows, cfg.max_predictions_per_seq), -1, dtype=np.int64)
    r_idx, c_idx = np.nonzero(picked)
    counts = picked.sum(axis=1)
    slot = np.arange(r_idx.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out[r_idx, slot] = c_idx
    return out, capped


def mask_tokens(input_ids: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, cfg: MaskingConfig, *,
                mask_id: int, vocab_size: int, special_ids: Sequence[int],
                is_subword: np.ndarray | None = None) -> dict:
    """Masked-LM inputs and targets for a batch `input_ids` (N, S) whose rows have `lengths` tokens.

    Candidates are positions below the length whose token is not in `special_ids` ([CLS], [SEP],
    [PAD]; [UNK] stays maskable). Returns new arrays (the inputs may be read-only views):
    `input_ids` int32 (N, S) masked; `masked_lm_positions` and `masked_lm_ids` int32 (N, P), the
    picked positions in ascending order and their original tokens, padded with 0;
    `masked_lm_weights` float32 (N, P), 1.0 for real slots and 0.0 for padding; and `counters`,
    a plain dict to pop off before the batch goes to Ray Data (predictions, mask_token,
    random_token, kept_token, capped). `is_subword` (bool by token id, True for `##` continuation
    pieces) is required for whole-word masking.
    """
    ids = np.asarray(input_ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(f"input_ids must be (N, S) and lengths (N,), got {ids.shape} and {lengths.shape}")
    if cfg.whole_word and is_subword is None:
        raise ValueError("whole_word masking needs is_subword (a bool array by token id, True for ## pieces)")
    rows, cols = ids.shape
    width = cfg.max_predictions_per_seq
    cand = _candidates(ids, lengths, special_ids)
    keys = rng.random((rows, cols), dtype=np.float32)
    keys[~cand] = _NO_KEY
    capped = 0
    if cfg.strategy == "exact":
        n = np.minimum(num_to_predict(lengths, cfg), cand.sum(axis=1))
    else:
        drawn = (keys < cfg.mask_prob).sum(axis=1)
        n = np.minimum(drawn, width)
        capped = int((drawn - n).sum())
    if cfg.whole_word:
        positions, capped = _whole_word_positions(ids, cand, keys, n if cfg.strategy == "exact"
                                                  else np.full(rows, width), cfg, np.asarray(is_subword))
    else:
        positions = _smallest(keys, n, width)

    real = positions >= 0                                      # (N, P)
    positions = np.where(real, positions, 0)
    labels = np.where(real, np.take_along_axis(ids, positions, axis=1), 0).astype(np.int32)
    choice = rng.random((rows, width))
    random_ids = rng.integers(0, vocab_size, size=(rows, width), dtype=np.int64)
    to_mask = real & (choice < cfg.mask_token_prob)
    to_random = real & ~to_mask & (choice < cfg.mask_token_prob + cfg.random_token_prob)
    masked = np.array(ids, dtype=np.int32, copy=True)
    r_idx, c_idx = np.nonzero(to_mask)
    masked[r_idx, positions[r_idx, c_idx]] = mask_id
    r_idx, c_idx = np.nonzero(to_random)
    masked[r_idx, positions[r_idx, c_idx]] = random_ids[r_idx, c_idx]
    predictions = int(real.sum())
    counters = {"predictions": predictions, "mask_token": int(to_mask.sum()),
                "random_token": int(to_random.sum()),
                "kept_token": predictions - int(to_mask.sum()) - int(to_random.sum()), "capped": capped}
    return {"input_ids": masked, "masked_lm_positions": positions.astype(np.int32),
            "masked_lm_ids": labels, "masked_lm_weights": real.astype(np.float32), "counters": counters}


def causal_lm_targets(input_ids: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token targets for the paper's left-to-right "LTR & No NSP" ablation (Table 5).

    Same keys as `mask_tokens` so the model and the loss need no second code path: the input is
    unchanged and every position predicts the token after it, so P = S - 1 (position S - 1 has no
    next token). Weights are 1 where that next token is inside the sequence (position + 1 <
    length, so the final [SEP] is predicted, the padding is not) and the padded slots have id 0.
    """
    ids = np.asarray(input_ids)
    lengths = np.asarray(lengths, dtype=np.int64)
    rows, cols = ids.shape
    pos = np.arange(cols - 1)
    real = (pos[None, :] + 1) < lengths[:, None]
    return {
        "input_ids": np.array(ids, dtype=np.int32, copy=True),
        "masked_lm_positions": np.broadcast_to(pos.astype(np.int32), (rows, cols - 1)).copy(),
        "masked_lm_ids": np.where(real, ids[:, 1:], 0).astype(np.int32),
        "masked_lm_weights": real.astype(np.float32),
    }


__all__ = ["MaskingConfig", "TABLE8_MIXES", "mask_tokens", "causal_lm_targets", "num_to_predict"]
