"""prepare-corpus and analyze-corpus: reading, cleaning, dedup, encodings, atomic output, statistics,
the windows and the two CLI commands (the recommendations: test_plan_rules.py, test_plan_recommend.py).
Everything is built in tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import sys

import ftfy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from minillm.corpus import read as corpus_mod
from minillm.corpus.clean import CleanOptions, _ftfy_config, clean_document, fix_text, rewrite_special
from minillm.corpus.prepare import DedupOptions, prepare_corpus
from minillm.corpus.read import ReadOptions, _split_chunks, _split_lines, iter_documents, read_documents
from minillm.corpus.stats import analyze, expected_windows
from minillm.errors import MiniLLMError, UsageError

SEP = "\n<|doc|>\n"


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def run(tmp_path, inputs, **kw):
    out = tmp_path / "out.txt"
    kw.setdefault("workers", 1)
    s = prepare_corpus(inputs, out, **kw)
    return s, list(iter_documents(out)), out


# ---------------------------------------------------------------- cleaning steps


def clean(text, **kw):
    return clean_document(text, CleanOptions(**kw))[0]


def test_each_cleaning_step_and_its_switch():
    assert clean("a\r\nb\rc") == "a\nb\nc"
    assert clean("a\r\nb", newlines=False) == "a\r\nb"
    assert clean("CafÃ© &amp; more") == "Café & more"
    assert clean("CafÃ© &amp; more", ftfy=False) == "CafÃ© &amp; more"
    assert clean("a\x00b\x07c\x1bd\x7fe\ufefff") == "abcdef"
    assert clean("a\x07b", control=False) == "a\x07b"
    decomposed = "Cafe\u0301"
    assert clean(decomposed) == "Caf\u00e9"
    assert clean(decomposed, nfc=False) == decomposed
    assert clean("a  \nb\t\nc \u00a0") == "a\nb\nc"
    assert clean("a  \nb", trailing=False) == "a  \nb"
    assert clean("a\n\n\n\n\nb") == "a\n\nb"
    assert clean("a\n\n\n\nb", blank_lines=False) == "a\n\n\n\nb"
    assert clean("MiXeD Ñ") == "MiXeD Ñ"
    assert clean("MiXeD Ñ", lowercase=True) == "mixed ñ"
    assert clean("\n\n  \n") == ""


def test_indentation_and_tabs_survive():
    code = "def f(x):\n    if x:\n\treturn [\n\t\t1,  2,\n\t]\n\n| a  | b |\n|----|---|"
    assert clean(code) == code
    assert clean("    leading first line\n  second") == "    leading first line\n  second"


def test_fast_ftfy_equals_ftfy():
    cfg = _ftfy_config()
    samples = [
        "plain ascii", "a &amp; b", "x < y &amp; z", "ascii\nCafÃ©\n&lt;b&gt;\nmore", "ﬁne ＬＯＵＤ \x1b[31mred",
        "Â¿QuÃ© tal?\n<p>&amp;</p>\n&amp;", "C1 \x91quoted\x92", "señor\ncañón",
    ]
    for s in samples:
        assert fix_text(s) == ftfy.fix_text(s, cfg), s


def test_special_strings_rewritten_and_counted():
    text, n = rewrite_special("a <|doc|> b\n<|doc|>\n<|pad|><|endoftext|> <|x y|>")
    assert n == 4
    assert "<|" not in text.replace("<|x y|>", "")
    assert text.startswith("a < |doc| > b\n< |doc| >\n")
    assert rewrite_special(text) == (text, 0)  # idempotent


def test_special_strings_in_prepare(tmp_path):
    f = write(tmp_path / "a.txt", "one <|doc|> inline\n<|doc|>\ntwo\n <|pad|>\n<|doc|> \nthree")
    s, docs, _ = run(tmp_path, [f])
    assert docs == ["one < |doc| > inline", "two\n < |pad| >\n< |doc| >\nthree"]
    assert s.special_rewritten == 3


def test_min_chars_and_empty(tmp_path):
    f = write(tmp_path / "a.txt", SEP.join(["short", "   \n\t", "long enough document"]))
    s, docs, _ = run(tmp_path, [f], clean=CleanOptions(min_chars=10))
    assert docs == ["long enough document"]
    assert s.removed["too_short"] == 1 and s.removed["empty"] == 1


# ---------------------------------------------------------------- dedup


def test_exact_dedup_on_normalized_text(tmp_path):
    f = write(tmp_path / "a.txt", SEP.join(["the same  text", "the same text  ", "the\nsame text", "other"]))
    s, docs, _ = run(tmp_path, [f])
    assert docs == ["the same  text", "other"]
    assert s.removed["duplicate"] == 2
    s, docs, _ = run(tmp_path, [f], dedup=DedupOptions(exact=False))
    assert len(docs) == 4 and s.removed["duplicate"] == 0


def test_near_dedup(tmp_path):
    import random

    rng = random.Random(0)
    words = [f"w{rng.randrange(5000)}" for _ in range(300)]
    base = " ".join(words)
    near = " ".join(words[:150] + ["changed"] + words[151:])
    other = " ".join(f"v{rng.randrange(5000)}" for _ in range(300))
    f = write(tmp_path / "a.txt", SEP.join([base, near, other]))
    s, docs, _ = run(tmp_path, [f], dedup=DedupOptions(near=True, threshold=0.8))
    assert docs == [base, other]
    assert s.removed["near_duplicate"] == 1
    s, docs, _ = run(tmp_path, [f])
    assert len(docs) == 3


def test_near_dedup_without_datasketch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)
    f = write(tmp_path / "a.txt", "x")
    with pytest.raises(MiniLLMError, match=r"pip install 'minillm\[dedup\]'"):
        run(tmp_path, [f], dedup=DedupOptions(near=True))


# ---------------------------------------------------------------- formats


def test_formats_txt_jsonl_gz_and_directories(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    write(d / "a.txt", "alpha one" + SEP + "alpha two")
    write(d / "sub" / "b.md", "beta")  # no separator: one document per file
    (d / "c.jsonl").write_text(json.dumps({"body": "gamma <|doc|>"}) + "\n\n" + json.dumps({"body": "delta\nline"}) + "\n")
    with gzip.open(d / "sub" / "e.txt.gz", "wt", encoding="utf-8") as g:
        g.write("epsilon" + SEP + "zeta")
    with gzip.open(d / "f.jsonl.gz", "wt", encoding="utf-8") as g:
        g.write(json.dumps({"body": "eta"}) + "\n")
    write(d / "image.png", "not text")
    s, docs, _ = run(tmp_path, [d], read=ReadOptions(text_field="body"))
    assert docs == ["alpha one", "alpha two", "gamma < |doc| >", "delta\nline", "eta", "beta", "epsilon", "zeta"]
    assert s.files == 5 and s.files_skipped == 1


def test_jsonl_missing_field_names_flag(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"content": "x"}\n')
    with pytest.raises(UsageError, match="--text-field"):
        run(tmp_path, [f])


def test_split_on_blank_lines_and_custom_separator(tmp_path):
    f = write(tmp_path / "a.txt", "p1 l1\np1 l2\n\n\np2\n  \np3\n%%\np4")
    _, docs, _ = run(tmp_path, [f], read=ReadOptions(split_on_blank_lines=True))
    assert docs == ["p1 l1\np1 l2", "p2", "p3\n%%\np4"]
    _, docs, _ = run(tmp_path, [f], read=ReadOptions(separator="%%"))
    assert docs == ["p1 l1\np1 l2\n\np2\n\np3", "p4"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b c", "", "<|doc|>", "\r", "\n", "\r\n", " ", "é"]), max_size=40))
def test_chunked_reader_matches_line_reader(parts):
    import io

    text = "".join(parts)
    a = [d for d in _split_chunks(io.StringIO(text, newline=""), "<|doc|>", lambda: None)]
    b = [d for d in _split_lines(io.StringIO(text, newline=""), ReadOptions(), lambda: None)]
    assert a == b


def test_long_document_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_DOC_CHARS", 1000)
    f = write(tmp_path / "a.txt", ("x" * 99 + "\n") * 15 + "\n" + ("y" * 99 + "\n") * 15)
    s, docs, _ = run(tmp_path, [f])
    assert s.long_documents_split >= 1 and len(docs) >= 2
    assert "".join(docs).replace("\n", "") == "x" * 1485 + "y" * 1485


# ---------------------------------------------------------------- encodings and binary files


def test_auto_falls_back_to_cp1252_per_file(tmp_path):
    good = write(tmp_path / "good.txt", "año ñ")
    bad = write(tmp_path / "bad.txt", "caf\u00e9 \u201cquoted\u201d", encoding="cp1252")
    notes = []
    s = prepare_corpus([good, bad], tmp_path / "o.txt", workers=1, log=notes.append)
    assert list(iter_documents(tmp_path / "o.txt")) == ["año ñ", "café \u201cquoted\u201d"]
    assert [f["path"] for f in s.fallback_files] == [str(bad)]
    assert s.fallback_files[0]["first_bad_byte"] == 3
    assert len(notes) == 1 and "cp1252" in notes[0]


def test_strict_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\n" * 10 + b"caf\xe9")
    with pytest.raises(MiniLLMError, match=r"bad.txt: invalid UTF-8 at byte offset 83"):
        run(tmp_path, [bad], read=ReadOptions(strict=True))


def test_explicit_encoding_and_bom(tmp_path):
    f = write(tmp_path / "l.txt", "ni\u00f1o", encoding="latin-1")
    _, docs, _ = run(tmp_path, [f], read=ReadOptions(encoding="latin-1"))
    assert docs == ["niño"]
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello")
    _, docs, _ = run(tmp_path, [f])
    assert docs == ["hello"]
    with pytest.raises(UsageError, match="--encoding"):
        run(tmp_path, [f], read=ReadOptions(encoding="no-such-codec"))


def test_binary_refused_before_writing(tmp_path):
    out = write(tmp_path / "out.txt", "previous")
    good = write(tmp_path / "a.txt", "text")
    binf = tmp_path / "b.txt"
    binf.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(MiniLLMError, match="binary"):
        prepare_corpus([good, binf], out, workers=1)
    assert out.read_text() == "previous"


def test_atomic_output_on_late_failure(tmp_path):
    out = write(tmp_path / "out.txt", "previous")
    good = write(tmp_path / "a.txt", "text")
    late = tmp_path / "late.txt"
    late.write_bytes(b"fine text\n" * 20000 + b"\x00")  # NUL after the 64 KiB head check
    with pytest.raises(MiniLLMError, match="NUL byte at offset 200000"):
        prepare_corpus([good, late], out, workers=1)
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "late.txt", "out.txt"]


def test_output_may_not_be_an_input(tmp_path):
    f = write(tmp_path / "a.txt", "text")
    with pytest.raises(UsageError, match="also an input"):
        prepare_corpus([tmp_path], tmp_path / "a.txt", workers=1)
    os.symlink(f, tmp_path / "link.txt")
    with pytest.raises(UsageError, match="also an input"):
        prepare_corpus([f], tmp_path / "link.txt", workers=1)
    assert f.read_text() == "text"


def test_two_workers_match_one(tmp_path):
    docs = [f"doc {i} " + "é&amp;" * (i % 7) + "\r\n  x\t\n\n\n\ny" for i in range(3000)]
    f = write(tmp_path / "a.txt", SEP.join(docs + docs[:100]))
    s1 = prepare_corpus([f], tmp_path / "o1.txt", workers=1)
    s2 = prepare_corpus([f], tmp_path / "o2.txt", workers=2)
    assert (tmp_path / "o1.txt").read_bytes() == (tmp_path / "o2.txt").read_bytes()
    assert s1.removed == s2.removed and s2.removed["duplicate"] == 100 and s2.workers == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=200), max_size=8), st.booleans())
def test_arbitrary_unicode_never_crashes(tmp_path, texts, lower):
    f = tmp_path / "h.txt"
    f.write_text("\n<|doc|>\n".join(texts), encoding="utf-8", errors="surrogatepass")
    try:
        s = prepare_corpus([f], tmp_path / "h_out.txt", clean=CleanOptions(lowercase=lower), workers=1)
    except MiniLLMError as e:  # refusing a file of NULs / control characters, or one with no document left
        assert "binary" in str(e) or "nothing was written" in str(e)
        return
    docs = list(iter_documents(tmp_path / "h_out.txt"))
    assert len(docs) == s.documents_out
    assert all("<|doc|>" not in d for d in docs)


# ---------------------------------------------------------------- analysis and recommendations


def test_analyze_counts(tmp_path):
    f = write(tmp_path / "c.txt", SEP.join(["one two three four five six", "tiny", "one two three four five six", "x" * 400]))
    s = analyze(f)
    assert (s.documents, s.words, s.duplicate_documents, s.near_empty_documents) == (4, 14, 1, 1)
    assert s.distinct_words == 8 and s.bytes == f.stat().st_size
    assert list(s.lengths) == [round(27 / 4), 1, round(27 / 4), 100] and s.tokens_estimated


def test_analyze_with_tokenizer_counts_real_tokens(tmp_path):
    from minillm.tokenizer import train_tokenizer

    docs = [f"document number {i} says hello" for i in range(50)]
    tok = train_tokenizer(docs, 300)
    tok.encode_special_tokens = True
    f = write(tmp_path / "c.txt", SEP.join(docs))
    s = analyze(f, tokenizer=tok)
    assert not s.tokens_estimated
    assert list(s.lengths) == [len(tok.encode(d, add_special_tokens=False).ids) for d in docs]


def test_expected_windows_cuts_long_documents_and_packs_short_ones():
    assert expected_windows([65], 64, 32) == 2  # 66 tokens with <|doc|>: one 65-token window + 1 more
    assert expected_windows([64], 64, 32) == 1
    assert expected_windows([64 + 32 * 3], 64, 32) == 4
    assert expected_windows([31, 31], 64, 64) == 0  # 64 tokens: less than one 65-token window (train refuses)
    assert expected_windows([31, 31, 31], 64, 64) == 2  # packed: 96 tokens, one window at 0, one flush with the end
    assert expected_windows([9] * 10, 64, 32) == 3  # starts at documents (0, 30), then flush with the end (35)


# ---------------------------------------------------------------- CLI


def test_cli_prepare_and_analyze(tmp_path):
    from minillm.cli import app

    runner = CliRunner()
    f = write(tmp_path / "raw.txt", SEP.join(["Hola <|pad|> mundo", "Hola <|pad|> mundo", "CafÃ©\r\n"]))
    out = tmp_path / "clean.txt"
    r = runner.invoke(app, ["prepare-corpus", "-i", str(f), "-o", str(out), "--json", "--workers", "1"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["documents_out"] == 2 and summary["removed"]["duplicate"] == 1
    assert summary["special_rewritten"] == 2 and summary["repaired_by_ftfy"] == 1
    assert list(iter_documents(out)) == ["Hola < |pad| > mundo", "Café"]

    r = runner.invoke(app, ["prepare-corpus", "-i", str(f), "-o", str(out), "--dedup-threshold", "0.5"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["prepare-corpus", "-i", str(f), "-o", str(f)])
    assert r.exit_code == 2 and "also an input" in r.output

    png = tmp_path / "h.png"
    r = runner.invoke(app, ["analyze-corpus", "-c", str(out), "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["documents"] == 2 and rep["tokens"]["total"] > 0 and rep["recommendations"]["block_size"] == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(app, ["analyze-corpus", "-c", str(out), "--lang", "es"])
    assert r.exit_code == 0 and "Documentos encontrados: 2" in r.stdout


def test_read_documents_streams_lazily(tmp_path):
    f = write(tmp_path / "a.txt", SEP.join(f"d{i}" for i in range(10)))
    it = read_documents([f], ReadOptions())
    assert next(it) == "d0\n"


# ---------------------------------------------------------------- the corpus format's one reader, one expansion


def test_a_corpus_that_is_not_utf8_is_named_with_its_first_bad_byte(tmp_path):
    """Every reader of a corpus file (train's cache, init-tokenizer, analyze-corpus, evaluate) says the same:
    the file, the offset of its first invalid byte in the file (not in the decoder's buffer), and the fix."""
    from minillm.tokenizer import iter_training_texts

    good = "una linea de texto\n" * 2000  # 38,000 bytes: past the text reader's first buffers
    f = tmp_path / "c.txt"
    f.write_bytes(good.encode() + b"caf\xe9\n")
    bad_at = len(good.encode()) + 3
    for read in (lambda: list(iter_documents(f)), lambda: list(iter_training_texts([f])), lambda: analyze(f)):
        with pytest.raises(MiniLLMError) as e:
            read()
        assert str(e.value).startswith(f"{f} is not UTF-8 text (") and f" at byte {bad_at});" in str(e.value)
        assert "minillm prepare-corpus" in str(e.value)


def test_init_tokenizer_and_prepare_corpus_expand_a_directory_alike(tmp_path):
    """One expansion of directories: the same files in the same order (a directory's own files, then its
    subdirectories, names sorted, hidden entries skipped); init-tokenizer takes every file, prepare-corpus
    its text and JSONL files."""
    from minillm.tokenizer import collect_files

    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    (d / ".git").mkdir()
    for rel, text in (("b.txt", "beta"), ("a/x.txt", "equis"), ("c.txt", "ce"), ("a/.h.txt", "oculto"),
                      (".git/y.txt", "git"), ("notes.rst", "rst")):
        write(d / rel, text)
    order = [d / "b.txt", d / "c.txt", d / "a" / "x.txt"]
    assert collect_files([d]) == [d / "b.txt", d / "c.txt", d / "notes.rst", d / "a" / "x.txt"]
    s, docs, _ = run(tmp_path, [d])
    assert docs == ["beta", "ce", "equis"] and s.files == len(order) and s.files_skipped == 1
    (tmp_path / "empty").mkdir()
    for expand, flag in ((lambda p: collect_files(p), "--files"), (lambda p: run(tmp_path, p), "--input")):
        with pytest.raises(UsageError, match=f"^{flag}: directory {tmp_path / 'empty'} holds no "):
            expand([tmp_path / "empty"])
