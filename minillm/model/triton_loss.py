"""The output layer's loss and its gradient in one pass over the logits, for compiled CUDA training steps
(``MINILLM_LOSS=triton``; importing this module imports triton).

The loss is a sum of per-row cross-entropies, so its gradient with respect to the logits is a fixed tensor,
``softmax(logits) - onehot(target)`` (0 on ignored rows), times the scalar that reaches the backward pass. One
Triton program per row (``cross_entropy_grad_``) reads the row once for its log-sum-exp (online: the running max
and sum), writes the row's loss, then reads the row again (from L2: a 32k-vocabulary row is 64 KB) and writes
that gradient over it in place. The plain compiled path reads the logits twice (log-sum-exp in the forward, the
softmax in the backward) and writes the gradient once into a new tensor: at medium's 65k rows x 32k vocabulary
each pass is 4 GB. ``LinearCrossEntropy`` puts the output layer's matrix product around it: its backward is the
two matrix products of the saved gradient, each scaled by the incoming scalar on the small side (N x C, V x C),
so nothing else touches the (N, V) tensor.

The kernel runs in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, fp32): the tests check it there."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -1  # loss.IGNORE_INDEX, written out: importing loss here would close an import cycle

# vocabulary columns per loop iteration, warps a program: the fastest of 4 x 4 measured on an H100 at medium's
# 65k x 32k (scripts/bench_loss.py --sweep: 3.72 ms, 2.26 TB/s of logits read and written; 8 warps 3.96 ms)
BLOCK = 4096
WARPS = 16


@triton.jit
def _cross_entropy_grad(logits_ptr, targets_ptr, losses_ptr, V, stride, IGNORE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Program = one row of logits (N, V): its loss (log-sum-exp - target's logit, fp32; 0 when the target is
    IGNORE) into losses, and d(loss)/d(logits) = softmax - onehot (0 when ignored) over the row, in place."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    running_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):  # per lane: the max and the sum of exp(x - max) so far
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # lanes that saw only padding stay at 0
        running_sum = running_sum * tl.exp(running_max - safe) + tl.exp(x - safe)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    lanes = tl.where(running_max == float("-inf"), 0.0, running_sum * tl.exp(running_max - row_max))
    lse = row_max + tl.log(tl.sum(lanes, axis=0))
    valid = target != IGNORE
    inside_row = valid & (target >= 0) & (target < V)  # a target past the row (corrupt data) reads no other row
    target_logit = tl.load(base + tl.where(inside_row, target, 0)).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    for start in range(0, V, BLOCK):  # the gradient over the row, in place
        c = start + cols
        inside = c < V
        x = tl.load(base + c, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=inside)


@torch.library.triton_op("minillm::cross_entropy_grad_", mutates_args={"logits"})
def cross_entropy_grad_(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy (N,) fp32 of ``logits`` (N, V; contiguous rows) against ``targets`` (N,; -1
    ignored: loss 0), and ``logits`` overwritten with the gradient of the losses' sum (softmax - onehot, 0 on
    ignored rows), in their dtype. A custom op, so ``torch.compile`` keeps it inside its graph."""
    n, v = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    torch.library.wrap_triton(_cross_entropy_grad)[(n,)](logits, targets, losses, v, logits.stride(0),
                                                         IGNORE=IGNORE_INDEX, BLOCK=BLOCK, num_warps=WARPS)
    return losses


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(h @ w.T, targets) (h (N, C), w (V, C), targets (N,), -1 ignored), the
    product in the autocast dtype (or h's), the loss in fp32: ``cross_entropy_grad_`` turns the logits into
    their gradient in the forward pass, and the backward pass only multiplies by it."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor) -> Tensor:
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)
            grad = hc @ wc.T  # (N, V) logits, then (below) their gradient
            losses = torch.ops.minillm.cross_entropy_grad_(grad, targets.contiguous())
        ctx.save_for_backward(grad, hc, wc)
        ctx.dtypes = h.dtype, w.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, scale: Tensor):
        grad, hc, wc = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = ((grad @ wc).float() * scale).to(h_dtype)
        if ctx.needs_input_grad[1]:
            gw = ((grad.T @ hc).float() * scale).to(w_dtype)
        return gh, gw, None


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """The sum of the rows' cross-entropies of ``h @ w.T`` (see ``LinearCrossEntropy``)."""
    return LinearCrossEntropy.apply(h, w, targets)
