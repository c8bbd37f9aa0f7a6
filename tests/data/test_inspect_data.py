"""flows/inspect_data.py on a real local Ray: what it prints and writes lets a reader check every
pair against the source text, and the counters cover what was read even though it stops early."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "samples" / "corpus" / "wikitext-2" / "wiki.valid.raw"


def _flow():
    spec = importlib.util.spec_from_file_location("inspect_flow", REPO / "flows" / "inspect_data.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    return flow


def _contains(whole: list[int], part: list[int]) -> bool:
    return any(whole[i:i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def test_instances_point_back_to_their_source_sentences(ray_cluster, tmp_path, capsys):
    from bertray import wordpiece
    from bertray.data.documents import LAYOUT_PRESETS, CorpusCounters
    from bertray.data.formats import read_documents
    from bertray.data.sources import resolve_corpus

    out = tmp_path / "instances.json"
    assert _flow().main(["--corpus", str(CORPUS), "--num", "12", "--json", str(out), "--run.output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "[CLS]" in printed and "{" in printed and ("IsNext" in printed or "NotNext" in printed)
    result = json.loads(out.read_text())
    assert len(result["instances"]) == 12
    assert result["counters"]["documents"] > 0 and result["counters"]["instances"] >= 12

    tokenizer = wordpiece.load(REPO / "samples" / "corpus" / "wikitext-2" / "vocab-8192")
    specials = wordpiece.special_tokens(tokenizer)
    documents = list(read_documents(resolve_corpus(str(CORPUS))[0], LAYOUT_PRESETS["wikitext"], CorpusCounters()))
    for instance in result["instances"]:
        ids = list(instance["input_ids"])
        for position, label in zip(instance["masked_lm_positions"], instance["masked_lm_ids"]):
            ids[position] = label                                   # undo the masks
        first_sep = ids.index(specials.sep)
        assert ids[0] == specials.cls and ids[-1] == specials.sep
        assert instance["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        for side, tokens in (("a", ids[1:first_sep]), ("b", ids[first_sep + 1:-1])):
            where = instance[side]
            doc = documents[where["document"]]
            start, end = where["sentences"]
            source = [t for s in doc[start:end] for t in tokenizer.encode(s, add_special_tokens=False).ids]
            assert tokens and _contains(source, tokens), (side, where)   # truncation trims the ends only
        b_doc = instance["b"]["doc_id"]
        assert (b_doc != instance["a"]["doc_id"]) == (instance["next_sentence_label"] == 1)
        if instance["next_sentence_label"] == 0:                     # IsNext: B starts where A ends
            assert instance["b"]["sentences"][0] == instance["a"]["sentences"][1]
    assert np.mean([i["next_sentence_label"] for i in result["instances"]]) > 0
