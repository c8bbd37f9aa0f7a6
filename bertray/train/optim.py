"""Optimizers and the learning-rate schedule of the paper.

- `adamw`: `torch.optim.AdamW` (bias-corrected), decoupled weight decay.
- `bert_adam`: Google's `AdamWeightDecayOptimizer`: the same update without bias correction,
  for exact reproductions of the reference.
- `lamb`: You et al. 2019, layer-wise trust ratio, for large-batch pretraining (batch 32k+).
Weight decay never applies to LayerNorm parameters and biases (paper, reference implementation).
Schedule: linear warmup to the peak rate, then linear decay to 0 at the last step.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "bert_adam", "lamb")


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


def _adam_update(p: torch.Tensor, state: dict, group: dict, bias_correction: bool) -> torch.Tensor:
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


class _DecoupledAdam(torch.optim.Optimizer):
    """Adam moments + decoupled weight decay; subclasses decide how the update is applied."""

    bias_correction = True

    def apply(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.apply(p, _adam_update(p, self.state[p], group, self.bias_correction), group)
        return loss


class Lamb(_DecoupledAdam):
    """LAMB: Adam's direction (bias-corrected) scaled per tensor by ||w|| / ||update|| (trust ratio)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def apply(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        w_norm, u_norm = p.norm(), update.norm()
        # A tensor, never a Python float: no host-device sync per parameter on a GPU.
        trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        p.sub_(update.mul_(trust * group["lr"]))


class BertAdam(_DecoupledAdam):
    """Google BERT's AdamWeightDecayOptimizer: Adam without bias correction + decoupled decay."""

    bias_correction = False

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def apply(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        p.sub_(update, alpha=group["lr"])


def make_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
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
