"""Corpus files -> documents, one format at a time: text, JSONL and Parquet, each read here.

`read_documents` is the one entry: it picks the format (`data.format`, or the extension through a
compression suffix), and streams the file's documents, counting what was cleaned or skipped.

    text     byte chunks (`iter_chunks`, decompressed) -> lines (`iter_lines`) -> documents by the
             layout (`bertray.data.documents.iter_documents`)
    JSONL    byte chunks -> lines -> one JSON row per line -> its text field is one document
             (`documents_from_text`)
    Parquet  pyarrow row batches of the text column -> one document per value

Files are streamed in chunks and never read whole, so a multi-GB shard costs a few MB of memory;
lines are bounded as they stream (`max_line_chars`). `preflight_layout` reads the first few hundred
documents before a run starts. Nothing here knows Ray: `pipeline.py` calls `read_documents` in its
read tasks; listing the corpus is `bertray.data.sources`.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
import posixpath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import fsspec

from bertray.data.documents import (CorpusCounters, CorpusLayout, documents_from_text, iter_documents,
                                    layout_warning)
from bertray.data.sources import CorpusFile, storage_options_for, with_timeout
from bertray.errors import ConfigError, CorpusError

log = logging.getLogger(__name__)

CORPUS_FORMATS = ("auto", "text", "jsonl", "parquet")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
CHUNK_BYTES = 1 << 20
MAX_TEXT_LINE_CHARS = 1 << 20        # longer lines are cut into pieces (and counted)
MAX_ROW_CHARS = 64 << 20             # one JSONL row or Parquet value may be long; beyond this it is skipped
WARNINGS_PER_FILE = 3                # bad rows named per file; the counters keep every one


# --------------------------------------------------------------------------------------------
# Bytes -> lines


_UTF8_REPLACEMENT = "\ufffd"
_UTF8_REPLACEMENT_BYTES = _UTF8_REPLACEMENT.encode("utf-8")


class _LineSplitter:
    """Splits decoded text into lines while holding at most `max_line_chars` of an unfinished line.

    A longer line is yielded in pieces (`cut`), or dropped as it streams and yielded as one None
    (`skip`: a JSONL row cut in pieces is no longer JSON, and the None keeps line numbers right)."""

    def __init__(self, counters: CorpusCounters, max_line_chars: int, *, skip_overlong: bool = False) -> None:
        self.counters = counters
        self.limit = max_line_chars
        self.skip_overlong = skip_overlong
        self.pending: list[str] = []
        self.pending_len = 0
        self.was_cut = False
        self.skipping = False

    def feed(self, text: str) -> list[str | None]:
        out: list[str | None] = []
        parts = text.split("\n")
        last = len(parts) - 1
        for i, part in enumerate(parts):
            if part:
                self._append(part, out)
            if i < last:
                self._end_line(out)
        return out

    def finish(self) -> list[str | None]:
        out: list[str | None] = []
        if self.pending or self.skipping:
            self._end_line(out)
        return out

    def _append(self, part: str, out: list[str | None]) -> None:
        if self.skipping:
            return
        limit = self.limit
        if self.pending_len + len(part) <= limit:
            self.pending.append(part)
            self.pending_len += len(part)
            return
        if self.skip_overlong:
            self.skipping = True
            self.pending = []
            self.pending_len = 0
            return
        pos = 0
        while self.pending_len + (len(part) - pos) > limit:
            take = limit - self.pending_len
            head = "".join(self.pending) + part[pos:pos + take]
            piece, carry = _cut_at_space(head, limit)
            if not self.was_cut:
                self.counters["long_lines_cut"] += 1
                self.was_cut = True
            out.append(piece)
            self.pending = [carry] if carry else []
            self.pending_len = len(carry)
            pos += take
        if pos < len(part):
            self.pending.append(part[pos:])
            self.pending_len += len(part) - pos

    def _end_line(self, out: list[str | None]) -> None:
        self.counters["lines"] += 1
        if self.skipping:
            out.append(None)
            self.skipping = False
            return
        line = "".join(self.pending)
        if line.endswith("\r"):
            line = line[:-1]
        # The tail of a cut line may be empty; yielding it would look like a blank line.
        if line or not self.was_cut:
            out.append(line)
        self.pending = []
        self.pending_len = 0
        self.was_cut = False


def _cut_at_space(text: str, limit: int) -> tuple[str, str]:
    """Split `text` at its last space within its first `limit` chars (if in their second half),
    else hard at `limit`, so the head has at most `limit` chars and words stay whole if possible."""
    k = text.rfind(" ", limit // 2, limit + 1)
    if k > 0:
        return text[:k], text[k + 1:]
    return text[:limit], text[limit:]


def iter_lines(chunks: Iterable[bytes], counters: CorpusCounters, *, max_line_chars: int,
               skip_overlong: bool = False) -> Iterator[str | None]:
    """The lines of one file given as byte chunks of any size (one call counts one file).

    Decoding is incremental, so a multi-byte character split across two chunks decodes correctly;
    undecodable bytes become U+FFFD and are counted as `invalid_utf8` (a real U+FFFD in the file is
    not). Lines end at `\\n` (a trailing `\\r` is dropped); a line longer than `max_line_chars` is
    yielded in pieces as it streams (counted once in `long_lines_cut`) so a newline-free file
    never sits in memory whole; with `skip_overlong` it is dropped as it streams and yielded as
    None, for the caller to count and name. A missing final newline still ends the last line; an
    empty file yields nothing.
    """
    if max_line_chars < 1:
        raise ConfigError(f"max_line_chars: must be a positive integer, got {max_line_chars!r}")
    counters["files"] += 1
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    splitter = _LineSplitter(counters, max_line_chars, skip_overlong=skip_overlong)
    tail = b""
    for chunk in chunks:
        if not chunk:
            continue
        counters["bytes"] += len(chunk)
        text = decoder.decode(chunk)
        if _UTF8_REPLACEMENT in text:
            # A genuine U+FFFD is decoded with the chunk its bytes end in; `tail` (the stream's
            # previous two bytes) catches the ones that started before this chunk.
            genuine = (tail + bytes(chunk)).count(_UTF8_REPLACEMENT_BYTES)
            counters["invalid_utf8"] += text.count(_UTF8_REPLACEMENT) - genuine
        tail = (tail + bytes(chunk[-2:]))[-2:]
        yield from splitter.feed(text)
    text = decoder.decode(b"", final=True)
    counters["invalid_utf8"] += text.count(_UTF8_REPLACEMENT)
    yield from splitter.feed(text)
    yield from splitter.finish()


# --------------------------------------------------------------------------------------------
# Files -> documents, per format


def _strip_compression(url: str) -> tuple[str, str | None]:
    base, ext = posixpath.splitext(url)
    return (base, COMPRESSIONS[ext]) if ext in COMPRESSIONS else (url, None)


def detect_format(url: str) -> str:
    """File format from the extension, looking through a compression suffix (`x.jsonl.gz`)."""
    base, _ = _strip_compression(url.lower())
    if base.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if base.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


class FileTooLarge(Exception):
    """A file decompressed past `max_bytes`: a decompression bomb, or a shard nobody meant to be that big."""


def iter_chunks(url: str, *, storage_options: Mapping[str, Any] | None = None,
                chunk_bytes: int = CHUNK_BYTES, max_bytes: int | None = None) -> Iterator[bytes]:
    """The file's bytes, decompressed by extension, `chunk_bytes` at a time, at most `max_bytes`."""
    _, compression = _strip_compression(url)
    seen = 0
    with fsspec.open(url, "rb", compression=compression, **storage_options_for(url, storage_options)) as f:
        while chunk := f.read(chunk_bytes):
            seen += len(chunk)
            if max_bytes is not None and seen > max_bytes:
                raise FileTooLarge(f"more than {max_bytes:,} bytes{' after decompression' if compression else ''} "
                                   "(data.max_file_bytes)")
            yield chunk


class _BadRows:
    """One file's bad rows: the first few named (file:line) as they come, the total said once at
    the end, so a shard of broken rows is a few log lines, not a flood. The counters keep them all."""

    def __init__(self, url: str) -> None:
        self.url, self.count = url, 0

    def skip(self, counters: CorpusCounters, key: str, line_no: int, why: str) -> None:
        counters[key] += 1
        self.count += 1
        if self.count <= WARNINGS_PER_FILE:
            log.warning("%s:%d: skipped %s", self.url, line_no, why)

    def close(self) -> None:
        if self.count > WARNINGS_PER_FILE:
            log.warning("%s: %d bad rows skipped in all (the first %d named above)", self.url, self.count,
                        WARNINGS_PER_FILE)


def _row_layout(layout: CorpusLayout) -> CorpusLayout:
    """A JSONL/Parquet row is one document of running text: its lines are paragraphs to split into
    sentences, even under the `bert` layout whose text files hold one sentence per line."""
    return dataclasses.replace(layout, line_unit="paragraph") if layout.line_unit == "sentence" else layout


def _jsonl_documents(file: CorpusFile, layout: CorpusLayout, counters: CorpusCounters,
                     storage_options: Mapping[str, Any] | None, max_bytes: int | None) -> Iterator[list[str]]:
    layout = _row_layout(layout)
    chunks = iter_chunks(file.url, storage_options=storage_options, max_bytes=max_bytes)
    lines = iter_lines(chunks, counters, max_line_chars=MAX_ROW_CHARS, skip_overlong=True)
    bad = _BadRows(file.url)
    try:
        for line_no, line in enumerate(lines, 1):
            if line is None:
                bad.skip(counters, "long_rows_skipped", line_no, f"a JSON row longer than {MAX_ROW_CHARS} characters")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:   # malformed, nested too deep, an integer too long
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else f"{type(exc).__name__}: {exc}"
                bad.skip(counters, "bad_json_rows", line_no, f"a malformed JSON row ({why})")
                continue
            text = row.get(layout.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                bad.skip(counters, "rows_without_text", line_no, f"a row without a string field {layout.text_field!r}")
                continue
            yield from documents_from_text(text, layout, counters)
    finally:
        bad.close()


def _parquet_documents(file: CorpusFile, layout: CorpusLayout, counters: CorpusCounters,
                       storage_options: Mapping[str, Any] | None) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    layout = _row_layout(layout)
    counters["files"] += 1  # text and JSONL files are counted by iter_lines
    with fsspec.open(file.url, "rb", **storage_options_for(file.url, storage_options)) as f:
        parquet = pq.ParquetFile(f)
        if layout.text_field not in parquet.schema_arrow.names:
            # One odd shard must not end a long run: skipped and counted. The preflight read of the
            # first files turns this into a CorpusError before anything starts (`preflight_layout`).
            counters["files_without_text_column"] += 1
            log.error("%s: no column %r (columns: %s); file skipped, set data.text_field", file.url,
                      layout.text_field, ", ".join(parquet.schema_arrow.names))
            return
        bad = _BadRows(file.url)
        row_no = 0
        try:
            for batch in parquet.iter_batches(columns=[layout.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    row_no += 1
                    if not isinstance(text, str):
                        counters["rows_without_text"] += 1
                    elif len(text) > MAX_ROW_CHARS:
                        bad.skip(counters, "long_rows_skipped", row_no, f"a value longer than {MAX_ROW_CHARS} characters")
                    else:
                        yield from documents_from_text(text, layout, counters)
        finally:
            bad.close()


def read_documents(file: CorpusFile, layout: CorpusLayout, counters: CorpusCounters, *,
                   fmt: str = "auto", storage_options: Mapping[str, Any] | None = None,
                   max_bytes: int | None = None, errors: list[str] | None = None) -> Iterator[list[str]]:
    """Stream one file's documents (lists of sentences), counting what was cleaned or skipped.

    A file that vanished between listing and reading, or that fails mid-read, is logged and counted
    (`missing_files`, `unreadable_files`) and the run goes on: one lost shard must not end a
    week-long pretraining run. The counters say how much was lost. A file that decompresses past
    `max_bytes` keeps what was read before and is counted as `oversized_files`. `errors`, when
    given, receives one "url: what went wrong" line per such file.
    """
    fmt = detect_format(file.url) if fmt == "auto" else fmt
    try:
        if fmt == "text":
            lines = iter_lines(iter_chunks(file.url, storage_options=storage_options, max_bytes=max_bytes), counters,
                               max_line_chars=MAX_TEXT_LINE_CHARS)
            yield from iter_documents(lines, layout, counters, source=file.url)
        elif fmt == "jsonl":
            yield from _jsonl_documents(file, layout, counters, storage_options, max_bytes)
        elif fmt == "parquet":
            yield from _parquet_documents(file, layout, counters, storage_options)
        else:
            raise CorpusError(f"format {fmt!r} is unknown; choose one of {', '.join(CORPUS_FORMATS)}")
    except FileNotFoundError:
        counters["missing_files"] += 1
        _file_error(errors, file, "the file disappeared after the corpus was listed; skipped")
    except CorpusError:
        raise
    except FileTooLarge as exc:
        counters["oversized_files"] += 1
        _file_error(errors, file, f"{exc}; the rest of this file is skipped")
    except Exception as exc:
        counters["unreadable_files"] += 1
        _file_error(errors, file, f"reading failed ({type(exc).__name__}: {exc}); the rest of this file is skipped")


def _file_error(errors: list[str] | None, file: CorpusFile, message: str) -> None:
    log.error("%s: %s", file.url, message)
    if errors is not None:
        errors.append(f"{file.url}: {message}")


def preflight_layout(files: Sequence[CorpusFile], layout: CorpusLayout, *, fmt: str = "auto",
                     storage_options: Mapping[str, Any] | None = None, max_documents: int = 500,
                     timeout_s: float = 300.0) -> str | None:
    """Read the first few hundred documents and return `layout_warning`'s message, if any.

    A mis-configured layout (blank lines between sentences, no document boundaries) trains
    normally and silently ruins NSP; saying so before a long run starts costs a second. A corpus
    that gives no document at all is a `CorpusError`, and so is a check that does not finish within
    `timeout_s` (the message names the file it was reading).
    """
    reading: list[str] = ["(listing)"]
    try:
        return with_timeout(lambda: _preflight(files, layout, fmt, storage_options, max_documents, reading),
                             timeout_s, "the start-up read of the corpus")
    except CorpusError as exc:
        if "did not answer" in str(exc):
            raise CorpusError(f"the start-up read of the corpus did not finish within {timeout_s:g} s; it was "
                              f"reading {reading[-1]} (a blocked file or an endpoint that does not answer)") from None
        raise


def _preflight(files: Sequence[CorpusFile], layout: CorpusLayout, fmt: str,
               storage_options: Mapping[str, Any] | None, max_documents: int, reading: list[str]) -> str | None:
    counters, seen, errors = CorpusCounters(), 0, []
    for file in files:
        reading.append(file.url)
        for _ in read_documents(file, layout, counters, fmt=fmt, storage_options=storage_options, errors=errors):
            seen += 1
            if seen >= max_documents:
                return layout_warning(counters)
        if counters["files_without_text_column"] and not seen:
            raise CorpusError(f"{file.url}: no column {layout.text_field!r} holds the text; set data.text_field")
    if not seen:
        raise CorpusError(nothing_read(len(files), errors, counters))
    return layout_warning(counters)


def nothing_read(n_files: int, errors: Sequence[str], counters: Mapping[str, int]) -> str:
    """Why a corpus gave no document: the first few files' errors, or what the reader skipped."""
    if errors:
        shown = "\n  ".join(errors[:3])
        return (f"the corpus gives no document: {len(errors)} of its {n_files} file(s) could not be read"
                f"{' (the first 3 below)' if len(errors) > 3 else ''}:\n  {shown}")
    skipped = {k: v for k, v in counters.items() if v and k.endswith(("_skipped", "_rows", "_lines", "_text"))}
    return (f"the corpus gives no document: its {n_files} file(s) are empty, or every line or row was skipped "
            f"({', '.join(f'{k}={v:,}' for k, v in skipped.items()) or 'nothing counted'}); check data.format, "
            "data.layout and data.text_field")
