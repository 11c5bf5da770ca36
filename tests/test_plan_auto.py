"""`train --config auto`: plans for the tokenizer, the corpus, --max-time and --device, prints the plan, keeps
it in config.json; flags override it; --resume reuses the saved plan and never makes a new one."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_corpus


def _train(runner, tmp_path, tokenizer_path, *extra):
    from minillm.cli import app

    c = tmp_path / "c.txt"
    if not c.exists():
        make_corpus(c, n_docs=200)
    return runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(c), "-o", str(tmp_path / "run"),
                               "--config", "auto", "--device", "cpu", "--n-layer", "1", "--eval-batches", "1", *extra])


def test_auto_plans_prints_and_saves_the_plan_and_flags_override_it(tmp_path, runner, tokenizer_path, no_plots):
    r = _train(runner, tmp_path, tokenizer_path, "--max-time", "10m", "--max-steps", "2")
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("plan (cpu, 600 s): ")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    plan = cfg["plan"]
    assert cfg["config"] == "auto" and plan["budget_s"] == 600.0 and plan["vocab_size"] == 300
    assert cfg["model"]["n_layer"] == 1 and plan["model"]["n_layer"] != 1  # the flag over the plan
    assert cfg["model"]["n_embd"] == plan["model"]["n_embd"] and cfg["train"]["stride"] == plan["train"]["stride"]
    assert cfg["train"]["max_time"] == 600.0 and cfg["train"]["max_steps"] == 2  # flags over the plan's 0
    assert cfg["train"]["lr"] == plan["train"]["lr"] and plan["train"]["max_steps"] == 0


def test_resume_uses_the_saved_plan_never_a_new_one(tmp_path, runner, tokenizer_path, monkeypatch, no_plots):
    r = _train(runner, tmp_path, tokenizer_path, "--max-time", "10m", "--max-steps", "2")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["plan"]
    monkeypatch.setattr("minillm.cli.data.build_plan", lambda *a, **k: pytest.fail("planned again"))
    r = _train(runner, tmp_path, tokenizer_path, "--max-time", "10m", "--max-steps", "2", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["plan"] == saved


def test_auto_needs_a_budget_and_resume_needs_a_planned_run(tmp_path, runner, tokenizer_path, no_plots):
    r = _train(runner, tmp_path, tokenizer_path)
    assert r.exit_code == 2 and "--max-time" in r.output
    from minillm.cli import app

    c = tmp_path / "c.txt"
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(c), "-o", str(tmp_path / "run"),
                            "--config", "tiny", "--device", "cpu", "--max-steps", "2", "--eval-batches", "1"])
    assert r.exit_code == 0, r.output
    r = _train(runner, tmp_path, tokenizer_path, "--max-time", "10m", "--max-steps", "2", "--resume")
    assert r.exit_code == 2 and "not planned" in r.output
