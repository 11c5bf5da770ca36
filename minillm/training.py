"""The training loop: optimizer groups, ``lr_at``, mixed precision, accumulation, clipping, evaluation,
early stopping, checkpoints and exact resume.

Layering (after litgpt): ``train(spec)`` sets up the run (data, model, optimizer, resume) and calls
``fit``, the loop itself, which only steps, evaluates and saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import RunLock, atomic_write_json, load_checkpoint, save_checkpoint, sha256_file
from minillm.config import ModelConfig, TrainConfig, pad_vocab, to_dict
from minillm.errors import MiniLLMError

RUN_FORMAT = 1
# Keys that may change on --resume; any other difference is refused.
RESUMABLE_KEYS = {"max_steps", "epochs", "max_time", "eval_every", "patience", "log_every"}
# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12,
              "3090": 71e12, "L4": 121e12, "T4": 65e12, "V100": 125e12}


@dataclass(frozen=True)
class RunSpec:
    """Where a run reads and writes, apart from the model and training configs."""

    tokenizer: Path
    corpus: Path
    outdir: Path
    val_file: Path | None = None
    cache_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    log_format: str = "text"
    config_name: str = "tiny"


@dataclass
class RunState:
    """Everything a checkpoint restores besides weights and optimizer."""

    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0


def lr_at(step: int, total_steps: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup over ``warmup_steps`` (at most a tenth of the run), then cosine decay from ``lr`` to
    ``min_lr`` (lr/10 when negative) at the end of the run. ``progress`` in [0, 1] overrides
    ``step / total_steps`` (used by time-budgeted runs)."""
    min_lr = cfg.lr / 10 if cfg.min_lr < 0 else cfg.min_lr
    warmup = min(cfg.warmup_steps, max(0, total_steps // 10)) if total_steps else cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if progress is None:
        span = max(1, total_steps - warmup)
        progress = (step - warmup) / span
    progress = min(1.0, max(0.0, progress))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MiniLLMError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if device.type == "cpu" and dt == torch.float16:
        raise MiniLLMError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return dt


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on 2-D weights only (never norms, biases, embeddings); with
    ``optimizer == "muon"``, Muon takes the 2-D hidden matrices and AdamW the rest."""
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "tok_emb" in name or "lm_head" in name
        if cfg.optimizer == "muon" and p.dim() == 2 and not is_embedding:
            hidden.append(p)
        elif p.dim() >= 2 and not is_embedding:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = cfg.lr
    fused = device.type == "cuda"
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    ]
    if hidden:
        if not hasattr(torch.optim, "Muon"):
            raise MiniLLMError("--optimizer muon needs torch >= 2.9 (torch.optim.Muon); use --optimizer adamw")
        muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True)
        for g in muon.param_groups:
            g["base_lr"] = cfg.muon_lr
        opts.append(muon)
    return opts


def total_steps_for(cfg: TrainConfig, windows_per_epoch: int) -> int:
    """Optimizer steps in the run: whichever of ``epochs`` and ``max_steps`` ends first (0 = time-bound)."""
    per_step = cfg.batch_size * cfg.accumulation_steps
    by_epochs = math.ceil(cfg.epochs * windows_per_epoch / per_step) if cfg.epochs > 0 else 0
    cands = [s for s in (by_epochs, cfg.max_steps) if s > 0]
    return max(1, min(cands)) if cands else 0


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (a step is never cut in half)."""

    def __init__(self) -> None:
        self.code = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            try:
                self._old[sig] = signal.signal(sig, lambda *_, c=code: setattr(self, "code", c))
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(MiniLLMError):
    def __init__(self, code: int, path: Path):
        super().__init__(f"interrupted: saved {path}; continue with the same command and --resume")
        self.exit_code = code


def _log(spec: RunSpec, msg: str, **fields: Any) -> None:
    if spec.log_format == "json":
        print(json.dumps({"event": msg, **fields}), file=sys.stderr, flush=True)
    else:
        extra = "  ".join(f"{k} {v}" for k, v in fields.items())
        print(f"{msg}  {extra}".rstrip(), file=sys.stderr, flush=True)


def prepare_outdir(spec: RunSpec) -> None:
    out = spec.outdir
    if out.exists() and not out.is_dir():
        raise MiniLLMError(f"--outdir {out} is a file; give a directory")
    exists = out.is_dir() and any(p.name not in (".lock",) for p in out.iterdir())
    if spec.resume:
        if not (out / "ckpt_last.pt").is_file():
            raise MiniLLMError(f"--resume: no checkpoint {out / 'ckpt_last.pt'}; start the run without --resume")
    elif exists and not spec.overwrite:
        raise MiniLLMError(f"--outdir {out} already holds a run; add --resume to continue it or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiniLLMError(f"--outdir {out}: cannot create it ({e.strerror}); choose a writable directory") from e


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved run configs, except those a resume may change."""
    diffs = []
    for section in ("model", "train", "data"):
        a, b = old.get(section, {}), new.get(section, {})
        for k in sorted(set(a) | set(b)):
            if section == "train" and k in RESUMABLE_KEYS:
                continue
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs


def train(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig) -> dict[str, Any]:
    """Set up and run one training run; returns the final summary."""
    from minillm import dataset as ds
    from minillm.model import GPT

    prepare_outdir(spec)
    with RunLock(spec.outdir):
        if spec.overwrite and not spec.resume:
            for name in ("ckpt_best.pt", "ckpt_last.pt", "history.json", "curves.png", "config.json"):
                (spec.outdir / name).unlink(missing_ok=True)
        device = resolve_device(tcfg.device)
        dtype = resolve_precision(tcfg.precision, device)
        torch.manual_seed(tcfg.seed)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        _log(spec, f"encoding {spec.corpus} into the token cache")
        data = ds.prepare_data(spec.tokenizer, spec.corpus, ds.cache_dir_for(spec.outdir, spec.cache_dir),
                               mcfg.block_size, tcfg, val_file=spec.val_file)
        mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(data.vocab_size))
        tok_sha = sha256_file(spec.tokenizer)
        run_cfg = {
            "format": RUN_FORMAT, "config": spec.config_name, "model": to_dict(mcfg), "train": to_dict(tcfg),
            "data": {"tokenizer_sha256": tok_sha, **data.meta},
            "val_doc_ids": data.val_doc_ids,
        }
        if spec.resume:
            old = json.loads((spec.outdir / "config.json").read_text())
            diffs = config_diff(old, run_cfg)
            if diffs:
                raise MiniLLMError("--resume: the run's config differs from the checkpoint's in:\n  "
                                   + "\n  ".join(diffs) + "\nonly max_steps, epochs, max_time, eval_every, patience "
                                   "and log_every may change; start a new --outdir for the rest")
        atomic_write_json(spec.outdir / "config.json", run_cfg)
        if Path(spec.tokenizer).resolve() != (spec.outdir / "tokenizer.json").resolve():
            shutil.copyfile(spec.tokenizer, spec.outdir / "tokenizer.json")

        model = GPT(mcfg).to(device)
        optimizers = configure_optimizer(model, tcfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
        loader = data.loader
        state = RunState()
        if spec.resume:
            ck = load_checkpoint(spec.outdir / "ckpt_last.pt")
            model.load_state_dict(ck["model"])
            for opt, sd in zip(optimizers, ck["optimizer"], strict=True):
                opt.load_state_dict(sd)
            scaler.load_state_dict(ck["scaler"])
            loader.load_state_dict(ck["loader"])
            state = RunState(**ck["run_state"])
            torch.set_rng_state(ck["rng"]["cpu"])
            if device.type == "cuda" and ck["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        total = total_steps_for(tcfg, loader.windows_per_epoch)
        if spec.resume:
            _log(spec, f"resuming at step {state.step}; the schedule runs to step {total}")
        n_params = model.num_params()
        _log(spec, "run", params=f"{n_params / 1e6:.2f}M", device=str(device), precision=str(dtype).split(".")[-1],
             steps=total or "time-bound", windows=loader.windows_per_epoch, train_tokens=data.meta["train_tokens"])
        compiled = torch.compile(model) if (tcfg.compile == "on" or (tcfg.compile == "auto" and device.type == "cuda")) else model
        ctx = dict(model=model, compiled=compiled, optimizers=optimizers, scaler=scaler, loader=loader,
                   val_batches=data.val_batches, device=device, dtype=dtype, doc_id=data.doc_id,
                   total=total, run_cfg=run_cfg, tok_sha=tok_sha)
        return fit(spec, mcfg, tcfg, state, ctx)


def _to_device(x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]


def _forward(model, x, y, mcfg_doc_masking: bool, doc_id: int, device, dtype, reduction="mean"):
    from minillm.model import segment_ids

    seg = segment_ids(x, doc_id) if mcfg_doc_masking else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(x, y, seg_ids=seg, reduction=reduction)


@torch.no_grad()
def estimate_val_loss(model, batches, tcfg: TrainConfig, doc_id: int, device, dtype) -> float:
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for b in batches:
        x, y = _to_device(torch.from_numpy(b), device)
        total += _forward(model, x, y, tcfg.doc_masking, doc_id, device, dtype).float() * len(b)
        count += len(b)
    model.train()
    return float(total.item() / count)


def save_run(path: Path, ctx: dict, state: RunState, mcfg: ModelConfig, tcfg: TrainConfig, loader_state) -> None:
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(ctx["device"]) if ctx["device"].type == "cuda" else None}
    save_checkpoint(path, {
        "model": ctx["model"].state_dict(), "model_config": to_dict(mcfg), "train_config": to_dict(tcfg),
        "optimizer": [o.state_dict() for o in ctx["optimizers"]], "scaler": ctx["scaler"].state_dict(),
        "loader": loader_state, "run_state": dataclasses.asdict(state), "rng": rng,
        "tokenizer_sha256": ctx["tok_sha"],
    })


def fit(spec: RunSpec, mcfg: ModelConfig, tcfg: TrainConfig, state: RunState, ctx: dict) -> dict[str, Any]:
    """The loop: step, log, evaluate, save. Stops at the end of the schedule, on patience, or on a signal."""
    from minillm.plots import plot_curves

    model, compiled, opts, scaler, device, dtype = (ctx[k] for k in ("model", "compiled", "optimizers", "scaler", "device", "dtype"))
    total, doc_id = ctx["total"], ctx["doc_id"]
    eval_every = tcfg.eval_every or max(1, (total or 1000) // 10)
    tokens_per_step = tcfg.batch_size * tcfg.accumulation_steps * mcfg.block_size
    flops, peak = model.flops_per_token(), peak_flops(device)
    prefetch = __import__("minillm.dataset", fromlist=["Prefetcher"]).Prefetcher(
        ctx["loader"], pin=device.type == "cuda", threads=tcfg.num_workers)
    loader_state = ctx["loader"].state_dict()
    t_start, t_log, bad_steps, running = time.time() - state.elapsed_s, time.time(), 0, []
    end_reason = "schedule"
    with _Signals() as sig:
        while True:
            elapsed = time.time() - t_start
            if total and state.step >= total:
                break
            if tcfg.max_time and elapsed >= tcfg.max_time:
                end_reason = "max_time"
                break
            progress = elapsed / tcfg.max_time if tcfg.max_time and not total else None
            lr_scale = lr_at(state.step, total, tcfg, progress) / tcfg.lr
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_scale
            loss_sum = torch.zeros((), device=device)
            for _ in range(tcfg.accumulation_steps):
                batch, loader_state = prefetch.next()
                x, y = _to_device(batch, device)
                loss = _forward(compiled, x, y, tcfg.doc_masking, doc_id, device, dtype) / tcfg.accumulation_steps
                scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
            loss_val = float(loss_sum.item())
            if not math.isfinite(loss_val):
                bad_steps += 1
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                _log(spec, f"step {state.step}: non-finite loss {loss_val}; step skipped")
                if bad_steps >= 5:
                    prefetch.close()
                    raise MiniLLMError(
                        f"{bad_steps} non-finite losses in a row at step {state.step}: the learning rate is likely "
                        f"too high (try --lr {tcfg.lr / 3:.2g}) or fp16 overflowed (try --precision bf16 or fp32); "
                        f"the last good checkpoint is kept in {spec.outdir}")
                continue
            bad_steps = 0
            for opt in opts:
                scaler.unscale_(opt)
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            for opt in opts:
                scaler.step(opt)
            scaler.update()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens_per_step
            running.append(loss_val)
            if state.step % tcfg.log_every == 0 or state.step == 1:
                dt = time.time() - t_log
                tps = tokens_per_step * (tcfg.log_every if state.step > 1 else 1) / max(dt, 1e-9)
                t_log = time.time()
                fields = dict(epoch=f"{ctx['loader'].epoch_float:.2f}", loss=f"{loss_val:.4f}",
                              lr=f"{lr_scale * tcfg.lr:.2e}", tok_s=f"{tps:,.0f}")
                if peak:
                    fields["mfu"] = f"{100 * flops * tps / peak:.1f}%"
                if total:
                    fields["eta"] = f"{(total - state.step) * tokens_per_step / max(tps, 1):.0f}s"
                _log(spec, f"step {state.step}/{total or '?'}", **fields)
            last = bool(total) and state.step >= total
            if state.step % eval_every == 0 or last or sig.code:
                state.elapsed_s = time.time() - t_start
                val = estimate_val_loss(compiled, ctx["val_batches"], tcfg, doc_id, device, dtype)
                rec = {"step": state.step, "epoch": round(ctx["loader"].epoch_float, 4), "tokens": state.tokens,
                       "train_loss": float(np.mean(running)) if running else None, "val_loss": val,
                       "val_ppl": math.exp(min(val, 50)), "lr": lr_scale * tcfg.lr,
                       "tokens_per_s": state.tokens / max(state.elapsed_s, 1e-9), "elapsed_s": state.elapsed_s}
                running = []
                state.history.append(rec)
                improved = val < state.best_val
                state.bad_evals = 0 if improved else state.bad_evals + 1
                state.best_val = min(state.best_val, val)
                _log(spec, f"eval step {state.step}", val_loss=f"{val:.4f}", val_ppl=f"{rec['val_ppl']:.2f}",
                     best="yes" if improved else "no")
                save_run(spec.outdir / "ckpt_last.pt", ctx, state, mcfg, tcfg, loader_state)
                if improved:
                    save_run(spec.outdir / "ckpt_best.pt", ctx, state, mcfg, tcfg, loader_state)
                atomic_write_json(spec.outdir / "history.json", {"format": 1, "evals": state.history})
                plot_curves(state.history, spec.outdir / "curves.png")
                if tcfg.patience and state.bad_evals >= tcfg.patience:
                    end_reason = "early_stopping"
                    _log(spec, f"early stopping: {tcfg.patience} evaluations without improvement")
                    break
            if sig.code:
                prefetch.close()
                raise Interrupted(sig.code, spec.outdir / "ckpt_last.pt")
    prefetch.close()
    if not state.history or state.history[-1]["step"] != state.step:
        state.elapsed_s = time.time() - t_start
        save_run(spec.outdir / "ckpt_last.pt", ctx, state, mcfg, tcfg, loader_state)
    return {"steps": state.step, "best_val_loss": state.best_val, "end": end_reason, "outdir": str(spec.outdir),
            "elapsed_s": round(time.time() - t_start, 2)}
