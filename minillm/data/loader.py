"""The batch loader (seeded, resumable, sharded across ranks, mixing several corpora by weight), its
prefetching thread, ``--corpus``/``--mix`` parsing and ``prepare_data``: everything ``train`` and
``finetune --mode continue`` need from the data. The token cache is ``data.cache``; the split and the
window rule are ``data.windows``.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data.cache import build_token_cache, stderr_note, write_stream
from minillm.data.windows import gather, hash_unit, split_documents, val_starts, window_starts
from minillm.errors import MiniLLMError, UsageError

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
            src = np.searchsorted(self._cum, hash_unit(glob, self.seed ^ 0x5EED), side="right")
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



# ---------------------------------------------------------------- mixtures and the run's data


@dataclass(frozen=True)
class Mixture:
    """The training corpora (``--corpus``, repeatable), each window's source drawn by weight (``--mix 0.7,0.3``).
    ``weights`` None: proportional to each corpus's training windows (as if concatenated). One corpus
    without ``--mix`` is a mixture of one that is ``single``: its cache and records are a plain corpus's."""

    corpora: tuple[Path, ...]
    weights: tuple[float, ...] | None = None

    def __str__(self) -> str:
        if self.weights is None:
            return " + ".join(map(str, self.corpora))
        return " + ".join(f"{p} ({w:g})" for p, w in zip(self.corpora, self.weights, strict=True))

    @property
    def single(self) -> bool:
        """One corpus without weights: the cache is ``--cache-dir`` itself (not ``source0/``) and config.json
        records ``corpus`` as a path, as for every run before mixtures."""
        return len(self.corpora) == 1 and self.weights is None

    @classmethod
    def parse(cls, corpora: Sequence[Path], mix: str | None) -> Mixture:
        """Resolve ``--corpus`` (repeatable) and ``--mix``."""
        corpora = tuple(Path(p) for p in corpora)
        if not corpora:
            raise UsageError("--corpus: give at least one corpus file")
        if mix is None:
            return cls(corpora)
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


def prepare_data(tokenizer: Path, corpus: Mixture, cache_dir: Path, block_size: int, tcfg,
                 val_file: Path | None = None, rank: int = 0, world_size: int = 1,
                 note: Callable[[str], None] = stderr_note) -> RunData:
    """Encode (or reuse) the token cache of each corpus, split train/validation by document, and build
    the loader. ``note`` says when a damaged cache is rebuilt."""
    mixed = not corpus.single  # one corpus without --mix: the plain layout and records
    corpora = corpus.corpora
    cache_dir = Path(cache_dir)
    stride = tcfg.stride or block_size
    n_val = tcfg.batch_size * tcfg.eval_batches
    sources, vals, infos, caches = [], [], [], []
    for i, path in enumerate(corpora):
        cdir = cache_dir / f"source{i}" if mixed else cache_dir
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
    if mixed:
        weights = corpus.weights or tuple(len(s.starts) / sum(len(t.starts) for t in sources) for s in sources)
        sources = [Source(s.name, s.tokens, s.starts, w) for s, w in zip(sources, weights, strict=True)]
        for info, w in zip(infos, weights, strict=True):
            info["weight"] = round(float(w), 6)
    if val_file:
        vcache = build_token_cache(tokenizer, val_file, cache_dir / "val", note=note)
        vstream = write_stream(vcache, np.arange(vcache.n_docs), cache_dir / "val" / "val.bin", note)
        picks = [(vstream, val_starts(vstream, block_size, n_val))]
    else:  # each corpus contributes validation windows in proportion to its weight
        shares = [max(1, round(n_val * s.weight)) for s in sources] if mixed else [n_val]
        picks = [(v, val_starts(v, block_size, k)) for v, k in zip(vals, shares, strict=True)]
    rows = np.concatenate([gather(v.tokens, st, block_size + 1) for v, st in picks])
    val_batches = [rows[i : i + tcfg.batch_size] for i in range(0, len(rows), tcfg.batch_size)]
    loader = Loader(None, None, block_size, tcfg.batch_size, tcfg.seed, rank, world_size, sources=sources)
    meta: dict[str, Any] = {
        "corpus_sha256": infos[0]["corpus_sha256"] if not mixed else [x["corpus_sha256"] for x in infos],
        "corpus": str(corpora[0]) if not mixed else [str(p) for p in corpora],
        "val_file": str(val_file) if val_file else None, "n_docs": sum(x["n_docs"] for x in infos),
        "train_tokens": sum(x["train_tokens"] for x in infos), "windows": "document-aligned",
    }
    if mixed:
        meta["mixture"] = [{k: v for k, v in x.items() if k != "val_doc_ids"} for x in infos]
    val_doc_ids = [x["val_doc_ids"] for x in infos] if mixed else infos[0]["val_doc_ids"]
    return RunData(loader, val_batches, int(caches[0].meta["vocab_size"]), int(caches[0].meta["doc_id"]), val_doc_ids, meta)

