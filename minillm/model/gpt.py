"""The transformer: a Llama-style decoder (pre-norm RMSNorm, RoPE, SwiGLU, no biases) that can also be
built GPT-2 style (LayerNorm, GELU), with grouped-query attention, optional QK-norm, tied embeddings,
gradient checkpointing, document masking and a KV cache kept outside the module.

Read top to bottom: norms and RoPE, attention, MLP, the block, the model, the loss, the KV cache,
and the memory estimate used by ``train --dry-run`` and by the memory check before a run.

Module names match Hugging Face's Llama/Qwen3 layout one to one (``attn.q_proj`` ~ ``self_attn.q_proj``,
``mlp.gate_proj``, ``norm1`` ~ ``input_layernorm``, ...), and RoPE uses the rotate-half convention, so
export is a renaming of keys.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minillm.config import ModelConfig
from minillm.errors import MiniLLMError

RMS_EPS = 1e-6  # Llama/Qwen3 rms_norm_eps; export writes this value
LN_EPS = 1e-5  # GPT-2 layer_norm_epsilon
IGNORE_INDEX = -1  # targets with this value add no loss
LIGER_CHUNK_ROWS = 4096  # rows of logits per chunk with loss_kernel = "liger" (256 MB of bf16 at 32k vocabulary)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=LN_EPS, bias=cfg.bias)
    return nn.RMSNorm(dim, eps=RMS_EPS)


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_EPS) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_EPS) if cfg.qk_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)), *rope)  # (B, T, H, D)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)), *rope)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, Hkv, D)
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

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.dropout(self.down_proj(h))


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
                cache: KVCache | None = None, positions: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """idx (B, T) -> logits (B, T, V) in fp32, or with ``targets`` (B, T) the loss (``reduction``
        ``mean``: a scalar over non-ignored targets; ``none``: (B, T), 0 where the target is -1).

        ``seg_ids`` (B, T): document of each token (``segment_ids``); positions restart per document and
        attention stays inside it. ``cache``: a ``KVCache``; the tokens are appended at ``cache.pos``.
        ``positions`` (B, T): explicit RoPE positions (default: from ``seg_ids``, or the cache's)."""
        B, T = idx.shape
        if cache is None and T > self.cfg.block_size:
            raise MiniLLMError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}; crop it")
        in_table = positions is None and cache is None  # positions restart per document: all < block_size
        if positions is None and (seg_ids is not None or cache is not None):
            positions = default_positions(T, idx.device, seg_ids, cache)  # (B|1, T)
        rope = self.rope(positions, T, in_table)  # cos, sin (B|1, T, 1, D)
        mask = attention_mask(T, idx.device, seg_ids, cache)  # None: plain causal (or one decode step)
        remat = self.cfg.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            if remat:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.pos += T
        h = self.norm_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(h).float()  # (B, T, V)
        return self._loss(h, targets, reduction)

    def _loss(self, h: Tensor, targets: Tensor, reduction: str) -> Tensor:
        """Cross-entropy of the output layer applied to ``h`` (B, T, C), in fp32, ignoring targets -1.

        With ``cfg.loss_chunk`` > 0, the output layer and the loss run over that many rows at a time and
        never hold the full (B*T, V) logits (``linear_cross_entropy``); otherwise the plain path."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        B, T, C = h.shape
        chunk = self.cfg.loss_chunk
        fused = (self.cfg.loss_kernel == "liger" and h.is_cuda and reduction == "mean" and torch.is_grad_enabled()
                 and liger_kernel())  # without the extra installed: the PyTorch path (train refuses it up front)
        if fused:
            return liger_linear_cross_entropy(h.reshape(B * T, C), self.lm_head.weight, targets.reshape(-1), fused)
        if chunk > 0 and not (reduction == "none" and torch.is_grad_enabled()):
            losses = linear_cross_entropy(h.reshape(B * T, C), self.lm_head.weight, targets.reshape(-1),
                                          chunk, reduction)
        else:
            logits = self.lm_head(h).float()  # (B, T, V)
            losses = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                     reduction="none")  # (B*T,)
            if reduction == "mean":
                losses = losses.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return losses if reduction == "mean" else losses.view(B, T)

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
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T, N counting every matrix that is
        multiplied (the output layer, but not the input embedding lookup), T = block_size."""
        c = self.cfg
        n = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        return 6.0 * n + 12.0 * c.n_layer * c.n_head * c.head_dim * c.block_size


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


# --------------------------------------------------------------------------------------------- loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(h @ w.T, targets), computed ``chunk`` rows at a time.

    Because the result is a sum (its gradient is a scalar times a fixed tensor), the gradients are
    computed during the forward pass chunk by chunk and only scaled in backward: no (N, V) tensor ever
    exists and no matmul is recomputed."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, chunk: int) -> Tensor:  # h (N, C), w (V, C)
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        acc = torch.promote_types(dtype, torch.float32)  # fp32 (fp64 stays fp64)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            wc = w.to(dtype)
            total = torch.zeros((), dtype=acc, device=h.device)
            gh = torch.empty_like(h) if need_grad else None
            gw = torch.zeros_like(w, dtype=acc) if need_grad else None
            for s in range(0, h.size(0), chunk):
                hc, tc = h[s:s + chunk].to(dtype), targets[s:s + chunk]
                logits = (hc @ wc.T).to(acc)  # (n, V)
                valid = tc != IGNORE_INDEX
                tgt = tc.clamp(min=0)[:, None]
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                total += ((lse - logits.gather(1, tgt).squeeze(1)) * valid).sum()
                if need_grad:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    g.scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=g.dtype))
                    g = (g * valid[:, None]).to(dtype)  # (n, V) d(sum of losses)/d(logits)
                    gh[s:s + chunk] = g @ wc
                    gw += (g.T @ hc).to(acc)
        ctx.save_for_backward(gh, gw.to(w.dtype) if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        gh, gw = ctx.saved_tensors
        gh = gh * grad.to(gh.dtype) if ctx.needs_input_grad[0] else None
        gw = gw * grad if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk: int, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``h @ w.T`` (h (N, C), w (V, C), targets (N,), -1 ignored) without ever
    materializing the (N, V) logits: ``mean`` over non-ignored rows, or ``none`` -> (N,) (no gradient)."""
    if reduction == "none":
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            raise ValueError("linear_cross_entropy: reduction='none' is for evaluation (no gradient)")
        out = []
        for s in range(0, h.size(0), chunk):
            logits = h[s:s + chunk] @ w.T  # (n, V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            out.append(F.cross_entropy(logits, targets[s:s + chunk], ignore_index=IGNORE_INDEX, reduction="none"))
        return torch.cat(out)
    total = _LinearCrossEntropy.apply(h, w, targets, chunk)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


@functools.cache  # looked up once: the loss asks on every training step
def liger_kernel():
    """liger-kernel's fused linear + cross-entropy function, or None when the optional extra is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def liger_problem(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why ``loss_kernel = "liger"`` cannot run as asked on ``device`` (None when it can, or is not asked for)."""
    if cfg.loss_kernel == "liger" and device.type == "cuda" and liger_kernel() is None:
        return ("--loss-kernel liger needs liger-kernel: pip install 'minillm[kernels]', "
                "or pass --loss-kernel torch (the weights are the same either way)")
    return None


@torch.compiler.disable  # a Triton kernel with a host sync inside: run it eagerly, between compiled graphs
def liger_linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, fn) -> Tensor:
    """Mean cross-entropy of ``h @ w.T`` over non-ignored targets through liger-kernel's fused Triton
    kernel (``loss_kernel = "liger"``): the logits exist a chunk of rows at a time and the gradients are
    computed in the forward pass. ``fn``: ``liger_kernel()``. Training on CUDA only; evaluation and the CPU
    take the PyTorch path."""
    n, c = h.shape
    # liger sizes its chunks to about N*C logits (chunk_mem_const = 1): a 1,024-row chunk at C = 256, V = 32k.
    # Ask for ~LIGER_CHUNK_ROWS rows per chunk instead: fewer, fuller matrix products.
    mem_const = max(1, math.ceil(w.shape[0] * LIGER_CHUNK_ROWS / (c * max(1, n))))
    return fn(h, w, targets, ignore_index=IGNORE_INDEX, reduction="mean", chunk_mem_const=mem_const)


# ----------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len`` slots.

    ``pos``: slots filled so far (``GPT.forward`` writes its new tokens at ``pos`` and advances it).
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


# ------------------------------------------------------------------------------------ memory estimate


def estimate_memory(cfg: ModelConfig, batch_size: int, precision: str = "bf16", optimizer: str = "adamw") -> dict[str, int]:
    """Rough training memory in bytes of eager PyTorch (torch.compile usually keeps less): fp32 weights,
    fp32 gradients, AdamW's two fp32 moments (Muon keeps one for the hidden matrices), and the activations
    saved for backward.

    Per token and layer (fused attention, so no T x T term): each norm keeps its fp32 input and
    normalized copy (4·C fp32); then 8·C + 2·Ckv + 4·hidden values (GELU: 2·hidden) in the compute dtype:
    the normed input once per projection it feeds (autocast casts it per call), q, the attention output
    and its reshaped copy, k, v, and the MLP's intermediates. Autocast also keeps a bf16 copy of every
    weight. In fp32 there are no casts and the 8·C + ... values are the whole count. The output layer keeps the fp32 logits (only ``loss_chunk`` rows at a time when set) and
    backward adds their gradient. With gradient checkpointing each block keeps only its input, plus one
    block recomputed at a time. Calibrated against the bytes autograd saves (saved_tensors_hooks, CPU,
    torch 2.13): 2-8% above them for the small and medium shapes, bf16 and fp32."""
    act = 2 if precision in ("bf16", "fp16") else 4
    c, L = cfg, cfg.n_layer
    C, Ckv, Hd = c.n_embd, c.kv_heads * c.head_dim, c.mlp_hidden
    matrices = L * (2 * C * C + 2 * C * Ckv + (3 if c.mlp == "swiglu" else 2) * C * Hd) + c.vocab_size * C
    n_params = (matrices + L * 2 * C + C + (L * 2 * c.head_dim if c.qk_norm else 0)
                + (0 if c.tie_embeddings else c.vocab_size * C))
    tokens = batch_size * c.block_size
    saved = 8 * C + 2 * Ckv + (4 if c.mlp == "swiglu" else 2) * Hd
    per_layer = 4 * 4 * C + act * saved if act == 2 else 4 * saved  # bytes per token (fp32: no cast copies)
    rows = min(c.loss_chunk, tokens) if c.loss_chunk > 0 else tokens
    head = tokens * (8 + act) * C + rows * c.vocab_size * (4 + 4 + act)  # final norm; fp32 logits and grads
    blocks = tokens * (L * 4 * C + per_layer) if c.gradient_checkpointing else tokens * L * per_layer
    weight_copies = 2 * matrices if act == 2 else 0
    hidden = matrices - c.vocab_size * C  # Muon's matrices: one moment instead of two
    out = {"params": 4 * n_params, "grads": 4 * n_params,
           "optimizer": 8 * n_params - (4 * hidden if optimizer == "muon" else 0),
           "activations": blocks + head + weight_copies}
    out["total"] = sum(out.values())
    return out


def available_memory(device: torch.device) -> int | None:
    """Bytes a run on ``device`` can use: the GPU's free memory, or the host's available memory (capped by a
    cgroup v2 limit); None when unknown (no check is made)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _host_memory() if device.type == "cpu" else None


def _host_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo (else the free pages), capped by a cgroup v2 limit less its use."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        avail = _stat_value(Path("/proc/meminfo"), "MemAvailable:") * 1024
    if avail is None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cg = Path("/sys/fs/cgroup")
    with contextlib.suppress(OSError, ValueError):
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":  # the page cache (inactive_file) is reclaimable
            free = int(limit) - int((cg / "memory.current").read_text()) + _stat_value(cg / "memory.stat", "inactive_file ")
            avail = free if avail is None else min(avail, free)
    return avail


def _stat_value(path: Path, key: str) -> int:
    """The number after ``key`` in a file of ``key value`` lines (/proc/meminfo, memory.stat)."""
    for line in path.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise ValueError(f"no {key} in {path}")
