"""Fuzzing with hypothesis (issue 12), a fixed small budget of examples so CI stays fast:
prepare-corpus on arbitrary bytes and Unicode, the tokenizer round trip, and the TOML config loader.
Each must either succeed with a well-formed result or fail with a ``MiniLLMError`` (never another
exception), leaving no partial output or temporary file."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minillm.config import ModelConfig, TrainConfig, resolve
from minillm.corpus.clean import CleanOptions
from minillm.corpus.prepare import DedupOptions, prepare_corpus
from minillm.corpus.read import iter_documents
from minillm.errors import MiniLLMError, UsageError
from tests.conftest import make_corpus

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SPECIALS = ["<|doc|>", "<|pad|>", "<|unk|>", "\n<|doc|>\n", "\r\n", "\x00", "\ufeff", "\u202e", "\ud7ff", "é", "😀"]


def _check_prepared(d: Path, raw: Path, **kw) -> None:
    out = d / "out.txt"
    try:
        s = prepare_corpus([raw], out, clean=CleanOptions(**kw), workers=1)
    except MiniLLMError as e:  # binary, undecodable with --strict, or nothing left: said, nothing written
        event("refused")
        assert str(e) and "\n" not in str(e)
        assert not out.exists()
    else:
        event("written")
        docs = list(iter_documents(out))
        assert len(docs) == s.documents_out >= 1
        assert all(d.strip() and "<|doc|>" not in d.split("\n") for d in docs)
        assert out.read_bytes().decode("utf-8").endswith("\n") and "\x00" not in out.read_text(encoding="utf-8")
    assert sorted(p.name for p in d.iterdir()) in (["raw.txt"], ["out.txt", "raw.txt"])


@FUZZ
@given(data=st.binary(max_size=600))
def test_prepare_corpus_on_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        (d / "raw.txt").write_bytes(data)
        _check_prepared(d, d / "raw.txt")


@FUZZ
@given(parts=st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS)), max_size=12),
       lower=st.booleans(), min_chars=st.integers(0, 5), strict=st.booleans())
def test_prepare_corpus_on_arbitrary_unicode(parts, lower, min_chars, strict):
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        text = "".join(parts)
        (d / "raw.txt").write_bytes(text.encode("utf-8", "surrogatepass"))
        _check_prepared(d, d / "raw.txt", lowercase=lower, min_chars=min_chars)
        if strict:  # the same through the exact-dedup-off path
            (d / "out.txt").unlink(missing_ok=True)
            try:
                prepare_corpus([d / "raw.txt"], d / "out.txt", dedup=DedupOptions(exact=False), workers=1)
            except MiniLLMError:
                assert not (d / "out.txt").exists()


@functools.cache
def _tokenizer():
    from minillm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as t:
        corpus = make_corpus(Path(t) / "c.txt", n_docs=20)
        save_tokenizer(train_tokenizer(iter_documents(corpus), 300), Path(t) / "tok.json")
        return load_tokenizer(Path(t) / "tok.json")  # as every stage loads it (special strings stay text)


@FUZZ
@given(parts=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIALS[:4] + SPECIALS[5:])), max_size=8))
def test_tokenizer_round_trip_of_any_text_and_special_strings(parts):
    from minillm.tokenizer import doc_id, encode_documents

    tok = _tokenizer()
    text = "".join(parts).encode("utf-8", "replace").decode("utf-8")  # lone surrogates can't be in a file
    ids = encode_documents(tok, [text])[0]
    assert ids[0] == doc_id(tok) and doc_id(tok) not in ids[1:]  # "<|doc|>" in text is text, not the boundary
    assert tok.decode(ids[1:], skip_special_tokens=False) == text


_FIELDS = {f.name: f for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


_VALUES = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=8),
                    st.sampled_from(["auto", "bf16", "muon", "gelu", "layernorm", "flash", "cuda:1"]),
                    st.lists(st.integers(0, 3), max_size=2))


@FUZZ
@given(model=st.dictionaries(st.sampled_from([*(f.name for f in dataclasses.fields(ModelConfig)), "width"]),
                             _VALUES, max_size=5),
       train=st.dictionaries(st.sampled_from([*(f.name for f in dataclasses.fields(TrainConfig)), "speed"]),
                             _VALUES, max_size=5),
       preset=st.one_of(st.none(), st.sampled_from(["tiny", "small", "huge"]), st.integers()))
def test_config_loader_on_structured_toml(tmp_path, model, train, preset):
    lines = [] if preset is None else [f"preset = {_toml_value(preset)}"]
    for name, table in (("model", model), ("train", train)):
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path = tmp_path / "c.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        m, t = resolve(str(path))
    except UsageError as e:
        event("refused")
        assert str(e).startswith(("invalid config", "--config"))
        return
    event("accepted")
    for k, v in {**model, **train}.items():  # accepted: every value given is the value used
        got = getattr(m, k, getattr(t, k, None))
        assert got == v or (isinstance(v, float) and math.isnan(v) and math.isnan(got)), (k, v, got)


@FUZZ
@given(text=st.one_of(st.text(max_size=200),
                      st.lists(st.sampled_from(["[model]", "[train]", "[other]", "preset = \"tiny\"", "n_embd = 64",
                                                "n_head = 3", "lr = 'x'", "x = [1, {a = 2}]", "[[model]]", "= 1",
                                                "batch_size = 1e400", "epochs = -inf", "\"\\ud800\" = 1",
                                                "dropout = 0.5", "[model.sub]", "seed = 0x10"]),
                               max_size=8).map("\n".join)))
def test_config_loader_on_arbitrary_text_raises_usage_error_or_succeeds(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        resolve(str(path))
        event("accepted")
    except UsageError:
        event("refused")


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b"[model]\nn_embd = \xff\n"])
def test_config_loader_on_undecodable_bytes(tmp_path, raw):
    path = tmp_path / "c.toml"
    path.write_bytes(raw)
    with pytest.raises(UsageError, match="c.toml"):
        resolve(str(path))
