"""The held-out split (`data.holdout_fraction`) and the in-process stream `iter_local`, without Ray."""

import dataclasses

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertray.data.config import DataSection, PhaseConfig
from bertray.data.pipeline import iter_local, unpack_doc_id
from bertray.data.stream_spec import PROVENANCE_COLUMNS, TRAINER_COLUMNS, holdout_key, stream_spec
from bertray.data.stream_spec import is_held_out as _is_held_out
from bertray.data.sources import resolve_corpus
from bertray.errors import ConfigError

SEQ, P = 64, 10


def is_held_out(url, number, fraction):
    return _is_held_out(holdout_key(url), number, fraction)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


def test_held_out_share_is_the_fraction_and_stable():
    n, fraction = 20_000, 0.1
    held = sum(is_held_out("s3://bucket/shard-0007.txt", i, fraction) for i in range(n))
    # Binomial(n, 0.1): sd = 42; 5 sd either side.
    assert abs(held - n * fraction) < 5 * np.sqrt(n * fraction * (1 - fraction))
    assert not any(is_held_out("s3://bucket/shard-0007.txt", i, 0.0) for i in range(1000))
    again = [is_held_out("s3://bucket/shard-0007.txt", i, fraction) for i in range(200)]
    assert again == [is_held_out("s3://bucket/shard-0007.txt", i, fraction) for i in range(200)]
    other = [is_held_out("s3://bucket/shard-0008.txt", i, fraction) for i in range(200)]
    assert again != other   # every file contributes different documents
    # Where the corpus lies and how its path is spelled do not change the split.
    for spelling in ("file:///data/../mnt/bucket/shard-0007.txt", "/srv/bucket/shard-0007.txt", "gs://x/bucket/shard-0007.txt"):
        assert [is_held_out(spelling, i, fraction) for i in range(200)] == again


def test_holdout_fraction_is_validated():
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        DataSection(corpus=("x.txt",), holdout_fraction=0.7)
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        DataSection(corpus=("x.txt",), holdout_fraction=-0.1)


def _documents(files, data, tokenizer, split):
    spec = dataclasses.replace(stream_spec(data, PhaseConfig(max_seq_len=SEQ, max_predictions_per_seq=P),
                                           tokenizer.to_str(), seed=3, generation=0, passes=1), split=split)
    parts = list(iter_local(files, spec, columns=TRAINER_COLUMNS + PROVENANCE_COLUMNS))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def test_train_and_heldout_splits_partition_the_documents(shared_data, tokenizer):
    files = resolve_corpus(str(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"))
    data = DataSection(corpus=(files[0].url,), layout="wikitext", holdout_fraction=0.2)
    train = _documents(files, data, tokenizer, "train")
    held = _documents(files, data, tokenizer, "heldout")
    everything = _documents(files, dataclasses.replace(data, holdout_fraction=0.0), tokenizer, "train")
    train_docs, held_docs = set(train["doc_id"].tolist()), set(held["doc_id"].tolist())
    assert train_docs and held_docs and not train_docs & held_docs
    # No text crosses the split: random-next B's also come from the same split.
    assert not set(train["b_doc_id"][train["b_doc_id"] >= 0].tolist()) & held_docs
    assert not set(held["b_doc_id"][held["b_doc_id"] >= 0].tolist()) & train_docs
    all_docs = set(everything["doc_id"].tolist())
    assert train_docs | held_docs == all_docs
    assert 0.1 < len(held_docs) / len(all_docs) < 0.3
    numbers = {unpack_doc_id(d)[1] for d in all_docs}
    assert {unpack_doc_id(d)[1] for d in held_docs} == {n for n in numbers if is_held_out(files[0].url, n, 0.2)}


def test_iter_local_is_the_stream_a_run_reads(shared_data, tokenizer):
    """Deterministic, and shaped as the trainer expects."""
    files = resolve_corpus(str(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"))
    data = DataSection(corpus=(files[0].url,), layout="wikitext")
    first, again = (_documents(files, data, tokenizer, "train") for _ in range(2))
    for key in TRAINER_COLUMNS:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert first["input_ids"].shape[1] == SEQ and first["masked_lm_positions"].shape[1] == P
