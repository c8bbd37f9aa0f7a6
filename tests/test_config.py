"""bertray.config: presets, Hugging Face config.json round trips, validation errors."""

import json
from pathlib import Path

import pytest

from bertray.config import load_config
from bertray.model.config import BertConfig, MODEL_PRESETS
from bertray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,layers,hidden,heads", [
    ("tiny", 2, 128, 2), ("mini", 4, 256, 4), ("small", 4, 512, 8),
    ("medium", 8, 512, 8), ("base", 12, 768, 12), ("large", 24, 1024, 16),
])
def test_presets_match_google_sizes(name, layers, hidden, heads):
    cfg = BertConfig.preset(name)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (layers, hidden, heads)
    assert cfg.intermediate_size == 4 * hidden
    assert cfg.max_position_embeddings == 512 and cfg.type_vocab_size == 2
    assert set(MODEL_PRESETS) == {"tiny", "mini", "small", "medium", "base", "large"}


def test_real_hf_config_round_trip(minilm_dir, tmp_path):
    cfg = BertConfig.from_json_file(minilm_dir / "config.json")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    out = tmp_path / "config.json"
    cfg.to_json_file(out, architectures=["BertModel"])
    written = json.loads(out.read_text())
    original = json.loads((minilm_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id"):
        assert written[key] == original[key], key
    assert BertConfig.from_json_file(out) == cfg


def test_hf_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = BertConfig.preset("mini", is_causal=True, id2label={0: "neg", 1: "pos"})
    cfg.to_json_file(tmp_path / "config.json")
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert hf.hidden_size == 256 and hf.num_hidden_layers == 4 and hf.is_decoder is True
    assert hf.id2label == {0: "neg", 1: "pos"}
    hf.save_pretrained(tmp_path / "back")
    assert BertConfig.from_json_file(tmp_path / "back" / "config.json") == cfg


@pytest.mark.parametrize("change,needle", [
    ({"hidden_size": -8}, "hidden_size: must be a positive integer"),
    ({"num_attention_heads": 5}, "num_attention_heads: must divide hidden_size=768"),
    ({"hidden_sise": 768}, "unknown key 'hidden_sise'"),
    ({"hidden_act": "swish"}, "hidden_act: 'swish' is not supported; choose one of gelu"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob: must be in [0, 1)"),
    ({"num_hidden_layers": "twelve"}, "num_hidden_layers: expected an integer"),
    ({"is_causal": "yes"}, "is_causal: expected true or false"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type: only 'absolute'"),
    ({"model_type": "roberta"}, "model_type: 'roberta' is not a BERT model"),
])
def test_bad_values_name_the_key(change, needle):
    with pytest.raises(ConfigError) as err:
        BertConfig.from_dict({**BertConfig().to_dict(), **change})
    assert needle in str(err.value)


def test_unknown_key_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean hidden_size"):
        BertConfig.from_dict({"hiden_size": 12})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="choose one of tiny, mini, small, medium, base, large"):
        BertConfig.preset("huge")


def test_malformed_config_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 768,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        BertConfig.from_json_file(bad)
    with pytest.raises(ConfigError, match="no such file"):
        BertConfig.from_json_file(tmp_path / "missing.json")


def test_exponent_floats_without_a_dot(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1); a float field still takes it."""
    from bertray.config import load_config, parse_value
    from bertray.train.config import PretrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("data: {corpus: [x.txt]}\ntrain: {lr: 1e-4, adam_eps: 1E-6}\n")
    cfg = load_config(PretrainConfig, path, {"train.weight_decay": parse_value("5e-3")})
    assert (cfg.train.lr, cfg.train.adam_eps, cfg.train.weight_decay) == (1e-4, 1e-6, 5e-3)
    assert [parse_value(v) for v in ("5e-5", "32", "1_000", "nan-run", "[a, b]", "null")] == [
        5e-5, 32, 1000, "nan-run", ["a", "b"], None]              # flags: numbers first, then YAML
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(PretrainConfig, path, {"train.lr": "fast"})


def test_every_pretraining_option_is_a_documented_flag():
    import subprocess
    import sys

    from bertray.config import iter_options
    from bertray.train.config import PretrainConfig

    out = subprocess.run([sys.executable, "flows/pretrain.py", "--help"], capture_output=True, text=True,
                         check=True, cwd=__import__("pathlib").Path(__file__).resolve().parents[1]).stdout
    for dotted, field, _ in iter_options(PretrainConfig):
        assert f"--{dotted}" in out, dotted
        assert field.metadata.get("help"), f"{dotted} has no help text"


@pytest.mark.parametrize("key,value,needle", [
    ("data.buffer_chars", 0, "data.buffer_chars: must be > 0"),
    ("scaling.cpu_affinity", [0, -1], "scaling.cpu_affinity: must be CPU ids >= 0"),
    ("data.preserve_order", "sometimes", "data.preserve_order"),
    ("data.document_boundary", "chapter", "data.document_boundary"),
    ("data.boundary_pattern", "^== ", "data.boundary_pattern: is only used with document_boundary: pattern"),
    ("data.skip_pattern", "([", "skip_pattern: '\\(\\[' is not a valid regular expression"),
    ("run.name", "..", "run.name: must be a folder name"),
    ("run.name", "team/../../other", "run.name: must be a folder name"),
])
def test_bad_pretraining_values_name_the_key(tmp_path, key, value, needle):
    from bertray.config import load_config
    from bertray.train.config import PretrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("data: {corpus: [x.txt]}\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(PretrainConfig, path, {key: value})


def test_layout_fields_override_the_preset(tmp_path):
    """A corpus no preset fits: the preset's layout with data.document_boundary, boundary_pattern,
    line_unit or skip_pattern replacing its own, validated together."""
    from bertray.config import load_config
    from bertray.train.config import PretrainConfig
    from bertray.data.documents import LAYOUT_PRESETS, CorpusCounters, iter_documents

    path = tmp_path / "c.yaml"
    path.write_text("data: {corpus: [x.txt], layout: paragraphs}\n")
    cfg = load_config(PretrainConfig, path, {"data.document_boundary": "pattern", "data.boundary_pattern": "^#+ ",
                                             "data.skip_pattern": "^<!--"})
    layout = cfg.data.corpus_layout()
    assert (layout.document_boundary, layout.boundary_pattern, layout.line_unit, layout.skip_pattern) == (
        "pattern", "^#+ ", "paragraph", "^<!--")
    lines = ["# One", "First doc. It has two sentences.", "<!-- note -->", "", "## Two", "Second doc here."]
    docs = list(iter_documents(lines, layout, CorpusCounters()))
    assert docs == [["First doc.", "It has two sentences."], ["Second doc here."]]
    # Switching a pattern preset to another boundary drops its pattern; nothing set keeps the preset.
    wiki = load_config(PretrainConfig, path, {"data.layout": "wikitext", "data.document_boundary": "file"})
    assert wiki.data.corpus_layout().boundary_pattern is None
    assert load_config(PretrainConfig, path, {"data.layout": "wikitext"}).data.corpus_layout() == LAYOUT_PRESETS["wikitext"]
    with pytest.raises(ConfigError, match="data.boundary_pattern: is required"):
        load_config(PretrainConfig, path, {"data.document_boundary": "pattern"})


def test_a_recipe_value_left_to_a_flag_stops_until_it_is_given():
    """continue-pretraining.yaml has `init_from: ???`: without the flag the run would train a random
    model on a new vocabulary, which is not what the recipe is for."""
    from bertray.train.config import PretrainConfig

    recipe = REPO / "flows" / "configs" / "continue-pretraining.yaml"
    with pytest.raises(ConfigError, match=r"continue-pretraining\.yaml: model\.init_from: required, and this config "
                                          r"leaves it to you: give --model\.init_from"):
        load_config(PretrainConfig, recipe)
    assert load_config(PretrainConfig, recipe, {"model.init_from": "s3://b/bert"}).model.init_from == "s3://b/bert"
