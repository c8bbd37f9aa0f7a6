"""Rows of a user's data file, whatever its format, one at a time.

A task card (`bertray.tasks.card`) points at files in any place fsspec reaches (a local path,
`s3://`, `gs://`, ...), plain or compressed (`.gz`, `.zst`, ...: inferred from the name). This
module turns one such file into a stream of `Row`s, so that neither the driver's checks nor a
trial's reader ever holds the file's raw text next to the parsed rows:

    csv      RFC 4180: quoted fields may hold the delimiter, doubled quotes and line breaks
    tsv      the same with a tab (a field that starts with a quote is read as quoted, as the
             csv module and pandas write it; `quote: none` reads quotes as plain characters,
             as GLUE's own files need)
    jsonl    one JSON object per line
    json     one JSON array of objects, parsed object by object (never loaded whole)
    parquet  record batches of 1,024 rows
    conll    whitespace-separated columns, one token per line, a blank line between sentences
             (`-DOCSTART-` lines skipped); a row is a sentence: {"tokens": [...], "tags": [...]}

A row that cannot be read (wrong number of fields, invalid JSON, not an object) comes out as a
`Row` with a `problem`, so the caller can count and name it (`file:line`) instead of failing on
the first one. Positions are 1-based lines of the file (the record's first line for multi-line
CSV records); Parquet rows are numbered from 1 (`file:row 7`).
"""

from __future__ import annotations

import csv
import json
import posixpath
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import fsspec
from fsspec.utils import infer_compression

from bertray.errors import TaskDataError

Format = Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "conll", "squad"]
FORMATS: tuple[str, ...] = ("auto", "csv", "tsv", "jsonl", "json", "parquet", "conll", "squad")

_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "json", ".parquet": "parquet", ".pq": "parquet", ".conll": "conll", ".txt": "conll"}
_BATCH_ROWS = 1024
_CHUNK_CHARS = 1 << 20

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))     # a long document in one field is data, not an attack


@dataclass(frozen=True)
class FileFormat:
    """How to read one file: the card's format options."""

    format: str = "auto"                 # one of FORMATS; auto: from the extension (after .gz/.zst)
    delimiter: str | None = None         # csv: ",", tsv: tab
    header: bool = True                  # csv/tsv: the first row names the columns (else 0, 1, 2, ...)
    quote: bool = True                   # csv/tsv: honour RFC 4180 quoting
    encoding: str = "utf-8-sig"          # a UTF-8 byte-order mark is dropped


@dataclass(frozen=True)
class Row:
    """One record: its position in the file (`line`, 1-based), its fields, or why it is unreadable."""

    line: int
    fields: dict[str, Any] | None
    problem: str | None = None


def format_of(url: str, fmt: FileFormat) -> str:
    """The format of `url`: the card's, or the one its extension says (`.csv.gz` -> csv)."""
    if fmt.format != "auto":
        return fmt.format
    name = posixpath.basename(url.split("?", 1)[0]).lower()
    if infer_compression(name):
        name = posixpath.splitext(name)[0]
    kind = _EXTENSIONS.get(posixpath.splitext(name)[1])
    if kind is None:
        raise TaskDataError(f"{url}: cannot tell the format from the file name; give `format` "
                            f"({', '.join(f for f in FORMATS if f != 'auto')})")
    return kind


def open_file(url: str, mode: str = "rb", **kw: Any):
    """An fsspec file, decompressed as its name says; a missing file is a `TaskDataError` naming it."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        where = posixpath.dirname(path.rstrip("/")) or "."
        raise TaskDataError(f"{url}: no such file" + ("" if fs.isdir(where) else f" (nor the folder {where})"))
    return fsspec.open(url, mode, compression="infer", **kw)


def read_rows(url: str, fmt: FileFormat) -> Iterator[Row]:
    """Every record of `url` in file order (see the module docstring)."""
    kind = format_of(url, fmt)
    if kind in ("csv", "tsv"):
        yield from _delimited(url, fmt, "\t" if kind == "tsv" else ",")
    elif kind == "jsonl":
        yield from _jsonl(url, fmt)
    elif kind == "json":
        yield from _json_array(url, fmt)
    elif kind == "parquet":
        yield from _parquet(url)
    elif kind == "conll":
        yield from _conll(url, fmt)
    else:
        raise TaskDataError(f"{url}: format {kind!r} has no row reader (a squad file is read whole by the span reader)")


def columns(url: str, fmt: FileFormat, *, sample: int = 1000) -> list[str]:
    """The column names of `url`: the header (csv/tsv), the schema (parquet), or the keys of its
    first `sample` readable records (json, jsonl), in order of appearance."""
    kind = format_of(url, fmt)
    if kind == "parquet":
        import pyarrow.parquet as pq

        with open_file(url) as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    if kind == "conll":
        return ["tokens", "tags"]
    seen: dict[str, None] = {}
    for i, row in enumerate(read_rows(url, fmt)):
        if row.fields is not None:
            seen.update(dict.fromkeys(row.fields))
            if kind in ("csv", "tsv"):       # every record has the header's names
                break
        if i + 1 >= sample:
            break
    if kind in ("csv", "tsv") and not seen:
        seen.update(dict.fromkeys(_header(url, fmt, "\t" if kind == "tsv" else ",")))
    return list(seen)


# --------------------------------------------------------------------------------------------
# Readers


def _text(url: str, fmt: FileFormat):
    return open_file(url, "rt", encoding=fmt.encoding, newline="")


def _header(url: str, fmt: FileFormat, default: str) -> list[str]:
    with _text(url, fmt) as f:
        reader = csv.reader(f, **_dialect(fmt, default))
        first = next(reader, None) or []
    return first if fmt.header else [str(i) for i in range(len(first))]


def _dialect(fmt: FileFormat, default: str) -> dict[str, Any]:
    delimiter = fmt.delimiter or default
    if fmt.quote:
        return {"delimiter": delimiter, "quotechar": '"', "doublequote": True, "strict": False}
    return {"delimiter": delimiter, "quoting": csv.QUOTE_NONE}


def _delimited(url: str, fmt: FileFormat, default: str) -> Iterator[Row]:
    with _text(url, fmt) as f:
        reader = csv.reader(f, **_dialect(fmt, default))
        start = 1
        header: list[str] | None = None
        try:
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record or record == [""]:          # a blank line is no record
                    continue
                if header is None:
                    if fmt.header:
                        header = [name.strip() for name in record]
                        continue
                    header = [str(i) for i in range(len(record))]
                if len(record) != len(header):
                    yield Row(line, None, f"expected {len(header)} fields, found {len(record)}")
                    continue
                yield Row(line, dict(zip(header, record)))
        except csv.Error as exc:
            raise TaskDataError(f"{url}:{start}: cannot read the {'tsv' if default == chr(9) else 'csv'} "
                                f"file ({exc})") from None


def _jsonl(url: str, fmt: FileFormat) -> Iterator[Row]:
    with _text(url, fmt) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Row(line, None, f"not valid JSON ({exc.msg})")
                continue
            yield Row(line, value) if isinstance(value, dict) else Row(line, None, "not a JSON object")


def _json_array(url: str, fmt: FileFormat) -> Iterator[Row]:
    """`[{...}, {...}, ...]` parsed one object at a time from 1 MiB chunks (`raw_decode`), so a
    large file is never held whole; line numbers count the newlines consumed."""
    decoder = json.JSONDecoder()
    with _text(url, fmt) as f:
        buffer, pos, line, opened = "", 0, 1, False
        while True:
            # skip white space and separators, keeping count of the lines
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                    line += buffer[pos] == "\n"
                    pos += 1
                if pos < len(buffer):
                    break
                chunk = f.read(_CHUNK_CHARS)
                if not chunk:
                    if not opened:
                        raise TaskDataError(f"{url}: empty file; expected a JSON array of records")
                    raise TaskDataError(f"{url}:{line}: the JSON array is not closed with ]")
                buffer, pos = chunk, 0
            if not opened:
                if buffer[pos] != "[":
                    raise TaskDataError(f"{url}:{line}: expected a JSON array of records ([{{...}}, ...]); "
                                        f"for one object per line use .jsonl or `format: jsonl`")
                opened, pos = True, pos + 1
                continue
            if buffer[pos] == "]":
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                    break
                except json.JSONDecodeError as exc:
                    chunk = f.read(_CHUNK_CHARS)
                    if not chunk:
                        raise TaskDataError(f"{url}:{line + buffer.count(chr(10), pos, exc.pos)}: not valid JSON "
                                            f"({exc.msg})") from None
                    buffer, pos = buffer[pos:] + chunk, 0
            yield Row(line, value) if isinstance(value, dict) else Row(line, None, "not a JSON object")
            line += buffer.count("\n", pos, end)
            buffer, pos = buffer[end:], 0


def _parquet(url: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with open_file(url) as f:
        number = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                yield Row(number, record)


def _conll(url: str, fmt: FileFormat) -> Iterator[Row]:
    """Sentences of a column file: the first column is the token, the last the tag."""
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    with _text(url, fmt) as f:
        for line, text in enumerate(f, start=1):
            parts = text.split(fmt.delimiter) if fmt.delimiter else text.split()
            parts = [p for p in (p.strip() for p in parts) if p] if not fmt.delimiter else [p.strip() for p in parts]
            if not parts or not any(parts) or parts[0] == "-DOCSTART-":
                if tokens:
                    yield Row(first, {"tokens": tokens, "tags": tags})
                    tokens, tags = [], []
                continue
            if not tokens:
                first = line
            if len(parts) < 2:
                tokens.append(parts[0])
                tags.append("")                   # no tag: the sentence is a bad row (named by the reader)
                continue
            tokens.append(parts[0])
            tags.append(parts[-1])
    if tokens:
        yield Row(first, {"tokens": tokens, "tags": tags})


__all__ = ["FORMATS", "FileFormat", "Row", "columns", "format_of", "open_file", "read_rows"]
