"""Fine-tuning a trained checkpoint: continued pretraining (``continue``) and instruction tuning (``sft``),
of all weights or, with ``--lora-rank``, of LoRA adapters only (``minillm.lora``).

Both modes set up a run directory exactly as ``train`` does (config.json, tokenizer.json, ckpt_best.pt,
ckpt_last.pt, history.json, curves.png; ``--resume``/``--overwrite`` as there) and then run the trainer's own
loop, ``training.fit``. What differs is where the weights and the data come from:

- weights: the base checkpoint (``--ckpt``); the model config is the base's. A LoRA run's checkpoints hold
  the merged weights under ``model`` (so generate/evaluate/export take them as they are) and the adapter
  under ``lora``; ``adapter.pt`` (the adapter of ``ckpt_best.pt`` alone) is written when the run ends.
- data: ``continue`` reads a corpus file through the token cache (``data.loader.prepare_data``); ``sft`` reads
  JSONL and builds one row per example (``data.sft``: the prompt template, the loss mask in the rows' sign),
  which a forward pre-hook on the model (``decode_masked_inputs``) decodes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.checkpoint import load_checkpoint, model_config_of
from minillm.config import ModelConfig, TrainConfig, to_dict, train_from_dict, validate
from minillm.corpus.read import check_input_file
from minillm.data.cache import cache_dir_for
from minillm.data.sft import sft_data
from minillm.errors import MiniLLMError, UsageError
from minillm.io import RunLock, clean_stale_temps, sha256_file
from minillm.lora import LoRAConfig
from minillm.model.load import build_gpt, check_tokenizer

MODES = ("continue", "sft")
RUN_FORMAT = 1
# reset for a fine-tuning run rather than inherited from the base run's train config
FRESH_KEYS = {"max_steps": 0, "epochs": 1.0, "max_time": 0.0, "eval_every": 0, "patience": 0, "min_lr": -1.0}


@dataclass(frozen=True)
class FinetuneSpec:
    """What a fine-tuning run reads and writes, apart from the model and training configs."""

    ckpt: Path  # the base checkpoint (or run directory)
    data: Path  # continue: a corpus file; sft: a JSONL file
    outdir: Path  # the run directory
    mode: str = "continue"  # continue or sft
    tokenizer: Path | None = None  # default: the base run's tokenizer.json
    force_tokenizer: bool = False  # accept a tokenizer whose sha256 differs from the base's
    lora: LoRAConfig | None = None  # None: all weights train
    val_file: Path | None = None  # a separate validation corpus / JSONL instead of a split
    cache_dir: Path | None = None  # continue: token cache directory (default OUTDIR/cache)
    skip_bad_lines: bool = False  # sft: skip malformed JSONL lines (counted) instead of failing
    resume: bool = False  # continue the run in OUTDIR from ckpt_last.pt
    overwrite: bool = False  # replace the run in OUTDIR
    log_format: str = "text"  # progress lines: text or json
    tensorboard: bool = False  # TensorBoard event files in OUTDIR/tb
    started: float = 0.0  # time.time() when the command started (--max-time counts from it)


# ---------------------------------------------------------------- SFT data


def decode_masked_inputs(model: nn.Module, doc_id: int):
    """Make ``model`` accept encoded SFT batches: a forward pre-hook decodes ``idx`` to tokens, sets masked
    ``targets`` to -1 (no loss) and recomputes ``seg_ids`` from the decoded tokens. Whoever calls the model
    (the trainer's step, its validation pass, compiled or not) gets the decoding; plain batches pass through
    unchanged. Returns the hook's handle (``.remove()`` undoes it)."""
    from minillm.model.gpt import segment_ids

    def hook(_module, args, kwargs):
        args = list(args)
        idx = args[0]
        args[0] = torch.where(idx < 0, ~idx, idx)  # (B, T)
        if len(args) > 1 and args[1] is not None:
            args[1] = args[1].clamp(min=-1)  # (B, T)
        elif kwargs.get("targets") is not None:
            kwargs["targets"] = kwargs["targets"].clamp(min=-1)
        if kwargs.get("seg_ids") is not None:
            kwargs["seg_ids"] = segment_ids(args[0], doc_id)
        return tuple(args), kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------- configs


def train_config_for(base_train: dict[str, Any] | None, overrides: dict[str, Any], lora: bool) -> TrainConfig:
    """The run's TrainConfig: the base run's (precision, batch size, doc masking, ...) with the run's length
    and patience reset, ``lr`` a tenth of the base's (the base's own for LoRA adapters, which start from
    zero), then the explicit ``overrides``."""
    base = train_from_dict(base_train or {})
    lr = base.lr if lora else base.lr / 10
    tcfg = dataclasses.replace(base, **FRESH_KEYS, lr=lr)
    return dataclasses.replace(tcfg, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------- the run


def _ckpt_hook(fs: FinetuneSpec, info: dict[str, Any]):
    """Turns the trainer's checkpoint dict into a fine-tuning one: the finetune record, and for LoRA the
    merged weights under ``model`` and the adapter under ``lora``."""
    from minillm.lora import merged_state_dict

    def hook(state: dict[str, Any]) -> dict[str, Any]:
        state = {**state, "finetune": info}
        if fs.lora is not None:
            sd = state["model"]
            state["lora"] = {"config": info["lora"], "tensors": {k: v for k, v in sd.items() if ".lora_" in k}}
            state["model"] = merged_state_dict(sd, fs.lora.scaling)
        return state

    return hook


def _load_adapter(model, ck: dict) -> None:
    """Resume a LoRA run: the adapter tensors onto the base already loaded."""
    missing, unexpected = model.load_state_dict(ck["lora"]["tensors"], strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise ValueError(f"adapter keys differ ({list(unexpected)[:2]})")


def _restore(path: Path, model, lora: bool, opts, scaler, loader, device):
    """``ckpt_last.pt`` -> model (LoRA: the adapter on the base already loaded), optimizers, scaler, loader,
    RNGs; returns the ``RunState``."""
    from minillm.train.run import _restore as restore

    return restore(path, model, opts, scaler, loader, device, _load_adapter if lora else None)


def build_model(base: dict[str, Any], mcfg: ModelConfig, lora: LoRAConfig | None, device) -> nn.Module:
    """The base's weights in a model of ``mcfg`` (the base's shape; dropout etc. may differ), with adapters."""
    from minillm.lora import apply_lora

    model = build_gpt(mcfg, base["model"], f"--ckpt: {base['path']}")
    if lora is not None:
        apply_lora(model, lora)
    return model.to(device)


def finetune(fs: FinetuneSpec, model_overrides: dict[str, Any], train_overrides: dict[str, Any]) -> dict[str, Any]:
    """Set up and run one fine-tuning run; returns the trainer's summary (plus the LoRA figures)."""
    from minillm.data import loader as ds
    from minillm.train.log import TrainLog, check_tensorboard
    from minillm.train.run import (
        RunSpec,
        RunState,
        _set_schedule,
        _Signals,
        check_memory,
        fit,
        oom_message,
        total_steps_for,
    )
    from minillm.train.rundir import (
        config_diff,
        inputs_of,
        prepare_outdir,
        refuse_diffs,
        replacing,
        run_config,
        write_run_files,
    )
    from minillm.train.step import maybe_compile, resolve_device, resolve_precision

    t_entry = fs.started or time.time()
    if fs.mode not in MODES:
        raise UsageError(f"--mode: {fs.mode!r} is not one of {', '.join(MODES)}")
    if fs.tensorboard:
        check_tensorboard()
    check_input_file(Path(fs.data), "--data", "give the corpus or JSONL file")
    check_outdir_not_base(fs.ckpt, fs.outdir)
    base = load_checkpoint(fs.ckpt)
    base_path = Path(base["path"])
    mcfg = dataclasses.replace(model_config_of(base),
                               **{k: v for k, v in model_overrides.items() if v is not None})
    from minillm.model.loss import liger_kernel

    if mcfg.loss_kernel == "liger" and liger_kernel() is None:  # a kernel choice of the base's machine, not
        mcfg = dataclasses.replace(mcfg, loss_kernel="torch")    # of its weights: this one lacks the extra
    tcfg = train_config_for(base.get("train_config"), train_overrides, fs.lora is not None)
    problems = validate(mcfg, tcfg)
    if fs.lora is not None:
        from minillm.lora import check_config

        check_config(fs.lora, mcfg)
    if problems:
        raise UsageError("invalid config:\n  " + "\n  ".join(problems))
    device = resolve_device(tcfg.device)
    dtype = resolve_precision(tcfg.precision, device)
    check_memory(mcfg, tcfg, device, dtype, TrainLog(fs.log_format).event, trainable=fs.lora is None,
                 model_fix="a smaller base model" + ("" if fs.lora else " or --lora-rank 8 (trains adapters only)"))
    tok_path = check_tokenizer(base, fs.tokenizer, fs.force_tokenizer, base=True)
    tok_sha, base_sha = sha256_file(tok_path), sha256_file(base_path)
    spec = RunSpec(tokenizer=tok_path, corpus=ds.Mixture((Path(fs.data),)), outdir=fs.outdir, val_file=fs.val_file,
                   cache_dir=fs.cache_dir, resume=fs.resume, overwrite=fs.overwrite, log_format=fs.log_format,
                   config_name=f"finetune-{fs.mode}", tensorboard=fs.tensorboard, started=t_entry)
    lora_info = None if fs.lora is None else {**dataclasses.asdict(fs.lora), "targets": list(fs.lora.targets)}
    info = {"mode": fs.mode, "base_checkpoint": str(base_path), "base_sha256": base_sha, "lora": lora_info}
    with _Signals() as sig:
        sig.outdir = fs.outdir
        with RunLock(fs.outdir):
            notes = prepare_outdir(spec, inputs_of(spec))
            clean_stale_temps(fs.outdir)
            clean_stale_temps(cache_dir_for(fs.outdir, fs.cache_dir), recursive=True)
            old = run_config(fs.outdir) if fs.resume else None
            torch.manual_seed(tcfg.seed)
            log = TrainLog(fs.log_format)
            for note in notes:
                log.event(note)
            if fs.mode == "sft":
                data = sft_data(fs, tok_path, mcfg.block_size, tcfg, log.event)
            else:
                log.event(f"encoding {fs.data} into the token cache")
                data = ds.prepare_data(tok_path, spec.corpus, cache_dir_for(fs.outdir, fs.cache_dir),
                                       mcfg.block_size, tcfg, val_file=fs.val_file, note=log.event)
            if data.vocab_size > mcfg.vocab_size:
                raise MiniLLMError(f"--tokenizer {tok_path} has {data.vocab_size} tokens, more than the base model's "
                                   f"{mcfg.vocab_size}; use the base run's tokenizer")
            run_cfg = {"format": RUN_FORMAT, "config": spec.config_name, "model": to_dict(mcfg), "train": to_dict(tcfg),
                       "data": {"tokenizer_sha256": tok_sha, **data.meta}, "val_doc_ids": data.val_doc_ids,
                       "finetune": info}
            if old is not None:
                refuse_diffs(config_diff(old, run_cfg, ("model", "train", "data", "finetune")))
            log.event("config", model=to_dict(mcfg), train=to_dict(tcfg), finetune=info)
            try:
                model = build_model(base, mcfg, fs.lora, device)
                del base
                report = _lora_report(model, mcfg, fs.lora, log)
                from minillm.optim.groups import configure_optimizer

                opts = configure_optimizer(model, tcfg, device)
                scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
                state = (_restore(fs.outdir / "ckpt_last.pt", model, fs.lora is not None, opts, scaler, data.loader,
                                  device) if old else RunState())
                _set_schedule(state, tcfg, old, total_steps_for(tcfg, data.loader.windows_per_epoch), log)
                log.event("run", mode=fs.mode, params=f"{model.num_params() / 1e6:.2f}M", device=str(device),
                          steps=state.schedule["total"], windows=data.loader.windows_per_epoch)
                if fs.mode == "sft":
                    decode_masked_inputs(model, data.doc_id)
                ctx = dict(model=model, compiled=maybe_compile(model, tcfg, device), optimizers=opts, scaler=scaler,
                           loader=data.loader, val_batches=data.val_batches, device=device, dtype=dtype,
                           doc_id=data.doc_id, tok_sha=tok_sha, t_entry=t_entry - state.elapsed_s, main=True,
                           ckpt_hook=_ckpt_hook(fs, info))
                with replacing(fs.outdir, inputs_of(spec), active=old is None) as saved:
                    write_run_files(fs.outdir, run_cfg, tok_path)
                    if fs.tensorboard:
                        log.open_tensorboard(fs.outdir / "tb")
                    ctx["saved"] = saved
                    try:
                        with log:
                            summary = fit(spec, mcfg, tcfg, state, ctx, log, sig)
                    finally:
                        if fs.lora is not None:
                            write_adapter(fs, mcfg, tcfg, info, tok_sha)
            except torch.OutOfMemoryError as e:
                raise MiniLLMError(oom_message(mcfg, tcfg, fs.outdir)) from e
    if report is not None:
        report["optimizer_state_bytes_measured"] = _check_state_size(opts, report, tcfg)
        summary["lora"] = report
        summary["adapter"] = str(fs.outdir / "adapter.pt")
    return summary


def check_outdir_not_base(ckpt: Path, outdir: Path) -> None:
    """Refuse an --outdir that is the base checkpoint's own run directory (the base is an input)."""
    from minillm.train.rundir import same_file

    if same_file(Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent, Path(outdir)):
        raise UsageError(f"--outdir {outdir} is the directory of the base checkpoint --ckpt {ckpt}, an input of "
                         f"this run; choose another --outdir")


def _lora_report(model: nn.Module, mcfg: ModelConfig, lora: LoRAConfig | None, log) -> dict[str, int] | None:
    """Trainable parameters and AdamW state size, checked against r * (in + out) per adapted matrix."""
    if lora is None:
        return None
    from minillm.lora import param_report, target_shapes

    rep = param_report(model, mcfg, lora)
    per = " + ".join(f"{t} {lora.rank}*({i}+{o})" for t, (i, o) in target_shapes(mcfg, lora.targets).items())
    log.event(f"LoRA rank {lora.rank}, alpha {lora.alpha:g}: {rep['trainable_params']:,} trainable parameters "
              f"({100 * rep['trainable_params'] / rep['total_params']:.2f}% of {rep['total_params']:,}) = "
              f"{mcfg.n_layer} layers x ({per}); AdamW state {rep['optimizer_state_bytes']:,} bytes "
              f"(2 fp32 tensors per parameter)", **rep)
    return rep


def _check_state_size(opts, report: dict[str, int], tcfg: TrainConfig) -> int:
    from minillm.lora import optimizer_state_bytes

    measured = optimizer_state_bytes(opts)
    if tcfg.optimizer == "adamw" and measured and measured != report["optimizer_state_bytes"]:
        raise MiniLLMError(f"LoRA: the optimizer holds {measured} bytes of state, the formula gives "
                           f"{report['optimizer_state_bytes']} (internal error)")
    return measured


def write_adapter(fs: FinetuneSpec, mcfg: ModelConfig, tcfg: TrainConfig, info: dict[str, Any], tok_sha: str) -> None:
    """``OUTDIR/adapter.pt``: the adapter of ``ckpt_best.pt`` alone (nothing when no checkpoint was saved)."""
    from minillm.lora import save_adapter_tensors

    best = fs.outdir / "ckpt_best.pt"
    if not best.is_file():
        return
    ck = load_checkpoint(best)
    rs = ck.get("run_state") or {}
    save_adapter_tensors(fs.outdir / "adapter.pt", ck["lora"]["tensors"], fs.lora, info["base_sha256"],
                         info["base_checkpoint"], to_dict(mcfg),
                         {"tokenizer_sha256": tok_sha, "train_config": to_dict(tcfg), "mode": fs.mode,
                          "step": rs.get("step"), "val_loss": rs.get("best_val")
                          if math.isfinite(rs.get("best_val", math.inf)) else None})
