"""How the next token is picked: ``Sampling`` (temperature, top-k, top-p, the presence-based repetition
penalty), its checks and defaults, and ``sample_next_token``, written with fixed shapes and no host sync so
that it also runs inside a CUDA graph (``decoder.StepChunk``)."""

from __future__ import annotations

import warnings
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


def noise_like(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The Exp(1) noise ``torch.multinomial(probs, 1)`` draws for ``probs`` (B, V): the same random numbers."""
    return torch.empty_like(probs).exponential_(1, generator=generator)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:  # (B, V) -> (B,)
    """One token per row drawn from ``probs``: ``torch.multinomial(probs, 1)``'s own arithmetic (argmax of
    probs / Exp(1) noise, the same random numbers, so the same tokens for a seed) without its host-side
    validity checks, which a CUDA graph cannot hold."""
    return (probs / noise_like(probs, generator)).argmax(dim=-1)


def skip_draws(generator: torch.Generator, times: int, shape: tuple[int, int], device: torch.device) -> None:
    """Advance ``generator`` as ``times`` calls of ``draw`` on (B, V) fp32 probabilities would."""
    for _ in range(times):
        torch.empty(shape, device=device).exponential_(1, generator=generator)


MARGIN = 16  # candidates taken beyond the top k, so that ties at the k-th logit are still decided exactly


def penalize(logits: Tensor, repetition_penalty: float, seen: Tensor | None) -> Tensor:
    """CTRL: the logits of ``seen`` tokens (B, V) divided by the penalty when positive, multiplied when negative."""
    if repetition_penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    return torch.where(seen, penalized, logits)


def nucleus_sorted(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p over the whole vocabulary (one sort of (B, V)): the logits, -inf where dropped. Top-k
    keeps every logit >= the k-th (ties included)."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # the tokens above already reach top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def nucleus_top_k(logits: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """``nucleus_sorted`` with top-k and top-p, sorting ``top_k + MARGIN`` candidates instead of the vocabulary:
    -> (the logits, -inf where dropped; ``unsure`` (B,) bool). A row is unsure when all its candidates past the
    k-th tie with it, so more logits outside them may too: its result is not ``nucleus_sorted``'s."""
    B, V = logits.shape
    n = min(V, top_k + MARGIN)
    vals, idx = torch.topk(logits, n, dim=-1)  # (B, n), descending
    kth = vals[:, top_k - 1:top_k]  # (B, 1)
    unsure = vals[:, -1] >= kth[:, 0] if n < V else torch.zeros(B, dtype=torch.bool, device=logits.device)
    idx, order = idx.sort(dim=-1)  # ties in vocabulary order, as nucleus_sorted's stable sort has them
    vals, order = vals.gather(1, order).sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(1, order)
    in_k = vals >= kth
    probs = torch.softmax(vals.masked_fill(~in_k, float("-inf")), dim=-1)
    keep = in_k & ((torch.cumsum(probs, dim=-1) - probs) < top_p)
    kept = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals.masked_fill(~keep, float("-inf")))
    return kept, unsure


def sample_next_token(
    logits: Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    context: Tensor | None = None,  # (B, T) token ids already in the context
    generator: torch.Generator | None = None,
    seen: Tensor | None = None,  # (B, V) bool, True for tokens in the context (instead of ``context``)
    unsure: Tensor | None = None,  # (B,) bool: see below
    noise: Tensor | None = None,  # (B, V) the Exp(1) noise to draw with (``noise_like``), instead of ``generator``
    fast: bool = False,  # with temperature > 0 and top-k: the Triton sampler (``triton_decode.sample``)
) -> Tensor:  # (B,)
    """Pick the next token of each row. Temperature 0 is greedy and never touches the generator.
    Repetition penalty (CTRL): logits of tokens in the context are divided by it when positive and
    multiplied by it when negative. Then temperature, top-k (every logit >= the k-th), top-p (the first token is
    always kept; ties in vocabulary order).

    With both top-k and top-p, only ``top_k + MARGIN`` candidates are sorted (``nucleus_top_k``), not the
    vocabulary. A row whose candidates cannot decide (ties at the k-th logit past the margin) is redone over the
    whole vocabulary with the same random numbers: after a host check, or, with ``unsure`` given (inside a CUDA
    graph: no host sync), not redone but marked True in ``unsure``, and the caller redoes the step.

    ``fast`` (the decoders that run the Triton decode kernels, bf16 on CUDA): with temperature > 0 and
    0 < top_k < V (``takes_fast``), the same distribution and random numbers in two kernels instead of ~30, rounded
    differently (``minillm.model.triton_decode.sample``); otherwise as without it."""
    logits = logits.float()
    if seen is None and context is not None and context.numel() and repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, context, True)
    if fast and takes_fast(temperature, top_k, logits.size(-1)):
        token, noise = fast_sample(logits, temperature, top_k, top_p, repetition_penalty, generator, seen, unsure,
                                   noise)
        if token is not None:
            return token
    logits = penalize(logits, repetition_penalty, seen)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    noise = noise_like(logits, generator) if noise is None else noise
    if 0 < top_k < logits.size(-1) and top_p < 1.0:
        kept, rows = nucleus_top_k(logits, top_k, top_p)
        if unsure is not None:
            unsure |= rows
        elif bool(rows.any()):  # rare: a host sync only then
            kept = torch.where(rows[:, None], nucleus_sorted(logits, top_k, top_p), kept)
    else:
        kept = nucleus_sorted(logits, top_k, top_p)
    return (torch.softmax(kept, dim=-1) / noise).argmax(dim=-1)


def takes_fast(temperature: float, top_k: int, vocab: int) -> bool:
    """Whether the Triton sampler (``fast_sample``) covers these settings: sampling (not greedy) with a top-k."""
    return temperature > 0 and 0 < top_k < vocab


def fast_sample(logits: Tensor, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                generator: torch.Generator | None, seen: Tensor | None, unsure: Tensor | None,
                noise: Tensor | None, record: tuple | None = None) -> tuple[Tensor | None, Tensor]:
    """``sample_next_token``'s ``fast`` path (``triton_decode.sample``) -> (the tokens, or None where the kernels
    failed at an eager call: the caller then samples exactly; the noise drawn). ``record`` (with ``unsure``: no
    host check): ``triton_decode.sample``'s, the chunk step's bookkeeping done by its kernel."""
    from minillm.model import triton_decode

    noise = noise_like(logits, generator) if noise is None else noise
    if triton_decode.sampler_failed is not None:
        return None, noise
    flags = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device) if unsure is None else unsure
    try:
        token = triton_decode.sample(logits, temperature, top_k, top_p, repetition_penalty, seen, noise, flags,
                                     candidates=top_k + MARGIN, record=record if unsure is not None else None)
    except Exception as e:  # a Triton that cannot build the kernels here (an old one without tl.topk): not again
        if logits.is_cuda and torch.cuda.is_current_stream_capturing():
            raise
        triton_decode.sampler_failed = f"{type(e).__name__}: {str(e)[:200]}"
        warnings.warn(f"the Triton sampler failed ({triton_decode.sampler_failed}); sampling without it (slower)",
                      RuntimeWarning, stacklevel=2)
        return None, noise
    if unsure is None and bool(flags.any()):  # rare: a host sync only then, and those rows picked exactly
        exact = sample_next_token(logits, temperature, top_k, top_p, repetition_penalty, seen=seen, noise=noise)
        token = torch.where(flags, exact, token)
    return token, noise
