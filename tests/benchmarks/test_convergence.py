"""Training dynamics of bertray's BertForPreTraining against transformers' (benchmarks/convergence.py,
small): same initial weights, same batches from bertray's pipeline, same optimizer object, dropout 0.
The two loss sequences must agree at every step; breaking either side (a loss term left out, weight
decay on LayerNorm) must show."""

import importlib.util
import pathlib
import sys

import pytest
import torch
from tokenizers import Tokenizer

from bertray.train.optim import make_optimizer

pytestmark = pytest.mark.timeout(300)

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 10
TOLERANCE = 1e-4


def _load():
    spec = importlib.util.spec_from_file_location("convergence", REPO / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


convergence = _load()


@pytest.fixture(scope="module")
def batches(shared_data):
    tokenizer = Tokenizer.from_file(str(convergence.VOCAB / "tokenizer.json"))
    return convergence.materialize(convergence.corpus_section(shared_data / "corpus"), tokenizer.to_str(),
                                   seq_len=64, predictions=10, batch_size=16, n_batches=STEPS)


def _losses(batches, recipe, ours_step=None, their_optimizer=make_optimizer):
    torch.set_num_threads(2)
    ours, theirs = convergence.model_pair("tiny", 8192, dropout=0.0, seed=0)
    a = convergence.train(ours, ours_step or convergence.bertray_step, batches, recipe, seed=0)
    b = convergence.train(theirs, convergence.hf_step, batches, recipe, seed=0, build_optimizer=their_optimizer)
    return a, b


# lr and weight decay high enough that decay on LayerNorm moves the loss within 10 steps.
RECIPE = dict(lr=1e-2, warmup=2, weight_decay=0.5)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_loss_sequences_agree_at_every_step(batches, optimizer, clip):
    ours, theirs = _losses(batches, convergence.Recipe(optimizer=optimizer, clip=clip, **RECIPE))
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0]                      # it trains
    rel = convergence.max_relative_difference(ours, theirs)
    assert rel <= TOLERANCE, (rel, ours, theirs)


def test_a_loss_left_out_shows(batches):
    def mlm_only(model, batch):
        out = model(**batch)
        return out.mlm_loss, 0.0, 0.0

    ours, theirs = _losses(batches, convergence.Recipe(**RECIPE), ours_step=mlm_only)
    assert convergence.max_relative_difference(ours, theirs) > 100 * TOLERANCE


def test_weight_decay_on_layer_norm_shows(batches):
    def decay_everything(model, name, *, lr, weight_decay, betas, eps):
        assert name == "adamw"
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    ours, theirs = _losses(batches, convergence.Recipe(**RECIPE), their_optimizer=decay_everything)
    assert convergence.max_relative_difference(ours, theirs) > 10 * TOLERANCE


def test_hf_labels_put_each_masked_token_at_its_position(batches):
    batch = batches[0]
    labels = convergence.hf_labels(batch)
    real = batch["masked_lm_weights"] > 0
    assert int((labels != -100).sum()) == int(real.sum())
    rows = torch.arange(labels.shape[0])[:, None].expand_as(real)
    assert torch.equal(labels[rows[real], batch["masked_lm_positions"][real]], batch["masked_lm_ids"][real])
