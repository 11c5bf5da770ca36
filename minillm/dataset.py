"""The token cache on disk, the train/validation split, windows and the batch loader.

Cache layout (``--cache-dir``, default ``RUN/cache``): ``tokens.bin`` holds every document as
``<|doc|>`` followed by its tokens (uint16 when the vocabulary fits, else uint32); ``docs.npy`` holds
the start offset of each document plus the end; ``meta.json`` records the sha256 of the tokenizer
and corpus files the cache was built from. The cache is rebuilt only when either changes.

The split is by document: document ``i`` goes to validation when a seeded hash of ``i`` falls below
``val_fraction`` (see ``split_documents``). Each split's documents are laid end to end in a stream
file; an example is a window of ``block_size + 1`` tokens of that stream, windows ``stride`` apart.
A window crosses into another document only through that document's ``<|doc|>`` token, which
``segment_ids`` in the model turns into a boundary (positions restart, attention is blocked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minillm.checkpoint import atomic_open, atomic_write_json, sha256_file
from minillm.errors import MiniLLMError

CACHE_FORMAT = 1
BATCH_CHARS = 4 << 20  # characters of text per encode_batch call: bounded memory, enough to fill the cores


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


def _batches_of_docs(corpus: Path, limit: int = BATCH_CHARS) -> Iterator[list[str]]:
    from minillm.corpus import iter_documents

    batch: list[str] = []
    size = 0
    for doc in iter_documents(corpus):
        batch.append(doc)
        size += len(doc)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_token_cache(tokenizer_path: Path, corpus_path: Path, cache_dir: Path, progress=None) -> TokenCache:
    """Encode ``corpus_path`` with the tokenizer into ``cache_dir`` (or reuse a cache built from the same
    two files). ``progress(bytes_done)`` is called as text is encoded."""
    from minillm.tokenizer import doc_id, encode_documents, load_tokenizer

    corpus_path, cache_dir = Path(corpus_path), Path(cache_dir)
    if not corpus_path.is_file():
        raise MiniLLMError(f"--corpus: {corpus_path} does not exist")
    key = {"tokenizer_sha256": sha256_file(tokenizer_path), "corpus_sha256": sha256_file(corpus_path)}
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in key.items()) and meta.get("format") == CACHE_FORMAT:
                return open_token_cache(cache_dir)
    tok = load_tokenizer(tokenizer_path)
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    starts = [0]
    with atomic_open(cache_dir / "tokens.bin", "wb") as f:
        for docs in _batches_of_docs(corpus_path):
            for ids in encode_documents(tok, docs):
                np.asarray(ids, dtype=dtype).tofile(f)
                starts.append(starts[-1] + len(ids))
            if progress:
                progress(sum(len(d.encode("utf-8")) for d in docs))
    if len(starts) == 1:
        (cache_dir / "tokens.bin").unlink(missing_ok=True)
        raise MiniLLMError(f"--corpus: {corpus_path} holds no documents (it is empty or only separators)")
    with atomic_open(cache_dir / "docs.npy", "wb") as f:
        np.save(f, np.asarray(starts, dtype=np.int64))
    meta = {"format": CACHE_FORMAT, **key, "vocab_size": vocab, "dtype": dtype.name, "doc_id": doc_id(tok),
            "n_docs": len(starts) - 1, "n_tokens": starts[-1], "corpus": str(corpus_path)}
    atomic_write_json(meta_path, meta)
    return open_token_cache(cache_dir)


def open_token_cache(cache_dir: Path) -> TokenCache:
    cache_dir = Path(cache_dir)
    meta = json.loads((cache_dir / "meta.json").read_text())
    tokens = np.memmap(cache_dir / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    starts = np.load(cache_dir / "docs.npy")
    return TokenCache(cache_dir, tokens, starts, meta)


def _hash_unit(i: np.ndarray, seed: int) -> np.ndarray:
    """A seeded splitmix64 hash of each integer, mapped to [0, 1)."""
    with np.errstate(over="ignore"):
        z = i.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation documents: document ``i`` is held out when ``hash(seed, i) < val_fraction``
    (deterministic, independent of the documents' content); at least one is held out and one kept."""
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


def write_stream(cache: TokenCache, doc_ids: np.ndarray, path: Path) -> np.ndarray:
    """Lay the given documents end to end in a file (reused when it exists with the same documents)."""
    digest = hashlib.sha256(np.ascontiguousarray(doc_ids, dtype=np.int64).tobytes()).hexdigest()[:16]
    tag = path.with_suffix(".key")
    if path.is_file() and tag.is_file() and tag.read_text() == digest:
        return np.memmap(path, dtype=cache.tokens.dtype, mode="r")
    with atomic_open(path, "wb") as f:
        runs = _contiguous_runs(np.sort(doc_ids))
        for a, b in runs:
            lo, hi = int(cache.doc_starts[a]), int(cache.doc_starts[b])
            for s in range(lo, hi, 1 << 24):
                np.asarray(cache.tokens[s : min(hi, s + (1 << 24))]).tofile(f)
    tag.write_text(digest)
    return np.memmap(path, dtype=cache.tokens.dtype, mode="r")


def _contiguous_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """[(first, last + 1)] for each run of consecutive integers in sorted ``ids``."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    firsts = np.concatenate([[ids[0]], ids[breaks + 1]])
    lasts = np.concatenate([ids[breaks], [ids[-1]]])
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts, strict=True)]


def window_starts(n_tokens: int, block_size: int, stride: int) -> np.ndarray:
    """Start offsets of windows of ``block_size + 1`` tokens, ``stride`` apart, the last one flush with the
    end so every token is covered when ``stride <= block_size``."""
    span = block_size + 1
    if n_tokens < span:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(0, n_tokens - span + 1, stride, dtype=np.int64)
    if starts[-1] != n_tokens - span:
        starts = np.append(starts, n_tokens - span)
    return starts


def gather(stream: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    """Read the windows beginning at ``starts`` in one vectorized memmap read. (B, span) int64."""
    idx = starts[:, None] + np.arange(span, dtype=np.int64)[None, :]
    return stream[idx].astype(np.int64)


class Loader:
    """Batches of windows in a seeded random order per epoch, resumable from ``(epoch, pos)``.

    With ``world_size > 1`` each rank reads a disjoint share of every epoch's order.
    """

    def __init__(self, stream: np.ndarray, starts: np.ndarray, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(starts) == 0:
            raise MiniLLMError("no training windows: the corpus is shorter than one block")
        self.stream, self.starts, self.span = stream, starts, block_size + 1
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))
        return perm[self.rank :: self.world_size]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order)

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.pos / max(1, len(self._order))

    def next_indices(self) -> np.ndarray:
        out: list[np.ndarray] = []
        need = self.batch_size
        while need:
            take = self._order[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return np.concatenate(out)

    def next_batch(self) -> np.ndarray:
        return gather(self.stream, self.starts[self.next_indices()], self.span)  # (B, T+1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)


class Prefetcher:
    """Prepares the next batches in a background thread (pinned memory on CUDA), so the GPU never waits.
    Yields ``(batch, loader_state_after_it)`` so a checkpoint records exactly what was consumed."""

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
            self._q.put(e)

    def next(self):
        if not self.threaded:
            return self._make()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


def val_windows(stream: np.ndarray, block_size: int, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """Fixed validation batches: non-overlapping windows spread evenly over the validation stream."""
    starts = window_starts(len(stream), block_size, block_size)
    if len(starts) == 0:
        raise MiniLLMError(
            f"the validation documents hold {len(stream)} tokens, fewer than one block of {block_size + 1}; "
            f"use a smaller --block-size (e.g. {max(16, 2 ** int(np.log2(max(2, len(stream) // 2))))}), "
            f"a larger --val-fraction, or --val-file"
        )
    n = min(len(starts), batch_size * n_batches)
    pick = starts[np.linspace(0, len(starts) - 1, n).round().astype(np.int64)]
    return [gather(stream, pick[i : i + batch_size], block_size + 1) for i in range(0, n, batch_size)]


@dataclass
class RunData:
    """What the trainer needs from the data: a loader, fixed validation batches and facts to record."""

    loader: Loader
    val_batches: list[np.ndarray]
    vocab_size: int
    doc_id: int
    val_doc_ids: list[int]
    meta: dict[str, Any]  # recorded under "data" in the run's config.json (resume refuses changes)


def prepare_data(tokenizer: Path, corpus: Path, cache_dir: Path, block_size: int, tcfg,
                 val_file: Path | None = None) -> RunData:
    """Encode (or reuse) the token cache, split train/validation by document, and build the loader."""
    cache = build_token_cache(tokenizer, corpus, cache_dir)
    if val_file:
        vcache = build_token_cache(tokenizer, val_file, cache_dir / "val")
        val_ids = np.zeros(0, dtype=np.int64)
        train_stream = write_stream(cache, np.arange(cache.n_docs), cache_dir / "train.bin")
        val_stream = write_stream(vcache, np.arange(vcache.n_docs), cache_dir / "val.bin")
    else:
        val_ids = split_documents(cache.n_docs, tcfg.val_fraction, tcfg.seed)
        train_ids = np.setdiff1d(np.arange(cache.n_docs), val_ids)
        train_stream = write_stream(cache, train_ids, cache_dir / "train.bin")
        val_stream = write_stream(cache, val_ids, cache_dir / "val.bin")
    starts = window_starts(len(train_stream), block_size, tcfg.stride or block_size)
    if len(starts) == 0:
        n = len(train_stream)
        raise MiniLLMError(
            f"the training documents hold {n} tokens, fewer than one block of {block_size + 1}; use "
            f"--block-size {max(8, 2 ** int(np.log2(max(2, n // 4))))} --stride "
            f"{max(4, 2 ** int(np.log2(max(2, n // 8))))} or a larger corpus"
        )
    val_batches = val_windows(val_stream, block_size, tcfg.batch_size, tcfg.eval_batches)
    loader = Loader(train_stream, starts, block_size, tcfg.batch_size, tcfg.seed)
    meta = {"corpus_sha256": cache.meta["corpus_sha256"], "corpus": str(corpus),
            "val_file": str(val_file) if val_file else None, "n_docs": cache.n_docs,
            "train_tokens": int(len(train_stream))}
    return RunData(loader, val_batches, int(cache.meta["vocab_size"]), int(cache.meta["doc_id"]),
                   val_ids.tolist(), meta)


def cache_dir_for(outdir: Path, cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(outdir) / "cache"
