"""Peak memory and step time of training with and without gradient checkpointing.

Issue 5's target (H100): on ``large`` (vocab 32,000) at micro-batch 64, checkpointing cuts peak memory
by >= 40% for <= 35% more step time.

    python scripts/bench_memory.py                                # large, micro-batch 64, bf16, CUDA
    python scripts/bench_memory.py --device cpu --config tiny     # smoke test, seconds

Random tokens; AdamW (fused on CUDA); bf16 autocast. Peak memory is torch.cuda.max_memory_allocated
over the timed steps (on CPU: not measured, printed as -). "saved" is the bytes the autograd graph keeps
for backward in one step (measured with saved_tensors_hooks, each storage once), on every device;
"estimate" is minillm.model.memory.estimate_memory's total for comparison. Results to stdout; --json for machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch

from minillm.config import resolve
from minillm.model.gpt import GPT
from minillm.model.memory import estimate_memory

GiB = 2**30


def saved_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor, ctx) -> int:
    """Bytes of tensors saved for backward by one forward pass (each storage counted once)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx():
        loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def run(cfg, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    B, T = args.batch_size, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]

    def ctx():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        with ctx():
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    out: dict = {"gradient_checkpointing": cfg.gradient_checkpointing}
    try:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [step() for _ in range(args.steps)]
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        out["step_s"] = statistics.median(times)
        out["tokens_per_s"] = B * T / out["step_s"]
        out["saved_bytes"] = saved_bytes(model, x, y, ctx)
    except torch.OutOfMemoryError:
        out.update(peak_bytes=None, step_s=None, tokens_per_s=None, saved_bytes=None, error="out of memory")
    out["estimate_bytes"] = estimate_memory(cfg, B, args.precision)["total"]
    if args.compile:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def fmt(v, scale=1.0, spec=".2f") -> str:
    return "-" if v is None else format(v / scale, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="large", help="preset name or TOML file (default: large)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default 32000; 50304 for gpt2-124m)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--block-size", type=int, default=None, help="override the config's block size")
    p.add_argument("--steps", type=int, default=None, help="timed steps per setting, median reported (default 10; 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 on CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype")
    p.add_argument("--attention", default=None, help="attention backend: auto, flash, cudnn, efficient, math")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args()

    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if dev == "auto" else dev)
    overrides = {"block_size": args.block_size, "attention": args.attention}
    cfg, _ = resolve(args.config, overrides)
    vocab = args.vocab_size or (50304 if args.config == "gpt2-124m" else 32000)
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    on_gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if on_gpu else 4)
    args.steps = args.steps or (10 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)

    rows = [run(dataclasses.replace(cfg, gradient_checkpointing=gc), args, device) for gc in (False, True)]
    off, on = rows
    ratio = {
        "peak": on["peak_bytes"] / off["peak_bytes"] if off.get("peak_bytes") and on.get("peak_bytes") else None,
        "saved": on["saved_bytes"] / off["saved_bytes"] if off.get("saved_bytes") and on.get("saved_bytes") else None,
        "step_time": on["step_s"] / off["step_s"] if off.get("step_s") and on.get("step_s") else None,
    }
    with torch.device("meta"):
        n_params = GPT(cfg).num_params()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"config": args.config, "vocab_size": vocab, "batch_size": args.batch_size, "block_size": cfg.block_size,
            "precision": args.precision, "compile": args.compile, "device": name, "torch": torch.__version__,
            "params": n_params,
            "date": time.strftime("%Y-%m-%d")}
    if args.json:
        json.dump({**meta, "runs": rows, "ratio_on_off": ratio}, sys.stdout, indent=2)
        print()
        return
    print(f"{args.config}: {n_params / 1e6:.1f}M params, {cfg.n_layer} x {cfg.n_embd}, vocab {vocab}, micro-batch {args.batch_size} x "
          f"{cfg.block_size}, {args.precision}{', compiled' if args.compile else ''}; {name}; torch {torch.__version__}")
    print(f"{'checkpointing':>13}  {'peak GiB':>9}  {'saved GiB':>9}  {'estimate GiB':>12}  {'step ms':>9}  {'tokens/s':>10}")
    for r in rows:
        print(f"{'on' if r['gradient_checkpointing'] else 'off':>13}  {fmt(r['peak_bytes'], GiB):>9}  "
              f"{fmt(r['saved_bytes'], GiB, '.3f'):>9}  {fmt(r['estimate_bytes'], GiB):>12}  "
              f"{fmt(r['step_s'], 1e-3, '.1f'):>9}  {fmt(r['tokens_per_s'], 1, ',.0f'):>10}  {r.get('error', '')}")
    if ratio["peak"] is not None:
        print(f"peak memory on/off: {ratio['peak']:.3f} ({(1 - ratio['peak']) * 100:.1f}% less; target >= 40%)")
    if ratio["saved"] is not None:
        print(f"saved activations on/off: {ratio['saved']:.3f}")
    if ratio["step_time"] is not None:
        print(f"step time on/off: {ratio['step_time']:.3f} ({(ratio['step_time'] - 1) * 100:+.1f}%; target <= +35%)")


if __name__ == "__main__":
    main()
