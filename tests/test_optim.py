"""Optimizer groups, the learning-rate schedule and gradient clipping (minillm/optim/groups.py)."""

from __future__ import annotations

import math

import pytest
import torch

from minillm.config import ModelConfig, resolve
from minillm.model.gpt import GPT
from minillm.optim.groups import (
    Schedule,
    clip_gradients,
    configure_optimizer,
    lr_at,
    rescheduled,
    schedule_for,
)


def test_lr_at_matches_a_table():
    s = Schedule(lr=1e-3, min_lr=1e-4, warmup=10, total=110)
    table = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 35: 1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2,
             60: 5.5e-4, 110: 1e-4, 500: 1e-4}
    for step, want in table.items():
        assert lr_at(step, s) == pytest.approx(want, rel=1e-12), step
    cfg = resolve("tiny", {"lr": 2e-3, "warmup_steps": 100})[1]
    d = schedule_for(cfg, 300)
    assert (d.min_lr, d.warmup, d.total) == (pytest.approx(2e-4), 30, 300)  # lr/10; warmup <= a tenth of the run


def test_rescheduled_keeps_the_past_and_reaches_min_lr_at_the_new_total():
    s = Schedule(lr=1e-3, min_lr=1e-4, warmup=10, total=100)
    r = rescheduled(s, 40, 200)
    assert lr_at(40, r) == pytest.approx(lr_at(40, s))  # continuous at the resume point
    assert lr_at(200, r) == pytest.approx(1e-4) and lr_at(120, r) > lr_at(120, s)
    assert all(lr_at(i + 1, r) <= lr_at(i, r) for i in range(40, 220))
    w = rescheduled(s, 3, 50)  # still warming up: warmup shrinks to a tenth of the new run
    assert w.warmup == 5 and lr_at(3, w) == pytest.approx(1e-3 * 4 / 5) and lr_at(50, w) == pytest.approx(1e-4)
    assert rescheduled(s, 40, 100) is s
    # resuming with --max-steps below the step reached trains nothing more (it used to run one extra step)
    assert rescheduled(s, 80, 50).total == 80 and rescheduled(s, 80, 80).total == 80


def test_no_weight_decay_on_norms_biases_or_embeddings():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, bias=True))
    cfg = resolve("tiny", {"weight_decay": 0.1})[1]
    (opt,) = configure_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and all(model.get_parameter(n).dim() == 2 and "emb" not in n for n in decayed)
    assert "tok_emb.weight" in plain and any("norm" in n for n in plain) and any(n.endswith("bias") for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    assert not opt.defaults.get("fused")  # fused AdamW only on CUDA


def test_clipping_caps_the_norm_and_reports_the_norm_before():
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    ps[0].grad, ps[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_gradients(ps, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(torch.cat([p.grad for p in ps]).norm()) == pytest.approx(1.0, rel=1e-5)
    assert ps[0].grad[0] == pytest.approx(0.6, rel=1e-5)  # direction kept
    ps[0].grad = torch.tensor([3.0, 0.0, 0.0])
    ps[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert float(clip_gradients(ps, 0.0)) == pytest.approx(5.0) and ps[0].grad[0] == 3.0  # 0 disables


