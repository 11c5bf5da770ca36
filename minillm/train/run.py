"""Setting up a run, one way for ``train`` and ``finetune``; ``train`` itself.

A command describes its run as a ``Job`` (where the data and the model come from, what the run records beside
the configs) and enters ``setup_run``, which checks the hardware and memory, takes the run directory (signals,
the lock, the overwrite rule), refuses a resume that changes the run, builds the data and the model, restores
a resumed run, fixes the learning-rate schedule, writes ``config.json`` and the tokenizer, and yields the
``TrainContext`` that ``minillm.train.loop.fit`` trains; a CUDA out-of-memory error on the way becomes one
message naming smaller settings. ``train`` is a ``Job`` on a corpus and a new model; ``finetune``
(``minillm.train.finetune``) brings a base checkpoint, its data and LoRA. Under ``torchrun`` both run on every
rank: rank 0 locks, checks and writes the run directory and the token cache while the others wait.

Beside it: ``loop`` (the loop, evaluation, checkpoints, signals), ``step`` (one optimizer step, one validation
pass), ``budget`` (--max-time), ``log`` (progress lines, TensorBoard, history and curves), ``state`` (what a
checkpoint restores), ``rundir`` (existing-run and resume guards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm import distributed
from minillm.checkpoint import load_checkpoint
from minillm.config import ModelConfig, TrainConfig, pad_vocab, to_dict
from minillm.data.cache import cache_dir_for
from minillm.data.loader import Mixture, RunData, prepare_data
from minillm.errors import MiniLLMError, UsageError
from minillm.io import RunLock, clean_stale_temps, sha256_file
from minillm.model import memory
from minillm.model.gpt import GPT
from minillm.model.loss import liger_problem
from minillm.optim.groups import (
    UNBOUNDED,
    Schedule,
    configure_optimizer,
    keep_implementation,
    lr_at,
    rescheduled,
    schedule_for,
)
from minillm.tokenizer import load_tokenizer
from minillm.train.log import TrainLog, check_tensorboard
from minillm.train.loop import CheckpointHook, Interrupted, Signals, TrainContext, fit
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
from minillm.train.state import RunState, total_steps_for
from minillm.train.step import (
    background_warmup,
    compile_key,
    maybe_compile,
    resolve_device,
    resolve_precision,
    skips_cold_compile,
)

__all__ = ["Interrupted", "Job", "RunSpec", "check_memory", "corpus_data", "setup_run", "train"]

RUN_FORMAT = 1
LENGTH_KEYS = ("max_steps", "epochs", "max_time")
MODEL_FIX = "a smaller model (--n-layer, --n-embd)"


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
    record: dict[str, Any] = field(default_factory=dict)  # more config.json sections (``--config auto``: the plan)


# this rank's data for a TrainConfig asking for the validation windows of all ranks; rank 0 calls it first
DataFactory = Callable[[TrainConfig, distributed.Dist, TrainLog], RunData]
# the model on the device, its weights initialised or loaded (before any sharding)
ModelFactory = Callable[[ModelConfig, RunData, torch.device, TrainLog], nn.Module]
# on --resume, the weights of ckpt_last.pt into the model (instead of load_state_dict)
WeightsLoader = Callable[[nn.Module, dict[str, Any]], None]


@dataclass(frozen=True)
class Job:
    """What a command brings to ``setup_run``: where its data and model come from, and what the run records."""

    data: DataFactory
    model_config: Callable[[ModelConfig, RunData], ModelConfig]  # the model config made to fit the data (vocabulary)
    model: ModelFactory
    record: dict[str, Any] = field(default_factory=dict)  # more config.json sections: compared on resume, logged
    run_fields: dict[str, Any] = field(default_factory=dict)  # the first fields of the "run" event
    trainable: bool = True  # False: the weights stay frozen (LoRA) and need neither gradients nor optimizer state
    model_fix: str = MODEL_FIX  # the advice when the model's state alone does not fit in memory
    load_weights: WeightsLoader | None = None
    on_save: CheckpointHook | None = None


# ---------------------------------------------------------------- train


def train(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """Set up and run one training run (one process, or each rank of a ``torchrun`` run); returns the summary."""
    job = Job(data=corpus_data(spec, mcfg.block_size), model_config=_vocab_of, model=_new_model, record=spec.record)
    mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(load_tokenizer(spec.tokenizer).get_vocab_size()))
    with distributed.session(tcfg.device) as dist, setup_run(spec, mcfg, tcfg, job, dist) as (ctx, state):
        return fit(ctx, state)


def corpus_data(spec: RunSpec, block_size: int) -> DataFactory:
    """The data of a run on ``spec.corpus`` through the token cache (``train``, ``finetune --mode continue``)."""

    def load(tcfg: TrainConfig, dist: distributed.Dist, log: TrainLog) -> RunData:
        return prepare_data(spec.tokenizer, spec.corpus, cache_dir_for(spec.outdir, spec.cache_dir), block_size, tcfg,
                            val_file=spec.val_file, rank=dist.rank, world_size=dist.world_size, note=log.event)

    return load


def _vocab_of(mcfg: ModelConfig, data: RunData) -> ModelConfig:
    return dataclasses.replace(mcfg, vocab_size=pad_vocab(data.vocab_size))


def _new_model(mcfg: ModelConfig, _data: RunData, device: torch.device, _log: TrainLog) -> nn.Module:
    return GPT(mcfg).to(device)


# ---------------------------------------------------------------- checks before anything is written


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
                 trainable: bool = True, shards: int = 1, model_fix: str = MODEL_FIX) -> None:
    """Before anything is allocated: refuse when the weights, gradients and optimizer state alone exceed the
    memory available on ``device`` (``model.available_memory``), or the ``--dry-run`` estimate (eager mode;
    a compiled run keeps much less) exceeds it twice over; ``warn(message)`` when the estimate exceeds it.
    ``trainable`` False: the weights are frozen (LoRA); ``shards``: FSDP ranks sharing the state."""
    avail = memory.available_memory(device)
    if not avail:
        return
    est = memory.estimate_memory(mcfg, tcfg.batch_size, "fp32" if dtype == torch.float32 else "bf16", tcfg.optimizer)
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


def _check_hardware(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig, job: Job, dist: distributed.Dist,
                    log: TrainLog) -> tuple[torch.device, torch.dtype]:
    """The run's device and precision; impossible settings (TensorBoard missing, FSDP or liger as asked, a
    model too big for the memory) are refused before anything is written."""
    if spec.tensorboard:
        check_tensorboard()
    device = dist.device if dist.enabled else resolve_device(tcfg.device)
    dtype = resolve_precision(tcfg.precision, device)
    if spec.fsdp and (problem := distributed.fsdp_problem(tcfg.optimizer, dist.world_size, dtype)):
        raise UsageError(problem)
    if problem := liger_problem(mcfg, device):
        raise UsageError(problem)
    check_memory(mcfg, tcfg, device, dtype, log.event, trainable=job.trainable,
                 shards=dist.world_size if spec.fsdp else 1, model_fix=job.model_fix)
    return device, dtype


def kernel_that_runs(mcfg: ModelConfig, device: torch.device, note: Callable[[str], None]) -> ModelConfig:
    """The model config with the loss kernel that runs on ``device``: liger runs on CUDA only, so elsewhere the
    run uses (and records in config.json) torch, after saying so; the weights mean the same either way."""
    if mcfg.loss_kernel != "liger" or device.type == "cuda":
        return mcfg
    note(f"--loss-kernel liger runs on CUDA only; this {device.type} run uses torch (and records it)")
    return dataclasses.replace(mcfg, loss_kernel="torch")


# ---------------------------------------------------------------- setup_run


@dataclass(frozen=True)
class _Run:
    """What ``setup_run`` has fixed before the data: the command's job and where and how the run computes."""

    spec: RunSpec
    tcfg: TrainConfig
    job: Job
    dist: distributed.Dist
    device: torch.device
    dtype: torch.dtype
    log: TrainLog
    signals: Signals
    tok_sha: str  # the tokenizer's sha256
    old: dict[str, Any] | None  # the resumed run's config.json (None: a new run)
    t_entry: float  # time.time() when the command (or setup_run) started: --max-time counts from it


@contextlib.contextmanager
def setup_run(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig, job: Job,
              dist: distributed.Dist) -> Iterator[tuple[TrainContext, RunState]]:
    """Set up the run of ``job`` and yield ``(TrainContext, RunState)`` for ``loop.fit``; see the module's
    docstring. ``mcfg``: the model config before the data (``job.model_config`` fits it). Everything written
    before the first checkpoint of a run that replaces another is undone if the body fails (``rundir.replacing``);
    the lock is held and the signals handled until the body ends."""
    t_entry = spec.started or time.time()
    marks = {"start": t_entry, "imports": time.time()}  # the start-up breakdown (loop.startup_breakdown)
    log = TrainLog(spec.log_format)
    device, dtype = _check_hardware(spec, mcfg, tcfg, job, dist, log)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context now, so that "device" times its creation
    marks["device"] = time.time()
    mcfg = kernel_that_runs(mcfg, device, log.event)
    with Signals(spec.outdir) as sig, _claim_outdir(spec, dist) as notes:
        old = run_config(spec.outdir) if spec.resume else None
        tok_sha = sha256_file(spec.tokenizer)
        if old is not None:  # before any data work
            check_resume(spec, old, mcfg, tcfg, tok_sha)
            distributed.check_world_size(old.get("world_size", 1), dist, spec.outdir)
        torch.manual_seed(tcfg.seed)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        for note in notes:
            log.event(note)
        run = _Run(spec, tcfg, job, dist, device, dtype, log, sig, tok_sha, old, t_entry)
        data, mcfg, run_cfg = _data_and_config(run, mcfg)
        marks["data"] = time.time()
        try:
            ctx, state = _start(run, mcfg, data)
            marks["model"] = time.time()
            with replacing(spec.outdir, inputs_of(spec), active=dist.is_main and old is None) as saved:
                if dist.is_main:
                    write_run_files(spec.outdir, run_cfg, spec.tokenizer)
                if spec.tensorboard:
                    log.open_tensorboard(spec.outdir / "tb")
                with log:  # starts the progress bar; closes it and the TensorBoard writer however the loop ends
                    yield dataclasses.replace(ctx, saved=saved, startup=marks), state
        except torch.OutOfMemoryError as e:
            raise MiniLLMError(oom_message(mcfg, tcfg, spec.outdir)) from e


@contextlib.contextmanager
def _claim_outdir(spec: RunSpec, dist: distributed.Dist) -> Iterator[list[str]]:
    """Rank 0 locks (for the whole run), checks and cleans the run directory; the other ranks wait for it.
    Yields notes for the log (``rundir.prepare_outdir``)."""
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        with distributed.main_first(dist):
            if dist.is_main:
                stack.enter_context(RunLock(spec.outdir))  # first: a second run is told "in use", nothing else
                notes = prepare_outdir(spec, inputs_of(spec))
                clean_stale_temps(spec.outdir)
                clean_stale_temps(cache_dir_for(spec.outdir, spec.cache_dir), recursive=True)
        yield notes


def _data_and_config(run: _Run, mcfg: ModelConfig) -> tuple[RunData, ModelConfig, dict[str, Any]]:
    """The job's data (rank 0 first: it builds the token cache, then the other ranks open it), the model config
    made to fit it, and the run's ``config.json``, which a resume must match."""
    tcfg, dist = run.tcfg, run.dist
    # under torchrun, pick the validation windows of the global batch (eval_batches batches of batch_size *
    # world_size), as one process with that batch would; each rank evaluates its share
    per_rank = dataclasses.replace(tcfg, eval_batches=tcfg.eval_batches * dist.world_size) if dist.enabled else tcfg
    with distributed.main_first(dist):
        data = run.job.data(per_rank, dist, run.log)
    mcfg = run.job.model_config(mcfg, data)
    run_cfg = {"format": RUN_FORMAT, "config": run.spec.config_name, "model": to_dict(mcfg), "train": to_dict(tcfg),
               "data": {"tokenizer_sha256": run.tok_sha, **data.meta}, "val_doc_ids": data.val_doc_ids,
               "world_size": dist.world_size, **run.job.record}
    if run.old is not None:
        refuse_diffs(config_diff(run.old, run_cfg, ("model", "train", "data", *run.job.record)))
    run.log.event("config", model=to_dict(mcfg), train=to_dict(tcfg), **run.job.record)
    return data, mcfg, run_cfg


def _start(run: _Run, mcfg: ModelConfig, data: RunData) -> tuple[TrainContext, RunState]:
    """Model, optimizers, scaler, the restored state and the schedule: the ``TrainContext`` of the loop. Under
    torchrun the training forward/backward go through DDP around the compiled model, while evaluation and
    saving use the model itself; FSDP shards the model in place, before the optimizers are built on it (and it
    is compiled after: its hooks break the graph at each block)."""
    tcfg, dist, device, spec = run.tcfg, run.dist, run.device, run.spec
    fsdp = spec.fsdp and dist.enabled
    model = run.job.model(mcfg, data, device, run.log)
    n_params = model.num_params()
    if fsdp:
        distributed.wrap_fsdp(model, dist)
    opts = configure_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(run.dtype == torch.float16))
    state = (restore(spec.outdir / "ckpt_last.pt", model, opts, scaler, data.loader, device, run.job.load_weights,
                     sharded=fsdp) if run.old else RunState())
    set_schedule(state, tcfg, run.old, total_steps_for(tcfg, data.loader.windows_per_epoch), run.log)
    run.log.event("run", **run.job.run_fields, params=f"{n_params / 1e6:.2f}M", device=str(device),
                  precision=str(run.dtype).split(".")[-1], steps=_total_str(state),
                  windows=data.loader.windows_per_epoch, train_tokens=data.meta["train_tokens"],
                  **({"parallel": "fsdp" if fsdp else "ddp"} if dist.enabled else {}))
    key = None if fsdp else compile_key(model, tcfg, device, run.dtype)
    eager = key is not None and skips_cold_compile(tcfg, device, key)
    if dist.enabled:  # one decision for every rank (their caches may differ)
        eager = bool(distributed.agree_max([eager], dist)[0])
    compiled = maybe_compile(model, tcfg, device, whole=fsdp, on_ready=run.log.event, key=key, eager=eager,
                             warmup=None if eager else _background_compile(model, tcfg, run, data))
    ctx = TrainContext(outdir=spec.outdir, mcfg=mcfg, tcfg=tcfg, model=model,
                       train_model=compiled if fsdp else distributed.wrap_ddp(compiled, dist), optimizers=opts,
                       scaler=scaler, loader=data.loader, val_batches=data.val_batches[dist.rank :: dist.world_size],
                       device=device, dtype=run.dtype, doc_id=data.doc_id, tok_sha=run.tok_sha,
                       t_entry=run.t_entry - state.elapsed_s, dist=dist, log=run.log,
                       signals=run.signals, sharded=fsdp, on_save=run.job.on_save)
    return ctx, state


def _background_compile(model: nn.Module, tcfg: TrainConfig, run: _Run, data: RunData):
    """``--compile auto`` on one CUDA GPU: the warm-up that compiles in the background while the first steps run
    eagerly (``step.background_warmup``), when the GPU has room for a second copy of the model's step beside the
    run's own (the eager estimate of both); None (compile before the first step) otherwise, and under torchrun."""
    if tcfg.compile != "auto" or run.device.type != "cuda" or run.dist.enabled:
        return None
    est = memory.estimate_memory(model.cfg, tcfg.batch_size, "fp32" if run.dtype == torch.float32 else "bf16",
                                 tcfg.optimizer)
    avail = memory.available_memory(run.device) or 0
    if avail < memory.background_compile_room(est):
        run.log.event("compiling before the first step (too little GPU memory to compile beside the first steps)")
        return None
    return background_warmup(model, tcfg, run.device, run.dtype, data.doc_id)


# ---------------------------------------------------------------- resume and schedule


def restore(path: Path, model: nn.Module, opts, scaler, loader, device: torch.device,
            load_weights: WeightsLoader | None = None, sharded: bool = False) -> RunState:
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
        for opt in opts:
            keep_implementation(opt)
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


def set_schedule(state: RunState, tcfg: TrainConfig, old: dict | None, steps_total: int, log: TrainLog) -> None:
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
