"""Atomic save and safe load of run artifacts: checkpoints, JSON files, the run lock.

Every write goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target with ``os.replace``: a crash at any moment leaves either the old file or the new one,
never a broken one, and no temporary file is left behind on error.
Checkpoints hold only tensors and plain Python values and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import warnings
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
        raise write_error(path, e, "check the directory exists and is writable") from e
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e, "the previous file, if any, is intact") from e
        raise


def write_error(path: Path | str, e: OSError, note: str) -> MiniLLMError:
    """A one-line error for a failed write of ``path``: a parent that is a file, a full disk, or the OS's reason."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return MiniLLMError(f"cannot write {path}: {blocker} is a file, not a directory; choose another output path")
    fix = "; free some disk space or write elsewhere" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return MiniLLMError(f"cannot write {path}: {e.strerror or e}; {note}{fix}")


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry reaches the disk); best effort where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def clean_stale_temps(directory: Path | str) -> list[Path]:
    """Remove temporary files an ``atomic_open`` killed mid-write (SIGKILL, power loss) left in
    ``directory``. Call it only while holding the directory's ``RunLock``: no writer is active then."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


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


def atomic_link(src: Path | str, dst: Path | str) -> None:
    """Make ``dst`` a copy of the finished file ``src`` atomically: a hard link when the filesystem allows
    (no second write of a large checkpoint; a later ``os.replace`` of ``src`` leaves ``dst`` as it was),
    else a byte copy."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        return
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    import shutil

    with open(src, "rb") as f, atomic_open(dst, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 24)


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol ..." on foreign files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # a bare pickle stream, not torch's zip format
        if raw_pickle:
            raise MiniLLMError(f"--ckpt: {path} is a plain pickle file, not a checkpoint minillm wrote; refused (it is "
                               f"loaded with weights_only=True, so nothing in it was executed)") from e
        if "GLOBAL" in str(e):  # a reference to a class or function: what a code-execution payload needs
            raise MiniLLMError(
                f"--ckpt: {path} holds pickled objects other than tensors and plain values; refused (it is loaded "
                f"with weights_only=True, so nothing in it was executed). Use a checkpoint written by minillm."
            ) from e
        raise MiniLLMError(f"--ckpt: {path} is corrupted (not a checkpoint minillm can read); use the run's other "
                           f"checkpoint (ckpt_best.pt / ckpt_last.pt)") from e
    except PermissionError as e:
        raise MiniLLMError(f"--ckpt: cannot read {path} ({e.strerror}); check its permissions") from e
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, IndexError, TypeError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise MiniLLMError(
            f"--ckpt: {path} is truncated or corrupted ({detail}); "
            f"use the run's other checkpoint (ckpt_best.pt / ckpt_last.pt)"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise MiniLLMError(f"--ckpt: {path} is not a minillm checkpoint (no model weights or config in it)")
    state["path"] = str(path)
    return state


class RunLock:
    """A lock file in the run directory so two ``train`` runs can't write the same ``--outdir``.

    It records ``pid start_time host``; a lock whose process is gone (killed: SIGKILL, power loss), or whose
    pid now belongs to another process (different start time), is stale and is cleared."""

    def __init__(self, outdir: Path | str):
        self.path = Path(outdir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                if owner is not None and _owner_alive(*owner):
                    raise MiniLLMError(
                        f"--outdir {self.path.parent} is in use by another train run (pid {owner[0]} on {owner[2]}); "
                        f"wait for it to finish, or choose another --outdir"
                    ) from None
                with contextlib.suppress(OSError):
                    os.unlink(self.path)  # stale lock from a killed run
                continue
            except OSError as e:
                raise MiniLLMError(f"--outdir {self.path.parent}: cannot create {self.path.name} ({e.strerror}); "
                                   f"choose a writable directory") from e
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {_start_time(os.getpid())} {socket.gethostname()}\n")
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


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or '?'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def process_started_at() -> float | None:
    """This process's start as a ``time.time()`` value (from /proc: boot time + start ticks), so a
    ``--max-time`` budget also covers the interpreter's start and imports; None where /proc is missing."""
    try:
        ticks = int(_start_time(os.getpid()))
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return None


def _read_owner(path: Path) -> tuple[int, str, str] | None:
    """``(pid, start_time, host)`` from a lock file; None when it is unreadable or empty (a half-written
    lock counts as stale)."""
    try:
        parts = path.read_text().split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else "?"), (parts[2] if len(parts) > 2 else socket.gethostname())
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, start: str, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process (a shared filesystem): can't tell, so don't steal it
    if pid == os.getpid():
        return start != "?" and start == _start_time(pid)  # this very process holds it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    if start != "?" and now != "?" and now != start:
        return False  # the pid was reused by another process
    try:  # a zombie (killed, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def load_model(ckpt: Path | str, device: str = "cpu"):
    """Rebuild the model of a checkpoint (or run directory) in eval mode. Returns ``(model, state)``."""
    from minillm.config import model_from_dict
    from minillm.export import is_exported, load_exported
    from minillm.model import GPT

    if is_exported(ckpt):  # an exported Hugging Face directory or .safetensors file
        return load_exported(ckpt, device)
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
    model_vocab = (ckpt_state.get("model_config") or {}).get("vocab_size")
    if model_vocab:  # checked even with --force-tokenizer: a larger vocabulary gives ids the model has no row for
        from minillm.tokenizer import load_tokenizer

        n = load_tokenizer(path).get_vocab_size()
        if n > model_vocab:
            raise MiniLLMError(f"--tokenizer {path} has {n} tokens but checkpoint {ckpt_path} only {model_vocab}; "
                               f"use the tokenizer the run was trained with ({ckpt_path.parent / 'tokenizer.json'})")
    return path
