"""The loss of the output layer: cross-entropy of ``h @ w.T`` over the vocabulary, in fp32, ignoring targets -1.

Two paths, picked by ``output_loss`` (and a third on CUDA, below):

- **plain** (the default): the (N, V) logits, then ``F.cross_entropy``;
- **fused** (``linear_cross_entropy``): the output layer and the loss a chunk of rows at a time, the gradient
  computed during the forward pass, so the (N, V) logits never exist at once. One computation, two
  implementations: liger-kernel's Triton kernel where it can run (``loss_kernel = "liger"``, CUDA, the
  ``kernels`` extra installed, a training step) and chunked PyTorch everywhere else.

A compiled training step on CUDA takes a third path, ``triton_loss`` (``MINILLM_LOSS=triton``, CUDA's default
when triton imports): the output layer, then one Triton kernel that writes each row's loss and turns its logits
into their gradient in place, reading the (N, V) logits from memory once where the plain path reads them twice
and writes a new tensor.

The fused path is taken for training steps with ``loss_kernel = "liger"`` on CUDA, and with the TOML key
``loss_chunk`` > 0 (its rows per chunk, for either implementation; only a per-token loss with a gradient,
which the fused path does not give, stays plain), and for every training step run eagerly on a GPU
(``eager_on_gpu``: there the plain path's fp32 arithmetic is a dozen passes over the whole logits).
``loss_kernel`` is a choice of kernel, never of weights: where liger cannot run (the CPU, evaluation) the loss
is exactly what it is with ``loss_kernel = "torch"``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.config import ModelConfig

IGNORE_INDEX = -1  # targets with this value add no loss
TRITON_LOSS = False  # compiled CUDA training steps take ``triton_loss`` (``train.step.apply_model_levers`` sets it)
LIGER_CHUNK_ROWS = 4096  # rows per chunk of the fused path unless loss_chunk says (256 MB of bf16 logits at 32k vocabulary)


def output_loss(h: Tensor, head: nn.Linear, targets: Tensor, cfg: ModelConfig, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the output layer ``head`` applied to ``h`` (B, T, C) against ``targets`` (B, T):
    ``mean`` over the non-ignored targets (a scalar, 0 when all are ignored), or ``none`` (B, T), 0 where
    the target is -1."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B, T, C = h.shape
    kernel = _liger_for(cfg, h, reduction)
    if kernel is None and cfg.loss_chunk == 0 and takes_triton(h, reduction):
        from minillm.model import triton_loss

        total = triton_loss.linear_cross_entropy(h.reshape(B * T, C), head.weight, targets.reshape(-1))
        return per_target(total, targets)
    if (kernel is not None or (cfg.loss_chunk > 0 and not (reduction == "none" and torch.is_grad_enabled()))
            or eager_on_gpu(h, reduction)):
        losses = linear_cross_entropy(h.reshape(B * T, C), head.weight, targets.reshape(-1),
                                      cfg.loss_chunk or LIGER_CHUNK_ROWS, reduction, kernel)
    else:
        logits = head(h)  # (B, T, V), bf16/fp16 under autocast
        losses = cross_entropy(logits.view(B * T, -1), targets.reshape(-1))  # (B*T,)
        if reduction == "mean":
            losses = per_target(losses.sum(), targets)
    return losses if reduction == "mean" else losses.view(B, T)


def per_target(total: Tensor, targets: Tensor) -> Tensor:
    """A sum of per-target losses as their mean over the targets that are not ignored (0 when all are)."""
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def eager_on_gpu(h: Tensor, reduction: str) -> bool:
    """A training step's loss on a GPU outside ``torch.compile`` (``--compile off``, or the first steps while
    ``--compile auto`` compiles in the background): the fused path, a chunk of rows at a time. Eagerly, the plain
    path's fp32 arithmetic over the whole (N, V) logits is a dozen separate kernels, each reading or writing
    gigabytes (the medium preset: 32k rows x 32k vocabulary); compiled, inductor fuses those into two, and the
    plain path stays. The same loss either way (fp32 arithmetic over bf16 logits; ``tests/test_loss.py``)."""
    return h.is_cuda and reduction == "mean" and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def takes_triton(h: Tensor, reduction: str) -> bool:
    """A training step's loss inside ``torch.compile`` on CUDA with ``TRITON_LOSS`` on: ``triton_loss``'s one
    pass over the logits (the mean with a gradient only; evaluation and per-token losses stay plain)."""
    return (TRITON_LOSS and h.is_cuda and reduction == "mean" and torch.is_grad_enabled()
            and torch.compiler.is_compiling())


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy (N,) of ``logits`` (N, V) in fp32 arithmetic, 0 where the target is -1: through
    ``F.cross_entropy`` for fp32 logits, through ``_LowPrecisionCrossEntropy`` for bf16/fp16 ones."""
    if logits.dtype in (torch.float32, torch.float64):
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return _LowPrecisionCrossEntropy.apply(logits, targets)


class _LowPrecisionCrossEntropy(torch.autograd.Function):
    """Cross-entropy of bf16/fp16 logits in fp32 arithmetic that keeps for the backward pass the logits as they
    are (2 bytes a value) and the log-sum-exp of each row, and recomputes the softmax there.

    ``F.cross_entropy(logits.float())`` keeps the fp32 log-softmax (4 bytes a value): at 65k tokens x 32k
    vocabulary that is 8.4 GB written in the forward and read in the backward, the largest memory traffic
    of a small model's step. Under ``torch.compile`` the forward here is one reduction over the logits and
    the backward one elementwise kernel (docs/BENCHMARKS.md, issue 20)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # (N, V), (N,) -> (N,)
        lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lse = torch.logsumexp(lf, dim=-1)  # (N,)
        valid = targets != IGNORE_INDEX
        target_logit = lf.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        ctx.save_for_backward(logits, lse, targets)
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (N,)
        logits, lse, targets = ctx.saved_tensors
        vocab = torch.arange(logits.size(1), device=logits.device)
        onehot = vocab[None, :] == targets[:, None]  # (N, V); all False where the target is -1
        scale = (grad * (targets != IGNORE_INDEX))[:, None]  # (N, 1)
        d = (torch.exp(logits.to(lse.dtype) - lse[:, None]) - onehot.to(lse.dtype)) * scale
        return d.to(logits.dtype), None


# ------------------------------------------------------------------------------------- the fused path


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk: int, reduction: str = "mean",
                         kernel: Callable | None = None) -> Tensor:
    """Cross-entropy of ``h @ w.T`` (h (N, C), w (V, C), targets (N,), -1 ignored), ``chunk`` rows at a
    time, without ever materializing the (N, V) logits: ``mean`` over non-ignored rows, or ``none`` -> (N,)
    (no gradient). ``kernel``: liger's function (``liger_kernel()``, a mean with a gradient on CUDA), else
    chunked PyTorch."""
    if kernel is not None:
        return _liger_eagerly()(h, w, targets, chunk, kernel)
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
    return per_target(total, targets)


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
                # each line one pass over the (n, V) chunk: the log-softmax in ``acc`` straight from the product
                logp = torch.log_softmax(hc @ wc.T, dim=-1, dtype=acc)  # (n, V)
                valid = tc != IGNORE_INDEX
                tgt = tc.clamp(min=0)[:, None]
                total -= (logp.gather(1, tgt).squeeze(1) * valid).sum()
                if need_grad:
                    g = logp.exp_()  # softmax, in place
                    g.scatter_add_(1, tgt, -torch.ones_like(tgt, dtype=g.dtype))
                    # d(sum of losses)/d(logits): zero on ignored rows, cast to the matmul dtype in the same pass
                    g = torch.mul(g, valid[:, None].to(acc), out=torch.empty(g.shape, dtype=dtype, device=g.device))
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


# ------------------------------------------------------------------------------------------- liger


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


def _liger_for(cfg: ModelConfig, h: Tensor, reduction: str) -> Callable | None:
    """liger's function when ``loss_kernel = "liger"`` runs this call: a training step (a gradient, the
    mean) on CUDA with the extra installed (``train`` refuses a CUDA run without it up front)."""
    if cfg.loss_kernel == "liger" and h.is_cuda and reduction == "mean" and torch.is_grad_enabled():
        return liger_kernel()
    return None


@functools.cache  # wrapped on first use: torch.compiler.disable imports TorchDynamo, seconds an uncompiled start skips
def _liger_eagerly() -> Callable:
    """``_liger_linear_cross_entropy`` run eagerly between compiled graphs (a Triton kernel with a host sync inside)."""
    return torch.compiler.disable(_liger_linear_cross_entropy)


def _liger_linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, rows: int, fn: Callable) -> Tensor:
    """Mean cross-entropy of ``h @ w.T`` over non-ignored targets through liger's fused Triton kernel
    (``fn``), in chunks of about ``rows`` rows."""
    n, c = h.shape
    # liger sizes its chunks to about N*C logits (chunk_mem_const = 1): a 1,024-row chunk at C = 256, V = 32k.
    # Ask for ~rows rows per chunk instead: fewer, fuller matrix products.
    mem_const = max(1, math.ceil(w.shape[0] * rows / (c * max(1, n))))
    return fn(h, w, targets, ignore_index=IGNORE_INDEX, reduction="mean", chunk_mem_const=mem_const)
