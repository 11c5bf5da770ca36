"""The transformer: a Llama-style decoder (pre-norm RMSNorm, RoPE, SwiGLU, no biases) that can also be
built GPT-2 style (LayerNorm, GELU), with grouped-query attention, optional QK-norm, tied embeddings,
gradient checkpointing, document masking and incremental decoding over a KV cache.

Read top to bottom: norms and RoPE, attention, MLP, the block, the model, the KV cache. Attention is written once:
``Attention.project`` gives the queries, keys and values (projections, QK-norm, RoPE) to both ``forward`` (training,
evaluation, prefill; appends to a ``KVCache``) and ``decode`` (one new token per row over a static cache, for
compiled and CUDA-graph decoding); bf16 decoding's fused step, the same math in fewer kernels a layer, is in
``fused_decode.py``. The loss is in ``loss.py``, the estimates of parameters, FLOPs and memory in ``memory.py``.

Module names match Hugging Face's Llama/Qwen3 layout one to one (``attn.q_proj`` ~ ``self_attn.q_proj``,
``mlp.gate_proj``, ``norm1`` ~ ``input_layernorm``, ...), and RoPE uses the rotate-half convention, so
export is a renaming of keys.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError
from minillm.model import fused_decode
from minillm.model.loss import output_loss
from minillm.model.memory import flops_per_token

RMS_EPS = 1e-6  # Llama/Qwen3 rms_norm_eps; export writes this value
LN_EPS = 1e-5  # GPT-2 layer_norm_epsilon


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose fp32 weight meets a bf16/fp16 input (under autocast) in the input's dtype (torch's fused
    kernel refuses mixed dtypes). ``explicit``, ``half_weight``: class-wide switches set from ``MINILLM_NORM``
    (``optim/levers.py``): inside ``torch.compile`` the same arithmetic as plain ops, so that inductor derives the
    backward itself (faster than ``_fused_rms_norm_backward``); eagerly the fused op stays (one kernel, not six)."""

    explicit = half_weight = False  # half_weight: the normalised input cast back first, then times the weight

    def forward(self, x: Tensor) -> Tensor:
        if not (RMSNorm.explicit and torch.compiler.is_compiling()):
            return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if RMSNorm.half_weight:  # as Hugging Face's Llama: the weight multiplies the input's dtype
            return y.to(x.dtype) * self.weight.to(x.dtype)
        return (y * self.weight.to(x.dtype)).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int, rms: bool = False) -> nn.Module:
    """``cfg.norm`` over ``dim`` (``rms``: RMSNorm); ``norm_weight`` false: gain 1, bias 0 as buffers (same layout)."""
    norm = RMSNorm(dim, eps=RMS_EPS) if rms or cfg.norm != "layernorm" else nn.LayerNorm(dim, eps=LN_EPS, bias=cfg.bias)
    for name, p in [] if cfg.norm_weight else list(norm.named_parameters()):
        delattr(norm, name)
        norm.register_buffer(name, p.detach())
    return norm


# --------------------------------------------------------------------------------------------- RoPE


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables for integer ``positions`` (B|1, T), computed in fp32 -> each (B|1, 1, T, D).

    Computed on the fly (no buffer), so ``model.to(bfloat16)`` cannot round the frequencies and any
    position works."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


class RotaryTable(nn.Module):
    """cos/sin of RoPE for positions 0..block_size-1, computed once in fp32 at construction (buffers that
    are not saved). ``forward(positions)`` -> each (B|1, T, 1, D), laid out for (B, T, H, D) queries/keys;
    positions past the table are computed on the fly."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        cos, sin = rope_cos_sin(torch.arange(cfg.block_size)[None], cfg.head_dim, cfg.rope_theta)  # (1, 1, T, D)
        self.register_buffer("cos", cos[0, 0], persistent=False)  # (T, D)
        self.register_buffer("sin", sin[0, 0], persistent=False)

    def forward(self, positions: Tensor | None, T: int, in_table: bool = False) -> tuple[Tensor, Tensor]:
        """``positions`` None means 0..T-1; ``in_table`` promises every position is < block_size."""
        if positions is None:  # a slice of the table
            return self.cos[None, :T, None], self.sin[None, :T, None]  # (1, T, 1, D)
        if in_table:  # a gather (no host sync, so it compiles into the graph)
            return self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta)  # (B, 1, T, D)
        return cos.transpose(1, 2), sin.transpose(1, 2)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys ``x`` by their positions (Llama/HF rotate-half convention); ``cos``/``sin``
    broadcast against ``x``: (B|1, 1, T, D) for x (B, H, T, D), or (B|1, T, 1, D) for x (B, T, H, D)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def segment_ids(idx: Tensor, doc_id: int) -> Tensor:
    """Document index of every token (B, T): a ``<|doc|>`` token starts a new document (it is its BOS)."""
    return torch.cumsum(idx == doc_id, dim=1)


def segment_positions(seg: Tensor) -> Tensor:
    """Positions that restart at 0 at each document's first token (B, T), from ``segment_ids``."""
    T = seg.size(1)
    t = torch.arange(T, device=seg.device).expand_as(seg)  # (B, T)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # index of the doc's first token
    return t - first


# ---------------------------------------------------------------------------------------- attention

_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_context(attention: str, device: torch.device, masked: bool) -> contextlib.AbstractContextManager:
    """The ``sdpa_kernel`` context forcing the backend ``attention`` names; ``auto`` lets PyTorch pick.

    On CPU only ``math`` is forced (the CUDA kernels do not exist there). Flash attention takes no
    arbitrary mask, so masked calls (document masking, padded decoding) with ``flash`` fall back to the
    other fused kernels, then math."""
    if attention == "auto" or (device.type != "cuda" and attention != "math"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if masked and attention == "flash":
        names = ["CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]
    else:
        names = [_BACKENDS[attention]]
    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def linears(x: Tensor, layers: tuple[nn.Module, ...]) -> tuple[Tensor, ...]:
    """Each of ``layers`` applied to ``x``; with ``Attention.concat_projections`` and plain ``nn.Linear`` layers, as
    one matrix product of their concatenated weights (the parameters stay separate: checkpoints, LoRA and Muon's
    per-matrix updates are unchanged)."""
    if not (Attention.concat_projections and all(type(m) is nn.Linear for m in layers)):
        return tuple(m(x) for m in layers)
    weight = torch.cat([m.weight for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    return F.linear(x, weight, bias).split([m.out_features for m in layers], dim=-1)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads. ``project`` computes the queries, keys and values for
    both ways of attending: ``forward`` (many queries through SDPA; with a ``KVCache`` it appends this layer's
    keys and values at ``cache.pos``) and ``decode`` (one query per row, written out, over a static cache: it
    writes its key and value at the slot it is given). ``concat_projections`` (set from ``MINILLM_PROJ``): q, k, v
    as one matrix product (``linears``), and the MLP's gate and up."""

    concat_projections = False

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = make_norm(cfg, cfg.head_dim, rms=True) if cfg.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, cfg.head_dim, rms=True) if cfg.qk_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, T, H, D), keys and values (B, T, Hkv, D) of ``x`` (B, T, C): the queries and keys
        normed (QK-norm) and rotated by ``rope``."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q = apply_rope(self.q_norm(q.view(B, T, H, D)), *rope)  # (B, T, H, D)
        k = apply_rope(self.k_norm(k.view(B, T, Hkv, D)), *rope)  # (B, T, Hkv, D)
        return q, k, v.view(B, T, Hkv, D)  # v (B, T, Hkv, D)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``cache``: append this layer's new keys/values at ``cache.pos`` and
        attend to every one so far."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_kv != self.n_head
        native_gqa = gqa and mask is None and self.cfg.attention in ("auto", "flash", "math")
        if gqa and not native_gqa:  # the kernels that take masks need one key/value head per query head
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        is_causal = mask is None and q.size(2) == k.size(2)  # no mask and a one-token step: attend to all
        with sdpa_context(self.cfg.attention, x.device, mask is not None):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=native_gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.dropout(self.o_proj(y))

    def decode(self, x: Tensor, rope: tuple[Tensor, Tensor], hidden: Tensor, slot: Tensor,
               keys: Tensor, values: Tensor) -> Tensor:
        """One new token per row over a static cache (fixed shapes): x (B, 1, C) -> (B, 1, C). Its key and
        value go to slot ``slot`` (1,) of this layer's ``keys``/``values`` (B, Hkv, S, D), and it attends to
        every slot but those ``hidden`` (B, 1, 1, S) marks (computed once per step for every layer).

        Same projections as ``forward``; the attention of the single query is written out, two matrix-vector
        products and a softmax, the query heads sharing a key/value head taken as its queries. (The fused SDPA
        kernels are built for many queries: at batch 1 in fp32 the memory-efficient one took 78 us a layer on
        an H100, half of the decode step; docs/BENCHMARKS.md.)"""
        B = x.size(0)
        q, k, v = self.project(x, rope)  # (B, 1, H|Hkv, D)
        keys.index_copy_(2, slot, k.transpose(1, 2).to(keys.dtype))
        values.index_copy_(2, slot, v.transpose(1, 2).to(values.dtype))
        q = q.view(B, self.n_kv, self.n_head // self.n_kv, self.head_dim)  # (B, Hkv, G, D): G heads per kv head
        scores = (q @ keys.to(q.dtype).transpose(-1, -2)).float() * self.head_dim ** -0.5  # (B, Hkv, G, S)
        p = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).to(q.dtype)
        y = p @ values.to(q.dtype)  # (B, Hkv, G, D)
        return self.o_proj(y.reshape(B, 1, self.n_head * self.head_dim))


# ---------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """SwiGLU (Llama: ``down(silu(gate(x)) * up(x))``) or GELU (GPT-2: ``down(gelu(up(x)))``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, gate_up: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """``gate_up`` (SwiGLU, decoding): gate_proj's and up_proj's weight (and bias, or None) concatenated,
        one matrix product instead of two."""
        return self.dropout(self.down_proj(self.activations(x, gate_up)))

    def activations(self, x: Tensor, gate_up: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """What down_proj takes (B, T, hidden)."""
        if gate_up is not None:
            gate, up = F.linear(x, *gate_up).chunk(2, dim=-1)
            return F.silu(gate) * up
        if self.swiglu:
            gate, up = linears(x, (self.gate_proj, self.up_proj))
            return F.silu(gate) * up
        return F.gelu(self.up_proj(x), approximate="tanh")


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg, cfg.n_embd), Attention(cfg, layer_idx)
        self.norm2, self.mlp = make_norm(cfg, cfg.n_embd), MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        x = x + self.mlp(self.norm2(x))
        return x

    def decode(self, x: Tensor, rope: tuple[Tensor, Tensor], hidden: Tensor, slot: Tensor,
               keys: Tensor, values: Tensor, fused: fused_decode.FusedLayer | None = None) -> Tensor:
        """``forward`` for one new token per row over a static cache (``Attention.decode``). ``fused``: this layer's
        share of the fused decode step (``fused_decode``; ``x`` may then be updated in place), or None. A layer
        without the concatenated q/k/v projection (an unmerged LoRA) decodes as without, but for the gate/up
        projection if it has that one."""
        if fused is None or fused.qkv is None:
            gate_up = fused.gate_up if fused is not None else None
            x = x + self.attn.decode(self.norm1(x), rope, hidden, slot, keys, values)
            return x + self.mlp(self.norm2(x), gate_up)
        x = fused_decode.attention(self.attn, self.norm1(x), x, fused, hidden, slot, keys, values)
        return fused_decode.feed_forward(self.mlp, self.norm2(x), x, fused.gate_up)


# ------------------------------------------------------------------------------ regional compilation


def run_block(block: Block, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
              cache: KVCache | None = None) -> Tensor:
    return block(x, rope, mask, cache)


def run_head(norm: nn.Module, head: nn.Linear, x: Tensor, targets: Tensor, cfg: ModelConfig, reduction: str) -> Tensor:
    """The final norm, the output layer and the loss (``loss.output_loss``)."""
    return output_loss(norm(x), head, targets, cfg, reduction)


class Regions(NamedTuple):
    """What ``GPT.forward`` runs each block and the output head with: the functions above (``EAGER``), or
    ``compile_regions``' compiled versions of them."""

    block: Callable[..., Tensor]
    head: Callable[..., Tensor]


EAGER = Regions(run_block, run_head)


def compile_regions(mode: str | None = None) -> Regions:
    """Regional compilation: ``torch.compile`` the block once and the head once. Every block has the same
    code and shapes, so the graph compiled for the first is reused for the others (their weights are inputs
    of the graph, not constants): the compile time of one block instead of the whole model, and nothing to
    recompile when the depth changes. ``mode``: ``torch.compile``'s (None: its default)."""
    return Regions(torch.compile(run_block, dynamic=False, mode=mode), torch.compile(run_head, dynamic=False, mode=mode))


# -------------------------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise MiniLLMError("ModelConfig.vocab_size is 0: take it from the tokenizer (padded to a multiple of 64)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.rope = RotaryTable(cfg)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, one gradient, counted once
        # generation's static decoders by shape, built on first use (minillm.generation.decoder)
        self.decoders: dict[tuple, tuple] = {}

    def _init_weights(self, m: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02); the projections that write into the residual stream (o_proj, down_proj)
        scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth."""
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        for name in ("o_proj", "down_proj"):
            if hasattr(m, name):
                nn.init.normal_(getattr(m, name).weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, seg_ids: Tensor | None = None,
                cache: KVCache | None = None, positions: Tensor | None = None, reduction: str = "mean",
                regions: Regions | None = None) -> Tensor:
        """idx (B, T) -> logits (B, T, V) in fp32, or with ``targets`` (B, T) the loss (``reduction``
        ``mean``: a scalar over non-ignored targets; ``none``: (B, T), 0 where the target is -1).

        ``seg_ids`` (B, T): document of each token (``segment_ids``); positions restart per document and
        attention stays inside it. ``cache``: a ``KVCache``; the tokens are appended at ``cache.pos``.
        ``positions`` (B, T): explicit RoPE positions (default: from ``seg_ids``, or the cache's).
        ``regions``: the callables that run each block and the output head (``compile_regions``); eager by default."""
        B, T = idx.shape
        if cache is None and T > self.cfg.block_size:
            raise MiniLLMError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}; crop it")
        in_table = positions is None and cache is None  # positions restart per document: all < block_size
        if positions is None and (seg_ids is not None or cache is not None):
            positions = default_positions(T, idx.device, seg_ids, cache)  # (B|1, T)
        rope = self.rope(positions, T, in_table)  # cos, sin (B|1, T, 1, D)
        mask = attention_mask(T, idx.device, seg_ids, cache)  # None: plain causal (or one decode step)
        remat = self.cfg.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        run = regions or EAGER
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            if remat:
                x = checkpoint(run.block, block, x, rope, mask, use_reentrant=False)
            else:
                x = run.block(block, x, rope, mask, cache)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return self.lm_head(self.norm_f(x)).float()  # (B, T, V)
        return run.head(self.norm_f, self.lm_head, x, targets, self.cfg, reduction)

    def decode_step(self, idx: Tensor, slot: Tensor, offsets: Tensor, key_valid: Tensor,
                    keys: Tensor, values: Tensor, fused: fused_decode.FusedDecode | None = None) -> Tensor:
        """One new token per row over a static KV cache, with fixed shapes for ``torch.compile`` and CUDA
        graphs: idx (B, 1) goes to the cache slot ``slot`` (a (1,) tensor, not ``cache.pos``), whose rows
        start after ``offsets`` (B,) slots of left padding; every slot is attended to through a mask
        (``key_valid`` (B, S), False at padding, and the slots up to ``slot``). ``keys``/``values``: a
        ``KVCache``'s ``k``/``v`` (L, B, Hkv, S, D). ``fused``: the weights of the fused decode step (fewer
        kernels a layer, ``fused_decode``), or None. -> logits (B, V), as ``forward`` with the cache gives."""
        # a row's position is in the RoPE table (generation slides the context); the clamp keeps finished rows in it
        positions = (slot - offsets).clamp(0, self.cfg.block_size - 1)[:, None]  # (B, 1)
        rope = self.rope(positions, 1, in_table=True)  # cos, sin (B, 1, 1, D)
        visible = key_valid & (torch.arange(keys.size(3), device=idx.device) <= slot)  # (B, S)
        hidden = ~visible[:, None, None, :]  # (B, 1, 1, S): once per step, not a kernel per layer
        x = self.tok_emb(idx)  # (B, 1, C)
        layers = [None] * len(self.blocks) if fused is None else fused_decode.layers(fused, rope, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, rope, hidden, slot, keys[i], values[i], layers[i])
        return self.lm_head(self.norm_f(x)).float()[:, -1]  # (B, V)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, tied weights counted once. ``non_embedding`` leaves out the token embedding and
        the output layer (the V x C matrices)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (``memory.flops_per_token``), N counting every parameter but the input
        embedding lookup's (the output layer's matrix too, when tied)."""
        return flops_per_token(self.cfg, self.num_params(non_embedding=True) + self.lm_head.weight.numel())


def default_positions(T: int, device: torch.device, seg_ids: Tensor | None, cache: KVCache | None) -> Tensor:
    """RoPE positions (B|1, T): restarting per document, continuing the cache (minus each row's left
    padding), or 0..T-1."""
    if seg_ids is not None:
        if cache is not None:
            raise ValueError("seg_ids with a KV cache is not supported; decode one document per row")
        return segment_positions(seg_ids)
    t = torch.arange(T, device=device)[None]  # (1, T)
    if cache is None:
        return t
    t = t + cache.pos
    return t if cache.offsets is None else (t - cache.offsets[:, None]).clamp(min=0)  # (B, T)


def attention_mask(T: int, device: torch.device, seg_ids: Tensor | None, cache: KVCache | None) -> Tensor | None:
    """Boolean mask (B|1, 1, T, S), True = may attend, or None for the plain causal case (and for a single
    decode step without padding, where every cached key is visible).

    Every query always sees itself, so a padding row never has all keys masked (that would give NaN)."""
    if seg_ids is not None:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        same_doc = seg_ids[:, :, None] == seg_ids[:, None, :]  # (B, T, T)
        return (same_doc & causal)[:, None]
    if cache is None or (cache.key_mask is None and (cache.pos == 0 or T == 1)):
        return None
    S = cache.pos + T
    q_at = torch.arange(cache.pos, S, device=device)[:, None]  # (T, 1) slot of each new token
    k_at = torch.arange(S, device=device)[None]  # (1, S)
    mask = (k_at <= q_at)[None, None]  # (1, 1, T, S)
    if cache.key_mask is not None:
        mask = (mask & cache.key_mask[:, None, None, :S]) | (k_at == q_at)  # (B, 1, T, S)
    return mask


# ----------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len`` slots.

    ``pos``: slots filled so far (``GPT.forward`` writes its new tokens at ``pos`` and advances it;
    ``GPT.decode_step`` writes one token per row at the slot it is given and leaves ``pos`` to its caller).
    Batched prompts of different lengths are LEFT-padded; call ``set_left_padding(pad_lens)`` before the
    first forward: padded slots are masked out as keys and each row's RoPE positions start at its first
    real token, so every row decodes exactly as it would alone."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0
        self.key_mask: Tensor | None = None  # (B, max_len) bool, False at padding slots
        self.offsets: Tensor | None = None  # (B,) left padding of each row

    def reset(self) -> None:
        self.pos, self.key_mask, self.offsets = 0, None, None

    def set_left_padding(self, pad_lens: Tensor | list[int]) -> None:
        """Mark the first ``pad_lens[b]`` slots of row b as padding (call while ``pos`` is 0)."""
        pad = torch.as_tensor(pad_lens, device=self.k.device, dtype=torch.long)  # (B,)
        self.offsets = pad
        self.key_mask = torch.arange(self.max_len, device=self.k.device)[None] >= pad[:, None]  # (B, max_len)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values (B, Hkv, T, D) of ``layer`` at ``pos``; return all so far (B, Hkv, S, D)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise MiniLLMError(f"KV cache is full ({self.max_len} slots); crop the context or make a larger cache")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
