"""Resource guards and clear messages for hostile inputs (issue 18): a model too big for the memory, a huge
--vocab-size, a corpus that is one enormous line or word, prompts that are not UTF-8, SFT JSONL nested
100,000 deep, and SFT examples longer than the block."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.cli import app
from tests.conftest import WORDS

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "v_c624e6b"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
RUN = ["--device", "cpu", "--precision", "fp32", "--compile", "off"]

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A copy of the run written by an earlier version (tests/fixtures), with its corpus and a tokenizer
    outside the run directory."""
    dst = tmp_path / "old"
    shutil.copytree(FIXTURE / "run", dst / "run")
    shutil.copy(FIXTURE / "corpus.txt", dst / "corpus.txt")
    shutil.copy(FIXTURE / "run" / "tokenizer.json", dst / "tok.json")
    return dst


def _limited(gib: int):
    """preexec_fn: cap the child's address space, so that a regression fails fast instead of filling the machine."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Error:" not in text.replace("error:", ""), text


# ---------------------------------------------------------------- memory guard


def test_train_refuses_a_model_whose_state_alone_exceeds_memory_at_once_touching_nothing(old):
    run = old / "run"
    before = _snapshot(run)
    cmd = [sys.executable, "-m", "minillm", "train", "-t", str(old / "tok.json"), "-c", str(old / "corpus.txt"),
           "-o", str(run), "--overwrite", "--n-layer", "10000", "--n-embd", "4096", "--n-head", "32", *RUN]
    t = time.monotonic()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, preexec_fn=_limited(8))
    took = time.monotonic() - t
    assert r.returncode == 1, r.stderr
    err = " ".join(r.stderr.split())
    assert "weights, gradients and optimizer state alone need" in err and "GiB" in err, err
    assert "of host memory available" in err and "a smaller model (--n-layer, --n-embd)" in err, err
    _no_traceback(r.stderr)
    assert took < 20, took  # no allocation, no encoding: only the interpreter's start
    assert _snapshot(run) == before  # the old run, its checkpoints and its cache are untouched


def _state_and_total(tok: Path, **overrides) -> tuple[int, int]:
    """What the guard weighs for ``train --config tiny`` with these flags on the CPU (fp32)."""
    from minillm.config import pad_vocab, resolve
    from minillm.model.memory import estimate_memory
    from minillm.tokenizer import load_tokenizer

    mcfg, tcfg = resolve("tiny", overrides)
    mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(load_tokenizer(tok).get_vocab_size()))
    est = estimate_memory(mcfg, tcfg.batch_size, "fp32", tcfg.optimizer)
    return est["params"] + est["grads"] + est["optimizer"], est["total"]


def _train(runner, old: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", "-t", str(old / "tok.json"), "-c", str(old / "corpus.txt"), "-o", str(out),
                               "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--block-size", "32",
                               "--batch-size", "8", *RUN, *extra])


def test_train_refuses_when_the_estimate_exceeds_memory_twice_over(runner, old, tmp_path, monkeypatch):
    state, total = _state_and_total(old / "tok.json", block_size=32, batch_size=8)
    avail = (state + total // 2) // 2  # the weights and optimizer fit, half the estimate does not
    assert state < avail < total / 2
    monkeypatch.setattr("minillm.model.memory.available_memory", lambda device: avail)
    out = tmp_path / "new"
    r = _train(runner, old, out)
    assert r.exit_code == 1, r.output
    err = " ".join(r.stderr.split())
    assert f"training needs about {total / 2**30:.1f} GiB, more than twice the {avail / 2**30:.1f} GiB of host" in err
    assert "--batch-size 4 --accumulation-steps 2, --gradient-checkpointing, or a smaller model" in err, err
    assert not out.exists()


def test_train_warns_when_the_estimate_exceeds_memory_and_trains(runner, old, tmp_path, monkeypatch):
    state, total = _state_and_total(old / "tok.json", block_size=32, batch_size=8, gradient_checkpointing=True)
    avail = total * 3 // 4
    monkeypatch.setattr("minillm.model.memory.available_memory", lambda device: avail)
    r = _train(runner, old, tmp_path / "new", "--gradient-checkpointing")
    assert r.exit_code == 0, r.output
    err = " ".join(r.stderr.split())
    assert f"warning: training may need about {total / 2**30:.1f} GiB, more than the" in err, err
    assert "if it runs out of memory, use --batch-size 4 --accumulation-steps 2, or a smaller model" in err, err
    assert (tmp_path / "new" / "ckpt_last.pt").is_file()


def test_finetune_weighs_only_the_weights_of_a_lora_run(runner, old, tmp_path, monkeypatch):
    from minillm.checkpoint import load_checkpoint
    from minillm.config import model_from_dict
    from minillm.model.memory import estimate_memory

    est = estimate_memory(model_from_dict(load_checkpoint(old / "run" / "ckpt_best.pt")["model_config"]), 1, "fp32")
    weights, state = est["params"], est["params"] + est["grads"] + est["optimizer"]
    monkeypatch.setattr("minillm.model.memory.available_memory", lambda device: (weights + state) // 2)
    args = ["finetune", "--ckpt", str(old / "run"), "--data", str(old / "corpus.txt"), "--max-steps", "1", *RUN]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "full")])
    assert r.exit_code == 1 and not (tmp_path / "full").exists()
    assert "weights, gradients and optimizer state alone" in r.stderr and "--lora-rank 8" in r.stderr, r.stderr
    monkeypatch.setattr("minillm.model.memory.available_memory", lambda device: weights // 2)
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "lora"), "--lora-rank", "2"])
    assert r.exit_code == 1 and not (tmp_path / "lora").exists()
    err = " ".join(r.stderr.split())
    assert "the model's weights alone need" in err and "use a smaller base model" in err and "--lora-rank" not in err


def test_available_memory_is_the_hosts_on_the_cpu():
    import torch

    from minillm.model.memory import available_memory

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_memory(torch.device("cpu")) <= total
    assert available_memory(torch.device("meta")) is None


# ---------------------------------------------------------------- vocabulary size


def test_a_huge_vocab_size_is_a_usage_error_not_an_abort(tmp_path, corpus):
    cmd = [sys.executable, "-m", "minillm", "init-tokenizer", "-f", str(corpus), "-o", str(tmp_path / "t.json"),
           "--vocab-size", "1000000000"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60, preexec_fn=_limited(4))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "--vocab-size 1,000,000,000 is above the limit of 1,048,576" in " ".join(r.stderr.split())
    assert not (tmp_path / "t.json").exists()


def test_vocab_size_cap_and_a_vocabulary_the_corpus_cannot_fill(runner, tmp_path, corpus):
    out = tmp_path / "t.json"
    r = runner.invoke(app, ["init-tokenizer", "-f", str(corpus), "-o", str(out), "--vocab-size", str((1 << 20) + 1)])
    assert r.exit_code == 2 and "above the limit of 1,048,576 (2^20)" in r.stderr and not out.exists()
    r = runner.invoke(app, ["init-tokenizer", "-f", str(corpus), "-o", str(out), "--vocab-size", str(1 << 20)])
    assert r.exit_code == 0, r.output
    from minillm.tokenizer import load_tokenizer

    got = load_tokenizer(out).get_vocab_size()
    assert got < 1000
    err = " ".join(r.stderr.split())
    assert f"warning: the corpus filled only {got:,} of the 1,048,576 tokens asked for" in err
    assert f"pass --vocab-size {got}" in err
    r = runner.invoke(app, ["init-tokenizer", "-f", str(corpus), "-o", str(out), "--vocab-size", "300"])
    assert r.exit_code == 0 and "warning" not in r.stderr  # a vocabulary the corpus fills: no warning


# ---------------------------------------------------------------- one enormous line or word


def _one_line(n_chars: int, seed: int = 0) -> str:
    """Words separated by single spaces, no line break."""
    rng = random.Random(seed)
    words = []
    size = 0
    while size < n_chars:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def test_an_overlong_line_is_read_in_pieces_cut_where_the_tokens_do_not_change(tmp_path, tokenizer_path):
    from minillm.corpus.read import iter_pieces
    from minillm.tokenizer import load_tokenizer

    line = _one_line(60_000)
    word = "".join(random.Random(1).choices("abcdef", k=9_000))
    for text, hard in ((line, False), (word, True)):
        path = tmp_path / "c.txt"
        path.write_text(f"{text}\n<|doc|>\ncorto\n", encoding="utf-8")
        pieces = list(iter_pieces(path, 4096))
        assert pieces[-1] == ("corto", True) and [first for _, first in pieces[:-1]] == [True] + [False] * (len(pieces) - 2)
        assert "".join(t for t, _ in pieces[:-1]) == text and max(len(t) for t, _ in pieces) <= 4096
        assert len(pieces) >= len(text) // 4096 + 1
        if not hard:  # cut before a space that follows a word: a pre-token boundary, so the same tokens
            assert all(t.startswith(" ") for t, _ in pieces[1:-1])
            tok = load_tokenizer(tokenizer_path)
            ids = [i for t, _ in pieces[:-1] for i in tok.encode(t, add_special_tokens=False).ids]
            assert ids == tok.encode(text, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bc", " ", "  ", "\n", "\t", "\r", "\r\n", "<|doc|>", "<|doc|>\n", "de fg",
                                 "ab cd " * 30, "x" * 200]), max_size=200).map("".join), st.integers(32, 64))
def test_pieces_hold_each_documents_text_and_stay_bounded_whatever_the_lines(tmp_path_factory, text, limit):
    from minillm.corpus.read import iter_documents, iter_pieces

    path = tmp_path_factory.mktemp("p") / "c.txt"
    path.write_text(text, encoding="utf-8", newline="")
    docs: list[str] = []
    for t, first in iter_pieces(path, limit):
        assert len(t) - first * (len(t) - len(t.lstrip())) <= 3 * limit  # (leading blanks wait for the text)
        docs[len(docs) - (not first):] = [docs[-1] + t] if not first else [t]
    assert docs == list(iter_documents(path))


_ENCODE = """
import resource, sys
from minillm.data import cache as ds
peaks = []
for corpus in sys.argv[2:]:  # the first is a small, ordinary corpus: the baseline (imports, tokenizer, threads)
    ds.build_token_cache(sys.argv[1], corpus, corpus + ".cache", batch_chars=1 << 18)
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print(peaks[0], peaks[-1])
"""


def test_a_corpus_of_one_huge_line_or_word_encodes_in_bounded_memory(tmp_path, tokenizer_path):
    """A 4 MB line took ~150 bytes per character (650 MB here, 7.8 GB for 50 MB); in pieces it takes the
    memory of one piece, whatever the line's length."""
    from minillm.tokenizer import load_tokenizer

    texts = {"line.txt": _one_line(4_000_000),
             "word.txt": "".join(random.Random(2).choices("abcdefghij", k=3_000_000))}
    for name, text in texts.items():
        (tmp_path / name).write_text(f"{text}\n<|doc|>\notro documento\n", encoding="utf-8")
    (tmp_path / "small.txt").write_text("uno dos tres\n<|doc|>\notro documento\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-c", _ENCODE, str(tokenizer_path), str(tmp_path / "small.txt"),
                        *(str(tmp_path / n) for n in texts)],
                       env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=_limited(16))
    assert r.returncode == 0, r.stderr
    base_kb, peak_kb = map(int, r.stdout.split()[-2:])
    assert (peak_kb - base_kb) / 1024 < 200, (base_kb, peak_kb)  # the whole 4 MB line at once: ~600 MB more
    from minillm.data.cache import open_token_cache

    tok = load_tokenizer(tokenizer_path)
    for name, text in texts.items():
        cache = open_token_cache(tmp_path / f"{name}.cache")
        assert cache.n_docs == 2
        ids = np.asarray(cache.tokens[1 : cache.doc_starts[1]]).tolist()
        assert tok.decode(ids) == text


# ---------------------------------------------------------------- messages


def test_generate_refuses_a_prompt_that_is_not_utf8_naming_the_byte(old):
    cmd = [sys.executable.encode(), b"-m", b"minillm", b"generate", b"--ckpt", str(old / "run").encode(),
           b"--prompt", b"ab\xffc", b"--max-tokens", b"2"]
    r = subprocess.run(cmd, env={**ENV, "LC_ALL": "C.UTF-8"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "--prompt holds byte 0xff at character 3, which is not UTF-8 text" in err and "--prompt-file" in err
    _no_traceback(r.stderr)


def test_generate_names_a_prompt_file_that_is_not_utf8_and_the_byte_offset(runner, old, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes("el rio\ncanción de la mañana\n".encode("latin-1"))
    r = runner.invoke(app, ["generate", "--ckpt", str(old / "run"), "--prompt-file", str(f), "--max-tokens", "2"])
    assert r.exit_code == 1, r.output
    err = " ".join(r.stderr.split())
    assert f"--prompt-file: {f} is not UTF-8 text (byte 0xf3 at offset 12); re-encode it" in err, err
    assert "iconv -f latin1 -t utf-8" in err
    _no_traceback(r.stderr)


def _sft(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def test_sft_line_nested_too_deep_is_a_bad_line(runner, old, tmp_path):
    ok = json.dumps({"instruction": "a", "response": "b"})
    data = _sft(tmp_path / "deep.jsonl", [ok, ok, "[" * 100_000 + "]" * 100_000])
    args = ["finetune", "--ckpt", str(old / "run"), "--data", str(data), "--mode", "sft", "--max-steps", "1", *RUN]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 1, r.output
    assert f"--data {data}: 1 malformed line(s):" in r.stderr and "line 3: nested too deeply" in r.stderr
    _no_traceback(r.stderr)
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "b"), "--skip-bad-lines"])
    assert "--skip-bad-lines: skipped 1 malformed line(s)" in r.stderr and "line 3: nested too deeply" in r.stderr
    assert "RecursionError" not in r.stderr


def test_sft_examples_all_longer_than_the_block_name_the_block_and_their_lengths(runner, old, tmp_path):
    from minillm.data import sft as ft
    from minillm.tokenizer import load_tokenizer

    lines = [json.dumps({"instruction": "el rio y el mar " * (4 + i), "response": "si"}) for i in range(5)]
    data = _sft(tmp_path / "long.jsonl", lines)
    tok = load_tokenizer(old / "tok.json")
    lens = [len(ft.encode_example(tok, ft.format_example(json.loads(x)), 0)[0]) for x in lines]
    r = runner.invoke(app, ["finetune", "--ckpt", str(old / "run"), "--data", str(data), "--mode", "sft",
                            "-o", str(tmp_path / "ft"), "--max-steps", "1", *RUN])
    assert r.exit_code == 1, r.output
    err = " ".join(r.stderr.split())
    assert f"--data {data}: every example is too long for the base model's block of 32 tokens" in err, err
    assert f"(the 5 example(s) are {min(lens)} to {max(lens)} tokens long)" in err and "--block-size" in err
    _no_traceback(r.stderr)


def test_prepare_corpus_jsonl_nested_too_deep_is_a_clear_error(tmp_path, runner):
    from minillm.cli import app

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    r = runner.invoke(app, ["prepare-corpus", "-i", str(src), "-o", str(tmp_path / "out.txt")])
    assert r.exit_code == 1, r.output
    assert "line 2" in r.stderr and "nested too deeply" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.txt").exists()
