"""The fused decode step's arithmetic (minillm/model/fused_decode.py) against the separate steps it replaces. The
whole step is held to the plain one in test_gpt.py (its kernels per layer) and test_generation_static.py (its
logits, fp64 and bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.model import fused_decode
from minillm.model.gpt import GPT, apply_rope


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_projection_folds_the_qk_norm_weights_rope_and_the_scale_into_the_tables(qk_norm, dtype):
    """``project`` (one product, one norm without weight, one rotation for the queries and keys together through
    the step's tables) gives the queries of the separate products, norms and rotations times the attention's scale,
    and their keys and values: to fp64's rounding in fp64, to bf16's in bf16 (against the separate steps computed in
    fp64 on the same bf16 numbers)."""
    m = model(n_kv_head=2, qk_norm=qk_norm).double()
    attn = m.blocks[1].attn
    if qk_norm:  # weights other than their initial ones, so that the folding shows
        with torch.no_grad():
            for b in m.blocks:
                b.attn.q_norm.weight.normal_(1, 0.5)
                b.attn.k_norm.weight.normal_(1, 0.5)
    m = m.to(dtype)
    H, Hkv, D = attn.n_head, attn.n_kv, attn.head_dim
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    x = torch.randn(3, 1, m.cfg.n_embd, generator=torch.Generator().manual_seed(0)).to(dtype)
    rope = m.rope(torch.tensor([[2], [5], [9]]), 1, in_table=True)  # cos, sin (3, 1, 1, D)
    fused = fused_decode.FusedDecode([(None, None)] * 2, fused_decode.qk_rope_weights(m))
    with torch.no_grad():
        q, k, v = fused_decode.project(attn, x, (w, None), fused_decode.layers(fused, rope, dtype)[1].qk_rope)
        attn.double()  # the separate steps, in fp64 on the same numbers as the bf16 model's
        out = F.linear(x.double(), w.double())
        rope = tuple(t.double() for t in rope)
        want_q = apply_rope(attn.q_norm(out[..., :H * D].view(3, 1, H, D)), *rope) * D ** -0.5
        want_k = apply_rope(attn.k_norm(out[..., H * D:(H + Hkv) * D].view(3, 1, Hkv, D)), *rope)
    assert q.dtype == k.dtype == v.dtype == dtype
    assert q.shape == (3, 1, H, D) and k.shape == v.shape == (3, 1, Hkv, D)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(q.double(), want_q, **tol)
    torch.testing.assert_close(k.double(), want_k, **tol)
    torch.testing.assert_close(v.double(), out[..., (H + Hkv) * D:].view(3, 1, Hkv, D), **tol)


@pytest.mark.parametrize("bias", [False, True])
def test_a_product_is_summed_into_the_residual_stream_in_place(bias):
    """``add_product``: x + proj(y), accumulated into x itself for a plain ``nn.Linear`` (its bias too); anything
    else (a LoRA layer) as a new sum, x untouched."""
    from minillm.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 16, generator=g, dtype=torch.float64)
    proj = torch.nn.Linear(16, 8, bias=bias).double()
    want = x + proj(y)
    got = fused_decode.add_product(x, y, proj)
    assert got is x
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    lora = LoRALinear(proj, 2, 4.0)
    with torch.no_grad():
        lora.lora_B.normal_(generator=g)
        want, before = x + lora(y), x.clone()
        got = fused_decode.add_product(x, y, lora)
    assert got is not x and torch.equal(x, before)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
