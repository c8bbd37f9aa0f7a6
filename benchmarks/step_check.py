"""bertray's shared training step (`bertray.train.step.TrainStep`) on one device: speed, MFU, and
on CUDA a proof that the step never waits for the GPU.

Pretraining batches (full length, `P` masked slots) are prepared on the host exactly as the Ray
worker prepares them (`bertray.runtime.batches.pretraining_batch`, pinned on CUDA) and copied inside
the timed loop. On CUDA the timed steps run under `torch.cuda.set_sync_debug_mode("error")`: any
host-device sync in a step (an `.item()`, a `nonzero`, a mask decided on the device) raises, and
the case is reported with `host_syncs: "found"` and the error. MFU uses the FLOP count written out
in `benchmarks/model_step.py` (MLM head at the P slots, backward = 2x forward).

    python benchmarks/step_check.py --device cuda               # BERT-base: 128 and 512, bf16, fp16, LAMB
    python benchmarks/step_check.py --device cpu --preset tiny  # the same code path on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import Case, make_batch, model_flops_per_step  # noqa: E402

from bertray.model.config import BertConfig  # noqa: E402
from bertray.model.heads import BertForPreTraining  # noqa: E402
from bertray.runtime.batches import pretraining_batch  # noqa: E402
from bertray.train.optim import make_optimizer, warmup_linear_decay  # noqa: E402
from bertray.train.step import TrainStep, pretraining_loss  # noqa: E402

COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
           "masked_lm_weights", "next_sentence_labels")


@dataclass
class StepCase:
    name: str
    seq_len: int
    masked: int
    batch_size: int
    precision: str
    optimizer: str


@dataclass
class StepResult:
    case: str
    precision: str
    optimizer: str
    steps_per_s: float
    sequences_per_s: float
    model_tflops_per_step: float
    mfu: float | None
    host_syncs: str            # "none" (checked), "found" (with the error), "not checked" (CPU)
    skipped_steps: float
    error: str | None = None


def cases(batch_128: int, batch_512: int) -> list[StepCase]:
    return [StepCase(f"s128 b{batch_128} auto adamw", 128, 20, batch_128, "auto", "adamw"),
            StepCase(f"s512 b{batch_512} auto adamw", 512, 80, batch_512, "auto", "adamw"),
            StepCase(f"s128 b{batch_128} fp16 adamw", 128, 20, batch_128, "fp16", "adamw"),
            StepCase(f"s128 b{batch_128} auto lamb", 128, 20, batch_128, "auto", "lamb")]


def run(case: StepCase, args: argparse.Namespace, device: torch.device) -> StepResult:
    config = BertConfig.preset(args.preset, vocab_size=args.vocab_size, max_position_embeddings=512)
    torch.manual_seed(0)
    model = BertForPreTraining(config).to(device)
    optimizer = make_optimizer(model, case.optimizer, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
    step = TrainStep(model, optimizer, warmup_linear_decay(optimizer, warmup_steps=10, total_steps=10_000),
                     pretraining_loss, device=device, precision=case.precision, clip_grad_norm=1.0)
    shape = Case(case.name, args.preset, case.batch_size, case.seq_len, case.masked, bf16=True)
    host = []
    for seed in range(2):
        batch = pretraining_batch({k: v for k, v in make_batch(config, shape, torch.device("cpu"), seed).items()
                                   if k in COLUMNS})
        if device.type == "cuda":
            batch.inputs = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
        host.append(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        step([host[i % 2].to(device)])
    step.meter.read()
    sync()
    checked, error = "not checked", None
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        checked = "none"
    rates = []
    try:
        for _ in range(args.rounds):
            start = time.perf_counter()
            for i in range(args.steps):
                step([host[i % 2].to(device)])
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            sync()
            rates.append(args.steps / (time.perf_counter() - start))
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("error")
    except RuntimeError as exc:
        checked, error = "found", f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    if not rates:      # measure anyway, without the check
        start = time.perf_counter()
        for i in range(args.steps):
            step([host[i % 2].to(device)])
        sync()
        rates.append(args.steps / (time.perf_counter() - start))
    metrics = step.meter.read()
    rate = statistics.median(rates)
    flops = model_flops_per_step(config, shape)
    mfu = flops * rate / (args.peak_tflops * 1e12) if device.type == "cuda" else None
    return StepResult(case.name, step.precision, case.optimizer, rate, rate * case.batch_size, flops / 1e12, mfu,
                      checked, metrics.get("skipped_steps", 0.0), error)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--batch-128", type=int, default=None, help="batch at sequence 128 (default 128; CPU 8)")
    p.add_argument("--batch-512", type=int, default=None, help="batch at sequence 512 (default 32; CPU 2)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from report import write_json      # beside this script

    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cpu = device.type == "cpu"
    if cpu:
        args.rounds = min(args.rounds, 1)
    results = []
    for case in cases(args.batch_128 or (8 if cpu else 128), args.batch_512 or (2 if cpu else 32)):
        results.append(run(case, args, device))
        r = results[-1]
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "    -"
        print(f"{r.case:<26} {r.precision:<5} {r.steps_per_s:8.2f} steps/s {r.sequences_per_s:9.1f} seq/s "
              f"MFU {mfu}  host syncs: {r.host_syncs}  skipped {r.skipped_steps:.0f}"
              + (f"  ({r.error})" if r.error else ""), flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
                "torch": torch.__version__, "peak_tflops": args.peak_tflops, "steps": args.steps, "rounds": args.rounds}
        write_json(args.json, {"meta": meta, "results": [asdict(r) for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
