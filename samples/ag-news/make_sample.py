"""Rebuild the AG News sample in this folder from AG News' test.csv (Zhang, Zhao & LeCun 2015).

    python samples/ag-news/make_sample.py path/to/ag_news_csv/test.csv

The source file is the 7,600-row test split of the `ag_news_csv` release (columns: class index
1-4, title, description; a header row `label,title,description` in the copy we read, none in the
original release: both are accepted). README.md names the copy and its sha256; another file is
used with a warning, and then the sample differs. What the script does, all of it seeded:

- labels: class index -> name, in the release's classes.txt order: 1 World, 2 Sports,
  3 Business, 4 Sci/Tech (written `Sci-Tech`);
- text: the corpus's leftovers of its HTML source undone, nothing else: the backslashes that
  stand for line breaks become spaces; the entities whose `&` became a space (` #39;`, ` quot;`,
  ` amp;`, ` #36;`, ...) and the intact ones (`&lt;`, `&gt;`) are decoded (`'`, `"`, `&`, `$`,
  `<`, `>`); runs of whitespace become one space;
- rows: per class, the row numbers are shuffled with random.Random(SEED) and cut into 300 train,
  100 dev and 25 test rows (no row in two files); each file is then shuffled (same generator), so
  the first N rows of a file (`--max-train-examples N`) hold every class;
- files: train.csv and dev.csv (`topic,headline,body`; CSV with RFC 4180 quoting, as Python's
  csv module writes it) and test.jsonl (`id`, `headline`, `body`, no label: new data to predict;
  JSON lines, because `flows/predict.py` reads JSONL, TSV, Parquet or text, and a task card reads
  JSONL too).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 24
SHA256 = "72b844642f92fb74fe397f0d1dd8a46d4cfd6fff60bc5c1a214fe40c44708fd7"   # the copy README.md names
LABELS = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci-Tech"}     # classes.txt order
PER_CLASS = {"train": 300, "dev": 100, "test": 25}
# An entity whose "&" the corpus turned into a space (" #39;s", " quot;Yes"), or at the start of a
# text; the lookbehind keeps word endings such as "result;" intact.
_BROKEN_ENTITY = re.compile(r"(?:\s|(?<![\w&#]))(#\d+|quot|amp|lt|gt);")


def clean(text: str) -> str:
    text = html.unescape(text.replace("\\", " "))
    text = _BROKEN_ENTITY.sub(lambda m: html.unescape(f"&{m.group(1)};"), text)
    return " ".join(text.split())


def read_source(path: Path) -> list[tuple[str, str, str]]:
    """(class index, title, description) of every row; a header row is skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][0] not in LABELS:
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows) if len(r) != 3 or r[0] not in LABELS]
    if bad:
        raise SystemExit(f"{path}: {len(bad)} rows are not (class 1-4, title, description), e.g. row {bad[0] + 1}")
    return [(r[0], r[1], r[2]) for r in rows]


def split_rows(rows: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    rng = random.Random(SEED)
    out: dict[str, list[tuple[str, str, str]]] = {split: [] for split in PER_CLASS}
    for label in LABELS:
        members = [i for i, r in enumerate(rows) if r[0] == label]
        rng.shuffle(members)
        start = 0
        for split, n in PER_CLASS.items():
            if start + n > len(members):
                raise SystemExit(f"class {label} has {len(members)} rows; the sample needs {sum(PER_CLASS.values())}")
            out[split].extend(rows[i] for i in members[start:start + n])
            start += n
    for split in out:
        rng.shuffle(out[split])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="AG News' test.csv (ag_news_csv/test.csv)")
    parser.add_argument("--out", default=str(HERE), help="folder to write into (default: this one)")
    args = parser.parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != SHA256:
        print(f"warning: {source} has sha256 {digest}, not the {SHA256} of the copy README.md names; "
              "the sample will differ", file=sys.stderr)
    splits = split_rows(read_source(source))
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        with open(out / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["topic", "headline", "body"])
            writer.writerows([LABELS[label], clean(title), clean(body)] for label, title, body in splits[split])
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        for i, (_, title, body) in enumerate(splits["test"]):
            f.write(json.dumps({"id": f"t{i:03d}", "headline": clean(title), "body": clean(body)},
                               ensure_ascii=False) + "\n")
    print(", ".join(f"{split} {len(rows)}" for split, rows in splits.items()) + f" rows written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
