"""The training loop: ``fit(ctx, state)`` steps, logs, evaluates and saves until the schedule, the time budget,
patience or a signal ends the run. ``TrainContext`` holds everything it works with; ``minillm.train.run.setup_run``
builds it, the same way for ``train`` and ``finetune``.

Faults: SIGINT/SIGTERM set a flag the loop checks between steps (a step is never cut in half), then
``ckpt_last.pt`` is saved and the run exits 130/143; a second signal aborts at once. Every file is written
atomically, so SIGKILL at any moment leaves the previous checkpoints loadable. A non-finite loss or
gradient skips the step; several in a row stop the run without touching the last good checkpoint. Under
torchrun every rank takes each of these decisions at the same step. With ``MINILLM_STEP_SYNC=log`` a step is
skipped on the device (it still counts as a step) and the loop learns of it when it reads the steps' (loss, norm)
back: at its log steps, before an evaluation or a save, and at the end.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minillm import distributed
from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, TrainConfig, to_dict
from minillm.data.loader import Loader, Prefetcher
from minillm.errors import MiniLLMError
from minillm.io import atomic_link
from minillm.optim.groups import UNBOUNDED, Schedule, lr_at
from minillm.train.budget import (
    REPLAN_MARGIN,
    eta,
    expected_step_s,
    first_eval_s,
    out_of_time,
    ready_to_plan,
    replan,
    step_time,
    too_big_warning,
)
from minillm.train.log import (
    TrainLog,
    epoch_of,
    eval_record,
    fmt_duration,
    peak_flops,
    record_train_loss,
    write_history,
)
from minillm.train.state import RunState, total_steps_for
from minillm.train.step import estimate_val_loss, make_train_step, read_back, yield_to_compiler

MAX_BAD_STEPS = 5  # non-finite steps in a row that stop the run

# Turns the checkpoint the loop is about to save into the one written (finetune: adds its record; LoRA: the
# merged weights under "model" and the adapter apart under "lora").
CheckpointHook = Callable[[dict[str, Any]], dict[str, Any]]


class Interrupted(MiniLLMError):
    """SIGINT (exit 130) or SIGTERM (exit 143)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.exit_code = code


class Signals:
    """SIGINT/SIGTERM handling. While ``deferred`` (inside the loop), the first signal only sets ``code``, which
    the loop checks between steps; outside it, or on a second signal, ``Interrupted`` is raised at once."""

    def __init__(self, outdir: Path = Path(".")) -> None:
        self.code, self.deferred, self.outdir = 0, False, outdir
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        code = 130 if signum == signal.SIGINT else 143
        if self.deferred and not self.code:
            self.code, self._at = code, time.monotonic()
            return
        if self.deferred and distributed.under_torchrun() and time.monotonic() - self._at < 2.0:
            return  # torchrun's agent forwards the Ctrl-C the terminal already sent: the same request, not a second
        raise Interrupted(code, f"interrupted; checkpoints already in {self.outdir} are intact "
                                f"(continue with the same command and --resume if ckpt_last.pt exists)")

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class TrainContext:
    """What the loop trains, reads, reports to and saves into (``run.setup_run`` builds it)."""

    outdir: Path  # the run directory
    mcfg: ModelConfig  # the run's model config (as recorded in config.json and each checkpoint)
    tcfg: TrainConfig  # the run's training config
    model: nn.Module  # the model itself: evaluation and saving (under FSDP, its sharded self)
    train_model: nn.Module  # what the training forward and backward go through: compiled, in DDP under torchrun
    optimizers: list[torch.optim.Optimizer]  # AdamW, then Muon when used
    scaler: torch.amp.GradScaler  # the fp16 loss scaler (disabled otherwise)
    loader: Loader  # this rank's training batches
    val_batches: list[np.ndarray]  # this rank's share of the fixed validation batches, each (B, T+1)
    device: torch.device
    dtype: torch.dtype  # autocast precision
    doc_id: int  # the <|doc|> token (document masking)
    tok_sha: str  # sha256 of the tokenizer, recorded in each checkpoint
    t_entry: float  # time.time() at which the run's clock, counted across resumes, read 0
    dist: distributed.Dist  # this process's place (one process: Dist())
    log: TrainLog
    signals: Signals  # deferred while the loop runs
    sharded: bool = False  # the model is sharded by FSDP: saving gathers it on every rank
    saved: Callable[[], None] = _nothing  # called after each checkpoint (the first deletes a replaced run)
    on_save: CheckpointHook | None = None
    startup: dict[str, float] = field(default_factory=dict)  # time.time() when each start-up phase ended

    def reducer(self, op: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``reduce(t)``: ``t`` reduced in place over the ranks with ``op``; None for one process."""
        if not self.dist.enabled:
            return None
        return lambda t: distributed.all_reduce_(t, self.dist, op)

    def agreed(self, values: list[float]) -> list[float]:
        """Each value's maximum over the ranks (the values themselves for one process)."""
        return distributed.agree_max(values, self.dist) if self.dist.enabled else values


# ---------------------------------------------------------------- saving and evaluating


def save_run(path: Path, ctx: TrainContext, state: RunState, loader_state: dict) -> None:
    """Write a resumable checkpoint atomically. Rank 0 alone writes; with a sharded model (FSDP) every rank
    must call this, since the whole weights and optimizer state are first gathered from all of them."""
    if ctx.sharded:
        weights, optim = distributed.full_state_dicts(ctx.model, ctx.optimizers)  # a collective
    if not ctx.dist.is_main:
        return
    if not ctx.sharded:
        weights, optim = ctx.model.state_dict(), [o.state_dict() for o in ctx.optimizers]
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None}
    ckpt = {
        "model": weights, "model_config": to_dict(ctx.mcfg), "train_config": to_dict(ctx.tcfg),
        "optimizer": optim, "scaler": ctx.scaler.state_dict(),
        "loader": dict(loader_state), "run_state": dataclasses.asdict(state), "rng": rng,
        "tokenizer_sha256": ctx.tok_sha,
    }
    save_checkpoint(path, ctx.on_save(ckpt) if ctx.on_save else ckpt)
    ctx.saved()


def evaluate_and_save(ctx: TrainContext, state: RunState, loader_state: dict, lr: float) -> None:
    """Validation loss -> history record, patience counter, ckpt_last (+ ckpt_best), history.json, curves.png."""
    tcfg, log, outdir = ctx.tcfg, ctx.log, ctx.outdir
    state.elapsed_s = time.time() - ctx.t_entry
    # the uncompiled model: an eval-mode, no-grad graph would be compiled anew (tens of seconds on a GPU)
    val = estimate_val_loss(ctx.model, ctx.val_batches, tcfg, ctx.doc_id, ctx.device, ctx.dtype,
                            reduce=ctx.reducer("sum"))
    if not math.isfinite(val):
        raise MiniLLMError(f"validation loss is {val} at step {state.step}: the weights diverged; the last good "
                           f"checkpoint in {outdir} is kept. Lower --lr (now {tcfg.lr:g}) or use --precision "
                           f"bf16/fp32, then start again or --resume")
    rec = eval_record(state, val, lr, ctx.loader, loader_state)
    record_train_loss(state, tcfg.log_every)
    state.running = []
    state.history.append(rec)
    improved = val < state.best_val
    state.bad_evals = 0 if improved else state.bad_evals + 1
    state.best_val = min(state.best_val, val)
    log.event("eval", step=state.step, val_loss=round(val, 4), val_ppl=round(rec["val_ppl"], 2),
              best="yes" if improved else "no", **({"epochs": rec["source_epochs"]} if "source_epochs" in rec else {}))
    log.scalars(state.step, {"val/loss": val, "val/ppl": rec["val_ppl"]})
    log.flush()
    save_run(outdir / "ckpt_last.pt", ctx, state, loader_state)  # rank 0 writes
    if ctx.dist.is_main:
        if improved:  # the same bytes: linked, not written twice
            atomic_link(outdir / "ckpt_last.pt", outdir / "ckpt_best.pt")
        write_history(outdir, state.history, state.train_history)


# ---------------------------------------------------------------- the loop


START_PHASES = ("imports", "device", "data", "model")  # the marks setup_run records, in order


def startup_breakdown(marks: dict[str, float], first_step_end: float) -> dict[str, float]:
    """Seconds of each start-up phase, from ``marks`` (``"start"``: the process started, then each of
    ``START_PHASES`` when it ended) to the end of the first step: imports (Python, torch, minillm, the command
    line), device (CUDA initialisation, the memory check), data (run directory, token cache, validation
    batches), model (build, optimizers, restore), first_step (its compilation included), and total."""
    if "start" not in marks:
        return {}
    out, prev = {}, marks["start"]
    for name in START_PHASES:
        if name in marks:
            out[f"{name}_s"], prev = round(marks[name] - prev, 2), marks[name]
    out["first_step_s"] = round(first_step_end - prev, 2)
    out["total_s"] = round(first_step_end - marks["start"], 2)
    return out


def _count_skip(bad: int, n: int, skipped: str | None, ctx: TrainContext) -> int:
    """The non-finite steps in a row once step ``n`` is known (``skipped``: why its update was skipped, or None);
    a skip is logged, and ``MAX_BAD_STEPS`` of them in a row stop the run."""
    if skipped is None:
        return 0
    bad += 1
    ctx.log.event(f"step {n}: {skipped}; update skipped ({bad} in a row)")
    if bad >= MAX_BAD_STEPS:
        raise MiniLLMError(
            f"{bad} non-finite steps in a row at step {n}: the learning rate is likely too "
            f"high (try --lr {ctx.tcfg.lr / 3:.2g}), fp16 overflowed (try --precision bf16 or fp32), or "
            f"--grad-clip is off; the last good checkpoint in {ctx.outdir} is kept")
    return bad


def fit(ctx: TrainContext, state: RunState) -> dict[str, Any]:
    """The loop: step, log, evaluate, save. Ends with the schedule, the time budget, patience or a signal."""
    tcfg, log, sig, outdir, loader, device = ctx.tcfg, ctx.log, ctx.signals, ctx.outdir, ctx.loader, ctx.device
    sched = Schedule(**state.schedule)
    step_fn = make_train_step(ctx.model, ctx.train_model, ctx.optimizers, tcfg, device, ctx.dtype, ctx.doc_id,
                              ctx.scaler, reduce=ctx.reducer("mean"))
    world = ctx.dist.world_size
    tokens_per_step = tcfg.batch_size * tcfg.accumulation_steps * ctx.mcfg.block_size * world
    flops, peak = ctx.model.flops_per_token(), peak_flops(device)
    limit = total_steps_for(tcfg, loader.windows_per_epoch) or UNBOUNDED
    clock = lambda: time.time() - ctx.t_entry  # noqa: E731  the run's seconds, across resumes
    loader_state = loader.state_dict()  # what has been consumed; read before the prefetcher runs ahead
    prefetch = Prefetcher(loader, pin=device.type == "cuda", threads=tcfg.num_workers)
    durs: list[float] = []  # seconds of each step this process ran (the first includes compilation)
    # a background compilation (--compile auto) pending: the eager steps' times plan nothing
    compiling, steps_s = getattr(ctx.train_model, "compiling", False), 0.0
    eval_s, bad, end, saved_step, lr = 0.0, 0, "schedule", state.step, lr_at(state.step, sched)
    evals_here, provisional, plan_eval_s = 0, False, 0.0  # evaluations here; a first plan made from a compiling one
    last_eval = state.history[-1]["step"] if state.history else -1
    t_log, step_log = time.time(), state.step
    pending: list[tuple[int, torch.Tensor]] = []  # deferred steps (MINILLM_STEP_SYNC=log) not read back yet
    last_loss = math.nan  # the last read-back step's loss

    def settle() -> None:
        """Read the deferred steps back: skips counted and logged, losses into the running average."""
        nonlocal bad, last_loss
        for n, loss, skipped in read_back(pending):
            bad = _count_skip(bad, n, skipped, ctx)
            if skipped is None:
                state.running.append(loss)
                last_loss = loss
        pending.clear()

    warning = too_big_warning(expected_step_s(flops * tokens_per_step, device), device, tcfg.max_time)
    if warning:
        log.event(warning)
    sig.deferred = True
    try:
        while True:
            code = sig.code
            # the first step's time includes compilation: until a second step is timed, none is predicted (a
            # compilation that took most of the budget would otherwise end the run after one step)
            over = out_of_time(tcfg.max_time, clock(), step_time(durs) if len(durs) > 1 else 0.0, eval_s)
            if world > 1:  # every rank stops at the same step: a signal or the time limit on one is on all
                code, over = (int(v) for v in distributed.agree_max([code, over], ctx.dist))
            if code:
                settle()
                if saved_step != state.step:
                    state.elapsed_s = clock()
                    save_run(outdir / "ckpt_last.pt", ctx, state, loader_state)
                raise Interrupted(code, f"interrupted at step {state.step}: saved {outdir / 'ckpt_last.pt'}; "
                                        f"continue with the same command and --resume")
            if state.step >= sched.total:
                break
            if over:
                if state.step == 0:  # a fresh run whose budget the setup spent: no empty "success"
                    raise MiniLLMError(
                        f"--max-time {fmt_duration(tcfg.max_time)} was spent before the first step (setup took "
                        f"{fmt_duration(clock())}: the token cache, the model, compilation); give a larger "
                        f"--max-time (the token cache is kept, so the next start is faster)")
                end = "max_time"
                break
            lr, t0 = lr_at(state.step, sched), time.time()
            r = step_fn(prefetch, lr / tcfg.lr)
            if compiling:
                yield_to_compiler(device)
            loader_state = r.loader_state
            if r.skipped:
                bad = _count_skip(bad, state.step + 1, r.skipped, ctx)
                continue
            if r.stats is None:
                bad = 0
            else:
                pending.append((state.step + 1, r.stats))
                if not steps_s:  # the first step's time is the GPU's too
                    settle()
            durs.append(time.time() - t0)
            if not steps_s:  # this process's first step
                state.first_step_s += durs[0]
                log.event("startup", **startup_breakdown(ctx.startup, t0 + durs[0]))
            else:
                state.train_s += durs[-1]
            steps_s += durs[-1]
            if compiling and not getattr(ctx.train_model, "compiling", False):  # now compiled: time only such steps
                compiling, durs[1:] = False, []
            state.step, state.tokens = state.step + 1, state.tokens + tokens_per_step
            if r.stats is None:
                state.running.append(r.loss)
            total = sched.total if sched.total < UNBOUNDED else 0
            eval_every = tcfg.eval_every or state.eval_every or max(1, sched.total // 10)
            log.progress(state.step, total)
            if state.step % tcfg.log_every == 0 or state.step == 1:
                settle()
                record_train_loss(state, tcfg.log_every)
                tps = tokens_per_step * (state.step - step_log) / max(time.time() - t_log, 1e-9)
                eta_s = eta(durs, total - state.step if total else None, eval_every, eval_s,
                            tcfg.max_time - clock() if tcfg.max_time else None)
                loss = r.loss if r.stats is None else last_loss  # deferred: the last step read back
                log.step(state.step, total, epoch_of(loader, loader_state), loss, lr, tps,
                         flops * tps / peak if peak else None, eta_s)
                t_log, step_log = time.time(), state.step
            plan_now = ready_to_plan(state, durs, tcfg.max_time) and not compiling
            if not state.planned and world > 1:  # ranks time their steps apart: plan when any is ready
                plan_now = bool(distributed.agree_max([plan_now], ctx.dist)[0])
            if plan_now or state.step % eval_every == 0 or state.step >= sched.total:
                t0 = time.time()
                settle()
                evaluate_and_save(ctx, state, loader_state, lr)
                eval_s, last_eval, saved_step = time.time() - t0, state.step, state.step
                evals_here += 1
                t_log += eval_s  # tokens/s counts training time only
                if tcfg.patience and state.bad_evals >= tcfg.patience:
                    end = "early_stopping"
                    log.event(f"early stopping: {tcfg.patience} evaluations without improvement")
                    break
            # after each evaluation, and each log step of a planned run (its evaluations may be few or none)
            if tcfg.max_time and len(durs) >= 2 and not compiling and (
                    last_eval == state.step or (state.planned and state.step % tcfg.log_every == 0)):
                now, step_s, ev_s = ctx.agreed([clock(), step_time(durs), eval_s])  # the same plan on all ranks
                first_plan = not state.planned
                redo = (provisional and last_eval == state.step and evals_here >= 2  # the first steady evaluation,
                        and state.step < sched.total)  # unless it was the final one
                if first_plan and evals_here == 1:  # that evaluation also compiled: plan with its steady cost
                    ev_s = plan_eval_s = first_eval_s(ev_s, step_s, tcfg)
                elif provisional and not redo:  # until the next evaluation measures the steady cost
                    ev_s = plan_eval_s
                sched = replan(state, sched, tcfg, now, step_s, ev_s, limit, log.event,
                               redo_interval=evals_here if redo and abs(ev_s - plan_eval_s) > REPLAN_MARGIN * plan_eval_s else 0)
                provisional = (first_plan and evals_here == 1) or (provisional and not redo)
    finally:
        sig.deferred = False
        prefetch.close()
    settle()
    if last_eval != state.step and state.step > 0:  # ended by the time budget between evaluations
        evaluate_and_save(ctx, state, loader_state, lr)
    state.elapsed_s = clock()
    best = state.best_val if math.isfinite(state.best_val) else None  # None: never evaluated
    summary = {"steps": state.step, "best_val_loss": best, "end": end, "outdir": str(outdir),
               "elapsed_s": round(state.elapsed_s, 2), "training_s": round(steps_s, 2),  # this process's optimizer steps
               "first_update_s": round(durs[0], 2) if durs else None}
    log.event("done", **summary)
    return summary
