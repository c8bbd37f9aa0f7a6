"""Draw pretraining runs' learning curves as one PNG: loss, MLM and NSP accuracy (train, held-out and
the baselines held-out accuracy must beat), learning rate, throughput and data-wait share.

    python flows/plot_run.py runs/embedded                        # -> runs/embedded/curves.png
    python flows/plot_run.py runs/nsp runs/mlm-only --output ablation.png
    python flows/plot_run.py s3://bucket/runs/bert-base           # object storage, like --output of pretrain

Each RUN_DIR is a flows/pretrain.py run directory (`<output>/<name>`); its history.json holds every
logged interval, eval_baselines.json (when present) the baselines. Several runs share the axes, one
colour per run.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (local path or fsspec URL)")
    parser.add_argument("--output", help="PNG to write (default: RUN_DIR/curves.png for one run, "
                                         "./curves.png for several)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bertray.storage import join_url
    from bertray.train.curves import CURVES, load_run, plot_runs

    output = args.output or (join_url(args.run_dirs[0], CURVES) if len(args.run_dirs) == 1 else CURVES)
    try:
        plot_runs([load_run(url) for url in args.run_dirs], output)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
