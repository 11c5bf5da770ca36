"""How the next token is picked: ``Sampling`` (temperature, top-k, top-p, the presence-based repetition
penalty), its checks and defaults, and ``sample_next_token``, written with fixed shapes and no host sync so
that it also runs inside a CUDA graph (``decoder.StepChunk``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from minillm.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked."""

    temperature: float = field(default=1.0, metadata={"help": "divide the logits by this; 0 is greedy"})
    top_k: int = field(default=0, metadata={"help": "keep only the k most likely tokens; 0 disables"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set of tokens reaching this probability"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL penalty on tokens in the context; 1 disables"})


SAMPLING_PENALTY = 1.1  # generate's --repetition-penalty when sampling (its text then repeats as held-out text does)
GREEDY_PENALTY = 1.3  # ... and with --temperature 0: at 1.1 greedy text loops (measured: docs/GENERATION.md)


def default_penalty(temperature: float) -> float:
    """``--repetition-penalty`` when it is not given: stronger for greedy decoding, which loops otherwise."""
    return GREEDY_PENALTY if temperature == 0 else SAMPLING_PENALTY


def check_sampling(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    problems = []
    if not temperature >= 0:  # NaN too
        problems.append(f"--temperature must be >= 0 (0 is greedy); got {temperature}")
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 disables it); got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1] (1 disables it); got {top_p}")
    if not repetition_penalty > 0:
        problems.append(f"--repetition-penalty must be > 0 (1 disables it); got {repetition_penalty}")
    if problems:
        raise UsageError("\n".join(problems))


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:  # (B, V) -> (B,)
    """One token per row drawn from ``probs``: ``torch.multinomial(probs, 1)``'s own arithmetic (argmax of
    probs / Exp(1) noise, the same random numbers, so the same tokens for a seed) without its host-side
    validity checks, which a CUDA graph cannot hold."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def skip_draws(generator: torch.Generator, times: int, shape: tuple[int, int], device: torch.device) -> None:
    """Advance ``generator`` as ``times`` calls of ``draw`` on (B, V) fp32 probabilities would."""
    for _ in range(times):
        torch.empty(shape, device=device).exponential_(1, generator=generator)


def sample_next_token(
    logits: Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    context: Tensor | None = None,  # (B, T) token ids already in the context
    generator: torch.Generator | None = None,
    seen: Tensor | None = None,  # (B, V) bool, True for tokens in the context (instead of ``context``)
) -> Tensor:  # (B,)
    """Pick the next token of each row. Temperature 0 is greedy and never touches the generator.
    Repetition penalty (CTRL): logits of tokens in the context are divided by it when positive and
    multiplied by it when negative. Then temperature, top-k, top-p (the first token is always kept)."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0:
        if seen is None and context is not None and context.numel():
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, context, True)
        if seen is not None:
            penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
            logits = torch.where(seen, penalized, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # the tokens above already reach top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return draw(torch.softmax(logits, dim=-1), generator)
