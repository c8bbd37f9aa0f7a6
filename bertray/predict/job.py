"""Batch prediction on Ray Data: input files -> units -> an actor pool -> Parquet shards.

The units (whole files, or row-group runs of Parquet files; `shards.plan_units`) are the rows of
a small Ray Data dataset, mapped by an actor pool (`map_batches` with a class): each actor loads
the model once, then for each unit streams its rows in chunks through the length-sorted inner
loop (`inference`) into the unit's shard. Units whose shard already exists are not scheduled, so
re-running a job that died finishes it without duplicating or losing rows. The job's settings
are kept beside the shards (`_job.json`): a re-run with another model or other columns into the
same output is refused instead of mixing two jobs' predictions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from bertray.config import check_no_credentials, doc
from bertray.errors import ConfigError, check
from bertray.predict import shards
from bertray.predict.inputs import INPUT_FORMATS, BadRows, file_format, read_rows
from bertray.predict.kinds import Kind

log = logging.getLogger("bertray.predict")

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
# Settings that decide what the shards hold: a re-run must repeat them.
_SAME_ON_RERUN = ("model", "input", "format", "text_field", "pair_field", "question_field", "context_field",
                  "id_field", "embeddings", "max_seq_len", "rows_per_unit")


@dataclass(frozen=True)
class PredictConfig:
    """One batch prediction job."""

    model: str = doc("", "fine-tuned model folder in the Hugging Face layout (local or object storage), e.g. "
                         "runs/finetune/latest/models/<row>/sst2")
    input: tuple[str, ...] = doc((), "input files, folders or globs (local or object storage)")
    output: str = doc("", "output folder for the Parquet shards (local or object storage)")
    format: Literal["auto", "text", "tsv", "jsonl", "parquet"] = doc(
        "auto", "input format (auto: by extension; .tsv, .jsonl/.json, .parquet, anything else text, one per line)")
    text_field: str = doc("text", "column of the text (the first text of a pair)")
    pair_field: str | None = doc(None, "column of the second text of a pair (null: single texts)")
    question_field: str = doc("question", "question column, for a question-answering model")
    context_field: str = doc("context", "context column, for a question-answering model")
    id_field: str = doc("id", "id column copied to the output; rows without one get <file>:<line>")
    embeddings: Literal["cls", "mean"] | None = doc(None, "also write each input's vector: cls (final [CLS] "
                                                          "state) or mean (mean over tokens); sequence "
                                                          "classifiers only")
    max_seq_len: int | None = doc(None, "tokens per input, longer ones truncated (null: the length it was "
                                        "fine-tuned at, else 128, 384 for QA); a token tagger tags longer texts "
                                        "in windows of this many tokens instead")
    batch_size: int = doc(64, "sequences per forward pass (inputs are sorted by length first)")
    chunk_rows: int = doc(2048, "rows read, sorted and predicted together; bounds an actor's memory")
    rows_per_unit: int = doc(100_000, "Parquet inputs are cut into units of about this many rows at row-group "
                                      "edges (other files are one unit each)")
    actors: int = doc(0, "prediction actors (0: one per GPU, else one per whole CPU of the cluster; at most "
                                "one per unit)")
    cpus_per_actor: float = doc(1.0, "CPUs reserved per actor (fractions allowed)")
    threads: int = doc(0, "torch threads per actor (0: max(1, round(cpus_per_actor)))")
    use_gpu: bool | None = doc(None, "one GPU per actor (null: when the cluster has GPUs)")
    cache_dir: str | None = doc(None, "node-local cache for a downloaded model (null: a temp folder)")
    fail_units: tuple[int, ...] = doc((), "fault injection for tests: these units fail just before their "
                                           "shard is committed")

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "give the fine-tuned model folder")
        check(bool(self.input), "input", "give at least one input file, folder or glob")
        check(bool(self.output), "output", "give an output folder")
        for key in ("model", "input", "output", "cache_dir"):
            check_no_credentials(key, getattr(self, key))
        check(self.format in INPUT_FORMATS, "format", f"choose one of {', '.join(INPUT_FORMATS)}, got {self.format!r}")
        check(self.embeddings in (None, "cls", "mean"), "embeddings", f"cls, mean or null, got {self.embeddings!r}")
        for key in ("batch_size", "chunk_rows", "rows_per_unit"):
            check(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key,
                  f"must be a positive integer, got {getattr(self, key)!r}")
        check(self.actors >= 0, "actors", f"must be >= 0, got {self.actors}")
        check(self.cpus_per_actor > 0, "cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")

    def fields_for(self, kind: Kind) -> tuple[str, ...]:
        """The input column(s) a model of this kind reads."""
        if "question" in kind.inputs:
            return self.question_field, self.context_field
        if self.pair_field is None:
            return (self.text_field,)
        check("pairs" in kind.inputs, "pair_field", f"a {kind.what} model takes single texts, not pairs")
        return self.text_field, self.pair_field


def output_schema(loaded, embeddings: str | None) -> pa.Schema:
    """`id`, the kind's columns (`bertray.predict.outputs`), then `embedding` when asked for."""
    columns = [pa.field("id", pa.string()), *loaded.spec.columns(loaded)]
    if embeddings:
        columns.append(pa.field("embedding", pa.list_(pa.float32(), loaded.hidden_size)))
    return pa.schema(columns)


# --------------------------------------------------------------------------------------------
# One unit (no Ray): what each actor runs


def predict_rows(loaded, cfg: PredictConfig, rows, batch_sizes: list[int] | None = None):
    columns = list(zip(*(r.texts for r in rows)))
    return loaded.spec.run(loaded, columns, batch_size=cfg.batch_size, embeddings=cfg.embeddings,
                           batch_sizes=batch_sizes)


def predict_unit(loaded, cfg: PredictConfig, unit: shards.Unit, index: int) -> dict[str, Any]:
    """Predict one unit's rows into its shard; returns the shard's stats (also in its footer).
    A file that cannot be read (vanished, unreadable, without the configured columns) gives an
    empty shard whose stats say why; the job goes on."""
    started = time.perf_counter()
    schema = output_schema(loaded, cfg.embeddings)
    bad = BadRows()
    error = None
    with shards.ShardWriter(cfg.output, unit.shard, schema) as writer:
        chunk: list = []

        def flush() -> None:
            out = predict_rows(loaded, cfg, chunk)
            columns = {"id": [r.id for r in chunk], **loaded.spec.values(loaded, out)}
            if cfg.embeddings:
                columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(out.embedding, dtype=np.float32).reshape(-1)), loaded.hidden_size)
            writer.write(pa.table(columns, schema=schema))
            chunk.clear()

        try:
            for row in read_rows(unit.url, cfg.format, cfg.fields_for(loaded.spec), cfg.id_field, bad,
                                 row_groups=unit.row_groups):
                chunk.append(row)
                if len(chunk) >= cfg.chunk_rows:
                    flush()
        except (ConfigError, OSError, ValueError) as exc:     # the file, not one row: named, the job goes on
            error = f"{unit.url}: {type(exc).__name__}: {exc}"
            log.error("%s; the unit's shard is written with the rows read before", error)
        if chunk:
            flush()
        stats = {"source": unit.url, "part": unit.part, "rows": writer.rows, "skipped": bad.count,
                 "bad_rows": bad.named, "error": error, "seconds": round(time.perf_counter() - started, 3)}
        if index in cfg.fail_units:
            raise InjectedFault(f"injected failure of unit {index} ({unit.shard}) before its commit")
        writer.commit(stats)
    return {"shard": unit.shard, **stats}


class InjectedFault(RuntimeError):
    """Raised on purpose by `fail_units` (tests of re-running a job that died)."""


class UnitPredictor:
    """The Ray Data actor: the model loaded once, then one unit per call."""

    def __init__(self, cfg: PredictConfig, threads: int, device: str | None) -> None:
        from bertray.predict.model import load_model

        logging.basicConfig(level=logging.INFO)
        self.cfg = cfg
        self.loaded = load_model(cfg.model, device=device, max_seq_len=cfg.max_seq_len, cache_dir=cfg.cache_dir,
                                 threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = []
        for i, item in enumerate(batch["unit"]):
            unit = shards.Unit(**json.loads(item))
            groups = unit.row_groups
            unit = dataclasses.replace(unit, row_groups=tuple(groups) if groups is not None else None)
            results.append(predict_unit(self.loaded, self.cfg, unit, int(batch["index"][i])))
        return {"result": [json.dumps(r) for r in results]}


# --------------------------------------------------------------------------------------------
# The job


def check_rerun(cfg: PredictConfig) -> None:
    """Write the job's settings beside the shards, or check that a re-run repeats them."""
    from bertray.storage import exists, join_url, write_text

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k in _SAME_ON_RERUN}
    settings["input"] = list(settings["input"])
    url = join_url(cfg.output, JOB_FILE)
    if exists(url):
        import fsspec

        with fsspec.open(url, "r", encoding="utf-8") as f:
            before = json.load(f)
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ConfigError(f"output: {cfg.output} holds shards of another job ({', '.join(changed)} differ: "
                              + "; ".join(f"{k} was {before.get(k)!r}, now {settings[k]!r}" for k in changed)
                              + "); use a new output folder, or delete that one")
        return
    write_text(url, json.dumps(settings, indent=2) + "\n")


def run_prediction(cfg: PredictConfig) -> dict[str, Any]:
    """Run the job on the connected Ray cluster (`ray.init` first); returns the summary, also
    written to `<output>/_summary.json`."""
    import ray

    from bertray.data.sources import resolve_corpus
    from bertray.predict.kinds import read_head
    from bertray.storage import join_url, write_text
    from bertray.runtime.checkpoint_cache import local_checkpoint

    started = time.perf_counter()
    kind = read_head(local_checkpoint(cfg.model, cfg.cache_dir)).kind
    check(kind.embeddings or cfg.embeddings is None, "embeddings", f"not available for a {kind.what} model")
    # Local files by their plain paths: they name rows (<file>:<line>) and shards.
    files = [f.url.removeprefix("file://") for f in resolve_corpus(list(cfg.input))]
    formats = [file_format(url, cfg.format) for url in files]
    preflight(cfg, kind, files[0])
    check_rerun(cfg)
    units = shards.plan_units(files, formats, cfg.rows_per_unit)
    done = shards.finished_shards(cfg.output)
    todo = [(i, u) for i, u in enumerate(units) if u.shard not in done]
    log.info("%d input file(s), %d unit(s): %d already done, %d to predict", len(files), len(units),
             len(units) - len(todo), len(todo))
    results = []
    if todo:
        resources = ray.cluster_resources()
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) >= 1
        if use_gpu:
            actors = cfg.actors or int(resources.get("GPU", 1))
        else:
            actors = cfg.actors or max(1, int(resources.get("CPU", 1) // max(cfg.cpus_per_actor, 1.0)))
        actors = min(actors, len(todo))
        threads = cfg.threads or max(1, round(cfg.cpus_per_actor))
        items = [{"index": i, "unit": json.dumps(dataclasses.asdict(u))} for i, u in todo]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            UnitPredictor, batch_size=1, concurrency=actors, num_cpus=cfg.cpus_per_actor,
            num_gpus=1 if use_gpu else 0, fn_constructor_kwargs={"cfg": cfg, "threads": threads,
                                                                 "device": "cuda" if use_gpu else "cpu"})
        results = [json.loads(r["result"]) for r in dataset.take_all()]
    earlier = [{"shard": u.shard, **shards.shard_stats(cfg.output, u.shard)} for u in units if u.shard in done]
    every = sorted(results + earlier, key=lambda r: r["shard"])
    summary = {"model": cfg.model, "output": cfg.output, "files": len(files), "shards": len(units),
               "shards_written": len(results), "shards_skipped": len(earlier),
               "rows": sum(r["rows"] for r in every), "skipped_rows": sum(r["skipped"] for r in every),
               "bad_rows": [b for r in every for b in r["bad_rows"]][:100],
               "file_errors": [r["error"] for r in every if r.get("error")],
               "seconds": round(time.perf_counter() - started, 2)}
    write_text(join_url(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


def preflight(cfg: PredictConfig, kind: Kind, first_url: str) -> None:
    """Read the first rows of the first file on the driver: a wrong column name is a `ConfigError`
    before any actor starts, not an empty output."""
    fields = cfg.fields_for(kind)
    rows = read_rows(first_url, cfg.format, fields, cfg.id_field, BadRows())
    for _ in zip(range(1), rows):
        pass
