#!/usr/bin/env python
"""Training throughput: tokens/s, MFU, peak memory and step time per preset, on random tokens.

    python scripts/bench_train.py                                  # small, medium, large, gpt2-124m on CUDA
    python scripts/bench_train.py --config small --batch-size 256 --steps 50
    python scripts/bench_train.py --config configs/tiny.toml --device cpu --steps 5   # CPU smoke test
    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/bench_train.py --config large

Each step is the trainer's own step (the one ``make_train_step`` in minillm/train/step.py builds): batches come
through the real loader and prefetcher (pinned host memory), forward/backward under autocast, clipping, fused AdamW.
Steps after warm-up are timed one by one; the median is reported. ``startup`` breaks the first config's start
down: imports (process start to the benchmark's first line: Python, torch, minillm), device (CUDA context),
model (build, optimizers, compile wrapper), first_step (compilation included) and compile_s (the first step
less a steady one). Later configs of one process find torch imported and the CUDA context made.

Levers (issue 20; each switched by its environment variable of ``minillm/optim/levers.py``; unset: the device's default):
``--ab`` runs every config once per variant, each variant a comma-separated list of levers or ``base`` (none),
``--rounds`` times, interleaved, and ends with a table of each variant's median tokens/s and its ratio to ``base``:

    python scripts/bench_train.py --config small --config medium --timing total --rounds 2 \
        --ab base --ab sync --ab cudagraphs --ab ns --ab sync,cudagraphs,ns --json

  sync        MINILLM_STEP_SYNC=log                     the non-finite check on the device, no host sync per step
  cudagraphs  MINILLM_COMPILE_MODE=reduce-overhead      the compiled regions replayed as CUDA graphs
  autotune    MINILLM_COMPILE_MODE=max-autotune-no-cudagraphs
  ns          MINILLM_MUON_NS=fused                     Muon's Newton-Schulz as baddbmm, tall and wide batched together
  hostsync    MINILLM_STEP_SYNC=step                    the check on the host, one sync per step (the CPU's default)
  matmulns    MINILLM_MUON_NS=matmul                    Muon's plain matmul iteration (the CPU's default)
  explicitnorm MINILLM_NORM=explicit                   RMSNorm as plain ops (inductor derives the backward)
  halfnorm    MINILLM_NORM=halfweight                   the same, the weight multiplied in the activations' dtype
  concat      MINILLM_PROJ=concat                       q/k/v and gate/up projections each as one matrix product
  coord       MINILLM_TUNE=coordinate                   inductor's coordinate-descent tuning of each kernel's blocks
  fusednorm   MINILLM_NORM=fused                        torch's fused RMSNorm op inside the compiled regions too
  plainloss   MINILLM_LOSS=plain                        the compiled cross-entropy instead of the Triton kernel
  splitreduce MINILLM_REDUCE=split                      inductor's mix-order reductions off

A variant's ``key=value`` items are config overrides of its rows only (``--set`` for that variant): a model change
timed beside the defaults in one process, e.g. ``--ab base --ab norm_weight=false --ab dropout=0``.

``sync``, ``ns`` and ``halfnorm`` are CUDA's defaults since they were measured (so on a GPU ``base`` includes them);
the before-and-after of the defaults on a GPU is ``--ab hostsync,matmulns,fusednorm --ab base``.

``--timing each`` (the default) times each step between two synchronisations and reports the median; ``total``
times the timed steps back to back with one synchronisation at the end (what a training run sees: the host
queues the next step while the GPU works, which a step without a host sync allows). Each row starts with
TorchDynamo's caches reset, so that no variant runs on another's compiled code. On CUDA every row also counts the
step's host synchronisations (``syncs_per_step``: torch's sync debug mode over two more steps).

Under torchrun (WORLD_SIZE > 1) every rank joins the process group (NCCL on CUDA, one GPU per local rank;
gloo with --device cpu), the compiled model is wrapped in DistributedDataParallel as the trainer wraps it
(or sharded with FSDP2 with --fsdp), and --batch-size is the micro-batch per rank. Each rank reads its own
random tokens (stream seed = rank, so rank 0 sees the one-process stream). Reported: tokens/s of all ranks
together (global tokens per step / the slowest rank's median step), MFU per GPU, and peak memory of each
rank (peak_mem_GiB = the largest). Rank 0 alone prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.io import process_started_at  # noqa: E402  (light: no torch)

PROCESS_START = process_started_at()

# micro-batch x block of the reference table (H100, nanoGPT train.py)
REFERENCE = {"small": (256, 32000, 1.59e6), "medium": (128, 32000, 1.59e6), "large": (64, 32000, 0.79e6),
             "gpt2-124m": (32, 50304, 0.48e6)}
# --ab lever names: the environment variable each sets (minillm/optim/levers.py) and its value
LEVERS = {"sync": ("MINILLM_STEP_SYNC", "log"), "cudagraphs": ("MINILLM_COMPILE_MODE", "reduce-overhead"),
          "autotune": ("MINILLM_COMPILE_MODE", "max-autotune-no-cudagraphs"), "ns": ("MINILLM_MUON_NS", "fused"),
          "hostsync": ("MINILLM_STEP_SYNC", "step"), "matmulns": ("MINILLM_MUON_NS", "matmul"),
          "explicitnorm": ("MINILLM_NORM", "explicit"), "halfnorm": ("MINILLM_NORM", "halfweight"),
          "concat": ("MINILLM_PROJ", "concat"), "coord": ("MINILLM_TUNE", "coordinate"),
          "fusednorm": ("MINILLM_NORM", "fused"), "plainloss": ("MINILLM_LOSS", "plain"),
          "splitreduce": ("MINILLM_REDUCE", "split")}


def bench_one(name: str, args, dist=None) -> dict:
    """One config's row (every rank returns it; rank 0 prints it). ``dist``: this process's place under torchrun."""
    import dataclasses

    import numpy as np
    import torch

    from minillm import distributed
    from minillm.config import pad_vocab, resolve
    from minillm.data.loader import Loader, Prefetcher
    from minillm.data.windows import window_starts
    from minillm.model.gpt import GPT
    from minillm.optim.groups import configure_optimizer
    from minillm.train import step as ts
    from minillm.train.log import peak_flops

    torch._dynamo.reset()  # each row compiles its own graphs (another row's mode or model never serves it)
    t_begin = time.time()
    ref_batch, ref_vocab, ref_tps = REFERENCE.get(name, (None, 32000, None))
    overrides = {"device": args.device, "precision": args.precision, "compile": args.compile}
    if args.batch_size or ref_batch:
        overrides["batch_size"] = args.batch_size or ref_batch
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    mcfg, tcfg = resolve(name, overrides)
    vocab = pad_vocab(args.vocab or ref_vocab)
    mcfg = dataclasses.replace(mcfg, vocab_size=vocab)
    dist = dist or distributed.Dist()
    device = dist.device if dist.enabled else ts.resolve_device(tcfg.device)
    dtype = ts.resolve_precision(tcfg.precision, device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context (timed as "device")
    t_device = time.time()
    model = GPT(mcfg).to(device)
    n_params, flops_per_token = model.num_params(), model.flops_per_token()
    if args.fsdp:  # FSDP2 shards the parameters in place: the optimizer is built on the sharded ones
        model = distributed.wrap_fsdp(model, dist)
    opts = configure_optimizer(model, tcfg, device)
    compiled = ts.maybe_compile(model, tcfg, device)
    train_model = compiled if args.fsdp else distributed.wrap_ddp(compiled, dist)  # as the trainer wraps it
    reduce = (lambda t: distributed.all_reduce_(t, dist, "mean")) if dist.enabled else None
    stream = np.random.default_rng(dist.rank).integers(0, vocab, size=4 << 20 if device.type == "cuda" else 1 << 16,
                                               dtype=np.uint16 if vocab <= 65536 else np.uint32)
    starts = window_starts(len(stream), mcfg.block_size, mcfg.block_size)
    loader = Loader(stream, starts, mcfg.block_size, tcfg.batch_size, seed=0)
    prefetch = Prefetcher(loader, pin=device.type == "cuda", threads=1)
    train_step = ts.make_train_step(model, train_model, opts, tcfg, device, dtype, doc_id=0, reduce=reduce)
    step = lambda prefetch, lr_scale: _loss(train_step(prefetch, lr_scale))  # noqa: E731
    if args.no_sync:  # measurement only: the same step without the host sync (no non-finite check)
        step = _step_without_sync(model, train_model, opts, tcfg, device, dtype)
    times = []
    t_first = time.time()  # the model, optimizers and (lazy) compile wrapper are built
    each, last, t_timed = args.timing == "each", args.warmup + args.steps - 1, 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # on the CPU a step ends as it returns
    for i in range(args.warmup + args.steps):
        if each or i <= args.warmup:
            sync()
        t0 = time.perf_counter()
        if i == args.warmup:
            t_timed = t0
        loss = step(prefetch, lr_scale=1.0)
        if each or i in (0, last):
            sync()
        if i == 0:
            first_step_s = time.time() - t_first
        if i >= args.warmup and each:
            times.append(time.perf_counter() - t0)
    if not each:  # one figure: the timed steps back to back
        times.append((time.perf_counter() - t_timed) / args.steps)
    syncs = _syncs_per_step(step, prefetch) if device.type == "cuda" else None
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(prefetch, lr_scale=1.0)
            torch.cuda.synchronize()
        if dist.is_main:
            for name_, ms, calls in top_kernels(prof.events(), steps=3, n=args.profile):
                print(f"{ms:8.3f} ms {calls:5.1f}x  {name_}", file=sys.stderr)
            print(json.dumps({"config": name, "kernels_per_step": kernel_categories(prof.events(), steps=3)}),
                  file=sys.stderr)
    prefetch.close()
    world = dist.world_size
    dt = distributed.agree_max([statistics.median(times)], dist)[0]  # the slowest rank sets the pace
    first_step_s = distributed.agree_max([first_step_s], dist)[0]
    mem = torch.zeros(world, dtype=torch.float64, device=device)  # each rank's peak, gathered by a sum
    if device.type == "cuda":
        mem[dist.rank] = torch.cuda.max_memory_allocated(device) / 2**30
    mem_per_rank = [round(v, 2) for v in distributed.all_reduce_(mem, dist, "sum").tolist()]
    tokens = tcfg.batch_size * tcfg.accumulation_steps * mcfg.block_size * world  # all ranks
    tps = tokens / dt
    peak = peak_flops(device)
    out = {
        "config": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "batch": tcfg.batch_size, "block": mcfg.block_size, "vocab": vocab,
        "params_M": round(n_params / 1e6, 2), "step_ms": round(1000 * dt, 2),
        "tokens_per_s": round(tps), "mfu_pct": round(100 * flops_per_token * tps / (peak * world), 1) if peak else None,
        "peak_mem_GiB": max(mem_per_rank) if device.type == "cuda" else None,
        "first_step_s": round(first_step_s, 2),
        "startup": {"imports_s": round(t_begin - PROCESS_START, 2) if PROCESS_START else None,
                    "device_s": round(t_device - t_begin, 2), "model_s": round(t_first - t_device, 2),
                    "first_step_s": round(first_step_s, 2), "compile_s": round(first_step_s - dt, 2)},
        "loss": round(float(loss), 3), "set": args.set,
        "no_sync": args.no_sync, "timing": args.timing, "syncs_per_step": syncs,
        "reference_tokens_per_s": ref_tps,
    }
    if dist.enabled or args.fsdp:  # batch is per rank; tokens_per_s counts all ranks; mfu_pct is per GPU
        out.update(world_size=world, backend=dist.backend, wrapper="fsdp" if args.fsdp else "ddp",
                   tokens_per_s_per_gpu=round(tps / world),
                   peak_mem_GiB_per_rank=mem_per_rank if device.type == "cuda" else None,
                   data="random tokens, stream seed = rank")
    del model, opts, compiled, train_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# kernel name fragments -> category, first match wins (cuBLAS's nvjet/sm90 kernels, SDPA's flash kernels, inductor's
# generated Triton kernels, the optimizers' multi-tensor kernels, the rest of ATen)
KERNEL_CATEGORIES = (("attention", ("flash", "fmha", "attention", "efficient", "sdpa", "cudnn")),  # before matmul:
                     # cuDNN's attention kernels carry "sm90_" in their names
                     ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere_")),
                     ("optimizer", ("multi_tensor", "fused_adam", "foreach")),
                     ("triton reduction", ("triton_red", "triton_per")),
                     ("triton pointwise", ("triton_poi", "triton_")),
                     ("copy/memset", ("memcpy", "memset", "copy")),
                     ("aten other", ("",)))


def _per_kernel(events) -> dict[str, list[float]]:
    """GPU ms and calls of each CUDA kernel name over a profile's events (the host's events are not kernels)."""
    import torch

    acc: dict[str, list[float]] = {}  # name -> [ms, calls]
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = acc.setdefault(e.name, [0.0, 0])
            a[0] += e.device_time_total / 1e3
            a[1] += 1
    return acc


def kernel_categories(events, steps: int) -> dict:
    """GPU time (ms) and kernel count per step of each ``KERNEL_CATEGORIES`` category, from a CUDA profile's events
    over ``steps`` steps: where a step's time goes, comparable across models and tools."""
    out: dict[str, list[float]] = {}  # category -> [ms, kernels] over all the steps
    for name, (ms, n) in _per_kernel(events).items():
        low = name.lower()
        acc = out.setdefault(next(c for c, frags in KERNEL_CATEGORIES if any(f in low for f in frags)), [0.0, 0])
        acc[0] += ms
        acc[1] += n
    total = sum(ms for ms, _ in out.values())
    return {c: {"ms": round(ms / steps, 3), "kernels": round(n / steps, 1)} for c, (ms, n) in out.items()} | {
        "total_ms": round(total / steps, 3)}


def top_kernels(events, steps: int, n: int) -> list[tuple[str, float, float]]:
    """The ``n`` CUDA kernels taking the most GPU time: (full name, ms per step, calls per step), from a profile's
    events over ``steps`` steps (the profiler's own table cuts names at 55 characters)."""
    rows = sorted(_per_kernel(events).items(), key=lambda kv: -kv[1][0])[:n]
    return [(name[:240], round(ms / steps, 3), round(calls / steps, 1)) for name, (ms, calls) in rows]


def _loss(r):
    """A StepResult's loss: a float, or with MINILLM_STEP_SYNC=log the 0-d tensor on the device (read at the end)."""
    return r.loss if r.stats is None else r.stats[0]


def _syncs_per_step(step, prefetch, n: int = 2) -> float:
    """Synchronising CUDA calls per step (the host waiting for the GPU), counted by torch's sync debug mode over
    ``n`` steps after the timed ones."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step(prefetch, lr_scale=1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught) / n


def split_variant(variant: str) -> tuple[list[str], list[str]]:
    """A ``--ab`` variant's lever names and its ``key=value`` config overrides (``--set`` for its rows only)."""
    items = [] if variant == "base" else variant.split(",")
    return [i for i in items if "=" not in i], [i for i in items if "=" in i]


@contextlib.contextmanager
def levers(variant: str):
    """The environment of a ``--ab`` variant: its levers' variables set (``base``: none), restored after."""
    names = split_variant(variant)[0]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"--ab {variant}: unknown lever {unknown[0]}; use base or any of {', '.join(LEVERS)}")
    saved = {var: os.environ.get(var) for var, _ in LEVERS.values()}
    os.environ.update(dict(LEVERS[n] for n in names))
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _ab_row(name: str, variant: str, args, dist) -> dict:
    """A ``--ab`` row; a variant that fails becomes a row with its ``error`` (the other variants still run)."""
    args = argparse.Namespace(**{**vars(args), "set": [*args.set, *split_variant(variant)[1]]})
    try:
        return bench_one(name, args, dist) | {"levers": variant}
    except Exception as e:  # noqa: BLE001  a lever that breaks is a result too
        return {"config": name, "levers": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def ab_table(rows: list[dict]) -> list[dict]:
    """Per config and variant (rows of ``--ab``): the median tokens/s over the rounds that ran and its ratio to the
    config's ``base`` variant (to its first variant when there is no ``base``); None where none ran.
    ``syncs_per_step``: the first run's (CUDA only)."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        runs = {v: [r["tokens_per_s"] for r in rows if r["config"] == config and r["levers"] == v and "error" not in r]
                for v in dict.fromkeys(r["levers"] for r in rows if r["config"] == config)}
        med = {v: statistics.median(t) if t else None for v, t in runs.items()}
        base = med.get("base", next(iter(med.values())))
        syncs = {v: next((r.get("syncs_per_step") for r in rows if r["config"] == config and r["levers"] == v
                          and "error" not in r), None) for v in med}
        out += [{"config": config, "levers": v, "tokens_per_s": round(t) if t else None,
                 "ratio": round(t / base, 3) if t and base else None, "syncs_per_step": syncs[v], "runs": runs[v]}
                for v, t in med.items()]
    return out


def _step_without_sync(model, compiled, opts, tcfg, device, dtype):
    from minillm.optim.groups import clip_gradients, set_lr
    from minillm.train.step import accumulate

    params = [p for p in model.parameters() if p.requires_grad]

    def step(prefetch, lr_scale):
        set_lr(opts, lr_scale)
        batches = [prefetch.next()[0] for _ in range(tcfg.accumulation_steps)]
        loss = accumulate(compiled, batches, tcfg, 0, device, dtype)
        clip_gradients(params, tcfg.grad_clip)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", help="preset name or TOML file (repeat); default: the four GPU presets")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation happens here)")
    ap.add_argument("--batch-size", type=int, default=0, help="micro-batch (default: the reference table's)")
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: 32000, gpt2-124m 50304)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--set", action="append", default=[], help="override a config field, e.g. --set loss_chunk=0")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ap.add_argument("--no-sync", action="store_true", help="measure the step without its host sync (upper bound)")
    ap.add_argument("--ab", action="append", default=[],
                    help=f"a variant to run each config with: base, or levers joined by commas ({', '.join(LEVERS)}) "
                         "and config overrides for that variant's rows (norm_weight=false, dropout=0); "
                         "repeat; ends with a table of tokens/s and the ratio to base")
    ap.add_argument("--rounds", type=int, default=1, help="with --ab: runs of every variant, interleaved")
    ap.add_argument("--timing", choices=("each", "total"), default="each",
                    help="each: median of steps synchronised one by one; total: the timed steps back to back")
    ap.add_argument("--profile", type=int, default=0, help="print the N CUDA kernels taking the most time (full names, ms and calls a step) and the time by category")
    ap.add_argument("--fsdp", action="store_true",
                    help="under torchrun, shard the model with FSDP2 (minillm.distributed.wrap_fsdp) instead of DDP")
    args = ap.parse_args()
    names = args.config or list(REFERENCE)
    from minillm import distributed

    runs = [(n, v) for _ in range(args.rounds if args.ab else 1) for n in names for v in args.ab or [None]]
    with distributed.session(args.device) as dist:  # a no-op outside torchrun
        rows = []
        for n, variant in runs:
            with levers(variant) if variant else contextlib.nullcontext():
                rows.append(_ab_row(n, variant, args, dist) if variant else bench_one(n, args, dist))
            if args.json and dist.is_main:  # as it goes: a later config's failure keeps the earlier rows
                print(json.dumps(rows[-1]), flush=True)
    if args.ab and dist.is_main:
        table = ab_table(rows)
        if args.json:
            print(json.dumps({"ab": table}), flush=True)
        print(f"{'config':<12} {'levers':<28} {'tokens/s':>12} {'ratio':>7} {'syncs':>6}  runs",
              file=sys.stderr if args.json else sys.stdout)
        for t in table:
            tps = f"{t['tokens_per_s']:,}" if t["tokens_per_s"] else "failed"
            ratio = f"{t['ratio']:.3f}" if t["ratio"] else "-"
            print(f"{t['config']:<12} {t['levers']:<28} {tps:>12} {ratio:>7} {t['syncs_per_step']!s:>6}  {t['runs']}",
                  file=sys.stderr if args.json else sys.stdout)
    if args.json or not dist.is_main:
        return
    cols = ["config", "batch", "block", "params_M", "step_ms", "tokens_per_s", "mfu_pct", "peak_mem_GiB",
            "first_step_s", "reference_tokens_per_s"]
    if dist.enabled:
        cols.insert(1, "world_size")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"# device {rows[0]['device']}, torch {rows[0]['torch']}"
          + (f", {dist.world_size} processes ({rows[0]['wrapper']}): batch per rank, tokens/s of all ranks, "
             f"mfu per GPU, peak memory of the fullest rank" if dist.enabled else ""))


if __name__ == "__main__":
    main()
