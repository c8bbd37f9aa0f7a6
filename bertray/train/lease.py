"""One run, one writer: a lease file in the run directory that the driver takes before training.

Two drivers started with the same `run.output` and `run.name` would both write the run's
checkpoints and `latest`, each resuming from the other's files. The first one to create
`<run directory>/run.lease` holds the run; the other is refused with the holder's host, pid and
times. The holder rewrites the file's heartbeat while it runs (`start_heartbeat`) and deletes it
at the end; a lease whose heartbeat is older than `stale_after_s` (a driver that died without
cleaning up) is taken over by the next driver.

The create must be conditional on the storage itself, or two drivers starting together would both
see no lease and both write one:

- local paths: a hard link of a complete temporary file (`os.link` fails if the name exists), so
  a reader never sees half a lease; `open(path, "x")` where the filesystem has no hard links;
- s3:// (s3fs with `pipe_file(mode=...)`): PutObject with `If-None-Match: *`, which AWS S3 and
  moto honour; an S3-compatible store that ignores the header gives best effort only;
- any other fsspec filesystem (or an s3fs too old for `mode`): whatever its
  `pipe_file(mode="create")` does, by default exists-then-write, or exists-then-write itself:
  best effort, and a warning says so.

Staleness compares the heartbeat with this machine's clock (UTC), so machines whose clocks
differ by more than a fraction of `stale_after_s` must not share a run directory.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import fsspec

from bertray.errors import BertrayError
from bertray.storage import is_local, join_url, redact_url

log = logging.getLogger("bertray.train")

LEASE_FILE = "run.lease"
LEASE_FORMAT = 1
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_ACQUIRE_ATTEMPTS = 5      # a lease that vanishes or changes under us is looked at again, this often


class RunLeaseError(BertrayError):
    """Another driver holds the run, or this driver lost its lease to another one."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a run, as written in its lease file. Times are UTC ISO 8601."""

    host: str
    pid: int
    token: str
    started: str
    heartbeat: str
    ray_job_id: str | None = None

    def age_s(self, now: dt.datetime) -> float:
        """Seconds since the last heartbeat; an unparsable time counts as infinitely old."""
        try:
            beat = dt.datetime.fromisoformat(self.heartbeat)
        except ValueError:
            return float("inf")
        if beat.tzinfo is None:
            beat = beat.replace(tzinfo=dt.timezone.utc)
        return (now - beat).total_seconds()

    def describe(self, now: dt.datetime) -> str:
        job = f", Ray job {self.ray_job_id}" if self.ray_job_id else ""
        return (f"host {self.host}, pid {self.pid}{job}, started {self.started}, last heartbeat {self.heartbeat} "
                f"({self.age_s(now):.0f} s ago)")

    def to_json(self) -> bytes:
        return (json.dumps({"format": LEASE_FORMAT, **asdict(self)}, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> LeaseHolder:
        """Parse a lease file; anything else is an error that says how to clear it, since a lease
        nobody can read would block the run for good."""
        try:
            record = json.loads(data.decode())
            return cls(host=str(record["host"]), pid=int(record["pid"]), token=str(record["token"]),
                       started=str(record["started"]), heartbeat=str(record["heartbeat"]),
                       ray_job_id=record.get("ray_job_id"))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise RunLeaseError(f"{where}: unreadable run lease ({type(exc).__name__}: {exc}); if no driver is "
                                f"running this run, delete the file and start again") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _ray_job_id() -> str | None:
    """The Ray job this driver runs, when Ray is already up; never imports or starts Ray for it."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return str(ray.get_runtime_context().get_job_id())
    except Exception:   # only a label in the lease: its absence must not stop a run
        return None
    return None


def _new_holder() -> LeaseHolder:
    now = _iso(_now())
    return LeaseHolder(host=socket.gethostname(), pid=os.getpid(), token=secrets.token_hex(16), started=now,
                       heartbeat=now, ray_job_id=_ray_job_id())


# --------------------------------------------------------------------------------------------
# Storage: conditional create, read, overwrite, delete


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _has_create_mode(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `pipe_file` takes `mode`: older s3fs releases pass unknown arguments on to S3 or
    drop them, which would turn the conditional create into a silent overwrite."""
    return "mode" in inspect.signature(fs.pipe_file).parameters


def _is_atomic(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `_create` is decided by the storage itself (see the module docstring)."""
    return is_local(fs) or (bool(set(_protocols(fs)) & _S3_PROTOCOLS) and _has_create_mode(fs))


def _create_local(path: str, data: bytes) -> None:
    """Link a complete temporary file to `path`: exclusive and never half written."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix=".lease-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:   # no hard links on this filesystem: O_EXCL still decides the winner
            with open(path, "xb") as f:
                f.write(data)
    finally:
        os.unlink(temporary)


def _create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` only if it does not exist; FileExistsError otherwise."""
    if is_local(fs):
        _create_local(path, data)
    elif _has_create_mode(fs):
        fs.pipe_file(path, data, mode="create")
    elif fs.exists(path):
        raise FileExistsError(path)
    else:
        fs.pipe_file(path, data)


def _overwrite(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace `path` whole: readers see the old lease or the new one, never a mix."""
    if is_local(fs):
        fd, temporary = tempfile.mkstemp(prefix=".lease-", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _delete(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------
# The lease


class RunLease:
    """The run directory's lease, held by this driver. Take it with `RunLease.acquire`; use it as a
    context manager or call `release` when the run ends."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, holder: LeaseHolder) -> None:
        self._fs, self._path, self.url, self._holder = fs, path, url, holder
        self._lock = threading.Lock()            # the heartbeat thread and the driver both write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False
        self.lost: RunLeaseError | None = None   # set when the heartbeat found the lease taken

    @property
    def holder(self) -> LeaseHolder:
        return self._holder

    @classmethod
    def acquire(cls, run_url: str, *, stale_after_s: float = 600.0,
                storage_options: Mapping[str, Any] | None = None) -> RunLease:
        """Take the lease of the run directory `run_url` (a local path or fsspec URL), or raise
        `RunLeaseError` naming the driver that holds it."""
        fs, directory = fsspec.core.url_to_fs(run_url, **dict(storage_options or {}))
        path = directory.rstrip("/") + "/" + LEASE_FILE
        url = redact_url(join_url(run_url, LEASE_FILE))
        if is_local(fs):
            os.makedirs(directory, exist_ok=True)
        if not _is_atomic(fs):
            log.warning("%s: %s has no conditional create that bertray knows of; two drivers starting at the "
                        "same moment could both take the run (best effort)", url, "/".join(_protocols(fs)))
        lease = cls(fs, path, url, _new_holder())
        lease._take(stale_after_s)
        return lease

    def _take(self, stale_after_s: float) -> None:
        for _ in range(_ACQUIRE_ATTEMPTS):
            try:
                _create(self._fs, self._path, self._holder.to_json())
                return
            except FileExistsError:
                pass
            current = self._current()
            if current is None:
                continue                       # released between our create and our read: try again
            now = _now()
            if current.age_s(now) <= stale_after_s:
                raise self._held_error(current, now, stale_after_s)
            if self._take_over(current, now):
                return
        raise RunLeaseError(f"{self.url}: the lease kept changing while this driver tried to take it; another driver "
                            f"is starting this run. Wait for it, stop it, or use another run.name")

    def _take_over(self, stale: LeaseHolder, now: dt.datetime) -> bool:
        """Replace a stale lease; False when it changed meanwhile (look again). A claim file named
        by the stale lease's token, created conditionally, lets one taker through: deleting and
        recreating the lease alone would let two takers each delete the other's new lease."""
        claim = f"{self._path}.takeover-{stale.token}"
        try:
            _create(self._fs, claim, self._holder.to_json())
        except FileExistsError:
            raise RunLeaseError(f"{self.url}: another driver is taking over the stale lease of {stale.describe(now)}; "
                                f"this run is not started twice. Wait for it, stop it, or use another run.name") from None
        try:
            if self._current() != stale:
                return False
            log.warning("%s: taking over the run from %s, whose heartbeat is stale (that driver is presumed "
                        "dead)", self.url, stale.describe(now))
            _delete(self._fs, self._path)
            try:
                _create(self._fs, self._path, self._holder.to_json())
            except FileExistsError:
                return False                   # a fresh driver came in between: it holds the run now
            return True
        finally:
            _delete(self._fs, claim)

    def _current(self) -> LeaseHolder | None:
        data = _read(self._fs, self._path)
        return None if data is None else LeaseHolder.from_json(data, self.url)

    def _held_error(self, current: LeaseHolder, now: dt.datetime, stale_after_s: float) -> RunLeaseError:
        return RunLeaseError(f"{self.url}: this run is already being written by another driver ({current.describe(now)}). "
                             f"Wait for it to finish, stop it, or use another run.name; a lease whose heartbeat is "
                             f"older than {stale_after_s:.0f} s is taken over automatically")

    def refresh(self) -> None:
        """Rewrite the heartbeat; `RunLeaseError` when the lease is no longer ours (taken over after
        this driver was silent too long, or deleted), since writing on would race the new holder."""
        with self._lock:
            current = self._current()
            if current is None or current.token != self._holder.token:
                who = "deleted" if current is None else f"now held by {current.describe(_now())}"
                raise RunLeaseError(f"{self.url}: this driver's lease was lost ({who}); stop writing to this run")
            self._holder = replace(self._holder, heartbeat=_iso(_now()))
            _overwrite(self._fs, self._path, self._holder.to_json())

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never another driver's)."""
        self.stop_heartbeat()
        with self._lock:
            if self._released:
                return
            self._released = True
            try:
                current = self._current()
            except RunLeaseError:
                current = None
            if current is not None and current.token == self._holder.token:
                _delete(self._fs, self._path)
            elif current is not None:
                log.warning("%s: not deleted on release: it is held by %s", self.url, current.describe(_now()))

    def start_heartbeat(self, interval_s: float = 60.0,
                        on_lost: Callable[[RunLeaseError], None] | None = None) -> None:
        """Refresh every `interval_s` in a daemon thread until `release`. Storage errors are retried
        at the next beat; a lost lease stops the thread, sets `lost` and calls `on_lost` (the driver
        decides how to stop its run)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, args=(interval_s, on_lost), name="bertray-run-lease",
                                        daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float, on_lost: Callable[[RunLeaseError], None] | None) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refresh()
            except RunLeaseError as exc:
                self.lost = exc
                log.error("%s", exc)
                if on_lost is not None:
                    on_lost(exc)
                return
            except Exception as exc:   # storage hiccup: the lease stays ours until stale_after_s
                log.warning("%s: heartbeat failed (%s: %s); retrying in %.0f s", self.url, type(exc).__name__,
                            exc, interval_s)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def read_lease(run_url: str, storage_options: Mapping[str, Any] | None = None) -> LeaseHolder | None:
    """Who holds the run directory `run_url` now, or None: for status tools and tests."""
    fs, directory = fsspec.core.url_to_fs(run_url, **dict(storage_options or {}))
    data = _read(fs, directory.rstrip("/") + "/" + LEASE_FILE)
    return None if data is None else LeaseHolder.from_json(data, redact_url(join_url(run_url, LEASE_FILE)))
