"""The exported formats' layout, and reading an export back (``read_exported``): all that loading an export
needs (``minillm.model.load``), so loading never imports the exporter.

- ``--format hf``: Llama (``LlamaForCausalLM``) or, for QK-norm models, Qwen3 (``Qwen3ForCausalLM``). No weight
  is permuted: our module layout is Hugging Face's (q/k laid out head by head, (B, H, T, D)) and our RoPE is
  HF's rotate-half with ``inv_freq = 1 / theta^(2i/D)`` over the whole head, so the layout is a renaming of
  keys (``name_map``) and a ``config.json`` (``hf_config``, read back by ``config_from_hf``).
- ``--format safetensors``: our own tensor names, the resolved config as JSON metadata.

``safetensors`` is an optional dependency (``pip install 'minillm[export]'``), imported lazily.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from minillm.checkpoint import checked_model_config, tensors_sha256
from minillm.config import ModelConfig, to_dict
from minillm.errors import MiniLLMError
from minillm.io import read_json

EXPORT_FORMAT = 1
WEIGHTS = "model.safetensors"
HF_FILES = ("config.json", WEIGHTS, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
ARCHS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def safetensors_torch():
    """``safetensors.torch``, or a ``MiniLLMError`` naming the extra to install."""
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise MiniLLMError("export needs the safetensors package: pip install 'minillm[export]' "
                           "(or pip install safetensors)") from e
    return st


# ------------------------------------------------------------------------------------ architecture


def arch_problems(cfg: ModelConfig) -> list[str]:
    """Every feature of ``cfg`` that neither Llama nor Qwen3 can express (empty: exportable)."""
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"norm = {cfg.norm} (Llama and Qwen3 use RMSNorm)")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp = {cfg.mlp} (Llama and Qwen3 use the gated SiLU MLP, swiglu)")
    if cfg.bias and cfg.qk_norm:
        problems.append("bias = true with qk_norm (Qwen3 has no MLP biases; Llama, which has them, has no QK-norm)")
    return problems


def hf_architecture(cfg: ModelConfig) -> str:
    """``llama`` or ``qwen3`` (QK-norm); raises ``MiniLLMError`` naming every feature neither can express."""
    problems = arch_problems(cfg)
    if problems:
        raise MiniLLMError("this model cannot be exported to a Hugging Face format: " + "; ".join(problems)
                           + ". Train with the default norm = rmsnorm, mlp = swiglu to export it.")
    return "qwen3" if cfg.qk_norm else "llama"


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state-dict names -> Hugging Face Llama/Qwen3 names (lm_head only when untied)."""
    m = {"tok_emb.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        m[ours + "norm1.weight"] = hf + "input_layernorm.weight"
        m[ours + "norm2.weight"] = hf + "post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for k in kinds:
                m[f"{ours}attn.{p}.{k}"] = f"{hf}self_attn.{p}.{k}"
        for p in ("gate_proj", "up_proj", "down_proj"):
            for k in kinds:
                m[f"{ours}mlp.{p}.{k}"] = f"{hf}mlp.{p}.{k}"
        if cfg.qk_norm:
            m[ours + "attn.q_norm.weight"] = hf + "self_attn.q_norm.weight"
            m[ours + "attn.k_norm.weight"] = hf + "self_attn.k_norm.weight"
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def to_hf_state_dict(sd: dict[str, Any], cfg: ModelConfig, dtype=None) -> dict[str, Any]:
    """Rename our state dict to HF names (tied lm_head dropped), cast to ``dtype``, contiguous copies."""
    m = name_map(cfg)
    expected = set(m) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unknown, missing = sorted(set(sd) - expected), sorted(set(m) - set(sd))
    if unknown or missing:
        raise MiniLLMError(f"cannot map the checkpoint to Hugging Face names: unexpected {unknown[:5]}, "
                           f"missing {missing[:5]}; export needs a checkpoint written by this minillm version")
    return {hf: sd[ours].detach().to(dtype or sd[ours].dtype).contiguous().clone() for ours, hf in m.items()}


def from_hf_state_dict(hf_sd: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """HF names back to ours; a tied model gets ``lm_head.weight`` = the embedding."""
    m = name_map(cfg)
    missing = sorted(hf for hf in m.values() if hf not in hf_sd)
    if missing:
        raise MiniLLMError(f"the exported weights lack {missing[:5]}; re-export the model with `minillm export`")
    sd = {ours: hf_sd[hf] for ours, hf in m.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def hf_config(cfg: ModelConfig, specials: dict[str, int], dtype: str, minillm: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` or ``Qwen3ForCausalLM``. ``specials``: doc/pad ids.

    RoPE is written both ways: ``rope_theta`` (transformers 4.x) and ``rope_parameters`` (5.x)."""
    from minillm.model.gpt import RMS_EPS

    arch = hf_architecture(cfg)
    c: dict[str, Any] = {
        "architectures": [ARCHS[arch]], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": RMS_EPS, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": specials["doc"], "eos_token_id": specials["doc"], "pad_token_id": specials["pad"],
        "torch_dtype": dtype, "dtype": dtype,
    }
    if arch == "llama":
        c.update(mlp_bias=cfg.bias, pretraining_tp=1)
    else:
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    c["minillm"] = minillm
    return c


def config_from_hf(c: dict[str, Any], where: str) -> ModelConfig:
    """Our ``ModelConfig`` from an HF ``config.json``; refuses anything our model would compute differently."""
    from minillm.model.gpt import RMS_EPS

    arch = c.get("model_type")
    problems = []
    if arch not in ARCHS:
        raise MiniLLMError(f"--ckpt: {where} has model_type {arch!r}; minillm loads only llama or qwen3 exports")
    n_embd, n_head = int(c["hidden_size"]), int(c["num_attention_heads"])
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c.get('hidden_act')!r} (minillm's MLP is SwiGLU, silu)")
    if abs(float(c.get("rms_norm_eps", RMS_EPS)) - RMS_EPS) > 1e-12:
        problems.append(f"rms_norm_eps {c.get('rms_norm_eps')} (minillm uses {RMS_EPS})")
    if int(c.get("head_dim") or n_embd // n_head) * n_head != n_embd:
        problems.append(f"head_dim {c.get('head_dim')} * {n_head} heads != hidden_size {n_embd}")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} (minillm has plain RoPE)")
    bias = bool(c.get("attention_bias", False))
    if bias != bool(c.get("mlp_bias", bias if arch == "llama" else False)):
        problems.append("attention_bias differs from mlp_bias (minillm has biases everywhere or nowhere)")
    if c.get("use_sliding_window"):
        problems.append("use_sliding_window (minillm attends to the whole context)")
    n_kv = int(c.get("num_key_value_heads") or n_head)
    theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    extra = (c.get("minillm") or {}).get("model_config", {})
    runtime = {k: extra[k] for k in ("dropout", "attention", "loss_chunk", "gradient_checkpointing", "norm_weight")
               if k in extra}
    cfg = ModelConfig(vocab_size=int(c["vocab_size"]), block_size=int(c["max_position_embeddings"]),
                      n_layer=int(c["num_hidden_layers"]), n_head=n_head, n_embd=n_embd,
                      n_kv_head=0 if n_kv == n_head else n_kv, rope_theta=theta, bias=bias,
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)), qk_norm=arch == "qwen3", **runtime)
    if int(c["intermediate_size"]) != cfg.mlp_hidden:
        problems.append(f"intermediate_size {c['intermediate_size']} (minillm's SwiGLU width for hidden_size "
                        f"{n_embd} is {cfg.mlp_hidden})")
    if problems:
        raise MiniLLMError(f"--ckpt: {where} is not a model minillm can run: " + "; ".join(problems))
    return cfg

# ------------------------------------------------------------------------------------------ reading


def is_exported(path: Path | str) -> bool:
    """True for an exported HF directory (holds model.safetensors) or a ``.safetensors`` file."""
    p = Path(path)
    return (p.is_dir() and (p / WEIGHTS).is_file()) or (p.is_file() and p.suffix == ".safetensors")


def read_exported(path: Path | str) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """An export's ``(config, our state dict, state)``: its tensors checked against their ``tensors_sha256``, its
    config bounded by them. ``state`` is like a checkpoint's: ``path`` (beside which ``tokenizer.json`` is looked
    for), ``model_config``, ``tokenizer_sha256`` and ``train_config`` (``doc_masking`` only)."""
    st = safetensors_torch()
    p = Path(path)
    weights = p / WEIGHTS if p.is_dir() else p
    if not weights.is_file():
        raise MiniLLMError(f"--ckpt: {weights} does not exist; give an exported directory or .safetensors file")
    try:
        with st.safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = st.load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise MiniLLMError(f"--ckpt: {weights} is not a readable safetensors file ({str(e)[:100]}); re-export it") from e
    if "tensors_sha256" in meta and meta["tensors_sha256"] != tensors_sha256(tensors):  # exports before it: none
        raise MiniLLMError(f"--ckpt: {weights} is corrupted (its tensors do not match the checksum stored in it); "
                           f"export it again from its run (minillm export --ckpt RUN)")
    where = f"--ckpt: {weights}"
    cfg_json = weights.parent / "config.json"
    if "model_config" in meta:  # --format safetensors: our names, our config
        cfg, sd = checked_model_config(_maybe_json(meta["model_config"]), tensors, where), tensors
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["tok_emb.weight"]
        info = {k: _maybe_json(v) for k, v in meta.items() if k not in ("format", "model_config")}
    elif cfg_json.is_file():
        hf = read_json(cfg_json, "re-export the model with `minillm export`")
        try:
            cfg = config_from_hf(hf, str(cfg_json))
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:
            raise MiniLLMError(f"--ckpt: cannot read {cfg_json}: {str(e)[:100]}; re-export the model") from e
        cfg = checked_model_config(to_dict(cfg), tensors, where)
        sd, info = from_hf_state_dict(tensors, cfg), hf.get("minillm") or {}
    else:
        raise MiniLLMError(f"--ckpt: {weights} has neither minillm metadata nor a config.json beside it; "
                           f"export it with `minillm export`")
    state = {"format": "export", "path": str(weights), "model_config": to_dict(cfg),
             "tokenizer_sha256": info.get("tokenizer_sha256"), "train_config": info.get("train_config") or {}}
    return cfg, sd, state


def _maybe_json(v: str) -> Any:
    with contextlib.suppress(ValueError):
        return json.loads(v)
    return v
