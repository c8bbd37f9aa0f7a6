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

Writes <output>/results.md (the paper's table layout + the winning grid points + failed trials),
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
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "flows" / "configs"

# Flag spellings of the issue and the paper; every other FinetuneConfig field is --field-name.
ALIASES = {"init_from": "--init-from", "labels": "--label", "learning_rates": "--lr", "batch_sizes": "--batch-size",
           "epochs": "--epochs", "seeds": "--seeds"}
HIDDEN = {"fail_trials"}


def build_parser() -> argparse.ArgumentParser:
    from bertray.config import help_of
    from bertray.tune.finetune import FinetuneConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Values are read as YAML: 1e-4, 32, true, null. --seeds 3 means seeds 0 1 2; "
               "--seeds 0 42 means those two.")
    parser.add_argument("--config", help="YAML file of the settings below, flat keys as in the config dataclass "
                                         "(default: flows/configs/finetune-embedded.yaml without --data, "
                                         "flows/configs/finetune-paper.yaml with it)")
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    parser.add_argument("--json", help="also write the sweep summary (winners, files, timing) as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no Tune progress tables")
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(FinetuneConfig):
        flag = ALIASES.get(field.name, "--" + field.name.replace("_", "-"))
        tp = hints[field.name]
        many = typing.get_origin(tp) is tuple
        kwargs = dict(dest=f"opt:{field.name}", metavar="VALUE",
                      help=argparse.SUPPRESS if field.name in HIDDEN else help_of(field))
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                **{k: v for k, v in kwargs.items() if k != "metavar"})
        else:
            parser.add_argument(flag, nargs="+" if many else None, **kwargs)
    return parser


def parse_value(text: str):
    """A flag's value: a number where it is one (YAML would read `5e-5` as a string), else YAML."""
    from bertray.config import parse_value as yaml_value

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml_value(text)


def overrides_from(args: argparse.Namespace) -> dict:
    out = {}
    for key, value in vars(args).items():
        if not key.startswith("opt:") or value is None:
            continue
        name = key[4:]
        if isinstance(value, list):
            value = [parse_value(v) for v in value]
            if name == "seeds" and len(value) == 1 and isinstance(value[0], int):
                value = list(range(value[0]))           # --seeds N: N random restarts
        elif isinstance(value, str):
            value = parse_value(value)
            if name == "tasks" and isinstance(value, list):
                value = ",".join(map(str, value))
        out[name] = value
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from bertray.cli import repo_path, start_ray
    from bertray.errors import BertrayError
    from bertray.tune.finetune import load_config

    overrides = overrides_from(args)
    config = args.config or str(CONFIGS / ("finetune-paper.yaml" if "data" in overrides else "finetune-embedded.yaml"))
    try:
        cfg = load_config(config, overrides)
        cfg = dataclasses.replace(cfg, data=repo_path(cfg.data), init_from=tuple(map(repo_path, cfg.init_from)))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from bertray.tasks.registry import resolve_tasks
    from bertray.tune.finetune import check_data, resolve_rows, run_sweep

    try:                                          # fail before starting Ray when an input is missing
        rows = resolve_rows(cfg)
        check_data(resolve_tasks(cfg.tasks), cfg.data)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    start_ray(args.address, args.num_cpus, log_to_driver=not args.quiet)
    print(f"bertray fine-tuning: {', '.join(r.label for r in rows)} on {cfg.tasks} from {cfg.data} "
          f"(config {config}) -> {cfg.output}",
          flush=True)
    try:
        sweep = run_sweep(cfg, verbose=0 if args.quiet else 1)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in sweep.records if r.status == "FAILED"]
    print("\n" + sweep.markdown)
    print(f"{len(sweep.records)} trials ({len(failed)} failed) in {time.perf_counter() - started:.0f} s, "
          f"{sweep.resources} per trial")
    for kind, path in sweep.files.items():
        print(f"  results.{kind:<5} {path}")
    for (row, task), folder in sweep.predictions.items():
        print(f"  predictions  {task:<10} {folder}")
    for (row, task), folder in sweep.models.items():
        print(f"  model        {task:<10} {folder}")
    if args.json:
        summary = {"files": sweep.files, "experiment": sweep.experiment, "elapsed_s": round(sweep.elapsed_s, 1),
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
