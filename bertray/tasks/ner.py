"""CoNLL-2003 NER: the column files, first-sub-token features, per-word decoding, entity F1.

Tags: the distributed `eng.train/testa/testb` use IOB1 (I- starts a chunk unless it follows a
chunk of the same type), while most copies in circulation, including ../shared/data/conll2003,
were rewritten to IOB2 (every chunk starts with B-). The reader converts IOB1 to IOB2 and counts
the tags it changed, so the classifier always learns one scheme; entity scoring uses the
conlleval chunk rules, which read both.

Long sentences are split, not truncated: words go, whole, into consecutive windows of at most
`max_seq_len - 2` sub-tokens, so every word gets a prediction. Only a single word longer than a
whole window loses its trailing sub-tokens (counted), which never carry a label anyway.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import fsspec
import numpy as np

from bertray.errors import TaskDataError
from bertray.tasks import metrics
from bertray.wordpiece import special_id, tokenizer_truncation

log = logging.getLogger(__name__)

CONLL_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
IGNORE_INDEX = -100          # PyTorch cross-entropy's ignore_index: sub-tokens after the first, specials, padding
_COLUMNS = 4                 # word, POS tag, chunk tag, NER tag


@dataclass(frozen=True)
class NerExample:
    guid: str
    words: tuple[str, ...]
    tags: tuple[str, ...]


def read_conll(path: str | os.PathLike,
               labels: Sequence[str] = CONLL_LABELS) -> tuple[list[NerExample], dict[str, int]]:
    """Read a CoNLL-2003 column file: `word POS chunk NER` per line, a blank line between
    sentences, `-DOCSTART-` lines between documents. Counts: `sentences`, `tokens`,
    `documents`, `iob1_converted` (tags rewritten from IOB1 to IOB2)."""
    path = os.fspath(path)
    known = set(labels)
    examples: list[NerExample] = []
    counts = {"sentences": 0, "tokens": 0, "documents": 0, "iob1_converted": 0}
    words: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if words:
            iob2 = to_iob2(tags)
            counts["iob1_converted"] += sum(a != b for a, b in zip(tags, iob2))
            examples.append(NerExample(f"sentence-{len(examples)}", tuple(words), tuple(iob2)))
            words.clear()
            tags.clear()

    with fsspec.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                flush()
                continue
            if fields[0] == "-DOCSTART-":
                flush()
                counts["documents"] += 1
                continue
            if len(fields) != _COLUMNS:
                raise TaskDataError(f"{path}:{line_no}: expected {_COLUMNS} space-separated columns "
                                    f"(word POS chunk NER), found {len(fields)}")
            if fields[3] not in known:
                raise TaskDataError(f"{path}:{line_no}: unknown NER tag {fields[3]!r}; "
                                    f"expected one of {', '.join(labels)}")
            words.append(fields[0])
            tags.append(fields[3])
    flush()
    counts["sentences"] = len(examples)
    counts["tokens"] = sum(len(e.words) for e in examples)
    if counts["iob1_converted"]:
        log.info("%s: IOB1 tags found; rewrote %d of them to IOB2", path, counts["iob1_converted"])
    log.info("%s: %s", path, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return examples, counts


def to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 -> IOB2: an I-X that starts a chunk (after O or another type) becomes B-X.
    IOB2 input comes back unchanged."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def featurize_ner(examples: Sequence[NerExample], tokenizer, max_seq_len: int = 128,
                  labels: Sequence[str] = CONLL_LABELS) -> dict[str, np.ndarray]:
    """`input_ids`, `token_type_ids`, `attention_mask`, `labels` [F, S] (the word's tag id on its
    first sub-token, -100 elsewhere), `word_index` [F, S] (the word a labelled position belongs
    to, -1 elsewhere) and `example_index` [F]; F > N when sentences need several windows."""
    cls_id, sep_id, pad_id = (special_id(tokenizer, t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    label_ids = {label: i for i, label in enumerate(labels)}
    budget = max_seq_len - 2
    with tokenizer_truncation(tokenizer, None):
        encodings = tokenizer.encode_batch([list(e.words) for e in examples], is_pretokenized=True,
                                           add_special_tokens=False)
    windows: list[tuple[int, list[int], list[int], list[int]]] = []   # (example, ids, labels, word_index)
    counts = {"split_sentences": 0, "words_truncated": 0, "words_without_tokens": 0}
    for i, (example, enc) in enumerate(zip(examples, encodings)):
        pieces: list[list[int]] = [[] for _ in example.words]
        for token_id, word in zip(enc.ids, enc.word_ids):
            pieces[word].append(token_id)
        counts["words_without_tokens"] += sum(not p for p in pieces)
        current = (i, [cls_id], [IGNORE_INDEX], [-1])
        first_window = len(windows)
        for w, piece in enumerate(pieces):
            if len(piece) > budget:
                counts["words_truncated"] += 1
                piece = piece[:budget]
            if len(current[1]) - 1 + len(piece) > budget:
                windows.append(current)
                current = (i, [cls_id], [IGNORE_INDEX], [-1])
            if not piece:
                continue
            current[1].extend(piece)
            current[2].extend([label_ids[example.tags[w]]] + [IGNORE_INDEX] * (len(piece) - 1))
            current[3].extend([w] + [-1] * (len(piece) - 1))
        windows.append(current)
        counts["split_sentences"] += len(windows) - first_window > 1
    n = len(windows)
    features = {
        "input_ids": np.full((n, max_seq_len), pad_id, dtype=np.int32),
        "token_type_ids": np.zeros((n, max_seq_len), dtype=np.int8),
        "attention_mask": np.zeros((n, max_seq_len), dtype=np.int8),
        "labels": np.full((n, max_seq_len), IGNORE_INDEX, dtype=np.int64),
        "word_index": np.full((n, max_seq_len), -1, dtype=np.int32),
        "example_index": np.zeros(n, dtype=np.int64),
    }
    for f, (i, ids, tag_ids, word_index) in enumerate(windows):
        length = len(ids) + 1
        features["input_ids"][f, :length] = ids + [sep_id]
        features["attention_mask"][f, :length] = 1
        features["labels"][f, :length - 1] = tag_ids
        features["word_index"][f, :length - 1] = word_index
        features["example_index"][f] = i
    log.info("NER features: %d sentences -> %d windows (%s)", len(examples), n,
             ", ".join(f"{k}={v}" for k, v in counts.items()))
    return features


def decode_ner(examples: Sequence[NerExample], features: Mapping[str, np.ndarray], logits: np.ndarray,
               labels: Sequence[str] = CONLL_LABELS) -> list[list[str]]:
    """Per-word tags from per-token logits [F, S, C], read at each word's first sub-token; a word
    with no sub-token (nothing the tokenizer keeps) is tagged O."""
    predicted = np.argmax(np.asarray(logits), axis=-1)
    word_index = features["word_index"]
    f_idx, pos = np.nonzero(word_index >= 0)
    out = [["O"] * len(e.words) for e in examples]
    for ex, w, k in zip(features["example_index"][f_idx], word_index[f_idx, pos], predicted[f_idx, pos]):
        out[ex][w] = labels[k]
    return out


def evaluate_ner(examples: Sequence[NerExample], features: Mapping[str, np.ndarray], logits: np.ndarray,
                 labels: Sequence[str] = CONLL_LABELS) -> dict[str, float]:
    """Entity-level precision, recall and F1 in percent, overall and per type (`f1_PER`, ...),
    with each type's gold entity count as `support_PER`."""
    scores = metrics.entity_scores([e.tags for e in examples], decode_ner(examples, features, logits, labels))
    return {k: v if k.startswith("support_") else 100.0 * v for k, v in scores.items()}
