"""Export to Hugging Face / safetensors: file names, tensor names, shapes and dtypes; exact round trips;
a pure-torch re-implementation of HF Llama/Qwen3 math run on the exported tensors; refusals; the CLI;
and, where ``transformers`` is installed, logits and greedy tokens against ``transformers`` itself."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.checkpoint import save_checkpoint
from minillm.config import ModelConfig, pad_vocab, to_dict
from minillm.errors import MiniLLMError, UsageError
from minillm.io import sha256_file
from minillm.model.gpt import GPT

st = pytest.importorskip("safetensors.torch")

from minillm.export import export  # noqa: E402
from minillm.export.layout import HF_FILES, is_exported  # noqa: E402
from minillm.model.load import load_exported  # noqa: E402

VARIANTS = {
    "llama": {},
    "llama-untied-gqa": {"tie_embeddings": False, "n_kv_head": 2},
    "qwen3": {"qk_norm": True},
    "llama-bias": {"bias": True},
    "qwen3-parameter-free-norms": {"qk_norm": True, "norm_weight": False},  # the gains exported as ones
}


def make_run(root: Path, tokenizer_path: Path, seed: int = 0, record: dict | None = None, doc_masking: bool = True,
             **kw) -> tuple[Path, GPT]:
    """A run directory with a random tiny model whose norm gains and biases are not their init values (so a
    swapped or dropped norm/bias shows in the logits), with large q/k weights so attention is far from
    uniform and RoPE matters."""
    from minillm.tokenizer import load_tokenizer

    vocab = pad_vocab(load_tokenizer(tokenizer_path).get_vocab_size())
    cfg = ModelConfig(**{**dict(vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_embd=32), **kw})
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(15)
    run = root / "run"
    run.mkdir()
    shutil.copy(tokenizer_path, run / "tokenizer.json")
    save_checkpoint(run / "ckpt_best.pt", {"model": model.state_dict(), "model_config": to_dict(cfg),
                                           "train_config": {"doc_masking": doc_masking}, **(record or {}),
                                           "tokenizer_sha256": sha256_file(tokenizer_path)})
    return run, model


def ids(n: int = 20, vocab: int = 300, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.randint(2, vocab, (1, n - 1), generator=g)], 1)


# ------------------------------------------------------------------------------------------ files


def test_hf_files_names_shapes_dtypes(tmp_path, tokenizer_path):
    run, model = make_run(tmp_path, tokenizer_path)
    out = tmp_path / "hf"
    res = export(run, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(HF_FILES)
    assert res["architecture"] == "LlamaForCausalLM" and res["params"] == model.num_params()
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (32, 64, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 4, 8)
    assert c["vocab_size"] == model.cfg.vocab_size == 320 and c["max_position_embeddings"] == 32
    assert c["rms_norm_eps"] == model.blocks[0].norm1.eps == 1e-6
    assert c["tie_word_embeddings"] is True and c["hidden_act"] == "silu"
    assert c["attention_bias"] is False and c["mlp_bias"] is False and c["torch_dtype"] == "float32"
    assert c["bos_token_id"] == c["eos_token_id"] == 0 and c["pad_token_id"] == 1  # <|doc|>, <|pad|>
    assert c["minillm"]["train_config"] == {"doc_masking": True}
    with st.safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    assert "lm_head.weight" not in names  # tied: HF re-ties it
    assert len(names) == 2 + 2 * 9
    assert tensors["model.embed_tokens.weight"].shape == (320, 32)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (32, 32)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (64, 32)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.1.post_attention_layernorm.weight"].shape == (32,)
    assert tensors["model.norm.weight"].shape == (32,)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["model.layers.1.input_layernorm.weight"], model.blocks[1].norm1.weight)
    # the shipped tokenizer encodes as the run's for minillm, and prepends <|doc|> for transformers
    from tokenizers import Tokenizer

    from minillm.tokenizer import load_tokenizer
    text = "El rey dijo <|doc|> que"
    mine, shipped = load_tokenizer(tokenizer_path), load_tokenizer(out / "tokenizer.json")
    want = mine.encode(text, add_special_tokens=False).ids
    assert shipped.encode(text, add_special_tokens=False).ids == want and 0 not in want
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    raw.encode_special_tokens = True  # what transformers does with split_special_tokens (tokenizer_config)
    assert raw.encode(text).ids == [0, *want]
    assert mine.get_vocab() == shipped.get_vocab()
    assert c["minillm"]["source_tokenizer_sha256"] == sha256_file(tokenizer_path)
    assert c["minillm"]["tokenizer_sha256"] == sha256_file(out / "tokenizer.json")
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["bos_token"] == "<|doc|>"
    assert tc["eos_token"] == "<|doc|>" and tc["pad_token"] == "<|pad|>" and tc["model_max_length"] == 32
    assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"] == "<|doc|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_untied_gqa_qwen3_bias_and_bf16_names(tmp_path, tokenizer_path):
    run, _ = make_run(tmp_path, tokenizer_path, tie_embeddings=False, n_kv_head=2)
    export(run, tmp_path / "a", dtype="bf16")
    c = json.loads((tmp_path / "a" / "config.json").read_text())
    assert c["torch_dtype"] == "bfloat16" and c["num_key_value_heads"] == 2 and not c["tie_word_embeddings"]
    w = st.load_file(str(tmp_path / "a" / "model.safetensors"))
    assert w["lm_head.weight"].shape == (320, 32) and w["model.layers.0.self_attn.v_proj.weight"].shape == (16, 32)
    assert {t.dtype for t in w.values()} == {torch.bfloat16}

    q = tmp_path / "q"
    q.mkdir()
    run, _ = make_run(q, tokenizer_path, qk_norm=True)
    export(run, q / "hf")
    c = json.loads((q / "hf" / "config.json").read_text())
    assert c["architectures"] == ["Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    w = st.load_file(str(q / "hf" / "model.safetensors"))
    assert w["model.layers.1.self_attn.q_norm.weight"].shape == (8,) == w["model.layers.1.self_attn.k_norm.weight"].shape

    b = tmp_path / "b"
    b.mkdir()
    run, _ = make_run(b, tokenizer_path, bias=True)
    export(run, b / "hf")
    c = json.loads((b / "hf" / "config.json").read_text())
    assert c["attention_bias"] is True and c["mlp_bias"] is True
    w = st.load_file(str(b / "hf" / "model.safetensors"))
    assert w["model.layers.0.self_attn.o_proj.bias"].shape == (32,) and w["model.layers.0.mlp.up_proj.bias"].shape == (64,)


# -------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_round_trip_identical_logits(tmp_path, tokenizer_path, kw):
    run, model = make_run(tmp_path, tokenizer_path, **kw)
    x = ids()
    want = model(x)
    for fmt, out in (("hf", tmp_path / "hf"), ("safetensors", tmp_path / "w.safetensors")):
        export(run, out, fmt)
        assert is_exported(out)
        back, state = load_exported(out)
        assert back.cfg == model.cfg
        assert torch.equal(back(x), want), fmt
        shipped = out / "tokenizer.json" if fmt == "hf" else tokenizer_path
        assert state["tokenizer_sha256"] == sha256_file(shipped)
        assert state["train_config"]["doc_masking"] is True
    assert not is_exported(run)
    # an export can be exported again (and refuses to overwrite its own input)
    export(tmp_path / "hf", tmp_path / "hf2")
    assert torch.equal(load_exported(tmp_path / "hf2")[0](x), want)
    with pytest.raises(UsageError, match="holds the input"):
        export(tmp_path / "hf", tmp_path / "hf", overwrite=True)


# ------------------------------------------------------- HF Llama/Qwen3 math, re-implemented in torch


def hf_reference_logits(d: Path, x: torch.Tensor) -> torch.Tensor:
    """Llama/Qwen3 forward as transformers computes it, from config.json + model.safetensors alone:
    fp32 RMSNorm, rotate-half RoPE with inv_freq over the head dim, repeat_kv, causal softmax attention
    scaled by head_dim**-0.5, SwiGLU, re-tied lm_head."""
    c = json.loads((d / "config.json").read_text())
    w = st.load_file(str(d / "model.safetensors"))
    H, Hkv, D, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    T = x.size(1)

    def rms(h, g):
        return g * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    def lin(h, name):
        return F.linear(h, w[name + ".weight"], w.get(name + ".bias"))

    def rot(h):
        return torch.cat((-h[..., D // 2:], h[..., : D // 2]), dim=-1)

    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv_freq)] * 2, dim=-1)  # (T, D)
    cos, sin = emb.cos(), emb.sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    h = w["model.embed_tokens.weight"][x]  # (1, T, C)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(h, w[p + "input_layernorm.weight"])
        q = lin(a, p + "self_attn.q_proj").view(1, T, H, D)
        k = lin(a, p + "self_attn.k_proj").view(1, T, Hkv, D)
        v = lin(a, p + "self_attn.v_proj").view(1, T, Hkv, D).transpose(1, 2)
        if c["model_type"] == "qwen3":
            q, k = rms(q, w[p + "self_attn.q_norm.weight"]), rms(k, w[p + "self_attn.k_norm.weight"])
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5 + causal, dim=-1)
        h = h + lin((att @ v).transpose(1, 2).reshape(1, T, H * D), p + "self_attn.o_proj")
        m = rms(h, w[p + "post_attention_layernorm.weight"])
        h = h + lin(F.silu(lin(m, p + "mlp.gate_proj")) * lin(m, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms(h, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
    return h @ head.T


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_exported_tensors_under_hf_math_match(tmp_path, tokenizer_path, kw):
    run, model = make_run(tmp_path, tokenizer_path, **kw)
    export(run, tmp_path / "hf")
    x = ids(30)
    got = hf_reference_logits(tmp_path / "hf", x)
    base = (got - model(x)).abs().max().item()
    assert base < 1e-4, base
    # the reference is sensitive to what it checks: a half-swapped RoPE layout would not match
    q = "model.layers.0.self_attn.q_proj.weight"
    w = st.load_file(str(tmp_path / "hf" / "model.safetensors"))
    w[q] = w[q].view(4, 2, 4, 32).transpose(1, 2).reshape(32, 32)  # interleaved (GPT-J) layout
    st.save_file(w, str(tmp_path / "hf" / "model.safetensors"))
    swapped = (hf_reference_logits(tmp_path / "hf", x) - model(x)).abs().max().item()
    assert swapped > 1e-3 > 1000 * base, (base, swapped)


# ---------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,reason", [
    ({"norm": "layernorm", "mlp": "gelu", "bias": True}, "norm = layernorm.*mlp = gelu"),
    ({"mlp": "gelu"}, "mlp = gelu"),
    ({"qk_norm": True, "bias": True}, "Qwen3 has no MLP biases"),
])
def test_refuses_what_no_format_expresses(tmp_path, tokenizer_path, kw, reason):
    run, model = make_run(tmp_path, tokenizer_path, **kw)
    with pytest.raises(MiniLLMError, match=reason):
        export(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export(run, tmp_path / "w.safetensors", "safetensors")  # the raw weights still export and load back
    assert torch.equal(load_exported(tmp_path / "w.safetensors")[0](ids()), model(ids()))


def test_out_rules(tmp_path, tokenizer_path):
    run, model = make_run(tmp_path, tokenizer_path)
    out = tmp_path / "hf"
    out.mkdir()
    export(run, out)  # an empty directory is fine
    (out / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="--overwrite"):
        export(run, out)
    with pytest.raises(UsageError, match="stale.txt"):  # a file export did not write is never deleted
        export(run, out, overwrite=True)
    (out / "stale.txt").unlink()
    export(run, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(UsageError, match="holds the input"):
        export(run, tmp_path, overwrite=True)  # would delete the checkpoint itself
    with pytest.raises(UsageError, match=r"\*\.safetensors"):
        export(run, tmp_path / "w.bin", "safetensors")
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="--overwrite"):
        export(run, tmp_path / "w.safetensors", "safetensors")
    with pytest.raises(UsageError, match="--format"):
        export(run, tmp_path / "x", "onnx")
    with pytest.raises(UsageError, match="--dtype"):
        export(run, tmp_path / "y", dtype="fp8")
    assert not {"x", "y"} & {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_safetensors_names_the_extra(tmp_path, tokenizer_path, monkeypatch):
    run, _ = make_run(tmp_path, tokenizer_path)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(MiniLLMError, match=r"pip install 'minillm\[export\]'"):
        export(run, tmp_path / "hf")


def test_load_refuses_foreign_config(tmp_path, tokenizer_path):
    run, _ = make_run(tmp_path, tokenizer_path)
    export(run, tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    c = json.loads(cfg_path.read_text())
    for key, value, reason in (("intermediate_size", 96, "intermediate_size 96"),
                               ("rms_norm_eps", 1e-5, "rms_norm_eps"), ("model_type", "gpt2", "model_type")):
        cfg_path.write_text(json.dumps({**c, key: value}))
        with pytest.raises(MiniLLMError, match=reason):
            load_exported(tmp_path / "hf")


# -------------------------------------------------------------------------------------------- CLI


def test_cli_export_then_generate_and_evaluate(tmp_path, tokenizer_path, runner):
    from minillm.cli import app
    from tests.conftest import make_corpus

    run, _ = make_run(tmp_path, tokenizer_path)
    out = tmp_path / "hf"
    r = runner.invoke(app, ["export", "--ckpt", str(run), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["architecture"] == "LlamaForCausalLM"
    r = runner.invoke(app, ["export", "--ckpt", str(run), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = runner.invoke(app, ["export", "--ckpt", str(run), "--out", str(tmp_path / "w.safetensors"),
                            "--format", "safetensors"])
    assert r.exit_code == 0, r.output

    # generate and evaluate take the exports as --ckpt through the one loader (model.load.load_model); the
    # three must give the same text and the same loss
    gen = ["generate", "--prompt", "el rey", "--temperature", "0", "--max-tokens", "12", "--device", "cpu"]
    texts = []
    for ck in (run, out, tmp_path / "w.safetensors"):
        extra = ["--tokenizer", str(tokenizer_path)] if ck.suffix == ".safetensors" else []
        r = runner.invoke(app, [*gen, "--ckpt", str(ck), *extra])
        assert r.exit_code == 0, r.output
        texts.append(r.stdout)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("el rey")
    small = make_corpus(tmp_path / "small.txt", n_docs=3, words_per_doc=(20, 60))
    ev = ["evaluate", "--test-file", str(small), "--json", "--device", "cpu"]
    losses = []
    for ck in (run, out):
        r = runner.invoke(app, [*ev, "--ckpt", str(ck)])
        assert r.exit_code == 0, r.output
        losses.append(json.loads(r.stdout)["loss"])
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------ transformers


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformers_logits_and_greedy_tokens_match(tmp_path, tokenizer_path, kw):
    transformers = pytest.importorskip("transformers")
    from minillm.generation import generate
    from minillm.tokenizer import load_tokenizer

    run, model = make_run(tmp_path, tokenizer_path, **kw)
    export(run, tmp_path / "hf")
    dkey = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **{dkey: torch.float32}).eval()
    x = ids(24)
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff < 1e-4
    prompt = x[:, :6]
    want = generate(model, prompt[0].tolist(), 16, stop_id=0, temperature=0)
    with torch.no_grad():
        got = hf.generate(prompt, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(prompt))
    got = got[0, prompt.size(1):].tolist()
    assert got[:len(want)] == want and got[len(want):] in ([], [0])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tokenizer_path)
    text = "El rey dijo <|doc|> que"
    assert tok(text)["input_ids"] == [0, *ours.encode(text, add_special_tokens=False).ids]
