"""Faults (issue 18): concurrent runs and the run lock (real ``flock``, real processes), temporary files left by
killed writers (only a dead writer's are removed), SIGINT/SIGTERM on every long command, a full disk while
saving a checkpoint (a real tmpfs where mounting is allowed, and torch's own error from a failing file
otherwise), and FIFOs where input files are expected."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import save_checkpoint
from minillm.cli import app
from minillm.errors import MiniLLMError
from minillm.io import RunLock, atomic_write_text, clean_stale_temps
from tests.conftest import make_corpus
from tests.test_errors import TINY, cli, copy_run, failed, no_temps

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A corpus, its tokenizer and a 4-step run."""
    from typer.testing import CliRunner

    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("base")
    paths = {"corpus": make_corpus(d / "corpus.txt"), "tok": d / "tok.json", "run": d / "run"}
    save_tokenizer(train_tokenizer(iter_documents(paths["corpus"]), 300), paths["tok"])
    r = CliRunner().invoke(app, ["train", "-t", str(paths["tok"]), "-c", str(paths["corpus"]), "-o", str(paths["run"]),
                                 *TINY, "--max-steps", "4", "--eval-every", "2"])
    assert r.exit_code == 0, r.output
    return paths


def spawn(code: str, *args: object) -> subprocess.Popen:
    """A Python process running ``code``; it prints one line once it is ready."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def minillm(*args: object, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minillm", *map(str, args)], cwd=ROOT, env=ENV, **kw)


def wait_for(cond, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("{", "encoding ", "note:"))]


# ------------------------------------------------------------------ the run lock

# a process that holds the lock file with flock and has not written its pid yet (just after creating it)
FLOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
time.sleep(120)
"""

RUNLOCK_HOLDER = """
import sys, time
from minillm.io import RunLock
RunLock(sys.argv[1]).acquire()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_lock_held_before_its_pid_is_written_is_not_taken_as_stale(tmp_path):
    holder = spawn(FLOCK_HOLDER, tmp_path / ".lock")  # an empty lock file, held
    try:
        with pytest.raises(MiniLLMError, match=r"--outdir .* is in use by another process"):
            RunLock(tmp_path).acquire()
        assert (tmp_path / ".lock").exists()
    finally:
        kill(holder)
    with RunLock(tmp_path) as lock:  # the holder died: its lock freed itself
        assert lock.held
    assert not (tmp_path / ".lock").exists()


def test_a_sigkilled_holder_frees_the_lock_and_a_live_one_is_named(tmp_path):
    holder = spawn(RUNLOCK_HOLDER, tmp_path)
    try:
        with pytest.raises(MiniLLMError, match=rf"in use by another process \(pid {holder.pid} on "
                                               rf"{socket.gethostname()}\); wait for it to finish"):
            RunLock(tmp_path).acquire()
    finally:
        kill(holder)
    assert (tmp_path / ".lock").read_text().split()[0] == str(holder.pid)  # left behind by the killed run
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_a_lock_written_on_another_host_says_how_to_clear_it(tmp_path):
    (tmp_path / ".lock").write_text("4242 123456 gpu-node-7\n")  # flock does not reach across machines
    with pytest.raises(MiniLLMError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "pid 4242 on gpu-node-7" in msg and f"remove {tmp_path / '.lock'} if no run on gpu-node-7 uses it" in msg
    assert (tmp_path / ".lock").read_text() == "4242 123456 gpu-node-7\n"  # left as it was
    (tmp_path / ".lock").write_text(f"4242 123456 {socket.gethostname()}\n")  # this host, not locked: stale
    with RunLock(tmp_path) as lock:
        assert lock.held


def test_train_and_finetune_into_a_locked_outdir_say_it_is_in_use(runner, base, tmp_path):
    run = copy_run(base, tmp_path)
    new = tmp_path / "new"
    new.mkdir()
    holders = [spawn(FLOCK_HOLDER, d / ".lock") for d in (run, new)]
    try:
        r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY)  # not "already holds files"
        failed(r, 1, f"--outdir {run} is in use by another process", "choose another --outdir")
        r = cli(runner, "finetune", "--ckpt", base["run"], "--data", base["corpus"], "-o", new, "--max-steps", "2",
                "--device", "cpu", "--compile", "off")
        failed(r, 1, f"--outdir {new} is in use by another process")
        assert [p.name for p in new.iterdir()] == [".lock"]
    finally:
        for h in holders:
            kill(h)


def test_three_trains_into_one_new_outdir_one_runs_the_others_are_refused(base, tmp_path):
    out = tmp_path / "r"
    args = ["train", "-t", base["tok"], "-c", base["corpus"], "-o", out, *TINY, "--max-time", "10m",
            "--eval-every", "100000", "--log-every", "100000"]
    errs = [tmp_path / f"err{i}" for i in range(3)]
    procs = [minillm(*args, stdout=subprocess.DEVNULL, stderr=e.open("w")) for e in errs]
    try:
        wait_for(lambda: sum(p.poll() is not None for p in procs) >= 2, 180, "two of the three to exit")
        (winner,) = [p for p in procs if p.poll() is None]
        for p, e in zip(procs, errs, strict=True):
            if p is not winner:
                lines = error_lines(e.read_text())
                assert p.returncode == 1 and len(lines) == 1, e.read_text()
                assert f"is in use by another process (pid {winner.pid} on " in lines[0], lines[0]
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=60) == 143
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)


# ------------------------------------------------------------------ stale temporary files

WRITER = """
import sys, time
from minillm.io import atomic_open
with atomic_open(sys.argv[1], "wb") as f:
    f.write(b"x" * 4096)
    f.flush()
    print("ready", flush=True)
    time.sleep(120)
"""


def temps(d: Path) -> set[Path]:
    return {p for p in d.rglob(".*") if p.name.endswith(".tmp")}


def killed_writer(target: Path) -> Path:
    """The temporary file a writer of ``target`` killed with SIGKILL mid-write leaves behind."""
    before = temps(target.parent) if target.parent.exists() else set()
    kill(spawn(WRITER, target))
    (left,) = temps(target.parent) - before
    return left


def test_only_a_dead_writers_temp_is_removed_a_live_ones_survives(tmp_path):
    target = tmp_path / "cache" / "tokens.bin"
    live_proc = spawn(WRITER, target)
    try:
        (live,) = temps(tmp_path)
        dead = killed_writer(target)
        assert clean_stale_temps(target.parent) == [dead]
        assert live.exists()
        atomic_write_text(target, "mine")  # another writer of the same file leaves the live temp alone
        assert live.exists() and target.read_text() == "mine"
    finally:
        kill(live_proc)
    assert clean_stale_temps(target.parent) == [live]
    assert [p.name for p in target.parent.iterdir()] == ["tokens.bin"]


def test_a_temp_from_an_earlier_version_is_removed_only_when_old(tmp_path):
    old, fresh = tmp_path / ".ckpt_last.pt.k3j9x_2a.tmp", tmp_path / ".tokens.bin.q8w7e6r5.tmp"  # mkstemp names
    other = tmp_path / ".notes.tmp"  # not a name we write
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(other, (two_hours_ago, two_hours_ago))
    assert clean_stale_temps(tmp_path) == [old]
    assert fresh.exists() and other.exists()


def test_train_removes_temps_of_killed_writers_in_its_run_and_cache_dirs(runner, base, tmp_path):
    run, shared = copy_run(base, tmp_path), tmp_path / "shared"
    dead = {killed_writer(run / "cache" / "tokens.bin"),  # a train killed while building its token cache
            killed_writer(run / "ckpt_last.pt"),  # ... while saving a checkpoint
            killed_writer(shared / "source0" / "tokens.bin")}
    live_proc = spawn(WRITER, shared / "tokens.bin")  # another run building a cache in the shared --cache-dir
    try:
        (live,) = temps(shared) - dead
        r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
                "--resume")
        assert r.exit_code == 0, r.output
        r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", tmp_path / "r2", *TINY,
                "--max-steps", "2", "--cache-dir", shared)
        assert r.exit_code == 0, r.output
        assert temps(tmp_path) == {live}
    finally:
        kill(live_proc)


def big_input(path: Path, mb: int = 6) -> Path:
    words = ("tierra cielo agua luz dia noche hombre mujer casa camino rey pueblo ciudad monte rio mar " * 30).split()
    body = " ".join(words)
    n = mb * (1 << 20) // len(body)
    path.write_text("\n<|doc|>\n".join(f"Documento {i}. {body} {i}" for i in range(n)) + "\n", encoding="utf-8")
    return path


def test_prepare_corpus_killed_mid_write_leaves_a_temp_the_next_run_removes(runner, tmp_path):
    src, out = big_input(tmp_path / "in.txt"), tmp_path / "out" / "corpus.txt"
    out.parent.mkdir()
    p = minillm("prepare-corpus", "-i", src, "-o", out, "--workers", "1", stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: temps(out.parent) or p.poll() is not None, what="prepare-corpus to start writing")
    finally:
        kill(p)
    assert temps(out.parent), "prepare-corpus finished before it could be killed"
    r = cli(runner, "prepare-corpus", "-i", make_corpus(tmp_path / "small.txt"), "-o", out)
    assert r.exit_code == 0, r.output
    assert not temps(out.parent) and out.is_file()


# ------------------------------------------------------------------ SIGINT / SIGTERM

INTERRUPTED = "error: interrupted ({}); no partial output was left, and files from before are unchanged"


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_prepare_corpus_stops_on_a_signal_with_one_line_and_no_temp(tmp_path, sig, code, name):
    src, out = big_input(tmp_path / "in.txt", 12), tmp_path / "corpus.txt"
    out.write_text("previous\n")
    err = tmp_path / "err"
    p = minillm("prepare-corpus", "-i", src, "-o", out, "--workers", "2", stderr=err.open("w"),
                start_new_session=True)  # its own process group, as a shell job
    try:
        wait_for(lambda: any(t.stat().st_size for t in temps(tmp_path)) or p.poll() is not None,
                 what="the workers' first results")
        assert p.poll() is None, "prepare-corpus finished before the signal"
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)  # Ctrl-C: the terminal signals the whole group, pool workers included
        else:
            p.send_signal(sig)  # kill PID, a scheduler
        assert p.wait(timeout=60) == code, err.read_text()
    finally:
        if p.poll() is None:
            kill(p)
    time.sleep(0.5)  # let terminated workers write whatever they would
    text = err.read_text()
    assert "Traceback" not in text and error_lines(text) == [INTERRUPTED.format(name)], text
    assert out.read_text() == "previous\n" and not temps(tmp_path)


def test_generate_stops_on_sigterm_with_exit_143_and_one_line(base, tmp_path):
    err = tmp_path / "err"
    p = minillm("generate", "--ckpt", base["run"], "--max-tokens", "1000000", "--stream", "--device", "cpu",
                stdout=subprocess.PIPE, stderr=err.open("w"))
    try:
        assert p.stdout.read(1)  # it is generating
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
        assert p.returncode == 143, err.read_text()
    finally:
        if p.poll() is None:
            kill(p)
    text = err.read_text()
    assert "Traceback" not in text and error_lines(text) == [INTERRUPTED.format("SIGTERM")], text


def _unhandled(*_: object) -> None:
    raise AssertionError("SIGTERM reached the test's own handler: the command did not handle it")


def _signal_inside(monkeypatch, module, name: str, sig: int = signal.SIGTERM) -> None:
    """Make ``module.name`` send ``sig`` to this process (a real signal) when called, then do its work."""
    real = getattr(module, name)

    def signalled(*a, **kw):
        os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, signalled)


def test_sigterm_stops_init_tokenizer_evaluate_and_export_cleanly(runner, base, tmp_path, monkeypatch):
    import safetensors.torch

    from minillm import evaluation, tokenizer

    cases = [
        (tokenizer, "train_tokenizer", ["init-tokenizer", "-f", base["corpus"], "--vocab-size", "300",
                                        "-o", tmp_path / "tok.json"]),
        (evaluation, "score", ["evaluate", "--ckpt", base["run"], "--test-file", base["corpus"], "--device", "cpu"]),
        (safetensors.torch, "save_file", ["export", "--ckpt", base["run"], "-o", tmp_path / "ex"]),
    ]
    before = signal.signal(signal.SIGTERM, _unhandled)  # SIGTERM's default would end pytest itself
    try:
        for module, name, args in cases:
            with monkeypatch.context() as m:
                _signal_inside(m, module, name)
                r = cli(runner, *args)
            assert error_lines(r.stderr) == [INTERRUPTED.format("SIGTERM")], r.output
            assert r.exit_code == 143 and signal.getsignal(signal.SIGTERM) is _unhandled
    finally:
        signal.signal(signal.SIGTERM, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary file or directory


# ------------------------------------------------------------------ a full disk while saving a checkpoint


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes: writes then fail with ENOSPC, as the OS says."""

    room = 2048

    def write(self, b) -> int:
        if self.tell() + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def full_disk_for(monkeypatch, name: str) -> None:
    """Temporary files of ``name`` opened by atomic_open land on a full disk; torch.save stays real."""
    real = os.fdopen

    def fdopen(fd, mode="r", *a, **kw):
        if "b" in mode and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            return io.BufferedWriter(_FullDisk(fd, "wb"))
        return real(fd, mode, *a, **kw)

    monkeypatch.setattr(os, "fdopen", fdopen)


def _mount_point(p: Path) -> Path:
    p = p.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


def test_torchs_own_error_on_a_full_disk_says_no_space_left(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(4)}})
    before = path.read_bytes()
    full_disk_for(monkeypatch, "ckpt_last.pt")
    with pytest.raises(MiniLLMError) as e:
        save_checkpoint(path, {"model": {"w": torch.ones(100_000)}})
    cause = e.value.__cause__
    assert isinstance(cause, RuntimeError) and "[enforce fail at inline_container.cc" in str(cause)  # torch's own
    assert str(e.value) == (f"no space left on {_mount_point(tmp_path)} while writing {path}; the previous checkpoint "
                            f"is intact; free some disk space or write elsewhere")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt_last.pt"]


def test_train_on_a_full_disk_says_no_space_left_and_keeps_the_checkpoint(runner, base, tmp_path, monkeypatch):
    run = copy_run(base, tmp_path)
    before = (run / "ckpt_last.pt").read_bytes()
    full_disk_for(monkeypatch, "ckpt_last.pt")
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
            "--eval-every", "2", "--resume")
    failed(r, 1, f"no space left on {_mount_point(run)} while writing {run / 'ckpt_last.pt'}",
           "the previous checkpoint is intact")
    assert (run / "ckpt_last.pt").read_bytes() == before
    no_temps(run)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a real tmpfs of ``size`` bytes at ``tmp_path/disk``; skipped where mounting is not
    permitted (not root, or no CAP_SYS_ADMIN)."""
    d = tmp_path / "disk"
    d.mkdir()

    def mount(size: int) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        return d

    yield mount
    if os.path.ismount(d):
        subprocess.run(["umount", "--lazy", str(d)], check=True)  # the test process may still map a cache file


def test_a_real_full_disk_while_saving_a_checkpoint(small_disk):
    disk = small_disk(64 << 10)
    path = disk / "ckpt_last.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(4)}})
    before = path.read_bytes()
    with pytest.raises(MiniLLMError) as e:
        save_checkpoint(path, {"model": {"w": torch.ones(100_000)}})  # 400 KB on a 64 KiB disk
    assert str(e.value) == (f"no space left on {disk} while writing {path}; the previous checkpoint is intact; "
                            f"free some disk space or write elsewhere")
    assert path.read_bytes() == before and [p.name for p in disk.iterdir()] == ["ckpt_last.pt"]


def test_train_on_a_real_full_disk_says_no_space_left_and_resumes_elsewhere(runner, base, tmp_path, small_disk):
    used = sum(p.stat().st_size for p in base["run"].rglob("*") if p.is_file())
    disk = small_disk(used + (256 << 10))  # the run fits, with room for the cache's files but not a checkpoint
    run = disk / "run"
    shutil.copytree(base["run"], run)
    before = (run / "ckpt_last.pt").read_bytes()
    args = ["train", "-t", base["tok"], "-c", base["corpus"], *TINY, "--max-steps", "6", "--eval-every", "2", "--resume"]
    r = cli(runner, *args, "-o", run)
    failed(r, 1, f"no space left on {disk} while writing {run / 'ckpt_last.pt'}; the previous checkpoint is intact")
    assert (run / "ckpt_last.pt").read_bytes() == before
    no_temps(run)
    moved = shutil.copytree(run, tmp_path / "moved")  # to a disk with room: the run continues
    r = cli(runner, *args, "-o", moved)
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ FIFOs where files are expected


@pytest.fixture
def fifo_guard():
    """Named pipes made by ``make``; a reader that opened one by mistake gets end-of-file instead of hanging."""
    fifos, stop = [], threading.Event()

    def unblock():
        while not stop.wait(0.2):
            for f in fifos:
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))  # only succeeds while a reader waits
                except OSError:
                    pass

    t = threading.Thread(target=unblock, daemon=True)
    t.start()

    def make(path: Path) -> Path:
        os.mkfifo(path)
        fifos.append(path)
        return path

    yield make
    stop.set()
    t.join()


def test_a_fifo_in_a_prepare_corpus_input_directory_is_skipped_with_a_note(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("un documento\n")
    os.mkfifo(d / "b.txt")  # nobody writes to it: opening it would block forever
    r = subprocess.run([sys.executable, "-m", "minillm", "prepare-corpus", "-i", d, "-o", tmp_path / "o.txt"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"note: skipped {d / 'b.txt'}: it is a FIFO (named pipe), not a regular file" in r.stderr
    assert (tmp_path / "o.txt").read_text() == "un documento\n"


def test_a_fifo_given_as_an_input_file_is_named_as_such(runner, base, tmp_path, fifo_guard):
    f = fifo_guard(tmp_path / "c.fifo")
    what = f"{f} is a FIFO (named pipe), not a regular file"
    cases = [
        (["train", "-t", base["tok"], "-c", f, "-o", tmp_path / "r", *TINY], 1, f"--corpus: {what}"),
        (["train", "-t", f, "-c", base["corpus"], "-o", tmp_path / "r", *TINY], 1, f"--tokenizer: {what}"),
        (["prepare-corpus", "-i", f, "-o", tmp_path / "o.txt"], 2, what),
        (["init-tokenizer", "-f", f, "-o", tmp_path / "t.json"], 2, f"--files: {what}"),
        (["analyze-corpus", "-c", f], 1, f"--corpus: {what}"),
        (["evaluate", "--ckpt", base["run"], "--test-file", f, "--device", "cpu"], 1, f"--test-file: {what}"),
        (["generate", "--ckpt", base["run"], "--tokenizer", f, "--device", "cpu"], 1, f"--tokenizer: {what}"),
        (["finetune", "--ckpt", base["run"], "--data", f, "-o", tmp_path / "ft"], 1, f"--data: {what}"),
    ]
    for args, code, needle in cases:
        failed(cli(runner, *args), code, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.fifo"]


@pytest.mark.parametrize("flag", ["--prompt-file", "--adapter"])
def test_generate_names_a_fifo_prompt_file_or_adapter(tmp_path, runner, flag):
    """A FIFO given as --prompt-file or --adapter is named as such at once (opening it would block)."""
    from minillm.cli import app

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    ckpt = Path(__file__).resolve().parent / "fixtures" / "v_c624e6b" / "run" / "ckpt_best.pt"
    r = runner.invoke(app, ["generate", "--ckpt", str(ckpt), "--device", "cpu", flag, str(fifo)])
    assert r.exit_code == 1, r.output
    assert f"{flag}: {fifo} is a FIFO" in r.stderr
