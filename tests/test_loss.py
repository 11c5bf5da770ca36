"""The loss (minillm/model/loss.py): the plain path, the fused path in chunked PyTorch (exact against the
plain one), liger's kernel behind the same function (its wrapper, the fallback off CUDA, and on CUDA when
installed)."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest
import torch

from minillm.model import loss as loss_mod
from minillm.model.loss import (
    LIGER_CHUNK_ROWS,
    eager_on_gpu,
    liger_kernel,
    liger_problem,
    linear_cross_entropy,
)
from tests.test_gpt import V, model, tokens


def test_reduction_none_and_ignore_index():
    m = model()
    x = tokens(2, 10)
    y = torch.roll(x, -1, dims=1)
    y[0, 3:6] = -1
    y[1, 9] = -1
    with torch.no_grad():
        per_tok = m(x, y, reduction="none")
        mean = m(x, y)
        logits = m(x)
    assert per_tok.shape == (2, 10)
    assert (per_tok[y == -1] == 0).all() and (per_tok[y != -1] > 0).all()
    torch.testing.assert_close(mean, per_tok[y != -1].mean())
    want = torch.nn.functional.cross_entropy(logits[y != -1], y[y != -1])
    torch.testing.assert_close(mean, want)
    assert m(x, torch.full_like(y, -1)).item() == 0.0  # all ignored -> 0, not NaN
    with pytest.raises(ValueError):
        m(x, y, reduction="sum")


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_loss_matches_plain(chunk):
    torch.manual_seed(0)
    h = torch.randn(40, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 32, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (40,))
    t[::5] = -1
    loss = linear_cross_entropy(h, w, t, chunk)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, ignore_index=-1)
    torch.testing.assert_close(loss, ref)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    with torch.no_grad():
        per_tok = linear_cross_entropy(h, w, t, chunk, reduction="none")
        ref_tok = torch.nn.functional.cross_entropy(h @ w.T, t, ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_tok, ref_tok)


def saved_logit_shapes(m, x, y) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves for backward whose last dimension is the vocabulary (logits)."""
    shapes = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == m.cfg.vocab_size:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, y)
    return shapes


def test_model_with_loss_chunk_matches_plain_and_never_keeps_the_logits():
    """TOML ``loss_chunk`` takes the fused path: the same loss and gradients, without the (B*T, V) logits
    kept for backward."""
    plain, chunked = model(vocab_size=200), model(vocab_size=200)  # a vocabulary no other dimension has
    chunked.cfg = dataclasses.replace(chunked.cfg, loss_chunk=5)
    x = tokens(2, 12)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    assert saved_logit_shapes(plain, x, y) and not saved_logit_shapes(chunked, x, y)
    a, b = plain(x, y), chunked(x, y)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for (n, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, y, reduction="none"), chunked(x, y, reduction="none"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 loss, same numerics
        torch.testing.assert_close(plain(x, y), chunked(x, y), rtol=1e-3, atol=1e-3)


def test_an_eager_training_step_on_a_gpu_takes_the_chunked_path_and_compiled_ones_do_not(monkeypatch):
    """Eagerly on a GPU (``--compile off``, the first steps of ``--compile auto``) a training step's loss is the fused
    chunked one; compiled (inductor fuses the plain path), in evaluation, per token, or on the CPU it is plain."""
    from types import SimpleNamespace

    gpu, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert eager_on_gpu(gpu, "mean") and not eager_on_gpu(cpu, "mean") and not eager_on_gpu(gpu, "none")
    with torch.no_grad():
        assert not eager_on_gpu(gpu, "mean")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not eager_on_gpu(gpu, "mean")


def test_the_eager_gpu_path_is_the_plain_loss_without_the_logits(monkeypatch):
    """What an eager GPU step runs (``eager_on_gpu`` forced on the CPU): the plain loss and gradients, under bf16
    autocast as well, with no (B*T, V) logits kept for backward."""
    plain, eager = model(vocab_size=200), model(vocab_size=200)
    x = tokens(2, 12)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    a = plain(x, y)
    monkeypatch.setattr(loss_mod, "eager_on_gpu", lambda h, reduction: True)
    assert not saved_logit_shapes(eager, x, y)
    b = eager(x, y)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for (n, p), q in zip(plain.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(loss_mod, "eager_on_gpu", lambda h, reduction: False)
        want = plain(x, y)
        monkeypatch.setattr(loss_mod, "eager_on_gpu", lambda h, reduction: True)
        torch.testing.assert_close(eager(x, y), want, rtol=1e-3, atol=1e-3)


def test_liger_loss_kernel_falls_back_exactly_off_cuda():
    """loss_kernel = liger changes nothing on the CPU (nor in evaluation): same loss and gradients."""
    plain, liger = model(), model()
    liger.cfg = dataclasses.replace(liger.cfg, loss_kernel="liger")
    x = tokens(2, 12)
    y = torch.roll(x, -1, dims=1)
    a, b = plain(x, y), liger(x, y)
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    for p, q in zip(plain.parameters(), liger.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_liger_missing_is_refused_on_cuda_and_ignored_elsewhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    liger_kernel.cache_clear()  # the lookup is cached: look again without the package, and forget it after
    try:
        assert liger_kernel() is None
        cfg = dataclasses.replace(model().cfg, loss_kernel="liger")
        assert re.search(r"--loss-kernel liger.*minillm\[kernels\].*--loss-kernel torch",
                         liger_problem(cfg, torch.device("cuda")))
        assert liger_problem(cfg, torch.device("cpu")) is None  # the CPU takes the PyTorch path anyway
        assert liger_problem(model().cfg, torch.device("cuda")) is None  # not asked for
    finally:
        liger_kernel.cache_clear()


def liger_chunk_rows(n: int, vocab: int, width: int, mem_const: int) -> int:
    """Rows per chunk that liger-kernel's fused linear + cross-entropy makes of n rows (its token-chunk
    geometry: inc_factor = cdiv(V, chunk_mem_const * H), chunk = next power of 2 of cdiv(BT, inc_factor))."""
    inc = -(-vocab // (mem_const * width))
    per = -(-n // inc)
    return min(1 << (per - 1).bit_length(), n)


@pytest.mark.parametrize("n,vocab,width,rows", [
    (65536, 32000, 256, LIGER_CHUNK_ROWS),  # small/medium at batch x block 65,536 tokens
    (32768, 50304, 768, LIGER_CHUNK_ROWS),  # gpt2-124m
    (65536, 4096, 16, 16384),  # loss_chunk = 16384 sizes liger's chunks too
    (1000, 32000, 256, LIGER_CHUNK_ROWS),  # fewer rows than a chunk: one chunk
])
def test_liger_wrapper_passes_the_loss_through_and_asks_for_full_chunks(n, vocab, width, rows):
    """The fused path hands liger the very tensors, ignore_index -1 and the mean, returns its result as is,
    and sets chunk_mem_const so that liger's chunks hold about ``rows`` rows (its default makes many small
    ones)."""
    calls = []
    result = torch.tensor(1.25)

    def fake(h, w, t, **kw):
        calls.append((h, w, t, kw))
        return result

    h, w = torch.zeros(1, width).expand(n, width), torch.zeros(1, width).expand(vocab, width)  # shapes only
    t = torch.zeros(n, dtype=torch.long)
    assert linear_cross_entropy(h, w, t, rows, kernel=fake) is result
    [(gh, gw, gt, kw)] = calls
    assert gh is h and gw is w and gt is t
    assert kw["ignore_index"] == -1 and kw["reduction"] == "mean"
    got = liger_chunk_rows(n, vocab, width, kw["chunk_mem_const"])
    assert min(n, rows // 2) <= got <= min(n, 2 * rows), got
    if n > 2 * rows:  # liger's own default would not have done it
        assert liger_chunk_rows(n, vocab, width, 1) < rows // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_liger_loss_kernel_matches_plain_on_cuda():
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    plain = model().cuda()
    liger = model().cuda()
    liger.load_state_dict(plain.state_dict())
    liger.cfg = dataclasses.replace(liger.cfg, loss_kernel="liger")
    x = tokens(4, 16).cuda()
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            a, b = plain(x, y), liger(x, y)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        plain.zero_grad()
        liger.zero_grad()
        a.backward()
        b.backward()
        for (n, p), q in zip(plain.named_parameters(), liger.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=10 * tol, atol=tol, msg=n)


def test_low_precision_cross_entropy_is_exact_and_keeps_no_fp32_logits():
    """The bf16 path (``cross_entropy`` of bf16 logits): its gradient is exact (gradcheck in fp64), it equals
    F.cross_entropy of the fp32-cast logits (ignored targets give 0), and what it keeps for the backward pass is
    the bf16 logits and one fp32 value a row, not an fp32 (N, V) log-softmax (the memory traffic it removes)."""
    import torch.nn.functional as F

    from minillm.model.loss import _LowPrecisionCrossEntropy, cross_entropy

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 50, (12,), generator=g)
    targets[3] = -1
    x64 = torch.randn(12, 50, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _LowPrecisionCrossEntropy.apply(a, targets), (x64,))
    xb = torch.randn(12, 50, generator=g).bfloat16().requires_grad_()
    w = torch.randn(12, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = cross_entropy(xb, targets)
    (got * w).sum().backward()
    got_grad, xb.grad = xb.grad.clone(), None
    want = F.cross_entropy(xb.float(), targets, ignore_index=-1, reduction="none")
    (want * w).sum().backward()
    assert got.dtype == torch.float32 and got[3] == 0
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got_grad, xb.grad)
    assert all(t.dtype != torch.float32 or t.numel() <= 12 for t in saved), [(t.dtype, t.shape) for t in saved]
