"""Optimizer-step time: the multi-tensor LAMB and BertAdam against the per-tensor loop they replaced.

`bertray.train.optim` computes the Adam moments, the updates and LAMB's trust ratios for all of a
parameter group's tensors at once (`torch._foreach_*` kernels). The previous implementation, kept
here as `PerTensorLamb` / `PerTensorBertAdam`, looped over the tensors in Python, about ten kernel
launches per tensor and about 200 tensors for BERT-base, so on a GPU the step can be bound
by launch latency rather than by memory bandwidth. `torch.optim.AdamW` (foreach, and fused where
the device has the kernel) runs alongside for scale: its work per element is what the two Adam
variants need.

The parameters are those of `BertForPreTraining` built from a preset (tied word embeddings counted
once), in the two groups of `parameter_groups` (no decay on biases and LayerNorm). Gradients are
random, drawn once with a fixed seed; only `optimizer.step()` is timed (`--warmup` untimed steps,
then `--steps` timed one by one, synchronising the GPU before each reading of the clock), in
interleaved rounds (every optimizer steps once per round, in alternating order), so that a slow
spell of a shared machine falls on all implementations alike. The median and mean ms per step are
reported, with the speedup old / new of the median. On a small CPU, `--max-seconds` cuts the rounds
of a large preset short (the number run is in the table and the JSON).

On CPUs a launch costs little, so the multi-tensor kernels win less there; and their temporaries
(one copy of the weights they work on) come from glibc malloc, which hands large freed blocks back
to the system, so every step would pay page faults for a model's worth of them. `bertray.train.optim`
therefore runs the kernels over runs of about 32 MB of tensors (`CHUNK_BYTES`); without that,
BERT-base measured 0.6-0.7x the per-tensor loop on a 2-core CPU.

Before timing, one step from the same weights and gradients checks the two implementations against
each other (printed, never fatal): BertAdam must agree on every tensor; LAMB on the decay group.
The no-decay group differs by design: the new LAMB follows NVIDIA apex's FusedLAMB and gives biases
and LayerNorm weights the plain Adam step, where the old loop applied the trust ratio to every
tensor; with `use_nvlamb=True` (ratio everywhere) the new LAMB must agree on every tensor too.

    python benchmarks/optimizer.py --presets mini,base --json benchmarks/results/optimizer.json
    python benchmarks/optimizer.py --device cuda --presets base,large --steps 50
    python benchmarks/optimizer.py --presets tiny --steps 5 --warmup 1          # a quick look

(after `pip install -e .`; from a bare checkout, `python -m benchmarks.optimizer` from the root).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from bertray.model.config import BertConfig
from bertray.model.heads import BertForPreTraining
from bertray.train.optim import Lamb, _DecoupledAdam, make_optimizer, parameter_groups

LR, WEIGHT_DECAY, BETAS, EPS = 1e-3, 0.01, (0.9, 0.999), 1e-6


# --------------------------------------------------------------------------------------------
# The previous implementation (bertray.train.optim before the multi-tensor rewrite)


def _per_tensor_adam_update(p: torch.Tensor, state: dict, group: dict, bias_correction: bool) -> torch.Tensor:
    """Fold this step's gradient into the moments; return m / (sqrt(v) + eps) + decoupled decay * p."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
    if bias_correction:
        update = (m / (1 - beta1 ** state["step"])).div_((v / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"]))
    else:
        update = m / v.sqrt().add_(group["eps"])
    if group["weight_decay"]:
        update.add_(p, alpha=group["weight_decay"])
    return update


class _PerTensorDecoupledAdam(_DecoupledAdam):
    """The previous per-tensor loop, kept for comparison: Adam moments + decoupled weight decay,
    one tensor at a time; subclasses decide how the update is applied (`apply_one`)."""

    def apply_one(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def update_group(self, params: list[torch.Tensor], group: dict) -> None:
        for p in params:
            self.apply_one(p, _per_tensor_adam_update(p, self.state[p], group, self.bias_correction), group)


class PerTensorLamb(_PerTensorDecoupledAdam):
    """The previous per-tensor LAMB loop, kept for comparison: Adam's direction (bias-corrected)
    scaled per tensor by ||w|| / ||update||, on every tensor (the no-decay group included)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def apply_one(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        w_norm, u_norm = p.norm(), update.norm()
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        p.sub_(update.mul_(trust * group["lr"]))


class PerTensorBertAdam(_PerTensorDecoupledAdam):
    """The previous per-tensor BertAdam loop, kept for comparison: Google BERT's
    AdamWeightDecayOptimizer (Adam without bias correction + decoupled decay)."""

    bias_correction = False

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def apply_one(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        p.sub_(update, alpha=group["lr"])


# --------------------------------------------------------------------------------------------
# The optimizers under test

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def _new(name: str) -> OptimizerFactory:
    return lambda model: make_optimizer(model, name, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS)


def _old(cls: type) -> OptimizerFactory:
    return lambda model: cls(parameter_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS)


def _adamw(**kind: bool) -> OptimizerFactory:
    return lambda model: torch.optim.AdamW(parameter_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS,
                                           **kind)


def _fused_adamw_available(device: torch.device) -> bool:
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


def optimizers(device: torch.device) -> list[tuple[str, str, OptimizerFactory]]:
    """(optimizer, impl, factory) of every implementation timed."""
    rows = [("lamb", "per-tensor", _old(PerTensorLamb)), ("lamb", "multi-tensor", _new("lamb")),
            ("bert_adam", "per-tensor", _old(PerTensorBertAdam)), ("bert_adam", "multi-tensor", _new("bert_adam")),
            ("adamw", "torch-foreach", _adamw(foreach=True))]
    if _fused_adamw_available(device):
        rows.append(("adamw", "torch-fused", _adamw(fused=True)))
    return rows


# --------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default="mini,base", help="comma-separated model sizes (BertConfig.preset)")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer before the timed ones")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="per preset: start no new timed round past this (at least 5 rounds; 0: no limit); "
                        "BERT-base on a small CPU needs seconds per round")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random gradients")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    args.max_seconds = args.max_seconds or None
    return args


def build(preset: str, vocab_size: int, device: torch.device, seed: int) -> BertForPreTraining:
    """The model with random gradients on every parameter (drawn on the CPU: the same on any device)."""
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.preset(preset, vocab_size=vocab_size)).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    for param in model.parameters():
        param.grad = (torch.randn(param.shape, generator=g) * 1e-2).to(device)
    return model


def _restore(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, values):
            param.copy_(value)


def agreement(model: BertForPreTraining, initial: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Max |new - old| after one step from the same weights and gradients, per parameter group."""
    params = list(model.parameters())
    decay_ids = {id(p) for p in parameter_groups(model, WEIGHT_DECAY)[0]["params"]}

    def one_step(factory: OptimizerFactory) -> list[torch.Tensor]:
        _restore(params, initial)
        factory(model).step()
        return [p.detach().clone() for p in params]

    def max_diff(a: list[torch.Tensor], b: list[torch.Tensor], decay: bool) -> float:
        diffs = [(x - y).abs().max().item() for p, x, y in zip(params, a, b) if (id(p) in decay_ids) == decay]
        return max(diffs, default=0.0)

    def nvlamb(m: nn.Module) -> torch.optim.Optimizer:
        return Lamb(parameter_groups(m, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS, use_nvlamb=True)

    pairs = {"lamb": (_new("lamb"), _old(PerTensorLamb)),
             "lamb use_nvlamb=True": (nvlamb, _old(PerTensorLamb)),
             "bert_adam": (_new("bert_adam"), _old(PerTensorBertAdam))}
    out = {}
    for name, (new, old) in pairs.items():
        a, b = one_step(new), one_step(old)
        out[name] = {"decay": max_diff(a, b, True), "no_decay": max_diff(a, b, False)}
    _restore(params, initial)
    return out


def time_steps(optimizers: list[torch.optim.Optimizer], steps: int, warmup: int, device: torch.device,
               max_seconds: float | None = None, min_steps: int = 5) -> list[list[float]]:
    """Milliseconds of each timed `step()` of each optimizer, in interleaved rounds: a round steps
    every optimizer once, in alternating order, so that a slow spell of the machine falls on all of
    them alike. They all update the same weights in turn; the cost of a step does not depend on the
    values. Past `max_seconds` (warmup included), no new round starts once `min_steps` are done."""
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for optimizer in optimizers:
            optimizer.step()
    times: list[list[float]] = [[] for _ in optimizers]
    for round_ in range(steps):
        if max_seconds is not None and round_ >= min_steps and time.perf_counter() - started > max_seconds:
            break
        order = list(range(len(optimizers)))
        for i in order if round_ % 2 == 0 else order[::-1]:
            sync()
            start = time.perf_counter()
            optimizers[i].step()
            sync()
            times[i].append(1e3 * (time.perf_counter() - start))
    return times


def run_preset(preset: str, args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    model = build(preset, args.vocab_size, device, args.seed)
    params = list(model.parameters())
    n_params, n_tensors = sum(p.numel() for p in params), len(params)
    initial = [p.detach().clone() for p in params]
    print(f"\n{preset}: {n_params / 1e6:.1f}M parameters in {n_tensors} tensors", flush=True)

    agree = agreement(model, initial)
    for name, diff in agree.items():
        expected = "no-decay group differs by design" if name == "lamb" else "both ~0 expected"
        print(f"  new vs old {name:<21} max |diff| after one step: decay group {diff['decay']:.2e}, "
              f"no-decay group {diff['no_decay']:.2e} ({expected})", flush=True)

    rows = optimizers(device)
    started = time.perf_counter()
    times = time_steps([factory(model) for _, _, factory in rows], args.steps, args.warmup, device,
                       args.max_seconds)
    steps = len(times[0])
    print(f"  timed {len(rows)} optimizers x {steps} steps (+{args.warmup} warmup) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    results = [dict(preset=preset, optimizer=name, impl=impl, ms_median=statistics.median(ms),
                    ms_mean=statistics.fmean(ms), params=n_params, tensors=n_tensors, steps=steps)
               for (name, impl, _), ms in zip(rows, times)]
    _restore(params, initial)
    return results, agree


def speedups(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per preset and optimizer: per-tensor median / multi-tensor median."""
    median = {(r["preset"], r["optimizer"], r["impl"]): r["ms_median"] for r in results}
    out: dict[str, dict[str, float]] = {}
    for (preset, name, impl), ms in median.items():
        if impl == "multi-tensor" and (preset, name, "per-tensor") in median:
            out.setdefault(preset, {})[name] = median[(preset, name, "per-tensor")] / ms
    return out


def print_table(results: list[dict], speedup: dict[str, dict[str, float]]) -> None:
    print(f"\n{'preset':<8} {'optimizer':<10} {'impl':<14} {'params':>8} {'tensors':>7} {'steps':>5} "
          f"{'ms median':>10} {'ms mean':>10} {'speedup':>8}")
    for r in results:
        ratio = speedup.get(r["preset"], {}).get(r["optimizer"]) if r["impl"] == "multi-tensor" else None
        print(f"{r['preset']:<8} {r['optimizer']:<10} {r['impl']:<14} {r['params'] / 1e6:7.1f}M {r['tensors']:>7} "
              f"{r['steps']:>5} {r['ms_median']:10.2f} {r['ms_mean']:10.2f} {f'{ratio:.2f}x' if ratio else '':>8}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device_name} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"steps={args.steps} warmup={args.warmup}")

    results, agree = [], {}
    for preset in args.presets:
        rows, agree[preset] = run_preset(preset, args, device)
        results += rows
    speedup = speedups(results)
    print_table(results, speedup)
    print("speedup = per-tensor median / multi-tensor median, same optimizer and preset")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "steps": args.steps, "warmup": args.warmup, "max_seconds": args.max_seconds,
            "vocab_size": args.vocab_size,
            "results": results, "speedup": speedup, "max_abs_diff_new_vs_old": agree}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
