"""Sampling and generation: ``sample_next_token`` (temperature, top-k, top-p, repetition penalty),
``generate_batch`` (left-padded batches over a preallocated KV cache, sliding when the context fills),
the static one-token decode step (``GPT.decode_step`` over a fixed-shape cache, replayed as a CUDA graph,
optionally compiled; kept on the model by ``static_decoder``), and ``complete`` (text in, text out: stop
strings, streaming that never splits a character, several samples per prompt).

Sliding: a row's context is its most recent tokens, at most ``block_size``. When a new token would
overflow it, the context restarts at the most recent ``slide_keep(block)`` tokens, which are
re-encoded. The rule depends only on the row's own length, so cached, uncached, batched and
one-by-one decoding all see the same contexts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from minillm.corpus.read import DOC_JOIN  # between samples in text output (the corpus format)
from minillm.errors import MiniLLMError, UsageError
from minillm.model.gpt import GPT, KVCache


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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def slide_keep(block: int) -> int:
    """Tokens kept (and re-encoded) when a row's context is full: three quarters of the block."""
    return max(1, block - max(1, block // 4))


def decode_mode(device: torch.device, compile: str) -> str:
    """The decode step for ``--compile``: auto = the static step replayed as a CUDA graph on CUDA (no compile
    wait) and plain PyTorch elsewhere; on = torch.compile'd too (a longer start, see docs/BENCHMARKS.md); off =
    plain PyTorch (``GPT.forward`` with the KV cache)."""
    if compile not in ("auto", "on", "off"):
        raise UsageError(f"--compile: {compile!r} is not one of auto, on, off")
    if compile == "on":
        return "compiled"
    return "graph" if compile == "auto" and device.type == "cuda" else "eager"


# ------------------------------------------------------------------------------------ decode step


class StaticDecodeStep(nn.Module):
    """``GPT.decode_step`` bound to a KV cache, as a module to compile and to capture in a CUDA graph: the
    cache's keys and values are its buffers (the same tensors, not copies)."""

    def __init__(self, model: GPT, cache: KVCache):
        super().__init__()
        self.model = model
        self.register_buffer("k", cache.k, persistent=False)  # (L, B, Hkv, S, D), shared with the cache
        self.register_buffer("v", cache.v, persistent=False)

    def forward(self, idx: Tensor, slot: Tensor, offsets: Tensor, key_valid: Tensor) -> Tensor:
        """idx (B, 1), slot (1,) the cache slot of this token, offsets (B,) left padding,
        key_valid (B, S) False at padding -> logits (B, V)."""
        return self.model.decode_step(idx, slot, offsets, key_valid, self.k, self.v)


def cache_len(block: int, batch: int, need: int) -> int:
    """KV-cache slots for ``need`` = longest prompt + new tokens: that many, rounded up to a multiple of
    128 (few distinct shapes to compile), when the generation fits in the block; otherwise the block at
    batch 1, and twice it for batches, so rows of different lengths can slide in place for at least a
    block of steps before the whole batch is re-encoded. The static decode step attends to every slot,
    so a cache no larger than needed is faster."""
    full = block if batch == 1 else 2 * block
    return full if need > block else min(full, -(-need // 128) * 128)


class GraphedStep:
    """A CUDA graph of ``fn(idx, slot, offsets, key_valid)`` (a ``StaticDecodeStep``, compiled or not): one launch
    per token instead of one per kernel, which is what bounds a small model's decoding at batch 1. The inputs are
    copied into static buffers and the graph replays over them. Capture records without running, and needs the
    code warmed up first: the first ``warmup`` calls are real decode steps run on a side stream, and the call that
    captures then replays, so every call computes its own step."""

    def __init__(self, fn: Callable, batch: int, slots: int, device: torch.device, warmup: int = 2):
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.offsets = torch.zeros(batch, dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch, slots, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def __call__(self, idx: Tensor, slot: int, offsets: Tensor, key_valid: Tensor) -> Tensor:
        self.idx.copy_(idx)
        self.slot.fill_(slot)
        self.offsets.copy_(offsets)
        self.key_valid.copy_(key_valid)
        args = (self.idx, self.slot, self.offsets, self.key_valid)
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.fn(*args)
                torch.cuda.current_stream().wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.fn(*args)
            self.graph = graph
        self.graph.replay()
        return self.out


MAX_DECODERS = 8  # static decoders kept per model (shapes); one more clears them


def static_decoder(model: GPT, batch: int, max_len: int, mode: str) -> tuple[KVCache, Callable]:
    """The KV cache and static decode step of ``model`` at this shape, built (compiled, captured) once and kept
    on the model (``model.decoders``), so every batch of a ``generate`` reuses them. ``mode``: static (eager),
    graph (eager, captured in a CUDA graph on CUDA) or compiled (torch.compile, captured too)."""
    p = next(model.parameters())
    key = (batch, max_len, mode, p.dtype, p.device)
    if key not in model.decoders:
        if len(model.decoders) >= MAX_DECODERS:
            model.decoders.clear()
        cache = KVCache(model.cfg, batch, max_len, p.device, p.dtype)
        step: Callable = StaticDecodeStep(model, cache)
        if mode == "compiled":
            step = torch.compile(step, fullgraph=True, dynamic=False)
        if mode in ("graph", "compiled") and p.device.type == "cuda":
            step = GraphedStep(step, batch, max_len, p.device)
        model.decoders[key] = (cache, step)
    return model.decoders[key]


class _Decoder:
    """Runs the model for ``generate_batch``. ``prefill`` (re)encodes every row's context, left-padded;
    ``slide`` re-encodes some rows' contexts in place, just before the next slot; ``step`` feeds one new
    token per row. ``mode``: eager (GPT.forward with the KV cache), static (StaticDecodeStep, eager), graph
    (StaticDecodeStep replayed as a CUDA graph on CUDA), compiled (StaticDecodeStep under torch.compile, replayed
    as a CUDA graph on CUDA), none (no cache: ``prefill`` every step)."""

    def __init__(self, model: nn.Module, batch: int, mode: str, need: int):
        self.model, self.mode = model, mode
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache, self.static = None, None
        max_len = cache_len(model.cfg.block_size, batch, need)
        if mode in ("static", "graph", "compiled"):
            self.cache, self.static = static_decoder(model, batch, max_len, mode)
        elif mode == "eager":
            self.cache = KVCache(model.cfg, batch, max_len, p.device, p.dtype)
        elif mode != "none":
            raise ValueError(f"unknown decode mode {mode!r}")

    def full(self) -> bool:
        return self.cache is None or self.cache.pos >= self.cache.max_len

    def prefill(self, windows: list[list[int]]) -> Tensor:  # -> (B, V)
        if self.cache is None:
            return torch.cat([self.model(torch.tensor([w], device=self.device))[:, -1] for w in windows])
        T = max(len(w) for w in windows)
        pads = [T - len(w) for w in windows]
        x = torch.tensor([[w[0]] * p + w for w, p in zip(windows, pads, strict=True)], device=self.device)  # (B, T)
        self.cache.reset()
        if any(pads) or self.static is not None:
            self.cache.set_left_padding(pads)
        return self.model(x, cache=self.cache)[:, -1]

    def slide(self, rows: list[int], contexts: list[list[int]]) -> None:
        """Give ``rows`` new contexts (all the same length, at most ``pos``) ending just before slot ``pos``:
        encoded alone, written into the slots before ``pos``; every older slot of those rows is masked out."""
        c, n = self.cache, len(contexts[0])
        s0 = c.pos - n
        if c.key_mask is None:
            c.set_left_padding([0] * c.batch_size)
        if n:
            tmp = KVCache(self.model.cfg, len(rows), n, self.device, self.dtype)
            self.model(torch.tensor(contexts, device=self.device), cache=tmp)
            idx = torch.tensor(rows, device=self.device)
            c.k[:, idx, :, s0:c.pos] = tmp.k
            c.v[:, idx, :, s0:c.pos] = tmp.v
        for b in rows:
            c.key_mask[b] = torch.arange(c.max_len, device=self.device) >= s0
            c.offsets[b] = s0

    def step(self, tokens: Tensor) -> Tensor:  # tokens (B,) -> (B, V)
        if self.static is None:
            return self.model(tokens[:, None], cache=self.cache)[:, -1]
        c = self.cache
        if isinstance(self.static, GraphedStep):
            logits = self.static(tokens[:, None], c.pos, c.offsets, c.key_mask)
        else:
            logits = self.static(tokens[:, None], torch.tensor([c.pos], device=self.device), c.offsets, c.key_mask)
        self.cache.pos += 1
        return logits.clone()


# ------------------------------------------------------------------------------------- generation


@dataclass
class Completion:
    tokens: list[int]  # the new tokens (without the stop token)
    reason: str  # "doc" (the model ended the document), "length" (max tokens) or "stop" (on_token said so)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    use_cache: bool = True,
    mode: str = "eager",
) -> list[Completion]:
    """Continue each prompt (token ids, usually starting with ``<|doc|>``; cut to its last ``block_size``
    tokens) by up to ``max_new_tokens``, all rows decoded together. A row ends at ``stop_id`` (not
    included) or when ``on_token(row, token)`` returns True. ``mode``: eager, static or compiled (see
    ``_Decoder``); ignored without ``use_cache``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MiniLLMError("generate: every prompt needs at least one token (start it with <|doc|>)")
    block = model.cfg.block_size
    B = len(prompts)
    seqs = [list(p[-block:]) for p in prompts]
    start = [0] * B  # each row's context is seqs[b][start[b]:]
    outs: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = [True] * B
    dec = _Decoder(model, B, mode if use_cache else "none", max(map(len, seqs)) + max_new_tokens)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=dec.device)  # (B, V)
        for b, s in enumerate(seqs):
            seen[b, s] = True
    logits = dec.prefill(seqs) if max_new_tokens > 0 else None
    for n in range(max_new_tokens):
        nxt = sample_next_token(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                sampling.repetition_penalty, generator=generator, seen=seen)  # (B,)
        for b, t in enumerate(nxt.tolist()):
            if not active[b]:
                continue
            if t == stop_id:
                active[b], reasons[b] = False, "doc"
                continue
            seqs[b].append(t)
            outs[b].append(t)
            if on_token is not None and on_token(b, t):
                active[b], reasons[b] = False, "stop"
        if not any(active) or n == max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        slid = []
        for b in range(B):
            if active[b] and len(seqs[b]) - start[b] > block:
                start[b] = len(seqs[b]) - slide_keep(block)
                slid.append(b)
        if dec.full():  # no cache, or no free slot: re-encode every row's context
            logits = dec.prefill([s[start[b]:] if active[b] else s[-1:] for b, s in enumerate(seqs)])
            continue
        if slid:
            dec.slide(slid, [seqs[b][start[b]:-1] for b in slid])
        logits = dec.step(nxt)
    return [Completion(o, r) for o, r in zip(outs, reasons, strict=True)]


def generate(model: nn.Module, prompt: Sequence[int], max_new_tokens: int, *, stop_id: int | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             generator: torch.Generator | None = None, on_token: Callable[[int], bool] | None = None,
             use_cache: bool = True, mode: str = "eager") -> list[int]:
    """One prompt: the new token ids. ``on_token(token)`` returning True stops."""
    cb = None if on_token is None else (lambda _row, t: on_token(t))
    return generate_batch(model, [prompt], max_new_tokens, sampling=Sampling(temperature, top_k, top_p, repetition_penalty),
                          stop_id=stop_id, generator=generator, on_token=cb, use_cache=use_cache, mode=mode)[0].tokens


# ------------------------------------------------------------------------------------------- text


class TextStream:
    """Decodes one completion as it grows. ``push(token)`` returns the newly printable text: never the
    start of a multi-byte character still being completed (a trailing U+FFFD is held back), nor what
    may be the start of a stop string. ``text`` is the completion so far, cut before the first stop
    string; ``stopped`` says one appeared; ``finish()`` returns whatever was held back."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, text = True, text[: min(hits)]
            safe = len(text)
        else:
            safe = len(text.rstrip("\ufffd"))
            for s in self.stops:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        self.text = text
        new = text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return new

    def finish(self) -> str:
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        return rest


def complete(model: nn.Module, tok, prompts: Sequence[str], max_new_tokens: int, *, sampling: Sampling = Sampling(),
             num_samples: int = 1, batch_size: int = 1, stops: Sequence[str] = (),
             generator: torch.Generator | None = None, stream: Callable[[str], None] | None = None,
             warn: Callable[[str], None] | None = None, mode: str = "eager") -> list[dict]:
    """Continue text prompts: ``num_samples`` per prompt, ``batch_size`` rows decoded together.
    With ``stream`` (batch size 1 only) each sample's prompt and text go to ``stream`` as produced,
    samples joined by ``DOC_JOIN``. Returns one record per sample: prompt, completion, tokens, seconds
    (wall time of its batch), finish_reason (doc, length or stop)."""
    from minillm.tokenizer import doc_id

    if stream is not None and batch_size != 1:
        raise UsageError("--stream prints one sample at a time; drop --batch-generate")
    block, d = model.cfg.block_size, doc_id(tok)
    jobs = []
    for i, p in enumerate(prompts):
        ids = [d, *tok.encode(p, add_special_tokens=False).ids]
        if len(ids) > block:
            if warn:
                warn(f"prompt {i + 1} is {len(ids)} tokens with <|doc|>, longer than the context of {block}: "
                     f"keeping its last {block} tokens")
            ids = ids[-block:]
        jobs += [(p, ids)] * num_samples
    records = []
    for s in range(0, len(jobs), batch_size):
        batch = jobs[s:s + batch_size]
        texts = [TextStream(tok.decode, stops) for _ in batch]
        if stream:
            stream((DOC_JOIN if s else "") + batch[0][0])

        def on_token(row: int, t: int, texts: list[TextStream] = texts) -> bool:
            new = texts[row].push(t)
            if stream and new:
                stream(new)
            return texts[row].stopped

        t0 = time.perf_counter()
        comps = generate_batch(model, [ids for _, ids in batch], max_new_tokens, sampling=sampling, stop_id=d,
                               generator=generator, on_token=on_token if stops or stream else None, mode=mode)
        seconds = time.perf_counter() - t0
        for (p, _), ts, c in zip(batch, texts, comps, strict=True):
            if stream:
                stream(ts.finish())
            text = ts.text if stops or stream else tok.decode(c.tokens)
            records.append({"prompt": p, "completion": text, "tokens": len(c.tokens), "seconds": round(seconds, 4),
                            "finish_reason": c.reason})
    return records


# ---------------------------------------------------------------- the generate command's inputs and output


def not_utf8(flag: str, text: str | None) -> str | None:
    """A problem line when a command-line text holds bytes that are not UTF-8 (Python keeps each as a lone
    surrogate, which the tokenizer cannot take)."""
    try:
        (text or "").encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        c = ord(e.object[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        return (f"{flag} holds {what} at character {e.start + 1}, which is not UTF-8 text; set the terminal to UTF-8 "
                f"(e.g. LANG=C.UTF-8) or put the text in a UTF-8 file and pass --prompt-file")


def check_request(*, prompt: str | None, prompt_file: Path | None, max_tokens: int, num_samples: int,
                  batch_size: int | None, batch_generate: bool, stream: bool, as_json: bool, output: Path | None,
                  stops: Sequence[str]) -> None:
    """Raise one ``UsageError`` naming every problem among the options of ``generate``."""
    problems = [m for bad, m in (
        (prompt is not None and prompt_file is not None, "give --prompt or --prompt-file, not both"),
        (max_tokens < 0, "--max-tokens must be >= 0"), (num_samples < 1, "--num-samples must be >= 1"),
        (batch_size is not None and not batch_generate, "--batch-size needs --batch-generate"),
        (batch_size is not None and batch_size < 1, "--batch-size must be >= 1"),
        (stream and batch_generate, "--stream prints one sample at a time; drop --batch-generate"),
        (stream and (as_json or output is not None), "--stream prints text to the terminal; drop --json / --output"),
    ) if bad]
    problems += [m for m in (not_utf8("--prompt", prompt), *(not_utf8("--stop", s) for s in stops)) if m]
    if problems:
        raise UsageError("; ".join(problems))


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    """The prompts to continue: the non-blank lines of ``prompt_file`` (UTF-8), else ``[prompt or ""]``."""
    if prompt_file is None:
        return [prompt or ""]
    from minillm.corpus.read import check_input_file

    check_input_file(prompt_file, "--prompt-file", "give a UTF-8 text file with one prompt per line")
    try:
        text = prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"--prompt-file: {prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                           f"offset {e.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {prompt_file} > "
                           f"prompts.txt` (or `minillm prepare-corpus`, which reads cp1252)") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MiniLLMError(f"--prompt-file: {prompt_file} holds no prompts (one per line)")
    return prompts


def check_output(output: Path | None, ckpt: Path, prompt_file: Path | None, tokenizer: Path | None) -> None:
    """Refuse an ``--output`` that is one of the files generate reads."""
    inputs = (ckpt, prompt_file, tokenizer, *(ckpt / n for n in ("ckpt_best.pt", "ckpt_last.pt", "tokenizer.json")))
    if output is not None and any(output.resolve() == p.resolve() for p in inputs if p):
        raise UsageError(f"--output {output} is also an input; write the samples to another file")


def render_samples(records: Sequence[dict], as_json: bool) -> str:
    """The output of ``complete``'s records: JSON lines, or the texts joined by ``<|doc|>`` lines."""
    import json

    if as_json:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return DOC_JOIN.join(r["prompt"] + r["completion"] for r in records) + "\n"
