import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertray.errors import TaskDataError
from bertray.tasks import metrics, squad
from bertray.tasks.registry import TASKS

V2_SAMPLE = "squad/v2.0-sample/dev-v2.0.Normans_Rhine.json"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def dev_v1(shared_data, tokenizer):
    examples, counts = TASKS["squad1"].read(shared_data, "dev")
    return examples, counts, squad.featurize_squad(examples, tokenizer)


@pytest.fixture(scope="module")
def sample_v2(shared_data, tokenizer):
    examples, counts = squad.read_squad(shared_data / V2_SAMPLE)
    return examples, counts, squad.featurize_squad(examples, tokenizer)


def _perfect_logits(features):
    """Logits a perfect model would give: +10 at the gold start/end (the [CLS] for no answer or
    an answer outside the window), -10 elsewhere."""
    n, s = features["input_ids"].shape
    start, end = np.full((n, s), -10.0), np.full((n, s), -10.0)
    rows = np.arange(n)
    start[rows, features["start_positions"]] = 10.0
    end[rows, features["end_positions"]] = 10.0
    return start, end


# --------------------------------------------------------------------------------------------
# Reading


def test_dev_v11_has_the_official_counts(dev_v1):
    examples, counts, _ = dev_v1
    assert counts == {"articles": 48, "paragraphs": 2067, "questions": 10570, "unanswerable": 0, "answers": 34726}
    first = examples[0]
    assert first.title == "Super_Bowl_50" and first.answers[0].text == "Denver Broncos"
    assert first.context[first.answers[0].start:].startswith("Denver Broncos")


def test_v20_sample_counts_unanswerable(sample_v2):
    examples, counts, _ = sample_v2
    assert counts["questions"] == 706 and counts["unanswerable"] == 320
    assert all(e.answers == () for e in examples if e.is_impossible)
    assert all(e.answers for e in examples if not e.is_impossible)


def _squad_file(path, qas, version="1.1", context="Architecturally, the school has a Catholic character."):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": version, "data": [{"title": "University_of_Notre_Dame",
                                          "paragraphs": [{"context": context, "qas": qas}]}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_train_and_v2_files_in_the_official_layout(tmp_path):
    # train-v1.1.json: one answer per question
    _squad_file(tmp_path / "squad" / "v1.1" / "train-v1.1.json", [
        {"answers": [{"answer_start": 34, "text": "Catholic"}], "question": "What character?",
         "id": "5733be284776f41900661182"},
    ])
    examples, counts = TASKS["squad1"].read(tmp_path, "train")
    assert counts["questions"] == 1 and examples[0].answers == (squad.Answer("Catholic", 34),)
    # v2.0: unanswerable questions carry is_impossible and plausible_answers, and no answers
    _squad_file(tmp_path / "squad" / "v2.0" / "train-v2.0.json", [
        {"question": "What character?", "id": "a1", "answers": [{"text": "Catholic", "answer_start": 34}],
         "is_impossible": False},
        {"plausible_answers": [{"text": "school", "answer_start": 20}], "question": "What college?", "id": "a2",
         "answers": [], "is_impossible": True},
    ], version="v2.0")
    examples, counts = TASKS["squad2"].read(tmp_path, "train")
    assert counts["unanswerable"] == 1 and examples[1].is_impossible and examples[1].answers == ()


@pytest.mark.parametrize("qas,message", [
    ([{"answers": [{"answer_start": 33, "text": "Catholic"}], "question": "Q?", "id": "q7"}],
     "article 'University_of_Notre_Dame', question q7: answer 'Catholic' is not the context at answer_start=33"),
    ([{"answers": [{"answer_start": 34, "text": "Catholic"}], "id": "q8"}],
     "question q8: missing key 'question'"),
    ([{"answers": [], "question": "Q?", "id": "q9"}], "question q9: no answers"),
    ([{"answers": [{"answer_start": 34, "text": "Catholic"}], "question": "Q?", "id": "q1"},
      {"answers": [{"answer_start": 34, "text": "Catholic"}], "question": "Q?", "id": "q1"}], "duplicate question id"),
])
def test_malformed_squad_raises_naming_file_article_and_question(tmp_path, qas, message):
    path = _squad_file(tmp_path / "bad.json", qas)
    with pytest.raises(TaskDataError, match=message) as info:
        squad.read_squad(path)
    assert str(path) in str(info.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n{"title": }\n]}')
    with pytest.raises(TaskDataError, match=f"{path}:2: not valid JSON"):
        squad.read_squad(path)


# --------------------------------------------------------------------------------------------
# Features


def test_windows_cover_long_passages_with_stride_and_one_max_context_window(tokenizer):
    context = " ".join(f"word{i}" for i in range(400)) + " The answer is Zanzibar."
    example = squad.SquadExample("q", "t", "Where is it?", context,
                                 (squad.Answer("Zanzibar", context.index("Zanzibar")),))
    features = squad.featurize_squad([example], tokenizer, 128, doc_stride=32)
    n = len(features["example_index"])
    assert n > 2 and features["input_ids"].shape == (n, 128)
    # every context token is max-context in exactly one window
    starts = features["offset_mapping"][..., 0]
    per_char = {}
    for f in range(n):
        for s, is_max in zip(starts[f], features["token_is_max_context"][f]):
            if s >= 0:
                per_char[s] = per_char.get(s, 0) + int(is_max)
    assert set(per_char.values()) == {1}
    # the answer is only labelled in windows that contain it; elsewhere it points at [CLS]
    hits = np.flatnonzero(features["start_positions"])
    assert len(hits) >= 1 and (features["start_positions"][: hits[0]] == 0).all()
    f = hits[-1]
    s, e = features["start_positions"][f], features["end_positions"][f]
    assert context[features["offset_mapping"][f, s, 0]:features["offset_mapping"][f, e, 1]] == "Zanzibar"


def test_question_truncated_to_64_tokens(tokenizer):
    question = " ".join(["why"] * 100) + "?"
    example = squad.SquadExample("q", "t", question, "Because.", (squad.Answer("Because", 0),))
    features = squad.featurize_squad([example], tokenizer)
    sep = tokenizer.token_to_id("[SEP]")
    assert np.flatnonzero(features["input_ids"][0] == sep)[0] == 1 + 64
    assert features["start_positions"][0] == 66 and features["token_type_ids"][0, 66] == 1


def test_gold_positions_round_trip_to_the_gold_text_on_dev_v11(dev_v1):
    examples, _, features = dev_v1
    windows = np.flatnonzero(features["start_positions"] > 0)
    same = 0
    for f in windows:
        example = examples[features["example_index"][f]]
        s, e = features["start_positions"][f], features["end_positions"][f]
        text = example.context[features["offset_mapping"][f, s, 0]:features["offset_mapping"][f, e, 1]]
        same += metrics.normalize_answer(text) == metrics.normalize_answer(example.answers[0].text)
    share = same / len(windows)
    # 99.70% with bert-base-uncased: the misses are gold answers that are part of a word ("8" in "18").
    assert len(windows) > 10_500 and share > 0.995


def test_perfect_logits_decode_to_near_perfect_dev_scores(dev_v1):
    examples, _, features = dev_v1
    start, end = _perfect_logits(features)
    out = TASKS["squad1"].evaluate(examples, features, {"start_logits": start, "end_logits": end})
    assert out["total"] == 10570 and out["exact_match"] > 99.5 and out["f1"] > 99.5
    predictions = TASKS["squad1"].decode(examples, features, {"start_logits": start, "end_logits": end})
    assert predictions[examples[0].qid] == "Denver Broncos"


def test_decoder_respects_max_answer_length_and_order(tokenizer):
    context = "Alpha beta gamma delta epsilon zeta eta theta iota kappa."
    example = squad.SquadExample("q", "t", "Which?", context, (squad.Answer("gamma", 11),))
    features = squad.featurize_squad([example], tokenizer, 64)
    start, end = np.zeros((1, 64)), np.zeros((1, 64))
    first = int(np.flatnonzero(features["token_type_ids"][0])[0])   # first passage token
    start[0, first + 8], end[0, first + 1] = 9.0, 9.0        # the top scores form an end-before-start span
    start[0, first + 2], end[0, first + 3] = 5.0, 5.0         # best valid span: "gamma delta"
    predictions, _ = squad.decode_squad([example], features, start, end)
    assert predictions == {"q": "gamma delta"}
    start[0, first], end[0, first + 9] = 50.0, 50.0           # a 10-token span beats everything ...
    predictions, _ = squad.decode_squad([example], features, start, end)
    assert predictions == {"q": "Alpha beta gamma delta epsilon zeta eta theta iota"}
    predictions, _ = squad.decode_squad([example], features, start, end, max_answer_len=5)
    assert predictions == {"q": "Alpha beta"}                 # ... unless answers are capped at 5 tokens


def test_v2_null_answer_threshold_and_best_tau(sample_v2):
    examples, _, features = sample_v2
    start, end = _perfect_logits(features)
    out = TASKS["squad2"].evaluate(examples, features, {"start_logits": start, "end_logits": end})
    assert out["exact_match"] == 100.0 and out["NoAns_total"] == 320 and out["HasAns_total"] == 386
    assert out["best_f1"] == 100.0 and out["tau"] == -40.0 and out["f1_at_0"] == 100.0
    # Null odds: -40 for answerable (gold span 20 vs null -20); +40 for unanswerable, or +inf when
    # the 20 best starts all fall outside the passage (the reference also looks at those only).
    predictions, odds = squad.decode_squad(examples, features, start, end, allow_no_answer=True)
    assert {odds[e.qid] for e in examples if not e.is_impossible} == {-40.0}
    assert {odds[e.qid] for e in examples if e.is_impossible} <= {40.0, np.inf}
    assert sum(p == "" for p in predictions.values()) == 320
    assert squad.best_tau(examples, features, start, end) == -40.0
    # tau above every finite odds: answer wherever a span was proposed, so an unanswerable
    # question is right only where no span was (odds +inf) or the span normalises to "" ("The").
    always, _ = squad.decode_squad(examples, features, start, end, allow_no_answer=True, tau=100.0)
    assert all(always[qid] for qid, o in odds.items() if o < np.inf)
    out = squad.evaluate_squad(examples, features, start, end, allow_no_answer=True, tau=100.0)
    empty = [metrics.normalize_answer(always[e.qid]) == "" for e in examples if e.is_impossible]
    assert out["HasAns_exact"] == 100.0 and out["NoAns_exact"] == pytest.approx(100.0 * np.mean(empty))
    assert out["NoAns_exact"] < 50.0


def _strict_json(path):
    def reject(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def test_write_predictions_and_null_odds(tmp_path):
    squad.write_predictions({"q1": "Denver Broncos", "q2": ""}, tmp_path / "predictions.json")
    squad.write_predictions({"q1": np.float64(-3.5), "q2": np.inf, "q3": -np.inf}, tmp_path / "null_odds.json")
    assert json.loads((tmp_path / "predictions.json").read_text()) == {"q1": "Denver Broncos", "q2": ""}
    odds = _strict_json(tmp_path / "null_odds.json")          # no Infinity: strict JSON
    assert odds == {"q1": -3.5, "q2": squad.ODDS_LIMIT, "q3": -squad.ODDS_LIMIT}
    assert all(np.isfinite(v) for v in odds.values())
    with pytest.raises(ValueError, match="NaN"):
        squad.write_predictions({"q1": float("nan")}, tmp_path / "nan.json")


CONTEXT = "The capital of France is Paris. The river of Paris is the Seine."


def _crafted(tokenizer, spans):
    """Examples over CONTEXT and logits that give each one a chosen best span and null score:
    `spans` is [(qid, gold answer or None, predicted text, span half-score, null half-score)]."""
    examples = [squad.SquadExample(qid, "t", f"Question {qid}?", CONTEXT,
                                   () if gold is None else (squad.Answer(gold, CONTEXT.index(gold)),), gold is None)
                for qid, gold, *_ in spans]
    features = squad.featurize_squad(examples, tokenizer, 64)
    assert list(features["example_index"]) == list(range(len(spans)))      # one window each
    start, end = np.full((len(spans), 64), -10.0), np.full((len(spans), 64), -10.0)
    for f, (_, _, text, span, null) in enumerate(spans):
        first, last = CONTEXT.index(text), CONTEXT.index(text) + len(text)
        offsets = features["offset_mapping"][f]
        start[f, int(np.flatnonzero(offsets[:, 0] == first)[0])] = span
        end[f, int(np.flatnonzero(offsets[:, 1] == last)[0])] = span
        start[f, 0] = end[f, 0] = null
    return examples, features, start, end


def test_v2_evaluation_reports_scores_at_the_tuned_tau(tokenizer):
    #                 gold      best span  span/2 null/2   null odds   at tau=0   at tau=1
    spans = [("a", "Paris", "Paris", 2.5, 3.0),       # 6 - 5 = 1     abstains   answers (right)
             ("b", None, "Paris", 1.5, 2.5),          # 5 - 3 = 2     abstains   abstains (right)
             ("c", "Seine", "Seine", 1.5, 1.0)]       # 2 - 3 = -1    answers    answers (right)
    examples, features, start, end = _crafted(tokenizer, spans)
    out = TASKS["squad2"].evaluate(examples, features, {"start_logits": start, "end_logits": end})
    assert out["tau"] == 1.0 and out["best_f1_thresh"] == 1.0
    assert out["f1"] == out["exact_match"] == out["best_f1"] == 100.0
    assert out["f1_at_0"] == out["exact_match_at_0"] == pytest.approx(100 * 2 / 3)
    assert out["HasAns_f1"] == 100.0 and out["NoAns_f1"] == 100.0
    predictions, odds = squad.decode_squad(examples, features, start, end, allow_no_answer=True, tau=out["tau"])
    assert odds == {"a": 1.0, "b": 2.0, "c": -1.0}
    assert predictions == {"a": "Paris", "b": "", "c": "Seine"}
    assert metrics.squad_scores(squad._gold(examples), predictions)["f1"] == out["f1"]
    assert squad.best_tau(examples, features, start, end) == 1.0
    # a given tau is applied as it is
    fixed = TASKS["squad2"].evaluate(examples, features, {"start_logits": start, "end_logits": end}, tau=0.0)
    assert fixed["tau"] == 0.0 and fixed["f1"] == out["f1_at_0"] and fixed["best_f1"] == out["best_f1"]


def test_v2_evaluation_can_tune_to_abstain_everywhere(tokenizer):
    # every proposed span is wrong and every null odds is negative: tau = 0 answers them all
    spans = [("a", "Paris", "France", 2.0, 1.0), ("b", None, "Seine", 2.0, 1.5), ("c", "Seine", "Paris", 2.0, 0.5)]
    examples, features, start, end = _crafted(tokenizer, spans)
    out = squad.evaluate_squad(examples, features, start, end, allow_no_answer=True)
    predictions, odds = squad.decode_squad(examples, features, start, end, allow_no_answer=True, tau=out["tau"])
    assert odds == {"a": -2.0, "b": -1.0, "c": -3.0}
    assert out["tau"] < -3.0 and out["f1"] == out["best_f1"] == pytest.approx(100 / 3)   # b abstains rightly
    assert out["f1_at_0"] == 0.0
    assert predictions == {"a": "", "b": "", "c": ""}
