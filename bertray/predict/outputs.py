"""What one prediction looks like, per kind of model: the Parquet columns of a batch output row
(after its `id`) and the JSON object the service answers with. Both paths write the same thing
under the same names for multilabel and token models, so a row of a batch shard and an item of a
service answer can be compared directly:

    classification, regression, question answering
        batch:   prediction (string), score (double)
        service: {"label", "score", "scores": {label: probability} | null}
    multilabel
        both:    labels: the labels whose sigmoid score is over the model's threshold, highest first
                 scores: every label's sigmoid score, {label: score} (a Parquet struct, one field a label)
    token (NER)
        both:    entities: [{entity_group, score, word, start, end}], character spans [start, end) of the
                 input text, grouped as transformers' token-classification pipeline with
                 aggregation_strategy="simple"
"""

from __future__ import annotations

import pyarrow as pa

ENTITY = pa.struct([("entity_group", pa.string()), ("score", pa.float64()), ("word", pa.string()),
                    ("start", pa.int64()), ("end", pa.int64())])


def label_columns(loaded) -> list[pa.Field]:
    return [pa.field("prediction", pa.string()), pa.field("score", pa.float64())]


def label_values(loaded, predictions) -> dict:
    return {"prediction": predictions.prediction, "score": predictions.score}


def label_answers(loaded, predictions) -> list[dict]:
    out = []
    for k, (label, score) in enumerate(zip(predictions.prediction, predictions.score)):
        scores = None
        if predictions.probabilities is not None:
            scores = {name: float(p) for name, p in zip(loaded.labels, predictions.probabilities[k])}
        out.append({"label": label, "score": float(score), "scores": scores})
    return out


def multilabel_columns(loaded) -> list[pa.Field]:
    return [pa.field("labels", pa.list_(pa.string())),
            pa.field("scores", pa.struct([(label, pa.float64()) for label in loaded.labels]))]


def multilabel_values(loaded, predictions) -> dict:
    return {"labels": predictions.labels, "scores": _label_scores(loaded, predictions)}


def multilabel_answers(loaded, predictions) -> list[dict]:
    return [{"labels": labels, "scores": scores}
            for labels, scores in zip(predictions.labels, _label_scores(loaded, predictions))]


def _label_scores(loaded, predictions) -> list[dict[str, float]]:
    return [{label: float(p) for label, p in zip(loaded.labels, row)} for row in predictions.probabilities]


def entity_columns(loaded) -> list[pa.Field]:
    return [pa.field("entities", pa.list_(ENTITY))]


def entity_values(loaded, predictions) -> dict:
    return {"entities": [[e.as_dict() for e in entities] for entities in predictions.entities]}


def entity_answers(loaded, predictions) -> list[dict]:
    return [{"entities": [e.as_dict() for e in entities]} for entities in predictions.entities]
