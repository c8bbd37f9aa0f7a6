"""Rebuild the own-task sample in this folder from the SST-2 sample in ../glue/SST-2.

    python samples/own-task/make_sample.py

The files are SST-2 rewritten the way a user's own data usually looks: CSV (RFC 4180 quoting, as
Python's csv module and pandas write it), the columns renamed (`review`, `sentiment`), string
labels (`negative`, `positive`) instead of GLUE's 0/1, and an unlabelled test file with an `id`
column. train.csv: the first 600 rows of ../glue/SST-2/train.tsv; dev.csv: the first 200 rows of
../glue/SST-2/dev.tsv; test.csv: rows 601-700 of that train.tsv, without their labels.
"""

from __future__ import annotations

import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent
SST2 = HERE.parent / "glue" / "SST-2"
NAMES = {"0": "negative", "1": "positive"}


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def main() -> None:
    train, dev = _rows(SST2 / "train.tsv"), _rows(SST2 / "dev.tsv")
    _write(HERE / "train.csv", ["review", "sentiment"], [[t.strip(), NAMES[l]] for t, l in train[:600]])
    _write(HERE / "dev.csv", ["review", "sentiment"], [[t.strip(), NAMES[l]] for t, l in dev[:200]])
    _write(HERE / "test.csv", ["id", "review"], [[str(i), t.strip()] for i, (t, _) in enumerate(train[600:700])])


if __name__ == "__main__":
    main()
