"""Input shapes beyond .txt/.jsonl/.gz: .bz2, .xz, .zst compressed files and Parquet tables, streamed by
prepare-corpus (and the corpus-format reader), with one-line errors for broken files and missing extras."""

from __future__ import annotations

import builtins
import bz2
import gzip
import json
import lzma
import sys

import pytest

from minillm.corpus import formats
from minillm.corpus.prepare import prepare_corpus
from minillm.corpus.read import ReadOptions, find_inputs, iter_documents
from minillm.errors import MiniLLMError, UsageError

DOCS = ["El primer documento.\n\nCon dos párrafos.", "Segundo: ñandú, acción.", "Tercero y último."]
TEXT = "\n<|doc|>\n".join(DOCS) + "\n"
JSONL = "".join(json.dumps({"text": d}) + "\n" for d in DOCS)


def _zstd_compress(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    # two frames: a reader that stopped after the first would lose the second half
    c = zstandard.ZstdCompressor()
    return c.compress(data[: len(data) // 2]) + c.compress(data[len(data) // 2 :])


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": _zstd_compress}


def _prepared(tmp_path, inputs, read=ReadOptions()) -> list[str]:
    out = tmp_path / "out.txt"
    prepare_corpus(inputs, out, read, workers=1)
    return list(iter_documents(out))


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("name,content", [("a.txt", TEXT), ("a.jsonl", JSONL)], ids=["text", "jsonl"])
def test_compressed_inputs_read_like_plain_ones(tmp_path, suffix, name, content):
    packed = tmp_path / (name + suffix)
    packed.write_bytes(COMPRESS[suffix](content.encode()))
    assert _prepared(tmp_path, [packed]) == DOCS


@pytest.mark.parametrize("suffix", [".bz2", ".xz"])
def test_truncated_compressed_input_is_one_clear_error(tmp_path, suffix):
    packed = tmp_path / ("a.txt" + suffix)
    data = COMPRESS[suffix]((TEXT * 200).encode())
    packed.write_bytes(data[: len(data) // 2])
    with pytest.raises(MiniLLMError, match=rf"cannot read .*a\.txt\{suffix}"):
        _prepared(tmp_path, [packed])
    assert not (tmp_path / "out.txt").exists()


def test_a_directory_contributes_compressed_and_parquet_files(tmp_path):
    for name in ("a.txt.xz", "b.jsonl.bz2", "c.parquet", "d.md.zst", "e.bin.xz", "f.csv"):
        (tmp_path / name).write_bytes(b"")
    files, skipped = find_inputs([tmp_path])
    assert [f.name for f in files] == ["a.txt.xz", "b.jsonl.bz2", "c.parquet", "d.md.zst"]
    assert skipped == 2


@pytest.mark.parametrize("suffix", [".bz2", ".xz"])
def test_the_corpus_reader_reads_a_compressed_corpus(tmp_path, suffix):
    packed = tmp_path / ("corpus.txt" + suffix)
    packed.write_bytes(COMPRESS[suffix](TEXT.encode()))
    assert list(iter_documents(packed)) == DOCS


def test_the_corpus_reader_still_takes_a_path_as_a_string(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    assert list(iter_documents(str(tmp_path / "c.txt"))) == DOCS


def test_zst_without_a_zstd_library_names_the_extra(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_zstd(name, *args, **kw):
        if name in ("zstandard", "compression"):
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    packed = tmp_path / "a.txt.zst"
    packed.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(MiniLLMError, match=r"a\.txt\.zst: .*pip install 'minillm\[zstd\]'"):
        _prepared(tmp_path, [packed])


# ---------------------------------------------------------------- Parquet


def _parquet(path, columns):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups: read batch by batch
    return path


def test_parquet_rows_become_documents(tmp_path):
    f = _parquet(tmp_path / "t.parquet", {"id": [1, 2, 3, 4], "body": [DOCS[0], None, DOCS[1], DOCS[2]]})
    assert _prepared(tmp_path, [f], ReadOptions(text_field="body")) == DOCS


def test_parquet_missing_column_names_the_columns(tmp_path):
    f = _parquet(tmp_path / "t.parquet", {"id": [1], "body": ["x"]})
    with pytest.raises(UsageError, match=r"t\.parquet: no column 'text' \(found: id, body\); pass --text-field"):
        _prepared(tmp_path, [f])


def test_parquet_column_that_is_not_text(tmp_path):
    f = _parquet(tmp_path / "t.parquet", {"text": [1, 2]})
    with pytest.raises(MiniLLMError, match=r"column 'text' is int64, not text"):
        _prepared(tmp_path, [f])


def test_a_broken_parquet_file_is_one_clear_error(tmp_path):
    pytest.importorskip("pyarrow")
    f = tmp_path / "t.parquet"
    f.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(MiniLLMError, match=r"cannot read .*t\.parquet as Parquet"):
        _prepared(tmp_path, [f])


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    f = tmp_path / "t.parquet"
    f.write_bytes(b"PAR1")
    with pytest.raises(MiniLLMError, match=r"pip install 'minillm\[parquet\]'"):
        _prepared(tmp_path, [f])


def test_prepare_corpus_cli_reads_parquet_with_text_field(tmp_path, runner):
    from minillm.cli import app

    f = _parquet(tmp_path / "t.parquet", {"content": DOCS})
    out = tmp_path / "out.txt"
    r = runner.invoke(app, ["prepare-corpus", "-i", str(f), "-o", str(out), "--text-field", "content",
                            "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert list(iter_documents(out)) == DOCS
    r = runner.invoke(app, ["prepare-corpus", "-i", str(f), "-o", str(tmp_path / "o2.txt"), "--workers", "1"])
    assert r.exit_code == 2 and "no column 'text'" in r.output and "Traceback" not in r.output


def test_formats_names_every_compression():
    assert formats.base_name("Book.TXT.zst") == "book.txt"
    assert formats.compression("a.jsonl.bz2") == ".bz2" and formats.compression("a.txt") == ""
