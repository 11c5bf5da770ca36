"""The training run: setup, the loop, evaluation, checkpoints, exact resume, time budgets and faults.

Layering (after litgpt): ``train(spec)`` sets up the run (output directory, lock, data, model, optimizer,
resume) and calls ``fit``, the loop itself, which only steps, logs, evaluates and saves. Beside it:
``minillm.train.step`` (one optimizer step, one validation pass), ``minillm.optim.groups`` (optimizer groups and the
``lr_at`` schedule), ``minillm.train.rundir`` (existing-run and resume guards) and ``minillm.train.log`` (progress
lines, the progress bar, TensorBoard, MFU).

Faults: SIGINT/SIGTERM set a flag the loop checks between steps (a step is never cut in half), then
``ckpt_last.pt`` is saved and the run exits 130/143; a second signal aborts at once. Every file is written
atomically, so SIGKILL at any moment leaves the previous checkpoints loadable. A non-finite loss or
gradient skips the step; several in a row stop the run without touching the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm import distributed
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import ModelConfig, TrainConfig, pad_vocab, to_dict
from minillm.data.loader import Mixture
from minillm.errors import MiniLLMError, UsageError
from minillm.io import RunLock, atomic_link, atomic_write_json, clean_stale_temps, sha256_file
from minillm.optim.groups import (
    UNBOUNDED,
    Schedule,
    configure_optimizer,
    lr_at,
    rescheduled,
    schedule_for,
)
from minillm.train.log import (
    PEAK_FLOPS,
    TrainLog,
    check_tensorboard,
    fmt_duration,
    is_main_process,
    peak_flops,
)
from minillm.train.rundir import (
    check_resume,
    config_diff,
    inputs_of,
    prepare_outdir,
    refuse_diffs,
    replacing,
    run_config,
    write_run_files,
)
from minillm.train.step import (
    estimate_val_loss,
    make_train_step,
    maybe_compile,
    resolve_device,
    resolve_precision,
)

__all__ = ["PEAK_FLOPS", "RunSpec", "RunState", "train", "fit", "lr_at", "configure_optimizer", "peak_flops",
           "make_train_step", "maybe_compile", "resolve_device", "resolve_precision", "estimate_val_loss"]

RUN_FORMAT = 1
LENGTH_KEYS = ("max_steps", "epochs", "max_time")
MAX_BAD_STEPS = 5  # non-finite steps in a row that stop the run


@dataclass(frozen=True)
class RunSpec:
    """Where a run reads and writes, and how it reports, apart from the model and training configs."""

    tokenizer: Path  # tokenizer.json the corpus is encoded with (copied into the run)
    corpus: Mixture  # the clean corpus file(s): one corpus is a mixture of one
    outdir: Path  # the run directory
    val_file: Path | None = None  # a separate validation corpus instead of a split
    cache_dir: Path | None = None  # token cache directory (default OUTDIR/cache)
    resume: bool = False  # continue from OUTDIR/ckpt_last.pt
    overwrite: bool = False  # replace the run in OUTDIR
    log_format: str = "text"  # progress lines: text or json
    config_name: str = "tiny"  # the preset or TOML file the configs came from (recorded)
    tensorboard: bool = False  # write TensorBoard event files to OUTDIR/tb
    started: float = 0.0  # time.time() when the command started (--max-time counts from it); 0 = train()'s call
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP


@dataclass
class RunState:
    """Everything a checkpoint restores besides weights, optimizer, scaler, loader position and RNG."""

    step: int = 0  # optimizer steps done
    best_val: float = math.inf  # best validation loss so far
    bad_evals: int = 0  # evaluations since the best one (the patience counter)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    tokens: int = 0  # training tokens seen
    elapsed_s: float = 0.0  # wall-clock seconds of the run so far, across resumes
    running: list[float] = field(default_factory=list)  # training losses since the last evaluation
    schedule: dict[str, Any] | None = None  # the optim.Schedule, as a dict
    eval_every: int = 0  # evaluation interval fixed by a --max-time plan (0: from --eval-every or total / 10)
    planned: bool = True  # False until a --max-time run has measured its step time and fixed its total
    train_s: float = 0.0  # seconds spent in training steps, leaving out each process's first (compilation)
    first_step_s: float = 0.0  # seconds of the first step (includes torch.compile), summed over resumes


def total_steps_for(cfg: TrainConfig, windows_per_epoch: int) -> int:
    """Optimizer steps in the run: whichever of ``epochs`` and ``max_steps`` ends first (0 = neither set)."""
    per_step = cfg.batch_size * cfg.accumulation_steps
    by_epochs = math.ceil(cfg.epochs * windows_per_epoch / per_step) if cfg.epochs > 0 else 0
    cands = [s for s in (by_epochs, cfg.max_steps) if s > 0]
    return max(1, min(cands)) if cands else 0


class Interrupted(MiniLLMError):
    """SIGINT (exit 130) or SIGTERM (exit 143)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.exit_code = code


class _Signals:
    """SIGINT/SIGTERM handling. While ``deferred`` (inside the loop), the first signal only sets ``code``, which
    the loop checks between steps; outside it, or on a second signal, ``Interrupted`` is raised at once."""

    def __init__(self) -> None:
        self.code, self.deferred, self.outdir = 0, False, Path(".")
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        code = 130 if signum == signal.SIGINT else 143
        if self.deferred and not self.code:
            self.code, self._at = code, time.monotonic()
            return
        if self.deferred and distributed.under_torchrun() and time.monotonic() - getattr(self, "_at", 0.0) < 2.0:
            return  # torchrun's agent forwards the Ctrl-C the terminal already sent: the same request, not a second
        raise Interrupted(code, f"interrupted; checkpoints already in {self.outdir} are intact "
                                f"(continue with the same command and --resume if ckpt_last.pt exists)")

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def oom_message(mcfg: ModelConfig, tcfg: TrainConfig, outdir: Path) -> str:
    b, a = tcfg.batch_size, tcfg.accumulation_steps
    fixes = []
    if b > 1:
        fixes.append(f"--batch-size {b // 2} --accumulation-steps {a * 2} (the same {b * a} windows per step)")
    if not mcfg.gradient_checkpointing:
        fixes.append("--gradient-checkpointing (recomputes activations: much less memory, ~30% slower)")
    fixes.append(f"a smaller --block-size (now {mcfg.block_size}) or model")
    return (f"CUDA out of memory at --batch-size {b}, --block-size {mcfg.block_size}: try " + "; or ".join(fixes)
            + f". The last checkpoint in {outdir} is intact (continue with --resume)")


def check_memory(mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, dtype: torch.dtype, warn,
                 trainable: bool = True, shards: int = 1, model_fix: str = "a smaller model (--n-layer, --n-embd)") -> None:
    """Before anything is allocated: refuse when the weights, gradients and optimizer state alone exceed the
    memory available on ``device`` (``model.available_memory``), or the ``--dry-run`` estimate (eager mode;
    a compiled run keeps much less) exceeds it twice over; ``warn(message)`` when the estimate exceeds it.
    ``trainable`` False: the weights are frozen (LoRA); ``shards``: FSDP ranks sharing the state."""
    from minillm.model import memory as model
    avail = model.available_memory(device)
    if not avail:
        return
    est = model.estimate_memory(mcfg, tcfg.batch_size, "fp32" if dtype == torch.float32 else "bf16", tcfg.optimizer)
    state = (est["params"] + (est["grads"] + est["optimizer"] if trainable else 0)) / shards
    total = state + est["activations"]
    where = f"the {avail / 2**30:.1f} GiB of {'GPU' if device.type == 'cuda' else 'host'} memory available ({device})"
    held = "weights, gradients and optimizer state" if trainable else "weights"
    if state > avail:
        raise MiniLLMError(f"the model's {held} alone need {state / 2**30:.1f} GiB, more than {where}; use {model_fix}")
    if total <= avail:
        return
    fixes = [f"--batch-size {tcfg.batch_size // 2} --accumulation-steps {tcfg.accumulation_steps * 2}"] if tcfg.batch_size > 1 else []
    fixes += [] if mcfg.gradient_checkpointing else ["--gradient-checkpointing"]
    refuse = total > 2 * avail
    msg = (f"training {'needs' if refuse else 'may need'} about {total / 2**30:.1f} GiB, more than "
           f"{'twice ' if refuse else ''}{where}: {state / 2**30:.1f} GiB of {held} and "
           f"{est['activations'] / 2**30:.1f} GiB of activations at --batch-size {tcfg.batch_size} in "
           f"{str(dtype).split('.')[-1]} (an eager-mode estimate, as in --dry-run; torch.compile keeps less); "
           f"{'use' if refuse else 'if it runs out of memory, use'} " + ", ".join(fixes) + (", or " if fixes else "")
           + model_fix)
    if refuse:
        raise MiniLLMError(msg)
    warn(f"warning: {msg}")


def train(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """Set up and run one training run (one process, or each rank of a ``torchrun`` run); returns the summary."""
    with distributed.session(tcfg.device) as dist:
        return _train(spec, mcfg, tcfg, dist)


@contextlib.contextmanager
def _claim_outdir(spec: RunSpec, dist: distributed.Dist):
    """Rank 0 locks (for the whole run), checks and cleans the run directory; the other ranks wait for it.
    Yields notes for the log (``rundir.prepare_outdir``)."""
    from minillm.data.cache import cache_dir_for

    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        with distributed.main_first(dist):
            if dist.is_main:
                stack.enter_context(RunLock(spec.outdir))  # first: a second run is told "in use", nothing else
                notes = prepare_outdir(spec, inputs_of(spec))
                clean_stale_temps(spec.outdir)
                clean_stale_temps(cache_dir_for(spec.outdir, spec.cache_dir), recursive=True)
        yield notes


def _per_rank_eval(tcfg: TrainConfig, dist: distributed.Dist) -> TrainConfig:
    """Under torchrun, pick the validation windows of the global batch (``eval_batches`` batches of
    ``batch_size * world_size``), as one process with that batch would; each rank evaluates its share."""
    return dataclasses.replace(tcfg, eval_batches=tcfg.eval_batches * dist.world_size) if dist.enabled else tcfg


def _train(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig, dist: distributed.Dist) -> dict[str, Any]:
    from minillm.data import loader as ds
    from minillm.data.cache import cache_dir_for
    t_entry = spec.started or time.time()
    if spec.tensorboard:
        check_tensorboard()
    device = dist.device if dist.enabled else resolve_device(tcfg.device)  # refuse impossible settings early
    dtype = resolve_precision(tcfg.precision, device)
    if spec.fsdp and (problem := distributed.fsdp_problem(tcfg.optimizer, dist.world_size, dtype)):
        raise UsageError(problem)
    from minillm.model.loss import liger_problem

    if problem := liger_problem(mcfg, device):
        raise UsageError(problem)
    from minillm.tokenizer import load_tokenizer

    check_memory(dataclasses.replace(mcfg, vocab_size=pad_vocab(load_tokenizer(spec.tokenizer).get_vocab_size())),
                 tcfg, device, dtype, TrainLog(spec.log_format).event, shards=dist.world_size if spec.fsdp else 1)
    with _Signals() as sig:
        sig.outdir = spec.outdir
        with _claim_outdir(spec, dist) as notes:  # under torchrun, rank 0 checks, locks and writes the run directory
            old = run_config(spec.outdir) if spec.resume else None
            tok_sha = sha256_file(spec.tokenizer)
            if old is not None:
                check_resume(spec, old, mcfg, tcfg, tok_sha)
                distributed.check_world_size(old.get("world_size", 1), dist, spec.outdir)
            torch.manual_seed(tcfg.seed)
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            log = TrainLog(spec.log_format)
            for note in notes:
                log.event(note)
            log.event(f"encoding {spec.corpus} into the token cache")
            with distributed.main_first(dist):  # rank 0 builds the token cache; then the other ranks open it
                data = ds.prepare_data(spec.tokenizer, spec.corpus, cache_dir_for(spec.outdir, spec.cache_dir),
                                       mcfg.block_size, _per_rank_eval(tcfg, dist), val_file=spec.val_file,
                                       rank=dist.rank, world_size=dist.world_size, note=log.event)
            mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(data.vocab_size))
            run_cfg = {"format": RUN_FORMAT, "config": spec.config_name, "model": to_dict(mcfg),
                       "train": to_dict(tcfg), "data": {"tokenizer_sha256": tok_sha, **data.meta},
                       "val_doc_ids": data.val_doc_ids, "world_size": dist.world_size}
            if old is not None:
                refuse_diffs(config_diff(old, run_cfg))
            log.event("config", model=to_dict(mcfg), train=to_dict(tcfg))
            try:
                return _build_and_fit(spec, mcfg, tcfg, old, data, device, dtype, tok_sha, t_entry, log, sig, run_cfg,
                                      dist)
            except torch.OutOfMemoryError as e:
                raise MiniLLMError(oom_message(mcfg, tcfg, spec.outdir)) from e


def _build_and_fit(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig, old: dict | None, data, device, dtype,
                   tok_sha: str, t_entry: float, log: TrainLog, sig: _Signals, run_cfg: dict[str, Any],
                   dist: distributed.Dist = distributed.Dist()) -> dict[str, Any]:
    """Model, optimizer, scaler, restored state and schedule; then the run's files (an old run in the way is set
    aside until the first checkpoint: ``rundir.replacing``) and the loop."""
    from minillm.model.gpt import GPT

    model = GPT(mcfg).to(device)
    n_params = model.num_params()
    fsdp = spec.fsdp and dist.enabled
    if fsdp:  # in place: the parameters become this rank's shards, and the optimizer is built on them
        distributed.wrap_fsdp(model, dist)
    opts = configure_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    state = (_restore(spec.outdir / "ckpt_last.pt", model, opts, scaler, data.loader, device, sharded=fsdp)
             if old else RunState())
    _set_schedule(state, tcfg, old, total_steps_for(tcfg, data.loader.windows_per_epoch), log)
    log.event("run", params=f"{n_params / 1e6:.2f}M", device=str(device),
              precision=str(dtype).split(".")[-1], steps=_total_str(state),
              windows=data.loader.windows_per_epoch, train_tokens=data.meta["train_tokens"],
              **({"parallel": "fsdp" if fsdp else "ddp"} if dist.enabled else {}))
    ctx = dict(model=model, compiled=maybe_compile(model, tcfg, device), optimizers=opts, scaler=scaler,
               loader=data.loader, val_batches=data.val_batches, device=device, dtype=dtype, doc_id=data.doc_id,
               tok_sha=tok_sha, t_entry=t_entry - state.elapsed_s, main=is_main_process())
    if dist.enabled:  # the training forward/backward go through the wrapper; evaluation and saving use the model
        # DDP wraps the compiled model; FSDP sharded the model itself (compiled after: its hooks break the graph
        # at each block, and evaluation calls the sharded model, whose hooks gather each block's weights)
        ctx.update(dist=dist, sharded=fsdp,
                   train_model=ctx["compiled"] if fsdp else distributed.wrap_ddp(ctx["compiled"], dist),
                   val_batches=data.val_batches[dist.rank :: dist.world_size])
    with replacing(spec.outdir, inputs_of(spec), active=ctx["main"] and old is None) as saved:
        if ctx["main"]:
            write_run_files(spec.outdir, run_cfg, spec.tokenizer)
        if spec.tensorboard:
            log.open_tensorboard(spec.outdir / "tb")
        ctx["saved"] = saved
        with log:  # starts the progress bar; closes it and the TensorBoard writer however the loop ends
            return fit(spec, mcfg, tcfg, state, ctx, log, sig)


def _restore(path: Path, model, opts, scaler, loader, device: torch.device, load_weights=None,
             sharded: bool = False) -> RunState:
    """Load ``ckpt_last.pt`` into the model, optimizers, scaler, loader and RNGs; return the run state.
    ``load_weights(model, ckpt)`` replaces the plain ``load_state_dict`` (finetune: a LoRA adapter).
    ``sharded``: the model was sharded by ``distributed.wrap_fsdp``; each rank keeps its shard of the
    checkpoint's whole weights and optimizer state (the format is the same)."""
    ck = load_checkpoint(path, flag="--resume")
    try:
        if sharded:
            distributed.load_full_state_dicts(model, opts, ck["model"], ck["optimizer"])
        else:
            if load_weights is not None:
                load_weights(model, ck)
            else:
                model.load_state_dict(ck["model"])
            for opt, sd in zip(opts, ck["optimizer"], strict=True):
                opt.load_state_dict(sd)
        scaler.load_state_dict(ck["scaler"])
        loader.load_state_dict(ck["loader"])
        names = {f.name for f in dataclasses.fields(RunState)}
        state = RunState(**{k: v for k, v in ck["run_state"].items() if k in names})
        torch.set_rng_state(ck["rng"]["cpu"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise MiniLLMError(f"--resume: {path} does not fit this run ({str(e).splitlines()[0][:120]}); "
                           f"start a new --outdir") from e
    return state


def _set_schedule(state: RunState, tcfg: TrainConfig, old: dict | None, steps_total: int, log: TrainLog) -> None:
    """Fix the learning-rate schedule: a fresh run's, or a resumed run's, recomputed when its length changed."""
    target = steps_total or UNBOUNDED
    if state.schedule is None:
        state.schedule = dataclasses.asdict(schedule_for(tcfg, target))
        state.planned = not tcfg.max_time
        return
    old_train = (old or {}).get("train", {})
    if all(old_train.get(k) == getattr(tcfg, k) for k in LENGTH_KEYS):
        log.event(f"resuming at step {state.step} of {_total_str(state)}")
        return
    sched = Schedule(**state.schedule)
    new = rescheduled(sched, state.step, target)
    state.schedule, state.planned, state.eval_every = dataclasses.asdict(new), not tcfg.max_time, 0
    log.event(f"resuming at step {state.step}: the run's length changed, so the cosine decay is recomputed from "
              f"step {state.step} (lr {lr_at(state.step, new):.2e}) to reach min_lr {new.min_lr:.2e} at step "
              + (str(new.total) if new.total < UNBOUNDED else "the end of --max-time"))


def _total_str(state: RunState) -> str:
    total = state.schedule["total"] if state.schedule else 0
    return str(total) if total < UNBOUNDED else "time-bound"


def save_run(path: Path, ctx: dict, state: RunState, mcfg: ModelConfig, tcfg: TrainConfig, loader_state) -> None:
    """Write a resumable checkpoint atomically. Rank 0 alone writes; with a sharded model (FSDP) every rank
    must call this, since the whole weights and optimizer state are first gathered from all of them."""
    if ctx.get("sharded"):
        weights, optim = distributed.full_state_dicts(ctx["model"], ctx["optimizers"])  # a collective
    if not ctx.get("main", True):
        return
    if not ctx.get("sharded"):
        weights, optim = ctx["model"].state_dict(), [o.state_dict() for o in ctx["optimizers"]]
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(ctx["device"]) if ctx["device"].type == "cuda" else None}
    ckpt = {
        "model": weights, "model_config": to_dict(mcfg), "train_config": to_dict(tcfg),
        "optimizer": optim, "scaler": ctx["scaler"].state_dict(),
        "loader": dict(loader_state), "run_state": dataclasses.asdict(state), "rng": rng,
        "tokenizer_sha256": ctx["tok_sha"],
    }
    hook = ctx.get("ckpt_hook")  # finetune: adds its record; LoRA: merged weights + the adapter apart
    save_checkpoint(path, hook(ckpt) if hook else ckpt)
    if "saved" in ctx:  # the first checkpoint of a run that replaces another: the old one goes
        ctx["saved"]()


# ---------------------------------------------------------------- evaluation and time budgets


def epoch_of(loader, loader_state: dict) -> float:
    """Epochs consumed at ``loader_state`` (from the consumed position, not the prefetcher's read-ahead)."""
    per_epoch = int(np.sum(getattr(loader, "n_windows", loader.windows_per_epoch)))
    return loader_state["epoch"] + loader_state["pos"] / max(1, per_epoch)


def evaluate_and_save(spec: RunSpec, ctx: dict, state: RunState, mcfg: ModelConfig, tcfg: TrainConfig,
                      loader_state: dict, lr: float, log: TrainLog) -> None:
    """Validation loss -> history record, patience counter, ckpt_last (+ ckpt_best), history.json, curves.png."""
    from minillm.train.plots import plot_curves

    state.elapsed_s = time.time() - ctx["t_entry"]
    # the uncompiled model: an eval-mode, no-grad graph would be compiled anew (tens of seconds on a GPU)
    val = estimate_val_loss(ctx["model"], ctx["val_batches"], tcfg, ctx["doc_id"], ctx["device"], ctx["dtype"],
                            reduce=_reducer(ctx, "sum"))
    if not math.isfinite(val):
        raise MiniLLMError(f"validation loss is {val} at step {state.step}: the weights diverged; the last good "
                           f"checkpoint in {spec.outdir} is kept. Lower --lr (now {tcfg.lr:g}) or use --precision "
                           f"bf16/fp32, then start again or --resume")
    rec = {"step": state.step, "epoch": round(epoch_of(ctx["loader"], loader_state), 4),
           "tokens": state.tokens, "train_loss": float(np.mean(state.running)) if state.running else None,
           "val_loss": val, "val_ppl": math.exp(min(val, 50)), "lr": lr,
           "tokens_per_s": state.tokens / max(state.elapsed_s, 1e-9), "elapsed_s": round(state.elapsed_s, 3),
           "train_s": round(state.train_s, 3), "first_step_s": round(state.first_step_s, 3)}
    loader = ctx["loader"]
    if len(getattr(loader, "sources", ())) > 1:  # a mixture: each corpus's own epochs
        rec["source_epochs"] = {src.name: round(d / n, 4) for src, d, n in
                                zip(loader.sources, loader_state["drawn"], loader.n_windows, strict=True)}
    state.running = []
    state.history.append(rec)
    improved = val < state.best_val
    state.bad_evals = 0 if improved else state.bad_evals + 1
    state.best_val = min(state.best_val, val)
    log.event("eval", step=state.step, val_loss=round(val, 4), val_ppl=round(rec["val_ppl"], 2),
              best="yes" if improved else "no", **({"epochs": rec["source_epochs"]} if "source_epochs" in rec else {}))
    log.scalars(state.step, {"val/loss": val, "val/ppl": rec["val_ppl"]})
    log.flush()
    save_run(spec.outdir / "ckpt_last.pt", ctx, state, mcfg, tcfg, loader_state)  # rank 0 writes
    if ctx["main"]:
        if improved:  # the same bytes: linked, not written twice
            atomic_link(spec.outdir / "ckpt_last.pt", spec.outdir / "ckpt_best.pt")
        atomic_write_json(spec.outdir / "history.json", {"format": 1, "evals": state.history})
        plot_curves(state.history, spec.outdir / "curves.png")


def plan_time_budget(step: int, elapsed: float, max_time: float, step_s: float, eval_s: float,
                     eval_every: int, limit: int) -> tuple[int, int]:
    """``(total_steps, eval_every)`` for a run that has done ``step`` steps in ``elapsed`` seconds so that the
    rest, its evaluations and a final evaluation + checkpoint fit in ``max_time`` (a 3% + 1.5 s margin).
    ``eval_every`` 0 asks for about 10 evaluations in all (fewer when each one is costly); ``limit`` caps
    the total (from --max-steps / --epochs)."""
    left = max_time - elapsed - eval_s - (0.03 * max_time + 1.5)  # margin: jitter and the process's exit
    if eval_every:
        steps = left / (step_s + eval_s / eval_every)
    else:
        n_evals = min(9, int(0.25 * left / eval_s)) if eval_s > 0 else 9
        steps = (left - max(0, n_evals) * eval_s) / step_s
        eval_every = max(1, int(steps / (n_evals + 1))) if n_evals > 0 else UNBOUNDED
    return max(step, min(limit, step + int(max(0.0, steps)))), eval_every


# ---------------------------------------------------------------- the loop


def fit(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig, state: RunState, ctx: dict, log: TrainLog,
        sig: _Signals) -> dict[str, Any]:
    """The loop: step, log, evaluate, save. Ends with the schedule, the time budget, patience or a signal."""
    from minillm.data.loader import Prefetcher

    model, device, loader = ctx["model"], ctx["device"], ctx["loader"]
    sched = Schedule(**state.schedule)
    step_fn = make_train_step(model, ctx.get("train_model", ctx["compiled"]), ctx["optimizers"], tcfg, device,
                              ctx["dtype"], ctx["doc_id"], ctx["scaler"], reduce=_reducer(ctx, "mean"))
    tokens_per_step = tcfg.batch_size * tcfg.accumulation_steps * mcfg.block_size * _world(ctx)
    flops, peak = model.flops_per_token(), peak_flops(device)
    limit = total_steps_for(tcfg, loader.windows_per_epoch) or UNBOUNDED
    clock = lambda: time.time() - ctx["t_entry"]  # noqa: E731  the run's seconds, across resumes
    loader_state = loader.state_dict()  # what has been consumed; read before the prefetcher runs ahead
    prefetch = Prefetcher(loader, pin=device.type == "cuda", threads=tcfg.num_workers)
    durs: list[float] = []  # seconds of each step this process ran (the first includes compilation)
    eval_s, bad, end, saved_step, lr = 0.0, 0, "schedule", state.step, lr_at(state.step, sched)
    last_eval = state.history[-1]["step"] if state.history else -1
    t_log, step_log = time.time(), state.step
    sig.deferred = True
    try:
        while True:
            code = sig.code
            # the first step's time includes compilation: until a second step is timed, none is predicted (a
            # compilation that took most of the budget would otherwise end the run after one step)
            next_s = _step_time(durs) if len(durs) > 1 else 0.0
            over = bool(tcfg.max_time) and clock() + next_s + eval_s + 0.01 * tcfg.max_time > tcfg.max_time
            if _world(ctx) > 1:  # every rank stops at the same step: a signal or the time limit on one is on all
                code, over = (int(v) for v in distributed.agree_max([code, over], ctx["dist"]))
            if code:
                if saved_step != state.step:
                    state.elapsed_s = clock()
                    save_run(spec.outdir / "ckpt_last.pt", ctx, state, mcfg, tcfg, loader_state)
                raise Interrupted(code, f"interrupted at step {state.step}: saved {spec.outdir / 'ckpt_last.pt'}; "
                                        f"continue with the same command and --resume")
            if state.step >= sched.total:
                break
            if over:
                end = "max_time"
                break
            lr, t0 = lr_at(state.step, sched), time.time()
            r = step_fn(prefetch, lr / tcfg.lr)
            loader_state = r.loader_state
            if r.skipped:
                bad += 1
                log.event(f"step {state.step + 1}: {r.skipped}; update skipped ({bad} in a row)")
                if bad >= MAX_BAD_STEPS:
                    raise MiniLLMError(
                        f"{bad} non-finite steps in a row at step {state.step + 1}: the learning rate is likely too "
                        f"high (try --lr {tcfg.lr / 3:.2g}), fp16 overflowed (try --precision bf16 or fp32), or "
                        f"--grad-clip is off; the last good checkpoint in {spec.outdir} is kept")
                continue
            bad = 0
            durs.append(time.time() - t0)
            if len(durs) == 1:
                state.first_step_s += durs[0]
            else:
                state.train_s += durs[-1]
            state.step, state.tokens = state.step + 1, state.tokens + tokens_per_step
            state.running.append(r.loss)
            total = sched.total if sched.total < UNBOUNDED else 0
            eval_every = tcfg.eval_every or state.eval_every or max(1, sched.total // 10)
            log.progress(state.step, total)
            if state.step % tcfg.log_every == 0 or state.step == 1:
                tps = tokens_per_step * (state.step - step_log) / max(time.time() - t_log, 1e-9)
                left = total - state.step
                eta = left * _step_time(durs) + (left // eval_every + 1) * eval_s
                log.step(state.step, total, epoch_of(loader, loader_state), r.loss, lr, tps,
                         flops * tps / peak if peak else None, eta if total else None)
                t_log, step_log = time.time(), state.step
            plan_now = not state.planned and len(durs) >= 6 and (
                sum(durs[1:]) >= 1.0 or len(durs) >= 50 or sum(durs) >= 0.05 * tcfg.max_time)
            if not state.planned and _world(ctx) > 1:  # ranks time their steps apart: plan when any is ready
                plan_now = bool(distributed.agree_max([plan_now], ctx["dist"])[0])
            if plan_now or state.step % eval_every == 0 or state.step >= sched.total:
                t0 = time.time()
                evaluate_and_save(spec, ctx, state, mcfg, tcfg, loader_state, lr, log)
                eval_s, last_eval, saved_step = time.time() - t0, state.step, state.step
                t_log += eval_s  # tokens/s counts training time only
                if tcfg.max_time and len(durs) >= 2:
                    now, step_s, ev_s = _agreed(ctx, [clock(), _step_time(durs), eval_s])  # the same plan on all ranks
                    sched = _replan(state, sched, tcfg, now, step_s, ev_s, limit, log)
                if tcfg.patience and state.bad_evals >= tcfg.patience:
                    end = "early_stopping"
                    log.event(f"early stopping: {tcfg.patience} evaluations without improvement")
                    break
    finally:
        sig.deferred = False
        prefetch.close()
    if last_eval != state.step and state.step > 0:  # ended by the time budget between evaluations
        evaluate_and_save(spec, ctx, state, mcfg, tcfg, loader_state, lr, log)
    state.elapsed_s = clock()
    best = state.best_val if math.isfinite(state.best_val) else None  # None: never evaluated
    summary = {"steps": state.step, "best_val_loss": best, "end": end, "outdir": str(spec.outdir),
               "elapsed_s": round(state.elapsed_s, 2)}
    log.event("done", **summary)
    return summary


def _world(ctx: dict) -> int:
    """Processes training together (1 outside torchrun)."""
    return ctx["dist"].world_size if "dist" in ctx else 1


def _reducer(ctx: dict, op: str):
    """``reduce(t)``: ``t`` reduced in place over the ranks with ``op``; None for one process."""
    if _world(ctx) == 1:
        return None
    return lambda t: distributed.all_reduce_(t, ctx["dist"], op)


def _agreed(ctx: dict, values: list[float]) -> list[float]:
    """Each value's maximum over the ranks (the values themselves for one process)."""
    return distributed.agree_max(values, ctx["dist"]) if _world(ctx) > 1 else values


def _step_time(durs: list[float]) -> float:
    """Mean seconds per step over the last 100 steps, leaving out the first (compilation) while it is among them."""
    recent = durs[-100:] if len(durs) > 100 else (durs[1:] or durs)
    return sum(recent) / len(recent) if recent else 0.0


def _replan(state: RunState, sched: Schedule, tcfg: TrainConfig, elapsed: float, step_s: float, eval_s: float,
            limit: int, log: TrainLog) -> Schedule:
    """Fit the rest of a --max-time run to its budget from measured step and evaluation times; the decay is
    recomputed from the current step when the total moves by more than 1%."""
    total, every = plan_time_budget(state.step, elapsed, tcfg.max_time, step_s, eval_s, tcfg.eval_every, limit)
    first = not state.planned
    state.planned, state.eval_every = True, (0 if tcfg.eval_every else every)
    if not first and abs(total - sched.total) <= max(1, 0.01 * sched.total):
        return sched
    new = rescheduled(sched, state.step, total)
    state.schedule = dataclasses.asdict(new)
    log.event(f"--max-time {fmt_duration(tcfg.max_time)}: {step_s * 1000:.1f} ms/step, {eval_s:.1f} s per evaluation "
              f"-> {new.total} steps in all, " + (f"evaluating every {tcfg.eval_every or every}"
                                                   if (tcfg.eval_every or every) < UNBOUNDED else "evaluating at the end"))
    return new
