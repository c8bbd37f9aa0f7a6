"""bertray/model/hf_format.py: checkpoints move both ways between bertray and transformers,
load across model classes by the documented rules, and fail with messages that say what is wrong."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from bertray.model.config import BertConfig
from bertray.errors import CheckpointError
from bertray.model import hf_format
from bertray.model.bert import BertModel
from bertray.model.heads import (BertFeatureBasedTagger, BertForMultipleChoice, BertForPreTraining,
                                 BertForQuestionAnswering, BertForSequenceClassification,
                                 BertForTokenClassification)

transformers = pytest.importorskip("transformers")

LOGGER = "bertray.model.hf_format"


def small(**overrides) -> BertConfig:
    """The real vocabulary size with a narrow, shallow encoder: realistic head shapes, fast tests."""
    base = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64)
    return BertConfig(**{**base, **overrides})


def batch(seq=16, size=3, vocab=30522):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (size, seq), generator=g)
    types = (torch.arange(seq) >= seq // 2).long().expand(size, seq).contiguous()
    mask = torch.ones(size, seq, dtype=torch.long)
    mask[1, -5:] = 0
    return ids, types, mask


POSITIONS = torch.tensor([[1, 3, 5, 0], [2, 4, 0, 0], [6, 7, 9, 12]])
WEIGHTS = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def hf_logits_at_real_slots(prediction_logits):
    b, p = (WEIGHTS > 0).nonzero(as_tuple=True)
    return prediction_logits[b, POSITIONS[b, p]]


# --------------------------------------------------------------------------------------------
# Export / import parity with transformers



def assert_same_pretraining_outputs(ours, theirs) -> None:
    """bertray's and transformers' pretraining heads give the same MLM and NSP logits on a batch."""
    ids, types, mask = batch()
    with torch.no_grad():
        a = ours(ids, types, mask, POSITIONS, masked_lm_weights=WEIGHTS)
        b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
    torch.testing.assert_close(a.mlm_logits, hf_logits_at_real_slots(b.prediction_logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, atol=1e-4, rtol=0)


def test_pretraining_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = BertForPreTraining(small()).eval()
    with torch.no_grad():                                   # a non-zero bias, so it is really compared
        ours.cls.predictions.bias.normal_(0, 0.1)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    assert "cls.predictions.decoder.weight" not in load_file(tmp_path / "model.safetensors")

    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    assert_same_pretraining_outputs(ours, theirs)


def test_transformers_pretraining_checkpoint_loads_in_bertray(tmp_path):
    torch.manual_seed(0)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**small().to_dict())).eval()
    with torch.no_grad():
        theirs.cls.predictions.bias.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path)
    ours = BertForPreTraining.from_pretrained(tmp_path).eval()
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert_same_pretraining_outputs(ours, theirs)


TASKS = [
    (BertForSequenceClassification, "BertForSequenceClassification", {0: "neg", 1: "neutral", 2: "pos"}),
    (BertForTokenClassification, "BertForTokenClassification", {i: f"tag{i}" for i in range(5)}),
    (BertForQuestionAnswering, "BertForQuestionAnswering", None),
    (BertForMultipleChoice, "BertForMultipleChoice", None),
]


def task_logits(model, hf: bool, ids, types, mask):
    if isinstance(model, (BertForMultipleChoice, transformers.BertForMultipleChoice)):
        ids, types, mask = (t.reshape(1, *t.shape) for t in (ids, types, mask))
    if hf:
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    else:
        out = model(ids, types, mask)
    real = mask.bool()
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits[real], out.end_logits[real]])
    # Per-token outputs are compared at real tokens: bertray skips padding (zeros there).
    return out.logits[real] if out.logits.dim() == 3 else out.logits


@pytest.mark.parametrize("cls, hf_name, id2label", TASKS, ids=[t[1] for t in TASKS])
def test_task_heads_round_trip_with_transformers(tmp_path, cls, hf_name, id2label):
    torch.manual_seed(0)
    ours = cls(small(id2label=id2label)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = getattr(transformers, hf_name).from_pretrained(tmp_path / "ours").eval()
    ids, types, mask = batch()
    with torch.no_grad():
        expected = task_logits(ours, False, ids, types, mask)
        torch.testing.assert_close(task_logits(theirs, True, ids, types, mask), expected, atol=1e-4, rtol=0)
        theirs.save_pretrained(tmp_path / "theirs")
        back = cls.from_pretrained(tmp_path / "theirs").eval()
        torch.testing.assert_close(task_logits(back, False, ids, types, mask), expected, atol=1e-5, rtol=0)


def test_extra_config_keys_reach_transformers_and_bertray_ignores_them(tmp_path):
    """What a head predicts (`problem_type`, `num_labels`, ...) goes into config.json beside the
    architecture: transformers builds a one-output regression head from it; bertray loads the same
    folder into an equal model."""
    torch.manual_seed(0)
    ours = BertForSequenceClassification(small(id2label={0: "score"})).eval()
    hf_format.save_state_dict(tmp_path, ours.config, ours.state_dict(), ["BertForSequenceClassification"],
                              extra_config={"problem_type": "regression", "num_labels": 1, "finetuning_task": "stsb"})
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["problem_type"] == "regression" and written["architectures"] == ["BertForSequenceClassification"]
    assert written["hidden_size"] == 64 and written["model_type"] == "bert"
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.problem_type == "regression" and theirs.num_labels == 1
    back = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert back.config == ours.config
    ids, types, mask = batch()
    with torch.no_grad():
        expected = ours(ids, types, mask).logits
        torch.testing.assert_close(theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits, expected,
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(back(ids, types, mask).logits, expected, atol=0, rtol=0)


def test_save_then_load_is_bitwise_equal(tmp_path):
    torch.manual_seed(0)
    model = BertForPreTraining(small())
    model.save_pretrained(tmp_path)
    again = BertForPreTraining.from_pretrained(tmp_path)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert again.cls.predictions.decoder.weight is again.bert.embeddings.word_embeddings.weight
    assert again.cls.predictions.decoder.bias is again.cls.predictions.bias


def test_causal_flag_round_trips(tmp_path):
    torch.manual_seed(0)
    ours = BertModel(small(is_causal=True)).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["is_decoder"] is True
    assert BertModel.from_pretrained(tmp_path).config.is_causal
    theirs = transformers.BertModel.from_pretrained(tmp_path).eval()
    ids, types, mask = batch()
    with torch.no_grad():
        a = ours(ids, types, mask).last_hidden_state
        b = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask, use_cache=False).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)


def test_tagger_round_trip_keeps_its_lstm_size(tmp_path):
    model = BertFeatureBasedTagger(small(num_hidden_layers=4, id2label={0: "O", 1: "B-PER"}), lstm_hidden_size=24)
    model.save_pretrained(tmp_path)
    again = BertFeatureBasedTagger.from_pretrained(tmp_path)
    assert again.lstm.hidden_size == 12 and again.lstm.input_size == 4 * 64
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not any(p.requires_grad for p in again.bert.parameters())


def test_tagger_from_an_encoder_checkpoint(tmp_path):
    encoder = BertModel(small(num_hidden_layers=4))
    encoder.save_pretrained(tmp_path)
    paper = BertFeatureBasedTagger.from_pretrained(tmp_path)
    assert paper.lstm.hidden_size == 384 and paper.lstm.num_layers == 2
    narrow = BertFeatureBasedTagger.from_pretrained(tmp_path, lstm_hidden_size=32, id2label={0: "O", 1: "B-LOC", 2: "I-LOC"})
    assert narrow.lstm.hidden_size == 16 and narrow.classifier.out_features == 3
    assert torch.equal(narrow.bert.encoder.layer[3].output.dense.weight, encoder.encoder.layer[3].output.dense.weight)


# --------------------------------------------------------------------------------------------
# Loading across classes


def test_encoder_checkpoint_loads_under_a_task_head(tmp_path, caplog):
    torch.manual_seed(0)
    encoder = BertModel(small())
    encoder.save_pretrained(tmp_path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = BertForSequenceClassification.from_pretrained(tmp_path, id2label={0: "a", 1: "b", 2: "c"})
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], tensor), name
    assert model.classifier.out_features == 3
    assert "freshly initialised: classifier.bias, classifier.weight" in caplog.text


def test_pretraining_checkpoint_loads_as_encoder_and_task_model(tmp_path, caplog):
    torch.manual_seed(0)
    pretrained = BertForPreTraining(small())
    pretrained.save_pretrained(tmp_path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    encoder = BertModel.from_pretrained(tmp_path)
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(pretrained.bert.state_dict()[name], tensor), name
    assert "ignored" in caplog.text and "cls.seq_relationship.weight" in caplog.text
    caplog.clear()
    tagger = BertForTokenClassification.from_pretrained(tmp_path)       # no pooler: the pooler is ignored
    assert "bert.pooler.dense.weight" in caplog.text
    assert torch.equal(tagger.bert.embeddings.word_embeddings.weight, pretrained.bert.embeddings.word_embeddings.weight)


def test_real_checkpoint_with_position_ids_buffer_loads(minilm_dir):
    assert "embeddings.position_ids" in load_file(minilm_dir / "model.safetensors")
    model = BertForPreTraining.from_pretrained(minilm_dir)
    reference = load_file(minilm_dir / "model.safetensors")
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight, reference["encoder.layer.5.output.dense.weight"])


def test_old_names_and_pytorch_bin(tmp_path):
    torch.manual_seed(0)
    model = BertForPreTraining(small())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    old = {}
    for name, tensor in tensors.items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[name] = tensor
    old["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = old.pop("cls.predictions.bias")      # the bias only under decoder
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]
    (tmp_path / "model.safetensors").unlink()
    torch.save(old, tmp_path / "pytorch_model.bin")
    again = BertForPreTraining.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


# --------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    BertForPreTraining(small()).save_pretrained(tmp_path)
    return tmp_path


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_encoder_tensor_is_named(saved):
    rewrite(saved, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.weight"))
    with pytest.raises(CheckpointError, match=r"missing encoder tensor\(s\): bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        BertForPreTraining.from_pretrained(saved)


def test_unexpected_encoder_tensor_is_named(saved):
    rewrite(saved, lambda t: t.update({"bert.encoder.layer.2.output.dense.weight": torch.zeros(64, 128)}))
    with pytest.raises(CheckpointError, match=r"unexpected encoder tensor.*bert\.encoder\.layer\.2\.output\.dense\.weight"):
        BertForPreTraining.from_pretrained(saved)


def test_shape_mismatch_names_tensor_and_both_shapes(saved):
    with pytest.raises(CheckpointError) as info:
        BertForPreTraining.from_pretrained(saved, intermediate_size=96)
    message = str(info.value)
    assert "bert.encoder.layer.0.intermediate.dense.weight" in message
    assert "(128, 64)" in message and "(96, 64)" in message


def test_head_shape_mismatch_is_an_error(tmp_path):
    BertForSequenceClassification(small(id2label={0: "a", 1: "b", 2: "c"})).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*\(3, 64\).*\(2, 64\)"):
        BertForSequenceClassification.from_pretrained(tmp_path, id2label={0: "a", 1: "b"})


def test_truncated_safetensors_is_reported_as_corrupt(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        BertForPreTraining.from_pretrained(saved)
    assert str(path) in str(info.value)


def test_verify_checkpoint_reads_only_the_header_and_names_what_is_wrong(saved):
    from bertray.model.hf_format import verify_checkpoint

    assert verify_checkpoint(str(saved)).hidden_size == BertForPreTraining.from_pretrained(saved).config.hidden_size
    path = saved / "model.safetensors"
    whole = path.read_bytes()
    for broken, why in ((whole[:-1], "truncated or padded"), (whole + b"\0", "truncated or padded"),
                        (whole[:4], "corrupt or truncated"), (b"not safetensors" * 9, "corrupt or truncated")):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match=why) as info:
            verify_checkpoint(str(saved))
        assert str(path) in str(info.value)
    path.write_bytes(whole)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not a usable BERT config"):
        verify_checkpoint(str(saved))


def test_garbage_safetensors_is_reported_as_corrupt(saved):
    (saved / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        BertModel.from_pretrained(saved)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_garbage_pytorch_bin_is_reported_as_corrupt(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"\x80\x04garbage" * 50)
    with pytest.raises(CheckpointError, match="pytorch_model.bin is corrupt or truncated"):
        BertModel.from_pretrained(saved)


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        BertModel.from_pretrained(saved)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors \(or pytorch_model\.bin\).*config\.json"):
        BertModel.from_pretrained(saved)


def test_nonexistent_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        BertModel.from_pretrained(tmp_path / "nowhere")


def test_bad_config_json(saved):
    (saved / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a usable BERT config.*model_type"):
        BertModel.from_pretrained(saved)


def test_fit_state_dict_rules_without_files():
    target = BertForPreTraining(small()).state_dict()
    encoder_only = {k: v for k, v in BertModel(small()).state_dict().items()}
    fitted = hf_format.fit_state_dict(encoder_only, target)
    assert all(k.startswith("bert.") for k in fitted.tensors)
    assert set(fitted.fresh) == {k for k in target if k.startswith("cls.") and "decoder" not in k}
    assert fitted.ignored == ()
