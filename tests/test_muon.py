from __future__ import annotations

import torch

from minillm.muon import Muon, orthogonalize


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    for shape in ((4, 32, 32), (3, 64, 16), (2, 16, 64)):
        G = torch.randn(*shape) * torch.logspace(-1, 1, shape[-1])  # columns 100x apart in scale
        sg = torch.linalg.svdvals(G)
        s = torch.linalg.svdvals(orthogonalize(G).float())
        big = sg > 0.05 * sg[:, :1]  # directions not negligible against the largest
        assert s.max() < 1.3 and s[big].min() > 0.5, (shape, s[big].min(), s.max())
        assert orthogonalize(G).shape == G.shape


def test_batched_step_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(3)]
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    grads = [torch.randn(16, 16) for _ in ws]
    opt = Muon(ws, lr=0.02, weight_decay=0.1)
    opts = [Muon([r], lr=0.02, weight_decay=0.1) for r in ref]
    for _ in range(2):
        for w, r, g in zip(ws, ref, grads, strict=True):
            w.grad, r.grad = g.clone(), g.clone()
        opt.step()
        for o in opts:
            o.step()
    for w, r in zip(ws, ref, strict=True):
        torch.testing.assert_close(w, r, rtol=0, atol=1e-6)


def test_muon_lowers_a_loss_and_round_trips_its_state():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
    target = torch.randn(8, 8)
    opt = Muon([W], lr=0.05)
    losses = []
    for _ in range(30):
        loss = ((W - target) ** 2).mean()
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    sd = opt.state_dict()
    opt2 = Muon([W], lr=0.05)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[W]["momentum_buffer"], opt.state[W]["momentum_buffer"])


def test_rejects_non_matrices():
    import pytest

    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(3))])
