"""GGUF export (llama.cpp's format), read back with the ``gguf`` package's own reader: every tensor with its
llama.cpp name, shape, type and values; the architecture metadata; the vocabulary, merges, token types and
the padding tokens; a pure-torch re-implementation of llama.cpp's Llama and Qwen3 graphs (interleaved and
rotate-half RoPE) run on the file's tensors against our logits; q8_0/fp16/bf16; refusals; the SFT chat
template; the CLI. llama.cpp itself is checked by ``scripts/check_export_gguf.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.config import to_dict
from minillm.errors import MiniLLMError, UsageError
from minillm.io import sha256_file
from minillm.model.gpt import GPT

gguf = pytest.importorskip("gguf")  # in the dev extra: skipped only where minillm[gguf] is not installed

from minillm.export import export  # noqa: E402
from minillm.export.gguf import sft_chat_template  # noqa: E402

VARIANTS = {
    "llama": {},
    "llama-untied-gqa": {"tie_embeddings": False, "n_kv_head": 2},
    "qwen3-gqa": {"qk_norm": True, "n_kv_head": 2},
    "llama-bias": {"bias": True},
}


def make_run(root: Path, tokenizer_path: Path, seed: int = 0, record: dict | None = None, **kw) -> tuple[Path, GPT]:
    """``test_export.make_run``'s tiny model (perturbed norms and biases, large q/k weights, so a swapped norm,
    a dropped bias or a wrong RoPE layout shows in the logits), 64 wide, without document masking."""
    from tests.test_export import make_run as export_run

    return export_run(root, tokenizer_path, seed, record=record, doc_masking=False, **{"n_embd": 64, **kw})


def ids(n: int = 24, vocab: int = 300, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.randint(2, vocab, (1, n - 1), generator=g)], 1)


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


def tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (GGML type name, float32 values in PyTorch's (out, in) layout)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(a.copy()).reshape(tuple(reversed(t.shape.tolist()))))
    return out


# ------------------------------------------------------------------------------ llama.cpp's math


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, base: float, neox: bool) -> torch.Tensor:
    """llama.cpp's ggml_rope on x (T, H, D): mode NORM rotates the pairs (2i, 2i+1), mode NEOX the pairs
    (i, i + D/2), by the angle pos * base^(-2i/D)."""
    T, _, D = x.shape
    ang = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # (T, 1, D/2)
    x1, x2 = (x[..., : D // 2], x[..., D // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    return torch.cat((r1, r2), -1) if neox else torch.stack((r1, r2), -1).flatten(-2)


def llamacpp_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The logits llama.cpp's Llama (RoPE mode NORM) or Qwen3 (NEOX, per-head q/k norm) graph computes from
    the file's tensors and metadata, for one sequence x (1, T)."""
    f, W = fields(path), {k: v for k, (_, v) in tensors(path).items()}
    arch = f["general.architecture"]
    H, Hkv = f[f"{arch}.attention.head_count"], f[f"{arch}.attention.head_count_kv"]
    eps, base = f[f"{arch}.attention.layer_norm_rms_epsilon"], f[f"{arch}.rope.freq_base"]

    def lin(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    h = W["token_embd.weight"][x[0]]  # (T, C)
    T = h.shape[0]
    for i in range(f[f"{arch}.block_count"]):
        b = f"blk.{i}."
        a = rms(h, W[b + "attn_norm.weight"], eps)
        q, k, v = (lin(a, b + n).view(T, -1, f[f"{arch}.attention.key_length"]) for n in ("attn_q", "attn_k", "attn_v"))
        if arch == "qwen3":
            q, k = rms(q, W[b + "attn_q_norm.weight"], eps), rms(k, W[b + "attn_k_norm.weight"], eps)
        q, k = rope(q, base, arch == "qwen3"), rope(k, base, arch == "qwen3")
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # query head j reads kv head j // (H / Hkv)
        y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        h = h + lin(y.transpose(0, 1).reshape(T, -1), b + "attn_output")
        m = rms(h, W[b + "ffn_norm.weight"], eps)
        h = h + lin(F.silu(lin(m, b + "ffn_gate")) * lin(m, b + "ffn_up"), b + "ffn_down")
    out = W.get("output.weight", W["token_embd.weight"])
    return (rms(h, W["output_norm.weight"], eps) @ out.T)[None]


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_tensors_metadata_and_logits_under_llamacpp_math(tmp_path, tokenizer_path, kw):
    run, model = make_run(tmp_path, tokenizer_path, **kw)
    out = tmp_path / "m.gguf"
    res = export(run, out, "gguf", dtype="fp32")
    cfg, sd = model.cfg, model.state_dict()
    arch = "qwen3" if cfg.qk_norm else "llama"
    f, T = fields(out), tensors(out)
    assert res["architecture"] == f["general.architecture"] == arch and res["params"] == model.num_params()
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert (f[f"{arch}.context_length"], f[f"{arch}.embedding_length"], f[f"{arch}.feed_forward_length"]) == (32, 64, 192)
    assert (f[f"{arch}.block_count"], f[f"{arch}.attention.head_count"]) == (2, 4)
    assert f[f"{arch}.attention.head_count_kv"] == cfg.kv_heads and f[f"{arch}.attention.key_length"] == 16
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert f[f"{arch}.rope.freq_base"] == 10000.0 and f[f"{arch}.vocab_size"] == cfg.vocab_size
    assert json.loads(f["minillm.model_config"]) == to_dict(cfg)
    # every weight once, under llama.cpp's name, in F32 and bit-exact (q/k of Llama in interleaved RoPE order)
    per_layer = {"attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    per_layer |= {"attn_q_norm", "attn_k_norm"} if cfg.qk_norm else set()
    names = {f"blk.{i}.{n}.{k}" for i in range(2) for n in per_layer
             for k in (("weight", "bias") if cfg.bias and "norm" not in n else ("weight",))}
    names |= {"token_embd.weight", "output_norm.weight"} | (set() if cfg.tie_embeddings else {"output.weight"})
    assert set(T) == names and all(t == "F32" for t, _ in T.values())
    assert T["token_embd.weight"][1].shape == (cfg.vocab_size, 64)
    assert torch.equal(T["blk.1.ffn_down.weight"][1], sd["blocks.1.mlp.down_proj.weight"])
    assert torch.equal(T["blk.0.attn_v.weight"][1], sd["blocks.0.attn.v_proj.weight"])
    for proj, heads in (("q", cfg.n_head), ("k", cfg.kv_heads)):
        ours = sd[f"blocks.0.attn.{proj}_proj.weight"].view(heads, 2, 8, 64)  # (head, half, i, in)
        want = ours if arch == "qwen3" else ours.transpose(1, 2)  # rows h*16 + 2i + half
        assert torch.equal(T[f"blk.0.attn_{proj}.weight"][1], want.reshape(heads * 16, 64)), proj
    if not cfg.tie_embeddings:
        assert torch.equal(T["output.weight"][1], sd["lm_head.weight"])
    x = ids(vocab=cfg.vocab_size)
    with torch.no_grad():
        ours = model(x)
        diff = (llamacpp_logits(out, x) - ours).abs().max().item()
    assert diff < 1e-4 * max(1.0, ours.abs().max().item()), diff


def test_vocabulary_merges_types_and_padding_tokens(tmp_path, tokenizer_path):
    from minillm.tokenizer import load_tokenizer

    run, model = make_run(tmp_path, tokenizer_path)
    out = tmp_path / "m.gguf"
    res = export(run, out, "gguf")
    f, tok = fields(out), load_tokenizer(tokenizer_path)
    n, V = tok.get_vocab_size(), model.cfg.vocab_size
    assert n < V and res["unused_tokens"] == V - n  # the embedding has rows past the tokenizer
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == V == res["vocab"]
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, V)]
    T = gguf.TokenType
    assert types[n:] == [T.UNUSED] * (V - n)
    assert types[:2] == [T.CONTROL, T.CONTROL] and tokens[:2] == ["<|doc|>", "<|pad|>"]
    assert set(types[2:n]) == {T.NORMAL}
    merges = json.loads(tokenizer_path.read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges] and merges
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    doc, pad = tok.token_to_id("<|doc|>"), tok.token_to_id("<|pad|>")
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.eot_token_id"] == doc
    assert f["tokenizer.ggml.padding_token_id"] == pad
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.chat_template" not in f  # a pretrained model has no prompt template
    assert f["minillm.source_tokenizer_sha256"] == sha256_file(tokenizer_path)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "q8_0"])
def test_dtypes_keep_norms_in_f32_and_values_close(tmp_path, tokenizer_path, dtype):
    run, model = make_run(tmp_path, tokenizer_path, tie_embeddings=False)
    ref, out = tmp_path / "f32.gguf", tmp_path / f"{dtype}.gguf"
    export(run, ref, "gguf", dtype="fp32")
    res = export(run, out, "gguf", dtype=dtype)
    qname = {"fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    T, R = tensors(out), tensors(ref)
    for name, (t, v) in T.items():
        assert t == ("F32" if name.endswith("norm.weight") else qname), name
        w = R[name][1]
        assert v.shape == w.shape and (v - w).abs().max() <= {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 5e-3}[t] * (
            1 + w.abs().max()), name
    assert res["dtype"] == dtype and res["tensor_types"] == {"F32": 5, qname: 16}
    assert fields(out)["general.file_type"] == {"fp16": 1, "bf16": 32, "q8_0": 7}[dtype]
    x = ids(vocab=model.cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x), llamacpp_logits(out, x)
    loss = F.cross_entropy(ours[0, :-1], x[0, 1:])
    assert abs(F.cross_entropy(theirs[0, :-1], x[0, 1:]) - loss) < 0.02 * loss


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path, tokenizer_path):
    run, _ = make_run(tmp_path, tokenizer_path, n_embd=48, n_head=3)  # rows of 48: not a whole number of blocks
    res = export(run, tmp_path / "m.gguf", "gguf", dtype="q8_0")
    T = tensors(tmp_path / "m.gguf")
    assert T["blk.0.attn_q.weight"][0] == "F16" and T["blk.0.ffn_down.weight"][0] == "Q8_0"  # ffn rows: 128
    assert res["tensor_types"]["F16"] > 0


# ---------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,reason", [
    ({"norm": "layernorm", "mlp": "gelu", "bias": True}, "norm = layernorm.*mlp = gelu"),
    ({"qk_norm": True, "bias": True}, "Qwen3 has no MLP biases"),
])
def test_refuses_models_llamacpp_cannot_run_naming_the_alternative(tmp_path, tokenizer_path, kw, reason):
    run, _ = make_run(tmp_path, tokenizer_path, **kw)
    with pytest.raises(MiniLLMError, match=f"llama.cpp has no architecture for this model: .*{reason}.*--format safetensors"):
        export(run, tmp_path / "m.gguf", "gguf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".gguf"]


@pytest.mark.parametrize("model,reason", [("unigram", "Unigram"), ("wordpiece", "punctuation")])
def test_refuses_unigram_and_wordpiece_tokenizers(tmp_path, corpus, model, reason):
    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    tok_path = tmp_path / "tok.json"
    save_tokenizer(train_tokenizer(iter_documents(corpus), 300, model=model), tok_path)
    run, _ = make_run(tmp_path, tok_path)
    with pytest.raises(MiniLLMError, match=f"{reason}.*--format hf"):
        export(run, tmp_path / "m.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_a_bpe_tokenizer_llamacpp_would_encode_differently(tmp_path, tokenizer_path):
    j = json.loads(tokenizer_path.read_text())
    j["normalizer"] = {"type": "Lowercase"}  # llama.cpp's gpt2 tokenizer has no normalizer: "Hola" would differ
    tok_path = tmp_path / "lower.json"
    tok_path.write_text(json.dumps(j))
    run, _ = make_run(tmp_path, tok_path)
    with pytest.raises(MiniLLMError, match="not the byte-level BPE.*--format hf"):
        export(run, tmp_path / "m.gguf", "gguf")


def test_out_rules_and_an_old_file_survives_a_failure(tmp_path, tokenizer_path, monkeypatch):
    from minillm.export import gguf as gguf_export
    run, _ = make_run(tmp_path, tokenizer_path)
    out = tmp_path / "m.gguf"
    with pytest.raises(UsageError, match=r"\*\.gguf"):
        export(run, tmp_path / "m.bin", "gguf")
    with pytest.raises(UsageError, match="--dtype.*q8_0"):
        export(run, out, "gguf", dtype="q4")
    with pytest.raises(UsageError, match="--dtype"):
        export(run, tmp_path / "hf", "hf", dtype="q8_0")  # q8_0 is for GGUF only
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        export(run, tmp_path / "d.gguf", "gguf")
    export(run, out, "gguf")
    old = out.read_bytes()
    with pytest.raises(UsageError, match="--overwrite"):
        export(run, out, "gguf", dtype="q8_0")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "encode_tensor", boom)
    with pytest.raises(MiniLLMError, match="no space left on .* while writing .*m.gguf; the previous file"):
        export(run, out, "gguf", dtype="q8_0", overwrite=True)
    assert out.read_bytes() == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    monkeypatch.undo()
    export(run, out, "gguf", dtype="q8_0", overwrite=True)
    assert out.read_bytes() != old and fields(out)["general.file_type"] == 7


def test_missing_gguf_names_the_extra(tmp_path, tokenizer_path, monkeypatch):
    run, _ = make_run(tmp_path, tokenizer_path)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MiniLLMError, match=r"pip install 'minillm\[gguf\]'"):
        export(run, tmp_path / "m.gguf", "gguf")


# ------------------------------------------------------------------------------------------ SFT + CLI


def test_chat_template_renders_the_sft_training_text():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from minillm.data.sft import format_example

    for env in (jinja2.Environment(), ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)):
        _renders_training_text(env.from_string(sft_chat_template()), format_example)  # the second: transformers'


def _renders_training_text(tmpl, format_example) -> None:
    for msgs in ([{"role": "user", "content": "suma 3 y 4"}, {"role": "assistant", "content": "7"}],
                 [{"role": "system", "content": "Eres breve."}, {"role": "user", "content": "hola"},
                  {"role": "assistant", "content": "hola amigo"}, {"role": "user", "content": "¿y tú?"},
                  {"role": "assistant", "content": "bien"}]):
        trained = "".join(text for text, _ in format_example({"messages": msgs}).segments)
        assert tmpl.render(messages=msgs) == trained
        prompt = "".join(text for text, _ in format_example({"messages": msgs}).segments[:-1])
        assert tmpl.render(messages=msgs[:-1], add_generation_prompt=True) == prompt  # ends "### Response:\n"
        assert prompt.endswith("### Response:\n")


@pytest.mark.slow
def test_cli_sft_run_and_merged_adapter_carry_the_template(tmp_path, corpus, tokenizer_path, runner, no_plots):
    from minillm.cli import app

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"suma {a} y {b}", "response": str(a + b)}) + "\n"
                           for a in range(1, 5) for b in range(1, 5)), encoding="utf-8")
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--device", "cpu",
            "--compile", "off", "--batch-size", "4", "--eval-batches", "1", "--log-every", "1"]
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", str(tmp_path / "base"),
                            "--max-steps", "2", *tiny])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["finetune", "--ckpt", str(tmp_path / "base"), "--data", str(sft), "-o",
                            str(tmp_path / "sft"), "--mode", "sft", "--lora-rank", "2", "--max-steps", "2",
                            "--device", "cpu", "--batch-size", "4", "--eval-batches", "1"])
    assert r.exit_code == 0, r.output
    cases = {"base": ([str(tmp_path / "base")], None),
             "sft": ([str(tmp_path / "sft")], sft_chat_template()),
             "merged": ([str(tmp_path / "base"), "--adapter", str(tmp_path / "sft" / "adapter.pt")], sft_chat_template())}
    for name, (ckpt, template) in cases.items():
        out = tmp_path / f"{name}.gguf"
        r = runner.invoke(app, ["export", "--ckpt", *ckpt, "--format", "gguf", "--dtype", "q8_0", "--out", str(out),
                                "--json"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["dtype"] == "q8_0" and res["architecture"] == "llama" and res["chat_template"] is (template is not None)
        f = fields(out)
        assert f.get("tokenizer.chat_template") == template, name
        assert f.get("minillm.finetune_mode") == (None if template is None else "sft"), name
    r = runner.invoke(app, ["export", "--ckpt", str(tmp_path / "base"), "--format", "hf", "--dtype", "q8_0",
                            "--out", str(tmp_path / "hf")])
    assert r.exit_code == 2 and "--dtype" in r.stderr and "Traceback" not in r.stderr
