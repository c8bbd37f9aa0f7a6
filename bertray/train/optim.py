"""Optimizers and the learning-rate schedule of the paper.

- `adamw`: `torch.optim.AdamW` (bias-corrected), decoupled weight decay.
- `bert_adam`: Google's `AdamWeightDecayOptimizer`: the same update without bias correction,
  for exact reproductions of the reference.
- `lamb`: You et al. 2019, layer-wise trust ratio, for large-batch pretraining (batch 32k+), with
  NVIDIA's choices (apex `FusedLAMB`): no trust ratio for the tensors that do not decay.
Weight decay never applies to LayerNorm parameters and biases (paper, reference implementation).
Schedule: linear warmup to the peak rate, then linear decay to 0 at the last step.
"""

from __future__ import annotations

import math
from typing import Iterable, get_args

import torch
from torch import nn

from bertray.train.config import OptimizerName

OPTIMIZERS = get_args(OptimizerName)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and embeddings decay; biases and LayerNorm weights do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adam_updates(params: list[torch.Tensor], state: dict, group: dict, bias_correction: bool) -> list[torch.Tensor]:
    """Fold this step's gradients into the moments of all of a group's tensors at once (multi-tensor
    `torch._foreach_*` kernels, not one launch per tensor and operation); return the updates
    m / (sqrt(v) + eps) + decoupled decay * p."""
    beta1, beta2 = group["betas"]
    for p in params:
        s = state[p]
        if not s:
            s["step"] = 0
            s["exp_avg"] = torch.zeros_like(p)
            s["exp_avg_sq"] = torch.zeros_like(p)
        s["step"] += 1
    grads = [p.grad for p in params]
    m = [state[p]["exp_avg"] for p in params]
    v = [state[p]["exp_avg_sq"] for p in params]
    torch._foreach_lerp_(m, grads, 1 - beta1)                       # m = b1 m + (1 - b1) g
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    step = state[params[0]]["step"]          # a group's tensors are stepped together (a Python int: no sync)
    bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if bias_correction else (1.0, 1.0)
    # (m / bc1) / (sqrt(v / bc2) + eps) = (m * sqrt(bc2) / bc1) / (sqrt(v) + eps * sqrt(bc2)), built in
    # one temporary per tensor (a second full copy of the weights costs allocation time, not only memory).
    updates = torch._foreach_sqrt(v)
    torch._foreach_add_(updates, group["eps"] * math.sqrt(bc2))
    torch._foreach_reciprocal_(updates)
    torch._foreach_mul_(updates, m)
    if bias_correction:
        torch._foreach_mul_(updates, math.sqrt(bc2) / bc1)
    if group["weight_decay"]:
        torch._foreach_add_(updates, params, alpha=group["weight_decay"])
    return updates


CHUNK_BYTES = 32 << 20


def _chunks(params: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Tensors in runs of about `CHUNK_BYTES`: a handful of multi-tensor launches per step on a GPU,
    and temporaries small enough that the CPU allocator reuses them instead of mapping fresh pages
    for a whole model's worth every step (measured 1.6x slower on BERT-base without chunks)."""
    chunk, size = [], 0
    for p in params:
        chunk.append(p)
        size += p.numel() * p.element_size()
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _DecoupledAdam(torch.optim.Optimizer):
    """Adam moments + decoupled weight decay; subclasses decide how the updates are applied."""

    bias_correction = True

    def apply(self, params: list[torch.Tensor], updates: list[torch.Tensor], group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.update_group([p for p in group["params"] if p.grad is not None], group)
        return loss

    def update_group(self, params: list[torch.Tensor], group: dict) -> None:
        """One group's step: the multi-tensor updates, a run of tensors at a time."""
        for run in _chunks(params):
            self.apply(run, _adam_updates(run, self.state, group, self.bias_correction), group)


class Lamb(_DecoupledAdam):
    """LAMB (You et al. 2019) as NVIDIA pretrains BERT with it (apex `FusedLAMB`, its defaults):
    Adam's bias-corrected direction plus decoupled decay, scaled per tensor by the trust ratio
    ||w|| / ||update||, which applies only to tensors that decay. Biases and LayerNorm weights (the
    no-decay group) take the plain Adam step: their norms say nothing about a layer's scale, and a
    trust ratio on a bias that starts at zero would freeze it. `use_nvlamb=True` applies the ratio
    to every tensor (apex's option of that name). Gradient clipping stays outside (the training step
    clips the global norm first, as apex's `max_grad_norm` does inside)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, use_nvlamb: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, use_nvlamb=use_nvlamb))

    def apply(self, params: list[torch.Tensor], updates: list[torch.Tensor], group: dict) -> None:
        if not (group["weight_decay"] or group.get("use_nvlamb", False)):
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            return
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(updates))
        # Tensors, never Python floats: no host-device sync per parameter on a GPU.
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(updates, list((trust * -group["lr"]).unbind()))
        torch._foreach_add_(params, updates)


class BertAdam(_DecoupledAdam):
    """Google BERT's AdamWeightDecayOptimizer: Adam without bias correction + decoupled decay."""

    bias_correction = False

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def apply(self, params: list[torch.Tensor], updates: list[torch.Tensor], group: dict) -> None:
        torch._foreach_add_(params, updates, alpha=-group["lr"])


def make_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float, fused: bool | None = None) -> torch.optim.Optimizer:
    """`fused` (AdamW only; None: where torch has the kernel, CUDA and CPU): one kernel per step,
    and fp16 loss scaling decided on the device instead of by a host sync (the other optimizers
    never read values back). On a 2-core CPU it measured 6x faster than the multi-tensor AdamW on
    BERT-base (62 vs 390 ms per step; `benchmarks/optimizer.py`)."""
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        if fused is None:
            fused = all(p.device.type in ("cuda", "cpu") for group in groups for p in group["params"]) or None
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if name == "bert_adam":
        return BertAdam(groups, lr=lr, betas=betas, eps=eps)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def warmup_linear_decay(optimizer: torch.optim.Optimizer, *, warmup_steps: int,
                        total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier 0 -> 1 over `warmup_steps`, then 1 -> 0 at `total_steps` (paper section A.2)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
