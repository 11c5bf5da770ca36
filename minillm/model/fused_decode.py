"""The fused decode step: ``GPT.decode_step``'s layers in fewer kernels, for bf16 decoding on a GPU, where at
batch 1 a step is bound by the number of kernels (one per op, a few microseconds each, even in a CUDA graph).
The same math as ``Attention.decode`` and ``MLP``, rounded differently:

- the q/k/v projections in one matrix product, SwiGLU's gate/up projections in another (concatenated copies
  of their weights, which ``minillm.generation.static.StaticDecodeStep`` makes and keeps equal to the model's);
- QK-norm's weights, RoPE and the attention's scale folded into tables made once per step for every layer
  (``qk_rope_weights``, ``layers``), so that the queries and keys take one norm without weight, a multiply, a
  roll and an ``addcmul`` together (``project``);
- the attention's scores and softmax in the activations' dtype (the softmax kernel accumulates in fp32);
- the output and down projections summed into the residual stream by their matrix products (``add_product``).

``Block.decode`` runs a layer through ``attention`` and ``feed_forward`` when given its ``FusedLayer``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Linear = tuple[Tensor, Tensor | None]  # a weight and its bias (or None)


class FusedDecode(NamedTuple):
    """What ``GPT.decode_step`` decodes with in fewer kernels. ``layers``: per layer the q/k/v projections'
    weight and bias concatenated, and the SwiGLU gate/up projections' (None for GELU); either None where those are
    not plain ``nn.Linear`` (an unmerged LoRA: that layer decodes unfused). ``qk_rope_weights``: the RoPE tables'
    factors of every layer, two (L, H + Hkv, D) tensors (``qk_rope_weights``)."""

    layers: Sequence[tuple[Linear | None, Linear | None]]
    qk_rope_weights: tuple[Tensor, Tensor]


class FusedLayer(NamedTuple):
    """One layer's share of a ``FusedDecode`` in one step: its concatenated projections and this step's RoPE tables
    for its queries and keys, each (B, 1, H + Hkv, D) (``project``)."""

    qkv: Linear | None
    gate_up: Linear | None
    qk_rope: tuple[Tensor, Tensor]


def qk_rope_weights(model: nn.Module) -> tuple[Tensor, Tensor]:
    """The factors by which ``layers`` multiplies RoPE's cos and sin, every layer's stacked: two (L, H + Hkv, D)
    tensors. Per query head the QK-norm weight times the attention's scale D^-0.5 (q.k s = (s q).k, and RoPE is
    linear), per key head the QK-norm weight (without QK-norm: the scale, and 1); then those rolled by D/2, their
    first half negated (``rotate_half``; see ``project``). In fp32 at least, so that the step's product with cos and
    sin rounds once, to the activations' dtype. ``model``: a ``GPT``."""
    w_cos, w_sin = [], []
    with torch.no_grad():
        for block in model.blocks:
            a = block.attn
            H, Hkv, D = a.n_head, a.n_kv, a.head_dim
            like = a.k_proj.weight
            dtype = torch.promote_types(like.dtype, torch.float32)
            if a.cfg.qk_norm:
                wq, wk = a.q_norm.weight.to(dtype), a.k_norm.weight.to(dtype)
            else:
                wq = wk = torch.ones(D, dtype=dtype, device=like.device)
            w = torch.cat([(wq * D ** -0.5).expand(H, D), wk.expand(Hkv, D)])  # (H + Hkv, D)
            sign = torch.ones(D, dtype=dtype, device=like.device)
            sign[:D // 2] = -1
            w_cos.append(w)
            w_sin.append(w.roll(D // 2, dims=-1) * sign)
    return torch.stack(w_cos), torch.stack(w_sin)


def layers(fused: FusedDecode, rope: tuple[Tensor, Tensor], dtype: torch.dtype) -> list[FusedLayer]:
    """Each layer's ``FusedLayer`` for this step: RoPE's cos and sin (B, 1, 1, D) times every layer's factors,
    (L, B, 1, H + Hkv, D) each in the activations' ``dtype``. Four kernels a step, for every layer together."""
    cos, sin = ((w[:, None, None] * t).to(dtype) for w, t in zip(fused.qk_rope_weights, rope, strict=True))
    return [FusedLayer(qkv, gate_up, (cos[i], sin[i])) for i, (qkv, gate_up) in enumerate(fused.layers)]


def project(attn: nn.Module, x: Tensor, qkv: Linear, qk_rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``Attention.project`` of ``attn`` in fewer kernels: queries (B, T, H, D) already multiplied by the attention's
    scale, keys and values (B, T, Hkv, D) of ``x`` (B, T, C). ``qkv``: the concatenated projection, one matrix
    product instead of three. ``qk_rope``: this step's tables (``layers``), each (B, T, H + Hkv, D).

    QK-norm's weight w and RoPE are both elementwise: with n the norm without its weight,
    rope(n w) = n (w cos) + rotate_half(n w) sin, and rotate_half(y) = roll(y, D/2) sign (sign -1 on the first
    half), so rope(n w) = n (w cos) + roll(n, D/2) (roll(w, D/2) sign sin), the bracketed factors the tables. The
    queries and keys lie side by side in the product's output and go through it together."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_head, attn.n_kv, attn.head_dim
    out = F.linear(x, *qkv)  # (B, T, (H + 2 Hkv) D)
    qk = out[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)
    if attn.cfg.qk_norm:
        qk = F.rms_norm(qk, (D,), eps=attn.q_norm.eps)  # the weights are in the tables
    cos, sin = qk_rope
    q, k = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin).split([H, Hkv], dim=2)
    return q, k, out[..., (H + Hkv) * D:].view(B, T, Hkv, D)


def attention(attn: nn.Module, x: Tensor, residual: Tensor, layer: FusedLayer, hidden: Tensor, slot: Tensor,
              keys: Tensor, values: Tensor) -> Tensor:
    """``residual + attn.decode(x, ...)`` (``Attention.decode``, the same arguments) in fewer kernels: ``project``,
    the scale already in the queries, the scores and softmax in the activations' dtype (the cache's too), and the
    output projection summed into ``residual`` by its product (``add_product``: ``residual`` updated in place)."""
    B = x.size(0)
    q, k, v = project(attn, x, layer.qkv, layer.qk_rope)  # (B, 1, H|Hkv, D)
    keys.index_copy_(2, slot, k.transpose(1, 2))
    values.index_copy_(2, slot, v.transpose(1, 2))
    q = q.view(B, attn.n_kv, attn.n_head // attn.n_kv, attn.head_dim)  # (B, Hkv, G, D): G heads per kv head
    scores = (q @ keys.transpose(-1, -2)).masked_fill(hidden, float("-inf"))  # (B, Hkv, G, S)
    y = torch.softmax(scores, dim=-1) @ values  # (B, Hkv, G, D)
    return add_product(residual, y.reshape(B, 1, attn.n_head * attn.head_dim), attn.o_proj)


def feed_forward(mlp: nn.Module, x: Tensor, residual: Tensor, gate_up: Linear | None) -> Tensor:
    """``residual + mlp(x, gate_up)`` (``MLP``), down_proj's product summed into ``residual`` (``add_product``:
    updated in place)."""
    if mlp.training and mlp.dropout.p > 0:  # a random mask between the product and the sum
        return residual + mlp(x, gate_up)
    return add_product(residual, mlp.activations(x, gate_up), mlp.down_proj)


def add_product(x: Tensor, y: Tensor, proj: nn.Module) -> Tensor:
    """``x + proj(y)`` for the residual stream, x (B, T, C), y (B, T, K). For a plain ``nn.Linear`` the matrix
    product accumulates into ``x`` itself, updated in place (``addmm_``: one kernel; the out-of-place ``addmm``
    copies its 2-D input into its output first, a kernel more, on CUDA too), then its bias, if any, is added;
    anything else (an unmerged LoRA) as ``x + proj(y)``, a new tensor. Use the one returned."""
    if type(proj) is not nn.Linear:
        return x + proj(y)
    x2 = x.view(-1, x.size(-1))
    x2.addmm_(y.reshape(-1, y.size(-1)), proj.weight.t())
    if proj.bias is not None:
        x2.add_(proj.bias)
    return x
