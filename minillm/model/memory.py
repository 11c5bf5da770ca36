"""What a model costs, from its config alone: parameters, training FLOPs per token, training memory (the
``train --dry-run`` estimate and the memory check before a run), and the memory a device has available."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from minillm.config import ModelConfig


def matrix_params(cfg: ModelConfig) -> int:
    """Elements of the weight matrices: q/k/v/o and the MLP's of every block, and one V x C matrix (the
    embedding, which tied models also use as the output layer)."""
    c, L = cfg, cfg.n_layer
    C, Ckv, Hd = c.n_embd, c.kv_heads * c.head_dim, c.mlp_hidden
    return L * (2 * C * C + 2 * C * Ckv + (3 if c.mlp == "swiglu" else 2) * C * Hd) + c.vocab_size * C


def param_count(cfg: ModelConfig) -> int:
    """Parameters of ``GPT(cfg)``, tied weights counted once; biases (``bias = true``) are left out, so it
    is a lower bound there and exact otherwise."""
    c = cfg
    return (matrix_params(c) + c.n_layer * 2 * c.n_embd + c.n_embd + (c.n_layer * 2 * c.head_dim if c.qk_norm else 0)
            + (0 if c.tie_embeddings else c.vocab_size * c.n_embd))


def flops_per_token(cfg: ModelConfig, multiplied: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T, N = ``multiplied`` (the parameters that
    are multiplied: every one but the input embedding lookup's), T = block_size."""
    return 6.0 * multiplied + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


def estimate_memory(cfg: ModelConfig, batch_size: int, precision: str = "bf16", optimizer: str = "adamw") -> dict[str, int]:
    """Rough training memory in bytes of eager PyTorch (torch.compile usually keeps less): fp32 weights,
    fp32 gradients, AdamW's two fp32 moments (Muon keeps one for the hidden matrices), and the activations
    saved for backward.

    Per token and layer (fused attention, so no T x T term): each norm keeps its fp32 input and
    normalized copy (4·C fp32); then 8·C + 2·Ckv + 4·hidden values (GELU: 2·hidden) in the compute dtype:
    the normed input once per projection it feeds (autocast casts it per call), q, the attention output
    and its reshaped copy, k, v, and the MLP's intermediates. Autocast also keeps a bf16 copy of every
    weight. In fp32 there are no casts and the 8·C + ... values are the whole count. The output layer keeps
    the fp32 logits (only ``loss_chunk`` rows at a time when set) and backward adds their gradient. With
    gradient checkpointing each block keeps only its input, plus one block recomputed at a time. Calibrated
    against the bytes autograd saves (saved_tensors_hooks, CPU, torch 2.13): 2-8% above them for the small
    and medium shapes, bf16 and fp32."""
    act = 2 if precision in ("bf16", "fp16") else 4
    c, L = cfg, cfg.n_layer
    C, Ckv, Hd = c.n_embd, c.kv_heads * c.head_dim, c.mlp_hidden
    matrices, n_params = matrix_params(c), param_count(c)
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


def background_compile_room(est: dict[str, int]) -> int:
    """Bytes a single-GPU ``--compile auto`` run needs to compile in the background (``estimate_memory``'s
    figures): room for a second copy of the model's step beside the run's own, the optimizer state once."""
    return 2 * (est["params"] + est["grads"] + est["activations"]) + est["optimizer"]


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
