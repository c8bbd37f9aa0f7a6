"""Reading a user's files (bertray.tasks.files): every format, compression, object storage, and
the position of every row, on real data (samples/ and ../shared/data) written out in each format."""

from __future__ import annotations

import csv
import gzip
import json
import pathlib

import pytest

from bertray.errors import TaskDataError
from bertray.tasks import files
from bertray.tasks.files import FileFormat, read_rows

REPO = pathlib.Path(__file__).resolve().parents[2]
SST2 = REPO / "samples" / "glue" / "SST-2" / "train.tsv"


def sst2_rows(n: int = 300) -> list[dict[str, str]]:
    with open(SST2, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    return [{"review": text.strip(), "sentiment": "positive" if label == "1" else "negative"} for text, label in rows]


def good(url, fmt=FileFormat()):
    return [r.fields for r in read_rows(str(url), fmt) if r.fields is not None]


def test_csv_follows_rfc4180_quoting_and_names_each_record_by_its_first_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"a, quoted ""field""",x\n"two\nlines",y\nplain,z\n,\n\nshort\nx,y,z\n',
                    encoding="utf-8")
    rows = list(read_rows(str(path), FileFormat()))
    assert [(r.line, r.fields) for r in rows[:3]] == [
        (2, {"text": 'a, quoted "field"', "label": "x"}), (3, {"text": "two\nlines", "label": "y"}),
        (5, {"text": "plain", "label": "z"})]
    assert (rows[3].line, rows[3].fields) == (6, {"text": "", "label": ""})     # empty, but two fields
    assert [(r.line, r.problem) for r in rows[4:]] == [(8, "expected 2 fields, found 1"),
                                                        (9, "expected 2 fields, found 3")]


def test_tsv_reads_quotes_as_written_by_csv_writers_or_as_plain_characters(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text('text\tlabel\n"he said ""hi"""\t1\n5 " tall\t0\n', encoding="utf-8")
    assert good(path) == [{"text": 'he said "hi"', "label": "1"}, {"text": '5 " tall', "label": "0"}]
    assert good(path, FileFormat(quote=False))[0] == {"text": '"he said ""hi"""', "label": "1"}


def test_header_less_files_name_columns_by_position_and_the_delimiter_is_an_option(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("great movie;1\nbad;0\n", encoding="utf-8")
    assert good(path, FileFormat(format="csv", header=False, delimiter=";")) == [
        {"0": "great movie", "1": "1"}, {"0": "bad", "1": "0"}]


def test_a_byte_order_mark_and_other_encodings(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nna\u00efve,1\n".encode("utf-8"))
    assert good(path) == [{"text": "na\u00efve", "label": "1"}]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9,1\n".encode("latin-1"))
    assert good(latin, FileFormat(encoding="latin-1")) == [{"text": "caf\u00e9", "label": "1"}]


def test_jsonl_skips_blank_lines_and_marks_broken_ones(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b"\n[1, 2]\n{"text": "c", "label": 0}\n')
    rows = list(read_rows(str(path), FileFormat()))
    assert [(r.line, r.problem is None) for r in rows] == [(1, True), (3, False), (4, False), (5, True)]
    assert rows[1].problem.startswith("not valid JSON") and rows[2].problem == "not a JSON object"


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_a_json_array_is_parsed_object_by_object_with_line_numbers(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(files, "_CHUNK_CHARS", chunk)      # objects straddle chunk boundaries
    records = sst2_rows(50)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    rows = list(read_rows(str(path), FileFormat()))
    assert [r.fields for r in rows] == records
    text = path.read_text().splitlines()
    assert all(text[r.line - 1].strip() == "{" for r in rows)     # each object's first line
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1},\n {"a": 2')
    with pytest.raises(TaskDataError, match=r"broken.json:2: not valid JSON"):
        list(read_rows(str(broken), FileFormat()))
    with pytest.raises(TaskDataError, match="expected a JSON array"):
        (tmp_path / "obj.json").write_text('{"a": 1}')
        list(read_rows(str(tmp_path / "obj.json"), FileFormat()))


def test_parquet_rows_in_batches_and_its_schema_as_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = sst2_rows(2500)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet", row_group_size=1000)
    rows = list(read_rows(str(tmp_path / "t.parquet"), FileFormat()))
    assert [r.fields for r in rows] == records and [r.line for r in rows[:3]] == [1, 2, 3]
    assert files.columns(str(tmp_path / "t.parquet"), FileFormat()) == ["review", "sentiment"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compression_is_inferred_from_the_name(tmp_path, suffix):
    import zstandard

    text = "review,sentiment\n" + "".join(f'"{r["review"]}",{r["sentiment"]}\n' for r in sst2_rows())
    path = tmp_path / f"t.csv{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix == ".gz"
                     else zstandard.ZstdCompressor().compress(text.encode()))
    assert files.format_of(str(path), FileFormat()) == "csv"
    assert good(path) == sst2_rows()


def test_conll_columns_become_one_row_per_sentence(tmp_path, shared_data):
    blocks = (shared_data / "conll2003" / "valid.txt").read_text().split("\n\n")[:6]
    path = tmp_path / "v.conll"
    path.write_text("\n\n".join(blocks) + "\n")
    rows = list(read_rows(str(path), FileFormat()))
    sentences = [b for b in blocks if not b.startswith("-DOCSTART-")]
    assert len(rows) == len(sentences)
    first = [line.split() for line in sentences[0].splitlines()]
    assert rows[0].fields == {"tokens": [w[0] for w in first], "tags": [w[-1] for w in first]}
    assert path.read_text().splitlines()[rows[0].line - 1].split()[0] == first[0][0]


def test_formats_from_names_and_clear_errors(tmp_path):
    assert [files.format_of(n, FileFormat()) for n in ("a.CSV", "s3://b/x.tsv.gz", "x.jsonl.zst", "x.parquet",
                                                       "x.json")] == ["csv", "tsv", "jsonl", "parquet", "json"]
    assert files.format_of("x.data", FileFormat(format="tsv")) == "tsv"
    with pytest.raises(TaskDataError, match="cannot tell the format.*give `format`"):
        files.format_of("x.data", FileFormat())
    with pytest.raises(TaskDataError, match=r"missing.csv: no such file"):
        list(read_rows(str(tmp_path / "missing.csv"), FileFormat()))
    with pytest.raises(TaskDataError, match=r"no such file \(nor the folder"):
        files.open_file(str(tmp_path / "nowhere" / "x.csv"))


def test_object_storage_reads_like_a_local_file(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    text = "review\tsentiment\n" + "".join(f'{r["review"]}\t{r["sentiment"]}\n' for r in sst2_rows())
    fs.pipe(f"{s3_bucket}/data/train.tsv.gz", gzip.compress(text.encode()))
    url = f"s3://{s3_bucket}/data/train.tsv.gz"
    assert good(url) == sst2_rows()
    assert files.columns(url, FileFormat()) == ["review", "sentiment"]
    with pytest.raises(TaskDataError, match=f"s3://{s3_bucket}/data/dev.tsv: no such file"):
        files.open_file(f"s3://{s3_bucket}/data/dev.tsv")
