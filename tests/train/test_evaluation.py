"""The held-out evaluation sets (a separate corpus, the documents data.holdout_fraction keeps out of
training, or both) and the baselines the held-out accuracies are judged against."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertray.config import load_config
from bertray.train.config import PretrainConfig
from bertray.data.pipeline import iter_local, unpack_doc_id
from bertray.data.stream_spec import holdout_key, is_held_out, stream_spec
from bertray.data.sources import resolve_corpus
from bertray.errors import ConfigError
from bertray.train.pretrain import EVAL_SEED, eval_baselines, eval_sets

REPO = Path(__file__).resolve().parents[2]
WIKI = REPO / "samples" / "corpus" / "wikitext-2"


def _config(**overrides) -> PretrainConfig:
    base = {"train.phases": [{"fraction": 1.0, "max_seq_len": 64, "max_predictions_per_seq": 10, "batch_size": 16}],
            "train.eval_batches": 2}
    return load_config(PretrainConfig, REPO / "flows" / "configs" / "embedded.yaml", {**base, **overrides})


def test_an_eval_corpus_that_is_also_trained_on_is_refused():
    cfg = _config(**{"data.corpus": [str(WIKI)], "data.eval_corpus": [str(WIKI / "wiki.valid.raw")]})
    tokenizer = Tokenizer.from_file(str(WIKI / "vocab-8192" / "tokenizer.json"))
    with pytest.raises(ConfigError, match="data.eval_corpus: 1 of its files are also training files"):
        eval_sets(cfg, tokenizer.to_str(), resolve_corpus(cfg.data.corpus))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_held_out_documents_are_the_evaluation_set(ray_cluster):
    cfg = _config(**{"data.corpus": [str(WIKI / "wiki.valid.raw")], "data.eval_corpus": [],
                     "data.holdout_fraction": 0.2})
    tokenizer = Tokenizer.from_file(str(WIKI / "vocab-8192" / "tokenizer.json"))
    files = resolve_corpus(cfg.data.corpus)
    batches = eval_sets(cfg, tokenizer.to_str(), files)["eval"]
    assert len(batches) == 2 and all(b["input_ids"].shape == (16, 64) for b in batches)
    assert eval_sets(_config(**{"data.corpus": [str(WIKI / "wiki.valid.raw")], "data.eval_corpus": []}),
                     tokenizer.to_str(), files) == {}
    # They are the first rows of the held-out split of the corpus (and no row of the training split).
    spec = dataclasses.replace(stream_spec(cfg.data, cfg.train.phases[0], tokenizer.to_str(), seed=EVAL_SEED,
                                           generation=0, passes=1), split="heldout", files_per_read_task=1)
    parts = list(iter_local(files, spec, columns=("input_ids", "doc_id")))
    held = np.concatenate([p["input_ids"] for p in parts])[:32]
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), held)
    numbers = {unpack_doc_id(int(d))[1] for p in parts for d in p["doc_id"]}
    assert numbers and all(is_held_out(holdout_key(files[0].url), n, 0.2) for n in numbers)
    train = np.concatenate([p["input_ids"] for p in iter_local(files, dataclasses.replace(spec, split="train"))])
    assert not {r.tobytes() for r in held} & {r.tobytes() for r in train}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_held_out_files_and_held_out_documents_are_two_sets(ray_cluster):
    """With both settings, `eval` is the files never trained on and `heldout` the documents held out
    of the training files: the same batches each setting gives alone."""
    tokenizer = Tokenizer.from_file(str(WIKI / "vocab-8192" / "tokenizer.json")).to_str()
    both = _config(**{"data.corpus": [str(WIKI / "wiki.valid.raw")], "data.eval_corpus": [str(WIKI / "wiki.test.raw")],
                      "data.holdout_fraction": 0.2})
    files = resolve_corpus(both.data.corpus)
    sets = eval_sets(both, tokenizer, files)
    files_only = eval_sets(dataclasses.replace(both, data=dataclasses.replace(both.data, holdout_fraction=0.0)),
                           tokenizer, files)
    documents_only = eval_sets(dataclasses.replace(both, data=dataclasses.replace(both.data, eval_corpus=())),
                               tokenizer, files)
    assert list(sets) == ["eval", "heldout"] and list(files_only) == list(documents_only) == ["eval"]
    for mine, alone in ((sets["eval"], files_only["eval"]), (sets["heldout"], documents_only["eval"])):
        for a, b in zip(mine, alone, strict=True):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(sets["eval"][0]["input_ids"], sets["heldout"][0]["input_ids"])
    baselines = eval_baselines(sets)
    assert set(baselines) == {"eval_mlm_baseline", "eval_nsp_majority", "heldout_mlm_baseline", "heldout_nsp_majority"}


def test_most_frequent_masked_token_and_majority_label():
    batches = [
        {"masked_lm_ids": np.array([[7, 7, 9, 0], [7, 3, 0, 0]]),
         "masked_lm_weights": np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float32),
         "next_sentence_labels": np.array([1, 1])},
        {"masked_lm_ids": np.array([[5, 9, 9, 9]]), "masked_lm_weights": np.ones((1, 4), dtype=np.float32),
         "next_sentence_labels": np.array([0])},
    ]
    out = eval_baselines({"eval": batches})
    # Real slots: 7 7 9 | 7 3 | 5 9 9 9 -> "9" 4 of 9; padding slots (weight 0, id 0) do not count.
    assert out["eval_mlm_baseline"] == pytest.approx(4 / 9)
    assert out["eval_nsp_majority"] == pytest.approx(2 / 3)


def test_objectives_without_nsp_have_no_majority_and_no_batches_no_baselines():
    batch = {"masked_lm_ids": np.array([[4, 4]]), "masked_lm_weights": np.ones((1, 2), dtype=np.float32),
             "next_sentence_labels": np.array([-1])}
    assert eval_baselines({"eval": [batch]}) == {"eval_mlm_baseline": 1.0}
    assert eval_baselines({"heldout": [batch]}) == {"heldout_mlm_baseline": 1.0}
    assert eval_baselines({}) == {}
