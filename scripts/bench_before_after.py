#!/usr/bin/env python
"""Throughput of this tree against an earlier one, on the same machine in one call: the ratio is the figure.

    git archive c624e6b | tar -x -C .gpu/before        # the "before" tree, in a folder git ignores
    python scripts/bench_before_after.py --before .gpu/before --repeats 3 --configs small,medium
    python scripts/bench_before_after.py --before .gpu/before --repeats 3 --generate large

Runs each tree's own ``scripts/bench_train.py --json`` (or ``bench_generate.py --json``) as a separate
process, alternating before / after so that drift of the machine hits both alike, ``--repeats`` times, and
prints the median of each tree, the ratio after / before, and every run, as a table (``--json``: one object).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_json(tree: Path, script: str, args: list[str]) -> list[dict]:
    """The JSON objects a tree's benchmark script prints (one per line, or one indented object)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(tree / "scripts" / script), *args, "--json"], cwd=tree, env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{tree}/scripts/{script} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    text = out.stdout.strip()
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def figures(rows: list[dict], generate: bool) -> dict[str, float]:
    """The numbers compared: tokens/s per config (training), or per decode measure (generation)."""
    if not generate:
        return {r["config"]: float(r["tokens_per_s"]) for r in rows}
    return {r["name"]: float(r["tokens_per_s"]) for r in rows[0]["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the earlier tree (holding its own scripts/)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tree; the median is compared")
    ap.add_argument("--configs", default="small,medium", help="training presets, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    ap.add_argument("--generate", default="", help="compare bench_generate.py on this preset instead of training")
    ap.add_argument("--modes", default="graph", help="decode modes for --generate (bench_generate.py --modes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    gen = bool(args.generate)
    script = "bench_generate.py" if gen else "bench_train.py"
    bench_args = (["--config", args.generate, "--no-uncached", "--repeats", "1", "--modes", args.modes] if gen else
                  [a for c in args.configs.split(",") for a in ("--config", c)]
                  + ["--steps", str(args.steps), "--warmup", "5"])
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.repeats):
        for name, tree in (("before", args.before.resolve()), ("after", ROOT)):
            runs[name].append(figures(run_json(tree, script, bench_args), gen))
            print(f"run {i + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    keys = list(runs["after"][0])
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    ratio = {k: round(med["after"][k] / med["before"][k], 4) for k in keys}
    result = {"script": script, "args": bench_args, "repeats": args.repeats, "median": med, "ratio": ratio,
              "runs": runs}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'measure':<36} {'before':>12} {'after':>12} {'after/before':>13}")
    for k in keys:
        print(f"{k:<36} {med['before'][k]:>12,.0f} {med['after'][k]:>12,.0f} {ratio[k]:>13.3f}")
    print(f"# medians of {args.repeats} alternating runs of {script} {' '.join(bench_args)}")


if __name__ == "__main__":
    main()
