"""The inner loop of prediction: texts -> token ids -> length-sorted batches -> labels and scores.

Inputs of one call are tokenized together, sorted by length and cut into batches of neighbours,
so a batch is padded to at most a few tokens past its shortest member; whatever padding remains
is skipped by the encoder's packed path (`attention_inputs` decides per batch: no mask at all
when every position is real, packing when enough are padding). Results come back in input order.
Batch prediction (`bertray.predict.job`) and the HTTP service (`bertray.serve`) both call this,
through the kind of model they hold (`bertray.predict.kinds`); token tagging builds on
`forward_sorted` in `bertray.predict.tagging`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bertray.errors import ConfigError
from bertray.predict.entities import Entity
from bertray.predict.model import LoadedModel
from bertray.runtime.autocast import autocast
from bertray.runtime.batches import attention_inputs, to_device

EMBEDDINGS = ("cls", "mean")
# A span logit at a position the model did not see (what `trainer.predict` pads with).
_OUTSIDE = -1e4


@dataclass
class Predictions:
    """Columns over the inputs, in input order.

    `prediction`: the label name (classification), the number written with 4 decimals
    (regression) or the answer text (question answering). `score`: the probability of that label;
    the number itself for regression; for an answer, sigmoid(best span score - no-answer score),
    the model's confidence that the span beats answering nothing. `probabilities`: (N, labels),
    the softmax (classification) or every label's sigmoid (multilabel). `embedding`: (N, H)
    float32 when asked for. Multilabel and token models leave `prediction` and `score` empty and
    fill `labels` (the labels whose sigmoid is over the threshold, highest first) or `entities`
    (each text's entities, `bertray.predict.entities`)."""

    prediction: list[str]
    score: np.ndarray
    probabilities: np.ndarray | None = None
    embedding: np.ndarray | None = None
    labels: list[list[str]] | None = None
    entities: list[list[Entity]] | None = None


def encode(loaded: LoadedModel, first: Sequence[str], second: Sequence[str] | None = None
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and segment ids of `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, the longer side
    truncated first to `max_seq_len`; no padding."""
    from bertray.wordpiece import tokenizer_truncation

    inputs = list(first) if second is None else list(zip(first, second))
    if not inputs:
        return [], []
    with tokenizer_truncation(loaded.tokenizer, loaded.max_seq_len):
        encodings = loaded.tokenizer.encode_batch(inputs)
    return ([np.asarray(e.ids, dtype=np.int64) for e in encodings],
            [np.asarray(e.type_ids, dtype=np.int64) for e in encodings])


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices of `lengths` in batches of at most `batch_size` neighbours in length, longest first
    (the largest batch first: a device that runs out of memory does so at once, not at the end)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def forward_sorted(loaded: LoadedModel, ids: Sequence[np.ndarray], types: Sequence[np.ndarray], *,
                   batch_size: int = 64, embeddings: str | None = None, width: int | None = None,
                   batch_sizes: list[int] | None = None) -> dict[str, np.ndarray]:
    """Raw model outputs in input order: `logits` (N, labels) of a sequence head, (N, width,
    labels) of a token head (zeros past each sequence), or `start_logits`/`end_logits` (N, width)
    with -1e4 past each sequence; `embedding` (N, H) with `embeddings` = "cls" (the final [CLS]
    hidden state) or "mean" (the mean over real tokens). `batch_sizes`, when given, receives the
    size of every batch the model ran."""
    if embeddings is not None and embeddings not in EMBEDDINGS:
        raise ConfigError(f"embeddings: {embeddings!r} is not one of {', '.join(EMBEDDINGS)} (or none)")
    n = len(ids)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
    pad = loaded.tokenizer.token_to_id("[PAD]") or 0
    model, span = loaded.model, loaded.kind == "span"
    width = width or (int(lengths.max()) if n else 0)
    out: dict[str, np.ndarray] = {}
    if span:
        out["start_logits"] = np.full((n, width), _OUTSIDE, dtype=np.float32)
        out["end_logits"] = np.full((n, width), _OUTSIDE, dtype=np.float32)
    hidden: list[torch.Tensor] = []
    hook = model.bert.register_forward_hook(lambda module, args, output: hidden.append(output.last_hidden_state)) \
        if embeddings else None
    try:
        for index in length_batches(lengths, batch_size):
            longest = int(lengths[index].max())
            input_ids = np.full((len(index), longest), pad, dtype=np.int64)
            token_types = np.zeros((len(index), longest), dtype=np.int64)
            mask = np.zeros((len(index), longest), dtype=np.int64)
            for row, i in enumerate(index):
                input_ids[row, :lengths[i]] = ids[i]
                token_types[row, :lengths[i]] = types[i]
                mask[row, :lengths[i]] = 1
            mask_t = torch.from_numpy(mask)
            attention, _ = attention_inputs(mask_t)
            batch = {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_types),
                     **{k: v for k, v in attention.items() if v is not None}}
            with autocast(loaded.device, "auto"):           # bf16 (fp16) on a GPU, fp32 on a CPU
                result = model(**to_device(batch, loaded.device))
            if batch_sizes is not None:
                batch_sizes.append(len(index))
            if span:
                out["start_logits"][index, :longest] = result.start_logits.float().cpu().numpy()
                out["end_logits"][index, :longest] = result.end_logits.float().cpu().numpy()
            elif result.logits.dim() == 3:            # a token head: one row of logits per token
                logits = result.logits.float().cpu().numpy()
                out.setdefault("logits", np.zeros((n, width, logits.shape[-1]), dtype=np.float32))[index, :longest] \
                    = logits
            else:
                logits = result.logits.float().cpu().numpy()
                out.setdefault("logits", np.zeros((n, logits.shape[1]), dtype=np.float32))[index] = logits
            if embeddings:
                h = hidden.pop().float()
                if embeddings == "cls":
                    vectors = h[:, 0]
                else:
                    m = mask_t.to(h.device, h.dtype)[..., None]
                    vectors = (h * m).sum(1) / m.sum(1)
                out.setdefault("embedding", np.zeros((n, h.shape[-1]), dtype=np.float32))[index] = \
                    vectors.cpu().numpy()
    finally:
        if hook is not None:
            hook.remove()
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the last axis); empty in, empty out."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.size == 0:
        return logits
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def sequence_logits(loaded: LoadedModel, first: Sequence[str], second: Sequence[str] | None, *,
                    expected: tuple[str, ...], batch_size: int = 64, embeddings: str | None = None,
                    batch_sizes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, outputs) float64 logits of a sequence head over texts or pairs, and the embeddings
    when asked for; `expected`: the kinds the caller reads."""
    if loaded.kind not in expected:
        raise ConfigError(f"{loaded.path} is a {loaded.spec.what} model: give it {loaded.spec.inputs_text}")
    ids, types = encode(loaded, first, second)
    if not ids:
        return (np.zeros((0, loaded.model.config.num_labels)),
                np.zeros((0, loaded.hidden_size), np.float32) if embeddings else None)
    out = forward_sorted(loaded, ids, types, batch_size=batch_size, embeddings=embeddings, batch_sizes=batch_sizes)
    return out["logits"].astype(np.float64), out.get("embedding")


def classify(loaded: LoadedModel, first: Sequence[str], second: Sequence[str] | None = None, *,
             batch_size: int = 64, embeddings: str | None = None,
             batch_sizes: list[int] | None = None) -> Predictions:
    """Labels (or regression values) of texts or of (first, second) pairs."""
    logits, embedding = sequence_logits(loaded, first, second, expected=("classification", "regression"),
                                        batch_size=batch_size, embeddings=embeddings, batch_sizes=batch_sizes)
    if loaded.kind == "regression":
        values = logits[:, 0]
        return Predictions([f"{v:.4f}" for v in values], values, None, embedding)
    probabilities = softmax(logits)
    best = probabilities.argmax(1)
    return Predictions([loaded.labels[i] for i in best], probabilities[np.arange(len(best)), best],
                       probabilities.astype(np.float32), embedding)


def classify_multilabel(loaded: LoadedModel, first: Sequence[str], second: Sequence[str] | None = None, *,
                        batch_size: int = 64, embeddings: str | None = None,
                        batch_sizes: list[int] | None = None) -> Predictions:
    """Every label's sigmoid score (`probabilities`) and the labels scored over the model's
    threshold, highest first (`labels`; none when no label passes), of texts or pairs."""
    logits, embedding = sequence_logits(loaded, first, second, expected=("multilabel",), batch_size=batch_size,
                                        embeddings=embeddings, batch_sizes=batch_sizes)
    scores = 1.0 / (1.0 + np.exp(-logits))
    chosen = [[loaded.labels[k] for k in np.argsort(-row, kind="stable") if row[k] > loaded.threshold]
              for row in scores]
    return Predictions([], np.zeros(0), scores, embedding, labels=chosen)


def answer(loaded: LoadedModel, questions: Sequence[str], contexts: Sequence[str], *, batch_size: int = 16,
           batch_sizes: list[int] | None = None) -> Predictions:
    """Answer spans cut out of each context: SQuAD's windows over long contexts (stride 128),
    the best span over the windows (n-best 20, at most 30 tokens)."""
    from bertray.tasks.squad import SquadExample, decode_squad, featurize_squad

    if loaded.kind != "span":
        raise ConfigError(f"{loaded.path} is a {loaded.spec.what} model: give it {loaded.spec.inputs_text}, "
                          f"not a question and a context")
    if not questions:
        return Predictions([], np.zeros(0))
    examples = [SquadExample(qid=str(i), title="", question=q, context=c, answers=())
                for i, (q, c) in enumerate(zip(questions, contexts))]
    try:
        features = featurize_squad(examples, loaded.tokenizer, loaded.max_seq_len)
    except ValueError as exc:            # a max_seq_len with no room for the passage
        raise ConfigError(f"max_seq_len: {exc}") from None
    lengths = features["attention_mask"].sum(1)
    ids = [row[:k].astype(np.int64) for row, k in zip(features["input_ids"], lengths)]
    types = [row[:k].astype(np.int64) for row, k in zip(features["token_type_ids"], lengths)]
    out = forward_sorted(loaded, ids, types, batch_size=batch_size, width=loaded.max_seq_len,
                         batch_sizes=batch_sizes)
    texts, odds = decode_squad(examples, features, out["start_logits"], out["end_logits"],
                               allow_no_answer=True, tau=math.inf)
    score = np.array([_sigmoid(-odds[e.qid]) for e in examples])
    return Predictions([texts[e.qid] for e in examples], score)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x)) if x > -700 else 0.0
