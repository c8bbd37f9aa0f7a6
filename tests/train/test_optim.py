"""Optimizers and schedule against the update rules written out in NumPy, step by step."""

import numpy as np
import pytest
import torch
from torch import nn

from bertray.model.config import BertConfig
from bertray.model.heads import BertForPreTraining
from bertray.train.optim import BertAdam, Lamb, make_optimizer, parameter_groups, warmup_linear_decay

LR, BETAS, EPS, DECAY = 0.01, (0.9, 0.999), 1e-6, 0.01


def gradients(steps: int, shape=(3, 4), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for _ in range(steps)]


def run_torch(optimizer_cls, w0: np.ndarray, grads: list[np.ndarray], **kw) -> np.ndarray:
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = optimizer_cls([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, **kw)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy()


def reference(w0: np.ndarray, grads: list[np.ndarray], *, bias_correction: bool, trust_ratio: bool) -> np.ndarray:
    """Google's AdamWeightDecayOptimizer (no bias correction) and You et al.'s LAMB (Algorithm 2)."""
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        m_hat, v_hat = (m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)) if bias_correction else (m, v)
        update = m_hat / (np.sqrt(v_hat) + EPS) + DECAY * w
        ratio = np.linalg.norm(w) / np.linalg.norm(update) if trust_ratio else 1.0
        w = w - LR * ratio * update
    return w


def test_bert_adam_is_googles_update_without_bias_correction():
    w0, grads = np.random.default_rng(1).normal(size=(3, 4)), gradients(5)
    np.testing.assert_allclose(run_torch(BertAdam, w0, grads),
                               reference(w0, grads, bias_correction=False, trust_ratio=False), rtol=1e-10)
    # And it is not AdamW: without bias correction the first step is (1 - b1) / sqrt(1 - b2) = 3.2x as large.
    adamw = run_torch(torch.optim.AdamW, w0, grads[:1])
    assert not np.allclose(run_torch(BertAdam, w0, grads[:1]), adamw)


def test_lamb_matches_the_paper_and_scales_each_tensor_by_its_trust_ratio():
    w0, grads = np.random.default_rng(2).normal(size=(3, 4)), gradients(5, seed=3)
    np.testing.assert_allclose(run_torch(Lamb, w0, grads),
                               reference(w0, grads, bias_correction=True, trust_ratio=True), rtol=1e-10)
    # One step moves a tensor by exactly lr * ||w||, whatever the gradient's scale.
    for scale in (1e-4, 1.0, 1e4):
        w1 = run_torch(Lamb, w0, [g * scale for g in grads[:1]])
        assert np.linalg.norm(w1 - w0) == pytest.approx(LR * np.linalg.norm(w0), rel=1e-6)


def test_lamb_on_a_zero_tensor_falls_back_to_the_plain_update():
    w0, grads = np.zeros((2, 3)), gradients(1, shape=(2, 3))
    np.testing.assert_allclose(run_torch(Lamb, w0, grads),
                               reference(w0, grads, bias_correction=True, trust_ratio=False), rtol=1e-10)


def test_lamb_follows_nvidias_recipe_over_parameter_groups():
    """apex FusedLAMB's defaults, written out in NumPy over several steps and tensors: bias-corrected
    Adam direction plus decoupled decay; the trust ratio only where the group decays, so biases and
    LayerNorm weights take the plain Adam step (a bias that starts at zero moves)."""
    rng = np.random.default_rng(4)
    shapes = {"dense.weight": (4, 3), "embedding.weight": (5, 4), "dense.bias": (4,), "LayerNorm.weight": (4,)}
    start = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    start["dense.bias"][:] = 0.0
    no_decay = {"dense.bias", "LayerNorm.weight"}
    params = {name: nn.Parameter(torch.tensor(w, dtype=torch.float64)) for name, w in start.items()}
    opt = Lamb([{"params": [params[n] for n in shapes if n not in no_decay], "weight_decay": DECAY},
                {"params": [params[n] for n in shapes if n in no_decay], "weight_decay": 0.0}],
               lr=LR, betas=BETAS, eps=EPS)
    steps = [{name: rng.normal(size=shape) for name, shape in shapes.items()} for _ in range(6)]
    for grads in steps:
        for name, p in params.items():
            p.grad = torch.tensor(grads[name])
        opt.step()
    for name in shapes:
        w, m, v = start[name].copy(), 0.0, 0.0
        decay = 0.0 if name in no_decay else DECAY
        for t, grads in enumerate(steps, start=1):
            g = grads[name]
            m = BETAS[0] * m + (1 - BETAS[0]) * g
            v = BETAS[1] * v + (1 - BETAS[1]) * g * g
            update = (m / (1 - BETAS[0] ** t)) / (np.sqrt(v / (1 - BETAS[1] ** t)) + EPS) + decay * w
            w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
            ratio = w_norm / u_norm if decay and w_norm > 0 and u_norm > 0 else 1.0
            w = w - LR * ratio * update
        np.testing.assert_allclose(params[name].detach().numpy(), w, rtol=1e-9, atol=1e-12, err_msg=name)
    assert np.abs(params["dense.bias"].detach().numpy()).min() > 0


@pytest.mark.parametrize("name", ["adamw", "bert_adam", "lamb"])
def test_resumed_optimizer_continues_exactly(name):
    """State dict after k steps, loaded into a fresh optimizer, gives the uninterrupted run's weights."""
    torch.manual_seed(0)
    target = torch.randn(8)

    def model_and_opt():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
        return model, make_optimizer(model, name, lr=1e-2, weight_decay=DECAY, betas=BETAS, eps=EPS)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            (model(target[None]) ** 2).sum().backward()
            opt.step()

    straight, opt = model_and_opt()
    steps(straight, opt, 6)
    first, opt = model_and_opt()
    steps(first, opt, 3)
    model_state, opt_state = first.state_dict(), opt.state_dict()
    resumed, opt = model_and_opt()
    resumed.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    steps(resumed, opt, 3)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_decay_for_layernorm_and_biases():
    model = BertForPreTraining(BertConfig.preset("tiny", vocab_size=100))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith(".bias") for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert "bert.embeddings.word_embeddings.weight" in decayed
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert not any("LayerNorm" in n or n.endswith(".bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adamw, bert_adam, lamb"):
        make_optimizer(nn.Linear(2, 2), "sgd", lr=1e-3, weight_decay=0.0, betas=BETAS, eps=EPS)


def test_warmup_then_linear_decay_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_linear_decay(opt, warmup_steps=4, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    rates.append(schedule.get_last_lr()[0])
    np.testing.assert_allclose(rates, [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
