"""The six stages through the CLI on a tiny corpus, checking each stage's exit code and files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minillm.cli import app
from tests.conftest import make_corpus


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, runner):
    raw = make_corpus(tmp_path / "raw.txt", n_docs=60)
    clean = tmp_path / "clean.txt"
    r = runner.invoke(app, ["prepare-corpus", "--input", str(raw), "--output", str(clean)])
    assert r.exit_code == 0, r.output
    assert clean.read_text(encoding="utf-8").count("\n<|doc|>\n") == 59

    r = runner.invoke(app, ["analyze-corpus", "--corpus", str(clean), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["documents"] == 60

    tok = tmp_path / "tok.json"
    r = runner.invoke(app, ["init-tokenizer", "--files", str(clean), "--vocab-size", "400", "--out", str(tok)])
    assert r.exit_code == 0, r.output
    assert tok.is_file()

    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--tokenizer", str(tok), "--corpus", str(clean), "--outdir", str(run),
                            "--config", "tiny", "--max-steps", "40", "--block-size", "32", "--device", "cpu",
                            "--eval-every", "20", "--log-every", "10"])
    assert r.exit_code == 0, r.output
    for name in ("config.json", "tokenizer.json", "ckpt_best.pt", "ckpt_last.pt", "history.json", "curves.png"):
        assert (run / name).is_file(), name
    hist = json.loads((run / "history.json").read_text())["evals"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] or hist[-1]["train_loss"] < 5.5  # the loss falls
    assert set(hist[0]) >= {"step", "epoch", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "elapsed_s"}

    r = runner.invoke(app, ["generate", "--ckpt", str(run / "ckpt_best.pt"), "--prompt", "el", "--max-tokens", "20",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("el") and len(r.stdout.strip()) > 2

    held = make_corpus(tmp_path / "held.txt", n_docs=5, seed=99)
    r = runner.invoke(app, ["evaluate", "--ckpt", str(run / "ckpt_best.pt"), "--test-file", str(held), "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert 1 < res["perplexity"] < 400 and res["bits_per_byte"] > 0


def test_help_lists_the_six_subcommands():
    out = subprocess.run([sys.executable, "-m", "minillm", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("prepare-corpus", "analyze-corpus", "init-tokenizer", "train", "generate", "evaluate"):
        assert cmd in out


def test_version(runner):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "minillm" in r.stdout


@pytest.mark.parametrize("cmd", ["prepare-corpus", "analyze-corpus", "init-tokenizer", "train", "generate", "evaluate"])
def test_each_subcommand_has_help(runner, cmd):
    r = runner.invoke(app, [cmd, "-h"])
    assert r.exit_code == 0 and "--" in r.stdout
