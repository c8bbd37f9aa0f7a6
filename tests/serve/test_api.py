"""The service's request checks and answer schema per kind of model, without Ray or a model:
which inputs each kind takes (and the 422 naming the field otherwise), and that each kind's
answers keep their own shape in the response."""

from __future__ import annotations

import pytest

from bertray.predict.kinds import KINDS
from bertray.serve.api import FieldError, MultilabelPrediction, Prediction, PredictRequest, PredictResponse, \
    TokenPrediction, check_request
from bertray.serve.settings import ServeSettings

SETTINGS = ServeSettings(model="m", max_items=3, max_text_chars=20)
TEXTS = PredictRequest(texts=["a", "b"])
PAIRS = PredictRequest(pairs=[("a", "b")])
QUESTION = PredictRequest(question="who?", context="me")


@pytest.mark.parametrize("kind, request_, accepted, message", [
    ("classification", TEXTS, True, ""), ("classification", PAIRS, True, ""),
    ("classification", QUESTION, False, "this is a classification model: send texts or pairs"),
    ("multilabel", TEXTS, True, ""), ("multilabel", PAIRS, True, ""),
    ("multilabel", QUESTION, False, "this is a multilabel classification model: send texts or pairs"),
    ("token", TEXTS, True, ""),
    ("token", PAIRS, False, "this is a token-classification model: send texts"),
    ("token", QUESTION, False, "this is a token-classification model: send texts"),
    ("span", QUESTION, True, ""),
    ("span", TEXTS, False, "this is a question-answering model: send question and context"),
])
def test_each_kind_takes_its_inputs(kind, request_, accepted, message):
    if accepted:
        name, rows = check_request(request_, SETTINGS, KINDS[kind])
        assert name in KINDS[kind].inputs and rows
        return
    with pytest.raises(FieldError) as caught:
        check_request(request_, SETTINGS, KINDS[kind])
    field = "question" if request_ is QUESTION else "texts" if request_ is TEXTS else "pairs"
    assert (caught.value.field, caught.value.status, caught.value.message) == (field, 422, message)


def test_limits_still_hold_for_the_new_kinds():
    for kind in ("token", "multilabel"):
        with pytest.raises(FieldError) as caught:
            check_request(PredictRequest(texts=["x"] * 4), SETTINGS, KINDS[kind])
        assert (caught.value.field, caught.value.status) == ("texts", 413)
        with pytest.raises(FieldError) as caught:
            check_request(PredictRequest(texts=["ok", "y" * 21]), SETTINGS, KINDS[kind])
        assert caught.value.field == "texts[1]"


def test_answers_keep_their_kind_in_the_response():
    entity = {"entity_group": "PER", "score": 0.9, "word": "angela merkel", "start": 0, "end": 13}
    response = PredictResponse(model="m", predictions=[
        {"label": "positive", "score": 0.8, "scores": None},
        {"labels": ["sports"], "scores": {"sports": 0.7, "politics": 0.2}},
        {"entities": [entity]}, {"entities": []}])
    assert [type(p) for p in response.predictions] == [Prediction, MultilabelPrediction, TokenPrediction,
                                                       TokenPrediction]
    assert response.model_dump()["predictions"] == [
        {"label": "positive", "score": 0.8, "scores": None},
        {"labels": ["sports"], "scores": {"sports": 0.7, "politics": 0.2}},
        {"entities": [entity]}, {"entities": []}]
