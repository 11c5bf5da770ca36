"""One training step and one validation pass (minillm/train/step.py)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from minillm.config import ModelConfig, resolve
from minillm.errors import MiniLLMError, UsageError
from minillm.model.gpt import GPT
from minillm.optim.groups import configure_optimizer
from minillm.train import step as ts
from minillm.train.step import read_back


def test_accumulation_equals_one_large_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    tcfg = resolve("tiny", {})[1]
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (8, 17))
    cpu = torch.device("cpu")
    la = ts.accumulate(a, [x[:4], x[4:]], tcfg, 1, cpu, torch.float32)
    lb = ts.accumulate(b, [x], tcfg, 1, cpu, torch.float32)
    assert float(la) == pytest.approx(float(lb), rel=1e-6)
    with torch.no_grad():  # each window's first block_size tokens predict its last block_size
        assert float(lb) == pytest.approx(float(b(x[:, :-1], x[:, 1:])), rel=1e-6)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), n


def test_doc_masking_reaches_the_model():
    """--doc-masking: the training and validation forward pass documents' segment ids (positions restart and
    attention stops at each <|doc|>); without it, the plain causal forward."""
    from minillm.model.gpt import segment_ids

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    batch = torch.randint(2, 64, (2, 17))
    batch[:, [0, 6, 11]] = 1  # three documents per window
    x, y = batch[:, :-1], batch[:, 1:]
    cpu = torch.device("cpu")
    with torch.no_grad():
        masked = ts._forward(model, x, y, True, 1, cpu, torch.float32)
        plain = ts._forward(model, x, y, False, 1, cpu, torch.float32)
        assert float(masked) == float(model(x, y, seg_ids=segment_ids(x, 1)))
        assert float(plain) == float(model(x, y)) and abs(float(masked) - float(plain)) > 1e-4
    tcfg = resolve("tiny", {"doc_masking": True, "batch_size": 2})[1]
    val = ts.estimate_val_loss(model, [batch.numpy()], tcfg, 1, cpu, torch.float32)
    assert val == pytest.approx(float(masked), rel=1e-6)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_a_nonfinite_gradient_skips_the_update():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tcfg = resolve("tiny", {})[1]
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    class Inf(torch.nn.Module):
        def forward(self, x, y, **kw):
            return _InfGrad.apply(model(x, y, **kw))

    class Feed:
        def next(self):
            return torch.randint(0, 64, (2, 17)), {"epoch": 0, "pos": 2}

    cpu = torch.device("cpu")
    step = ts.make_train_step(model, Inf(), configure_optimizer(model, tcfg, cpu), tcfg, cpu, torch.float32, 1)
    r = step(Feed(), 1.0)
    assert math.isfinite(r.loss) and "gradient norm" in r.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _tiny_run(compile: str = "auto"):
    import dataclasses

    mcfg, tcfg = resolve("tiny", {"device": "cpu", "batch_size": 2, "compile": compile})
    mcfg = dataclasses.replace(mcfg, vocab_size=128, n_layer=2, block_size=16)
    torch.manual_seed(0)
    return GPT(mcfg), tcfg


def _train_steps(train_model, model, n: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i in range(n):
        x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(i))
        loss = train_model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_background_compilation_trains_eagerly_then_switches_without_recompiling():
    """--compile auto on a GPU: the regions compile on a thread, on a copy of the model, while the steps run eagerly;
    the first forward after it ends switches to them (``on_ready`` hears it). The switch compiles nothing more (the
    copy compiled exactly the training's graphs), and the run's numbers are the eager model's up to rounding."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, tcfg = _tiny_run()
    notes = []
    wrapped = ts.RegionallyCompiled(model, ts.background_warmup(model, tcfg, torch.device("cpu"), torch.float32, 0),
                                    notes.append)
    assert wrapped.compiling
    wrapped._thread.join()  # the compilation ends; the next forward switches
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2 and not notes
    reference, _ = _tiny_run()
    got, want = _train_steps(wrapped, model, 3), _train_steps(reference, reference, 3)
    assert notes and notes[0].startswith("compiled in the background") and not wrapped.compiling
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation at the switch
    assert got == pytest.approx(want, rel=1e-5)
    assert model.tok_emb.weight.grad is None  # the copy's backward never touched the model


def test_a_failed_background_compilation_leaves_the_run_eager():
    model, tcfg = _tiny_run()
    notes = []

    def broken(regions):
        raise RuntimeError("no C compiler")
    wrapped = ts.RegionallyCompiled(model, broken, notes.append)
    wrapped.wait()
    assert "compilation failed (RuntimeError: no C compiler); training continues uncompiled" in notes[0]
    assert _train_steps(wrapped, model, 2) == pytest.approx(_train_steps(*[_tiny_run()[0]] * 2, 2), rel=1e-6)


@pytest.mark.parametrize("switch", ["default", "short"])
def test_a_short_thread_switch_interval_holds_only_while_the_model_compiles(monkeypatch, switch):
    """MINILLM_COMPILE_SWITCH=short: the interpreter's switch interval is SHORT_SWITCH_S from the start of a background
    compilation to the switch to its regions, then Python's again; unset, it is never touched."""
    import sys
    import threading

    monkeypatch.setenv("MINILLM_COMPILE_SWITCH", switch)
    before = sys.getswitchinterval()
    seen, release = [], threading.Event()

    def warmup(regions):
        seen.append(sys.getswitchinterval())
        release.wait(10)
    model, _ = _tiny_run()
    wrapped = ts.RegionallyCompiled(model, warmup)
    try:
        want = pytest.approx(ts.SHORT_SWITCH_S if switch == "short" else before)
        assert wrapped.compiling and sys.getswitchinterval() == want
    finally:
        release.set()
        wrapped.wait()
    assert seen == [want]
    assert sys.getswitchinterval() == before and not wrapped.compiling


def test_compile_modes(monkeypatch):
    """auto: regional on CUDA (in the background when the trainer gives a warm-up), off on the CPU; on: regional,
    before the first step; model: the whole model in one graph (FSDP always); off: the model itself."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # maybe_compile sets it: restored after
    model, _ = _tiny_run()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pick = lambda mode, dev, **k: ts.maybe_compile(model, resolve("tiny", {"compile": mode})[1], dev, **k)  # noqa: E731
    assert pick("auto", cpu) is model and pick("off", cuda) is model
    on = pick("on", cpu, warmup=lambda regions: None)
    assert isinstance(on, ts.RegionallyCompiled) and not on.compiling  # "on" never compiles in the background
    assert isinstance(pick("auto", cuda), ts.RegionallyCompiled)
    assert type(pick("model", cpu)).__name__ == "OptimizedModule"
    assert type(pick("on", cpu, whole=True)).__name__ == "OptimizedModule"


def test_compiled_kernels_are_cached_in_the_users_cache_directory(tmp_path, monkeypatch):
    """PyTorch's cache is under /tmp by default (gone at a reboot): a compiling run points it at the user's cache
    directory, unless TORCHINDUCTOR_CACHE_DIR is set; an uncompiled run leaves the environment alone."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, _ = _tiny_run()
    ts.maybe_compile(model, resolve("tiny", {"compile": "off"})[1], torch.device("cpu"))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    ts.maybe_compile(model, resolve("tiny", {"compile": "on"})[1], torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "minillm" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    ts.maybe_compile(model, resolve("tiny", {"compile": "on"})[1], torch.device("cpu"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


# ---------------------------------------------------------------- MINILLM_STEP_SYNC=log: the guard on the device


def _guard_setup(monkeypatch, deferred: bool, device: str = "cpu"):
    """A tiny Muon + fused AdamW model (the optimizers both modes run with), a step of the mode asked for, a wrapper
    whose next backward can be made infinite, and a deterministic feed."""
    monkeypatch.setenv("MINILLM_STEP_SYNC", "log")
    torch.manual_seed(0)
    tcfg = resolve("tiny", {"optimizer": "muon", "grad_clip": 1.0})[1]
    dev = torch.device(device)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)).to(dev)
    opts = configure_optimizer(model, tcfg, dev)
    assert [type(o).__name__ for o in opts] == ["AdamW", "Muon"] and opts[0].defaults["fused"]
    bad = {"grad": False, "loss": False}

    class Poison(torch.nn.Module):
        def forward(self, x, y, **kw):
            loss = model(x, y, **kw)
            loss = _InfGrad.apply(loss) if bad["grad"] else loss
            return loss * float("nan") if bad["loss"] else loss

    batches = [torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(n)) for n in range(8)]
    batches = [b.pin_memory() for b in batches] if dev.type == "cuda" else batches  # as the Prefetcher's on CUDA

    class Feed:
        n = 0

        def next(self):
            self.n += 1
            return batches[self.n], {"pos": self.n}

    monkeypatch.setenv("MINILLM_STEP_SYNC", "log" if deferred else "step")
    step = ts.make_train_step(model, Poison(), opts, tcfg, dev, torch.float32, 1)
    return model, opts, step, Feed(), bad


def _snapshot(model, opts) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for o in opts:
        for st in o.state.values():
            out += [v.clone() for v in st.values()]
    return out


def _no_host_sync(monkeypatch):
    """Every way Python reads a tensor's value back raises (what a step without a host sync never does)."""
    def sync(*a, **k):
        raise AssertionError("host sync")
    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_the_deferred_guard_steps_exactly_as_the_synced_one_without_reading_the_device(monkeypatch):
    """MINILLM_STEP_SYNC=log: a finite step gives bit-identical parameters and optimizer state (Muon's and AdamW's)
    to the synced step's, reads nothing back, and hands its (loss, norm) on for read_back."""
    ref_model, ref_opts, ref_step, ref_feed, _ = _guard_setup(monkeypatch, deferred=False)
    model, opts, step, feed, _ = _guard_setup(monkeypatch, deferred=True)
    for _ in range(3):
        want = ref_step(ref_feed, 0.5)
        with monkeypatch.context() as m:
            _no_host_sync(m)
            got = step(feed, 0.5)
        assert got.stats is not None and math.isnan(got.loss) and got.loader_state == want.loader_state
        assert read_back([(7, got.stats)]) == [(7, want.loss, None)]
        assert float(got.stats[1]) == want.grad_norm
    snap, ref = _snapshot(model, opts), _snapshot(ref_model, ref_opts)
    assert len(snap) == len(ref) > 2 * len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(snap, ref, strict=True))


def test_a_nonfinite_deferred_step_changes_nothing_and_is_reported_at_the_read_back(monkeypatch):
    model, opts, step, feed, bad = _guard_setup(monkeypatch, deferred=True)
    first = step(feed, 1.0)
    before = _snapshot(model, opts)
    pending = [(1, first.stats)]
    for n, kind in ((2, "grad"), (3, "loss")):
        bad[kind] = True
        pending.append((n, step(feed, 1.0).stats))
        bad[kind] = False
        assert all(torch.equal(a, b) for a, b in zip(_snapshot(model, opts), before, strict=True)), kind
        assert all(p.grad is None for p in model.parameters())
    pending.append((4, step(feed, 1.0).stats))  # a finite step after them updates again
    assert not torch.equal(next(model.parameters()), before[0])
    got = read_back(pending)
    assert [n for n, _, _ in got] == [1, 2, 3, 4] and got[0][2] is None and got[3][2] is None
    assert got[1][2].startswith("non-finite gradient norm") and got[2][2] == "non-finite loss nan"
    assert math.isfinite(got[1][1]) and math.isnan(got[2][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_the_deferred_guard_never_synchronises_and_skips_on_the_gpu(monkeypatch):
    """On a GPU (fused AdamW, Muon's bf16 iteration): no deferred step synchronises (torch's sync debug mode set to
    raise), a non-finite one leaves parameters and optimizer state exactly as they were, finite ones step as the
    synced step does."""
    ref_model, ref_opts, ref_step, ref_feed, _ = _guard_setup(monkeypatch, False, "cuda")
    model, opts, step, feed, bad = _guard_setup(monkeypatch, True, "cuda")
    pending = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n in range(1, 4):
            pending.append((n, step(feed, 1.0).stats))
        before = _snapshot(model, opts)
        bad["grad"] = True
        pending.append((4, step(feed, 1.0).stats))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model, opts), before, strict=True))
    got = read_back(pending)
    assert [why is None for _, _, why in got] == [True, True, True, False]
    for n in range(1, 4):
        assert got[n - 1][1] == pytest.approx(ref_step(ref_feed, 1.0).loss, rel=1e-6)
    for a, b in zip(before, _snapshot(ref_model, ref_opts), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_deferred_guard_needs_optimizers_that_skip_on_the_device(monkeypatch):
    monkeypatch.setenv("MINILLM_STEP_SYNC", "log")
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    cpu, tcfg = torch.device("cpu"), resolve("tiny", {})[1]
    with pytest.raises(MiniLLMError, match="MINILLM_STEP_SYNC=log needs optimizers that skip on the device"):
        ts.make_train_step(model, model, [torch.optim.AdamW(model.parameters())], tcfg, cpu, torch.float32, 1)
    monkeypatch.setenv("MINILLM_STEP_SYNC", "sometimes")
    with pytest.raises(UsageError, match=r"MINILLM_STEP_SYNC=sometimes: not one of step, log; unset it"):
        ts.make_train_step(model, model, [], tcfg, cpu, torch.float32, 1)


def test_the_compile_mode_lever_reaches_the_compiled_regions(monkeypatch):
    """MINILLM_COMPILE_MODE: the regions (or the whole model) compiled in that mode; reduce-overhead (CUDA graphs,
    replayed on the thread that records them) never compiles in the background. On the CPU, which has no CUDA
    graphs, the compiled step still trains as the eager one."""
    from minillm.model import gpt

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    modes = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **k: modes.append(k.get("mode")) or real(fn, **k))
    model, _ = _tiny_run()
    for value, want in (("", None), ("reduce-overhead", "reduce-overhead"),
                        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")):
        monkeypatch.setenv("MINILLM_COMPILE_MODE", value)
        modes.clear()
        auto = ts.maybe_compile(model, resolve("tiny", {"compile": "auto"})[1], torch.device("cuda"),
                                warmup=lambda regions: None)
        background = auto.compiling
        auto.wait()
        assert modes == [want, want] and background == (want != "reduce-overhead")
        modes.clear()
        ts.maybe_compile(model, resolve("tiny", {"compile": "model"})[1], torch.device("cpu"))
        assert modes == [want]
    monkeypatch.setenv("MINILLM_COMPILE_MODE", "reduce-overhead")
    torch._dynamo.reset()
    model, tcfg = _tiny_run("on")
    compiled = ts.maybe_compile(model, tcfg, torch.device("cpu"))
    assert compiled.regions != gpt.EAGER
    reference, _ = _tiny_run()
    assert _train_steps(compiled, model, 2) == pytest.approx(_train_steps(reference, reference, 2), rel=1e-5)


def test_the_deferred_guard_is_the_cuda_default_and_falls_back_where_it_cannot_skip(monkeypatch):
    """Unset, CUDA defers the check when every optimizer can skip on the device, and quietly keeps the host check
    when one cannot (an explicit MINILLM_STEP_SYNC=log there is an error, above); never with the fp16 scaler; the
    CPU keeps the host check."""
    monkeypatch.delenv("MINILLM_STEP_SYNC", raising=False)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    skipping = [torch.optim.AdamW(model.parameters(), fused=True)]  # made on the CPU: fused is only a flag here
    plain = [torch.optim.AdamW(model.parameters())]
    assert ts.defers_sync(skipping, cuda, fp16_scaler=False)
    assert not ts.defers_sync(skipping, cuda, fp16_scaler=True)
    assert not ts.defers_sync(plain, cuda, fp16_scaler=False)
    assert not ts.defers_sync(skipping, cpu, fp16_scaler=False)
    monkeypatch.setenv("MINILLM_STEP_SYNC", "log")
    assert ts.defers_sync(skipping, cpu, fp16_scaler=False)
    monkeypatch.setenv("MINILLM_STEP_SYNC", "step")
    assert not ts.defers_sync(skipping, cuda, fp16_scaler=False)


def _cold_pick(monkeypatch, cache, max_time: float, compile: str = "auto", **env):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model, _ = _tiny_run()
    tcfg = resolve("tiny", {"compile": compile, "max_time": max_time})[1]
    notes: list[str] = []
    cuda = torch.device("cuda")
    got = ts.maybe_compile(model, tcfg, cuda, warmup=lambda regions: None, on_ready=notes.append, key="k1",
                           eager=ts.skips_cold_compile(tcfg, cuda, "k1"))
    if isinstance(got, ts.RegionallyCompiled):
        got.wait()
    return got, model, notes


def test_compile_auto_trains_eagerly_under_a_short_budget_when_the_cache_has_no_kernels(monkeypatch, tmp_path):
    """Measured on one H200 (medium 64 x 512, --max-time 30s, cold caches): the background compile left 115 steps
    and 1.77 bits per byte, eager steps throughout 342 steps and 1.41. Under COLD_BUDGET_S a cold cache means
    eager; a longer budget, no budget, --compile on, or MINILLM_COLD_COMPILE=always compile as before (each case on
    a cache of its own), and so does a short budget once a compilation has marked the shapes."""
    mark = lambda cache: cache / ts.WARM_MARKS / "k1"  # noqa: E731
    got, model, notes = _cold_pick(monkeypatch, tmp_path / "cold", 30.0)
    assert got is model and len(notes) == 1 and "training eagerly" in notes[0] and "--compile on" in notes[0]
    assert not mark(tmp_path / "cold").exists()
    got, model, _ = _cold_pick(monkeypatch, tmp_path / "cold", ts.COLD_BUDGET_S - 1)
    assert got is model
    cases = {"budget": (ts.COLD_BUDGET_S, "auto", {}), "none": (0.0, "auto", {}), "on": (30.0, "on", {}),
             "always": (30.0, "auto", {"MINILLM_COLD_COMPILE": "always"})}
    for name, (max_time, mode, env) in cases.items():
        assert not mark(tmp_path / name).exists()
        got = _cold_pick(monkeypatch, tmp_path / name, max_time, mode, **env)[0]
        assert isinstance(got, ts.RegionallyCompiled), name
        monkeypatch.delenv("MINILLM_COLD_COMPILE", raising=False)
    # those compilations marked their caches' shapes: the same short budget now compiles (a cache lookup)
    got, model, notes = _cold_pick(monkeypatch, tmp_path / "budget", 30.0)
    assert isinstance(got, ts.RegionallyCompiled) and not any("eagerly" in n for n in notes)


def test_a_compilation_marks_its_shapes_only_once_it_has_succeeded(monkeypatch, tmp_path):
    """The mark is written after the background compile's warm-up ran, or after the first forward and backward of a
    foreground compile (the second forward); a failed compile leaves none."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    marked = lambda: (tmp_path / ts.WARM_MARKS / "k").exists()  # noqa: E731
    model, _ = _tiny_run()

    def broken(regions):
        raise RuntimeError("no C compiler")
    failed = ts.RegionallyCompiled(model, broken, on_compiled=lambda: ts.mark_compiled("k"))
    failed._thread.join()  # the compile failed before the first step: the run continues eagerly, unmarked
    x = torch.randint(0, model.cfg.vocab_size, (2, 9))
    for _ in range(3):
        failed(x[:, :-1], x[:, 1:]).backward()
    failed.wait()
    assert not marked()
    from minillm.model.gpt import EAGER

    monkeypatch.setattr("minillm.model.gpt.compile_regions", lambda mode=None: EAGER)
    fg = ts.RegionallyCompiled(model, on_compiled=lambda: ts.mark_compiled("k"))
    fg(x[:, :-1], x[:, 1:]).backward()
    assert not marked()
    fg(x[:, :-1], x[:, 1:])
    assert marked()


def test_the_compile_key_names_the_shapes_and_the_software(monkeypatch):
    """One key per model config, micro-batch, precision, document masking, torch version and the levers that change
    the graphs (MINILLM_NORM, MINILLM_PROJ): a change to any of them compiles new kernels."""
    import dataclasses

    from minillm.lora import LoRAConfig, apply_lora

    model, tcfg = _tiny_run()
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    base = ts.compile_key(model, tcfg, cuda, bf16)
    assert base == ts.compile_key(_tiny_run()[0], tcfg, cuda, bf16)
    deeper = GPT(dataclasses.replace(model.cfg, n_layer=model.cfg.n_layer + 1))
    others = [ts.compile_key(deeper, tcfg, cuda, bf16),
              ts.compile_key(model, dataclasses.replace(tcfg, batch_size=tcfg.batch_size + 1), cuda, bf16),
              ts.compile_key(model, dataclasses.replace(tcfg, doc_masking=True), cuda, bf16),
              ts.compile_key(model, tcfg, cuda, torch.float16)]
    for var, value in (("MINILLM_NORM", "fused"), ("MINILLM_PROJ", "concat"), ("MINILLM_TUNE", "coordinate"),
                       ("MINILLM_LOSS", "plain"), ("MINILLM_REDUCE", "split")):
        monkeypatch.setenv(var, value)  # unset: CUDA's halfweight, separate, default, triton, mixed
        others.append(ts.compile_key(model, tcfg, cuda, bf16))
        monkeypatch.delenv(var)
    assert ts.compile_key(model, tcfg, cuda, bf16) == base
    apply_lora(model, LoRAConfig())  # a finetune's adapters: other graphs than pretraining's
    others.append(ts.compile_key(model, tcfg, cuda, bf16))
    assert len({base, *others}) == 11


def test_the_norm_lever_reaches_the_model_before_anything_runs(monkeypatch):
    """MINILLM_NORM=explicit switches RMSNorm to plain ops in maybe_compile, before a step or a background compile
    traces the model, for every --compile mode; unset, CUDA takes halfweight and the CPU the fused op."""
    from minillm.model.gpt import RMSNorm

    monkeypatch.setattr(RMSNorm, "explicit", False)
    model, tcfg = _tiny_run("off")
    monkeypatch.setenv("MINILLM_NORM", "explicit")
    ts.maybe_compile(model, tcfg, torch.device("cpu"))
    assert RMSNorm.explicit
    monkeypatch.delenv("MINILLM_NORM")
    ts.maybe_compile(model, tcfg, torch.device("cuda"))  # CUDA's default: halfweight (measured to win)
    assert RMSNorm.explicit and RMSNorm.half_weight
    ts.maybe_compile(model, tcfg, torch.device("cpu"))  # the CPU's: the fused op
    assert not RMSNorm.explicit and not RMSNorm.half_weight
    monkeypatch.setenv("MINILLM_NORM", "halfweight")
    ts.maybe_compile(model, tcfg, torch.device("cpu"))
    assert RMSNorm.explicit and RMSNorm.half_weight
    monkeypatch.setenv("MINILLM_NORM", "fused")
    ts.maybe_compile(model, tcfg, torch.device("cpu"))
    assert not RMSNorm.explicit and not RMSNorm.half_weight


@pytest.mark.parametrize("var, value", [("MINILLM_PROJ", "concat"), ("MINILLM_TUNE", "coordinate"),
                                        ("MINILLM_REDUCE", "split")])
def test_the_switch_levers_reach_the_model_and_inductor(monkeypatch, var, value):
    """MINILLM_PROJ=concat (Attention.concat_projections), MINILLM_TUNE=coordinate (inductor's coordinate-descent
    tuning) and MINILLM_REDUCE=split (inductor's mix-order reductions off) are on once maybe_compile has run, before
    the regions compile; unset, off on CUDA and the CPU."""
    import torch._inductor.config as inductor_config

    from minillm.model.gpt import Attention

    probe = {"MINILLM_PROJ": lambda: Attention.concat_projections,
             "MINILLM_TUNE": lambda: inductor_config.coordinate_descent_tuning,
             "MINILLM_REDUCE": lambda: not inductor_config.triton.mix_order_reduction}[var]
    model, tcfg = _tiny_run("off")
    monkeypatch.setenv(var, value)
    ts.maybe_compile(model, tcfg, torch.device("cpu"))
    assert probe()
    monkeypatch.delenv(var)
    for device in ("cuda", "cpu"):
        ts.maybe_compile(model, tcfg, torch.device(device))
        assert not probe()
