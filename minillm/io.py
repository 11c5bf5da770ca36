"""File-level I/O: atomic writes, sha256, temporary files of killed writers, JSON files, the run lock.

Every write goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target with ``os.replace``: a crash at any moment leaves either the old file or the new one,
never a broken one, and no temporary file is left behind on error. A temporary file's name records its
writer (pid, start time, host), so a later command removes those of killed writers and never a live one's.
"""

from __future__ import annotations

import collections
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from minillm.errors import MiniLLMError


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


_WRITTEN: dict[str, Any] = {"count": 0, "last": collections.deque(maxlen=3)}  # files this process wrote in full


def _written(path: Path) -> None:
    _WRITTEN["count"] += 1
    _WRITTEN["last"].append(path)


def written_since(count: int) -> list[Path]:
    """The files (up to the last three) that this process finished writing since ``written_count()`` was
    ``count``: what an interrupted command has already replaced."""
    return list(_WRITTEN["last"])[-min(3, _WRITTEN["count"] - count):] if _WRITTEN["count"] > count else []


def written_count() -> int:
    return _WRITTEN["count"]


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed.
    Stale temporary files of ``path`` (their writer is gone) are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent, names=(path.name,))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
        os.chmod(tmp, 0o666 & ~current_umask())
    except OSError as e:
        raise write_error(path, e, "check the directory exists and is writable") from e
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _written(path)
        fsync_dir(path.parent)
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


def fsync_dir(directory: Path) -> None:
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


def current_umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path | str, fix: str) -> dict[str, Any]:
    """One of minillm's JSON files (a JSON object); a missing, unreadable, damaged or foreign one is a one-line
    ``MiniLLMError`` naming the file and ending with ``fix``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MiniLLMError(f"{path} does not exist; {fix}") from e
    except OSError as e:
        raise MiniLLMError(f"cannot read {path} ({e.strerror or e}); check its permissions") from e
    except json.JSONDecodeError as e:
        raise MiniLLMError(f"{path} is damaged: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; "
                           f"truncated or edited?); {fix}") from e
    except UnicodeDecodeError as e:
        raise MiniLLMError(f"{path} is damaged: not valid JSON (not UTF-8 at byte {e.start}); {fix}") from e
    if not isinstance(obj, dict):
        raise MiniLLMError(f"{path} is damaged: a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def atomic_save(path: Path | str, write: Callable[[IO], None]) -> None:
    with atomic_open(path, "wb") as f:
        write(f)


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
        _written(dst)
        fsync_dir(dst.parent)
        return
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
    with open(src, "rb") as f, atomic_open(dst, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 24)



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
    """This process's start as a ``time.time()`` value (from /proc: now minus the seconds since its start
    ticks, to 10 ms; the boot time in /proc/stat has whole seconds only), so a ``--max-time`` budget also covers
    the interpreter's start and imports; None where /proc is missing."""
    try:
        ticks = int(_start_time(os.getpid()))
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        now = time.time()
        return now - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
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


def progress_bar(total: float | None, desc: str, unit: str = "it", show: bool | None = None, **kw: Any):
    """A tqdm bar on stderr, shown only on a terminal (``show`` None: when stderr is one): a run whose
    stderr is a file or a pipe gets no bar lines in its log."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=not (sys.stderr.isatty() if show is None else show), **kw)
