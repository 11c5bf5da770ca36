#!/usr/bin/env python
"""Start-up of ``minillm train``: seconds from the command to the end of its first optimizer step, cold and warm
compile caches, against the floor (``import torch`` + CUDA initialisation), with the trainer's own breakdown.

    python scripts/bench_startup.py --corpus corpus.txt --config medium --compile auto,on,model --json
    python scripts/bench_startup.py --corpus corpus.txt --config medium --max-time 60s   # + a --max-time run

Steps: (1) the floor, a fresh ``python -c "import torch; <a CUDA tensor>"`` (median of 3); (2) a tokenizer and
the token cache, built once and shared (not timed: the issue's start-up is with the cache built); (3) for each
``--compile`` mode, a cold start (empty ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``, set for that
process) then a warm one (the same caches): ``minillm train --log-format json``, timed from the launch of the
process to the moment its ``startup`` line (printed at the end of the first step) is read, with the phases the
line reports (imports, device, data, model, first_step; see ``minillm.train.loop.startup_breakdown``), and with
``--compile auto`` to the line saying the background compilation has ended (full speed from there); then the run
is stopped (SIGTERM).
With ``--max-time``, one more run of that budget per mode (cold, or ``--budget-cache warm``) reports the share of
the budget spent in training steps (``training_s`` of its ``done`` line, with and without the first step, which
compiles).
Prints one JSON object per measurement (``--json``) or a table; every line is also written to $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINILLM = [sys.executable, "-m", "minillm"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.update(extra)
    return env


def floor_s(device: str, repeats: int = 3) -> float:
    """Seconds of a fresh interpreter that imports torch and creates the device's context."""
    code = f"import torch; torch.zeros(1, device={device!r}); torch.cuda.synchronize() if {device!r} != 'cpu' else None"
    times = []
    for _ in range(repeats):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", code], check=True, env=_env())
        times.append(time.time() - t0)
    return statistics.median(times)


def prepare(corpus: Path, work: Path, vocab: int, config: str, device: str) -> Path:
    """A tokenizer on ``corpus`` and its token cache under ``work`` (built by a one-step uncompiled run)."""
    tok = work / "tokenizer.json"
    if not tok.exists():
        subprocess.run([*MINILLM, "init-tokenizer", "-f", str(corpus), "-o", str(tok), "--vocab-size", str(vocab)],
                       check=True, env=_env(), capture_output=True)
    subprocess.run([*MINILLM, "train", "--config", config, "-c", str(corpus), "-t", str(tok), "-o", str(work / "prep"),
                    "--cache-dir", str(work / "cache"), "--max-steps", "1", "--compile", "off", "--device", device,
                    "--overwrite"], check=True, env=_env(), capture_output=True)
    return tok


def timed_run(args: list[str], env: dict[str, str], stop: bool = True) -> dict:
    """Launch ``minillm train`` (JSON log), return the wall seconds to its ``startup`` line (the end of the first
    step) and to the end of a background compilation (``--compile auto``), that line's phases and the ``done``
    line. ``stop``: end the run (SIGTERM: it saves and exits 143) once start-up and compilation are over."""
    t0 = time.time()
    proc = subprocess.Popen([*MINILLM, "train", *args, "--log-format", "json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out: dict = {}
    background = "--compile" in args and args[args.index("--compile") + 1] == "auto"
    for line in proc.stderr:
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        event = rec.get("event", "")
        if event == "startup":
            out["wall_to_first_step_s"] = round(time.time() - t0, 2)
            out["breakdown"] = {k: v for k, v in rec.items() if k != "event"}
        elif "compil" in event:  # "compiled in the background in ...", "compilation failed ...", "compiling before ..."
            out["compile_event"] = event
            if event.startswith("compiled") or event.startswith("compilation"):
                out["wall_to_compiled_s"] = round(time.time() - t0, 2)
        elif event == "done":
            out["done"] = {k: v for k, v in rec.items() if k != "event"}
        if stop and "breakdown" in out and (not background or "wall_to_compiled_s" in out) and proc.poll() is None:
            proc.terminate()
    proc.wait()
    out["wall_s"] = round(time.time() - t0, 2)
    out["rc"] = proc.returncode
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--config", default="medium")
    ap.add_argument("--compile", default="auto,on,model", help="comma-separated --compile modes to measure")
    ap.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--max-time", default="", help="also a --max-time run of this budget per mode")
    ap.add_argument("--budget-only", action="store_true", help="with --max-time: only the --max-time runs")
    ap.add_argument("--budget-cache", choices=("cold", "warm"), default="cold",
                    help="with --max-time: run the budget on empty compile caches (cold) or on the caches the "
                         "start-up runs filled (warm; with --budget-only, one start-up run fills them first)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        if args.json:
            print(line, flush=True)
        if os.environ.get("OUT"):
            with open(Path(os.environ["OUT"]) / "startup.jsonl", "a") as f:
                f.write(line + "\n")

    if not args.budget_only:
        emit({"what": "floor", "config": args.config, "seconds": round(floor_s(args.device), 2),
              "means": "python -c 'import torch' + a tensor on the device"})
    tok = prepare(args.corpus, work, args.vocab, args.config, args.device)
    base = ["--config", args.config, "-c", str(args.corpus), "-t", str(tok), "--cache-dir", str(work / "cache"),
            "--device", args.device, "--overwrite"]
    for mode in args.compile.split(","):
        caches = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{mode}"), "TRITON_CACHE_DIR": str(work / f"triton-{mode}")}
        for temp in () if args.budget_only else ("cold", "warm"):
            r = timed_run([*base, "-o", str(work / f"run-{mode}-{temp}"), "--compile", mode, "--max-steps", "100000"],
                          _env(**caches))
            emit({"what": "start-up", "config": args.config, "compile": mode, "cache": temp, **r})
        if args.max_time:
            warm = args.budget_cache == "warm"
            filled = None
            if warm and args.budget_only:  # fill the caches the budget run starts from
                filled = timed_run([*base, "-o", str(work / f"run-{mode}-fill"), "--compile", mode, "--max-steps",
                                    "100000"], _env(**caches))["wall_s"]
            budget_caches = caches if warm else {k: f"{v}-budget" for k, v in caches.items()}
            r = timed_run([*base, "-o", str(work / f"run-{mode}-budget"), "--compile", mode, "--max-time", args.max_time],
                          _env(**budget_caches), stop=False)
            done = r.get("done", {})
            elapsed, steps_s, first = done.get("elapsed_s") or 0, done.get("training_s") or 0, done.get("first_update_s") or 0
            emit({"what": "max-time", "config": args.config, "compile": mode, "cache": args.budget_cache,
                  "budget": args.max_time, "filled_caches_s": filled,
                  "steps": done.get("steps"), "best_val_loss": done.get("best_val_loss"), "elapsed_s": elapsed,
                  "share_in_steps": round(steps_s / elapsed, 3) if elapsed else None,
                  "share_in_steps_after_the_first": round((steps_s - first) / elapsed, 3) if elapsed else None,
                  "startup": r.get("breakdown")})
    if not args.json:
        for row in rows:
            print(row)


if __name__ == "__main__":
    main()
