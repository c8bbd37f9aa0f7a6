"""Pretraining's configuration: the sections of a run's YAML file (model, data, train, scaling,
run), each field a documented flag of `flows/pretrain.py` (`--section.key`), validated here. The
data section and the phases of the schedule are the data pipeline's own (`bertray.data.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from bertray.config import check_folder_name, check_no_credentials, doc
from bertray.data.config import DataSection, PhaseConfig
from bertray.errors import check
from bertray.labels import selector_problem
from bertray.model.config import BertConfig
from bertray.runtime.precision import Precision

OptimizerName = Literal["adamw", "bert_adam", "lamb"]


DEFAULT_PRESET = "tiny"


@dataclass(frozen=True)
class ModelSection:
    preset: str | None = doc(None, "model size: tiny, mini, small, medium, base or large (Google's released sizes); "
                                   "null: tiny, or with init_from the checkpoint's")
    overrides: dict[str, Any] = doc({}, "BertConfig fields that replace the preset's (e.g. {hidden_dropout_prob: 0.0}); "
                                        "with init_from only those that keep the weights' shapes (dropout)")
    init_from: str | None = doc(None, "continue from this checkpoint (a Hugging Face layout folder, local or object "
                                      "storage, or a run directory): its weights, architecture and vocabulary; the "
                                      "run's own checkpoint, when it has one, takes precedence (resume)")

    def bert_config(self, vocab_size: int, *, is_causal: bool) -> BertConfig:
        """The architecture of a run from random weights."""
        return BertConfig.preset(self.preset or DEFAULT_PRESET,
                                 **{"vocab_size": vocab_size, "is_causal": is_causal, **self.overrides})

    def __post_init__(self) -> None:
        self.bert_config(30522, is_causal=False)  # validates preset and overrides at the edge
        check_no_credentials("model.init_from", self.init_from)


@dataclass(frozen=True)
class TrainSection:
    seed: int = doc(0, "run seed; data and initialisation derive from it")
    max_steps: int = doc(300, "optimizer steps in all phases together")
    phases: tuple[PhaseConfig, ...] = doc((PhaseConfig(),), "the sequence-length schedule, run in order")
    micro_batch_size: int = doc(0, "sequences per worker per forward pass; 0: the whole per-worker batch "
                                   "(else gradients accumulate to reach the global batch)")
    optimizer: OptimizerName = doc(
        "adamw", "adamw (bias-corrected), bert_adam (the reference, no bias correction), lamb (large batches)")
    lr: float = doc(1e-3, "peak learning rate (paper, BERT-base: 1e-4)")
    weight_decay: float = doc(0.01, "decoupled weight decay (not on LayerNorm and biases)")
    adam_beta1: float = doc(0.9, "Adam beta1")
    adam_beta2: float = doc(0.999, "Adam beta2")
    adam_eps: float = doc(1e-6, "Adam epsilon")
    warmup_steps: int | None = doc(None, "linear warmup steps, then linear decay to 0; null: 10% of max_steps "
                                         "(the paper's BERT-base schedule warms up for 10k of 1M steps)")
    clip_grad_norm: float = doc(1.0, "clip gradients to this global norm (0: off)")
    precision: Precision = doc("auto", "autocast dtype (auto: bf16 on GPUs that have "
                                                                      "it, fp16 with loss scaling on older GPUs, "
                                                                      "fp32 on CPU)")
    compile: bool = doc(False, "torch.compile the model")
    log_every: int = doc(10, "steps between metric lines")
    batch_wait_warn_s: float = doc(120.0, "a worker waiting this long for its next batch logs what the cluster "
                                          "is doing (free resources, pending tasks and actors); the first batch "
                                          "gets 3x as long")
    batch_wait_fail_s: float = doc(900.0, "... and this long fails the run with that diagnosis, so run.max_failures "
                                          "and the checkpoint take over (0: never fail, only warn)")
    eval_every: int = doc(100, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = doc(8, "held-out batches per evaluation (fixed masks, fixed seed)")
    checkpoint_every: int = doc(100, "steps between checkpoints (always one at the end)")
    keep_checkpoints: int = doc(3, "checkpoints kept (the newest)")
    save_at_steps: tuple[int, ...] = doc((), "extra checkpoints kept at these steps (the paper's steps ablation)")
    corpus_passes: int = doc(1000, "passes over the corpus the stream may make (training stops at max_steps)")
    checkpoint_upload: Literal["async", "sync"] = doc("async", "async: training goes on while a checkpoint uploads "
                                                                "(`latest` moves once it is complete); sync: wait")
    fail_at_step: int | tuple[int, ...] | None = doc(None, "fault injection for tests: rank 0 crashes once at each "
                                                           "of these steps")
    nan_at_step: int | None = doc(None, "fault injection for tests: the loss becomes NaN at this step")
    record_instances: bool = doc(False, "for tests and audits: every checkpoint keeps the provenance of the "
                                        "instances trained since the previous one (trained_instances.npz)")

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "train.max_steps", f"must be > 0, got {self.max_steps}")
        check(len(self.phases) > 0, "train.phases", "give at least one phase")
        total = sum(p.fraction for p in self.phases)
        check(abs(total - 1.0) < 1e-6, "train.phases", f"fractions must add up to 1, got {total:g}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps is None or 0 <= self.warmup_steps <= self.max_steps, "train.warmup_steps",
              f"must be in [0, max_steps={self.max_steps}] or null, got {self.warmup_steps}")
        for key in ("log_every", "checkpoint_every", "eval_batches", "keep_checkpoints", "corpus_passes"):
            check(getattr(self, key) > 0, f"train.{key}", f"must be > 0, got {getattr(self, key)}")
        check(self.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}")
        check(self.batch_wait_warn_s > 0, "train.batch_wait_warn_s", f"must be > 0, got {self.batch_wait_warn_s}")
        check(self.batch_wait_fail_s >= 0, "train.batch_wait_fail_s", f"must be >= 0, got {self.batch_wait_fail_s}")

    @property
    def fault_steps(self) -> tuple[int, ...]:
        steps = self.fail_at_step
        return () if steps is None else (steps,) if isinstance(steps, int) else tuple(steps)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.max_steps // 10

    def phase_steps(self) -> list[int]:
        """Steps per phase; rounding goes to the last phase so they add up to max_steps."""
        steps = [int(round(p.fraction * self.max_steps)) for p in self.phases[:-1]]
        return steps + [self.max_steps - sum(steps)]


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int | tuple[int, int] = doc(1, "Ray Train workers (one per GPU); [min, max]: elastic, the run "
                                                "goes on with as few as min workers when nodes are lost and grows "
                                                "back to max; the global batch stays the same")
    use_gpu: bool = doc(False, "one GPU per worker")
    cpus_per_worker: float = doc(1.0, "CPUs reserved per Train worker (the data stages use the rest)")
    worker_resources: dict[str, float] = doc({}, "custom Ray resources each Train worker also reserves, e.g. "
                                                 "{trainer_node: 1} to keep workers on nodes started with that "
                                                 "resource (and one worker per such node)")
    node_labels: dict[str, str] = doc({}, "Ray node labels the Train workers run on, e.g. {bertray-role: trainer}, "
                                          "in Ray's selector syntax (value, !value, in(a,b), !in(a,b)); empty: any "
                                          "node with the workers' resources")
    torch_threads: int = doc(0, "intra-op threads per worker on CPU (0: Ray's default, one per reserved CPU); "
                                "more than reserved helps when the data stages leave CPUs idle")
    cpu_affinity: tuple[int, ...] = doc((), "CPU ids each Train worker process is pinned to (Linux); empty: no "
                                             "pinning. Gives a trainer its own cores beside data stages")
    resource_check: Literal["fail", "warn", "skip"] = doc(
        "fail", "before starting, place the Train workers and the data stages' minimum on the cluster's nodes: "
                "fail (stop with what is short; a warning where an autoscaler may add nodes), warn, or skip")

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def __post_init__(self) -> None:
        check(1 <= self.min_workers <= self.max_workers, "scaling.num_workers",
              f"must be >= 1, or [min, max] with 1 <= min <= max, got {self.num_workers}")
        check(all(isinstance(c, int) and c >= 0 for c in self.cpu_affinity), "scaling.cpu_affinity",
              f"must be CPU ids >= 0, got {list(self.cpu_affinity)}")
        check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        for key, amount in self.worker_resources.items():
            check(key not in ("CPU", "GPU") and isinstance(amount, (int, float)) and amount > 0,
                  f"scaling.worker_resources.{key}", f"must be a custom resource (not CPU/GPU: see cpus_per_worker "
                  f"and use_gpu) with an amount > 0, got {amount!r}")
        problem = selector_problem(self.node_labels)
        check(problem is None, "scaling.node_labels", str(problem))
        check(self.torch_threads >= 0, "scaling.torch_threads", f"must be >= 0, got {self.torch_threads}")


@dataclass(frozen=True)
class RunSection:
    name: str = doc("pretrain", "run name: the run lives in <output>/<name>; the same name resumes it")
    output: str = doc("runs", "local directory or object-storage URL (s3://bucket/prefix) for checkpoints")
    max_failures: int = doc(2, "worker-group restarts from the latest checkpoint before the run fails")
    tensorboard: bool = doc(True, "write TensorBoard event files under <output>/<name>/tensorboard")
    allow_config_change: tuple[str, ...] | str = doc((), "model.*/data.* keys a resume may change, comma-separated "
                                                         "(data.corpus,model.dropout; data: all of data); any other "
                                                         "change is refused")
    lease_stale_s: float = doc(600.0, "a run directory's writer lease counts as abandoned after this long without "
                                      "a heartbeat (a second driver on the same run is refused until then)")

    def __post_init__(self) -> None:
        check_folder_name("run.name", self.name)
        check_no_credentials("run.output", self.output)
        check(self.max_failures >= -1, "run.max_failures", f"must be >= -1 (-1: unlimited), got {self.max_failures}")
        check(self.lease_stale_s > 0, "run.lease_stale_s", f"must be > 0, got {self.lease_stale_s}")
        for key in self.allowed_changes:
            check(key.split(".")[0] in ("model", "data"), "run.allow_config_change",
                  f"{key!r}: only model.* and data.* keys (or model, data) can be allowed")


    @property
    def allowed_changes(self) -> tuple[str, ...]:
        keys = self.allow_config_change.split(",") if isinstance(self.allow_config_change, str) \
            else self.allow_config_change
        return tuple(k.strip() for k in keys if k.strip())


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = doc(ModelSection, "")
    data: DataSection = doc(DataSection, "")
    train: TrainSection = doc(TrainSection, "")
    scaling: ScalingSection = doc(ScalingSection, "")
    run: RunSection = doc(RunSection, "")

    def __post_init__(self) -> None:
        for i, phase in enumerate(self.train.phases):
            if self.scaling.elastic:   # any worker count in the range: uneven shares, weighted (see worker_batch)
                check(phase.batch_size >= self.scaling.max_workers, f"train.phases[{i}].batch_size",
                      f"{phase.batch_size} is less than one sequence per worker for scaling.num_workers "
                      f"{list(self.scaling.num_workers)}")
                continue
            workers = self.scaling.num_workers
            check(phase.batch_size % workers == 0, f"train.phases[{i}].batch_size",
                  f"{phase.batch_size} does not divide over scaling.num_workers={workers}")
            per_worker = phase.batch_size // workers
            micro = self.train.micro_batch_size or per_worker
            check(per_worker % micro == 0, "train.micro_batch_size",
                  f"{micro} does not divide the per-worker batch {per_worker} of phase {i}")
