"""``train --dry-run``: what a config implies before anything is written: parameters, FLOPs, memory in GiB,
the steps and epochs of the corpus (its tokens estimated from an encoded sample), and the time per step on
the device: measured on a few eager steps of the real model when they take little time, else from the
device's measured matrix-multiply speed (an optimistic bound)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from minillm.config import ModelConfig, TrainConfig, pad_vocab, to_dict
from minillm.distributed import synchronize
from minillm.model.gpt import GPT
from minillm.model.memory import available_memory, estimate_memory
from minillm.tokenizer import load_tokenizer
from minillm.train.state import total_steps_for
from minillm.train.step import accumulate, resolve_device, resolve_precision

SAMPLE_CHARS = 1 << 20  # characters of each corpus encoded to estimate its tokens
MEASURE_UNDER_S = 2.0  # measure real steps when the matmul estimate of a micro-step is under this
MEASURED_STEPS = 2  # timed micro-steps, after one warm-up


def dry_run_report(tokenizer: Path, corpora: tuple[Path, ...], mcfg: ModelConfig, tcfg: TrainConfig,
                   measure: bool = True) -> dict[str, Any]:
    """The ``--dry-run`` report (see the module's docstring); ``measure`` False skips the device timing."""
    tok = load_tokenizer(tokenizer)
    mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(tok.get_vocab_size()))
    with torch.device("meta"):
        model = GPT(mcfg)
    total, non_emb = model.num_params(), model.num_params(non_embedding=True)
    mem = estimate_memory(mcfg, tcfg.batch_size, optimizer=tcfg.optimizer)
    plan = corpus_plan(sum(corpus_tokens(tok, p) for p in corpora), mcfg.block_size, tcfg)
    report = {"model": to_dict(mcfg), "train": to_dict(tcfg), "params": total, "params_embedding": total - non_emb,
              "params_non_embedding": non_emb, "flops_per_token": model.flops_per_token(),
              "memory_estimate_gib": {k: float(f"{v / 2**30:.3g}") for k, v in mem.items()}, "data": plan}
    if measure:
        tokens_per_step = tcfg.batch_size * tcfg.accumulation_steps * mcfg.block_size
        report["time_estimate"] = time_estimate(mcfg, tcfg, model.flops_per_token() * tokens_per_step,
                                                plan["steps"], mem["total"])
    return report


def corpus_tokens(tok, path: Path) -> int:
    """About how many tokens (``<|doc|>`` included) ``path`` holds: exact for a file of up to ``SAMPLE_CHARS``
    characters, else its size times the tokens per byte of its first ``SAMPLE_CHARS``."""
    from minillm.corpus.read import iter_pieces
    from minillm.tokenizer import encode_documents

    texts, n, continued = [], 0, 0
    for text, first in iter_pieces(path):
        texts.append(text)
        n += len(text)
        continued += not first  # a piece of a long document: no <|doc|> of its own
        if n >= SAMPLE_CHARS:
            break
    tokens = sum(map(len, encode_documents(tok, texts))) - continued
    sampled = sum(len(t.encode("utf-8")) for t in texts)
    size = path.stat().st_size
    return tokens if n < SAMPLE_CHARS else round(tokens * size / max(1, sampled))


def corpus_plan(tokens: int, block_size: int, tcfg: TrainConfig) -> dict[str, Any]:
    """Windows per epoch, steps and epochs implied by ``tokens`` of corpus (the validation share held out;
    windows ``stride`` apart, ignoring their alignment to documents, which adds up to a third)."""
    train_tokens = round(tokens * (1 - tcfg.val_fraction))
    stride = tcfg.stride or block_size
    windows = max(0, (train_tokens - block_size - 1) // stride + 1)
    steps = total_steps_for(tcfg, windows) if windows else 0
    per_step = tcfg.batch_size * tcfg.accumulation_steps
    return {"tokens_about": tokens, "train_tokens_about": train_tokens, "windows_per_epoch_about": windows,
            "steps": steps, "epochs": round(steps * per_step / windows, 3) if windows else 0.0}


def time_estimate(mcfg: ModelConfig, tcfg: TrainConfig, flops_per_step: float, steps: int,
                  memory_bytes: int) -> dict[str, Any]:
    """Seconds per optimizer step on the run's device (see the module's docstring), and the run's total or,
    under ``--max-time`` alone, the steps that fit in it."""
    device = resolve_device(tcfg.device)
    dtype = resolve_precision(tcfg.precision, device)
    per_step = flops_per_step / matmul_flops(device, dtype)
    method = "matmul speed (real steps are slower)"
    avail = available_memory(device)
    if per_step / tcfg.accumulation_steps < MEASURE_UNDER_S and (avail is None or memory_bytes < avail):
        per_step, method = measure_step(mcfg, tcfg, device, dtype), "measured (eager; torch.compile is faster)"
    out: dict[str, Any] = {"device": str(device), "seconds_per_step": float(f"{per_step:.4g}"), "method": method}
    if steps:
        out["total_s"] = round(steps * per_step, 1)
    elif tcfg.max_time:
        out["steps_in_max_time"] = int(tcfg.max_time / per_step)
    return out


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matrix multiply in ``dtype`` on ``device``, best of a few."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        synchronize(device)
        t = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def measure_step(mcfg: ModelConfig, tcfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds per optimizer step: forward and backward of one micro-batch of random tokens, best of
    ``MEASURED_STEPS`` after a warm-up, times the accumulation steps (the optimizer's update not counted)."""
    torch.manual_seed(0)
    model = GPT(mcfg).to(device)
    batch = torch.randint(1, mcfg.vocab_size, (tcfg.batch_size, mcfg.block_size + 1))
    best = float("inf")
    for i in range(MEASURED_STEPS + 1):
        synchronize(device)
        t = time.perf_counter()
        accumulate(model, [batch], tcfg, 0, device, dtype)
        synchronize(device)
        best = best if i == 0 else min(best, time.perf_counter() - t)
    return best * tcfg.accumulation_steps

