"""The train/validation split and THE window rule: which ``block_size + 1``-token windows of a stream of
documents are training examples (``window_starts``; analyze-corpus counts with it too) and which are the
fixed validation windows (``val_starts``). Pure functions of token counts: no files, no tokenizer.

The split is by document: document ``i`` goes to validation when a seeded splitmix64 hash of ``i``
falls below ``val_fraction`` (see ``split_documents``; it does not depend on the text). Each split's
documents are laid end to end in a stream; an example is a window of ``block_size + 1`` tokens.
Windows are aligned to documents (``window_starts``): each starts at a document's ``<|doc|>`` where
that costs little overlap (see there); long documents are cut into windows ``stride`` apart;
short ones are packed. A window crosses into another document only through that document's
``<|doc|>`` token, which ``segment_ids`` in the model turns into a boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minillm.errors import MiniLLMError

ALIGN_SLACK = 4  # a window moves back to a document start when that costs at most 1/ALIGN_SLACK overlap


def hash_unit(i: np.ndarray, seed: int) -> np.ndarray:
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
    u = hash_unit(np.arange(n_docs), seed)
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


def val_starts(stream: Stream, block_size: int, n: int) -> np.ndarray:
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


def gather(stream: np.ndarray, starts: np.ndarray, span: int) -> np.ndarray:
    """Read the windows beginning at ``starts`` in one vectorized memmap read. (B, span) int64."""
    idx = starts[:, None] + np.arange(span, dtype=np.int64)[None, :]
    return stream[idx].astype(np.int64)
