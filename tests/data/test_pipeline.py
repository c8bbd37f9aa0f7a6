"""bertray.data.pipeline on a real local Ray cluster, over the real corpus (local and loopback S3)."""

import dataclasses

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertray.data.documents import LAYOUT_PRESETS
from bertray.data.masking import MaskingConfig
from bertray.data.nsp import NSPConfig
from bertray.data.pipeline import PipelineCounters, build_dataset, pack_doc_id, unpack_doc_id
from bertray.data.stream_spec import TRAINER_COLUMNS, StreamSpec
from bertray.data.sources import resolve_corpus

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

SEQ, P = 64, 10


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


def spec_for(tokenizer, **overrides):
    base = dict(layout=LAYOUT_PRESETS["wikitext"], nsp=NSPConfig(max_seq_len=SEQ),
                masking=MaskingConfig(max_predictions_per_seq=P), tokenizer_json=tokenizer.to_str(),
                seed=7, passes=1, docs_per_batch=64, read_cpus=0.25, tokenizer_cpus=0.5, tokenizer_actors=1)
    return StreamSpec(**{**base, **overrides})


def rows_by_key(batch):
    """Rows keyed by provenance, so two executions compare whatever order blocks arrive in."""
    keys = zip(batch["pass_index"], batch["doc_id"], batch["a_start"], batch["a_end"])
    return {tuple(map(int, k)): i for i, k in enumerate(keys)}


def test_stream_of_masked_nsp_instances(ray_cluster, shared_data, tokenizer):
    files = resolve_corpus(str(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"))
    counters = PipelineCounters.remote()
    ds = build_dataset(files, spec_for(tokenizer), counters_actor=counters, keep_provenance=True)
    batch = ds.take_batch(100_000, batch_format="numpy")
    n = len(batch["input_ids"])
    assert n > 1000
    # Schema the trainer relies on.
    assert batch["input_ids"].shape == (n, SEQ) and batch["input_ids"].dtype == np.int32
    assert batch["masked_lm_positions"].shape == (n, P) and batch["masked_lm_ids"].dtype == np.int32
    assert batch["masked_lm_weights"].dtype == np.float32
    assert set(TRAINER_COLUMNS) <= set(batch)
    cls, sep, mask = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    lengths = batch["attention_mask"].sum(1)
    assert (batch["input_ids"][:, 0] == cls).all()
    assert (batch["input_ids"][np.arange(n), lengths - 1] == sep).all()
    # Labels: the original token sits at each real masked slot; [MASK] dominates the replacements.
    weights = batch["masked_lm_weights"] > 0
    picked = np.take_along_axis(batch["input_ids"], batch["masked_lm_positions"], 1)[weights]
    assert 0.7 < np.mean(picked == mask) < 0.9
    # NSP provenance: IsNext pairs continue the same document; NotNext pairs come from another one.
    is_next = batch["next_sentence_labels"] == 0
    assert (batch["b_doc_id"][is_next] == batch["doc_id"][is_next]).all()
    assert (batch["b_start"][is_next] == batch["a_end"][is_next]).all()
    assert (batch["b_doc_id"][~is_next] != batch["doc_id"][~is_next]).all()
    assert 0.4 < np.mean(~is_next) < 0.65
    totals = ray_cluster.get(counters.get.remote())
    assert totals["files"] == 1 and totals["documents"] > 50 and totals["tokens"] > 100_000


def test_passes_redraw_masks_and_runs_are_reproducible(ray_cluster, shared_data, tokenizer):
    files = resolve_corpus(str(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"))
    spec = spec_for(tokenizer, passes=2)
    first = build_dataset(files, spec, keep_provenance=True).take_batch(100_000, batch_format="numpy")
    again = build_dataset(files, spec, keep_provenance=True).take_batch(100_000, batch_format="numpy")
    a, b = rows_by_key(first), rows_by_key(again)
    assert a.keys() == b.keys()
    order = [b[k] for k in a]
    for column in TRAINER_COLUMNS:
        np.testing.assert_array_equal(first[column][list(a.values())], again[column][order], err_msg=column)
    passes = first["pass_index"]
    assert set(passes.tolist()) == {0, 1}
    # The second pass pairs and masks the same corpus differently.
    p0 = first["masked_lm_positions"][passes == 0]
    p1 = first["masked_lm_positions"][passes == 1]
    common = min(len(p0), len(p1))
    assert not np.array_equal(p0[:common], p1[:common])
    other_seed = build_dataset(files, spec_for(tokenizer, seed=8), keep_provenance=True).take_batch(
        100_000, batch_format="numpy")
    assert not np.array_equal(other_seed["masked_lm_positions"][:100], first["masked_lm_positions"][:100])


def test_preserve_order_gives_the_same_stream_in_the_same_order(ray_cluster, shared_data, tokenizer):
    """What makes a whole run reproducible: not only the same rows, the same rows in the same order,
    although two tokenizer actors finish their buffers in whatever order they like."""
    files = resolve_corpus(str(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"))
    spec = spec_for(tokenizer, passes=3, preserve_order=True, tokenizer_actors=2, tokenizer_cpus=0.25,
                    buffer_chars=200_000)
    runs = [build_dataset(files, spec, keep_provenance=True).take_batch(100_000, batch_format="numpy")
            for _ in range(2)]
    for column in TRAINER_COLUMNS + ("doc_id", "pass_index"):
        np.testing.assert_array_equal(runs[0][column], runs[1][column], err_msg=column)
    assert runs[0]["pass_index"].tolist() == sorted(runs[0]["pass_index"].tolist())   # read order


@pytest.mark.parametrize("objective", ["mlm", "ltr"])
def test_ablation_objectives(ray_cluster, shared_data, tokenizer, objective):
    files = resolve_corpus(str(shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"))
    masking = MaskingConfig(max_predictions_per_seq=SEQ if objective == "ltr" else P)
    batch = build_dataset(files, spec_for(tokenizer, objective=objective, masking=masking)).take_batch(
        256, batch_format="numpy")
    assert (batch["next_sentence_labels"] == -1).all()
    assert (batch["token_type_ids"] == 0).all()
    if objective == "ltr":
        # Every position predicts the next token; the input is not corrupted.
        ids, pos, labels, w = (batch[k] for k in ("input_ids", "masked_lm_positions", "masked_lm_ids",
                                                  "masked_lm_weights"))
        real = w > 0
        nxt = np.take_along_axis(ids, np.minimum(pos + 1, SEQ - 1), 1)
        assert (labels[real] == nxt[real]).all()
        assert real.sum(1).mean() > 0.6 * SEQ  # packed: whole sentences fill most of each sequence


def test_s3_corpus_through_the_pipeline(ray_cluster, s3_bucket, shared_data, tokenizer):
    import s3fs

    local = shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(local), f"{s3_bucket}/corpus/wiki.valid.raw")
    spec = spec_for(tokenizer)
    from_s3 = build_dataset(resolve_corpus(f"s3://{s3_bucket}/corpus/"), spec, keep_provenance=True)
    from_disk = build_dataset(resolve_corpus(str(local)), spec, keep_provenance=True)
    s3_rows = from_s3.take_batch(100_000, batch_format="numpy")
    disk_rows = from_disk.take_batch(100_000, batch_format="numpy")
    a, b = rows_by_key(s3_rows), rows_by_key(disk_rows)
    assert a.keys() == b.keys() and len(a) > 1000
    order = [b[k] for k in a]
    np.testing.assert_array_equal(s3_rows["input_ids"][list(a.values())], disk_rows["input_ids"][order])


def test_a_batch_spanning_two_passes_never_pairs_a_document_with_its_own_copy(tokenizer):
    """An actor's batch can hold buffers of two read tasks, pass 0 and pass 1 of the same documents;
    each buffer is paired on its own, so a NotNext B still comes from a different document."""
    import pyarrow as pa

    from bertray.data.pipeline import TokenizePairMask, _buffer_table

    docs = [[f"document {d} says sentence {s} about topic {d}." for s in range(12)] for d in range(2)]
    batch = pa.concat_tables([_buffer_table(docs, [0, 1], [0, 1], 0, 0, 0, True),
                             _buffer_table(docs, [0, 1], [0, 1], 1, 2, 0, True)])
    pair = TokenizePairMask(spec_for(tokenizer, nsp=NSPConfig(max_seq_len=24)),
                            columns=TRAINER_COLUMNS + ("doc_id", "b_doc_id", "pass_index"))
    not_next = 0
    for seed in range(20):
        pair.spec = spec_for(tokenizer, nsp=NSPConfig(max_seq_len=24), seed=seed)
        out = pair(batch)
        random_b = out["next_sentence_labels"] == 1
        assert not np.any(out["b_doc_id"][random_b] == out["doc_id"][random_b])
        assert set(out["pass_index"].tolist()) == {0, 1}
        not_next += int(random_b.sum())
    assert not_next > 50


@pytest.mark.parametrize("docs_per_batch, buffer_chars, sizes", [
    (4, 10**9, [4] * 6 + [6]),          # closed by document count; the last 2 join the buffer before
    (256, 5_000, [8] * 2 + [14]),       # closed by size once it holds 8 documents (~950 chars each)
    (256, 20_000, [21, 9]),             # closed by size: 21 x ~950 chars; 9 left is a pool of its own
    (32, 10**9, [30]),                  # never closed: one buffer
])
def test_buffers_close_by_count_or_by_size(tmp_path, tokenizer, docs_per_batch, buffer_chars, sizes):
    from bertray.data.pipeline import _read_unit

    text = "\n\n".join("\n".join(f"Document {d} has sentence number {s} in it." * 2 for s in range(12))
                       for d in range(30))
    (tmp_path / "c.txt").write_text(text + "\n")
    spec = spec_for(tokenizer, layout=LAYOUT_PRESETS["bert"], docs_per_batch=docs_per_batch, buffer_chars=buffer_chars)
    buffers = list(_read_unit(resolve_corpus(str(tmp_path / "c.txt")), 3, 7, spec, None))
    assert [b.column("doc_ids")[0].as_py().__len__() for b in buffers] == sizes
    assert all(b.num_rows == 1 and b.column("pass_index")[0].as_py() == 3 for b in buffers)
    # numbered within the unit, the last one flagged: how a worker knows the unit ended
    assert [(b["unit"][0].as_py(), b["buffer"][0].as_py(), b["last_buffer"][0].as_py()) for b in buffers] == \
        [(7, i, i == len(sizes) - 1) for i in range(len(sizes))]
    ids = [i for b in buffers for i in b.column("doc_ids")[0].as_py()]
    assert ids == list(range(30))          # every document once, in order, file index 0


def test_pieces_of_a_cut_book_share_a_source_and_never_pair_as_not_next(tmp_path, tokenizer):
    """Two books, one file each, cut at 8 sentences (max_document_sentences): every piece of a book
    carries the id of its first piece, and a NotNext B always comes from the other book."""
    from bertray.data.pipeline import TokenizePairMask, _read_unit

    for book in range(2):
        (tmp_path / f"book{book}.txt").write_text("\n\n".join(
            f"Book {book} paragraph {p} tells its own story." for p in range(40)) + "\n")
    layout = dataclasses.replace(LAYOUT_PRESETS["gutenberg"], max_document_sentences=8)
    spec = spec_for(tokenizer, layout=layout, nsp=NSPConfig(max_seq_len=32))
    (buffer,) = _read_unit(resolve_corpus(str(tmp_path)), 0, 0, spec, None)
    ids, sources = buffer.column("doc_ids")[0].as_py(), buffer.column("sources")[0].as_py()
    assert len(ids) == 10                                     # 2 books x 5 pieces, interleaved
    assert sorted(set(sources)) == [pack_doc_id(0, 0), pack_doc_id(1, 0)]   # each book's first piece
    assert all(unpack_doc_id(src)[0] == unpack_doc_id(i)[0] for i, src in zip(ids, sources))
    pair = TokenizePairMask(spec, columns=TRAINER_COLUMNS + ("doc_id", "b_doc_id"))
    not_next = 0
    for seed in range(10):
        pair.spec = dataclasses.replace(spec, seed=seed)
        out = pair(buffer)
        random_b = out["next_sentence_labels"] == 1
        assert np.all(unpack_doc_id(out["b_doc_id"][random_b])[0] != unpack_doc_id(out["doc_id"][random_b])[0])
        not_next += int(random_b.sum())
    assert not_next > 50


def test_special_tokens_written_in_the_corpus_are_text(tokenizer):
    """A literal "[SEP]" or "[MASK]" in a document is split like any bracketed word, so the only
    [CLS]/[SEP] ids of an instance are the ones its layout puts there."""
    from bertray.data.pipeline import TokenizePairMask, _buffer_table

    docs = [[f"Doc {d} line {s} has [SEP] and [MASK] and [CLS] inside." for s in range(6)] for d in range(3)]
    spec = spec_for(tokenizer, nsp=NSPConfig(max_seq_len=64))
    out = TokenizePairMask(spec)(_buffer_table(docs, [0, 1, 2], [0, 1, 2], 0, 0, 0, True))
    sep, cls = tokenizer.token_to_id("[SEP]"), tokenizer.token_to_id("[CLS]")
    assert np.all((out["input_ids"] == cls).sum(1) == 1) and np.all((out["input_ids"] == sep).sum(1) == 2)


def test_a_resumed_unit_skips_finished_buffers_and_an_empty_unit_still_reports_its_end(tmp_path, tokenizer):
    from bertray.data.pipeline import TokenizePairMask, _read_unit

    text = "\n\n".join(f"Document {d} has a sentence. And another one here." for d in range(20))
    (tmp_path / "c.txt").write_text(text + "\n")
    (tmp_path / "empty.txt").write_text("\n\n\n")
    spec = spec_for(tokenizer, layout=LAYOUT_PRESETS["bert"], docs_per_batch=4)
    files = resolve_corpus(str(tmp_path / "c.txt"))
    numbers = [b["buffer"][0].as_py() for b in _read_unit(files, 0, 0, spec, None, skip_buffers=frozenset({0, 2}))]
    assert numbers == [1, 3, 4]
    (empty,) = _read_unit(resolve_corpus(str(tmp_path / "empty.txt")), 0, 5, spec, None)
    out = TokenizePairMask(spec)(empty)
    assert out["buffer_items"].tolist() == [0] and out["item"].tolist() == [-1] and out["last_buffer"].tolist() == [1]
    assert out["input_ids"].shape == (1, spec.nsp.max_seq_len)


def plan_rows(spec, files):
    """The unit rows of every pass task of a stream's plan, as (pass, unit, file indices, skip)."""
    from bertray.data.pipeline import CorpusDatasource

    rows = []
    for task in CorpusDatasource(files, spec).get_read_tasks(1):
        for table in task():
            rows += zip(*(table.column(c).to_pylist() for c in ("pass_index", "unit", "files", "skip")))
    return rows


def test_the_plan_is_one_small_task_per_pass_and_a_resumed_one_leaves_out_finished_units(tokenizer):
    """What Ray builds before the first step: one task per pass, of the same size for 10 or 100,000
    files (the file list travels once, with the reading stage); each pass lists every file once, in
    its own order. A resumed plan starts at the first unfinished pass, leaves out finished units and
    names the buffers of units in flight that were trained on (not with preserve_order, where the
    trainer needs every row of a unit again)."""
    from ray import cloudpickle

    from bertray.data.pipeline import CorpusDatasource
    from bertray.data.position import DataPosition, StreamLayout, UnitProgress

    spec = spec_for(tokenizer, passes=3, files_per_read_task=4)
    sizes = {n: {len(cloudpickle.dumps(t)) for t in CorpusDatasource(n, spec).get_read_tasks(1)}
             for n in (10, 100_000)}
    assert len(sizes[10]) == 1 and max(sizes[100_000]) - min(sizes[10]) < 16 and max(sizes[10]) < 1000
    rows = plan_rows(spec, 10)
    assert [(p, u) for p, u, _, _ in rows] == [(p, p * 3 + n) for p in range(3) for n in range(3)]
    for p in range(3):
        assert sorted(i for q, _, f, _ in rows if q == p for i in f) == list(range(10))
        assert [len(f) for q, _, f, _ in rows if q == p] == [4, 4, 2]
    assert rows[0][2] != rows[3][2]                                   # a new order every pass

    position = DataPosition(StreamLayout(files=10, files_per_unit=4, seed=7), done_below=4, done={7},
                            units={5: UnitProgress(done={0, 2})})
    resumed = plan_rows(dataclasses.replace(spec, resume=position), 10)
    assert [(p, u, s) for p, u, _, s in resumed] == [(1, 4, []), (1, 5, [0, 2]), (2, 6, []), (2, 8, [])]
    assert {u: f for _, u, f, _ in resumed} == {u: f for _, u, f, _ in rows if u in (4, 5, 6, 8)}
    ordered = plan_rows(dataclasses.replace(spec, resume=position, preserve_order=True), 10)
    assert [s for *_, s in ordered] == [[], [], [], []]
