"""Export to GGUF, the single-file format of llama.cpp (and of the tools built on it: Ollama, LM Studio).

The file is written by the ``gguf`` package's own ``GGUFWriter`` (ggml's Python writer; an optional extra,
``pip install 'minillm[gguf]'``), never by packing bytes here. What maps to what:

- Architecture: the one ``export.hf_architecture`` picks -- ``llama``, or ``qwen3`` for QK-norm models
  (llama.cpp's Llama graph has no per-head query/key norm; its Qwen3 graph applies them before RoPE, as we
  do). Models neither can express (LayerNorm, GELU, biases with QK-norm) are refused.
- Tensors: our state dict is renamed to Hugging Face names (``export.to_hf_state_dict``), then to
  llama.cpp's names by gguf's own ``TensorNameMap``. llama.cpp runs Llama with interleaved ("normal") RoPE
  and Qwen3 with rotate-half ("neox") RoPE; ours is rotate-half, so for Llama only the rows of q_proj and
  k_proj (weights and biases) are permuted head by head, exactly as llama.cpp's converter does.
- Dtypes: 1-D tensors and norms stay F32 (llama.cpp needs them so); matrices become F32, F16, BF16 or Q8_0
  (a matrix whose rows are not a multiple of 32 falls back to F16 under q8_0, as in llama.cpp's converter).
- Tokenizer: our byte-level BPE as llama.cpp's ``gpt2`` tokenizer with the ``gpt-2`` pre-tokenizer (the
  same regex as the ``tokenizers`` ByteLevel pre-tokenizer), the vocabulary, merges and token types
  (special tokens CONTROL, so they are never matched inside text unless special-token parsing is on).
  ``<|doc|>`` is BOS (added at the start, like ``generate``), EOS and EOT; ``<|pad|>`` is padding. The
  embedding has ``vocab_size`` rows (padded to a multiple of 64) and llama.cpp wants one token per row:
  the rows past the tokenizer get UNUSED tokens ``[PAD<id>]``. Unigram and WordPiece are refused.
- An SFT model (a checkpoint of ``finetune --mode sft``, or a merge of such an adapter) gets the prompt
  template it was trained with as ``tokenizer.chat_template`` (Jinja).
- ``minillm.*`` keys record the model config, the step and the tokenizer's sha256.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig, to_dict
from minillm.errors import MiniLLMError, UsageError

GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0")
PAD_TOKEN = "[PAD{}]"  # llama.cpp's converter names unused embedding rows so


def require_gguf():
    """The ``gguf`` module, or a ``MiniLLMError`` naming the extra to install."""
    try:
        import gguf
    except ImportError as e:
        raise MiniLLMError("--format gguf needs the gguf package: pip install 'minillm[gguf]' "
                           "(or pip install gguf)") from e
    return gguf


# ------------------------------------------------------------------------------------ architecture


def gguf_architecture(cfg: ModelConfig) -> str:
    """``llama`` or ``qwen3``; refuses models llama.cpp has no architecture for, naming the alternative."""
    from minillm.export.layout import arch_problems

    problems = arch_problems(cfg)
    if problems:
        raise MiniLLMError("--format gguf: llama.cpp has no architecture for this model: " + "; ".join(problems)
                           + ". Export it with --format safetensors (minillm's own format) instead; llama.cpp "
                             "runs models with norm = rmsnorm, mlp = swiglu, and biases only without qk_norm.")
    return "qwen3" if cfg.qk_norm else "llama"


def interleave_rope_rows(w, n_heads: int):
    """Rows of a q/k projection (weight (H*D, C) or bias (H*D,)) from rotate-half order to interleaved:
    within each head, row i of the first half and row i of the second half become rows 2i and 2i+1
    (llama.cpp's converter ``LlamaModel.permute``)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(sd: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Our state dict -> ``{llama.cpp name: float32 numpy array}`` in llama.cpp's layout."""
    import torch

    from minillm.export.layout import to_hf_state_dict

    gguf = require_gguf()
    arch = gguf_architecture(cfg)
    hf = to_hf_state_dict(sd, cfg, torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN3,
                                     cfg.n_layer)
    out = {}
    for key, t in hf.items():
        if arch == "llama" and ".q_proj." in key:
            t = interleave_rope_rows(t, cfg.n_head)
        elif arch == "llama" and ".k_proj." in key:
            t = interleave_rope_rows(t, cfg.kv_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MiniLLMError(f"--format gguf: the gguf package has no llama.cpp name for {key}; "
                               f"upgrade it (pip install -U gguf)")
        out[name] = t.numpy()
    return out


def encode_tensor(gguf, name: str, a, dtype: str):
    """``(data, GGMLQuantizationType)`` for one float32 array under ``dtype`` (llama.cpp's converter rules)."""
    Q = gguf.GGMLQuantizationType
    if a.ndim <= 1 or name.endswith("_norm.weight") or dtype == "fp32":
        qtype = Q.F32
    else:
        qtype = {"fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    try:
        return gguf.quants.quantize(a, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the Q8_0 block (32)
        return gguf.quants.quantize(a, Q.F16), Q.F16


# ---------------------------------------------------------------------------------------- tokenizer


def _refuse_tokenizer(path: Path, why: str) -> MiniLLMError:
    return MiniLLMError(f"--format gguf: {path}: {why}; export it with --format hf instead")


def gguf_vocab(path: Path, vocab_size: int) -> dict[str, Any]:
    """The tokenizer as llama.cpp's ``gpt2`` BPE: ``tokens``, ``types``, ``merges`` and ``n_unused`` (rows
    past the tokenizer, up to ``vocab_size``). Refuses what llama.cpp would not tokenize identically."""
    gguf = require_gguf()
    try:
        j = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MiniLLMError(f"--tokenizer: cannot read {path}: {e}") from e
    model, pre = j.get("model") or {}, j.get("pre_tokenizer") or {}
    kind = model.get("type")
    if kind == "Unigram":
        raise _refuse_tokenizer(path, "a Unigram tokenizer: llama.cpp's unigram tokenizer (T5's) puts its own '▁' "
                                      "before a leading space (minillm encodes ' Hola' like 'Hola') and its "
                                      "SentencePiece one merges by score instead of Viterbi, so token ids would "
                                      "differ")
    if kind == "WordPiece":
        raise _refuse_tokenizer(path, "a WordPiece tokenizer: llama.cpp's WordPiece tokenizer (BERT's) splits every "
                                      "punctuation character apart where minillm keeps runs of punctuation "
                                      "together ('...'), so token ids would differ")
    options = {k: model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")}
    if (kind != "BPE" or j.get("normalizer") is not None or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True) or any(options.values())
            or model.get("byte_fallback") or model.get("ignore_merges")):
        raise _refuse_tokenizer(path, "not the byte-level BPE (ByteLevel pre-tokenizer, no normalizer) that "
                                      "init-tokenizer writes, which is the one llama.cpp's gpt2 tokenizer matches")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in j.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise MiniLLMError(f"--tokenizer {path} has token id {max(by_id)} but the model only {vocab_size} rows; "
                           f"use the run's own tokenizer.json")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(PAD_TOKEN.format(i))
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(T.NORMAL if a is None else T.CONTROL if a.get("special", True) else T.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "n_unused": vocab_size - len(by_id)}


def sft_chat_template() -> str:
    """The prompt template ``finetune --mode sft`` trains with (``finetune.format_example`` for
    ``messages``), as Jinja for ``tokenizer.chat_template``. A user turn ends with ``### Response:\\n``, so
    the prompt is ready for the answer with or without ``add_generation_prompt``; BOS (``<|doc|>``) is not
    in the template because llama.cpp adds it. All text is in string expressions, so it renders the same
    with or without ``trim_blocks``/``lstrip_blocks`` (which transformers and llama.cpp turn on)."""
    from minillm.data.sft import INSTRUCTION, RESPONSE, SYSTEM

    def lit(text: str) -> str:  # a Jinja string literal (JSON's escapes are Jinja's)
        return json.dumps(text)

    return ("{% for message in messages %}"
            "{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ " + lit("\n\n")
            + " }}{% endif %}"
            "{% if message['role'] == 'system' %}{{ " + lit(SYSTEM) + " + message['content'] + " + lit("\n\n") + " }}"
            "{% elif message['role'] == 'user' %}{{ " + lit(INSTRUCTION) + " + message['content'] + "
            + lit("\n\n" + RESPONSE) + " }}"
            "{% else %}{{ message['content'] }}{% endif %}"
            "{% endfor %}")


def finetune_mode(state: dict[str, Any]) -> str | None:
    """``sft`` or ``continue`` for a fine-tuned checkpoint (its ``finetune`` record) or a merge of a LoRA
    adapter (``merged_from.mode``); None for a pretrained one or an earlier export."""
    rec = state.get("finetune") or state.get("merged_from") or {}
    return rec.get("mode") if isinstance(rec, dict) else None


# ------------------------------------------------------------------------------------------ writing


def _metadata(w, gguf, cfg: ModelConfig, dtype: str, name: str, info: dict[str, Any]) -> None:
    """The architecture keys, and ``info`` as ``minillm.*`` JSON strings."""
    from minillm.model.gpt import RMS_EPS

    ftype = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(RMS_EPS)
    for k, v in info.items():
        if v is not None:
            w.add_string(f"minillm.{k}", v if isinstance(v, str) else json.dumps(v))


def _tokenizer_metadata(w, vocab: dict[str, Any], specials: dict[str, Any], template: str | None) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(specials["doc"])
    w.add_eos_token_id(specials["doc"])
    w.add_eot_token_id(specials["doc"])
    w.add_pad_token_id(specials["pad"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if template is not None:
        w.add_chat_template(template)


def _write_tensors(w, gguf, tensors: dict[str, Any], dtype: str) -> dict[str, int]:
    """Add ``tensors`` encoded for ``dtype`` and write the file; returns the count of tensors per GGML type."""
    types: dict[str, int] = {}
    for name, a in tensors.items():
        data, qtype = encode_tensor(gguf, name, a, dtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    return types


def resolve_gguf_dtype(name: str, sd: dict[str, Any]) -> str:
    """``--dtype`` for GGUF: one of ``GGUF_DTYPES``; ``auto`` is the checkpoint's own float type."""
    if name == "auto":
        import torch

        own = next(iter(sd.values())).dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(own, "fp32")
    if name not in GGUF_DTYPES:
        raise UsageError(f"--dtype: {name!r} is not one of auto, {', '.join(GGUF_DTYPES)} (for --format gguf)")
    return name


def export_gguf(model_sd: dict[str, Any], cfg: ModelConfig, tokenizer: Path, out: Path, *, overwrite: bool = False,
                dtype: str = "auto", minillm: dict[str, Any] | None = None, mode: str | None = None,
                inputs: tuple[Path, ...] = ()) -> dict:
    """Write ``out`` (a ``.gguf`` file) from our state dict; ``mode`` ``sft`` adds the chat template.
    Written to a temporary file beside ``out`` and renamed into place, so an old ``out`` survives a failure."""
    from minillm.export.hf import _check_out, _specials
    from minillm.export.layout import EXPORT_FORMAT
    from minillm.io import fsync_dir, sha256_file, write_error
    from minillm.tokenizer import load_tokenizer

    gguf = require_gguf()
    if out.suffix != ".gguf":
        raise UsageError(f"--out {out}: --format gguf writes one file; name it *.gguf")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; --format gguf writes one file, e.g. {out / 'model.gguf'}")
    arch = gguf_architecture(cfg)
    dname = resolve_gguf_dtype(dtype, model_sd)
    _check_out(out, overwrite, [tokenizer, *inputs], "file")
    specials = _specials(load_tokenizer(tokenizer))
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    tensors = gguf_tensors(model_sd, cfg)
    template = sft_chat_template() if mode == "sft" else None
    info = {"format": EXPORT_FORMAT, "model_config": to_dict(cfg), **(minillm or {}),
            "source_tokenizer_sha256": sha256_file(tokenizer), "finetune_mode": mode}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_error(out, e, "check the directory exists and is writable") from e
    try:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            _metadata(w, gguf, cfg, dname, out.stem, info)
            _tokenizer_metadata(w, vocab, specials, template)
            types = _write_tensors(w, gguf, tensors, dname)
        finally:
            w.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(out, e, "the previous file, if any, is intact") from e
        raise
    return {"out": str(out), "format": "gguf", "architecture": arch, "dtype": dname,
            "tensor_types": types, "tensors": len(tensors), "params": sum(a.size for a in tensors.values()),
            "vocab": len(vocab["tokens"]), "unused_tokens": vocab["n_unused"], "chat_template": template is not None,
            "files": [out.name]}
