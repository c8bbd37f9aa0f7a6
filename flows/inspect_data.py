"""Look at what the model will see: stream N pretraining instances and print them decoded.

    python flows/inspect_data.py                                  # the embedded default's corpus
    python flows/inspect_data.py --corpus s3://bucket/wiki/ --data.layout bert --num 5 --json out.json

Each instance is printed as `[CLS] A [SEP] B [SEP]` with masked positions shown as
`[MASK]{label}` (or `random{label}`, `={label}` for kept tokens), its NSP label, and where A and B
come from (document id = file index << 32 | document number, sentence ranges). Then the pipeline
counters: files, documents, sentences, instances, masked tokens and everything skipped, and why.
The JSON holds every instance's ids, masked positions and labels, segment ids, NSP label and
provenance, so a reader can check pairs against the source. Options as flows/pretrain.py
(the same config file and `--data.*` flags, so you inspect exactly what a run would train on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    from bertray.cli import add_config_options
    from bertray.train.config import PretrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "flows" / "configs" / "embedded.yaml"),
                        help="pretraining config whose data section to inspect (default: the embedded one)")
    parser.add_argument("--corpus", nargs="+", help="shorthand for --data.corpus")
    parser.add_argument("--num", type=int, default=8, help="instances to print (default: 8)")
    parser.add_argument("--json", help="write the instances (ids, masks, labels, provenance) to this JSON file")
    parser.add_argument("--phase", type=int, default=0, help="phase of train.phases whose shape to use (default 0)")
    parser.add_argument("--address", help="Ray cluster address (default: a running cluster, else a local Ray)")
    add_config_options(parser, PretrainConfig)
    return parser


def decode(tokenizer, row: dict, specials) -> str:
    """The instance as text, masked positions annotated with their labels."""
    ids = row["input_ids"][: int(row["attention_mask"].sum())].tolist()
    labels = {int(p): int(l) for p, l, w in zip(row["masked_lm_positions"], row["masked_lm_ids"],
                                                row["masked_lm_weights"]) if w > 0}
    words = []
    for pos, tid in enumerate(ids):
        token = tokenizer.id_to_token(tid)
        if pos in labels:
            label = tokenizer.id_to_token(labels[pos])
            token = ("[MASK]" if tid == specials.mask else "=" if tid == labels[pos] else
                     f"random:{token}") + "{" + label + "}"
        words.append(token)
    return " ".join(words).replace(" ##", "##")


def _document(files, doc_id: int) -> dict:
    from bertray.data.pipeline import unpack_doc_id

    file_index, number = unpack_doc_id(doc_id)
    return {"doc_id": doc_id, "file": files[file_index].url, "document": number}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import numpy as np
    import ray

    from bertray import wordpiece
    from bertray.cli import config_from_args, start_ray, with_repo_paths
    from bertray.train.config import PretrainConfig
    from bertray.data.documents import CorpusCounters, layout_warning
    from bertray.data.pipeline import PipelineCounters, build_dataset, drop_markers, unpack_doc_id
    from bertray.data.stream_spec import stream_spec
    from bertray.data.sources import resolve_corpus
    from bertray.data.vocabulary import run_tokenizer
    from bertray.errors import BertrayError
    from bertray.storage import join_url

    try:
        cfg = config_from_args(PretrainConfig, args, {"data.corpus": args.corpus})
        cfg = dataclasses.replace(cfg, data=with_repo_paths(cfg.data))
        phase = cfg.train.phases[args.phase]
        files = resolve_corpus(cfg.data.corpus, storage_options=cfg.data.storage_options)
        tokenizer = run_tokenizer(cfg.data, files, join_url(cfg.run.output, cfg.run.name))
    except (BertrayError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start_ray(args.address, None, quiet=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    counters = PipelineCounters.remote()
    spec = stream_spec(cfg.data, phase, tokenizer.to_str(), seed=cfg.train.seed, generation=0, passes=1)
    batch = drop_markers(build_dataset(files, spec, counters_actor=counters, keep_provenance=True).take_batch(
        args.num, batch_format="numpy"))
    specials = wordpiece.special_tokens(tokenizer)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    nsp_names = {0: "IsNext", 1: "NotNext", -1: "no NSP"}
    for i, row in enumerate(rows):
        doc, bdoc = int(row["doc_id"]), int(row["b_doc_id"])
        where = f"A = doc {':'.join(map(str, unpack_doc_id(doc)))} sentences [{row['a_start']}, {row['a_end']})"
        if bdoc >= 0:
            where += f"   B = doc {':'.join(map(str, unpack_doc_id(bdoc)))} sentences [{row['b_start']}, {row['b_end']})"
        print(f"\n#{i}  {nsp_names[int(row['next_sentence_labels'])]}  {where}")
        print("   " + decode(tokenizer, row, specials))
    totals = ray.get(counters.get.remote())
    print(f"\ncorpus: {len(files)} file(s); pipeline counters while producing {len(rows)} instances:")
    for key in sorted(totals):
        print(f"  {key:<28} {totals[key]:>12,}")
    warning = layout_warning(CorpusCounters(totals))
    if warning:
        print(f"\nWARNING: {warning}")
    if args.json:
        out = [{"input_ids": r["input_ids"][: int(r["attention_mask"].sum())].tolist(),
                "token_type_ids": r["token_type_ids"][: int(r["attention_mask"].sum())].tolist(),
                "masked_lm_positions": r["masked_lm_positions"][r["masked_lm_weights"] > 0].tolist(),
                "masked_lm_ids": r["masked_lm_ids"][r["masked_lm_weights"] > 0].tolist(),
                "next_sentence_label": int(r["next_sentence_labels"]),
                "a": {**_document(files, int(r["doc_id"])), "sentences": [int(r["a_start"]), int(r["a_end"])]},
                "b": None if int(r["b_doc_id"]) < 0 else {
                    **_document(files, int(r["b_doc_id"])), "sentences": [int(r["b_start"]), int(r["b_end"])]}}
               for r in rows]
        Path(args.json).write_text(json.dumps({"instances": out, "counters": totals}, indent=1,
                                              default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
