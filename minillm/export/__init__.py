"""export: one reader of our checkpoints (``minillm.model.load``), three formats: ``hf`` and ``safetensors``
(``export.hf``), ``gguf`` (``export.gguf``). ``export.layout`` is what loading an export needs."""

from __future__ import annotations

from pathlib import Path

from minillm.errors import UsageError
from minillm.export.gguf import export_gguf, finetune_mode, require_gguf
from minillm.export.hf import export_hf, export_safetensors
from minillm.export.layout import safetensors_torch
from minillm.io import sha256_file

FORMATS = ("hf", "safetensors", "gguf")


def export(ckpt: Path, out: Path, fmt: str = "hf", *, tokenizer: Path | None = None, force_tokenizer: bool = False,
           overwrite: bool = False, dtype: str = "auto") -> dict:
    """Load ``ckpt`` (checkpoint, run directory or an earlier export) and export it as ``fmt``."""
    # not at the top: minillm.model.load imports export.layout, which runs this package's __init__ first
    from minillm.model.load import load_model, resolve_tokenizer

    if fmt not in FORMATS:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        require_gguf()
    else:
        safetensors_torch()
    model, state = load_model(ckpt, "cpu")
    extra = {"tokenizer_sha256": state.get("tokenizer_sha256"),
             "train_config": {"doc_masking": bool((state.get("train_config") or {}).get("doc_masking", False))}}
    if "run_state" in state:
        extra["step"] = state["run_state"].get("step")
    inputs = (Path(state["path"]),)
    if fmt == "safetensors":
        if tokenizer:
            extra["tokenizer_sha256"] = sha256_file(resolve_tokenizer(state, tokenizer, force_tokenizer))
        return export_safetensors(model.state_dict(), model.cfg, out, overwrite=overwrite, dtype=dtype,
                                  minillm=extra, inputs=inputs)
    tok = resolve_tokenizer(state, tokenizer, force_tokenizer)
    minillm = {k: v for k, v in extra.items() if k != "tokenizer_sha256"}
    if fmt == "gguf":
        return export_gguf(model.state_dict(), model.cfg, tok, out, overwrite=overwrite, dtype=dtype,
                           minillm=minillm, mode=finetune_mode(state), inputs=inputs)
    return export_hf(model.state_dict(), model.cfg, tok, out, overwrite=overwrite, dtype=dtype, minillm=minillm,
                     inputs=inputs)
