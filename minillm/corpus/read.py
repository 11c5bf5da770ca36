"""Corpus input: the corpus format and its one reader, finding input files, decoding raw inputs (UTF-8 with
a cp1252 fallback), refusing binary files. Cleaning lives in ``corpus.clean``, the prepare pipeline in
``corpus.prepare``, statistics and recommendations in ``corpus.stats``.

The corpus format (what prepare-corpus writes and every other command reads): UTF-8 text, documents
separated by a line holding only ``DOC`` (``<|doc|>``, also the tokenizer's document token). ``iter_pieces``
is its one reader; ``iter_documents`` joins its pieces. Raw inputs (any encoding, another ``--separator``,
blank-line splitting, JSONL) are read by ``read_documents``.

Everything here streams: memory holds one document (and one read buffer) at a time.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from minillm.corpus.formats import (
    PARQUET_SUFFIXES,
    READ_ERRORS,
    base_name,
    is_parquet,
    iter_parquet,
    open_binary,
)
from minillm.errors import MiniLLMError, UsageError

DOC = "<|doc|>"  # the document separator line of the corpus format, and the tokenizer's document token
DOC_JOIN = f"\n{DOC}\n"  # between two documents written in the corpus format
TEXT_SUFFIXES = (".txt", ".text", ".md")  # what a directory contributes, besides .jsonl, .parquet (and
# .gz, .bz2, .xz, .zst of a text or .jsonl file)
JSONL_SUFFIXES = (".jsonl",)
MAX_DOC_CHARS = 8_000_000  # a longer raw document is cut at its next blank line, so memory stays bounded
PIECE_CHARS = 4 << 20  # iter_pieces: a longer document comes in pieces of about this many characters
LINE_CHARS = 1 << 18  # iter_pieces: a longer line comes in pieces of at most this many characters
_CHUNK = 1 << 20
_SNIFF = 1 << 16
_SPACE_AFTER_WORD = re.compile(r" (?=\S)")  # searched in reversed text: a space that follows a non-space
T = TypeVar("T")


# ---------------------------------------------------------------- the corpus format


def iter_pieces(path: Path, limit: int = PIECE_CHARS, separator: str = DOC) -> Iterator[tuple[str, bool]]:
    """Stream a corpus file as ``(text, starts_document)`` pieces: its documents (a document is the text
    between two separator lines, without the line breaks at its edges; an empty one is skipped), except that
    a document longer than ``limit`` characters comes in several pieces cut before a line that starts with a
    non-space character, and a line longer than ``LINE_CHARS`` (or ``limit``) in pieces of its own
    (``_bounded_lines``): byte-level BPE pre-token boundaries, so the pieces encode exactly as the whole. A
    document with no such line within ``2 * limit`` characters (every line indented) is cut before any line.
    Memory holds one piece."""
    buf: list[str] = []
    size, first = 0, True

    def flush(last: bool) -> Iterator[tuple[str, bool]]:
        text = "".join(buf)
        if first:
            text = text.lstrip("\n")
        if last:
            text = text.rstrip("\n")
        if text.strip() or (not first and text):
            yield text, first

    with io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="") as f:
        try:
            # a line's first piece is longer than half the bound, so it is never taken for a separator line
            for line, line_start in _bounded_lines(f, max(min(limit, LINE_CHARS), 4 * len(separator) + 4)):
                if line_start and line.rstrip("\r\n") == separator:
                    yield from flush(True)
                    buf, size, first = [], 0, True
                    continue
                cut = not line_start or (size >= limit and (line[:1].strip() or size >= 2 * limit))
                if cut and "".join(buf).strip():
                    yield from flush(False)
                    buf, size, first = [], 0, False
                buf.append(line)
                size += len(line)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from e
        except READ_ERRORS as e:
            raise MiniLLMError(f"cannot read {path}: {e}; check the file") from e
    yield from flush(True)


def iter_documents(path: Path, separator: str = DOC) -> Iterator[str]:
    """Stream the documents of a corpus file (``iter_pieces``'s pieces joined): document ``i`` here is
    document ``i`` of the token cache. Memory holds one document at a time."""
    parts: list[str] = []
    for text, first in iter_pieces(path, separator=separator):
        if first and parts:
            yield "".join(parts)
            parts = []
        parts.append(text)
    if parts:
        yield "".join(parts)


def _bounded_lines(f: IO[str], limit: int) -> Iterator[tuple[str, bool]]:
    """The lines of a text stream as ``(text, starts_line)``; a line longer than ``limit`` characters comes in
    pieces, each cut before the last space that follows a non-space in its second half (a pre-token boundary
    of the byte-level BPE, Metaspace and Whitespace pre-tokenizers), or at ``limit`` when there is none (a
    "word" that long). Memory holds two pieces, never the whole line."""
    buf, start = "", True
    while part := f.readline(limit):
        buf += part
        while len(buf) > limit:
            cut = _cut_point(buf, limit)
            yield buf[:cut], start
            buf, start = buf[cut:], False
        if buf.endswith(("\n", "\r")):  # else the line goes on
            yield buf, start
            buf, start = "", True
    if buf:
        yield buf, start


def _cut_point(text: str, limit: int) -> int:
    """Where to cut an over-long line: before the last space in ``text[limit // 2 : limit]`` that follows a
    non-space, else at ``limit``."""
    m = _SPACE_AFTER_WORD.search(text[limit // 2 : limit][::-1])
    return limit - 1 - m.start() if m else limit


def _not_utf8(path: Path, e: UnicodeDecodeError) -> MiniLLMError:
    """A corpus file that is not UTF-8, naming the offset of its first invalid byte (``e.start`` counts
    within the decoder's buffer, so the file is scanned again for it)."""
    _, bad = scan_utf8(path, check_binary=False)
    at = f" at byte {bad}" if bad is not None else ""
    return MiniLLMError(f"{path} is not UTF-8 text ({e.reason}{at}); if it is raw text, clean it with "
                        f"`minillm prepare-corpus` (which reads cp1252 too), else give a corpus file")


# ---------------------------------------------------------------- input files


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` can't be read as an input file, completing "PATH ..." ("does not exist", "is a FIFO (named
    pipe), not a regular file", ...), or None for a regular file or a link to one. Opening a FIFO would block
    until something writes to it, and a device may never end: every file input is checked with this first."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except NotADirectoryError:
        return "does not exist"
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((k for test, k in _KINDS if test(mode)), "not a file")
    return f"is {kind}, not a regular file"


def check_input_file(path: Path, flag: str, fix: str = "give a file", error: type[MiniLLMError] = MiniLLMError) -> None:
    """Refuse an input that is not a regular file, saying what it is: ``FLAG: PATH is a FIFO ...; FIX``."""
    if why := not_a_regular_file(path):
        raise error(f"{flag}: {path} {why}; {fix}")


def find_inputs(paths: Iterable[Path], log: Callable[[str], None] = lambda s: None, flag: str = "--input",
                suffixes: tuple[str, ...] | None = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES,
                ) -> tuple[list[Path], int]:
    """Expand ``flag``'s files and directories: a file is checked (``check_input_file``) and kept; a
    directory gives its files (recursively, sorted, hidden entries skipped) whose name ends in one of
    ``suffixes`` or that plus a compression suffix (``formats.OPENERS``; None: every file); such an entry that is not a regular file (a FIFO,
    a socket) is skipped with a note. Returns the files and how many directory entries were skipped."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError(f"{flag}: no inputs given; name one or more files or directories")
    files: list[Path] = []
    skipped = 0
    for p in paths:
        if not p.is_dir():
            check_input_file(p, flag, "check the path", UsageError)
            files.append(p)
            continue
        found = []
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(n for n in names if not n.startswith(".")):
                if suffixes is not None and not base_name(n).endswith(suffixes):
                    skipped += 1
                elif why := not_a_regular_file(Path(root) / n):
                    log(f"skipped {Path(root) / n}: it {why}")
                    skipped += 1
                else:
                    found.append(Path(root) / n)
        if not found:
            kinds = "files" if suffixes is None else f"{', '.join(suffixes[:-1])} or {suffixes[-1]} files (or .gz, .bz2, .xz, .zst of them)"
            raise UsageError(f"{flag}: directory {p} holds no {kinds}")
        files.extend(found)
    return files, skipped


# ---------------------------------------------------------------- raw inputs (prepare-corpus)


@dataclass(frozen=True)
class ReadOptions:
    """How input files are read and cut into documents."""

    separator: str = DOC  # a line holding exactly this ends a document
    split_on_blank_lines: bool = False  # a blank line also ends a document
    text_field: str = "text"  # the JSON key holding a .jsonl line's text
    encoding: str = "auto"  # auto (UTF-8, cp1252 fallback per file) or any Python codec name
    strict: bool = False  # invalid bytes are an error naming the file and byte offset


def is_jsonl(path: Path) -> bool:
    return base_name(path.name).endswith(JSONL_SUFFIXES)


def _looks_binary(head: bytes) -> str | None:
    """Why ``head`` is not text, or None. NUL bytes, or more than 30% control bytes, mean binary."""
    if b"\x00" in head:
        return "it holds NUL bytes"
    if len(head) >= 256:  # too little text says nothing
        ctrl = sum(head.count(bytes([c])) for c in (*range(1, 9), 11, 14, 15, *range(16, 27), 28, 29, 30, 31, 127))
        if ctrl / len(head) > 0.3:
            return "most of its bytes are control characters"
    return None


def _binary_error(path: Path, why: str) -> MiniLLMError:
    return MiniLLMError(
        f"{path} looks like a binary file ({why}); remove it from the inputs "
        "(or pass --encoding utf-16 if it is UTF-16 text)"
    )


def validate_encoding(encoding: str) -> None:
    if encoding.lower() != "auto":
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise UsageError(f"--encoding {encoding!r} is not a known codec; try auto, utf-8, cp1252 or latin-1") from None


def _wide_codec(encoding: str) -> bool:
    name = codecs.lookup(encoding).name
    return name.startswith(("utf-16", "utf-32"))


def check_head(path: Path, encoding: str = "auto") -> None:
    """Refuse a file whose first 64 KiB look binary (cheap; run on every input before writing). A Parquet
    file is binary by design: pyarrow checks it as it reads."""
    if is_parquet(path) or (encoding != "auto" and _wide_codec(encoding)):
        return
    try:
        with open_binary(path) as f:
            head = f.read(_SNIFF)
    except READ_ERRORS as e:
        raise MiniLLMError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}; check the file and its "
                           f"permissions") from e
    why = _looks_binary(head)
    if why:
        raise _binary_error(path, why)


def scan_utf8(path: Path, check_binary: bool = True) -> tuple[int, int | None]:
    """Read the whole file once (C speed). Returns (size in bytes, offset of the first invalid UTF-8
    byte or None). Raises when a NUL byte shows the file is binary."""
    offset = 0
    bad: int | None = None
    carry = b""
    try:
        with open_binary(path) as f:
            while chunk := f.read(_CHUNK):
                if check_binary and b"\x00" in chunk:
                    nul = offset + chunk.index(b"\x00")
                    raise _binary_error(path, f"a NUL byte at offset {nul}")
                if bad is None:
                    data = carry + chunk
                    start = offset - len(carry)
                    try:
                        data.decode("utf-8")
                        carry = b""
                    except UnicodeDecodeError as e:
                        if e.reason == "unexpected end of data" and len(data) - e.start < 4:
                            carry = data[e.start:]
                        else:
                            bad = start + e.start
                offset += len(chunk)
    except READ_ERRORS as e:
        raise MiniLLMError(f"cannot read {path}: {e}") from e
    if bad is None and carry:
        bad = offset - len(carry)
    return offset, bad


@dataclass
class FileInfo:
    """What reading one file found."""

    path: str
    encoding: str
    bytes: int
    fallback_from_byte: int | None = None  # first invalid UTF-8 byte when auto fell back to cp1252


def resolve_encoding(path: Path, opts: ReadOptions, log: Callable[[str], None]) -> FileInfo:
    """Decide how to decode ``path``; raise on binary files and, with ``--strict``, on invalid bytes."""
    enc = opts.encoding.lower()
    validate_encoding(enc)
    if enc != "auto" and _wide_codec(enc):
        return FileInfo(str(path), enc, os.path.getsize(path))
    size, bad = scan_utf8(path)
    if enc in ("auto", "utf-8", "utf8"):
        if bad is not None:
            if opts.strict:
                raise MiniLLMError(
                    f"{path}: invalid UTF-8 at byte offset {bad}; fix the file, pass --encoding cp1252 "
                    "(or the file's real encoding), or drop --strict to let auto fall back to cp1252"
                )
            if enc == "auto":
                log(f"{path}: not valid UTF-8 (first bad byte at offset {bad}); read as cp1252")
                return FileInfo(str(path), "cp1252", size, bad)
        return FileInfo(str(path), "utf-8-sig", size)
    return FileInfo(str(path), enc, size)


def _open_text(path: Path, info: FileInfo, strict: bool) -> IO[str]:
    """A text stream that keeps line endings untranslated (CRLF stays CRLF until cleaning)."""
    encoding = info.encoding
    if encoding == "cp1252":
        import ftfy.bad_codecs  # noqa: F401  registers sloppy-windows-1252 (cp1252 that never fails)

        encoding = "sloppy-windows-1252"
    errors = "strict" if strict else "replace"
    return io.TextIOWrapper(open_binary(path), encoding=encoding, errors=errors, newline="")


@contextlib.contextmanager
def _read_errors(path: Path, info: FileInfo, strict: bool) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as e:
        raise MiniLLMError(
            f"{path}: cannot decode as {info.encoding} ({e.reason}); pass the file's real --encoding"
            + (" or drop --strict" if strict else "")
        ) from e
    except READ_ERRORS as e:
        raise MiniLLMError(f"cannot read {path}: {e}") from e


def _split_chunks(f: IO[str], sep: str, on_long: Callable[[], None]) -> Iterator[str]:
    """Documents of a text stream, read in 1 MiB blocks: the fast path of ``_split_text``.

    A separator line is ``sep`` alone between line breaks (LF, CRLF or CR), as in ``iter_documents``."""
    sep_re = re.compile(r"(?:^|(?<=\r))" + re.escape(sep) + r"(?:\r\n?|\n|\Z)", re.MULTILINE)
    parts: list[str] = []  # pieces of the current document
    size = 0
    carry = ""
    while True:
        chunk = f.read(_CHUNK)
        block = carry + chunk
        if chunk:
            cut = max(block.rfind("\n"), block.rfind("\r")) + 1  # complete lines only
            if cut == 0 and len(block) < 2 * MAX_DOC_CHARS:
                carry = block
                continue
            block, carry = (block[:cut], block[cut:]) if cut else (block, "")
        pos = 0
        for m in sep_re.finditer(block):
            parts.append(block[pos : m.start()])
            doc = "".join(parts)
            if doc:
                yield doc
            parts, size, pos = [], 0, m.end()
        rest = block[pos:]
        parts.append(rest)
        size += len(rest)
        if size > MAX_DOC_CHARS:  # cut a huge document at its last blank line (or here)
            doc = "".join(parts)
            brk = doc.rfind("\n\n") + 2
            if brk < 2 and size < 2 * MAX_DOC_CHARS:
                parts = [doc]
            else:
                brk = brk if brk >= 2 else len(doc)
                on_long()
                yield doc[:brk]
                parts = [doc[brk:]]
                size = len(parts[0])
        if not chunk:
            break
    doc = "".join(parts)
    if doc:
        yield doc


def _split_lines(lines: Iterator[str], opts: ReadOptions, on_long: Callable[[], None]) -> Iterator[str]:
    """Documents of a text stream, line by line (used with --split-on-blank-lines)."""
    sep = opts.separator
    buf: list[str] = []
    n = 0
    for line in lines:
        stripped = line.rstrip("\r\n")
        if stripped == sep or (opts.split_on_blank_lines and not stripped.strip()):
            if buf:
                yield "".join(buf)
            buf, n = [], 0
            continue
        buf.append(line)
        n += len(line)
        if n > MAX_DOC_CHARS and (not stripped.strip() or n > 2 * MAX_DOC_CHARS):
            on_long()
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def _split_jsonl(path: Path, lines: Iterator[str], field: str) -> Iterator[str]:
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MiniLLMError(f"{path} line {i}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        except RecursionError:
            raise MiniLLMError(f"{path} line {i}: nested too deeply to read (arrays or objects inside each other "
                               f"hundreds of levels deep); each line must be one JSON object holding the text") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise UsageError(f"{path} line {i}: no field {field!r} (found: {keys}); pass --text-field NAME")
        value = obj[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise MiniLLMError(f"{path} line {i}: field {field!r} is {type(value).__name__}, not text")
        yield value


def read_documents(
    files: list[Path],
    opts: ReadOptions,
    infos: list[FileInfo] | None = None,
    log: Callable[[str], None] = lambda s: None,
    on_long: Callable[[], None] = lambda: None,
) -> Iterator[str]:
    """Stream raw (uncleaned) documents from every file in order; appends a FileInfo per file to ``infos``."""
    for path in files:
        if is_parquet(path):  # one document per row of the --text-field column
            if infos is not None:
                infos.append(FileInfo(str(path), "parquet", os.path.getsize(path)))
            yield from iter_parquet(path, opts.text_field)
            continue
        info = resolve_encoding(path, opts, log)
        if infos is not None:
            infos.append(info)
        with _open_text(path, info, opts.strict) as f, _read_errors(path, info, opts.strict):
            if is_jsonl(path):
                yield from _split_jsonl(path, f, opts.text_field)
            elif opts.split_on_blank_lines:
                yield from _split_lines(f, opts, on_long)
            else:
                yield from _split_chunks(f, opts.separator, on_long)


def batch_documents(docs: Iterable[T], max_chars: int, max_docs: int = 0,
                    size: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Group documents (or other items of ``size`` characters) into lists of about ``max_chars`` characters
    (and at most ``max_docs`` items when > 0): units of work for the tokenizer or the cleaning workers, with
    bounded memory."""
    batch: list[T] = []
    n = 0
    for d in docs:
        batch.append(d)
        n += size(d)
        if n >= max_chars or (max_docs and len(batch) >= max_docs):
            yield batch
            batch, n = [], 0
    if batch:
        yield batch
