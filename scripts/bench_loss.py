"""The output layer + loss of a compiled training step, forward and backward, on one CUDA GPU: the plain path
(``MINILLM_LOSS=plain``: the logits, inductor's log-sum-exp, its softmax gradient in the backward) against
``triton_loss`` (one Triton kernel writes the loss and the logits' gradient in place), at each preset's shape
of ``compare_train.sh`` (rows = micro-batch x block, width, vocabulary). Also the kernel alone at a few block
sizes and warps (``--sweep``). Prints one JSON line per row.

    python scripts/bench_loss.py [--shapes small,medium,large,gpt2-124m] [--iters 20] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"small": (256 * 256, 256, 32000), "medium": (128 * 512, 384, 32000), "large": (64 * 1024, 640, 32000),
          "gpt2-124m": (32 * 1024, 768, 50304)}


def timed(fn, iters: int) -> float:
    """Median ms of ``fn()`` over ``iters`` runs (CUDA events), after 3 untimed ones."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def head_step(name: str, triton: bool, iters: int) -> dict:
    """ms of the compiled loss's forward + backward at shape ``name``, the plain or the Triton path, and the
    loss and gradients' distance from the plain path's (run first with the same inputs)."""
    import torch

    from minillm.config import ModelConfig
    from minillm.model import loss

    n, c, v = SHAPES[name]
    torch.manual_seed(0)
    h = (torch.randn(n // 512, 512, c, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    head = torch.nn.Linear(c, v, bias=False, device="cuda")
    targets = torch.randint(0, v, (n // 512, 512), device="cuda")
    targets[0, :7] = -1
    cfg = ModelConfig(vocab_size=v, n_embd=c)
    loss.TRITON_LOSS = triton
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()
    fn = torch.compile(loss.output_loss, dynamic=False)

    def step():
        h.grad = head.weight.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(h, head, targets, cfg)
        out.backward()
        return out

    out = step().item()
    grads = (h.grad.float().clone(), head.weight.grad.float().clone())
    ms = timed(step, iters)
    return {"shape": name, "path": "triton" if triton else "plain", "ms": round(ms, 3), "loss": out,
            "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2), "grads": grads}


def sweep(name: str, iters: int) -> list[dict]:
    """The kernel alone (no matrix product) at shape ``name`` for block sizes x warps."""
    import torch

    from minillm.model import triton_loss

    n, _, v = SHAPES[name]
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    rows, kept = [], (triton_loss.BLOCK, triton_loss.WARPS)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16, 32):
            triton_loss.BLOCK, triton_loss.WARPS = block, warps
            work = logits.clone()
            ms = timed(lambda work=work: triton_loss.cross_entropy_grad_(work, targets), iters)
            gbs = 2 * logits.numel() * logits.element_size() / ms / 1e6
            rows.append({"shape": name, "block": block, "warps": warps, "kernel_ms": round(ms, 3),
                         "GB_per_s": round(gbs)})
    triton_loss.BLOCK, triton_loss.WARPS = kept  # the next shape's step runs at the module's settings again
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="small,medium,large,gpt2-124m")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel alone at several blocks and warps")
    args = ap.parse_args()
    import torch

    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for name in args.shapes.split(","):
        plain = head_step(name, False, args.iters)
        fast = head_step(name, True, args.iters)
        dh = ((fast["grads"][0] - plain["grads"][0]).norm() / plain["grads"][0].norm()).item()
        dw = ((fast["grads"][1] - plain["grads"][1]).norm() / plain["grads"][1].norm()).item()
        for row in (plain, fast):
            row.pop("grads")
            print(json.dumps(row))
        print(json.dumps({"shape": name, "ratio_plain_over_triton": round(plain["ms"] / fast["ms"], 3),
                          "loss_rel_diff": abs(fast["loss"] - plain["loss"]) / plain["loss"],
                          "grad_h_rel_diff": dh, "grad_w_rel_diff": dw}))
        if args.sweep:
            for row in sweep(name, args.iters):
                print(json.dumps(row))


if __name__ == "__main__":
    main()
