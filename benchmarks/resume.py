"""Time from a restart to the first new batch: resuming from the data position vs replaying the stream.

After a crash late in a pass, a run that cannot say where it stood either starts the pass over
(and trains on the same data twice) or replays the stream, reading and discarding what it already
consumed: `transformers` Trainer skips the batches already seen, which re-reads them. bertray's
checkpoint records which units of the stream (pass, group of files) are finished, so a resumed
stream plans only the rest (`bertray.data.position`).

The corpus is `--files` files (default 1,000) of about `--file-kb` KB each, cut from WikiText-2
(articles repeated and shuffled per file, so every file differs); the stream is the real pipeline
(read tasks, tokenizer actors pairing and masking) on a local Ray with the machine's CPUs. For each
share of a pass already consumed (10%, 50%, 90%):

- **resume**: the dataset built with a position whose first `share x units` units are finished,
  timed from building it to its first batch of `--batch` rows;
- **replay**: one full pass read from the start, timed to the moment `share` of its rows had come
  out (what a replay reads and discards before its first new batch), plus the first batch after.

    python benchmarks/resume.py --json benchmarks/results/resume.json
    python benchmarks/resume.py --files 1000 --file-kb 8          # quicker
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "samples/corpus/wikitext-2/vocab-8192/tokenizer.json"


def write_corpus(folder: Path, files: int, file_kb: int, seed: int = 0) -> None:
    text = (REPO / "samples/corpus/wikitext-2/wiki.valid.raw").read_text()
    articles = [a for a in text.split("\n = ") if len(a) > 500]
    rng = random.Random(seed)
    for i in range(files):
        parts, size = [], 0
        while size < file_kb * 1024:
            article = rng.choice(articles)
            parts.append(article)
            size += len(article)
        (folder / f"part-{i:05d}.txt").write_text(" = " + "\n = ".join(parts) + "\n")


def main(argv=None) -> int:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--file-kb", type=int, default=40)
    parser.add_argument("--shares", default="0.1,0.5,0.9")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import numpy as np
    import ray
    from tokenizers import Tokenizer

    from bertray.data.config import DataSection, PhaseConfig
    from bertray.data.pipeline import build_dataset
    from bertray.data.stream_spec import stream_spec
    from bertray.data.position import DataPosition, StreamLayout
    from bertray.data.sources import resolve_corpus

    shares = [float(s) for s in args.shares.split(",")]
    with tempfile.TemporaryDirectory(prefix="bertray-resume-") as folder:
        write_corpus(Path(folder), args.files, args.file_kb)
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        files = resolve_corpus(folder)
        data = DataSection(corpus=(folder,), layout="wikitext")
        tokenizer_json = Tokenizer.from_file(str(TOKENIZER)).to_str()
        layout = StreamLayout(files=len(files), files_per_unit=data.files_per_read_task, seed=0)

        def spec(position=None):
            return stream_spec(data, PhaseConfig(), tokenizer_json, seed=0, generation=0, passes=1, resume=position)

        build_dataset(files, spec()).take_batch(args.batch)      # warm up: workers, imports
        started = time.perf_counter()
        progress, rows = [], 0                  # (seconds since the start, instances so far)
        for block in build_dataset(files, spec()).iter_batches(batch_size=args.batch, batch_format="numpy"):
            rows += int((np.asarray(block["buffer_items"]) > 0).sum())
            progress.append((time.perf_counter() - started, rows))
        total_rows = rows
        pass_s = time.perf_counter() - started
        results = []
        for share in shares:
            replay_s = next(t for t, r in progress if r >= share * total_rows)
            position = DataPosition(layout, done_below=int(share * layout.units_per_pass))
            t0 = time.perf_counter()
            next(iter(build_dataset(files, spec(position)).iter_batches(batch_size=args.batch)))
            resume_s = time.perf_counter() - t0
            results.append({"share": share, "resume_s": round(resume_s, 2), "replay_s": round(replay_s, 2),
                            "speedup": round(replay_s / resume_s, 1)})
        ray.shutdown()
    print(f"{args.files} files of ~{args.file_kb} KB, one pass = {total_rows:,} instances in {pass_s:.1f} s "
          f"({os.cpu_count()} CPUs)")
    print(f"{'consumed':>9} {'resume s':>9} {'replay s':>9} {'speedup':>8}")
    for r in results:
        print(f"{r['share']:>9.0%} {r['resume_s']:>9.2f} {r['replay_s']:>9.2f} {r['speedup']:>7.1f}x")
    if args.json:
        write_json(args.json, {"files": args.files, "file_kb": args.file_kb, "pass_instances": total_rows,
                               "pass_s": pass_s, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
