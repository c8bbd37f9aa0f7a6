"""The data stream on a worker: its shard cut into a step's micro-batches, where a (re)started
stream begins, what each worker trained on (its data position, merged at every checkpoint) and
whether every worker still has a step. Runs inside the Ray Train workers (`bertray.train.worker_loop`);
`stream_start` also runs on the driver, which plans the read from the same answer. Free of Ray
itself: the shard is whatever `ray.train.get_dataset_shard` returned.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import torch

from bertray.data.position import POSITION_COLUMNS, DataPosition, StreamLayout, merge_all
from bertray.data.stream_spec import INSTANCE_COLUMNS, PROVENANCE_COLUMNS
from bertray.runtime.batches import HostBatch, pretraining_batch
from bertray.train.checkpoints import RunState
from bertray.train.config import PretrainConfig
from bertray.train.rows import concat_rows, mixed_batches
from bertray.train.stall import BatchWatchdog, cluster_diagnosis


# How a worker pulls its shard: at least this many rows per read from the stream, and this many
# reads prefetched in the background (enough to hide the object-store fetches behind a step).
ROWS_PER_READ = 256
PREFETCH_BLOCKS = 4


def step_batches(shard: Any, per_worker: int, micro: int, data: Any, seed: int, device: torch.device,
                 resume: DataPosition | None) -> Iterator[list[HostBatch]]:
    """A step's micro-batches at a time, mixed across NSP buffers (`bertray.train.rows`): each buffer
    holds a few documents' instances, so unmixed, consecutive steps would train on the same few
    sources. They stay on the host (pinned for a GPU) until `HostBatch.to`: see `bertray.runtime.batches`."""
    blocks = shard.iter_batches(batch_size=max(per_worker, ROWS_PER_READ), batch_format="numpy",
                                prefetch_batches=PREFETCH_BLOCKS)
    for batch in mixed_batches(blocks, per_worker, window=data.shuffle_buffer, seed=seed, resume=resume,
                               windows_per_unit=data.preserve_order):
        provenance = {k: batch.rows[k] for k in PROVENANCE_COLUMNS if k in batch.rows}
        micro_batches = []
        for start in range(0, per_worker, micro):
            part = slice(start, start + micro)
            host = pretraining_batch({k: batch.rows[k][part] for k in INSTANCE_COLUMNS}, pin=device.type == "cuda")
            host.rows = {**{k: batch.rows[k][part] for k in POSITION_COLUMNS},
                         **{k: v[part] for k, v in provenance.items()}}
            micro_batches.append(host)
        markers = batch.positions["buffer_items"] == 0     # markers ride with the step's first micro-batch
        if markers.any():
            first = micro_batches[0].rows
            for key in POSITION_COLUMNS:
                first[key] = np.concatenate([batch.positions[key][markers], first[key]])
            for key in provenance:
                first[key] = np.concatenate([np.full(int(markers.sum()), -1, first[key].dtype), first[key]])
        yield micro_batches


def worker_batch(global_batch: int, world: int, rank: int) -> int:
    """This worker's share of the global batch: equal shares, the remainder to the first ranks (an
    elastic group of any size keeps the configured global batch)."""
    return global_batch // world + (1 if rank < global_batch % world else 0)


def watched(batches: Iterator[list[HostBatch]], tcfg) -> BatchWatchdog[list[HostBatch]]:
    """The batches through the stall watchdog (`bertray.train.stall`), which also moves the host-side
    preparation off the training thread."""
    return BatchWatchdog(batches, warn_after_s=tcfg.batch_wait_warn_s, fail_after_s=tcfg.batch_wait_fail_s,
                         describe=cluster_diagnosis)


class StepAgreement:
    """Whether every worker has a full step of batches. Streams split evenly by rows, but markers and
    the rows a resume drops are not even across workers, so one worker can run out a batch before
    the others; they must stop at the same step, or DDP and the checkpoint barrier wait forever. A
    one-integer all-reduce per step on a CPU (gloo) group: no device synchronisation."""

    def __init__(self, world: int) -> None:
        self.group = None
        if world > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def all_ready(self, ready: bool) -> bool:
        if self.group is None:
            return ready
        import torch.distributed as dist

        flag = torch.tensor([int(ready)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


def stream_start(cfg: PretrainConfig, corpus_files: int, saved: RunState | None) -> tuple[StreamLayout, DataPosition | None]:
    """Where a (re)started stream begins, from the run state it resumes: the same generation and the
    saved position when there is one; a fresh run starts generation 0. A checkpoint without a
    position (written before positions existed), or one of another corpus layout, cannot say what
    was read: its stream is a new generation, numbered after its step so that every such restart
    draws anew. The driver (planning the read) and the workers (filtering rows) both call this."""
    layout = StreamLayout(files=corpus_files, files_per_unit=cfg.data.files_per_read_task, seed=cfg.train.seed)
    if saved is None:
        return layout, None
    if saved.data_position is not None:
        position = DataPosition.from_json(saved.data_position)
        if position.layout.same_units(layout):
            return position.layout, position
    return dataclasses.replace(layout, generation=saved.step + 1), None


class StreamTracker:
    """A worker's data position, kept up to date with every trained batch, merged across workers at
    each checkpoint; with `record`, the provenance of every trained row since the last checkpoint."""

    def __init__(self, position: DataPosition, record: bool) -> None:
        self.position = position
        self.record = record
        self.rows: list[dict[str, np.ndarray]] = []

    def trained(self, batches: list[HostBatch], step: int) -> None:
        for batch in batches:
            self.position.mark(batch.rows)
            if self.record:
                real = batch.rows["buffer_items"] > 0
                rows = {k: v[real] for k, v in batch.rows.items() if len(v) == len(real)}
                rows["step"] = np.full(int(real.sum()), step, dtype=np.int64)
                rows["digest"] = instance_digests(batch.inputs)
                self.rows.append(rows)

    def gather(self, world: int) -> dict[str, np.ndarray] | None:
        """Merge every worker's position into each (a collective: all ranks call it at the same step);
        the recorded rows of all workers, on rank 0."""
        records = concat_rows(self.rows) if self.record else None
        self.rows = []
        if world == 1:
            return records
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (self.position.to_json(), records))
        merged = merge_all(DataPosition.from_json(p) for p, _ in gathered)
        self.position = merged
        return concat_rows([r for _, r in gathered if r is not None]) if self.record else None


def instance_digests(inputs: dict[str, Any]) -> np.ndarray:
    """A 64-bit digest per sequence of what the model is given (ids, segments, masks, labels): two runs
    trained on the same batches, bit for bit, iff the digests match in order."""
    import hashlib

    columns = [inputs[k].numpy() for k in ("input_ids", "token_type_ids", "masked_lm_positions", "masked_lm_ids",
                                             "masked_lm_weights", "next_sentence_labels")]
    return np.array([int.from_bytes(hashlib.blake2b(b"".join(c[i].tobytes() for c in columns), digest_size=8)
                                    .digest(), "little") >> 1 for i in range(len(columns[0]))], dtype=np.int64)
