"""The precisions a config may name (`train.precision`, a sweep's `precision`): free of torch, so
that reading a config does not load it; `bertray.runtime.autocast` says what each means on a device."""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["auto", "fp32", "bf16", "fp16"]    # autocast dtype of training and fine-tuning
PRECISIONS = get_args(Precision)
