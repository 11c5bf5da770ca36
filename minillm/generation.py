"""Sampling: ``sample_next_token`` (temperature, top-k, top-p, repetition penalty) and ``generate``
(KV-cached incremental decoding, streaming, stop strings)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from minillm.errors import UsageError


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    problems = []
    if temperature < 0:
        problems.append(f"--temperature must be >= 0 (0 is greedy); got {temperature}")
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 disables it); got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1] (1 disables it); got {top_p}")
    if repetition_penalty <= 0:
        problems.append(f"--repetition-penalty must be > 0 (1 disables it); got {repetition_penalty}")
    if problems:
        raise UsageError("\n".join(problems))


def sample_next_token(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    context: torch.Tensor | None = None,  # (B, T) tokens already in the context
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B,)
    """Pick the next token of each row. Temperature 0 is greedy (and ignores the generator).
    The repetition penalty follows CTRL: positive logits of tokens already in the context are divided by
    it, negative ones multiplied."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and context is not None and context.numel():
        seen = torch.gather(logits, 1, context)
        seen = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
        logits.scatter_(1, context, seen)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    *,
    stop_id: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], bool] | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue ``prompt`` (token ids, usually starting with ``<|doc|>``) by up to ``max_new_tokens``.
    Stops at ``stop_id`` (not included) or when ``on_token`` returns True. The prompt is cut from the left
    to fit the context."""
    from minillm.model import KVCache

    block = model.cfg.block_size
    device = next(model.parameters()).device
    ids = list(prompt[-block:])
    out: list[int] = []
    cache = KVCache(model.cfg, 1, block, device, next(model.parameters()).dtype) if use_cache else None
    pending = torch.tensor([ids], device=device)
    for _ in range(max_new_tokens):
        if cache is not None and cache.pos + pending.size(1) > block:
            cache.reset()  # context full: re-encode the most recent block
            pending = torch.tensor([ids[-(block - 1):]], device=device)
        if cache is None:
            logits = model(torch.tensor([ids[-block:]], device=device))[:, -1]
        else:
            logits = model(pending, cache=cache)[:, -1]
        ctx = torch.tensor([ids], device=device)
        nxt = int(sample_next_token(logits, temperature, top_k, top_p, repetition_penalty, ctx, generator)[0])
        if stop_id is not None and nxt == stop_id:
            break
        ids.append(nxt)
        out.append(nxt)
        pending = torch.tensor([[nxt]], device=device)
        if on_token is not None and on_token(nxt):
            break
    return out
