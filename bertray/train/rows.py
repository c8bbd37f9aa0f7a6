"""A Train worker's rows, mixed and cut into batches, in an order that a resumed run can repeat.

The stream arrives an NSP buffer at a time (thousands of instances of a few documents), so a worker
mixes rows before it cuts batches. Ray Data's local shuffle buffer mixes well but its order cannot
be reproduced after a restart. Here rows are mixed in windows of `window` rows, each permuted by a
generator keyed on the identity of its first row; with `data.preserve_order` windows also restart
at every unit, so they are counted from a unit's first row and a resumed run, which reads its
units in flight again from the start, forms the same windows. Rows already trained on
(`DataPosition.unconsumed`) are dropped after the permutation: what remains comes out in the
order the uninterrupted run would have used.

Marker rows (a buffer that made no instance) never reach a batch; their positions ride along with
the next batch so that they are marked when it is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np

from bertray.data.position import POSITION_COLUMNS, DataPosition
from bertray.data.seeding import derive_rng

_STAGE_MIX = 4


@dataclass
class RowBatch:
    rows: dict[str, np.ndarray]           # the batch's columns (instances only)
    positions: dict[str, np.ndarray]      # POSITION_COLUMNS of its rows and of markers seen before it


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Column-wise concatenation of row dicts with the same columns ({} for none)."""
    if not parts:
        return {}
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _take(rows: Mapping[str, np.ndarray], index: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {key: value[index] for key, value in rows.items()}


def _length(rows: Mapping[str, np.ndarray]) -> int:
    return len(rows["unit"])


def _split_by_unit(block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    units = block["unit"]
    cuts = np.flatnonzero(units[1:] != units[:-1]) + 1
    if not len(cuts):
        yield block
        return
    for start, end in zip(np.r_[0, cuts], np.r_[cuts, len(units)]):
        yield _take(block, slice(start, end))


def mixed_batches(blocks: Iterable[Mapping[str, np.ndarray]], batch_size: int, *, window: int, seed: int,
                  resume: DataPosition | None = None, windows_per_unit: bool = False) -> Iterator[RowBatch]:
    """Batches of exactly `batch_size` rows (a last partial one is dropped) from `blocks` of rows.

    `resume`: the position the run resumed from (read-only here); `window` 0: no mixing."""
    pending: list[dict[str, np.ndarray]] = []      # mixed rows waiting to be cut, in order
    pending_rows = 0
    markers: list[dict[str, np.ndarray]] = []
    gathered: list[dict[str, np.ndarray]] = []     # the window being filled
    gathered_rows = 0

    def close_window(size: int | None = None) -> None:
        """Mix the first `size` gathered rows (all when None) and queue them."""
        nonlocal gathered, gathered_rows, pending_rows
        if not gathered:
            return
        rows = concat_rows(gathered)
        size = _length(rows) if size is None else size
        rows, rest = _take(rows, slice(0, size)), _take(rows, slice(size, None))
        gathered, gathered_rows = ([rest] if _length(rest) else []), _length(rest)
        if window > 1:
            rng = derive_rng(seed, _STAGE_MIX, int(rows["unit"][0]), int(rows["buffer"][0]), int(rows["item"][0]))
            rows = _take(rows, rng.permutation(_length(rows)))
        if resume is not None:
            rows = _take(rows, resume.unconsumed(rows))
        if _length(rows):
            pending.append(rows)
            pending_rows += _length(rows)

    def cut() -> Iterator[RowBatch]:
        nonlocal pending, pending_rows, markers
        while pending_rows >= batch_size:
            rows = concat_rows(pending)
            batch, rest = _take(rows, slice(0, batch_size)), _take(rows, slice(batch_size, None))
            pending, pending_rows = ([rest] if _length(rest) else []), _length(rest)
            positions = concat_rows([*markers, {k: batch[k] for k in POSITION_COLUMNS}])
            markers = []
            yield RowBatch(batch, positions)

    for block in blocks:
        block = {key: np.asarray(value) for key, value in block.items()}
        if not _length(block):
            continue
        real = block["buffer_items"] > 0
        if not real.all():
            markers.append({k: block[k][~real] for k in POSITION_COLUMNS})
            block = _take(block, real)
        for part in (_split_by_unit(block) if windows_per_unit else (block,)):
            if not _length(part):
                continue
            if windows_per_unit and gathered and gathered[0]["unit"][0] != part["unit"][0]:
                close_window()
            gathered.append(part)
            gathered_rows += _length(part)
            while gathered_rows >= max(window, 1):
                close_window(max(window, 1))
            yield from cut()
    close_window()
    yield from cut()
