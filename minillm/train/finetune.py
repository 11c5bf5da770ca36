"""Fine-tuning a trained checkpoint: continued pretraining (``continue``) and instruction tuning (``sft``),
of all weights or, with ``--lora-rank``, of LoRA adapters only (``minillm.lora``).

Both modes run through the trainer's own ``setup_run`` and ``fit`` (``minillm.train.run``, ``.loop``): the same
run directory, ``--resume``/``--overwrite``, signals, and ``torchrun`` (data-parallel; no FSDP). This module
brings the ``Job``: where the weights and the data come from, and what the checkpoints record:

- weights: the base checkpoint (``--ckpt``); the model config is the base's. A LoRA run's checkpoints hold
  the merged weights under ``model`` (so generate/evaluate/export take them as they are) and the adapter
  under ``lora``; ``adapter.pt`` (the adapter of ``ckpt_best.pt`` alone) is written when the run ends.
- data: ``continue`` reads a corpus file through the token cache (``run.corpus_data``); ``sft`` reads
  JSONL and builds one row per example (below).

SFT prompt template (``format_example``). ``{"instruction", "input"?, "response"}`` becomes::

    <|doc|>### Instruction:
    {instruction}

    ### Input:            <- only when "input" is present and not empty
    {input}

    ### Response:
    {response}<|doc|>

and ``{"messages": [{"role": "system"|"user"|"assistant", "content"}...]}`` becomes ``### System:\\n{c}\\n\\n``
for a system message, ``### Instruction:\\n{c}\\n\\n### Response:\\n`` for each user message and ``{c}`` for each
assistant message (``\\n\\n`` between turns). The loss counts only the response (assistant) tokens and the
final ``<|doc|>``, so the model learns to answer and then stop; at generation time give the prompt part,
ending in ``### Response:\\n`` (``generate`` puts the first ``<|doc|>`` itself and stops at the next).

Rows carry their loss mask in the sign: a value ``~t`` (< 0) is token ``t`` that is no target. The trainer's
step sees ordinary ``(B, T+1)`` int64 batches; a forward pre-hook on the model (``decode_masked_inputs``)
decodes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minillm import distributed
from minillm.checkpoint import load_checkpoint, model_config_of, sha256_file
from minillm.config import ModelConfig, TrainConfig, to_dict, train_from_dict, validate
from minillm.corpus.read import check_input_file
from minillm.data.loader import Loader, RunData
from minillm.errors import MiniLLMError, UsageError
from minillm.lora import LoRAConfig, check_config, merged_state_dict, param_report
from minillm.model.gpt import liger_kernel
from minillm.train.log import TrainLog
from minillm.train.loop import CheckpointHook, fit
from minillm.train.run import DataFactory, Job, ModelFactory, RunSpec, corpus_data, setup_run
from minillm.train.rundir import check_outdir_not_base

MODES = ("continue", "sft")
INSTRUCTION, INPUT, RESPONSE, SYSTEM = "### Instruction:\n", "### Input:\n", "### Response:\n", "### System:\n"
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


@dataclass(frozen=True)
class Example:
    """An instruction example as text segments, each with whether its tokens carry loss."""

    segments: tuple[tuple[str, bool], ...]


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt part of the template (what to give ``generate --prompt``)."""
    body = INSTRUCTION + instruction + "\n\n"
    if input:
        body += INPUT + input + "\n\n"
    return body + RESPONSE


def _str(obj: dict, key: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise ValueError(f'"{key}" must be a string' if key in obj else f'missing "{key}"')
    return v


def format_example(obj: Any) -> Example:
    """One parsed JSONL value -> an ``Example``; ``ValueError`` says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
        segs: list[tuple[str, bool]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                    "system", "user", "assistant"):
                raise ValueError(f'messages[{i}] must be {{"role": "system"|"user"|"assistant", "content": string}}')
            if segs and segs[-1][1]:
                segs.append(("\n\n", False))
            role, c = m["role"], m["content"]
            if role == "system":
                segs.append((SYSTEM + c + "\n\n", False))
            elif role == "user":
                segs.append((INSTRUCTION + c + "\n\n" + RESPONSE, False))
            else:
                if not segs or not segs[-1][0].endswith(RESPONSE):
                    raise ValueError(f"messages[{i}]: an assistant message must follow a user message")
                segs.append((c, True))
        if not segs[-1][1]:
            raise ValueError("the last message must be the assistant's (the response to learn)")
        return Example(tuple(segs))
    instruction, response = _str(obj, "instruction"), _str(obj, "response")
    return Example(((format_prompt(instruction, _str(obj, "input", required=False)), False), (response, True)))


def read_jsonl(path: Path, skip_bad_lines: bool = False, log=None) -> tuple[list[Example], int]:
    """Parse an SFT JSONL file: ``(examples, bad_lines)``. A malformed line raises an error naming its line
    number (all of them, up to 10) unless ``skip_bad_lines``, which skips and counts them."""
    if not Path(path).is_file():
        raise MiniLLMError(f"--data: {path} does not exist")
    examples, bad = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    examples.append(format_example(json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.append(f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
                except RecursionError:
                    bad.append(f"line {n}: nested too deeply to read (arrays or objects inside each other "
                               f"hundreds of levels deep); an example is one object of strings")
                except ValueError as e:
                    bad.append(f"line {n}: {e}")
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"--data: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if bad and not skip_bad_lines:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise MiniLLMError(f"--data {path}: {len(bad)} malformed line(s):\n  " + "\n  ".join(bad[:10]) + more
                           + '\neach line must be {"instruction", "input"?, "response"} or {"messages": [...]}; '
                             + ("fix them or pass --skip-bad-lines to skip them" if examples else
                                "no line is an example: for plain text use --mode continue"))
    if bad and log:
        log(f"--skip-bad-lines: skipped {len(bad)} malformed line(s) of {path} (first: {bad[0]})")
    if not examples:
        raise MiniLLMError(f"--data: {path} holds no usable examples")
    return examples, len(bad)


def encode_example(tok, ex: Example, doc: int) -> tuple[list[int], list[bool]]:
    """Token ids ``<|doc|> + segments + <|doc|>`` and, per position, whether it is a loss target
    (response tokens and the final ``<|doc|>``). Segments are encoded one by one, as generation sees them."""
    ids, target = [doc], [False]
    for text, trained in ex.segments:
        seg = tok.encode(text, add_special_tokens=False).ids
        ids += seg
        target += [trained] * len(seg)
    return ids + [doc], target + [True]


def encode_rows(tok, examples: list[Example], block_size: int, pad: int) -> tuple[np.ndarray, dict[str, int]]:
    """One row of ``block_size + 1`` per example (B, T+1) int64: a token that is a loss target as itself, any
    other as ``~token`` (negative); padded with ``~pad``. Longer examples are cut at the end (counted);
    one with no target left is dropped (counted)."""
    span = block_size + 1
    doc = int(tok.token_to_id("<|doc|>"))
    rows, truncated, dropped, targets = [], 0, 0, 0
    for ex in examples:
        ids, tgt = encode_example(tok, ex, doc)
        if len(ids) > span:
            truncated += 1
            ids, tgt = ids[:span], tgt[:span]
        if not any(tgt):
            dropped += 1
            continue
        row = np.full(span, ~pad, dtype=np.int64)
        a, m = np.asarray(ids, dtype=np.int64), np.asarray(tgt)
        row[: len(ids)] = np.where(m, a, ~a)
        rows.append(row)
        targets += int(m.sum())
    out = np.stack(rows) if rows else np.zeros((0, span), dtype=np.int64)
    return out, {"examples": len(rows), "truncated": truncated, "dropped": dropped, "target_tokens": targets}


def _too_long(flag: str, path: Path, tok, examples: list[Example], block_size: int) -> MiniLLMError:
    """No example leaves a response token inside the block: say how long they are and what to do."""
    doc = int(tok.token_to_id("<|doc|>"))
    lens = sorted(len(encode_example(tok, ex, doc)[0]) for ex in examples)
    span = f"{lens[0]} to {lens[-1]}" if lens[0] < lens[-1] else f"{lens[0]}"
    return MiniLLMError(
        f"{flag} {path}: every example is too long for the base model's block of {block_size} tokens: its prompt "
        f"alone fills the block, leaving no response token to learn (the {len(lens)} example(s) are {span} tokens "
        f"long); shorten the instructions and inputs to well under {block_size} tokens, or "
        f"fine-tune a base model trained with a larger --block-size (finetune keeps the base's block size)")


def decode_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded rows -> ``(tokens, targets)``: the tokens themselves, and -1 where a position carries no loss."""
    return torch.where(rows < 0, ~rows, rows), rows.clamp(min=-1)


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


def sft_data(fs: FinetuneSpec, tok_path: Path, block_size: int, tcfg: TrainConfig, log) -> Any:
    """The SFT rows as a ``dataset.RunData``: a seeded split by example (or ``--val-file``), the trainer's
    ``Loader`` over the training rows, fixed validation batches."""
    from minillm.data import loader as ds
    from minillm.tokenizer import doc_id, load_tokenizer, pad_id

    tok = load_tokenizer(tok_path)
    examples, bad = read_jsonl(fs.data, fs.skip_bad_lines, log)
    rows, info = encode_rows(tok, examples, block_size, pad_id(tok))
    if len(rows) == 0:
        raise _too_long("--data", fs.data, tok, examples, block_size)
    if fs.val_file is not None:
        vex, vbad = read_jsonl(fs.val_file, fs.skip_bad_lines, log)
        val, vinfo = encode_rows(tok, vex, block_size, pad_id(tok))
        train, val_ids = rows, np.zeros(0, dtype=np.int64)
        if len(val) == 0:
            raise _too_long("--val-file", fs.val_file, tok, vex, block_size)
    else:
        if len(rows) < 2:
            dropped = f" ({info['dropped']} more too long for the block of {block_size} tokens)" if info["dropped"] else ""
            raise MiniLLMError(f"--data {fs.data}: {len(rows)} usable example(s){dropped}; a validation split needs "
                               f"at least 2 (or pass --val-file)")
        val_ids = ds.split_documents(len(rows), tcfg.val_fraction, tcfg.seed)
        train, val = np.delete(rows, val_ids, axis=0), rows[val_ids]
    if info["truncated"] or info["dropped"]:
        log(f"{info['truncated']} example(s) longer than block_size + 1 = {block_size + 1} tokens were cut at the end"
            + (f"; {info['dropped']} with no response token left were dropped" if info["dropped"] else ""))
    span = block_size + 1
    loader = ds.Loader(None, None, block_size, tcfg.batch_size, tcfg.seed,
                       sources=[ds.Source(str(fs.data), train.reshape(-1), np.arange(len(train), dtype=np.int64) * span)])
    val = val[: tcfg.batch_size * tcfg.eval_batches]
    val_batches = [val[i : i + tcfg.batch_size] for i in range(0, len(val), tcfg.batch_size)]
    meta = {"corpus": str(fs.data), "corpus_sha256": sha256_file(fs.data), "format": "sft-jsonl",
            "val_file": str(fs.val_file) if fs.val_file else None, "bad_lines": bad, **info,
            "train_examples": len(train), "val_examples": len(val), "train_tokens": int(train.size)}
    return ds.RunData(loader, val_batches, tok.get_vocab_size(), doc_id(tok), val_ids.tolist(), meta)


# ---------------------------------------------------------------- configs


def train_config_for(base_train: dict[str, Any] | None, overrides: dict[str, Any], lora: bool) -> TrainConfig:
    """The run's TrainConfig: the base run's (precision, batch size, doc masking, ...) with the run's length
    and patience reset, ``lr`` a tenth of the base's (the base's own for LoRA adapters, which start from
    zero), then the explicit ``overrides``."""
    base = train_from_dict(base_train or {})
    lr = base.lr if lora else base.lr / 10
    tcfg = dataclasses.replace(base, **FRESH_KEYS, lr=lr)
    return dataclasses.replace(tcfg, **{k: v for k, v in overrides.items() if v is not None})


def check_tokenizer(base: dict[str, Any], tokenizer: Path | None, force: bool) -> Path:
    """The tokenizer for the run: ``--tokenizer`` or the base run's ``tokenizer.json``; refuses one whose
    sha256 differs from the base checkpoint's (naming both files) unless ``force``."""
    own = Path(base["path"]).parent / "tokenizer.json"
    path = Path(tokenizer) if tokenizer else own
    if not path.is_file():
        raise MiniLLMError(f"--tokenizer: {path} does not exist; pass the base run's tokenizer.json with --tokenizer")
    recorded = base.get("tokenizer_sha256")
    if recorded and not force and sha256_file(path) != recorded:
        where = f"the base run's {own}" if own.is_file() and sha256_file(own) == recorded else "the base run's tokenizer"
        raise MiniLLMError(f"--tokenizer {path} is not the tokenizer base checkpoint {base['path']} was trained with "
                           f"({where}; the sha256 differs): fine-tuning keeps the base's tokenizer. Use {own}, or "
                           f"--force-tokenizer if you are sure")
    return path


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
    tok_path = check_tokenizer(base, fs.tokenizer, fs.force_tokenizer)
    spec = RunSpec(tokenizer=tok_path, corpus=Path(fs.data), outdir=fs.outdir, val_file=fs.val_file,
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
    from minillm.model.gpt import GPT

    model = GPT(mcfg)
    try:
        model.load_state_dict(base["model"])
    except RuntimeError as e:
        raise MiniLLMError(f"--ckpt: {base['path']} does not match its own model config: {str(e)[:200]}") from e
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

