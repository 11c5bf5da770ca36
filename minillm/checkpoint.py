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
from typing import IO, TYPE_CHECKING, Any

from minillm.errors import MiniLLMError

if TYPE_CHECKING:
    from minillm.config import ModelConfig

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
    from minillm.export import is_exported, load_exported
    from minillm.model import GPT

    if is_exported(ckpt):  # an exported Hugging Face directory or .safetensors file
        return load_exported(ckpt, device)
    state = load_checkpoint(ckpt)
    model = GPT(model_config_of(state))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise MiniLLMError(f"--ckpt: {state['path']} does not match its own model config: {str(e)[:200]}") from e
    return model.to(device).eval(), state


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
    from minillm.model import estimate_memory

    n_elems, n_bytes = sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)
    p = []
    if cfg.n_layer > len(tensors):
        p.append(f"{cfg.n_layer} layers, but only {len(tensors)} tensors")
    if (need := estimate_memory(cfg, 1)["params"] // 4) > n_elems:
        p.append(f"{need:,} parameters, larger than the tensors in the file ({n_elems:,} values)")
    if (rope := 8 * cfg.block_size * cfg.head_dim) > max(ROPE_FLOOR, n_bytes):
        p.append(f"block_size {cfg.block_size} needs a {rope:,}-byte RoPE table")
    return p


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
