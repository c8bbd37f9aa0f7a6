"""The shared training step, without Ray: fp16 loss scaling, skipped steps, no host syncs,
gradient accumulation (plain and under DDP) and torch.compile, all on CPU."""

import contextlib
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from bertray.model.config import BertConfig
from bertray.model.heads import BertForPreTraining, BertForSequenceClassification
from bertray.tasks.registry import TASKS
from bertray.runtime.batches import pretraining_batch
from bertray.train.optim import make_optimizer, warmup_linear_decay
from bertray.train.step import DeviceMeter, TrainStep, pretraining_loss, task_loss
from bertray.tune.trainer import make_batch

CPU = torch.device("cpu")
VOCAB, SEQ, SLOTS = 96, 24, 4


def tiny(dropout: float = 0.0) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


def pretraining_columns(seed: int, batch: int = 8, padded: bool = True) -> dict[str, np.ndarray]:
    """Pipeline-shaped columns (narrow integer dtypes, as the stream delivers them)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SEQ // 2, SEQ + 1, size=batch) if padded else np.full(batch, SEQ)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int8)
    ids = (rng.integers(5, VOCAB, size=(batch, SEQ)) * mask).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(np.arange(1, n - 1), SLOTS, replace=False)) for n in lengths])
    weights = np.ones((batch, SLOTS), np.float32)
    weights[::3, -1] = 0.0                                   # some padding slots
    return {"input_ids": ids, "token_type_ids": (np.arange(SEQ)[None, :] >= lengths[:, None] // 2).astype(np.int8) * mask,
            "attention_mask": mask, "masked_lm_positions": positions.astype(np.int32),
            "masked_lm_ids": rng.integers(5, VOCAB, size=(batch, SLOTS)).astype(np.int32),
            "masked_lm_weights": weights, "next_sentence_labels": rng.integers(0, 2, size=batch).astype(np.int8)}


def pretraining_step(optimizer: str = "adamw", precision: str = "fp32", **kw) -> TrainStep:
    torch.manual_seed(0)
    model = BertForPreTraining(tiny())
    opt = make_optimizer(model, optimizer, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
    return TrainStep(model, opt, warmup_linear_decay(opt, warmup_steps=2, total_steps=100), pretraining_loss,
                     device=CPU, precision=precision, **kw)


# --------------------------------------------------------------------------------------------
# fp16 loss scaling


class TinyGradients(nn.Module):
    """A loss whose gradients (1e-8 per output) are below fp16's smallest subnormal (6e-8)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        return self.linear(x).float().sum() * 1e-8 * scale


def tiny_gradient_step(scaled: bool) -> tuple[TrainStep, nn.Module]:
    torch.manual_seed(0)
    model = TinyGradients()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    step = TrainStep(model, opt, warmup_linear_decay(opt, warmup_steps=0, total_steps=100),
                     lambda m, inputs: (m(**inputs), {}), device=CPU, precision="fp16", clip_grad_norm=0.0)
    if not scaled:
        step.scaler = torch.amp.GradScaler("cpu", enabled=False)
    return step, model


def test_fp16_with_loss_scaling_trains_where_unscaled_gradients_underflow():
    x = torch.randn(8, 16)
    moved = {}
    for scaled in (True, False):
        step, model = tiny_gradient_step(scaled)
        before = model.linear.weight.detach().clone()
        for _ in range(3):
            step([{"x": x}])
        moved[scaled] = (model.linear.weight.detach() - before).abs().max().item()
    assert step.precision == "fp16"
    assert moved[False] == 0.0                       # every fp16 gradient was 0: nothing learned
    assert moved[True] > 1e-3                        # the scaler kept them: Adam moved the weights


def test_an_inf_gradient_skips_the_step_and_lowers_the_scale():
    step, model = tiny_gradient_step(scaled=True)
    x = torch.randn(8, 16)
    step([{"x": x}])
    scale, weights, lr_steps = step.scaler.get_scale(), model.linear.weight.detach().clone(), step.scheduler.last_epoch
    step([{"x": x, "scale": torch.tensor(float("inf"))}])
    assert torch.equal(model.linear.weight.detach(), weights)          # the update was skipped
    assert step.scaler.get_scale() == scale / 2                        # and the scale backed off
    assert step.scheduler.last_epoch == lr_steps + 1                   # the schedule moves on regardless
    step([{"x": x}])
    assert not torch.equal(model.linear.weight.detach(), weights)      # and training goes on
    assert step.meter.read()["skipped_steps"] == 1.0


def test_the_loss_scale_is_saved_and_restored():
    step, _ = tiny_gradient_step(scaled=True)
    step([{"x": torch.randn(8, 16), "scale": torch.tensor(float("inf"))}])
    again, _ = tiny_gradient_step(scaled=True)
    again.load_state_dict(step.state_dict())
    assert again.scaler.get_scale() == step.scaler.get_scale() == 65536.0 / 2


# --------------------------------------------------------------------------------------------
# No host syncs


class HostSyncs(TorchDispatchMode):
    """Counts what would make the host wait for a GPU: reading a value back (`item`, `bool`, `int`,
    `float`, `tolist`: `_local_scalar_dense` underneath) and ops whose output shape depends on
    the data (`nonzero`, boolean-mask indexing, `masked_select`)."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
               "aten::equal", "aten::unique", "aten::_unique2"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.SYNCING:
            self.seen.append(name)
        elif name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (args[1] if len(args) > 1 else ()) if i is not None):
            self.seen.append("aten::index (boolean mask)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_syncs(monkeypatch):
    """The dispatch mode plus the Tensor methods that read back without an op (`tolist`, `numpy`)."""
    mode = HostSyncs()
    for method in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, method)

        def spy(self, *a, _original=original, _name=method, **k):
            mode.seen.append(f"Tensor.{_name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, spy)
    with mode:
        yield mode
    monkeypatch.undo()


@pytest.mark.parametrize("optimizer,precision", [("adamw", "fp32"), ("lamb", "fp32"), ("bert_adam", "bf16")])
def test_pretraining_steps_make_no_host_sync_between_log_intervals(monkeypatch, optimizer, precision):
    step = pretraining_step(optimizer, precision)
    batches = [pretraining_batch(pretraining_columns(seed)) for seed in range(4)]
    step([batches[0].to(CPU)])                                  # first step: lazy state, allocations
    step.meter.read()
    with counting_syncs(monkeypatch) as syncs:
        for batch in batches[1:]:
            step([batch.to(CPU), batch.to(CPU)])                # with accumulation
    assert syncs.seen == [], syncs.seen
    with counting_syncs(monkeypatch) as syncs:
        metrics = step.meter.read()                             # the log interval: one read-back
    assert syncs.seen, "the counter must see the one read at the log interval"
    assert set(metrics) >= {"loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "grad_norm", "skipped_steps"}


def test_the_counter_sees_what_the_model_does_without_host_prepared_batches(monkeypatch):
    """Without `masked_lm_index` and `packing`, the model finds them itself: that is a sync."""
    step = pretraining_step()
    inputs = {k: torch.as_tensor(v).long() if v.dtype != np.float32 else torch.as_tensor(v)
              for k, v in pretraining_columns(0).items()}
    with counting_syncs(monkeypatch) as syncs:
        step([inputs])
    assert "aten::nonzero" in syncs.seen


def test_finetuning_steps_make_no_host_sync(monkeypatch, shared_data, minilm_dir):
    from bertray import wordpiece
    from bertray.tune.trainer import load_split

    spec = TASKS["sst2"]
    _, features = load_split(spec, str(shared_data), "train", wordpiece.load(minilm_dir), 64, limit=64,
                             need_examples=False)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny().replace(vocab_size=30522, id2label={0: "0", 1: "1"}))
    opt = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
    step = TrainStep(model, opt, warmup_linear_decay(opt, warmup_steps=1, total_steps=10), task_loss, device=CPU)
    batches = [make_batch(spec, features, np.arange(i, i + 16), CPU) for i in range(0, 64, 16)]
    assert any(b.get("packing") not in (None, False) for b in batches)      # SST-2 batches are mostly padding
    step([batches[0]])
    with counting_syncs(monkeypatch) as syncs:
        for batch in batches[1:]:
            step([batch])
    assert syncs.seen == [], syncs.seen


# --------------------------------------------------------------------------------------------
# Accumulation


def classification_step(ddp: bool) -> tuple[TrainStep, nn.Module]:
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny().replace(id2label={0: "a", 1: "b", 2: "c"}))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)           # the update is minus the gradient
    ddp_model = DistributedDataParallel(model) if ddp else None
    return TrainStep(model, opt, warmup_linear_decay(opt, warmup_steps=0, total_steps=10), task_loss,
                     device=CPU, clip_grad_norm=0.0, ddp_model=ddp_model), model


@pytest.fixture
def gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _accumulation_matches_one_large_batch(ddp: bool, monkeypatch=None) -> int:
    rng = np.random.default_rng(0)
    k, micro = 4, 6
    ids = torch.as_tensor(rng.integers(5, VOCAB, size=(k * micro, SEQ)))
    labels = torch.as_tensor(rng.integers(0, 3, size=k * micro))
    one, model_one = classification_step(ddp)
    before = {n: p.detach().clone() for n, p in model_one.named_parameters()}
    one([{"input_ids": ids, "labels": labels}])
    many, model_many = classification_step(ddp)
    entered = []
    if ddp:
        original = many.ddp_model.no_sync

        def no_sync():
            entered.append(1)
            return original()

        many.ddp_model.no_sync = no_sync
    many([{"input_ids": ids[i * micro:(i + 1) * micro], "labels": labels[i * micro:(i + 1) * micro]}
          for i in range(k)])
    for (name, p_one), p_many in zip(model_one.named_parameters(), model_many.parameters()):
        torch.testing.assert_close(p_many - before[name], p_one - before[name], atol=1e-5, rtol=0, msg=name)
    assert any((p - before[n]).abs().max() > 1e-4 for n, p in model_one.named_parameters())
    return len(entered)


def test_uneven_micro_batches_weighted_by_their_sequences_equal_one_batch():
    """A worker's share of an unevenly split global batch (elastic groups): micro-batches of 5, 5
    and 2 weighted 5/12, 5/12, 2/12 give the gradient of the 12 sequences at once."""
    from bertray.train.worker_stream import worker_batch

    assert [worker_batch(26, 4, r) for r in range(4)] == [7, 7, 6, 6]
    assert sum(worker_batch(32, 3, r) for r in range(3)) == 32
    rng = np.random.default_rng(1)
    ids = torch.as_tensor(rng.integers(5, VOCAB, size=(12, SEQ)))
    labels = torch.as_tensor(rng.integers(0, 3, size=12))
    one, model_one = classification_step(False)
    before = {n: p.detach().clone() for n, p in model_one.named_parameters()}
    one([{"input_ids": ids, "labels": labels}])
    many, model_many = classification_step(False)
    parts = [slice(0, 5), slice(5, 10), slice(10, 12)]
    many([{"input_ids": ids[p], "labels": labels[p]} for p in parts], weights=[5 / 12, 5 / 12, 2 / 12])
    for (name, p_one), p_many in zip(model_one.named_parameters(), model_many.parameters()):
        torch.testing.assert_close(p_many - before[name], p_one - before[name], atol=1e-5, rtol=0, msg=name)


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger():
    _accumulation_matches_one_large_batch(ddp=False)


def test_accumulation_under_ddp_skips_the_all_reduce_until_the_last_micro_batch(gloo):
    assert _accumulation_matches_one_large_batch(ddp=True) == 3        # k - 1 micro-batches under no_sync


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.timeout(600)
def test_compiled_step_matches_eager():
    batches = [pretraining_batch(pretraining_columns(seed)).to(CPU) for seed in range(3)]
    losses = {}
    for compiled in (False, True):
        step = pretraining_step(compile=compiled)
        out = []
        for batch in batches:
            step([batch])
            out.append(step.meter.read()["loss"])
        losses[compiled] = out
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[False][-1] != losses[False][0]


def test_meter_weights_and_totals():
    meter = DeviceMeter()
    meter.add("acc", torch.tensor(0.5), torch.tensor(2.0))
    meter.add("acc", torch.tensor(1.0), torch.tensor(6.0))
    meter.add("none", torch.tensor(0.0), torch.tensor(0.0))         # no weight: left out
    meter.add("loss", torch.tensor(3.0))
    meter.count("skipped", torch.tensor(True))
    meter.count("skipped", torch.tensor(False))
    assert meter.read() == {"acc": pytest.approx(0.875), "loss": 3.0, "skipped": 1.0}
    assert meter.read() == {}
