"""Output shards: one Parquet file per unit of input, named from the input, written atomically.

A unit is a whole text/TSV/JSONL file (lines are numbered from the file's start, and a
compressed file cannot be split) or a run of row groups of a Parquet file. Its shard's name
depends only on the input file's URL and the unit's place in it, and the shard appears under that
name only once complete: locally it is written under a hidden temporary name and renamed, on
object storage it is one upload (an object is never visible half-written). So a job that died
part-way is re-run as is: shards that exist are finished and skipped, the others are computed
again, and no row is written twice or lost. A shard's Parquet footer records what went into it
(source, rows, skipped rows and where), which the summary of a re-run reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bertray.data.sources import storage_options_for
from bertray.storage import is_local

SHARD_SUFFIX = ".parquet"
STATS_KEY = b"bertray.prediction"


@dataclass(frozen=True)
class Unit:
    """One input file, or row groups `row_groups` of a Parquet file; `shard` is its output name."""

    url: str
    part: int
    shard: str
    row_groups: tuple[int, ...] | None = None


def shard_name(url: str, part: int) -> str:
    """`<file stem>-<hash of the full URL>-<part>.parquet`: readable, and distinct for files of
    the same name in different folders."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", posixpath.basename(url.rstrip("/"))).lstrip("._")[:60] or "input"
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:10]
    return f"{stem}-{digest}-{part:05d}{SHARD_SUFFIX}"


def plan_units(urls: Sequence[str], formats: Sequence[str], rows_per_unit: int, *,
               storage_options: Mapping[str, Any] | None = None) -> list[Unit]:
    """Units of work over the input files: one per file, Parquet files cut at row-group edges
    into units of about `rows_per_unit` rows (read from the footers)."""
    units = []
    for url, fmt in zip(urls, formats):
        if fmt != "parquet":
            units.append(Unit(url, 0, shard_name(url, 0)))
            continue
        with fsspec.open(url, "rb", **storage_options_for(url, storage_options)) as f:
            metadata = pq.ParquetFile(f).metadata
        groups: list[list[int]] = [[]]
        rows = 0
        for g in range(metadata.num_row_groups):
            if groups[-1] and rows + metadata.row_group(g).num_rows > rows_per_unit:
                groups.append([])
                rows = 0
            groups[-1].append(g)
            rows += metadata.row_group(g).num_rows
        for part, chosen in enumerate(groups):
            units.append(Unit(url, part, shard_name(url, part), tuple(chosen)))
    return units


def finished_shards(output: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Names of the complete shards already in `output` (temporary files are hidden, not listed)."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options_for(output, storage_options))
    try:
        names = fs.ls(root, detail=False, refresh=True) if not is_local(fs) else fs.ls(root, detail=False)
    except FileNotFoundError:
        return set()
    return {posixpath.basename(n.rstrip("/")) for n in names
            if n.endswith(SHARD_SUFFIX) and not posixpath.basename(n).startswith((".", "_"))}


def shard_stats(output: str, shard: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a finished shard's footer says went into it."""
    url = join(output, shard)
    with fsspec.open(url, "rb", **storage_options_for(url, storage_options)) as f:
        metadata = pq.ParquetFile(f).metadata.metadata or {}
    return json.loads(metadata.get(STATS_KEY, b"{}"))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


class ShardWriter:
    """Appends record batches to a local temporary Parquet file; `commit` puts it in place under
    its final name in one step, `abort` (or an exception inside `with`) leaves nothing behind."""

    def __init__(self, output: str, shard: str, schema: pa.Schema,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = join(output, shard)
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **storage_options_for(self.url, storage_options))
        self.local = is_local(self.fs)
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            directory = os.path.dirname(self.path)            # same file system: the rename is atomic
        else:
            directory = None
        fd, self.temp = tempfile.mkstemp(prefix=f".{shard}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp", dir=directory)
        os.close(fd)
        self.writer = pq.ParquetWriter(self.temp, schema, compression="zstd")
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self, stats: Mapping[str, Any]) -> None:
        self.writer.add_key_value_metadata({STATS_KEY: json.dumps(dict(stats)).encode()})
        self.writer.close()
        if self.local:
            os.chmod(self.temp, 0o644)                        # mkstemp makes it private to the writer
            os.replace(self.temp, self.path)
        else:
            self.fs.put_file(self.temp, self.path)
            os.unlink(self.temp)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.temp):
                os.unlink(self.temp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if os.path.exists(self.temp):      # not committed
            self.abort()
