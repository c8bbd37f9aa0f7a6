"""What one phase's stream is, free of Ray: its `StreamSpec` (built from the run's data section and
the phase), the columns its rows carry, and which documents the held-out split keeps out of
training. `bertray.data.pipeline` runs a spec on Ray Data; the driver, the workers, tests and
benchmarks build and read specs without it.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from bertray.data.config import DataSection
from bertray.data.documents import CorpusLayout
from bertray.data.masking import MaskingConfig
from bertray.data.nsp import NSPConfig
from bertray.data.position import POSITION_COLUMNS, DataPosition
from bertray.data.seeding import stable_hash

if TYPE_CHECKING:
    from bertray.data.config import PhaseConfig

INSTANCE_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions",
                    "masked_lm_ids", "masked_lm_weights", "next_sentence_labels")   # what the model reads
TRAINER_COLUMNS = INSTANCE_COLUMNS + POSITION_COLUMNS
PROVENANCE_COLUMNS = ("doc_id", "b_doc_id", "a_start", "a_end", "b_start", "b_end", "pass_index")
SPLITS = ("train", "heldout")


def _data_default(name: str) -> Any:
    """A field of `StreamSpec` that mirrors one of `DataSection` takes that field's default: one
    source for each default."""
    (f,) = (f for f in dataclasses.fields(DataSection) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory)
    return f.default


@dataclass(frozen=True)
class StreamSpec:
    """Everything a pipeline run needs besides the files; built from the validated config
    (`stream_spec`), or directly in tests and benchmarks."""

    layout: CorpusLayout
    nsp: NSPConfig
    masking: MaskingConfig
    tokenizer_json: str                # the serialized `tokenizers.Tokenizer`: workers on any node can build it
    objective: str = _data_default("objective")
    corpus_format: str = _data_default("format")
    seed: int = 0
    generation: int = 0
    passes: int = 1
    docs_per_batch: int = _data_default("docs_per_batch")
    buffer_chars: int = _data_default("buffer_chars")
    files_per_read_task: int = _data_default("files_per_read_task")
    preserve_order: bool = _data_default("preserve_order")    # same instances in the same order on every run
    holdout_fraction: float = _data_default("holdout_fraction")   # share of documents kept out of training
    split: str = "train"               # "train": every document not held out; "heldout": only those
    read_cpus: float = _data_default("read_cpus")
    tokenizer_cpus: float = _data_default("tokenizer_cpus")
    tokenizer_actors: int = _data_default("tokenizer_actors")   # 0: an autoscaling pool of 1..(cluster CPUs) actors
    storage_options: Mapping[str, Any] = _data_default("storage_options")
    max_file_bytes: int | None = _data_default("max_file_bytes")
    resume: DataPosition | None = None # where a resumed run stands: finished units are not planned
    label_selector: Mapping[str, str] = _data_default("node_labels")   # the nodes the stages run on (none: any)


def read_spec(spec: StreamSpec) -> StreamSpec:
    """What the reading stage needs: no tokenizer, no resume bitmaps (each unit's row carries its own part)."""
    return dataclasses.replace(spec, tokenizer_json="", resume=None)


def stream_spec(data: DataSection, phase: "PhaseConfig", tokenizer_json: str, *, seed: int, generation: int,
                passes: int, resume: DataPosition | None = None,
                label_selector: Mapping[str, str] | None = None) -> StreamSpec:
    """The stream of one phase of the schedule (its sequence length and P) from the run's config."""
    return StreamSpec(
        layout=data.corpus_layout(), nsp=NSPConfig(max_seq_len=phase.max_seq_len, short_seq_prob=data.short_seq_prob),
        masking=data.masking(phase.max_predictions_per_seq if data.objective != "ltr" else phase.max_seq_len),
        tokenizer_json=tokenizer_json, objective=data.objective, corpus_format=data.format, seed=seed,
        generation=generation, passes=passes, docs_per_batch=data.docs_per_batch,
        buffer_chars=data.buffer_chars, preserve_order=data.preserve_order,
        files_per_read_task=data.files_per_read_task, read_cpus=data.read_cpus, tokenizer_cpus=data.tokenizer_cpus,
        tokenizer_actors=data.tokenizer_actors, storage_options=data.storage_options,
        holdout_fraction=data.holdout_fraction, max_file_bytes=data.max_file_bytes, resume=resume,
        label_selector=dict(data.node_labels if label_selector is None else label_selector))


_HOLDOUT_BUCKETS = 1 << 20


def holdout_key(url: str) -> str:
    """What the held-out choice hashes for a file: its folder and name, so the split does not change
    with where the corpus lies or how its path is spelled (`../data/x.txt`, `s3://bucket/data/x.txt`;
    for `s3://bucket/x` the bucket is the folder)."""
    parts = urlsplit(url)
    return "/".join(posixpath.normpath(f"{parts.netloc}/{parts.path}").split("/")[-2:])


def is_held_out(key: str, document_number: int, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a hash of (`holdout_key` of its file, its
    position in the file). The choice is the same in every process, pass and run, needs no index of
    the corpus, and takes documents from every file rather than whole files."""
    if fraction <= 0:
        return False
    return stable_hash(f"{key}#{document_number}") % _HOLDOUT_BUCKETS < fraction * _HOLDOUT_BUCKETS
