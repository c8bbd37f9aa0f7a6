"""Pretrain BERT: stream a raw-text corpus through Ray Data into Ray Train workers.

    python flows/pretrain.py                                  # embedded Ray, tiny model, sample corpus
    python flows/pretrain.py --config flows/configs/bert-base.yaml --corpus s3://bucket/wiki/ \\
        --output s3://bucket/runs --name bert-base

Every configuration field is also a flag (`--train.max_steps 100`, `--data.layout wikitext`, ...):
see `--help`. Running the same command again with the same --output and --name resumes the run.
Inside `ray job submit` the script joins the job's cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from bertray.cli import add_config_options
    from bertray.train.config import PretrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "flows" / "configs" / "embedded.yaml"),
                        help="YAML file with any of the sections below (default: flows/configs/embedded.yaml, "
                             "the embedded CPU default; see flows/configs/ for bert-base and bert-large)")
    parser.add_argument("--corpus", nargs="+", help="shorthand for --data.corpus")
    parser.add_argument("--output", help="shorthand for --run.output (local path or s3://, gs:// URL)")
    parser.add_argument("--name", help="shorthand for --run.name")
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (default: all)")
    parser.add_argument("--json", help="write the final summary as JSON to this file")
    parser.add_argument("--progress-bars", action="store_true", help="show Ray Data's per-operator progress bars "
                                                                     "(with --verbose)")
    parser.add_argument("--verbose", action="store_true", help="also print what Ray's own processes write (Train's "
                                                               "controller, Data's executor, every worker); by "
                                                               "default that stays in Ray's log files")
    parser.add_argument("--data-position", metavar="RUN_DIR",
                        help="print where the run in RUN_DIR (a local path or URL) stands in its corpus, and exit")
    add_config_options(parser, PretrainConfig)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from bertray.cli import config_from_args, ray_logs_line, start_ray, with_repo_paths
    from bertray.train.config import PretrainConfig
    from bertray.errors import BertrayError

    if args.data_position:
        return print_data_position(args.data_position)

    try:
        cfg = config_from_args(PretrainConfig, args, {"data.corpus": args.corpus, "run.output": args.output,
                                                      "run.name": args.name})
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(cfg, data=with_repo_paths(cfg.data))
    from bertray.train.init_from import starting_checkpoint

    try:        # a checkpoint that does not fit the run's settings is refused before anything starts
        resuming = _has_checkpoint(cfg)     # the run's own checkpoint takes precedence over init_from
        start = None if resuming else starting_checkpoint(cfg)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    from bertray.train.pretrain import run_pretraining

    # The dashboard's Train view lists runs only when the driver tracks their state.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    started = time.perf_counter()
    start_ray(args.address, args.num_cpus, quiet=not args.verbose)
    print(f"bertray pretraining: run {cfg.run.name!r} -> {cfg.run.output}, model {_model(cfg, start, resuming)}, "
          f"objective {cfg.data.objective}, {cfg.train.max_steps} steps, {_workers(cfg.scaling)} worker(s)\n"
          f"{ray_logs_line(args.address)}", flush=True)
    try:
        result = run_pretraining(cfg, progress_bars=args.progress_bars and args.verbose,
                                 console=None if args.verbose else sys.stdout, start=start)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as exc:
        print(f"error: training failed after run.max_failures={cfg.run.max_failures} restarts: {exc}", file=sys.stderr)
        return 1
    m = result.metrics
    summary = {
        "steps": m.get("step"), "loss": m.get("loss"), "mlm_accuracy": m.get("mlm_accuracy"),
        "nsp_accuracy": m.get("nsp_accuracy"),
        **{key: value for key, value in m.items() if key.endswith(("_mlm_accuracy", "_nsp_accuracy"))
           and key.startswith(("eval_", "heldout_"))},
        **result.baselines, "sequences_per_s": m.get("sequences_per_s"),
        "checkpoint": result.checkpoint, "curves": _curves(cfg), "wall_s": round(time.perf_counter() - started, 1),
        "pipeline": result.counters,
    }
    print("\n== pretraining finished ==")
    for key, value in summary.items():
        if key != "pipeline":
            print(f"  {key:<20} {value:.4f}" if isinstance(value, float) else f"  {key:<20} {value}")
    for line in learning_lines(summary):
        print(f"  {line}")
    skipped = {k: v for k, v in result.counters.items() if v and k not in ("files", "lines", "bytes")}
    print("  pipeline            ", ", ".join(f"{k}={v:,}" for k, v in sorted(skipped.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _has_checkpoint(cfg) -> bool:
    from bertray.storage import absolute_url, join_url
    from bertray.train.pretrain import latest_run_state

    return latest_run_state(join_url(absolute_url(cfg.run.output), cfg.run.name)) is not None


def _model(cfg, start, resuming: bool) -> str:
    """The model as it is: the checkpoint it continues, or the preset it starts from at random."""
    if start is not None:
        return start.describe()
    if resuming and cfg.model.init_from:
        return f"continued from {cfg.model.init_from}, resumed from the run's own checkpoint"
    from bertray.train.config import DEFAULT_PRESET

    arch = cfg.model.bert_config(cfg.data.vocab_size, is_causal=False)
    return f"{cfg.model.preset or DEFAULT_PRESET} ({arch.num_hidden_layers} layers, {arch.hidden_size} wide, random init)"


# What "learned" means on held-out text: NSP this many points over always answering the more common
# label, MLM this many times always predicting the most frequent masked token.
NSP_MARGIN, MLM_RATIO = 0.05, 2.0


def learning_lines(summary: dict) -> list[str]:
    """The held-out accuracies against what a model that learned nothing scores, in words: for each
    evaluation set (files never trained on, documents held out of the training files)."""
    from bertray.train.curves import EVAL_SETS

    lines = []
    both = "heldout_mlm_baseline" in summary or "heldout_nsp_majority" in summary
    for prefix, (_, _, described) in EVAL_SETS.items():
        which = described if both else "held-out"
        nsp, majority = summary.get(f"{prefix}_nsp_accuracy"), summary.get(f"{prefix}_nsp_majority")
        if nsp is not None and majority is not None:
            verdict = "learned" if nsp >= majority + NSP_MARGIN else f"not learned (needs {majority + NSP_MARGIN:.1%})"
            lines.append(f"{which} NSP {nsp:.1%} (majority label {majority:.1%}): {verdict}")
        mlm, frequent = summary.get(f"{prefix}_mlm_accuracy"), summary.get(f"{prefix}_mlm_baseline")
        if mlm is not None and frequent:
            ratio = mlm / frequent
            verdict = "learned" if ratio >= MLM_RATIO else f"not learned (needs {MLM_RATIO:g}x)"
            lines.append(f"{which} MLM {mlm:.1%} (most frequent token {frequent:.1%}, {ratio:.1f}x): {verdict}")
    return lines


def _workers(scaling) -> str:
    return f"{scaling.min_workers}-{scaling.max_workers} (elastic)" if scaling.elastic else str(scaling.num_workers)


def print_data_position(run_url: str) -> int:
    """`--data-position`: the newest checkpoint's step and where its stream stands."""
    from bertray.data.position import DataPosition
    from bertray.errors import BertrayError
    from bertray.storage import absolute_url
    from bertray.train.pretrain import describe_position, latest_run_state

    try:
        state = latest_run_state(absolute_url(run_url))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if state is None:
        print(f"{run_url}: no checkpoint yet")
        return 0
    if state.data_position is None:
        print(f"{run_url}: step {state.step}; its checkpoint has no data position (written by an older bertray)")
        return 0
    try:
        position = DataPosition.from_json(state.data_position)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{run_url}: step {state.step}, {state.sequences_seen:,} sequences; {describe_position(position)}")
    return 0


def _curves(cfg) -> str:
    from bertray.storage import absolute_url, exists, join_url
    from bertray.train.curves import CURVES

    url = join_url(absolute_url(cfg.run.output), cfg.run.name, CURVES)
    return url if exists(url) else "none (matplotlib is missing: pip install matplotlib)"


if __name__ == "__main__":
    sys.exit(main())
