"""Smoke tests of the benchmark scripts on CPU with the tiny config (they print figures; CI checks they run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_train_runs_on_cpu_with_the_tiny_config():
    out = _run("scripts/bench_train.py", "--config", "configs/tiny.toml", "--device", "cpu", "--steps", "2",
               "--warmup", "1", "--vocab", "512", "--json")
    row = json.loads(out.strip().splitlines()[-1])
    assert row["tokens_per_s"] > 0 and row["block"] == 64 and row["step_ms"] > 0


def test_bench_generate_runs_on_cpu_with_the_tiny_config():
    out = _run("scripts/bench_generate.py", "--config", "tiny", "--device", "cpu", "--vocab", "512",
               "--new-tokens", "8", "--batch", "2", "--batch-new-tokens", "4", "--prompt-len", "8", "--json")
    res = json.loads(out)
    assert res["batch1_tokens_per_s"] > 0
