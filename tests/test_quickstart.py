"""A newcomer's own plain text: prepare-corpus says when a file became one document, and scripts/quickstart.sh
splits such text at blank lines, holds out a share of the documents and follows analyze-corpus's advice."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.cli import app
from minillm.corpus.read import iter_documents

ROOT = Path(__file__).resolve().parents[1]


def _plain_book(path: Path, n_paragraphs: int, seed: int = 0) -> Path:
    """Paragraphs of made-up Spanish-like words separated by blank lines, no <|doc|> line: a book as people have it."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("aeioulmnrstcdp") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(60, 180))) + "." for _ in range(n_paragraphs)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


def test_prepare_corpus_says_a_plain_file_became_one_document(tmp_path, runner):
    book = _plain_book(tmp_path / "book.txt", 300)
    out = tmp_path / "corpus.txt"
    r = runner.invoke(app, ["prepare-corpus", "--input", str(book), "--output", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["documents_out"] == 1
    note = next(line for line in r.stderr.splitlines() if "single document" in line)
    mb = out.stat().st_size / 1e6
    assert f"{mb:.1f} MB" in note and str(book) in note and "--split-on-blank-lines" in note and "<|doc|>" in note

    r = runner.invoke(app, ["prepare-corpus", "--input", str(book), "--output", str(out), "--split-on-blank-lines"])
    assert r.exit_code == 0, r.output
    assert "single document" not in r.stderr and len(list(iter_documents(out))) == 300


def test_the_hint_never_repeats_the_option_that_just_ran(tmp_path, runner):
    """A file without blank lines stays one document with --split-on-blank-lines: the note then asks for blank
    lines or <|doc|> lines in the text instead of the option the user already gave."""
    one = tmp_path / "one.txt"
    one.write_text("una línea\n" * 50, encoding="utf-8")
    r = runner.invoke(app, ["prepare-corpus", "--input", str(one), "--output", str(tmp_path / "c.txt"),
                            "--split-on-blank-lines", "--no-dedup"])
    assert r.exit_code == 0, r.output
    note = next(line for line in r.stderr.splitlines() if "single document" in line)
    assert "--split-on-blank-lines" not in note and "blank line" in note and "<|doc|>" in note


def test_no_note_for_a_corpus_of_documents(tmp_path, runner):
    corpus = tmp_path / "docs.txt"
    corpus.write_text("uno dos tres\n<|doc|>\ncuatro cinco\n", encoding="utf-8")
    r = runner.invoke(app, ["prepare-corpus", "--input", str(corpus), "--output", str(tmp_path / "c.txt")])
    assert r.exit_code == 0, r.output
    assert "single document" not in r.stderr


def _quickstart(tmp_path: Path, *inputs: Path, max_time: str = "20s") -> subprocess.CompletedProcess:
    """scripts/quickstart.sh on ``inputs`` into tmp_path/run, in the environment running the tests."""
    env = {**os.environ, "RUN": str(tmp_path / "run"), "VENV": sys.prefix, "MAX_TIME": max_time,
           "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh"), *map(str, inputs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quickstart_on_a_plain_multi_mb_file(tmp_path):
    """A 2.3 MB book without <|doc|> lines: split at blank lines, 5% of its paragraphs held out, trained with
    analyze-corpus's vocabulary, epochs, block size and stride, then generated from and evaluated."""
    book = _plain_book(tmp_path / "book.txt", 3000)
    assert book.stat().st_size > 2_000_000
    r = _quickstart(tmp_path, book, max_time="60s")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    assert "--split-on-blank-lines" in r.stderr and "single document" not in r.stderr
    assert len(list(iter_documents(run / "corpus.txt"))) == 3000
    assert len(list(iter_documents(run / "heldout.txt"))) == 150
    assert len(list(iter_documents(run / "train.txt"))) == 2850

    rec = json.loads((run / "analysis.json").read_text())["recommendations"]
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(run / "tokenizer.json")).get_vocab_size() == rec["vocab_size"]
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["train"]["epochs"] == rec["epochs"] and cfg["train"]["stride"] == rec["stride"]
    assert cfg["model"]["block_size"] == rec["block_size"]
    assert (run / "model" / "ckpt_best.pt").is_file()
    assert "Held-out evaluation:" in r.stdout and "perplexity" in r.stdout.split("Held-out evaluation:")[1]


def test_quickstart_stops_on_text_it_cannot_split(tmp_path):
    """Lines without a blank line between them stay one document even split at blank lines: the quickstart
    stops after prepare-corpus, saying what to put in the text (not to run a command it just ran)."""
    one = tmp_path / "notes.txt"
    one.write_text("".join(f"nota número {i}\n" for i in range(200)), encoding="utf-8")
    r = _quickstart(tmp_path, one)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "1 document(s)" in last and "blank line or a <|doc|> line between documents" in last
    assert "run minillm" not in r.stderr and not (tmp_path / "run" / "train.txt").exists()


def test_quickstart_splits_when_prepare_corpus_reports_one_document(tmp_path):
    """A directory is not searched for <|doc|> lines up front: when prepare-corpus makes one document of it, the
    quickstart runs it again with --split-on-blank-lines (here still one document, so it stops)."""
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("".join(f"nota número {i}\n" for i in range(200)), encoding="utf-8")
    r = _quickstart(tmp_path, texts)
    assert r.returncode == 1
    assert "[quickstart] 1 document(s): splitting the input at blank lines too" in r.stderr
    assert r.stderr.count("== 1/6 prepare-corpus") == 1 and "1 document(s); the quickstart needs at least 3" in r.stderr
