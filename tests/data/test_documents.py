"""Tests of bertray/data/documents.py (and the bytes -> lines step of bertray/data/formats.py):
bytes -> lines -> cleaned sentences -> documents."""

from __future__ import annotations

import math
import pathlib
import tracemalloc

import pytest

from bertray.config import from_mapping
from bertray.data.documents import (
    LAYOUT_PRESETS, CorpusCounters, CorpusLayout, clean_text, documents_from_text, iter_documents,
    layout_warning, split_sentences,
)
from bertray.data.formats import iter_lines
from bertray.errors import ConfigError


def lines_of(data: bytes, chunk: int = 7, max_line_chars: int = 1000, counters=None) -> list[str]:
    counters = CorpusCounters() if counters is None else counters
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return list(iter_lines(chunks, counters, max_line_chars=max_line_chars))


def docs_of(text: str, layout: CorpusLayout, counters=None) -> list[list[str]]:
    counters = CorpusCounters() if counters is None else counters
    return list(iter_documents(text.split("\n"), layout, counters))


def read_file(path: pathlib.Path, layout: CorpusLayout, counters: CorpusCounters) -> list[list[str]]:
    def chunks():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                yield chunk

    lines = iter_lines(chunks(), counters, max_line_chars=1 << 20)
    return list(iter_documents(lines, layout, counters, source=str(path)))


# --------------------------------------------------------------------------------------------
# CorpusLayout and counters


def test_layout_validation_names_the_key():
    with pytest.raises(ConfigError, match="boundary_pattern"):
        CorpusLayout(document_boundary="pattern")
    with pytest.raises(ConfigError, match="boundary_pattern"):
        CorpusLayout(boundary_pattern="^=")
    with pytest.raises(ConfigError, match="skip_pattern.*regular expression"):
        CorpusLayout(skip_pattern="([")
    with pytest.raises(ConfigError, match="line_unit"):
        CorpusLayout(line_unit="wrapped")                   # blank lines cannot end both
    with pytest.raises(ConfigError, match="max_sentence_chars"):
        CorpusLayout(max_sentence_chars=0)
    with pytest.raises(ConfigError, match="max_document_sentences"):
        CorpusLayout(max_document_sentences=1)
    with pytest.raises(ConfigError, match="line_unit"):
        from_mapping(CorpusLayout, {"line_unit": "words"})
    layout = from_mapping(CorpusLayout, {"document_boundary": "file", "line_unit": "wrapped"})
    assert layout == CorpusLayout(document_boundary="file", line_unit="wrapped")


def test_presets_exist_and_are_valid():
    assert {"bert", "wikitext", "gutenberg", "paragraphs"} <= set(LAYOUT_PRESETS)
    for layout in LAYOUT_PRESETS.values():
        assert isinstance(layout, CorpusLayout)


def test_counters_merge_and_default():
    a = CorpusCounters(lines=3)
    b = CorpusCounters(lines=2, documents=1)
    b["custom"] += 4                                        # unknown keys start at 0
    assert a.merge(b) is a
    assert a["lines"] == 5 and a["documents"] == 1 and a["custom"] == 4
    assert a.as_dict()["lines"] == 5 and type(a.as_dict()) is dict
    assert CorpusCounters()["never_seen"] == 0


# --------------------------------------------------------------------------------------------
# iter_lines


def test_utf8_split_across_chunks_decodes():
    text = "héllo wörld € 𝄞\nzweite Zeile ÄÖÜ\n"
    data = text.encode("utf-8")
    for chunk in (1, 2, 3, 5):
        counters = CorpusCounters()
        assert lines_of(data, chunk, counters=counters) == ["héllo wörld € 𝄞", "zweite Zeile ÄÖÜ"]
        assert counters["invalid_utf8"] == 0
        assert counters["bytes"] == len(data) and counters["lines"] == 2 and counters["files"] == 1


def test_invalid_bytes_are_replaced_and_counted():
    counters = CorpusCounters()
    data = b"ok\xff\xfe bad\nfine\n\xe2\x82"                # two bad bytes, a truncated euro at EOF
    assert lines_of(data, 3, counters=counters) == ["ok\ufffd\ufffd bad", "fine", "\ufffd"]
    assert counters["invalid_utf8"] == 3


def test_genuine_replacement_character_is_not_counted():
    data = "a\ufffdb\n".encode("utf-8") * 3
    for chunk in (1, 2, 4, 100):
        counters = CorpusCounters()
        assert lines_of(data, chunk, counters=counters) == ["a\ufffdb"] * 3
        assert counters["invalid_utf8"] == 0


def test_crlf_missing_final_newline_empty_file_and_nul():
    assert lines_of(b"one\r\ntwo\r\nthree") == ["one", "two", "three"]
    counters = CorpusCounters()
    assert lines_of(b"", counters=counters) == []
    assert counters["files"] == 1 and counters["lines"] == 0
    assert lines_of(b"\n") == [""]
    assert lines_of(b"a\x00b\n\x00\n") == ["a\x00b", "\x00"]
    assert lines_of(b"x\n\ny\n") == ["x", "", "y"]


def test_overlong_line_is_cut_into_pieces_at_spaces():
    counters = CorpusCounters()
    text = " ".join(f"w{i:05d}" for i in range(5000))    # 35k chars, no newline
    pieces = lines_of(text.encode() + b"\nnext\n", 4096, max_line_chars=1000, counters=counters)
    assert pieces[-1] == "next"
    assert all(len(p) <= 1000 for p in pieces)
    assert " ".join(pieces[:-1]) == text                    # every cut fell on (and dropped) a space
    assert counters["long_lines_cut"] == 1 and counters["lines"] == 2


def test_overlong_line_without_spaces_is_cut_hard():
    counters = CorpusCounters()
    pieces = lines_of(b"x" * 2500, 64, max_line_chars=1000, counters=counters)
    assert [len(p) for p in pieces] == [1000, 1000, 500]
    assert counters["long_lines_cut"] == 1


def test_overlong_line_is_never_held_whole():
    chunk = b"word " * 13_000                               # 65 kB
    chunk_count = 300                                       # a 19.5 MB line

    def chunks():
        for _ in range(chunk_count):
            yield chunk

    counters = CorpusCounters()
    tracemalloc.start()
    try:
        words = 0
        for piece in iter_lines(chunks(), counters, max_line_chars=10_000):
            assert len(piece) <= 10_000
            words += piece.count("word")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert words == 13_000 * chunk_count                   # nothing lost, no word split
    assert peak < 2_000_000, f"peak {peak} bytes: the line was buffered"
    assert counters["long_lines_cut"] == 1


# --------------------------------------------------------------------------------------------
# clean_text and split_sentences


def test_clean_text_removes_and_counts_control_characters():
    counters = CorpusCounters()
    assert clean_text("\ufeffa\x00b\x07c\tand\x1b[0m  d\x7f\r\x0c e ", counters) == "abc and[0m d e"
    assert counters["control_chars_removed"] == 5            # BOM, NUL, BEL, ESC, DEL
    assert clean_text("  x\ufffdy  ", counters) == "x\ufffdy"  # invalid bytes stay visible
    assert clean_text("\x00\x00", counters) == ""


SPLIT_CASES = [
    ("Hello world. This is a test.", ["Hello world.", "This is a test."]),
    ("Mr. Smith met Dr. Jones at St. Paul's. They talked.", ["Mr. Smith met Dr. Jones at St. Paul's.", "They talked."]),
    ("Prof. X and Mrs. Y came. Jr. Z did not.", ["Prof. X and Mrs. Y came.", "Jr. Z did not."]),
    ("The value is 3.14 today. Next one.", ["The value is 3.14 today.", "Next one."]),
    ("He served in the U.S. Army for years. Then he retired.",
     ["He served in the U.S. Army for years.", "Then he retired."]),
    ("J. R. R. Tolkien wrote it. It sold well.", ["J. R. R. Tolkien wrote it.", "It sold well."]),
    ('She said "Stop!" Then she left.', ['She said "Stop!"', "Then she left."]),
    ("Really?! Yes. (Maybe.) Fine...", ["Really?!", "Yes.", "(Maybe.)", "Fine..."]),
    ("Wait... What happened?", ["Wait...", "What happened?"]),
    ("Fruit, e.g. Apples, etc. Are fine. Vegetables, i.e. Kale, too.",
     ["Fruit, e.g. Apples, etc. Are fine.", "Vegetables, i.e. Kale, too."]),
    ("Smith vs. Jones was decided. It mattered.", ["Smith vs. Jones was decided.", "It mattered."]),
    ("It cost $4.50 in 2020. In 2021 it rose.", ["It cost $4.50 in 2020.", "In 2021 it rose."]),
    ("He came. \u201cNo,\u201d she said.", ["He came.", "\u201cNo,\u201d she said."]),
    ("lower case after a stop. does not split", ["lower case after a stop. does not split"]),
    ("the sea . It is related .", ["the sea .", "It is related ."]),   # WikiText tokenization
    ("No terminal punctuation", ["No terminal punctuation"]),
    ("", []),
]


@pytest.mark.parametrize("paragraph,expected", SPLIT_CASES)
def test_split_sentences_hand_made(paragraph, expected):
    assert split_sentences(paragraph) == expected


def test_split_sentences_on_real_text(shared_data):
    wiki = (shared_data / "corpus/wikitext-2-raw/wiki.valid.raw").read_text("utf-8").split("\n")
    first = split_sentences(wiki[3].strip())
    assert first == [
        "Homarus gammarus , known as the European lobster or common lobster , is a species of clawed "
        "lobster from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea .",
        "It is closely related to the American lobster , H. americanus .",
        "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) , and bears a "
        "conspicuous pair of claws .",
        "In life , the lobsters are blue , only becoming \" lobster red \" on cooking .",
        "Mating occurs in the summer , producing eggs which are carried by the females for up to a year "
        "before hatching into planktonic larvae .",
        "Homarus gammarus is a highly esteemed food , and is widely caught using lobster pots , mostly "
        "around the British Isles .",
    ]
    emma = (shared_data / "corpus/gutenberg/austen-emma.txt").read_text("utf-8")
    paragraph = next(" ".join(p.split()) for p in emma.split("\n\n") if p.startswith("Sixteen years"))
    assert split_sentences(paragraph) == [
        "Sixteen years had Miss Taylor been in Mr. Woodhouse's family, less as a governess than a friend, "
        "very fond of both daughters, but particularly of Emma.",
        "Between _them_ it was more the intimacy of sisters.",
        "Even before Miss Taylor had ceased to hold the nominal office of governess, the mildness of her "
        "temper had hardly allowed her to impose any restraint; and the shadow of authority being now long "
        "passed away, they had been living together as friend and friend very mutually attached, and Emma "
        "doing just what she liked; highly esteeming Miss Taylor's judgment, but directed chiefly by her own.",
    ]


# --------------------------------------------------------------------------------------------
# iter_documents and documents_from_text


def test_bert_layout_documents_and_empty_documents():
    text = "\n".join([
        "First sentence.", "Second sentence.", "", "", "",
        "Other doc.", "",
        "\x00\x01", "",                                     # junk: a document that cleans to nothing
        "  ", "Last doc one.", "Last doc two.",
    ])
    counters = CorpusCounters()
    docs = docs_of(text, LAYOUT_PRESETS["bert"], counters)
    assert docs == [["First sentence.", "Second sentence."], ["Other doc."], ["Last doc one.", "Last doc two."]]
    assert counters["documents"] == 3 and counters["sentences"] == 5
    assert counters["empty_documents"] == 1                 # runs of blank lines are not documents
    assert counters["single_sentence_documents"] == 1
    assert counters["control_chars_removed"] == 2


def test_long_documents_and_sentences_are_cut_and_counted():
    layout = CorpusLayout(max_document_sentences=2, max_sentence_chars=10)
    counters = CorpusCounters()
    docs = docs_of("a\nb\nc\nd\ne\n\nf\n\nabcdef ghijklmnop qrstuvwxyz0123", layout, counters)
    assert docs == [["a", "b"], ["c", "d"], ["e"], ["f"], ["abcdef", "ghijklmnop"], ["qrstuvwxyz", "0123"]]
    assert counters["long_documents_cut"] == 2
    assert counters["long_sentences_cut"] == 1
    assert counters["giant_document_sentences"] == 9        # the cut documents' sentences
    assert counters["single_sentence_documents"] == 1       # "f"; the tail "e" belongs to a cut document


def test_pattern_layout_with_skipped_headings():
    text = "\n".join([
        " ", " = First = ", " ", " Para one . Still one . ", " ", " = = Section = = ", " ",
        " Para two . ", " = = = Deeper = = = ", " Para three . ",
        " = Empty = ", " ", " = Second = ", " Only . Two .",
    ])
    counters = CorpusCounters()
    docs = docs_of(text, LAYOUT_PRESETS["wikitext"], counters)
    assert docs == [["Para one .", "Still one .", "Para two .", "Para three ."], ["Only .", "Two ."]]
    assert counters["skipped_lines"] == 2 and counters["empty_documents"] == 1


def test_wrapped_paragraphs_in_one_document_per_file():
    text = ("Title line\n\nThe first paragraph is\nwrapped over lines. And has\ntwo sentences.\n\n\n"
            "CHAPTER II\n\nNext one.")
    counters = CorpusCounters()
    docs = docs_of(text, LAYOUT_PRESETS["gutenberg"], counters)
    assert docs == [["Title line", "The first paragraph is wrapped over lines.", "And has two sentences.", "Next one."]]
    assert counters["skipped_lines"] == 1
    counters = CorpusCounters()
    assert docs_of("\n\n", LAYOUT_PRESETS["gutenberg"], counters) == []
    assert counters["empty_documents"] == 1                  # an empty file is an empty document


def test_wrapped_paragraph_without_end_stays_bounded():
    layout = CorpusLayout(document_boundary="file", line_unit="wrapped", max_sentence_chars=200)
    lines = [f"Sentence number {i} is here." for i in range(3000)]   # one 80 kB paragraph
    counters = CorpusCounters()
    docs = list(iter_documents(iter(lines), layout, counters))
    sentences = [s for d in docs for s in d]
    assert sentences == lines
    assert counters["long_sentences_cut"] == 0


def test_documents_from_text_rows():
    counters = CorpusCounters()
    row = "First paragraph. It has two sentences.\n\nSecond paragraph here.\n"
    assert documents_from_text(row, LAYOUT_PRESETS["paragraphs"], counters) == [
        ["First paragraph.", "It has two sentences.", "Second paragraph here."]]
    assert documents_from_text("  \n\x00", LAYOUT_PRESETS["paragraphs"], counters) == []
    assert counters["records"] == 2 and counters["empty_documents"] == 1 and counters["documents"] == 1
    # A row is one document even when the layout's boundary is a pattern or blank lines.
    assert len(documents_from_text(" = T = \nA b. C d.\n\nE f.", LAYOUT_PRESETS["wikitext"], counters)) == 1


# --------------------------------------------------------------------------------------------
# Real corpora and the layout warning


def test_wikitext_preset_on_real_files(shared_data):
    counters = CorpusCounters()
    valid = read_file(shared_data / "corpus/wikitext-2-raw/wiki.valid.raw", LAYOUT_PRESETS["wikitext"], counters)
    assert len(valid) == 60                                 # the 60 articles of WikiText-2 valid
    assert valid[0][0].startswith("Homarus gammarus , known as the European lobster")
    sentences = [s for d in valid for s in d]
    assert 7000 < len(sentences) < 10000
    assert not any(s.startswith("=") for s in sentences)    # titles and headings are gone
    assert counters["skipped_lines"] > 500 and counters["single_sentence_documents"] == 0
    assert sum(s[-1] in ".!?\"')" for s in sentences) > 0.95 * len(sentences)
    assert layout_warning(counters) is None
    test = read_file(shared_data / "corpus/wikitext-2-raw/wiki.test.raw", LAYOUT_PRESETS["wikitext"], counters)
    assert 58 <= len(test) <= 64                            # 60 articles (+2 "= formula =" lines)


def test_gutenberg_preset_on_real_files(shared_data):
    layout = LAYOUT_PRESETS["gutenberg"]
    for name in ("austen-emma.txt", "melville-moby_dick.txt", "bible-kjv.txt", "blake-poems.txt"):
        counters = CorpusCounters()
        docs = read_file(shared_data / "corpus/gutenberg" / name, layout, counters)
        sizes = [len(d) for d in docs]
        assert all(s == layout.max_document_sentences for s in sizes[:-1]), name
        assert len(docs) == math.ceil(counters["sentences"] / layout.max_document_sentences)
        assert counters["long_documents_cut"] == (len(docs) > 1)
        assert counters["giant_document_sentences"] == 0     # long books are expected in this layout
        assert not any("\r" in s or "\n" in s or "  " in s for d in docs for s in d)
        assert layout_warning(counters) is None, name
    assert len(docs) == 1 and docs[0][0] == "[Poems by William Blake 1789]"  # blake-poems: one document
    bible = read_file(shared_data / "corpus/gutenberg/bible-kjv.txt", layout, CorpusCounters())
    assert len(bible) >= 10 and bible[0][:2] == ["[The King James Bible]", "The Old Testament of the King James Bible"]


def test_layout_warning_fires_for_blank_lines_between_sentences(shared_data, tmp_path):
    wiki = read_file(shared_data / "corpus/wikitext-2-raw/wiki.valid.raw", LAYOUT_PRESETS["wikitext"],
                     CorpusCounters())[:20]
    good = "\n\n".join("\n".join(doc) for doc in wiki) + "\n"
    bad = "\n\n".join(s for doc in wiki for s in doc) + "\n"
    for text, fires in ((good, False), (bad, True)):
        path = tmp_path / "corpus.txt"
        path.write_text(text, encoding="utf-8")
        counters = CorpusCounters()
        read_file(path, LAYOUT_PRESETS["bert"], counters)
        warning = layout_warning(counters)
        assert (warning is not None) == fires
    assert "single sentence" in warning and "NotNext" in warning


def test_layout_warning_fires_for_one_giant_document():
    counters = CorpusCounters()
    lines = [f"Sentence {i}." for i in range(5000)]         # no blank line anywhere
    docs = list(iter_documents(lines, CorpusLayout(max_document_sentences=100), counters))
    assert len(docs) == 50
    assert "max_document_sentences" in layout_warning(counters)
