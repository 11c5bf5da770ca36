"""``minillm.generation.static``: the ``--dtype`` rule."""

from __future__ import annotations

import pytest
import torch

from minillm.errors import UsageError
from minillm.generation import decode_dtype


def test_dtype_auto_is_fp32_off_cuda_and_the_flag_wins():
    cpu = torch.device("cpu")
    assert decode_dtype(cpu, "auto") == torch.float32
    assert decode_dtype(cpu, "bf16") == torch.bfloat16 and decode_dtype(cpu, "fp32") == torch.float32
    with pytest.raises(UsageError, match="--dtype"):
        decode_dtype(cpu, "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dtype_auto_is_bf16_on_a_gpu_that_has_it():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert decode_dtype(torch.device("cuda"), "auto") == want


VARIANTS = [{}, {"n_kv_head": 2, "qk_norm": True}, {"mlp": "gelu", "norm": "layernorm", "bias": True, "n_kv_head": 1}]


def varied_model(**kw):
    from minillm.config import ModelConfig
    from minillm.model.gpt import GPT

    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, block_size=32, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.double().eval()


@pytest.mark.parametrize("kw", VARIANTS)
def test_fused_projections_decode_the_same_logits_and_follow_weight_changes(kw):
    from minillm.generation import Sampling, _Decoder, generate_batch

    m = varied_model(**kw)
    ids = [1, 4, 9, 2, 7, 3, 3, 8]

    def logits(fused: bool) -> torch.Tensor:
        dec = _Decoder(m, 1, "static", len(ids), fused=fused)
        out = [dec.prefill([ids[:2]])]
        out += [dec.step(torch.tensor([t])) for t in ids[2:]]
        return torch.cat(out)

    plain, fused = logits(False), logits(True)
    assert torch.allclose(plain, fused, atol=1e-10) and not torch.equal(plain, torch.zeros_like(plain))
    step = next(s for k, (_, s) in m.decoders.items() if "fused" in k)
    assert all(q is not None for q, _ in step.fused)  # every layer really fused
    greedy = Sampling(temperature=0)
    assert (generate_batch(m, [ids], 20, sampling=greedy, mode="static", chunk=4, fused=True)[0].tokens
            == generate_batch(m, [ids], 20, sampling=greedy, mode="static")[0].tokens)
    with torch.no_grad():  # weights change after the fused copies were made: the next call sees the new ones
        m.blocks[0].attn.k_proj.weight.mul_(-1)
        for b in m.blocks:
            (b.mlp.gate_proj if b.mlp.swiglu else b.mlp.up_proj).weight.mul_(0.5)
    assert torch.allclose(logits(True), logits(False), atol=1e-10)
    assert not torch.allclose(logits(False), plain)
