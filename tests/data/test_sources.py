"""bertray.data.sources and bertray.data.formats: URL resolution, formats, compression, object storage, bad input."""

import bz2
import gzip
import json
import lzma
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray.data.documents import LAYOUT_PRESETS, CorpusCounters
from bertray.data.formats import detect_format, preflight_layout, read_documents
from bertray.data.sources import CorpusFile, resolve_corpus
from bertray.errors import CorpusError

BERT = LAYOUT_PRESETS["bert"]
TEXT = "The first sentence.\nThe second one.\n\nAnother document starts.\nIt ends here.\n"


def docs_of(url, layout=BERT, fmt="auto", **kw):
    counters = CorpusCounters()
    files = resolve_corpus(url, **kw)
    docs = [d for f in files for d in read_documents(f, layout, counters, fmt=fmt, **kw)]
    return docs, counters


def test_directory_glob_and_file_resolution(tmp_path):
    (tmp_path / "b.txt").write_text(TEXT)
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text(TEXT)
    (tmp_path / ".hidden.txt").write_text(TEXT)
    (tmp_path / "_SUCCESS").write_text("")
    for hidden in (".git", "_temporary"):          # whole directories of tool litter
        (tmp_path / hidden).mkdir()
        (tmp_path / hidden / "part-0.txt").write_text(TEXT)
    files = resolve_corpus(str(tmp_path))
    names = [f.url.rsplit("/", 1)[-1] for f in files]
    assert names == ["a.txt", "b.txt", "c.txt"]
    assert [f.index for f in files] == [0, 1, 2]
    assert all(f.size == len(TEXT) for f in files)
    assert len(resolve_corpus(str(tmp_path / "*.txt"))) == 2
    assert len(resolve_corpus(str(tmp_path / "**" / "*.txt"))) == 3
    assert len(resolve_corpus([str(tmp_path / "a.txt"), str(tmp_path / "a.txt")])) == 1


def test_bert_layout_documents(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    docs, counters = docs_of(str(tmp_path / "c.txt"))
    assert docs == [["The first sentence.", "The second one."], ["Another document starts.", "It ends here."]]
    assert counters["files"] == 1 and counters["documents"] == 2 and counters["sentences"] == 4


@pytest.mark.parametrize("suffix,compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
    (".zst", lambda b: __import__("zstandard").ZstdCompressor().compress(b)),
])
def test_compressed_files_by_extension(tmp_path, suffix, compress, shared_data):
    raw = (shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw").read_bytes()
    plain, compressed = tmp_path / "wiki.txt", tmp_path / f"wiki.txt{suffix}"
    plain.write_bytes(raw)
    compressed.write_bytes(compress(raw))
    layout = LAYOUT_PRESETS["wikitext"]
    expected, _ = docs_of(str(plain), layout)
    got, _ = docs_of(str(compressed), layout)
    assert len(expected) > 50 and got == expected


def test_jsonl_rows_with_bad_records_are_counted(tmp_path, caplog):
    rows = [json.dumps({"text": "Alpha one. Alpha two.\nAlpha three."}), "{not json",
            json.dumps({"body": "no text field"}), "", json.dumps({"text": "Beta one. Beta two."})]
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(rows).encode()))
    assert detect_format(str(path)) == "jsonl"
    docs, counters = docs_of(str(path))
    assert docs == [["Alpha one.", "Alpha two.", "Alpha three."], ["Beta one.", "Beta two."]]
    assert counters["bad_json_rows"] == 1 and counters["rows_without_text"] == 1
    assert f"{path}:2: skipped a malformed JSON row" in caplog.text.replace("file://", "")
    assert ":3: skipped a row without a string field 'text'" in caplog.text


def test_an_overlong_jsonl_row_is_skipped_whole_and_named(tmp_path, caplog, monkeypatch):
    """A row over the limit is one skipped row with its own line number, not pieces counted as
    malformed rows that shift the numbers of the rows after it."""
    from bertray.data import formats

    monkeypatch.setattr(formats, "MAX_ROW_CHARS", 200)
    long_row = json.dumps({"text": "Word " * 100 + "end."})                      # 500+ characters
    rows = [json.dumps({"text": "Alpha one. Alpha two."}), long_row, "{not json",
            json.dumps({"text": "Beta one. Beta two."}), long_row]                 # the last has no newline
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(rows))
    docs, counters = docs_of(str(path))
    assert docs == [["Alpha one.", "Alpha two."], ["Beta one.", "Beta two."]]
    assert counters["long_rows_skipped"] == 2 and counters["bad_json_rows"] == 1
    assert counters["long_lines_cut"] == 0 and counters["lines"] == 5
    text = caplog.text.replace("file://", "")
    assert f"{path}:2: skipped a JSON row longer than 200 characters" in text
    assert f"{path}:5: skipped a JSON row longer than 200 characters" in text
    assert f"{path}:3: skipped a malformed JSON row" in text


def test_parquet_rows(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["One here. Two here.", None, "Three here."]}), path)
    layout = BERT.__class__(**{**BERT.__dict__, "text_field": "content"})
    docs, counters = docs_of(str(path), layout)
    assert docs == [["One here.", "Two here."], ["Three here."]]
    assert counters["rows_without_text"] == 1
    # A shard without the column is skipped and counted mid-run; the preflight refuses to start on it.
    docs, counters = docs_of(str(path))
    assert docs == [] and counters["files_without_text_column"] == 1
    with pytest.raises(CorpusError, match="no column 'text' holds the text; set data.text_field"):
        preflight_layout(resolve_corpus(str(path)), BERT)


def test_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/part-0.txt", TEXT.encode())
    docs, _ = docs_of("memory://corpus/")
    assert len(docs) == 2


def test_bad_bytes_are_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"Good line here.\nBad \xff\xfe bytes\x00 and\x07 bells.\n\n\n\nSecond doc.\n")
    docs, counters = docs_of(str(path))
    assert docs[0][0] == "Good line here."
    assert "\x00" not in docs[0][1] and "\x07" not in docs[0][1]
    assert counters["invalid_utf8"] == 2 and counters["control_chars_removed"] >= 2
    assert docs[1] == ["Second doc."]


def test_empty_file_gives_no_documents(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    docs, counters = docs_of(str(tmp_path / "empty.txt"))
    assert docs == [] and counters["files"] == 1 and counters["documents"] == 0


def test_file_that_disappears_is_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "gone.txt"
    path.write_text(TEXT)
    [file] = resolve_corpus(str(path))
    path.unlink()
    counters = CorpusCounters()
    assert list(read_documents(file, BERT, counters)) == []
    assert counters["missing_files"] == 1
    assert "disappeared after the corpus was listed" in caplog.text


def test_nothing_matches(tmp_path):
    with pytest.raises(CorpusError, match=r"matches no file"):
        resolve_corpus(str(tmp_path / "nothing-*.txt"))
    with pytest.raises(CorpusError, match=r"matches no file"):
        resolve_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(CorpusError, match="no corpus given"):
        resolve_corpus([])


def test_s3_corpus_on_loopback_server(s3_bucket, shared_data):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    local = shared_data / "corpus" / "wikitext-2-raw" / "wiki.valid.raw"
    fs.put_file(str(local), f"{s3_bucket}/wiki/valid.raw")
    fs.pipe(f"{s3_bucket}/wiki/small.txt.gz", gzip.compress(TEXT.encode()))
    files = resolve_corpus(f"s3://{s3_bucket}/wiki/")
    assert [f.url for f in files] == [f"s3://{s3_bucket}/wiki/small.txt.gz", f"s3://{s3_bucket}/wiki/valid.raw"]
    layout = LAYOUT_PRESETS["wikitext"]
    expected, _ = docs_of(str(local), layout)
    counters = CorpusCounters()
    assert list(read_documents(files[1], layout, counters)) == expected
    assert len(list(read_documents(files[0], BERT, counters))) == 2


def test_s3_missing_bucket_and_prefix_are_clear_errors(s3_bucket):
    with pytest.raises(CorpusError, match=r"s3://no-such-bucket-bertray/corpus/"):
        resolve_corpus("s3://no-such-bucket-bertray/corpus/")
    with pytest.raises(CorpusError, match=rf"s3://{s3_bucket}/absent/: matches no file"):
        resolve_corpus(f"s3://{s3_bucket}/absent/")


def test_endpoint_that_never_answers_fails_in_bounded_time():
    """A TCP server that accepts connections and never replies: the listing must give up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    started = time.time()
    try:
        with pytest.raises(CorpusError, match=r"s3://silent-bucket/x/"):
            resolve_corpus("s3://silent-bucket/x/", timeout_s=4,
                           storage_options={"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                                            "config_kwargs": {"read_timeout": 1, "connect_timeout": 1,
                                                              "retries": {"max_attempts": 1}}})
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert time.time() - started < 10


def test_corpus_file_is_plain_data():
    f = CorpusFile(url="file:///x.txt", size=3, index=0)
    assert f == CorpusFile(url="file:///x.txt", size=3, index=0)
