"""Training dynamics side by side: bertray's BertForPreTraining against transformers' on one stream.

Forward parity (one batch, fixed weights) cannot catch what only shows over many steps: a loss
term left out, weight decay on LayerNorm, an NSP label flipped for some instances, a gathered
position off by one. Here both models start from the same weights (bertray's initialisation,
exported in the Hugging Face layout and loaded by `transformers.BertForPreTraining`), train on the
same batches (materialised once from bertray's pipeline: same instances, masks and NSP labels),
with the same optimizer implementation and parameter groups (no decay on biases and LayerNorm),
schedule, clipping and fp32. Hugging Face's model gets its own loss: labels -100 except at the
masked positions, and `next_sentence_label`.

- Run A, dropout 0: both are deterministic, so their curves must coincide: the largest relative
  difference of the 50-step moving average of the loss, and held-out MLM/NSP accuracy at the end.
- Run B, dropout 0.1, several seeds per side (a seed sets the initial weights and the dropout
  draws): each side's mean curve should lie inside the other's seed spread.

    python benchmarks/convergence.py --json benchmarks/results/convergence.json --png docs/convergence.png
    python benchmarks/convergence.py --steps 20 --preset tiny --seeds 0 --skip-b      # a quick look

(after `pip install -e ".[test,plot]"`; from a bare checkout, `python -m benchmarks.convergence`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from bertray.model.config import BertConfig
from bertray.data.config import DataSection, PhaseConfig
from bertray.data.pipeline import iter_local
from bertray.data.stream_spec import stream_spec
from bertray.data.sources import resolve_corpus
from bertray.model.heads import BertForPreTraining
from bertray.train.optim import OPTIMIZERS, make_optimizer, warmup_linear_decay

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"
VOCAB = REPO / "samples" / "corpus" / "wikitext-2" / "vocab-8192"
# WikiText articles and Gutenberg books in one stream: articles start at ` = Title = ` lines, a book
# is one document; both are read as blank-line separated paragraphs, and headings of either are dropped.
MIXED_LAYOUT = dict(layout="wikitext", line_unit="wrapped",
                    skip_pattern=r"^\s*= =.* = =\s*$|^\s*(CHAPTER|Chapter|VOLUME|Volume|BOOK|Book|PART|Part)"
                                 r"\s+([IVXLCDM]+|\d+)\.?\s*$")

Batch = dict[str, torch.Tensor]


def corpus_section(corpus: Path = CORPUS, holdout_fraction: float = 0.1) -> DataSection:
    return DataSection(corpus=(str(corpus / "wikitext-2-raw" / "*.raw"), str(corpus / "gutenberg" / "*.txt")),
                       holdout_fraction=holdout_fraction, **MIXED_LAYOUT)


def materialize(data: DataSection, tokenizer_json: str, *, seq_len: int, predictions: int, batch_size: int,
                n_batches: int, split: str = "train", seed: int = 0) -> list[Batch]:
    """`n_batches` batches exactly as a `preserve_order` run receives them (passes as needed)."""
    phase = PhaseConfig(max_seq_len=seq_len, max_predictions_per_seq=predictions, batch_size=batch_size)
    files = resolve_corpus(data.corpus)
    # The held-out documents are few per file: one read task over all files mixes them into buffers
    # with enough other documents for random-next B's (as the evaluation of a pretraining run does).
    spec = dataclasses.replace(stream_spec(data, phase, tokenizer_json, seed=seed, generation=0, passes=1000),
                               split=split, preserve_order=True,
                               files_per_read_task=len(files) if split == "heldout" else data.files_per_read_task)
    batches: list[Batch] = []
    pending: dict[str, np.ndarray] | None = None
    for part in iter_local(files, spec):
        pool = part if pending is None else {key: np.concatenate([pending[key], part[key]]) for key in part}
        full = min(len(pool["input_ids"]) // batch_size, n_batches - len(batches))
        batches += [{key: torch.from_numpy(value[i * batch_size:(i + 1) * batch_size].astype(
                        np.float32 if key == "masked_lm_weights" else np.int64)) for key, value in pool.items()}
                    for i in range(full)]
        if len(batches) == n_batches:
            return batches
        pending = {key: value[full * batch_size:] for key, value in pool.items()}
    raise ValueError(f"the corpus gives only {len(batches)} batches of {batch_size} ({split} split)")


# --------------------------------------------------------------------------------------------
# The two models behind one interface: batch -> (loss, mlm accuracy, nsp accuracy)


def bertray_step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, float, float]:
    out = model(**batch)
    return out.loss, float(out.mlm_accuracy), float(out.nsp_accuracy)


def hf_labels(batch: Batch) -> torch.Tensor:
    """(B, S) MLM labels in Hugging Face's convention: the original token at masked positions, else -100."""
    labels = torch.full_like(batch["input_ids"], -100)
    real = batch["masked_lm_weights"] > 0
    rows = torch.arange(labels.shape[0])[:, None].expand_as(real)
    labels[rows[real], batch["masked_lm_positions"][real]] = batch["masked_lm_ids"][real]
    return labels


def hf_step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, float, float]:
    labels = hf_labels(batch)
    out = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"], labels=labels,
                next_sentence_label=batch["next_sentence_labels"])
    mask = labels != -100
    mlm_acc = (out.prediction_logits.detach()[mask].argmax(-1) == labels[mask]).float().mean()
    nsp_acc = (out.seq_relationship_logits.detach().argmax(-1) == batch["next_sentence_labels"]).float().mean()
    return out.loss, float(mlm_acc), float(nsp_acc)


def model_pair(preset: str, vocab_size: int, dropout: float, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """bertray's model with its own initialisation, and transformers' loaded from its export."""
    import transformers

    torch.manual_seed(seed)
    config = BertConfig.preset(preset, vocab_size=vocab_size, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)
    ours = BertForPreTraining(config)
    with tempfile.TemporaryDirectory(prefix="bertray-convergence-") as directory:
        ours.save_pretrained(directory)
        theirs = transformers.BertForPreTraining.from_pretrained(directory, attn_implementation="eager")
    return ours, theirs


@dataclasses.dataclass(frozen=True)
class Recipe:
    optimizer: str = "adamw"
    lr: float = 5e-4
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 1.0


def train(model: torch.nn.Module, step_fn: Callable, batches: Sequence[Batch], recipe: Recipe, seed: int,
          build_optimizer: Callable[..., torch.optim.Optimizer] = make_optimizer) -> list[float]:
    """Per-step training loss; the same loop and optimizer construction for either model."""
    torch.manual_seed(seed)          # the dropout draws
    model.train()
    optimizer = build_optimizer(model, recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                betas=(0.9, 0.999), eps=1e-6)
    scheduler = warmup_linear_decay(optimizer, warmup_steps=recipe.warmup, total_steps=len(batches))
    losses = []
    for batch in batches:
        loss, _, _ = step_fn(model, batch)
        loss.backward()
        if recipe.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, step_fn: Callable, batches: Iterable[Batch]) -> dict[str, float]:
    model.eval()
    results = [step_fn(model, batch)[1:] for batch in batches]
    model.train()
    return {"mlm_accuracy": float(np.mean([r[0] for r in results])),
            "nsp_accuracy": float(np.mean([r[1] for r in results]))}


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start, so every step has a value)."""
    cumulative = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


# --------------------------------------------------------------------------------------------
# The benchmark


def run_a(args, batches, eval_set, vocab_size: int) -> dict:
    ours, theirs = model_pair(args.preset, vocab_size, 0.0, args.seeds[0])
    recipe = Recipe(optimizer=args.optimizer, lr=args.lr, warmup=args.warmup)
    out = {}
    for name, model, fn in (("bertray", ours, bertray_step), ("transformers", theirs, hf_step)):
        started = time.perf_counter()
        losses = train(model, fn, batches, recipe, args.seeds[0])
        out[name] = {"losses": losses, "seconds": time.perf_counter() - started, **evaluate(model, fn, eval_set)}
        print(f"  run A {name:12s} {len(losses)} steps in {out[name]['seconds']:.0f} s, final loss "
              f"{losses[-1]:.4f}, held-out MLM {out[name]['mlm_accuracy']:.2%} NSP {out[name]['nsp_accuracy']:.2%}",
              flush=True)
    smooth = {name: moving_average(out[name]["losses"], args.window) for name in out}
    out["max_rel_diff_smoothed_loss"] = max_relative_difference(smooth["bertray"], smooth["transformers"])
    out["max_rel_diff_loss"] = max_relative_difference(out["bertray"]["losses"], out["transformers"]["losses"])
    return out


def run_b(args, batches, vocab_size: int) -> dict:
    recipe = Recipe(optimizer=args.optimizer, lr=args.lr, warmup=args.warmup)
    curves: dict[str, list[list[float]]] = {"bertray": [], "transformers": []}
    for seed in args.seeds:
        ours, theirs = model_pair(args.preset, vocab_size, 0.1, seed)
        for name, model, fn in (("bertray", ours, bertray_step), ("transformers", theirs, hf_step)):
            curves[name].append(train(model, fn, batches, recipe, seed))
            print(f"  run B {name:12s} seed {seed}: final smoothed loss "
                  f"{moving_average(curves[name][-1], args.window)[-1]:.4f}", flush=True)
    smooth = {name: np.stack([moving_average(c, args.window) for c in runs]) for name, runs in curves.items()}
    mean = {name: s.mean(0) for name, s in smooth.items()}
    low = {name: s.min(0) for name, s in smooth.items()}
    high = {name: s.max(0) for name, s in smooth.items()}
    inside = {f"{a}_mean_inside_{b}_spread": float(np.mean((mean[a] >= low[b]) & (mean[a] <= high[b])))
              for a, b in (("bertray", "transformers"), ("transformers", "bertray"))}
    # Outside the spread, how far: the gap between the means in units of the larger spread.
    spread = np.maximum(high["bertray"] - low["bertray"], high["transformers"] - low["transformers"])
    return {"losses": curves, **inside,
            "max_rel_diff_mean_smoothed_loss": max_relative_difference(mean["bertray"], mean["transformers"]),
            "max_mean_gap_over_spread": float(np.max(np.abs(mean["bertray"] - mean["transformers"])
                                                     / np.maximum(spread, 1e-12)))}


def plot(result: dict, path: str, window: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [("A: dropout 0", {name: [result["run_a"][name]["losses"]] for name in ("bertray", "transformers")})]
    if "run_b" in result:
        runs.append(("B: dropout 0.1, seeds " + ", ".join(map(str, result["seeds"])), result["run_b"]["losses"]))
    figure = Figure(figsize=(6 * len(runs), 4.2))
    FigureCanvasAgg(figure)
    for index, (title, curves) in enumerate(runs):
        axes = figure.add_subplot(1, len(runs), index + 1)
        for (name, seeds), colour in zip(curves.items(), ("tab:blue", "tab:orange")):
            smooth = np.stack([moving_average(c, window) for c in seeds])
            steps = np.arange(1, smooth.shape[1] + 1)
            axes.plot(steps, smooth.mean(0), color=colour, label=name, linestyle="-" if name == "bertray" else "--")
            if len(seeds) > 1:
                axes.fill_between(steps, smooth.min(0), smooth.max(0), color=colour, alpha=0.2)
        axes.set(title=f"run {title}", xlabel="step", ylabel=f"training loss ({window}-step mean)")
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--predictions", type=int, default=20, help="masked slots per sequence (P)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--window", type=int, default=50, help="moving-average window of the compared curves")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                   help="run B's seeds; run A uses the first")
    p.add_argument("--skip-b", action="store_true", help="run A only")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches for the final accuracies")
    p.add_argument("--corpus", type=Path, default=CORPUS, help="folder with wikitext-2-raw/ and gutenberg/")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", help="write the result here")
    p.add_argument("--png", help="draw both runs' curves here (needs matplotlib)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from report import write_json      # beside this script

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(VOCAB / "tokenizer.json"))
    data = corpus_section(args.corpus)
    shape = dict(seq_len=args.seq_len, predictions=args.predictions, batch_size=args.batch_size)
    started = time.perf_counter()
    batches = materialize(data, tokenizer.to_str(), n_batches=args.steps, **shape)
    eval_set = materialize(data, tokenizer.to_str(), n_batches=args.eval_batches, split="heldout", seed=1, **shape)
    print(f"{args.steps} training and {args.eval_batches} held-out batches of {args.batch_size} x {args.seq_len} "
          f"from bertray's pipeline in {time.perf_counter() - started:.0f} s", flush=True)
    result = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "optimizer": args.optimizer, "lr": args.lr, "warmup": args.warmup, "window": args.window,
              "seeds": args.seeds, "threads": args.threads, "torch": torch.__version__}
    result["run_a"] = run_a(args, batches, eval_set, tokenizer.get_vocab_size())
    a = result["run_a"]
    result["max_rel_diff_smoothed_loss"] = a["max_rel_diff_smoothed_loss"]
    result["final_mlm_accuracy"] = {name: a[name]["mlm_accuracy"] for name in ("bertray", "transformers")}
    result["final_nsp_accuracy"] = {name: a[name]["nsp_accuracy"] for name in ("bertray", "transformers")}
    if not args.skip_b:
        result["run_b"] = run_b(args, batches, tokenizer.get_vocab_size())

    mlm_gap = abs(result["final_mlm_accuracy"]["bertray"] - result["final_mlm_accuracy"]["transformers"])
    print(f"\nrun A (dropout 0): max relative difference of the {args.window}-step mean loss "
          f"{a['max_rel_diff_smoothed_loss']:.2e} (target <= 2e-2), of the raw loss {a['max_rel_diff_loss']:.2e}")
    for key in ("final_mlm_accuracy", "final_nsp_accuracy"):
        print(f"  held-out {key[6:9].upper()} accuracy: bertray {result[key]['bertray']:.2%}, "
              f"transformers {result[key]['transformers']:.2%}")
    print(f"  MLM accuracy gap {mlm_gap * 100:.2f} points (target <= 1)")
    if "run_b" in result:
        b = result["run_b"]
        print(f"run B (dropout 0.1, seeds {args.seeds}): bertray's mean inside transformers' spread at "
              f"{b['bertray_mean_inside_transformers_spread']:.0%} of steps, transformers' inside bertray's at "
              f"{b['transformers_mean_inside_bertray_spread']:.0%}; mean curves differ by at most "
              f"{b['max_rel_diff_mean_smoothed_loss']:.2%}")
    if args.json:
        write_json(args.json, result)
    if args.png:
        plot(result, args.png, args.window)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
