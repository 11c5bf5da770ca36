"""The static decode step and the one-token decoder: ``GPT.decode_step`` over a fixed-shape KV cache
(``StaticDecodeStep``), replayed as a CUDA graph (``GraphedStep``), optionally compiled, kept on the model by
``static_decoder``; ``_Decoder`` runs prefill, sliding and one step at a time for ``generate_batch``. Also the
``--compile`` and ``--dtype`` rules and the sliding rule (``slide_keep``, see ``minillm.generation.decoder``)."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from minillm.errors import UsageError
from minillm.generation.background import busy
from minillm.model import triton_decode
from minillm.model.fused_decode import FusedDecode, qk_rope_weights
from minillm.model.gpt import GPT, KVCache


def slide_keep(block: int) -> int:
    """Tokens kept (and re-encoded) when a row's context is full: three quarters of the block."""
    return max(1, block - max(1, block // 4))


def decode_mode(device: torch.device, compile: str) -> str:
    """The decode step for ``--compile``: auto = the static step replayed as a CUDA graph on CUDA (no compile
    wait) and plain PyTorch elsewhere; on = torch.compile'd too (each step of a ``StepChunk``, sampling included;
    a longer first start, then cached kernels: docs/GENERATION.md); background = auto's decoder first, the compiled
    chunk from when a background thread has compiled it (``StepChunk``; on the CPU the static step, then
    compiled); off = plain PyTorch (``GPT.forward`` with the KV cache)."""
    if compile not in ("auto", "on", "off", "background"):
        raise UsageError(f"--compile: {compile!r} is not one of auto, on, off, background")
    if compile == "on":
        return "compiled"
    if compile == "background":
        return "background"
    return "graph" if compile == "auto" and device.type == "cuda" else "eager"


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def decode_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """Weights and KV cache for ``--dtype``: auto = bf16 on a CUDA GPU that supports it (the model trains under
    bf16 autocast), fp32 elsewhere; fp32 gives the tokens of the fp32 decoder exactly, for greedy decoding and
    for a ``--seed``."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: {dtype!r} is not one of auto, bf16, fp32")
    return DTYPES[dtype]


class StaticDecodeStep(nn.Module):
    """``GPT.decode_step`` bound to a KV cache, as a module to compile and to capture in a CUDA graph: the
    cache's keys and values are its buffers (the same tensors, not copies).

    ``fused``: decode in fewer kernels a layer (``minillm.model.fused_decode``): each layer's q/k/v projections, and
    its SwiGLU gate/up projections, concatenated into one matrix each (three matrix products fewer a layer), and
    the factors of its RoPE tables (QK-norm's weights, the attention's scale: ``qk_rope_weights``). These are
    copies, made here and refreshed in place by ``refresh`` (each ``generate_batch`` calls it), so a captured graph
    keeps reading them; layers whose projections are not plain ``nn.Linear`` (an unmerged LoRA) decode unfused.

    ``kernels`` (with ``fused``): decode with the Triton kernels (``minillm.model.triton_decode``: six a layer)
    where ``triton_decode.supported`` allows (bf16 or fp16 on CUDA, RMSNorm and SwiGLU, triton installed);
    ``self.kernels`` says whether it does, ``self.why_not`` why not. Not inside ``torch.compile``, which
    compiles ``GPT.decode_step`` itself. Kernels that fail at their first (eager, warm-up) call turn ``kernels``
    off with a warning: the step decodes as without them."""

    def __init__(self, model: GPT, cache: KVCache, fused: bool = False, kernels: bool = False):
        super().__init__()
        self.model = model
        self.register_buffer("k", cache.k, persistent=False)  # (L, B, Hkv, S, D), shared with the cache
        self.register_buffer("v", cache.v, persistent=False)
        self.fused: FusedDecode | None = None
        if fused:
            layers = [(fuse(b.attn.q_proj, b.attn.k_proj, b.attn.v_proj),
                       fuse(b.mlp.gate_proj, b.mlp.up_proj) if b.mlp.swiglu else None) for b in model.blocks]
            self.fused = FusedDecode(layers, qk_rope_weights(model))
        self.why_not = triton_decode.supported(model, self.fused, cache.k.dtype, cache.k.device) if kernels else None
        self.kernels = kernels and self.why_not is None
        self.prefills: dict[int, GraphedPrefill] = {}  # _Decoder.prefill's graphs over this cache, by length

    def refresh(self) -> None:
        """Copy the model's current weights into the concatenated ones and the RoPE tables' factors."""
        if self.fused is None:
            return
        for b, (qkv, gate_up) in zip(self.model.blocks, self.fused.layers, strict=True):
            refill(qkv, b.attn.q_proj, b.attn.k_proj, b.attn.v_proj)
            refill(gate_up, *((b.mlp.gate_proj, b.mlp.up_proj) if b.mlp.swiglu else ()))
        with torch.no_grad():
            for table, new in zip(self.fused.qk_rope_weights, qk_rope_weights(self.model), strict=True):
                table.copy_(new)

    def forward(self, idx: Tensor, slot: Tensor, offsets: Tensor, key_valid: Tensor) -> Tensor:
        """idx (B, 1), slot (1,) the cache slot of this token, offsets (B,) left padding,
        key_valid (B, S) False at padding -> logits (B, V)."""
        return self.decode(idx, slot, offsets, key_valid, self.k, self.v)

    def decode(self, idx: Tensor, slot: Tensor, offsets: Tensor, key_valid: Tensor, keys: Tensor,
               values: Tensor) -> Tensor:
        """``GPT.decode_step`` over ``keys``/``values`` (this cache's, or a ``StepChunk``'s twin), with the fused
        weights, through the Triton kernels when ``kernels`` (and not under ``torch.compile``)."""
        if self.kernels and not torch.compiler.is_compiling():
            try:
                return triton_decode.decode_step(self.model, self.fused, idx, slot, offsets, key_valid, keys, values)
            except Exception as e:  # a Triton that cannot build them here: the eager step, said once
                if idx.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise
                self.kernels = False
                self.why_not = f"the Triton kernels failed ({type(e).__name__}: {str(e)[:200]})"
                warnings.warn(f"{self.why_not}; decoding without them (slower)", RuntimeWarning, stacklevel=2)
        return self.model.decode_step(idx, slot, offsets, key_valid, keys, values, self.fused)


def fuse(*layers: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The weight (and bias) of plain linear ``layers`` concatenated along their outputs, or None."""
    if any(type(m) is not nn.Linear for m in layers):
        return None
    with torch.no_grad():
        w = torch.cat([m.weight for m in layers])
        b = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
    return w, b


def refill(fused: tuple[Tensor, Tensor | None] | None, *layers: nn.Module) -> None:
    if fused is not None:
        with torch.no_grad():
            torch.cat([m.weight for m in layers], out=fused[0])
            if fused[1] is not None:
                torch.cat([m.bias for m in layers], out=fused[1])


def cache_len(block: int, batch: int, need: int) -> int:
    """KV-cache slots for ``need`` = longest prompt + new tokens: that many, rounded up to a multiple of
    128 (few distinct shapes to compile), when the generation fits in the block; otherwise the block at
    batch 1, and twice it for batches, so rows of different lengths can slide in place for at least a
    block of steps before the whole batch is re-encoded. The static decode step attends to every slot,
    so a cache no larger than needed is faster."""
    full = block if batch == 1 else 2 * block
    return full if need > block else min(full, -(-need // 128) * 128)


class Compiled:
    """A bound ``method`` under ``torch.compile`` (``fullgraph``, static shapes), with a code object of its own:
    dynamo keeps its compilations per code object, at most 8 and then it fails under ``fullgraph``, so each decode
    step or ``StepChunk`` compiles its own shapes apart from every other instance's."""

    def __init__(self, method: Callable):
        self.method = method
        f = method.__func__
        own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        self.fn = torch.compile(types.MethodType(own, method.__self__), fullgraph=True, dynamic=False)

    def __call__(self, *args):
        return self.fn(*args)


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
            if self.calls < self.warmup or busy():  # no capture while a background compile is at work
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


class GraphedPrefill:
    """``_Decoder.prefill`` of one row of ``T`` tokens from slot 0 of ``cache``, replayed as a CUDA graph. A long
    generation at batch 1 re-encodes its context at every slide, always ``slide_keep(block)`` tokens: eagerly ~400
    kernel launches a time (on an H100 ~2 ms of the host's, a sixth of a small model's 64 tokens between slides).
    As ``GraphedStep``: the first call runs eagerly (on a side stream), the second captures and replays, so a prompt
    length seen once is never captured."""

    def __init__(self, model: nn.Module, cache: KVCache, T: int):
        self.model, self.cache, self.calls = model, cache, 0
        self.x = torch.zeros(1, T, dtype=torch.long, device=cache.k.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.padding: tuple[Tensor, Tensor] | None = None  # the cache's offsets and key mask the graph reads

    def __call__(self, x: Tensor) -> Tensor:  # x (1, T) -> logits (1, V)
        c = self.cache
        c.reset()
        self.x.copy_(x)
        if self.graph is None:
            c.set_left_padding([0])
            if self.calls < 1 or busy():
                self.calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.model(self.x, cache=c)[:, -1]
                torch.cuda.current_stream().wait_stream(side)
                return out
            self.padding = (c.offsets, c.key_mask)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.model(self.x, cache=c)[:, -1]  # (the forward's Python moves c.pos on, once)
            self.graph = graph
        c.offsets, c.key_mask = self.padding
        c.offsets.zero_()  # no padding (a ``_Decoder.slide`` may have written into them since)
        c.key_mask.fill_(True)
        c.pos = self.x.size(1)
        self.graph.replay()
        return self.out.clone()


MAX_PREFILLS = 4  # GraphedPrefill lengths kept per static decoder; one more clears them
MAX_DECODERS = 8  # static decoders kept per model (shapes); one more clears them


def static_decoder(model: GPT, batch: int, max_len: int, mode: str, fused: bool = False) -> tuple[KVCache, Callable]:
    """The KV cache and static decode step of ``model`` at this shape, built (compiled, captured) once and kept
    on the model (``model.decoders``), so every batch of a ``generate`` reuses them. ``mode``: static (eager),
    graph (eager, captured in a CUDA graph on CUDA) or compiled (torch.compile, captured too). ``fused``: see
    ``StaticDecodeStep``; with ``mode`` graph, through the Triton kernels where they are supported."""
    p = next(model.parameters())
    key = (batch, max_len, mode, p.dtype, p.device) + (("fused",) if fused else ())
    if key not in model.decoders:
        if len(model.decoders) >= MAX_DECODERS:
            model.decoders.clear()
        cache = KVCache(model.cfg, batch, max_len, p.device, p.dtype)
        module = StaticDecodeStep(model, cache, fused, kernels=mode == "graph")
        step: Callable = Compiled(module.forward) if mode == "compiled" else module
        if mode in ("graph", "compiled") and p.device.type == "cuda":
            step = GraphedStep(step, batch, max_len, p.device)
        model.decoders[key] = (cache, step)
    return model.decoders[key]


def step_module(step: Callable) -> StaticDecodeStep:
    """The ``StaticDecodeStep`` inside a decode step (captured in a ``GraphedStep``, compiled, or itself)."""
    step = step.fn if isinstance(step, GraphedStep) else step
    return step.method.__self__ if isinstance(step, Compiled) else step


class _Decoder:
    """Runs the model for ``generate_batch``. ``prefill`` (re)encodes every row's context, left-padded;
    ``slide`` re-encodes some rows' contexts in place, just before the next slot; ``step`` feeds one new
    token per row. ``mode``: eager (GPT.forward with the KV cache), static (StaticDecodeStep, eager), graph
    (StaticDecodeStep replayed as a CUDA graph on CUDA), compiled (StaticDecodeStep under torch.compile, replayed
    as a CUDA graph on CUDA), none (no cache: ``prefill`` every step). ``fused``: the static step's concatenated
    projections (``StaticDecodeStep``), refreshed from the model's weights here."""

    def __init__(self, model: nn.Module, batch: int, mode: str, need: int, fused: bool = False):
        self.model, self.mode, self.fused = model, mode, fused
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache, self.static = None, None
        max_len = cache_len(model.cfg.block_size, batch, need)
        if mode in ("static", "graph", "compiled", "background"):  # background: graph's one-token step
            static = {"background": "graph" if self.device.type == "cuda" else "static"}.get(mode, mode)
            self.cache, self.static = static_decoder(model, batch, max_len, static, fused)
            if fused:
                step_module(self.static).refresh()
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
        if isinstance(self.static, GraphedStep) and len(windows) == 1:  # graph mode on CUDA, one row
            prefills = step_module(self.static).prefills
            if T not in prefills:
                if len(prefills) >= MAX_PREFILLS:
                    prefills.clear()
                prefills[T] = GraphedPrefill(self.model, self.cache, T)
            return prefills[T](x)
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
