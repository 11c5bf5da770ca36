"""Muon for the hidden 2-D weight matrices: Nesterov momentum whose update is orthogonalized by a
Newton-Schulz iteration (Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024).

``torch.optim.Muon`` (torch >= 2.9) updates one matrix at a time: on a GPU that is about a thousand
small kernels per step for a 30M model (measured on an H100: a 64x512 medium step went from ~22 ms
with AdamW to ~63 ms). This version runs the iteration once per shape over all matrices of that shape
stacked (q/k/v/o of every layer together, and so on), in bf16, and works on torch >= 2.6.
Embeddings, the output layer, norms and biases stay on AdamW.
"""

from __future__ import annotations

from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of Keller Jordan's Muon


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to each G[i] (U V^T of its SVD), for a stack
    (N, rows, cols), by ``steps`` Newton-Schulz iterations: in bf16 on a GPU, in fp32 on the CPU (where
    bf16 matmuls are slow)."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon with decoupled weight decay. ``lr`` is scaled per matrix by sqrt(max(1, rows / cols)), as in
    ``torch.optim.Muon``'s default; weight decay multiplies by (1 - lr * weight_decay)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        for g in self.param_groups:
            for p in g["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
            for p in g["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            for (rows, cols), ps in by_shape.items():
                grads = [p.grad for p in ps]
                bufs = []
                for p in ps:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(st["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])  # buf = m * buf + (1 - m) * grad
                upd = torch._foreach_lerp(grads, bufs, g["momentum"]) if g["nesterov"] else bufs
                ortho = orthogonalize(torch.stack(upd), g["ns_steps"])  # (N, rows, cols)
                if g["weight_decay"]:
                    torch._foreach_mul_(ps, 1 - g["lr"] * g["weight_decay"])
                torch._foreach_add_(ps, list(ortho.unbind(0)), alpha=-g["lr"] * max(1.0, rows / cols) ** 0.5)
        return loss
