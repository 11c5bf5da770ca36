"""scripts/sweep_plan.py's CPU path: the same code the GPU sweep runs (splits, tokenizers, the plan at run time,
``train --config auto``, a preset with a custom shape, evaluation, the JSON lines), at tiny budgets."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[1]
POINTS = "r1-fortunes-c4x128-2k-d2,r2-plan,r2-auto-seed2,r2-small-8k"


def _corpora(folder: Path) -> Path:
    folder.mkdir()
    for i, name in enumerate(("en_techdocs", "tiny_es_fortunes", "es_bible_rv1909")):
        text = make_corpus(folder / f"{name}.plain", n_docs=400, seed=i).read_bytes()
        (folder / f"{name}.txt.gz").write_bytes(gzip.compress(text))
    return folder


def _sweep(tmp_path: Path, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, "scripts/sweep_plan.py", "--corpora", str(tmp_path / "corpora"),
                        "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--device", "cpu", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_sweep_runs_each_kind_of_point_on_cpu_and_writes_a_line_per_run(tmp_path):
    _corpora(tmp_path / "corpora")
    lines = _sweep(tmp_path, "--max-time", "8s", "--deadline", "100000", "--only", POINTS)  # no deadline skips
    runs = {x["id"]: x for x in lines if x["id"] in POINTS.split(",")}
    assert set(runs) == set(POINTS.split(","))
    for x in runs.values():
        assert "error" not in x, x
        assert 0 < x["bits_per_byte"] < 10 and x["steps"] >= 1 and x["memory_compiled_estimate"] > 0
    plan = runs["r2-plan"]
    assert plan["vocab"] == plan["plan"]["vocab_size"]
    assert plan["model"]["n_layer"] == plan["plan"]["model"]["n_layer"]  # trained by the plan's config
    custom = runs["r1-fortunes-c4x128-2k-d2"]
    assert {k: v for k, v in custom["model"].items() if k != "vocab_size"} == {
        "n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 64, "dropout": 0.2}
    assert custom["train"]["optimizer"] == "muon" and custom["vocab"] == 2048  # small's recipe, a 2k tokenizer
    assert runs["r2-small-8k"]["vocab"] == 8192 and runs["r2-small-8k"]["model"]["n_embd"] == 256
    summary = lines[-1]
    assert summary["id"] == "summary" and summary["best_grid"] == ["r2-small-8k", runs["r2-small-8k"]["bits_per_byte"]]
    results = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert {json.loads(x)["id"] for x in results} >= set(POINTS.split(","))
    again = _sweep(tmp_path, "--max-time", "8s", "--deadline", "100000", "--only", POINTS)  # resumable: finished runs are not redone
    assert [x["id"] for x in again] == ["env", "summary"]
    r = subprocess.run([sys.executable, "scripts/sweep_plan.py", "--corpora", ".", "--table",
                        str(tmp_path / "out" / "results.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    rows = r.stdout.splitlines()
    assert len(rows) == 2 + 4 and rows[2].startswith("| r1-fortunes-c4x128-2k-d2 | fortunes | 4 x 128, 64 | 2048 | 0.2 |")


def test_sweep_skips_points_the_deadline_leaves_no_time_for(tmp_path):
    _corpora(tmp_path / "corpora")
    lines = _sweep(tmp_path, "--max-time", "2m", "--deadline", "60", "--only", "r2-plan")
    assert {"id": "r2-plan", "round": 2, "skipped": "deadline"} in lines


def test_sweep_points_are_unique_and_in_rounds():
    r = subprocess.run([sys.executable, "scripts/sweep_plan.py", "--corpora", ".", "--list"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    points = [json.loads(x) for x in r.stdout.splitlines()]
    ids = [p["id"] for p in points]
    assert len(ids) == len(set(ids)) and [p["round"] for p in points] == sorted(p["round"] for p in points)
    assert sum(p["round"] == 2 for p in points) == 8  # the plan, auto, and {small, medium, large} x {8k, 32k}
