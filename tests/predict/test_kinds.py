"""The one decision from a saved model's config.json to the kind of predictor built for it, without
a model or Ray: every head a sweep saves, the multilabel threshold, and the clear refusals."""

from __future__ import annotations

import pytest

from bertray.errors import CheckpointError, ConfigError
from bertray.predict.kinds import DEFAULT_THRESHOLD, head_of, read_head

LABELS = {"0": "neg", "1": "pos"}


@pytest.mark.parametrize("config, kind, labels", [
    ({"architectures": ["BertForSequenceClassification"], "id2label": LABELS}, "classification", ("neg", "pos")),
    ({"architectures": ["BertForSequenceClassification"], "id2label": LABELS,
      "problem_type": "single_label_classification"}, "classification", ("neg", "pos")),
    ({"architectures": ["BertForSequenceClassification"], "problem_type": "regression"}, "regression", ()),
    ({"architectures": ["BertForSequenceClassification"], "id2label": {"0": "score"}}, "regression", ("score",)),
    ({"architectures": ["BertForSequenceClassification"], "problem_type": "multi_label_classification",
      "id2label": {"1": "b", "0": "a", "10": "k", "2": "c"}}, "multilabel", ("a", "b", "c", "k")),
    ({"architectures": ["BertForQuestionAnswering"]}, "span", ()),
    ({"architectures": ["BertForTokenClassification"], "id2label": {"0": "O", "1": "B-PER"}}, "token", ("O", "B-PER")),
    ({"architectures": ["BertFeatureBasedTagger"], "id2label": {"0": "O", "1": "B-PER"}}, "token", ("O", "B-PER")),
])
def test_each_saved_head_gets_its_kind(config, kind, labels):
    head = head_of(config)
    assert head.kind.name == kind and head.labels == labels
    assert head.architecture == config["architectures"][0]
    assert (head.threshold is not None) == (kind == "multilabel")


def test_kinds_say_what_they_take():
    token = head_of({"architectures": ["BertForTokenClassification"], "id2label": {"0": "O"}}).kind
    assert token.inputs == ("texts",) and not token.embeddings and token.inputs_text == "texts"
    span = head_of({"architectures": ["BertForQuestionAnswering"]}).kind
    assert span.inputs_text == "question and context"
    multilabel = head_of({"architectures": ["BertForSequenceClassification"], "id2label": LABELS,
                          "problem_type": "multi_label_classification"}).kind
    assert multilabel.inputs == ("texts", "pairs") and multilabel.embeddings


def test_multilabel_threshold():
    base = {"architectures": ["BertForSequenceClassification"], "id2label": LABELS,
            "problem_type": "multi_label_classification"}
    assert head_of(base).threshold == DEFAULT_THRESHOLD == 0.5
    assert head_of({**base, "threshold": 0.3}).threshold == 0.3
    assert head_of({**base, "threshold": 0}).threshold == 0.0
    for bad in (1.0, -0.1, "0.5", True, None, float("nan")):
        with pytest.raises(ConfigError, match="threshold"):
            head_of({**base, "threshold": bad})


def test_refusals_name_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="BertForMultipleChoice is not supported for prediction: a multiple-choice"):
        head_of({"architectures": ["BertForMultipleChoice"]})
    with pytest.raises(ConfigError, match="pretraining checkpoint"):
        head_of({"architectures": ["BertModel"]})
    with pytest.raises(ConfigError, match="at least 2 label"):
        head_of({"architectures": ["BertForSequenceClassification"]})
    with pytest.raises(ConfigError, match="token-classification head needs at least 1 label"):
        head_of({"architectures": ["BertForTokenClassification"]})
    with pytest.raises(ConfigError, match="id2label"):
        head_of({"architectures": ["BertForTokenClassification"], "id2label": {"first": "O"}})
    with pytest.raises(CheckpointError, match="no config.json"):
        read_head(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_head(tmp_path)
