"""Tokenizer training, special tokens, streaming input and the init-tokenizer command."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.errors import UsageError
from minillm.tokenizer import (
    DOC,
    PAD,
    UNK,
    collect_files,
    doc_id,
    iter_training_texts,
    load_tokenizer,
    min_vocab_size,
    save_tokenizer,
    train_tokenizer,
)
from tests.conftest import make_corpus


@functools.cache
def _bpe():
    texts = ["Hola mundo, el rio y el mar.", "Señor, ¿qué tal? 日本語のテキスト 🙂", "def f(x):\n    return x * 2\n"] * 20
    return train_tokenizer(texts, 400)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_byte_level_round_trip_any_unicode(text):
    tok = _bpe()
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.token_to_id(UNK) is None
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


def test_special_token_string_in_text_is_text_not_the_special_id(tmp_path):
    tok = _bpe()
    save_tokenizer(tok, tmp_path / "t.json")
    for t in (tok, load_tokenizer(tmp_path / "t.json")):
        text = f"antes {DOC} despues {PAD}"
        ids = t.encode(text, add_special_tokens=False).ids
        assert doc_id(t) not in ids and t.token_to_id(PAD) not in ids
        assert t.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("model,minimum", [("bpe", 258), ("unigram", 4), ("wordpiece", 4)])
def test_too_small_vocab_is_refused_naming_the_minimum(model, minimum):
    assert min_vocab_size(model, 2 + (model != "bpe")) == minimum
    with pytest.raises(UsageError, match=rf"--vocab-size {minimum - 1} is too small.*at least {minimum}"):
        train_tokenizer(["abc def"] * 5, minimum - 1, model=model)


def test_special_tokens_and_models(tmp_path):
    texts = [f"documento {i} el rio y el mar y la tierra" for i in range(50)]
    for model in ("bpe", "unigram", "wordpiece"):
        tok = train_tokenizer(texts, 300, model=model, special_tokens=["<|user|>", DOC])
        vocab = tok.get_vocab()
        assert {DOC, PAD, "<|user|>"} <= set(vocab) and (UNK in vocab) == (model != "bpe")
        assert tok.get_vocab_size() <= 300
        assert "el" in tok.decode(tok.encode("el rio").ids)


def test_min_frequency_limits_merges():
    texts = ["aa bb cc"] * 3 + ["xyzq"]
    low = train_tokenizer(texts, 1000, min_frequency=1).get_vocab()
    high = train_tokenizer(texts, 1000, min_frequency=3).get_vocab()
    assert "xyzq" in low and "xyzq" not in high and "aa" in high


def test_separators_are_never_learned(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n<|doc|>\n".join(["uno dos tres"] * 200) + "\n", encoding="utf-8")
    tok = train_tokenizer(iter_training_texts([path]), 400, min_frequency=1)
    merged = [t for t in tok.get_vocab() if t not in (DOC, PAD) and len(t) > 1]
    assert "uno" in merged or "Ġdos" in merged
    assert not any("doc" in t or "|" in t for t in merged)


def test_streaming_from_files_and_directories(tmp_path):
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    make_corpus(d / "a.txt", n_docs=3, seed=1)
    make_corpus(d / "sub" / "b.txt", n_docs=4, seed=2)
    make_corpus(d / ".hidden" / "c.txt", n_docs=5, seed=3)
    single = make_corpus(tmp_path / "one.txt", n_docs=2, seed=4)
    files = collect_files([d, single])
    assert files == [d / "a.txt", d / "sub" / "b.txt", single]
    texts = iter_training_texts(files)
    assert iter(texts) is texts  # a generator: read lazily, one piece at a time
    assert len(list(texts)) == 9
    # a document far longer than a piece streams in pieces that join to the whole
    big = tmp_path / "big.txt"
    lines = [f"linea {i} del documento largo\n" for i in range(2000)]
    big.write_text("".join(lines), encoding="utf-8")
    pieces = list(iter_training_texts([big], piece_chars=4000))
    assert len(pieces) > 10 and max(map(len, pieces)) < 4100
    assert "".join(pieces) == "".join(lines).strip("\n")
    with pytest.raises(UsageError, match="--files"):
        collect_files([tmp_path / "missing"])


def test_init_tokenizer_command(tmp_path, runner):
    from tokenizers import Tokenizer

    from minillm.cli import app

    d = tmp_path / "texts"
    d.mkdir()
    make_corpus(d / "a.txt", n_docs=20, seed=1)
    make_corpus(d / "b.txt", n_docs=20, seed=2)
    out = tmp_path / "tok.json"
    r = runner.invoke(app, ["init-tokenizer", "--files", str(d), "--files", str(tmp_path / "texts" / "a.txt"),
                            "--vocab-size", "320", "--min-frequency", "1", "--special-tokens", "<|sep|>",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["vocab_size"] == 320 and 1.0 < info["bytes_per_token"] < 10 and len(info["examples"]) == 3
    plain = Tokenizer.from_file(str(out))  # loadable by the tokenizers library alone
    assert plain.token_to_id("<|sep|>") is not None and plain.token_to_id(DOC) is not None
    r = runner.invoke(app, ["init-tokenizer", "--files", str(d), "--vocab-size", "100", "--out", str(out)])
    assert r.exit_code == 2 and "at least 258" in r.stderr
    r = runner.invoke(app, ["init-tokenizer", "--files", str(d), "--vocab-size", "300", "--model", "unigram",
                            "--out", str(tmp_path / "u.json")])
    assert r.exit_code == 0 and "bytes per token" in r.stdout
    assert load_tokenizer(Path(tmp_path / "u.json")).token_to_id(UNK) is not None
    (tmp_path / "es.txt").write_text("canción de acción y razón\n" * 30, encoding="utf-8")
    r = runner.invoke(app, ["init-tokenizer", "--files", str(tmp_path / "es.txt"), "--vocab-size", "300",
                            "--out", str(tmp_path / "es.json")])
    assert r.exit_code == 0 and "ó" in r.stdout and "Ã" not in r.stdout and "Ġ" not in r.stdout  # readable pieces
