"""The corpus figures a plan reads (document sizes in one pass, bytes per token from a sample), and the
`plan` command: its table, --json, errors, and its speed on a 30 MB corpus."""

from __future__ import annotations

import json
import time

import pytest

from minillm.corpus.stats import analyze
from minillm.errors import MiniLLMError
from minillm.plan.figures import corpus_figures, figures_from_stats
from tests.conftest import make_corpus


def test_corpus_figures_count_documents_and_bytes(tmp_path):
    c = make_corpus(tmp_path / "c.txt", n_docs=30)
    f = corpus_figures(c)
    assert f.documents == 30 and f.bytes == c.stat().st_size and f.vocab_size is None and f.bytes_per_token is None
    assert f.bytes - sum(f.doc_bytes) == len("\n<|doc|>\n") * 29 + 1  # separators and the last newline


def test_with_a_tokenizer_its_vocabulary_and_measured_bytes_per_token(tmp_path, corpus, tokenizer_path):
    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    f = corpus_figures(corpus, tok)
    docs = list(iter_documents(corpus))
    tokens = sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    assert f.vocab_size == tok.get_vocab_size()
    assert f.bytes_per_token == pytest.approx(sum(len(d.encode()) for d in docs) / tokens)  # all of a small corpus


def test_figures_from_analyze_keep_its_token_counts(tmp_path, corpus, tokenizer_path):
    from minillm.tokenizer import load_tokenizer

    s = analyze(corpus, tokenizer=load_tokenizer(tokenizer_path))
    f = figures_from_stats(s, 300)
    assert f.lengths(300) == list(s.lengths) and f.vocab_size == 300
    est = figures_from_stats(analyze(corpus))
    assert est.doc_tokens is None and est.vocab_size is None and sum(est.doc_bytes) == 4 * sum(analyze(corpus).lengths)


def test_an_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("<|doc|>\n", encoding="utf-8")
    with pytest.raises(MiniLLMError, match="no documents"):
        corpus_figures(tmp_path / "e.txt")


def test_plan_prints_its_choices_and_the_commands(tmp_path, runner):
    from minillm.cli import app

    c = make_corpus(tmp_path / "c.txt", n_docs=200)
    r = runner.invoke(app, ["plan", "-c", str(c), "--budget", "5m", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for word in ("model", "vocabulary", "block size", "stride", "dropout", "bits per byte", "memory", "tokens/s"):
        assert word in r.stdout
    assert f"minillm init-tokenizer --files {c} --vocab-size 2048" in r.stdout and "--config auto" in r.stdout


def test_plan_json_for_a_gpu_elsewhere(tmp_path, runner):
    from minillm.cli import app

    c = make_corpus(tmp_path / "c.txt", n_docs=200)
    r = runner.invoke(app, ["plan", "-c", str(c), "--budget", "2m", "--device", "h100", "--gpu-memory", "40GB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == 1 and d["device"] == "h100" and d["budget_s"] == 120.0 and d["train"]["max_time"] == 120.0
    assert d["memory_bytes"] < 40 * 2**30 and len(d["candidates"]) == 8 and len(d["commands"]) == 2


@pytest.mark.parametrize("args, exit_code, words", [
    (["--budget", "soon"], 2, "--budget"), (["--budget", "0"], 2, "--budget"), (["--device", "tpu"], 2, "--device"),
    (["--device", "h100", "--gpu-memory", "lots"], 2, "--gpu-memory")])
def test_plan_bad_options_are_one_line(tmp_path, runner, args, exit_code, words):
    from minillm.cli import app

    c = make_corpus(tmp_path / "c.txt")
    r = runner.invoke(app, ["plan", "-c", str(c), *args])
    assert r.exit_code == exit_code and words in r.output


def test_plan_of_a_missing_corpus_says_so(tmp_path, runner):
    from minillm.cli import app

    r = runner.invoke(app, ["plan", "-c", str(tmp_path / "none.txt")])
    assert r.exit_code == 1 and "--corpus" in r.output


def test_plan_takes_under_10_seconds_on_a_30mb_corpus(tmp_path, runner, tokenizer_path):
    from minillm.cli import app

    doc = make_corpus(tmp_path / "one.txt", n_docs=100, words_per_doc=(400, 800)).read_text(encoding="utf-8")
    big = tmp_path / "big.txt"
    with big.open("w", encoding="utf-8") as f:
        while f.tell() < 30_000_000:
            f.write(doc + "\n<|doc|>\n")
    assert big.stat().st_size >= 30_000_000
    t = time.perf_counter()
    r = runner.invoke(app, ["plan", "-c", str(big), "-t", str(tokenizer_path), "--budget", "10m", "--device", "h100",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t < 10
    assert json.loads(r.stdout)["vocab_size"] == 300


def test_plan_help_describes_every_option(runner):
    from minillm.cli import app

    r = runner.invoke(app, ["plan", "--help"])
    assert r.exit_code == 0
    for flag in ("--corpus", "--tokenizer", "--budget", "--device", "--gpu-memory", "--write-config", "--measure",
                 "--json"):
        assert flag in r.stdout


def test_measure_scales_the_tables_speed_to_the_timed_steps(monkeypatch, tmp_path, runner):
    from minillm.cli import app
    from minillm.cli.data import measured_device
    from minillm.config import ModelConfig
    from minillm.plan.devices import DEVICES

    monkeypatch.setattr("minillm.train.dryrun.measure_step", lambda *a, **k: 0.5)
    dev = measured_device(DEVICES["cpu"], "cpu")
    ref = ModelConfig(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=2048)
    assert dev.tokens_per_s(ref, "adamw", 16 * 128) == pytest.approx(16 * 128 / 0.5)
    c = make_corpus(tmp_path / "c.txt", n_docs=200)
    slow = json.loads(runner.invoke(app, ["plan", "-c", str(c), "--device", "cpu", "--measure", "--json"]).stdout)
    table = json.loads(runner.invoke(app, ["plan", "-c", str(c), "--device", "cpu", "--json"]).stdout)
    assert slow["tokens_per_s"] < table["tokens_per_s"]
