"""bertray/model/heads.py: a tiny-config tester for every head (shapes, losses, gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertray.model.config import BertConfig
from bertray.errors import ConfigError
from bertray.model.heads import (BertFeatureBasedTagger, BertForMultipleChoice, BertForPreTraining,
                                 BertForQuestionAnswering, BertForSequenceClassification,
                                 BertForTokenClassification, PreTrainingOutput, SpanOutput, TaskOutput)

VOCAB, HIDDEN, B, S = 97, 32, 3, 11


def tiny(**overrides) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=32)
    return BertConfig(**{**base, **overrides})


def inputs(batch=B, seq=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, types, mask


def mlm_batch():
    positions = torch.tensor([[1, 4, 6, 0], [2, 3, 0, 0], [5, 7, 8, 9]])
    weights = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[10, 11, 12, 0], [13, 14, 0, 0], [15, 16, 17, 18]])
    return positions, labels, weights


def assert_grads(model, names):
    params = dict(model.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# Pretraining


def test_pretraining_shapes_loss_and_gradients():
    model = BertForPreTraining(tiny())
    positions, labels, weights = mlm_batch()
    out = model(*inputs(), positions, labels, weights, torch.tensor([0, 1, 1]))
    assert isinstance(out, PreTrainingOutput)
    assert out.mlm_logits.shape == (int((weights > 0).sum()), VOCAB)     # real slots only
    assert out.nsp_logits.shape == (B, 2)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
    assert 0 <= out.mlm_accuracy <= 1 and 0 <= out.nsp_accuracy <= 1
    out.loss.backward()
    assert_grads(model, ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias",
                         "cls.predictions.transform.dense.weight", "cls.seq_relationship.weight",
                         "bert.pooler.dense.weight", "bert.encoder.layer.0.attention.self.query.weight"])


def test_decoder_is_tied_to_the_word_embeddings():
    model = BertForPreTraining(tiny())
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert decoder.bias is model.cls.predictions.bias
    names = [n for n, _ in model.named_parameters()]
    assert "bert.embeddings.word_embeddings.weight" in names and "cls.predictions.bias" in names
    assert not any(n.startswith("cls.predictions.decoder") for n in names)   # listed once, to the optimizer


def test_mlm_head_computes_only_the_real_slots():
    model = BertForPreTraining(tiny()).eval()
    seen = []
    model.cls.predictions.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    ids, types, mask = inputs()
    positions, labels, weights = mlm_batch()
    out = model(ids, types, mask, positions, labels, weights)
    assert seen == [(int((weights > 0).sum()), HIDDEN)]

    # The logits at the real slots are the full-vocabulary projection of those hidden states.
    hidden = model.bert(ids, types, mask).last_hidden_state
    batch_index, slot_index = (weights > 0).nonzero(as_tuple=True)
    picked = hidden[batch_index, positions[batch_index, slot_index]]               # (N, H)
    transformed = model.cls.predictions.transform(picked)
    full = transformed @ model.bert.embeddings.word_embeddings.weight.T + model.cls.predictions.bias
    torch.testing.assert_close(out.mlm_logits, full, atol=1e-5, rtol=0)


def test_mlm_loss_is_the_weighted_mean_over_real_slots():
    model = BertForPreTraining(tiny()).eval()
    ids, types, mask = inputs()
    positions, labels, weights = mlm_batch()
    out = model(ids, types, mask, positions, labels, weights)
    real = weights > 0
    expected = F.cross_entropy(out.mlm_logits, labels[real])
    torch.testing.assert_close(out.mlm_loss, expected)
    accuracy = (out.mlm_logits.argmax(-1) == labels[real]).float().mean()
    torch.testing.assert_close(out.mlm_accuracy, accuracy)

    # What sits in the padding slots does not matter.
    junk_positions, junk_labels = positions.clone(), labels.clone()
    junk_positions[~real], junk_labels[~real] = 9, 42
    again = model(ids, types, mask, junk_positions, junk_labels, weights)
    torch.testing.assert_close(again.mlm_loss, out.mlm_loss)

    # Non-uniform weights: sum(w * ce) / sum(w).
    w = weights.clone()
    w[2] = 0.5
    weighted = model(ids, types, mask, positions, labels, w)
    ce = F.cross_entropy(out.mlm_logits, labels[real], reduction="none")
    torch.testing.assert_close(weighted.mlm_loss, (w[real] * ce).sum() / w[real].sum())


def test_mlm_without_weights_uses_every_slot():
    model = BertForPreTraining(tiny()).eval()
    positions, labels, _ = mlm_batch()
    out = model(*inputs(), positions, labels)
    assert out.mlm_logits.shape == (positions.numel(), VOCAB)
    torch.testing.assert_close(out.mlm_loss, F.cross_entropy(out.mlm_logits, labels.reshape(-1)))


def test_next_sentence_label_minus_one_is_ignored():
    model = BertForPreTraining(tiny()).eval()
    positions, labels, weights = mlm_batch()
    out = model(*inputs(), positions, labels, weights, torch.tensor([0, -1, 1]))
    expected = F.cross_entropy(out.nsp_logits[[0, 2]], torch.tensor([0, 1]))
    torch.testing.assert_close(out.nsp_loss, expected)

    none = model(*inputs(), positions, labels, weights, torch.tensor([-1, -1, -1]))
    assert none.nsp_accuracy.item() == 0.0           # weighed by its zero label count by the meters
    assert none.nsp_loss.item() == 0.0
    torch.testing.assert_close(none.loss, none.mlm_loss)

    absent = model(*inputs(), positions, labels, weights)
    assert absent.nsp_loss is None and absent.nsp_accuracy is None
    torch.testing.assert_close(absent.loss, absent.mlm_loss)


def test_no_nsp_labels_still_reach_every_parameter():
    """With every label -1 the NSP head gets zero gradients, not none (DDP needs all parameters used)."""
    model = BertForPreTraining(tiny())
    positions, labels, weights = mlm_batch()
    model(*inputs(), positions, labels, weights, torch.full((B,), -1)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.cls.seq_relationship.weight.grad.abs().sum() == 0


def test_left_to_right_uses_every_position_as_a_slot():
    model = BertForPreTraining(tiny(is_causal=True))
    ids, types, mask = inputs()
    positions = torch.arange(S).expand(B, S)
    labels = torch.roll(ids, -1, dims=1)
    weights = mask.float()
    weights[:, -1] = 0                                        # nothing to predict after the last token
    out = model(ids, types, mask, positions, labels, weights, torch.full((B,), -1))
    assert out.mlm_logits.shape == (int(weights.sum()), VOCAB)
    out.loss.backward()
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------
# Fine-tuning heads


def test_sequence_classification_cross_entropy():
    config = tiny(id2label={0: "a", 1: "b", 2: "c"})
    model = BertForSequenceClassification(config)
    labels = torch.tensor([0, 2, 1])
    out = model(*inputs(), labels=labels)
    assert isinstance(out, TaskOutput) and out.logits.shape == (B, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert_grads(model, ["classifier.weight", "bert.pooler.dense.weight", "bert.embeddings.word_embeddings.weight"])


def test_sequence_regression_with_one_label():
    model = BertForSequenceClassification(tiny(id2label={0: "score"}))
    labels = torch.tensor([0.5, 4.0, 2.25])
    out = model(*inputs(), labels=labels)
    assert out.logits.shape == (B, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels))
    out.loss.backward()
    assert_grads(model, ["classifier.weight"])


def test_token_classification_ignores_minus_100():
    model = BertForTokenClassification(tiny(id2label={i: f"t{i}" for i in range(5)}))
    assert model.bert.pooler is None
    labels = torch.randint(0, 5, (B, S))
    labels[0, -3:] = -100
    labels[:, 0] = -100
    out = model(*inputs(), labels=labels)
    assert out.logits.shape == (B, S, 5)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))
    out.loss.backward()
    assert_grads(model, ["classifier.weight", "bert.encoder.layer.3.output.dense.weight"])


def test_question_answering_spans():
    model = BertForQuestionAnswering(tiny())
    assert model.bert.pooler is None
    start, end = torch.tensor([1, 2, 3]), torch.tensor([4, 2, 9])
    out = model(*inputs(), start_positions=start, end_positions=end)
    assert isinstance(out, SpanOutput)
    assert out.start_logits.shape == out.end_logits.shape == (B, S)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert_grads(model, ["qa_outputs.weight"])
    # An answer cut off by truncation (position >= S) is ignored, not an index error.
    cut = model(*inputs(), start_positions=torch.tensor([1, 2, 99]), end_positions=torch.tensor([4, 2, 99]))
    partial = (F.cross_entropy(cut.start_logits[:2], start[:2]) + F.cross_entropy(cut.end_logits[:2], end[:2])) / 2
    torch.testing.assert_close(cut.loss, partial)


def test_multiple_choice_scores_each_choice_separately():
    model = BertForMultipleChoice(tiny()).eval()
    choices = 4
    ids, types, mask = (t.reshape(2, choices, S) for t in inputs(batch=2 * choices))
    labels = torch.tensor([3, 0])
    out = model(ids, types, mask, labels=labels)
    assert out.logits.shape == (2, choices)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    single = model(ids[1:, 2:3], types[1:, 2:3], mask[1:, 2:3]).logits
    torch.testing.assert_close(single[0, 0], out.logits[1, 2], atol=1e-5, rtol=0)
    model.train()
    model(ids, types, mask, labels=labels).loss.backward()
    assert_grads(model, ["classifier.weight", "bert.pooler.dense.weight"])


def test_head_dropout_follows_classifier_dropout():
    assert BertForSequenceClassification(tiny(hidden_dropout_prob=0.2)).dropout.p == 0.2
    assert BertForSequenceClassification(tiny(hidden_dropout_prob=0.2, classifier_dropout=0.0)).dropout.p == 0.0


# --------------------------------------------------------------------------------------------
# Feature-based tagger (paper section 5.3)


def test_feature_based_tagger_freezes_the_encoder_and_reads_four_layers():
    config = tiny(id2label={i: f"t{i}" for i in range(5)})
    model = BertFeatureBasedTagger(config, lstm_hidden_size=16)
    assert model.lstm.input_size == 4 * HIDDEN
    assert model.lstm.num_layers == 2 and model.lstm.bidirectional and model.lstm.hidden_size == 8
    model.train()
    assert not model.bert.training and model.lstm.training

    seen = []
    model.lstm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    labels = torch.randint(0, 5, (B, S))
    labels[0, -3:] = -100
    ids, types, mask = inputs()
    out = model(ids, types, mask, labels=labels)
    assert out.logits.shape == (B, S, 5)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.bert.parameters())
    assert_grads(model, ["lstm.weight_ih_l0", "lstm.weight_ih_l1_reverse", "classifier.weight"])

    # The BiLSTM input is the last four layers' outputs side by side.
    model.eval()
    seen.clear()
    model(ids, types, mask)
    states = model.bert(ids, types, mask, output_hidden_states=True).hidden_states
    packed_input = seen[0].data                                            # a PackedSequence's rows
    real = mask.bool()
    expected = torch.cat(states[-4:], dim=-1)[real]
    torch.testing.assert_close(packed_input.sort(dim=0).values, expected.sort(dim=0).values)


def test_feature_based_tagger_paper_size_and_checks():
    assert BertFeatureBasedTagger(tiny()).classifier.in_features == 768
    with pytest.raises(ConfigError, match="num_feature_layers"):
        BertFeatureBasedTagger(tiny(num_hidden_layers=2))
    with pytest.raises(ConfigError, match="lstm_hidden_size"):
        BertFeatureBasedTagger(tiny(), lstm_hidden_size=15)
