"""Generation speed: tokens/s at batch 1 with and without the KV cache, and 32 prompts batched versus
one by one.

Issue 7's targets (H100, ``large`` preset, vocab 32,000, random weights): with the cache >= 5x the
tokens/s without it and >= 1,000 tokens/s at batch 1; 32 prompts batched >= 10x the throughput of
running them one by one.

    python scripts/bench_generate.py                               # large, CUDA, compiled decode step
    python scripts/bench_generate.py --config tiny --device cpu    # smoke test, seconds

Greedy decoding with no stop token, so every run makes exactly the tokens asked for. The batch-1
prompt is --prompt-len random tokens; the 32 prompts have random lengths in [--prompt-len/4,
--prompt-len]. Each configuration runs once untimed first (compilation, CUDA-graph capture, warm
caches; on CUDA only), then --repeats times timed (the median is reported); the warmup time is printed too. Decode steps (--modes): "eager" is GPT.forward with the
preallocated KV cache; "graph" is the static decode step replayed as one CUDA graph per token (generate's
default on CUDA); "compiled" is that step under torch.compile, replayed as a CUDA graph (generate --compile on).
The summary uses the first of --modes. Results to stdout; --json for machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from minillm.config import resolve
from minillm.generation import Sampling, decode_mode, generate_batch
from minillm.model.gpt import GPT

GREEDY = Sampling(temperature=0)


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def measure(name: str, fn, device: torch.device, results: list[dict], repeats: int = 1) -> dict:
    """Run ``fn`` (returning a list of Completions) once untimed on CUDA (compilation, graph capture), then
    ``repeats`` times timed; record the median tokens/s."""
    warm = timed(fn, device)[0] if device.type == "cuda" else 0.0
    runs = [timed(fn, device) for _ in range(max(1, repeats))]
    tokens = sum(len(c.tokens) for c in runs[0][1])
    secs = statistics.median(s for s, _ in runs)
    rec = {"name": name, "tokens": tokens, "seconds": round(secs, 4), "tokens_per_s": round(tokens / secs, 1),
           "runs_tokens_per_s": [round(tokens / s, 1) for s, _ in runs], "warmup_s": round(warm, 2)}
    results.append(rec)
    print(f"{name:<34} {tokens:>7} tok {secs:>9.3f} s {tokens / secs:>11.1f} tok/s   (median of {len(runs)}; "
          f"warmup {warm:.1f} s)", file=sys.stderr, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="large", help="preset name or TOML file (default large)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (padded to a multiple of 64)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight and KV-cache dtype")
    ap.add_argument("--new-tokens", type=int, default=512, help="new tokens at batch 1")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (the longest of the batch)")
    ap.add_argument("--batch", type=int, default=32, help="prompts in the batched comparison")
    ap.add_argument("--batch-new-tokens", type=int, default=128, help="new tokens per prompt in the batched comparison")
    ap.add_argument("--modes", default="",
                    help="comma-separated decode steps to measure, the first used for the summary (default: "
                         "graph,compiled,eager on CUDA; eager,static on CPU)")
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow run without the KV cache")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each configuration; the median is reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (default 1: decode steps are small ops, and extra threads mostly "
                         "add synchronization; 0 = torch's default)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    mcfg, _ = resolve(args.config)
    mcfg = dataclasses.replace(mcfg, vocab_size=-(-args.vocab // 64) * 64)
    torch.manual_seed(0)
    model = GPT(mcfg).to(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
    modes = [m for m in args.modes.split(",") if m] or (
        [decode_mode(device, "auto"), "compiled", "eager"] if device.type == "cuda" else ["eager", "static"])
    mode = modes[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, mcfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    lens = torch.randint(max(1, args.prompt_len // 4), args.prompt_len + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(0, mcfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    print(f"{args.config}: {model.num_params() / 1e6:.1f}M params, block {mcfg.block_size}, vocab {mcfg.vocab_size}, "
          f"{args.dtype}, {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, decode step: {mode}", file=sys.stderr)

    res: list[dict] = []
    one = [prompt]
    n = args.new_tokens
    cached = None
    for md in modes:
        rec = measure(f"batch 1, cache ({md})", lambda md=md: generate_batch(model, one, n, sampling=GREEDY, mode=md),
                      device, res, args.repeats)
        cached = cached or rec
    if not args.no_uncached:
        nocache = measure("batch 1, no cache", lambda: generate_batch(model, one, n, sampling=GREEDY, use_cache=False),
                          device, res, args.repeats)
    m = args.batch_new_tokens
    speedups = {}
    for md in modes:
        if md == "eager" and md != mode:  # the slow one: at batch 1 only, unless it is the summary's
            continue
        b = measure(f"{args.batch} prompts batched ({md})",
                    lambda md=md: generate_batch(model, prompts, m, sampling=GREEDY, mode=md), device, res, args.repeats)
        s1 = measure(f"{args.batch} prompts one by one ({md})",
                     lambda md=md: [generate_batch(model, [p], m, sampling=GREEDY, mode=md)[0] for p in prompts],
                     device, res, args.repeats)
        speedups[md] = round(b["tokens_per_s"] / s1["tokens_per_s"], 2)
    summary = {"cache_speedup": None if args.no_uncached else round(cached["tokens_per_s"] / nocache["tokens_per_s"], 2),
               "batch1_tokens_per_s": cached["tokens_per_s"],
               "batched_speedup": speedups.get(mode), "batched_speedup_by_mode": speedups}
    print(f"KV cache speedup {summary['cache_speedup']}x (target >= 5), batch 1 {summary['batch1_tokens_per_s']} tok/s "
          f"(target >= 1000), batched speedup {summary['batched_speedup']}x (target >= 10)", file=sys.stderr)
    info = {"config": args.config, "params": model.num_params(), "vocab_size": mcfg.vocab_size, "dtype": args.dtype,
            "device": str(device), "torch": torch.__version__, "decode": mode, "modes": modes, "results": res, **summary}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for r in res:
            print(f"{r['name']}\t{r['tokens_per_s']} tok/s")
        print(f"cache_speedup\t{summary['cache_speedup']}\nbatched_speedup\t{summary['batched_speedup']}")


if __name__ == "__main__":
    main()
