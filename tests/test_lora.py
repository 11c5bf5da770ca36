"""LoRA: outputs unchanged at init, merge/unmerge parity, the parameter formula, frozen base weights during
training, adapter files (weights_only, refusing a different base)."""

from __future__ import annotations

import pytest
import torch

from minillm import lora as L
from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, TrainConfig, to_dict
from minillm.errors import MiniLLMError, UsageError
from minillm.model.gpt import GPT
from minillm.optim.groups import configure_optimizer

CFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def tiny(cfg: ModelConfig = CFG, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))  # (B, T)


def randomize_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in L.lora_modules(model):
            m.lora_B.normal_(0, 0.05)


def test_lora_at_init_leaves_outputs_unchanged():
    model, x = tiny(), tokens()
    before = model(x)
    names = L.apply_lora(model, L.LoRAConfig(rank=4, alpha=8))
    assert len(names) == CFG.n_layer * 7 and all(isinstance(m, L.LoRALinear) for m in L.lora_modules(model))
    assert torch.equal(model(x), before)  # B = 0: exactly the base's logits
    randomize_b(model)
    assert not torch.allclose(model(x), before, atol=1e-4)  # the adapter does act once B moves


def test_state_dict_keeps_base_keys_and_tying():
    model = tiny()
    base_keys = set(model.state_dict())
    L.apply_lora(model, L.LoRAConfig(rank=2, targets=("q", "down")))
    keys = set(model.state_dict())
    assert base_keys <= keys and {k for k in keys - base_keys} == {
        f"blocks.{i}.{t}.lora_{ab}" for i in range(2) for t in ("attn.q_proj", "mlp.down_proj") for ab in "AB"}
    assert model.lm_head.weight is model.tok_emb.weight


def test_merged_and_unmerged_give_the_same_logits():
    model, x = tiny(), tokens()
    L.apply_lora(model, L.LoRAConfig(rank=4, alpha=16, targets=("q", "v", "o", "up")))
    randomize_b(model)
    w0 = model.blocks[0].attn.q_proj.weight.detach().clone()
    unmerged = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # merge() changes the weights in place
    L.merge(model)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, w0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    # merged_state_dict (what checkpoints hold) gives the same plain GPT
    plain = tiny(seed=5)
    plain.load_state_dict(L.merged_state_dict(sd, 16 / 4))
    torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-5)
    L.unmerge(model)
    torch.testing.assert_close(model.blocks[0].attn.q_proj.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mcfg,targets", [
    (CFG, L.DEFAULT_TARGETS),
    (ModelConfig(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_kv_head=2, n_embd=32), ("q", "k", "v")),
    (ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, mlp="gelu", bias=True), ("o", "up", "down")),
])
def test_trainable_count_and_optimizer_state_match_the_formula(mcfg, targets):
    model = tiny(mcfg)
    cfg = L.LoRAConfig(rank=3, targets=targets)
    L.apply_lora(model, cfg)
    rep = L.param_report(model, mcfg, cfg)
    by_hand = mcfg.n_layer * sum(3 * (i + o) for i, o in L.target_shapes(mcfg, targets).values())
    assert rep["trainable_params"] == by_hand == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    if mcfg.n_kv_head == 2:  # GQA: k/v are narrower than q
        assert L.target_shapes(mcfg, targets)["k"] == (32, 16)
    opts = configure_optimizer(model, TrainConfig(), torch.device("cpu"))
    model.train()
    model(tokens(), tokens(2) % mcfg.vocab_size).backward()
    for o in opts:
        o.step()
    assert L.optimizer_state_bytes(opts) == rep["optimizer_state_bytes"] == 2 * 4 * by_hand


def test_only_adapter_params_change_during_training():
    from minillm.train.step import make_train_step

    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    L.apply_lora(model, L.LoRAConfig(rank=4, alpha=8))
    model.train()
    tcfg = TrainConfig(batch_size=2, lr=1e-2, device="cpu")
    opts = configure_optimizer(model, tcfg, torch.device("cpu"))
    step = make_train_step(model, model, opts, tcfg, torch.device("cpu"), torch.float32, doc_id=0)

    class Feed:
        def next(self):
            return torch.randint(0, 64, (2, 17)), {}

    feed = Feed()
    for _ in range(3):
        assert step(feed, 1.0).skipped is None
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    lora_b = [v for k, v in after.items() if k.endswith("lora_B")]
    assert all(b.abs().sum() > 0 for b in lora_b)  # every adapter moved away from zero


def test_targets_and_config_are_checked():
    assert L.parse_targets("q, v,q") == ("q", "v")
    with pytest.raises(UsageError, match="unknown target.*qq.*q,k,v,o,gate,up,down"):
        L.parse_targets("qq,v")
    gelu = tiny(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, mlp="gelu"))
    with pytest.raises(UsageError, match="gate"):
        L.apply_lora(gelu, L.LoRAConfig(rank=2, targets=("gate",)))
    with pytest.raises(UsageError, match="--lora-rank"):
        L.check_config(L.LoRAConfig(rank=0), CFG)


def _base_file(path, seed: int):
    model = tiny(seed=seed)
    save_checkpoint(path, {"model": model.state_dict(), "model_config": to_dict(CFG)})
    return path


def test_adapter_file_roundtrip_and_refuses_a_different_base(tmp_path):
    from minillm.io import sha256_file
    from minillm.model.load import load_model

    a, b = _base_file(tmp_path / "a.pt", 0), _base_file(tmp_path / "b.pt", 1)
    model, state = load_model(a)
    cfg = L.LoRAConfig(rank=2, alpha=4, targets=("q", "up"))
    L.apply_lora(model, cfg)
    randomize_b(model)
    x = tokens()
    want = model(x)
    L.save_adapter(tmp_path / "adapter.pt", model, cfg, sha256_file(a), str(a))
    raw = torch.load(tmp_path / "adapter.pt", weights_only=True)  # plain tensors and values only
    assert set(raw["tensors"]) == {k for k in model.state_dict() if ".lora_" in k}
    assert (tmp_path / "adapter.pt").stat().st_size < a.stat().st_size / 3
    fresh, st = load_model(a)
    assert L.attach_adapter(fresh, st, tmp_path / "adapter.pt") == cfg
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    other, st_b = load_model(b)
    with pytest.raises(MiniLLMError, match=r"trained on base checkpoint .*a\.pt.*not on --ckpt .*b\.pt"):
        L.attach_adapter(other, st_b, tmp_path / "adapter.pt")
    with pytest.raises(MiniLLMError, match="not a LoRA adapter"):
        L.load_adapter(a)
