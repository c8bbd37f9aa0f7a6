"""What a run prints on the driver's console: bertray's own lines from the workers, nothing of Ray's.

Ray copies everything its workers and actors write to the driver (`log_to_driver`): Train's state
transitions, Data's progress bars, deprecation warnings, core-worker notices, hundreds of lines a
run. A run started with `log_to_driver=False` leaves those in Ray's log files, and the lines
bertray's workers log (`bertray.*` loggers: metric lines, phase and resume notes, warnings) come
to the driver through a small actor instead (`ConsoleLines`), which the driver follows while the
trainer runs (`ConsoleFollower`). On a terminal the follower also keeps one progress line (step,
ETA, loss) under the printed lines.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import threading
import time
from typing import Any, Callable, TextIO

import ray

STEP_LINE = re.compile(r"^step (\d+)/(\d+)\s.*?loss ([0-9.]+)")


@ray.remote(num_cpus=0)
class ConsoleLines:
    """A queue of lines from the workers for the driver to print, in the order they arrived."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def post(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class ForwardToConsole(logging.Handler):
    """A logging handler on a worker that sends each record to the driver's `ConsoleLines`
    (fire and forget: a slow driver never slows a step, and a lost actor loses only lines)."""

    def __init__(self, console: Any, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.post.remote(self.format(record))
        except Exception:  # noqa: BLE001 - printing must never fail a training step
            self.handleError(record)


def forward_worker_logs(console: Any | None, logger_name: str = "bertray") -> None:
    """On a worker: send `logger_name`'s records (INFO and up) to `console` as well (once per process)."""
    if console is None:
        return
    logger = logging.getLogger(logger_name)
    if not any(isinstance(h, ForwardToConsole) for h in logger.handlers):
        logger.addHandler(ForwardToConsole(console))
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))


class ConsoleFollower:
    """A driver thread printing what the workers posted to `console`, every `interval_s`; on a
    terminal it also redraws one progress line from the latest `step N/M ... loss X` line."""

    def __init__(self, console: Any, out: TextIO | None = None, interval_s: float = 0.5,
                 progress: bool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.out, self.interval_s = console, out or sys.stdout, interval_s
        self.progress = self.out.isatty() if progress is None else progress
        self.clock = clock
        self.started = clock()
        self.first_step: tuple[int, float] | None = None
        self.bar = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bertray-console", daemon=True)

    def __enter__(self) -> "ConsoleFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        if self.bar:
            self.out.write("\r" + " " * len(self.bar) + "\r")
            self.out.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._drain()

    def _drain(self) -> None:
        try:
            lines = ray.get(self.console.take.remote(), timeout=30)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return
        if not lines:
            return
        if self.bar:
            self.out.write("\r" + " " * len(self.bar) + "\r")
        for line in lines:
            self.out.write(line + "\n")
            self._progress_from(line)
        if self.bar:
            self.out.write(self.bar)
        self.out.flush()

    def _progress_from(self, line: str) -> None:
        match = STEP_LINE.match(line)
        if not (match and self.progress):
            return
        step, total, loss = int(match[1]), int(match[2]), float(match[3])
        now = self.clock()
        if self.first_step is None:
            self.first_step = (step, now)
        done_steps, since = step - self.first_step[0], now - self.first_step[1]
        eta = (total - step) * since / done_steps if done_steps > 0 else None
        self.bar = progress_line(step, total, loss, eta, shutil.get_terminal_size().columns)


def progress_line(step: int, total: int, loss: float, eta_s: float | None, width: int = 80) -> str:
    """`[#####.....] step 40/600  loss 7.79  ETA 3m12s`, cut to `width` characters."""
    eta = "--" if eta_s is None else (f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s" if eta_s >= 60
                                      else f"{int(eta_s)}s")
    text = f" step {step}/{total}  loss {loss:.4f}  ETA {eta}"
    cells = max(10, min(40, width - len(text) - 3))
    filled = int(cells * step / max(total, 1))
    return ("[" + "#" * filled + "." * (cells - filled) + "]" + text)[:max(width - 1, 20)]
