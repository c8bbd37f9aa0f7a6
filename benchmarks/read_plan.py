"""What the read plan costs before the first step: the tasks Ray builds up front, and their bytes.

Ray Data builds every read task of a dataset when its execution starts and puts each one (its
pickled closure) in the object store. bertray's plan is one task per pass still to read, which
lists that pass's units (groups of file indices) when it runs; every unit is then read by a task of
the reading stage, whose arguments (the file list and a spec without the tokenizer) Ray puts in the
object store once for the whole stream. So before the first step Ray holds: the pass tasks, the
reading stage's arguments, and the unit lists of the passes it has started (one, at first).

For 100 / 1,000 / 10,000 files (URLs of the length an S3 corpus has; nothing is read) at 1 and 40
passes, with an 8k-word vocabulary, this prints the number of up-front tasks and their pickled
bytes (cloudpickle, as Ray ships them), the reading stage's arguments, one pass's unit list (Arrow
bytes), their sum per file, and the driver's peak Python allocation while building the plan
(tracemalloc); and, for comparison, the plan before: one up-front task per (pass, unit) holding
that unit's files and the spec (`--max-tasks` of them pickled, the rest extrapolated).

    python benchmarks/read_plan.py --json benchmarks/results/read_plan.json
"""

from __future__ import annotations

import argparse
import functools
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_spec(passes: int):
    from tokenizers import Tokenizer

    from bertray.data.config import DataSection, PhaseConfig
    from bertray.data.stream_spec import stream_spec

    tokenizer = Tokenizer.from_file(str(REPO / "samples/corpus/wikitext-2/vocab-8192/tokenizer.json"))
    data = DataSection(corpus=("s3://bucket/corpus/bert/",))
    return stream_spec(data, PhaseConfig(), tokenizer.to_str(), seed=0, generation=0, passes=passes)


def measure(files: int, passes: int, max_tasks: int) -> dict:
    from ray import cloudpickle
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    from bertray.data.pipeline import CorpusDatasource, _pass_table, _read_unit
    from bertray.data.stream_spec import read_spec
    from bertray.data.sources import CorpusFile

    corpus = [CorpusFile(f"s3://example-bucket/corpus/bert/shard-{i:06d}-of-{files:06d}.txt.zst", 50_000_000, i)
              for i in range(files)]
    spec = make_spec(passes)
    tracemalloc.start()
    started = time.perf_counter()
    source = CorpusDatasource(len(corpus), spec)
    tasks = source.get_read_tasks(1)
    build_s = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    task_bytes = sum(len(cloudpickle.dumps(t)) for t in tasks)
    stage_args = len(cloudpickle.dumps((corpus, read_spec(spec), None)))
    (pass_units,) = _pass_table(source.plan(0))
    total = task_bytes + stage_args + pass_units.nbytes

    # The plan before: one up-front task per unit, each holding its files and the reading spec.
    group, reading = spec.files_per_read_task, read_spec(spec)
    units_before = passes * source.per_pass
    old_sample = [ReadTask(functools.partial(_read_unit, corpus[u * group:(u + 1) * group], 0, u, reading, None,
                                             frozenset()),
                           BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None))
                  for u in range(min(source.per_pass, max_tasks))]
    old = sum(len(cloudpickle.dumps(t)) for t in old_sample) / len(old_sample) * units_before
    return {"files": files, "passes": passes, "tasks": len(tasks), "task_bytes": task_bytes,
            "stage_args_bytes": stage_args, "pass_units_bytes": pass_units.nbytes, "bytes": total,
            "bytes_per_file": total / files, "tasks_before": units_before, "bytes_before": int(old),
            "bytes_per_file_before": old / files, "driver_peak_bytes": peak, "plan_build_s": round(build_s, 4)}


def main(argv=None) -> int:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="100,1000,10000")
    parser.add_argument("--passes", default="1,40")
    parser.add_argument("--max-tasks", type=int, default=400, help="tasks of the plan before pickled per case")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = [measure(f, p, args.max_tasks) for f in map(int, args.files.split(","))
            for p in map(int, args.passes.split(","))]
    print(f"{'files':>6} {'passes':>6} {'tasks':>6} {'task KB':>8} {'args KB':>8} {'pass KB':>8} {'B/file':>7} "
          f"{'peak KB':>8} | {'tasks before':>12} {'MB before':>10} {'B/file before':>14}")
    for r in rows:
        print(f"{r['files']:>6} {r['passes']:>6} {r['tasks']:>6} {r['task_bytes'] / 1e3:>8.1f} "
              f"{r['stage_args_bytes'] / 1e3:>8.1f} {r['pass_units_bytes'] / 1e3:>8.1f} {r['bytes_per_file']:>7.0f} "
              f"{r['driver_peak_bytes'] / 1e3:>8.1f} | {r['tasks_before']:>12} {r['bytes_before'] / 1e6:>10.1f} "
              f"{r['bytes_per_file_before']:>14.0f}")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
