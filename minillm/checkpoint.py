"""Atomic save and safe load of run artifacts: checkpoints, JSON files, the run lock.

Every write goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target with ``os.replace``: a crash at any moment leaves either the old file or the new one,
never a broken one, and no temporary file is left behind on error. A temporary file's name records its
writer (pid, start time, host), so a later command removes those of killed writers and never a live one's.
Checkpoints hold only tensors and plain Python values and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
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
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.
    Stale temporary files of ``path`` (their writer is gone) are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent, names=(path.name,))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
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
            raise write_error(path, e, _kept(path)) from e
        if _is_torch_write_error(e):
            raise _torch_write_error(path, e) from e
        raise


def make_temp_dir(path: Path | str) -> Path:
    """A new temporary directory beside ``path``, named like ``atomic_open``'s files (after removing the
    stale ones of ``path``), for a directory output that replaces ``path`` once complete."""
    path = Path(path)
    clean_stale_temps(path.parent, names=(path.name,))
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))


def write_error(path: Path | str, e: OSError, note: str) -> MiniLLMError:
    """A one-line error for a failed write of ``path``: a parent that is a file, a full disk, or the OS's reason."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return MiniLLMError(f"cannot write {path}: {blocker} is a file, not a directory; choose another output path")
    if e.errno == errno.ENOSPC:
        return MiniLLMError(f"no space left on {mount_point(path)} while writing {path}; {note}; free some disk "
                            f"space or write elsewhere")
    fix = "; free some disk space or write elsewhere" if e.errno == errno.EDQUOT else ""
    return MiniLLMError(f"cannot write {path}: {e.strerror or e}; {note}{fix}")


def _kept(path: Path) -> str:
    """What a failed replacement of ``path`` left: the previous file (or checkpoint), untouched."""
    what = "checkpoint" if path.suffix == ".pt" else "file"
    return f"the previous {what} is intact" if path.exists() else f"no partial {what} was left"


def _is_torch_write_error(e: BaseException) -> bool:
    """torch's zip writer failed (``[enforce fail at inline_container.cc:N] . unexpected pos ...`` or
    ``... file write failed``): it turns the OSError of a failed write into a RuntimeError."""
    return isinstance(e, RuntimeError) and "inline_container.cc" in str(e)


def _torch_write_error(path: Path, e: BaseException) -> MiniLLMError:
    """The error for torch's failed write: the OSError it hides (a full disk, mostly), or its first line."""
    cause = e.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if cause is not None:
        return write_error(path, cause, _kept(path))
    first = str(e).splitlines()[0][:200]
    return MiniLLMError(f"cannot write {path}: torch could not write it ({first}); {_kept(path)}; check the free "
                        f"space on {mount_point(path)}")


def mount_point(path: Path | str) -> Path:
    """The mount point of the filesystem ``path`` is (or would be) written on: how ``df`` names a disk."""
    p = Path(os.path.abspath(path))
    while not (p.exists() and os.path.ismount(p)):
        p = p.parent
    return p


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry reaches the disk); best effort where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- temporary files of killed writers

STALE_AFTER_S = 3600.0  # a temp whose writer can't be checked (another host, an earlier version) is stale once
                        # untouched this long: a live writer writes on, a killed one never again
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-(?P<start>\d+)@(?P<node>[^/]+?)\.[a-z0-9_]{8}\.tmp")
_OLD_TEMP = re.compile(r"\.(?P<name>.+)\.(?:[a-z0-9_]{8}|link)\.tmp")  # pid-less, from earlier versions


def _temp_prefix(path: Path) -> str:
    """``.NAME.PID-START@NODE.``: the writer of a temp file, so a later command tells a live one from a dead one."""
    pid = os.getpid()
    return f".{path.name}.{pid}-{_start_time(pid).replace('?', '0')}@{_node()}."


def _node() -> str:
    """This machine and PID namespace, as a file name part: pids are only comparable within one."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    try:
        return f"{host}+{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def clean_stale_temps(directory: Path | str, names: tuple[str, ...] | None = None,
                      recursive: bool = False) -> list[Path]:
    """Remove the temporary files (and directories) that writers killed mid-write (SIGKILL, power loss) left
    in ``directory`` (with ``recursive``, below it too), only those of ``names`` when given. A temp counts as
    stale when its writer, named in it, is gone; when that can't be told (another machine, or a name from an
    earlier version without a pid), once untouched for ``STALE_AFTER_S``. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = "**/.*.tmp" if recursive else ".*.tmp"
    removed = []
    for p in sorted(directory.glob(pattern)):
        m = _TEMP.fullmatch(p.name) or _OLD_TEMP.fullmatch(p.name)
        if m is None or (names is not None and m["name"] not in names) or not _stale(p, m):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _stale(p: Path, m: re.Match) -> bool:
    if m.re is _TEMP and m["node"] == _node():
        return not _alive(int(m["pid"]), m["start"])
    try:
        return time.time() - p.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


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
    clean_stale_temps(dst.parent, names=(dst.name,))
    tmp = dst.with_name(f"{_temp_prefix(dst)}hardlink.tmp")
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
    """The run directory's lock, so two runs never write one ``--outdir``: a kernel lock (``flock``) on
    ``OUTDIR/.lock``, held for the run's life and freed by the kernel when its process ends, however it ends.

    The file records ``pid start_time host`` for the messages. A file left by a killed run is free once its
    process is gone, except one written on another machine, where flock may not reach (some network
    filesystems): that one is refused with how to clear it. A clean release removes the file."""

    def __init__(self, outdir: Path | str):
        self.path = Path(outdir) / ".lock"
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        _make_outdir(self.path.parent)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise MiniLLMError(f"--outdir {self.path.parent}: cannot create {self.path.name} ({e.strerror}); "
                                   f"choose a writable directory") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EWOULDBLOCK:
                    raise MiniLLMError(f"--outdir {self.path.parent}: cannot lock {self.path} ({e.strerror}); "
                                       f"choose a directory on a local disk") from e
                raise MiniLLMError(self._in_use(_wait_for_owner(self.path))) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # a holder removed the file between our open and our lock: lock the new one
        owner = _read_owner(self.path)
        if owner is not None and owner[2] != socket.gethostname():
            os.close(fd)
            raise MiniLLMError(
                f"--outdir {self.path.parent} may be in use by pid {owner[0]} on {owner[2]} (its {self.path}: a "
                f"lock does not reach across machines on every filesystem); remove {self.path} if no run on "
                f"{owner[2]} uses it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_start_time(os.getpid())} {socket.gethostname()}\n".encode(), 0)
        self._fd, self.held = fd, True

    def _in_use(self, owner: tuple[int, str, str] | None) -> str:
        who = f" (pid {owner[0]} on {owner[2]})" if owner else f" (it holds {self.path})"
        return (f"--outdir {self.path.parent} is in use by another process{who}; wait for it to finish, or choose "
                f"another --outdir")

    def release(self) -> None:
        if self.held and self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: a waiting opener sees the file is gone and retries
            os.close(self._fd)
            self._fd, self.held = None, False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _make_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise MiniLLMError(f"--outdir {outdir} is a file; give a directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiniLLMError(f"--outdir {outdir}: cannot create it ({e.strerror}); choose a writable directory") from e


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder unlinks it)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _wait_for_owner(path: Path, timeout: float = 1.0) -> tuple[int, str, str] | None:
    """The holder's record; a holder writes it just after locking, so an empty file is read again a moment."""
    deadline = time.monotonic() + timeout
    while (owner := _read_owner(path)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return owner


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
    """``(pid, start_time, host)`` from a lock file; None when it is unreadable or empty."""
    try:
        parts = path.read_text().split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else "?"), (parts[2] if len(parts) > 2 else socket.gethostname())
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` of this machine runs and is the one that started at ``start`` (clock ticks
    since boot; '?' or '0' when unknown): a reused pid, or a zombie, counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    if start not in ("?", "0") and now != "?" and now != start:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def load_model(ckpt: Path | str, device: str = "cpu"):
    """Rebuild the model of a checkpoint (or run directory) in eval mode. Returns ``(model, state)``."""
    from minillm.export.hf import is_exported, load_exported
    from minillm.model.gpt import GPT

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


def resolve_tokenizer(ckpt_state: dict, tokenizer: Path | None, force: bool = False) -> Path:
    """The tokenizer for a checkpoint: ``--tokenizer`` if given, else the copy in the run directory.
    Refuses a tokenizer whose sha256 differs from the one recorded in the checkpoint (``--force-tokenizer``
    overrides that check only)."""
    ckpt_path = Path(ckpt_state["path"])
    from minillm.corpus.read import check_input_file

    path = Path(tokenizer) if tokenizer else ckpt_path.parent / "tokenizer.json"
    check_input_file(path, "--tokenizer", "pass the run's tokenizer.json with --tokenizer")
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
