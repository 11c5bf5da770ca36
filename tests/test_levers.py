"""The issue-20 switches (minillm/optim/levers.py): off unless their environment variable names a known value."""

from __future__ import annotations

import pytest

from minillm.errors import UsageError
from minillm.optim.levers import LEVERS, lever


def test_each_lever_is_off_by_default_and_takes_only_its_values(monkeypatch):
    for name, choices in LEVERS.items():
        monkeypatch.delenv(f"MINILLM_{name}", raising=False)
        assert lever(name) == choices[0]
        monkeypatch.setenv(f"MINILLM_{name}", "")
        assert lever(name) == choices[0]
        for value in choices:
            monkeypatch.setenv(f"MINILLM_{name}", value)
            assert lever(name) == value
        monkeypatch.setenv(f"MINILLM_{name}", "on")
        with pytest.raises(UsageError, match=rf"^MINILLM_{name}=on: not one of {', '.join(choices)}; unset it"):
            lever(name)


def test_unset_levers_take_the_gpu_winners_on_cuda_and_stay_exact_elsewhere(monkeypatch):
    """The measured winners (the device-side non-finite check, Muon's fused Newton-Schulz, the norm as plain ops with
    the weight in the activations' dtype, the loss's Triton kernel) are CUDA's defaults; the CPU (and MPS) keep the synchronous, exact path; a
    set variable wins on every device."""
    for name in LEVERS:
        monkeypatch.delenv(f"MINILLM_{name}", raising=False)
    assert [lever(n, "cuda") for n in LEVERS] == ["log", "default", "fused", "default", "budget", "halfweight",
                                                 "separate", "default", "triton", "mixed"]
    exact = ["step", "default", "matmul", "default", "always", "fused", "separate", "default", "plain", "mixed"]
    assert [lever(n, "cpu") for n in LEVERS] == exact
    assert [lever(n, "mps") for n in LEVERS] == exact
    monkeypatch.setenv("MINILLM_STEP_SYNC", "step")
    monkeypatch.setenv("MINILLM_MUON_NS", "matmul")
    assert lever("STEP_SYNC", "cuda") == "step" and lever("MUON_NS", "cuda") == "matmul"
