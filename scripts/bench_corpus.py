"""Benchmark prepare-corpus and analyze-corpus on the shared corpora: MB/s and peak memory.

Inputs: ../shared/corpora/en_techdocs.txt (32 MB) and the three shared corpora concatenated three
times (about 110 MB, written to a temp dir; prepared with --no-dedup). Each command runs as a child
process (`python -m minillm ...`); its wall time gives MB/s (input bytes / seconds, process start
included) and os.wait4 gives its peak RSS (the largest single process among it and its workers).
analyze-corpus runs without a tokenizer and with one (a byte-level BPE of 8,000 trained here on the
Bible corpus); the tokenizer's own encode_batch speed on the same documents, in the same 1 MiB
batches, is the reference.

    .venv/bin/python scripts/bench_corpus.py [--repeats 3] [--json] [--tokenizer-on-large]
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
CORPORA = ROOT.parent / "shared" / "corpora"
NAMES = ["en_techdocs", "es_bible_rv1909", "tiny_es_fortunes"]


def run_child(args: list[str]) -> tuple[float, float, str]:
    """Run ``python -m minillm ARGS``; returns (wall seconds, peak RSS in MB, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "minillm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=ROOT)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"minillm {' '.join(args)} failed ({p.returncode}):\n{err.decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out.decode()


def setup(td: Path) -> None:
    """Write the 110 MB input and train the tokenizer (in a child, so the parent stays small: a child's
    peak RSS counts its parent's size at fork time)."""
    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    parts = [(CORPORA / f"{n}.txt").read_text(encoding="utf-8").strip("\n") for n in NAMES]
    (td / "three_corpora_x3.txt").write_text("\n<|doc|>\n".join(parts * 3) + "\n", encoding="utf-8")
    save_tokenizer(train_tokenizer(iter_documents(CORPORA / "es_bible_rv1909.txt"), 8000), td / "tokenizer.json")


def helper(*args: str) -> str:
    return subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout


def tokenizer_reference(path: Path, tok_path: Path) -> float:
    """MB/s of the tokenizer's own encode_batch on the corpus's documents, in 1 MiB batches."""
    from minillm.corpus.read import batch_documents, iter_documents
    from minillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    batches = list(batch_documents(iter_documents(path), 1 << 20))
    t0 = time.perf_counter()
    for b in batches:
        tok.encode_batch(b, add_special_tokens=False)
    return path.stat().st_size / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--tokenizer-on-large", action="store_true", help="also run the tokenizer comparison on the 110 MB input (slow)")
    ap.add_argument("--_setup", help=argparse.SUPPRESS)
    ap.add_argument("--_reference", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._setup:
        return setup(Path(args._setup))
    if args._reference:
        print(tokenizer_reference(Path(args._reference[0]), Path(args._reference[1])))
        return
    if not CORPORA.is_dir():
        raise SystemExit(f"{CORPORA} not found: this benchmark needs the shared corpora")

    results = []
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        helper("--_setup", str(td))
        big = td / "three_corpora_x3.txt"
        tok = td / "tokenizer.json"

        inputs = [("en_techdocs (32 MB)", CORPORA / "en_techdocs.txt", []),
                  ("3 corpora x3 (110 MB), --no-dedup", big, ["--no-dedup"])]
        for label, path, extra in inputs:
            mb = path.stat().st_size / 1e6
            cases = [("prepare-corpus", ["prepare-corpus", "-i", str(path), "-o", str(td / "out.txt"), "--json", *extra]),
                     ("analyze-corpus", ["analyze-corpus", "-c", str(path), "--json"])]
            if path != big or args.tokenizer_on_large:
                cases.append(("analyze-corpus --tokenizer", ["analyze-corpus", "-c", str(path), "--json", "-t", str(tok)]))
            for name, cmd in cases:
                runs = [run_child(cmd) for _ in range(args.repeats)]
                runs_load = round(os.getloadavg()[0], 1)
                wall = statistics.median(r[0] for r in runs)
                rss = max(r[1] for r in runs)
                row = {"input": label, "mb": round(mb, 1), "command": name, "seconds": round(wall, 2),
                       "mb_per_s": round(mb / wall, 2), "peak_rss_mb": round(rss, 1), "runs": [round(r[0], 2) for r in runs], "load_avg_1m": runs_load}
                if name.endswith("--tokenizer"):
                    ref = statistics.median(float(helper("--_reference", str(path), str(tok))) for _ in range(args.repeats))
                    row["encode_batch_mb_per_s"] = round(ref, 2)
                    row["ratio_to_encode_batch"] = round(mb / wall / ref, 3)
                results.append(row)
                if not args.json:
                    extra_txt = (f"  encode_batch alone {row['encode_batch_mb_per_s']} MB/s "
                                 f"(ratio {row['ratio_to_encode_batch']})" if "ratio_to_encode_batch" in row else "")
                    print(f"{label:36s} {name:28s} {row['seconds']:7.2f} s {row['mb_per_s']:7.2f} MB/s "
                          f"peak {row['peak_rss_mb']:7.1f} MB  load {runs_load}{extra_txt}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "load_avg_1m": round(os.getloadavg()[0], 2), "repeats": args.repeats}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
    else:
        print(json.dumps(meta))


if __name__ == "__main__":
    main()
