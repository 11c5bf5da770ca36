#!/usr/bin/env python
"""The sampler's cost per call on a CUDA GPU (fp32 logits, vocab --vocab, generate's default sampling: temperature
0.8, top-k 50, top-p 0.95, repetition penalty 1.1 on a tenth of the tokens): the exact sampler
(``sampling.sample_next_token``) and the Triton one (``triton_decode.sample``) for each --blocks size of its
vocabulary blocks (``BLOCKS["vocab"]``) and --warps (``BLOCKS["sample_warps"]``), replayed as CUDA graphs of 16 calls; microseconds
per call.

    python scripts/bench_sampler.py --batches 1,32 --blocks 1024,2048,4096 --warps 4,8,16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.generation.sampling import noise_like, sample_next_token  # noqa: E402
from minillm.model import triton_decode  # noqa: E402


def graphed_us(fn, calls: int = 16, replays: int = 50) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--blocks", default="1024,2048,4096")
    ap.add_argument("--warps", default="4", help="num_warps of the sampler's kernels (BLOCKS['sample_warps'])")
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_sampler.py needs a CUDA GPU")
    for B in map(int, args.batches.split(",")):
        print(json.dumps(measure(B, args.vocab, [int(b) for b in args.blocks.split(",")],
                                 [int(w) for w in args.warps.split(",")])), flush=True)


def measure(B: int, V: int, blocks: list[int], warps: list[int]) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    logits = torch.randn(B, V, device="cuda", generator=g) * 3
    seen = torch.rand(B, V, device="cuda", generator=g) < 0.1
    noise = noise_like(logits, g)
    unsure = torch.zeros(B, dtype=torch.bool, device="cuda")

    def sample(fast: bool):
        return sample_next_token(logits, 0.8, 50, 0.95, 1.1, seen=seen, noise=noise, unsure=unsure, fast=fast)

    exact = sample(False)
    row = {"batch": B, "exact_us": round(graphed_us(lambda: sample(False)), 2)}
    for block in blocks:
        for w in warps:
            triton_decode.BLOCKS.update(vocab=block, sample_warps=w)
            row[f"triton_{block}_w{w}_same_tokens"] = bool(torch.equal(sample(True), exact))
            row[f"triton_{block}_w{w}_us"] = round(graphed_us(lambda: sample(True)), 2)
    return row


if __name__ == "__main__":
    main()
