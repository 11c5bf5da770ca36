"""The token cache on disk: build, open, verify; and the split's stream files.

Layout (``--cache-dir``, default ``RUN/cache``; one ``sourceN/`` subdirectory per corpus of a mixture):
``tokens.bin`` holds every document as ``<|doc|>`` followed by its tokens (uint16 when the vocabulary
fits, else uint32); ``docs.npy`` holds the start offset of each document plus the end; ``meta.json``
records the sha256 of the tokenizer and corpus files the cache was built from, and of its own files. The
cache is rebuilt when either input changes, or when ``open_token_cache`` finds it damaged (sizes and
offsets are checked at every start; the checksums only for a small cache). ``train.bin`` and ``val.bin``
(``write_stream``) lay a split's documents end to end; ``train.key``/``val.key`` name them and hold the
file's checksum.

Encoding runs ``encode_batch`` (all CPU cores) on batches of about ``BATCH_CHARS`` characters while a
reader thread prepares the next batch: memory stays bounded, whatever the lines: a document longer than a
batch, and a line longer than ``LINE_CHARS``, is encoded in pieces (``corpus.read.iter_pieces``). Pieces
are cut at pre-token boundaries of the byte-level BPE, so they encode exactly as the whole, except where
none comes (a "word" longer than ``LINE_CHARS``, a long document whose lines all start with spaces): there
the tokens next to the cut may differ slightly from those of the whole text (the decoded text is the same).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minillm.corpus.read import batch_documents, iter_pieces
from minillm.data.windows import Stream
from minillm.errors import MiniLLMError
from minillm.io import atomic_open, atomic_write_json, progress_bar, sha256_file
from minillm.tokenizer import doc_id, load_tokenizer

CACHE_FORMAT = 2
VERIFY_BYTES = 32 << 20  # a token cache (or split) up to this size has its checksum verified at every start
SPOT_CHECKS = 1024  # document starts whose <|doc|> token is checked at every start
BATCH_CHARS = 4 << 20  # characters of text per encode_batch call: bounded memory, enough to fill the cores


# ---------------------------------------------------------------- encoding


def _piece_batches(path: Path, limit: int) -> Iterator[tuple[list[str], np.ndarray, int]]:
    """``iter_pieces`` in batches of about ``limit`` characters: (texts, starts_document flags, utf-8 bytes)."""
    for batch in batch_documents(iter_pieces(path, limit), limit, size=lambda piece: len(piece[0])):
        texts = [t for t, _ in batch]
        yield texts, np.asarray([first for _, first in batch]), sum(len(t.encode("utf-8")) for t in texts)


def _prefetched(it: Iterator, depth: int = 2) -> Iterator:
    """Run an iterator in a background thread, ``depth`` items ahead (reading overlaps encoding)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def run() -> None:
        try:
            for item in it:
                q.put(item)
            q.put(done)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    threading.Thread(target=run, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def encode_pieces(tok, texts: list[str], flags: np.ndarray, doc: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch in parallel (``encode_batch_fast``, which skips character offsets, else
    ``encode_batch``: Rayon threads over all cores, unless TOKENIZERS_PARALLELISM=false); put ``<|doc|>``
    before each piece that starts a document. Returns the tokens (N,) and the documents' start offsets."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    n_body = int(lens.sum())
    lens = lens + flags
    offs = np.zeros(len(ids), dtype=np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    out = np.empty(n_body + int(flags.sum()), dtype=dtype)
    body = np.ones(len(out), dtype=bool)
    starts = offs[flags]
    body[starts] = False
    out[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=n_body)
    out[starts] = doc
    return out, starts


# ---------------------------------------------------------------- the token cache


@dataclass(frozen=True)
class TokenCache:
    """An opened token cache: its tokens (memory-mapped), document offsets and meta.json."""

    dir: Path
    tokens: np.ndarray  # memmap (N,) uint16/uint32
    doc_starts: np.ndarray  # (n_docs + 1,) int64 offsets into tokens
    meta: dict

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.doc_starts[-1])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class CacheDamaged(MiniLLMError):
    """A token cache that is not what its ``meta.json`` says; it is rebuilt, never used."""


def stderr_note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def build_token_cache(tokenizer_path: Path, corpus_path: Path, cache_dir: Path,
                      progress: Callable[[int], None] | None = None, dtype: np.dtype | str | None = None,
                      batch_chars: int = BATCH_CHARS, note: Callable[[str], None] = stderr_note) -> TokenCache:
    """Encode ``corpus_path`` with the tokenizer into ``cache_dir``, or reuse a cache built from the same
    two files (sha256 of both) that ``open_token_cache`` finds intact; a damaged cache, or one from a version
    without checksums, is rebuilt after saying so through ``note``, which also says whether the cache is
    reused or encoded (the latter once the first batch has been read, so never just before a read error).
    ``progress(bytes)`` is called per batch with the batch's UTF-8 bytes (default: a bar on stderr when it
    is a terminal). ``dtype`` forces the token type (default: uint16 when the vocabulary fits, else uint32)."""
    corpus_path, cache_dir = Path(corpus_path), Path(cache_dir)
    if not corpus_path.is_file():
        raise MiniLLMError(f"--corpus: {corpus_path} does not exist")
    tok = load_tokenizer(tokenizer_path)
    vocab = tok.get_vocab_size()
    dtype = np.dtype(dtype) if dtype is not None else token_dtype(vocab)
    if vocab > np.iinfo(dtype).max + 1:
        raise MiniLLMError(f"a vocabulary of {vocab} does not fit {dtype.name}; use uint32")
    key = {"format": CACHE_FORMAT, "tokenizer_sha256": sha256_file(tokenizer_path),
           "corpus_sha256": sha256_file(corpus_path), "dtype": dtype.name}
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        try:
            if all(_read_meta(cache_dir).get(k) == v for k, v in key.items()):  # else built from other files
                cache = open_token_cache(cache_dir)
                note(f"reusing the token cache {cache_dir} of {corpus_path}")
                return cache
        except CacheDamaged as e:
            note(f"{e}; rebuilding")
        meta_path.unlink()  # until the rebuild is complete, no meta.json: an interrupted one is redone
        for tag in cache_dir.glob("*.key"):  # the splits are rewritten from the new tokens
            tag.unlink()
    doc = doc_id(tok)
    starts: list[np.ndarray] = []
    n = 0
    digest = hashlib.sha256()
    batches = _prefetched(_piece_batches(corpus_path, batch_chars))
    first = list(itertools.islice(batches, 1))  # a corpus that cannot be read fails here, before any message
    if first:
        note(f"encoding {corpus_path} into the token cache {cache_dir}")
    with (atomic_open(cache_dir / "tokens.bin", "wb") as f,
          progress_bar(corpus_path.stat().st_size, "token cache", "B", unit_scale=True) as bar):
        for texts, flags, n_bytes in itertools.chain(first, batches):
            ids, doc_offsets = encode_pieces(tok, texts, flags, doc, dtype)
            ids.tofile(f)
            digest.update(ids)
            starts.append(doc_offsets + n)
            n += len(ids)
            (progress or bar.update)(n_bytes)
    doc_starts = np.concatenate([*starts, [n]]).astype(np.int64)
    if len(doc_starts) == 1:
        (cache_dir / "tokens.bin").unlink(missing_ok=True)
        raise MiniLLMError(f"--corpus: {corpus_path} holds no documents (it is empty or only separators)")
    with atomic_open(cache_dir / "docs.npy", "wb") as f:
        np.save(f, doc_starts)
    meta = {**key, "vocab_size": vocab, "doc_id": doc, "n_docs": len(doc_starts) - 1, "n_tokens": n,
            "corpus": str(corpus_path), "tokens_sha256": digest.hexdigest(),
            "docs_sha256": hashlib.sha256(doc_starts).hexdigest()}
    atomic_write_json(meta_path, meta)
    return open_token_cache(cache_dir)


def _read_meta(cache_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheDamaged(f"token cache {cache_dir} is damaged (meta.json is unreadable: {e})") from e
    if not isinstance(meta, dict):
        raise CacheDamaged(f"token cache {cache_dir} is damaged (meta.json holds no record)")
    return meta


def open_token_cache(cache_dir: Path) -> TokenCache:
    """Open a token cache after checking it against its ``meta.json``: the file sizes, the document offsets,
    ``<|doc|>`` at up to ``SPOT_CHECKS`` document starts, and, for a cache of at most ``VERIFY_BYTES``, the
    checksums (a big cache is not hashed at every start). Raises ``CacheDamaged``."""
    cache_dir = Path(cache_dir)
    meta = _read_meta(cache_dir)
    if "tokens_sha256" not in meta:
        raise CacheDamaged(f"token cache {cache_dir} was written by an earlier version (no checksum)")
    problem, tokens, starts = _cache_problem(cache_dir, meta)
    if problem:
        raise CacheDamaged(f"token cache {cache_dir} is damaged ({problem})")
    return TokenCache(cache_dir, tokens, starts, meta)


def _cache_problem(cache_dir: Path, meta: dict[str, Any]) -> tuple[str | None, Any, Any]:
    """``(what is wrong or None, tokens memmap, document offsets)`` of a cache with a checksum."""
    try:
        n, n_docs, doc, dtype = int(meta["n_tokens"]), int(meta["n_docs"]), int(meta["doc_id"]), np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        return f"meta.json lacks or garbles {e}", None, None
    if n < 1 or n_docs < 1:
        return f"meta.json says {n} tokens in {n_docs} documents", None, None
    path = cache_dir / "tokens.bin"
    size = path.stat().st_size if path.is_file() else None
    if size != n * dtype.itemsize:
        held = "is missing" if size is None else f"holds {size} bytes"
        return f"tokens.bin {held}; meta.json says {n} tokens of {dtype.itemsize} bytes", None, None
    try:
        starts = np.load(cache_dir / "docs.npy")
    except (OSError, ValueError) as e:
        return f"docs.npy is unreadable: {str(e)[:80]}", None, None
    if (starts.dtype != np.int64 or starts.shape != (n_docs + 1,) or starts[0] != 0 or starts[-1] != n
            or np.any(np.diff(starts) < 1)):
        return f"docs.npy does not hold the {n_docs} document offsets meta.json says", None, None
    tokens = np.memmap(path, dtype=dtype, mode="r")
    sample = starts[np.linspace(0, n_docs - 1, min(n_docs, SPOT_CHECKS)).astype(np.int64)]
    if np.any(tokens[sample] != doc):
        return "tokens.bin does not hold <|doc|> where docs.npy says a document starts", None, None
    if size + starts.nbytes <= VERIFY_BYTES and not (_digest_ok(tokens, meta["tokens_sha256"])
                                                     and _digest_ok(starts, meta.get("docs_sha256"))):
        return "tokens.bin or docs.npy does not match the checksum in meta.json", None, None
    return None, tokens, starts


def _digest_ok(data: np.ndarray, recorded: Any) -> bool:
    return hashlib.sha256(np.ascontiguousarray(data)).hexdigest() == recorded


# ---------------------------------------------------------------- the split's streams


def write_stream(cache: TokenCache, doc_ids: np.ndarray, path: Path,
                 note: Callable[[str], None] = stderr_note) -> Stream:
    """Lay the given documents end to end in a file (reused when it holds the same documents of the
    same cache, has the right size and, up to ``VERIFY_BYTES``, matches its checksum; else rewritten,
    after saying so through ``note`` when it was damaged). ``PATH.key`` holds the documents' digest and
    the file's sha256."""
    ids = np.sort(np.asarray(doc_ids, dtype=np.int64))
    h = hashlib.sha256(ids.tobytes())
    h.update(json.dumps([cache.meta.get(k) for k in ("tokenizer_sha256", "corpus_sha256", "dtype")]).encode())
    digest = h.hexdigest()[:32]
    lens = (cache.doc_starts[ids + 1] - cache.doc_starts[ids]) if len(ids) else np.zeros(0, np.int64)
    starts = np.zeros(len(ids), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    n, dtype = int(lens.sum()), cache.tokens.dtype
    tag = path.with_suffix(".key")
    key, _, recorded = (tag.read_text() if tag.is_file() else "").partition("\n")
    if key == digest and recorded and path.is_file():
        size = path.stat().st_size
        if size != n * dtype.itemsize:
            note(f"token cache {path} is damaged ({size} bytes, {n * dtype.itemsize} expected); rewriting")
        elif size > VERIFY_BYTES or _digest_ok(_tokens_at(path, n, dtype), recorded):
            return Stream(_tokens_at(path, n, dtype), starts)
        else:
            note(f"token cache {path} is damaged (it does not match its checksum); rewriting")
    sha = hashlib.sha256()
    with atomic_open(path, "wb") as f:
        for a, b in _contiguous_runs(ids):
            lo, hi = int(cache.doc_starts[a]), int(cache.doc_starts[b])
            for s in range(lo, hi, 1 << 24):
                chunk = np.asarray(cache.tokens[s : min(hi, s + (1 << 24))])
                chunk.tofile(f)
                sha.update(chunk)
    tag.write_text(f"{digest}\n{sha.hexdigest()}")
    return Stream(_tokens_at(path, n, dtype), starts)


def _tokens_at(path: Path, n: int, dtype: np.dtype) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)


def _contiguous_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last + 1)] for each run of consecutive integers in sorted ``ids``."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    firsts = np.concatenate([[ids[0]], ids[breaks + 1]])
    lasts = np.concatenate([ids[breaks], [ids[-1]]])
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts, strict=True)]


def cache_dir_for(outdir: Path, cache_dir: Path | None) -> Path:
    """``--cache-dir``, or the run's own ``OUTDIR/cache``."""
    return Path(cache_dir) if cache_dir else Path(outdir) / "cache"
