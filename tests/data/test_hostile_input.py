"""Input built to stall or crash a reader costs time linear in its size and loses only itself.

Caught on the code before this test: the sentence splitter's `[.!?]+...\\s+` backtracked, so a run
of punctuation cost time quadratic in its length (20,000 dots 4.4 s; a 1 M-character line of dots
would take hours); a deeply nested JSONL row raised RecursionError, which was not a bad row, so
the rest of its file was lost; every bad row logged its own warning."""

import json
import logging
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray.data import documents
from bertray.data.documents import LAYOUT_PRESETS, CorpusCounters, split_sentences
from bertray.data.formats import read_documents
from bertray.data.sources import CorpusFile

pytestmark = pytest.mark.timeout(120)

ADVERSARIAL = {
    "1 M dots": "." * 1_000_000,
    "1 M !? alternations": "!?" * 500_000,
    "dots and closing quotes": '."' * 500_000,
    "1 M spaces": " " * 1_000_000,
    "equals signs": "= " * 500_000,
    "chapter words": "CHAPTER " * 125_000,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_sentence_splitter_is_linear_on_runs_of_punctuation(name):
    started = time.perf_counter()
    split_sentences(ADVERSARIAL[name])
    assert time.perf_counter() - started < 2.0


def test_a_64_mi_character_row_splits_in_seconds():
    row = ("Word. " * 10 + "." * 1000 + " ") * ((64 << 20) // 1061)
    started = time.perf_counter()
    sentences = split_sentences(row)
    assert time.perf_counter() - started < 30.0
    assert len(sentences) > 100_000


def test_the_splitter_still_splits_as_before():
    assert split_sentences('He left... Then "Stop!" she said. Mr. Smith stayed. It cost 3.14 dollars.') == [
        "He left...", 'Then "Stop!" she said.', "Mr. Smith stayed.", "It cost 3.14 dollars."]


def test_every_pattern_applied_to_corpus_text_is_linear():
    """The layout presets' boundary and skip patterns, and the control-character cleaner, on lines as
    long as a text line may be (1 Mi characters; longer lines are cut before these run)."""
    patterns = [re.compile(p) for layout in LAYOUT_PRESETS.values()
                for p in (layout.boundary_pattern, layout.skip_pattern) if p]
    patterns.append(documents._REMOVED_RE)
    for line in ADVERSARIAL.values():
        for pattern in patterns:
            started = time.perf_counter()
            pattern.search(line)
            assert time.perf_counter() - started < 1.0, (pattern.pattern, line[:20])


def read_all(path, layout="paragraphs"):
    counters = CorpusCounters()
    docs = list(read_documents(CorpusFile(str(path), None, 0), LAYOUT_PRESETS[layout], counters))
    return docs, counters


def test_a_deeply_nested_jsonl_row_is_one_bad_row(tmp_path):
    path = tmp_path / "nested.jsonl"
    rows = [json.dumps({"text": "First document. It has two sentences."}), "[" * 200_000 + "]" * 200_000,
            json.dumps({"text": "Second document. Still read."})]
    path.write_text("\n".join(rows) + "\n")
    docs, counters = read_all(path)
    assert len(docs) == 2 and counters["bad_json_rows"] == 1 and counters["unreadable_files"] == 0


def test_bad_rows_are_counted_in_full_but_logged_a_few_times(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(["{not json"] * 1000 + [json.dumps({"text": "A good one. Yes."})]) + "\n")
    with caplog.at_level(logging.WARNING):
        docs, counters = read_all(path)
    assert counters["bad_json_rows"] == 1000 and len(docs) == 1
    lines = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert 1 <= len(lines) <= 6, lines
    assert any("1000" in line or "1,000" in line for line in lines), lines    # the total is said once


def test_an_oversized_parquet_value_is_skipped_and_counted(tmp_path, monkeypatch):
    from bertray.data import formats

    monkeypatch.setattr(formats, "MAX_ROW_CHARS", 1000)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["A short one. Fine.", "x" * 5000, "Another. Fine too."]}), path)
    docs, counters = read_all(path)
    assert len(docs) == 2 and counters["long_rows_skipped"] == 1


def test_a_decompression_bomb_is_cut_at_the_cap_and_named(tmp_path, caplog):
    import gzip

    path = tmp_path / "bomb.txt.gz"
    paragraph = ("A sentence that repeats. " * 40 + "\n\n").encode()
    with gzip.open(path, "wb") as f:
        for _ in range(4000):                        # ~4 MB of text from a ~10 kB file
            f.write(paragraph)
    counters = CorpusCounters()
    with caplog.at_level(logging.ERROR):
        docs = list(read_documents(CorpusFile(str(path), None, 0), LAYOUT_PRESETS["paragraphs"], counters,
                                   max_bytes=1 << 20))
    assert counters["oversized_files"] == 1 and 0 < counters["bytes"] <= 1 << 20
    assert docs                                      # what came before the cap is kept
    assert any(str(path) in r.getMessage() and "data.max_file_bytes" in r.getMessage() for r in caplog.records)


def test_a_corpus_that_yields_nothing_fails_loudly_before_the_run(tmp_path):
    """Every file unreadable (here: not gzip although named .gz, as a .zst without zstandard is) or
    empty: the start-up check raises, naming the first files and their errors."""
    from bertray.data.formats import preflight_layout
    from bertray.errors import CorpusError

    for i in range(5):
        (tmp_path / f"part-{i}.txt.gz").write_bytes(b"not gzip at all")
    files = [CorpusFile(str(p), None, i) for i, p in enumerate(sorted(tmp_path.iterdir()))]
    with pytest.raises(CorpusError) as err:
        preflight_layout(files, LAYOUT_PRESETS["paragraphs"])
    message = str(err.value)
    assert "5 of its 5 file(s) could not be read" in message and "part-0.txt.gz" in message
    assert "part-4" not in message                                  # the first three, not a flood

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n\n")
    with pytest.raises(CorpusError, match="gives no document"):
        preflight_layout([CorpusFile(str(empty / "a.txt"), None, 0)], LAYOUT_PRESETS["paragraphs"])


def test_a_run_that_trained_on_nothing_or_lost_too_many_files_is_an_error():
    from bertray.config import from_mapping
    from bertray.train.config import PretrainConfig
    from bertray.errors import CorpusError
    from bertray.train.pretrain import check_stream

    cfg = from_mapping(PretrainConfig, {"data": {"corpus": ["c.txt"]}})
    with pytest.raises(CorpusError, match="ended at step 0"):
        check_stream(cfg, {"step": 0}, {"files": 3, "unreadable_files": 3})
    with pytest.raises(CorpusError, match="2 of 10 file reads failed"):
        check_stream(cfg, {"step": 100}, {"files": 10, "unreadable_files": 1, "missing_files": 1})
    check_stream(cfg, {"step": 100}, {"files": 100, "unreadable_files": 1})     # 1% is within the 5% default


def test_only_regular_files_and_links_inside_the_corpus_are_listed(tmp_path, caplog):
    import os

    from bertray.data.sources import resolve_corpus

    corpus, outside = tmp_path / "corpus", tmp_path / "secret.txt"
    corpus.mkdir()
    outside.write_text("Not for training. Really.\n")
    (corpus / "a.txt").write_text("Fine text. Yes.\n")
    (corpus / "b.txt").symlink_to(corpus / "a.txt")               # a link inside the corpus: kept
    (corpus / "c.txt").symlink_to(outside)                        # out of the corpus: skipped
    (corpus / "zero.txt").symlink_to("/dev/zero")                 # a device: would never end
    os.mkfifo(corpus / "pipe.txt")                                # a FIFO: would block the reader forever
    with caplog.at_level(logging.WARNING):
        files = resolve_corpus(str(corpus))
    assert sorted(os.path.basename(f.url) for f in files) == ["a.txt", "b.txt"]
    text = caplog.text
    assert "pipe.txt: skipped, not a regular file" in text and "zero.txt: skipped" in text
    assert "c.txt: skipped, a symlink" in text


def test_the_start_up_read_has_a_time_limit_and_names_the_file(tmp_path):
    from bertray.data.formats import preflight_layout
    from bertray.errors import CorpusError

    (tmp_path / "ok.txt").write_text("")                          # empty: the check goes on to the next file
    stuck = tmp_path / "stuck.txt"
    os_mkfifo(stuck)                                              # open() blocks until a writer comes
    files = [CorpusFile(str(tmp_path / "ok.txt"), None, 0), CorpusFile(str(stuck), None, 1)]
    started = time.monotonic()
    with pytest.raises(CorpusError, match="did not finish within 1 s; it was reading .*stuck.txt"):
        preflight_layout(files, LAYOUT_PRESETS["paragraphs"], timeout_s=1)
    assert time.monotonic() - started < 10
    with open(stuck, "w"):                                        # release the blocked reader thread
        pass


def os_mkfifo(path):
    import os

    os.mkfifo(path)
