"""Raw text -> documents -> sentences, with cleaning and bad-record accounting.

BERT's next-sentence task needs *documents* (so a random B can come from elsewhere) made of
*sentences* (so A/B splits fall between them). Real corpora encode both in different ways:
Google's layout has one sentence per line and blank lines between documents; WikiText has one
paragraph per line and ` = Title = ` lines between articles; Project Gutenberg books are one
document per file with hard-wrapped paragraphs. `CorpusLayout` names these choices and
`LAYOUT_PRESETS` holds the common ones, so a corpus is described once instead of preprocessed.

Everything here streams: lines arrive from the file reader (`bertray.data.formats`, which decodes
a file's bytes and bounds each line by `max_line_chars`), documents leave as they are complete,
and every buffer is bounded (`max_sentence_chars`, `max_document_sentences`), so a 4 GB file
without a single newline costs the same memory as a tweet. What had to be repaired or cut is
counted in `CorpusCounters` rather than silently dropped, and `layout_warning` turns suspicious
counts into a message a user sees at the start of a run.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, get_args

from bertray.errors import ConfigError, check

log = logging.getLogger(__name__)

DocumentBoundary = Literal["blank_line", "file", "pattern"]
LineUnit = Literal["sentence", "paragraph", "wrapped"]
DOCUMENT_BOUNDARIES, LINE_UNITS = get_args(DocumentBoundary), get_args(LineUnit)


@dataclass(frozen=True)
class CorpusLayout:
    """How a text corpus marks documents and sentences.

    - `document_boundary`: "blank_line" (a blank line ends a document), "file" (each file, or each
      JSONL/Parquet row, is one document) or "pattern" (a line matching `boundary_pattern`, searched
      with `re.search` on the raw line, starts a new document; the marker line itself is dropped,
      as it is markup such as WikiText's ` = Title = `, not prose).
    - `line_unit`: "sentence" (each non-blank line is one sentence, Google's layout), "paragraph"
      (each non-blank line is a paragraph, split with `split_sentences`) or "wrapped" (consecutive
      non-blank lines are one hard-wrapped paragraph; a blank line ends the paragraph, so it cannot
      also end documents).
    - `skip_pattern`: raw lines to drop (section headings); they still end a wrapped paragraph.
    - `max_document_sentences`, `max_sentence_chars`: memory bounds. Longer documents are cut
      into several and longer sentences into pieces (at a space when one is near); each cut is
      counted. (Lines are bounded separately, by the reader's `iter_lines(max_line_chars=...)`.)
    - `text_field`: the column holding the text in JSONL/Parquet rows.
    """

    document_boundary: DocumentBoundary = "blank_line"
    boundary_pattern: str | None = None
    line_unit: LineUnit = "sentence"
    skip_pattern: str | None = None
    max_document_sentences: int = 2048
    max_sentence_chars: int = 10_000
    text_field: str = "text"

    def __post_init__(self) -> None:
        check(self.document_boundary in DOCUMENT_BOUNDARIES, "document_boundary",
              f"{self.document_boundary!r} is not allowed; choose one of {', '.join(DOCUMENT_BOUNDARIES)}")
        check(self.line_unit in LINE_UNITS, "line_unit",
              f"{self.line_unit!r} is not allowed; choose one of {', '.join(LINE_UNITS)}")
        if self.document_boundary == "pattern":
            check(bool(self.boundary_pattern), "boundary_pattern",
                  "is required when document_boundary is 'pattern' (a regex matching the line that "
                  "starts each document, e.g. '^ = [^=]' for WikiText titles)")
        else:
            check(self.boundary_pattern is None, "boundary_pattern",
                  f"is only used with document_boundary: pattern (it is {self.document_boundary!r}); "
                  "remove it or set document_boundary: pattern")
        for key in ("boundary_pattern", "skip_pattern"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({exc})") from None
        check(not (self.line_unit == "wrapped" and self.document_boundary == "blank_line"), "line_unit",
              "'wrapped' paragraphs end at blank lines, so blank lines cannot also end documents; "
              "use document_boundary: file or pattern with it")
        for key in ("max_document_sentences", "max_sentence_chars"):
            value = getattr(self, key)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                  f"must be a positive integer, got {value!r}")
        check(self.max_document_sentences >= 2, "max_document_sentences",
              f"must be at least 2 (NSP splits a document between sentences), got {self.max_document_sentences}")
        check(isinstance(self.text_field, str) and bool(self.text_field), "text_field",
              f"must be a non-empty column name, got {self.text_field!r}")


# Checked against the real files in ../shared/data/corpus (see tests/data/test_documents.py).
LAYOUT_PRESETS: dict[str, CorpusLayout] = {
    # Google's create_pretraining_data input: one sentence per line, blank line between documents.
    "bert": CorpusLayout(),
    # WikiText raw: ` = Title = ` starts an article, ` = = Section = = ` (any depth) are headings,
    # every other non-blank line is a whole paragraph.
    "wikitext": CorpusLayout(document_boundary="pattern", boundary_pattern=r"^\s*= [^=].* =\s*$",
                             line_unit="paragraph", skip_pattern=r"^\s*= =.* = =\s*$"),
    # Project Gutenberg books: a book per file, paragraphs hard-wrapped at ~70 columns, blank lines
    # between paragraphs; bare "CHAPTER XII" style headings are dropped.
    "gutenberg": CorpusLayout(document_boundary="file", line_unit="wrapped",
                              skip_pattern=r"^\s*(CHAPTER|Chapter|VOLUME|Volume|BOOK|Book|PART|Part)"
                                           r"\s+([IVXLCDM]+|\d+)\.?\s*$"),
    # Many scraped corpora: one paragraph per line, blank line between documents.
    "paragraphs": CorpusLayout(line_unit="paragraph"),
}


COUNTER_KEYS = (
    "files", "records", "bytes", "lines", "documents", "sentences", "empty_documents",
    "single_sentence_documents", "invalid_utf8", "control_chars_removed", "long_lines_cut",
    "long_sentences_cut", "long_documents_cut", "giant_document_sentences", "skipped_lines",
)


class CorpusCounters(dict):
    """What the reader saw and repaired, as plain integer counts that add up across blocks.

    A `dict` subclass so it pickles, prints and serialises like one (Ray ships it between
    processes); every key in `COUNTER_KEYS` starts at 0, so `counters["lines"] += 1` always works.
    `giant_document_sentences` counts sentences of documents that had to be cut although the
    layout promised boundaries inside files (blank_line or pattern): a sign they are missing.
    """

    def __init__(self, *args: object, **kwargs: int) -> None:
        super().__init__(dict.fromkeys(COUNTER_KEYS, 0))
        self.update(*args, **kwargs)

    def __missing__(self, key: str) -> int:
        return 0

    def merge(self, other: dict) -> "CorpusCounters":
        """Add `other`'s counts into this one (in place) and return it, for `functools.reduce`."""
        for key, value in other.items():
            self[key] = self.get(key, 0) + int(value)
        return self

    def as_dict(self) -> dict[str, int]:
        return {key: int(value) for key, value in self.items()}


# --------------------------------------------------------------------------------------------
# Cleaning and sentence splitting


def _removed_characters() -> dict[int, None]:
    """Control characters that are not whitespace (NUL, ESC, DEL, C1 controls), BOM, zero-width space.

    Whitespace controls (tab, CR, form feed, U+0085, ...) are left for `str.split` to turn into
    single spaces, so they separate words instead of gluing them together.
    """
    drop = {cp: None for cp in range(0xA0)
            if unicodedata.category(chr(cp)) == "Cc" and not chr(cp).isspace()}
    drop.update({0xFEFF: None, 0x200B: None})
    return drop


_REMOVED_CHARS = _removed_characters()
_REMOVED_RE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in _REMOVED_CHARS) + "]")


def clean_text(s: str, counters: CorpusCounters) -> str:
    """`s` without control characters, with every whitespace run (tabs included) one space, stripped.

    Control characters come from binary junk, bad conversions and terminal escapes; the tokenizer
    would drop or [UNK] them anyway, but removing them here lets us count how dirty a corpus is.
    """
    if _REMOVED_RE.search(s) is not None:
        cleaned = s.translate(_REMOVED_CHARS)
        counters["control_chars_removed"] += len(s) - len(cleaned)
        s = cleaned
    return " ".join(s.split())


# Lower-cased words that end with a period without ending the sentence. Words with an inner period
# (U.S., e.g., i.e., a.m.) and single letters (initials: "J. R. R. Tolkien") are handled by rule.
_ABBREVIATIONS = frozenset("""
    mr mrs ms messrs mme mlle dr prof rev hon st sr jr gen col capt cpt lt sgt maj adm cmdr gov
    sen rep pres supt insp vs etc al cf ca approx dept est fig figs no nos vol vols pp ed eds
    inc ltd co corp bros jan feb mar apr jun jul aug sep sept oct nov dec mt ft
""".split())
# Linear in the text: a match may only start where a run of punctuation starts (the lookbehind), and
# the possessive runs never give characters back. The plain `[.!?]+...\s+` retried every position of
# a run, so a line of n dots cost n^2 steps (20,000 dots: 4.4 s).
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"'\u201d\u2019)\]\u00bb]*+\s+")
_OPENING = "\"'\u201c\u2018([\u00ab"      # quotes and brackets that may open a sentence


def _is_abbreviation(word: str) -> bool:
    word = word.lstrip(_OPENING)
    if not word:
        return False
    if len(word) == 1:
        return word.isalpha()
    return "." in word or word.lower() in _ABBREVIATIONS


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph of (cleaned) English text into sentences, by rule.

    Rule-based because it has to run everywhere a Ray worker runs: no model download (workers
    may have no internet), no extra dependency, the same output on every machine and every run
    (the data position in a checkpoint must mean the same sentences on resume), and a few
    microseconds per paragraph, far below the tokenizer's cost. A sentence ends at a run of
    `. ! ?`, optionally followed by closing quotes or brackets, then whitespace, then an upper-case
    letter, a digit or an opening quote/bracket. A single `.` after a known abbreviation (Mr.,
    Dr., St., vs., etc.), after a word with an inner period (U.S., e.g., i.e.) or after a single
    letter (an initial) does not end a sentence; a decimal such as 3.14 never matches because no
    whitespace follows its point. The errors it makes (an abbreviation that really ends a
    sentence, lower-case sentence starts) only move an NSP split point, which BERT tolerates.
    """
    sentences: list[str] = []
    start = 0
    n = len(paragraph)
    for match in _SENTENCE_END.finditer(paragraph):
        end = match.end()
        if end >= n:
            break
        following = paragraph[end]
        if not (following.isupper() or following.isdigit() or following in _OPENING):
            continue
        dot = match.start()
        if paragraph[dot] == "." and (dot + 1 >= n or paragraph[dot + 1] not in ".!?"):
            word_start = max(paragraph.rfind(" ", start, dot) + 1, start)
            if _is_abbreviation(paragraph[word_start:dot]):
                continue
        sentence = paragraph[start:end].strip()
        if sentence:
            sentences.append(sentence)
        start = end
    last = paragraph[start:].strip()
    if last:
        sentences.append(last)
    return sentences


# --------------------------------------------------------------------------------------------
# Lines -> documents


def _pieces(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` chars, cut at its last space within each piece's limit (if in
    its second half), else hard at the limit, as the reader cuts long lines (`bertray.data.formats`),
    without re-slicing the remainder each time (a 1 MB line would otherwise be copied a hundred times)."""
    pos, n = 0, len(text)
    while n - pos > limit:
        k = text.rfind(" ", pos + limit // 2, pos + limit + 1)
        if k > pos:
            piece, pos = text[pos:k], k + 1
        else:
            piece, pos = text[pos:pos + limit], pos + limit
        if piece:
            yield piece
    if pos < n:
        yield text[pos:]


class DocumentPiece(list):
    """A document after the first cut of one longer than `max_document_sentences`: the same source
    text as the document read before it, so NSP must not draw a "random" B from the two."""


class _DocumentBuilder:
    """Collects the sentences of the current document and hands finished documents to `ready`."""

    def __init__(self, layout: CorpusLayout, counters: CorpusCounters, source: str, *,
                 per_file: bool) -> None:
        self.layout = layout
        self.counters = counters
        self.source = source
        # Cutting is expected when a whole file is one document; elsewhere it means missing boundaries.
        self.track_giant = not per_file
        self.started = per_file
        self.sentences: list[str] = []
        self.paragraph: list[str] = []
        self.paragraph_len = 0
        self.was_cut = False
        self.pieces = 0
        self.ready: list[list[str]] = []

    def add_sentence(self, sentence: str) -> None:
        limit = self.layout.max_sentence_chars
        if len(sentence) <= limit:
            self._append(sentence)
            return
        self.counters["long_sentences_cut"] += 1
        for piece in _pieces(sentence, limit):
            self._append(piece)

    def add_paragraph(self, text: str) -> None:
        for sentence in split_sentences(text):
            self.add_sentence(sentence)

    def add_wrapped_line(self, text: str) -> None:
        self.paragraph.append(text)
        self.paragraph_len += len(text) + 1
        if self.paragraph_len > 2 * self.layout.max_sentence_chars:
            # Bound the buffer of a paragraph that never ends: emit its finished sentences and
            # keep only the last, possibly unfinished one.
            sentences = split_sentences(" ".join(self.paragraph))
            for sentence in sentences[:-1]:
                self.add_sentence(sentence)
            last = sentences[-1] if sentences else ""
            if len(last) > self.layout.max_sentence_chars:
                self.add_sentence(last)
                last = ""
            self.paragraph = [last] if last else []
            self.paragraph_len = len(last)

    def end_paragraph(self) -> None:
        if self.paragraph:
            text = " ".join(self.paragraph)
            self.paragraph = []
            self.paragraph_len = 0
            self.add_paragraph(text)

    def end_document(self) -> None:
        self.end_paragraph()
        if self.sentences:
            self._emit()
        elif self.started and not self.was_cut:
            self.counters["empty_documents"] += 1
        self.started = False
        self.was_cut = False
        self.pieces = 0

    def _append(self, sentence: str) -> None:
        self.sentences.append(sentence)
        if len(self.sentences) >= self.layout.max_document_sentences:
            if not self.was_cut:
                self.counters["long_documents_cut"] += 1
                log.debug("%s: document longer than max_document_sentences=%d is cut",
                          self.source or "<text>", self.layout.max_document_sentences)
            self.was_cut = True
            self._emit()

    def _emit(self) -> None:
        doc = DocumentPiece(self.sentences) if self.pieces else self.sentences
        self.pieces += int(self.was_cut)
        self.sentences = []
        counters = self.counters
        counters["documents"] += 1
        counters["sentences"] += len(doc)
        if self.was_cut:
            if self.track_giant:
                counters["giant_document_sentences"] += len(doc)
        elif len(doc) == 1:
            counters["single_sentence_documents"] += 1
        self.ready.append(doc)


def _documents(lines: Iterable[str], layout: CorpusLayout, counters: CorpusCounters, source: str,
               *, per_file: bool) -> Iterator[list[str]]:
    boundary = None
    if layout.document_boundary == "pattern" and not per_file:
        boundary = re.compile(layout.boundary_pattern)
    skip = re.compile(layout.skip_pattern) if layout.skip_pattern else None
    blank_ends_document = layout.document_boundary == "blank_line" and not per_file
    unit = layout.line_unit
    builder = _DocumentBuilder(layout, counters, source, per_file=per_file)
    for line in lines:
        if boundary is not None and boundary.search(line):
            builder.end_document()
            builder.started = True
        elif skip is not None and skip.search(line):
            counters["skipped_lines"] += 1
            builder.end_paragraph()
        else:
            text = clean_text(line, counters)
            if text:
                builder.started = True
                if unit == "sentence":
                    builder.add_sentence(text)
                elif unit == "paragraph":
                    builder.add_paragraph(text)
                else:
                    builder.add_wrapped_line(text)
            elif not line or line.isspace():
                if blank_ends_document:
                    builder.end_document()
                else:
                    builder.end_paragraph()
            else:
                builder.started = True  # a line of nothing but control characters: junk content
        if builder.ready:
            yield from builder.ready
            builder.ready.clear()
    builder.end_document()
    yield from builder.ready


def iter_documents(lines: Iterable[str], layout: CorpusLayout, counters: CorpusCounters, *,
                   source: str = "") -> Iterator[list[str]]:
    """The documents (lists of cleaned sentences) of one file's lines, following `layout`.

    Documents are yielded as soon as they end, so memory holds one document at most
    (`max_document_sentences` sentences of at most `max_sentence_chars`). A document that ends
    with no sentences (a title with nothing under it, a line of junk) is skipped and counted in
    `empty_documents`; runs of blank lines are not empty documents. `source` names the file in
    log messages.
    """
    return _documents(lines, layout, counters, source, per_file=layout.document_boundary == "file")


def documents_from_text(text: str, layout: CorpusLayout, counters: CorpusCounters) -> list[list[str]]:
    """The document of one JSONL/Parquet row: its lines read with the layout's `line_unit` rules.

    A row is one document whatever `document_boundary` says (boundaries between rows are given by
    the format), so only `max_document_sentences` can turn it into several.
    """
    counters["records"] += 1
    return list(_documents(text.split("\n"), layout, counters, "", per_file=True))


def layout_warning(counters: CorpusCounters) -> str | None:
    """A loud message when the counts say the layout does not match the corpus, else None.

    Two mistakes ruin NSP silently: blank lines between *sentences* make every document one
    sentence long, so every pair is NotNext; no boundaries at all make one giant document, so
    random B's are rare and come from the same text. Both look like normal training otherwise.
    """
    documents = counters["documents"]
    single = counters["single_sentence_documents"]
    if documents >= 20 and single > 0.5 * documents:
        return (f"CORPUS LAYOUT LOOKS WRONG: {single} of {documents} documents "
                f"({100 * single / documents:.0f}%) have a single sentence, so nearly every NSP pair "
                "will be NotNext. If blank lines separate paragraphs or sentences rather than "
                "documents, use data.layout: gutenberg (one document per file, wrapped paragraphs) or "
                "data.document_boundary: pattern with data.boundary_pattern; if each line is a paragraph, "
                "use data.line_unit: paragraph (data.layout: paragraphs).")
    sentences = counters["sentences"]
    giant = counters["giant_document_sentences"]
    if sentences > 0 and giant > 0.9 * sentences:
        return (f"CORPUS LAYOUT LOOKS WRONG: {giant} of {sentences} sentences are in documents longer "
                "than max_document_sentences, so the document boundaries the layout expects are "
                "missing. Check that documents are separated by blank lines (data.layout: bert) or by "
                "lines matching data.boundary_pattern, or use data.document_boundary: file if each file "
                "is a document.")
    return None


__all__ = [
    "CorpusLayout", "LAYOUT_PRESETS", "CorpusCounters", "COUNTER_KEYS", "clean_text",
    "split_sentences", "iter_documents", "documents_from_text", "layout_warning",
]
