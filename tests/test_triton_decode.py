"""The decode step as Triton kernels (``minillm.model.triton_decode``): the logits and the cache it writes are
``GPT.decode_step``'s (left padding, grouped-query heads, QK-norm, biases), hidden slots never leak into the
attention, generation through it gives the eager step's tokens, and ``supported`` says when it cannot run.

Without a GPU the kernels run in Triton's interpreter in fp32 (``TRITON_INTERPRET=1``; skipped where triton is not
installed: CI's CPU machine); with CUDA they run compiled, in bf16, against the fp32 step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.generation import PAD, Sampling, StepChunk, generate_batch
from minillm.generation.static import StaticDecodeStep, static_decoder, step_module
from minillm.model import triton_decode
from minillm.model.gpt import GPT, KVCache

CUDA = torch.cuda.is_available()
SHAPES = {
    "plain": {},
    "gqa_qknorm": {"n_head": 4, "n_kv_head": 2, "n_embd": 128, "qk_norm": True},
    "bias": {"bias": True, "qk_norm": True},
}


@pytest.fixture
def device(monkeypatch) -> str:
    """Where the kernels run: CUDA, else Triton's interpreter on the CPU."""
    if CUDA:
        return "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read as triton and the kernels are imported, and by supported()
    tl = pytest.importorskip("triton.language")
    if not type(tl.zeros_like).__name__.startswith("Interpreted"):
        pytest.skip("triton was imported before TRITON_INTERPRET was set: its own functions are compiled ones")
    import minillm.model.triton_kernels as k

    if not type(k.qkv).__name__.startswith("Interpreted"):
        pytest.skip("the kernels were imported compiled, for a GPU")
    return "cpu"


def model(shape: str, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    base = {"vocab_size": 320, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}
    cfg = ModelConfig(**(base | SHAPES[shape] | kw))
    m = GPT(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1 and 0, so that a kernel that skips one is seen
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return m


def random_cache(cfg: ModelConfig, batch: int, slots: int, pads: list[int], device: str, dtype) -> KVCache:
    cache = KVCache(cfg, batch, slots, device, dtype)
    cache.set_left_padding(pads)
    g = torch.Generator().manual_seed(1)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return cache


def both_steps(m: GPT, device: str, dtype, slot: int = 21, pads=(0, 2, 5), slots: int = 40):
    """(the fp32 ``GPT.decode_step`` of ``m``: logits, cache) and (the kernels' on ``m`` in ``dtype``: logits, cache)."""
    B = len(pads)
    idx = torch.randint(0, m.cfg.vocab_size, (B, 1), generator=torch.Generator().manual_seed(2))
    ref_cache = random_cache(m.cfg, B, slots, list(pads), "cpu", torch.float32)
    with torch.no_grad():
        ref = m.decode_step(idx, torch.tensor([slot]), ref_cache.offsets, ref_cache.key_mask, ref_cache.k, ref_cache.v)
    mk = copy.deepcopy(m).to(device, dtype)
    cache = random_cache(m.cfg, B, slots, list(pads), device, dtype)
    step = StaticDecodeStep(mk, cache, fused=True, kernels=True)
    assert step.kernels, step.why_not
    with torch.no_grad():
        out = step(idx.to(device), torch.tensor([slot], device=device), cache.offsets, cache.key_mask)
    return (ref, ref_cache), (out.float().cpu(), cache)


@pytest.fixture
def slots_per_block(monkeypatch):
    """The attention's blocks of 16 slots: several blocks over the tests' 40-slot caches, one all padding."""
    monkeypatch.setitem(triton_decode.BLOCKS, "slots", 16)


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_give_the_decode_steps_logits_and_cache(device, shape, blocks, monkeypatch):
    if blocks == "several":
        monkeypatch.setitem(triton_decode.BLOCKS, "slots", 16)  # 3 blocks over 40 slots; row 2's first all padding
    else:
        monkeypatch.setitem(triton_decode.BLOCKS, "slots", 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 0.06 if device == "cuda" else 1e-5  # bf16 against fp32; fp32 against fp32
    (ref, ref_cache), (out, cache) = both_steps(model(shape), device, dtype, pads=(0, 2, 17))
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out - ref).abs().max() < tol * max(1.0, ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1)) or device == "cuda"
    for got, want in ((cache.k, ref_cache.k), (cache.v, ref_cache.v)):
        assert (got.float().cpu() - want).abs().max() < tol * 4  # the new keys (QK-norm, RoPE) and values at slot 21
    assert not torch.equal(ref_cache.k[:, :, :, 21], random_cache(model(shape).cfg, 3, 40, [0, 2, 17], "cpu",
                                                                  torch.float32).k[:, :, :, 21])  # slot 21 was written


def test_hidden_slots_do_not_reach_the_attention(device, slots_per_block):
    """Keys and values past the step's slot and in a row's left padding change nothing; one inside the row does
    (blocks of 16 slots: the first of row 1 is all padding)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = model("gqa_qknorm").to(device, dtype)
    B, slots, slot = 2, 40, 20
    pads = [0, 17]

    def logits(poke: tuple | None) -> torch.Tensor:
        cache = random_cache(m.cfg, B, slots, pads, device, dtype)
        if poke is not None:
            row, where = poke
            cache.k[:, row, :, where] += 50
            cache.v[:, row, :, where] -= 50
        step = StaticDecodeStep(m, cache, fused=True, kernels=True)
        with torch.no_grad():
            return step(torch.tensor([[3], [4]], device=device), torch.tensor([slot], device=device), cache.offsets,
                        cache.key_mask).float().cpu()

    base = logits(None)
    assert torch.equal(logits((0, slice(slot + 1, slots))), base)  # the future
    assert torch.equal(logits((1, slice(0, 17))), base)  # row 1's padding
    assert not torch.equal(logits((1, slice(17, 18))), base)  # row 1's first real token


def test_generation_through_the_kernels_gives_the_eager_steps_tokens(device):
    """Greedy, batched with left padding, one token at a time and in chunks of 4 (``StepChunk``): the kernels' tokens
    are the eager fused step's (fp32 in the interpreter; on CUDA bf16 greedy tokens may part after a near tie, so
    there the one-step and chunked kernels are held to each other)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = model("gqa_qknorm", vocab_size=64).to(device, dtype)
    prompts, n = [[1, 5, 6, 7], [1, 2]], 10
    greedy = Sampling(temperature=0)

    def tokens(mode: str, chunk: int) -> list[list[int]]:
        return [c.tokens for c in generate_batch(m, prompts, n, sampling=greedy, mode=mode, chunk=chunk, fused=True)]

    one = tokens("graph", 1)
    assert [step_module(v[1]).kernels for v in m.decoders.values() if isinstance(v, tuple)] == [True]
    assert tokens("graph", 4) == one
    if device == "cpu":
        assert one == tokens("static", 1)  # the eager fused step, no kernels
    assert all(len(t) == n for t in one)


def test_supported_says_why_not(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = model("plain")
    fused = StaticDecodeStep(m, KVCache(m.cfg, 1, 8), fused=True).fused

    def why(mm=m, f=fused, dtype=torch.bfloat16, dev=cuda) -> str | None:
        return triton_decode.supported(mm, f, dtype, dev)

    assert why(dev=torch.device("cpu")) == "not a CUDA device"
    assert "float32 weights" in why(dtype=torch.float32)
    assert why(f=None).startswith("a layer without")
    gelu = model("plain")
    gelu.cfg = dataclasses.replace(gelu.cfg, norm="layernorm", mlp="gelu")
    assert why(mm=gelu) == "layernorm and gelu (the kernels are for rmsnorm and swiglu)"
    assert "head_dim 16" in why(mm=GPT(ModelConfig(vocab_size=64, n_head=4, n_embd=64)))
    qk = model("gqa_qknorm")
    qk.blocks[1].attn.k_norm.eps = 1e-5
    assert why(mm=qk, f=StaticDecodeStep(qk, KVCache(qk.cfg, 1, 8), fused=True).fused).startswith("QK-norm with")
    lora = copy.deepcopy(m)
    lora.blocks[0].attn.o_proj = nn.Sequential(lora.blocks[0].attn.o_proj)
    assert why(mm=lora).startswith("an output or down projection")
    monkeypatch.setenv("MINILLM_DECODE", "torch")
    assert why() == "MINILLM_DECODE=torch"
    monkeypatch.delenv("MINILLM_DECODE")
    assert why() in (None, "triton is not installed")


def test_only_the_graph_decoder_takes_the_kernels(monkeypatch):
    """The static (CPU) and compiled decoders keep ``GPT.decode_step``: kernels are asked for by mode graph only
    (here where ``supported`` would allow them everywhere)."""
    monkeypatch.setattr(triton_decode, "supported", lambda *a: None)
    m = model("plain")
    assert not static_decoder(m, 1, 16, "static", fused=True)[1].kernels
    assert step_module(static_decoder(m, 1, 16, "compiled", fused=True)[1]).kernels is False
    assert static_decoder(m, 1, 16, "graph", fused=True)[1].kernels


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_the_triton_sampler_draws_the_exact_samplers_tokens_from_the_same_noise(device, top_p):
    """Untied fp32 logits, the penalty on seen tokens, top-k 50 and top-p: with the same Exp(1) noise the Triton
    sampler picks the tokens ``sample_next_token`` picks; no row is unsure."""
    from minillm.generation.sampling import noise_like, sample_next_token

    rows = 64 if device == "cuda" else 12  # (the interpreter takes about a second a row)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(rows, 2000, generator=g) * 3).to(device)
    seen = (torch.rand(rows, 2000, generator=g) < 0.1).to(device)
    noise = noise_like(logits, torch.Generator(device).manual_seed(6))
    args = (logits, 0.8, 50, top_p, 1.3)
    want = sample_next_token(*args, seen=seen, noise=noise)
    unsure = torch.zeros(rows, dtype=torch.bool, device=device)
    got = sample_next_token(*args, seen=seen, noise=noise, unsure=unsure, fast=True)
    assert torch.equal(got, want) and not unsure.any()
    other = sample_next_token(*args, seen=seen, noise=noise_like(logits, torch.Generator(device).manual_seed(7)),
                              fast=True)
    assert (other != want).sum() > rows // 6  # the noise decides


def test_the_triton_sampler_marks_ties_past_its_candidates_and_redoes_them_exactly(device):
    """A row whose every logit ties (more tied tokens than candidates) is unsure inside a graph, and picked by the
    exact sampler, over the whole vocabulary, without ``unsure``."""
    from minillm.generation.sampling import noise_like, sample_next_token

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(8)).to(device)
    logits[1] = 0.5
    noise = noise_like(logits, torch.Generator(device).manual_seed(9))
    unsure = torch.zeros(3, dtype=torch.bool, device=device)
    sample_next_token(logits, 1.0, 20, 0.95, 1.0, noise=noise, unsure=unsure, fast=True)
    assert unsure.tolist() == [False, True, False]
    exact = sample_next_token(logits, 1.0, 20, 0.95, 1.0, noise=noise)
    assert torch.equal(sample_next_token(logits, 1.0, 20, 0.95, 1.0, noise=noise, fast=True), exact)


@pytest.mark.parametrize("vocab", [250, 1200])  # one block of the vocabulary, several
def test_the_triton_sampler_orders_ties_by_token_as_the_exact_sampler(device, vocab, monkeypatch):
    """Logits tied in groups of five around the k-th (fewer than the margin), with top-p: the candidates keep the
    ties in token order, so with the same noise the tokens are the exact sampler's, row by row; no row is unsure.
    Blocks of 256 tokens, so that ties cross from one block's candidates into another's."""
    from minillm.generation.sampling import noise_like, sample_next_token

    monkeypatch.setitem(triton_decode.BLOCKS, "vocab", 256)
    rows = 48 if device == "cuda" else 6
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, vocab, generator=g)
    for row in logits:  # five tokens, spread over the vocabulary, tied at the 18th-22nd largest value
        top = row.topk(30).values
        row[torch.randperm(vocab, generator=g)[:5]] = top[17 + int(torch.randint(5, (1,), generator=g))]
    logits = logits.to(device)
    noise = noise_like(logits, torch.Generator(device).manual_seed(12))
    unsure = torch.zeros(rows, dtype=torch.bool, device=device)
    got = sample_next_token(logits, 1.0, 20, 0.9, 1.0, noise=noise, unsure=unsure, fast=True)
    assert torch.equal(got, sample_next_token(logits, 1.0, 20, 0.9, 1.0, noise=noise)) and not unsure.any()


def test_sampled_generation_through_the_kernels_is_the_same_one_step_or_chunked(device, monkeypatch):
    """generate's default sampling with a seed: the one-step loop and the K-step chunks sample with the Triton
    sampler alike (the same tokens), and another seed gives other tokens."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = model("plain", vocab_size=128).to(device, dtype)
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.1)

    def tokens(chunk: int, seed: int = 0, stop_id: int | None = None) -> list[list[int]]:
        g = torch.Generator(device).manual_seed(seed)
        return [c.tokens for c in generate_batch(m, [[1, 5, 6], [1]], 12, sampling=sampling, generator=g,
                                                 mode="graph", chunk=chunk, fused=True, stop_id=stop_id)]

    one = tokens(1)
    assert tokens(4) == one and tokens(1, seed=1) != one
    stop = one[0][5]  # row 0 ends there (the kernel's bookkeeping: its later tokens padding), row 1 goes on
    read = []  # the chunks' (B, K) tokens as read back
    finish = StepChunk.finish
    monkeypatch.setattr(StepChunk, "finish", lambda self, *a, **kw: (lambda r: (read.append(r[0]), r)[1])(
        finish(self, *a, **kw)))
    ended = tokens(4, stop_id=stop)
    assert ended == tokens(1, stop_id=stop) and ended[0] == one[0][:one[0].index(stop)]
    row0 = [t for rows in read for t in rows[0]]
    at = row0.index(stop)
    assert row0[:at] == ended[0] and row0[at + 1:] and set(row0[at + 1:]) == {PAD}


def test_kernels_that_fail_to_build_leave_the_eager_step_with_a_warning(monkeypatch):
    """A Triton that cannot build the kernels (an old or broken install): the first, eager, call warns and the step
    decodes as without them, with the same logits; generation goes on (no triton needed: the failure is simulated)."""
    m = model("plain")
    monkeypatch.setattr(triton_decode, "supported", lambda *a: None)

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")

    calls = []

    def broken_sampler(*a, **k):
        calls.append(1)
        raise RuntimeError("tl.topk is missing")

    monkeypatch.setattr(triton_decode, "decode_step", broken)
    monkeypatch.setattr(triton_decode, "sample", broken_sampler)
    monkeypatch.setattr(triton_decode, "sampler_failed", None)
    cache = random_cache(m.cfg, 1, 16, [0], "cpu", torch.float32)
    step = StaticDecodeStep(m, cache, fused=True, kernels=True)
    assert step.kernels
    args = (torch.tensor([[3]]), torch.tensor([5]), cache.offsets, cache.key_mask)
    with pytest.warns(RuntimeWarning, match="PTX assembly failed"), torch.no_grad():
        got = step(*args)
    assert not step.kernels and "failed" in step.why_not
    with torch.no_grad():
        assert torch.equal(got, m.decode_step(*args, cache.k, cache.v, step.fused))
    sampling = Sampling(temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.1)
    m.decoders.clear()
    with pytest.warns(RuntimeWarning):
        out = generate_batch(m, [[1, 2]], 6, sampling=sampling, mode="graph", chunk=2, fused=True,
                             generator=torch.Generator().manual_seed(0))
    want = generate_batch(model("plain"), [[1, 2]], 6, sampling=sampling, mode="static", chunk=2, fused=True,
                          generator=torch.Generator().manual_seed(0))
    assert [c.tokens for c in out] == [c.tokens for c in want]
    assert calls == [1] and "tl.topk" in triton_decode.sampler_failed  # tried once, at the first (eager) call


def test_a_batch_over_one_row_block(device, slots_per_block):
    """20 rows: two blocks of 16 rows, the second part-filled (its rows past the batch masked): every row's logits
    are the decode step's, each with its own padding."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 0.06 if device == "cuda" else 1e-5
    pads = tuple(i % 19 for i in range(20))
    (ref, _), (out, _) = both_steps(model("gqa_qknorm"), device, dtype, pads=pads)
    assert out.shape == (20, 320)
    assert (out - ref).abs().max(dim=-1).values.max() < tol * max(1.0, ref.abs().max())


def test_generation_through_the_kernels_slides_as_the_eager_step(device):
    """70 new tokens after a 4-token prompt with a block of 64: the context slides once (re-encoded, then single steps
    around it); greedy tokens through the kernels, in chunks of 8, are the eager fused step's (fp32 in the
    interpreter; on CUDA bf16, the one-step kernels' instead)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = model("gqa_qknorm", vocab_size=64).to(device, dtype)
    greedy = Sampling(temperature=0, repetition_penalty=1.3)

    def tokens(mode: str, chunk: int) -> list[int]:
        return generate_batch(m, [[1, 5, 6, 7]], 70, sampling=greedy, mode=mode, chunk=chunk, fused=True)[0].tokens

    got = tokens("graph", 8)
    assert len(got) == 70
    assert got == (tokens("graph", 1) if device == "cuda" else tokens("static", 8))
