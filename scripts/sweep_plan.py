#!/usr/bin/env python
"""The planner's sweep (issue 21): independent `minillm` runs in parallel, one per GPU, each a `--max-time`
training run scored on held-out documents, written as JSON lines as soon as each finishes.

    python scripts/sweep_plan.py --corpora DIR --out $OUT/sweep            # every GPU, all rounds
    python scripts/sweep_plan.py --corpora DIR --device cpu --workers 1 --max-time 10s --only r2-plan,r2-auto

DIR holds en_techdocs, tiny_es_fortunes and es_bible_rv1909 (.txt or .txt.gz). Each corpus is split by
document (every 20th document held out in val.txt) and its tokenizers are trained on the rest, once, before the
runs (cached in --work). A run: `minillm train --val-file val.txt --max-time T` (its peak CUDA memory read by a
wrapper at exit: torch.cuda.max_memory_allocated), then `minillm evaluate --test-file val.txt` (bits per byte).
Each JSON line also holds the planner's memory figure for the run's config, its steps, training seconds,
tokens/s and epochs from history.json. Every run has its own compile caches, so each compiles cold (a warm
cache would favour the shapes compiled in an earlier round).

Rounds (points in priority order; a GPU takes the next point while the deadline leaves time for it):
  1  tuning corpora: model size x vocabulary x dropout on a 4 MB slice of en_techdocs (en4m), the whole of it
     (en32m) and tiny_es_fortunes: the points that separate the planner's thresholds
  2  held out, es_bible_rv1909: the plan's own config (`minillm plan --write-config`, at run time, on the
     GPU), `train --config auto` (seed 2), and {small, medium, large} x {8k, 32k} presets
  3  more tuning points, run only if the deadline allows
--points cpu: the CPU sweep (CPU_POINTS), one thread, one run at a time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPORA = ("en_techdocs", "tiny_es_fortunes", "es_bible_rv1909")
SLICES = {"en4m": ("en_techdocs", 4_000_000), "en32m": ("en_techdocs", 0), "fortunes": ("tiny_es_fortunes", 0),
          "bible": ("es_bible_rv1909", 0)}
OVERHEAD_S = 45  # start-up, evaluation and the JSON line of a run beyond its --max-time
# runs `minillm` in this process and, at exit, writes torch.cuda.max_memory_allocated() to $SWEEP_PEAK_FILE
WRAPPER = ("import atexit, os, sys\n"
           "def _peak():\n"
           "    import torch\n"
           "    if torch.cuda.is_available() and torch.cuda.is_initialized():\n"
           "        open(os.environ['SWEEP_PEAK_FILE'], 'w').write(str(torch.cuda.max_memory_allocated()))\n"
           "atexit.register(_peak)\n"
           "sys.argv = ['minillm'] + sys.argv[1:]\n"
           "from minillm.cli import main\n"
           "main()\n")


def custom(n_layer: int, n_embd: int, n_head: int) -> dict:
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}


def point(pid: str, corpus: str, vocab: int | str, config: str, *, dropout: float | None = None, seed: int = 1337,
          shape: dict | None = None, args: tuple[str, ...] = ()) -> dict:
    """One run: ``config`` a preset, "plan" (the planner's config) or "auto" (``train --config auto``);
    ``vocab`` a size or "plan" (the plan's recommendation); ``shape`` a custom shape on the preset's recipe."""
    extra = list(args)
    if dropout is not None:
        extra += ["--dropout", str(dropout)]
    for k, v in (shape or {}).items():
        extra += [f"--{k.replace('_', '-')}", str(v)]
    if seed != 1337:
        extra += ["--seed", str(seed)]
    return {"id": pid, "round": int(pid[1]), "corpus": corpus, "vocab": vocab, "config": config, "args": extra}


POINTS = [
    # round 1: the data ratio (small vs medium vs a 4 x 256 shape on 4 MB), vocabulary (2k vs 8k), dropout at
    # ~50 epochs (0.1 vs 0.2), the compute ratio on 32 MB (the plan's medium vs large), a 1 MB corpus (4 x 128)
    point("r1-en4m-small-2k-d2", "en4m", 2048, "small", dropout=0.2),
    point("r1-en4m-small-2k-d1", "en4m", 2048, "small", dropout=0.1),
    point("r1-en4m-small-8k-d2", "en4m", 8192, "small", dropout=0.2),
    point("r1-en4m-medium-2k-d2", "en4m", 2048, "medium", dropout=0.2),
    point("r1-en4m-c4x256-2k-d2", "en4m", 2048, "small", dropout=0.2, shape=custom(4, 256, 4)),
    point("r1-en32m-plan", "en32m", "plan", "plan"),
    point("r1-en32m-large-16k", "en32m", 16384, "large"),
    point("r1-fortunes-c4x128-2k-d2", "fortunes", 2048, "small", dropout=0.2, shape=custom(4, 128, 4),
          args=("--block-size", "64")),
    # round 2: held out
    point("r2-plan", "bible", "plan", "plan"),
    point("r2-auto-seed2", "bible", "plan", "auto", seed=2),
    *(point(f"r2-{p}-{v // 1000}k", "bible", v, p) for p in ("small", "medium", "large") for v in (8192, 32768)),
    # round 3: if time allows
    point("r3-en4m-small-4k-d2", "en4m", 4096, "small", dropout=0.2),
    point("r3-en4m-small-2k-d3", "en4m", 2048, "small", dropout=0.3),
    point("r3-en4m-small-2k-d2-seed2", "en4m", 2048, "small", dropout=0.2, seed=2),
    point("r3-en4m-medium-2k-d3", "en4m", 2048, "medium", dropout=0.3),
    point("r3-fortunes-small-2k-d2", "fortunes", 2048, "small", dropout=0.2),
    point("r3-fortunes-c4x128-8k-d2", "fortunes", 8192, "small", dropout=0.2, shape=custom(4, 128, 4),
          args=("--block-size", "64")),
    point("r3-en32m-medium-16k", "en32m", 16384, "medium"),
    point("r3-en32m-medium-32k", "en32m", 32768, "medium"),
]
# the CPU sweep (--points cpu --device cpu --max-time 5m, one thread, one run at a time): c1 tunes the custom
# shapes on en4m (tiny's recipe), c2 is the held-out check: the plan (two seeds) against {tiny, 4 x 128,
# 4 x 256} x {2k, 8k}; the c1 plan points, last, give the planned runs' figures on the tuning corpora
CPU_SHAPES = {"tiny": None, "c2x128": custom(2, 128, 4), "c4x128": custom(4, 128, 4), "c4x192": custom(4, 192, 6),
              "c4x256": custom(4, 256, 4)}
CPU_POINTS = [
    *(point(f"c1-en4m-{k}-2k", "en4m", 2048, "tiny", shape=v, args=() if v is None else ("--block-size", "128"))
      for k, v in CPU_SHAPES.items()),
    point("c1-en4m-c4x128-8k", "en4m", 8192, "tiny", shape=CPU_SHAPES["c4x128"], args=("--block-size", "128")),
    point("c2-plan", "bible", "plan", "plan"),
    *(point(f"c2-{k}-{v // 1000}k", "bible", v, "tiny", shape=CPU_SHAPES[k],
            args=() if k == "tiny" else ("--block-size", "128"))
      for k in ("tiny", "c4x128", "c4x256") for v in (2048, 8192)),
    point("c2-plan-seed2", "bible", "plan", "plan", seed=2),  # the spread of two seeds
    point("c1-fortunes-plan", "fortunes", "plan", "plan"),  # planned runs on the tuning corpora: expected figures
    point("c1-en32m-plan", "en32m", "plan", "plan"),
]
PLAN_VOCABS = (2048, 4096, 8192, 16384, 32768)  # tokenizers made ready for the plan's recommendation


def minillm(args: list[str], env: dict | None = None, log: Path | None = None, wrap: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", WRAPPER, *args] if wrap else [sys.executable, "-m", "minillm", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if log is not None:
        log.write_text(f"$ minillm {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    if r.returncode != 0:
        tail = " | ".join((r.stderr or "").strip().splitlines()[-4:])
        raise RuntimeError(f"minillm {args[0]} failed ({r.returncode}): {tail}")
    return r


def read_source(corpora: Path, name: str, work: Path) -> Path:
    """The corpus ``name`` as a plain file under ``work`` (decompressed once)."""
    dst = work / "src" / f"{name}.txt"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        gz, txt = corpora / f"{name}.txt.gz", corpora / f"{name}.txt"
        if gz.is_file():
            with gzip.open(gz, "rb") as f, open(dst, "wb") as g:
                shutil.copyfileobj(f, g)
        elif txt.is_file():
            shutil.copyfile(txt, dst)
        else:
            raise SystemExit(f"--corpora {corpora}: neither {gz.name} nor {txt.name}")
    return dst


def split(corpora: Path, name: str, work: Path) -> dict:
    """train.txt and val.txt of a slice (every 20th document held out), made once."""
    from minillm.corpus.read import iter_documents

    d = work / name
    train, val = d / "train.txt", d / "val.txt"
    if not val.is_file():
        d.mkdir(parents=True, exist_ok=True)
        source, limit = SLICES[name]
        docs, n = [], 0
        for doc in iter_documents(read_source(corpora, source, work)):
            docs.append(doc)
            n += len(doc.encode("utf-8"))
            if limit and n >= limit:
                break
        for path, keep in ((train, lambda i: i % 20 != 19), (val, lambda i: i % 20 == 19)):
            path.write_text("\n<|doc|>\n".join(x for i, x in enumerate(docs) if keep(i)) + "\n", encoding="utf-8")
    return {"train": train, "val": val, "dir": d}


def tokenizer(files: dict, vocab: int) -> Path:
    tok = files["dir"] / f"tok{vocab}.json"
    if not tok.is_file():
        tmp = tok.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.json")
        minillm(["init-tokenizer", "--files", str(files["train"]), "--vocab-size", str(vocab), "--out", str(tmp)])
        tmp.replace(tok)
    return tok


def prepare(points: list[dict], corpora: Path, work: Path, plan_vocabs: tuple[int, ...]) -> dict[str, dict]:
    """Splits and tokenizers of every point (and ``plan_vocabs`` for the plan's), in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    slices = {p["corpus"]: split(corpora, p["corpus"], work) for p in points}
    jobs = {(p["corpus"], v) for p in points for v in (plan_vocabs if p["vocab"] == "plan" else (p["vocab"],))}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda cv: tokenizer(slices[cv[0]], cv[1]), sorted(jobs)))
    return slices


def history(outdir: Path) -> dict:
    evals = json.loads((outdir / "history.json").read_text())["evals"]
    last = evals[-1]
    return {"steps": last["step"], "epochs": last["epoch"], "train_s": last["train_s"],
            "first_step_s": last["first_step_s"], "tokens_per_s_train": round(last["tokens"] / max(last["train_s"], 1e-9)),
            "tokens_per_s_wall": round(last["tokens_per_s"]), "best_val_loss": min(e["val_loss"] for e in evals)}


def planner_memory(outdir: Path, device: str) -> dict:
    """The planner's memory figures for the run's resolved config (config.json): the plan's (the peak of a
    ``--compile auto`` run on ``device``), the compiled step's and the eager estimate."""
    from minillm.config import model_from_dict, train_from_dict
    from minillm.model.memory import estimate_memory
    from minillm.plan.devices import compiled_memory, detect

    cfg = json.loads((outdir / "config.json").read_text())
    m, t = model_from_dict(cfg["model"]), train_from_dict(cfg["train"])
    return {"memory_plan_estimate": detect(device).memory_needed(m, t.batch_size, t.optimizer),
            "memory_compiled_estimate": compiled_memory(m, t.batch_size),
            "memory_eager_estimate": estimate_memory(m, t.batch_size, optimizer=t.optimizer)["total"],
            "model": {k: cfg["model"][k] for k in ("n_layer", "n_embd", "n_head", "block_size", "dropout", "vocab_size")},
            "train": {k: cfg["train"][k] for k in ("batch_size", "accumulation_steps", "optimizer", "stride", "lr")}}


def run_point(p: dict, slices: dict, work: Path, device: str, gpu: int | None, max_time: str) -> dict:
    files = slices[p["corpus"]]
    out = work / "runs" / p["id"]
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {"SWEEP_PEAK_FILE": str(work / "logs" / f"{p['id']}.peak"),  # every run compiles cold, as a user's first
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor" / p["id"]), "TRITON_CACHE_DIR": str(work / "triton" / p["id"])}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    res: dict = {"id": p["id"], "round": p["round"], "corpus": p["corpus"], "config": p["config"], "args": p["args"]}
    t0 = time.time()
    config, budget = p["config"], max_time
    vocab = p["vocab"]
    if vocab == "plan" or config == "plan":
        r = minillm(["plan", "--corpus", str(files["train"]), "--budget", max_time, "--device", device, "--json",
                     *(["--write-config", str(work / f"{p['id']}.toml")] if config == "plan" else [])], env=env,
                    log=logs / f"{p['id']}.plan.log")
        plan = json.loads(r.stdout)
        vocab = plan["vocab_size"]
        res["plan"] = {k: plan[k] for k in ("shape", "preset", "model", "train", "vocab_size", "memory_bytes", "bpb",
                                            "steps", "epochs", "tokens_per_s", "reasons")}
        if config == "plan":
            config, budget = str(work / f"{p['id']}.toml"), f"{plan['budget_s']:g}s"
    res["vocab"] = vocab
    tok = tokenizer(files, int(vocab))
    r = minillm(["train", "-t", str(tok), "-c", str(files["train"]), "--val-file", str(files["val"]), "-o", str(out),
                 "--config", config, "--max-time", budget, "--device", device, "--log-format", "json", *p["args"]],
                env=env, log=logs / f"{p['id']}.train.log", wrap=True)
    res["wall_train_s"] = round(time.time() - t0, 1)
    res["summary"] = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(history(out))
    peak = Path(env["SWEEP_PEAK_FILE"])
    res["peak_memory"] = int(peak.read_text()) if peak.is_file() else None
    res.update(planner_memory(out, device))
    if res["peak_memory"]:
        res["memory_estimate_ratio"] = round(res["memory_plan_estimate"] / res["peak_memory"], 3)
    r = minillm(["evaluate", "--ckpt", str(out / "ckpt_best.pt"), "--test-file", str(files["val"]), "--json",
                 "--batch-size", "64", "--device", device], env=env, log=logs / f"{p['id']}.eval.log")
    ev = json.loads(r.stdout)
    res.update(bits_per_byte=round(ev["bits_per_byte"], 4), eval_loss=round(ev["loss"], 4),
               wall_s=round(time.time() - t0, 1))
    return res


def summarize(lines: list[dict]) -> dict:
    """Round 2's check: the plan's bits per byte against the best preset of the grid."""
    r2 = {x["id"]: x for x in lines if x.get("round") == 2 and "bits_per_byte" in x}
    planned = [k for k in r2 if "plan" in k or "auto" in k]  # round 2's planned runs; the rest is the grid
    grid = {k: v["bits_per_byte"] for k, v in r2.items() if k not in planned}
    out: dict = {"summary": True, "grid": grid}
    if grid:
        best = min(grid, key=grid.get)
        out["best_grid"] = [best, grid[best]]
        for k in planned:
            if k in r2:
                out[k] = [r2[k]["bits_per_byte"], round(r2[k]["bits_per_byte"] / grid[best] - 1, 4)]
    return out


def table(lines: list[dict]) -> str:
    """The finished runs as a markdown table (docs/BENCHMARKS.md), in the order of the points."""
    order = {p["id"]: i for i, p in enumerate(POINTS + CPU_POINTS)}
    rows = ["| run | corpus | model (layers x width, block) | vocab | dropout | steps | epochs | training s | tokens/s "
            "| peak GiB (planner's) | bits per byte |", "| --- " * 11 + "|"]
    for x in sorted((x for x in lines if "bits_per_byte" in x), key=lambda x: order.get(x["id"], 99)):
        m = x["model"]
        plan = x.get("memory_plan_estimate", x["memory_compiled_estimate"])  # earlier lines: the compiled figure
        peak = (f"{x['peak_memory'] / 2**30:.2f} ({plan / 2**30:.2f})" if x.get("peak_memory")
                else f"- ({x['memory_eager_estimate'] / 2**30:.2f} eager)")
        rows.append(f"| {x['id']} | {x['corpus']} | {m['n_layer']} x {m['n_embd']}, {m['block_size']} | {x['vocab']} | "
                    f"{m['dropout']:g} | {x['steps']:,} | {x['epochs']:.1f} | {x['train_s']:.1f} | "
                    f"{x['tokens_per_s_train']:,} | {peak} | {x['bits_per_byte']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", type=Path, required=True, help="folder with the corpora (.txt or .txt.gz)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/sweep_plan")),
                    help="where results.jsonl goes (default $OUT)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sweep_plan_work"), help="splits, tokenizers, runs")
    ap.add_argument("--device", default="cuda", help="cuda (one run per GPU) or cpu")
    ap.add_argument("--workers", type=int, default=0, help="parallel runs (default: one per GPU; 1 on cpu)")
    ap.add_argument("--max-time", default="2m", help="each run's --max-time")
    ap.add_argument("--deadline", type=float, default=555,
                    help="seconds from the start: start no run that cannot end by then (a run takes --max-time + 45 s)")
    ap.add_argument("--points", default="gpu", choices=("gpu", "cpu"), help="the GPU sweep's points or the CPU's")
    ap.add_argument("--only", default="", help="comma-separated point ids (default: all)")
    ap.add_argument("--list", action="store_true", help="print the points and exit")
    ap.add_argument("--table", type=Path, help="print a results.jsonl as a markdown table and exit")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(x) for x in args.table.read_text().splitlines() if x.strip()]))
        return
    points = [p for p in (POINTS if args.points == "gpu" else CPU_POINTS) if not args.only or p["id"] in args.only.split(",")]
    if args.list:
        for p in points:
            print(json.dumps(p))
        return
    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {json.loads(x)["id"] for x in results.read_text().splitlines() if x.strip()} if results.is_file() else set()
    points = [p for p in points if p["id"] not in done]  # a rerun continues where the last one stopped
    if args.device == "cpu":
        workers, gpus = args.workers or 1, [None] * (args.workers or 1)
    else:
        import torch

        n = torch.cuda.device_count()
        workers = args.workers or n
        gpus = [i % max(n, 1) for i in range(workers)]
    # a GPU sweep makes every vocabulary the plan may pick ready in parallel; a CPU one trains the one it picks
    slices = prepare(points, args.corpora, args.work, PLAN_VOCABS if args.device != "cpu" else ())
    from minillm.config import parse_duration

    per_run = parse_duration(args.max_time) + OVERHEAD_S
    lock = threading.Lock()
    todo: queue.Queue = queue.Queue()
    for p in points:
        todo.put(p)

    def emit(line: dict) -> None:
        with lock:
            with results.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)

    emit({"id": "env", "prep_s": round(time.time() - t_start, 1), "device": args.device, "workers": workers,
          **gpu_info()})

    def worker(gpu: int | None) -> None:
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            if time.time() - t_start + per_run > args.deadline:
                emit({"id": p["id"], "round": p["round"], "skipped": "deadline"})
                continue
            try:
                emit(run_point(p, slices, args.work, args.device, gpu, args.max_time))
            except Exception as e:  # one failed run must not stop the others
                emit({"id": p["id"], "round": p["round"], "error": str(e)[-500:]})

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    emit({"id": "summary", "total_s": round(time.time() - t_start, 1), **summarize(lines)})


def gpu_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__}
        return {"torch": torch.__version__}
    except ImportError:
        return {}


if __name__ == "__main__":
    main()
