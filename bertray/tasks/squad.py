"""SQuAD v1.1 and v2.0: the official JSON, sliding-window features, span decoding, scoring.

The procedure is Google's `run_squad.py` (question as segment A truncated to 64 tokens, passage
as B in windows of at most 384 tokens advancing by 128, the "max context" rule that lets only
the window where a token has the most context on both sides propose it as a start, n-best 20,
answers at most 30 tokens). Characters map to tokens through the tokenizer's offsets, so a span
goes back to the exact substring of the original context, with no whitespace re-alignment.

v2.0 no-answer: the span at `[CLS]` (position 0). Its score is the smallest
`start_logit[0] + end_logit[0]` over the question's windows; the null odds are
`null_score - best_span_score` and the answer is "" when `null_odds > tau` (the rule is
`metrics.abstains`, the official script's `--na-prob-thresh`; the paper's threshold is -tau).
As in the paper, tau is chosen on dev for the best F1: `evaluate_squad` does that by default and
reports EM/F1 at that tau (and at tau = 0), and `best_tau` returns it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import fsspec
import numpy as np

from bertray.errors import TaskDataError
from bertray.tasks import metrics
from bertray.wordpiece import special_id, tokenizer_truncation

log = logging.getLogger(__name__)

DOC_STRIDE = 128
MAX_QUERY_LEN = 64
MAX_ANSWER_LEN = 30
N_BEST = 20


@dataclass(frozen=True)
class Answer:
    text: str
    start: int      # character offset into the context


@dataclass(frozen=True)
class SquadExample:
    qid: str
    title: str
    question: str
    context: str
    answers: tuple[Answer, ...]     # empty for an unanswerable v2.0 question
    is_impossible: bool = False


# --------------------------------------------------------------------------------------------
# Reading


def read_squad(path: str | os.PathLike) -> tuple[list[SquadExample], dict[str, int]]:
    """Read an official SQuAD JSON file (v1.1 or v2.0). Every answer must be the substring of its
    context at `answer_start`; question ids must be unique. Counts: `articles`, `paragraphs`,
    `questions`, `unanswerable`, `answers`."""
    path = os.fspath(path)
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(f"{path}: expected an object with a 'data' list of articles (the official SQuAD layout)")
    examples: list[SquadExample] = []
    seen: set[str] = set()
    counts = {"articles": 0, "paragraphs": 0, "questions": 0, "unanswerable": 0, "answers": 0}
    for a, article in enumerate(data["data"]):
        title = _field(path, article, "title", f"article {a}")
        counts["articles"] += 1
        for p, paragraph in enumerate(_field(path, article, "paragraphs", f"article {title!r}")):
            where = f"article {title!r}, paragraph {p}"
            context = _field(path, paragraph, "context", where)
            counts["paragraphs"] += 1
            for qa in _field(path, paragraph, "qas", where):
                qid = _field(path, qa, "id", where)
                where_q = f"article {title!r}, question {qid}"
                if qid in seen:
                    raise TaskDataError(f"{path}: {where_q}: duplicate question id")
                seen.add(qid)
                impossible = bool(qa.get("is_impossible", False))
                answers = tuple(_answer(path, where_q, context, ans) for ans in _field(path, qa, "answers", where_q))
                if impossible and answers:
                    raise TaskDataError(f"{path}: {where_q}: is_impossible is true but {len(answers)} answers "
                                        "are given")
                if not impossible and not answers:
                    raise TaskDataError(f"{path}: {where_q}: no answers and is_impossible is not true")
                question = _field(path, qa, "question", where_q)
                examples.append(SquadExample(qid, title, question, context, answers, impossible))
                counts["questions"] += 1
                counts["unanswerable"] += impossible
                counts["answers"] += len(answers)
    log.info("%s: %s", path, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return examples, counts


def _field(path: str, obj, key: str, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise TaskDataError(f"{path}: {where}: missing key {key!r}")
    return obj[key]


def _answer(path: str, where: str, context: str, answer) -> Answer:
    text, start = _field(path, answer, "text", where), _field(path, answer, "answer_start", where)
    if not isinstance(start, int) or context[start:start + len(text)] != text:
        found = context[start:start + len(text)] if isinstance(start, int) else start
        raise TaskDataError(f"{path}: {where}: answer {text!r} is not the context at answer_start={start!r} "
                            f"(found {found!r})")
    return Answer(text, start)


# --------------------------------------------------------------------------------------------
# Features


def _windows(n_tokens: int, max_tokens: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of each window, as the reference: advance by `stride`, stop at the end."""
    spans, start = [], 0
    while True:
        length = min(n_tokens - start, max_tokens)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, stride)


def _max_context(spans: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    """For each context token, the window where min(left, right context) + 0.01 * length is
    highest (the first on ties)."""
    best_score = np.full(n_tokens, -np.inf)
    best_span = np.zeros(n_tokens, dtype=np.int64)
    for j, (start, length) in enumerate(spans):
        pos = np.arange(start, start + length)
        score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
        better = score > best_score[pos]
        best_score[pos[better]] = score[better]
        best_span[pos[better]] = j
    return best_span


def featurize_squad(examples: Sequence[SquadExample], tokenizer, max_seq_len: int = 384, *,
                    doc_stride: int = DOC_STRIDE, max_query_len: int = MAX_QUERY_LEN,
                    keep_offsets: bool = True) -> dict[str, np.ndarray]:
    """One feature per window: `input_ids`, `token_type_ids`, `attention_mask` [F, S];
    `start_positions`/`end_positions` [F] (token positions of the first answer, 0 = `[CLS]` when
    the window does not contain it or there is none); `example_index` [F]. With `keep_offsets`
    (needed to decode, not to train) also `offset_mapping` [F, S, 2] (character span in the
    context, -1 outside it) and `token_is_max_context` [F, S]."""
    cls_id, sep_id, pad_id = (special_id(tokenizer, t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    contexts = list(dict.fromkeys(e.context for e in examples))
    with tokenizer_truncation(tokenizer, None):
        questions = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False)
        encoded = dict(zip(contexts, tokenizer.encode_batch(contexts, add_special_tokens=False)))
    rows: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "start_positions", "end_positions",
                                             "example_index", "offset_mapping", "token_is_max_context")}
    counts = {"questions_truncated": 0, "answer_outside_window": 0, "answer_without_tokens": 0}
    for i, (example, question) in enumerate(zip(examples, questions)):
        q_ids = question.ids[:max_query_len]
        counts["questions_truncated"] += len(question.ids) > max_query_len
        context = encoded[example.context]
        offsets = np.asarray(context.offsets, dtype=np.int32).reshape(-1, 2)
        max_doc = max_seq_len - len(q_ids) - 3
        if max_doc < 1:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for the passage after a "
                             f"{len(q_ids)}-token question")
        answer = _answer_tokens(example, offsets)
        if example.answers and answer is None:
            counts["answer_without_tokens"] += 1
        spans = _windows(len(context.ids), max_doc, doc_stride)
        best_span = _max_context(spans, len(context.ids))
        head = len(q_ids) + 2
        for j, (start, length) in enumerate(spans):
            ids = [cls_id, *q_ids, sep_id, *context.ids[start:start + length], sep_id]
            rows["input_ids"].append(ids)
            rows["token_type_ids"].append([0] * head + [1] * (length + 1))
            window_offsets = np.full((max_seq_len, 2), -1, dtype=np.int32)
            window_offsets[head:head + length] = offsets[start:start + length]
            is_max = np.zeros(max_seq_len, dtype=bool)
            is_max[head:head + length] = best_span[start:start + length] == j
            rows["offset_mapping"].append(window_offsets)
            rows["token_is_max_context"].append(is_max)
            if answer is not None and start <= answer[0] and answer[1] < start + length:
                rows["start_positions"].append(answer[0] - start + head)
                rows["end_positions"].append(answer[1] - start + head)
            else:
                rows["start_positions"].append(0)
                rows["end_positions"].append(0)
                counts["answer_outside_window"] += answer is not None
            rows["example_index"].append(i)
    n = len(rows["input_ids"])
    features = {
        "input_ids": np.full((n, max_seq_len), pad_id, dtype=np.int32),
        "token_type_ids": np.zeros((n, max_seq_len), dtype=np.int8),
        "attention_mask": np.zeros((n, max_seq_len), dtype=np.int8),
    }
    for f, (ids, types) in enumerate(zip(rows["input_ids"], rows["token_type_ids"])):
        features["input_ids"][f, :len(ids)] = ids
        features["token_type_ids"][f, :len(ids)] = types
        features["attention_mask"][f, :len(ids)] = 1
    for key in ("start_positions", "end_positions", "example_index"):
        features[key] = np.asarray(rows[key], dtype=np.int64).reshape(n)
    if keep_offsets:
        features["offset_mapping"] = np.asarray(rows["offset_mapping"], dtype=np.int32).reshape(n, max_seq_len, 2)
        features["token_is_max_context"] = np.asarray(rows["token_is_max_context"], dtype=bool).reshape(n, max_seq_len)
    log.info("SQuAD features: %d examples -> %d windows (%s)", len(examples), n,
             ", ".join(f"{k}={v}" for k, v in counts.items()))
    return features


def _answer_tokens(example: SquadExample, offsets: np.ndarray) -> tuple[int, int] | None:
    """First and last context token overlapping the first answer's characters."""
    if not example.answers or not len(offsets):
        return None
    answer = example.answers[0]
    char_start, char_end = answer.start, answer.start + len(answer.text)
    first = int(np.searchsorted(offsets[:, 1], char_start, side="right"))
    last = int(np.searchsorted(offsets[:, 0], char_end, side="left")) - 1
    if first >= len(offsets) or last < first:
        return None
    return first, last


# --------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class _Best:
    text: str           # best non-null span ("" when no window proposes a valid span)
    score: float        # its start + end logit (-inf when none)
    null_score: float   # smallest start_logit[0] + end_logit[0] over the windows


def _best_spans(examples: Sequence[SquadExample], features: Mapping[str, np.ndarray], start_logits: np.ndarray,
                end_logits: np.ndarray, n_best: int, max_answer_len: int) -> dict[str, _Best]:
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    offsets, is_max = features["offset_mapping"], features["token_is_max_context"]
    in_context = offsets[..., 0] >= 0
    best: dict[int, tuple[float, int, int, int]] = {}
    null: dict[int, float] = {}
    for f, i in enumerate(features["example_index"]):
        i = int(i)
        s_log, e_log = start_logits[f], end_logits[f]
        null[i] = min(null.get(i, np.inf), s_log[0] + e_log[0])
        starts = np.argsort(-s_log, kind="stable")[:n_best]
        ends = np.argsort(-e_log, kind="stable")[:n_best]
        s, e = starts[:, None], ends[None, :]
        valid = (is_max[f][s] & in_context[f][s] & in_context[f][e] & (e >= s) & (e - s + 1 <= max_answer_len))
        if not valid.any():
            continue
        scores = np.where(valid, s_log[s] + e_log[e], -np.inf)
        k = int(np.argmax(scores))
        score = float(scores.flat[k])
        if i not in best or score > best[i][0]:
            best[i] = (score, f, int(starts[k // len(ends)]), int(ends[k % len(ends)]))
    out = {}
    for i, example in enumerate(examples):
        if i not in null:
            raise ValueError(f"example {i} ({example.qid}) has no feature: were the features made from these examples?")
        if i in best:
            score, f, s, e = best[i]
            text = example.context[offsets[f, s, 0]:offsets[f, e, 1]]
        else:
            score, text = -np.inf, ""
        out[example.qid] = _Best(text, score, float(null[i]))
    return out


def decode_squad(examples: Sequence[SquadExample], features: Mapping[str, np.ndarray], start_logits: np.ndarray,
                 end_logits: np.ndarray, *, allow_no_answer: bool = False, tau: float = 0.0, n_best: int = N_BEST,
                 max_answer_len: int = MAX_ANSWER_LEN) -> tuple[dict[str, str], dict[str, float]]:
    """Predictions `{qid: text}` in the official format and, for v2.0, the null odds
    `{qid: null_score - best_span_score}` (the official `na_prob` file; empty for v1.1). v2.0
    answers "" where `metrics.abstains(odds, tau)`; pass the tau tuned on dev (`best_tau`, or the
    `tau` that `evaluate_squad` reports) to decode as the reported scores were computed."""
    best = _best_spans(examples, features, start_logits, end_logits, n_best, max_answer_len)
    texts = {qid: b.text for qid, b in best.items()}
    if not allow_no_answer:
        return texts, {}
    odds = _null_odds(best)
    return metrics.apply_no_answer_threshold(texts, odds, tau), odds


def _null_odds(best: Mapping[str, _Best]) -> dict[str, float]:
    return {qid: b.null_score - b.score for qid, b in best.items()}


def _gold(examples: Sequence[SquadExample]) -> dict[str, list[str]]:
    return {e.qid: [a.text for a in e.answers] for e in examples}


def evaluate_squad(examples: Sequence[SquadExample], features: Mapping[str, np.ndarray], start_logits: np.ndarray,
                   end_logits: np.ndarray, *, allow_no_answer: bool = False, tau: float | None = None,
                   n_best: int = N_BEST, max_answer_len: int = MAX_ANSWER_LEN) -> dict[str, float]:
    """Official scores of the decoded predictions: `exact_match`, `f1` (percent), `total`.

    v2.0 (`allow_no_answer`): with `tau=None` (the default) the threshold is tuned on these
    examples, the paper's protocol on dev: tau = the best-F1 threshold (`metrics.find_best_thresh`),
    and `exact_match`, `f1` and the HasAns/NoAns breakdown are those of the predictions decoded at
    it (so `f1 == best_f1`). A given `tau` is applied as it is. Also reported: `tau`,
    `exact_match_at_0`/`f1_at_0` (the untuned threshold 0) and the official script's
    `best_exact`/`best_f1` with their thresholds. v1.1 takes no threshold (`tau` is ignored)."""
    best = _best_spans(examples, features, start_logits, end_logits, n_best, max_answer_len)
    gold = _gold(examples)
    texts = {qid: b.text for qid, b in best.items()}
    if not allow_no_answer:
        return metrics.squad_scores(gold, texts)
    odds = _null_odds(best)
    sweep = metrics.squad_scores(gold, texts, na_probs=odds)
    if tau is None:
        tau = sweep["best_f1_thresh"]
    out = metrics.squad_scores(gold, metrics.apply_no_answer_threshold(texts, odds, tau))
    at_0 = metrics.squad_scores(gold, metrics.apply_no_answer_threshold(texts, odds, 0.0))
    out.update(tau=float(tau), exact_match_at_0=at_0["exact_match"], f1_at_0=at_0["f1"])
    out.update({k: v for k, v in sweep.items() if k.startswith("best_")})
    return out


def best_tau(examples: Sequence[SquadExample], features: Mapping[str, np.ndarray], start_logits: np.ndarray,
             end_logits: np.ndarray, *, n_best: int = N_BEST, max_answer_len: int = MAX_ANSWER_LEN) -> float:
    """The null-odds threshold with the best F1 on these examples (`best_f1_thresh`); decoding
    with it (`decode_squad(..., tau=...)`) gives exactly that F1."""
    return evaluate_squad(examples, features, start_logits, end_logits, allow_no_answer=True,
                          n_best=n_best, max_answer_len=max_answer_len)["tau"]


# The stand-in for +/-inf null odds in JSON (strict JSON has no Infinity): a question no window
# proposes a span for has odds +inf (and the prediction "" whatever the threshold). The largest
# finite float is above every finite odds value, so any threshold below it decides the same on
# the written file (the official script's `--na-prob-thresh`) as our decoder did.
ODDS_LIMIT = sys.float_info.max


def _json_number(value: float) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError("NaN cannot be written as a JSON number")
    return math.copysign(ODDS_LIMIT, value) if math.isinf(value) else value


def write_predictions(values: Mapping[str, str] | Mapping[str, float], path: str | os.PathLike) -> None:
    """Write `{qid: text}` (predictions.json) or `{qid: odds}` (null_odds.json) as the official
    evaluation scripts read them: strict JSON, +/-inf odds written as +/-`ODDS_LIMIT`."""
    with fsspec.open(os.fspath(path), "w", encoding="utf-8") as f:
        json.dump({k: (_json_number(v) if isinstance(v, (float, np.floating)) else v) for k, v in values.items()}, f,
                  ensure_ascii=False, indent=2, allow_nan=False)
        f.write("\n")
