#!/usr/bin/env python
"""How much a compile on another thread slows eager training steps, and the compile itself, at several thread switch
intervals (issue 20: ``--compile auto`` runs the first steps eagerly while the regions compile on a thread; the
``MINILLM_COMPILE_SWITCH`` lever). CPU only, one thread: a launch-bound model (many small ops, as a GPU step is for
the host), TorchDynamo + AOT autograd on the thread with the ``aot_eager`` backend (Python only, no code generation,
so the cores are not what is shared: the interpreter lock is).

    python scripts/bench_compile_contention.py                       # 20 s a row: alone, then 5, 1 and 0.1 ms
    python scripts/bench_compile_contention.py --seconds 5 --intervals 5,0.1

Each op an eager step runs releases the interpreter lock and has to take it back from the compiling thread, which
keeps it for up to the switch interval: the step pays about one interval per op. Prints one JSON object a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.config import resolve  # noqa: E402
from minillm.model.gpt import GPT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each row")
    ap.add_argument("--intervals", default="5,1,0.1", help="switch intervals in ms, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(resolve("tiny")[0], vocab_size=256, n_layer=8, n_embd=32, n_head=2, block_size=16)
    torch.manual_seed(0)
    model, x = GPT(cfg), torch.randint(0, 256, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    stop, compiles = threading.Event(), [0]

    def compiler() -> None:  # compiles a copy of the model, again and again
        twin = GPT(cfg)
        while not stop.is_set():
            torch._dynamo.reset()
            torch.compile(twin, backend="aot_eager", dynamic=False)(x[:, :-1], x[:, 1:]).backward()
            compiles[0] += 1

    def row(interval_ms: float | None, steps: bool, compiling: bool) -> dict:
        python_default = sys.getswitchinterval()
        if interval_ms is not None:
            sys.setswitchinterval(interval_ms / 1e3)
        stop.clear()
        compiles[0] = 0
        th = threading.Thread(target=compiler, daemon=True) if compiling else None
        t0 = time.perf_counter()
        if th:
            th.start()
        times = []
        while time.perf_counter() - t0 < args.seconds:
            if steps:
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            else:
                time.sleep(0.05)
        stop.set()
        if th:
            th.join()
        elapsed = time.perf_counter() - t0
        sys.setswitchinterval(python_default)
        out = {"switch_interval_ms": interval_ms or python_default * 1e3, "eager_steps": len(times),
               "step_ms": round(statistics.median(times) * 1e3, 2) if times else None,
               "compiling": compiling, "compiles_per_s": round(compiles[0] / elapsed, 3) if compiling else None}
        print(json.dumps(out), flush=True)
        return out

    for _ in range(3):
        step()
    row(None, True, False)  # the eager step alone
    row(None, False, True)  # the compile alone
    for ms in (float(v) for v in args.intervals.split(",")):
        row(ms, True, True)


if __name__ == "__main__":
    main()
