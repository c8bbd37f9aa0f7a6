"""Fine-tune a BERT checkpoint on the paper's tasks with Ray Tune and print the dev-set results table.

    python flows/finetune.py                     # embedded: the latest local pretraining checkpoint
                                                 # (runs/pretrain-embedded), GLUE samples shipped in
                                                 # samples/glue, a small grid, plus a random-init row
    python flows/finetune.py --init-from runs/pretrain-embedded --tasks glue --data ../shared/data
    python flows/finetune.py --init-from s3://bucket/runs/bert-base --tasks glue,squad1,squad2,swag,conll2003 \\
        --data s3://bucket/benchmarks --output s3://bucket/finetune/bert-base

One Ray Tune trial per (checkpoint, task, learning rate, batch size, epochs, seed); each trial takes
one GPU (or --cpus-per-trial CPUs on a CPU-only cluster) and trials run concurrently across the
cluster. Without --config, the embedded settings (flows/configs/finetune-embedded.yaml) apply when
--data is not given; with --data the defaults are the paper's per-task grids and epochs
(flows/configs/finetune-paper.yaml). Flags override the config file. Inside `ray job submit` the
script joins the job's cluster; otherwise it starts a local Ray.

Each sweep writes into a folder of its own, <output>/<name>-<date>-<time>-<id>/, and <output>/latest
names the newest (a link on a local disk, a one-line file in object storage). Into it go results.md
(the paper's table layout + the winning grid points + failed trials),
results.csv and results.json (every trial), predictions/ (the winners' prediction files: dev
predictions, GLUE test submissions, SQuAD predictions.json, CoNLL dev/test tags), models/ (the
winners' fine-tuned models in the Hugging Face layout, models/<row>/<task>/, which
transformers' AutoModelFor... classes load; --save-models all|winners|none) and tune/ (Tune's
trial directories).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "flows" / "configs"

# Short spellings (the paper's words) beside the flags made from FinetuneConfig (--field-name).
ALIASES = {"labels": ("--label",), "learning_rates": ("--lr",), "batch_sizes": ("--batch-size",), "seeds": ("--seed",)}


def build_parser() -> argparse.ArgumentParser:
    from bertray.cli import add_config_options
    from bertray.tune.sweep import FinetuneConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--seed 42 (or --seeds 0 42) names the seeds; --restarts 3 asks for three (0, 1, 2).")
    parser.add_argument("--config", help="YAML file of the settings below, flat keys as in the config dataclass "
                                         "(default: flows/configs/finetune-embedded.yaml without --data, "
                                         "flows/configs/finetune-paper.yaml with it)")
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    parser.add_argument("--json", help="also write the sweep summary (winners, files, timing) as JSON here")
    parser.add_argument("--verbose", action="store_true", help="also print Tune's progress tables and what Ray's "
                                                               "processes write (every trial's output); by default "
                                                               "a line per trial start and end")
    parser.add_argument("--quiet", action="store_true", help="not even the trial lines: the results table only")
    parser.add_argument("--restarts", type=int, metavar="N", help="random restarts of every grid point: seeds 0..N-1 "
                                                                  "(instead of naming them with --seeds)")
    add_config_options(parser, FinetuneConfig, aliases=ALIASES, hidden=("fail_trials",))
    return parser


def overrides_from(args: argparse.Namespace) -> dict:
    """The config fields given as flags; --restarts N as seeds 0..N-1."""
    from bertray.cli import config_overrides
    from bertray.errors import ConfigError
    from bertray.tune.sweep import FinetuneConfig

    out = config_overrides(FinetuneConfig, args)
    if args.restarts is not None:
        if "seeds" in out:
            raise ConfigError("give either --seeds (the seeds themselves) or --restarts (how many), not both")
        if args.restarts < 1:
            raise ConfigError(f"--restarts {args.restarts}: give at least 1")
        out["seeds"] = list(range(args.restarts))
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from bertray.cli import ray_logs_line, repo_path, start_ray
    from bertray.config import load_config
    from bertray.errors import BertrayError
    from bertray.tune.sweep import FinetuneConfig

    try:
        overrides = overrides_from(args)
        config = args.config or str(CONFIGS / ("finetune-paper.yaml" if "data" in overrides
                                               else "finetune-embedded.yaml"))
        cfg = load_config(FinetuneConfig, config, overrides)
        cfg = dataclasses.replace(cfg, data=repo_path(cfg.data), init_from=tuple(map(repo_path, cfg.init_from)))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from bertray.tasks.registry import resolve_tasks
    from bertray.tune.sweep import check_data, resolve_rows, run_sweep

    try:                                          # fail before starting Ray when an input is missing
        rows = resolve_rows(cfg)
        check_data(resolve_tasks(cfg.tasks), cfg.data)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    start_ray(args.address, args.num_cpus, quiet=not args.verbose)
    print(f"bertray fine-tuning: {', '.join(r.label for r in rows)} on {cfg.tasks} from {cfg.data} "
          f"(config {config}) -> {cfg.output}\n{ray_logs_line(args.address)}", flush=True)
    try:
        sweep = run_sweep(cfg, verbose=1 if args.verbose else 0,
                          trial_lines=not (args.quiet or args.verbose))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in sweep.records if r.status == "FAILED"]
    print("\n" + sweep.markdown)
    print(f"{len(sweep.records)} trials ({len(failed)} failed) in {time.perf_counter() - started:.0f} s, "
          f"{sweep.resources} per trial")
    print(f"  sweep        {sweep.folder} (named by {cfg.output.rstrip('/')}/latest)")
    for kind, path in sweep.files.items():
        print(f"  results.{kind:<5} {path}")
    for (row, task), folder in sweep.predictions.items():
        print(f"  predictions  {task:<10} {folder}")
    for (row, task), folder in sweep.models.items():
        print(f"  model        {task:<10} {folder}")
    if args.json:
        summary = {"folder": sweep.folder, "files": sweep.files, "experiment": sweep.experiment,
                   "elapsed_s": round(sweep.elapsed_s, 1),
                   "trials": len(sweep.records), "failed": len(failed),
                   "best": [{"row": row, "task": task, "config": r.config, "score": r.score, "model": r.model}
                            for (row, task), r in sweep.best.items()]}
        Path(args.json).write_text(json.dumps(summary, indent=2))
    unfinished = {(r.row, r.task) for r in sweep.records} - set(sweep.best)
    if unfinished:
        print(f"error: no trial finished for {', '.join(f'{task} ({row})' for row, task in sorted(unfinished))}",
              file=sys.stderr)
    return 1 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
