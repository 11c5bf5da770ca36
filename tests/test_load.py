"""minillm.model.load: a checkpoint, run directory or export rebuilt as the same model, weights that do not fit
their config refused with one message whichever file they come from, and the tokenizer that goes with a
checkpoint (its sha256 checked; a larger vocabulary refused even when forced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, to_dict
from minillm.errors import MiniLLMError
from minillm.io import sha256_file
from minillm.model.gpt import GPT
from minillm.model.load import check_tokenizer, load_exported, load_model, resolve_tokenizer

CFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)


@pytest.mark.parametrize("tie", [True, False])
def test_load_model_rebuilds_the_saved_model_exactly(tmp_path, tie):
    """A checkpoint in the train format loads back to the same function: identical logits, eval mode, tied
    weights still one tensor, and a fresh model of the same config would differ (so the test can fail)."""
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qk_norm=True,
                      tie_embeddings=tie)
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the init a fresh GPT(cfg) would have
    save_checkpoint(tmp_path / "ckpt_best.pt", {"model": m.state_dict(), "model_config": to_dict(cfg)})
    loaded, state = load_model(tmp_path)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m.eval()(x)
        assert torch.equal(loaded(x), want) and not loaded.training
        torch.manual_seed(0)
        assert not torch.allclose(GPT(cfg).eval()(x), want, atol=1e-3)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    assert state["path"] == str(tmp_path / "ckpt_best.pt")


def test_weights_that_do_not_fit_their_config_get_one_message_from_a_checkpoint_and_an_export(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = GPT(CFG).state_dict()
    sd["blocks.0.mlp.up_proj.weight"] = sd["blocks.0.mlp.up_proj.weight"].t().contiguous()  # as many values
    ckpt = tmp_path / "ckpt_best.pt"
    save_checkpoint(ckpt, {"model": sd, "model_config": to_dict(CFG)})
    with pytest.raises(MiniLLMError, match=rf"^--ckpt: {ckpt} does not match its own model config: .*up_proj") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)  # one line, not torch's list of errors
    exported = tmp_path / "w.safetensors"
    tensors = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # tied: stored once, as export writes it
    st.save_file(tensors, str(exported), metadata={"format": "pt", "model_config": json.dumps(to_dict(CFG))})
    for load in (load_model, load_exported):
        with pytest.raises(MiniLLMError, match=rf"^--ckpt: {exported} does not match its own model config: .*up_proj"):
            load(exported)


def _run(tmp_path: Path, tokenizer: Path, vocab_size: int = 320) -> dict:
    """A checkpoint state as ``load_checkpoint`` returns it, of a run whose tokenizer is ``tokenizer``."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tokenizer, run / "tokenizer.json")
    return {"path": str(run / "ckpt_best.pt"), "tokenizer_sha256": sha256_file(tokenizer),
            "model_config": {"vocab_size": vocab_size}}


def test_the_tokenizer_defaults_to_the_runs_copy_and_another_is_refused_unless_forced(tmp_path, tokenizer_path):
    state = _run(tmp_path, tokenizer_path)
    own = tmp_path / "run" / "tokenizer.json"
    assert check_tokenizer(state, None) == own == resolve_tokenizer(state, None)
    other = tmp_path / "other.json"
    other.write_text(tokenizer_path.read_text().replace("<|pad|>", "<|PAD|>"))
    ckpt = state["path"]
    with pytest.raises(MiniLLMError, match=rf"^--tokenizer {other} is not the tokenizer checkpoint {ckpt} was "
                                           rf"trained with \(sha256 differs\); use the run's tokenizer.json \({own}\), or "
                                           rf"--force-tokenizer if you are sure$"):
        resolve_tokenizer(state, other)
    with pytest.raises(MiniLLMError, match=rf"^--tokenizer {other} is not the tokenizer base checkpoint {ckpt} was "
                                           rf"trained with \(sha256 differs\); fine-tuning keeps the base's tokenizer; "
                                           rf"use the base run's tokenizer.json \({own}\), or --force-tokenizer"):
        check_tokenizer(state, other, base=True)
    assert check_tokenizer(state, other, force=True) == other == resolve_tokenizer(state, other, force=True)
    own.unlink()
    for base, whose in ((False, "the run's"), (True, "the base run's")):
        with pytest.raises(MiniLLMError, match=rf"^--tokenizer: {own} does not exist; pass {whose} tokenizer.json"):
            check_tokenizer(state, None, base=base)


def test_a_tokenizer_larger_than_the_model_is_refused_even_when_forced(tmp_path, tokenizer_path):
    state = _run(tmp_path, tokenizer_path, vocab_size=100)
    with pytest.raises(MiniLLMError, match=rf"^--tokenizer {tmp_path / 'run' / 'tokenizer.json'} has \d+ tokens but "
                                           rf"checkpoint {state['path']} only 100"):
        resolve_tokenizer(state, None, force=True)
    assert check_tokenizer(state, None) == tmp_path / "run" / "tokenizer.json"  # the hash check alone passes
