"""What the read plan costs before the first step: read tasks, and the bytes Ray ships for them.

Ray Data builds every read task of a dataset when its execution starts and serializes each one
(its closure) into the task it submits. A read task of bertray's corpus source reads one unit,
(pass, group of files). Before this change, each task's closure was a lambda over the datasource
itself: every file's metadata and the whole stream spec, tokenizer JSON included, pickled into
every task. Now a task holds its own files, a spec without the tokenizer, and the few resume
bitmaps of its own unit.

For 100 / 1,000 / 10,000 files (URLs of the length an S3 corpus has; nothing is read) at 1 and 40
passes, with an 8k-word vocabulary, this prints the number of tasks, the serialized bytes of all
tasks (cloudpickle, as Ray ships them), per file per pass, and the driver's peak Python allocation
while building the plan (tracemalloc), for the current plan and for a closure over the datasource
(the plan before). `--max-tasks` caps how many tasks are pickled per case (the rest extrapolated
from the mean), so the 10,000-file x 40-pass case stays quick.

    python benchmarks/read_plan.py --json benchmarks/results/read_plan.json
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_spec(passes: int):
    from tokenizers import Tokenizer

    from bertray.config import DataSection, PhaseConfig
    from bertray.data.pipeline import stream_spec

    tokenizer = Tokenizer.from_file(str(REPO / "samples/corpus/wikitext-2/vocab-8192/tokenizer.json"))
    data = DataSection(corpus=("s3://bucket/corpus/bert/",))
    return stream_spec(data, PhaseConfig(), tokenizer.to_str(), seed=0, generation=0, passes=passes)


def measure(files: int, passes: int, max_tasks: int) -> dict:
    import cloudpickle
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    from bertray.data.pipeline import CorpusDatasource, _read_unit
    from bertray.data.sources import CorpusFile

    corpus = [CorpusFile(f"s3://example-bucket/corpus/bert/shard-{i:06d}-of-{files:06d}.txt.zst", 50_000_000, i)
              for i in range(files)]
    source = CorpusDatasource(corpus, make_spec(passes))
    tracemalloc.start()
    started = time.perf_counter()
    tasks = source.get_read_tasks(1)
    build_s = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sample = tasks[:max_tasks]
    now = sum(len(cloudpickle.dumps(t)) for t in sample) / len(sample) * len(tasks)

    def before(files_of_task, pass_index):   # the closure of the plan before: the datasource itself
        return ReadTask(lambda f=files_of_task, p=pass_index: _read_unit(f, p, 0, source._spec, source._counters),
                        BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))

    old_sample = [before(corpus[:4], 0) for _ in range(min(len(tasks), max(1, max_tasks // 20)))]
    old = sum(len(cloudpickle.dumps(t)) for t in old_sample) / len(old_sample) * len(tasks)
    return {"files": files, "passes": passes, "tasks": len(tasks), "bytes": int(now),
            "bytes_per_file_pass": now / (files * passes), "bytes_before": int(old),
            "bytes_per_file_pass_before": old / (files * passes), "driver_peak_bytes": peak,
            "plan_build_s": round(build_s, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="100,1000,10000")
    parser.add_argument("--passes", default="1,40")
    parser.add_argument("--max-tasks", type=int, default=400, help="tasks pickled per case (the rest extrapolated)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [measure(f, p, args.max_tasks) for f in map(int, args.files.split(","))
            for p in map(int, args.passes.split(","))]
    print(f"{'files':>6} {'passes':>6} {'tasks':>8} {'MB now':>9} {'B/file/pass':>12} {'MB before':>10} "
          f"{'B/file/pass':>12} {'peak MB':>8} {'build s':>8}")
    for r in rows:
        print(f"{r['files']:>6} {r['passes']:>6} {r['tasks']:>8} {r['bytes'] / 1e6:>9.1f} "
              f"{r['bytes_per_file_pass']:>12.0f} {r['bytes_before'] / 1e6:>10.1f} "
              f"{r['bytes_per_file_pass_before']:>12.0f} {r['driver_peak_bytes'] / 1e6:>8.1f} {r['plan_build_s']:>8}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
