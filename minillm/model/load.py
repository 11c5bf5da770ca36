"""Rebuilding a model from a file: a checkpoint, a run directory or an export, and the tokenizer that goes
with it. ``build_gpt`` is the one place a ``GPT`` gets a file's weights (checkpoints, exports, a fine-tuning
run's base), so a file whose weights do not fit its config is refused with one message everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minillm.checkpoint import load_checkpoint, model_config_of
from minillm.config import ModelConfig
from minillm.corpus.read import check_input_file
from minillm.errors import MiniLLMError
from minillm.export.layout import is_exported, read_exported
from minillm.io import sha256_file
from minillm.model.gpt import GPT
from minillm.tokenizer import load_tokenizer


def build_gpt(cfg: ModelConfig, state_dict: dict[str, Any], where: str) -> GPT:
    """A ``GPT`` of ``cfg`` (already checked against the file: ``checked_model_config``) holding
    ``state_dict``; a ``MiniLLMError`` starting with ``where`` (``--ckpt: FILE``) when the shapes differ."""
    model = GPT(cfg)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())  # torch lists its errors on lines of their own: one line
        raise MiniLLMError(f"{where} does not match its own model config: {detail[:200]}") from e
    return model


def load_model(ckpt: Path | str, device: str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild the model of a checkpoint, run directory or export in eval mode. Returns ``(model, state)``."""
    if is_exported(ckpt):  # an exported Hugging Face directory or .safetensors file
        return load_exported(ckpt, device)
    state = load_checkpoint(ckpt)
    return build_gpt(model_config_of(state), state["model"], f"--ckpt: {state['path']}").to(device).eval(), state


def load_exported(path: Path | str, device: str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Rebuild our ``GPT`` (eval mode) from an export. Returns ``(model, state)`` like ``load_model``: ``state``
    is ``read_exported``'s, like a checkpoint's."""
    cfg, sd, state = read_exported(path)
    return build_gpt(cfg, sd, f"--ckpt: {state['path']}").to(device).eval(), state


def check_tokenizer(state: dict[str, Any], tokenizer: Path | str | None, force: bool = False,
                    base: bool = False) -> Path:
    """The tokenizer for the loaded checkpoint ``state``: ``--tokenizer`` if given, else the copy in its run
    directory; refused when its sha256 differs from the one the checkpoint records, unless ``force``
    (``--force-tokenizer``). ``base``: the checkpoint is a fine-tuning run's base (its messages say so)."""
    ckpt = Path(state["path"])
    own = ckpt.parent / "tokenizer.json"
    path = Path(tokenizer) if tokenizer else own
    run = "the base run's" if base else "the run's"
    check_input_file(path, "--tokenizer", f"pass {run} tokenizer.json with --tokenizer")
    recorded = state.get("tokenizer_sha256")
    if recorded and not force and sha256_file(path) != recorded:
        keep = "; fine-tuning keeps the base's tokenizer" if base else ""
        raise MiniLLMError(
            f"--tokenizer {path} is not the tokenizer {'base ' if base else ''}checkpoint {ckpt} was trained with "
            f"(sha256 differs){keep}; use {run} tokenizer.json ({own}), or --force-tokenizer if you are sure")
    return path


def resolve_tokenizer(state: dict[str, Any], tokenizer: Path | str | None, force: bool = False) -> Path:
    """``check_tokenizer``, and a tokenizer with more tokens than the model has rows is refused even with
    ``force`` (its extra ids have no embedding)."""
    path = check_tokenizer(state, tokenizer, force)
    model_vocab = (state.get("model_config") or {}).get("vocab_size")
    if model_vocab:
        ckpt = Path(state["path"])
        n = load_tokenizer(path).get_vocab_size()
        if n > model_vocab:
            raise MiniLLMError(f"--tokenizer {path} has {n} tokens but checkpoint {ckpt} only {model_vocab}; "
                               f"use the tokenizer the run was trained with ({ckpt.parent / 'tokenizer.json'})")
    return path
