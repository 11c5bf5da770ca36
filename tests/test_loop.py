"""The loop (minillm/train/loop.py): patience, non-finite steps, signals, and what ``save_run`` writes from a
``TrainContext``."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from minillm import distributed
from minillm.checkpoint import load_checkpoint
from minillm.config import ModelConfig, resolve
from minillm.errors import MiniLLMError
from minillm.model.gpt import GPT
from minillm.optim.groups import configure_optimizer
from minillm.train import loop
from minillm.train import step as ts
from minillm.train.log import TrainLog
from minillm.train.state import RunState
from tests.test_training import run

pytestmark = pytest.mark.usefixtures("no_plots")


def test_early_stopping_after_patience_evaluations(tmp_path, tokenizer_path, corpus, monkeypatch):
    vals = iter([3.0, 2.0, 2.5, 2.1, 2.0, 1.0, 0.5])
    monkeypatch.setattr(loop, "estimate_val_loss", lambda *a, **k: next(vals))
    s = run(tokenizer_path, corpus, tmp_path / "r", max_steps=40, eval_every=2, patience=3)
    assert s["end"] == "early_stopping" and s["steps"] == 10 and s["best_val_loss"] == 2.0
    ck = load_checkpoint(tmp_path / "r" / "ckpt_last.pt")
    assert ck["run_state"]["bad_evals"] == 3
    assert load_checkpoint(tmp_path / "r" / "ckpt_best.pt")["run_state"]["step"] == 4


def test_nonfinite_losses_are_skipped_then_stop_the_run_keeping_the_last_good_checkpoint(
        tmp_path, tokenizer_path, corpus, monkeypatch, capsys):
    real, calls = ts._forward, {"n": 0}
    bad_calls: set[int] = {3}

    def forward(model, x, y, *a, **k):
        loss = real(model, x, y, *a, **k)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad_calls or (bad_calls == {-1} and calls["n"] > 4):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ts, "_forward", forward)
    s = run(tokenizer_path, corpus, tmp_path / "one", max_steps=6, eval_every=3)
    assert s["steps"] == 6 and "non-finite loss nan; update skipped" in capsys.readouterr().err

    calls["n"], bad_calls = 0, {-1}  # every training step after the 4th
    out = tmp_path / "many"
    with pytest.raises(MiniLLMError, match=r"(?s)non-finite steps in a row.*--lr.*fp16.*last good checkpoint"):
        run(tokenizer_path, corpus, out, max_steps=20, eval_every=4)
    ck = load_checkpoint(out / "ckpt_last.pt")
    assert ck["run_state"]["step"] == 4 and all(torch.isfinite(t).all() for t in ck["model"].values())


def test_signals_defer_inside_the_loop_and_abort_outside_it():
    with loop.Signals() as sig:
        with pytest.raises(loop.Interrupted) as exc:  # outside the loop (setup): at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert exc.value.exit_code == 143
        sig.deferred = True
        os.kill(os.getpid(), signal.SIGINT)  # inside: only a flag, the step finishes
        assert sig.code == 130
        with pytest.raises(loop.Interrupted):  # a second one: at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _context(out: Path, **kw) -> loop.TrainContext:
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tcfg = resolve("tiny", {"device": "cpu"})[1]
    model, cpu = GPT(mcfg), torch.device("cpu")
    fields = dict(outdir=out, mcfg=mcfg, tcfg=tcfg, model=model, train_model=model,
                  optimizers=configure_optimizer(model, tcfg, cpu), scaler=torch.amp.GradScaler("cpu", enabled=False),
                  loader=None, val_batches=[], device=cpu, dtype=torch.float32, doc_id=1, tok_sha="abc", t_entry=0.0,
                  dist=distributed.Dist(), log=TrainLog("json", bar=False), signals=loop.Signals(out))
    return loop.TrainContext(**{**fields, **kw})


def test_save_run_writes_what_the_hook_makes_of_the_checkpoint_then_reports_it(tmp_path):
    saves: list[int] = []

    def hook(ck):
        return {**ck, "finetune": {"mode": "sft"}, "model": {k: v * 0 for k, v in ck["model"].items()}}

    ctx = _context(tmp_path, on_save=hook, saved=lambda: saves.append(1))
    loader_state = {"g": 8, "epoch": 0, "pos": 8}
    loop.save_run(tmp_path / "ck.pt", ctx, RunState(step=3), loader_state)
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck["finetune"] == {"mode": "sft"} and all(not v.any() for v in ck["model"].values())
    assert ck["run_state"]["step"] == 3 and ck["loader"] == loader_state and ck["tokenizer_sha256"] == "abc"
    assert ck["model_config"]["n_embd"] == 32 and len(ck["optimizer"]) == 1
    assert saves == [1]
    plain = _context(tmp_path)  # no hook: the trainer's own checkpoint
    loop.save_run(tmp_path / "plain.pt", plain, RunState(step=3), loader_state)
    ck = load_checkpoint(tmp_path / "plain.pt")
    assert "finetune" not in ck and torch.equal(ck["model"]["tok_emb.weight"], plain.model.tok_emb.weight)


def test_only_rank_zero_saves(tmp_path):
    saves: list[int] = []
    ctx = _context(tmp_path, dist=distributed.Dist(rank=1, world_size=2), saved=lambda: saves.append(1))
    loop.save_run(tmp_path / "ck.pt", ctx, RunState(), {"g": 0, "epoch": 0, "pos": 0})
    assert not (tmp_path / "ck.pt").exists() and saves == []


def test_the_context_is_frozen_and_reduces_only_over_several_ranks(tmp_path):
    ctx = _context(tmp_path)
    with pytest.raises(AttributeError):
        ctx.tok_sha = "other"  # type: ignore[misc]
    assert ctx.reducer("mean") is None and ctx.agreed([1.0, 2.0]) == [1.0, 2.0]
    two = _context(tmp_path, dist=distributed.Dist(rank=0, world_size=2))
    assert callable(two.reducer("sum"))


def test_startup_breakdown_splits_the_time_to_the_first_step_into_its_phases():
    from minillm.train.loop import startup_breakdown

    marks = {"start": 100.0, "imports": 103.5, "device": 104.0, "data": 104.25, "model": 105.0}
    assert startup_breakdown(marks, 109.0) == {"imports_s": 3.5, "device_s": 0.5, "data_s": 0.25, "model_s": 0.75,
                                               "first_step_s": 4.0, "total_s": 9.0}
    assert startup_breakdown({"start": 1.0, "imports": 2.0}, 4.0) == {"imports_s": 1.0, "first_step_s": 2.0, "total_s": 3.0}
    assert startup_breakdown({}, 4.0) == {}  # no marks (a context built by hand): nothing to report


def test_the_deferred_guard_logs_the_same_loss_curve(tmp_path, tokenizer_path, corpus, monkeypatch):
    """MINILLM_STEP_SYNC=log: the (loss, norm) read back at log steps and evaluations; the recorded training
    losses, validation losses and weights are those of the synced run (both with the fused AdamW it needs)."""
    from minillm.optim import groups

    monkeypatch.setattr(groups, "lever", lambda name, device=None: "log" if name == "STEP_SYNC" else "matmul")  # fused AdamW
    plain = run(tokenizer_path, corpus, tmp_path / "plain", max_steps=9, eval_every=4, log_every=3,
                optimizer="muon")
    monkeypatch.setenv("MINILLM_STEP_SYNC", "log")
    deferred = run(tokenizer_path, corpus, tmp_path / "deferred", max_steps=9, eval_every=4, log_every=3,
                   optimizer="muon")
    assert plain["steps"] == deferred["steps"] == 9 and plain["best_val_loss"] == deferred["best_val_loss"]
    hist = [json.loads((tmp_path / n / "history.json").read_text()) for n in ("plain", "deferred")]
    assert [t["step"] for t in hist[0]["train"]] == [1, 3, 4, 6, 8, 9]
    clocks = {"tokens_per_s", "elapsed_s", "train_s", "first_step_s"}
    evals = [[{k: v for k, v in e.items() if k not in clocks} for e in h["evals"]] for h in hist]
    assert hist[0]["train"] == hist[1]["train"] and evals[0] == evals[1] and len(evals[0]) == 3
    weights = [load_checkpoint(tmp_path / n / "ckpt_last.pt")["model"] for n in ("plain", "deferred")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_deferred_nonfinite_steps_are_reported_at_the_read_back_then_stop_the_run(
        tmp_path, tokenizer_path, corpus, monkeypatch, capsys):
    """MINILLM_STEP_SYNC=log: a non-finite step is skipped on the device (it counts as a step) and reported with its
    number when the loop reads the steps back; five in a row stop the run, its checkpoints finite."""
    monkeypatch.setenv("MINILLM_STEP_SYNC", "log")
    real, calls = ts._forward, {"n": 0, "bad": lambda n: n == 3}

    def forward(model, x, y, *a, **k):
        loss = real(model, x, y, *a, **k)
        if model.training:
            calls["n"] += 1
            return loss * float("nan") if calls["bad"](calls["n"]) else loss
        return loss

    monkeypatch.setattr(ts, "_forward", forward)
    s = run(tokenizer_path, corpus, tmp_path / "one", max_steps=6, eval_every=3, log_every=5)
    err = capsys.readouterr().err
    assert s["steps"] == 6 and "step 3: non-finite loss nan; update skipped (1 in a row)" in err
    train = json.loads((tmp_path / "one" / "history.json").read_text())["train"]
    assert all(math.isfinite(t["loss"]) for t in train)

    calls["n"], calls["bad"] = 0, lambda n: n > 4
    out = tmp_path / "many"
    with pytest.raises(MiniLLMError, match=r"5 non-finite steps in a row at step 9: .*last good checkpoint"):
        run(tokenizer_path, corpus, out, max_steps=20, eval_every=4, log_every=10)
    ck = load_checkpoint(out / "ckpt_last.pt")
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
