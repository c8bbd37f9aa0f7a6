"""The table and JSON at the end of `benchmarks/gpu_check.sh`, from the JSON its steps wrote.

MFU through Ray counts the same FLOPs per sequence as the standalone step (`model_step.py`'s
formula, at the run's model, sequence length and masked slots) times the run's sequences/s,
averaged over its logged intervals after the first (start-up, allocator and kernel warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import Case, model_flops_per_step  # noqa: E402

from bertray.model.config import BertConfig  # noqa: E402

TARGETS = {"mfu_standalone_128": 0.45, "mfu_ray_128": 0.40, "data_wait_share": 0.02}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def ray_run(run: Path, pretrain: dict, peak_tflops: float, cuda: bool) -> dict:
    """Sequences/s, data-wait and MFU of the pretraining run, from its history and checkpoint."""
    history = _load(run / "history.json") or []
    intervals = [h for h in history if "sequences_per_s" in h][1:] or [h for h in history if "sequences_per_s" in h]
    if not intervals:
        return {"error": f"no logged intervals in {run / 'history.json'}"}
    checkpoint = Path(pretrain.get("checkpoint") or "")
    config = BertConfig.from_json_file(checkpoint / "config.json")
    state = _load(checkpoint / "bertray_state.json")
    phase = state["config"]["train"]["phases"][0]
    per_sequence = model_flops_per_step(config, Case("ray", "run", 1, phase["max_seq_len"],
                                                     phase["max_predictions_per_seq"], bf16=True))
    rate = statistics.mean(h["sequences_per_s"] for h in intervals)
    return {"sequences_per_s": rate, "data_wait_share": statistics.mean(h.get("data_wait_share", 0.0) for h in intervals),
            "seq_len": phase["max_seq_len"], "batch_size": phase["batch_size"], "steps": pretrain.get("steps"),
            "intervals": len(intervals), "model_tflops_per_sequence": per_sequence / 1e12,
            "mfu": per_sequence * rate / (peak_tflops * 1e12) if cuda else None, "wall_s": pretrain.get("wall_s")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="gpu_check.sh's output folder")
    p.add_argument("--run", type=Path, required=True, help="the pretraining run's directory")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--dry-run", action="store_true", help="CPU dry run: no MFU, targets not judged")
    args = p.parse_args(argv)
    cuda = not args.dry_run
    step = _load(args.out / "step_check.json")
    models = {n: _load(args.out / f"model_step_{n}.json") for n in (128, 512)}
    finetune = _load(args.out / "finetune_step.json").get("speed", {})
    pretrain = ray_run(args.run, _load(args.out / "pretrain.json"), args.peak_tflops, cuda)

    rows = []
    for r in step.get("results", []):
        rows.append((f"step {r['case']} ({r['precision']})", r["sequences_per_s"], r["mfu"],
                     f"host syncs: {r['host_syncs']}, skipped {r['skipped_steps']:.0f}"))
    for n, result in models.items():
        for r in result.get("results", []):
            rows.append((f"model step {r['case']} {r['model']}", r["sequences_per_s"], r["mfu"],
                         f"bertray/transformers {result['ratio_bertray_over_hf'].get(r['case'], float('nan')):.2f}x"))
    if finetune:
        for name, rate in finetune["examples_per_s"].items():
            rows.append((f"fine-tune step SST-2 b{finetune['batch_size']} {name}", rate, None,
                         f"bertray/transformers {finetune['ratio_bertray_over_hf']:.2f}x"))
    optimizer = _load(args.out / "optimizer.json")
    for r in optimizer.get("results", []):
        speedup = optimizer.get("speedup", {}).get(r["preset"], {}).get(r["optimizer"]) if r["impl"] == "multi-tensor" else None
        rows.append((f"optimizer step {r['preset']} {r['optimizer']} {r['impl']}", None, None,
                     f"{r['ms_median']:.2f} ms" + (f", {speedup:.2f}x the per-tensor loop" if speedup else "")))
    if "sequences_per_s" in pretrain:
        rows.append((f"Ray Train pretraining s{pretrain['seq_len']} b{pretrain['batch_size']}",
                     pretrain["sequences_per_s"], pretrain["mfu"], f"data-wait {100 * pretrain['data_wait_share']:.2f}%"))

    standalone = next((r["mfu"] for r in step.get("results", []) if r["case"].startswith("s128")
                       and r["optimizer"] == "adamw" and r["precision"] != "fp16"), None)
    measured = {"mfu_standalone_128": standalone, "mfu_ray_128": pretrain.get("mfu"),
                "data_wait_share": pretrain.get("data_wait_share")}
    verdicts = {}
    for key, target in TARGETS.items():
        value = measured[key]
        if value is None or not cuda:
            verdicts[key] = "not judged (CPU dry run)" if not cuda else "not measured"
        elif key == "data_wait_share":
            verdicts[key] = "met" if value < target else "NOT met"
        else:
            verdicts[key] = "met" if value >= target else "NOT met"

    device = step.get("meta", {}).get("device", "?")
    print(f"\n== gpu_check on {device} (peak {args.peak_tflops:g} TFLOP/s dense bf16){' - DRY RUN' if not cuda else ''}")
    print(f"{'what':<52} {'seq/s':>10} {'MFU':>7}  note")
    for what, rate, mfu, note in rows:
        mfu_text = f"{100 * mfu:6.1f}%" if mfu is not None else "      -"
        rate_text = f"{rate:10.1f}" if rate is not None else "         -"
        print(f"{what:<52} {rate_text} {mfu_text}  {note}")
    for key, target in TARGETS.items():
        value = measured[key]
        shown = f"{100 * value:.2f}%" if value is not None else "-"
        print(f"target {key}: {shown} ({'<' if key == 'data_wait_share' else '>='} {100 * target:.0f}%): {verdicts[key]}")
    summary = {"device": device, "dry_run": not cuda, "peak_tflops": args.peak_tflops,
               "rows": [{"what": w, "sequences_per_s": r, "mfu": m, "note": n} for w, r, m, n in rows],
               "targets": {k: {"target": t, "measured": measured[k], "verdict": verdicts[k]} for k, t in TARGETS.items()},
               "pretraining": pretrain}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0 if rows and "error" not in pretrain else 1


if __name__ == "__main__":
    sys.exit(main())
