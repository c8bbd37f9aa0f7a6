"""Batches made ready on the host, so that the training step never waits for the device.

Whatever depends on a batch's contents - is there padding, where are the real tokens, which
prediction slots are real - has a data-dependent answer. Asked on a GPU tensor, each is a
host-device sync that stops the CPU from queueing the next kernels; asked of the host copy before
the transfer, it costs microseconds. So the loops hand the model its answers:

- `attention_mask` is dropped when every position is a real token: SDPA without a mask picks its
  fastest kernel (most pretraining batches at 128 are full or nearly so);
- `packing` (`TokenPacking`) when the batch is mostly padding, else False;
- `masked_lm_index`: the real prediction slots, so the MLM head gathers only those.

Copies to the device are `non_blocking`; they are asynchronous when the host tensors are pinned
(`pretraining_batch(pin=True)` on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from bertray.model.bert import TokenPacking


@dataclass
class HostBatch:
    inputs: dict[str, Any]       # model keyword arguments, on the host until `to(device)`
    sequences: int
    tokens: int                  # real (non-padding) tokens
    rows: dict[str, np.ndarray] = field(default_factory=dict)   # where its rows come from (data position)

    def to(self, device: torch.device) -> dict[str, Any]:
        return to_device(self.inputs, device)


def to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Model keyword arguments on `device`: tensors and packings copied `non_blocking`, the rest as is."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, TokenPacking)) else v
            for k, v in inputs.items()}


INDEX_COLUMNS = ("input_ids", "token_type_ids", "masked_lm_positions", "masked_lm_ids")


def attention_inputs(mask: torch.Tensor) -> tuple[dict[str, Any], int]:
    """`attention_mask` (only when some position is padding) and `packing` for a (..., S) host mask;
    masks of several choices per example (B, C, S) are packed as the (B * C, S) batch the encoder sees."""
    flat = mask.reshape(-1, mask.shape[-1])
    tokens = int(flat.sum())
    if tokens == flat.numel():
        return {"attention_mask": None, "packing": False}, tokens
    return {"attention_mask": mask, "packing": TokenPacking.of(flat) or False}, tokens


def pretraining_batch(columns: Mapping[str, np.ndarray | torch.Tensor], pin: bool = False) -> HostBatch:
    """Model inputs of `BertForPreTraining` from the pipeline's columns (kept in their integer
    dtypes: the model widens them on the device, and int32 halves the bytes copied). `pin`: page-
    locked copies, so that the copies to a GPU are asynchronous."""
    tensors = {k: torch.as_tensor(v) for k, v in columns.items()}
    if pin:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    for key in INDEX_COLUMNS:      # embedding lookups and gathers take int32 or int64, not the narrow ids
        if tensors[key].dtype not in (torch.int32, torch.int64):
            tensors[key] = tensors[key].to(torch.int32)
    attention, tokens = attention_inputs(tensors.pop("attention_mask"))
    weights = tensors["masked_lm_weights"]
    real_slots = (weights.reshape(-1) > 0).nonzero().squeeze(1)
    return HostBatch({**tensors, **attention, "masked_lm_index": real_slots},
                     sequences=len(tensors["input_ids"]), tokens=tokens)
