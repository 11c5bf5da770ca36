#!/usr/bin/env python
"""Block sizes of the Triton decode kernels (``minillm.model.triton_decode.BLOCKS``), measured (CUDA only): for each
--configs preset (random weights, bf16, vocab 32,000) and batch size, greedy decoding of --new-tokens tokens in
K-step graph chunks (generate's default decoder) with each variant of the blocks; tokens/s, median of --repeats.
With --profile, the kernel table of the first variant's replay.

    python scripts/tune_decode.py --configs large,small --batches 1,32
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.config import resolve  # noqa: E402
from minillm.generation import DECODE_CHUNK, Sampling, generate_batch  # noqa: E402
from minillm.model import triton_decode  # noqa: E402
from minillm.model.gpt import GPT  # noqa: E402

VARIANTS = {  # on top of the defaults (base); "first": the defaults before this script's first GPU call
    "base": {},
    "first": {"qkv_k": 64, "linear_n": 32, "linear_k": 64, "head_n": 64, "head_k": 64, "slots": 64},
    "n64k256": {"linear_n": 64, "head_k": 256},
    "n32k512": {"linear_k": 512, "qkv_k": 512, "head_n": 256},
    "n16k512": {"linear_n": 16, "linear_k": 512, "qkv_k": 512},
    "h256k256": {"head_n": 256, "head_k": 256},
    "slots128": {"slots": 128},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="large,small")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}; "
                    "or a JSON object of BLOCKS entries")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--chunks", default=str(DECODE_CHUNK), help="tokens per CUDA-graph replay, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_decode.py needs a CUDA GPU")
    default = dict(triton_decode.BLOCKS)
    variants = {v: VARIANTS[v] for v in args.variants.split(",")} if not args.variants.startswith("{") \
        else {"given": json.loads(args.variants)}
    g = torch.Generator().manual_seed(0)
    for config in args.configs.split(","):
        mcfg = dataclasses.replace(resolve(config)[0], vocab_size=32000)
        torch.manual_seed(0)
        model = GPT(mcfg).cuda().to(torch.bfloat16).eval()
        for batch in map(int, args.batches.split(",")):
            prompts = [torch.randint(0, 32000, (64,), generator=g).tolist() for _ in range(batch)]
            for (name, blocks), chunk in itertools.product(variants.items(), map(int, args.chunks.split(","))):
                triton_decode.BLOCKS.clear()
                triton_decode.BLOCKS.update(default | blocks)
                model.decoders.clear()

                def run(model=model, prompts=prompts, chunk=chunk) -> int:
                    out = generate_batch(model, prompts, args.new_tokens, sampling=Sampling(temperature=0),
                                         mode="graph", chunk=chunk, fused=True)
                    return sum(len(c.tokens) for c in out)

                run()
                secs = []
                for _ in range(args.repeats):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    n = run()
                    torch.cuda.synchronize()
                    secs.append(time.perf_counter() - t)
                row = {"config": config, "batch": batch, "variant": name, "chunk": chunk,
                       "blocks": dict(triton_decode.BLOCKS),
                       "tokens_per_s": round(n / statistics.median(secs), 1)}
                print(json.dumps(row), flush=True)
    triton_decode.BLOCKS.clear()
    triton_decode.BLOCKS.update(default)


if __name__ == "__main__":
    main()
