"""What a model costs (minillm/model/memory.py), each number held to a measurement: parameters to a built
model, FLOPs to torch's FLOP counter over a training step, the weight/gradient/optimizer bytes to a real
optimizer's state, and the activations to the bytes autograd saves."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minillm.config import PRESETS, ModelConfig, TrainConfig
from minillm.model.gpt import GPT
from minillm.model.memory import estimate_memory, param_count
from minillm.optim.groups import configure_optimizer
from tests.test_gpt import VARIANTS, tiny


@pytest.mark.parametrize("name,vocab,low,high", [
    ("small", 32000, 12.5e6, 13.5e6),
    ("medium", 32000, 26e6, 28e6),
    ("large", 32000, 68e6, 72e6),
    ("gpt2-124m", 50304, 122e6, 126e6),
])
def test_preset_parameter_counts(name, vocab, low, high):
    cfg = ModelConfig(vocab_size=vocab, **PRESETS[name]["model"])
    with torch.device("meta"):
        m = GPT(cfg)
    assert low <= m.num_params() <= high
    # SwiGLU keeps the MLP at about 8·C² (a GELU 4x model of the same shape has 8·C² exactly)
    mlp = sum(p.numel() for p in m.blocks[0].mlp.parameters())
    assert abs(mlp - 8 * cfg.n_embd ** 2) / (8 * cfg.n_embd ** 2) < 0.07
    assert param_count(cfg) == m.num_params()
    assert estimate_memory(cfg, 8)["params"] == 4 * m.num_params()


@pytest.mark.parametrize("kw", VARIANTS)
def test_param_count_is_exact_without_biases_and_a_lower_bound_with_them(kw):
    cfg = tiny(**kw)
    n = GPT(cfg).num_params()
    assert param_count(cfg) == n if not cfg.bias else param_count(cfg) < n


@pytest.mark.parametrize("kw", VARIANTS)
def test_flops_per_token_counts_the_multiplications_of_a_training_step(kw):
    """6N + 12·L·H·Q·T against the FLOPs torch counts in a forward and backward over a full block (math
    attention, whose matrix products the counter sees). N counts the norms' weights and the biases as if
    multiplied (PaLM's convention); the counter sees only the matrices, so those are added back."""
    m = GPT(tiny(attention="math", **kw)).train()
    B, T = 2, m.cfg.block_size
    x = torch.randint(0, m.cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        m(x, x).backward()
    vectors = sum(p.numel() for p in m.parameters() if p.dim() == 1)
    assert m.flops_per_token() == counter.get_total_flops() / (B * T) + 6 * vectors


def state_bytes(opts: list[torch.optim.Optimizer]) -> int:
    """Bytes of the optimizers' per-parameter state (moments; not the scalar step counters)."""
    return sum(t.numel() * t.element_size() for o in opts for st in o.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "qk_norm": True, "tie_embeddings": False}])
def test_estimate_memory_holds_the_real_weights_gradients_and_optimizer_state(optimizer, kw):
    cfg = tiny(**kw)
    torch.manual_seed(0)
    m = GPT(cfg).train()
    opts = configure_optimizer(m, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    m(x, x).backward()
    for o in opts:
        o.step()
    params = {p.data_ptr(): p for p in m.parameters()}.values()
    est = estimate_memory(cfg, 2, "fp32", optimizer)
    assert est["params"] == sum(4 * p.numel() for p in params)
    assert est["grads"] == sum(4 * p.grad.numel() for p in params)
    assert est["optimizer"] == state_bytes(opts)
    assert est["total"] == est["params"] + est["grads"] + state_bytes(opts) + est["activations"]


def test_estimate_memory_scales_with_the_batch_and_checkpointing():
    cfg = ModelConfig(vocab_size=32000, **PRESETS["large"]["model"])
    plain = estimate_memory(cfg, 64)
    ckpt = estimate_memory(dataclasses.replace(cfg, gradient_checkpointing=True), 64)
    assert set(plain) == {"params", "grads", "optimizer", "activations", "total"}
    assert ckpt["activations"] < 0.6 * plain["activations"]
    act = {b: estimate_memory(cfg, b)["activations"] for b in (32, 64, 128)}
    assert act[128] - act[64] == 2 * (act[64] - act[32])  # linear in the batch
    assert estimate_memory(cfg, 64, "fp32")["activations"] > plain["activations"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_estimate_memory_matches_saved_activations(precision, mlp):
    """The activation estimate agrees with the bytes autograd actually keeps for backward."""
    cfg = tiny(n_embd=128, n_head=4, n_kv_head=2, mlp=mlp, vocab_size=256, block_size=64)
    torch.manual_seed(0)
    m = GPT(cfg).train()
    x = torch.randint(0, 256, (2, 64))
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype, enabled=precision == "bf16"):
        m(x, x)
    ratio = estimate_memory(cfg, 2, precision)["activations"] / sum(seen.values())
    assert 0.85 < ratio < 1.3
