"""Corpus URLs -> files -> streamed documents, through fsspec (local, file://, s3://, gs://, memory://).

Nothing here knows Ray: `pipeline.py` turns `resolve_corpus` + `read_documents` into read tasks.
Files are streamed in chunks and never read whole, so a multi-GB shard costs a few MB of memory.
Listing is bounded in time: an endpoint that does not answer is a `CorpusError` after `timeout_s`,
not an endless retry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
import stat
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import fsspec

from bertray.data.documents import (CorpusCounters, CorpusLayout, documents_from_text, iter_documents, iter_lines,
                                    layout_warning)
from bertray.errors import CorpusError
from bertray.storage import is_local

log = logging.getLogger(__name__)

T = TypeVar("T")

CORPUS_FORMATS = ("auto", "text", "jsonl", "parquet")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
CHUNK_BYTES = 1 << 20
MAX_TEXT_LINE_CHARS = 1 << 20        # longer lines are cut into pieces (and counted)
MAX_ROW_CHARS = 64 << 20             # one JSONL row or Parquet value may be long; beyond this it is skipped
WARNINGS_PER_FILE = 3                # bad rows named per file; the counters keep every one

# botocore's defaults retry a dead endpoint for minutes; a corpus that cannot be reached should
# fail fast with a message instead. Users can override any of these through storage options.
_S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                  "retries": {"max_attempts": 3, "mode": "standard"}}}


@dataclass(frozen=True)
class CorpusFile:
    """One corpus file: its full URL, size in bytes (None if unknown) and stable index in the corpus."""

    url: str
    size: int | None
    index: int


def storage_options_for(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for `url`: bounded S3 timeouts unless the caller says otherwise.

    Credentials are never passed here: s3fs/gcsfs read them from the environment or the instance
    role, so they never appear in configs, logs or checkpoints.
    """
    opts = dict(storage_options or {})
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a"):
        merged = dict(_S3_DEFAULTS["config_kwargs"])
        merged.update(opts.get("config_kwargs", {}))
        opts["config_kwargs"] = merged
    return opts


def _with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run `fn` in a daemon thread; a storage call that hangs must not hang the caller."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="bertray-corpus-listing")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise CorpusError(f"{what}: storage did not answer within {timeout_s:g} s "
                          "(check the URL, the endpoint (AWS_ENDPOINT_URL) and the network)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _is_hidden(path: str, root: str) -> bool:
    """A name starting with '.' or '_' below `root`: `.git/`, Spark's `_temporary/`, `_SUCCESS`."""
    below = path[len(root.rstrip("/")):] if path.startswith(root.rstrip("/")) else posixpath.basename(path)
    return any(part.startswith((".", "_")) for part in below.split("/") if part)


def _list_one(url: str, storage_options: Mapping[str, Any] | None) -> list[tuple[str, int | None]]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    root = path
    if fsspec.core.has_magic(path):
        paths = fs.glob(path, detail=True)
        infos = [(p, info) for p, info in paths.items() if info.get("type") != "directory"]
        root = posixpath.dirname(re.split(r"[*?\[]", path, maxsplit=1)[0])    # the part before the magic
    elif fs.isdir(path):
        infos = list(fs.find(path, detail=True).items())
    elif fs.exists(path):
        infos = [(path, fs.info(path))]
        root = posixpath.dirname(path)
    else:
        infos = []
    files = sorted((p, info.get("size")) for p, info in infos if not _is_hidden(p, root))
    if is_local(fs):
        files = [(p, size) for p, size in files if _is_safe_local_file(p, root)]
    return [(fs.unstrip_protocol(p), size) for p, size in files]


def _is_safe_local_file(path: str, root: str) -> bool:
    """Only regular files, and symlinks only to files inside the corpus root: a FIFO would block the
    reader forever, a device (or a link to /dev/zero) would never end, and a link out of the corpus
    reads what nobody meant to train on. Skipped with a warning."""
    try:
        st = os.stat(path)                       # follows links: what would be read
    except OSError as exc:
        log.warning("%s: skipped, cannot stat it (%s)", path, exc)
        return False
    if not stat.S_ISREG(st.st_mode):
        log.warning("%s: skipped, not a regular file (a FIFO, socket or device would block or never end)", path)
        return False
    if os.path.islink(path):
        real, base = os.path.realpath(path), os.path.realpath(root or ".")
        if os.path.commonpath([real, base]) != base:
            log.warning("%s: skipped, a symlink to %s outside the corpus folder %s", path, real, base)
            return False
    return True


def resolve_corpus(urls: str | Sequence[str], *, storage_options: Mapping[str, Any] | None = None,
                   timeout_s: float = 30.0) -> list[CorpusFile]:
    """Expand URLs, globs and directories (recursively; names starting with '.' or '_' skipped)
    into a sorted, de-duplicated list of files.

    Raises `CorpusError` naming the URL when it matches nothing, its bucket does not exist, access
    is denied, or the storage does not answer within `timeout_s`.
    """
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise CorpusError("no corpus given: pass one or more URLs, globs or directories")
    seen: dict[str, int | None] = {}
    for url in urls:
        try:
            found = _with_timeout(lambda: _list_one(url, storage_options), timeout_s, url)
        except CorpusError:
            raise
        except FileNotFoundError as exc:
            raise CorpusError(f"{url}: not found ({exc}); check the path or bucket name") from None
        except PermissionError as exc:
            raise CorpusError(f"{url}: access denied ({exc}); credentials come from the environment "
                              "(AWS_*/GOOGLE_APPLICATION_CREDENTIALS) or the instance role") from None
        except (ValueError, ImportError) as exc:
            raise CorpusError(f"{url}: cannot open this kind of URL ({exc})") from None
        except Exception as exc:  # botocore/aiohttp/gcsfs errors have no common base class
            raise CorpusError(f"{url}: cannot list the corpus: {type(exc).__name__}: {exc}") from None
        if not found:
            raise CorpusError(f"{url}: matches no file (an empty directory, a glob with no match, "
                              "or a bucket/prefix that does not exist)")
        for file_url, size in found:
            seen.setdefault(file_url, size)
    return [CorpusFile(url=u, size=s, index=i) for i, (u, s) in enumerate(sorted(seen.items()))]


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
        return _with_timeout(lambda: _preflight(files, layout, fmt, storage_options, max_documents, reading),
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
