"""Batch prediction with a fine-tuned model on Ray Data: files in, Parquet shards out.

    python flows/predict.py --model runs/finetune/latest/models/<row>/sst2 --input reviews.txt --output runs/predict/reviews
    python flows/predict.py --model s3://bucket/models/sst2 --input 's3://bucket/tickets/*.jsonl' \\
        --text-field body --output s3://bucket/predictions/tickets --embeddings mean
    python flows/predict.py --model runs/finetune/latest/models/<row>/mrpc --input pairs.tsv \\
        --text-field '#1 String' --pair-field '#2 String' --output runs/predict/mrpc
    python flows/predict.py --model runs/finetune/latest/models/<row>/squad1 --input questions.parquet --output runs/predict/qa
    python flows/predict.py --model runs/finetune/latest/models/<row>/conll2003 --input news.jsonl --output runs/predict/ner

Inputs: text (one per line), CSV or TSV with a header, JSONL or Parquet, at any fsspec URL (local,
s3://, gs://; credentials from the environment, never in the URL); a folder or glob means every
file in it. Output: one Parquet shard per input file (or per run of row groups of a Parquet file)
with column id (the input's --id-field, else <file>:<line>), the columns of the model's kind
(read from its config.json) and, with --embeddings, embedding; plus _summary.json (rows, skipped
rows named as <file>:<line>, timing). The kind's columns:
  classification, regression, question answering: prediction (the label name, the value, or the
    answer text) and score (the label's probability, the value, or the answer's confidence);
  multilabel (problem_type multi_label_classification): labels (those whose sigmoid score is over
    the config's threshold, default 0.5, highest first) and scores (every label's, a struct);
  token classification (NER): entities, a list of {entity_group, score, word, start, end} with
    start/end character offsets into the text, grouped as transformers' token-classification
    pipeline with aggregation_strategy="simple"; texts over --max-seq-len tokens (default: the fine-tuned length) are
    tagged window by window to their end.
Multiple-choice models are refused: they have no one-input format.
Re-running the same command after a crash finishes the job:
finished shards are kept, the rest are computed again; no row is written twice or lost.
Inside `ray job submit` the script joins the job's cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from bertray.cli import add_config_options
    from bertray.predict.job import PredictConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    add_config_options(parser, PredictConfig, required=("model", "input", "output"), hidden=("fail_units",))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from bertray.cli import config_overrides, start_ray
    from bertray.config import load_config
    from bertray.errors import BertrayError
    from bertray.predict.job import PredictConfig, run_prediction
    from bertray.storage import absolute_url

    overrides = config_overrides(PredictConfig, args)
    if overrides.get("embeddings") == "none":
        overrides["embeddings"] = None
    try:
        cfg = load_config(PredictConfig, None, overrides)
        # Actors run in working directories of their own: local paths are made absolute here.
        cfg = dataclasses.replace(cfg, model=absolute_url(cfg.model), output=absolute_url(cfg.output),
                                  input=tuple(absolute_url(u) for u in cfg.input))
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    start_ray(args.address, args.num_cpus)
    try:
        summary = run_prediction(cfg)
    except BertrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"{summary['rows']:,} rows predicted into {summary['shards']} shard(s) under {cfg.output} "
          f"({summary['shards_written']} written now, {summary['shards_skipped']} kept from before); "
          f"{summary['skipped_rows']:,} malformed row(s) skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
