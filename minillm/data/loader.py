"""The token cache on disk, the train/validation split, windows, domain mixing and the batch loader.

Cache layout (``--cache-dir``, default ``RUN/cache``; one ``sourceN/`` subdirectory per corpus of a
mixture): ``tokens.bin`` holds every document as ``<|doc|>`` followed by its tokens (uint16 when the
vocabulary fits, else uint32); ``docs.npy`` holds the start offset of each document plus the end;
``meta.json`` records the sha256 of the tokenizer and corpus files the cache was built from, and of its
own files. The cache is rebuilt when either input changes, or when ``open_token_cache`` finds it damaged
(sizes and offsets are checked at every start; the checksums only for a small cache). Encoding runs
``encode_batch`` (all CPU cores) on batches of about ``BATCH_CHARS`` characters while a reader thread
prepares the next batch: memory stays bounded, whatever
the lines: a document longer than a batch, and a line longer than ``LINE_CHARS``, is encoded in pieces
(``iter_pieces``). Pieces are cut at pre-token boundaries of the byte-level BPE, so they encode exactly as
the whole, except where none comes (a "word" longer than ``LINE_CHARS``, a long document whose lines all
start with spaces): there the tokens next to the cut may differ slightly from those of the whole text (the
decoded text is the same).

The split is by document: document ``i`` goes to validation when a seeded splitmix64 hash of ``i``
falls below ``val_fraction`` (see ``split_documents``; it does not depend on the text). Each split's
documents are laid end to end in a stream file; an example is a window of ``block_size + 1`` tokens.
Windows are aligned to documents (``window_starts``): each starts at a document's ``<|doc|>`` where
that costs little overlap (see there); long documents are cut into windows ``stride`` apart;
short ones are packed. A window crosses into another document only through that document's
``<|doc|>`` token, which ``segment_ids`` in the model turns into a boundary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from minillm.checkpoint import atomic_open, atomic_write_json, sha256_file
from minillm.errors import MiniLLMError, UsageError

CACHE_FORMAT = 2
VERIFY_BYTES = 32 << 20  # a token cache (or split) up to this size has its checksum verified at every start
SPOT_CHECKS = 1024  # document starts whose <|doc|> token is checked at every start
BATCH_CHARS = 4 << 20  # characters of text per encode_batch call: bounded memory, enough to fill the cores
LINE_CHARS = 1 << 18  # a longer line is encoded in pieces of at most this many characters (~150 bytes each)
ALIGN_SLACK = 4  # a window moves back to a document start when that costs at most 1/ALIGN_SLACK overlap
SEPARATOR = "<|doc|>"
_SPACE_AFTER_WORD = re.compile(r" (?=\S)")  # searched in reversed text: a space that follows a non-space


# ---------------------------------------------------------------- reading and encoding


def iter_pieces(path: Path, limit: int = BATCH_CHARS, separator: str = SEPARATOR) -> Iterator[tuple[str, bool]]:
    """Stream a corpus file as ``(text, starts_document)`` pieces: the documents of
    ``corpus.iter_documents`` (same text), except that a document longer than ``limit`` characters comes
    in several pieces cut before a line that starts with a non-space character, and a line longer than
    ``LINE_CHARS`` (or ``limit``) in pieces of its own (``_bounded_lines``): byte-level BPE pre-token
    boundaries, so the pieces encode exactly as the whole. A document with no such line within ``2 * limit``
    characters (every line indented) is cut before any line. Memory holds one piece."""
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

    with open(path, encoding="utf-8", newline="") as f:
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
            raise MiniLLMError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                               f"clean it with `minillm prepare-corpus`") from e
    yield from flush(True)


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


def _piece_batches(path: Path, limit: int) -> Iterator[tuple[list[str], np.ndarray, int]]:
    """Batches of about ``limit`` characters: (texts, starts_document flags, utf-8 bytes)."""
    texts: list[str] = []
    flags: list[bool] = []
    size = 0
    for text, first in iter_pieces(path, limit):
        texts.append(text)
        flags.append(first)
        size += len(text)
        if size >= limit:
            yield texts, np.asarray(flags), sum(len(t.encode("utf-8")) for t in texts)
            texts, flags, size = [], [], 0
    if texts:
        yield texts, np.asarray(flags), sum(len(t.encode("utf-8")) for t in texts)


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


def _stderr_note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def build_token_cache(tokenizer_path: Path, corpus_path: Path, cache_dir: Path,
                      progress: Callable[[int], None] | None = None, dtype: np.dtype | str | None = None,
                      batch_chars: int = BATCH_CHARS, note: Callable[[str], None] = _stderr_note) -> TokenCache:
    """Encode ``corpus_path`` with the tokenizer into ``cache_dir``, or reuse a cache built from the same
    two files (sha256 of both) that ``open_token_cache`` finds intact; a damaged cache, or one from a version
    without checksums, is rebuilt after saying so through ``note``. ``progress(bytes_done)`` is called per
    batch. ``dtype`` forces the token type (default: uint16 when the vocabulary fits, else uint32)."""
    from minillm.tokenizer import doc_id, load_tokenizer

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
                return open_token_cache(cache_dir)
        except CacheDamaged as e:
            note(f"{e}; rebuilding")
        meta_path.unlink()  # until the rebuild is complete, no meta.json: an interrupted one is redone
        for tag in cache_dir.glob("*.key"):  # the splits are rewritten from the new tokens
            tag.unlink()
    doc = doc_id(tok)
    starts: list[np.ndarray] = []
    n = 0
    digest = hashlib.sha256()
    with atomic_open(cache_dir / "tokens.bin", "wb") as f:
        for texts, flags, n_bytes in _prefetched(_piece_batches(corpus_path, batch_chars)):
            ids, doc_offsets = encode_pieces(tok, texts, flags, doc, dtype)
            ids.tofile(f)
            digest.update(ids)
            starts.append(doc_offsets + n)
            n += len(ids)
            if progress:
                progress(n_bytes)
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


# ---------------------------------------------------------------- split and streams


def _hash_unit(i: np.ndarray, seed: int) -> np.ndarray:
    """A seeded splitmix64 hash of each integer, mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        z = i.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation documents. Document ``i`` (its position in the corpus file, counting
    from 0) is held out when ``splitmix64(i + seed * 0x9E3779B97F4A7C15) / 2**64 < val_fraction``: the
    choice is deterministic, independent of the text, and stable when documents are appended. At least
    one document is held out (the one with the smallest hash) and one kept."""
    if n_docs < 2:
        raise MiniLLMError(
            f"the corpus holds {n_docs} document(s): a validation split needs at least 2; "
            f"split it into documents (prepare-corpus --split-on-blank-lines) or pass --val-file"
        )
    u = _hash_unit(np.arange(n_docs), seed)
    val = np.flatnonzero(u < val_fraction)
    if len(val) == 0:
        val = np.array([int(np.argmin(u))])
    if len(val) == n_docs:
        val = val[:-1]
    return val.astype(np.int64)


@dataclass(frozen=True)
class Stream:
    """Documents laid end to end: the tokens (memmap) and where each document starts in them."""

    tokens: np.ndarray  # (N,) uint16/uint32
    doc_starts: np.ndarray  # (n_docs,) int64, ascending, doc_starts[0] == 0

    def __len__(self) -> int:
        return len(self.tokens)


def write_stream(cache: TokenCache, doc_ids: np.ndarray, path: Path,
                 note: Callable[[str], None] = _stderr_note) -> Stream:
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


# ---------------------------------------------------------------- windows


def window_starts(n_tokens: int, block_size: int, stride: int, doc_starts: np.ndarray | None = None) -> np.ndarray:
    """Start offsets of windows of ``block_size + 1`` tokens. Consecutive starts are at most ``stride``
    apart and the last window is flush with the end, so every token is covered when
    ``stride <= block_size``.

    Without ``doc_starts`` windows are exactly ``stride`` apart. With them (ascending offsets of the
    documents in the stream) windows are aligned to documents: a long document is cut into windows
    ``stride`` apart from its ``<|doc|>``; where the next window would start ``x`` tokens after the
    latest ``<|doc|>`` it passed, it moves back to that ``<|doc|>`` when ``x * ALIGN_SLACK`` is at most
    the larger of ``stride`` and the distance covered since the last aligned start (so at most a third
    more windows than the unaligned layout); a window that reaches past a short document goes on into
    the next ones (packing). Vectorized within each document; the loop runs once per boundary."""
    span = block_size + 1
    last = n_tokens - span
    if last < 0:
        return np.zeros(0, dtype=np.int64)
    if doc_starts is None or len(doc_starts) == 0:
        starts = np.arange(0, last + 1, stride, dtype=np.int64)
    else:
        d = np.asarray(doc_starts, dtype=np.int64)
        out: list[np.ndarray] = []
        pos = 0
        while pos <= last:
            j = int(np.searchsorted(d, pos, side="right"))
            if j == len(d):  # no document starts after pos: plain strides to the end
                out.append(np.arange(pos, last + 1, stride, dtype=np.int64))
                break
            k = -(-(int(d[j]) - pos) // stride)  # first k with pos + k * stride >= the next document
            out.append(np.arange(pos, pos + k * stride, stride, dtype=np.int64))
            q = pos + k * stride
            u = int(d[np.searchsorted(d, q, side="right") - 1])  # the latest document start <= q
            pos = u if (q - u) * ALIGN_SLACK <= max(stride, u - pos) else q
        starts = np.concatenate(out)
        starts = starts[starts <= last]
    if starts[-1] != last:
        starts = np.append(starts, last)
    return starts


def gather(stream: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    """Read the windows beginning at ``starts`` in one vectorized memmap read. (B, span) int64."""
    idx = starts[:, None] + np.arange(span, dtype=np.int64)[None, :]
    return stream[idx].astype(np.int64)


# ---------------------------------------------------------------- the loader


@dataclass(frozen=True)
class Source:
    """One corpus of a mixture: its training stream, window starts and weight."""

    name: str
    tokens: np.ndarray  # (N,) the training stream
    starts: np.ndarray  # (n_windows,) int64 window starts
    weight: float = 1.0


class Loader:
    """Batches of windows in a seeded random order, resumable from its ``state_dict``.

    All ranks read one global sequence of windows: epoch ``e`` of a source is a seeded permutation of
    its windows, and a source's epochs follow one another without a gap. Global sample ``g`` goes to
    rank ``g % world_size``, so with ``world_size`` ranks of batch ``B`` the ranks together read exactly
    what one process with batch ``B * world_size`` reads (disjoint, nothing dropped or padded; an
    epoch's remainder flows into the next epoch). With several sources, sample ``g``'s source is drawn by
    weight from a seeded hash of ``g``, and within a source windows are drawn without replacement,
    reshuffled when it is exhausted. An epoch of the mixture is as many windows as all sources hold.
    """

    def __init__(self, stream: np.ndarray | None, starts: np.ndarray | None, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, sources: Sequence[Source] | None = None):
        if sources is None:
            sources = [Source("corpus", stream, starts)]
        if any(len(s.starts) == 0 for s in sources):
            raise MiniLLMError("no training windows: the corpus is shorter than one block")
        if not 0 <= rank < world_size:
            raise MiniLLMError(f"rank {rank} is not in [0, world_size {world_size})")
        self.sources = list(sources)
        self.span, self.batch_size, self.seed = block_size + 1, batch_size, seed
        self.rank, self.world_size = rank, world_size
        w = np.asarray([s.weight for s in self.sources], dtype=np.float64)
        self._cum = np.cumsum(w / w.sum())
        self._cum[-1] = 1.0
        self.n_windows = np.asarray([len(s.starts) for s in self.sources], dtype=np.int64)
        self.g = 0  # global samples consumed (all ranks)
        self.drawn = np.zeros(len(self.sources), dtype=np.int64)  # global draws per source
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, src: int, epoch: int) -> np.ndarray:
        key = (src, epoch)
        if key not in self._perms:
            seq = [self.seed, epoch] if len(self.sources) == 1 else [self.seed, src, epoch]
            if len(self._perms) > 2 * len(self.sources) + 2:
                self._perms = {k: v for k, v in self._perms.items() if k[1] >= epoch - 1}
            self._perms[key] = np.random.default_rng(seq).permutation(int(self.n_windows[src]))
        return self._perms[key]

    @property
    def windows_per_epoch(self) -> int:
        """This rank's share of an epoch (all sources' windows together)."""
        return -(-int(self.n_windows.sum()) // self.world_size)

    @property
    def epoch(self) -> int:
        return int(self.g // int(self.n_windows.sum()))

    @property
    def pos(self) -> int:
        return int(self.g % int(self.n_windows.sum()))

    def source_epochs(self) -> dict[str, float]:
        """How many epochs of each source have been read."""
        return {s.name: round(float(d / n), 4) for s, d, n in zip(self.sources, self.drawn, self.n_windows, strict=True)}

    def next_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's next batch as (source of each sample (B,), window index within it (B,))."""
        b, w = self.batch_size, self.world_size
        glob = self.g + np.arange(b * w, dtype=np.int64)  # the global step's samples
        if len(self.sources) == 1:
            src = np.zeros(len(glob), dtype=np.int64)
        else:
            src = np.searchsorted(self._cum, _hash_unit(glob, self.seed ^ 0x5EED), side="right")
        draw = np.empty(len(glob), dtype=np.int64)
        for s in range(len(self.sources)):
            m = src == s
            c = int(m.sum())
            draw[m] = self.drawn[s] + np.arange(c)
            self.drawn[s] += c
        self.g += b * w
        src, draw = src[self.rank :: w], draw[self.rank :: w]
        idx = np.empty(b, dtype=np.int64)
        for s in np.unique(src):
            m = src == s
            n = int(self.n_windows[s])
            ep, at = np.divmod(draw[m], n)
            out = np.empty(len(at), dtype=np.int64)
            for e in np.unique(ep):
                sel = ep == e
                out[sel] = self._order(int(s), int(e))[at[sel]]
            idx[m] = out
        return src, idx

    def next_batch(self) -> np.ndarray:
        src, idx = self.next_indices()
        if len(self.sources) == 1:
            return gather(self.sources[0].tokens, self.sources[0].starts[idx], self.span)  # (B, T+1)
        out = np.empty((len(idx), self.span), dtype=np.int64)  # (B, T+1)
        for s in np.unique(src):
            m = src == s
            out[m] = gather(self.sources[s].tokens, self.sources[s].starts[idx[m]], self.span)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"g": int(self.g), "drawn": [int(x) for x in self.drawn], "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "g" in state:
            drawn = [int(x) for x in state["drawn"]]
            if len(drawn) != len(self.sources):
                raise MiniLLMError(f"the checkpoint's loader read {len(drawn)} corpora, this run has "
                                   f"{len(self.sources)}; give the same --corpus list")
            self.g, self.drawn = int(state["g"]), np.asarray(drawn, dtype=np.int64)
        else:  # format 1: a single source's (epoch, pos)
            self.g = int(state["epoch"]) * int(self.n_windows.sum()) + int(state["pos"])
            self.drawn = np.asarray([self.g], dtype=np.int64)


class Prefetcher:
    """Prepares the next batches in a background thread (pinned memory on CUDA, for non-blocking
    copies), so the GPU never waits. Yields ``(batch, loader_state_after_it)`` so a checkpoint records
    exactly what was consumed."""

    def __init__(self, loader: Loader, pin: bool, depth: int = 4, threads: int = 1):
        self.loader, self.pin, self.depth = loader, pin, depth
        self.threaded = threads > 0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        if self.threaded:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()

    def _make(self):
        import torch

        x = torch.from_numpy(self.loader.next_batch())
        if self.pin:
            x = x.pin_memory()
        return x, self.loader.state_dict()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the training thread
            if not self._stop.is_set():
                self._q.put(e)

    def next(self):
        if not self.threaded:
            return self._make()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the background thread and wait for it, so it is never inside a torch call while the
        interpreter shuts down (which can abort the process)."""
        self._stop.set()
        if self.threaded and self._t.is_alive():
            self._t.join(timeout=10)


def _val_starts(stream: Stream, block_size: int, n: int) -> np.ndarray:
    """Up to ``n`` document-aligned, non-overlapping windows spread evenly over a validation stream."""
    starts = window_starts(len(stream), block_size, block_size, stream.doc_starts)
    if len(starts) == 0:
        raise MiniLLMError(
            f"the validation documents hold {len(stream)} tokens, fewer than one block of {block_size + 1}; "
            f"use a smaller --block-size (e.g. {max(16, 2 ** int(np.log2(max(2, len(stream) // 2))))}), "
            f"a larger --val-fraction, or --val-file"
        )
    n = min(len(starts), n)
    return starts[np.linspace(0, len(starts) - 1, n).round().astype(np.int64)]


def val_windows(stream: np.ndarray | Stream, block_size: int, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """Fixed validation batches: non-overlapping windows spread evenly over the validation stream."""
    if not isinstance(stream, Stream):
        stream = Stream(stream, np.zeros(0, dtype=np.int64))
    pick = _val_starts(stream, block_size, batch_size * n_batches)
    return [gather(stream.tokens, pick[i : i + batch_size], block_size + 1) for i in range(0, len(pick), batch_size)]


# ---------------------------------------------------------------- mixtures and the run's data


@dataclass(frozen=True)
class Mixture:
    """Several training corpora, each window's source drawn by weight (``--corpus a --corpus b --mix 0.7,0.3``).
    ``weights`` None: proportional to each corpus's training windows (as if concatenated)."""

    corpora: tuple[Path, ...]
    weights: tuple[float, ...] | None = None

    def __str__(self) -> str:
        if self.weights is None:
            return " + ".join(map(str, self.corpora))
        return " + ".join(f"{p} ({w:g})" for p, w in zip(self.corpora, self.weights, strict=True))

    @classmethod
    def parse(cls, corpora: Sequence[Path], mix: str | None) -> Path | Mixture:
        """Resolve ``--corpus`` (repeatable) and ``--mix``: one corpus without ``--mix`` stays a Path."""
        corpora = tuple(Path(p) for p in corpora)
        if not corpora:
            raise UsageError("--corpus: give at least one corpus file")
        if mix is None:
            return corpora[0] if len(corpora) == 1 else cls(corpora)
        try:
            weights = tuple(float(x) for x in mix.split(","))
        except ValueError:
            raise UsageError(f"--mix {mix!r}: give one number per --corpus, comma-separated, e.g. 0.7,0.3") from None
        if len(weights) != len(corpora):
            raise UsageError(f"--mix has {len(weights)} weight(s) for {len(corpora)} --corpus file(s); "
                             f"give one per corpus, in the same order")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise UsageError(f"--mix {mix!r}: every weight must be a positive number")
        total = sum(weights)
        return cls(corpora, tuple(w / total for w in weights))


@dataclass
class RunData:
    """What the trainer needs from the data: a loader, fixed validation batches and facts to record.
    ``val_doc_ids``: the held-out documents' indices (for a mixture, one list per corpus)."""

    loader: Loader
    val_batches: list[np.ndarray]
    vocab_size: int
    doc_id: int
    val_doc_ids: list
    meta: dict[str, Any]  # recorded under "data" in the run's config.json (resume refuses changes)


def _too_short(n: int, block_size: int) -> MiniLLMError:
    return MiniLLMError(
        f"the training documents hold {n} tokens, fewer than one block of {block_size + 1}; use "
        f"--block-size {max(8, 2 ** int(np.log2(max(2, n // 4))))} --stride "
        f"{max(4, 2 ** int(np.log2(max(2, n // 8))))} or a larger corpus"
    )


def prepare_data(tokenizer: Path, corpus: Path | Mixture, cache_dir: Path, block_size: int, tcfg,
                 val_file: Path | None = None, rank: int = 0, world_size: int = 1,
                 note: Callable[[str], None] = _stderr_note) -> RunData:
    """Encode (or reuse) the token cache of each corpus, split train/validation by document, and build
    the loader (``corpus`` a Path, or a ``Mixture`` of several). ``note`` says when a damaged cache is rebuilt."""
    mixture = corpus if isinstance(corpus, Mixture) else None
    corpora = mixture.corpora if mixture else (Path(corpus),)
    cache_dir = Path(cache_dir)
    stride = tcfg.stride or block_size
    n_val = tcfg.batch_size * tcfg.eval_batches
    sources, vals, infos, caches = [], [], [], []
    for i, path in enumerate(corpora):
        cdir = cache_dir / f"source{i}" if mixture else cache_dir
        cache = build_token_cache(tokenizer, path, cdir, note=note)
        caches.append(cache)
        if val_file:
            val_ids = np.zeros(0, dtype=np.int64)
            train_ids = np.arange(cache.n_docs)
        else:
            val_ids = split_documents(cache.n_docs, tcfg.val_fraction, tcfg.seed)
            train_ids = np.setdiff1d(np.arange(cache.n_docs), val_ids)
            vals.append(write_stream(cache, val_ids, cdir / "val.bin", note))
        train = write_stream(cache, train_ids, cdir / "train.bin", note)
        starts = window_starts(len(train), block_size, stride, train.doc_starts)
        if len(starts) == 0:
            raise _too_short(len(train), block_size)
        sources.append(Source(str(path), train.tokens, starts))
        infos.append({"corpus": str(path), "corpus_sha256": cache.meta["corpus_sha256"], "n_docs": cache.n_docs,
                      "train_tokens": len(train), "windows": len(starts), "val_doc_ids": val_ids.tolist()})
    if mixture:
        weights = mixture.weights or tuple(len(s.starts) / sum(len(t.starts) for t in sources) for s in sources)
        sources = [Source(s.name, s.tokens, s.starts, w) for s, w in zip(sources, weights, strict=True)]
        for info, w in zip(infos, weights, strict=True):
            info["weight"] = round(float(w), 6)
    if val_file:
        vcache = build_token_cache(tokenizer, val_file, cache_dir / "val", note=note)
        vstream = write_stream(vcache, np.arange(vcache.n_docs), cache_dir / "val" / "val.bin", note)
        picks = [(vstream, _val_starts(vstream, block_size, n_val))]
    else:  # each corpus contributes validation windows in proportion to its weight
        shares = [max(1, round(n_val * s.weight)) for s in sources] if mixture else [n_val]
        picks = [(v, _val_starts(v, block_size, k)) for v, k in zip(vals, shares, strict=True)]
    rows = np.concatenate([gather(v.tokens, st, block_size + 1) for v, st in picks])
    val_batches = [rows[i : i + tcfg.batch_size] for i in range(0, len(rows), tcfg.batch_size)]
    loader = Loader(None, None, block_size, tcfg.batch_size, tcfg.seed, rank, world_size, sources=sources)
    meta: dict[str, Any] = {
        "corpus_sha256": infos[0]["corpus_sha256"] if not mixture else [x["corpus_sha256"] for x in infos],
        "corpus": str(corpora[0]) if not mixture else [str(p) for p in corpora],
        "val_file": str(val_file) if val_file else None, "n_docs": sum(x["n_docs"] for x in infos),
        "train_tokens": sum(x["train_tokens"] for x in infos), "windows": "document-aligned",
    }
    if mixture:
        meta["mixture"] = [{k: v for k, v in x.items() if k != "val_doc_ids"} for x in infos]
    val_doc_ids = [x["val_doc_ids"] for x in infos] if mixture else infos[0]["val_doc_ids"]
    return RunData(loader, val_batches, int(caches[0].meta["vocab_size"]), int(caches[0].meta["doc_id"]), val_doc_ids, meta)


def cache_dir_for(outdir: Path, cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(outdir) / "cache"
