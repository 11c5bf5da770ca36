"""The model (minillm/model/gpt.py), proven on tiny CPU configs: causality, RoPE, tying, init loss,
overfitting, state dict, checkpointing, the KV cache and the static decode step (held to the full forward),
GQA, document masking. The loss is tested in test_loss.py, the estimates in test_memory.py."""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.model.gpt import GPT, KVCache, apply_rope, rope_cos_sin, segment_ids, segment_positions

V = 64
DOC = 1  # the <|doc|> id in these tests
PAD = 0


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return ModelConfig(**{**base, **kw})


def model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (B, T), generator=g)  # never DOC or PAD


VARIANTS = [
    {},
    {"n_kv_head": 1},
    {"n_kv_head": 2},
    {"qk_norm": True},
    {"mlp": "gelu", "norm": "layernorm", "bias": True, "tie_embeddings": False},
]


# ------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("kw", VARIANTS)
def test_causality(kw):
    m = model(**kw)
    x = tokens(2, 20)
    y = x.clone()
    y[:, 12:] = tokens(2, 8, seed=7)
    with torch.no_grad():
        a, b = m(x), m(y)
    assert a.shape == (2, 20, V) and a.dtype == torch.float32
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    D, theta = 16, 10000.0
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([[m]]), D, theta)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), D, theta)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 17, 250):
            torch.testing.assert_close(score(m, n), score(m + shift, n + shift), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3))  # and it does depend on the offset


def test_rope_is_rotate_half_convention():
    """Llama/HF convention: the head dim splits in halves, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    D = 8
    x = torch.arange(1.0, D + 1).view(1, 1, 1, D)
    cos, sin = rope_cos_sin(torch.tensor([[3]]), D, 10000.0)
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
    ang = 3 * inv
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), want)


def test_tied_weights_are_one_tensor_counted_once():
    tied, untied = model(), model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == V * 32
    assert tied.num_params() == sum(p.numel() for p in set(tied.parameters()))
    assert tied.num_params(non_embedding=True) == tied.num_params() - V * 32
    assert untied.num_params(non_embedding=True) == untied.num_params() - 2 * V * 32
    x = tokens(2, 8)
    tied(x, x).backward()
    assert tied.tok_emb.weight.grad is tied.lm_head.weight.grad


def test_residual_projections_scaled_by_depth():
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=8, n_embd=256, n_head=4))
    assert abs(m.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    want = 0.02 / math.sqrt(16)
    for b in m.blocks:
        assert abs(b.attn.o_proj.weight.std().item() - want) < 0.1 * want
        assert abs(b.mlp.down_proj.weight.std().item() - want) < 0.1 * want


@pytest.mark.parametrize("n_embd,vocab", [(32, 64), (256, 4096)])
def test_loss_at_init_is_near_ln_vocab(n_embd, vocab):
    torch.manual_seed(0)
    m = GPT(tiny(n_embd=n_embd, vocab_size=vocab))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, vocab, (4, 32), generator=g), torch.randint(0, vocab, (4, 32), generator=g)
    with torch.no_grad():
        loss = m(x, y).item()
    assert abs(loss - math.log(vocab)) < 0.3


def test_one_batch_overfits():
    m = model().train()
    x = tokens(4, 16)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(60):
        loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_state_dict_round_trip(tmp_path):
    m = model(qk_norm=True)
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    fresh = model(seed=5, qk_norm=True)
    x = tokens(2, 12)
    assert not torch.allclose(fresh(x), m(x))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    assert fresh.lm_head.weight is fresh.tok_emb.weight  # still tied after loading


def test_module_names_follow_llama_layout():
    names = set(dict(model(qk_norm=True).named_parameters()))
    for want in ("tok_emb.weight", "norm_f.weight", "blocks.1.norm1.weight", "blocks.1.norm2.weight",
                 "blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight", "blocks.0.attn.v_proj.weight",
                 "blocks.0.attn.o_proj.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
                 "blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.up_proj.weight", "blocks.0.mlp.down_proj.weight"):
        assert want in names, want
    assert not any("bias" in n for n in names)


def test_too_long_sequence_is_refused():
    with pytest.raises(MiniLLMError, match="block_size"):
        model()(tokens(1, 33))


# ------------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_same_loss_and_grads(dropout):
    x = tokens(2, 16)
    y = torch.roll(x, -1, dims=1)
    results = []
    for ckpt in (False, True):
        m = model(dropout=dropout, gradient_checkpointing=ckpt).train()
        torch.manual_seed(42)  # same dropout masks; checkpointing replays the RNG state
        loss = m(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], msg=n)


def test_gradient_checkpointing_saves_fewer_tensors():
    def saved_bytes(ckpt: bool) -> int:
        m = model(n_layer=4, gradient_checkpointing=ckpt).train()
        x = tokens(4, 32)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, x)
        return total

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


# --------------------------------------------------------------------------------- KV cache, GQA


@pytest.mark.parametrize("kw", VARIANTS)
def test_kv_cache_decoding_equals_full_forward(kw):
    m = model(**kw)
    x = tokens(2, 20)
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, batch_size=2, max_len=32)
        steps = [m(x[:, :8], cache=cache)]  # prefill 8, then 3 tokens, then one at a time
        steps.append(m(x[:, 8:11], cache=cache))
        steps += [m(x[:, t:t + 1], cache=cache) for t in range(11, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pos == 0


def test_kv_cache_overflow_is_an_error():
    m = model()
    cache = KVCache(m.cfg, batch_size=1, max_len=4)
    with torch.no_grad(), pytest.raises(MiniLLMError, match="KV cache is full"):
        m(tokens(1, 5), cache=cache)


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """The prompts as one LEFT-padded batch (B, longest) and each row's padding."""
    L = max(len(p) for p in prompts)
    pad_lens = [L - len(p) for p in prompts]
    return torch.stack([torch.cat([torch.full((n,), PAD), p]) for p, n in zip(prompts, pad_lens, strict=True)]), pad_lens


@pytest.mark.parametrize("kw", [*VARIANTS, {"n_kv_head": 2, "qk_norm": True, "tie_embeddings": False}])
def test_decode_step_equals_the_full_forward(kw):
    """The static decode step (``Attention.decode``: one query written out over every slot of the cache) gives
    the logits of the training forward over each row's whole sequence, in a left-padded batch, and writes the
    same keys and values into the cache as ``forward`` with the cache does."""
    m = model(**kw)
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 7, 5)]
    new = tokens(3, 8, seed=11)  # fed one token per row per step after the prompts
    batch, pad_lens = left_padded(prompts)
    static, ref = KVCache(m.cfg, 3, 24), KVCache(m.cfg, 3, 24)
    got = []
    with torch.no_grad():
        for c in (static, ref):
            c.set_left_padding(pad_lens)
            m(batch, cache=c)
        for t in range(new.size(1)):
            slot = torch.tensor([static.pos])
            got.append(m.decode_step(new[:, t:t + 1], slot, static.offsets, static.key_mask, static.k, static.v))
            static.pos += 1
            m(new[:, t:t + 1], cache=ref)
        for b, p in enumerate(prompts):
            full = m(torch.cat([p, new[b]])[None])[0, len(p):]  # (8, V)
            torch.testing.assert_close(torch.stack([g[b] for g in got]), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.k, ref.k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(static.v, ref.v, atol=1e-6, rtol=1e-6)


class KernelCount(TorchDispatchMode):
    """Counts the ATen ops a call dispatches (``ops``), views aside (no kernel on a GPU) and each ``F.rms_norm`` as
    one (the CPU runs it as several ops, a GPU as one kernel): on a GPU each op is about one kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.in_norm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_norm and not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def counted_rms_norm(self, *args, **kwargs):
        self.ops["rms_norm"] += 1
        self.in_norm += 1
        try:
            return self.rms_norm(*args, **kwargs)
        finally:
            self.in_norm -= 1

    def __enter__(self):
        self.rms_norm, torch.nn.functional.rms_norm = torch.nn.functional.rms_norm, self.counted_rms_norm
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        torch.nn.functional.rms_norm = self.rms_norm


def decode_ops(depth: int, fused: bool, B: int = 2, dtype: torch.dtype = torch.float32, **kw) -> collections.Counter:
    """The ops of one decode step (``KernelCount``) of a model ``depth`` layers deep, its left-padded cache at
    slot 4."""
    from minillm.generation.static import StaticDecodeStep

    m = model(n_layer=depth, **kw).to(dtype)
    c = KVCache(m.cfg, B, 16, dtype=dtype)
    c.set_left_padding([0, 2][:B])
    step = StaticDecodeStep(m, c, fused=fused)
    with torch.no_grad(), KernelCount() as count:
        step(tokens(B, 1), torch.tensor([4]), c.offsets, c.key_mask)
    return count.ops


def per_layer(ops: Callable[[int], collections.Counter]) -> dict:
    """Ops a layer adds, ``ops(depth)`` counting a step: a 3-layer step's less a 1-layer one's, halved."""
    one, three = ops(1), ops(3)
    return {op: (three[op] - one[op]) / 2 for op in three.keys() | one.keys() if three[op] != one[op]}


def per_step(ops: Callable[[int], collections.Counter]) -> collections.Counter:
    """Ops a step runs once, whatever the depth: a 1-layer step's less a layer's."""
    return ops(1) - collections.Counter(per_layer(ops))


def test_decode_step_builds_its_mask_once_not_per_layer():
    """The slots a row must not see are inverted once per step and shared by every layer, with the fused weights
    and without."""
    for fused in (False, True):
        ops = functools.partial(decode_ops, fused=fused, qk_norm=True)
        layer = per_layer(ops)
        assert ops(1)["bitwise_not"] == 1 and "bitwise_not" not in layer
        assert layer["masked_fill"] == 1  # the mask's one use per layer


FUSED_LAYER = {  # the fused decode step's ops per layer without QK-norm, views aside: 17 kernels on a GPU
    "rms_norm": 2,  # norm1, norm2
    "mm": 2,  # the q/k/v product, the gate/up product
    "roll": 1, "addcmul": 1,  # RoPE over the queries and keys together, with a "mul" below
    "index_copy_": 2,  # the new key and value into the cache
    "bmm": 2, "masked_fill": 1, "_softmax": 1,  # the attention: its scale already in the queries, no casts
    "silu": 1,  # SwiGLU, with a "mul"
    "mul": 2,  # RoPE's and SwiGLU's
    "addmm_": 2,  # the output and down projections, summed into the residual stream by their products
}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_decode_step_kernels_per_layer(qk_norm):
    """The fused decode step's ops per layer (bf16, batch 1), pinned: an op more is a kernel more per layer and
    token on a GPU. No cast, no concatenation or negation (RoPE's ``rotate_half``), no sum beside a matrix product;
    with QK-norm one norm for the queries and keys together, its weights in the RoPE tables, which cost a multiply
    and a cast each once per step for every layer."""
    fused, plain = (functools.partial(decode_ops, fused=f, B=1, dtype=torch.bfloat16, n_kv_head=2, qk_norm=qk_norm)
                    for f in (True, False))
    assert per_layer(fused) == {**FUSED_LAYER, "rms_norm": 3 if qk_norm else 2}
    assert per_step(fused) - per_step(plain) == {"mul": 2, "_to_copy": 2}
    assert not per_step(plain) - per_step(fused)


def greedy(m: GPT, prompt: torch.Tensor, n: int, pad_lens: list[int] | None = None):
    """Greedy decoding with the cache; returns (new tokens (B, n), last-step logits (B, n, V))."""
    B = prompt.size(0)
    cache = KVCache(m.cfg, B, prompt.size(1) + n)
    if pad_lens is not None:
        cache.set_left_padding(pad_lens)
    out, logits = [], []
    with torch.no_grad():
        step = m(prompt, cache=cache)[:, -1]
        for _ in range(n):
            logits.append(step)
            nxt = step.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            step = m(nxt, cache=cache)[:, -1]
    return torch.cat(out, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1}, {"qk_norm": True}])
def test_left_padded_batch_decodes_like_each_prompt_alone(kw):
    m = model(**kw)
    prompts = [tokens(1, n, seed=n)[0] for n in (3, 9, 6)]
    batch, pad_lens = left_padded(prompts)
    got, got_logits = greedy(m, batch, 10, pad_lens)
    for i, p in enumerate(prompts):
        want, want_logits = greedy(m, p[None], 10)
        assert got[i].tolist() == want[0].tolist()
        torch.testing.assert_close(got_logits[i], want_logits[0], atol=1e-5, rtol=1e-5)


def test_explicit_positions_match_cache_offsets():
    m = model()
    p = tokens(1, 5)
    padded = torch.cat([torch.full((1, 3), PAD), p], dim=1)
    cache = KVCache(m.cfg, 1, 8)
    cache.set_left_padding([3])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        a = m(padded, cache=cache)[:, 3:]
        b = m(padded, cache=KVCache(m.cfg, 1, 8), positions=positions)[:, 3:]  # no key mask: pads are seen
        c = m(p)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(b, c, atol=1e-3)  # positions alone do not hide the padding


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_equals_multi_head_with_shared_kv(n_kv):
    """A GQA model equals a plain multi-head model whose key/value heads are copies within each group."""
    gqa = model(n_kv_head=n_kv)
    mha = model(seed=9)
    rep = 4 // n_kv
    sd = gqa.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            w = sd[f"blocks.{i}.attn.{name}.weight"]  # (n_kv * D, C)
            sd[f"blocks.{i}.attn.{name}.weight"] = w.view(n_kv, 8, 32).repeat_interleave(rep, 0).reshape(32, 32)
    mha.load_state_dict(sd)
    assert gqa.num_params() == mha.num_params() - 2 * 2 * (32 - n_kv * 8) * 32
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
        one_doc = torch.zeros_like(x)  # forces the masked path (repeated kv heads) instead of native GQA
        torch.testing.assert_close(gqa(x, seg_ids=one_doc), gqa(x), atol=1e-5, rtol=1e-5)


def test_forced_math_backend_matches_auto():
    a, b = model(), model(attention="math")
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


# ------------------------------------------------------------------------------ document masking


def test_segment_ids_and_positions():
    idx = torch.tensor([[5, DOC, 7, 8, DOC, 9], [DOC, 2, 3, 4, 5, 6]])
    seg = segment_ids(idx, DOC)
    assert seg.tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]
    assert segment_positions(seg).tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}])
def test_document_masking(kw):
    m = model(**kw)
    doc_a, doc_a2, doc_b = tokens(1, 7, seed=1), tokens(1, 7, seed=2), tokens(1, 9, seed=3)
    bos = torch.tensor([[DOC]])
    w1 = torch.cat([bos, doc_a, bos, doc_b], dim=1)  # (1, 18)
    w2 = torch.cat([bos, doc_a2, bos, doc_b], dim=1)  # the previous document changed
    alone = torch.cat([bos, doc_b], dim=1)
    with torch.no_grad():
        l1 = m(w1, seg_ids=segment_ids(w1, DOC))
        l2 = m(w2, seg_ids=segment_ids(w2, DOC))
        la = m(alone, seg_ids=segment_ids(alone, DOC))
        unmasked = m(w1)
    torch.testing.assert_close(l1[:, 8:], l2[:, 8:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1[:, 8:], la, atol=1e-5, rtol=1e-5)  # positions restart at the <|doc|>
    assert not torch.allclose(l1[:, 8:], unmasked[:, 8:], atol=1e-4)  # without seg_ids the past leaks in
    # the loss path takes the same masks
    y = torch.roll(w1, -1, dims=1)
    with torch.no_grad():
        per_tok = m(w1, y, seg_ids=segment_ids(w1, DOC), reduction="none")
    want = torch.nn.functional.cross_entropy(la[0, :-1], y[0, 8:-1], reduction="none")
    torch.testing.assert_close(per_tok[0, 8:-1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}])
def test_document_masking_stays_causal_inside_a_document(kw):
    """With seg_ids a token still sees only the past of its own document: changing a later token of the same
    document changes nothing before it (a mask that dropped the causal part would leak the future)."""
    m = model(**kw)
    bos = torch.tensor([[DOC]])
    w = torch.cat([bos, tokens(1, 6, seed=1), bos, tokens(1, 12, seed=3)], dim=1)  # (1, 20)
    v = w.clone()
    v[0, 14:] = tokens(1, 6, seed=9)[0]  # the second document's last tokens
    with torch.no_grad():
        a, b = m(w, seg_ids=segment_ids(w, DOC)), m(v, seg_ids=segment_ids(v, DOC))
    torch.testing.assert_close(a[:, :14], b[:, :14], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 14:], b[:, 14:], atol=1e-4)


def test_rope_table_matches_positions_computed_on_the_fly():
    """The table gathered by document positions (training with seg_ids) and the cos/sin computed for explicit
    positions (the KV cache) are the same numbers, so a model trained one way decodes the other."""
    m = model()
    pos = torch.tensor([[0, 1, 2, 0, 1, 31], [5, 6, 7, 8, 9, 10]])
    table = m.rope(pos, 6, in_table=True)
    fly = m.rope(pos, 6)
    for t, f in zip(table, fly, strict=True):
        assert t.shape == f.shape == (2, 6, 1, 8)
        torch.testing.assert_close(t, f, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.rope(None, 6)[0], m.rope(torch.arange(6)[None], 6)[0], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ regional compilation and norms


def test_regional_compilation_matches_eager_and_compiles_each_region_once():
    """``compile_regions``: the same loss and gradients as the eager model, and one graph for the block reused by
    every layer (a per-layer recompilation would cost the compile time regional compilation exists to save)."""
    from torch._dynamo.utils import counters

    from minillm.model.gpt import compile_regions

    torch._dynamo.reset()
    counters.clear()
    m = model(n_layer=3).train()
    x = tokens(2, 17)
    eager = m(x[:, :-1], x[:, 1:])
    eager.backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    got = m(x[:, :-1], x[:, 1:], regions=compile_regions())
    got.backward()
    assert torch.allclose(got, eager, atol=1e-5)
    for p, g in zip(m.parameters(), want, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # the block (all three layers) and the head


def test_rms_norm_meets_a_low_precision_input_in_its_dtype():
    """bf16 activations with an fp32 weight: torch's fused kernel refuses mixed dtypes; the norm casts the
    weight, so its output stays bf16 and equals F.rms_norm with the weight in bf16; fp32 is nn.RMSNorm's."""
    from minillm.model.gpt import RMSNorm

    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16)
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    ref.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), ref(x))
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.rms_norm(xb, (16,), norm.weight.bfloat16(), 1e-6))


@pytest.mark.parametrize("half_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_explicit_rms_norm_is_the_fused_one(monkeypatch, dtype, half_weight):
    """MINILLM_NORM=explicit (RMSNorm.explicit) and halfweight (the weight in the input's dtype): the same outputs
    and gradients as ``F.rms_norm`` (fp32 to rounding; under bf16 autocast, the model's loss and gradients within
    bf16 noise)."""
    from minillm.model.gpt import RMSNorm

    monkeypatch.setattr(RMSNorm, "half_weight", half_weight)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the plain ops are for compiled regions

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, qk_norm=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randint(0, 64, (3, 17))

    def run(explicit: bool):
        monkeypatch.setattr(RMSNorm, "explicit", explicit)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    (lf, gf), (le, ge) = run(False), run(True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.05, atol=2e-3)
    assert le == pytest.approx(lf, rel=tol["rtol"])
    for n, g in gf.items():
        torch.testing.assert_close(ge[n], g, **tol, msg=n)
    norm = RMSNorm(8, eps=1e-6)
    h = torch.randn(4, 8) * 3
    monkeypatch.setattr(RMSNorm, "explicit", True)
    torch.testing.assert_close(norm(h), torch.nn.functional.rms_norm(h, (8,), norm.weight, 1e-6))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_concatenated_projections_give_the_separate_ones(monkeypatch, lora, n_kv_head):
    """MINILLM_PROJ=concat (Attention.concat_projections): q/k/v and gate/up as one matrix product each give the
    loss and every gradient of the separate layers (fp32, to rounding); a LoRA finetune's adapted layers keep their
    own forward (its update is not dropped: the loss moves with lora_B)."""
    from minillm.lora import LoRAConfig, apply_lora
    from minillm.model.gpt import Attention

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32,
                            qk_norm=True))
    if lora:
        apply_lora(model, LoRAConfig(targets=("q", "v", "up")))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()
    x = torch.randint(0, 64, (3, 17))

    def run(concat: bool):
        monkeypatch.setattr(Attention, "concat_projections", concat)
        model.zero_grad(set_to_none=True)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (ls, gs), (lc, gc) = run(False), run(True)
    assert lc == pytest.approx(ls, rel=1e-5)
    assert gc.keys() == gs.keys()
    for n, g in gs.items():
        torch.testing.assert_close(gc[n], g, rtol=1e-4, atol=1e-6, msg=n)
    if lora:  # the adapters count: zeroing them changes the concatenated run's loss
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        assert run(True)[0] != pytest.approx(lc, rel=1e-4)


def test_the_explicit_rms_norm_runs_the_fused_op_outside_compile(monkeypatch):
    """Eagerly (``--compile off``, the first steps of ``--compile auto``), RMSNorm keeps torch's one fused op even
    with the explicit lever on: the plain ops are six kernels there, with nothing to fuse them."""
    from minillm.model.gpt import RMSNorm

    calls = []
    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(RMSNorm, "explicit", True)
    norm, h = RMSNorm(8, eps=1e-6), torch.randn(4, 8)
    norm(h)
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    norm(h)
    assert calls == [1]  # compiled: the plain ops


@pytest.mark.parametrize("kw", [{"qk_norm": True}, {"norm": "layernorm", "bias": True, "mlp": "gelu"}])
def test_parameter_free_norms_train_with_their_gains_fixed_and_keep_the_layout(kw):
    """``norm_weight=False``: no norm has a parameter (nothing for the optimizer, no gain gradient to reduce), the
    gains stay exactly 1 (biases 0) through training, the state dict has the same keys as the learned-gain model's
    (checkpoints and export keep their layout), and at init the two models are the same function."""
    free, learned = model(norm_weight=False, **kw).train(), model(norm_weight=True, **kw).train()
    assert not [n for n, _ in free.named_parameters() if "norm" in n]
    assert [n for n, _ in learned.named_parameters() if "norm" in n]
    assert free.state_dict().keys() == learned.state_dict().keys()
    x = tokens(4, 16)
    y = torch.roll(x, -1, dims=1)
    torch.testing.assert_close(free(x, y), learned(x, y), rtol=0, atol=0)
    for m in (free, learned):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            m(x, y).backward()
            opt.step()
    gains = {n: t for n, t in free.state_dict().items() if "norm" in n}
    assert gains and all(torch.equal(t, torch.ones_like(t) if n.endswith("weight") else torch.zeros_like(t))
                         for n, t in gains.items())
    assert any(not torch.equal(t, torch.ones_like(t))
               for n, t in learned.state_dict().items() if "norm" in n and n.endswith("weight"))
    fresh = model(seed=3, norm_weight=False, **kw)
    fresh.load_state_dict(free.state_dict())
    torch.testing.assert_close(fresh.eval()(x), free.eval()(x), rtol=0, atol=0)


def test_parameter_free_norms_under_the_presets_optimizers():
    """Muon + AdamW (the small preset's optimizers) build and step a parameter-free model: the norms are in
    neither optimizer, every other parameter is in exactly one."""
    from minillm.config import TrainConfig
    from minillm.optim.groups import configure_optimizer

    m = model(norm_weight=False, qk_norm=True).train()
    opts = configure_optimizer(m, TrainConfig(optimizer="muon"), torch.device("cpu"))
    held = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in m.parameters())
    x = tokens(2, 16)
    m(x, torch.roll(x, -1, dims=1)).backward()
    for o in opts:
        o.step()
    assert torch.equal(m.blocks[0].attn.q_norm.weight, torch.ones(m.cfg.head_dim))
