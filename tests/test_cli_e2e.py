"""The six stages through the CLI on a tiny corpus, checking each stage's exit code and files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from minillm.cli import app
from tests.conftest import events, make_corpus


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
                            "--config", "tiny", "--max-steps", "40", "--epochs", "0", "--block-size", "32",
                            "--device", "cpu", "--eval-every", "20", "--log-every", "10", "--log-format", "json"])
    assert r.exit_code == 0, r.output
    for name in ("config.json", "tokenizer.json", "ckpt_best.pt", "ckpt_last.pt", "history.json", "curves.png"):
        assert (run / name).is_file(), name
    hist = json.loads((run / "history.json").read_text())["evals"]
    assert [h["step"] for h in hist] == [20, 40]
    # it learns: step 1's loss (of the initial weights) is about ln(vocabulary), i.e. a uniform guess; the
    # validation loss ends far below it and still falls between the two evaluations
    init_loss = events(r.stderr)[0]["loss"]
    assert events(r.stderr)[0]["step"] == 1 and init_loss > math.log(400) - 0.5
    assert hist[-1]["val_loss"] < init_loss - 1.5 and hist[-1]["val_loss"] < hist[0]["val_loss"]
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
    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import load_tokenizer

    texts = list(iter_documents(held))
    n_tokens = sum(len(e.ids) for e in load_tokenizer(tok).encode_batch(texts, add_special_tokens=False))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (res["documents"], res["tokens"], res["bytes"]) == (5, n_tokens, n_bytes)  # every token scored once
    # held-out documents of the same kind score like the run's own validation split
    assert abs(res["loss"] - hist[-1]["val_loss"]) < 0.3
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * n_tokens / n_bytes / math.log(2))


def test_help_lists_the_six_subcommands():
    out = subprocess.run([sys.executable, "-m", "minillm", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("prepare-corpus", "analyze-corpus", "init-tokenizer", "train", "generate", "evaluate"):
        assert cmd in out


def test_version(runner):
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "minillm" in r.stdout


# Each command's help: some of its own flags, and one it must not have (another command's, or for finetune a
# model-shape flag: the base fixes the shape).
HELP = {
    "prepare-corpus": (["--input", "--output", "--near-dedup", "--json"], "--ckpt"),
    "analyze-corpus": (["--corpus", "--tokenizer", "--plot", "--json"], "--output"),
    "init-tokenizer": (["--files", "--vocab-size", "--out"], "--corpus"),
    "train": (["--tokenizer", "--corpus", "--outdir", "--config", "--resume", "--max-time", "--n-layer", "--nproc"],
              "--ckpt"),
    "finetune": (["--ckpt", "--data", "--outdir", "--mode", "--lora-rank", "--max-steps"], "--n-layer"),
    "generate": (["--ckpt", "--prompt", "--max-tokens", "--temperature", "--adapter"], "--corpus"),
    "evaluate": (["--ckpt", "--test-file", "--split", "--stride"], "--prompt"),
    "merge": (["--ckpt", "--adapter", "--out"], "--format"),
    "export": (["--ckpt", "--out", "--format", "--dtype", "--adapter"], "--prompt"),
}


@pytest.mark.parametrize("cmd", list(HELP))
def test_each_subcommand_has_help(runner, cmd):
    r = runner.invoke(app, [cmd, "-h"])
    assert r.exit_code == 0, r.output
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.stdout))
    own, foreign = HELP[cmd]
    assert set(own) <= flags and foreign not in flags, (cmd, sorted(flags))


@pytest.mark.parametrize("written", [False, True])
def test_an_interrupt_after_the_output_was_written_says_so(tmp_path, capsys, written):
    """A signal that lands after a command replaced its output (but before it returned) must not claim that the
    files from before are unchanged: it names what was written in full."""
    import typer

    from minillm.cli import handle_errors
    from minillm.io import atomic_write_text

    out = tmp_path / "out.txt"
    out.write_text("before")

    @handle_errors
    def command():
        if written:
            atomic_write_text(out, "after")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        command()
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.exit_code == 130 and "interrupted (SIGINT)" in err
    if written:
        assert out.read_text() == "after" and str(out) in err and "written in full" in err
        assert "files from before are unchanged" not in err
    else:
        assert out.read_text() == "before" and "files from before are unchanged" in err
