"""A watchdog on the trainer's wait for its next batch: a stalled pipeline is reported, then fails the run.

A data pipeline that stops (a stage that can never be placed, a read that blocks, a lost node the
stream waits for) looks, from the trainer, like a `next()` that never returns. On a cluster that
burns accelerator hours until someone looks. So batches are pulled in a background thread and the
training thread waits on a queue with a clock: past `warn_after_s` it logs what the cluster is
doing (free resources, pending tasks and actors), and past `fail_after_s` it raises `DataStall`
with that diagnosis, so the run fails where Ray Train's `max_failures` and the checkpoint take
over. The first batch gets `FIRST_BATCH_FACTOR` times longer: it waits for actors to start and
the first files to be read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Generic, Iterator, TypeVar

log = logging.getLogger("bertray.train")

T = TypeVar("T")
FIRST_BATCH_FACTOR = 3.0
_END = object()


class DataStall(RuntimeError):
    """No batch arrived within the configured limit."""


class BatchWatchdog(Generic[T]):
    """Iterates `source` through a background thread (at most `prefetch` items ahead), timing each wait.

    `describe()` is called only when a wait is over a limit; it says what the pipeline is doing.
    `fail_after_s` <= 0 never fails (only warns)."""

    def __init__(self, source: Iterator[T], *, warn_after_s: float, fail_after_s: float,
                 describe: Callable[[], str], prefetch: int = 2, what: str = "batch") -> None:
        self.warn_after_s, self.fail_after_s, self.describe, self.what = warn_after_s, fail_after_s, describe, what
        self.first = True
        self.waited_s = 0.0                 # the last wait, for data-wait accounting
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(source,), name="bertray-batches", daemon=True)
        self._thread.start()

    def _pull(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    break
            else:
                self._put((_END, None))
        except BaseException as exc:            # handed to the training thread, raised there
            self._put((_END, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:               # a generator: its `finally` blocks release the stream
                close()

    def _put(self, entry: tuple) -> bool:
        """Queue `entry` unless `close()` was called; False when it was."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop pulling (a phase ended before its stream): the thread ends and the source is closed."""
        self._stop.set()

    def __iter__(self) -> "BatchWatchdog[T]":
        return self

    def __next__(self) -> T:
        factor = FIRST_BATCH_FACTOR if self.first else 1.0
        warn_at, fail_at = self.warn_after_s * factor, self.fail_after_s * factor
        poll = max(0.05, min(1.0, warn_at / 10))
        started = time.monotonic()
        next_warning = warn_at
        while True:
            try:
                item, error = self._queue.get(timeout=poll)
                break
            except queue.Empty:
                waited = time.monotonic() - started
                if self.fail_after_s > 0 and waited >= fail_at:
                    raise DataStall(f"no {self._which()} for {waited:.0f} s (limit {fail_at:.0f} s): "
                                    f"{self.describe()}") from None
                if waited >= next_warning:
                    log.warning("waiting %.0f s for the %s: %s", waited, self._which(), self.describe())
                    next_warning += warn_at
        self.waited_s = time.monotonic() - started
        if error is not None:
            raise error
        if item is _END:
            raise StopIteration
        self.first = False
        return item

    def _which(self) -> str:
        return f"first {self.what}" if self.first else f"next {self.what}"


def cluster_diagnosis() -> str:
    """Free and total resources, and (with Ray's state API, i.e. `ray[default]`) what waits to be placed."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [", ".join(f"{k} {free.get(k, 0.0):g} of {total[k]:g} free" for k in ("CPU", "GPU") if k in total)]
    try:
        from ray.util.state import list_actors, list_tasks

        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], timeout=5, raise_on_missing_output=False)
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], timeout=5, raise_on_missing_output=False)
        if actors:
            parts.append(f"{len(actors)} actor(s) waiting for resources ({_names(a.class_name for a in actors)})")
        if tasks:
            parts.append(f"{len(tasks)} task(s) waiting for resources ({_names(t.name for t in tasks)})")
        if not actors and not tasks:
            parts.append("nothing waits for resources: a stage is slow or blocked (a read that does not return?)")
    except Exception as exc:  # the state API needs the dashboard; the resources alone still say a lot
        parts.append(f"task and actor states unavailable ({type(exc).__name__})")
    if free.get("CPU", 0.0) < 0.25:
        parts.append("no CPU is free: the data stages may be waiting for CPUs the Train workers hold "
                     "(scaling.num_workers, scaling.cpus_per_worker, data.read_cpus, data.tokenizer_cpus)")
    return "; ".join(p for p in parts if p)


def _names(names) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in list(counts.items())[:5])
