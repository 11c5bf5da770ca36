"""Checkpoints: atomic save and safe load.

A checkpoint is written atomically (``minillm.io``) with the ``tensors_sha256`` of its tensors, and holds only
tensors and plain Python values: it loads with ``torch.load(weights_only=True)``, is refused when its tensors do
not match that checksum, and its model config is bounded by its own tensors before any model is built.
Rebuilding a model from a checkpoint or an export is ``minillm.model.load``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm.errors import MiniLLMError
from minillm.io import atomic_save

if TYPE_CHECKING:
    from minillm.config import ModelConfig

CKPT_FORMAT = 1


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (``torch.save`` into a temp file, then rename), with the
    ``tensors_sha256`` of its tensors, which ``load_checkpoint`` verifies."""
    import torch

    state = {"format": CKPT_FORMAT, **state}
    state["tensors_sha256"] = tensors_sha256(state)
    atomic_save(path, lambda f: torch.save(state, f))


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, tensor)`` of every tensor in nested dicts, lists and tuples."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _tensor_digest(t: Any) -> bytes:
    """sha256 of a tensor's bytes (row-major; copied to the host first when it lives on a GPU)."""
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").digest()


def tensors_sha256(obj: Any) -> str:
    """sha256 over every tensor in ``obj`` in key-path order: each tensor's path, dtype, shape and the sha256
    of its bytes (hashed on several threads; hashlib releases the GIL). Plain values are not covered."""
    from concurrent.futures import ThreadPoolExecutor

    items = sorted(_tensors(obj), key=lambda kv: kv[0])
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(_tensor_digest, [t for _, t in items])
    h = hashlib.sha256()
    for (path, t), d in zip(items, digests, strict=True):
        h.update(f"{path}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(d)
    return h.hexdigest()


def load_checkpoint(path: Path | str, map_location: str = "cpu", flag: str = "--ckpt") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a file holding pickled code is refused, never run; one
    whose tensors differ from its ``tensors_sha256`` is refused as corrupted. ``flag``: the option that named
    the file (``--ckpt``, ``--resume``), which every message starts with."""
    path = Path(path)
    if path.is_dir():
        cand = [path / "ckpt_best.pt", path / "ckpt_last.pt"]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise MiniLLMError(f"{flag}: {path} is a directory without ckpt_best.pt or ckpt_last.pt")
        path = found
    if not path.is_file():
        raise MiniLLMError(f"{flag}: checkpoint {path} does not exist; give a run's ckpt_best.pt or ckpt_last.pt")
    state = read_tensor_file(path, flag, map_location)
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise MiniLLMError(f"{flag}: {path} is not a minillm checkpoint (no model weights or config in it)")
    state["path"] = str(path)
    return state


def read_tensor_file(path: Path, flag: str, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint or adapter, its ``tensors_sha256`` verified when it has
    one (files written before it was added have none). Every failure is a ``MiniLLMError`` naming ``flag``, the
    file and what to use instead."""
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol ..." on foreign files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # a bare pickle stream, not torch's zip format
        if raw_pickle:
            raise MiniLLMError(f"{flag}: {path} is a plain pickle file, not a file minillm wrote; refused (it is "
                               f"loaded with weights_only=True, so nothing in it was executed)") from e
        if "GLOBAL" in str(e):  # a reference to a class or function: what a code-execution payload needs
            raise MiniLLMError(
                f"{flag}: {path} holds pickled objects other than tensors and plain values; refused (it is loaded "
                f"with weights_only=True, so nothing in it was executed). Use a file written by minillm."
            ) from e
        raise MiniLLMError(f"{flag}: {path} is corrupted (not a file minillm can read); {_instead(path, flag)}") from e
    except PermissionError as e:
        raise MiniLLMError(f"{flag}: cannot read {path} ({e.strerror}); check its permissions") from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError, TypeError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise MiniLLMError(f"{flag}: {path} is truncated or corrupted ({detail}); {_instead(path, flag)}") from e
    recorded = state.get("tensors_sha256") if isinstance(state, dict) else None
    if recorded is not None and recorded != tensors_sha256(state):
        raise MiniLLMError(f"{flag}: {path} is corrupted (its tensors do not match the checksum stored in it); "
                           f"{_instead(path, flag)}")
    return state


def _instead(path: Path, flag: str) -> str:
    """What to use instead of the damaged ``path``: the run's other checkpoint when there is one (a hard link
    to the same file, as after an evaluation that was the best, is no other)."""
    if flag == "--adapter":
        return ("use the LoRA run's directory as --ckpt instead (its checkpoints hold the base with the adapter "
                "merged), or another copy of the adapter")
    other = {"ckpt_best.pt": "ckpt_last.pt", "ckpt_last.pt": "ckpt_best.pt"}.get(path.name)
    other_path = path.with_name(other) if other else None
    if other_path is not None and other_path.is_file() and not os.path.samefile(path, other_path):
        if flag == "--resume":
            return (f"to resume from the best checkpoint (an earlier step), copy {other_path} over it and run the "
                    f"same command again; or start a new --outdir")
        return f"use the run's other checkpoint {other_path}"
    if flag == "--resume":
        return "the run has no other checkpoint to resume from; start a new --outdir"
    if other_path is not None:
        return "the run has no other checkpoint; restore the file from a backup or train again"
    return "restore the file from a backup or write it again"


ROPE_FLOOR = 256 << 20  # bytes of RoPE table any config may ask for, whatever the size of its file


def model_config_of(state: dict[str, Any], flag: str = "--ckpt") -> ModelConfig:
    """The ``ModelConfig`` of a loaded checkpoint, bounded by the file's own tensors (``checked_model_config``)."""
    return checked_model_config(state["model_config"], state["model"], f"{flag}: {state['path']}")


def checked_model_config(d: Any, tensors: Any, where: str) -> ModelConfig:
    """A ``ModelConfig`` from an untrusted file's config ``d``, refused unless its model fits the file's
    ``tensors`` (a dict of them): right types, valid values, no more layers than tensors, no more parameters
    than the tensors hold, and a RoPE table no larger than the file (or ``ROPE_FLOOR``). So a 1 KB file can
    never make us build a huge model; the exact shapes are checked by ``load_state_dict`` afterwards."""
    import dataclasses

    import torch

    from minillm.config import ModelConfig, TrainConfig, _check_value, model_from_dict, validate

    if not isinstance(d, dict) or not isinstance(tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in tensors.values()):
        raise MiniLLMError(f"{where}: its model config or weights are not what minillm writes; the file is damaged "
                           f"or was not written by minillm")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    problems = [p for k, v in d.items() if k in names and (p := _check_value(ModelConfig, k, v, ""))]
    if not problems:
        cfg = model_from_dict(d)
        problems = validate(cfg, TrainConfig()) or _size_problems(cfg, list(tensors.values()))
    if problems:
        raise MiniLLMError(f"{where}: its model config does not fit the tensors in the file ({'; '.join(problems)}); "
                           f"the file is damaged or was not written by minillm")
    return cfg


def _size_problems(cfg: ModelConfig, tensors: list) -> list[str]:
    """What in ``cfg`` asks for more than ``tensors`` hold (pure arithmetic: nothing is allocated)."""
    from minillm.model.memory import param_count

    n_elems, n_bytes = sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)
    p = []
    if cfg.n_layer > len(tensors):
        p.append(f"{cfg.n_layer} layers, but only {len(tensors)} tensors")
    if (need := param_count(cfg)) > n_elems:
        p.append(f"{need:,} parameters, larger than the tensors in the file ({n_elems:,} values)")
    if (rope := 8 * cfg.block_size * cfg.head_dim) > max(ROPE_FLOOR, n_bytes):
        p.append(f"block_size {cfg.block_size} needs a {rope:,}-byte RoPE table")
    return p
