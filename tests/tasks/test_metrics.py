import math

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from bertray.tasks import metrics


def _random_labels(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, n), rng.integers(0, k, n)


@pytest.mark.parametrize("seed,n,k", [(0, 50, 2), (1, 1000, 2), (2, 7, 2), (3, 500, 3), (4, 300, 5)])
def test_classification_metrics_match_sklearn_on_random_labels(seed, n, k):
    y_true, y_pred = _random_labels(seed, n, k)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sklearn.metrics.accuracy_score(y_true, y_pred), abs=1e-12)
    assert metrics.matthews_corrcoef(y_true, y_pred) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(y_true, y_pred), abs=1e-12)
    if k == 2:
        assert metrics.binary_f1(y_true, y_pred) == pytest.approx(sklearn.metrics.f1_score(y_true, y_pred), abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("y_true,y_pred", [
    ([1, 1, 1, 1], [1, 1, 1, 1]),          # one class everywhere: MCC undefined -> 0
    ([0, 0, 0, 0], [0, 0, 0, 0]),          # no positives at all: F1 0 (zero_division=0)
    ([0, 0, 1, 1], [1, 1, 0, 0]),          # all wrong: MCC -1
    ([0, 1, 0, 1], [0, 1, 0, 1]),          # all right
    ([0, 0, 0, 1], [0, 0, 0, 0]),          # never predicts positive
    ([1, 0, 1, 0, 1], [1, 1, 1, 1, 1]),    # always predicts positive
])
def test_classification_edge_cases_match_sklearn(y_true, y_pred):
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sklearn.metrics.accuracy_score(y_true, y_pred))
    assert metrics.binary_f1(y_true, y_pred) == pytest.approx(
        sklearn.metrics.f1_score(y_true, y_pred, zero_division=0))
    assert metrics.matthews_corrcoef(y_true, y_pred) == pytest.approx(sklearn.metrics.matthews_corrcoef(y_true, y_pred))


def test_binary_f1_uses_the_given_positive_label_of_string_labels():
    y_true = ["1", "0", "1", "1", "0"]
    y_pred = ["1", "1", "0", "1", "0"]
    assert metrics.binary_f1(y_true, y_pred, positive="1") == pytest.approx(
        sklearn.metrics.f1_score(y_true, y_pred, pos_label="1"))


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        metrics.accuracy([0, 1], [0])


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=200), rng.normal(size=200)
    y = 0.6 * x + y
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
    # STS-B-like scores in steps of 0.2 have many ties: average ranks decide Spearman.
    a, b = np.round(rng.uniform(0, 5, 300) * 5) / 5, np.round(rng.uniform(0, 5, 300))
    assert metrics.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
    np.testing.assert_allclose(metrics.rank_average(a), scipy.stats.rankdata(a))


def test_correlation_edge_cases():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [10, 9, 1, 0]) == pytest.approx(-1.0)
    tied = ([1, 1, 2, 2], [1, 2, 3, 4])
    assert metrics.spearman(*tied) == pytest.approx(scipy.stats.spearmanr(*tied)[0])
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))   # SciPy: undefined for a constant input
    assert math.isnan(metrics.spearman([5, 5, 5], [1, 2, 3]))


# --------------------------------------------------------------------------------------------
# SQuAD


@pytest.mark.parametrize("text,normalized", [
    ("The Cat", "cat"),                                   # case, article
    ("  a   big\tdog \n", "big dog"),                     # white space, article a
    ("an apple, the pear.", "apple pear"),                # articles an/the, punctuation
    ("U.S. Army's", "us armys"),                          # punctuation inside words is dropped, not spaced
    ("theater anthem", "theater anthem"),                 # articles only as whole words
    ("The", ""),
])
def test_normalize_answer_follows_the_official_rules(text, normalized):
    assert metrics.normalize_answer(text) == normalized


def test_squad_exact_and_f1_by_hand():
    assert metrics.squad_exact("The Denver Broncos!", "denver broncos") == 1
    assert metrics.squad_exact("Denver", "Denver Broncos") == 0
    # pred tokens {big, red, dog}, gold {red, dog, barked}: 2 shared -> P = R = 2/3 -> F1 = 2/3
    assert metrics.squad_f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred [dog, dog], gold [dog]: P 1/2, R 1 -> 2/3
    assert metrics.squad_f1("dog dog", "dog") == pytest.approx(2 / 3)
    assert metrics.squad_f1("cat", "dog") == 0.0
    # no-answer handling (v2.0): two empty answers agree, one empty answer scores 0
    assert metrics.squad_f1("", "") == 1.0 and metrics.squad_exact("", "") == 1
    assert metrics.squad_f1("", "Paris") == 0.0 and metrics.squad_f1("Paris", "") == 0.0


def test_squad_scores_take_the_max_over_gold_answers_and_handle_no_answer():
    gold = {"q1": ["Denver Broncos", "The Broncos"], "q2": ["Santa Clara, California"], "q3": [], "q4": []}
    predictions = {"q1": "broncos", "q2": "Santa Clara", "q3": "", "q4": "Levi's Stadium"}
    out = metrics.squad_scores(gold, predictions)
    # q1: EM with "The Broncos"; q2: F1 2*(1*2/3)/(1+2/3) = 0.8; q3 right abstention; q4 wrong answer
    assert out["exact_match"] == pytest.approx(100 * 2 / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert out["HasAns_total"] == 2 and out["NoAns_total"] == 2
    assert out["HasAns_f1"] == pytest.approx(90.0) and out["NoAns_exact"] == pytest.approx(50.0)


def test_squad_scores_missing_prediction_counts_zero_and_v1_has_no_breakdown():
    out = metrics.squad_scores({"a": ["x"], "b": ["y"]}, {"a": "x"})
    assert out == {"exact_match": 50.0, "f1": 50.0, "total": 2}


def test_best_threshold_sweep_by_hand():
    gold = {"a": ["yes"], "b": ["no"], "c": [], "d": []}
    predictions = {"a": "yes", "b": "maybe", "c": "x", "d": "y"}   # non-null predictions
    na = {"a": -3.0, "b": -1.0, "c": 0.5, "d": 2.0}
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    # abstain everywhere: 2 right (c, d). Answer a (na -3): 3 right. +b: still 3 (b wrong).
    # +c: 2. +d: 1. Best 3/4 at threshold -3.
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == -3.0
    assert out["best_f1"] == pytest.approx(75.0) and out["best_f1_thresh"] == -3.0


def _official_find_best_thresh(preds, scores, na_probs, qid_to_has_ans):
    """`find_best_thresh` of the official evaluate-v2.0.py, as it is (for contrast only)."""
    cur_score = best_score = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        diff = scores[qid] if qid_to_has_ans[qid] else (-1 if preds[qid] else 0)
        cur_score += diff
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def _at(gold, predictions, na, thresh):
    """Scores of the predictions decided at `thresh` with the decoder's rule."""
    return metrics.squad_scores(gold, metrics.apply_no_answer_threshold(predictions, na, thresh))


def test_no_answer_rule_answers_at_equality_and_abstains_above():
    na = {"a": -1.0, "b": 0.0, "c": 1.0}
    decided = metrics.apply_no_answer_threshold({"a": "x", "b": "y", "c": "z"}, na, 0.0)
    assert decided == {"a": "x", "b": "y", "c": ""}
    assert metrics.abstains(0.5, 0.0) and not metrics.abstains(0.0, 0.0)


def test_best_threshold_when_abstaining_everywhere_is_best():
    # Every non-null prediction is wrong and every no-answer score is negative, so a threshold of
    # 0.0 (what the official script returns here) would answer them all.
    gold = {"a": [], "b": [], "c": ["Paris"]}
    predictions = {"a": "foo", "b": "bar", "c": "Rome"}
    na = {"a": -2.0, "b": -1.0, "c": -0.5}
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    assert out["best_f1"] == pytest.approx(100 * 2 / 3) and out["best_exact"] == pytest.approx(100 * 2 / 3)
    thresh = out["best_f1_thresh"]
    assert thresh < -2.0 and thresh == math.nextafter(-2.0, -math.inf)      # just below the smallest
    assert metrics.apply_no_answer_threshold(predictions, na, thresh) == {"a": "", "b": "", "c": ""}
    assert _at(gold, predictions, na, thresh)["f1"] == out["best_f1"]
    assert _at(gold, predictions, na, out["best_exact_thresh"])["exact_match"] == out["best_exact"]
    # the official sweep reports the same score with a threshold that does not reach it
    official = _official_find_best_thresh(predictions, {q: 0.0 for q in gold}, na, {"a": False, "b": False, "c": True})
    assert official == (pytest.approx(100 * 2 / 3), 0.0) and _at(gold, predictions, na, 0.0)["f1"] == 0.0


def test_best_threshold_cuts_only_between_tied_scores():
    # a (right) and b (wrong on an unanswerable question) tie at 1.0: no threshold answers one
    # without the other. Abstaining everywhere and answering both both give 1 of 2.
    gold = {"a": ["x"], "b": []}
    predictions = {"a": "x", "b": "z"}
    na = {"a": 1.0, "b": 1.0}
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    assert out["best_f1"] == 50.0 and out["best_exact"] == 50.0
    assert out["best_f1_thresh"] < 1.0                                     # ties go to more abstention
    assert _at(gold, predictions, na, out["best_f1_thresh"])["f1"] == 50.0
    assert _at(gold, predictions, na, 1.0)["f1"] == 50.0
    # The official sweep moves inside the tie group and claims 100% at 1.0, which gives 50%.
    official = _official_find_best_thresh(predictions, {"a": 1.0, "b": 0.0}, na, {"a": True, "b": False})
    assert official == (100.0, 1.0)


def test_best_threshold_with_a_tie_group_that_pays_off_as_a_whole():
    gold = {"a": ["x"], "b": [], "c": ["y"], "d": ["w"]}
    predictions = {"a": "x", "b": "z", "c": "y", "d": "v"}
    na = {"a": 0.5, "b": 2.0, "c": 2.0, "d": 2.0}
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    # abstain: 1 (b); answer a: 2; answer {b, c, d} too: 2 - 1 + 1 + 0 = 2 -> best 2/4 at 0.5
    assert out["best_f1"] == 50.0 and out["best_f1_thresh"] == 0.5
    na["d"] = 3.0
    predictions["d"] = "w"
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    # now: a -> 2, {b, c} -> 2, d -> 3: best 3/4, answering everything
    assert out["best_f1"] == 75.0 and out["best_f1_thresh"] == 3.0
    assert _at(gold, predictions, na, 3.0)["f1"] == 75.0


def test_best_threshold_counts_an_answer_that_normalises_to_nothing_as_an_abstention():
    # "The" normalises to "": on an unanswerable question it scores 1 whether answered or not.
    gold = {"a": [], "b": ["x"]}
    predictions = {"a": "The", "b": "x"}
    na = {"a": -1.0, "b": 0.0}
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    assert out["best_f1"] == 100.0 and _at(gold, predictions, na, out["best_f1_thresh"])["f1"] == 100.0


def test_best_threshold_with_missing_predictions_and_errors():
    gold = {"a": ["x"], "b": [], "m": []}          # m: no prediction, scores 0 at any threshold
    predictions = {"a": "x", "b": "y"}
    na = {"a": -1.0, "b": 1.0}
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    assert out["best_f1"] == pytest.approx(100 * 2 / 3) and out["best_f1_thresh"] == -1.0
    assert _at(gold, predictions, na, -1.0)["f1"] == out["best_f1"]
    with pytest.raises(ValueError, match="no no-answer score"):
        metrics.squad_scores(gold, predictions, na_probs={"a": 0.0})
    with pytest.raises(ValueError, match="NaN"):
        metrics.squad_scores(gold, predictions, na_probs={"a": 0.0, "b": float("nan")})


@pytest.mark.parametrize("seed", range(8))
def test_best_threshold_is_reproduced_by_its_threshold_and_is_the_best_cut(seed):
    rng = np.random.default_rng(seed)
    words = ["red", "green", "blue", "the", "big red", "small blue car"]
    gold, predictions, na = {}, {}, {}
    for i in range(40):
        qid = f"q{i}"
        gold[qid] = [] if rng.random() < 0.5 else [str(rng.choice(words))]
        if rng.random() < 0.9:                       # some predictions missing
            right = gold[qid] and rng.random() < 0.7
            predictions[qid] = gold[qid][0] if right else str(rng.choice([*words, "The", ""]))
            # few distinct values (many ties), lower for the right answers
            na[qid] = float(rng.integers(-3, 2) if right else rng.integers(-1, 4)) * 0.5
    out = metrics.squad_scores(gold, predictions, na_probs=na)
    values = sorted(set(na.values()))
    candidates = [math.nextafter(values[0], -math.inf), *values]
    for key, thresh_key, field in (("best_f1", "best_f1_thresh", "f1"),
                                   ("best_exact", "best_exact_thresh", "exact_match")):
        assert _at(gold, predictions, na, out[thresh_key])[field] == out[key]          # exactly
        brute = [_at(gold, predictions, na, t)[field] for t in candidates]
        assert out[key] == pytest.approx(max(brute), abs=1e-9)
        assert out[thresh_key] == candidates[int(np.argmax(np.asarray(brute) > max(brute) - 1e-9))]


# --------------------------------------------------------------------------------------------
# Entity F1


@pytest.mark.parametrize("tags,entities", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["I-PER", "I-PER", "O", "I-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),          # IOB1: I- after O starts a chunk
    (["I-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),               # IOB1: B- splits same-type chunks
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),               # a type change ends and starts
    (["O", "I-ORG", "B-ORG", "O", "B-MISC", "I-MISC", "I-MISC"], [("ORG", 1, 1), ("ORG", 2, 2), ("MISC", 4, 6)]),
    (["B-PER"], [("PER", 0, 0)]),
    (["O", "O"], []),
])
def test_chunk_extraction_follows_conlleval(tags, entities):
    assert metrics.get_entities(tags) == entities


def test_entity_scores_with_partial_overlaps_and_type_errors_by_hand():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],           # PER(0,1) LOC(3,3)
        ["B-ORG", "I-ORG", "I-ORG", "O", "B-MISC"],      # ORG(0,2) MISC(4,4)
    ]
    predicted = [
        ["B-PER", "O", "O", "B-LOC", "O"],               # PER(0,0): partial overlap, wrong; LOC right
        ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"],       # ORG right; PER(4,4): type error
    ]
    out = metrics.entity_scores(gold, predicted)
    # 4 gold, 4 predicted, 2 correct (LOC, ORG): P = R = F1 = 0.5
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)
    # PER: gold 1, predicted 2, correct 0; LOC and ORG perfect; MISC: gold 1, predicted 0
    assert out["f1_PER"] == 0.0 and out["precision_PER"] == 0.0 and out["support_PER"] == 1
    assert out["f1_LOC"] == 1.0 and out["f1_ORG"] == 1.0
    assert out["recall_MISC"] == 0.0 and out["f1_MISC"] == 0.0


def test_entity_scores_uneven_counts_by_hand():
    gold = [["B-LOC", "I-LOC", "O", "B-LOC", "O", "B-ORG"]]          # LOC(0,1) LOC(3,3) ORG(5,5)
    predicted = [["B-LOC", "I-LOC", "I-LOC", "I-LOC", "O", "B-ORG"]]  # LOC(0,3) ORG(5,5)
    out = metrics.entity_scores(gold, predicted)
    p, r = 1 / 2, 1 / 3
    assert out["precision"] == pytest.approx(p) and out["recall"] == pytest.approx(r)
    assert out["f1"] == pytest.approx(2 * p * r / (p + r))        # 0.4


def test_a_chunk_does_not_run_across_sentences():
    out = metrics.entity_scores([["B-PER"], ["I-PER"]], [["B-PER"], ["I-PER"]])
    assert out["precision"] == 1.0 and out["support_PER"] == 2


def test_entity_scores_reject_malformed_tags_and_lengths():
    with pytest.raises(ValueError):
        metrics.entity_scores([["PER"]], [["O"]])
    with pytest.raises(ValueError):
        metrics.entity_scores([["O", "O"]], [["O"]])
