#!/usr/bin/env python
"""Data-parallel training on N GPUs of one machine: throughput scaling and loss parity (issue 9's measures).

    python scripts/bench_ddp.py --corpus ../shared/corpora/en_techdocs.txt --json /tmp/ddp.json
    python scripts/bench_ddp.py --config gpt2-124m --corpus corpus.txt.gz --fsdp --budget 500
    python scripts/bench_ddp.py --config configs/tiny.toml --device cpu --nproc 2 --corpus tiny.txt \\
        --vocab 512 --vocab-size 512 --steps 2 --warmup 1 --max-steps 6 --eval-every 3 --eval-batches 1   # CPU smoke

For each --config (default: large and gpt2-124m):

- Scaling: scripts/bench_train.py (random tokens, the trainer's own step, compiled on CUDA, median of --steps
  timed steps after --warmup) in one process, then under `torchrun --standalone --nproc_per_node N` at the same
  micro-batch per GPU: bench_train's default (the issue-8 table's: 64 x 1024 for large, 32 x 1024 for
  gpt2-124m, vocabulary 32,000 / 50,304) or --batch-size. The N-process tokens/s count all ranks; the ratio is
  N-process tokens/s over one-process tokens/s (issue 9's target for 2 GPUs: >= 1.85).
- Loss parity: the corpus is split as scripts/bench_quality.py splits it (every 20th document to a validation
  file, a byte-level BPE of --vocab-size tokens trained on the rest; .txt or .txt.gz), then `minillm train`
  runs once in one process at --batch-size N*B and once with `--nproc N` at --batch-size B (the same global
  batch: the same windows in the same order), with the same --max-steps, --eval-every, --eval-batches and
  seed. Reported: the largest |difference| of the validation losses at the evaluations both runs made
  (issue 9's target: <= 0.02 nats at each). B = --parity-batch, default the preset's micro-batch.
- --fsdp [CONFIG ...] adds FSDP2 rows (`--fsdp` on the N-process runs) for the given configs (all of them
  when none is named); presets with the Muon optimizer (small, medium) cannot use FSDP and are skipped.

Every sub-run's command, stdout and stderr go to a log file in --logs; a failed sub-run prints its log's tail
and the script goes on with the next. Figures are printed as each sub-run ends, with its elapsed time;
--json PATH is rewritten after every sub-run. --budget S: a sub-run that would start with fewer than 15 s
of the S left is skipped, one still running at S is stopped (SIGTERM, SIGKILL 40 s later); --sub-timeout caps
each. The DDP rows come first (for every config), the
FSDP rows last. At the end: a markdown table for docs/BENCHMARKS.md and the exact commands.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "en_techdocs.txt"
SCALING_TARGET, PARITY_TARGET = 1.85, 0.02


def slug(config: str) -> str:
    """A file-name-safe name of a preset or TOML file."""
    return Path(config).stem if config.endswith(".toml") else config


def show(cmd: list[str]) -> str:
    """The command as a user would type it (``python`` for this interpreter)."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def train_defaults(config: str) -> tuple[int, str]:
    """(micro-batch, optimizer) of a preset or TOML file."""
    from minillm.config import resolve

    _, t = resolve(config)
    return t.batch_size, t.optimizer


class Bench:
    """Runs the sub-runs one after another, records them, keeps the JSON file current."""

    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.runs: list[dict] = []
        self.scaling: dict[str, dict[str, dict]] = {}  # config -> mode ("1", "ddp", "fsdp") -> bench_train row
        self.parity: dict[str, dict[str, dict]] = {}  # config -> mode -> {history, ...}
        self.prep: dict | None = None
        self.prep_error: str | None = None
        args.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast

    def elapsed(self) -> float:
        return time.time() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def left(self) -> float | None:
        return self.args.budget - self.elapsed() if self.args.budget else None

    def run(self, label: str, cmd: list[str]) -> dict:
        """Run ``cmd`` in its own process group with stdout captured and stderr to a log; never raises."""
        rec = {"label": label, "cmd": show(cmd), "log": str(self.args.logs / f"{label}.log")}
        left = self.left()
        if left is not None and left < 15:
            rec.update(rc=None, skipped=f"--budget {self.args.budget}s spent", elapsed_s=0.0)
            self.say(f"{label}: skipped ({rec['skipped']})")
            self.runs.append(rec)
            return rec
        limit = self.args.sub_timeout if left is None else min(self.args.sub_timeout, left)
        self.say(f"{label}: started (the command is in its log and in the list at the end)"
                 if not self.args.dry_run else f"{label}: {rec['cmd']}")
        t0, out = time.time(), ""
        if self.args.dry_run:
            rec.update(rc=0, elapsed_s=0.0, stdout="")
            self.runs.append(rec)
            return rec
        with open(rec["log"], "w", encoding="utf-8") as log:
            log.write(f"$ {rec['cmd']}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True,
                                    start_new_session=True)  # its own group: a timeout ends torchrun's workers too
            try:
                out, _ = proc.communicate(timeout=limit)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                out, rc = self._stop(proc), 124
                log.write(f"\n[bench_ddp] stopped after {limit:.0f} s (--sub-timeout / --budget)\n")
            except KeyboardInterrupt:
                self._stop(proc)
                raise
            log.write("\n--- stdout ---\n" + (out or ""))
        rec.update(rc=rc, elapsed_s=round(time.time() - t0, 1), stdout=out or "")
        if rc != 0:
            tail = Path(rec["log"]).read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
            print("\n".join(f"    | {line}" for line in tail), file=sys.stderr, flush=True)
            self.say(f"{label}: FAILED (exit {rc}) after {rec['elapsed_s']} s; log {rec['log']}")
        self.runs.append(rec)
        return rec

    @staticmethod
    def _stop(proc: subprocess.Popen) -> str:
        """Stop a sub-run; returns its stdout. SIGTERM to its process group first: torchrun passes it on to its
        workers (which run in sessions of their own) and waits up to 30 s for them. 40 s later, SIGKILL to the
        group and to every process the sub-run started, so no orphaned worker keeps a GPU or the stdout pipe."""
        tree, out = _descendants(proc.pid), ""
        for sig, wait in ((signal.SIGTERM, 40), (signal.SIGKILL, 10)):
            if sig == signal.SIGKILL:
                tree += _descendants(proc.pid)
                _kill_tree(tree, sig)
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        _kill_tree(tree, signal.SIGKILL)  # workers left behind by a launcher that died first
        for _ in range(100):  # until they are gone (their GPU memory freed for the next sub-run), at most 10 s
            if all(_gone(pid, started) for pid, started in tree):
                break
            time.sleep(0.1)
        return out or ""

    # --- scaling -------------------------------------------------------------------------------------------
    def scaling_run(self, config: str, mode: str) -> None:
        a = self.args
        n = 1 if mode == "1" else a.nproc
        bt = ["scripts/bench_train.py", "--config", config, "--device", a.device, "--steps", str(a.steps),
              "--warmup", str(a.warmup), "--json"]
        if a.batch_size:
            bt += ["--batch-size", str(a.batch_size)]
        if a.vocab:
            bt += ["--vocab", str(a.vocab)]
        if mode == "fsdp":
            bt.append("--fsdp")
        cmd = [sys.executable, *bt] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(n), *bt]
        label = f"scaling-{slug(config)}-{mode if n > 1 else 'single'}"
        rec = self.run(label, cmd)
        if rec.get("rc") != 0 or a.dry_run:
            return
        rows = [json.loads(line) for line in rec["stdout"].splitlines() if line.startswith("{")]
        if not rows:
            self.say(f"{label}: no JSON row in its output; log {rec['log']}")
            return
        row = rows[-1]
        rec["result"] = row
        self.scaling.setdefault(config, {})[mode] = row
        what = "1 GPU" if n == 1 else f"{n} GPUs, {mode}"
        msg = (f"scaling {config}, {what}, micro-batch {row['batch']} x {row['block']} per GPU: "
               f"{row['tokens_per_s']:,} tokens/s (step {row['step_ms']} ms, MFU per GPU {_unit(row['mfu_pct'], '%')}, "
               f"peak memory per GPU {_unit(row['peak_mem_GiB'], ' GiB')}, first step {row['first_step_s']} s)")
        one = self.scaling[config].get("1")
        if n > 1 and one:
            ratio = row["tokens_per_s"] / one["tokens_per_s"]
            row["ratio_vs_1"] = round(ratio, 3)
            tgt = f" (target >= {SCALING_TARGET}x for 2 GPUs)" if n == 2 else ""
            msg += f" = {ratio:.3f}x one GPU{tgt}"
        self.say(f"{msg}; sub-run {rec['elapsed_s']} s")

    # --- parity --------------------------------------------------------------------------------------------
    def prepare(self) -> dict | None:
        if self.prep is not None or self.prep_error is not None or self.args.dry_run:
            return self.prep
        a = self.args
        self.say(f"preparing {a.corpus} in {a.workdir} (split, tokenizer, token caches; reused when present)")
        t0 = time.time()
        try:
            from bench_quality import prepare

            self.prep = prepare(a.corpus, a.workdir, a.vocab_size)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - bench_quality exits on a failed sub-command
            self.prep_error = f"{type(e).__name__}: {e}"
            self.say(f"preparation FAILED: {self.prep_error}; the parity runs are skipped")
            return None
        self.say(f"prepared in {time.time() - t0:.1f} s: {json.dumps({k: v for k, v in self.prep.items() if k.endswith('_s')})}")
        return self.prep

    def parity_run(self, config: str, mode: str) -> None:
        a = self.args
        n = 1 if mode == "1" else a.nproc
        left = self.left()
        info = self.prepare() if left is None or left >= 15 else None  # (else run() records the skip)
        work = a.workdir
        tok = info["tokenizer"] if info else str(work / f"tokenizer{a.vocab_size}.json")
        train = info["train"] if info else str(work / "train.txt")
        val = info["val"] if info else str(work / "val.txt")
        label = f"parity-{slug(config)}-{mode if n > 1 else 'single'}"
        if info is None and not a.dry_run and self.prep_error:
            self.say(f"{label}: skipped (no prepared corpus: {self.prep_error})")
            self.runs.append({"label": label, "rc": None, "skipped": "preparation failed", "elapsed_s": 0.0})
            return
        b = a.parity_batch or train_defaults(config)[0]
        outdir = work / "runs" / label
        cmd = [sys.executable, "-m", "minillm", "train", "--tokenizer", tok, "--corpus", train, "--val-file", val,
               "--outdir", str(outdir), "--overwrite", "--cache-dir", str(work / "cache"), "--config", config,
               "--batch-size", str(b * a.nproc if n == 1 else b), "--max-steps", str(a.max_steps),
               "--eval-every", str(a.eval_every), "--eval-batches", str(a.eval_batches), "--seed", str(a.seed),
               "--log-every", str(a.eval_every), "--log-format", "json", "--device", a.device]
        if n > 1:
            cmd += ["--nproc", str(n)]
        if mode == "fsdp":
            cmd.append("--fsdp")
        rec = self.run(label, cmd)
        if rec.get("rc") != 0 or a.dry_run:
            return
        try:
            evals = json.loads((outdir / "history.json").read_text())["evals"]
        except (OSError, ValueError, KeyError) as e:
            self.say(f"{label}: no history.json ({e}); log {rec['log']}")
            return
        curve = {int(e["step"]): float(e["val_loss"]) for e in evals}
        if not a.keep_checkpoints:  # ~1-2 GB each for large / gpt2-124m; only the history is needed
            for name in ("ckpt_last.pt", "ckpt_best.pt"):
                (outdir / name).unlink(missing_ok=True)
        res = {"gpus": n, "batch_per_gpu": b * a.nproc if n == 1 else b, "global_batch": b * a.nproc,
               "val_loss": curve, "steps": evals[-1]["step"] if evals else 0,
               "train_tokens_per_s": evals[-1].get("tokens_per_s") if evals else None,
               "train_s": evals[-1].get("train_s") if evals else None,
               "first_step_s": evals[-1].get("first_step_s") if evals else None}
        rec["result"] = res
        self.parity.setdefault(config, {})[mode] = res
        losses = ", ".join(f"{v:.4f} @{s}" for s, v in sorted(curve.items()))
        what = f"1 GPU at batch {res['batch_per_gpu']}" if n == 1 else f"{n} GPUs ({mode}) at batch {b} per GPU"
        msg = f"parity {config}, {what}: val loss {losses}"
        one = self.parity[config].get("1")
        if n > 1 and one:
            common = sorted(set(curve) & set(one["val_loss"]))
            diffs = {s: curve[s] - one["val_loss"][s] for s in common}
            res["diff_vs_1"] = diffs
            res["max_abs_diff"] = max((abs(d) for d in diffs.values()), default=None)
            if common:
                msg += (f"; max |val loss - 1 GPU's| = {res['max_abs_diff']:.3g} nats over {len(common)} evaluations "
                        f"(target <= {PARITY_TARGET})")
            else:
                msg += "; no evaluation step in common with the 1-GPU run"
        self.say(f"{msg}; sub-run {rec['elapsed_s']} s")

    # --- report --------------------------------------------------------------------------------------------
    def table(self) -> list[dict]:
        rows = []
        for config in self.args.config:
            sc, pa = self.scaling.get(config, {}), self.parity.get(config, {})
            for mode in ("1", "ddp", "fsdp"):
                s, p = sc.get(mode), pa.get(mode)
                if s is None and p is None:
                    continue
                last = p and max(p["val_loss"], default=None)
                rows.append({
                    "preset": config, "gpus": 1 if mode == "1" else self.args.nproc,
                    "wrapper": "-" if mode == "1" else mode,
                    "micro_batch": f"{s['batch']} x {s['block']}" if s else None,
                    "tokens_per_s": s["tokens_per_s"] if s else None,
                    "ratio_vs_1": s.get("ratio_vs_1") if s else None,
                    "mfu_pct_per_gpu": s["mfu_pct"] if s else None,
                    "peak_mem_GiB_per_gpu": s["peak_mem_GiB"] if s else None,
                    "parity_batch": f"{p['batch_per_gpu']} x {p['gpus']}" if p else None,
                    "parity_final_val_loss": round(p["val_loss"][last], 4) if p and last is not None else None,
                    "parity_max_abs_diff": p.get("max_abs_diff") if p else None,
                })
        return rows

    def markdown(self) -> str:
        def fmt(v, spec=""):
            return "—" if v is None else format(v, spec)

        lines = ["| preset | GPUs | wrapper | micro-batch per GPU | tokens/s (all GPUs) | vs 1 GPU | MFU per GPU | "
                 "peak memory per GPU | parity batch (per GPU × GPUs) | final val loss | max \\|Δ val loss\\| vs 1 GPU |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.table():
            lines.append(f"| {r['preset']} | {r['gpus']} | {r['wrapper']} | {fmt(r['micro_batch'])} | "
                         f"{fmt(r['tokens_per_s'], ',')} | {fmt(r['ratio_vs_1'], '.2f')}{'×' if r['ratio_vs_1'] else ''} | "
                         f"{fmt(r['mfu_pct_per_gpu'])}{'%' if r['mfu_pct_per_gpu'] is not None else ''} | "
                         f"{fmt(r['peak_mem_GiB_per_gpu'])}{' GiB' if r['peak_mem_GiB_per_gpu'] is not None else ''} | "
                         f"{fmt(r['parity_batch'])} | {fmt(r['parity_final_val_loss'])} | "
                         f"{fmt(r['parity_max_abs_diff'], '.3g')} |")
        return "\n".join(lines)

    def device(self) -> str | None:
        rows = [s for c in self.scaling.values() for s in c.values()]
        return rows[0]["device"] if rows else None

    def write_json(self) -> None:
        if not self.args.json:
            return
        a = self.args
        doc = {"date": _dt.date.today().isoformat(), "host": platform.node(), "device": self.device(),
               "torch": _torch_version(), "nproc": a.nproc, "elapsed_s": round(self.elapsed(), 1),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "prep": self.prep, "prep_error": self.prep_error, "scaling": self.scaling,
               "parity": {c: {m: {**r, "val_loss": {str(k): v for k, v in r["val_loss"].items()}}
                              for m, r in ms.items()} for c, ms in self.parity.items()},
               "table": self.table(), "markdown": self.markdown(),
               "runs": [{k: v for k, v in r.items() if k != "stdout"} for r in self.runs]}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        tmp.replace(a.json)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process from /proc; None when it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def _gone(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` has ended (its entry read once: it may end meanwhile)."""
    st = _stat(pid)
    return st is None or st[1] != started


def _descendants(pid: int) -> list[tuple[int, str]]:
    """The processes started, directly or not, by ``pid``, as (pid, start time); empty without /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    try:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for q in pids:
        st = _stat(q)
        if st is not None:
            children.setdefault(st[0], []).append((q, st[1]))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c[0])
    return out


def _kill_tree(procs: list[tuple[int, str]], sig: int) -> None:
    """Signal each (pid, start time) that is still that same process (a pid reused since is left alone)."""
    for pid, started in procs:
        st = _stat(pid)
        if st is not None and st[1] == started:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _unit(v, unit: str) -> str:
    return "n/a" if v is None else f"{v}{unit}"


def _torch_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001 - informative only
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", help="preset or TOML file (repeat); default: large, gpt2-124m")
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the data-parallel runs")
    ap.add_argument("--device", default="auto", help="auto or cuda (one GPU per process), or cpu (gloo)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text corpus for the parity runs (.txt/.txt.gz)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/minillm-bench-ddp"),
                    help="split corpus, tokenizer, token caches and runs (reused when present)")
    ap.add_argument("--logs", type=Path, default=None, help="one log per sub-run (default WORKDIR/logs)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after each sub-run)")
    ap.add_argument("--steps", type=int, default=30, help="scaling: timed steps (bench_train --steps)")
    ap.add_argument("--warmup", type=int, default=8, help="scaling: untimed steps first, compilation included")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="scaling: micro-batch per GPU (default bench_train's: 64 for large, 32 for gpt2-124m)")
    ap.add_argument("--vocab", type=int, default=0, help="scaling: vocabulary size (default bench_train's)")
    ap.add_argument("--parity-batch", type=int, default=0,
                    help="parity: micro-batch B per GPU of the N-process run; one process runs N*B "
                         "(default: the preset's micro-batch)")
    ap.add_argument("--max-steps", type=int, default=200, help="parity: optimizer steps of each run")
    ap.add_argument("--eval-every", type=int, default=50, help="parity: evaluate every N steps")
    ap.add_argument("--eval-batches", type=int, default=20, help="parity: validation batches (of the global batch)")
    ap.add_argument("--seed", type=int, default=1337, help="parity: train --seed")
    ap.add_argument("--vocab-size", type=int, default=32000, help="parity: tokenizer vocabulary")
    ap.add_argument("--skip-scaling", action="store_true", help="no throughput runs")
    ap.add_argument("--skip-parity", action="store_true", help="no loss-parity runs")
    ap.add_argument("--fsdp", nargs="*", default=None, metavar="CONFIG",
                    help="add FSDP2 rows for these configs (all AdamW ones when none is named)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole script (0 = none)")
    ap.add_argument("--sub-timeout", type=float, default=300, help="seconds for one sub-run")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the parity runs' checkpoints")
    ap.add_argument("--dry-run", action="store_true", help="print the sub-runs' commands only")
    args = ap.parse_args()
    args.config = args.config or ["large", "gpt2-124m"]
    args.logs = args.logs or args.workdir / "logs"
    if args.nproc < 2:
        ap.error("--nproc: give 2 or more processes to compare with one")
    fsdp = [] if args.fsdp is None else (args.fsdp or list(args.config))
    for c in fsdp:
        if c not in args.config:
            ap.error(f"--fsdp {c}: not among the --config values ({', '.join(args.config)})")

    bench = Bench(args)
    os.environ["PYTHONPATH"] = bench.env["PYTHONPATH"]  # for bench_quality's own `python -m minillm` calls
    bench.say(f"bench_ddp: configs {', '.join(args.config)}; {args.nproc} processes; device {args.device}; "
              f"torch {_torch_version()}; host {platform.node()}")
    plan: list[tuple[str, str, str]] = []
    for c in args.config:
        if not args.skip_scaling:
            plan += [("scaling", c, "1"), ("scaling", c, "ddp")]
        if not args.skip_parity:
            plan += [("parity", c, "1"), ("parity", c, "ddp")]
    for c in fsdp:
        if train_defaults(c)[1] == "muon":
            bench.say(f"fsdp {c}: skipped (its preset uses Muon, which FSDP cannot shard; AdamW presets only)")
            continue
        if not args.skip_scaling:
            plan.append(("scaling", c, "fsdp"))
        if not args.skip_parity:
            plan.append(("parity", c, "fsdp"))
    bench.say(f"{len(plan)} sub-runs: " + ", ".join(f"{k} {c} {'1 process' if m == '1' else m}" for k, c, m in plan))
    try:
        for kind, config, mode in plan:
            (bench.scaling_run if kind == "scaling" else bench.parity_run)(config, mode)
            bench.write_json()
    finally:
        bench.write_json()
        print(f"\n## Data-parallel training, {args.nproc} processes — {bench.device() or args.device}, "
              f"torch {_torch_version()}, {_dt.date.today().isoformat()}\n", flush=True)
        print(bench.markdown())
        print("\nCommands (from the repository root):\n")
        print("```bash")
        for r in bench.runs:
            if "cmd" in r:
                status = "" if r.get("rc") == 0 else f"   # {'skipped' if r.get('rc') is None else 'FAILED, exit ' + str(r['rc'])}"
                print(f"{r['cmd']}{status}")
        print("```")
        print(f"\nTotal {bench.elapsed():.1f} s" + (f"; results in {args.json}" if args.json else ""), flush=True)


if __name__ == "__main__":
    main()
