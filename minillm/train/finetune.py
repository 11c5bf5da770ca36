"""Fine-tuning a trained checkpoint: continued pretraining (``continue``) and instruction tuning (``sft``),
of all weights or, with ``--lora-rank``, of LoRA adapters only (``minillm.lora``).

Both modes run through the trainer's own ``setup_run`` and ``fit`` (``minillm.train.run``, ``.loop``): the same
run directory, ``--resume``/``--overwrite``, signals, and ``torchrun`` (data-parallel; no FSDP). This module
brings the ``Job``: where the weights and the data come from, and what the checkpoints record:

- weights: the base checkpoint (``--ckpt``); the model config is the base's. A LoRA run's checkpoints hold
  the merged weights under ``model`` (so generate/evaluate/export take them as they are) and the adapter
  under ``lora``; ``adapter.pt`` (the adapter of ``ckpt_best.pt`` alone) is written when the run ends.
- data: ``continue`` reads a corpus file through the token cache (``run.corpus_data``); ``sft`` reads
  JSONL and builds one row per example (``minillm.data.sft``: the prompt template, the loss mask in the
  rows' sign), which a forward pre-hook on the model (``decode_masked_inputs``) decodes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm import distributed
from minillm.checkpoint import load_checkpoint, model_config_of
from minillm.config import ModelConfig, TrainConfig, to_dict, train_from_dict, validate
from minillm.corpus.read import check_input_file
from minillm.data.loader import Loader, Mixture, RunData
from minillm.data.sft import sft_data
from minillm.errors import MiniLLMError, UsageError
from minillm.io import sha256_file
from minillm.lora import LoRAConfig, check_config, merged_state_dict, param_report
from minillm.model.load import build_gpt, check_tokenizer
from minillm.model.loss import liger_kernel
from minillm.train.log import TrainLog
from minillm.train.loop import CheckpointHook, fit
from minillm.train.run import DataFactory, Job, ModelFactory, RunSpec, corpus_data, setup_run
from minillm.train.rundir import check_outdir_not_base

MODES = ("continue", "sft")
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


def finetune(fs: FinetuneSpec, model_overrides: dict[str, Any], train_overrides: dict[str, Any]) -> dict[str, Any]:
    """Set up and run one fine-tuning run (one process, or each rank of a ``torchrun`` run) through the trainer's
    ``setup_run`` and ``fit``; returns the trainer's summary (plus the LoRA figures)."""
    t_entry = fs.started or time.time()
    if fs.mode not in MODES:
        raise UsageError(f"--mode: {fs.mode!r} is not one of {', '.join(MODES)}")
    check_input_file(Path(fs.data), "--data", "give the corpus or JSONL file")
    check_outdir_not_base(fs.ckpt, fs.outdir)
    base = load_checkpoint(fs.ckpt)
    mcfg, tcfg = configs_for(base, fs, model_overrides, train_overrides)
    tok_path = check_tokenizer(base, fs.tokenizer, fs.force_tokenizer, base=True)
    spec = RunSpec(tokenizer=tok_path, corpus=Mixture((Path(fs.data),)), outdir=fs.outdir, val_file=fs.val_file,
                   cache_dir=fs.cache_dir, resume=fs.resume, overwrite=fs.overwrite, log_format=fs.log_format,
                   config_name=f"finetune-{fs.mode}", tensorboard=fs.tensorboard, started=t_entry)
    lora_info = None if fs.lora is None else {**dataclasses.asdict(fs.lora), "targets": list(fs.lora.targets)}
    base_path = Path(base["path"])
    info = {"mode": fs.mode, "base_checkpoint": str(base_path), "base_sha256": sha256_file(base_path), "lora": lora_info}
    job = Job(data=corpus_data(spec, mcfg.block_size) if fs.mode == "continue" else _sft(fs, tok_path, mcfg.block_size),
              model_config=functools.partial(_check_vocab, tok_path), model=_base_model(base, fs),
              record={"finetune": info}, run_fields={"mode": fs.mode}, trainable=fs.lora is None,
              model_fix="a smaller base model" + ("" if fs.lora else " or --lora-rank 8 (trains adapters only)"),
              load_weights=_load_adapter if fs.lora else None, on_save=finetune_checkpoint(info, fs.lora))
    with distributed.session(tcfg.device) as dist, setup_run(spec, mcfg, tcfg, job, dist) as (ctx, state):
        try:
            summary = fit(ctx, state)
        finally:
            if fs.lora is not None and dist.is_main:
                write_adapter(fs, mcfg, tcfg, info, ctx.tok_sha)
    if fs.lora is not None:
        report = param_report(ctx.model, mcfg, fs.lora)
        report["optimizer_state_bytes_measured"] = _check_state_size(ctx.optimizers, report, tcfg)
        summary["lora"] = report
        summary["adapter"] = str(fs.outdir / "adapter.pt")
    return summary


def configs_for(base: dict[str, Any], fs: FinetuneSpec, model_overrides: dict[str, Any],
                train_overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The run's model config (the base's, with ``model_overrides``) and TrainConfig (``train_config_for``),
    validated together with the LoRA config."""
    mcfg = dataclasses.replace(model_config_of(base), **{k: v for k, v in model_overrides.items() if v is not None})
    if mcfg.loss_kernel == "liger" and liger_kernel() is None:  # a kernel choice of the base's machine, not
        mcfg = dataclasses.replace(mcfg, loss_kernel="torch")    # of its weights: this one lacks the extra
    tcfg = train_config_for(base.get("train_config"), train_overrides, fs.lora is not None)
    problems = validate(mcfg, tcfg)
    if fs.lora is not None:
        check_config(fs.lora, mcfg)
    if problems:
        raise UsageError("invalid config:\n  " + "\n  ".join(problems))
    return mcfg, tcfg


# ---------------------------------------------------------------- the job: data, model, checkpoints


def _sft(fs: FinetuneSpec, tok_path: Path, block_size: int) -> DataFactory:
    """The data factory of ``--mode sft``: ``sft_data``, its loader reading this rank's share under torchrun."""

    def load(tcfg: TrainConfig, dist: distributed.Dist, log: TrainLog) -> RunData:
        data = sft_data(fs, tok_path, block_size, tcfg, log.event)
        if not dist.enabled:
            return data
        loader = Loader(None, None, block_size, tcfg.batch_size, tcfg.seed, dist.rank, dist.world_size,
                        sources=data.loader.sources)
        return dataclasses.replace(data, loader=loader)

    return load


def _check_vocab(tok_path: Path, mcfg: ModelConfig, data: RunData) -> ModelConfig:
    """The base's model config, refused when the tokenizer has more tokens than the base's vocabulary."""
    if data.vocab_size > mcfg.vocab_size:
        raise MiniLLMError(f"--tokenizer {tok_path} has {data.vocab_size} tokens, more than the base model's "
                           f"{mcfg.vocab_size}; use the base run's tokenizer")
    return mcfg


def _base_model(base: dict[str, Any], fs: FinetuneSpec) -> ModelFactory:
    """The model factory: the base's weights (``build_model``) with the adapters; for SFT, decoding the masked
    rows. The base checkpoint is let go once its weights are in the model."""

    def make(mcfg: ModelConfig, data: RunData, device: torch.device, log: TrainLog) -> nn.Module:
        model = build_model(base, mcfg, fs.lora, device)
        base.clear()
        _lora_report(model, mcfg, fs.lora, log)
        if fs.mode == "sft":
            decode_masked_inputs(model, data.doc_id)
        return model

    return make


def finetune_checkpoint(info: dict[str, Any], lora: LoRAConfig | None) -> CheckpointHook:
    """Turns the trainer's checkpoint dict into a fine-tuning one: the finetune record, and for LoRA the
    merged weights under ``model`` and the adapter under ``lora``."""

    def hook(state: dict[str, Any]) -> dict[str, Any]:
        state = {**state, "finetune": info}
        if lora is not None:
            sd = state["model"]
            state["lora"] = {"config": info["lora"], "tensors": {k: v for k, v in sd.items() if ".lora_" in k}}
            state["model"] = merged_state_dict(sd, lora.scaling)
        return state

    return hook


def _load_adapter(model, ck: dict) -> None:
    """Resume a LoRA run: the adapter tensors onto the base already loaded."""
    missing, unexpected = model.load_state_dict(ck["lora"]["tensors"], strict=False)
    if unexpected or any(".lora_" in k for k in missing):
        raise ValueError(f"adapter keys differ ({list(unexpected)[:2]})")


def build_model(base: dict[str, Any], mcfg: ModelConfig, lora: LoRAConfig | None, device) -> nn.Module:
    """The base's weights in a model of ``mcfg`` (the base's shape; dropout etc. may differ), with adapters."""
    from minillm.lora import apply_lora

    model = build_gpt(mcfg, base["model"], f"--ckpt: {base['path']}")
    if lora is not None:
        apply_lora(model, lora)
    return model.to(device)


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

