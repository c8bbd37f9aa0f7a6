"""The Ray Data pipeline: corpus files -> documents -> token ids -> NSP instances -> masked batches.

The only module that knows Ray Data. Every stage is a pure function from `formats.py`, `documents.py`,
`nsp.py` and `masking.py`; this file decides where each runs (read tasks, then an actor pool that
tokenizes, pairs and masks), with how many CPUs, and how randomness is keyed. What a stream is (its
`StreamSpec`, its columns, the held-out split) is `stream_spec.py`.

Passes over the corpus are part of the dataset itself: the stream is a sequence of units, (pass,
group of files), each read by a task of its own and listed by one small task per pass
(`CorpusDatasource`), so a trainer consumes one long stream and every pass draws new NSP pairs and
masks (dynamic masking) from a seed derived from (run seed, generation, pass, file, document). Every row carries
its place in the stream (`bertray.data.position`); a resumed run plans only the units it has not
finished and drops the items it already trained on, so the stream continues where it stopped.
`generation` changes only when a run resumes from a checkpoint that has no data position.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from bertray.data.documents import CorpusCounters, DocumentPiece
from bertray.data.masking import OBJECTIVES, causal_lm_targets, mask_tokens
from bertray.data.nsp import make_nsp_instances, make_packed_instances
from bertray.data.seeding import derive_rng
from bertray.data.formats import read_documents
from bertray.data.sources import CorpusFile
from bertray.data.stream_spec import (INSTANCE_COLUMNS, PROVENANCE_COLUMNS, SPLITS, TRAINER_COLUMNS, StreamSpec,
                                      holdout_key, is_held_out, read_spec)
from bertray.labels import matches

log = logging.getLogger(__name__)

# Stage tags mixed into seeds so NSP pairing and masking never share a random stream.
_STAGE_READ, _STAGE_PAIR, _STAGE_MASK = 1, 2, 3


@ray.remote(num_cpus=0)
class PipelineCounters:
    """Sums the per-file and per-batch counters of every read task and stage, for the run summary."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def add(self, counts: Mapping[str, int]) -> None:
        for key, value in counts.items():
            self.totals[key] = self.totals.get(key, 0) + int(value)

    def get(self) -> dict[str, int]:
        return dict(self.totals)


MIN_BUFFER_DOCS = 8   # a buffer closed by size still offers random-next B's from 7 other documents


def _buffer_table(docs: list[list[str]], doc_ids: list[int], sources: list[int], pass_index: int, unit: int,
                  buffer: int, last: bool) -> pa.Table:
    """One row holds one whole NSP buffer. Ray Data batches rows by count, so were rows documents,
    a batch of 256 books would be hundreds of times the work of 256 tweets; as buffers, the reader
    decides their size and every actor call is of similar work, whatever the corpus."""
    return pa.table({
        "documents": pa.array([docs], type=pa.list_(pa.list_(pa.string()))),
        "doc_ids": pa.array([doc_ids], type=pa.list_(pa.int64())),
        "sources": pa.array([sources], type=pa.list_(pa.int64())),   # the id of the first piece of a cut document
        "pass_index": pa.array([pass_index], type=pa.int32()),
        "unit": pa.array([unit], type=pa.int64()),
        "buffer": pa.array([buffer], type=pa.int32()),
        "last_buffer": pa.array([last], type=pa.bool_()),
    })


def _file_group_buffers(files: Sequence[CorpusFile], spec: StreamSpec,
                        counters_actor: Any) -> Iterator[tuple[list, list, list]]:
    """Interleave the documents of a few files round-robin, so every buffer mixes documents from
    several files even when each file holds a single document; close a buffer at `docs_per_batch`
    documents or, once it holds `MIN_BUFFER_DOCS`, at `buffer_chars` characters. A closed buffer is
    held back until the next one closes, so that a remainder of fewer than `MIN_BUFFER_DOCS`
    documents at the end joins it instead of forming a pool too small for random-next B's."""
    counters = CorpusCounters()
    streams = {f.index: read_documents(f, spec.layout, counters, fmt=spec.corpus_format,
                                       storage_options=spec.storage_options, max_bytes=spec.max_file_bytes)
               for f in files}
    next_doc = {index: 0 for index in streams}
    source = {index: -1 for index in streams}
    docs: list[list[str]] = []
    ids: list[int] = []
    sources: list[int] = []
    held: tuple[list, list, list] | None = None
    chars = 0
    keys = {f.index: holdout_key(f.url) for f in files}
    want_held_out = spec.split == "heldout"
    while streams:
        for index in list(streams):
            doc = next(streams[index], None)
            if doc is None:
                del streams[index]
                continue
            doc_id = pack_doc_id(index, next_doc[index])
            if not isinstance(doc, DocumentPiece):
                source[index] = doc_id
            next_doc[index] += 1
            if is_held_out(keys[index], next_doc[index] - 1, spec.holdout_fraction) != want_held_out:
                continue
            docs.append(doc)
            ids.append(doc_id)
            sources.append(source[index])
            chars += sum(map(len, doc))
            if len(docs) >= spec.docs_per_batch or (chars >= spec.buffer_chars and len(docs) >= MIN_BUFFER_DOCS):
                if held is not None:
                    _send_counters(counters, counters_actor)
                    yield held
                held = (docs, ids, sources)
                docs, ids, sources, chars = [], [], [], 0
    _send_counters(counters, counters_actor)
    if held is not None and len(docs) < MIN_BUFFER_DOCS:
        docs, ids, sources = (a + b for a, b in zip(held, (docs, ids, sources)))
    elif held is not None:
        yield held
    if docs:
        yield docs, ids, sources


def _read_unit(files: Sequence[CorpusFile], pass_index: int, unit: int, spec: StreamSpec, counters_actor: Any,
               skip_buffers: frozenset[int] = frozenset()) -> Iterator[pa.Table]:
    """A unit's buffers, numbered, the last one flagged (one look-ahead). A unit that yields no
    document still sends one empty buffer, so the trainer learns that it ended. `skip_buffers`:
    buffers a resumed run trained on entirely; they are read (the numbering needs them) but not sent."""
    previous = None
    number = 0
    for number, buffer in enumerate(_file_group_buffers(files, spec, counters_actor)):
        if previous is not None and number - 1 not in skip_buffers:
            yield _buffer_table(*previous, pass_index, unit, number - 1, False)
        previous = buffer
    if previous is None:
        yield _buffer_table([], [], [], pass_index, unit, 0, True)
    elif number not in skip_buffers:
        yield _buffer_table(*previous, pass_index, unit, number, True)


def pack_doc_id(file_index: int, document: int) -> int:
    """A corpus-wide document id: the file's index in the corpus and the document's number in it."""
    return (file_index << 32) | document


def unpack_doc_id(doc_id: int) -> tuple[int, int]:
    return doc_id >> 32, doc_id & 0xFFFFFFFF


def _send_counters(counters: CorpusCounters, counters_actor: Any) -> None:
    """Hand the counts so far to the run's totals and zero them: sent with every buffer, they are
    complete up to what was consumed even when the consumer stops before the read task ends."""
    counts = {key: value for key, value in counters.as_dict().items() if value}
    if counts and counters_actor is not None:
        counters_actor.add.remote(counts)
    for key in counters:
        counters[key] = 0


class CorpusDatasource(Datasource):
    """The read plan, one small task per pass still to read. A pass's task lists its units (groups
    of file indices, in the pass's shuffled order, finished ones left out) as rows, and Ray splits
    its output into one block per unit, so `read_units` reads every unit in a task of its own. What
    Ray builds and ships before the first step is then a few hundred bytes per pass plus the file
    list, once, with the reading stage: flat in passes, whatever the number of files. A resumed
    stream (`spec.resume`) plans only the units it has not finished."""

    def __init__(self, files: int, spec: StreamSpec) -> None:
        super().__init__()
        self._files = files
        self._spec = spec

    @property
    def per_pass(self) -> int:
        return -(-self._files // max(1, self._spec.files_per_read_task))

    def passes(self) -> range:
        """The passes still to read, in stream order."""
        resume, per_pass = self._spec.resume, self.per_pass
        first = resume.done_below // per_pass if resume is not None and per_pass else 0
        return range(first, self._spec.passes if per_pass else 0)

    def plan(self, pass_index: int) -> "PassPlan":
        """What the task of one pass needs: its units' numbering, the shuffle seed, and the resume
        state of its own units only (finished ones, and buffers already trained on)."""
        spec, resume, per_pass = self._spec, self._spec.resume, self.per_pass
        first, end = pass_index * per_pass, (pass_index + 1) * per_pass
        done, skip = frozenset(), {}
        if resume is not None:
            first = max(first, resume.done_below)
            done = frozenset(u for u in resume.done if first <= u < end)
            # Skipping whole buffers changes which rows a unit sends; with preserve_order the trainer
            # mixes rows in windows counted from each unit's start, so there every row is sent again.
            if not spec.preserve_order:
                skip = {u: tuple(sorted(p.done)) for u, p in resume.units.items() if first <= u < end and p.done}
        return PassPlan(pass_index, self._files, max(1, spec.files_per_read_task), spec.seed, spec.generation,
                        first, done, skip)

    def estimate_inmemory_data_size(self) -> int | None:
        return None   # a pass's plan is a few bytes per unit; the corpus is read downstream

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for pass_index in self.passes():
            plan = self.plan(pass_index)
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            tasks.append(ReadTask(functools.partial(_pass_table, plan), meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "BertCorpusPlan"


@dataclass(frozen=True)
class PassPlan:
    """The units of one pass still to read (see `CorpusDatasource.plan`)."""

    pass_index: int
    files: int
    files_per_unit: int
    seed: int
    generation: int
    first_unit: int                                  # units below it are finished
    done: frozenset[int] = frozenset()               # finished units above `first_unit`
    skip: Mapping[int, tuple[int, ...]] = field(default_factory=dict)   # unit -> buffers trained on

    def units(self) -> Iterator[tuple[int, np.ndarray]]:
        """(unit, file indices) in stream order."""
        per_pass = -(-self.files // self.files_per_unit)
        order = derive_rng(self.seed, self.generation, self.pass_index, _STAGE_READ).permutation(self.files)
        for number in range(self.first_unit - self.pass_index * per_pass, per_pass):
            unit = self.pass_index * per_pass + number
            if unit not in self.done:
                yield unit, order[number * self.files_per_unit:(number + 1) * self.files_per_unit]


def _pass_table(plan: PassPlan) -> Iterator[pa.Table]:
    units = list(plan.units())
    yield pa.table({
        "pass_index": pa.array([plan.pass_index] * len(units), type=pa.int32()),
        "unit": pa.array([u for u, _ in units], type=pa.int64()),
        "files": pa.array([f.tolist() for _, f in units], type=pa.list_(pa.int64())),
        "skip": pa.array([list(plan.skip.get(u, ())) for u, _ in units], type=pa.list_(pa.int32())),
    })


def read_units(batch: pa.Table, files: Sequence[CorpusFile], spec: StreamSpec, counters_actor: Any) -> Iterator[pa.Table]:
    """The reading stage: each row of a pass's plan, one unit, becomes that unit's buffers."""
    for pass_index, unit, indices, skip in zip(*(batch.column(name).to_pylist()
                                                 for name in ("pass_index", "unit", "files", "skip"))):
        yield from _read_unit([files[i] for i in indices], pass_index, unit, spec, counters_actor, frozenset(skip))


class TokenizePairMask:
    """Tokenizer actor: one `tokenizers.Tokenizer` per actor (a shared one fails with
    "Already borrowed"), WordPiece over a whole buffer of documents, NSP pairing or packing, then
    the masks. Masking here rather than in tasks of its own saves a trip of every instance through
    the object store and a task per buffer; the masks are still drawn as the batch is produced."""

    def __init__(self, spec: StreamSpec, counters_actor: Any = None, columns: Sequence[str] = TRAINER_COLUMNS) -> None:
        from tokenizers import Tokenizer

        from bertray import wordpiece

        self.encode = wordpiece.encode_documents
        self.spec = spec
        self.tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        self.tokenizer.no_padding()      # sentences are packed into pairs later; a saved
        self.tokenizer.no_truncation()   # tokenizer.json may carry padding/truncation settings
        # "[SEP]" written in the corpus is text, as Google's tokenizer reads it, not a separator
        # inside A or B that no mask could ever pick.
        self.tokenizer.encode_special_tokens = True
        self.specials = wordpiece.special_tokens(self.tokenizer)
        self.is_subword = wordpiece.subword_mask(self.tokenizer) if spec.masking.whole_word else None
        self.counters = counters_actor
        # Selecting the columns here rather than with `select_columns` matters: that is a task of its
        # own asking for a whole CPU, which never gets one while the tokenizer actors and the trainer
        # hold the rest, so no batch would leave before the stream ended.
        self.columns = tuple(columns)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """Each buffer (row) on its own: two rows can be two passes over the same documents."""
        parts = [self._buffer(*row) for row in zip(*(batch.column(name).to_pylist() for name in (
            "documents", "doc_ids", "sources", "pass_index", "unit", "buffer", "last_buffer")))]
        return parts[0] if len(parts) == 1 else {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def _buffer(self, docs: list[list[str]], ids: list[int], sources: list[int], pass_index: int, unit: int,
                buffer: int, last: bool) -> dict[str, np.ndarray]:
        """A buffer's instances with their place in the stream; one marker row when it made none, so
        the trainer still sees the buffer (and, for the last one, the unit) end."""
        sp = self.specials
        out = mask_batch(self._pair(docs, np.asarray(ids, dtype=np.int64), sources, pass_index), self.spec,
                         sp.mask, self.tokenizer.get_vocab_size(), (sp.cls, sp.sep, sp.pad), self.is_subword,
                         self.counters)
        n = len(out["input_ids"])
        if n == 0:
            out = {key: np.zeros((1,) + value.shape[1:], dtype=value.dtype) for key, value in out.items()}
        rows = max(n, 1)
        out.update(unit=np.full(rows, unit, dtype=np.int64), buffer=np.full(rows, buffer, dtype=np.int32),
                   item=np.arange(rows, dtype=np.int32) if n else np.full(1, -1, dtype=np.int32),
                   buffer_items=np.full(rows, n, dtype=np.int32), last_buffer=np.full(rows, last, dtype=np.int8))
        return {key: out[key] for key in self.columns}

    def _pair(self, docs: list[list[str]], doc_ids: np.ndarray, sources: list[int],
              pass_index: int) -> dict[str, np.ndarray]:
        token_docs = self.encode(self.tokenizer, docs) if docs else []
        rng = derive_rng(self.spec.seed, self.spec.generation, pass_index,
                         *unpack_doc_id(int(doc_ids[0]) if len(doc_ids) else 0), _STAGE_PAIR)
        sp = self.specials
        if self.spec.objective == "mlm_nsp":
            out = make_nsp_instances(token_docs, rng, self.spec.nsp, cls_id=sp.cls, sep_id=sp.sep, pad_id=sp.pad,
                                     sources=sources)
        else:
            out = make_packed_instances(token_docs, max_seq_len=self.spec.nsp.max_seq_len,
                                        cls_id=sp.cls, sep_id=sp.sep, pad_id=sp.pad)
        # Instances come out document by document; shuffle them within the batch so that a
        # training batch mixes many documents instead of a few neighbouring chunks of one.
        order = rng.permutation(len(out["input_ids"]))
        counts = out.pop("counters", {})
        out = {key: value[order] for key, value in out.items()}
        counts.pop("documents", None)  # already counted by the reader
        counts["documents_without_tokens"] = counts.pop("empty_documents", 0)
        if self.counters is not None:
            self.counters.add.remote({**counts, "tokens": sum(len(s) for d in token_docs for s in d)})
        return _with_global_ids(out, doc_ids, pass_index)


def _with_global_ids(out: dict[str, np.ndarray], doc_ids: np.ndarray, pass_index: int) -> dict[str, np.ndarray]:
    """Batch-local document indices -> corpus-wide ids (file index << 32 | document number)."""
    out["doc_id"] = doc_ids[out.pop("doc_index")]
    b_index = out.pop("b_doc_index")
    out["b_doc_id"] = np.where(b_index >= 0, doc_ids[np.maximum(b_index, 0)], -1)
    out["pass_index"] = np.full(len(out["doc_id"]), pass_index, dtype=np.int32)
    return out


def mask_batch(batch: dict[str, np.ndarray], spec: StreamSpec, mask_id: int, vocab_size: int,
               special_ids: Sequence[int], is_subword: np.ndarray | None, counters_actor: Any) -> dict[str, np.ndarray]:
    """Masks for a batch of instances, drawn as it is produced, so every pass differs."""
    lengths = batch["lengths"]
    if spec.objective == "ltr":
        targets = causal_lm_targets(batch["input_ids"], lengths)
    else:
        first = int(batch["doc_id"][0]) if len(batch["doc_id"]) else 0
        rng = derive_rng(spec.seed, spec.generation, int(batch["pass_index"][0]) if len(lengths) else 0,
                         *unpack_doc_id(first), _STAGE_MASK)
        targets = mask_tokens(batch["input_ids"], lengths, rng, spec.masking, mask_id=mask_id,
                              vocab_size=vocab_size, special_ids=special_ids, is_subword=is_subword)
        counts = targets.pop("counters")
        if counters_actor is not None:
            counters_actor.add.remote(counts)
    out = {key: value for key, value in batch.items() if key != "lengths"}
    out.update(targets)
    seq = batch["input_ids"].shape[1]
    out["attention_mask"] = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int8)
    return out


def iter_local(files: Sequence[CorpusFile], spec: StreamSpec,
               columns: Sequence[str] = INSTANCE_COLUMNS) -> Iterator[dict[str, np.ndarray]]:
    """The same stages in this process, without Ray, in the order `preserve_order` delivers them:
    for benchmarks and tests that need the exact instances a run trains on (marker rows dropped)."""
    stage = TokenizePairMask(spec, None, tuple(dict.fromkeys((*columns, "buffer_items"))))
    source, reading = CorpusDatasource(len(files), spec), read_spec(spec)
    for task in source.get_read_tasks(1):
        for plan in task():
            for table in read_units(plan, files, reading, None):
                rows = drop_markers(stage(table))
                if len(rows["buffer_items"]):
                    yield {key: rows[key] for key in columns}


def drop_markers(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows that are instances: a marker row (`buffer_items == 0`) only says a buffer ended."""
    real = np.asarray(rows["buffer_items"]) > 0
    return dict(rows) if real.all() else {key: np.asarray(value)[real] for key, value in rows.items()}


def build_dataset(files: Sequence[CorpusFile], spec: StreamSpec, *, counters_actor: Any = None,
                  keep_provenance: bool = False) -> "ray.data.Dataset":
    """The streaming dataset of masked pretraining instances (lazy: nothing runs until iterated)."""
    if spec.objective not in OBJECTIVES:
        raise ValueError(f"objective {spec.objective!r}: choose one of {', '.join(OBJECTIVES)}")
    if spec.split not in SPLITS:
        raise ValueError(f"split {spec.split!r}: choose one of {', '.join(SPLITS)}")
    selector = dict(spec.label_selector)
    cpus = sum(n["Resources"].get("CPU", 0) for n in ray.nodes()
               if n.get("Alive") and matches(selector, n.get("Labels") or {}))
    pool = (ray.data.ActorPoolStrategy(size=spec.tokenizer_actors) if spec.tokenizer_actors > 0
            else ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cpus))))
    placement = {"label_selector": selector} if selector else {}
    columns = TRAINER_COLUMNS + (PROVENANCE_COLUMNS if keep_provenance else ())
    source = CorpusDatasource(len(files), spec)
    # One block per unit out of each pass's plan (Ray splits a read task's output into this many
    # blocks per task), so every unit is read by a task of its own, several at a time.
    ds = ray.data.read_datasource(source, num_cpus=spec.read_cpus,
                                  override_num_blocks=max(1, source.per_pass * len(source.passes())), **placement)
    ds = ds.map_batches(read_units, fn_args=(list(files), read_spec(spec), counters_actor), batch_size=1,
                        batch_format="pyarrow", num_cpus=spec.read_cpus, **placement)
    ds = ds.map_batches(TokenizePairMask, fn_constructor_args=(dataclasses.replace(spec, resume=None), counters_actor,
                                                               columns), batch_size=1,
                        batch_format="pyarrow", compute=pool, num_cpus=spec.tokenizer_cpus, **placement)
    ds.context.execution_options.preserve_order = spec.preserve_order
    return ds
