"""Worker processes for prepare-corpus: an ordered map over tasks, on processes that can be stopped at any moment.

``multiprocessing.Pool`` is not used: its ``terminate()`` waits forever when a worker is half-way through sending a
large result (a cleaned batch is about 1 MB): the worker holds the result queue's lock, and either the pool's
task-handler thread waits on that lock after the worker is terminated, or the parent waits on it to send its
sentinel once the pool's result-handler thread has stopped reading (both seen with stacks, the first on SIGTERM, the
second on Ctrl-C; scripts/stress_prepare_signal.py). Here each worker has a pipe of its own each way, no lock is
shared, the parent has no thread, and stopping is SIGKILL and waitpid, which wait on nothing a worker holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from minillm.errors import MiniLLMError

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PIPE_BYTES = 1 << 20  # a pipe's buffer: about one batch, so a sender seldom waits for its reader (Linux's limit)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then act as they would have: the code inside is not interrupted
    half-way. They are blocked in this thread (processes started inside begin with them blocked: the mask is
    inherited), and in the main thread their handlers only note them meanwhile (another thread may receive them)."""
    noted: list[int] = []
    in_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in STOP_SIGNALS} if in_main else {}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here is noted now (it checks for signals)
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)  # its own handler: KeyboardInterrupt, the CLI's SIGTERM, or the default


def _serve(fn: Callable, tasks, results) -> None:
    """A worker: ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the parent alone stops, and kills
    its workers), read tasks on a thread (so the parent's send never waits on this process sending a result), and send
    ``(True, fn(*task))`` or ``(False, exception)`` for each, in order, until the parent closes the pipe or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also discards a Ctrl-C that came while starting (blocked then)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(tasks, inbox), daemon=True).start()
    try:
        for task in iter(inbox.get, None):
            try:
                out = (True, fn(*task))
            except Exception as e:
                out = (False, e)
            results.send(out)
    except OSError:  # the parent is gone
        pass


def _receive(tasks, inbox: queue.SimpleQueue) -> None:
    try:
        while True:
            inbox.put(tasks.recv())
    except (EOFError, OSError):
        inbox.put(None)


def _widen(conn) -> None:
    """Give a pipe a buffer of ``PIPE_BYTES`` (Linux; elsewhere, or where the system's limit is lower, it stays as is:
    only speed changes: 108 MB cleaned on 2 workers in 5.7 s rather than 6.2 s with 64 KiB pipes, medians of 5)."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _result(proc, results):
    """The next result of one worker (its exception re-raised here); a clear error if the worker died."""
    try:
        ok, value = results.recv()
    except EOFError:
        proc.join(5)
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise MiniLLMError(f"a worker process ended unexpectedly ({how}; killed by signal 9 is most often memory "
                           "running out); run again with fewer --workers, or --workers 1") from None
    if not ok:
        raise value
    return value


def ordered_map(fn: Callable, tasks: Iterable[tuple], workers: int, depth: int = 2) -> Iterator:
    """``fn(*task)`` for each task, in order, computed on ``workers`` spawned processes (task ``i`` on worker
    ``i % workers``) with at most ``depth`` tasks in flight each. Leaving the iterator in any way (exhausted, closed,
    an exception or a signal anywhere) kills the processes and reaps them before the exception goes on."""
    import multiprocessing as mp
    from multiprocessing import resource_tracker

    ctx = mp.get_context("spawn")  # no fork of a possibly threaded parent
    resource_tracker.ensure_running()  # every start needs it: it unblocks SIGINT and SIGTERM after starting itself
    procs, sends, recvs = [], [], []
    try:
        with signals_held():  # a start is never cut half-way (a child we would not know of)
            for _ in range(workers):
                task_r, task_w = ctx.Pipe(duplex=False)
                res_r, res_w = ctx.Pipe(duplex=False)
                _widen(task_w)
                _widen(res_w)
                p = ctx.Process(target=_serve, args=(fn, task_r, res_w), daemon=True)
                p.start()
                procs.append(p)
                sends.append(task_w)
                recvs.append(res_r)
                task_r.close()  # the worker's ends: EOF reaches each side when the other goes
                res_w.close()
        pending: deque[int] = deque()
        for i, task in enumerate(tasks):
            w = i % workers
            sends[w].send(task)
            pending.append(w)
            if len(pending) >= depth * workers:
                w = pending.popleft()
                yield _result(procs[w], recvs[w])
        while pending:
            w = pending.popleft()
            yield _result(procs[w], recvs[w])
    finally:
        with signals_held():
            for p in procs:
                p.kill()
            for p in procs:
                p.join()
            for c in sends + recvs:
                c.close()
