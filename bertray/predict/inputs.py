"""Rows to predict, read from text, CSV, TSV, JSONL or Parquet files at any fsspec URL.

A row is an id and one or two texts: a text, a pair of texts, or a question and its context.
The id is the input's id column where the file has one, else `<file>:<line>` (`<file>:row <n>`
for Parquet), so every prediction can be traced to its input. A malformed row (broken JSON, a
missing or non-string field, a wrong number of CSV/TSV fields, an overlong line) is skipped, counted
and named as `<file>:<line>: why`; one bad row never ends a job over millions.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from bertray.data.documents import CorpusCounters
from bertray.data.formats import detect_format, iter_chunks, iter_lines
from bertray.data.sources import storage_options_for
from bertray.errors import ConfigError

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "text", "csv", "tsv", "jsonl", "parquet")
MAX_LINE_CHARS = 1 << 20          # a longer line or row is skipped as malformed
NAMED_BAD_ROWS = 20               # bad rows named per shard (all are counted)
LOGGED_BAD_ROWS = 3               # bad rows logged per shard


@dataclass(frozen=True)
class Row:
    id: str
    texts: tuple[str, ...]


@dataclass
class BadRows:
    """The rows skipped in one shard: all counted, the first `NAMED_BAD_ROWS` named."""

    count: int = 0
    named: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.named) < NAMED_BAD_ROWS:
            self.named.append(f"{where}: {why}")
        if self.count <= LOGGED_BAD_ROWS:
            log.warning("%s: skipped %s", where, why)


def file_format(url: str, fmt: str) -> str:
    """The format of one file: `fmt`, or from its extension (.csv, .tsv, .jsonl/.json, .parquet, else text)."""
    if fmt not in INPUT_FORMATS:
        raise ConfigError(f"format: {fmt!r} is not one of {', '.join(INPUT_FORMATS)}")
    if fmt != "auto":
        return fmt
    plain = url.lower().removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz").removesuffix(".zst")
    if plain.endswith((".tsv", ".csv")):
        return plain[-3:]
    return detect_format(url)


def read_rows(url: str, fmt: str, fields: Sequence[str], id_field: str, bad: BadRows, *,
              row_groups: Sequence[int] | None = None,
              storage_options: Mapping[str, Any] | None = None) -> Iterator[Row]:
    """The rows of one file (of its `row_groups` for Parquet), in file order. `fields`: the
    column(s) holding the text(s); a plain text file has one text per line and no columns."""
    fmt = file_format(url, fmt)
    if fmt == "text":
        if len(fields) != 1:
            raise ConfigError(f"{url}: a plain text file has one text per line; pairs and questions need "
                              f"columns (CSV, TSV, JSONL or Parquet)")
        yield from _text_rows(url, bad, storage_options)
    elif fmt == "tsv":
        yield from _tsv_rows(url, fields, id_field, bad, storage_options)
    elif fmt == "csv":
        yield from _csv_rows(url, fields, id_field, bad)
    elif fmt == "jsonl":
        yield from _jsonl_rows(url, fields, id_field, bad, storage_options)
    else:
        yield from _parquet_rows(url, fields, id_field, bad, row_groups, storage_options)


def _lines(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[tuple[int, str | None]]:
    chunks = iter_chunks(url, storage_options=storage_options)
    yield from enumerate(iter_lines(chunks, CorpusCounters(), max_line_chars=MAX_LINE_CHARS, skip_overlong=True), 1)


def _text_rows(url: str, bad: BadRows, storage_options) -> Iterator[Row]:
    for line_no, line in _lines(url, storage_options):
        if line is None:
            bad.skip(f"{url}:{line_no}", f"a line longer than {MAX_LINE_CHARS} characters")
        elif line.strip():
            yield Row(f"{url}:{line_no}", (line.rstrip("\r"),))


def _tsv_rows(url: str, fields: Sequence[str], id_field: str, bad: BadRows, storage_options) -> Iterator[Row]:
    header: list[str] | None = None
    where: list[int] = []
    id_at: int | None = None
    for line_no, line in _lines(url, storage_options):
        if line is None:
            bad.skip(f"{url}:{line_no}", f"a line longer than {MAX_LINE_CHARS} characters")
            continue
        if not line.strip():
            continue
        values = next(csv.reader([line.rstrip("\r")], delimiter="\t", quoting=csv.QUOTE_NONE))
        if header is None:
            header = [v.lstrip("\ufeff") for v in values]
            missing = [f for f in fields if f not in header]
            if missing:
                raise ConfigError(f"{url}:{line_no}: the header has no column {', '.join(map(repr, missing))} "
                                  f"(columns: {', '.join(header)}); set the text field option(s)")
            where = [header.index(f) for f in fields]
            id_at = header.index(id_field) if id_field in header else None
            continue
        if len(values) != len(header):
            bad.skip(f"{url}:{line_no}", f"{len(values)} tab-separated fields, the header has {len(header)}")
            continue
        row_id = values[id_at] if id_at is not None else f"{url}:{line_no}"
        yield Row(row_id, tuple(values[i] for i in where))


def _csv_rows(url: str, fields: Sequence[str], id_field: str, bad: BadRows) -> Iterator[Row]:
    """RFC 4180 CSV (quoted fields may hold commas and line breaks) through the task cards' reader,
    so a file that fine-tuned a model is read the same way to predict with it; `line` is where
    the record starts. Credentials and endpoints come from the environment, as for task cards."""
    from bertray.tasks import files

    fmt = files.FileFormat(format="csv")
    header = files.columns(url, fmt)
    missing = [f for f in fields if f not in header]
    if missing:
        raise ConfigError(f"{url}:1: the header has no column {', '.join(map(repr, missing))} "
                          f"(columns: {', '.join(header)}); set the text field option(s)")
    for record in files.read_rows(url, fmt):
        at = f"{url}:{record.line}"
        if record.fields is None:
            bad.skip(at, record.problem or "an unreadable record")
            continue
        texts = tuple(record.fields.get(f) for f in fields)
        empty = [f for f, t in zip(fields, texts) if not t]
        if empty:
            bad.skip(at, f"field {empty[0]!r} is empty")
            continue
        yield Row(str(record.fields[id_field]) if record.fields.get(id_field) else at, texts)


def _jsonl_rows(url: str, fields: Sequence[str], id_field: str, bad: BadRows, storage_options) -> Iterator[Row]:
    for line_no, line in _lines(url, storage_options):
        at = f"{url}:{line_no}"
        if line is None:
            bad.skip(at, f"a row longer than {MAX_LINE_CHARS} characters")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            bad.skip(at, f"malformed JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__})")
            continue
        if not isinstance(row, dict):
            bad.skip(at, f"a JSON {type(row).__name__}, not an object")
            continue
        texts = tuple(row.get(f) for f in fields)
        wrong = [f for f, t in zip(fields, texts) if not isinstance(t, str)]
        if wrong:
            bad.skip(at, f"field {wrong[0]!r} is {_what(row.get(wrong[0]), wrong[0] in row)}, not a string")
            continue
        yield Row(_row_id(row.get(id_field), at), texts)


def _parquet_rows(url: str, fields: Sequence[str], id_field: str, bad: BadRows,
                  row_groups: Sequence[int] | None, storage_options) -> Iterator[Row]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb", **storage_options_for(url, storage_options)) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        missing = [c for c in fields if c not in names]
        if missing:
            raise ConfigError(f"{url}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}); "
                              f"set the text field option(s)")
        columns = list(fields) + ([id_field] if id_field in names else [])
        groups = range(parquet.num_row_groups) if row_groups is None else row_groups
        metadata = parquet.metadata
        for group in groups:
            first_row = sum(metadata.row_group(g).num_rows for g in range(group))
            table = parquet.read_row_group(group, columns=columns)
            values = [table.column(c).to_pylist() for c in columns]
            for offset, row in enumerate(zip(*values)):
                at = f"{url}:row {first_row + offset + 1}"
                texts = row[:len(fields)]
                wrong = [c for c, t in zip(fields, texts) if not isinstance(t, str)]
                if wrong:
                    bad.skip(at, f"column {wrong[0]!r} is {_what(texts[fields.index(wrong[0])], True)}, not a string")
                    continue
                if any(len(t) > MAX_LINE_CHARS for t in texts):
                    bad.skip(at, f"a text longer than {MAX_LINE_CHARS} characters")
                    continue
                yield Row(_row_id(row[len(fields)] if len(row) > len(fields) else None, at), tuple(texts))


def _what(value: Any, present: bool) -> str:
    return "missing" if not present else "null" if value is None else f"of type {type(value).__name__}"


def _row_id(value: Any, where: str) -> str:
    """The id column's value as text; the row's place when the row has none."""
    return where if value is None or isinstance(value, (dict, list)) else str(value)
