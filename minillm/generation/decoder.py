"""Batched decoding: ``generate_batch`` (left-padded batches over a preallocated KV cache, sliding when the
context fills) and ``StepChunk``, which runs K decode steps per call with sampling, the repetition-penalty mask
and the stop check on the device, replayed as ONE CUDA graph on CUDA, so the host launches once and reads back
once per K tokens (``--decode-chunk``).

Sliding: a row's context is its most recent tokens, at most ``block_size``. When a new token would
overflow it, the context restarts at the most recent ``slide_keep(block)`` tokens, which are
re-encoded. The rule depends only on the row's own length, so cached, uncached, batched and
one-by-one decoding all see the same contexts. A chunk runs only when no row can slide and the cache has a
free slot for each of its K steps; otherwise ``generate_batch`` goes one token at a time, as without chunks.

Same tokens with and without chunks: a chunk does the one-step loop's arithmetic in its order (sample every
row, record, mark seen, step), draws the same random numbers (``sampling.draw``), and when the generation
ends inside a chunk the generator is rewound to where the one-step loop would have left it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minillm.distributed import synchronize
from minillm.errors import MiniLLMError
from minillm.generation.background import Background, busy
from minillm.generation.sampling import (
    Sampling,
    fast_sample,
    noise_like,
    sample_next_token,
    skip_draws,
    takes_fast,
)
from minillm.generation.static import (
    MAX_DECODERS,
    Compiled,
    StaticDecodeStep,
    _Decoder,
    slide_keep,
    step_module,
)
from minillm.model.gpt import KVCache

DECODE_CHUNK = 16  # generate's --decode-chunk: decode steps per CUDA-graph replay and host read-back
PAD = -1  # what a chunk emits for a row after its stop token


@dataclass
class Ticket:
    """A chunk launched (``StepChunk.launch``) and not yet read (``finish``)."""

    slot: int  # its first cache slot
    state: Tensor | None  # the generator's state before it (None when greedy)
    snap: int  # which of the chunk's snapshots and host buffers it has
    event: torch.cuda.Event | None  # recorded after its read-back copies (CUDA)


class TokenStep:
    """One step of a ``StepChunk`` as a function of the chunk's buffers, every one passed in (``run``): what
    ``--compile`` compiles, so that one compiled function serves any chunk of its shape (the background compile
    runs it on buffers of its own, then the chunk decoding the user's text calls it with its own). Holds only what
    every such chunk shares: the static step's ``decode`` (the model, its fused weights, the Triton kernels where it
    runs them: then sampling takes the Triton sampler too; neither under torch.compile), the settings."""

    def __init__(self, static: StaticDecodeStep, sampling: Sampling, stop_id: int | None):
        self.static, self.decode, self.sampling, self.stop_id = static, static.decode, sampling, stop_id

    def run(self, logits: Tensor, noise: Tensor | None, unsure: Tensor | None, bufs: tuple) -> Tensor:
        """Step ``i`` of the chunk: sample from ``logits`` (B, V) with ``noise`` (Exp(1), or None when greedy),
        record the token, mark it seen, end rows at the stop token, decode it -> the next logits (B, V).
        ``bufs``: ``StepChunk.bufs``."""
        out, done, seen, i, slot, offsets, key_valid, keys, values = bufs
        s = self.sampling
        fast = self.static.kernels and not torch.compiler.is_compiling()
        nxt = None
        if fast and unsure is not None and takes_fast(s.temperature, s.top_k, logits.size(-1)):  # the Triton
            nxt = fast_sample(logits.float(), s.temperature, s.top_k, s.top_p, s.repetition_penalty, None,  # sampler,
                              seen, unsure, noise, record=(out, i, done, self.stop_id, PAD))[0]  # bookkeeping too
        if nxt is None:
            nxt = sample_next_token(logits, s.temperature, s.top_k, s.top_p, s.repetition_penalty, seen=seen,
                                    unsure=unsure, noise=noise, fast=fast)
            out.index_copy_(1, i, nxt.masked_fill(done, PAD)[:, None])
            if self.stop_id is not None:
                done |= nxt == self.stop_id
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
        logits = self.decode(nxt[:, None], slot + i, offsets, key_valid, keys, values)
        i += 1
        return logits


class StepChunk:
    """``k`` decode steps of ``static`` (a ``StaticDecodeStep``: the model, over ``cache``) with sampling on the
    device. ``launch`` copies a chunk's inputs into static buffers (the logits to sample from, the seen-token mask,
    which rows have ended, the first slot, the padding) and runs the steps; ``finish`` returns the (B, k) tokens as
    lists (the one read-back) and leaves the next logits and the updated mask in place. A chunk may be launched
    before the one before it is read (``launch(follow=True)``). Rows that ended (stop token) emit ``PAD``;
    their model input stays the sampled token, as in the one-step loop.

    ``graphed`` (CUDA): the first call runs eagerly on a side stream (warm-up), the second captures the k steps as
    one CUDA graph and every call replays it. The graph draws from a generator of its own, registered with it; the
    caller's generator hands its state over before a replay and takes it back after, so the graph serves any
    generator and the random numbers are the ones the eager loop would draw. Inside a chunk, sampling does not
    check on the host whether top-k's candidates decided top-p exactly (``sample_next_token``'s ``unsure``): a
    chunk where one could not (ties at the k-th logit past the margin, rare) is run again eagerly from its inputs
    and the same generator state, with the host check, so the tokens are the eager loop's.

    ``compile``: ``on`` (``--compile on``): each step's work (``TokenStep``: sampling, bookkeeping, the decode step)
    runs as one torch.compile'd function (inductor: fused kernels; no cudagraphs of its own, the k steps are
    captured here), compiled in the first call; only the random numbers are drawn outside it (inductor's would not
    be ``torch.multinomial``'s). Its fused arithmetic rounds differently from the eager step's. ``background``
    (``--compile background``): the plain steps first, while a background thread compiles the same function and
    runs it once on a chunk of its own (``compiled_step``; started once this chunk's graph is captured, and when no
    other runs, see ``background.busy``); at the first chunk boundary after it is ready the chunk switches to it
    (warm-up, capture, replays as above). A failed compile leaves the plain steps and says so once (``warn``)."""

    def __init__(self, static: StaticDecodeStep, cache, k: int, sampling: Sampling, stop_id: int | None, vocab: int,
                 graphed: bool, compile: str = "off"):
        B, dev = cache.batch_size, cache.k.device
        self.static, self.k, self.sampling, self.stop_id, self.graphed = static, k, sampling, stop_id, graphed
        self.cache, self.vocab = cache, vocab
        self.logits = torch.zeros(B, vocab, device=dev)
        self.seen = torch.zeros(B, vocab, dtype=torch.bool, device=dev) if sampling.repetition_penalty != 1.0 else None
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.offsets = torch.zeros(B, dtype=torch.long, device=dev)
        self.key_valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=dev)
        self.out = torch.zeros(B, k, dtype=torch.long, device=dev)
        self.unsure = torch.zeros(B, dtype=torch.bool, device=dev)
        self.i = torch.zeros(1, dtype=torch.long, device=dev)  # the step within the chunk
        self.plain = TokenStep(static, sampling, stop_id)
        self.token: Callable = Compiled(self.plain.run) if compile == "on" else self.plain.run
        self.pending = compile == "background"  # a background compile to start
        self.background: Background | None = None
        self.warn: Callable[[str], None] | None = None
        self.own = torch.Generator(dev) if graphed and sampling.temperature > 0 else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        pin = dev.type == "cuda"  # two of each: the chunk being read and the one launched after it (``launch``)
        self.snaps = [(torch.empty_like(self.logits), None if self.seen is None else torch.empty_like(self.seen),
                       torch.empty_like(self.done)) for _ in range(2)]
        self.host = [(torch.empty(B, k, dtype=torch.long, pin_memory=pin),
                      torch.empty(B, dtype=torch.bool, pin_memory=pin)) for _ in range(2)]
        self.flip = 0

    @property
    def bufs(self) -> tuple:
        """What ``TokenStep.run`` works on: out, done, seen, i, slot, offsets, key_valid, the cache's keys, values."""
        return (self.out, self.done, self.seen, self.i, self.slot, self.offsets, self.key_valid, self.cache.k,
                self.cache.v)

    def body(self, generator: torch.Generator | None, redo: bool = False) -> None:
        """The k steps; ``redo``: eagerly, with sampling's host check (see the class)."""
        token, unsure = (self.plain.run, None) if redo else (self.token, self.unsure)
        logits, bufs = self.logits, self.bufs
        self.i.zero_()
        for _ in range(self.k):
            noise = noise_like(logits, generator) if self.sampling.temperature > 0 else None
            logits = token(logits, noise, unsure, bufs)
        self.logits.copy_(logits)

    def run(self, generator: torch.Generator | None) -> None:
        if not self.graphed:
            return self.body(generator)
        if self.graph is None and (self.calls < 1 or busy()):  # warm-up (a real chunk, run eagerly); no capture
            self.calls += 1                                     # while a background compile is at work
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body(generator)
            torch.cuda.current_stream().wait_stream(side)
            return None
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            if self.own is not None:
                graph.register_generator_state(self.own)
            with torch.cuda.graph(graph):
                self.body(self.own)
            self.graph = graph
        if self.own is not None:
            self.own.set_state(generator.get_state())
        self.graph.replay()
        if self.own is not None:
            generator.set_state(self.own.get_state())
        return None

    @property
    def pipelined(self) -> bool:
        """Whether the next chunk may be launched before this one is read (``launch(follow=True)``): not while a
        background compile is pending or at work (its switch happens between chunks), nor before the graph is
        captured (the capture would hold back the first chunk's tokens: ``--stream``'s first print)."""
        return not self.pending and self.background is None and (not self.graphed or self.graph is not None)

    def launch(self, logits: Tensor, seen: Tensor | None, active: list[bool], slot: int, offsets: Tensor,
               key_valid: Tensor, generator: torch.Generator | None, follow: bool = False) -> Ticket:
        """Start decoding k tokens per row from ``logits`` (B, V) and ``seen`` at cache slot ``slot``; read them with
        ``finish``. ``follow``: go on from the previous chunk's own buffers (its logits, mask and stopped rows: what
        ``finish`` would copy back), launched before that chunk is read, so that the GPU does not wait for the host
        between chunks; the rows the host stopped (``on_token``) go on there, their tokens unread."""
        if follow:
            self.unsure.zero_()
            self.slot.fill_(slot)
        else:
            self.follow_background()
            self.load(logits, seen, active, slot, offsets, key_valid)
        n, self.flip = self.flip, self.flip ^ 1
        self.snapshot(n)  # for a redo
        state = generator.get_state() if self.sampling.temperature > 0 else None
        self.run(generator)
        out, unsure = self.host[n]
        out.copy_(self.out, non_blocking=True)
        unsure.copy_(self.unsure, non_blocking=True)
        event = None
        if self.out.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return Ticket(slot, state, n, event)

    def finish(self, ticket: Ticket, logits: Tensor, seen: Tensor | None, generator: torch.Generator | None,
               last: bool) -> tuple[list[list[int]], bool]:
        """The (B, k) tokens of a launched chunk, as lists (the one read-back), and whether it was redone (see the
        class; a chunk launched after it is then void: launch it again). ``last`` (no chunk launched after it),
        or redone: the next logits and the mask are copied into ``logits`` and ``seen``."""
        if self.background is not None:  # a compile on another thread: wait with the interpreter lock released
            synchronize(self.logits.device)  # (the read-back holds it: on an H100 chunks ran at a third of their speed)
        elif ticket.event is not None:
            ticket.event.synchronize()
        out, unsure = self.host[ticket.snap]
        rows, redone = out.tolist(), bool(unsure.any())
        if redone:  # redo the chunk eagerly, from its inputs, with the host check
            if ticket.state is not None:
                generator.set_state(ticket.state)
            self.snapshot(ticket.snap, restore=True)
            self.unsure.zero_()
            self.slot.fill_(ticket.slot)
            self.body(generator, redo=True)
            rows = self.out.tolist()
        if last or redone:
            logits.copy_(self.logits)
            if seen is not None:
                seen.copy_(self.seen)
        return rows, redone

    def snapshot(self, n: int, restore: bool = False) -> None:
        """Copy the chunk's inputs that its steps change (logits, seen-token mask, ended rows) into snapshot ``n``,
        or back from it (``restore``)."""
        for mine, snap in zip((self.logits, self.seen, self.done), self.snaps[n], strict=True):
            if snap is not None and restore:
                mine.copy_(snap)
            elif snap is not None:
                snap.copy_(mine)

    def load(self, logits: Tensor, seen: Tensor | None, active: list[bool], slot: int, offsets: Tensor,
             key_valid: Tensor) -> None:
        """Copy a chunk's inputs into the static buffers."""
        self.logits.copy_(logits)
        if seen is not None:
            self.seen.copy_(seen)
        self.done.copy_(torch.tensor([not a for a in active]))
        self.unsure.zero_()
        self.slot.fill_(slot)
        self.offsets.copy_(offsets)
        self.key_valid.copy_(key_valid)

    def follow_background(self) -> None:
        """At a chunk boundary (``compile="background"``): start the background compile once this chunk's graph is
        captured (off CUDA: at once) and no other is at work; switch to its compiled step once it is ready."""
        if self.pending and (not self.graphed or self.graph is not None) and not busy():
            self.pending = False
            self.background = Background(self.compiled_step, "the background compile of the decode step")
        elif self.background is not None and self.background.done():
            bg, self.background = self.background, None
            if bg.result is None:
                if self.warn is not None:
                    self.warn(f"{bg.note}; decoding goes on uncompiled")
                return
            self.token, self.graph, self.calls = bg.result, None, 0  # captured again at the next calls

    def compiled_step(self) -> Callable:
        """(on the background thread) ``TokenStep.run`` compiled, and run once on a chunk of its own (its own KV
        cache and buffers, zero logits): the compiled function, ready for this chunk's buffers."""
        fn = Compiled(self.plain.run)
        c, dev = self.cache, self.cache.k.device
        twin = StepChunk(self.static, KVCache(self.static.model.cfg, c.batch_size, c.max_len, dev, c.k.dtype), self.k,
                         self.sampling, self.stop_id, self.vocab, graphed=False)
        twin.token = fn
        gen = torch.Generator(dev).manual_seed(0) if self.sampling.temperature > 0 else None
        stream = torch.cuda.stream(torch.cuda.Stream(dev)) if dev.type == "cuda" else contextlib.nullcontext()
        with stream, torch.no_grad():  # grad mode is the thread's own: the decoding thread's (a compile guards on it)
            twin.body(gen)
        synchronize(dev)
        return fn


def step_chunk(model: nn.Module, dec: _Decoder, k: int, sampling: Sampling, stop_id: int | None,
               warn: Callable[[str], None] | None = None) -> StepChunk:
    """The ``StepChunk`` of this decoder's static step, built (and captured) once and kept on the model with the
    static decoders (``model.decoders``), for every later ``generate_batch`` of the same shape and settings.
    ``warn``: where a failed background compile is said."""
    c = dec.cache
    key = ("chunk", c.batch_size, c.max_len, dec.mode, dec.dtype, dec.device, k, sampling, stop_id, dec.fused)
    hit = model.decoders.get(key)
    static = step_module(dec.static)
    if hit is None or hit.static is not static:
        if len(model.decoders) >= MAX_DECODERS:
            model.decoders.clear()
        graphed = dec.mode in ("graph", "compiled", "background") and dec.device.type == "cuda"
        compile = {"compiled": "on", "background": "background"}.get(dec.mode, "off")
        hit = model.decoders[key] = StepChunk(static, c, k, sampling, stop_id, model.cfg.vocab_size, graphed, compile)
    hit.warn = warn
    return hit


def finish_background(model: nn.Module, timeout: float | None = None) -> list[Background]:
    """Wait (at most ``timeout`` seconds each) for the background compiles of ``model``'s chunks still at work;
    they are switched to at the next chunk boundary. Returns them (``note``, ``seconds``, ``done()``)."""
    running = [c.background for c in model.decoders.values() if isinstance(c, StepChunk) and c.background is not None]
    for bg in running:
        bg.wait(timeout)
    return running


def default_generator(device: torch.device) -> torch.Generator:
    """The generator sampling uses when none is given."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


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
    chunk: int = 1,
    fused: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[Completion]:
    """Continue each prompt (token ids, usually starting with ``<|doc|>``; cut to its last ``block_size``
    tokens) by up to ``max_new_tokens``, all rows decoded together. A row ends at ``stop_id`` (not
    included) or when ``on_token(row, token)`` returns True. ``mode``: eager, static, graph, compiled or background
    (see ``_Decoder``; ``warn`` says a failed background compile); ignored without ``use_cache``. ``chunk``: decode
    steps per ``StepChunk`` call with a static step (static, graph, compiled; one CUDA-graph replay on CUDA); 1
    decodes one token at a time. The tokens do not depend on it, and ``on_token`` sees them in the same order
    (step by step, row by row), once per chunk.
    ``fused``: the static step with concatenated projections (``StaticDecodeStep``; the same math, rounded
    differently)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MiniLLMError("generate: every prompt needs at least one token (start it with <|doc|>)")
    block = model.cfg.block_size
    B = len(prompts)
    seqs = [list(p[-block:]) for p in prompts]
    start = [0] * B  # each row's context is seqs[b][start[b]:]
    outs: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = [True] * B
    dec = _Decoder(model, B, mode if use_cache else "none", max(map(len, seqs)) + max_new_tokens, fused)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=dec.device)  # (B, V)
        for b, s in enumerate(seqs):
            seen[b, s] = True

    def take(tokens: Sequence[int]) -> None:
        for b, t in enumerate(tokens):
            if not active[b]:
                continue
            if t == stop_id:
                active[b], reasons[b] = False, "doc"
                continue
            seqs[b].append(t)
            outs[b].append(t)
            if on_token is not None and on_token(b, t):
                active[b], reasons[b] = False, "stop"

    def chunk_fits(ahead: int = 0) -> bool:  # ahead: tokens launched and not yet taken
        return (chunk > 1 and dec.static is not None and dec.cache.pos + chunk <= dec.cache.max_len
                and all(not a or len(s) + ahead + chunk - s0 <= block
                        for a, s, s0 in zip(active, seqs, start, strict=True)))

    logits = dec.prefill(seqs) if max_new_tokens > 0 else None
    n = 0  # tokens sampled so far
    rng = generator or default_generator(dec.device)
    pending: Ticket | None = None  # a chunk launched and not yet read
    while n < max_new_tokens:
        c = dec.cache
        if pending is None and chunk_fits():
            runner = step_chunk(model, dec, chunk, sampling, stop_id, warn)
            pending = runner.launch(logits, seen, active, c.pos, c.offsets, c.key_mask, rng)
            c.pos += chunk
        if pending is not None:
            ticket, pending = pending, None
            if runner.pipelined and n + chunk < max_new_tokens and chunk_fits(chunk):  # the next, before reading
                pending = runner.launch(logits, seen, active, c.pos, c.offsets, c.key_mask, rng, follow=True)
                c.pos += chunk
            rows, redone = runner.finish(ticket, logits, seen, rng, last=pending is None)
            if redone and pending is not None:  # launched from what the redo changed: void
                pending = None
                c.pos -= chunk
            for i in range(chunk):
                take([r[i] for r in rows])
                if not any(active) or n + i == max_new_tokens - 1:
                    if ticket.state is not None and (i < chunk - 1 or pending is not None):
                        rng.set_state(ticket.state)  # rewind: as if the loop had stopped here
                        skip_draws(rng, i + 1, tuple(logits.shape), dec.device)
                    return [Completion(o, r) for o, r in zip(outs, reasons, strict=True)]
            n += chunk
            continue
        nxt = sample_next_token(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                sampling.repetition_penalty, generator=generator, seen=seen,
                                fast=dec.static is not None and step_module(dec.static).kernels)  # as TokenStep
        take(nxt.tolist())
        if not any(active) or n == max_new_tokens - 1:
            break
        n += 1
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
             use_cache: bool = True, mode: str = "eager", chunk: int = 1) -> list[int]:
    """One prompt: the new token ids. ``on_token(token)`` returning True stops."""
    cb = None if on_token is None else (lambda _row, t: on_token(t))
    return generate_batch(model, [prompt], max_new_tokens, sampling=Sampling(temperature, top_k, top_p, repetition_penalty),
                          stop_id=stop_id, generator=generator, on_token=cb, use_cache=use_cache, mode=mode,
                          chunk=chunk)[0].tokens
