"""K decode steps per call (``StepChunk``): the same tokens as the one-step decoder of before (recorded from it,
in tests/fixtures/generation_tokens.json), greedy and seeded, batched, with stop tokens, sliding and a generator
shared by several calls; chunks really run, sliding falls back to single steps, ended rows emit padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minillm.generation import PAD, Sampling, StepChunk, generate_batch
from minillm.model.gpt import GPT
from tests.test_generation import varied_model as _varied_model

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "generation_tokens.json").read_text(encoding="utf-8"))
PROMPTS = [[1, 5, 6, 7], [1], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 2, 2, 2, 2, 2]]
CASES = {
    "greedy": Sampling(temperature=0),
    "greedy_pen": Sampling(temperature=0, repetition_penalty=1.3),
    "default": Sampling(temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1),
    "hot": Sampling(temperature=1.5, top_k=20, repetition_penalty=1.2),
}
SHAPES = {"plain": {}, "gqa": {"n_kv_head": 2, "qk_norm": True}}


def varied_model(seed: int = 0, vocab_size: int = 64, block_size: int = 64, dtype=torch.float64, **kw) -> GPT:
    """The model the tokens were recorded with (test_generation's ``varied_model``, block 64)."""
    return _varied_model(seed, vocab_size, block_size, dtype, **kw)


def runs(m: GPT, sampling: Sampling, mode: str, chunk: int, device: str = "cpu", **kw) -> list[list[list[int]]]:
    """The recorded sequence of calls, sharing one generator: a batch with a stop token, one prompt ending early,
    two rows of 100 tokens (they slide: block 64), one prompt of 37 tokens."""
    g = torch.Generator(device).manual_seed(3)

    def run(prompts, n, stop_id=None):
        return [c.tokens for c in generate_batch(m, prompts, n, sampling=sampling, generator=g, mode=mode,
                                                 chunk=chunk, stop_id=stop_id, **kw)]

    return [run(PROMPTS, 40, stop_id=9), run([PROMPTS[0]], 30, stop_id=9), run(PROMPTS[:2], 100),
            run([PROMPTS[2]], 37)]


@pytest.fixture(scope="module")
def models():
    return {name: varied_model(**kw) for name, kw in SHAPES.items()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode,chunk", [("eager", 1), ("static", 5), ("static", 16)])
def test_chunks_give_the_tokens_recorded_from_the_one_step_decoder(models, shape, case, mode, chunk):
    assert runs(models[shape], CASES[case], mode, chunk) == RECORDED[f"{shape}/{case}"]


def test_the_recording_covers_early_ends_and_full_lengths():
    """The cases the rewind and the trimming need: a row that ends after a few tokens, rows that run to the end."""
    lengths = [len(t) for rows in RECORDED.values() for call in rows for t in call]
    assert min(lengths) < 10 and max(lengths) == 100 and len(RECORDED) == 8


@pytest.fixture
def spy(monkeypatch):
    """Every chunk read (``StepChunk.finish``): the (B, K) tokens it returned."""
    calls = []
    real = StepChunk.finish

    def wrapped(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(out[0])
        return out

    monkeypatch.setattr(StepChunk, "finish", wrapped)
    return calls


def test_chunks_run_and_sliding_falls_back_to_single_steps(spy):
    m = varied_model(block_size=16)
    one = generate_batch(m, [[1, 7, 3]], 40, sampling=Sampling(temperature=0), mode="static")[0].tokens
    assert not spy
    got = generate_batch(m, [[1, 7, 3]], 40, sampling=Sampling(temperature=0), mode="static", chunk=4)[0].tokens
    assert got == one
    # 40 tokens through a block of 16 slide twice: chunks before each slide, single steps around them
    assert 2 <= len(spy) < 10 and all(len(r) == 4 for call in spy for r in call)


def test_rows_after_their_stop_token_emit_padding(spy):
    m = varied_model()
    free = [c.tokens for c in generate_batch(m, PROMPTS, 24, sampling=Sampling(temperature=0), mode="static")]
    stop = free[0][3]
    got = generate_batch(m, PROMPTS, 24, sampling=Sampling(temperature=0), mode="static", chunk=8, stop_id=stop)
    first = [t for call in spy for t in call[0]]  # row 0, chunk after chunk
    at = first.index(stop)
    assert got[0].tokens == free[0][:at] and got[0].reason == "doc"
    assert first[at + 1:] and set(first[at + 1:]) == {PAD}


def test_eager_mode_and_no_cache_ignore_the_chunk(spy):
    m = varied_model()
    ref = generate_batch(m, [PROMPTS[0]], 20, sampling=Sampling(temperature=0))[0].tokens
    for kw in ({"mode": "eager"}, {"use_cache": False}):
        assert generate_batch(m, [PROMPTS[0]], 20, sampling=Sampling(temperature=0), chunk=8, **kw)[0].tokens == ref
    assert not spy


def test_a_generation_ending_inside_a_chunk_leaves_the_generator_where_one_step_leaves_it():
    m = varied_model()
    s = CASES["hot"]
    states = []
    for chunk in (1, 16):
        g = torch.Generator().manual_seed(11)
        out = generate_batch(m, [PROMPTS[0]], 21, sampling=s, generator=g, mode="static", chunk=chunk)[0]
        states.append((out.tokens, g.get_state()))
    assert len(states[0][0]) == 21 and states[0][0] == states[1][0]
    assert torch.equal(states[0][1], states[1][1])


@pytest.fixture
def launches(monkeypatch):
    """Every chunk launched: whether it followed the previous one before that was read (``follow``)."""
    follows = []
    real = StepChunk.launch

    def wrapped(self, *a, follow=False, **kw):
        follows.append(follow)
        return real(self, *a, follow=follow, **kw)

    monkeypatch.setattr(StepChunk, "launch", wrapped)
    return follows


def test_the_next_chunk_is_launched_before_the_last_is_read(launches):
    """A long generation launches each chunk while the previous one is still unread (the GPU never waits for the
    host between chunks), and its tokens are the one-step loop's."""
    m = varied_model(block_size=128)
    s = CASES["default"]
    one = generate_batch(m, PROMPTS[:2], 60, sampling=s, generator=torch.Generator().manual_seed(1), mode="static")
    got = generate_batch(m, PROMPTS[:2], 60, sampling=s, generator=torch.Generator().manual_seed(1), mode="static",
                         chunk=8)
    assert [c.tokens for c in got] == [c.tokens for c in one]
    assert launches[0] is False and launches.count(True) >= 5


def test_no_chunk_is_launched_ahead_before_the_graph_is_captured():
    """A graphed chunk captures at its second launch: launched ahead, the capture would hold back the first chunk's
    read-back (``--stream``'s first print), so the chunk after the first waits for it; once captured, chunks follow."""
    from minillm.generation.static import StaticDecodeStep
    from minillm.model.gpt import KVCache

    m = varied_model()
    cache = KVCache(m.cfg, 1, 32, "cpu", torch.float64)
    chunk = StepChunk(StaticDecodeStep(m, cache), cache, 4, CASES["default"], None, m.cfg.vocab_size, graphed=True)
    assert not chunk.pipelined
    chunk.graph = object()  # as if captured
    assert chunk.pipelined
    assert StepChunk(StaticDecodeStep(m, cache), cache, 4, CASES["default"], None, m.cfg.vocab_size,
                     graphed=False).pipelined


@pytest.mark.parametrize("at", [8, 11])  # the last token of the first chunk, or inside the second
def test_a_generation_stopped_while_the_next_chunk_runs_rewinds_the_generator(at):
    """``on_token`` stops the only row at token ``at`` while the chunk after it is already launched: the tokens
    and the generator after are the one-step loop's (the launched chunk's draws are undone)."""
    m = varied_model()
    s = CASES["hot"]
    got = []
    for chunk in (1, 8):
        g = torch.Generator().manual_seed(4)
        seen = []
        out = generate_batch(m, [PROMPTS[0]], 40, sampling=s, generator=g, mode="static", chunk=chunk,
                             on_token=lambda _b, t, seen=seen: seen.append(t) or len(seen) == at)[0]
        got.append((out.tokens, out.reason, g.get_state()))
    assert len(got[0][0]) == at and got[0][1] == "stop"
    assert got[0][:2] == got[1][:2] and torch.equal(got[0][2], got[1][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_cuda_graph_chunks_give_the_one_step_tokens_on_cuda(mode):
    """fp32 on CUDA: K steps captured in one graph (sampling with a CUDA generator, the penalty mask, stop tokens,
    sliding rows, early ends) give the tokens of the one-token graph decoder of before, which runs the same
    decode step; called twice, so the second call replays. Greedy also against plain PyTorch."""
    m = varied_model(dtype=torch.float32).cuda()
    for case in ("greedy", "default", "hot"):
        ref = runs(m, CASES[case], mode, 1, "cuda")
        assert runs(m, CASES[case], mode, 16, "cuda") == ref
        assert runs(m, CASES[case], mode, 16, "cuda") == ref
    assert runs(m, CASES["greedy"], "eager", 1, "cuda") == runs(m, CASES["greedy"], mode, 16, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_projections_capture_and_replay_on_cuda():
    """The fused decode step (concatenated projections) inside the K-step graph gives the tokens of the same
    fused step run eagerly one token at a time."""
    m = varied_model(dtype=torch.float32).cuda()
    ref = runs(m, CASES["default"], "static", 1, "cuda", fused=True)
    assert runs(m, CASES["default"], "graph", 16, "cuda", fused=True) == ref


def test_a_chunk_whose_top_k_ties_past_the_margin_is_redone_with_the_one_step_tokens(monkeypatch):
    """Every token's output row equal: all logits tie, top-k's candidates cannot decide, the chunk is redone
    eagerly with the host check, and the tokens (and the generator after) are the one-step loop's."""
    m = varied_model(vocab_size=128)
    with torch.no_grad():
        m.lm_head.weight.copy_(m.lm_head.weight[5].clone())
    redone = []
    body = StepChunk.body
    monkeypatch.setattr(StepChunk, "body", lambda self, g, redo=False: (redone.append(redo), body(self, g, redo)))
    s = Sampling(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.1)
    got = []
    for chunk in (1, 8):
        g = torch.Generator().manual_seed(5)
        got.append(([c.tokens for c in generate_batch(m, PROMPTS[:2], 30, sampling=s, generator=g, mode="static",
                                                      chunk=chunk)], g.get_state()))
    assert got[0][0] == got[1][0] and torch.equal(got[0][1], got[1][1])
    assert len(set(got[0][0][0])) > 5 and redone.count(True) >= 3


def test_compiled_chunks_trace_whole_compile_once_and_give_the_recorded_tokens(models, monkeypatch):
    """``--compile on``: each chunk step (sampling, bookkeeping, decode step) is one graph (``fullgraph``: no break),
    compiled once per chunk shape (a recompile fails here), the tokens the recorded ones. Dynamo's eager backend
    (the tracing without inductor's code generation, which the CUDA test below runs)."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo broke a later config.patch)
        for case in ("greedy", "default"):
            assert runs(models["gqa"], CASES[case], "compiled", 16) == RECORDED[f"gqa/{case}"]
    assert counters["stats"]["unique_graphs"] >= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_chunk_gives_the_eager_fp32_greedy_tokens_on_cuda():
    """inductor on CUDA, fp32: the compiled chunk steps captured in one CUDA graph give the greedy tokens of plain
    PyTorch (``GPT.forward`` with the KV cache), capture and replay, and compile once per chunk shape."""
    from torch._dynamo.utils import counters

    m = varied_model(dtype=torch.float32).cuda()
    want = runs(m, CASES["greedy"], "eager", 1, "cuda")
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert runs(m, CASES["greedy"], "compiled", 16, "cuda") == want
        assert runs(m, CASES["greedy"], "compiled", 16, "cuda") == want  # the captured graphs replay
    assert counters["stats"]["unique_graphs"] >= 2
    assert any(isinstance(c, StepChunk) and c.graph is not None for c in m.decoders.values())
