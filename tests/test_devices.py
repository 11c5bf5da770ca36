"""Device and precision choice, Apple's MPS included: there is no Mac here, so MPS is faked by patching
``torch.backends.mps.is_available`` and ``torch.cuda.is_available``; what runs on a real Mac is not tested."""

from __future__ import annotations

import pytest
import torch

from minillm.config import TrainConfig, resolve
from minillm.errors import MiniLLMError, UsageError
from minillm.model.loss import liger_problem
from minillm.optim.groups import configure_optimizer
from minillm.train.step import maybe_compile, resolve_device, resolve_precision

MPS = torch.device("mps")


@pytest.fixture
def fake(monkeypatch):
    """``fake(cuda=..., mps=...)``: what PyTorch reports as available."""

    def set_(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_


@pytest.mark.parametrize("cuda,mps,want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(fake, cuda, mps, want):
    fake(cuda=cuda, mps=mps)
    assert resolve_device("auto").type == want


def test_device_mps_when_there_is_one(fake):
    fake(cuda=False, mps=True)
    assert resolve_device("mps") == MPS


def test_device_mps_without_one_is_one_clear_error(fake):
    fake(cuda=False, mps=False)
    with pytest.raises(MiniLLMError, match=r"^--device mps: Apple's MPS is not available .*use --device auto \(or cpu\)$"):
        resolve_device("mps")


def test_device_cuda_without_one_still_refused_on_a_mac(fake):
    fake(cuda=False, mps=True)
    with pytest.raises(MiniLLMError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_mps_precision_auto_is_fp32_and_fp16_is_refused():
    assert resolve_precision("auto", MPS) == torch.float32
    assert resolve_precision("bf16", MPS) == torch.bfloat16
    with pytest.raises(MiniLLMError, match="fp16 needs a CUDA GPU; use bf16 or fp32 on the MPS"):
        resolve_precision("fp16", MPS)


def test_mps_compiles_only_when_asked():
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, TrainConfig(compile="auto"), MPS) is model


def test_mps_skips_the_fused_kernels():
    model = torch.nn.Linear(4, 4)
    (adamw,) = configure_optimizer(model, TrainConfig(), MPS)
    assert not adamw.defaults["fused"]
    mcfg, _ = resolve("tiny", {"loss_kernel": "liger"})
    assert liger_problem(mcfg, MPS) is None  # liger runs on CUDA only: not asked for, not refused


def test_config_accepts_mps_and_names_it_among_the_choices():
    assert resolve("tiny", {"device": "mps"})[1].device == "mps"
    with pytest.raises(UsageError, match="not one of auto, cpu, cuda, cuda:N, mps"):
        resolve("tiny", {"device": "metal"})


def test_train_device_mps_on_a_machine_without_it_exits_1(tmp_path, runner, fake, tokenizer_path, corpus):
    from minillm.cli import app

    fake(cuda=False, mps=False)
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", str(tmp_path / "r"),
                            "--device", "mps", "--max-steps", "1"])
    assert r.exit_code == 1, r.output
    assert "--device mps: Apple's MPS is not available" in r.output and "Traceback" not in r.output
