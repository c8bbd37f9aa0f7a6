"""The metrics the BERT paper reports, written out so that their edge cases are ours to see.

Classification and correlation metrics follow scikit-learn / SciPy exactly (including what they
return for degenerate input), so numbers are comparable with every published GLUE script.
SQuAD scoring is the official `evaluate-v2.0.py` (a superset of v1.1: the two only differ on
empty answers, which v1.1 never has), except where that script contradicts itself: a missing
prediction (see `squad_scores`) and the best-threshold search (see `find_best_thresh`). Entity
F1 extracts chunks with the `conlleval` rules that `seqeval`'s default mode also uses, so IOB1
and IOB2 sequences are both scored correctly.

All functions return fractions (accuracy 0.87, not 87); SQuAD's returns percentages because the
official script does. The task modules scale to the paper's percentages.
"""

from __future__ import annotations

import collections
import math
import re
import string
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Classification


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else 0.0


def binary_f1(y_true: Sequence, y_pred: Sequence, positive=1) -> float:
    """F1 of the positive class; 0.0 when there is neither a true nor a predicted positive
    (scikit-learn's `zero_division=0`)."""
    y_true, y_pred = _pair(y_true, y_pred)
    t, p = y_true == positive, y_pred == positive
    tp = int(np.sum(t & p))
    denominator = 2 * tp + int(np.sum(~t & p)) + int(np.sum(t & ~p))
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(y_true: Sequence, y_pred: Sequence) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K, as scikit-learn); 0.0 when a marginal
    is constant, where the coefficient is undefined."""
    y_true, y_pred = _pair(y_true, y_pred)
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    k, n = len(classes), len(y_true)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    samples = float(n)
    cov_tp = np.trace(confusion) * samples - t_sum @ p_sum
    cov_pp = samples**2 - p_sum @ p_sum
    cov_tt = samples**2 - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in either input
    (scikit-learn's `f1_score(average="macro", zero_division=0)`)."""
    y_true, y_pred = _pair(y_true, y_pred)
    classes = np.unique(np.concatenate([y_true, y_pred]))
    if not len(classes):
        return 0.0
    return float(np.mean([binary_f1(y_true, y_pred, positive=c) for c in classes]))


def mean_squared_error(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    y_true, y_pred = _pair(np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64))
    return float(np.mean((y_true - y_pred) ** 2)) if len(y_true) else 0.0


def multilabel_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro F1, macro F1 (over every label column, scikit-learn's `zero_division=0`) and exact
    match (subset accuracy) of two [N, C] 0/1 indicator matrices."""
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"expected two [N, C] indicator matrices, got shapes {y_true.shape} and {y_pred.shape}")
    tp = (y_true & y_pred).sum(0)
    fp = (~y_true & y_pred).sum(0)
    fn = (y_true & ~y_pred).sum(0)
    micro = 2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())
    per_label = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(1, 2 * tp + fp + fn), 0.0)
    return {"micro_f1": float(micro), "macro_f1": float(per_label.mean()) if per_label.size else 0.0,
            "exact_match": float(np.mean(np.all(y_true == y_pred, axis=1))) if len(y_true) else 0.0}


def _pair(y_true: Sequence, y_pred: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"expected two 1-d sequences of equal length, got shapes {y_true.shape} and {y_pred.shape}")
    return y_true, y_pred


# --------------------------------------------------------------------------------------------
# Correlation


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either input is constant (SciPy's answer: r is undefined there)."""
    x, y = _pair(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if len(x) < 2:
        return float("nan")
    xm, ym = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(xm @ xm) * float(ym @ ym))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip((xm @ ym) / denominator, -1.0, 1.0))


def rank_average(x: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given their average rank (SciPy's `rankdata(method="average")`)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    inverse = np.empty(len(x), dtype=np.intp)
    inverse[order] = np.arange(len(x))
    ordered = x[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = np.cumsum(new_value)[inverse]
    bounds = np.r_[np.nonzero(new_value)[0], len(new_value)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho = Pearson's r of the average ranks, so ties count as SciPy counts them."""
    x, y = _pair(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return pearson(rank_average(x), rank_average(y))


# --------------------------------------------------------------------------------------------
# SQuAD (official evaluate-v2.0.py)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation, the articles a/an/the, and collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1; two empty answers agree (1.0), one empty answer scores 0.0."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_gold_answers(texts: Iterable[str]) -> list[str]:
    """The answers a prediction is scored against: those that survive normalisation, or the
    empty answer when none does (an unanswerable v2.0 question)."""
    kept = [t for t in texts if normalize_answer(t)]
    return kept or [""]


# The no-answer decision rule (SQuAD v2.0), written down here and nowhere else: a question whose
# no-answer score is `na_prob` (our decoder's null odds, null_score - best_span_score) is answered
# with its best non-null span when `na_prob <= thresh`, and abstained on ("") when
# `na_prob > thresh`. This is `apply_no_ans_threshold` of `evaluate-v2.0.py` (its
# `--na-prob-thresh`), so a threshold found here can be given to the official script together
# with our null-odds file. In the paper's terms (non-null when s_span > s_null + tau_paper) this is
# tau_paper = -thresh, except on exact equality s_span - s_null == tau_paper, which is answered here.


def abstains(na_prob: float, thresh: float) -> bool:
    """The decision rule above: True = predict "" (no answer)."""
    return na_prob > thresh


def apply_no_answer_threshold(predictions: Mapping[str, str], na_probs: Mapping[str, float],
                              thresh: float) -> dict[str, str]:
    """`predictions` (the best non-null answers) with "" wherever the rule above abstains."""
    return {qid: "" if abstains(na_probs[qid], thresh) else text for qid, text in predictions.items()}


def squad_scores(
    gold: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Official SQuAD scores, in percent: `exact_match`, `f1`, `total`; with any unanswerable
    question also the HasAns_/NoAns_ breakdown; with `na_probs` (higher = more likely no
    answer) also `best_exact`/`best_f1` and the thresholds that reach them (`find_best_thresh`,
    with `predictions` taken as the non-null answers).

    `gold` maps question id -> gold answer texts (empty for unanswerable). A gold question
    missing from `predictions` scores 0 (EM and F1) and still counts in every total, overall and
    HasAns/NoAns. That is what the official v1.1 script does ("will receive score 0"); the
    official v2.0 script instead skips it ("Missing prediction for ..."), divides the overall
    scores by the number of *predicted* questions, and then fails (KeyError) in the HasAns/NoAns
    breakdown, so v2.0 defines no score for an incomplete prediction file and we keep v1.1's.
    Predictions for questions not in `gold` are ignored.
    """
    exact, f1, has_answer = {}, {}, {}
    for qid, texts in gold.items():
        answers = squad_gold_answers(texts)
        has_answer[qid] = answers != [""]
        prediction = predictions.get(qid)
        if prediction is None:
            exact[qid], f1[qid] = 0, 0.0
            continue
        exact[qid] = max(squad_exact(prediction, a) for a in answers)
        f1[qid] = max(squad_f1(prediction, a) for a in answers)
    out = _squad_totals(exact, f1, list(gold))
    out = {"exact_match": out["exact"], "f1": out["f1"], "total": out["total"]}
    has = [q for q in gold if has_answer[q]]
    no = [q for q in gold if not has_answer[q]]
    if no:
        for prefix, qids in (("HasAns", has), ("NoAns", no)):
            if qids:
                part = _squad_totals(exact, f1, qids)
                out.update({f"{prefix}_exact": part["exact"], f"{prefix}_f1": part["f1"],
                            f"{prefix}_total": part["total"]})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(predictions, exact, na_probs, has_answer)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1, na_probs, has_answer)
    return out


def _squad_totals(exact: Mapping[str, float], f1: Mapping[str, float], qids: list[str]) -> dict[str, float]:
    total = len(qids)
    if not total:
        return {"exact": 0.0, "f1": 0.0, "total": 0}
    return {"exact": _percent(exact, qids), "f1": _percent(f1, qids), "total": total}


def _percent(scores: Mapping[str, float], qids: list[str]) -> float:
    return 100.0 * sum(scores[q] for q in qids) / len(qids)


def find_best_thresh(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """(best score in percent, its threshold) over all thresholds of the no-answer rule above.

    `scores[qid]`, for every gold question, is the score of answering with `predictions[qid]`
    (0 where the prediction is missing). Abstaining scores 1 on an unanswerable question and 0 on
    an answerable one; a question without a prediction scores 0 whatever the threshold. Every
    predicted question in `scores` needs an `na_probs` entry (not NaN).

    Only thresholds between distinct no-answer scores are candidates: `thresh = v` for each
    distinct value `v` (answers exactly the questions with `na_prob <= v`), and, for "abstain
    everywhere", the largest float below the smallest `na_prob`. Of equal scores the smallest
    threshold (most abstentions) wins, as with the official sweep's strict `>`; the comparison is
    exact (the running totals are kept as fractions). The returned score is then recomputed from
    the decisions at the returned threshold, summed the way `squad_scores` sums, so
    `squad_scores(gold, apply_no_answer_threshold(predictions, na_probs, thresh))` gives exactly it.

    Where this departs from `find_best_thresh` of `evaluate-v2.0.py` (same inputs and outputs),
    each time because the official value is not what its own threshold gives: (1) it updates its
    best inside a group of tied `na_prob`s, so it can report a score no threshold reaches; (2) when
    abstaining everywhere is best it returns 0.0, which answers every `na_prob <= 0`; (3) answering
    an unanswerable question costs 1 there whenever the prediction string is non-empty, even one
    that normalises to "" ("The") and so scores as an abstention; here it costs `1 - scores[qid]`;
    (4) it counts missing predictions as abstentions in its starting score but leaves them out of
    the denominator. Without ties, missing predictions or such answers the two report the same
    best score, and the same threshold unless abstaining everywhere is best.
    """
    qids = list(scores)
    if not qids:
        return 0.0, 0.0
    abstain = {q: (0 if has_answer[q] else 1) if q in predictions else 0 for q in qids}
    answerable = [q for q in qids if q in predictions]
    missing = [q for q in answerable if q not in na_probs]
    if missing:
        raise ValueError(f"no no-answer score for {len(missing)} predicted question(s), e.g. {missing[0]!r}")
    if any(math.isnan(na_probs[q]) for q in answerable):
        raise ValueError("a no-answer score is NaN; the threshold rule is undefined there")
    order = sorted(answerable, key=lambda q: na_probs[q])
    thresh = 0.0                                       # nothing to decide: any threshold gives the same
    best: Fraction | None = None
    if order and na_probs[order[0]] > -math.inf:       # "abstain everywhere" is reachable
        best, thresh = Fraction(0), math.nextafter(float(na_probs[order[0]]), -math.inf)
    running, i = Fraction(0), 0                        # gain over abstaining everywhere, exact
    while i < len(order):
        value = na_probs[order[i]]
        while i < len(order) and na_probs[order[i]] == value:   # a tie group is answered as a whole
            q = order[i]
            running += Fraction(float(scores[q])) - abstain[q]
            i += 1
        if best is None or running > best:
            best, thresh = running, float(value)
    decided = {q: scores[q] if q in predictions and not abstains(na_probs[q], thresh) else abstain[q]
               for q in qids}
    return _percent(decided, qids), float(thresh)


# --------------------------------------------------------------------------------------------
# Entity-level F1 (conlleval / seqeval default mode)

Entity = tuple[str, int, int]  # (type, first token, last token), inclusive


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag {tag!r} is not 'O' or one of B-/I-/E-/S- followed by a type")
    return prefix, kind


def _ends_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag != "O" and prev_type != kind)
    )


def _starts_chunk(prev_tag: str, tag: str, prev_type: str, kind: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag != "O" and prev_type != kind)
    )


def get_entities(tags: Sequence[str]) -> list[Entity]:
    """Chunks of one tag sequence. An I- after O or after another type starts a chunk (IOB1,
    and lenient IOB2); a change of type ends one; B- always starts one."""
    entities: list[Entity] = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = _split_tag(tag)
        if _ends_chunk(prev_tag, prefix, prev_type, kind):
            entities.append((prev_type, begin, i - 1))
        if _starts_chunk(prev_tag, prefix, prev_type, kind):
            begin = i
        prev_tag, prev_type = prefix, kind
    return entities


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over exact (type, span) matches, overall and per gold or
    predicted type (`precision_PER`, `recall_PER`, `f1_PER`, `support_PER`). Sentences are
    scored independently: a chunk never runs across a sentence boundary."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted ones")
    gold_set, pred_set = set(), set()
    for s, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted ones")
        gold_set.update((s, *e) for e in get_entities(g))
        pred_set.update((s, *e) for e in get_entities(p))
    out = _prf(len(gold_set & pred_set), len(pred_set), len(gold_set))
    for kind in sorted({e[1] for e in gold_set | pred_set}):
        g = {e for e in gold_set if e[1] == kind}
        p = {e for e in pred_set if e[1] == kind}
        scores = _prf(len(g & p), len(p), len(g))
        out.update({f"{name}_{kind}": value for name, value in scores.items()})
        out[f"support_{kind}"] = float(len(g))
    return out


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
