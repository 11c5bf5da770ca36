"""Issue 24, progress and small fixes: the token cache's messages and bar, evaluate's loading phase,
--dry-run's report, --workers 0 on compressed input, the loss kernel a run records."""

from __future__ import annotations

import gzip
import io
import json
import sys

import pytest

from minillm.cli import app
from minillm.data import cache as ds
from minillm.errors import MiniLLMError


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def fake_stderr(monkeypatch):
    def use(tty: bool) -> io.StringIO:
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        return err

    return use


# ---------------------------------------------------------------- the token cache


def test_cache_says_encoding_when_it_encodes_and_reusing_when_it_reuses(tmp_path, corpus, tokenizer_path):
    first: list[str] = []
    ds.build_token_cache(tokenizer_path, corpus, tmp_path / "c", note=first.append)
    assert first == [f"encoding {corpus} into the token cache {tmp_path / 'c'}"]
    again: list[str] = []
    ds.build_token_cache(tokenizer_path, corpus, tmp_path / "c", note=again.append)
    assert again == [f"reusing the token cache {tmp_path / 'c'} of {corpus}"]


def test_no_encoding_message_just_before_a_read_error(runner, tmp_path, corpus, tokenizer_path):
    bad = tmp_path / "latin1.txt"  # a corpus that fails to read (a .gz one reads since compressed inputs do)
    bad.write_bytes(corpus.read_bytes() + "\n<|doc|>\ncanción\n".encode("latin-1"))
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(bad), "-o", str(tmp_path / "run"),
                            "--max-steps", "1", "--device", "cpu"])
    assert r.exit_code == 1 and "is not UTF-8 text" in r.stderr
    assert "token cache" not in r.stderr, r.stderr


@pytest.mark.parametrize("tty", [True, False])
def test_cache_build_shows_a_bar_on_a_terminal_only(tmp_path, corpus, tokenizer_path, fake_stderr, tty):
    err = fake_stderr(tty)
    ds.build_token_cache(tokenizer_path, corpus, tmp_path / "c")  # notes go to stderr too
    said = err.getvalue()
    assert ("token cache:" in said) == tty, said
    assert said.startswith(f"note: encoding {corpus} into the token cache {tmp_path / 'c'}\n")  # whole, before the bar
    if tty:
        assert "B/s" in said


def test_cache_progress_callback_gets_every_byte(tmp_path, corpus, tokenizer_path):
    seen: list[int] = []
    ds.build_token_cache(tokenizer_path, corpus, tmp_path / "c", progress=seen.append, note=lambda s: None,
                         batch_chars=500)
    assert len(seen) > 1
    text_bytes = sum(len(d.encode()) for d in corpus.read_text(encoding="utf-8").split("\n<|doc|>\n"))
    assert abs(sum(seen) - text_bytes) <= 2 * len(seen)  # the pieces' bytes, up to their trailing newlines


def test_a_read_error_leaves_no_message(tmp_path, tokenizer_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe" * 100)
    notes: list[str] = []
    with pytest.raises(MiniLLMError):
        ds.build_token_cache(tokenizer_path, bad, tmp_path / "c", note=notes.append)
    assert notes == []




# ---------------------------------------------------------------- --workers 0 on a compressed input


def test_workers_0_decides_from_the_text_a_gz_holds_not_its_compressed_size(tmp_path, monkeypatch):
    from minillm.corpus import prepare

    text = "".join(f"Documento {i}: la casa del rio y el camino del monte.\n\n" for i in range(2000)).encode()
    gz = tmp_path / "notes.txt.gz"
    gz.write_bytes(gzip.compress(text))
    assert prepare.text_size(gz) == len(text)
    monkeypatch.setattr(prepare, "SMALL_INPUT", len(text) // 2)  # the compressed file is far smaller than that
    assert gz.stat().st_size < prepare.SMALL_INPUT
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 2)
    s = prepare.prepare_corpus([gz], tmp_path / "out.txt")
    assert s.workers == 2


# ---------------------------------------------------------------- the loss kernel a run records


def test_liger_on_cpu_records_the_kernel_that_ran_and_resumes(runner, tmp_path, corpus, tokenizer_path):
    run = tmp_path / "run"
    args = ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", str(run), "--device", "cpu",
            "--loss-kernel", "liger", "--block-size", "32", "--batch-size", "4"]
    r = runner.invoke(app, [*args, "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    assert "--loss-kernel liger runs on CUDA only; this cpu run uses torch" in r.stderr
    assert json.loads((run / "config.json").read_text())["model"]["loss_kernel"] == "torch"
    r = runner.invoke(app, [*args, "--max-steps", "2", "--resume"])
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- evaluate's loading and encoding phase


def _model_and_tok(tokenizer_path):
    from minillm.config import ModelConfig, pad_vocab
    from minillm.model.gpt import GPT
    from minillm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    cfg = ModelConfig(vocab_size=pad_vocab(tok.get_vocab_size()), block_size=32, n_layer=1, n_head=2, n_embd=32)
    return GPT(cfg).eval(), tok


@pytest.mark.parametrize("tty", [True, False])
def test_evaluate_shows_reading_and_encoding_on_a_terminal_only(tmp_path, corpus, tokenizer_path, fake_stderr, tty):
    from minillm.evaluation import eval_texts, evaluate_texts

    model, tok = _model_and_tok(tokenizer_path)
    err = fake_stderr(tty)
    texts, source = eval_texts(corpus, tmp_path)
    res = evaluate_texts(model, tok, texts, source, batch_size=8)
    shown = err.getvalue()
    assert res["documents"] == 40
    if tty:
        for phase in (f"reading {corpus.name}", "encoding", "evaluate"):
            assert phase in shown, shown
        assert "0/40" in shown  # the encoding bar counts documents
    else:
        assert shown == ""


def test_split_val_reading_shows_on_a_terminal(runner, tmp_path, corpus, tokenizer_path, fake_stderr):
    from minillm.evaluation import eval_texts

    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", str(run), "--device", "cpu",
                            "--block-size", "32", "--batch-size", "4", "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    err = fake_stderr(True)
    texts, _ = eval_texts(None, run)
    assert texts and f"reading {corpus.name}" in err.getvalue()


# ---------------------------------------------------------------- --dry-run


def _dry_run(runner, tokenizer_path, corpus, *args) -> dict:
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", "unused", "--dry-run",
                            "--device", "cpu", "--block-size", "32", "--batch-size", "4", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_dry_run_gives_gib_the_steps_and_epochs_implied_and_a_measured_time(runner, tmp_path, corpus, tokenizer_path):
    from minillm.config import TrainConfig
    from minillm.train.state import total_steps_for

    rep = _dry_run(runner, tokenizer_path, corpus, "--epochs", "2")
    mem = rep["memory_estimate_gib"]
    assert all(isinstance(v, float) and 0 < v < 1 for v in mem.values()), mem  # GiB, not raw bytes
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"), rel=0.01)
    n_tokens = ds.build_token_cache(tokenizer_path, corpus, tmp_path / "c", note=lambda s: None).n_tokens
    data = rep["data"]
    assert data["tokens_about"] == n_tokens  # a small corpus is encoded whole: exact
    assert data["steps"] == total_steps_for(TrainConfig(batch_size=4, epochs=2), data["windows_per_epoch_about"])
    assert data["epochs"] == pytest.approx(2, abs=0.1)
    t = rep["time_estimate"]
    assert t["device"] == "cpu" and t["method"].startswith("measured") and t["seconds_per_step"] > 0
    assert t["total_s"] == pytest.approx(data["steps"] * t["seconds_per_step"], rel=0.01, abs=0.1)


def test_dry_run_with_max_time_alone_gives_the_steps_that_fit(runner, corpus, tokenizer_path):
    rep = _dry_run(runner, tokenizer_path, corpus, "--max-time", "10m")
    t = rep["time_estimate"]
    assert rep["data"]["steps"] == 0 and "total_s" not in t
    assert t["steps_in_max_time"] == pytest.approx(600 / t["seconds_per_step"], rel=0.01)


def test_a_big_model_on_the_cpu_is_estimated_from_matmul_speed_not_run(monkeypatch, tmp_path, corpus, tokenizer_path):
    from minillm.config import resolve
    from minillm.train import dryrun

    def never(*a, **k):
        raise AssertionError("a step this slow must not be run by --dry-run")

    monkeypatch.setattr(dryrun, "measure_step", never)
    monkeypatch.setattr(dryrun, "matmul_flops", lambda device, dtype: 1e9)  # a slow device
    mcfg, tcfg = resolve("small", {"device": "cpu"})
    rep = dryrun.dry_run_report(tokenizer_path, (corpus,), mcfg, tcfg)
    t = rep["time_estimate"]
    assert t["method"].startswith("matmul") and t["seconds_per_step"] > dryrun.MEASURE_UNDER_S
