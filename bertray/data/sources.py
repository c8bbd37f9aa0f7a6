"""Corpus URLs -> files, through fsspec (local, file://, s3://, gs://, memory://).

Nothing here knows Ray: `pipeline.py` turns `resolve_corpus` + `read_documents` into read tasks;
reading a file, in each of its formats, is `bertray.data.formats`. Listing is bounded in time: an
endpoint that does not answer is a `CorpusError` after `timeout_s`, not an endless retry.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import stat
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import fsspec

from bertray.errors import CorpusError
from bertray.storage import is_local

log = logging.getLogger(__name__)

T = TypeVar("T")

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


def with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
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
            found = with_timeout(lambda: _list_one(url, storage_options), timeout_s, url)
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
