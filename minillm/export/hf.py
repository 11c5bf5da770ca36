"""Export to the Hugging Face ecosystem (``--format hf``) and to one ``.safetensors`` file.

``export_hf`` writes a directory that ``transformers`` loads offline (``AutoModelForCausalLM`` and
``AutoTokenizer``): ``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``
(the run's, plus a post-processor that prepends ``<|doc|>``), ``tokenizer_config.json`` and
``special_tokens_map.json``.

- Default models -> Llama format (``LlamaForCausalLM``); models with QK-norm -> Qwen3 format
  (``Qwen3ForCausalLM``, per-head ``q_norm``/``k_norm``). Biases -> Llama's ``attention_bias`` and
  ``mlp_bias`` (Llama only). LayerNorm and GELU models have no such format and are refused.
- The names and the config are ``minillm.export.layout``'s: export is a renaming of keys. Our RMSNorm eps
  (``model.RMS_EPS``) is written as ``rms_norm_eps``.
- ``<|doc|>`` is both BOS and EOS (every document starts with it; a model that emits it has ended the
  document), ``<|pad|>`` is the padding token. transformers (5.x) ignores ``add_bos_token`` when a
  ``tokenizer.json`` exists, so the exported ``tokenizer.json`` carries a ``TemplateProcessing`` post-processor
  that prepends ``<|doc|>``; minillm always encodes with ``add_special_tokens=False``, so for minillm the
  file encodes exactly as the run's (its sha256 differs; the export records both).

``export_safetensors`` writes the weights alone (minillm's own tensor names) with the resolved config as
JSON metadata. ``minillm.model.load`` loads either back, so ``--ckpt`` can take an export.
Every write goes to a temporary directory or file that is renamed into place at the end; ``--overwrite``
replaces only a directory that is an export minillm wrote (``not_our_export``), never one holding other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from minillm.checkpoint import tensors_sha256
from minillm.config import ModelConfig, to_dict
from minillm.errors import MiniLLMError, UsageError
from minillm.export.layout import (
    ARCHS,
    EXPORT_FORMAT,
    HF_FILES,
    WEIGHTS,
    hf_architecture,
    hf_config,
    safetensors_torch,
    to_hf_state_dict,
)
from minillm.io import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    make_temp_dir,
    read_json,
    sha256_file,
    write_error,
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def is_export_config(c: dict[str, Any]) -> bool:
    """True for an HF ``config.json`` minillm wrote (any version): it holds the ``minillm`` block."""
    block = c.get("minillm")
    return isinstance(block, dict) and isinstance(block.get("format"), int) and isinstance(block.get("model_config"), dict)


def not_our_export(d: Path) -> str | None:
    """Why directory ``d`` is not an HF export minillm wrote, or None when it is one (its ``config.json`` has our
    block and it holds nothing but the files an export writes)."""
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
    mask = current_umask()
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
    from minillm.tokenizer import load_tokenizer

    arch = hf_architecture(cfg)
    st = safetensors_torch()
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
    st = safetensors_torch()
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
    return {**meta, "tensors_sha256": tensors_sha256(tensors)}
