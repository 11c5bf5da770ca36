"""``--compile background`` (``minillm.generation.background`` and ``StepChunk``'s background compile): the plain
chunks decode while a thread compiles the chunk step against buffers of its own; the chunk switches to the compiled
step once it is ready (no recompilation: every buffer is an argument), with the same tokens; a failed compile
leaves the plain steps with one warning; no CUDA graph is captured while a build runs."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

from minillm.generation import Sampling, StepChunk, decode_mode, finish_background, generate_batch
from minillm.generation.background import Background, busy
from tests.test_generation_decoder import CASES, RECORDED, SHAPES, runs, varied_model


@pytest.fixture
def no_recompile():
    """A second compilation of a function fails (on any thread)."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def chunks(m) -> list[StepChunk]:
    return [c for c in m.decoders.values() if isinstance(c, StepChunk)]


def switched(c: StepChunk) -> bool:
    return c.token != c.plain.run


def test_background_runs_the_build_says_how_it_went_and_is_busy_meanwhile():
    go = threading.Event()

    def build_it():
        go.wait(10)
        return 42

    bg = Background(build_it, "the test build")
    assert busy() and not bg.done() and not bg.wait(0.01)
    assert [f for _, f in bg.stack()][-3:] == ["build_it", "wait", "wait"]  # Event.wait, then Condition.wait
    go.set()
    assert bg.wait(10) and not busy()
    assert bg.stack() == []
    assert bg.result == 42 and bg.note.startswith("the test build: ready in") and bg.seconds >= 0
    bad = Background(lambda: 1 / 0, "the bad build")
    assert bad.wait(10) and bad.result is None and not busy()
    assert bad.note == "the bad build failed (ZeroDivisionError: division by zero)"


def test_compile_background_is_a_mode_on_every_device():
    assert decode_mode(torch.device("cpu"), "background") == decode_mode(torch.device("cuda"), "background") == "background"


@pytest.mark.parametrize("case", ["greedy", "default"])
def test_chunks_switch_to_the_background_compiled_step_and_give_the_recorded_tokens(monkeypatch, no_recompile, case):
    """Dynamo's eager backend (the tracing, no code generation: the same arithmetic). The compiled function first
    runs on the background twin's buffers, then on the chunk's own: a recompilation would fail here (so would a
    graph break: fullgraph). Every chunk shape of the recorded calls switches, and the tokens stay the recorded
    ones before, during and after."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    counters.clear()
    m = varied_model(**SHAPES["gqa"])
    warnings: list[str] = []
    for _ in range(12):  # one background compile at a time: each call starts, finishes or switches some
        assert runs(m, CASES[case], "background", 16, warn=warnings.append) == RECORDED[f"gqa/{case}"]
        finish_background(m, timeout=60)
        if chunks(m) and all(switched(c) for c in chunks(m)):
            break
    assert not warnings
    assert len(chunks(m)) == 4 and all(switched(c) for c in chunks(m))
    assert runs(m, CASES[case], "background", 16) == RECORDED[f"gqa/{case}"]  # all of it compiled now
    assert counters["stats"]["unique_graphs"] == 4  # one per chunk shape: the twin's compile serves the chunk


def test_a_failing_background_compile_leaves_the_plain_steps_with_one_warning(monkeypatch):
    def broken(*_a, **_kw):
        def fail(*_args):
            raise RuntimeError("inductor said no\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    m = varied_model()
    s = Sampling(temperature=0.8, top_k=20, repetition_penalty=1.2)
    want = [c.tokens for c in generate_batch(m, [[1, 5, 6, 7]], 60, sampling=s, mode="static", chunk=8,
                                             generator=torch.Generator().manual_seed(1))]
    warnings: list[str] = []
    for _ in range(3):
        got = [c.tokens for c in generate_batch(m, [[1, 5, 6, 7]], 60, sampling=s, mode="background", chunk=8,
                                                generator=torch.Generator().manual_seed(1), warn=warnings.append)]
        assert got == want
        assert all(bg.done() for bg in finish_background(m, timeout=60))
    assert warnings == ["the background compile of the decode step failed (RuntimeError: inductor said no); "
                        "decoding goes on uncompiled"]
    assert not any(switched(c) for c in chunks(m))


def test_chunks_wait_for_the_device_only_while_a_build_runs(monkeypatch):
    """While the background compile runs, each chunk waits for the device (``distributed.synchronize``: the
    interpreter lock released, on CUDA) before its read-back; once the build has ended (here it fails), none does."""
    from minillm.generation import decoder

    go, waits = threading.Event(), []

    def slow(*_a, **_kw):
        go.wait(30)
        raise RuntimeError("not today")

    monkeypatch.setattr(torch, "compile", slow)
    monkeypatch.setattr(decoder, "synchronize", lambda device: waits.append(device.type))
    m = varied_model()
    s = Sampling(temperature=0.8, top_k=20, repetition_penalty=1.2)

    def run() -> None:
        generate_batch(m, [[1, 5, 6, 7]], 60, sampling=s, mode="background", chunk=8,
                       generator=torch.Generator().manual_seed(1), warn=lambda _: None)

    run()
    assert waits and set(waits) == {"cpu"}  # the build started at the first chunk and is still running
    go.set()
    assert all(bg.done() for bg in finish_background(m, timeout=60))
    run()  # the first chunk takes the failed build's note, then no build runs
    waits.clear()
    run()
    assert waits == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_capture_while_a_background_build_runs_on_cuda():
    """The graph chunk warms up, then stays uncaptured (eager chunks) while another build is at work, and captures
    once it has ended."""
    m = varied_model(dtype=torch.float32).cuda()
    go = threading.Event()
    bg = Background(lambda: go.wait(30), "a build that waits")
    try:
        for _ in range(3):
            generate_batch(m, [[1, 5, 6, 7]], 40, sampling=Sampling(temperature=0), mode="graph", chunk=8)
        assert chunks(m) and all(c.graph is None and c.calls > 1 for c in chunks(m))
    finally:
        go.set()
        bg.wait(30)
    generate_batch(m, [[1, 5, 6, 7]], 40, sampling=Sampling(temperature=0), mode="graph", chunk=8)
    assert all(c.graph is not None for c in chunks(m))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_background_compiled_chunks_give_the_eager_fp32_greedy_tokens_on_cuda(no_recompile):
    """inductor on CUDA, fp32 greedy: the tokens of plain PyTorch before the switch, while compiling and after it
    (the compiled chunk captured in a CUDA graph and replayed), compiled once per chunk shape on the background
    thread and no more."""
    from torch._dynamo.utils import counters

    m = varied_model(dtype=torch.float32).cuda()
    want = runs(m, CASES["greedy"], "eager", 1, "cuda")
    counters.clear()
    warnings: list[str] = []
    for _ in range(12):
        assert runs(m, CASES["greedy"], "background", 16, "cuda", warn=warnings.append) == want
        finish_background(m, timeout=120)
        if chunks(m) and all(switched(c) and c.graph is not None for c in chunks(m)):
            break
    assert not warnings
    assert chunks(m) and all(switched(c) and c.graph is not None for c in chunks(m))
    assert runs(m, CASES["greedy"], "background", 16, "cuda") == want  # replays of the compiled chunks
    assert counters["stats"]["unique_graphs"] == len(chunks(m))
