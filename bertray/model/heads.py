"""Heads over one shared encoder: pretraining (MLM + NSP, paper section 3.1) and fine-tuning
(paper section 4 and 5.3). Labels in, loss out, one typed output dataclass per kind of head.

Every class keeps the encoder at `.bert` and names its layers as Hugging Face does (`cls.*`,
`classifier`, `qa_outputs`), so `save_pretrained` writes checkpoints that the `transformers`
class of the same name loads, and `from_pretrained` reads theirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertray.model.config import BertConfig
from bertray.errors import ConfigError
from bertray.model import hf_format
from bertray.model.bert import ACTIVATIONS, BertModel, BertPreTrainedModel, TokenPacking


@dataclass
class PreTrainingOutput:
    """Losses and metrics of one pretraining step.

    `mlm_logits` is (num_real_slots, vocab): one row per prediction slot whose
    `masked_lm_weights` is > 0 (every slot when no weights are given), in row-major
    (batch, slot) order, i.e. row i belongs to the i-th True of `masked_lm_weights.flatten() > 0`.
    Padding slots get no row, because the head never computes them.
    `nsp_loss` is a zero that keeps the NSP head in the graph when every label is -1 (the
    No-NSP ablation), so that data-parallel training sees every parameter used; it is None when
    no labels are given. Accuracies are detached scalars; `nsp_accuracy` is None when no labels are
    given and 0 when every label is -1 (deciding which would wait for the device): average it
    weighted by the count of labels >= 0.
    """

    loss: torch.Tensor | None
    mlm_loss: torch.Tensor | None
    mlm_accuracy: torch.Tensor | None
    nsp_loss: torch.Tensor | None
    nsp_accuracy: torch.Tensor | None
    mlm_logits: torch.Tensor | None              # (num_real_slots, V)
    nsp_logits: torch.Tensor                     # (B, 2)


@dataclass
class TaskOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor                         # (B, labels) | (B, S, labels) | (B, choices)


@dataclass
class SpanOutput:
    loss: torch.Tensor | None
    start_logits: torch.Tensor                   # (B, S)
    end_logits: torch.Tensor                     # (B, S)


def _head_dropout(config: BertConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


# --------------------------------------------------------------------------------------------
# Pretraining


class BertPredictionHeadTransform(nn.Module):
    """Dense + activation + LayerNorm before the vocabulary projection (Google's `cls/predictions/transform`)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Scores over the vocabulary with the input embedding matrix as output weights (tied).

    `decoder` is a Linear whose weight *is* the word embedding parameter and whose bias *is*
    `bias`: the Hugging Face module layout, without a second copy of the vocabulary matrix.
    """

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, device="meta")
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))                               # (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(BertPreTrainedModel):
    """Masked LM + next sentence prediction, with the MLM head computed at the masked slots only.

    The left-to-right ablation needs no other path: its data passes every position as a
    prediction slot (P = S, label = next token) and `config.is_causal` makes attention causal.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.cls.predictions.transform.apply(self.init_weights)
        self.init_weights(self.cls.seq_relationship)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, masked_lm_positions: torch.Tensor | None = None,
                masked_lm_ids: torch.Tensor | None = None, masked_lm_weights: torch.Tensor | None = None,
                next_sentence_labels: torch.Tensor | None = None, *, masked_lm_index: torch.Tensor | None = None,
                packing: TokenPacking | bool | None = None) -> PreTrainingOutput:
        """`masked_lm_positions`, `masked_lm_ids`, `masked_lm_weights`: (B, P), the weights 1.0
        for real slots and 0.0 for padding slots. `next_sentence_labels`: (B,), 0 IsNext,
        1 NotNext, -1 no label.

        `masked_lm_index` (N,): the flat slots b * P + p whose weight is > 0, ascending. Found from
        the weights when not given, which on a GPU waits for them (a host sync); training loops
        compute it on the host with the batch (`bertray.runtime.batches`). `packing`: see `BertModel`."""
        out = self.bert(input_ids, token_type_ids, attention_mask, packing=packing)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)            # (B, 2)
        mlm_logits = mlm_loss = mlm_accuracy = None
        if masked_lm_positions is not None:
            mlm_logits, mlm_loss, mlm_accuracy = self._masked_lm(
                out.last_hidden_state, masked_lm_positions, masked_lm_ids, masked_lm_weights, masked_lm_index)
        nsp_loss = nsp_accuracy = None
        if next_sentence_labels is not None:
            nsp_loss, nsp_accuracy = _next_sentence(nsp_logits, next_sentence_labels)
        loss = mlm_loss if nsp_loss is None else nsp_loss if mlm_loss is None else mlm_loss + nsp_loss
        return PreTrainingOutput(loss=loss,
                                 mlm_loss=mlm_loss, mlm_accuracy=mlm_accuracy, nsp_loss=nsp_loss,
                                 nsp_accuracy=nsp_accuracy, mlm_logits=mlm_logits, nsp_logits=nsp_logits)

    def _masked_lm(self, hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None,
                   weights: torch.Tensor | None, real: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Gather the real slots' hidden states, then transform and project only those rows."""
        batch, seq_len, width = hidden.shape
        offsets = torch.arange(batch, device=positions.device)[:, None] * seq_len
        rows = (positions.long() + offsets).reshape(-1)                      # (B*P,) into (B*S)
        labels = labels.reshape(-1).long() if labels is not None else None
        if weights is not None:
            if real is None:
                real = (weights.reshape(-1) > 0).nonzero().squeeze(1)
            rows, weights = rows.index_select(0, real), weights.reshape(-1).index_select(0, real).float()  # (N,)
            labels = labels.index_select(0, real) if labels is not None else None
        logits = self.cls.predictions(hidden.reshape(batch * seq_len, width).index_select(0, rows))  # (N, V)
        if labels is None:
            return logits, None, None
        if weights is None:
            weights = torch.ones(labels.shape, device=logits.device)
        # Weighted mean over real slots, as Google's reference: sum(w * ce) / max(sum(w), 1e-5).
        total = weights.sum().clamp(min=1e-5)
        loss = (weights * F.cross_entropy(logits, labels, reduction="none")).sum() / total
        accuracy = (weights * _is_top(logits.detach(), labels)).sum() / total
        return logits, loss, accuracy


def _is_top(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where the label's score is the highest (a tie counts as a hit); `argmax` is several
    times slower on CPU over a 30k vocabulary because it tracks indices."""
    return (logits.gather(-1, labels[..., None]).squeeze(-1) >= logits.amax(-1)).float()


def _next_sentence(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy over sequences with a label (-1 = none), and accuracy over the same."""
    labels = labels.reshape(-1).long()
    valid = labels >= 0
    count = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")     # (B,)
    loss = (ce * valid).sum() / count
    accuracy = ((logits.detach().argmax(-1) == labels) & valid).sum() / count   # 0 without labels: weigh by count
    return loss, accuracy


# --------------------------------------------------------------------------------------------
# Fine-tuning


class _LinearHead(BertPreTrainedModel):
    """The encoder and one dropout + linear layer to `num_labels` outputs: the sequence head reads
    the pooled [CLS], the token head every token (and builds no pooler)."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)
        self.dropout = nn.Dropout(_head_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights(self.classifier)


class BertForSequenceClassification(_LinearHead):
    """[CLS] (pooled) -> dropout -> linear (paper Figure 4a/b). One label means regression (STS-B)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, add_pooling_layer=True)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                packing: TokenPacking | bool | None = None) -> TaskOutput:
        """`labels`: (B,) class ids; floats when `config.num_labels == 1` (mean squared error); or
        (B, num_labels) 0/1 floats, one column per label (multi-label: a sigmoid per label, binary
        cross-entropy), the rule transformers applies when `problem_type` is not set."""
        pooled = self.bert(input_ids, token_type_ids, attention_mask, packing=packing).pooler_output
        logits = self.classifier(self.dropout(pooled))                       # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            elif labels.is_floating_point():
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels.long())
        return TaskOutput(loss=loss, logits=logits)


class BertForTokenClassification(_LinearHead):
    """Every token's final hidden state -> dropout -> linear (paper Figure 4d, NER). No pooler."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                packing: TokenPacking | bool | None = None) -> TaskOutput:
        """`labels`: (B, S) tag ids, -100 where no prediction is scored (padding, sub-word continuations)."""
        hidden = self.bert(input_ids, token_type_ids, attention_mask, packing=packing).last_hidden_state
        logits = self.classifier(self.dropout(hidden))                       # (B, S, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.reshape(-1).long(), ignore_index=-100)
        return TaskOutput(loss=loss, logits=logits)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Start and end vectors dotted with every token (paper Figure 4c, SQuAD). No pooler.

    Positions outside the input (>= S, as a truncated answer gives) are ignored in the loss,
    as Hugging Face does.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights(self.qa_outputs)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, packing: TokenPacking | bool | None = None) -> SpanOutput:
        hidden = self.bert(input_ids, token_type_ids, attention_mask, packing=packing).last_hidden_state
        start_logits, end_logits = self.qa_outputs(hidden).unbind(-1)        # 2 x (B, S)
        loss = None
        if start_positions is not None and end_positions is not None:
            seq_len = start_logits.shape[1]
            start = start_positions.reshape(-1).long().clamp(0, seq_len)
            end = end_positions.reshape(-1).long().clamp(0, seq_len)
            loss = (F.cross_entropy(start_logits, start, ignore_index=seq_len)
                    + F.cross_entropy(end_logits, end, ignore_index=seq_len)) / 2
        return SpanOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


class BertForMultipleChoice(BertPreTrainedModel):
    """Each choice's pooled [CLS] -> one score; softmax over the choices (paper section 4.4, SWAG)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(_head_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.init_weights(self.classifier)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                packing: TokenPacking | bool | None = None) -> TaskOutput:
        """Inputs (B, C, S), one sequence per choice; `labels` (B,) the index of the right choice."""
        batch, choices, seq_len = input_ids.shape
        flat = [None if t is None else t.reshape(batch * choices, seq_len)
                for t in (input_ids, token_type_ids, attention_mask)]
        pooled = self.bert(*flat, packing=packing).pooler_output                             # (B*C, H)
        logits = self.classifier(self.dropout(pooled)).view(batch, choices)  # (B, C)
        loss = F.cross_entropy(logits, labels.long()) if labels is not None else None
        return TaskOutput(loss=loss, logits=logits)


# The paper's feature-based NER setup (section 5.3): a two-layer BiLSTM, 768 wide, over the
# concatenation of the last four layers.
PAPER_TAGGER_SIZES = {"lstm_hidden_size": 768, "num_lstm_layers": 2, "num_feature_layers": 4}


class BertFeatureBasedTagger(BertPreTrainedModel):
    """The feature-based approach of paper section 5.3 (Table 7, "Concat Last Four Hidden").

    The encoder is frozen (no gradients, always in eval mode); the concatenated outputs of its
    last `num_feature_layers` layers (4H) feed a randomly initialised two-layer BiLSTM of
    `lstm_hidden_size` total width (768 in the paper), then a linear tag classifier. Padding is
    expected at the right end (the BiLSTM reads each sequence up to its length).
    """

    def __init__(self, config: BertConfig, lstm_hidden_size: int = PAPER_TAGGER_SIZES["lstm_hidden_size"],
                 num_lstm_layers: int = PAPER_TAGGER_SIZES["num_lstm_layers"],
                 num_feature_layers: int = PAPER_TAGGER_SIZES["num_feature_layers"]) -> None:
        super().__init__()
        if not 1 <= num_feature_layers <= config.num_hidden_layers:
            raise ConfigError(f"num_feature_layers: must be in [1, num_hidden_layers={config.num_hidden_layers}], "
                              f"got {num_feature_layers}")
        if lstm_hidden_size <= 0 or lstm_hidden_size % 2:
            raise ConfigError(f"lstm_hidden_size: must be a positive even number (two directions), "
                              f"got {lstm_hidden_size}")
        self.config = config
        self.num_feature_layers = num_feature_layers
        self.bert = BertModel(config, add_pooling_layer=False)
        self.bert.requires_grad_(False)
        self.bert.eval()
        dropout = _head_dropout(config)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(num_feature_layers * config.hidden_size, lstm_hidden_size // 2,
                            num_layers=num_lstm_layers, bidirectional=True, batch_first=True,
                            dropout=dropout if num_lstm_layers > 1 else 0.0)
        self.classifier = nn.Linear(lstm_hidden_size, config.num_labels)
        self.init_weights(self.classifier)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: BertConfig | None = None, *,
                        lstm_hidden_size: int | None = None, num_lstm_layers: int | None = None,
                        num_feature_layers: int | None = None, **config_overrides: Any) -> "BertFeatureBasedTagger":
        """As `BertPreTrainedModel.from_pretrained`; the BiLSTM sizes come from the checkpoint when it
        is a tagger's, else from the arguments, else the paper's (768 wide, 2 layers, 4 features)."""
        config, tensors = cls._read_checkpoint(path, config, config_overrides)
        sizes = dict(PAPER_TAGGER_SIZES)
        if "lstm.weight_hh_l0" in tensors:
            sizes.update(lstm_hidden_size=2 * tensors["lstm.weight_hh_l0"].shape[1],
                         num_lstm_layers=sum(1 for name in tensors
                                             if name.startswith("lstm.weight_ih_l") and "reverse" not in name),
                         num_feature_layers=tensors["lstm.weight_ih_l0"].shape[1] // config.hidden_size)
        given = dict(lstm_hidden_size=lstm_hidden_size, num_lstm_layers=num_lstm_layers,
                     num_feature_layers=num_feature_layers)
        sizes.update({k: v for k, v in given.items() if v is not None})
        model = cls(config, **sizes)
        hf_format.load_into(model, tensors, source=path)
        return model

    def train(self, mode: bool = True) -> "BertFeatureBasedTagger":
        super().train(mode)
        self.bert.eval()                          # frozen features: no dropout in the encoder
        return self

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                packing: TokenPacking | bool | None = None) -> TaskOutput:
        """`labels`: (B, S) tag ids, -100 where no prediction is scored."""
        with torch.no_grad():
            states = self.bert(input_ids, token_type_ids, attention_mask, output_hidden_states=True,
                               packing=packing).hidden_states
        features = self.dropout(torch.cat(states[-self.num_feature_layers:], dim=-1))  # (B, S, 4H)
        seq_len = input_ids.shape[1]
        if attention_mask is None:
            encoded, _ = self.lstm(features)                                  # (B, S, lstm)
        else:
            lengths = attention_mask.reshape(len(input_ids), -1).sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(features, lengths, batch_first=True, enforce_sorted=False)
            encoded, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                                          total_length=seq_len)
        logits = self.classifier(self.dropout(encoded))                       # (B, S, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.reshape(-1).long(), ignore_index=-100)
        return TaskOutput(loss=loss, logits=logits)


__all__ = ["BertForPreTraining", "BertForSequenceClassification", "BertForTokenClassification",
           "BertForQuestionAnswering", "BertForMultipleChoice", "BertFeatureBasedTagger",
           "PreTrainingOutput", "TaskOutput", "SpanOutput", "BertPredictionHeadTransform",
           "BertLMPredictionHead", "BertPreTrainingHeads"]
