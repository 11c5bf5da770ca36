"""The decode step as six Triton kernels a layer, for bf16 decoding on a CUDA GPU, where at batch 1 a step is
bound by its number of kernels (a few microseconds each, even replayed in a CUDA graph), not by the bytes of the
weights. ``GPT.decode_step`` with its fused weights (``fused_decode``) runs ~18 kernels a layer; here each layer is

1. ``qkv``: norm1, the q/k/v projections (one concatenated matrix), QK-norm, RoPE and the attention's scale, the
   keys and values written into the cache at the step's slot, the queries into a buffer;
2. ``attend`` and ``combine``: the one query per row over the cache's visible slots, in blocks of slots side by
   side (softmax in fp32 per block, then the blocks merged: "flash-decoding");
3. ``add_linear``: the output projection summed into the residual stream in place;
4. ``norm_linear`` with ``SWIGLU``: norm2, the gate/up projections (one concatenated matrix), silu(gate) * up;
5. ``add_linear``: the down projection summed into the residual stream;

and the output layer is one ``norm_linear`` (norm_f, lm_head, fp32 logits). ``sample`` is the sampler in two
kernels (``candidates``: the top-k of each block of the vocabulary; ``pick``). The same math as
``GPT.decode_step``, rounded differently: each kernel accumulates in fp32 and rounds once, to the activations'
dtype, where the eager step rounds after every op. Needs ``triton`` (shipped with torch's CUDA wheels on Linux);
``supported`` says when a model can decode this way. The matrix products are ``tl.dot`` over blocks of 16 rows (rows past the batch are
masked), so one program serves batch 1 to 16 rows and the grid covers larger batches. ``BLOCKS``: the block sizes,
measured on an H100 (``scripts/tune_decode.py``; ``MINILLM_DECODE_BLOCKS``, a JSON object, overrides them).

The kernels also run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, fp32), which is how the tests
check their arithmetic on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from torch import Tensor, nn

from minillm.model.fused_decode import FusedDecode

ROWS = 16  # rows of the batch per program, tl.dot's smallest block (triton_kernels.ROWS, the kernels' own)
BLOCKS = {  # per kernel: outputs per program (BLOCK_N) and the reduction's block (BLOCK_K); slots per program
    "qkv_k": 256, "linear_n": 32, "linear_k": 256, "head_n": 128, "head_k": 128, "slots": 64,  # tune_decode.py
    "vocab": 2048, "sample_warps": 16}  # the sampler's: its block of the vocabulary, warps a program
BLOCKS.update(json.loads(os.environ.get("MINILLM_DECODE_BLOCKS", "{}")))  # for scripts/tune_decode.py's trials
sampler_failed: str | None = None  # why ``sample`` failed to build (then ``sampling.fast_sample`` stops trying)


def available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def supported(model: nn.Module, fused: FusedDecode | None, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when ``model`` can decode with these kernels, else why not (a sentence). ``MINILLM_DECODE=torch``
    turns them off (the eager fused step then decodes, as before)."""
    cfg = model.cfg
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter, on the CPU (the tests)
    if os.environ.get("MINILLM_DECODE", "triton") == "torch":
        return "MINILLM_DECODE=torch"
    if device.type != "cuda" and not interpreted:
        return "not a CUDA device"
    if dtype not in (torch.bfloat16, torch.float16) and not interpreted:
        return f"{str(dtype).removeprefix('torch.')} weights (the kernels decode bf16 or fp16)"
    if cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        return f"{cfg.norm} and {cfg.mlp} (the kernels are for rmsnorm and swiglu)"
    D = cfg.head_dim
    if D < 32 or D & (D - 1):
        return f"head_dim {D} (the kernels need a power of two >= 32)"
    if fused is None or any(qkv is None or gate_up is None for qkv, gate_up in fused.layers):
        return "a layer without the concatenated projections (an unmerged LoRA)"
    if any(type(b.attn.o_proj) is not nn.Linear or type(b.mlp.down_proj) is not nn.Linear for b in model.blocks):
        return "an output or down projection that is not a plain nn.Linear (an unmerged LoRA)"
    if cfg.qk_norm and any(not b.attn.q_norm.eps == b.attn.k_norm.eps == b.norm1.eps for b in model.blocks):
        return "QK-norm with another eps than the layer's norm (the kernel takes one)"
    if not available():
        return "triton is not installed"
    return None


def kernels():
    """The Triton kernels (``triton_kernels``), imported on first use: importing triton takes a while, and a CPU
    install may lack it."""
    from minillm.model import triton_kernels

    return triton_kernels


def decode_step(model: nn.Module, fused: FusedDecode, idx: Tensor, slot: Tensor, offsets: Tensor,
                key_valid: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """``GPT.decode_step`` (the same arguments; ``fused``: its concatenated weights, ``StaticDecodeStep``) in six
    kernels a layer and one for the output layer -> logits (B, V) fp32. Every shape is fixed and nothing syncs with
    the host, so a CUDA graph captures it."""
    k = kernels()
    cfg = model.cfg
    B, S = idx.size(0), keys.size(3)
    C, H, HKV, D = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim
    hidden, V = cfg.mlp_hidden, cfg.vocab_size
    rb = -(-B // ROWS)  # row blocks
    x = model.tok_emb(idx[:, 0]).contiguous()  # (B, C): the residual stream, updated in place
    q = torch.empty(B, H * D, dtype=x.dtype, device=x.device)
    y = torch.empty_like(q)
    h = torch.empty(B, hidden, dtype=x.dtype, device=x.device)
    valid = key_valid.view(torch.uint8)
    cos, sin = model.rope.cos, model.rope.sin  # (T, D) fp32
    bs = BLOCKS["slots"]
    NS = -(-S // bs)  # blocks of slots
    m = torch.empty(B, H, NS, dtype=torch.float32, device=x.device)
    den = torch.empty_like(m)
    acc = torch.empty(B, H, NS, D, dtype=torch.float32, device=x.device)
    bn, bk = BLOCKS["linear_n"], BLOCKS["linear_k"]
    for i, block in enumerate(model.blocks):
        a, mlp = block.attn, block.mlp
        (w_qkv, b_qkv), (w_gu, b_gu) = fused.layers[i]
        qn = a.q_norm.weight if cfg.qk_norm else w_qkv
        kn = a.k_norm.weight if cfg.qk_norm else w_qkv
        k.qkv[(rb, H + 2 * HKV)](
            x, block.norm1.weight, w_qkv, _or(b_qkv, w_qkv), qn, kn, cos, sin, slot, offsets, q, keys[i], values[i],
            B, C, S, cos.size(0), block.norm1.eps, SCALE=D ** -0.5,
            H=H, HKV=HKV, D=D, HAS_BIAS=b_qkv is not None, QK_NORM=cfg.qk_norm, BLOCK_K=BLOCKS["qkv_k"])
        k.attend[(B, H, NS)](q, keys[i], values[i], valid, slot, m, den, acc, S, NS, H=H, HKV=HKV, D=D, BLOCK_S=bs)
        k.combine[(B, H)](m, den, acc, slot, y, NS, H=H, D=D, BLOCK_S=bs, NSP=k.next_power_of_2(NS))
        _add_linear(k, y, a.o_proj, x, rb, bn, bk)
        k.norm_linear[(rb, -(-hidden // bn))](
            x, block.norm2.weight, w_gu, _or(b_gu, w_gu), h, B, C, hidden, block.norm2.eps,
            SWIGLU=True, HAS_BIAS=b_gu is not None, BLOCK_N=bn, BLOCK_K=bk)
        _add_linear(k, h, mlp.down_proj, x, rb, bn, bk)
    logits = torch.empty(B, V, dtype=torch.float32, device=x.device)
    bh = BLOCKS["head_n"]
    k.norm_linear[(rb, -(-V // bh))](
        x, model.norm_f.weight, model.lm_head.weight, model.lm_head.weight, logits, B, C, V, model.norm_f.eps,
        SWIGLU=False, HAS_BIAS=False, BLOCK_N=bh, BLOCK_K=BLOCKS["head_k"])
    return logits


def _add_linear(k, y: Tensor, proj: nn.Linear, x: Tensor, rb: int, bn: int, bk: int) -> None:
    N, K = proj.weight.shape
    k.add_linear[(rb, -(-N // bn))](y, proj.weight, _or(proj.bias, proj.weight), x, x.size(0), K, N,
                                    HAS_BIAS=proj.bias is not None, BLOCK_N=bn, BLOCK_K=bk)


def _or(t: Tensor | None, other: Tensor) -> Tensor:
    """A pointer for a kernel argument its flag leaves unread."""
    return other if t is None else t


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
           seen: Tensor | None, noise: Tensor, unsure: Tensor, candidates: int, record: tuple | None = None) -> Tensor:
    """``sampling.sample_next_token`` with temperature > 0 and 0 < top_k < V in two kernels: ``candidates`` (the
    penalty and the temperature, then the largest ``candidates`` (top_k and a margin) of each block of the
    vocabulary) and ``pick`` (the largest of those, top-k with its ties, top-p, the draw with ``noise``). The same
    distribution, random numbers and order of ties (by token) as ``sample_next_token``, rounded differently. Where
    every candidate past the k-th ties with it, ``unsure`` (B,) bool is set (the caller redoes the step exactly).
    ``record``: (out (B, K), i (1,), done (B,) bool, stop_id or None, pad): ``pick`` also does a ``StepChunk`` step's
    bookkeeping (``decoder.TokenStep``): the token into out[:, i] (``pad`` where done), done at ``stop_id``, the
    token marked in ``seen`` (with the penalty), saving five kernels a token."""
    k = kernels()
    B, V = logits.shape
    n = min(V, candidates)
    kp = k.next_power_of_2(n)  # candidates kept per block
    block = max(kp, min(BLOCKS["vocab"], k.next_power_of_2(V)))
    nb = -(-V // block)
    cand = torch.empty(B, nb * kp, dtype=torch.int64, device=logits.device)
    has_seen = seen is not None and repetition_penalty != 1.0
    warps = BLOCKS["sample_warps"]
    k.candidates[(B, nb)](logits, seen.view(torch.uint8) if has_seen else logits, cand, V, repetition_penalty,
                          temperature, HAS_SEEN=has_seen, BLOCK=block, KP=kp, num_warps=warps)
    token = torch.empty(B, dtype=torch.long, device=logits.device)
    out, i, done, stop_id, pad = record or (token, token, unsure, None, 0)
    k.pick[(B,)](cand, noise, token, unsure.view(torch.uint8), V, n, nb * kp, top_k, top_p, out, i,
                 done.view(torch.uint8), seen.view(torch.uint8) if has_seen else token, -1 if stop_id is None else stop_id,
                 pad, out.size(-1), int(record is not None), int(stop_id is not None), int(record is not None and has_seen),
                 TOP_P=top_p < 1.0, KP=kp, NCP=k.next_power_of_2(nb * kp), num_warps=warps)
    return token
