"""Token tagging (NER) of raw texts: texts -> tokens with character offsets -> tags -> entities.

A text is tokenized once, without special tokens and without truncation, keeping each token's
character span in the original text (the tokenizer's alignments survive lower-casing and accent
stripping). A text longer than `max_seq_len - 2` tokens is cut into consecutive windows, at word
boundaries where a word fits, each run as `[CLS] window [SEP]`: every token gets a tag, none is
dropped. The windows of all texts go through the same length-sorted, padding-free inner loop as
classification (`inference.forward_sorted`); each token's tag is the arg-max of its softmax, and
`entities.group_entities` groups the tokens of a text the way `transformers`' pipeline does with
`aggregation_strategy="simple"`. A text that fits one window (CoNLL sentences, most paragraphs
at 128 tokens) gets exactly the pipeline's entities; a longer one, which the pipeline truncates
at the tokenizer's `model_max_length`, is tagged through to its end here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bertray.errors import ConfigError
from bertray.predict.entities import TaggedToken, group_entities
from bertray.predict.inference import Predictions, forward_sorted, softmax
from bertray.predict.model import LoadedModel


def windows(word_ids: Sequence[int | None], budget: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `budget` tokens covering all of them in order; a cut
    falls before the first token of a word unless that word alone is longer than the budget."""
    out, start, n = [], 0, len(word_ids)
    while start < n:
        end = min(start + budget, n)
        word = word_ids[end] if end < n else None
        if word is not None and word_ids[end - 1] == word:     # the cut would split a word
            first = end - 1
            while first > start and word_ids[first - 1] == word:
                first -= 1
            if first > start:                                  # it starts inside this window: cut before it
                end = first
        out.append((start, end))
        start = end
    return out


def tag(loaded: LoadedModel, texts: Sequence[str], *, batch_size: int = 64,
        batch_sizes: list[int] | None = None) -> Predictions:
    """The entities of each text (`Predictions.entities`), as character spans of that text."""
    from bertray.wordpiece import special_id, tokenizer_truncation

    if loaded.kind != "token":
        raise ConfigError(f"{loaded.path} is a {loaded.spec.what} model, not a token tagger")
    tokenizer = loaded.tokenizer
    cls_id, sep_id = special_id(tokenizer, "[CLS]"), special_id(tokenizer, "[SEP]")
    unk_id = tokenizer.token_to_id("[UNK]")
    with tokenizer_truncation(tokenizer, None):
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ids, owners = [], []                              # one row per window, in text order; owners: its text
    for i, encoding in enumerate(encodings):
        for start, end in windows(encoding.word_ids, loaded.max_seq_len - 2):
            ids.append(np.asarray([cls_id, *encoding.ids[start:end], sep_id], dtype=np.int64))
            owners.append(i)
    logits = np.zeros((0, 0, len(loaded.labels)), np.float32)
    if ids:
        logits = forward_sorted(loaded, ids, [np.zeros_like(x) for x in ids], batch_size=batch_size,
                                batch_sizes=batch_sizes)["logits"]
    per_text: list[list[np.ndarray]] = [[] for _ in encodings]
    for row, i in enumerate(owners):
        per_text[i].append(logits[row, 1:len(ids[row]) - 1])          # the window's tokens, no [CLS]/[SEP]
    join = tokenizer.decoder.decode if tokenizer.decoder is not None else " ".join
    entities = []
    for text, encoding, parts in zip(texts, encodings, per_text):
        probabilities = softmax(np.concatenate(parts) if parts else np.zeros((0, len(loaded.labels))))
        best = probabilities.argmax(1)
        tokens = []
        for k, (token_id, token, (start, end), special) in enumerate(
                zip(encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask)):
            if special:                               # as the pipeline: tokens the tokenizer marks special
                continue
            word = text[start:end] if token_id == unk_id else token
            tokens.append(TaggedToken(loaded.labels[best[k]], float(probabilities[k, best[k]]), word, start, end))
        entities.append(group_entities(tokens, join))
    return Predictions([], np.zeros(0), entities=entities)
