"""Atomic save and safe load of run artifacts: checkpoints, JSON files, the run lock.

Every write goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target with ``os.replace``: a crash at any moment leaves either the old file or the new one,
never a broken one, and no temporary file is left behind on error.
Checkpoints hold only tensors and plain Python values and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from minillm.errors import MiniLLMError

CKPT_FORMAT = 1


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise MiniLLMError(f"cannot write {path}: {e.strerror or e}; check the directory exists and is writable") from e
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise MiniLLMError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is intact") from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_save(path: Path | str, write: Callable[[IO], None]) -> None:
    with atomic_open(path, "wb") as f:
        write(f)


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (``torch.save`` into a temp file, then rename)."""
    import torch

    state = {"format": CKPT_FORMAT, **state}
    atomic_save(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path | str, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a file holding pickled code is refused, never run."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        cand = [path / "ckpt_best.pt", path / "ckpt_last.pt"]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise MiniLLMError(f"--ckpt: {path} is a directory without ckpt_best.pt or ckpt_last.pt")
        path = found
    if not path.is_file():
        raise MiniLLMError(f"--ckpt: checkpoint {path} does not exist; give a run's ckpt_best.pt or ckpt_last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise MiniLLMError(
            f"--ckpt: {path} holds objects other than tensors and plain values; refused (it is loaded with "
            f"weights_only=True, so nothing in it was executed). Use a checkpoint written by minillm."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise MiniLLMError(
            f"--ckpt: {path} is truncated or corrupted ({str(e).splitlines()[0][:100]}); "
            f"use the run's other checkpoint (ckpt_best.pt / ckpt_last.pt)"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise MiniLLMError(f"--ckpt: {path} is not a minillm checkpoint (no model weights or config in it)")
    state["path"] = str(path)
    return state


class RunLock:
    """A lock file in the run directory so two ``train`` runs can't write the same ``--outdir``.
    A lock left by a killed process (its pid is gone) is detected and cleared."""

    def __init__(self, outdir: Path):
        self.path = Path(outdir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and _pid_alive(pid):
                    raise MiniLLMError(
                        f"--outdir {self.path.parent} is in use by another train run (pid {pid}); "
                        f"wait for it, or choose another --outdir"
                    ) from None
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # stale lock from a killed run
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise MiniLLMError(f"cannot lock {self.path}; remove it if no train run is using {self.path.parent}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def load_model(ckpt: Path | str, device: str = "cpu"):
    """Rebuild the model of a checkpoint (or run directory) in eval mode. Returns ``(model, state)``."""
    from minillm.config import model_from_dict
    from minillm.model import GPT

    state = load_checkpoint(ckpt)
    model = GPT(model_from_dict(state["model_config"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise MiniLLMError(f"--ckpt: {state['path']} does not match its own model config: {str(e)[:200]}") from e
    return model.to(device).eval(), state


def resolve_tokenizer(ckpt_state: dict, tokenizer: Path | None, force: bool = False) -> Path:
    """The tokenizer for a checkpoint: ``--tokenizer`` if given, else the copy in the run directory.
    Refuses a tokenizer whose sha256 differs from the one recorded in the checkpoint (``--force-tokenizer``
    overrides that check only)."""
    ckpt_path = Path(ckpt_state["path"])
    path = Path(tokenizer) if tokenizer else ckpt_path.parent / "tokenizer.json"
    if not path.is_file():
        raise MiniLLMError(f"--tokenizer: {path} does not exist; pass the run's tokenizer.json with --tokenizer")
    recorded = ckpt_state.get("tokenizer_sha256")
    if recorded and not force and sha256_file(path) != recorded:
        raise MiniLLMError(
            f"--tokenizer {path} is not the tokenizer checkpoint {ckpt_path} was trained with (sha256 differs); "
            f"use the run's tokenizer.json, or --force-tokenizer if you are sure"
        )
    return path
