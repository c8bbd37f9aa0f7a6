"""The data position and the worker-side mixing, without Ray: exact bookkeeping of what was trained,
merging across workers, and a resumed stream that continues the uninterrupted one row for row."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from bertray.data.position import POSITION_COLUMNS, DataPosition, StreamLayout, merge_all
from bertray.errors import CheckpointError
from bertray.train.rows import mixed_batches

LAYOUT = StreamLayout(files=12, files_per_unit=4, seed=0)


def unit_rows(unit: int, buffer_sizes: list[int]) -> dict[str, np.ndarray]:
    """The rows a unit sends: items of each buffer in order, one marker row for an empty buffer; an
    `ident` column names every instance (unit, buffer, item) so tests can follow rows."""
    parts = []
    for buffer, n in enumerate(buffer_sizes):
        rows = max(n, 1)
        parts.append({"unit": np.full(rows, unit), "buffer": np.full(rows, buffer),
                      "item": np.arange(rows) if n else np.full(1, -1),
                      "buffer_items": np.full(rows, n), "last_buffer": np.full(rows, buffer == len(buffer_sizes) - 1),
                      "ident": (unit * 1000 + buffer) * 1000 + (np.arange(rows) if n else np.full(1, 999))})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def blocks_of(rows: dict[str, np.ndarray], size: int):
    for start in range(0, len(rows["unit"]), size):
        yield {k: v[start:start + size] for k, v in rows.items()}


def stream(units: dict[int, list[int]], first: int = 0) -> dict[str, np.ndarray]:
    parts = [unit_rows(u, sizes) for u, sizes in sorted(units.items()) if u >= first]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_marking_every_item_finishes_buffers_then_units_and_moves_the_frontier():
    position = DataPosition(LAYOUT)
    position.mark(unit_rows(1, [3, 2]))
    assert position.done == {1} and position.done_below == 0   # unit 0 is not done yet
    rows = unit_rows(0, [4, 0, 2])                               # buffer 1 made no instance (a marker)
    position.mark({k: v[:3] for k, v in rows.items()})
    assert not position.unit_done(0)
    assert position.consumed_items(0, 0).tolist() == [True, True, True, False]
    position.mark({k: v[3:] for k, v in rows.items()})
    assert position.done_below == 2 and not position.done and not position.units


def test_halves_seen_by_two_workers_merge_into_a_finished_unit_and_json_round_trips():
    rows = unit_rows(0, [6, 5])
    a, b = DataPosition(LAYOUT), DataPosition(LAYOUT)
    a.mark({k: v[::2] for k, v in rows.items()})
    b.mark({k: v[1::2] for k, v in rows.items()})
    assert 0 in a.units and 0 in b.units
    merged = merge_all([DataPosition.from_json(json.loads(json.dumps(p.to_json()))) for p in (a, b)])
    assert merged.done_below == 1 and not merged.units
    half = DataPosition.from_json(json.loads(json.dumps(a.to_json())))
    assert half.consumed_items(0, 0).tolist() == [True, False] * 3
    assert half.unconsumed(rows).tolist() == [False, True] * 5 + [False]


def test_merging_positions_of_different_streams_and_reading_a_bad_one_fail_clearly():
    with pytest.raises(CheckpointError, match="different streams"):
        DataPosition(LAYOUT).merge(DataPosition(StreamLayout(files=13, files_per_unit=4, seed=0)))
    with pytest.raises(CheckpointError, match="unreadable"):
        DataPosition.from_json({"format": 1, "layout": {"files": 1}}, "bertray_state.json")


def test_the_position_stays_small_however_long_the_run():
    position = DataPosition(LAYOUT)
    for unit in range(2000):
        position.mark(unit_rows(unit, [50, 50, 50]))
    assert position.done_below == 2000 and len(json.dumps(position.to_json())) < 300


def run(units, batch_size, window, resume=None, first=0, per_unit=True, block=7):
    return list(mixed_batches(blocks_of(stream(units, first), block), batch_size, window=window, seed=3,
                              resume=resume, windows_per_unit=per_unit))


@pytest.mark.parametrize("per_unit", [True, False])
def test_every_row_comes_out_once_in_full_batches_and_markers_ride_along(per_unit):
    units = {0: [10, 0, 7], 1: [9], 2: [0], 3: [12, 11]}
    batches = run(units, batch_size=8, window=16, per_unit=per_unit)
    assert all(len(b.rows["ident"]) == 8 for b in batches)
    seen = np.concatenate([b.rows["ident"] for b in batches])
    real = stream(units)["ident"][stream(units)["buffer_items"] > 0]
    assert len(seen) == len(set(seen.tolist())) == len(real) // 8 * 8
    assert len(real) - len(seen) < 8
    assert not np.array_equal(seen, real[:len(seen)])                  # mixed
    markers = np.concatenate([b.positions["buffer_items"] for b in batches])
    assert (markers == 0).sum() == 2


@pytest.mark.parametrize("crash_after", [1, 3, 5])
def test_a_resumed_stream_continues_the_uninterrupted_one_row_for_row(crash_after):
    """Windows counted from each unit's start: the resumed run, which re-reads the units in flight
    from their start and drops what was trained, cuts the same batches as the uninterrupted run."""
    units = {u: [13, 5, 0, 11][: 2 + u % 3] for u in range(6)}
    full = run(units, batch_size=6, window=10)
    position = DataPosition(LAYOUT)
    for batch in full[:crash_after]:
        position.mark(batch.positions)
    saved = DataPosition.from_json(position.to_json())
    resumed = run(units, batch_size=6, window=10, resume=copy.deepcopy(saved), first=saved.done_below, block=5)
    assert [b.rows["ident"].tolist() for b in resumed] == [b.rows["ident"].tolist() for b in full[crash_after:]]


def test_without_mixing_rows_keep_stream_order_and_positions_hold_only_position_columns():
    batches = run({0: [5, 5]}, batch_size=4, window=0)
    assert np.concatenate([b.rows["ident"] for b in batches]).tolist() == [0, 1, 2, 3, 4, 1000, 1001, 1002]
    assert set(batches[0].positions) == set(POSITION_COLUMNS)
