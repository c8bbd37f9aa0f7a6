"""Autocast: what a precision (`bertray.runtime.precision`) means on a device, for the forward pass
of training, fine-tuning and prediction alike."""

from __future__ import annotations

import contextlib

import torch

from bertray.runtime.precision import PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it, fp16 on older GPUs (V100, T4), fp32 on CPUs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (and the loss); fp32 runs as is."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[resolved])
