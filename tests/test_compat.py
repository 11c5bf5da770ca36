"""Runs, adapters and exports written by an earlier version (tests/fixtures/v_c624e6b, commit c624e6b) keep
loading, resuming, generating, evaluating and exporting. The figures were measured with that version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v_c624e6b"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    dst = tmp_path / "old"
    shutil.copytree(FIXTURE, dst)
    return dst


def _cli(runner, *args: str):
    from minillm.cli import app

    return runner.invoke(app, list(args))


def test_old_run_loads_with_its_weights(old):
    import torch

    from minillm.model.load import load_model

    model, state = load_model(old / "run" / "ckpt_best.pt")
    for name, t in model.state_dict().items():
        assert torch.equal(t, state["model"][name]), name
    assert model.cfg.n_layer == 1 and model.cfg.n_embd == 32 and model.cfg.vocab_size == 320


def test_old_run_evaluates_to_the_same_loss(old, runner, monkeypatch):
    monkeypatch.chdir(old)
    r = _cli(runner, "evaluate", "--ckpt", "run", "--test-file", "corpus.txt", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["loss"] == pytest.approx(5.402842604323362, abs=1e-4)  # what c624e6b printed
    assert res["tokens"] == 4644


@pytest.mark.parametrize("ckpt,extra", [("run", ()), ("run/ckpt_best.pt", ("--adapter", "lora/adapter.pt")),
                                        ("hf", ())])
def test_old_run_adapter_and_export_generate(old, runner, monkeypatch, ckpt, extra):
    monkeypatch.chdir(old)
    r = _cli(runner, "generate", "--ckpt", ckpt, *extra, "-p", "el rey", "--temperature", "0", "--max-tokens", "12",
             "--repetition-penalty", "1.1", "--json", "--device", "cpu")  # c624e6b's default (greedy's is now 1.3)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["completion"] == " d d d d d d d d d d d d"  # c624e6b's greedy text


def test_old_run_resumes(old, runner, monkeypatch, no_plots):
    monkeypatch.chdir(old)
    r = _cli(runner, "train", "-t", "run/tokenizer.json", "-c", "corpus.txt", "-o", "run", "--config", "fx.toml",
             "--resume", "--max-steps", "9")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["steps"] == 9
    assert res["best_val_loss"] == pytest.approx(5.343135833740234, abs=1e-4)  # c624e6b resumed to this


def test_old_run_exports(old, runner, monkeypatch):
    pytest.importorskip("safetensors")
    monkeypatch.chdir(old)
    r = _cli(runner, "export", "--ckpt", "run", "-o", "new_hf", "--format", "hf")
    assert r.exit_code == 0, r.output
    cfg = json.loads((old / "new_hf" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 32
