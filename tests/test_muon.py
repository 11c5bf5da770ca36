from __future__ import annotations

import pytest
import torch

from minillm.optim.muon import Muon, orthogonalize


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
        losses.append(loss.item())
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


def _torch_muon_with_our_iteration(monkeypatch):
    """torch.optim.Muon with its Newton-Schulz step replaced by ours (fp32 on the CPU; torch's runs in bf16),
    so the two optimizers differ only in the momentum / weight-decay / learning-rate math under test."""
    import pytest

    muon_mod = pytest.importorskip("torch.optim._muon")
    monkeypatch.setattr(muon_mod, "_zeropower_via_newtonschulz",
                        lambda G, coeffs, steps, eps: orthogonalize(G[None], steps)[0])
    return torch.optim.Muon


def test_update_math_matches_torch_optim_muon(monkeypatch):
    import pytest

    TorchMuon = _torch_muon_with_our_iteration(monkeypatch)
    for nesterov in (True, False):
        torch.manual_seed(0)
        shapes = [(16, 8), (8, 16), (12, 12), (16, 8)]  # tall (lr scaled by sqrt(2)), wide, square; a shared shape
        ws = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
        start = [w.detach().clone() for w in ws]
        ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
        ours = Muon(ws, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
        theirs = TorchMuon(ref, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
        for _ in range(4):
            for w, r in zip(ws, ref, strict=True):
                g = torch.randn(w.shape)
                w.grad, r.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
        assert all((w - s).abs().max() > 0.01 for w, s in zip(ws, start, strict=True))  # the steps moved them
        for w, r in zip(ws, ref, strict=True):
            torch.testing.assert_close(w, r, rtol=0, atol=1e-6, msg=f"nesterov={nesterov}, shape {tuple(w.shape)}")
            torch.testing.assert_close(ours.state[w]["momentum_buffer"], theirs.state[r]["momentum_buffer"],
                                       rtol=0, atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison can tell the variants apart
        torch.testing.assert_close(_run_two(True), _run_two(False), rtol=0, atol=1e-4)


def _run_two(nesterov: bool) -> torch.Tensor:
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = Muon([w], lr=0.05, nesterov=nesterov)
    for _ in range(3):
        w.grad = torch.randn(8, 8)
        opt.step()
    return w.detach()


def test_resume_through_a_checkpoint_is_exact(tmp_path):
    """6 steps straight == 3 steps, save_checkpoint / load_checkpoint into a fresh optimizer, 3 more steps."""
    from minillm.checkpoint import load_checkpoint, save_checkpoint

    def grads(step: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return [torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g)]

    def fresh() -> tuple[list[torch.nn.Parameter], Muon]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 8))]
        return ps, Muon(ps, lr=0.02, weight_decay=0.1)

    def run(ps, opt, steps):
        for s in steps:
            for p, g in zip(ps, grads(s), strict=True):
                p.grad = g
            opt.step()

    straight, opt = fresh()
    run(straight, opt, range(6))
    ps, opt = fresh()
    run(ps, opt, range(3))
    save_checkpoint(tmp_path / "c.pt", {"model": {f"w{i}": p.detach() for i, p in enumerate(ps)},
                                        "model_config": {}, "optimizer": opt.state_dict()})
    ck = load_checkpoint(tmp_path / "c.pt")
    ps2, opt2 = fresh()
    with torch.no_grad():
        for i, p in enumerate(ps2):
            p.copy_(ck["model"][f"w{i}"])
    opt2.load_state_dict(ck["optimizer"])
    run(ps2, opt2, range(3, 6))
    for a, b in zip(straight, ps2, strict=True):
        assert torch.equal(a, b)
    ps3, opt3 = fresh()  # without the momentum buffers the continuation differs: the test can fail
    with torch.no_grad():
        for i, p in enumerate(ps3):
            p.copy_(ck["model"][f"w{i}"])
    run(ps3, opt3, range(3, 6))
    assert not torch.equal(straight[0], ps3[0])


def test_the_fused_iteration_in_bf16_matches_the_plain_one_per_matrix():
    """MINILLM_MUON_NS=fused: baddbmm iterations, a tall matrix batched with the wide ones of its transposed shape,
    in bf16 (as on a GPU): each result within bf16 rounding of the plain iteration on that matrix alone in fp32."""
    from minillm.optim.muon import orthogonalize_all

    torch.manual_seed(0)
    upd = [torch.randn(16, 40), torch.randn(40, 16), torch.randn(16, 16), torch.randn(16, 40), torch.randn(40, 16)]
    want = [orthogonalize(u[None])[0] for u in upd]
    for fused in (False, True):
        got = orthogonalize_all(upd, 5, fused)
        assert [g.shape for g in got] == [u.shape for u in upd] and all(g.is_contiguous() for g in got)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    stack = torch.stack([upd[0], upd[1].mT, upd[3], upd[4].mT])
    ref = torch.stack([want[0], want[1].mT, want[3], want[4].mT])
    err = {f: float((orthogonalize(stack, 5, f, torch.bfloat16).float() - ref).norm() / ref.norm()) for f in (0, 1)}
    assert 0 < err[1] <= err[0] < 0.05, err  # bf16 rounding, no more than today's bf16 iteration's (~3%)


def test_a_found_inf_step_is_a_no_op_and_a_clear_one_is_the_plain_step():
    """The fused AdamW protocol: ``found_inf`` = 1 leaves parameters and momentum exactly as they were (even with
    non-finite gradients), 0 steps bit-identically to a step without it; the fused iteration moves alike."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 16), (8, 8), (8, 8)]
    sets = [[torch.nn.Parameter(w.clone()) for w in [torch.randn(*s) for s in shapes]]]
    sets.append([torch.nn.Parameter(w.detach().clone()) for w in sets[0]])
    opts = [Muon(ps, lr=0.05, weight_decay=0.1) for ps in sets]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for ps in sets:
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        opts[0].found_inf = torch.tensor(0.0)
        for o in opts:
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(*sets, strict=True))
    assert all(torch.equal(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"])
               for a, b in zip(*sets, strict=True))
    before = [p.detach().clone() for p in sets[0]] + [opts[0].state[p]["momentum_buffer"].clone() for p in sets[0]]
    for p in sets[0]:
        p.grad = torch.full_like(p, float("nan"))
    opts[0].found_inf = torch.tensor(1.0)
    opts[0].step()
    after = [p.detach() for p in sets[0]] + [opts[0].state[p]["momentum_buffer"] for p in sets[0]]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    fused = [torch.nn.Parameter(p.detach().clone()) for p in sets[1]]
    plain, fast = Muon(sets[1], lr=0.05), Muon(fused, lr=0.05, fused_ns=True)
    for ps, opt in ((sets[1], plain), (fused, fast)):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    for a, b in zip(sets[1], fused, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_the_fused_bf16_iteration_is_as_close_to_fp32_as_the_plain_one():
    """On a GPU, at the small and medium presets' shapes (MLP matrices, tall ones batched with the wide)."""
    from minillm.optim.muon import orthogonalize_all

    torch.manual_seed(0)
    for d, h in ((256, 704), (384, 1024)):
        upd = [torch.randn(h, d, device="cuda") for _ in range(4)] + [torch.randn(d, h, device="cuda") for _ in range(2)]
        ref = [orthogonalize(u[None].double(), 5, False, torch.float64)[0].float() for u in upd]
        err = {}
        for fused in (False, True):
            got = orthogonalize_all(upd, 5, fused)
            err[fused] = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref, strict=True))
        assert err[True] <= 1.1 * err[False] and err[True] < 0.05, err
