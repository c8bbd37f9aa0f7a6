"""Training time lost per checkpoint: synchronous upload vs Ray Train's asynchronous upload.

A pretraining run of `--preset` (default base: 110 M parameters, a checkpoint of about 1.3 GB with
the Adam moments) writes checkpoints to an S3-compatible server on loopback (moto, started here;
nothing leaves the machine) with `train.checkpoint_upload` sync and then async. Every step is
logged (`train.log_every: 1`), so `history.json` has each step's wall time; the time a checkpoint
costs shows in the interval of the step after it. The stall after a checkpoint = mean of those
intervals minus the median interval of the steps without a checkpoint before them; "all steps" is
the sum of every step's interval, which also holds what a background upload costs the steps it
shares the machine with.

With `async`, the worker writes the checkpoint to local disk (the part that must stop training: the
weights must not change while they are written), reports it, and trains on while Ray's upload
thread copies it; `latest` moves once the copy is complete.

    python benchmarks/checkpoint_upload.py --json benchmarks/results/checkpoint_upload.json
    python benchmarks/checkpoint_upload.py --preset mini          # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("moto_server did not start (pip install -e '.[test]')")
            time.sleep(0.2)


def run(mode: str, args, bucket: str) -> dict:
    import fsspec

    from bertray.cli import with_repo_paths
    from bertray.config import load_config
    from bertray.train.config import PretrainConfig
    from bertray.train.curves import HISTORY
    from bertray.train.pretrain import run_pretraining

    overrides = {
        "model.preset": args.preset, "train.max_steps": args.steps, "train.log_every": 1, "train.eval_every": 0,
        "train.checkpoint_every": args.every, "train.keep_checkpoints": 2, "train.checkpoint_upload": mode,
        "train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10,
                          "batch_size": args.batch}],
        "data.eval_corpus": [], "data.tokenizer": "samples/corpus/wikitext-2/vocab-8192/tokenizer.json",
        "run.output": f"s3://{bucket}/runs", "run.name": mode, "run.tensorboard": False,
    }
    cfg = load_config(PretrainConfig, REPO / "flows" / "configs" / "embedded.yaml", overrides)
    cfg = dataclasses.replace(cfg, data=with_repo_paths(cfg.data))
    started = time.perf_counter()
    run_pretraining(cfg)
    wall = time.perf_counter() - started
    fs, path = fsspec.core.url_to_fs(f"s3://{bucket}/runs/{mode}/{HISTORY}")
    history = json.loads(fs.cat_file(path))
    # log_every 1: an interval is one step of `batch` sequences, timed from the previous step's log line
    steps = {h["step"]: args.batch / h["sequences_per_s"] for h in history if h.get("sequences_per_s")}
    after = [steps[s] for s in steps if s > 1 and (s - 1) % args.every == 0]
    plain = [steps[s] for s in steps if s > 2 and (s - 1) % args.every != 0]
    base = statistics.median(plain)
    return {"mode": mode, "wall_s": round(wall, 1), "step_s": round(base, 3),
            "steps_total_s": round(sum(steps.values()), 1),
            "after_checkpoint_s": [round(x, 3) for x in after],
            "lost_per_checkpoint_s": round(statistics.mean(after) - base, 2) if after else None}


def main(argv=None) -> int:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=3, help="steps between checkpoints")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    proc, endpoint = start_moto()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ[key] = value
    try:
        import ray
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        rows = [run(mode, args, "bench") for mode in ("sync", "async")]
        ray.shutdown()
    finally:
        proc.terminate()
    print(f"checkpoints of the {args.preset} preset to S3 on loopback, every {args.every} steps, batch {args.batch}")
    print(f"{'upload':>7} {'step s':>8} {'stall after a checkpoint s':>27} {'all steps s':>12} {'run s':>7}")
    for r in rows:
        print(f"{r['mode']:>7} {r['step_s']:>8.3f} {r['lost_per_checkpoint_s']:>27} {r['steps_total_s']:>12} "
              f"{r['wall_s']:>7}")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
