"""One training step and one validation pass (minillm/train/step.py)."""

from __future__ import annotations

import math

import pytest
import torch

from minillm.config import ModelConfig, resolve
from minillm.model.gpt import GPT
from minillm.optim.groups import configure_optimizer
from minillm.train import step as ts


def test_accumulation_equals_one_large_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tcfg = resolve("tiny", {})[1]
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (8, 17))
    cpu = torch.device("cpu")
    la = ts.accumulate(a, [x[:4], x[4:]], tcfg, 1, cpu, torch.float32)
    lb = ts.accumulate(b, [x], tcfg, 1, cpu, torch.float32)
    assert float(la) == pytest.approx(float(lb), rel=1e-6)
    with torch.no_grad():  # each window's first block_size tokens predict its last block_size
        assert float(lb) == pytest.approx(float(b(x[:, :-1], x[:, 1:])), rel=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), n


def test_doc_masking_reaches_the_model():
    """--doc-masking: the training and validation forward pass documents' segment ids (positions restart and
    attention stops at each <|doc|>); without it, the plain causal forward."""
    from minillm.model.gpt import segment_ids

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    batch = torch.randint(2, 64, (2, 17))
    batch[:, [0, 6, 11]] = 1  # three documents per window
    x, y = batch[:, :-1], batch[:, 1:]
    cpu = torch.device("cpu")
    with torch.no_grad():
        masked = ts._forward(model, x, y, True, 1, cpu, torch.float32)
        plain = ts._forward(model, x, y, False, 1, cpu, torch.float32)
        assert float(masked) == float(model(x, y, seg_ids=segment_ids(x, 1)))
        assert float(plain) == float(model(x, y)) and abs(float(masked) - float(plain)) > 1e-4
    tcfg = resolve("tiny", {"doc_masking": True, "batch_size": 2})[1]
    val = ts.estimate_val_loss(model, [batch.numpy()], tcfg, 1, cpu, torch.float32)
    assert val == pytest.approx(float(masked), rel=1e-6)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_a_nonfinite_gradient_skips_the_update():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tcfg = resolve("tiny", {})[1]
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Inf(torch.nn.Module):
        def forward(self, x, y, **kw):
            return _InfGrad.apply(model(x, y, **kw))

    class Feed:
        def next(self):
            return torch.randint(0, 64, (2, 17)), {"epoch": 0, "pos": 2}

    cpu = torch.device("cpu")
    step = ts.make_train_step(model, Inf(), configure_optimizer(model, tcfg, cpu), tcfg, cpu, torch.float32, 1)
    r = step(Feed(), 1.0)
    assert math.isfinite(r.loss) and "gradient norm" in r.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
