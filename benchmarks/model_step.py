"""Training-step throughput: bertray's BertForPreTraining against transformers' BertForPreTraining.

One step = forward, backward, AdamW step, zero_grad, on the same synthetic pretraining batch for
both models (full-length sequences, `--masked` prediction slots per sequence, NSP labels).
Hugging Face's model scores every position with its MLM head, as its API requires: it gets
labels = -100 except at the masked positions, so both compute the same loss. The two models are
timed in alternating rounds in one process (same threads, same machine state), and the median
steps/s over the rounds is reported.

    python benchmarks/model_step.py                      # CPU, mini preset, batch 32, seq 128
    python benchmarks/model_step.py --device cuda        # also BERT-base, bf16 autocast, batch 128

(after `pip install -e .`; from a bare checkout, `python -m benchmarks.model_step` from the root).

Model FLOPs utilisation (MFU, CUDA only) counts the work a step needs, per training step
(backward = 2x forward, so 3x the forward FLOPs):

    forward = 2 * B*S * L * (4*H^2 + 2*H*I)        # Q, K, V, output projections; feed-forward
            + 4 * B * S^2 * H * L                  # attention scores Q K^T and weighted sum P V
            + 2 * B*P * (H^2 + H*V)                # MLM transform + vocabulary projection, P slots
            + 2 * B * (H^2 + 2*H)                  # pooler + NSP classifier
    MFU     = 3 * forward * steps/s / (peak TFLOP/s * 1e12)

The MLM head is counted at the P masked slots for both models: Hugging Face's extra work on the
other positions is not useful work and is not credited.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bertray.model.config import BertConfig
from bertray.model.heads import BertForPreTraining
from bertray.runtime.batches import pretraining_batch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One benchmark setting; both models run it."""

    name: str
    preset: str
    batch_size: int
    seq_len: int
    masked: int
    bf16: bool


@dataclass
class Result:
    case: str
    model: str
    steps_per_s: float
    sequences_per_s: float
    round_steps_per_s: list[float]
    model_tflops_per_step: float
    mfu: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda also runs the BERT-base case with bf16 autocast and reports MFU")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--preset", default="mini", help="model size of the first case (BertConfig.preset)")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--masked", type=int, default=20, help="prediction slots per sequence")
    p.add_argument("--cuda-preset", default="base", help="model size of the CUDA-only case")
    p.add_argument("--cuda-batch-size", type=int, default=128, help="batch of the CUDA-only case")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per model before the rounds (default: 2 on CPU, 5 on CUDA)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, models alternating")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per model per round (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU for MFU (989 = H100 SXM)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "model_step.json",
                   help="where to write the results")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.steps = args.steps if args.steps is not None else (20 if cuda else 3)
    return args


def make_batch(config: BertConfig, case: Case, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """A full-length pretraining batch: [CLS] A [SEP] B [SEP] layout, sorted distinct masked slots."""
    g = torch.Generator().manual_seed(seed)
    b, s, p = case.batch_size, case.seq_len, case.masked
    input_ids = torch.randint(1000, config.vocab_size, (b, s), generator=g)
    token_type_ids = (torch.arange(s) >= s // 2).long().expand(b, s).contiguous()
    positions = torch.rand(b, s - 2, generator=g).argsort(dim=1)[:, :p].sort(dim=1).values + 1
    labels = torch.randint(1000, config.vocab_size, (b, p), generator=g)
    hf_labels = torch.full((b, s), -100).scatter(1, positions, labels)
    batch = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=torch.ones(b, s, dtype=torch.long),
                 masked_lm_positions=positions, masked_lm_ids=labels, masked_lm_weights=torch.ones(b, p),
                 next_sentence_labels=torch.randint(0, 2, (b,), generator=g), hf_labels=hf_labels)
    return {k: v.to(device) for k, v in batch.items()}


def model_flops_per_step(config: BertConfig, case: Case) -> float:
    """The formula in the module docstring."""
    h, i, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    b, s, p = case.batch_size, case.seq_len, case.masked
    forward = (2 * b * s * L * (4 * h * h + 2 * h * i) + 4 * b * s * s * h * L
               + 2 * b * p * (h * h + h * v) + 2 * b * (h * h + 2 * h))
    return 3.0 * forward


def build_models(config: BertConfig, device: torch.device, compile_models: bool):
    import transformers

    ours = BertForPreTraining(config).to(device).train()
    hf_config = transformers.BertConfig(**config.to_dict())
    theirs = transformers.BertForPreTraining(hf_config).to(device).train()
    theirs.load_state_dict(ours.state_dict(), strict=False)  # same starting weights
    if compile_models:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    return {"bertray": ours, "transformers": theirs}


def make_step(name: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool):
    """bertray gets its inputs as its training loop does (`bertray.runtime.batches`: the mask and the
    real prediction slots decided on the host, so a full batch runs without a mask and without a
    host sync); transformers gets the usual tensors."""
    columns = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions", "masked_lm_ids",
               "masked_lm_weights", "next_sentence_labels")
    inputs = pretraining_batch({k: batch[k].cpu() for k in columns}).to(batch["input_ids"].device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    device_type = batch["input_ids"].device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def step() -> None:
        with autocast():
            if name == "bertray":
                loss = model(**inputs).loss
            else:
                loss = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                             attention_mask=batch["attention_mask"], labels=batch["hf_labels"],
                             next_sentence_label=batch["next_sentence_labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> list[Result]:
    config = BertConfig.preset(case.preset, vocab_size=args.vocab_size, max_position_embeddings=max(512, case.seq_len))
    torch.manual_seed(args.seed)
    models = build_models(config, device, args.compile)
    batch = make_batch(config, case, device, args.seed)
    steps = {name: make_step(name, model, batch, case.bf16) for name, model in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    sync()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            sync()
            rates[name].append(args.steps / (time.perf_counter() - start))

    flops = model_flops_per_step(config, case)
    results = []
    for name, per_round in rates.items():
        median = statistics.median(per_round)
        mfu = flops * median / (args.peak_tflops * 1e12) if device.type == "cuda" else None
        results.append(Result(case=case.name, model=name, steps_per_s=median,
                              sequences_per_s=median * case.batch_size, round_steps_per_s=per_round,
                              model_tflops_per_step=flops / 1e12, mfu=mfu))
    return results


def print_table(results: list[Result]) -> None:
    print(f"{'case':<34} {'model':<13} {'steps/s':>9} {'seq/s':>9} {'MFU':>7}")
    for r in results:
        mfu = f"{100 * r.mfu:6.1f}%" if r.mfu is not None else "      -"
        print(f"{r.case:<34} {r.model:<13} {r.steps_per_s:9.3f} {r.sequences_per_s:9.1f} {mfu}")
    for case in dict.fromkeys(r.case for r in results):
        by_model = {r.model: r.steps_per_s for r in results if r.case == case}
        print(f"{case}: bertray / transformers = {by_model['bertray'] / by_model['transformers']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cases = [Case(f"{args.preset} b{args.batch_size} s{args.seq_len}", args.preset, args.batch_size,
                  args.seq_len, args.masked, bf16=device.type == "cuda")]
    if device.type == "cuda":
        cases.append(Case(f"{args.cuda_preset} b{args.cuda_batch_size} s{args.seq_len} bf16", args.cuda_preset,
                          args.cuda_batch_size, args.seq_len, args.masked, bf16=True))
    results = [r for case in cases for r in run_case(case, args, device)]
    print(f"device={device.type} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"compile={args.compile}")
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "compile": args.compile,
            "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps, "peak_tflops": args.peak_tflops}
    ratios = {case.name: next(r.steps_per_s for r in results if r.case == case.name and r.model == "bertray")
              / next(r.steps_per_s for r in results if r.case == case.name and r.model == "transformers")
              for case in cases}
    args.json.write_text(json.dumps({"meta": meta, "cases": [asdict(c) for c in cases],
                                     "results": [asdict(r) for r in results], "ratio_bertray_over_hf": ratios},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
