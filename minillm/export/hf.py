"""Export to the Hugging Face ecosystem, and loading an export back.

``export_hf`` writes a directory that ``transformers`` loads offline (``AutoModelForCausalLM`` and
``AutoTokenizer``): ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``
(the run's, plus a post-processor that prepends ``<|doc|>``), ``tokenizer_config.json`` and
``special_tokens_map.json``.

- Default models -> Llama format (``LlamaForCausalLM``); models with QK-norm -> Qwen3 format
  (``Qwen3ForCausalLM``, per-head ``q_norm``/``k_norm``). Biases -> Llama's ``attention_bias`` and
  ``mlp_bias`` (Llama only). LayerNorm and GELU models have no such format and are refused.
- No weight is permuted: our module layout is Hugging Face's (q/k laid out head by head, (B, H, T, D)) and
  our RoPE is HF's rotate-half with ``inv_freq = 1 / theta^(2i/D)`` over the whole head, so export is a
  renaming of keys. Our RMSNorm eps (``model.RMS_EPS``) is written as ``rms_norm_eps``.
- ``<|doc|>`` is both BOS and EOS (every document starts with it; a model that emits it has ended the
  document), ``<|pad|>`` is the padding token. transformers (5.x) ignores ``add_bos_token`` when a
  ``tokenizer.json`` exists, so the exported ``tokenizer.json`` carries a ``TemplateProcessing`` post-processor
  that prepends ``<|doc|>``; minillm always encodes with ``add_special_tokens=False``, so for minillm the
  file encodes exactly as the run's (its sha256 differs; the export records both).

``export_safetensors`` writes the weights alone (minillm's own tensor names) with the resolved config as
JSON metadata. ``load_exported`` rebuilds our ``GPT`` from either, so ``--ckpt`` can take an export.
Every write goes to a temporary directory or file that is renamed into place at the end; ``--overwrite``
replaces only a directory that is an export minillm wrote (``not_our_export``), never one holding other files.

``safetensors`` is an optional dependency (``pip install 'minillm[export]'``), imported lazily.
``--format gguf`` (llama.cpp) is ``minillm.export.gguf``, reached through ``export``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig, to_dict
from minillm.errors import MiniLLMError, UsageError

EXPORT_FORMAT = 1
WEIGHTS = "model.safetensors"
HF_FILES = ("config.json", WEIGHTS, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ARCHS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _safetensors_torch():
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
    runtime = {k: extra[k] for k in ("dropout", "attention", "loss_chunk", "gradient_checkpointing") if k in extra}
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


# ------------------------------------------------------------------------------------------ writing


def is_export_config(c: dict[str, Any]) -> bool:
    """True for an HF ``config.json`` minillm wrote (any version): it holds the ``minillm`` block."""
    block = c.get("minillm")
    return isinstance(block, dict) and isinstance(block.get("format"), int) and isinstance(block.get("model_config"), dict)


def not_our_export(d: Path) -> str | None:
    """Why directory ``d`` is not an HF export minillm wrote, or None when it is one (its ``config.json`` has our
    block and it holds nothing but the files an export writes)."""
    from minillm.train.rundir import read_json

    cfg = d / "config.json"
    if not cfg.is_file():
        return "it has no config.json"
    fix = f"--overwrite replaces only an export minillm wrote: choose a new --out, or remove {d} yourself"
    if not is_export_config(read_json(cfg, fix)):
        return f"{cfg} has no minillm block"
    extra = sorted(p.name for p in d.iterdir() if p.name not in HF_FILES)
    return f"it also holds {', '.join(extra[:5])}, which export does not write" if extra else None


def _check_out(out: Path, overwrite: bool, inputs: list[Path], kind: str) -> None:
    """Refuse an existing non-empty ``--out`` without ``--overwrite``, any ``--out`` holding an input, and an
    ``--overwrite`` of a directory that is not an export minillm wrote (it would be deleted)."""
    out_abs = out.resolve()
    for p in inputs:
        p = p.resolve()
        if p == out_abs or out_abs in p.parents:
            raise UsageError(f"--out {out} holds the input {p}; export to another path")
    if not out.exists():
        return
    if kind == "dir" and not out.is_dir():
        raise UsageError(f"--out {out} is a file; --format hf writes a directory, give a new path")
    if kind == "file" and out.is_dir():
        raise UsageError(f"--out {out} is a directory; --format safetensors writes one file, e.g. {out / WEIGHTS}")
    if kind == "dir" and not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"--out {out} already exists and is not empty; choose a new path or pass --overwrite")
    if kind == "dir" and (why := not_our_export(out)):
        raise UsageError(f"--out {out} is not an export minillm wrote ({why}); --overwrite replaces only such a "
                         f"directory, so nothing was touched: choose a new --out, or move those files away")


def _commit_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``, replacing an old ``out`` only once ``tmp`` is complete."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old.")) / "old"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _fix_modes(d: Path) -> None:
    """Give the directory and its files the usual modes (mkdtemp makes a private 0700 directory)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _specials(tok) -> dict[str, Any]:
    from minillm.tokenizer import DOC, PAD, UNK, doc_id, pad_id

    s = {"doc": doc_id(tok), "pad": pad_id(tok), "doc_token": DOC,
         "pad_token": PAD if tok.token_to_id(PAD) is not None else DOC}
    if tok.token_to_id(UNK) is not None:
        s["unk_token"] = UNK
    return s


def hf_tokenizer_json(path: Path, doc_token: str, doc: int) -> str:
    """The run's tokenizer with a post-processor prepending ``<|doc|>`` (applied only with
    ``add_special_tokens=True``, which transformers uses by default and minillm never does)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(path))
    bos = processors.TemplateProcessing(single=f"{doc_token} $A", pair=f"{doc_token} $A {doc_token} $B:1",
                                        special_tokens=[(doc_token, doc)])
    tok.post_processor = bos if tok.post_processor is None else processors.Sequence([tok.post_processor, bos])
    return tok.to_str(pretty=False)


def _tokenizer_files(s: dict[str, Any], block_size: int) -> tuple[dict, dict]:
    special_map = {"bos_token": s["doc_token"], "eos_token": s["doc_token"], "pad_token": s["pad_token"]}
    if "unk_token" in s:
        special_map["unk_token"] = s["unk_token"]
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map,
               "add_bos_token": True, "add_eos_token": False, "model_max_length": block_size,
               "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    return tok_cfg, special_map


def _resolve_dtype(name: str, sd: dict[str, Any]):
    import torch

    if name == "auto":
        return next(iter(sd.values())).dtype
    if name not in DTYPES:
        raise UsageError(f"--dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def export_hf(model_sd: dict[str, Any], cfg: ModelConfig, tokenizer: Path, out: Path, *, overwrite: bool = False,
              dtype: str = "auto", minillm: dict[str, Any] | None = None, inputs: tuple[Path, ...] = ()) -> dict:
    """Write a Hugging Face directory at ``out`` from our state dict; returns a summary."""
    from minillm.checkpoint import (
        atomic_write_json,
        atomic_write_text,
        make_temp_dir,
        sha256_file,
        write_error,
    )
    from minillm.tokenizer import load_tokenizer

    arch = hf_architecture(cfg)
    st = _safetensors_torch()
    _check_out(out, overwrite, [tokenizer, *inputs], "dir")
    tok = load_tokenizer(tokenizer)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise MiniLLMError(f"--tokenizer {tokenizer} has {tok.get_vocab_size()} tokens but the model only "
                           f"{cfg.vocab_size}; use the run's own tokenizer.json")
    tdt = _resolve_dtype(dtype, model_sd)
    dname = str(tdt).removeprefix("torch.")
    tensors = to_hf_state_dict(model_sd, cfg, tdt)
    s = _specials(tok)
    tok_json = hf_tokenizer_json(tokenizer, s["doc_token"], s["doc"])
    info = {"format": EXPORT_FORMAT, "model_config": to_dict(cfg), **(minillm or {}),
            "tokenizer_sha256": hashlib.sha256(tok_json.encode("utf-8")).hexdigest(),
            "source_tokenizer_sha256": sha256_file(tokenizer)}
    tok_cfg, special_map = _tokenizer_files(s, cfg.block_size)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out)
    except OSError as e:
        raise write_error(out, e, "check the directory exists and is writable") from e
    try:
        st.save_file(tensors, str(tmp / WEIGHTS), metadata=_weights_metadata(tensors, {"format": "pt"}))
        atomic_write_json(tmp / "config.json", hf_config(cfg, s, dname, info))
        atomic_write_json(tmp / "generation_config.json", {
            "bos_token_id": s["doc"], "eos_token_id": s["doc"], "pad_token_id": s["pad"]})
        atomic_write_text(tmp / "tokenizer.json", tok_json)
        atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
        atomic_write_json(tmp / "special_tokens_map.json", special_map)
        _fix_modes(tmp)
        _commit_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e if isinstance(e, OSError) else e.__cause__  # atomic_open wraps its OSError in a MiniLLMError
        if isinstance(cause, OSError):
            raise write_error(out, cause, "the previous export, if any, is intact") from e
        raise
    return {"out": str(out), "format": "hf", "architecture": ARCHS[arch], "dtype": dname,
            "tensors": len(tensors), "params": sum(t.numel() for t in tensors.values()), "files": list(HF_FILES)}


def export_safetensors(model_sd: dict[str, Any], cfg: ModelConfig, out: Path, *, overwrite: bool = False,
                       dtype: str = "auto", minillm: dict[str, Any] | None = None,
                       inputs: tuple[Path, ...] = ()) -> dict:
    """Write our weights (minillm names; a tied lm_head stored once) to one ``.safetensors`` file whose
    metadata holds the resolved config as JSON strings (safetensors metadata is str -> str)."""
    from minillm.checkpoint import atomic_open

    st = _safetensors_torch()
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: --format safetensors writes one file; name it *.safetensors")
    _check_out(out, overwrite, list(inputs), "file")
    tdt = _resolve_dtype(dtype, model_sd)
    sd = {k: v for k, v in model_sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    tensors = {k: v.detach().to(tdt).contiguous().clone() for k, v in sd.items()}
    meta = {"format": "pt", "minillm_format": str(EXPORT_FORMAT), "model_config": json.dumps(to_dict(cfg))}
    for k, v in (minillm or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    data = st.save(tensors, metadata=_weights_metadata(tensors, meta))
    with atomic_open(out, "wb") as f:
        f.write(data)
    return {"out": str(out), "format": "safetensors", "dtype": str(tdt).removeprefix("torch."),
            "tensors": len(tensors), "params": sum(t.numel() for t in tensors.values()), "files": [out.name]}


def _weights_metadata(tensors: dict[str, Any], meta: dict[str, str]) -> dict[str, str]:
    """A safetensors file's metadata plus ``tensors_sha256`` of its tensors, which ``load_exported`` verifies."""
    from minillm.checkpoint import tensors_sha256

    return {**meta, "tensors_sha256": tensors_sha256(tensors)}


# ------------------------------------------------------------------------------------------ loading


def is_exported(path: Path | str) -> bool:
    """True for an exported HF directory (holds model.safetensors) or a ``.safetensors`` file."""
    p = Path(path)
    return (p.is_dir() and (p / WEIGHTS).is_file()) or (p.is_file() and p.suffix == ".safetensors")


def load_exported(path: Path | str, device: str = "cpu"):
    """Rebuild our ``GPT`` (eval mode) from an export. Returns ``(model, state)`` like
    ``checkpoint.load_model``: ``state`` has ``path`` (beside which ``tokenizer.json`` is looked for),
    ``model_config``, ``tokenizer_sha256`` and ``train_config`` (``doc_masking`` only)."""
    from minillm.checkpoint import checked_model_config, tensors_sha256
    from minillm.model.gpt import GPT

    st = _safetensors_torch()
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
        from minillm.train.rundir import read_json

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
    model = GPT(cfg)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise MiniLLMError(f"--ckpt: {weights} does not match its own config: {str(e)[:200]}") from e
    state = {"format": "export", "path": str(weights), "model_config": to_dict(cfg),
             "tokenizer_sha256": info.get("tokenizer_sha256"), "train_config": info.get("train_config") or {}}
    return model.to(device).eval(), state


def _maybe_json(v: str) -> Any:
    with contextlib.suppress(ValueError):
        return json.loads(v)
    return v


def load_any(ckpt: Path | str, device: str = "cpu"):
    """A checkpoint, run directory or export -> ``(model, state)``."""
    if is_exported(ckpt):
        return load_exported(ckpt, device)
    from minillm.checkpoint import load_model

    return load_model(ckpt, device)


def export(ckpt: Path, out: Path, fmt: str = "hf", *, tokenizer: Path | None = None, force_tokenizer: bool = False,
           overwrite: bool = False, dtype: str = "auto") -> dict:
    """Load ``ckpt`` (checkpoint, run directory or an earlier export) and export it as ``fmt``."""
    from minillm.checkpoint import resolve_tokenizer

    if fmt not in ("hf", "safetensors", "gguf"):
        raise UsageError(f"--format: {fmt!r} is not one of hf, safetensors, gguf")
    if fmt == "gguf":
        from minillm.export.gguf import export_gguf, finetune_mode, require_gguf

        require_gguf()
    else:
        _safetensors_torch()
    model, state = load_any(ckpt, "cpu")
    extra = {"tokenizer_sha256": state.get("tokenizer_sha256"),
             "train_config": {"doc_masking": bool((state.get("train_config") or {}).get("doc_masking", False))}}
    if "run_state" in state:
        extra["step"] = state["run_state"].get("step")
    inputs = (Path(state["path"]),)
    if fmt == "safetensors":
        tok = resolve_tokenizer(state, tokenizer, force_tokenizer) if tokenizer else None
        if tok is not None:
            from minillm.checkpoint import sha256_file

            extra["tokenizer_sha256"] = sha256_file(tok)
        return export_safetensors(model.state_dict(), model.cfg, out, overwrite=overwrite, dtype=dtype,
                                  minillm=extra, inputs=inputs)
    tok = resolve_tokenizer(state, tokenizer, force_tokenizer)
    if fmt == "gguf":
        return export_gguf(model.state_dict(), model.cfg, tok, out, overwrite=overwrite, dtype=dtype,
                           minillm={k: v for k, v in extra.items() if k != "tokenizer_sha256"},
                           mode=finetune_mode(state), inputs=inputs)
    return export_hf(model.state_dict(), model.cfg, tok, out, overwrite=overwrite, dtype=dtype,
                     minillm={k: v for k, v in extra.items() if k != "tokenizer_sha256"}, inputs=inputs)
