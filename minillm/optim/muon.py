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


def orthogonalize(G: torch.Tensor, steps: int = 5, fused: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to each G[i] (U V^T of its SVD), for a stack
    (N, rows, cols), by ``steps`` Newton-Schulz iterations in ``dtype``: by default bf16 on a GPU, fp32 on the
    CPU (where bf16 matmuls are slow). ``fused``: each iteration as three batched matmuls (``baddbmm`` folds
    the scalings and sums in) instead of three matmuls and four element-wise kernels."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        if fused:
            X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
        else:
            X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if tall else X).to(G.dtype)


def orthogonalize_all(upd: list[torch.Tensor], steps: int, fused: bool) -> list[torch.Tensor]:
    """``orthogonalize`` of each matrix of ``upd``, those of one shape in one batched iteration; ``fused``: a tall
    matrix joins the wide ones of its transposed shape (the iteration is the same on the transpose), and the
    iteration is ``orthogonalize``'s fused one."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, u in enumerate(upd):
        rows, cols = u.shape
        groups[(min(rows, cols), max(rows, cols)) if fused else (rows, cols)].append(i)
    out: list[torch.Tensor] = [upd[0]] * len(upd)
    for key, idx in groups.items():
        idx.sort(key=lambda i: tuple(upd[i].shape) != key)  # those of the key's own shape first, then the tall ones
        wide = sum(tuple(upd[i].shape) == key for i in idx)
        X = orthogonalize(torch.stack([upd[i] if n < wide else upd[i].mT for n, i in enumerate(idx)]), steps, fused)
        X = list(X[:wide].unbind(0)) + list(X[wide:].mT.contiguous().unbind(0))
        for i, x in zip(idx, X, strict=True):
            out[i] = x
    return out


def masked_copy_(dst: list[torch.Tensor], new: list[torch.Tensor], ok: torch.Tensor) -> None:
    """``dst[i] = new[i]`` where the 0-d bool ``ok`` is true, else ``dst`` left exactly as it is: one ``where``
    over the concatenation, decided on the device (no host sync)."""
    flat = torch.where(ok, torch.cat([t.reshape(-1) for t in new]), torch.cat([t.reshape(-1) for t in dst]))
    torch._foreach_copy_(dst, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in dst]), dst, strict=True)])


class Muon(torch.optim.Optimizer):
    """Muon with decoupled weight decay. ``lr`` is scaled per matrix by sqrt(max(1, rows / cols)), as in
    ``torch.optim.Muon``'s default; weight decay multiplies by (1 - lr * weight_decay). ``fused_ns``: the
    Newton-Schulz iteration of ``orthogonalize_all(fused=True)`` (the ``MINILLM_MUON_NS=fused`` lever).

    As torch's fused AdamW does under a gradient scaler, a ``found_inf`` attribute (a 0-d float tensor on the
    device) set before ``step`` makes the step a no-op where it is 1: parameters and momentum left exactly as
    they were, decided on the device."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, fused_ns: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        self.fused_ns = fused_ns
        for g in self.param_groups:
            for p in g["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        found_inf = getattr(self, "found_inf", None)
        ok = None if found_inf is None else found_inf == 0
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if ps:
                self._update(ps, g, ok)
        return loss

    def _update(self, ps: list[torch.Tensor], g: dict, ok: torch.Tensor | None) -> None:
        grads, bufs = [p.grad for p in ps], []
        for p in ps:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(st["momentum_buffer"])
        lr, wd = g["lr"], g["weight_decay"]
        if ok is None:
            torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])  # buf = m * buf + (1 - m) * grad
            new_bufs = bufs
        else:
            new_bufs = torch._foreach_lerp(bufs, grads, 1 - g["momentum"])
        upd = torch._foreach_lerp(grads, new_bufs, g["momentum"]) if g["nesterov"] else new_bufs
        ortho = orthogonalize_all(upd, g["ns_steps"], self.fused_ns)
        if ok is None:
            new_ps = ps
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
        else:  # a decayed copy (one launch; times 1 is exact)
            new_ps = torch._foreach_mul(ps, 1 - lr * wd if wd else 1.0)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(ps):
            by_shape[tuple(p.shape)].append(i)
        for (rows, cols), idx in by_shape.items():
            torch._foreach_add_([new_ps[i] for i in idx], [ortho[i] for i in idx], alpha=-lr * max(1.0, rows / cols) ** 0.5)
        if ok is not None:
            masked_copy_(bufs, new_bufs, ok)
            masked_copy_(ps, new_ps, ok)
