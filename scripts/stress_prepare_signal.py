"""Stress prepare-corpus's SIGINT/SIGTERM handling: run it many times with its worker pool, signal it at a random
moment after its first results, and count hangs (no exit within --hang-after seconds) and wrong endings (exit
code, stderr other than the one line, a temp file left, the previous output changed).

A hung run's Python stacks (every thread of the parent and its workers, via faulthandler on SIGUSR1) and each
thread's kernel wait channel are written to --report-dir before it is killed.

    .venv/bin/python scripts/stress_prepare_signal.py --runs 100 --jobs 2 [--signal INT|TERM|both]

This is what tests/test_faults.py::test_prepare_corpus_stops_on_a_signal_with_one_line_and_no_temp does once;
the CI hang it reproduces was seen about once in 8 full-suite runs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = "error: interrupted ({}); no partial output was left, and files from before are unchanged"
CODES = {"INT": 130, "TERM": 143}
STACKS = "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def write_input(path: Path, mb: int) -> None:
    """The same input as tests/test_faults.py's big_input."""
    body = " ".join(("tierra cielo agua luz dia noche hombre mujer casa camino rey pueblo ciudad monte rio mar " * 30)
                    .split())
    n = mb * (1 << 20) // len(body)
    path.write_text("\n<|doc|>\n".join(f"Documento {i}. {body} {i}" for i in range(n)) + "\n", encoding="utf-8")


def temps(d: Path) -> list[Path]:
    return [p for p in d.glob(".*") if p.name.endswith(".tmp")]


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group (the parent and its workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def thread_states(pid: int) -> str:
    lines = []
    for t in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            wchan = (t / "wchan").read_text()
            state = (t / "stat").read_text().rsplit(")", 1)[1].split()[0]
            lines.append(f"  tid {t.name}: state {state} wchan {wchan}")
        except OSError:
            pass
    return "\n".join(lines)


def signal_name(i: int, which: str) -> str:
    """Run ``i``'s signal: --signal's, or INT and TERM in turn."""
    return which if which != "both" else ("INT" if i % 2 == 0 else "TERM")


def one_run(i: int, args, src: Path, sitedir: Path) -> tuple[str, str]:
    """One prepare-corpus run signalled once: ('ok' | 'early' | 'late' | 'hang' | 'wrong', detail)."""
    rng = random.Random(args.seed * 100003 + i)
    name = signal_name(i, args.signal)
    sig = getattr(signal, f"SIG{name}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as td:
        out, err = Path(td) / "corpus.txt", Path(td) / "err"
        out.write_text("previous\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{sitedir}"}
        with err.open("w") as ef:
            p = subprocess.Popen([sys.executable, "-m", "minillm", "prepare-corpus", "-i", str(src), "-o", str(out),
                                  "--workers", str(args.workers)], cwd=ROOT, env=env, stderr=ef,
                                 stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 120
            while not any(t.stat().st_size for t in temps(Path(td))) and p.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, args.delay_max))
            if p.poll() is not None:
                return "early", f"run {i} SIG{name}: finished before the signal"
            if sig == signal.SIGINT:
                os.killpg(p.pid, sig)  # Ctrl-C: the whole group
            else:
                p.send_signal(sig)
            try:
                code = p.wait(timeout=args.hang_after)
            except subprocess.TimeoutExpired:
                return "hang", hang_report(i, name, p, err, args.report_dir)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        time.sleep(0.3)  # workers stopped by the parent write whatever they would
        text = err.read_text()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if out.read_text() != "previous\n" and not temps(Path(td)):  # its output was in place when the signal came
            if code == CODES[name] and not (len(lines) == 1 and "written in full" in lines[0] and str(out) in lines[0]):
                return "wrong", f"run {i} SIG{name}: its output was replaced but stderr says {text[-500:]!r}"
            return "late", f"run {i} SIG{name}: signalled after its output was written: exit {code}, stderr {text!r}"
        problems = []
        if code != CODES[name]:
            problems.append(f"exit {code}, not {CODES[name]}")
        if lines != [EXPECTED.format(f"SIG{name}")]:
            problems.append(f"stderr {text[-1500:]!r}")
        if temps(Path(td)):
            problems.append(f"temp left: {temps(Path(td))}")
        if out.read_text() != "previous\n":
            problems.append("the previous output changed")
        return ("wrong", f"run {i} SIG{name}: " + "; ".join(problems)) if problems else ("ok", "")


def hang_report(i: int, name: str, p: subprocess.Popen, err: Path, report_dir: Path) -> str:
    """Kernel wait channels and Python stacks of a hung run's processes, written to a file; returns its path."""
    pids = group_pids(p.pid)
    states = "\n".join(f"pid {pid}{' (parent)' if pid == p.pid else ''}:\n{thread_states(pid)}" for pid in pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass
    time.sleep(2)
    path = report_dir / f"hang_{i}_SIG{name}.txt"
    path.write_text(f"{states}\n\n--- stderr (stacks on SIGUSR1) ---\n{err.read_text()}")
    return f"run {i} SIG{name}: hung; stacks in {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="prepare-corpus runs (each signalled once)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each is a parent and --workers workers)")
    ap.add_argument("--signal", choices=["INT", "TERM", "both"], default="both", help="both: alternate")
    ap.add_argument("--workers", type=int, default=2, help="prepare-corpus --workers")
    ap.add_argument("--mb", type=int, default=12, help="input size in MiB (the test's is 12)")
    ap.add_argument("--delay-max", type=float, default=0.5, help="random wait after the first results, seconds")
    ap.add_argument("--hang-after", type=float, default=60, help="seconds after the signal that count as a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-dir", type=Path, default=Path(tempfile.gettempdir()) / "stress_prepare_signal")
    ap.add_argument("--tmp", default=None, help="where each run's directory is made (default: the system's)")
    args = ap.parse_args()
    args.report_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        src, sitedir = Path(td) / "in.txt", Path(td) / "site"
        write_input(src, args.mb)
        sitedir.mkdir()
        (sitedir / "sitecustomize.py").write_text(STACKS)
        counts: dict[str, int] = {}
        t0 = time.time()
        with ThreadPoolExecutor(args.jobs) as ex:
            for i, (kind, detail) in enumerate(ex.map(lambda i: one_run(i, args, src, sitedir), range(args.runs))):
                key = f"SIG{signal_name(i, args.signal)} {kind}"
                counts[key] = counts.get(key, 0) + 1
                if detail and kind not in ("early", "late"):
                    print(detail, flush=True)
    print(f"{args.runs} runs (--workers {args.workers}, {args.jobs} at a time) in {time.time() - t0:.0f} s: "
          + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())), flush=True)


if __name__ == "__main__":
    main()
