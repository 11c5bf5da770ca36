"""The plan as a config file: `plan --write-config` writes a TOML that `train --config FILE` runs unchanged
(checked through `train --dry-run`), and the lines a planned run starts with."""

from __future__ import annotations

import json

from minillm.config import resolve
from minillm.plan.devices import DEVICES
from minillm.plan.report import plan_lines, plan_toml
from minillm.plan.rules import CorpusFigures, plan
from tests.conftest import make_corpus


def _plan(device: str = "h100"):
    return plan(CorpusFigures(4_000_000, 1000, [4000] * 1000), DEVICES[device], 120)


def test_the_toml_resolves_to_the_plans_settings(tmp_path):
    p = _plan()
    path = tmp_path / "plan.toml"
    path.write_text(plan_toml(p, "corpus.txt"), encoding="utf-8")
    m, t = resolve(str(path))
    m2, t2 = resolve(p.preset, {**p.model, **p.train})
    assert (m, t) == (m2, t2) and t.max_time == 120.0 and m.dropout == 0.2
    assert plan_toml(p).startswith("# minillm plan: h100, budget 120 s")


def test_write_config_round_trips_through_train_dry_run(tmp_path, runner, tokenizer_path):
    from minillm.cli import app

    c = make_corpus(tmp_path / "c.txt", n_docs=200)
    cfg = tmp_path / "plan.toml"
    r = runner.invoke(app, ["plan", "-c", str(c), "-t", str(tokenizer_path), "--budget", "3m", "--device", "cpu",
                            "--write-config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert f"--config {cfg}" in p["commands"][-1]
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(c), "-o", str(tmp_path / "run"),
                            "--config", str(cfg), "--dry-run", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {k: d["model"][k] for k in p["model"]} == p["model"]
    assert {k: d["train"][k] for k in p["train"]} == p["train"]
    assert d["model"]["vocab_size"] == 320  # the tokenizer's 300, padded to a multiple of 64


def test_write_config_refuses_to_overwrite_an_input(tmp_path, runner):
    from minillm.cli import app

    c = make_corpus(tmp_path / "c.txt")
    r = runner.invoke(app, ["plan", "-c", str(c), "--device", "cpu", "--write-config", str(c)])
    assert r.exit_code == 1 and "also an input" in r.output


def test_plan_lines_name_every_choice_and_the_expectation():
    d = json.loads(json.dumps(_plan().to_dict()))
    lines = plan_lines(d)
    assert lines[0].startswith("plan (h100, 120 s): small 6 x 256, vocabulary 2,048, block 256, stride 128")
    assert "bits per byte" in lines[1] and "GiB" in lines[1]
    assert sum(line.startswith("plan: model:") for line in lines) == 1
