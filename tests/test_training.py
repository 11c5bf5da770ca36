"""The training loop on tiny CPU runs: the schedule, optimizer groups, clipping, accumulation, early
stopping, exact resume, refusals, non-finite losses, OOM, time budgets, TensorBoard, and signals sent to a
real ``minillm train`` process (SIGINT 130, SIGTERM 143, SIGKILL at any moment)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import load_checkpoint
from minillm.config import pad_vocab, resolve
from minillm.data.loader import Mixture
from minillm.errors import MiniLLMError
from minillm.optim.groups import Schedule
from minillm.train import loop
from minillm.train import run as tr
from minillm.train import step as ts
from tests.conftest import events, wait_for_step

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=32, batch_size=4, device="cpu", eval_batches=2, log_every=1,
            warmup_steps=2, compile="off")


pytestmark = pytest.mark.usefixtures("no_plots")


def run(tokenizer: Path, corpus: Path, out: Path, resume: bool = False, overwrite: bool = False,
        log_format: str = "json", **overrides):
    mcfg, tcfg = resolve("tiny", {**TINY, **overrides})
    spec = tr.RunSpec(tokenizer=tokenizer, corpus=Mixture((corpus,)), outdir=out, resume=resume, overwrite=overwrite,
                      log_format=log_format)
    return tr.train(spec, mcfg, tcfg)


# ---------------------------------------------------------------- whole runs


def test_a_run_writes_its_artifacts_and_the_loss_falls(tmp_path, tokenizer_path, corpus, capsys):
    out = tmp_path / "run"
    summary = run(tokenizer_path, corpus, out, max_steps=30, eval_every=10, lr=1e-2)
    assert summary["steps"] == 30 and summary["end"] == "schedule"
    for name in ("config.json", "tokenizer.json", "ckpt_best.pt", "ckpt_last.pt", "history.json", "curves.png"):
        assert (out / name).is_file(), name
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp"))
    hist = json.loads((out / "history.json").read_text())
    assert hist["format"] == 1 and [h["step"] for h in hist["evals"]] == [10, 20, 30]
    assert hist["evals"][-1]["val_loss"] < hist["evals"][0]["val_loss"]
    assert set(hist["evals"][0]) >= {"step", "epoch", "tokens", "train_loss", "val_loss", "val_ppl", "lr",
                                     "tokens_per_s", "elapsed_s"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_embd"] == 32 and cfg["data"]["tokenizer_sha256"]
    steps = events(capsys.readouterr().err)
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert {"epoch", "loss", "lr", "tokens_per_s", "mfu", "eta_s"} <= set(steps[0])


def test_default_eval_every_is_about_ten_per_run(tmp_path, tokenizer_path, corpus):
    run(tokenizer_path, corpus, tmp_path / "r", max_steps=20, log_every=5)
    hist = json.loads((tmp_path / "r" / "history.json").read_text())["evals"]
    assert [h["step"] for h in hist] == list(range(2, 21, 2))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, tokenizer_path, corpus, capsys, monkeypatch, optimizer):
    """12 steps straight == 7 steps, SIGINT, --resume, 5 steps: the same per-step losses, history and weights
    (dropout on: the RNG state is restored too; a background prefetcher reads ahead of what is consumed;
    with Muon, its momentum buffers travel through the checkpoint)."""
    kw = dict(max_steps=12, eval_every=4, dropout=0.1, num_workers=1, optimizer=optimizer)
    run(tokenizer_path, corpus, tmp_path / "a", **kw)
    straight = [(e["step"], e["loss"]) for e in events(capsys.readouterr().err)]

    real_lr_at, fired = loop.lr_at, []

    def lr_at_then_sigint(step, s):
        if step == 6 and not fired:
            fired.append(step)
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step finishes, then the loop saves
        return real_lr_at(step, s)

    monkeypatch.setattr(loop, "lr_at", lr_at_then_sigint)
    with pytest.raises(tr.Interrupted) as exc:
        run(tokenizer_path, corpus, tmp_path / "b", **kw)
    assert exc.value.exit_code == 130 and "--resume" in str(exc.value)
    assert load_checkpoint(tmp_path / "b" / "ckpt_last.pt")["run_state"]["step"] == 7
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    run(tokenizer_path, corpus, tmp_path / "b", resume=True, **kw)
    split = [(e["step"], e["loss"]) for e in events(capsys.readouterr().err)]
    assert split == straight and len(straight) == 12

    ha, hb = (json.loads((tmp_path / d / "history.json").read_text())["evals"] for d in "ab")
    keys = ("step", "epoch", "tokens", "train_loss", "val_loss", "lr")
    assert [[h[k] for k in keys] for h in ha] == [[h[k] for k in keys] for h in hb]
    wa, wb = (load_checkpoint(tmp_path / d / "ckpt_last.pt") for d in "ab")
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert len(wa["optimizer"]) == (2 if optimizer == "muon" else 1)
    for sa, sb in zip(wa["optimizer"], wb["optimizer"], strict=True):
        assert sa["state"].keys() == sb["state"].keys() and sa["state"]
        for i in sa["state"]:
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k]))
                       for k, v in sa["state"][i].items())
    assert wa["loader"] == wb["loader"] and wa["run_state"]["best_val"] == wb["run_state"]["best_val"]


@pytest.mark.parametrize("first, then", [("step", "log"), ("log", "step")])
def test_a_run_resumes_with_the_other_non_finite_check(tmp_path, tokenizer_path, corpus, monkeypatch, first, then):
    """A run started where the check runs on the host (the CPU, an earlier version: plain AdamW) resumes where it
    runs on the device (a GPU now: fused AdamW with a found_inf) and back. The optimizer's implementation is this
    machine's, not the checkpoint's: its saved ``fused`` flag once made the resumed step fail ("Expected grad_scale
    and found_inf to be None")."""
    kw = dict(max_steps=8, eval_every=4, optimizer="adamw")
    monkeypatch.setenv("MINILLM_STEP_SYNC", first)
    run(tokenizer_path, corpus, tmp_path / "r", max_steps=4, eval_every=4, optimizer="adamw")
    monkeypatch.setenv("MINILLM_STEP_SYNC", then)
    summary = run(tokenizer_path, corpus, tmp_path / "r", resume=True, **kw)
    assert summary["steps"] == 8
    ck = load_checkpoint(tmp_path / "r" / "ckpt_last.pt")
    assert ck["run_state"]["step"] == 8 and all(torch.isfinite(t).all() for t in ck["model"].values())
    assert bool(ck["optimizer"][0]["param_groups"][0]["fused"]) == (then == "log")


def test_resume_refuses_other_changes_naming_the_keys(tmp_path, tokenizer_path, corpus):
    out = tmp_path / "r"
    run(tokenizer_path, corpus, out, max_steps=4, eval_every=2)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(MiniLLMError, match=r"(?s)model\.n_embd: 32 -> 64.*train\.lr"):
        run(tokenizer_path, corpus, out, resume=True, max_steps=4, eval_every=2, n_embd=64, lr=1e-4)
    other_tok = tmp_path / "other.json"
    other_tok.write_text(tokenizer_path.read_text().replace('"<|pad|>"', '"<|pad|>" ', 1))
    with pytest.raises(MiniLLMError, match="not the tokenizer") as exc:
        run(other_tok, corpus, out, resume=True, max_steps=4, eval_every=2)
    assert str(out / "tokenizer.json") in str(exc.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_resume_may_change_the_length_and_recomputes_the_decay(tmp_path, tokenizer_path, corpus, capsys):
    out = tmp_path / "r"
    run(tokenizer_path, corpus, out, max_steps=6, eval_every=3, patience=5)
    capsys.readouterr()
    s = run(tokenizer_path, corpus, out, resume=True, max_steps=10, eval_every=5, patience=7, log_every=2)
    err = capsys.readouterr().err
    assert s["steps"] == 10 and "cosine decay is recomputed from step 6" in err
    lrs = [e["lr"] for e in events(err)]
    ck = load_checkpoint(out / "ckpt_last.pt")
    sched = Schedule(**ck["run_state"]["schedule"])
    assert sched.total == 10 and sched.anchor_step == 6 and lrs == sorted(lrs, reverse=True)
    done = run(tokenizer_path, corpus, out, resume=True, max_steps=10, eval_every=5, patience=7)
    assert done["steps"] == 10  # an already finished run just reports


def test_existing_outdir_is_refused_untouched(tmp_path, tokenizer_path, corpus, runner):
    from minillm.cli import app

    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", str(out), "--device", "cpu"]
    for extra in ([], ["--overwrite"]):  # not a run: neither taken over nor replaced
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 1 and "not a minillm run" in r.stderr and "another --outdir" in r.stderr
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 1 and "no checkpoint" in r.stderr


def test_cuda_oom_names_smaller_settings(tmp_path, tokenizer_path, corpus, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ts, "_forward", oom)
    with pytest.raises(MiniLLMError) as exc:
        run(tokenizer_path, corpus, tmp_path / "r", max_steps=4, accumulation_steps=2)
    msg = str(exc.value)
    assert "--batch-size 2 --accumulation-steps 4" in msg and "--gradient-checkpointing" in msg and "intact" in msg


def test_tensorboard_missing_names_the_install(tmp_path, tokenizer_path, corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    mcfg, tcfg = resolve("tiny", TINY)
    spec = tr.RunSpec(tokenizer=tokenizer_path, corpus=Mixture((corpus,)), outdir=tmp_path / "r", tensorboard=True)
    with pytest.raises(MiniLLMError, match="pip install tensorboard"):
        tr.train(spec, mcfg, tcfg)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_tensorboard_writes_event_files(tmp_path, tokenizer_path, corpus):
    pytest.importorskip("tensorboard")
    mcfg, tcfg = resolve("tiny", {**TINY, "max_steps": 4, "eval_every": 2})
    spec = tr.RunSpec(tokenizer=tokenizer_path, corpus=Mixture((corpus,)), outdir=tmp_path / "r", tensorboard=True)
    tr.train(spec, mcfg, tcfg)
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))


def test_vocab_is_padded_from_the_tokenizer(tmp_path, tokenizer_path, corpus):
    run(tokenizer_path, corpus, tmp_path / "r", max_steps=2, eval_every=2)
    ck = load_checkpoint(tmp_path / "r" / "ckpt_last.pt")
    from minillm.tokenizer import load_tokenizer

    assert ck["model_config"]["vocab_size"] == pad_vocab(load_tokenizer(tokenizer_path).get_vocab_size())


# ---------------------------------------------------------------- signals to a real process


def _spawn(tokenizer: Path, corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "minillm", "train", "-t", str(tokenizer), "-c", str(corpus), "-o", str(out),
           "--device", "cpu", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
           "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2", "--log-format", "json",
           "--log-every", "1", "--compile", "off", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_loadable_checkpoint_and_exits(tmp_path, tokenizer_path, corpus, sig, code):
    out = tmp_path / "r"
    proc = _spawn(tokenizer_path, corpus, out, "--max-steps", "100000")
    try:
        wait_for_step(proc, 3)
        if sig == signal.SIGTERM:  # while it runs, a second train into the same --outdir is refused
            with pytest.raises(MiniLLMError, match=rf"in use by another process \(pid {proc.pid}"):
                run(tokenizer_path, corpus, out, overwrite=True, max_steps=100000)
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    ck = load_checkpoint(out / "ckpt_last.pt")
    assert ck["run_state"]["step"] >= 3 and not (out / ".lock").exists()


def test_sigkill_leaves_loadable_checkpoints_and_resume_clears_the_stale_lock(tmp_path, tokenizer_path, corpus):
    out = tmp_path / "r"
    proc = _spawn(tokenizer_path, corpus, out, "--max-steps", "100000", "--eval-every", "3")
    wait_for_step(proc, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / ".lock").exists()  # left by the killed run
    step = load_checkpoint(out / "ckpt_last.pt")["run_state"]["step"]
    assert step >= 6 and load_checkpoint(out / "ckpt_best.pt")["run_state"]["step"] >= 3
    kw = {k: v for k, v in TINY.items() if k not in ("log_every",)}
    mcfg, tcfg = resolve("tiny", {**kw, "log_every": 1, "max_steps": step + 2, "eval_every": 3, "num_workers": 1})
    spec = tr.RunSpec(tokenizer=tokenizer_path, corpus=Mixture((corpus,)), outdir=out, resume=True, log_format="json")
    assert tr.train(spec, mcfg, tcfg)["steps"] == step + 2
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp"))
