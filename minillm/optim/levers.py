"""The speed switches of issue 20, each read from one environment variable so that ``scripts/bench_train.py`` and
a ``minillm train`` run can A/B them without a config field. Unset, each takes its default for the device: the
ones measured to win on a GPU (docs/BENCHMARKS.md, "The levers measured") are on for CUDA; the CPU keeps the first
value (the exact, synchronous path its tests pin down).

| variable | values | CPU default | CUDA default | what it does |
| --- | --- | --- | --- | --- |
| ``MINILLM_STEP_SYNC`` | ``step``, ``log`` | ``step`` | ``log`` | ``log``: the non-finite check on the device, (loss, norm) read back at log steps |
| ``MINILLM_COMPILE_MODE`` | ``default``, ``reduce-overhead``, ``max-autotune-no-cudagraphs`` | ``default`` | ``default`` | the compiled regions' ``torch.compile`` mode (``reduce-overhead``: CUDA graphs; +1.5%, within the spread, and no background compilation: not a default) |
| ``MINILLM_MUON_NS`` | ``matmul``, ``fused`` | ``matmul`` | ``fused`` | ``fused``: Muon's Newton-Schulz with ``baddbmm``, tall matrices batched with their transposed shape |
| ``MINILLM_COMPILE_SWITCH`` | ``default``, ``short`` | ``default`` | ``default`` | ``short``: while ``--compile auto`` compiles on its thread, the interpreter switches threads every 0.1 ms instead of 5 ms (measured on an H200, 30 s cold: 111 steps against 115, no gain: not a default) |
| ``MINILLM_NORM`` | ``fused``, ``explicit``, ``halfweight`` | ``fused`` | ``halfweight`` | ``explicit``: RMSNorm as plain ops (``x * rsqrt(mean(x²) + eps) * w``), so that inductor derives its backward from them instead of lowering ``_fused_rms_norm_backward``; ``halfweight``: the same, the normalised input cast back before the weight multiplies it (Hugging Face's Llama). Measured on an H100 (session 31): halfweight +2.5-3% medium, +1.6% small, equal on large; explicit +1.6% medium |
| ``MINILLM_PROJ`` | ``separate``, ``concat`` | ``separate`` | ``separate`` | ``concat``: the query, key and value projections as one matrix product, and the MLP's gate and up (``model.gpt.linears``; the parameters stay separate). Measured on an H100 with halfweight: +1% medium, +2% small, **-7% large**: not a default |
| ``MINILLM_TUNE`` | ``default``, ``coordinate`` | ``default`` | ``default`` | ``coordinate``: inductor's coordinate-descent tuning of each generated kernel's block sizes (``torch._inductor.config.coordinate_descent_tuning``, as modded-nanogpt sets it). Measured on an H100 (session 35): small 1.02x (within its spread), medium 0.98x, cold compile 93-129 s against 7 s: not a default |
| ``MINILLM_LOSS`` | ``plain``, ``triton`` | ``plain`` | ``triton`` | ``triton``: a compiled training step's output layer and loss as the matrix product and one Triton kernel that writes each row's loss and its logits' gradient in place (``model.triton_loss``); the plain path where triton does not import. Measured on an H100 (session 34): the loss's forward + backward 1.05-1.08x faster at the four presets' shapes; the step +3% small, +1.5-2.4% medium; validation loss 0.008% from the plain path's after 200 steps |
| ``MINILLM_REDUCE`` | ``mixed``, ``split`` | ``mixed`` | ``mixed`` | ``split``: inductor's mix-order reductions off (``torch._inductor.config.triton.mix_order_reduction``, on by default in torch >= 2.10): a norm's backward no longer sums its weight's gradient over the rows in the kernel that reduces each row. Measured on an H100 (session 35): small 1.01x, medium 1.00x (within the spread): not a default |
| ``MINILLM_COLD_COMPILE`` | ``always``, ``budget`` | ``always`` | ``budget`` | ``budget``: ``--compile auto`` with a ``--max-time`` under 60 s trains eagerly when the compile cache has no kernels for the run's shapes (``train.step.skips_cold_compile``; 30 s cold, H200: 342 eager steps against 115; 60 s cold, H100: 755 against 758) |
"""

from __future__ import annotations

import os

from minillm.errors import UsageError

STEP_SYNC = ("step", "log")
COMPILE_MODE = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
MUON_NS = ("matmul", "fused")
COMPILE_SWITCH = ("default", "short")
COLD_COMPILE = ("always", "budget")
NORM = ("fused", "explicit", "halfweight")
PROJ = ("separate", "concat")
TUNE = ("default", "coordinate")
LOSS = ("plain", "triton")
REDUCE = ("mixed", "split")
LEVERS = {"STEP_SYNC": STEP_SYNC, "COMPILE_MODE": COMPILE_MODE, "MUON_NS": MUON_NS, "COMPILE_SWITCH": COMPILE_SWITCH,
          "COLD_COMPILE": COLD_COMPILE, "NORM": NORM, "PROJ": PROJ, "TUNE": TUNE, "LOSS": LOSS, "REDUCE": REDUCE}
CUDA_DEFAULTS = {"STEP_SYNC": "log", "COMPILE_MODE": "default", "MUON_NS": "fused",  # measured to win on a GPU
                 "COMPILE_SWITCH": "default", "COLD_COMPILE": "budget", "NORM": "halfweight", "PROJ": "separate",
                 "TUNE": "default", "LOSS": "triton", "REDUCE": "mixed"}


def lever(name: str, device: str | None = None) -> str:
    """The value of switch ``name`` (a key of ``LEVERS``) from ``MINILLM_<name>``; unset or empty: the default
    for ``device`` (a device type, e.g. ``"cuda"``: ``CUDA_DEFAULTS``; anything else: the first choice)."""
    choices, var = LEVERS[name], f"MINILLM_{name}"
    value = os.environ.get(var, "") or (CUDA_DEFAULTS[name] if device == "cuda" else choices[0])
    if value not in choices:
        raise UsageError(f"{var}={value}: not one of {', '.join(choices)}; unset it for the device's default")
    return value


def explicit(name: str) -> bool:
    """Whether ``MINILLM_<name>`` is set (a user's choice, which errors when it cannot apply, where a default
    quietly falls back)."""
    return bool(os.environ.get(f"MINILLM_{name}", ""))
