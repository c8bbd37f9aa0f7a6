"""WordPiece tokenization with the `tokenizers` library, matching Google's BERT rules.

A tokenizer comes from a `vocab.txt` (`from_vocab`), from training on a streamed corpus
(`train`), or from a saved directory or URL (`load`); `save` writes the Hugging Face layout
(`tokenizer.json`, `vocab.txt`, `tokenizer_config.json`) that checkpoints carry.

The pipeline is the one Hugging Face ships in every BERT `tokenizer.json` (BertNormalizer,
BertPreTokenizer, WordPiece with `[UNK]` for words over 100 characters, `[CLS] A [SEP] B [SEP]`
template), plus two steps that make its ids identical to the Python reference
(`transformers`' `BertTokenizerLegacy`, Google's rules) on real text:

- NFC after cleaning, as the reference does: a decomposed "é" (e + U+0301) is one character in
  the vocabulary, two without it (it matters for cased vocabularies).
- Python's `str.lower()` turns a word-final capital sigma into "ς", a per-character lowercasing
  into "σ"; the Replace step applies Python's Final_Sigma rule before lowercasing.

Remaining differences from the reference are Unicode-table artifacts, not rules. The reference
classifies characters with its interpreter's `unicodedata` (Unicode 14.0 on Python 3.11, 15.x
on later ones) and deletes code points unassigned there; the Rust pipeline keeps them, so the
word holding one becomes `[UNK]` (U+0378 in any version, emoji newer than the interpreter).
Its older tables also classify about 760 rare assigned code points differently (marks,
punctuation and format characters added in Unicode 11-14, U+166D and U+1734 which were
re-categorised, and U+2B820-U+2B91F, which its CJK ranges omit). The reference's answer moves
with the Python version, so this module does not chase it: tokenizing the same text the same
way everywhere matters more.

A `tokenizers.Tokenizer` must not be shared between threads: concurrent use fails with
"Already borrowed". Give every Ray actor or thread its own (`load` it there, or let Ray pickle
one into the actor, which makes a copy). Nothing here keeps global state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import fsspec
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from bertray.errors import ConfigError, check

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
"""In the order of BERT's vocabulary; a trained vocabulary gives them ids 0..4 in this order."""

CONTINUATION_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Python's Final_Sigma context: a capital sigma after a cased letter (case-ignorable characters
# in between allowed) and not followed by one.
_FINAL_SIGMA = r"(?<=\p{Cased}\p{Case_Ignorable}*)Σ(?!\p{Case_Ignorable}*\p{Cased})"


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the data pipeline and the model heads need, read once from the vocabulary."""

    pad: int
    unk: int
    cls: int
    sep: int
    mask: int


def special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """The ids of the five BERT special tokens; `ConfigError` if the vocabulary lacks one."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"tokenizer vocabulary lacks the BERT special token(s) {', '.join(missing)}; "
                          f"use a BERT vocab.txt or train one with bertray.wordpiece.train")
    return SpecialTokens(pad=ids[PAD], unk=ids[UNK], cls=ids[CLS], sep=ids[SEP], mask=ids[MASK])


def subword_mask(tokenizer: Tokenizer) -> np.ndarray:
    """Boolean `[vocab_size]`, True for `##` continuation pieces.

    Whole-word masking looks tokens up here to group a word with its continuations.
    """
    mask = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX):
            mask[i] = True
    return mask


# --------------------------------------------------------------------------------------------
# Building


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    """Clean, split CJK, NFC, then (uncased) lowercase and strip accents, in the reference's order."""
    steps = [normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                        strip_accents=False, lowercase=False),
             normalizers.NFC()]
    if lowercase:
        steps += [normalizers.Replace(Regex(_FINAL_SIGMA), "ς"),
                  normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False,
                                             strip_accents=True, lowercase=True)]
    return normalizers.Sequence(steps)


def _assemble(model: WordPiece, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=True)
    return tokenizer


def _finish(tokenizer: Tokenizer) -> Tokenizer:
    """Register the special tokens (so "[MASK]" in text stays one token) and the BERT templates."""
    ids = special_tokens(tokenizer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, ids.cls), (SEP, ids.sep)],
    )
    return tokenizer


def _read_vocab(vocab_path: str) -> dict[str, int]:
    try:
        with fsspec.open(vocab_path, "rt", encoding="utf-8", newline="") as f:
            tokens = [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise ConfigError(f"{vocab_path}: no such vocabulary file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{vocab_path}: not a UTF-8 vocab.txt ({exc})") from None
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise ConfigError(f"{vocab_path}: token {token!r} appears on lines {vocab[token] + 1} and {i + 1}; "
                              f"a vocab.txt lists each token once (its line number is its id)")
        vocab[token] = i
    if UNK not in vocab:
        raise ConfigError(f"{vocab_path}: no {UNK} line; a BERT vocab.txt has one token per line "
                          f"including {', '.join(SPECIAL_TOKENS)}")
    return vocab


def _vocab_is_uncased(vocab: Iterable[str]) -> bool:
    return all(token == token.lower() for token in vocab
               if not token.startswith(CONTINUATION_PREFIX) and not (token.startswith("[") and token.endswith("]")))


def from_vocab(vocab_path: str | os.PathLike, *, lowercase: bool | None = None) -> Tokenizer:
    """A BERT tokenizer over an existing `vocab.txt` (local path or fsspec URL).

    `lowercase=None` infers the casing from the vocabulary: it is uncased when lower-casing
    changes no whole-word token (neither a `##` continuation nor a bracketed special like
    `[unused0]`). Such a vocabulary was built from lower-cased text, so upper-case input could
    only become `[UNK]`; "has no upper-case letter" would be wrong, as bert-base-uncased lists
    "ℝ", an upper-case letter without a lower-case form. Accents are stripped exactly when
    lower-casing, as BERT does.
    """
    vocab_path = os.fspath(vocab_path)
    vocab = _read_vocab(vocab_path)
    if lowercase is None:
        lowercase = _vocab_is_uncased(vocab)
        log.info("%s: inferred %s vocabulary", vocab_path, "an uncased" if lowercase else "a cased")
    model = WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX,
                      max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    try:
        return _finish(_assemble(model, lowercase))
    except ConfigError as exc:
        raise ConfigError(f"{vocab_path}: {exc}") from None


def _counted(texts: Iterable[str], seen: list[int]) -> Iterator[str]:
    """Pass `texts` through, keeping the count in `seen[0]` for the summary and error messages."""
    for text in texts:
        seen[0] += 1
        yield text


def train(texts: Iterable[str], *, vocab_size: int, lowercase: bool = True, min_frequency: int = 2,
          limit_alphabet: int = 1000) -> Tokenizer:
    """Learn a WordPiece vocabulary of exactly `vocab_size` pieces from an iterable of texts.

    `texts` is consumed once, lazily (a generator over a corpus of any size is fine); nothing
    keeps it in memory beyond the trainer's word counts. The special tokens get ids 0..4 in the
    order BERT's vocabulary lists them: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4
    (Google's released vocabularies put 99 `[unused]` slots between `[PAD]` and `[UNK]`; a new
    vocabulary has no reason to). A corpus too small to yield `vocab_size` pieces at this
    `min_frequency` raises `ConfigError` rather than padding the vocabulary with dead rows.
    """
    check(isinstance(vocab_size, int) and vocab_size > len(SPECIAL_TOKENS), "vocab_size",
          f"must be an integer > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    check(isinstance(min_frequency, int) and min_frequency >= 1, "min_frequency",
          f"must be an integer >= 1, got {min_frequency!r}")
    check(isinstance(limit_alphabet, int) and limit_alphabet >= 1, "limit_alphabet",
          f"must be an integer >= 1, got {limit_alphabet!r}")
    check(not isinstance(texts, (str, bytes)), "texts",
          "must be an iterable of texts, not one string (it would be read character by character)")
    tokenizer = _assemble(WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX,
                                    max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=limit_alphabet,
        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix=CONTINUATION_PREFIX,
        show_progress=False)
    seen = [0]
    tokenizer.train_from_iterator(_counted(texts, seen), trainer=trainer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    log.info("trained a %d-piece WordPiece vocabulary on %d texts", size, seen[0])
    if size < vocab_size:
        raise ConfigError(f"vocab_size: the corpus ({seen[0]} texts) yields only {size} pieces at "
                          f"min_frequency={min_frequency}; use a larger corpus, a lower min_frequency, "
                          f"or vocab_size <= {size}")
    if size > vocab_size:
        raise ConfigError(f"vocab_size: {vocab_size} is smaller than the corpus alphabet needs ({size} pieces "
                          f"with limit_alphabet={limit_alphabet}); raise vocab_size or lower limit_alphabet")
    return _finish(tokenizer)


# --------------------------------------------------------------------------------------------
# Saving and loading


def lowercases(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer lower-cases its input (an uncased vocabulary)."""
    def walk(node: object) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "Lowercase" or node.get("lowercase") is True or any(map(walk, node.values()))
        return isinstance(node, list) and any(map(walk, node))

    return walk(json.loads(tokenizer.to_str()).get("normalizer"))


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Write `tokenizer.json`, `vocab.txt` (token of id i on line i) and `tokenizer_config.json`
    into `directory` (path or URL), the layout of a Hugging Face BERT checkpoint.

    `vocab.txt` because Google's code reads only that; `tokenizer_config.json` because
    `transformers.BertTokenizer` rebuilds its pipeline from it and would otherwise lower-case a
    cased vocabulary.
    """
    directory = os.fspath(directory)
    if not isinstance(tokenizer.model, WordPiece):
        raise ConfigError(f"{directory}: only WordPiece tokenizers have a vocab.txt; "
                          f"got a {type(tokenizer.model).__name__} model")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ConfigError(f"{directory}: the vocabulary ids are not 0..{len(by_id) - 1} without gaps, "
                          f"so no vocab.txt can represent it")
    bad = [token for token, _ in by_id if "\n" in token or "\r" in token]
    if bad:
        raise ConfigError(f"{directory}: token {bad[0]!r} contains a line break and cannot go in vocab.txt")
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    with fs.open(posixpath.join(root, TOKENIZER_FILE), "w", encoding="utf-8") as f:
        f.write(tokenizer.to_str(pretty=True))
    with fs.open(posixpath.join(root, VOCAB_FILE), "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token, _ in by_id))
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercases(tokenizer),
              "unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
    with fs.open(posixpath.join(root, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _from_json(path: str) -> Tokenizer:
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such tokenizer file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 tokenizer.json ({exc})") from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for schema errors
        raise ConfigError(f"{path}: not a valid tokenizer.json ({exc}); rewrite it with "
                          f"bertray.wordpiece.save or point at a vocab.txt") from None
    # A tokenizer.json may carry fixed-length padding and truncation (MiniLM's pads to 128);
    # callers cut and pad sequences themselves, so these would silently corrupt their ids.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    try:
        special_tokens(tokenizer)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return tokenizer


def _configured_lowercase(fs: fsspec.AbstractFileSystem, root: str, shown: str) -> bool | None:
    """`do_lower_case` of a checkpoint's `tokenizer_config.json` (what `transformers` applies to its
    `vocab.txt`), or None where there is none (then the vocabulary's own casing decides)."""
    config_path = posixpath.join(root, TOKENIZER_CONFIG_FILE)
    if not fs.isfile(config_path):
        return None
    try:
        value = json.loads(fs.cat_file(config_path)).get("do_lower_case")
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"{shown}/{TOKENIZER_CONFIG_FILE}: not a JSON object ({exc})") from None
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{shown}/{TOKENIZER_CONFIG_FILE}: do_lower_case must be true or false, got {value!r}")
    return value


def load(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at `path`: a directory (its `tokenizer.json`, else its `vocab.txt`, lower-cased
    as its `tokenizer_config.json` says), a `tokenizer.json` file, or a `vocab.txt` file; local or
    any fsspec URL (s3://, gs://, ...).

    Raises `ConfigError` naming `path` when nothing usable is there, or when the vocabulary lacks
    a BERT special token.
    """
    path = os.fspath(path)
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        def inner(name: str) -> str:
            return fs.unstrip_protocol(posixpath.join(root, name)) if "://" in path else os.path.join(path, name)

        if fs.isfile(posixpath.join(root, TOKENIZER_FILE)):
            tokenizer = _from_json(inner(TOKENIZER_FILE))
        elif fs.isfile(posixpath.join(root, VOCAB_FILE)):
            tokenizer = from_vocab(inner(VOCAB_FILE), lowercase=_configured_lowercase(fs, root, path))
        else:
            raise ConfigError(f"{path}: the directory has neither {TOKENIZER_FILE} nor {VOCAB_FILE}; "
                              f"point at a tokenizer directory (bertray.wordpiece.save writes one)")
    elif fs.isfile(root):
        tokenizer = _from_json(path) if root.endswith(".json") else from_vocab(path)
    else:
        raise ConfigError(f"{path}: no such file or directory; expected a directory with {TOKENIZER_FILE} "
                          f"or {VOCAB_FILE}, or one of those files")
    return tokenizer


def encode_documents(tokenizer: Tokenizer, documents: Sequence[Sequence[str]], *,
                     chunk_sentences: int = 4096) -> list[list[np.ndarray]]:
    """Documents of sentences -> documents of int32 token-id arrays (no special tokens).

    `encode_batch` runs over chunks of sentences across documents (few, large calls keep the Rust
    side busy), and each chunk's `Encoding` objects, which cost ~200 bytes per token, are turned
    into 4-byte ids before the next chunk is encoded, so memory follows the ids, not the objects.
    """
    flat = [s for doc in documents for s in doc]
    ids: list[np.ndarray] = []
    for start in range(0, len(flat), chunk_sentences):
        encodings = tokenizer.encode_batch(flat[start:start + chunk_sentences], add_special_tokens=False)
        ids.extend(np.asarray(e.ids, dtype=np.int32) for e in encodings)
    out, at = [], 0
    for doc in documents:
        out.append(ids[at:at + len(doc)])
        at += len(doc)
    return out


# --------------------------------------------------------------------------------------------
# Fine-tuning inputs


@contextlib.contextmanager
def tokenizer_truncation(tokenizer: Tokenizer, max_length: int | None) -> Iterator[None]:
    """Set the tokenizer's truncation (longest_first) and switch its padding off for the duration,
    then restore what the caller had: a `tokenizer.json` may carry its own settings (the
    MiniLM one pads and truncates to 128), and featurizers pad with numpy themselves."""
    truncation, padding = tokenizer.truncation, tokenizer.padding
    try:
        if max_length is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(max_length, strategy="longest_first")
        tokenizer.no_padding()
        yield
    finally:
        if truncation is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**truncation)
        if padding is not None:
            tokenizer.enable_padding(**padding)


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """One special token's id, for the fine-tuning featurizers (which need [CLS], [SEP] and [PAD] only)."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"the tokenizer has no {token} token; BERT fine-tuning needs [CLS], [SEP] and [PAD]")
    return token_id


def encode_pairs(tokenizer: Tokenizer, first: Sequence[str], second: Sequence[str] | None,
                 max_seq_len: int) -> dict[str, np.ndarray]:
    """`[CLS] a [SEP] b [SEP]` (or `[CLS] a [SEP]`) through the tokenizer's template, the longer
    side truncated first, padded to `max_seq_len`. Also counts truncated sequences (logged)."""
    inputs = list(first) if second is None else list(zip(first, second))
    with tokenizer_truncation(tokenizer, max_seq_len):
        encodings = tokenizer.encode_batch(inputs)
    n = len(encodings)
    if n and encodings[0].ids[:1] != [special_id(tokenizer, "[CLS]")]:
        raise ConfigError("the tokenizer adds no [CLS] ... [SEP] template; load a BERT tokenizer.json whose "
                          "post_processor is BERT's (TemplateProcessing or BertProcessing)")
    out = {
        "input_ids": np.full((n, max_seq_len), special_id(tokenizer, "[PAD]"), dtype=np.int32),
        "token_type_ids": np.zeros((n, max_seq_len), dtype=np.int8),
        "attention_mask": np.zeros((n, max_seq_len), dtype=np.int8),
    }
    truncated = 0
    for i, enc in enumerate(encodings):
        length = len(enc.ids)
        out["input_ids"][i, :length] = enc.ids
        out["token_type_ids"][i, :length] = enc.type_ids
        out["attention_mask"][i, :length] = 1
        truncated += bool(enc.overflowing)
    if truncated:
        log.info("truncated %d of %d sequences to %d tokens", truncated, n, max_seq_len)
    return out


__all__ = ["SPECIAL_TOKENS", "SpecialTokens", "encode_documents", "encode_pairs", "from_vocab", "load", "save",
           "special_id", "special_tokens", "subword_mask", "tokenizer_truncation", "train"]
