"""Work done on a background thread while decoding goes on: ``Background`` runs ``build()`` (a compile and its
warm-up) on a daemon thread and hands back its result or, when it raised, a one-line note. ``busy()`` says whether
any such thread is still at work on the device: a CUDA graph must not be captured meanwhile (another thread's
allocations and synchronisations would break the capture), so captures wait until it is not."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_running: set[Background] = set()
_lock = threading.Lock()


def busy() -> bool:
    """A background build is still running (do not capture a CUDA graph now)."""
    with _lock:
        return bool(_running)


class Background:
    """``build()`` on a daemon thread, started now. ``done()`` polls; ``result`` is what it returned (None until
    it ended, or when it raised), ``note`` one line on how it went, ``seconds`` how long it took."""

    def __init__(self, build: Callable[[], Any], what: str):
        self.result: Any = None
        self.note, self.seconds = "", 0.0
        self._what = what
        with _lock:
            _running.add(self)
        self._thread = threading.Thread(target=self._run, args=(build,), name="minillm-decode-compile", daemon=True)
        self._thread.start()

    def _run(self, build: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            self.result = build()
            self.note = f"{self._what}: ready in {time.perf_counter() - t0:.1f} s"
        except Exception as e:  # noqa: BLE001  a failed build leaves the caller on what it had, never stops it
            self.note = f"{self._what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        finally:
            self.seconds = time.perf_counter() - t0
            with _lock:
                _running.discard(self)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build has ended (at most ``timeout`` seconds); whether it has."""
        self._thread.join(timeout)
        return self.done()

    def stack(self) -> list[tuple[str, str]]:
        """Where the build is now: (file, function) of each frame of its thread, innermost last (empty once it
        ended): what a slow compile is spending its time on."""
        frame = sys._current_frames().get(self._thread.ident)
        out = []
        while frame is not None:
            out.append((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        return out[::-1]
