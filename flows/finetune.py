"""Fine-tune a BERT checkpoint on the paper's tasks with Ray Tune and print the dev-set results table.

    python flows/finetune.py                     # embedded: the latest local pretraining checkpoint
                                                 # (runs/pretrain-embedded), GLUE samples shipped in
                                                 # samples/glue, a small grid, plus a random-init row
    python flows/finetune.py --init-from runs/pretrain-embedded --tasks glue --data ../shared/data
    python flows/finetune.py --init-from s3://bucket/runs/bert-base --tasks glue,squad1,squad2,swag,conll2003 \\
        --data s3://bucket/benchmarks --output s3://bucket/finetune/bert-base
    python flows/finetune.py --init-from CK --task-file tasks.yaml [--tasks sst2]    # your own tasks (cards)
    python flows/finetune.py --init-from CK --train data/train.csv --dev data/dev.csv \\
        --text-field text --label-field label                                       # one task, by flags

Your own data: a task card (bertray/tasks/card.py; flows/configs/own-task-example.yaml) names the
files (local, s3://, gs://; CSV, TSV, JSONL, JSON, Parquet, CoNLL, SQuAD; .gz/.zst), the text and
label fields and, optionally, the type (else inferred from the labels), labels, metrics and grid.
Every file is read and checked once before Ray starts: missing files or columns, a single class,
dev/test labels train lacks, or too many bad rows stop the flow with exit code 2; bad rows that
are few are skipped and named (file:line). With own tasks and no --config, the paper's settings
apply (each card's grid, else A.3's).

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
ALIASES = {"labels": ("--label",), "learning_rates": ("--lr",), "batch_sizes": ("--batch-size",), "seeds": ("--seed",),
           "task_files": ("--task-file",)}


def build_parser() -> argparse.ArgumentParser:
    from bertray.cli import add_config_options
    from bertray.tasks.card import TYPES
    from bertray.tune.sweep_plan import FinetuneConfig

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
    own = parser.add_argument_group("one task of your own, by flags (or --task-file for task cards)")
    own.add_argument("--train", metavar="URL", help="training file: local path or s3://, gs://, ... URL; CSV, TSV, "
                                                   "JSONL, JSON or Parquet, plain or .gz/.zst")
    own.add_argument("--dev", metavar="URL", help="dev file (default: a seeded 10%% of --train, stratified)")
    own.add_argument("--test", metavar="URL", help="test file, labelled or not: predictions are written for it")
    own.add_argument("--text-field", action="append", default=[], metavar="F",
                     help="the text field; give it twice for sentence pairs")
    own.add_argument("--label-field", metavar="L", help="the label field")
    own.add_argument("--task-type", choices=TYPES, help="default: inferred from the label field (printed)")
    own.add_argument("--task-name", metavar="N", help="the task's name in the results (default: own_task)")
    add_config_options(parser, FinetuneConfig, aliases=ALIASES, hidden=("fail_trials", "own_tasks"))
    return parser


def card_from_args(args: argparse.Namespace):
    """The task card of the single-task flags; None when --train is not given."""
    from bertray.errors import ConfigError
    from bertray.tasks.card import card_from_flags

    given = [flag for flag, value in (("--dev", args.dev), ("--test", args.test), ("--text-field", args.text_field),
                                      ("--label-field", args.label_field), ("--task-type", args.task_type),
                                      ("--task-name", args.task_name)) if value]
    if args.train is None:
        if given:
            raise ConfigError(f"{', '.join(given)}: these describe a task of your own; give its --train file too")
        return None
    return card_from_flags(train=args.train, dev=args.dev, test=args.test, text_fields=args.text_field,
                           label_field=args.label_field, task_type=args.task_type, task_name=args.task_name)


def overrides_from(args: argparse.Namespace) -> dict:
    """The config fields given as flags; --restarts N as seeds 0..N-1."""
    from bertray.cli import config_overrides
    from bertray.errors import ConfigError
    from bertray.tune.sweep_plan import FinetuneConfig

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
    from bertray.tune.sweep_plan import FinetuneConfig

    try:
        overrides = overrides_from(args)
        card = card_from_args(args)
        if card is not None:
            overrides["own_tasks"] = [card]
        own = bool(card or overrides.get("task_files"))
        if own and "tasks" not in overrides:          # your own tasks alone, unless --tasks adds built-in ones
            overrides["tasks"] = ""
        config = args.config or str(CONFIGS / ("finetune-paper.yaml" if "data" in overrides or own
                                               else "finetune-embedded.yaml"))
        cfg = load_config(FinetuneConfig, config, overrides)
        cfg = dataclasses.replace(cfg, data=repo_path(cfg.data), init_from=tuple(map(repo_path, cfg.init_from)),
                                  task_files=tuple(map(repo_path, cfg.task_files)))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from bertray.tune.sweep import run_sweep
    from bertray.tune.sweep_plan import prepare_tasks, resolve_rows

    try:                                          # fail before starting Ray when an input is missing or bad
        rows = resolve_rows(cfg)
        specs, lines = prepare_tasks(cfg)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in lines:                            # your own tasks: inferred types, bad rows, held-out dev, leaks
        print(line, flush=True)
    started = time.perf_counter()
    start_ray(args.address, args.num_cpus, quiet=not args.verbose)
    builtin = [s.name for s in specs if s.source is None]
    print(f"bertray fine-tuning: {', '.join(r.label for r in rows)} on {', '.join(s.name for s in specs)}"
          f"{f' (built-in tasks from {cfg.data})' if builtin else ''} (config {config}) -> {cfg.output}\n"
          f"{ray_logs_line(args.address)}", flush=True)
    try:
        sweep = run_sweep(cfg, verbose=1 if args.verbose else 0,
                          trial_lines=not (args.quiet or args.verbose), specs=specs)
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
