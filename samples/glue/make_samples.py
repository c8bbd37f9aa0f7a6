"""Rebuild the GLUE samples in this folder from the real files in ../shared/data/glue.

    python samples/glue/make_samples.py [--source ../shared/data/glue]

Each sample file is the header (where the file has one) plus the first N data rows of the
official file, byte for byte (MRPC's UTF-8 byte-order mark and CoLA's header-less layout
included), so every reader sees the official format. See README.md for sizes, sources, licences.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent

# task folder -> {split file: data rows kept (None: the whole file)}; header rows come on top
SAMPLES = {
    "SST-2": {"train.tsv": 4000, "dev.tsv": None, "test.tsv": 200},
    "MRPC": {"train.tsv": 1200, "dev.tsv": None, "test.tsv": 100},
    "CoLA": {"train.tsv": 3000, "dev.tsv": None, "test.tsv": 200},
    "STS-B": {"train.tsv": 1000, "dev.tsv": 500, "test.tsv": 100},
}
HEADERLESS = {("CoLA", "train.tsv"), ("CoLA", "dev.tsv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(HERE.parents[2] / "shared" / "data" / "glue"))
    args = parser.parse_args()
    for task, files in SAMPLES.items():
        (HERE / task).mkdir(exist_ok=True)
        for name, rows in files.items():
            lines = (Path(args.source) / task / name).read_bytes().splitlines(keepends=True)
            header = 0 if (task, name) in HEADERLESS else 1
            kept = lines if rows is None else lines[:header + rows]
            (HERE / task / name).write_bytes(b"".join(kept))
            print(f"{task}/{name}: {len(kept) - header} rows")


if __name__ == "__main__":
    main()
