"""Tokenized documents -> next-sentence-prediction instances, as Google's `create_pretraining_data`.

The procedure is `create_instances_from_document` in github.com/google-research/bert: per
document a target length (short with probability `short_seq_prob`, drawn once per document),
chunks of consecutive sentences accumulated up to that target, a random split into A and B, B
replaced by a run of sentences from another document with probability `nsp_prob` (always for
one-sentence chunks), unused sentences put back, and the longer side trimmed one token at a time
from a random end.

Where we differ from the reference, on purpose:
- The random document is drawn uniformly among the *other* documents of the batch, so no draw
  can hit the current one and no retry limit is needed (the reference retries 10 times and then
  uses the current document anyway, labelling a real continuation "NotNext").
- When there is no other document (a batch of one), a pair that should get a random B gets the
  actual continuation and the label IsNext (counted in `relabelled_is_next`); a one-sentence
  chunk at the end of such a document has no continuation and yields no instance (counted in
  `unpaired_dropped`). A same-document B is therefore never labelled NotNext.
- Empty sentences (a line the tokenizer turned into nothing) are ignored, and a document with no
  tokens is skipped (`empty_documents`), so A and B are never empty.
- Truncation is computed in closed form (how many tokens each side loses is determined by the
  lengths; how many of them come off the front is Binomial(k, 1/2)), which has exactly the
  distribution of the reference's token-by-token loop without a Python loop per token.

The whole batch is assembled with array operations: every A and B is a contiguous slice of the
batch's concatenated tokens, so the padded `[CLS] A [SEP] B [SEP]` matrix is one gather.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bertray.errors import check

# Values of `next_sentence_labels`, as Hugging Face's BertForPreTraining reads them.
IS_NEXT = 0
NOT_NEXT = 1
NO_NSP_LABEL = -1

PROVENANCE_KEYS = ("doc_index", "a_start", "a_end", "b_doc_index", "b_start", "b_end")


@dataclass(frozen=True)
class NSPConfig:
    """Instance shape and the two probabilities of the reference procedure.

    `max_seq_len` counts the three special tokens; `short_seq_prob` is the share of documents
    whose target length is drawn uniformly from [2, max_seq_len - 3] (so the model also sees
    short inputs, as fine-tuning will); `nsp_prob` is the probability of a random (NotNext) B.
    """

    max_seq_len: int = 128
    short_seq_prob: float = 0.1
    nsp_prob: float = 0.5

    def __post_init__(self) -> None:
        check(isinstance(self.max_seq_len, int) and not isinstance(self.max_seq_len, bool)
              and self.max_seq_len >= 5, "max_seq_len",
              f"must be an integer >= 5 ([CLS] A [SEP] B [SEP] with non-empty A and B), got {self.max_seq_len!r}")
        for key in ("short_seq_prob", "nsp_prob"):
            value = getattr(self, key)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0,
                  key, f"must be a probability in [0, 1], got {value!r}")


class _Uniforms:
    """Scalar uniforms drawn from `rng` in blocks: a scalar `Generator` call costs about a
    microsecond, which would dominate the per-chunk logic; the block size is fixed, so the
    sequence of values depends only on the generator's state, not on the batch."""

    _BLOCK = 1024

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.values: list[float] = []
        self.pos = 0

    def random(self) -> float:
        if self.pos == len(self.values):
            self.values = self.rng.random(self._BLOCK).tolist()
            self.pos = 0
        self.pos += 1
        return self.values[self.pos - 1]

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high], both ends included (as Python's `random.randint`)."""
        return min(high, low + int(self.random() * (high - low + 1)))


@dataclass
class _Batch:
    """The batch's tokens, concatenated once, and for each document its non-empty sentences."""

    flat: np.ndarray                 # (total_tokens,) int32
    token_offset: np.ndarray         # (total_sentences + 1,) start of each sentence in `flat`
    doc_first: list[int]             # global index of each document's first sentence
    kept: list[list[int]]            # per document: global indices of its non-empty sentences
    kept_cum: list[list[int]]        # per document: cumulative token counts over `kept`, from 0


def _prepare(documents: Sequence[Sequence[np.ndarray]]) -> _Batch:
    sentences = [np.asarray(s) for doc in documents for s in doc]
    lengths = np.fromiter((s.size for s in sentences), dtype=np.int64, count=len(sentences))
    token_offset = np.zeros(len(sentences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_offset[1:])
    flat = (np.concatenate(sentences).astype(np.int32, copy=False) if sentences
            else np.zeros(0, dtype=np.int32))
    doc_first, kept, kept_cum = [], [], []
    first = 0
    lengths_list = lengths.tolist()
    for doc in documents:
        n = len(doc)
        idx = [first + j for j in range(n) if lengths_list[first + j] > 0]
        cum = [0]
        for g in idx:
            cum.append(cum[-1] + lengths_list[g])
        doc_first.append(first)
        kept.append(idx)
        kept_cum.append(cum)
        first += n
    return _Batch(flat, token_offset, doc_first, kept, kept_cum)


def _run_end(cum: list[int], start: int, budget: int) -> int:
    """End (exclusive) of the shortest run of sentences from `start` reaching `budget` tokens, or the
    document's end; at least one sentence."""
    n = len(cum) - 1
    return min(n, bisect_left(cum, cum[start] + budget, start + 1, n + 1))


def make_nsp_instances(documents: Sequence[Sequence[np.ndarray]], rng: np.random.Generator,
                       cfg: NSPConfig, *, cls_id: int, sep_id: int, pad_id: int = 0,
                       sources: Sequence[int] | None = None) -> dict:
    """NSP instances from a batch of tokenized documents (sentences as int token-id arrays).

    The batch is also the pool the random "other document" is drawn from. A pool of a few hundred
    documents (the pipeline's buffers hold up to 256; at least 8 when documents are long) is
    enough: NotNext only needs B to be unrelated to A, which a different document of the pool is
    as much as any document of the corpus; the reference itself only draws within
    one input shard. A small pool reuses each document as a random B more often, which does not
    matter because B's start sentence and the masks are fresh each time. A pool filled from one
    file in order draws B's from neighbouring, topically closer documents, which makes NotNext
    slightly harder, not wrong; mixing files in a pool (as the pipeline does) removes even that.
    Only a pool of one document changes the data, and that case is handled explicitly (see the
    module docstring).

    `sources` (one int per document, default: all different) says which documents are pieces of
    one source text (a book cut at `max_document_sentences`): a random B never comes from a
    document of the same source, and a pool holding a single source is a pool of one document.

    Returns `input_ids` int32 (N, max_seq_len) padded with `pad_id`, `token_type_ids` int8,
    `lengths` int32, `next_sentence_labels` int8 (0 IsNext, 1 NotNext), the provenance int32
    arrays `doc_index, a_start, a_end, b_doc_index, b_start, b_end` (sentence ranges, end
    exclusive, in the documents as given), and `counters`, a plain dict of int counts to pop off
    before the batch goes to Ray Data: instances, not_next, one_sentence_chunks (NotNext forced by
    a one-sentence chunk), relabelled_is_next, unpaired_dropped, short_targets, truncated_tokens,
    documents, empty_documents.
    """
    batch = _prepare(documents)
    uniforms = _Uniforms(rng)
    max_num_tokens = cfg.max_seq_len - 3
    usable = [d for d, idx in enumerate(batch.kept) if idx]
    counters = dict.fromkeys(("instances", "not_next", "one_sentence_chunks", "relabelled_is_next",
                              "unpaired_dropped", "short_targets", "truncated_tokens"), 0)
    counters["documents"] = len(usable)
    counters["empty_documents"] = len(documents) - len(usable)
    # Random B's are drawn from `pool`, the usable documents ordered by source, skipping the block
    # [lo, hi) of the current document's source. With every source distinct, `pool` is `usable`
    # and the block is the document itself.
    source = np.arange(len(documents)) if sources is None else np.asarray(sources, dtype=np.int64)
    usable_source = source[usable]
    by_source = np.argsort(usable_source, kind="stable")
    pool = [usable[i] for i in by_source]
    block_lo = np.searchsorted(usable_source[by_source], usable_source, side="left").tolist()
    block_hi = np.searchsorted(usable_source[by_source], usable_source, side="right").tolist()

    # One row per instance: token ranges in `flat` and sentence provenance, collected as Python ints.
    rows: list[tuple[int, ...]] = []
    offset = batch.token_offset.tolist()
    for u_pos, d in enumerate(usable):
        kept, cum = batch.kept[d], batch.kept_cum[d]
        n = len(kept)
        target = max_num_tokens
        if uniforms.random() < cfg.short_seq_prob:
            target = uniforms.integer(2, max_num_tokens)
            counters["short_targets"] += 1
        start = 0
        while start < n:
            end = _run_end(cum, start, target)
            size = end - start
            a_end = start + (uniforms.integer(1, size - 1) if size >= 2 else 1)
            random_next = size == 1 or uniforms.random() < cfg.nsp_prob
            b_doc, b_start, b_end = d, a_end, end
            next_start = end
            lo, hi = block_lo[u_pos], block_hi[u_pos]
            if random_next and len(pool) > hi - lo:
                other = uniforms.integer(0, len(pool) - (hi - lo) - 1)
                b_doc = pool[other + (hi - lo) if other >= lo else other]
                b_start = uniforms.integer(0, len(batch.kept[b_doc]) - 1)
                b_end = _run_end(batch.kept_cum[b_doc], b_start, target - (cum[a_end] - cum[start]))
                next_start = a_end
                counters["not_next"] += 1
                counters["one_sentence_chunks"] += int(size == 1)
            elif random_next:
                if a_end == n:
                    counters["unpaired_dropped"] += 1
                    break
                if size == 1:
                    b_end = next_start = _run_end(cum, a_end, target - (cum[a_end] - cum[start]))
                counters["relabelled_is_next"] += 1
                random_next = False
            b_kept, b_first = batch.kept[b_doc], batch.doc_first[b_doc]
            a_first = kept[start]
            a_last = kept[a_end - 1]
            b_first_sentence, b_last_sentence = b_kept[b_start], b_kept[b_end - 1]
            rows.append((
                offset[a_first], offset[a_last + 1], offset[b_first_sentence], offset[b_last_sentence + 1],
                d, a_first - batch.doc_first[d], a_last + 1 - batch.doc_first[d],
                b_doc, b_first_sentence - b_first, b_last_sentence + 1 - b_first,
                NOT_NEXT if random_next else IS_NEXT,
            ))
            start = next_start

    table = np.array(rows, dtype=np.int64).reshape(len(rows), 11)
    a_lo, a_hi, b_lo, b_hi = table[:, 0], table[:, 1], table[:, 2], table[:, 3]
    a_lo, a_hi, b_lo, b_hi, trimmed = _truncate_pairs(a_lo, a_hi, b_lo, b_hi, max_num_tokens, rng)
    counters["truncated_tokens"] = trimmed
    counters["instances"] = len(rows)
    out = _assemble(batch.flat, a_lo, a_hi, b_lo, b_hi, cfg.max_seq_len, cls_id, sep_id, pad_id)
    out["next_sentence_labels"] = table[:, 10].astype(np.int8)
    for k, key in enumerate(PROVENANCE_KEYS):
        out[key] = table[:, 4 + k].astype(np.int32)
    out["counters"] = counters
    return out


def _truncate_pairs(a_lo: np.ndarray, a_hi: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray,
                    max_num_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The reference's `truncate_seq_pair` for all pairs at once.

    The loop removes one token from the longer side (B on ties) until the pair fits: the longer
    side first loses the difference, then the two sides alternate starting with B. Each removal
    takes the front or the back with probability 1/2, so the front share of a side's k removals
    is Binomial(k, 1/2).
    """
    la, lb = a_hi - a_lo, b_hi - b_lo
    excess = np.maximum(la + lb - max_num_tokens, 0)
    a_longer = la > lb
    first = np.minimum(excess, np.abs(la - lb))
    rest = excess - first
    cut_a = np.where(a_longer, first, 0) + rest // 2
    cut_b = np.where(a_longer, 0, first) + (rest + 1) // 2
    front_a = rng.binomial(cut_a, 0.5)
    front_b = rng.binomial(cut_b, 0.5)
    return (a_lo + front_a, a_hi - (cut_a - front_a), b_lo + front_b, b_hi - (cut_b - front_b),
            int(excess.sum()))


def _assemble(flat: np.ndarray, a_lo: np.ndarray, a_hi: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray,
              seq_len: int, cls_id: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]` where B is empty) padded to `seq_len`, by one gather."""
    n = len(a_lo)
    la = (a_hi - a_lo)[:, None]
    lb = (b_hi - b_lo)[:, None]
    has_b = lb > 0
    length = 2 + la + lb + has_b                              # (N, 1)
    pos = np.arange(seq_len)[None, :]                         # (1, S)
    in_a = (pos >= 1) & (pos <= la)
    in_b = (pos >= la + 2) & (pos < la + 2 + lb)
    src = np.where(in_a, a_lo[:, None] + pos - 1, b_lo[:, None] + pos - la - 2)
    tokens = in_a | in_b
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    if flat.size:
        input_ids[tokens] = flat[src[tokens]]
    rows = np.arange(n)
    input_ids[:, 0] = cls_id
    input_ids[rows, la[:, 0] + 1] = sep_id
    ends = has_b[:, 0]
    input_ids[rows[ends], (length[:, 0] - 1)[ends]] = sep_id
    token_type_ids = ((pos >= la + 2) & (pos < length)).astype(np.int8)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids,
            "lengths": length[:, 0].astype(np.int32)}


def make_packed_instances(documents: Sequence[Sequence[np.ndarray]], *, max_seq_len: int, cls_id: int,
                          sep_id: int, pad_id: int = 0) -> dict:
    """Full `[CLS] tokens [SEP]` sequences for the paper's "No NSP" ablation (Table 5).

    Consecutive sentences of a document are packed until the next one does not fit, which then
    starts the next sequence; a sentence longer than a whole sequence is split into full pieces.
    There is no pair, so `next_sentence_labels` is -1 (the model ignores it), all segment ids are
    0 and `b_doc_index, b_start, b_end` are -1. Deterministic: no randomness is involved.
    """
    check(isinstance(max_seq_len, int) and max_seq_len >= 3, "max_seq_len",
          f"must be an integer >= 3 ([CLS] tokens [SEP]), got {max_seq_len!r}")
    batch = _prepare(documents)
    capacity = max_seq_len - 2
    offset = batch.token_offset.tolist()
    rows: list[tuple[int, int, int, int, int]] = []   # token lo, hi, doc, first sentence, end sentence
    for d, kept in enumerate(batch.kept):
        first = batch.doc_first[d]
        lo = hi = None
        s_start = s_end = 0
        for g in kept:
            s_lo, s_hi = offset[g], offset[g + 1]
            if lo is not None and s_hi - lo > capacity:
                rows.append((lo, hi, d, s_start - first, s_end))
                lo = None
            if lo is None:
                while s_hi - s_lo > capacity:
                    rows.append((s_lo, s_lo + capacity, d, g - first, g + 1 - first))
                    s_lo += capacity
                lo, s_start = s_lo, g
            hi, s_end = s_hi, g + 1 - first
        if lo is not None:
            rows.append((lo, hi, d, s_start - first, s_end))
    table = np.array(rows, dtype=np.int64).reshape(len(rows), 5)
    empty = np.zeros(len(rows), dtype=np.int64)
    out = _assemble(batch.flat, table[:, 0], table[:, 1], empty, empty, max_seq_len, cls_id, sep_id, pad_id)
    out["next_sentence_labels"] = np.full(len(rows), NO_NSP_LABEL, dtype=np.int8)
    out["doc_index"] = table[:, 2].astype(np.int32)
    out["a_start"] = table[:, 3].astype(np.int32)
    out["a_end"] = table[:, 4].astype(np.int32)
    for key in ("b_doc_index", "b_start", "b_end"):
        out[key] = np.full(len(rows), -1, dtype=np.int32)
    out["counters"] = {"instances": len(rows), "documents": sum(1 for k in batch.kept if k),
                       "empty_documents": sum(1 for k in batch.kept if not k)}
    return out


__all__ = ["NSPConfig", "make_nsp_instances", "make_packed_instances", "IS_NEXT", "NOT_NEXT",
           "NO_NSP_LABEL", "PROVENANCE_KEYS"]
