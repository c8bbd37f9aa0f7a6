"""The prediction service on a real local Ray with Ray Serve, exercised over real HTTP (requests):
answers equal to the model run directly, every kind of bad request answered 4xx naming the field
while the replica keeps serving, concurrent requests batched together (the batch sizes the model
saw), the OpenAPI schema, /healthz, and the config file `serve deploy` reads."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import socket

import numpy as np
import pytest
import requests

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = pathlib.Path(__file__).resolve().parents[2]
MAX_ITEMS, MAX_CHARS = 8, 2000
TEXTS = ["a gripping , beautifully shot film", "dull .", "the plot makes no sense at all and the acting is wooden",
         "i laughed", "an instant classic that will be remembered for years to come"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, sst2_model, qa_model, ner_model, multilabel_model):
    """Four applications on one Serve instance listening on 127.0.0.1: the SST-2 classifier at /
    (batches of up to 16 requests, 50 ms wait), the question-answering model at /qa, the NER
    tagger at /ner and the multilabel classifier at /multilabel."""
    from ray import serve

    from bertray.serve.app import Predictor, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0.5}}
    serve.run(Predictor.options(**small).bind({"model": str(sst2_model), "max_batch_size": 16,
                                               "batch_wait_timeout_s": 0.05, "max_items": MAX_ITEMS,
                                               "max_text_chars": MAX_CHARS}),
              name="sst2", route_prefix="/")
    qa = build_app({"model": str(qa_model), "max_text_chars": MAX_CHARS})
    serve.run(qa.options(**small) if hasattr(qa, "options") else qa, name="qa", route_prefix="/qa")
    smaller = {"ray_actor_options": {"num_cpus": 0.25}}
    for name, model in (("ner", ner_model), ("multilabel", multilabel_model)):
        serve.run(Predictor.options(**smaller).bind({"model": str(model), "max_text_chars": MAX_CHARS}),
                  name=name, route_prefix=f"/{name}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def direct(sst2_model, qa_model, ner_model, multilabel_model):
    """The same models loaded in the test process."""
    from bertray.predict.model import load_model

    return {name: load_model(model, device="cpu") for name, model in
            (("sst2", sst2_model), ("qa", qa_model), ("ner", ner_model), ("multilabel", multilabel_model))}


def post(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(url, data=data, headers={"content-type": "application/json"}, timeout=60, **kw)


def test_texts_and_pairs_match_the_model_run_directly(service, direct):
    from bertray.predict.inference import classify

    answer = post(f"{service}/predict", {"texts": TEXTS})
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"]
    expected = classify(direct["sst2"], TEXTS)
    assert [p["label"] for p in got] == expected.prediction
    np.testing.assert_allclose([p["score"] for p in got], expected.score, atol=1e-5)
    assert set(got[0]["scores"]) == {"negative", "positive"}
    assert abs(sum(got[0]["scores"].values()) - 1) < 1e-5

    pairs = [[TEXTS[0], TEXTS[1]], [TEXTS[2], TEXTS[3]]]
    answer = post(f"{service}/predict", {"pairs": pairs})
    assert answer.status_code == 200, answer.text
    expected = classify(direct["sst2"], [p[0] for p in pairs], [p[1] for p in pairs])
    np.testing.assert_allclose([p["score"] for p in answer.json()["predictions"]], expected.score, atol=1e-5)
    # A pair is not its first text alone: the second text reaches the model.
    assert not np.allclose(expected.score, classify(direct["sst2"], [p[0] for p in pairs]).score, atol=1e-7)


def test_question_and_context(service, direct):
    from bertray.predict.inference import answer as answer_directly

    context = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
               "a region in France. They were descended from Norse raiders and pirates from Denmark.")
    question = "Where is Normandy?"
    got = post(f"{service}/qa/predict", {"question": question, "context": context})
    assert got.status_code == 200, got.text
    prediction = got.json()["predictions"][0]
    expected = answer_directly(direct["qa"], [question], [context])
    assert prediction["label"] == expected.prediction[0]
    assert prediction["label"] in context and prediction["label"]
    assert prediction["score"] == pytest.approx(float(expected.score[0]), abs=1e-5)


def test_entities_and_multilabel_answers_match_the_models_run_directly(service, direct):
    """A token model answers each text's entities (character spans with their tag), a multilabel
    model the labels over its threshold with every label's score; inputs a model cannot take are
    422 naming the field."""
    from bertray.predict.inference import classify_multilabel
    from bertray.predict.tagging import tag

    texts = ["Angela Merkel met Emmanuel Macron in Paris on Tuesday .", "",
             "West Indian all-rounder Phil Simmons took four for 38 as Leicestershire beat Somerset ."]
    got = post(f"{service}/ner/predict", {"texts": texts})
    assert got.status_code == 200, got.text
    predictions = got.json()["predictions"]
    expected = tag(direct["ner"], texts).entities
    assert [[{**e, "score": 0} for e in p["entities"]] for p in predictions] == \
        [[{**e.as_dict(), "score": 0} for e in entities] for entities in expected]
    assert predictions[1] == {"entities": []} and predictions[2]["entities"]
    np.testing.assert_allclose([e["score"] for p in predictions for e in p["entities"]],
                               [e.score for entities in expected for e in entities], atol=1e-5)
    for body, field in (({"pairs": [["a", "b"]]}, "pairs"), ({"question": "who?", "context": "me"}, "question")):
        refused = post(f"{service}/ner/predict", body)
        assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == field, refused.text
        assert "token-classification model: send texts" in refused.json()["detail"][0]["message"]
    assert requests.get(f"{service}/ner/healthz", timeout=30).json()["kind"] == "token"

    got = post(f"{service}/multilabel/predict", {"texts": TEXTS})
    assert got.status_code == 200, got.text
    expected = classify_multilabel(direct["multilabel"], TEXTS)
    predictions = got.json()["predictions"]
    assert [p["labels"] for p in predictions] == expected.labels
    np.testing.assert_allclose([list(p["scores"].values()) for p in predictions], expected.probabilities, atol=1e-5)
    assert list(predictions[0]["scores"]) == list(direct["multilabel"].labels)
    assert post(f"{service}/multilabel/predict", {"pairs": [TEXTS[:2]]}).status_code == 200
    health = requests.get(f"{service}/multilabel/healthz", timeout=30).json()
    assert health["kind"] == "multilabel" and health["threshold"] == 0.5
    schema = json.dumps(requests.get(f"{service}/ner/openapi.json", timeout=30).json())
    assert "TokenPrediction" in schema and "MultilabelPrediction" in schema


@pytest.mark.parametrize("body, status, field", [
    ('{"texts": ["fine", ', 422, "body"),                                       # broken JSON
    ('["just", "a", "list"]', 422, "body"),                                     # not an object
    ({}, 422, "body"),                                                          # nothing to predict
    ({"texts": ["a"], "pairs": [["a", "b"]]}, 422, "body"),                     # two kinds at once
    ({"texts": []}, 422, "texts"),                                              # empty list
    ({"texts": ["x"] * (MAX_ITEMS + 1)}, 413, "texts"),                         # too many items
    ({"texts": ["ok", "y" * (MAX_CHARS + 1)]}, 413, "texts[1]"),                # a text over the limit
    ({"texts": "not a list"}, 422, "texts"),                                    # wrong type
    ({"texts": ["ok", 5]}, 422, "texts[1]"),                                    # wrong item type
    ({"pairs": [["a", "b"], ["only one"]]}, 422, "pairs[1]"),                   # a pair of one
    ({"texts": ["a"], "temperature": 2}, 422, "temperature"),                   # unknown field
    ({"question": "who?"}, 422, "body"),                                        # question without context
    ({"question": "who?", "context": "nobody"}, 422, "question"),               # QA input to a classifier
])
def test_bad_requests_get_4xx_naming_the_field_and_the_replica_keeps_serving(service, body, status, field):
    got = post(f"{service}/predict", body)
    assert got.status_code == status, got.text
    detail = got.json()["detail"]
    assert any(d["field"] == field or d["field"].startswith(field) for d in detail), detail
    assert all("y" * 100 not in d["message"] for d in detail)           # the input is not echoed back
    assert post(f"{service}/predict", {"texts": ["still serving"]}).status_code == 200


def test_texts_to_a_question_answering_model_are_refused(service):
    got = post(f"{service}/qa/predict", {"texts": ["hello"]})
    assert got.status_code == 422 and got.json()["detail"][0]["field"] == "texts", got.text


def test_oversized_body_is_refused_before_parsing(service):
    got = post(f"{service}/predict", '{"texts": ["' + "z" * (5 << 20) + '"]}')
    assert got.status_code == 413 and got.json()["detail"][0]["field"] == "body", got.text[:300]


def test_concurrent_requests_are_batched(service, direct):
    from bertray.predict.inference import classify

    before = requests.get(f"{service}/stats", timeout=30).json()
    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda t: post(f"{service}/predict", {"texts": [t]}), texts))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    expected = classify(direct["sst2"], texts)
    np.testing.assert_allclose([a.json()["predictions"][0]["score"] for a in answers], expected.score, atol=1e-5)
    after = requests.get(f"{service}/stats", timeout=30).json()
    assert after["requests"] - before["requests"] == 24
    new = {int(size): n - before["requests_per_batch"].get(size, 0) for size, n in after["requests_per_batch"].items()}
    new = {size: n for size, n in new.items() if n}
    assert sum(size * n for size, n in new.items()) == 24, new
    assert max(new) > 1, f"no two concurrent requests shared a batch: {new}"
    assert max(new) <= 16, new                                           # max_batch_size holds
    assert sum(new.values()) < 24, new                                   # fewer forward passes than requests


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (Linux: /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:       # 0A: LISTEN
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


def test_health_openapi_and_loopback_only(service):
    health = requests.get(f"{service}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["labels"] == ["negative", "positive"]
    schema = requests.get(f"{service}/openapi.json", timeout=30).json()
    assert "/predict" in schema["paths"] and "PredictRequest" in json.dumps(schema)
    port = int(service.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}


def test_serve_config_file_deploys_this_application():
    """clusters/serve/predict.yaml is a valid `serve deploy` config whose import path builds the
    application, and settings it does not know are refused with the key named."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from bertray.errors import ConfigError
    from bertray.serve.app import DEPLOYMENT_NAME, build_app
    from bertray.serve.settings import ServeSettings

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "clusters" / "serve" / "predict.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "bertray.serve.app:build_app"
    assert config.http_options.host == "127.0.0.1"
    assert [d.name for d in app.deployments] == [DEPLOYMENT_NAME]
    assert app.deployments[0].max_ongoing_requests >= app.args["max_batch_size"]
    ServeSettings.from_args(app.args)
    with pytest.raises(ConfigError, match="max_batch_sise"):
        build_app({**app.args, "max_batch_sise": 3})
    with pytest.raises(ConfigError, match="max_items"):
        build_app({**app.args, "max_items": 0})


def test_flow_listens_on_loopback_by_default():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_flow", REPO / "flows" / "serve.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    args = flow.build_parser().parse_args(["--model", "m"])
    assert args.host == "127.0.0.1"
    assert flow.deployment_options(flow.build_parser().parse_args(["--model", "m", "--replicas", "1", "3"])) \
        ["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16}
