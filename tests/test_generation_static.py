"""``minillm.generation.static``: the ``--dtype`` rule."""

from __future__ import annotations

import pytest
import torch

from minillm.errors import UsageError
from minillm.generation import decode_dtype


def test_dtype_auto_is_fp32_off_cuda_and_the_flag_wins():
    cpu = torch.device("cpu")
    assert decode_dtype(cpu, "auto") == torch.float32
    assert decode_dtype(cpu, "bf16") == torch.bfloat16 and decode_dtype(cpu, "fp32") == torch.float32
    with pytest.raises(UsageError, match="--dtype"):
        decode_dtype(cpu, "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dtype_auto_is_bf16_on_a_gpu_that_has_it():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert decode_dtype(torch.device("cuda"), "auto") == want
