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
    """The fused step (``FusedDecode``) gives, in fp64, the logits of the decoder that attends through
    ``GPT.forward`` with the cache (SDPA, fp64 throughout) to the last bit of the fp32 logits; the plain static step
    rounds its attention scores to fp32 (``.float()``, for bf16's softmax), hence its looser tolerance. The tables
    and concatenations follow the model's weights when they change."""
    from minillm.generation import Sampling, _Decoder, generate_batch

    m = varied_model(**kw)
    ids = [1, 4, 9, 2, 7, 3, 3, 8]

    def logits(mode: str, fused: bool = False) -> torch.Tensor:
        dec = _Decoder(m, 1, mode, len(ids), fused=fused)
        out = [dec.prefill([ids[:2]])]
        out += [dec.step(torch.tensor([t])) for t in ids[2:]]
        return torch.cat(out)

    plain, fused, eager = logits("static"), logits("static", fused=True), logits("eager")
    assert torch.allclose(fused, eager, atol=1e-10) and not torch.equal(plain, torch.zeros_like(plain))
    assert torch.allclose(plain, fused, atol=1e-6)
    step = next(s for k, (_, s) in m.decoders.items() if "fused" in k)
    assert all(qkv is not None for qkv, _ in step.fused.layers)  # every layer really fused
    greedy = Sampling(temperature=0)
    assert (generate_batch(m, [ids], 20, sampling=greedy, mode="static", chunk=4, fused=True)[0].tokens
            == generate_batch(m, [ids], 20, sampling=greedy, mode="static")[0].tokens)
    with torch.no_grad():  # weights change after the fused copies were made: the next call sees the new ones
        m.blocks[0].attn.k_proj.weight.mul_(-1)
        for b in m.blocks:
            (b.mlp.gate_proj if b.mlp.swiglu else b.mlp.up_proj).weight.mul_(0.5)
            if m.cfg.qk_norm:
                b.attn.q_norm.weight.mul_(1.5)
                b.attn.k_norm.weight.mul_(-0.5)
    assert torch.allclose(logits("static", fused=True), logits("eager"), atol=1e-10)
    assert not torch.allclose(logits("static"), plain, atol=1e-3)


def test_a_layer_with_an_unmerged_lora_decodes_unfused_beside_fused_ones():
    """A layer whose q/k/v projections are not all plain ``nn.Linear`` (an unmerged LoRA) gets no concatenation and
    attends as the plain step does, beside fused layers; a LoRA output projection is added to the residual stream
    as it is (no ``addmm_``). The logits stay the plain step's."""
    from minillm.generation import _Decoder
    from minillm.lora import LoRALinear

    m = varied_model(n_kv_head=2, qk_norm=True)
    m.blocks[0].attn.o_proj = LoRALinear(m.blocks[0].attn.o_proj, 2, 4.0).double()
    m.blocks[1].attn.q_proj = LoRALinear(m.blocks[1].attn.q_proj, 2, 4.0).double()
    with torch.no_grad():  # updates that change the logits
        m.blocks[0].attn.o_proj.lora_B.normal_(0, 0.3)
        m.blocks[1].attn.q_proj.lora_B.normal_(0, 0.3)
    ids = [1, 4, 9, 2, 7, 3]

    def logits(mode: str, fused: bool = False) -> torch.Tensor:
        dec = _Decoder(m, 1, mode, len(ids), fused=fused)
        return torch.cat([dec.prefill([ids[:2]])] + [dec.step(torch.tensor([t])) for t in ids[2:]])

    fused = logits("static", fused=True)
    step = next(s for k, (_, s) in m.decoders.items() if "fused" in k)
    assert [qkv is None for qkv, _ in step.fused.layers] == [False, True]
    assert torch.allclose(fused, logits("static"), atol=1e-6) and torch.allclose(fused, logits("eager"), atol=1e-6)


@pytest.mark.parametrize("kw", VARIANTS)
def test_bf16_fused_decoding_stays_near_the_fp32_plain_step(kw):
    """bf16's fused step (RoPE tables, softmax in bf16, sums in the products) against the fp32 plain step: logits
    up to ~2 within 0.05 (the plain bf16 step strays as far: 0.014-0.022 here, the fused one 0.014-0.022), the same
    argmax."""
    import copy

    from minillm.generation import _Decoder

    m32 = varied_model(**kw).float()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids = [1, 4, 9, 2, 7, 3, 3, 8, 5, 6, 10, 11]

    def logits(m, fused: bool) -> torch.Tensor:
        dec = _Decoder(m, 1, "static", len(ids), fused=fused)
        with torch.no_grad():
            return torch.cat([dec.prefill([ids[:2]])] + [dec.step(torch.tensor([t])) for t in ids[2:]])

    ref, fused = logits(m32, False), logits(m16, True)
    assert fused.dtype == torch.float32 and not torch.equal(fused, logits(m16, False))  # really the fused step
    torch.testing.assert_close(fused, ref, atol=5e-2, rtol=0)
    assert torch.equal(fused.argmax(-1), ref.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_re_encode_after_each_slide_replays_one_graph_with_the_eager_tokens():
    """One row, 200 greedy tokens through a block of 64: the context slides and is re-encoded (48 tokens) again and
    again; from the second time on as a captured graph (``GraphedPrefill``), replayed, with plain PyTorch's tokens
    (fp32)."""
    from minillm.generation import Sampling, generate_batch
    from minillm.generation.static import GraphedPrefill, step_module
    from tests.test_generation import varied_model

    m = varied_model(0, 64, 64, torch.float32).cuda()
    greedy = Sampling(temperature=0, repetition_penalty=1.3)
    want = generate_batch(m, [[1, 5, 6, 7]], 200, sampling=greedy, mode="eager")[0].tokens
    replays = []
    real = torch.cuda.CUDAGraph.replay
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(g), real(g))[1])
        got = generate_batch(m, [[1, 5, 6, 7]], 200, sampling=greedy, mode="graph", chunk=8)[0].tokens
    assert got == want
    static = next(step_module(v[1]) for v in m.decoders.values() if isinstance(v, tuple))
    prefill = static.prefills[48]
    assert isinstance(prefill, GraphedPrefill) and prefill.graph is not None
    assert replays.count(prefill.graph) >= 5
