"""prepare-corpus's worker processes (corpus/workers.py): results in order, a worker's exception or death in the
parent, and stopping at any moment (closed mid-way while workers send large results, or a real signal while the
parent waits) with every worker killed and reaped at once. The CLI end to end: tests/test_faults.py."""

from __future__ import annotations

import fcntl
import operator
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minillm.corpus.workers import PIPE_BYTES, _widen, ordered_map, signals_held
from minillm.errors import MiniLLMError

ROOT = Path(__file__).resolve().parents[1]


def pid_and_bytes(n: int) -> tuple[int, bytes]:
    """A worker's pid and a result of ``n`` bytes (more than a pipe holds: its sender blocks until it is read)."""
    return os.getpid(), bytes(n)


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def signal_masks(_: int) -> dict[str, int]:
    """The calling worker's blocked and ignored signal sets, from /proc."""
    fields = dict(line.split(":\t") for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
    return {k: int(fields[k], 16) for k in ("SigBlk", "SigIgn")}


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_results_come_in_order_from_every_worker():
    assert list(ordered_map(operator.mul, [(i, 3) for i in range(25)], workers=2)) == [3 * i for i in range(25)]
    pids = [p for p, _ in ordered_map(pid_and_bytes, [(1,)] * 6, workers=3)]
    assert len(set(pids)) == 3 and pids[:3] == pids[3:]  # task i on worker i % 3
    assert all(map(gone, pids))  # exhausted: all stopped


def test_a_workers_exception_is_raised_in_the_parent():
    with pytest.raises(ValueError, match="invalid literal"):
        list(ordered_map(int, [("12",), ("twelve",)], workers=2))


def test_a_worker_that_dies_is_named_with_its_exit_code_or_signal():
    with pytest.raises(MiniLLMError, match=r"\(exit code 3;.*fewer --workers"):
        list(ordered_map(os._exit, [(3,)], workers=2))
    with pytest.raises(MiniLLMError, match=r"\(killed by signal 9;"):
        list(ordered_map(killed, [()], workers=2))


def test_closed_while_workers_are_sending_large_results_it_stops_at_once():
    """multiprocessing.Pool's terminate() could wait forever here (a worker half-way through sending a result)."""
    it = ordered_map(pid_and_bytes, [(16 << 20,)] * 12, workers=2)
    pids: list[int] = []

    def take_one_and_close():
        pids.append(next(it)[0])
        time.sleep(0.5)  # both workers now blocked sending the next 16 MB
        it.close()

    t = threading.Thread(target=take_one_and_close)
    t0 = time.perf_counter()
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "closing the map waited on its workers"
    assert time.perf_counter() - t0 < 10 and gone(pids[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_parent_waits_for_a_result_stops_every_worker(sig):
    def raise_(*_):
        raise KeyboardInterrupt

    old = signal.signal(sig, raise_)  # as the CLI's handlers do
    it = ordered_map(pid_after, [(0,), (0,), (60,), (60,)], workers=2)
    pids = [next(it), next(it)]  # both workers started; now each sleeps 60 s
    timer = threading.Timer(0.5, os.kill, (os.getpid(), sig))
    t0 = time.perf_counter()
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            next(it)  # waiting on the first worker's result
    finally:
        timer.cancel()
        signal.signal(sig, old)
    assert time.perf_counter() - t0 < 10 and all(map(gone, pids))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_workers_ignore_sigint_and_block_nothing():
    """A Ctrl-C reaches the workers too (the terminal signals the whole group): they ignore it, and the signals the
    parent held while starting them are not left blocked."""
    for masks in ordered_map(signal_masks, [(0,), (1,)], workers=2):
        assert masks["SigIgn"] & (1 << (signal.SIGINT - 1)) and masks["SigBlk"] == 0


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ") or os.geteuid() != 0
                    and int(open("/proc/sys/fs/pipe-max-size").read()) < PIPE_BYTES, reason="Linux pipes of 1 MiB")
def test_pipes_hold_about_a_batch():
    from multiprocessing import Pipe

    r, w = Pipe(duplex=False)
    _widen(w)
    assert fcntl.fcntl(r.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_BYTES


# a fresh interpreter (no resource tracker running yet) records the parent's blocked signals as each process starts
STARTS = """
import signal, sys
from multiprocessing import util
from minillm.corpus.workers import ordered_map
spawn, blocked = util.spawnv_passfds, []
def recording(path, args, fds):
    blocked.append(signal.pthread_sigmask(signal.SIG_BLOCK, set()) >= {signal.SIGINT, signal.SIGTERM})
    return spawn(path, args, fds)
util.spawnv_passfds = recording
assert list(ordered_map(abs, [(-1,), (-2,)], workers=2)) == [1, 2]
print(blocked)
"""


def test_workers_start_with_sigint_and_sigterm_blocked():
    """So a Ctrl-C to the process group while a worker starts is discarded, not a traceback (the worker then ignores
    SIGINT); starting multiprocessing's resource tracker unblocks both in the parent, so it is started first."""
    r = subprocess.run([sys.executable, "-c", STARTS], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[-2] == "[True, True, True]", r.stdout  # the resource tracker, then 2 workers


def test_signals_held_act_when_the_block_ends():
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached = True  # not interrupted inside
    assert reached
