#!/usr/bin/env python
"""Compile the Triton decode kernels (``minillm/model/triton_kernels.py``) and the training loss's kernel
(``minillm/model/triton_loss.py``) ahead of time for GPU architectures, on a machine without a GPU: Triton's front end, its passes and ptxas (shipped with triton) down to a cubin for each
--arch, at the shapes of the ``large`` preset and the tuned blocks. A kernel that Triton cannot build shows here
before a user's GPU meets it (``generate`` then falls back to the eager step with a warning).

    pip install triton && python scripts/check_triton_kernels.py --arch 80,90
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases(k, loss) -> dict:
    """Kernel name -> (kernel, signature, constexprs); ``k``: the decode kernels' module, ``loss``: triton_loss."""
    P = "*bf16"
    return {
        "qkv": (k.qkv, {"x_ptr": P, "nw_ptr": P, "w_ptr": P, "b_ptr": P, "qn_ptr": P, "kn_ptr": P, "cos_ptr": P,
                       "sin_ptr": P, "slot_ptr": "*i64", "off_ptr": "*i64", "q_ptr": P, "k_ptr": P, "v_ptr": P,
                       "B": "i32", "C": "i32", "S": "i32", "T": "i32", "eps": "fp32",
                       "SCALE": "constexpr", "H": "constexpr", "HKV": "constexpr", "D": "constexpr",
                       "HAS_BIAS": "constexpr", "QK_NORM": "constexpr", "BLOCK_K": "constexpr"},
                {"SCALE": 0.125, "H": 10, "HKV": 10, "D": 64, "HAS_BIAS": False, "QK_NORM": True, "BLOCK_K": 256}),
        "attend": (k.attend, {"q_ptr": P, "k_ptr": P, "v_ptr": P, "valid_ptr": "*u8", "slot_ptr": "*i64", "m_ptr": "*fp32",
                             "den_ptr": "*fp32", "acc_ptr": "*fp32", "S": "i32", "NS": "i32", "H": "constexpr",
                             "HKV": "constexpr", "D": "constexpr", "BLOCK_S": "constexpr"},
                   {"H": 10, "HKV": 10, "D": 64, "BLOCK_S": 64}),
        "combine": (k.combine, {"m_ptr": "*fp32", "den_ptr": "*fp32", "acc_ptr": "*fp32", "slot_ptr": "*i64", "y_ptr": P,
                               "NS": "i32", "H": "constexpr", "D": "constexpr", "BLOCK_S": "constexpr", "NSP": "constexpr"},
                    {"H": 10, "D": 64, "BLOCK_S": 64, "NSP": 16}),
        "add_linear": (k.add_linear, {"y_ptr": P, "w_ptr": P, "b_ptr": P, "x_ptr": P, "B": "i32", "K": "i32", "N": "i32",
                                     "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                       {"HAS_BIAS": False, "BLOCK_N": 32, "BLOCK_K": 256}),
        "norm_linear": (k.norm_linear, {"x_ptr": P, "nw_ptr": P, "w_ptr": P, "b_ptr": P, "out_ptr": P, "B": "i32", "C": "i32",
                                       "N": "i32", "eps": "fp32", "SWIGLU": "constexpr", "HAS_BIAS": "constexpr",
                                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                        {"SWIGLU": True, "HAS_BIAS": False, "BLOCK_N": 32, "BLOCK_K": 256}),
        "candidates": (k.candidates, {"logits_ptr": "*fp32", "seen_ptr": "*u8", "cand_ptr": "*i64", "V": "i32",
                                     "penalty": "fp32", "temperature": "fp32", "HAS_SEEN": "constexpr",
                                     "BLOCK": "constexpr", "KP": "constexpr"},
                       {"HAS_SEEN": True, "BLOCK": 2048, "KP": 128}),
        "pick": (k.pick, {"cand_ptr": "*i64", "noise_ptr": "*fp32", "token_ptr": "*i64", "unsure_ptr": "*u8",
                         "V": "i32", "N": "i32", "NC": "i32", "top_k": "i32", "top_p": "fp32", "out_ptr": "*i64",
                         "i_ptr": "*i64", "done_ptr": "*u8", "seen_ptr": "*u8", "stop_id": "i32", "pad": "i32",
                         "K": "i32", "record": "i32", "has_stop": "i32", "mark_seen": "i32",
                         "TOP_P": "constexpr", "KP": "constexpr", "NCP": "constexpr"},
                 {"TOP_P": True, "KP": 128, "NCP": 2048}),
        "cross_entropy_grad": (loss._cross_entropy_grad, {"logits_ptr": P, "targets_ptr": "*i64", "losses_ptr": "*fp32",
                                                         "V": "i32", "stride": "i32", "IGNORE": "constexpr",
                                                         "BLOCK": "constexpr"},
                               {"IGNORE": -1, "BLOCK": loss.BLOCK}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (80: A100, 90: H100)")
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minillm.model import triton_kernels, triton_loss
    from minillm.model.triton_decode import BLOCKS

    warps = {"candidates": BLOCKS["sample_warps"], "pick": BLOCKS["sample_warps"],  # as each is launched
             "cross_entropy_grad": triton_loss.WARPS}

    failed = 0
    for arch in map(int, args.arch.split(",")):
        for name, (fn, sig, const) in cases(triton_kernels, triton_loss).items():
            try:
                c = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                                   options={"num_warps": warps.get(name, 4)})
                print(f"sm_{arch} {name:12} ok ({len(c.asm['cubin'])} bytes of cubin)")
            except Exception as e:  # noqa: BLE001 (each kernel's failure is reported)
                failed += 1
                print(f"sm_{arch} {name:12} FAILED: {type(e).__name__}: {str(e)[:400]}")
    print(f"triton {triton.__version__}: {failed} failed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
