"""minillm.io: atomic writes (an error mid-write keeps the previous file), atomic links, our JSON files, the
file modes, the process's start time and the run lock (held until its process is gone)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from minillm.errors import MiniLLMError
from minillm.io import (
    RunLock,
    atomic_link,
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_an_error_mid_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "h.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w", encoding="utf-8") as f:
        f.write('{"v": 2, "half')
        raise RuntimeError("disk on fire")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]


def test_a_written_file_gets_the_umask_mode_and_the_umask_is_left_as_it_was(tmp_path):
    code = ("import os, sys; from minillm.io import atomic_write_text, current_umask\n"
            "os.umask(0o027); atomic_write_text(sys.argv[1], 'x'); print(oct(current_umask()), oct(current_umask()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.txt")], cwd=ROOT, env=ENV, text=True,
                         capture_output=True, check=True).stdout
    assert out.split() == ["0o27", "0o27"]
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600


def test_read_json_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(MiniLLMError, match=rf"^{path} does not exist; restore it$"):
        read_json(path, "restore it")
    for text, why in ((b'{"a": 1', r"not valid JSON \(Expecting ',' delimiter at line 1 column 8; truncated"),
                      (b"[1, 2]", "a JSON list, not an object"),
                      ('{"a": "\xe9"}'.encode("latin-1"), r"not valid JSON \(not UTF-8 at byte 7\)")):
        path.write_bytes(text)
        with pytest.raises(MiniLLMError, match=rf"^{path} is damaged: {why}.*; restore it$"):
            read_json(path, "restore it")
    atomic_write_json(path, {"a": [1, "é"]})
    assert read_json(path, "restore it") == {"a": [1, "é"]}


def test_atomic_link_is_a_hard_link_that_a_later_replace_of_the_source_leaves_alone(tmp_path):
    src, dst = tmp_path / "ckpt_last.pt", tmp_path / "ckpt_best.pt"
    atomic_write_text(src, "step 1")
    atomic_write_text(dst, "step 0")
    atomic_link(src, dst)
    assert os.path.samefile(src, dst)  # no second copy of a large checkpoint
    atomic_write_text(src, "step 2")  # the next save replaces ckpt_last.pt
    assert dst.read_text() == "step 1" and src.read_text() == "step 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_best.pt", "ckpt_last.pt"]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second filesystem")
def test_atomic_link_across_filesystems_copies(tmp_path):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem here")
        src, dst = Path(other) / "ckpt_last.pt", tmp_path / "ckpt_best.pt"
        atomic_write_text(src, "step 1")
        atomic_link(src, dst)  # a hard link fails across filesystems (EXDEV)
        assert dst.read_text() == "step 1" and not os.path.samefile(src, dst)
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt_best.pt"]


def test_process_started_at_counts_the_time_before_the_first_line():
    code = ("import time; time.sleep(1.5); from minillm.io import process_started_at; "
            "print(process_started_at(), time.time())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, text=True, capture_output=True,
                         check=True).stdout
    started, now = map(float, out.split())
    assert 1.5 <= now - started < 30  # the sleep and the interpreter's start, in clock ticks (1/100 s)


def test_the_lock_refuses_a_live_owner_and_clears_a_dead_one(tmp_path):
    lock = RunLock(tmp_path)
    with lock:
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(MiniLLMError, match=rf"in use by another process \(pid {os.getpid()} "):
            RunLock(tmp_path).acquire()  # this very process holds it
    assert not (tmp_path / ".lock").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleeper.kill()
    sleeper.wait()
    # a record without a kernel lock on the file is a killed run's (or an older version's): free
    for stale in (f"{sleeper.pid} {time.time():.0f} {os.uname().nodename}\n", "", "garbage"):  # dead, half-written
        (tmp_path / ".lock").write_text(stale)
        with RunLock(tmp_path) as lock:
            assert lock.held
        assert not (tmp_path / ".lock").exists()
