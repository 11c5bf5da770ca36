"""The devices the planner knows: measured training speed (as a share of the device's peak FLOP/s by model
width), the part of a ``--max-time`` budget that is not training steps, and the memory a compiled run takes.
Figures come from docs/BENCHMARKS.md (named per figure); ``--measure`` replaces the speed by a measured one."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

from minillm.config import ModelConfig
from minillm.errors import UsageError
from minillm.model.memory import (
    background_compile_room,
    estimate_memory,
    flops_per_token,
    matrix_params,
    param_count,
)

GIB = 2**30


@dataclass(frozen=True)
class Device:
    """What the planner needs of a device. ``mfu``: (model width, achieved share of ``peak_flops``) measured
    points, interpolated in log width; ``startup_s``: seconds of a run before its steps (start, token cache,
    compilation); ``train_share``: the share of the rest spent in steps (evaluations and checkpoints take the
    remainder)."""

    name: str
    kind: str  # "cuda" or "cpu"
    memory: int  # bytes a run may use
    peak_flops: float
    mfu: tuple[tuple[int, float], ...]
    muon_speed: float  # tokens/s with Muon relative to AdamW
    startup_s: float
    train_share: float
    compiled: bool  # the trainer compiles the model on this device (memory: the compiled figure)
    min_step_s: float  # no optimizer step is faster (launch-bound small models)
    eager_s: float = 0.0  # seconds of full-speed steps lost to the eager steps run while the compile ends
    eager_speed: float = 1.0  # an eager step's speed against a compiled one's
    cold_budget_s: float = 0.0  # budgets under this train eagerly on a cold compile cache (train.step.COLD_BUDGET_S)

    def tokens_per_s(self, cfg: ModelConfig, optimizer: str, batch_tokens: int) -> float:
        """Training tokens per second of ``cfg`` on this device at ``batch_tokens`` a step (6N + attention
        FLOPs per token at the width's measured share of the peak, a step no faster than ``min_step_s``)."""
        share = interpolate(self.mfu, cfg.n_embd)
        speed = self.peak_flops * share / flops_per_token(cfg, matrix_params(cfg))
        speed *= self.muon_speed if optimizer == "muon" else 1.0
        return min(speed, batch_tokens / self.min_step_s) if self.min_step_s else speed

    def steady_seconds(self, budget_s: float) -> float:
        """Seconds at full speed that a ``--max-time budget_s`` run's steps are worth: ``train_seconds`` less what
        the eager steps before the background compilation ends lose; under ``cold_budget_s``, all of them at the
        eager speed (``--compile auto`` on a cold compile cache)."""
        train = self.train_seconds(budget_s)
        return train * self.eager_speed if self.trains_eagerly(budget_s) else max(0.0, train - self.eager_s)

    def trains_eagerly(self, budget_s: float) -> bool:
        """Whether a ``--max-time budget_s`` run on a cold compile cache runs every step eagerly."""
        return budget_s < self.cold_budget_s

    def train_seconds(self, budget_s: float) -> float:
        """Seconds of training steps a ``--max-time budget_s`` run gets."""
        return max(0.0, (budget_s - self.startup_s) * self.train_share)

    def memory_needed(self, cfg: ModelConfig, batch_size: int, optimizer: str) -> int:
        """Peak training memory in bytes of a ``--compile auto`` run: on CUDA, its first steps (eager, beside the
        copy compiling in the background) when the device has room for that copy, else the compiled run's fit;
        the eager estimate elsewhere."""
        est = estimate_memory(cfg, batch_size, "fp32" if self.kind == "cpu" else "bf16", optimizer)
        if not self.compiled:
            return est["total"]
        compiled = compiled_memory(cfg, batch_size)
        if background_compile_room(est) > self.memory:
            return compiled
        return max(compiled, int(BACKGROUND_PEAK * est["total"]))


def interpolate(points: tuple[tuple[int, float], ...], x: float) -> float:
    """Piecewise-linear in log ``x`` through ``points`` (sorted by x), constant beyond the ends."""
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + t * (y1 - y0)


# Compiled CUDA peak memory (torch.cuda.max_memory_allocated), fitted by least squares to docs/BENCHMARKS.md
# "Training throughput, session 3" (small, medium, large, gpt2-124m; each within 4%): the fp32 weights, grads
# and AdamW moments (16 bytes a parameter), bytes per (token x vocabulary entry) for the logits, and bytes per
# (token x layer x width) for what the blocks keep for backward.
LOGIT_BYTES = 2.68
ACTIVATION_BYTES = 33.2


# Peak of a single-GPU ``--compile auto`` run (torch.cuda.max_memory_allocated over the whole run) per byte of
# ``estimate_memory``'s eager total: the eager first steps and the copy compiling beside them. Fitted to the 7 runs
# of docs/BENCHMARKS.md "Planning the run (issue 21)", the held-out es_bible_rv1909 check on one H100 (small,
# medium, large x 2k-32k vocabularies, Muon and AdamW): 1.45-1.68 there, so each within 8% of 1.56.
BACKGROUND_PEAK = 1.56


def compiled_memory(cfg: ModelConfig, batch_size: int) -> int:
    """Peak memory in bytes of a compiled bf16 training step of ``cfg`` at ``batch_size`` (see above)."""
    tokens = batch_size * cfg.block_size
    return int(16 * param_count(cfg) + LOGIT_BYTES * tokens * cfg.vocab_size
               + ACTIVATION_BYTES * tokens * cfg.n_layer * cfg.n_embd)


# MFU by width: docs/BENCHMARKS.md "Training throughput (issue 8)" (H100: small 20.3%, medium 27%, large 37.1%,
# gpt2-124m 39.2%) and its session 3 (H200: 22.6%, 27.9%, 42.8%, 44.5%). Muon: small 2.48M against 2.70M
# tokens/s (session 3). Start-up and the share of steps: "Faster per token and faster to start (issue 20)",
# the 60 s cold medium --max-time run with the compilation in the background: 11.0 s to the end of the first
# step, 39.7 s of steps after it in the other 46.9 s (0.85). The steps before the background compilation ends
# (~6 s warm, ~12-23 s cold) run eagerly, 3-5x slower: worth ``eager_s`` = 10 s less at full speed. (Before issue
# 20, "Quality per GPU-second, session 3": 25.0 s of steps in a 60 s run.) The shortest step: 25 ms. The held-out
# GPU check of "Planning the run (issue 21)" (2-minute cold runs, the presets' own batches) measured steady steps of
# 21-31 ms for small (128 x 256), medium (64 x 512) and large (16 x 1024) alike, launch- and host-bound, where the
# MFU table alone expects 12-18 ms; with 25 ms and eager_s the tokens each of its seven runs trained on are within
# 26% of the plan's (they were 1.4-2.9x below it with the 12 ms of issue 13's first estimate).
# Under 60 s on a cold compile cache every step runs eagerly (``train.step.COLD_BUDGET_S``): medium 64 x 512 on an
# H200, 44.5 ms eager against 32.7 ms compiled (0.73); 342 steps in a 30 s run (docs/BENCHMARKS.md, session 30).
_H100 = Device("h100", "cuda", 79 * GIB, 989e12, ((256, 0.203), (384, 0.27), (640, 0.371), (768, 0.392)),
               0.9, 11.0, 0.85, True, 0.025, 10.0, 0.73, 60.0)
DEVICES: dict[str, Device] = {
    "h100": _H100,
    "h200": replace(_H100, name="h200", memory=139 * GIB, mfu=((256, 0.226), (384, 0.279), (640, 0.428), (768, 0.445))),
    # one thread of the 2-core development machine, fp32 eager: the training tokens/s of the CPU sweep's c1 runs
    # (docs/BENCHMARKS.md, "Planning the run (issue 21)", 2k vocabulary) are 43.7, 61.5-73.3, 86.9 and 93.1
    # GFLOP/s at widths 64, 128, 192, 256 (8k vocabulary at 128: 56.4); 270-282 s of steps in 300 s runs
    "cpu": Device("cpu", "cpu", 8 * GIB, 100e9, ((64, 0.44), (128, 0.67), (192, 0.87), (256, 0.93)), 1.0, 5.0, 0.93,
                  False, 0.0),
}
GPU_NAMES = (("H200", "h200"), ("H100", "h100"))  # a device name fragment -> its entry


def device_named(name: str, memory: int | None = None) -> Device:
    """The table's entry for ``name`` (a key, or a CUDA device name such as "NVIDIA H100 80GB HBM3"), with
    ``memory`` bytes when given. An unknown GPU gets the H100's figures."""
    key = name.lower() if name.lower() in DEVICES else next((k for frag, k in GPU_NAMES if frag in name), None)
    if key is None:
        if name.lower().startswith("cpu"):
            key = "cpu"
        elif "cuda" in name.lower() or "nvidia" in name.lower():
            key = "h100"
        else:
            raise UsageError(f"--device {name!r}: use auto, cuda, cpu, or one of {', '.join(DEVICES)}")
    dev = DEVICES[key]
    return replace(dev, memory=memory) if memory else dev


def parse_memory(text: str) -> int:
    """``80GB``, ``80G``, ``24GiB``, ``512MB`` -> bytes (GB and GiB both read as 2**30: a card's "80GB")."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([gm])i?b?\s*", text.lower())
    if not m:
        raise UsageError(f"--gpu-memory {text!r}: write e.g. 80GB or 24GiB")
    return int(float(m.group(1)) * (GIB if m.group(2) == "g" else 2**20))


def detect(device: str, memory: int | None = None) -> Device:
    """The figures of ``--device`` auto, cuda, cuda:N, cpu (or a table key): auto is CUDA when present; a CUDA
    device's entry is looked up by its name and its memory is the card's total unless ``memory`` is given;
    the CPU entry is one thread's speed whatever the cores (a second thread measured no faster on the shared
    2-core machine; ``plan --measure`` times this machine's)."""
    import torch

    name = device.lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            if memory is None:
                raise UsageError(f"--device {device}: no CUDA device here; give --gpu-memory (e.g. 80GB) to plan "
                                 "for one elsewhere, or --device h100 / h200")
            return device_named("cuda", memory)
        index = int(name.split(":")[1]) if ":" in name else 0
        props = torch.cuda.get_device_properties(index)
        return device_named(props.name, memory or props.total_memory)
    return device_named(name, memory)
