"""One training step and one validation pass: device and precision resolution, autocast, gradient
accumulation, unscaling, clipping, skipping non-finite updates. Used by ``minillm.train.loop.fit`` and by
``scripts/bench_train.py`` (so the benchmark times the trainer's own step)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minillm.config import TrainConfig
from minillm.distributed import synchronize
from minillm.errors import MiniLLMError
from minillm.optim.groups import clip_gradients, set_lr
from minillm.optim.levers import explicit, lever
from minillm.optim.muon import Muon

if TYPE_CHECKING:
    from minillm.model.gpt import Regions


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else Apple's MPS when present, else the CPU; a named device that is not
    there is refused with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MiniLLMError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MiniLLMError("--device mps: Apple's MPS is not available to PyTorch (it needs a Mac with Apple "
                           "silicon and macOS 12.3 or later); use --device auto (or cpu)")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it, fp16 on an older CUDA GPU, fp32 on the CPU and on MPS (its
    autocast is partial and fp16 training there has no gradient scaler to rely on)."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if device.type in ("cpu", "mps") and dt == torch.float16:
        raise MiniLLMError(f"--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the {'CPU' if device.type == 'cpu' else 'MPS'}")
    return dt


# ``MINILLM_COMPILE_SWITCH=short``: the interpreter's thread switch interval while the regions compile on their thread.
# Each op an eager step launches releases the interpreter lock and waits up to the interval to take it back from the
# compile thread; on the 2-core CPU (scripts/bench_compile_contention.py) a 12.4 ms eager step took 2.0 s beside a
# compile at Python's 5 ms and 0.26 s at 0.1 ms, the compile 13% slower (docs/BENCHMARKS.md, issue 20)
SHORT_SWITCH_S = 1e-4


class RegionallyCompiled(torch.nn.Module):
    """``model`` with its blocks and output head run by compiled functions (``minillm.model.gpt.compile_regions``):
    what the training forward and backward go through. ``model`` itself stays eager (evaluation, generation).

    With ``warmup`` (a function that runs given regions once, forward and backward, on a copy of the model:
    ``background_warmup``), the compilation happens on a background thread while the first steps run eagerly;
    the first forward after it has ended switches to the compiled regions and calls ``on_ready(note)``. Without
    it, the first forward compiles (the step waits). ``mode``: ``torch.compile``'s mode (None: its default)."""

    def __init__(self, model: torch.nn.Module, warmup: Callable[[Regions], None] | None = None,
                 on_ready: Callable[[str], None] | None = None, mode: str | None = None,
                 on_compiled: Callable[[], None] | None = None):
        super().__init__()
        from minillm.model.gpt import EAGER, compile_regions

        self.model, self._on_ready, self._mode, self._on_compiled = model, on_ready, mode, on_compiled
        self._thread: threading.Thread | None = None
        self._compiled: Regions | None = None
        self._note = ""
        self._forwards = 0  # a foreground compile has compiled forward and backward once the second forward starts
        self._foreground = warmup is None
        if warmup is None:
            self.regions = compile_regions(mode)
            return
        self.regions = EAGER
        self._switch_interval = sys.getswitchinterval()
        if lever("COMPILE_SWITCH") == "short":
            sys.setswitchinterval(SHORT_SWITCH_S)  # restored by _switch
        self._thread = threading.Thread(target=self._compile, args=(warmup,), name="minillm-compile", daemon=True)
        self._thread.start()

    def _compile(self, warmup: Callable[[Regions], None]) -> None:
        from minillm.model.gpt import compile_regions

        t0 = time.time()
        try:
            regions = compile_regions(self._mode)
            warmup(regions)
        except Exception as e:  # noqa: BLE001  a failed compilation leaves the run eager, never stops it
            self._note = f"compilation failed ({type(e).__name__}: {str(e)[:200]}); training continues uncompiled"
            return
        self._compiled = regions
        self._note = f"compiled in the background in {time.time() - t0:.1f} s; the steps from here run compiled"

    @property
    def compiling(self) -> bool:
        """A background compilation has not been switched to yet (the steps so far ran eagerly)."""
        return self._thread is not None

    def wait(self) -> None:
        """Block until a background compilation has ended (and switch to its regions)."""
        if self._thread is not None:
            self._thread.join()
            self._switch()

    def _switch(self) -> None:
        self._thread = None
        sys.setswitchinterval(self._switch_interval)
        if self._compiled is not None:
            self.regions = self._compiled
            self._compiled_once()
        if self._on_ready is not None:
            self._on_ready(self._note)

    def _compiled_once(self) -> None:
        if self._on_compiled is not None:
            self._on_compiled()
            self._on_compiled = None

    def forward(self, *args, **kwargs):
        if self._thread is not None and not self._thread.is_alive():
            self._switch()
        elif self._foreground and self._forwards == 1:
            self._compiled_once()  # a foreground compile: the first step's forward and backward compiled
        self._forwards += 1
        return self.model(*args, regions=self.regions, **kwargs)


def yield_to_compiler(device: torch.device) -> None:
    """Called after each eager step while the model compiles in the background: wait for the GPU with the
    interpreter lock released, so the compile thread runs while the step's kernels do. A step that never syncs
    (``MINILLM_STEP_SYNC=log``) keeps the main thread launching kernels, holding the lock the compile thread needs
    (measured on an H100: the medium preset's background compilation had not ended 25 s into a 30 s run)."""
    synchronize(device)


def background_warmup(model: torch.nn.Module, tcfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                      doc_id: int) -> Callable[[Regions], None]:
    """A function that runs compiled regions once, forward and backward, on a copy of ``model`` (made now, before
    any step: the training never waits for it nor shares a tensor with it) with a random batch of the run's shape,
    under the run's autocast and document masking: it compiles exactly the graphs the training steps will use."""
    twin = copy.deepcopy(model, memo={id(model.cfg): model.cfg})  # the config object itself: compile guards on it
    vocab, block = model.cfg.vocab_size, model.cfg.block_size

    def warmup(regions: Regions) -> None:
        batch = torch.randint(0, vocab, (tcfg.batch_size, block + 1), device=device)
        x, y = _to_device(batch, device)
        _forward(twin, x, y, tcfg.doc_masking, doc_id, device, dtype, regions=regions).backward()
        synchronize(device)
        twin.zero_grad(set_to_none=True)

    return warmup


def compile_cache_dir() -> Path:
    """Where PyTorch keeps its compiled kernels between runs unless ``TORCHINDUCTOR_CACHE_DIR`` says: the user's
    cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``)/minillm/torchinductor, which outlives a reboot (PyTorch's
    own default is under /tmp). A warm cache turns seconds of compilation into a lookup."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minillm" / "torchinductor"


def use_compile_cache() -> str:
    """Point PyTorch's kernel cache at ``compile_cache_dir()`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set; the
    directory in use (for training's and generation's compilations alike)."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))


# ``--compile auto`` on CUDA with a ``--max-time`` budget under ``COLD_BUDGET_S`` trains eagerly when the compile cache
# has no kernels for the run's shapes (no mark under ``WARM_MARKS``, written once a compilation of them succeeded):
# medium 64 x 512, cold caches (docs/BENCHMARKS.md, session 30): at 30 s (one H200) the background compile left 115
# steps and 1.77 bits per byte, eager steps throughout 342 steps and 1.41; at 60 s (one H100) 758 steps and 1.110
# against 755 eager and 1.125. A compiled step is ~1.36x faster than an eager one, but a cold compile takes ~12-20 s
# during which the eager steps beside it crawl (the interpreter lock): it pays for itself from about a minute's
# budget. With a warm cache (a lookup, ~3 s) even 30 s compile: 526 steps and 1.204 (H100).
COLD_BUDGET_S = 60.0
WARM_MARKS = "minillm-compiled"


def compile_key(model: torch.nn.Module, tcfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The name of what a compilation of the training regions depends on: torch's version, the device's name, the
    model config and its parameters (names, shapes, which train: a LoRA adapter changes the graphs), the
    micro-batch, the precision, document masking, the compile mode and the levers that change the kernels (the norm,
    the projections, inductor's tuning and its mix-order reductions, the loss)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type
    params = [(n, list(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    levers = {name: lever(name, device.type) for name in ("COMPILE_MODE", "NORM", "PROJ", "TUNE", "LOSS",
                                                          "REDUCE")}
    blob = json.dumps({"torch": torch.__version__, "device": name, "model": dataclasses.asdict(model.cfg),
                       "params": params, "batch": tcfg.batch_size, "dtype": str(dtype),
                       "doc_masking": tcfg.doc_masking, "levers": levers}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _mark(key: str) -> Path:
    return Path(use_compile_cache()) / WARM_MARKS / key


def mark_compiled(key: str) -> None:
    """Record in the compile cache that the shapes named ``key`` compiled (a failure to write is no error)."""
    mark = _mark(key)
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(f"{time.time():.0f}\n")
    except OSError:
        pass


def skips_cold_compile(tcfg: TrainConfig, device: torch.device, key: str) -> bool:
    """Whether ``--compile auto`` trains eagerly: on CUDA, a ``--max-time`` under ``COLD_BUDGET_S`` (the run's whole
    budget, also when resumed), nothing in the compile cache for ``key``, and ``MINILLM_COLD_COMPILE`` at its CUDA
    default (``budget``)."""
    return (tcfg.compile == "auto" and device.type == "cuda" and 0 < tcfg.max_time < COLD_BUDGET_S
            and lever("COLD_COMPILE", device.type) == "budget" and not _mark(key).exists())


_MIX_ORDER_DEFAULT: dict[str, bool] = {}  # torch's own mix_order_reduction, before MINILLM_REDUCE touched it


def apply_model_levers(device: torch.device) -> None:
    """The levers that live in the model's code (``MINILLM_NORM``: ``RMSNorm.explicit`` and ``half_weight``;
    ``MINILLM_PROJ``: ``Attention.concat_projections``; ``MINILLM_LOSS``: ``loss.TRITON_LOSS``) and inductor's (its
    kernel tuning, ``MINILLM_TUNE``; its mix-order reductions, ``MINILLM_REDUCE``), set for ``device`` before
    anything traces or runs the model (``maybe_compile`` calls it first)."""
    from minillm.model import loss
    from minillm.model.gpt import Attention, RMSNorm

    norm = lever("NORM", device.type)
    RMSNorm.explicit, RMSNorm.half_weight = norm != "fused", norm == "halfweight"
    Attention.concat_projections = lever("PROJ", device.type) == "concat"
    loss.TRITON_LOSS = lever("LOSS", device.type) == "triton" and device.type == "cuda" and _triton_loss_imports()
    tune = lever("TUNE", device.type) == "coordinate"
    split = lever("REDUCE", device.type) == "split"
    if tune or split or "torch._inductor.config" in sys.modules:  # inductor's import costs start-up: only when wanted
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = tune
        if hasattr(inductor_config.triton, "mix_order_reduction"):  # torch >= 2.10
            _MIX_ORDER_DEFAULT.setdefault("torch", inductor_config.triton.mix_order_reduction)
            inductor_config.triton.mix_order_reduction = False if split else _MIX_ORDER_DEFAULT["torch"]


def _triton_loss_imports() -> bool:
    """Whether ``MINILLM_LOSS=triton`` can run: triton is installed and torch has ``torch.library.triton_op``.
    Unset, the lever falls back to the plain loss without them; set by the user, their absence is an error that
    names the fix."""
    from minillm.model.triton_decode import available

    if available() and hasattr(torch.library, "triton_op"):  # torch >= 2.6 registers Triton kernels as ops
        return True
    if explicit("LOSS"):
        raise MiniLLMError("MINILLM_LOSS=triton needs triton (shipped with torch's CUDA wheels on Linux): install it, "
                         "or unset MINILLM_LOSS for the plain loss")
    return False


def maybe_compile(model: torch.nn.Module, tcfg: TrainConfig, device: torch.device, whole: bool = False,
                  warmup: Callable[[Regions], None] | None = None,
                  on_ready: Callable[[str], None] | None = None, key: str | None = None,
                  eager: bool = False) -> torch.nn.Module:
    """What the training step runs: with ``--compile auto`` on CUDA or ``on`` anywhere, the model with its blocks
    and head compiled (regional compilation: one block's compile time, reused for every layer), or with
    ``--compile model`` (or ``whole``, for FSDP's sharded model) the whole model under one ``torch.compile``;
    the model itself otherwise. ``warmup`` (``--compile auto`` only): compile in the background while the first
    steps run eagerly (``RegionallyCompiled``). Compiled kernels are cached in ``compile_cache_dir()`` (``use_compile_cache``).
    ``MINILLM_COMPILE_MODE`` (``minillm.optim.levers``) picks ``torch.compile``'s mode; with ``reduce-overhead``
    (CUDA graphs, recorded on the thread that replays them) the regions compile in the first step, never in the
    background. ``key`` (``compile_key``): the regional compilation marks it in the cache once it has succeeded.
    ``eager``: the caller's ``skips_cold_compile`` decision (the run agrees on it across ranks): the model itself,
    and ``on_ready`` hears why."""
    apply_model_levers(device)
    if tcfg.compile == "off" or (tcfg.compile == "auto" and device.type != "cuda"):
        return model
    use_compile_cache()
    if eager:
        if on_ready is not None:
            on_ready(f"--compile auto: training eagerly: --max-time {tcfg.max_time:g} s is under {COLD_BUDGET_S:g} s "
                     "and the compile cache has no kernels for this model and batch (compiling would cost more of "
                     "the budget than it gains; one run with --compile on fills the cache)")
        return model
    mode = lever("COMPILE_MODE")
    mode = None if mode == "default" else mode
    if tcfg.compile == "model" or whole:
        return torch.compile(model, mode=mode)
    background = tcfg.compile == "auto" and mode != "reduce-overhead"
    return RegionallyCompiled(model, warmup if background else None, on_ready, mode,
                              on_compiled=None if key is None else lambda: mark_compiled(key))


def _to_device(x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)  # (B, T+1)
    return x[:, :-1], x[:, 1:]  # (B, T), (B, T)


def _forward(model, x, y, doc_masking: bool, doc_id: int, device, dtype, reduction: str = "mean",
             **kwargs) -> torch.Tensor:
    from minillm.model.gpt import segment_ids

    seg = segment_ids(x, doc_id) if doc_masking else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(x, y, seg_ids=seg, reduction=reduction, **kwargs)


def accumulate(model, batches: list[torch.Tensor], tcfg: TrainConfig, doc_id: int, device, dtype,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward and backward over micro-batches (B, T+1) each, gradients summed as for one batch of all of
    them (each micro-batch's mean loss weighted 1 / len(batches)). Returns the mean loss (0-d, not synced).
    Under DistributedDataParallel only the last micro-batch's backward all-reduces the gradients."""
    from minillm.distributed import grad_sync

    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        x, y = _to_device(batch, device)
        with grad_sync(model, enabled=i == len(batches) - 1):
            loss = _forward(model, x, y, tcfg.doc_masking, doc_id, device, dtype) / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach().float()
    return total


@dataclass
class StepResult:
    loss: float  # mean training loss of the step (nan when deferred)
    grad_norm: float  # gradient norm before clipping (nan when deferred)
    loader_state: dict  # the loader's position after the step's micro-batches
    skipped: str | None = None  # why the update was skipped (a non-finite loss or gradient), else None
    stats: torch.Tensor | None = None  # deferred (MINILLM_STEP_SYNC=log): (loss, norm) on the device, for read_back


def skip_reason(loss: float, norm: float, scaled: bool) -> str | None:
    """Why a step with this loss and gradient norm is not applied: a non-finite loss, or (unless the fp16 scaler,
    which skips overflowing steps itself, is on) a non-finite gradient norm; None when it is."""
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if not math.isfinite(norm) and not scaled:
        return f"non-finite gradient norm {norm}"
    return None


def read_back(pending: list[tuple[int, torch.Tensor]]) -> list[tuple[int, float, str | None]]:
    """Deferred steps, each ``(step number, its StepResult.stats)``, read back in one host sync: for each, the
    step number, its loss and why its update was skipped on the device (``skip_reason``) or None."""
    if not pending:
        return []
    values = torch.stack([s for _, s in pending]).tolist()
    return [(n, loss, skip_reason(loss, norm, False)) for (n, _), (loss, norm) in zip(pending, values, strict=True)]


def _step_unless(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``opt.step()`` made a no-op on the device where ``found_inf`` (0-d float) is 1: the protocol of torch's fused
    AdamW under a gradient scaler, which ``Muon`` follows too."""
    opt.grad_scale, opt.found_inf = None, found_inf
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf


def _takes_found_inf(opt: torch.optim.Optimizer) -> bool:
    """Whether ``_step_unless`` can skip ``opt``'s step on the device (torch's non-fused AdamW refuses a found_inf)."""
    return isinstance(opt, Muon) or bool(opt.defaults.get("fused"))


def defers_sync(opts: list[torch.optim.Optimizer], device: torch.device, fp16_scaler: bool) -> bool:
    """Whether a step leaves the non-finite check on the device (``MINILLM_STEP_SYNC=log``, the CUDA default):
    never with the fp16 scaler (its own check syncs); with optimizers that cannot skip on the device, the default
    falls back to the host check and an explicit ``log`` is an error."""
    if lever("STEP_SYNC", device.type) != "log" or fp16_scaler:
        return False
    if all(_takes_found_inf(opt) for opt in opts):
        return True
    if explicit("STEP_SYNC"):
        raise MiniLLMError("MINILLM_STEP_SYNC=log needs optimizers that skip on the device (fused AdamW, Muon); "
                           "unset MINILLM_STEP_SYNC")
    return False


def make_train_step(model, train_model, opts, tcfg: TrainConfig, device, dtype, doc_id: int,
                    scaler: torch.amp.GradScaler | None = None, reduce=None):
    """One optimizer step: ``step(prefetcher, lr_scale) -> StepResult``. Accumulates ``accumulation_steps``
    micro-batches, unscales (fp16), clips, and updates unless the loss or (outside fp16, where the scaler
    skips overflowing steps itself) the gradient norm is non-finite. ``model`` owns the parameters (clipped
    and stepped); ``train_model`` is what the forward and backward go through: ``model`` itself, its
    ``torch.compile`` wrapper, or under torchrun the DistributedDataParallel wrapper around that. ``reduce(t)``
    (data-parallel runs) averages the (loss, norm) pair over the ranks in place, so every rank logs the global
    loss and takes the same skip decision.

    Where ``defers_sync`` (``MINILLM_STEP_SYNC=log``, the CUDA default): no host sync in the step. The optimizers
    step unconditionally with a ``found_inf`` flag made on the device, which leaves parameters and optimizer state
    exactly as they were when the loss or the norm is non-finite; the result carries the (loss, norm) pair as
    ``stats`` for ``read_back`` (the loop reads them at its log steps). With
    ``MINILLM_COMPILE_MODE=reduce-overhead`` each step begins a new CUDA-graph generation."""
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    deferred = defers_sync(opts, device, scaler.is_enabled())
    graphs = lever("COMPILE_MODE") == "reduce-overhead"

    def step(prefetch, lr_scale: float) -> StepResult:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        set_lr(opts, lr_scale)
        items = [prefetch.next() for _ in range(tcfg.accumulation_steps)]
        loss = accumulate(train_model, [b for b, _ in items], tcfg, doc_id, device, dtype, scaler)
        for opt in opts:
            scaler.unscale_(opt)
        norm = clip_gradients(params, tcfg.grad_clip)
        stats = torch.stack([loss, norm.float()])
        if reduce is not None:
            reduce(stats)
        if deferred:
            found_inf = (~torch.isfinite(stats).all()).float()
            for opt in opts:
                _step_unless(opt, found_inf)
                opt.zero_grad(set_to_none=True)
            return StepResult(math.nan, math.nan, items[-1][1], stats=stats)
        loss_val, norm_val = stats.tolist()  # the step's one host sync
        skipped = skip_reason(loss_val, norm_val, scaler.is_enabled())
        if skipped is None:
            for opt in opts:
                scaler.step(opt)
        scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        return StepResult(loss_val, norm_val, items[-1][1], skipped)

    return step


@torch.no_grad()
def estimate_val_loss(model, batches, tcfg: TrainConfig, doc_id: int, device, dtype, reduce=None) -> float:
    """Mean loss over the fixed validation batches (each (B, T+1)), in eval mode (no dropout). ``reduce(t)``
    (data-parallel runs, each rank holding a share of the batches) sums (loss sum, windows) over the ranks."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for b in batches:
        x, y = _to_device(torch.from_numpy(b), device)
        total += _forward(model, x, y, tcfg.doc_masking, doc_id, device, dtype).float() * len(b)
        count += len(b)
    model.train(was_training)
    sums = torch.stack([total, torch.tensor(float(count), device=device)])
    if reduce is not None:
        reduce(sums)
    total_val, count_val = sums.tolist()
    return float(total_val / max(1.0, count_val))
