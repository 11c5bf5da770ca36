"""The output layer's loss in one Triton kernel (``minillm.model.triton_loss``): each row's loss and its logits'
gradient are cross-entropy's (ignored rows 0, vocabularies that do not fill the kernel's last block), the
gradients reaching the hidden states and the output layer's weight are autograd's through ``F.cross_entropy``,
scaled by what reaches the backward pass; and the loss takes this path only for compiled CUDA training steps.

Without a GPU the kernel runs in Triton's interpreter in fp32 (``TRITON_INTERPRET=1``; skipped where triton is
not installed: CI's CPU machine); with CUDA, compiled, against the plain compiled path in bf16."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from minillm.model import loss

CUDA = torch.cuda.is_available()


@pytest.fixture
def kernels(monkeypatch):
    """``triton_loss`` on CUDA, else in Triton's interpreter on the CPU, with a small block (several a row)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        tl = pytest.importorskip("triton.language")
        if not type(tl.zeros_like).__name__.startswith("Interpreted"):
            pytest.skip("triton was imported before TRITON_INTERPRET was set: its own functions are compiled ones")
    from minillm.model import triton_loss

    monkeypatch.setattr(triton_loss, "BLOCK", 128)
    return triton_loss


def _case(n=37, c=16, v=300, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(device)
    w = torch.randn(v, c, generator=g).to(device)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[3] = t[10] = -1
    t[11] = v - 1  # the last column: inside the kernel's last, partial block
    return h, w, t


def test_the_kernel_writes_cross_entropy_and_its_gradient_in_place(kernels):
    dev = "cuda" if CUDA else "cpu"
    h, w, t = _case(device=dev)
    logits = (h @ w.T).float()
    ref = logits.clone().requires_grad_()
    want = F.cross_entropy(ref, t, ignore_index=-1, reduction="none")
    want.sum().backward()
    work = logits.clone()
    got = kernels.cross_entropy_grad_(work, t)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    assert got[3] == 0 and got[10] == 0
    torch.testing.assert_close(work, ref.grad, rtol=1e-5, atol=1e-6)  # softmax - onehot, 0 on ignored rows
    assert work[3].abs().max() == 0 and work[10].abs().max() == 0


def test_every_row_ignored_gives_zero_loss_and_gradient(kernels):
    h, w, t = _case(n=12, device="cuda" if CUDA else "cpu")
    t[:] = -1
    work = (h @ w.T).float()
    assert kernels.cross_entropy_grad_(work, t).abs().max() == 0
    assert work.abs().max() == 0


def test_gradients_are_autograds_through_cross_entropy_scaled_by_the_incoming_grad(kernels):
    dev = "cuda" if CUDA else "cpu"
    h, w, t = _case(seed=1, device=dev)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    total = kernels.linear_cross_entropy(h1, w1, t)
    (total * 3.5).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.T, t, ignore_index=-1, reduction="sum")
    (ref * 3.5).backward()
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_the_triton_path_is_for_compiled_cuda_training_steps_only(monkeypatch):
    cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(loss, "TRITON_LOSS", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert loss.takes_triton(cuda, "mean")
    assert not loss.takes_triton(cuda, "none")  # per-token losses (evaluation, rewards) stay plain
    assert not loss.takes_triton(SimpleNamespace(is_cuda=False), "mean")
    with torch.no_grad():
        assert not loss.takes_triton(cuda, "mean")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)  # eager steps: the chunked path
    assert not loss.takes_triton(cuda, "mean")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(loss, "TRITON_LOSS", False)
    assert not loss.takes_triton(cuda, "mean")


def test_the_lever_is_on_for_cuda_with_triton_and_falls_back_without(monkeypatch):
    from minillm.errors import MiniLLMError
    from minillm.model import triton_decode
    from minillm.train.step import apply_model_levers

    monkeypatch.delenv("MINILLM_LOSS", raising=False)
    apply_model_levers(torch.device("cpu"))
    assert not loss.TRITON_LOSS
    monkeypatch.setattr(triton_decode, "available", lambda: True)
    apply_model_levers(torch.device("cuda"))
    assert loss.TRITON_LOSS
    monkeypatch.setattr(triton_decode, "available", lambda: False)
    apply_model_levers(torch.device("cuda"))
    assert not loss.TRITON_LOSS  # the default quietly takes the plain path
    monkeypatch.setenv("MINILLM_LOSS", "triton")
    with pytest.raises(MiniLLMError, match="MINILLM_LOSS=triton needs triton"):
        apply_model_levers(torch.device("cuda"))
    monkeypatch.setenv("MINILLM_LOSS", "plain")
    monkeypatch.setattr(triton_decode, "available", lambda: True)
    apply_model_levers(torch.device("cuda"))
    assert not loss.TRITON_LOSS


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compiled_on_cuda_it_gives_the_plain_paths_loss_and_gradients(monkeypatch):
    from minillm.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, n_embd=64)
    head = torch.nn.Linear(64, 1000, bias=False, device="cuda")
    h = torch.randn(4, 128, 64, device="cuda")
    t = torch.randint(0, 1000, (4, 128), device="cuda")
    t[0, :9] = -1
    out = {}
    for path in (False, True):
        monkeypatch.setattr(loss, "TRITON_LOSS", path)
        torch._dynamo.reset()
        hh = h.clone().requires_grad_()
        head.weight.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            value = torch.compile(loss.output_loss)(hh, head, t, cfg)
        value.backward()
        out[path] = value.item(), hh.grad.float(), head.weight.grad.clone()
    assert out[True][0] == pytest.approx(out[False][0], rel=2e-3)
    for a, b in zip(out[True][1:], out[False][1:], strict=True):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
