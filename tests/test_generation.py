"""Sampling and generation: greedy/seeded determinism, top-k/top-p, the CTRL repetition penalty, KV-cache
parity (with sliding), batched = one by one, streaming without split characters, stop strings, and the
`generate` command on a tiny run directory."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillm.checkpoint import save_checkpoint
from minillm.cli import app
from minillm.config import ModelConfig, TrainConfig, pad_vocab, to_dict
from minillm.errors import UsageError
from minillm.generation import (
    Sampling,
    TextStream,
    decode_mode,
    generate,
    generate_batch,
    sample_next_token,
    slide_keep,
)
from minillm.io import sha256_file
from minillm.model.gpt import GPT

V = 64
GREEDY = Sampling(temperature=0)
VARIANTS = [{}, {"n_kv_head": 2, "qk_norm": True}, {"mlp": "gelu", "norm": "layernorm", "bias": True, "n_kv_head": 1}]



def varied_model(seed: int = 0, vocab_size: int = V, block_size: int = 32, dtype=torch.float64, **kw) -> GPT:
    """A tiny model with large random weights, so greedy decoding does not just repeat one token."""
    torch.manual_seed(seed)
    m = GPT(ModelConfig(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=4, block_size=block_size, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.to(dtype).eval()


def make_run(tmp_path: Path, tokenizer_path: Path, block_size: int = 32, seed: int = 0) -> Path:
    """A run directory in the train format (ckpt_best.pt + tokenizer.json copy) holding a tiny model."""
    from minillm.tokenizer import load_tokenizer

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tokenizer_path, run / "tokenizer.json")
    vocab = pad_vocab(load_tokenizer(tokenizer_path).get_vocab_size())
    m = varied_model(seed, vocab_size=vocab, block_size=block_size, dtype=torch.float32)
    save_checkpoint(run / "ckpt_best.pt", {"model": m.state_dict(), "model_config": to_dict(m.cfg),
                                           "train_config": to_dict(TrainConfig()),
                                           "tokenizer_sha256": sha256_file(tokenizer_path)})
    return run


# ------------------------------------------------------------------------------------------ sampling


def test_greedy_is_deterministic_ignores_seed_and_is_the_argmax():
    m = varied_model()
    prompt = [1, 5, 9, 3]
    runs = [generate(m, prompt, 20, temperature=0, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    assert runs[0] == runs[1] == runs[2]
    ids = list(prompt)
    for _ in range(20):  # the plain definition: argmax of the full-sequence forward
        ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert runs[0] == ids[len(prompt):]
    assert len(set(runs[0])) > 3  # a varied sequence, so the comparisons mean something
    g = torch.Generator().manual_seed(7)
    before = g.get_state().clone()
    generate(m, prompt, 5, temperature=0, generator=g)
    assert torch.equal(g.get_state(), before)  # greedy never draws from the generator


def test_same_seed_same_sample_and_another_seed_another():
    m = varied_model()

    def run(seed):
        return generate(m, [1, 2, 3], 30, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample_next_token(logits, temperature=1.5, top_k=1, generator=g), greedy)
        assert torch.equal(sample_next_token(logits, temperature=1.5, top_p=1e-6, generator=g), greedy)
    m = varied_model()
    ref = generate(m, [1, 4], 15, temperature=0)
    assert generate(m, [1, 4], 15, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)) == ref
    assert generate(m, [1, 4], 15, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(3)) == ref


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0, 0.5] + [-5.0] * 10])
    g = torch.Generator().manual_seed(0)
    k = {int(sample_next_token(logits, top_k=3, generator=g)) for _ in range(300)}
    assert k == {0, 1, 2}
    probs = torch.softmax(logits, -1)[0]
    p = float(probs[:2].sum()) - 1e-4  # the first two tokens reach p: the third is never drawn
    drawn = {int(sample_next_token(logits, top_p=p, generator=g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_repetition_penalty_follows_ctrl_and_lowers_repeated_tokens():
    # token 0 (positive, seen) is divided, token 1 (negative, seen) multiplied, others untouched
    logits = torch.tensor([[2.0, -0.5, 1.5, -0.8]])
    ctx = torch.tensor([[0, 1, 1]])
    assert int(sample_next_token(logits, temperature=0)) == 0
    assert int(sample_next_token(logits, temperature=0, repetition_penalty=2.0, context=ctx)) == 2  # 2.0 -> 1.0
    neg = torch.tensor([[-0.5, -0.8]])
    assert int(sample_next_token(neg, temperature=0, repetition_penalty=2.0, context=torch.tensor([[0]]))) == 1  # -0.5 -> -1.0
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(1, 4)  # a zero logit is neither divided nor multiplied: greedy tie stays at token 0
    assert int(sample_next_token(zero, temperature=0, repetition_penalty=3.0, context=torch.tensor([[0]]))) == 0
    lifted = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    p0 = sum(int(sample_next_token(lifted, generator=g)) == 0 for _ in range(2000))
    p1 = sum(int(sample_next_token(lifted, generator=g, repetition_penalty=3.0, context=torch.tensor([[0]]))) == 0
             for _ in range(2000))
    assert p1 < p0 * 0.8  # e/(e+3)=0.48 -> e^(1/3)/(e^(1/3)+3)=0.32
    seen = torch.zeros(1, 4, dtype=torch.bool)
    seen[0, 0] = True  # the seen-mask form gives the same result as the context form
    assert int(sample_next_token(logits, temperature=0, repetition_penalty=2.0, seen=seen)) == 2


# ------------------------------------------------------------------------------------ KV cache, batches


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("mode", ["eager", "static"])
def test_cached_and_uncached_decoding_give_the_same_tokens_even_when_sliding(kw, mode):
    m = varied_model(block_size=16, **kw)
    prompt = [1, 7, 3, 9, 11]
    ref = generate_batch(m, [prompt], 40, sampling=GREEDY, use_cache=False)[0].tokens  # slides: 45 > 16
    assert generate_batch(m, [prompt], 40, sampling=GREEDY, mode=mode)[0].tokens == ref
    ids = list(prompt)  # the reference itself follows the sliding rule: context restarts at the last keep tokens
    start = 0
    for _ in range(40):
        if len(ids) - start > 16:
            start = len(ids) - slide_keep(16)
        ids.append(int(m(torch.tensor([ids[start:]]))[0, -1].argmax()))
    assert ids[len(prompt):] == ref


def test_decoding_feeds_one_token_per_step_through_the_cache():
    m = varied_model()
    shapes = []
    m.tok_emb.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    generate(m, [1, 2, 3, 4, 5], 10, temperature=0)
    assert shapes == [(1, 5)] + [(1, 1)] * 9  # one prefill, then a single token each step


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_batched_greedy_equals_prompts_one_by_one(mode):
    m = varied_model(block_size=16)
    prompts = [[1, 5, 6, 7], [1], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 2, 2, 2, 2, 2]]
    alone = [generate_batch(m, [p], 30, sampling=GREEDY, mode=mode)[0] for p in prompts]
    stop = alone[0].tokens[5]  # a token that ends some rows early
    alone = [generate_batch(m, [p], 30, sampling=GREEDY, mode=mode, stop_id=stop)[0] for p in prompts]
    together = generate_batch(m, prompts, 30, sampling=GREEDY, mode=mode, stop_id=stop)
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.reason for c in together] == [c.reason for c in alone]
    assert {c.reason for c in alone} == {"doc", "length"}
    pen = Sampling(temperature=0, repetition_penalty=1.5)
    assert ([c.tokens for c in generate_batch(m, prompts, 20, sampling=pen, mode=mode)]
            == [generate_batch(m, [p], 20, sampling=pen, mode=mode)[0].tokens for p in prompts])


def test_long_prompts_are_cut_from_the_left_and_on_token_stops():
    m = varied_model(block_size=16)
    long = list(range(1, 40))
    assert generate(m, long, 8, temperature=0) == generate(m, long[-16:], 8, temperature=0)
    seen = []
    out = generate(m, [1, 2], 10, temperature=0, on_token=lambda t: seen.append(t) or len(seen) == 3)
    assert len(out) == 3 and out == seen


def test_static_decoders_are_kept_on_their_model_and_go_with_it():
    """Each model keeps its own static decoders (KV cache and decode step), reused across calls; nothing else
    holds them, so a model that goes away takes its decoders with it."""
    a, b = varied_model(seed=0), varied_model(seed=1)
    prompt = [1, 5, 9, 3]
    for m in (a, b):
        eager = generate_batch(m, [prompt], 12, sampling=GREEDY, mode="eager")[0].tokens
        assert generate_batch(m, [prompt], 12, sampling=GREEDY, mode="static")[0].tokens == eager
    assert generate_batch(a, [prompt], 12, sampling=GREEDY, mode="static")[0].tokens != eager  # b's, not a's
    assert len(a.decoders) == len(b.decoders) == 1
    (cache, step), = a.decoders.values()
    generate_batch(a, [[1, 2]], 5, sampling=GREEDY, mode="static")  # the same shape: the same decoder
    assert a.decoders[next(iter(a.decoders))] == (cache, step)
    gone = weakref.ref(a)
    del a, cache, step
    gc.collect()
    assert gone() is None


def test_cli_compile_background_switches_with_the_same_text_and_says_a_failed_compile_once(runner, run, monkeypatch):
    """Chunks of 4 (block 32: 8 tokens between slides). The background build is waited for where it starts, so the
    switch (or the failure) comes at the next chunk, not when the thread happens to end."""
    from minillm.generation import decoder

    class Waited(decoder.Background):
        def __init__(self, *a):
            super().__init__(*a)
            self.wait()

    monkeypatch.setattr(decoder, "Background", Waited)
    eager_compile, calls = torch.compile, []

    def counted(fn, **kw):  # dynamo's eager backend: the tracing, no code generation
        compiled = eager_compile(fn, backend="eager", **kw)
        return lambda *a: (calls.append(1), compiled(*a))[1]

    args = ("--prompt", "el", "--max-tokens", "100", "--temperature", "0", "--decode-chunk", "4")
    plain = gen(runner, run, *args)
    monkeypatch.setattr(torch, "compile", counted)
    background = gen(runner, run, *args, "--compile", "background")
    assert background.exit_code == 0, background.output
    assert background.stdout == plain.stdout and len(plain.stdout) > 20 and "compiling" not in background.stderr
    assert len(calls) > 4 * 4  # the twin's chunk, then the switched chunks' steps

    monkeypatch.setattr(torch, "compile", lambda *_a, **_kw: lambda *_args: 1 / 0)
    failed = gen(runner, run, *args, "--compile", "background")
    assert failed.exit_code == 0, failed.output
    assert failed.stdout == plain.stdout
    assert [ln for ln in failed.stderr.splitlines() if ln] == [
        "warning: the background compile of the decode step failed (ZeroDivisionError: division by zero); decoding "
        "goes on uncompiled"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_cuda_graph_decode_step_matches_eager_on_cuda(mode):
    """80 new tokens with a block of 64: the rows slide, so the graph replays over re-encoded caches too; a second
    call replays the graph captured by the first, with other prompts."""
    m = varied_model(block_size=64, dtype=torch.float32).cuda()
    for prompts in ([[1, 5, 6, 7], [1], [1, 3, 4, 5, 6, 7, 8, 9]], [[1, 9], [1, 2, 3, 4, 5], [1, 7, 7]]):
        ref = [c.tokens for c in generate_batch(m, prompts, 80, sampling=GREEDY, mode="eager")]
        assert [c.tokens for c in generate_batch(m, prompts, 80, sampling=GREEDY, mode=mode)] == ref
    one = [[1, 4, 2]]  # batch 1 and sampling with a generator
    pen = Sampling(temperature=0.8, top_k=20, repetition_penalty=1.3)
    ref = generate_batch(m, one, 50, sampling=pen, mode="eager", generator=torch.Generator("cuda").manual_seed(3))
    got = generate_batch(m, one, 50, sampling=pen, mode=mode, generator=torch.Generator("cuda").manual_seed(3))
    assert got[0].tokens == ref[0].tokens


def test_decode_mode_follows_the_device_and_the_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_mode(cpu, "auto") == "eager" and decode_mode(cuda, "auto") == "graph"
    assert decode_mode(cpu, "on") == decode_mode(cuda, "on") == "compiled"
    assert decode_mode(cuda, "off") == "eager"
    with pytest.raises(UsageError, match="--compile"):
        decode_mode(cpu, "fast")


# ------------------------------------------------------------------------------------- text streams


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["añoñandú €uro 😀 fin", "plain ascii", "😀😀", "ends mid char \u00e9"])
def test_stream_never_splits_a_character_and_equals_the_whole_text(text):
    ts = TextStream(byte_decode)
    chunks = [ts.push(b) for b in text.encode("utf-8")]
    chunks.append(ts.finish())
    assert "".join(chunks) == text == ts.text
    assert all("\ufffd" not in c for c in chunks)


def test_stream_holds_back_a_possible_stop_string_and_never_prints_it():
    ts = TextStream(byte_decode, stops=["STOP", "\n\n"])
    chunks = []
    for b in b"abc STOx STOP tail":
        chunks.append(ts.push(b))
        if ts.stopped:
            break
    chunks.append(ts.finish())
    assert "".join(chunks) == ts.text == "abc STOx "
    assert "ST" not in "".join(chunks[:5])  # "abc S" was pushed: the "S" is held back


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def run(tmp_path, tokenizer_path):
    return make_run(tmp_path, tokenizer_path)


def gen(runner, run, *args):
    r = runner.invoke(app, ["generate", "--ckpt", str(run / "ckpt_best.pt"), "--device", "cpu", *args])
    return r


def test_cli_stream_equals_non_streamed_text(runner, run):
    args = ["--prompt", "año ñandú el", "--max-tokens", "40", "--temperature", "0.9", "--seed", "3"]
    plain, streamed = gen(runner, run, *args), gen(runner, run, *args, "--stream")
    assert plain.exit_code == 0 and streamed.exit_code == 0, plain.output + streamed.output
    assert plain.stdout == streamed.stdout
    assert plain.stdout.startswith("año ñandú el") and len(plain.stdout) > len("año ñandú el") + 5
    two = gen(runner, run, *args, "--num-samples", "2", "--stream")
    assert two.stdout == gen(runner, run, *args, "--num-samples", "2").stdout
    assert two.stdout.count("\n<|doc|>\n") == 1


def test_cli_stop_string_ends_the_text_and_is_not_printed(runner, run):
    base = gen(runner, run, "--prompt", "el", "--max-tokens", "40", "--temperature", "0")
    completion = base.stdout[len("el"):].rstrip("\n")
    assert len(completion) > 12
    stop = completion[8:11]
    want = "el" + completion[: completion.find(stop)]
    for extra in ([], ["--stream"]):
        r = gen(runner, run, "--prompt", "el", "--max-tokens", "40", "--temperature", "0", "--stop", stop,
                "--stop", "never-appears", *extra)
        assert r.exit_code == 0, r.output
        assert r.stdout == want + "\n"


def test_cli_batch_file_jsonl_equals_one_by_one(runner, run, tmp_path):
    from minillm.tokenizer import load_tokenizer

    pf = tmp_path / "prompts.txt"
    long_prompt = " ".join(["el rey"] * 40)  # longer than the 32-token context
    pf.write_text("el\n\nla casa del\n" + long_prompt + "\nun\n", encoding="utf-8")
    common = ["--prompt-file", str(pf), "--max-tokens", "12", "--temperature", "0", "--json"]
    out = tmp_path / "out.jsonl"
    r = gen(runner, run, *common, "--batch-generate", "--batch-size", "3", "--num-samples", "2", "--output", str(out))
    assert r.exit_code == 0, r.output
    assert "longer than the context" in r.stderr and "prompt 3" in r.stderr
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 8 and set(recs[0]) >= {"prompt", "completion", "tokens", "seconds", "finish_reason"}
    assert [x["prompt"] for x in recs] == [p for p in ["el", "la casa del", long_prompt, "un"] for _ in range(2)]
    one = gen(runner, run, *common)
    singles = [json.loads(line) for line in one.stdout.splitlines()]
    assert [x["completion"] for x in recs[::2]] == [x["completion"] for x in singles]
    tok = load_tokenizer(run / "tokenizer.json")
    for x in recs:  # the completion is the decoded tokens (none stopped early: greedy on a random model)
        assert 1 <= x["tokens"] <= 12 and x["seconds"] >= 0
        assert x["finish_reason"] != "length" or x["tokens"] == 12
        assert tok.decode(tok.encode(x["completion"]).ids) == x["completion"]
    text = gen(runner, run, "--prompt-file", str(pf), "--max-tokens", "5", "--batch-generate")
    assert text.exit_code == 0 and text.stdout.count("\n<|doc|>\n") == 3


def test_cli_empty_prompt_and_usage_errors(runner, run):
    r = gen(runner, run, "--max-tokens", "10", "--temperature", "0")
    assert r.exit_code == 0 and r.stdout.strip()
    for bad in (["--stream", "--batch-generate"], ["--batch-size", "4"], ["--stream", "--json"],
                ["--temperature", "-1"], ["--prompt", "a", "--prompt-file", "x"], ["--compile", "maybe"],
                ["--dtype", "fp16"], ["--decode-chunk", "0"]):
        r = gen(runner, run, *bad)
        assert r.exit_code == 2, (bad, r.output)


def test_cli_dtype_and_decode_chunk_reach_the_decoder(runner, run, monkeypatch):
    import minillm.generation as generation

    seen, real = [], generation.complete

    def spy(model, *a, chunk, **kw):
        seen.append((next(model.parameters()).dtype, chunk))
        return real(model, *a, chunk=chunk, **kw)

    monkeypatch.setattr(generation, "complete", spy)
    for extra in ([], ["--dtype", "bf16", "--decode-chunk", "4"], ["--dtype", "fp32"]):
        r = gen(runner, run, "--max-tokens", "6", "--temperature", "0", *extra)
        assert r.exit_code == 0, r.output
    assert seen == [(torch.float32, 16), (torch.bfloat16, 4), (torch.float32, 16)]  # auto on the CPU: fp32


def test_complete_in_chunks_streams_the_same_text_with_stops_and_samples(tokenizer_path):
    """K tokens per call (the static step run eagerly, as the CUDA graph runs it): the streamed text, the records
    and the generator's use (the second sample) equal the one-token decoder's."""
    from minillm.generation import complete
    from minillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    m = varied_model(vocab_size=pad_vocab(tok.get_vocab_size()), dtype=torch.float32)
    out = {}
    for mode, chunk in (("eager", 1), ("static", 6)):
        pieces: list[str] = []
        recs = complete(m, tok, ["el rey", "la"], 30, sampling=Sampling(0.9, 40, 0.95, 1.1), num_samples=2,
                        stops=["a"], generator=torch.Generator().manual_seed(5), stream=pieces.append, mode=mode,
                        chunk=chunk)
        out[mode] = (pieces, [(r["completion"], r["finish_reason"]) for r in recs])
    assert out["eager"] == out["static"]
    assert {r for _, r in out["eager"][1]} == {"stop", "length"}  # stopped inside chunks, and ran to the end


def test_greedy_logits_path_matches_full_forward_loss_sanity():
    """The decode path's logits equal the full-sequence forward's at every step (log-softmax, fp64)."""
    m = varied_model(block_size=16)
    from minillm.generation import _Decoder

    ids = [1, 4, 9, 2, 7, 3]
    for mode in ("eager", "static"):
        dec = _Decoder(m, 1, mode, len(ids))
        logits = [dec.prefill([ids[:2]])]
        for t in ids[2:]:
            logits.append(dec.step(torch.tensor([t])))
        full = m(torch.tensor([ids]))[0, 1:]  # (T-1, V)
        assert torch.allclose(F.log_softmax(torch.cat(logits), -1), F.log_softmax(full, -1), atol=1e-10)


def test_cli_compile_on_gives_the_same_text_and_caches_its_kernels_in_minillm_s_cache(runner, run, monkeypatch,
                                                                                      tmp_path):
    import functools
    import os

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # the tracing, no codegen
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = ("--prompt", "el", "--max-tokens", "40", "--temperature", "0")
    plain = gen(runner, run, *args)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    compiled = gen(runner, run, *args, "--compile", "on")
    assert compiled.exit_code == 0, compiled.output
    assert compiled.stdout == plain.stdout and len(plain.stdout) > 20
    assert "compiling the decode step" in compiled.stderr and "compiling" not in plain.stderr  # the wait is said
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "minillm" / "torchinductor")
