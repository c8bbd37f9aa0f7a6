"""One training step, shared by pretraining and fine-tuning, and free of Ray.

A step is: forward and backward over k micro-batches (gradients accumulate; under DDP the first
k - 1 skip the all-reduce with `no_sync`), loss scaling when the precision is fp16, one gradient
clip over all parameters, the optimizer and the schedule. The step never reads a value back from
the device: losses, accuracies, the gradient norm and the count of skipped (non-finite) steps
accumulate as device tensors in a `DeviceMeter`, which the loop reads once per log interval.
So on a GPU the host queues step n + 1's kernels while step n runs.

The one exception is fp16 with an optimizer that cannot skip a step on its own: `GradScaler`
reads the inf check back to decide (one sync per step). The fused AdamW on CUDA takes the
decision on the device; bf16 (A100, H100) needs no scaler at all.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch

from bertray.runtime.autocast import autocast, resolve_precision

# (model, inputs) -> (loss, {metric: (value, weight)}); values are averaged weighted by their weights.
LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Any]]]]


class DeviceMeter:
    """Weighted means and totals kept as device tensors; `read()` brings them all back in one copy."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | None, weight: torch.Tensor | float = 1.0) -> None:
        """A Python weight stays on the host (making a device tensor of it would be a copy per call)."""
        if value is None:
            return
        value = value.detach().float()
        if isinstance(weight, torch.Tensor):
            weight = weight.detach().float()
        if name in self.sums:
            self.sums[name] += value * weight
            self.weights[name] = self.weights[name] + weight
        else:
            self.sums[name] = value * weight
            self.weights[name] = weight

    def add_all(self, metrics: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | float]]) -> None:
        """A loss function's `{name: (value, weight)}`."""
        for name, (value, weight) in metrics.items():
            self.add(name, value, weight)

    def count(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.totals[name] = self.totals[name] + value if name in self.totals else value

    def read(self) -> dict[str, float]:
        """The interval's means (names without weight are left out) and totals; then empty."""
        names, totals = list(self.sums), list(self.totals)
        if not names and not totals:
            return {}
        device = next(iter({**self.sums, **self.totals}.values())).device
        weights = [w if isinstance(w, torch.Tensor) else torch.tensor(float(w), device=device)
                   for w in (self.weights[n] for n in names)]
        values = torch.stack([*(self.sums[n] for n in names), *weights,
                              *(self.totals[n] for n in totals)]).tolist()
        out = {n: values[i] / values[len(names) + i] for i, n in enumerate(names) if values[len(names) + i] > 0}
        out.update(zip(totals, values[2 * len(names):]))
        self.sums, self.weights, self.totals = {}, {}, {}
        return out


class TrainStep:
    """Micro-batches in, one optimizer step out; metrics into `self.meter`.

    `model` owns the parameters (clipping, the optimizer); `ddp_model`, its DDP wrapper when there
    is one, runs the forward pass, and `compile` wraps that in `torch.compile`. `clip_grad_norm`
    <= 0 turns clipping off; the norm is measured either way (it is logged, and a non-finite norm
    is how a skipped fp16 step is counted)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: LossFn, *,
                 device: torch.device, precision: str = "auto", clip_grad_norm: float = 1.0,
                 ddp_model: torch.nn.Module | None = None, compile: bool = False) -> None:
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn
        self.ddp_model = ddp_model
        self.forward_model = ddp_model or model
        if compile:
            self.forward_model = torch.compile(self.forward_model)
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.clip_grad_norm = clip_grad_norm
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.meter = DeviceMeter()
        self.steps = 0
        self._nonfinite: torch.Tensor | None = None   # steps with a non-finite loss (or unscaled norm), on the device
        self._poison = False

    def __call__(self, micro_batches: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None) -> None:
        """`weights`: each micro-batch's loss factor (default 1/k). A worker with a larger share of an
        unevenly split global batch weighs its losses up, so that DDP's mean over workers is the mean
        over the global batch's sequences."""
        k = len(micro_batches)
        weights = weights if weights is not None else [1.0 / k] * k
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for i, inputs in enumerate(micro_batches):
            last = i == k - 1
            no_sync = self.ddp_model.no_sync() if self.ddp_model is not None and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(self.device, self.precision):
                    loss, metrics = self.loss_fn(self.forward_model, inputs)
                if self._poison:
                    loss = loss * float("nan")
                self.scaler.scale(loss * weights[i]).backward()
            bad |= ~torch.isfinite(loss.detach())
            self.meter.add_all(metrics)
        self._poison = False
        self.scaler.unscale_(self.optimizer)          # a no-op unless fp16: clip the true gradients
        max_norm = self.clip_grad_norm if self.clip_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        finite = torch.isfinite(grad_norm)
        self.meter.add("grad_norm", torch.where(finite, grad_norm, 0.0), finite)
        self.meter.count("skipped_steps", ~finite)
        if not self.scaler.is_enabled():      # with fp16 loss scaling an overflowing norm is routine (skipped)
            bad |= ~finite
        self._nonfinite = bad.int() if self._nonfinite is None else self._nonfinite + bad.int()
        self.scaler.step(self.optimizer)              # skipped by the scaler when fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def nonfinite_steps(self) -> int:
        """Steps since the last call whose loss (or, without loss scaling, gradient norm) was not
        finite: one read from the device, made before each checkpoint."""
        count = int(self._nonfinite) if self._nonfinite is not None else 0
        self._nonfinite = None
        return count

    def inject_nan(self) -> None:
        """Fault injection for tests: the next step's loss is NaN."""
        self._poison = True

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def pretraining_loss(model: torch.nn.Module, inputs: Mapping[str, Any]
                     ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Any]]]:
    """`BertForPreTraining`'s loss; accuracies weighted by their real slots and labelled pairs."""
    out = model(**inputs)
    metrics = {"loss": (out.loss, 1.0), "mlm_loss": (out.mlm_loss, 1.0), "nsp_loss": (out.nsp_loss, 1.0)}
    if out.mlm_accuracy is not None:
        metrics["mlm_accuracy"] = (out.mlm_accuracy, inputs["masked_lm_weights"].float().sum())
    if out.nsp_accuracy is not None:
        metrics["nsp_accuracy"] = (out.nsp_accuracy, (inputs["next_sentence_labels"] >= 0).sum())
    return out.loss, {k: v for k, v in metrics.items() if v[0] is not None}


def task_loss(model: torch.nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Any]]]:
    """A fine-tuning head's loss (every head returns `.loss` when given its targets)."""
    loss = model(**inputs).loss
    return loss, {"loss": (loss, 1.0)}
