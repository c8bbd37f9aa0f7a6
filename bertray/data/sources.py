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
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import fsspec

from bertray.data.documents import (CorpusCounters, CorpusLayout, documents_from_text, iter_documents, iter_lines,
                                    layout_warning)
from bertray.errors import CorpusError

log = logging.getLogger(__name__)

T = TypeVar("T")

CORPUS_FORMATS = ("auto", "text", "jsonl", "parquet")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
CHUNK_BYTES = 1 << 20
MAX_TEXT_LINE_CHARS = 1 << 20        # longer lines are cut into pieces (and counted)
MAX_JSONL_ROW_CHARS = 64 << 20       # one JSONL document may be long; beyond this it is skipped

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
    return [(fs.unstrip_protocol(p), size) for p, size in files]


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


def iter_chunks(url: str, *, storage_options: Mapping[str, Any] | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The file's bytes, decompressed by extension, `chunk_bytes` at a time."""
    _, compression = _strip_compression(url)
    with fsspec.open(url, "rb", compression=compression, **storage_options_for(url, storage_options)) as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


def _row_layout(layout: CorpusLayout) -> CorpusLayout:
    """A JSONL/Parquet row is one document of running text: its lines are paragraphs to split into
    sentences, even under the `bert` layout whose text files hold one sentence per line."""
    return dataclasses.replace(layout, line_unit="paragraph") if layout.line_unit == "sentence" else layout


def _jsonl_documents(file: CorpusFile, layout: CorpusLayout, counters: CorpusCounters,
                     storage_options: Mapping[str, Any] | None) -> Iterator[list[str]]:
    layout = _row_layout(layout)
    chunks = iter_chunks(file.url, storage_options=storage_options)
    lines = iter_lines(chunks, counters, max_line_chars=MAX_JSONL_ROW_CHARS, skip_overlong=True)
    for line_no, line in enumerate(lines, 1):
        if line is None:
            counters["long_rows_skipped"] += 1
            log.warning("%s:%d: skipped a JSON row longer than %d characters", file.url, line_no, MAX_JSONL_ROW_CHARS)
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            counters["bad_json_rows"] += 1
            log.warning("%s:%d: skipped a malformed JSON row (%s)", file.url, line_no, exc.msg)
            continue
        text = row.get(layout.text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            counters["rows_without_text"] += 1
            log.warning("%s:%d: skipped a row without a string field %r", file.url, line_no, layout.text_field)
            continue
        yield from documents_from_text(text, layout, counters)


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
        for batch in parquet.iter_batches(columns=[layout.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    counters["rows_without_text"] += 1
                    continue
                yield from documents_from_text(text, layout, counters)


def read_documents(file: CorpusFile, layout: CorpusLayout, counters: CorpusCounters, *,
                   fmt: str = "auto", storage_options: Mapping[str, Any] | None = None) -> Iterator[list[str]]:
    """Stream one file's documents (lists of sentences), counting what was cleaned or skipped.

    A file that vanished between listing and reading, or that fails mid-read, is logged and counted
    (`missing_files`, `unreadable_files`) and the run goes on: one lost shard must not end a
    week-long pretraining run. The counters say how much was lost.
    """
    fmt = detect_format(file.url) if fmt == "auto" else fmt
    try:
        if fmt == "text":
            lines = iter_lines(iter_chunks(file.url, storage_options=storage_options), counters,
                               max_line_chars=MAX_TEXT_LINE_CHARS)
            yield from iter_documents(lines, layout, counters, source=file.url)
        elif fmt == "jsonl":
            yield from _jsonl_documents(file, layout, counters, storage_options)
        elif fmt == "parquet":
            yield from _parquet_documents(file, layout, counters, storage_options)
        else:
            raise CorpusError(f"format {fmt!r} is unknown; choose one of {', '.join(CORPUS_FORMATS)}")
    except FileNotFoundError:
        counters["missing_files"] += 1
        log.error("%s: the file disappeared after the corpus was listed; skipped", file.url)
    except CorpusError:
        raise
    except Exception as exc:
        counters["unreadable_files"] += 1
        log.error("%s: reading failed (%s: %s); the rest of this file is skipped",
                  file.url, type(exc).__name__, exc)


def preflight_layout(files: Sequence[CorpusFile], layout: CorpusLayout, *, fmt: str = "auto",
                     storage_options: Mapping[str, Any] | None = None, max_documents: int = 500) -> str | None:
    """Read the first few hundred documents and return `layout_warning`'s message, if any.

    A mis-configured layout (blank lines between sentences, no document boundaries) trains
    normally and silently ruins NSP; saying so before a long run starts costs a second.
    """
    counters, seen = CorpusCounters(), 0
    for file in files:
        for _ in read_documents(file, layout, counters, fmt=fmt, storage_options=storage_options):
            seen += 1
            if seen >= max_documents:
                return layout_warning(counters)
        if counters["files_without_text_column"] and not seen:
            raise CorpusError(f"{file.url}: no column {layout.text_field!r} holds the text; set data.text_field")
    return layout_warning(counters)
