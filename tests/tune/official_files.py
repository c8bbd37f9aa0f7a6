"""Small files in a built-in task's official layout, for the tests that run built-in tasks."""

from __future__ import annotations

import csv
import pathlib

SWAG_COLUMNS = ["", "video-id", "fold-ind", "startphrase", "sent1", "sent2", "gold-source",
                "ending0", "ending1", "ending2", "ending3", "label"]


def write_swag(rows: list[dict], folder: pathlib.Path) -> None:
    """SWAG's official CSV layout (`train.csv`: the first 6 rows, `val.csv`: the rest) from the
    sample's JSON rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.csv", rows[:6]), ("val.csv", rows[6:])):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=SWAG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for i, row in enumerate(part):
                writer.writerow({"": i, "video-id": f"v{i}", "fold-ind": i, "gold-source": "gold",
                                 "startphrase": f"{row['sent1']} {row['sent2']}", **row})
