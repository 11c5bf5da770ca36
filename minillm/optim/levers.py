"""The experimental speed switches of issue 20, off by default, each read from one environment variable so that
``scripts/bench_train.py`` and a ``minillm train`` run can A/B them without a config field:

| variable | values (the first is the default) | what it does |
| --- | --- | --- |
| ``MINILLM_STEP_SYNC`` | ``step``, ``log`` | ``log``: the non-finite check on the device, (loss, norm) read back at log steps |
| ``MINILLM_COMPILE_MODE`` | ``default``, ``reduce-overhead``, ``max-autotune-no-cudagraphs`` | the compiled regions' ``torch.compile`` mode (``reduce-overhead``: CUDA graphs) |
| ``MINILLM_MUON_NS`` | ``matmul``, ``fused`` | ``fused``: Muon's Newton-Schulz with ``baddbmm``, tall matrices batched with their transposed shape |
"""

from __future__ import annotations

import os

from minillm.errors import UsageError

STEP_SYNC = ("step", "log")
COMPILE_MODE = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
MUON_NS = ("matmul", "fused")
LEVERS = {"STEP_SYNC": STEP_SYNC, "COMPILE_MODE": COMPILE_MODE, "MUON_NS": MUON_NS}


def lever(name: str) -> str:
    """The value of switch ``name`` (a key of ``LEVERS``) from ``MINILLM_<name>``; unset or empty: the default."""
    choices, var = LEVERS[name], f"MINILLM_{name}"
    value = os.environ.get(var, "") or choices[0]
    if value not in choices:
        raise UsageError(f"{var}={value}: not one of {', '.join(choices)}; unset it for the default ({choices[0]})")
    return value
