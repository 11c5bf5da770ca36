"""One output rule for every command (docs/FORMATS.md): results on stdout, JSON with ``--json``, logs and
progress on stderr; train and finetune print their result as JSON with or without ``--json``. Also the text
polish of issue 24: readable ``--help`` metavars, readable tokens, rounded floats, labelled token counts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
import typer.main

from minillm.cli import app
from tests.conftest import make_corpus, make_runner

WIDE = {"COLUMNS": "300"}  # rich tables unwrapped
RUN = ["--device", "cpu", "--compile", "off", "--batch-size", "4", "--eval-batches", "1", "--log-every", "1",
       "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--eval-every", "2"]


@pytest.fixture(scope="module")
def runner():
    return make_runner()


def streams(runner, *args) -> tuple[str, str]:
    """(stdout, stderr) of one command, which must succeed."""
    r = runner.invoke(app, [str(a) for a in args], env=WIDE)
    assert r.exit_code == 0, (args[0], r.output, r.stderr)
    return r.stdout, r.stderr


def one_json_line(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory, runner) -> Path:
    """A corpus, a tokenizer and a 4-step tiny run (``run/``), each made through the CLI."""
    d = tmp_path_factory.mktemp("streams")
    make_corpus(d / "corpus.txt", 30)
    streams(runner, "init-tokenizer", "-f", d / "corpus.txt", "--vocab-size", "300", "-o", d / "tok.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("minillm.train.plots.plot_curves", lambda *a, **k: None)
        out, err = streams(runner, "train", "-t", d / "tok.json", "-c", d / "corpus.txt", "-o", d / "run",
                           "--max-steps", "4", *RUN)
    assert one_json_line(out)["steps"] == 4  # the default: one JSON line, as scripts parse it
    assert re.search(r"^step\s+1/4", err, re.M) and "step" not in out.replace('"steps"', "")
    return d


def test_prepare_corpus_prints_its_summary_table_on_stdout_and_json_with_json(runner, tmp_path):
    raw = make_corpus(tmp_path / "raw.txt", 5)
    out, err = streams(runner, "prepare-corpus", "-i", raw, "-o", tmp_path / "clean.txt", "--workers", "1")
    assert "prepare-corpus ->" in out and re.search(r"documents\s+│\s+5", out)
    assert "1 worker " in out + " " and "1 workers" not in out
    assert "documents" not in err
    out, err = streams(runner, "prepare-corpus", "-i", raw, "-o", tmp_path / "clean2.txt", "--json")
    assert json.loads(out)["documents_out"] == 5 and "{" not in err


def test_analyze_corpus_report_on_stdout_plot_note_on_stderr(runner, run, tmp_path):
    out, err = streams(runner, "analyze-corpus", "-c", run / "corpus.txt", "--plot", tmp_path / "l.png")
    assert "Documents found: 30" in out and f"wrote {tmp_path / 'l.png'}" in err and "Documents" not in err
    out, _ = streams(runner, "analyze-corpus", "-c", run / "corpus.txt", "--json")
    assert json.loads(out)["documents"] == 30


def test_analyze_corpus_rounds_its_floats_and_labels_the_two_token_counts(runner, run):
    """``"p90": 1317.8000000000002`` was printed; and the table said 240,651 tokens where its reasons said
    240,887 (the same tokens plus one <|doc|> per document): each count now has its own name."""
    out, _ = streams(runner, "analyze-corpus", "-c", run / "corpus.txt", "-t", run / "tok.json", "--json")
    tokens = json.loads(out)["tokens"]
    for key in ("mean", "median", "p90"):
        assert tokens[key] == round(tokens[key], 1), (key, tokens[key])
    assert tokens["training"] == tokens["total"] + 30
    text, _ = streams(runner, "analyze-corpus", "-c", run / "corpus.txt", "-t", run / "tok.json")
    named = {"total": f"{tokens['total']:,}", "training": f"{tokens['training']:,}"}
    counts = re.findall(r"(\d[\d,]*)\s+(training tokens|tokens)\b|(training tokens|tokens)\s+│\s+(\d[\d,]*)", text)
    seen = {(a or d, b or c) for a, b, c, d in counts if (a or d) in named.values()}
    assert seen >= {(named["total"], "tokens"), (named["training"], "training tokens")}
    assert all((n == named["training"]) == (label == "training tokens") for n, label in seen), seen


def test_init_tokenizer_prints_readable_tokens(runner, tmp_path):
    text = "Las estadísticas del año según la canción. " * 40
    corpus = tmp_path / "es.txt"
    corpus.write_text(text, encoding="utf-8")
    out, err = streams(runner, "init-tokenizer", "-f", corpus, "--vocab-size", "300", "-o", tmp_path / "t.json",
                       "--json")
    ex = json.loads(out)["examples"][0]
    assert not any(c in "".join(ex["tokens"]) for c in "ĠÃĊ")  # byte-level symbols
    assert text.startswith("".join(ex["tokens"])) and "í" in "".join(ex["tokens"])
    assert "{" not in err
    out, _ = streams(runner, "init-tokenizer", "-f", corpus, "--vocab-size", "300", "-o", tmp_path / "t.json")
    assert out.startswith(f"wrote {tmp_path / 't.json'}") and "Ġ" not in out


def test_train_accepts_json_and_keeps_progress_on_stderr(runner, run, monkeypatch):
    monkeypatch.setattr("minillm.train.plots.plot_curves", lambda *a, **k: None)
    out, err = streams(runner, "train", "-t", run / "tok.json", "-c", run / "corpus.txt", "-o", run / "run",
                       "--max-steps", "6", "--resume", "--json", *RUN)
    assert one_json_line(out)["steps"] == 6 and re.search(r"^step\s+6/6", err, re.M)
    out, _ = streams(runner, "train", "-t", run / "tok.json", "-c", run / "corpus.txt", "-o", run / "x",
                     "--dry-run", "--json")
    assert "params" in json.loads(out) and not (run / "x").exists()


def test_finetune_accepts_json_then_merge_and_export_print_text_or_json(runner, run, monkeypatch, tmp_path):
    monkeypatch.setattr("minillm.train.plots.plot_curves", lambda *a, **k: None)
    ft = tmp_path / "ft"
    out, err = streams(runner, "finetune", "--ckpt", run / "run", "--data", run / "corpus.txt", "-o", ft,
                       "--max-steps", "2", "--lora-rank", "2", "--json", *RUN[:8])
    assert one_json_line(out)["steps"] == 2 and re.search(r"^step\s+2/2", err, re.M)
    out, err = streams(runner, "merge", "--ckpt", run / "run" / "ckpt_best.pt", "--adapter", ft / "adapter.pt",
                       "-o", tmp_path / "m.pt")
    assert out.startswith(f"wrote {tmp_path / 'm.pt'}") and not err
    out, err = streams(runner, "export", "--ckpt", tmp_path / "m.pt", "-o", tmp_path / "m.safetensors",
                       "--format", "safetensors", "--json")
    assert json.loads(out)["format"] == "safetensors" and "{" not in err


def test_generate_and_evaluate_print_results_on_stdout(runner, run):
    out, err = streams(runner, "generate", "--ckpt", run / "run", "-p", "the", "--max-tokens", "4", "--device", "cpu")
    assert out.startswith("the") and out.strip() not in err
    out, _ = streams(runner, "generate", "--ckpt", run / "run", "-p", "the", "--max-tokens", "4", "--device", "cpu",
                     "--json", "-n", "2")
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["the", "the"]
    out, _ = streams(runner, "evaluate", "--ckpt", run / "run", "--test-file", run / "corpus.txt", "--device", "cpu")
    assert out.startswith("loss ") and "perplexity" in out and "30 documents)" in out
    one = make_corpus(run / "one.txt", 1)
    out, _ = streams(runner, "evaluate", "--ckpt", run / "run", "--test-file", one, "--device", "cpu")
    assert out.rstrip().endswith("tokens, 1 document)")  # not "1 documents"
    out, _ = streams(runner, "evaluate", "--ckpt", run / "run", "--test-file", run / "corpus.txt", "--device", "cpu",
                     "--json")
    assert json.loads(out)["documents"] == 30


def test_every_option_of_every_command_has_a_readable_metavar():
    """``--help`` showed Python types: ``--input <list[Path]>``, ``--max-tokens <int>``."""
    group = typer.main.get_command(app)
    readable = re.compile(r"[A-Z]+|[a-z0-9-]+(\|[a-z0-9-]+)+")
    for name, cmd in group.commands.items():
        ctx = click.Context(cmd, info_name=name)
        shown = {max(p.opts, key=len): p.get_help_record(ctx)[0].split()[-1] for p in cmd.params
                 if p.param_type_name == "option" and not p.is_flag}
        assert shown and all(readable.fullmatch(m) for m in shown.values()), (name, shown)
        if name == "train":
            assert (shown["--corpus"], shown["--max-time"], shown["--optimizer"], shown["--lr"]) == \
                ("PATH", "DURATION", "adamw|muon", "NUMBER")
