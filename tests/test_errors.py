"""Bad input and faults at the command line (issue 12): every row of the issue's table, for every stage it
applies to. Each test runs ``minillm`` (CliRunner, or a real process for SIGKILL) and checks the exit code,
that stderr names the problem and the fix in a line or two without a traceback, and that no partial output
or temporary file is left behind (a previous file stays byte for byte)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.cli import app
from tests.conftest import SAMPLE, make_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--block-size", "16", "--n-embd", "32", "--n-layer", "1", "--n-head", "2",
        "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2", "--device", "cpu", "--compile", "off",
        "--log-format", "json", "--log-every", "1"]



pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A corpus, its tokenizer (vocab 300), another tokenizer, a larger one, and a 4-step run."""
    from typer.testing import CliRunner

    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("base")
    corpus = make_corpus(d / "corpus.txt")
    paths = {"dir": d, "corpus": corpus, "tok": d / "tok.json", "other_tok": d / "other.json", "big_tok": d / "big.json"}
    save_tokenizer(train_tokenizer(iter_documents(corpus), 300), paths["tok"])
    save_tokenizer(train_tokenizer(iter_documents(make_corpus(d / "c2.txt", seed=5)), 280), paths["other_tok"])
    save_tokenizer(train_tokenizer(iter_documents(SAMPLE), 700), paths["big_tok"])
    run = d / "run"
    r = CliRunner().invoke(app, ["train", "-t", str(paths["tok"]), "-c", str(corpus), "-o", str(run), *TINY,
                                 "--max-steps", "4", "--eval-every", "2"])
    assert r.exit_code == 0, r.output
    paths["run"] = run
    return paths


def cli(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args])


def failed(r, code: int, *needles: str, max_lines: int = 2) -> str:
    """Assert a clean failure: the exit code, the needles on stderr, one or two lines, no traceback."""
    err = r.stderr
    assert r.exit_code == code, f"exit {r.exit_code} (want {code}):\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("{", "encoding ", "note:"))]
    assert 1 <= len(lines) <= max_lines, err
    assert lines[0].startswith("error:"), err
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"
    return err


def no_temps(*dirs: Path) -> None:
    for d in dirs:
        left = [p for p in Path(d).rglob(".*") if p.name.endswith(".tmp") or ".tmp." in p.name or ".old." in p.name]
        assert not left, left


def snapshot(d: Path) -> dict[str, tuple[bytes, float]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime) for p in sorted(d.rglob("*")) if p.is_file()}


def copy_run(base, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base["run"], dst)
    return dst


def deny_read(monkeypatch, path: Path) -> None:
    """Opening ``path`` fails with EACCES, as for a chmod 000 file (tests may run as root, which reads anyway)."""
    real = builtins.open
    target = os.path.realpath(path)

    def fake(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


def fail_writes(monkeypatch, name: str, err: int = errno.ENOSPC) -> None:
    """Writing a file called ``name`` fails with ENOSPC when its data reach the disk (fsync), as on a full disk."""
    real = os.fsync

    def fake(fd):
        with_name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if with_name.startswith(f".{name}.") or with_name == name:
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fake)


# ------------------------------------------------------------------ input missing, unreadable; output not writable


def _missing_cases(b, t: Path):
    nope = t / "nope.txt"
    return {
        "prepare-corpus": (["prepare-corpus", "-i", nope, "-o", t / "o.txt"], 2),
        "analyze-corpus": (["analyze-corpus", "-c", nope], 1),
        "init-tokenizer": (["init-tokenizer", "-f", nope, "-o", t / "t.json"], 2),
        "train --tokenizer": (["train", "-t", nope, "-c", b["corpus"], "-o", t / "r", *TINY], 1),
        "train --corpus": (["train", "-t", b["tok"], "-c", nope, "-o", t / "r", *TINY], 1),
        "train --val-file": (["train", "-t", b["tok"], "-c", b["corpus"], "--val-file", nope, "-o", t / "r", *TINY], 1),
        "generate --ckpt": (["generate", "--ckpt", nope], 1),
        "generate --prompt-file": (["generate", "--ckpt", b["run"], "--prompt-file", nope], 1),
        "generate --tokenizer": (["generate", "--ckpt", b["run"], "--tokenizer", nope], 1),
        "evaluate --ckpt": (["evaluate", "--ckpt", nope, "--test-file", b["corpus"]], 1),
        "evaluate --test-file": (["evaluate", "--ckpt", b["run"], "--test-file", nope], 1),
        "export --ckpt": (["export", "--ckpt", nope, "-o", t / "ex"], 1),
    }


@pytest.mark.parametrize("case", list(_missing_cases({k: Path() for k in ("corpus", "tok", "run")}, Path())))
def test_missing_input_names_the_path(runner, base, tmp_path, case):
    args, code = _missing_cases(base, tmp_path)[case]
    failed(cli(runner, *args), code, "nope.txt", "does not exist")
    assert not (tmp_path / "r").exists() and not (tmp_path / "o.txt").exists()


def _dir_cases(b, d: Path, t: Path):
    return {
        "analyze-corpus": ["analyze-corpus", "-c", d],
        "train --tokenizer": ["train", "-t", d, "-c", b["corpus"], "-o", t / "r", *TINY],
        "train --corpus": ["train", "-t", b["tok"], "-c", d, "-o", t / "r", *TINY],
        "generate --ckpt": ["generate", "--ckpt", d],
        "generate --prompt-file": ["generate", "--ckpt", b["run"], "--prompt-file", d],
        "evaluate --test-file": ["evaluate", "--ckpt", b["run"], "--test-file", d],
    }


@pytest.mark.parametrize("case", list(_dir_cases({k: Path() for k in ("corpus", "tok", "run")}, Path(), Path())))
def test_a_directory_where_a_file_is_expected_is_named(runner, base, tmp_path, case):
    d = tmp_path / "adir"
    d.mkdir()
    err = failed(cli(runner, *_dir_cases(base, d, tmp_path)[case]), 1, "adir")
    assert "directory" in err
    assert not (tmp_path / "r").exists()


def _unreadable_cases(b, t: Path):
    out = t / "out"
    return {
        "prepare-corpus": (["prepare-corpus", "-i", b["corpus"], "-o", out / "o.txt"], b["corpus"]),
        "analyze-corpus": (["analyze-corpus", "-c", b["corpus"]], b["corpus"]),
        "init-tokenizer": (["init-tokenizer", "-f", b["corpus"], "-o", out / "t.json"], b["corpus"]),
        "train --corpus": (["train", "-t", b["tok"], "-c", b["corpus"], "-o", out / "r", *TINY], b["corpus"]),
        "generate --ckpt": (["generate", "--ckpt", b["run"] / "ckpt_best.pt"], b["run"] / "ckpt_best.pt"),
        "evaluate --test-file": (["evaluate", "--ckpt", b["run"], "--test-file", b["corpus"], "--device", "cpu"],
                                 b["corpus"]),
        "export --ckpt": (["export", "--ckpt", b["run"] / "ckpt_best.pt", "-o", out / "ex"], b["run"] / "ckpt_best.pt"),
    }


@pytest.mark.parametrize("case", list(_unreadable_cases({k: Path() for k in ("corpus", "tok", "run")}, Path())))
def test_an_unreadable_input_is_named_with_the_fix(runner, base, tmp_path, monkeypatch, case):
    args, path = _unreadable_cases(base, tmp_path)[case]
    deny_read(monkeypatch, path)
    err = failed(cli(runner, *args), 1, path.name, "Permission denied")
    assert "permissions" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # (train may leave the empty parent of --outdir)


def _unwritable_cases(b, f: Path):
    return {
        "prepare-corpus": ["prepare-corpus", "-i", b["corpus"], "-o", f / "sub" / "o.txt"],
        "analyze-corpus --plot": ["analyze-corpus", "-c", b["corpus"], "--plot", f / "h.png"],
        "init-tokenizer": ["init-tokenizer", "-f", b["corpus"], "-o", f / "t.json"],
        "train": ["train", "-t", b["tok"], "-c", b["corpus"], "-o", f / "r", *TINY],
        "generate --output": ["generate", "--ckpt", b["run"], "--max-tokens", "2", "--device", "cpu", "-o", f / "g.txt"],
        "export hf": ["export", "--ckpt", b["run"], "-o", f / "ex"],
        "export safetensors": ["export", "--ckpt", b["run"], "--format", "safetensors", "-o", f / "m.safetensors"],
    }


@pytest.mark.parametrize("case", list(_unwritable_cases({k: Path() for k in ("corpus", "tok", "run")}, Path())))
def test_an_output_under_a_regular_file_is_refused_naming_it(runner, base, tmp_path, case):
    f = tmp_path / "afile.txt"
    f.write_text("keep\n")
    failed(cli(runner, *_unwritable_cases(base, f)[case]), 1, "afile.txt")
    assert f.read_text() == "keep\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


# ------------------------------------------------------------------ empty corpus, only separators, all filtered


@pytest.mark.parametrize("content,args,needles", [
    ("", [], ["no documents", "nothing was written"]),
    ("<|doc|>\n<|doc|>\n   \n<|doc|>\n", [], ["removed", "empty after cleaning"]),
    ("ab\n<|doc|>\ncd\n<|doc|>\nab\n", ["--min-chars", "10"], ["3 shorter than --min-chars 10", "lower --min-chars"]),
    ("<|doc|>\n\n<|doc|>\nab\n", ["--min-chars", "3"], ["1 shorter than --min-chars 3"]),
])
def test_prepare_corpus_with_nothing_left_says_which_filter_and_keeps_the_old_output(runner, tmp_path, content,
                                                                                       args, needles):
    src, out = tmp_path / "raw.txt", tmp_path / "out.txt"
    src.write_text(content, encoding="utf-8")
    out.write_text("old corpus\n")
    failed(cli(runner, "prepare-corpus", "-i", src, "-o", out, *args), 1, *needles)
    assert out.read_text() == "old corpus\n"
    no_temps(tmp_path)


@pytest.mark.parametrize("content", ["", "<|doc|>\n\n<|doc|>\n"])
@pytest.mark.parametrize("stage", ["analyze-corpus", "init-tokenizer", "train", "evaluate"])
def test_an_empty_corpus_is_refused_by_every_stage(runner, base, tmp_path, content, stage):
    c = tmp_path / "c.txt"
    c.write_text(content)
    args = {"analyze-corpus": ["analyze-corpus", "-c", c],
            "init-tokenizer": ["init-tokenizer", "-f", c, "-o", tmp_path / "t.json"],
            "train": ["train", "-t", base["tok"], "-c", c, "-o", tmp_path / "r", *TINY],
            "evaluate": ["evaluate", "--ckpt", base["run"], "--test-file", c, "--device", "cpu"]}[stage]
    failed(cli(runner, *args), 1, "c.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


# ------------------------------------------------------------------ binary input, cp1252 text

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
CP1252 = "Canción del café: \u201cniño\u201d, 5 \u20ac.\n".encode("cp1252")


@pytest.mark.parametrize("stage", ["prepare-corpus", "analyze-corpus", "init-tokenizer", "train", "evaluate"])
@pytest.mark.parametrize("kind", ["binary", "cp1252"])
def test_binary_and_cp1252_input(runner, base, tmp_path, stage, kind):
    f = tmp_path / "in.png"
    f.write_bytes(PNG if kind == "binary" else CP1252)
    args = {"prepare-corpus": ["prepare-corpus", "-i", f, "-o", tmp_path / "o.txt"],
            "analyze-corpus": ["analyze-corpus", "-c", f],
            "init-tokenizer": ["init-tokenizer", "-f", f, "-o", tmp_path / "t.json"],
            "train": ["train", "-t", base["tok"], "-c", f, "-o", tmp_path / "r", *TINY],
            "evaluate": ["evaluate", "--ckpt", base["run"], "--test-file", f, "--device", "cpu"]}[stage]
    r = cli(runner, *args)
    if stage == "prepare-corpus" and kind == "cp1252":  # the auto fallback decodes it and says so
        assert r.exit_code == 0, r.output
        assert "in.png: not valid UTF-8 (first bad byte at offset 5); read as cp1252" in r.stderr
        assert (tmp_path / "o.txt").read_text(encoding="utf-8") == "Canción del café: \u201cniño\u201d, 5 \u20ac.\n"
        strict = cli(runner, *args[:-1], tmp_path / "s.txt", "--strict")
        failed(strict, 1, "in.png", "byte offset 5", "--encoding cp1252")
        assert not (tmp_path / "s.txt").exists()
        return
    err = failed(r, 1, "in.png")
    assert ("binary" in err) if stage == "prepare-corpus" else ("not UTF-8" in err and "prepare-corpus" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


# ------------------------------------------------------------------ output path equal to an input


def test_an_output_equal_to_an_input_is_refused_before_writing(runner, base, tmp_path):
    run = copy_run(base, tmp_path)
    c = tmp_path / "c.txt"
    shutil.copy(base["corpus"], c)
    before = c.read_bytes(), snapshot(run)
    pf = tmp_path / "prompts.txt"
    pf.write_text("el rey\n")
    cases = [
        (["prepare-corpus", "-i", c, "-o", c], 2, "also an input"),
        (["prepare-corpus", "-i", tmp_path, "-o", c], 2, "also an input"),
        (["init-tokenizer", "-f", c, "-o", c], 1, "also an input"),
        (["analyze-corpus", "-c", c, "--plot", c], 1, "also an input"),
        (["generate", "--ckpt", run / "ckpt_last.pt", "-o", run / "ckpt_last.pt"], 2, "also an input"),
        (["generate", "--ckpt", run, "-o", run / "ckpt_best.pt"], 2, "also an input"),
        (["generate", "--ckpt", run, "--prompt-file", pf, "-o", pf], 2, "also an input"),
        (["export", "--ckpt", run, "-o", run], 2, "holds the input"),
        (["train", "-t", base["tok"], "-c", c, "-o", c, *TINY], 1, "is a file"),
    ]
    for args, code, needle in cases:
        failed(cli(runner, *args), code, needle)
    assert (c.read_bytes(), snapshot(run)) == before and pf.read_text() == "el rey\n"


# ------------------------------------------------------------------ disk full / I/O error while writing


def test_disk_full_in_prepare_corpus_init_tokenizer_generate_and_analyze(runner, base, tmp_path, monkeypatch):
    outs = {"corpus.txt": ["prepare-corpus", "-i", base["corpus"], "-o"],
            "tok.json": ["init-tokenizer", "-f", base["corpus"], "--vocab-size", "300", "-o"],
            "g.txt": ["generate", "--ckpt", base["run"], "--max-tokens", "3", "--device", "cpu", "-o"],
            "h.png": ["analyze-corpus", "-c", base["corpus"], "--plot"]}
    for name, args in outs.items():
        out = tmp_path / name
        out.write_bytes(b"previous")
        with monkeypatch.context() as m:
            fail_writes(m, name)
            failed(cli(runner, *args, out), 1, name, "no space left on", "previous file", "free some disk")
        assert out.read_bytes() == b"previous"
    no_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(outs)


@pytest.mark.parametrize("fmt,name", [("hf", "config.json"), ("hf", "model.safetensors"),
                                      ("safetensors", "m.safetensors")])
def test_disk_full_in_export_keeps_the_previous_export(runner, base, tmp_path, monkeypatch, fmt, name):
    out = tmp_path / ("ex" if fmt == "hf" else "m.safetensors")
    r = cli(runner, "export", "--ckpt", base["run"], "--format", fmt, "-o", out)
    assert r.exit_code == 0, r.output
    before = snapshot(tmp_path)
    if name == "model.safetensors":  # safetensors writes this one itself (no fsync): fail the write
        import safetensors.torch

        def full(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        fail_writes(monkeypatch, name)
    r = cli(runner, "export", "--ckpt", base["run"], "--format", fmt, "-o", out, "--overwrite")
    failed(r, 1, str(out), "no space left on", "previous export" if fmt == "hf" else "previous file")
    assert snapshot(tmp_path) == before
    no_temps(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "ckpt_last.pt", "history.json"])
def test_disk_full_during_train_keeps_the_previous_files(runner, base, tmp_path, monkeypatch, name):
    from minillm.checkpoint import load_checkpoint

    run = copy_run(base, tmp_path)
    before = snapshot(run)
    fail_writes(monkeypatch, name)
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
            "--eval-every", "2", "--resume")
    failed(r, 1, name, "no space left on", "previous checkpoint" if name.endswith(".pt") else "previous file")
    assert (run / name).read_bytes() == before[name][0]
    assert load_checkpoint(run / "ckpt_last.pt")["run_state"]["step"] == (4 if name != "history.json" else 6)
    assert json.loads((run / "history.json").read_text())["evals"][-1]["step"] == 4
    no_temps(run)
    assert not (run / ".lock").exists()


# ------------------------------------------------------------------ vocabulary too small; not a tokenizer


@pytest.mark.parametrize("model,minimum", [("bpe", 258), ("unigram", 4), ("wordpiece", 4)])
def test_vocab_too_small_names_the_minimum(runner, base, tmp_path, model, minimum):
    out = tmp_path / "t.json"
    failed(cli(runner, "init-tokenizer", "-f", base["corpus"], "-o", out, "--model", model, "--vocab-size",
               minimum - 1), 2, f"--vocab-size {minimum - 1}", f"at least {minimum}")
    assert not out.exists()


@pytest.mark.parametrize("stage", ["train", "analyze-corpus", "generate", "evaluate", "export"])
@pytest.mark.parametrize("content", ['{"a": 1}', "not json at all", '{"model": {"type": "BPE"'])
def test_a_file_that_is_not_a_tokenizer_is_named(runner, base, tmp_path, stage, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    force = ["--force-tokenizer"]
    args = {"train": ["train", "-t", bad, "-c", base["corpus"], "-o", tmp_path / "r", *TINY],
            "analyze-corpus": ["analyze-corpus", "-c", base["corpus"], "-t", bad],
            "generate": ["generate", "--ckpt", base["run"], "--tokenizer", bad, *force],
            "evaluate": ["evaluate", "--ckpt", base["run"], "--tokenizer", bad, "--test-file", base["corpus"], *force],
            "export": ["export", "--ckpt", base["run"], "--tokenizer", bad, "-o", tmp_path / "ex", *force]}[stage]
    failed(cli(runner, *args), 1, "bad.json", "not a tokenizer file", "init-tokenizer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


# ------------------------------------------------------------------ tokenizer does not match the checkpoint


def _with_tok(b, t: Path, tok: Path):
    return {"generate": ["generate", "--ckpt", b["run"], "--tokenizer", tok, "--max-tokens", "3", "--device", "cpu"],
            "evaluate": ["evaluate", "--ckpt", b["run"], "--tokenizer", tok, "--test-file", b["corpus"],
                         "--device", "cpu"],
            "export": ["export", "--ckpt", b["run"], "--tokenizer", tok, "-o", t / "ex"]}


@pytest.mark.parametrize("stage", ["generate", "evaluate", "export"])
def test_another_tokenizer_is_refused_unless_forced_and_a_larger_vocab_always(runner, base, tmp_path, stage):
    args = _with_tok(base, tmp_path, base["other_tok"])[stage]
    failed(cli(runner, *args), 1, "other.json", "ckpt_best.pt", "sha256 differs", "--force-tokenizer")
    assert not (tmp_path / "ex").exists()
    r = cli(runner, *args, "--force-tokenizer")  # the hash check only is overridden
    assert r.exit_code == 0, r.output
    shutil.rmtree(tmp_path / "ex", ignore_errors=True)
    big = _with_tok(base, tmp_path, base["big_tok"])[stage]
    failed(cli(runner, *big, "--force-tokenizer"), 1, "big.json", "ckpt_best.pt", "tokens but", "only 320")
    assert not (tmp_path / "ex").exists()


def test_resume_with_another_tokenizer_names_both_files(runner, base, tmp_path):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    r = cli(runner, "train", "-t", base["other_tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
            "--resume")
    failed(r, 1, "other.json", str(run / "tokenizer.json"), "sha256 differs")
    assert snapshot(run) == before


def test_finetune_with_another_tokenizer_is_refused_unless_forced_and_a_larger_vocab_always(runner, base, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "--ckpt", base["run"], "--data", base["corpus"], "-o", out, "--max-steps", "1",
            "--eval-batches", "1", "--device", "cpu", "--compile", "off", "--log-format", "json"]
    failed(cli(runner, *args, "--tokenizer", base["other_tok"]), 1, "other.json", "ckpt_best.pt", "sha256 differs",
           "--force-tokenizer")
    assert not out.exists()
    failed(cli(runner, *args, "--tokenizer", base["big_tok"], "--force-tokenizer"), 1, "big.json", "tokens", "320")
    assert not [p for p in out.rglob("*") if p.is_file() and "cache" not in p.parts] if out.exists() else True


# ------------------------------------------------------------------ config problems


@pytest.mark.parametrize("flags,needles", [
    (["--n-embd", "30", "--n-head", "4"], ["n_embd (30) must be divisible by n_head (4)", "could be one of"]),
    (["--n-head", "4", "--n-kv-head", "3"], ["n_head (4) must be divisible by n_kv_head (3)", "[1, 2, 4]"]),
    (["--config", "huge"], ["unknown preset 'huge'", "tiny, small"]),
    (["--attention", "fast"], ["'fast' is not one of auto, flash"]),
    (["--loss-kernel", "fused"], ["'fused' is not one of torch, liger"]),
])
def test_bad_config_flags_exit_2_naming_the_key(runner, base, tmp_path, flags, needles):
    failed(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", tmp_path / "r", *TINY, *flags), 2,
           *needles, max_lines=3)
    assert not (tmp_path / "r").exists()


def test_loss_kernel_liger_trains_on_the_cpu_and_is_recorded(runner, base, tmp_path):
    """--loss-kernel liger is a CUDA kernel; on the CPU the run takes the PyTorch path and still works, says so,
    and the checkpoint records the kernel that ran (issue 24; the choice does not change the weights' meaning)."""
    import torch

    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", tmp_path / "r", *TINY, "--max-steps", "2",
            "--loss-kernel", "liger")
    assert r.exit_code == 0, r.output
    ck = torch.load(tmp_path / "r" / "ckpt_last.pt", weights_only=True)
    assert ck["model_config"]["loss_kernel"] == "torch" and "liger runs on CUDA only" in r.stderr


def test_a_toml_file_with_several_problems_reports_all_in_one_message(runner, base, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\ncolour = 1\n[model]\nn_embd = 30\nn_head = 4\nn_layer = "two"\nwidth = 3\n'
                   '[train]\nlr = "fast"\nprecision = "fp8"\n')
    err = failed(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", tmp_path / "r", "--config", cfg),
                 2, "unknown key 'colour'", "[model] unknown key 'width'", "n_layer: expected int, got str",
                 "lr: expected float, got str", "'fp8' is not one of auto, bf16, fp16, fp32",
                 "n_embd (30) must be divisible by n_head (4)", max_lines=8)
    assert err.count("error:") == 1
    cfg.write_text("[model\nn_embd = 3")
    failed(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", tmp_path / "r", "--config", cfg), 2,
           "c.toml is not valid TOML")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ corpus too small


def test_corpus_too_small_for_the_block_suggests_sizes_that_fit(runner, base, tmp_path):
    c = tmp_path / "c.txt"
    c.write_text("el rey\n<|doc|>\nla casa\n<|doc|>\nel mar\n")
    failed(cli(runner, "train", "-t", base["tok"], "-c", c, "-o", tmp_path / "r", *TINY), 1, "fewer than one block",
           "--block-size 8 --stride 4")
    one = tmp_path / "one.txt"
    one.write_text("el rey y la casa del pueblo " * 20)
    failed(cli(runner, "train", "-t", base["tok"], "-c", one, "-o", tmp_path / "r", *TINY), 1,
           "1 document(s)", "--val-file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "one.txt"]


def test_validation_documents_too_short_for_the_block_suggest_a_block_size(runner, base, tmp_path):
    c = tmp_path / "c.txt"
    c.write_text("\n<|doc|>\n".join(f"el rey {i}" for i in range(60)) + "\n")
    failed(cli(runner, "train", "-t", base["tok"], "-c", c, "-o", tmp_path / "r", *TINY, "--block-size", "64"), 1,
           "validation documents hold", "--block-size", "--val-fraction")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ CUDA out of memory


def test_out_of_memory_names_smaller_settings_with_numbers_and_keeps_the_checkpoint(runner, base, tmp_path,
                                                                                     monkeypatch):
    from minillm.checkpoint import load_checkpoint
    from minillm.train import loop as training

    real = training.make_train_step

    def make(*a, **kw):
        step, calls = real(*a, **kw), [0]

        def oom_on_third(prefetch, lr_scale):
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return step(prefetch, lr_scale)

        return oom_on_third

    monkeypatch.setattr(training, "make_train_step", make)
    out = tmp_path / "r"
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", out, *TINY, "--max-steps", "6",
            "--eval-every", "2", "--batch-size", "8")
    failed(r, 1, "out of memory", "--batch-size 4 --accumulation-steps 2", "--gradient-checkpointing",
           "--block-size", "intact", "--resume")
    assert load_checkpoint(out / "ckpt_last.pt")["run_state"]["step"] == 2
    no_temps(out)
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------ resume problems; existing outdir


def test_resume_without_a_checkpoint(runner, base, tmp_path):
    failed(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", tmp_path / "r", *TINY, "--resume"),
           1, "no checkpoint", "ckpt_last.pt", "without --resume")
    assert not (tmp_path / "r").exists()
    run = copy_run(base, tmp_path)
    (run / "ckpt_last.pt").unlink()
    before = snapshot(run)
    failed(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--resume"), 1,
           "no checkpoint")
    assert snapshot(run) == before


def test_resume_with_another_model_config_lists_the_differing_keys(runner, base, tmp_path):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--n-embd", "64",
            "--n-layer", "2", "--lr", "0.01", "--resume")
    failed(r, 1, "model.n_embd: 32 -> 64", "model.n_layer: 1 -> 2", "train.lr: 0.003 -> 0.01", "new --outdir",
           max_lines=6)
    assert snapshot(run) == before


def test_an_existing_outdir_is_refused_and_untouched(runner, base, tmp_path):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    failed(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY), 1, str(run),
           "--resume", "--overwrite")
    assert snapshot(run) == before


# ------------------------------------------------------------------ non-finite loss


def test_nonfinite_losses_are_skipped_then_stop_the_run_keeping_the_last_good_checkpoint(runner, base, tmp_path,
                                                                                        monkeypatch):
    from minillm.checkpoint import load_checkpoint
    from minillm.train import step as trainstep

    real, calls = trainstep.accumulate, [0]

    def sometimes_nan(*a, **kw):  # call 2 is a lone NaN (skipped); from call 4 on every loss is NaN
        calls[0] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls[0] == 2 or calls[0] >= 4 else loss

    monkeypatch.setattr(trainstep, "accumulate", sometimes_nan)
    out = tmp_path / "r"
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", out, *TINY, "--max-steps", "20",
            "--eval-every", "2")
    failed(r, 1, "5 non-finite steps in a row", "--lr", "--precision", "last good checkpoint")
    assert "step 2: non-finite loss nan; update skipped (1 in a row)" in r.stderr
    ck = load_checkpoint(out / "ckpt_last.pt")
    assert ck["run_state"]["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    no_temps(out)


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_exits_130_or_143_and_resume_continues_the_curve(runner, base, tmp_path, monkeypatch, sig,
                                                                        code):
    from minillm.checkpoint import load_checkpoint
    from minillm.train import loop as training

    real = training.make_train_step

    def make(*a, **kw):
        step, calls = real(*a, **kw), [0]

        def signal_on_third(prefetch, lr_scale):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), sig)  # as from the terminal or a scheduler, in the middle of a step
            return step(prefetch, lr_scale)

        return signal_on_third

    out = tmp_path / "r"
    args = ["train", "-t", base["tok"], "-c", base["corpus"], "-o", out, *TINY, "--eval-every", "2"]
    with monkeypatch.context() as m:
        m.setattr(training, "make_train_step", make)
        r = cli(runner, *args, "--max-steps", "6")
    assert r.exit_code == code, r.output
    assert "interrupted at step 3" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.output
    assert load_checkpoint(out / "ckpt_last.pt")["run_state"]["step"] == 3 and not (out / ".lock").exists()
    r = cli(runner, *args, "--max-steps", "6", "--resume")
    assert r.exit_code == 0, r.output
    steps = [e["step"] for e in json.loads((out / "history.json").read_text())["evals"]]
    assert steps == [2, 4, 6]
    first = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith('{"event": "step"')][0]
    assert first["step"] == 4


def test_sigkill_during_train_leaves_loadable_checkpoints_and_resume_works(runner, base, tmp_path):
    from minillm.checkpoint import load_checkpoint

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "minillm", "train", "-t", str(base["tok"]), "-c", str(base["corpus"]), "-o", str(out),
           *TINY, "--max-steps", "100000", "--eval-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line or (line.startswith("{") and json.loads(line).get("event") == "eval"
                        and json.loads(line)["step"] >= 4):
            break
    proc.kill()
    proc.wait(timeout=30)
    from minillm.io import _node

    node = _node()
    assert (out / ".lock").exists()  # left behind by the killed run
    (out / f".ckpt_last.pt.{proc.pid}-0@{node}.halfdone.tmp").write_bytes(b"PK\x03\x04 half")  # killed mid-write
    step = load_checkpoint(out / "ckpt_last.pt")["run_state"]["step"]
    assert step >= 2 and load_checkpoint(out / "ckpt_best.pt")["run_state"]["step"] >= 2  # (killed in a save, maybe)
    r = cli(runner, "generate", "--ckpt", out, "--max-tokens", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", out, *TINY, "--max-steps", step + 2,
            "--eval-every", "2", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == step + 2
    assert not (out / ".lock").exists()
    no_temps(out)


# ------------------------------------------------------------------ damaged checkpoints


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _damage(path: Path, how: str, marker: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupted":
        path.write_bytes(data[:100] + bytes(b ^ 0x5A for b in data[100:4000]) + data[4000:])
    elif how == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"model": _Payload(marker), "model_config": {}}))
    else:  # torch.save of an object: the zip format, but with a reference to a callable inside
        torch.save({"model": _Payload(marker), "model_config": {}}, path)


@pytest.mark.parametrize("how", ["truncated", "corrupted", "pickle", "torch-pickle"])
@pytest.mark.parametrize("stage", ["generate", "evaluate", "export", "resume"])
def test_a_damaged_or_malicious_checkpoint_is_refused_and_never_executed(runner, base, tmp_path, how, stage):
    run = copy_run(base, tmp_path)
    marker = tmp_path / "pwned"
    ck = run / "ckpt_last.pt"
    (run / "ckpt_best.pt").unlink()
    _damage(ck, how, marker)
    args = {"generate": ["generate", "--ckpt", ck, "--device", "cpu"],
            "evaluate": ["evaluate", "--ckpt", ck, "--test-file", base["corpus"], "--device", "cpu"],
            "export": ["export", "--ckpt", ck, "-o", tmp_path / "ex"],
            "resume": ["train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
                       "--resume"]}[stage]
    before = ck.read_bytes()
    err = failed(cli(runner, *args), 1, "ckpt_last.pt")
    assert any(w in err for w in ("truncated or corrupted", "is corrupted", "refused")), err
    if how in ("pickle", "torch-pickle"):
        assert "refused" in err and "nothing in it was executed" in err
    assert not marker.exists() and ck.read_bytes() == before and not (tmp_path / "ex").exists()


# ------------------------------------------------------------------ generation input


def test_generation_bad_values_exit_2_naming_the_flag(runner, base):
    for flag, value, needle in (("--top-p", "0", "--top-p must be in (0, 1]"), ("--top-p", "1.5", "--top-p must be"),
                                ("--top-p", "nan", "--top-p must be"), ("--temperature", "-1", "--temperature must"),
                                ("--temperature", "nan", "--temperature must"), ("--top-k", "-1", "--top-k must")):
        failed(cli(runner, "generate", "--ckpt", base["run"], flag, value), 2, needle)


def test_an_empty_prompt_starts_from_doc_and_a_long_one_is_cut_from_the_left(runner, base, monkeypatch):
    from minillm.generation import text as generation
    from minillm.tokenizer import doc_id, load_tokenizer

    real, seen = generation.generate_batch, []

    def spy(model, prompts, *a, **kw):
        seen.append([list(p) for p in prompts])
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(generation, "generate_batch", spy)
    tok = load_tokenizer(base["tok"])
    d = doc_id(tok)
    common = ["generate", "--ckpt", base["run"], "--max-tokens", "8", "--device", "cpu", "--json"]
    r = cli(runner, *common, "--prompt", "")
    assert r.exit_code == 0, r.output
    assert seen == [[[d]]] and json.loads(r.stdout)["prompt"] == ""
    long_prompt = "el rey y la casa " * 20  # far more than the 16-token context
    ids = [d, *tok.encode(long_prompt, add_special_tokens=False).ids]
    r = cli(runner, *common, "--prompt", long_prompt)
    assert r.exit_code == 0, r.output
    assert f"warning: prompt 1 is {len(ids)} tokens with <|doc|>, longer than the context of 16: keeping its last 16" \
        in r.stderr.replace("\n", " ")
    assert seen[-1] == [ids[-16:]] and json.loads(r.stdout)["prompt"] == long_prompt


# ------------------------------------------------------------------ two runs into one --outdir


def test_a_second_train_is_refused_while_the_first_runs_and_a_stale_lock_is_cleared(runner, base, tmp_path):
    import socket

    run = copy_run(base, tmp_path)
    before = snapshot(run)
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()} 1 {sys.argv[2]}'.encode()); "
              "print('ready', flush=True); time.sleep(60)")
    alive = subprocess.Popen([sys.executable, "-c", holder, str(run / ".lock"), socket.gethostname()],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline().strip() == "ready"
        for extra in (["--overwrite"], ["--resume", "--max-steps", "6"]):
            r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, *extra)
            failed(r, 1, f"in use by another process (pid {alive.pid}", "choose another --outdir")
            assert snapshot(run) == {**before, ".lock": snapshot(run)[".lock"]}
    finally:
        alive.kill()
        alive.wait()
    assert (run / ".lock").exists()  # its record stays, but nobody holds the lock now
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
            "--eval-every", "2", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 6 and not (run / ".lock").exists()
