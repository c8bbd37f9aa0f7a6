"""Where a run stands in its data stream: which instances it has trained on, in a form that stays small.

The stream of a phase is a sequence of *units*, (pass, group of files), numbered
`pass * units_per_pass + group` in the order the read plan visits them. A read task turns its unit
into *buffers* (numbered from 0), the tokenizer actor turns each buffer into *items* (its NSP
instances, numbered in the order the actor emits them). Every row that reaches a Train worker
carries `(unit, buffer, item, buffer_items, last_buffer)`; a buffer that made no instance sends one
marker row (`buffer_items == 0`) so that the end of every buffer and unit is seen.

A worker marks the rows of every batch it trained on. The position is then: all units below
`done_below`; the finished units above it (few: units finish roughly in order); and for the units in
flight, their finished buffers and a bitmap of consumed items per partly consumed buffer. Its size
depends on what is in flight, never on how long the run has trained. Positions of several workers
merge by union (a row goes to exactly one worker), so a run resumes with any number of workers.

On resume, finished units are not planned at all, a unit in flight is read again from its start and
the items already consumed are dropped (`consumed_items`): nothing is skipped, nothing repeated.
Everything here is plain Python and numpy; `bertray.data.pipeline` and the trainer do the I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from bertray.errors import CheckpointError

POSITION_COLUMNS = ("unit", "buffer", "item", "buffer_items", "last_buffer")
FORMAT = 1


@dataclass
class UnitProgress:
    """A unit in flight: its last buffer once seen, buffers fully consumed, bitmaps of the others."""

    last: int | None = None
    done: set[int] = field(default_factory=set)
    partial: dict[int, np.ndarray] = field(default_factory=dict)   # buffer -> bool[buffer_items]

    def complete(self) -> bool:
        return self.last is not None and len(self.done) == self.last + 1 and not self.partial


@dataclass
class StreamLayout:
    """What unit numbers mean: a position only applies to a stream with the same layout."""

    files: int
    files_per_unit: int
    seed: int
    generation: int = 0                # which draw of pairs and masks (see `bertray.data.pipeline`)

    def same_units(self, other: "StreamLayout") -> bool:
        return (self.files, self.files_per_unit, self.seed) == (other.files, other.files_per_unit, other.seed)

    @property
    def units_per_pass(self) -> int:
        return -(-self.files // self.files_per_unit)

    def as_dict(self) -> dict[str, int]:
        return {"files": self.files, "files_per_unit": self.files_per_unit, "seed": self.seed,
                "generation": self.generation}


@dataclass
class DataPosition:
    layout: StreamLayout
    phase: int = 0
    done_below: int = 0
    done: set[int] = field(default_factory=set)
    units: dict[int, UnitProgress] = field(default_factory=dict)

    # -- marking ------------------------------------------------------------------------------

    def mark(self, rows: Mapping[str, np.ndarray]) -> None:
        """Record the rows of a trained batch (or marker rows) as consumed."""
        units = np.asarray(rows["unit"], dtype=np.int64)
        if not len(units):
            return
        buffers = np.asarray(rows["buffer"], dtype=np.int64)
        items = np.asarray(rows["item"], dtype=np.int64)
        sizes = np.asarray(rows["buffer_items"], dtype=np.int64)
        last = np.asarray(rows["last_buffer"]).astype(bool)
        keys = units * (1 << 31) + buffers
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for group in np.split(order, bounds):
            i = group[0]
            self._mark_buffer(int(units[i]), int(buffers[i]), int(sizes[i]), bool(last[i]), items[group])

    def _mark_buffer(self, unit: int, buffer: int, size: int, last: bool, items: np.ndarray) -> None:
        if self.unit_done(unit):
            return
        progress = self.units.setdefault(unit, UnitProgress())
        if last:
            progress.last = buffer
        if buffer not in progress.done:
            if size <= 0:
                progress.done.add(buffer)
            else:
                bits = progress.partial.setdefault(buffer, np.zeros(size, dtype=bool))
                bits[items[(items >= 0) & (items < size)]] = True
        self._settle(unit, (buffer,))
        self._advance()

    def _settle(self, unit: int, buffers: Iterable[int] | None = None) -> None:
        """Fully consumed bitmaps (of `buffers`, or all) become finished buffers; a unit with every
        buffer finished, done. Marking a batch settles only the buffers it touched: scanning every
        bitmap of the unit would be work per step that grows with the unit."""
        progress = self.units[unit]
        candidates = list(progress.partial) if buffers is None else [b for b in buffers if b in progress.partial]
        for buffer in candidates:
            if buffer in progress.done or progress.partial[buffer].all():
                progress.done.add(buffer)
                del progress.partial[buffer]
        if progress.complete():
            del self.units[unit]
            self.done.add(unit)

    def _advance(self) -> None:
        while self.done_below in self.done:
            self.done.discard(self.done_below)
            self.done_below += 1

    # -- queries ------------------------------------------------------------------------------

    def unit_done(self, unit: int) -> bool:
        return unit < self.done_below or unit in self.done

    def buffer_done(self, unit: int, buffer: int) -> bool:
        if self.unit_done(unit):
            return True
        progress = self.units.get(unit)
        return progress is not None and buffer in progress.done

    def consumed_items(self, unit: int, buffer: int) -> np.ndarray | bool:
        """True: the whole buffer was trained on; False: none of it; else a bool mask per item."""
        if self.buffer_done(unit, buffer):
            return True
        progress = self.units.get(unit)
        bits = progress.partial.get(buffer) if progress is not None else None
        return False if bits is None else bits

    def unconsumed(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """Bool mask of the rows not trained on yet (marker rows count as consumed: they carry nothing)."""
        units, buffers, items = (np.asarray(rows[k], dtype=np.int64) for k in ("unit", "buffer", "item"))
        keep = np.asarray(rows["buffer_items"]) > 0
        seen: dict[tuple[int, int], np.ndarray | bool] = {}
        for i in np.flatnonzero(keep):
            key = (int(units[i]), int(buffers[i]))
            consumed = seen[key] if key in seen else seen.setdefault(key, self.consumed_items(*key))
            if consumed is True or (consumed is not False and 0 <= items[i] < len(consumed) and consumed[items[i]]):
                keep[i] = False
        return keep

    def summary(self) -> dict[str, Any]:
        """Pass, units finished and the share of the current pass read, for people."""
        per_pass = self.layout.units_per_pass
        finished = self.done_below + len(self.done)
        current_pass = self.done_below // per_pass
        in_pass = sum(1 for u in range(current_pass * per_pass, (current_pass + 1) * per_pass) if self.unit_done(u))
        return {"phase": self.phase, "pass": current_pass, "units_done": finished, "units_per_pass": per_pass,
                "units_in_flight": len(self.units), "pass_share_done": in_pass / per_pass if per_pass else 0.0,
                "files": self.layout.files}

    # -- merging and (de)serialising ------------------------------------------------------------

    def merge(self, other: "DataPosition") -> "DataPosition":
        """The union of two workers' positions of the same stream (same layout and phase)."""
        if other.layout != self.layout or other.phase != self.phase:
            raise CheckpointError(f"data positions of different streams cannot merge: {self.layout}, phase "
                                  f"{self.phase} vs {other.layout}, phase {other.phase}")
        below = max(self.done_below, other.done_below)
        merged = DataPosition(self.layout, self.phase, below, {u for u in (*self.done, *other.done) if u >= below})
        for source in (self, other):
            for unit, progress in source.units.items():
                if merged.unit_done(unit):
                    continue
                target = merged.units.setdefault(unit, UnitProgress())
                if progress.last is not None:
                    target.last = progress.last
                target.done |= progress.done
                for buffer, bits in progress.partial.items():
                    if buffer in target.done:
                        continue
                    current = target.partial.get(buffer)
                    target.partial[buffer] = bits.copy() if current is None else current | bits
        for unit in list(merged.units):
            merged._settle(unit)
        merged._advance()
        return merged

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "layout": self.layout.as_dict(), "phase": self.phase, "done_below": self.done_below,
            "done": sorted(self.done),
            "units": {str(unit): {"last": p.last, "done": _ranges(p.done),
                                  "partial": {str(b): [len(bits), base64.b64encode(np.packbits(bits)).decode()]
                                              for b, bits in sorted(p.partial.items())}}
                      for unit, p in sorted(self.units.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "data position") -> "DataPosition":
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            units = {}
            for unit, p in data["units"].items():
                partial = {}
                for buffer, (size, packed) in p["partial"].items():
                    bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))[:int(size)]
                    if len(bits) != int(size):
                        raise ValueError(f"unit {unit} buffer {buffer}: bitmap shorter than {size}")
                    partial[int(buffer)] = bits.astype(bool)
                units[int(unit)] = UnitProgress(last=None if p["last"] is None else int(p["last"]),
                                                done=set(_expand(p["done"])), partial=partial)
            return cls(StreamLayout(**{k: int(v) for k, v in data["layout"].items()}), phase=int(data["phase"]),
                       done_below=int(data["done_below"]), done={int(u) for u in data["done"]}, units=units)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None


def merge_all(positions: Iterable[DataPosition]) -> DataPosition | None:
    merged = None
    for position in positions:
        merged = position if merged is None else merged.merge(position)
    return merged


def _ranges(values: set[int]) -> list[list[int]]:
    """Sorted integers as [first, last] runs: the finished buffers of a unit are mostly one run."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def _expand(runs: Iterable[Iterable[int]]) -> Iterable[int]:
    for first, last in runs:
        yield from range(int(first), int(last) + 1)
