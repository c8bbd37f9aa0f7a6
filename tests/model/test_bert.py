"""bertray/model/bert.py: the encoder against a real pretrained checkpoint and its own invariants."""

from __future__ import annotations

import math
import random

import pytest
import torch

from bertray.model.config import BertConfig
from bertray.model import bert
from bertray.model.bert import ACTIVATIONS, BertModel, BertModelOutput, TokenPacking


def tiny(**overrides) -> BertConfig:
    return BertConfig.preset("tiny", vocab_size=211, max_position_embeddings=64, **overrides)


# --------------------------------------------------------------------------------------------
# Golden numbers: the real all-MiniLM-L6-v2 checkpoint against transformers' BertModel


def real_texts(shared_data) -> list[str]:
    """240 real texts of mixed length: SST-2 sentences, WikiText paragraphs, Gutenberg lines."""
    sst = [line.split("\t")[0] for line in (shared_data / "glue/SST-2/dev.tsv").read_text().splitlines()[1:]]
    wiki = [p.strip() for p in (shared_data / "corpus/wikitext-2-raw/wiki.valid.raw").read_text().splitlines()
            if p.strip() and not p.strip().startswith("=")]
    book = [line.strip() for line in (shared_data / "corpus/gutenberg/austen-emma.txt").read_text().splitlines()
            if len(line.strip()) > 20]
    rng = random.Random(0)
    return rng.sample(sst, 100) + rng.sample(wiki, 40) + rng.sample(book, 100)


def test_matches_transformers_on_a_real_checkpoint(minilm_dir, shared_data):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ours = BertModel.from_pretrained(minilm_dir).eval()
    theirs = transformers.BertModel.from_pretrained(minilm_dir).eval()
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_truncation(256)
    tokenizer.no_padding()
    texts = real_texts(shared_data)
    assert len(texts) >= 200
    # Batches of similar lengths keep the test fast; each batch still pads its shorter members.
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    texts = [t for _, t in sorted(zip(lengths, texts))]
    tokenizer.enable_padding()                         # pad each batch to its longest sequence
    worst, padded, longest, packed = 0.0, 0, 0, 0
    # One more batch of the 16 shortest and 16 longest texts: mostly padding, so it runs packed.
    batches = [texts[start:start + 32] for start in range(0, len(texts), 32)] + [texts[:16] + texts[-16:]]
    with torch.no_grad():
        for batch_texts in batches:
            encodings = tokenizer.encode_batch(batch_texts)
            ids = torch.tensor([e.ids for e in encodings])
            types = torch.tensor([e.type_ids for e in encodings])
            mask = torch.tensor([e.attention_mask for e in encodings])
            ours_out = ours(ids, types, mask).last_hidden_state
            theirs_out = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
            real = mask.bool()
            worst = max(worst, (ours_out - theirs_out)[real].abs().max().item())
            padded += int((~real).any(dim=1).sum())
            longest = max(longest, ids.shape[1])
            packed += TokenPacking.of(mask) is not None
    print(f"max |bertray - transformers| over real tokens: {worst:.3e} "
          f"({len(texts)} texts, {padded} padded, longest {longest} tokens, {packed} batches packed)")
    assert worst <= 1e-4
    assert padded >= 100 and longest >= 200           # the comparison did exercise padding and length
    assert 1 <= packed < len(batches)                 # and both layouts


# --------------------------------------------------------------------------------------------
# Shapes and outputs


def test_output_shapes_and_hf_style_indexing():
    config = tiny()
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 9))
    out = model(ids, output_hidden_states=True)
    assert isinstance(out, BertModelOutput)
    assert out.last_hidden_state.shape == (3, 9, config.hidden_size)
    assert out.pooler_output.shape == (3, config.hidden_size)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.hidden_states[-1] is out.last_hidden_state
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output
    assert model(ids).hidden_states is None
    assert BertModel(config, add_pooling_layer=False)(ids).pooler_output is None


def test_state_dict_uses_hugging_face_names():
    keys = set(BertModel(tiny()).state_dict())
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                 "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.self.key.bias",
                 "encoder.layer.1.attention.self.value.weight", "encoder.layer.1.attention.output.dense.weight",
                 "encoder.layer.1.attention.output.LayerNorm.bias", "encoder.layer.1.intermediate.dense.weight",
                 "encoder.layer.1.output.dense.bias", "encoder.layer.1.output.LayerNorm.weight",
                 "pooler.dense.weight"):
        assert name in keys
    assert len(keys) == 5 + 2 * 16 + 2


def test_token_type_ids_default_to_segment_a():
    model = BertModel(tiny()).eval()
    ids = torch.randint(0, 211, (2, 6))
    torch.testing.assert_close(model(ids).last_hidden_state, model(ids, torch.zeros_like(ids)).last_hidden_state)
    assert not torch.allclose(model(ids).last_hidden_state, model(ids, torch.ones_like(ids)).last_hidden_state)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_activations_match_transformers(act):
    transformers_activations = pytest.importorskip("transformers.activations")
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(ACTIVATIONS[act](x), transformers_activations.ACT2FN[act](x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_attention_hides_the_future(with_mask):
    ids = torch.randint(5, 211, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 211
    mask = torch.ones_like(ids) if with_mask else None
    if with_mask:
        mask[1, 10:] = 0                                 # padding takes the combined-mask path
    later = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    later[:, :7] = False                                 # real positions after the change
    torch.manual_seed(0)
    causal = BertModel(tiny(is_causal=True)).eval()
    a = causal(ids, attention_mask=mask).last_hidden_state
    b = causal(changed, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert (a - b).abs().amax(dim=-1)[later].min() > 1e-4   # every later position sees it

    torch.manual_seed(0)
    bidirectional = BertModel(tiny()).eval()
    a = bidirectional(ids, attention_mask=mask).last_hidden_state
    b = bidirectional(changed, attention_mask=mask).last_hidden_state
    assert (a[:, :7] - b[:, :7]).abs().amax(dim=-1).min() > 1e-4   # every earlier position sees it


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.int32])
def test_padding_does_not_change_real_positions(causal, mask_dtype):
    model = BertModel(tiny(is_causal=causal)).eval()
    ids = torch.randint(5, 211, (1, 10))
    alone = model(ids)
    padded_ids = torch.cat([ids, torch.randint(5, 211, (1, 6))], dim=1)   # garbage, not even [PAD]
    mask = torch.tensor([[1] * 10 + [0] * 6]).to(mask_dtype)
    padded = model(padded_ids, attention_mask=mask)
    torch.testing.assert_close(padded.last_hidden_state[:, :10], alone.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.pooler_output, alone.pooler_output, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Packing: mostly-padded batches skip the padding in the dense layers


def ragged_mask(lengths: list[int], seq_len: int) -> torch.Tensor:
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_packing_round_trips_and_is_chosen_by_the_real_share():
    mask = ragged_mask([5, 2, 7], 8)                                     # 14 of 24 real
    packing = TokenPacking.of(mask)
    assert packing.index.tolist() == [0, 1, 2, 3, 4, 8, 9, 16, 17, 18, 19, 20, 21, 22]
    x = torch.randn(3, 8, 4)
    packed = packing.pack(x)
    assert packed.shape == (14, 4)
    back = packing.unpack(packed)
    real = mask.bool()
    assert torch.equal(back[real], x[real]) and not back[~real].any()
    assert TokenPacking.of(None) is None
    assert TokenPacking.of(torch.ones(3, 8, dtype=torch.long)) is None                  # nothing to skip
    assert TokenPacking.of(ragged_mask([8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7], 8)) is None
    assert TokenPacking.of(ragged_mask([8, 8, 8, 1], 8)) is not None                    # 25 of 32 real


@pytest.mark.parametrize("causal", [False, True])
def test_packed_and_padded_encoders_agree_in_outputs_and_gradients(causal, monkeypatch):
    """The same mostly-padded batch through both layouts: equal hidden states (every layer) and
    pooled output at real tokens, zeros at padding, and equal parameter gradients."""
    torch.manual_seed(0)
    model = BertModel(tiny(is_causal=causal, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids = torch.randint(5, 211, (4, 12))
    types = (torch.arange(12) >= 4).long().expand(4, 12)
    mask = ragged_mask([12, 3, 7, 1], 12)
    real = mask.bool()
    runs = {}
    for name, share in (("packed", 1.0), ("padded", 0.0)):
        monkeypatch.setattr(bert, "PACK_BELOW_REAL_SHARE", share)
        model.zero_grad()
        out = model(ids, types, mask, output_hidden_states=True)
        # A loss that reads real tokens only, as every head's does.
        (out.last_hidden_state[real].square().mean() + out.pooler_output.sum()).backward()
        runs[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (packed, packed_grads), (padded, padded_grads) = runs["packed"], runs["padded"]
    for a, b in zip(packed.hidden_states, padded.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)
        assert not a[~real].any()                                        # never computed
    assert packed.last_hidden_state is packed.hidden_states[-1]
    torch.testing.assert_close(packed.pooler_output, padded.pooler_output, atol=1e-5, rtol=0)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_only_in_training():
    model = BertModel(tiny())
    ids = torch.randint(0, 211, (2, 8))
    model.eval()
    torch.testing.assert_close(model(ids).last_hidden_state, model(ids).last_hidden_state, atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


# --------------------------------------------------------------------------------------------
# Initialisation


def test_initialisation_is_truncated_normal():
    config = BertConfig.preset("mini")
    torch.manual_seed(0)
    model = BertModel(config)
    std = config.initializer_range
    # A normal(0, std) cut at +-2 std has standard deviation std * sqrt(1 - 4 phi(2) / (Phi(2) - Phi(-2))).
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    expected = std * math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))        # 0.01759
    for name, tensor in model.state_dict().items():
        if name.endswith("LayerNorm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        else:
            assert tensor.abs().max() <= 2 * std, name
            assert abs(tensor.mean().item()) < 5 * expected / math.sqrt(tensor.numel()), name
            # Sample std of n draws: relative standard error about 0.8 / sqrt(n) here; allow 6 of them.
            assert tensor.std().item() == pytest.approx(expected, rel=max(0.01, 6 * 0.8 / math.sqrt(tensor.numel()))), name
    word = model.embeddings.word_embeddings.weight
    assert word.abs().max() > 1.95 * std                 # tails reach the cut: truncated, not narrower


def test_layer_norm_epsilon_comes_from_config():
    model = BertModel(tiny(layer_norm_eps=1e-7))
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-7}


def test_batch_rows_are_independent():
    model = BertModel(tiny()).eval()
    rows = [torch.randint(5, 211, (1, 8)) for _ in range(3)]
    together = model(torch.cat(rows)).last_hidden_state
    for i, row in enumerate(rows):
        torch.testing.assert_close(together[i:i + 1], model(row).last_hidden_state, atol=1e-5, rtol=0)


def test_sequence_may_be_as_long_as_the_position_table():
    config = tiny()
    model = BertModel(config).eval()
    out = model(torch.randint(0, 211, (1, config.max_position_embeddings)))
    assert out.last_hidden_state.shape[1] == config.max_position_embeddings
    assert torch.isfinite(out.last_hidden_state).all()


def test_every_parameter_gets_a_gradient():
    model = BertModel(tiny())
    ids = torch.randint(0, 211, (2, 8))
    out = model(ids, torch.ones_like(ids), torch.ones_like(ids))
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []

