"""Entity grouping and token windows, without a model or Ray: the grouping rules against
`transformers`' own token-classification pipeline code on random tag sequences, and the cut of
long texts into windows at word boundaries."""

from __future__ import annotations

import random

import pytest

from bertray.predict.entities import Entity, TaggedToken, group_entities, split_tag
from bertray.predict.tagging import windows


def _token(tag: str, score: float, word: str, start: int) -> TaggedToken:
    return TaggedToken(tag, score, word, start, start + len(word.removeprefix("##")))


def test_simple_grouping_by_hand():
    wordpiece = lambda tokens: " ".join(tokens).replace(" ##", "")      # noqa: E731
    tokens = [_token("B-PER", 0.9, "andy", 0), _token("I-PER", 0.7, "cad", 5), _token("I-PER", 0.5, "##dick", 8),
              _token("O", 0.99, "took", 13), _token("B-LOC", 0.8, "leicester", 18), _token("B-LOC", 0.6, "essex", 28),
              _token("I-ORG", 0.4, "kent", 34), _token("B-ORG", 0.3, "surrey", 39)]
    got = group_entities(tokens, wordpiece)
    assert got == [Entity("PER", pytest.approx(0.7), "andy caddick", 0, 12),
                   Entity("LOC", 0.8, "leicester", 18, 27), Entity("LOC", 0.6, "essex", 28, 33),
                   Entity("ORG", 0.4, "kent", 34, 38), Entity("ORG", 0.3, "surrey", 39, 45)]
    assert got[0].as_dict() == {"entity_group": "PER", "score": pytest.approx(0.7), "word": "andy caddick",
                                "start": 0, "end": 12}
    # IO tags (no prefix) join runs of the same type; O-runs are dropped; nothing at all is fine.
    io = [_token("PER", 0.5, "a", 0), _token("PER", 0.7, "b", 2), _token("O", 0.9, "c", 4), _token("PER", 0.1, "d", 6)]
    assert [(e.entity_group, e.word, e.start, e.end) for e in group_entities(io)] == [("PER", "a b", 0, 3),
                                                                                      ("PER", "d", 6, 7)]
    assert group_entities([]) == []
    assert split_tag("B-MISC") == ("B", "MISC") and split_tag("O") == ("I", "O")
    assert split_tag("E-PER") == ("I", "E-PER")


def _pipeline_grouping(entities, join):
    """`transformers`' TokenClassificationPipeline.group_entities and its O filter, run on plain
    dicts: its methods bound to a stand-in that has only the tokenizer's join."""
    from types import SimpleNamespace

    from transformers.pipelines.token_classification import TokenClassificationPipeline as Pipeline

    class StandIn:
        tokenizer = SimpleNamespace(convert_tokens_to_string=join)
        get_tag = Pipeline.get_tag
        group_sub_entities = Pipeline.group_sub_entities
        group_entities = Pipeline.group_entities

    return [g for g in StandIn().group_entities(entities) if g["entity_group"] not in ("O",)]


def test_grouping_equals_the_pipeline_on_random_tag_sequences():
    import numpy as np

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "PER", "LOC", "E-LOC", "S-PER", "B-MISC", "I-MISC"]
    join = lambda tokens: " ".join(tokens).replace(" ##", "")      # noqa: E731
    for _ in range(500):
        n = rng.randint(0, 12)
        words = [rng.choice(["new", "york", "##er", "paris", "j", "##r", ",", "the"]) for _ in range(n)]
        tokens, at = [], 0
        for word in words:
            at += rng.choice([0, 1])
            tokens.append(TaggedToken(rng.choice(tags), rng.random(), word, at, at + len(word)))
            at += len(word)
        theirs = _pipeline_grouping([{"entity": t.tag, "score": np.float32(t.score), "word": t.word,
                                      "start": t.start, "end": t.end} for t in tokens], join)
        ours = group_entities(tokens, join)
        assert [(e.entity_group, e.word, e.start, e.end) for e in ours] == \
            [(g["entity_group"], g["word"], g["start"], g["end"]) for g in theirs], tokens
        np.testing.assert_allclose([e.score for e in ours], [float(g["score"]) for g in theirs], rtol=1e-6)


def test_windows_cut_at_word_boundaries_and_cover_every_token():
    assert windows([], 4) == []
    assert windows([0, 1, 2], 4) == [(0, 3)]
    assert windows([0, 0, 1, 1, 1, 2], 4) == [(0, 2), (2, 6)]               # word 1 would straddle: cut before it
    assert windows([0, 1, 1, 1, 1, 1, 2], 4) == [(0, 1), (1, 5), (5, 7)]    # word 1 is longer than a window
    assert windows([0] * 10, 4) == [(0, 4), (4, 8), (8, 10)]                # one word longer than a window
    rng = random.Random(1)
    for _ in range(200):
        word_ids = sorted(rng.randrange(30) for _ in range(rng.randrange(60)))
        budget = rng.randint(1, 9)
        cuts = windows(word_ids, budget)
        assert [i for a, b in cuts for i in range(a, b)] == list(range(len(word_ids)))
        assert all(0 < b - a <= budget for a, b in cuts)
        for a, _ in cuts[1:]:                              # a cut inside a word only for a word over budget
            if word_ids[a] == word_ids[a - 1]:
                assert word_ids.count(word_ids[a]) > budget
