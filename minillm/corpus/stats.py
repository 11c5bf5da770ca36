"""analyze-corpus: statistics of a corpus file (streamed), the windows ``train`` builds from its documents,
and the report of both with the recommendations (``minillm.plan``'s, a ``Recommendation`` or alike: this
layer knows no planner).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minillm.corpus.read import DOC, batch_documents, check_input_file, iter_documents
from minillm.errors import MiniLLMError

BYTES_PER_TOKEN = 4.0  # estimate without --tokenizer: a BPE of 8k-32k tokens on European-language text
NEAR_EMPTY_CHARS = 16  # a document shorter than this (stripped) counts as near-empty
DISTINCT_CAP = 2_000_000  # beyond this many distinct words, count a hash-sampled subset (estimate)
BATCH_CHARS = 1 << 20


@dataclass
class CorpusStats:
    """What one pass over the corpus measured."""

    path: str
    bytes: int = 0
    characters: int = 0
    words: int = 0  # whitespace-separated
    documents: int = 0
    distinct_words: int = 0
    distinct_exact: bool = True  # False when the vocabulary was too large and distinct_words is an estimate
    duplicate_documents: int = 0  # exact repeats of an earlier document
    near_empty_documents: int = 0  # fewer than 16 characters
    tokens_estimated: bool = True  # lengths from bytes / 4 (no --tokenizer)
    lengths: array = field(default_factory=lambda: array("I"), repr=False)  # tokens per document
    seconds: float = 0.0

    @property
    def total_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def training_tokens(self) -> int:
        return training_tokens(self.lengths)

    @property
    def type_token_ratio(self) -> float:
        return self.distinct_words / self.words if self.words else 0.0


class _Vocab:
    """Distinct words, exact up to DISTINCT_CAP, then estimated by keeping words whose hash falls in
    a shrinking fraction (adaptive hash sampling): memory stays bounded on any corpus."""

    def __init__(self) -> None:
        self.words: set[str] = set()
        self.level = 0  # keep words with hash % 2**level == 0

    def update(self, words: list[str]) -> None:
        if self.level == 0:
            self.words.update(words)
        else:
            mask = (1 << self.level) - 1
            self.words.update(w for w in words if not hash(w) & mask)
        while len(self.words) > DISTINCT_CAP:
            self.level += 1
            mask = (1 << self.level) - 1
            self.words = {w for w in self.words if not hash(w) & mask}

    @property
    def count(self) -> int:
        return len(self.words) << self.level


def analyze(path: Path, separator: str = DOC, tokenizer=None) -> CorpusStats:
    """One streaming pass: sizes, words, vocabulary, duplicates, and tokens per document (encoded with
    ``tokenizer`` on a background thread while this one counts words, or estimated from bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    check_input_file(path, "--corpus", "create it with `minillm prepare-corpus`")
    t0 = time.perf_counter()
    s = CorpusStats(path=str(path), tokens_estimated=tokenizer is None)
    vocab = _Vocab()
    seen: set[int] = set()
    encode = getattr(tokenizer, "encode_batch_fast", None) or getattr(tokenizer, "encode_batch", None)

    def token_lengths(batch: list[str]) -> list[int]:
        return [len(e.ids) for e in encode(batch, add_special_tokens=False)]

    pending = None
    with ThreadPoolExecutor(1) as pool:
        for batch in batch_documents(iter_documents(path, separator), BATCH_CHARS):
            fut = pool.submit(token_lengths, batch) if tokenizer is not None else None
            for doc in batch:
                nb = len(doc.encode("utf-8"))
                s.characters += len(doc)
                words = doc.split()
                s.words += len(words)
                vocab.update(words)
                h = hash(doc)
                if h in seen:
                    s.duplicate_documents += 1
                else:
                    seen.add(h)
                if len(doc.strip()) < NEAR_EMPTY_CHARS:
                    s.near_empty_documents += 1
                if fut is None:
                    s.lengths.append(max(1, round(nb / BYTES_PER_TOKEN)))
            s.documents += len(batch)
            if pending is not None:
                s.lengths.extend(pending.result())
            pending = fut
        if pending is not None:
            s.lengths.extend(pending.result())
    if s.documents == 0:
        raise MiniLLMError(f"{path} holds no documents; check --separator or run `minillm prepare-corpus`")
    s.distinct_words = vocab.count
    s.distinct_exact = vocab.level == 0
    s.bytes = path.stat().st_size
    s.seconds = time.perf_counter() - t0
    return s


# ---------------------------------------------------------------- windows


def training_tokens(lengths: Sequence[int]) -> int:
    """The tokens ``train`` reads from documents of these lengths: each one's tokens and its ``<|doc|>``."""
    return int(sum(lengths)) + len(lengths)


def expected_windows(lengths: Sequence[int], block_size: int, stride: int) -> int:
    """Training windows (block_size + 1 tokens each) that ``train`` builds from documents of these lengths
    when all of them train (``--val-file``): each is ``<|doc|>`` + its tokens, laid end to end, and the
    windows are ``data.windows.window_starts``'s, the one rule train uses."""
    import numpy as np

    from minillm.data.windows import window_starts

    sizes = np.asarray(lengths, dtype=np.int64) + 1
    starts = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return len(window_starts(int(sizes.sum()), block_size, stride, starts))


# ---------------------------------------------------------------- reporting


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(lengths, dtype=np.int64)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "median": round(float(np.median(a)), 1),
        "p90": round(float(np.percentile(a, 90)), 1),
        "max": int(a.max()),
    }


def report(stats: CorpusStats, rec: Any) -> dict:
    """The --json document (documented in docs/FORMATS.md)."""
    d = {k: v for k, v in asdict(stats).items() if k != "lengths"}
    d["seconds"] = round(stats.seconds, 3)
    d["type_token_ratio"] = round(stats.type_token_ratio, 5)
    d["tokens"] = {"total": stats.total_tokens, "training": stats.training_tokens, "estimated": stats.tokens_estimated,
                   **length_summary(stats.lengths)}
    return {"format": 1, **d, "recommendations": rec.to_dict()}


LABELS = {
    "es": ("Tokens totales", "Documentos encontrados", "Longitud promedio", "mínima", "máxima",
           "Block size sugerido", "Stride sugerido", "solapamiento", "tokens", "(estimado)"),
    "en": ("Total tokens", "Documents found", "Average length", "min", "max",
           "Suggested block size", "Suggested stride", "overlap", "tokens", "(estimated)"),
}


def summary_lines(stats: CorpusStats, rec: Any, lang: str = "es") -> list[str]:
    """The three summary lines of the original tool, in Spanish or English."""
    if lang not in LABELS:
        raise MiniLLMError(f"--lang {lang!r}: use es or en")
    tot, docs, avg, mn, mx, bs, st, ov, tk, est = LABELS[lang]
    ls = length_summary(stats.lengths)
    overlap = round(100 * (rec.block_size - rec.stride) / rec.block_size)
    e = f" {est}" if stats.tokens_estimated else ""
    return [
        f"{tot}: {stats.total_tokens:,}{e}   {docs}: {stats.documents:,}",
        f"{avg}: {ls['mean']:,.0f} {tk}   {mn}: {ls['min']:,}   {mx}: {ls['max']:,}",
        f"{bs}: {rec.block_size}   {st}: {rec.stride} ({overlap}% {ov})",
    ]


def render_table(stats: CorpusStats, rec: Any):
    """A rich Table of the statistics and the recommendations with their reasons."""
    from rich.table import Table

    t = Table(title=f"corpus {stats.path}", show_lines=False)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("note")
    ls = length_summary(stats.lengths)
    rows = [
        ("bytes", f"{stats.bytes:,}", ""),
        ("characters", f"{stats.characters:,}", ""),
        ("words", f"{stats.words:,}", "whitespace-separated"),
        ("documents", f"{stats.documents:,}", ""),
        ("tokens", f"{stats.total_tokens:,}", "estimated: bytes / 4" if stats.tokens_estimated else "from --tokenizer"),
        ("training tokens", f"{stats.training_tokens:,}", "tokens + one <|doc|> per document"),
        ("doc tokens min/mean/median", f"{ls['min']:,} / {ls['mean']:,.0f} / {ls['median']:,.0f}", ""),
        ("doc tokens p90/max", f"{ls['p90']:,.0f} / {ls['max']:,}", ""),
        ("distinct words", f"{stats.distinct_words:,}", "" if stats.distinct_exact else "estimated (large vocabulary)"),
        ("type/token ratio", f"{stats.type_token_ratio:.4f}", ""),
        ("duplicate documents", f"{stats.duplicate_documents:,}", "exact repeats"),
        ("near-empty documents", f"{stats.near_empty_documents:,}", f"< {NEAR_EMPTY_CHARS} characters"),
    ]
    for r in rows:
        t.add_row(*r)
    t.add_section()
    model = rec.preset if rec.preset != "custom" else f"custom: n_layer {rec.n_layer}, n_embd {rec.n_embd}, n_head {rec.n_head}"
    for name, value, key in [
        ("block size", str(rec.block_size), "block_size"),
        ("stride", str(rec.stride), "stride"),
        ("model", f"{model} ({rec.params / 1e6:.1f}M)", "model"),
        ("epochs", f"{rec.epochs:g}", "epochs"),
        ("vocabulary size", f"{rec.vocab_size:,}", "vocab_size"),
        ("training windows", f"{rec.windows:,}", "windows"),
    ]:
        t.add_row(f"[bold]suggested {name}[/bold]", value, rec.reasons[key])
    return t


def fmt_count(x: float, _pos: object = None) -> str:
    """A tick label for a count at any scale: 0, 500, 1.5k, 250k, 1.2M, 3B (at most 3 significant digits)."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def plot_lengths(lengths: Sequence[int], path: Path, estimated: bool, block_size: int | None = None) -> None:
    """Histogram of document lengths in tokens (log-spaced bins from the shortest document's order of
    magnitude), the median and the suggested ``block_size`` marked, written atomically as a PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    from minillm.io import atomic_open

    a = np.asarray(lengths, dtype=np.int64)
    lo_decade = 10.0 ** math.floor(math.log10(max(1, int(a.min()))))
    hi = max(int(a.max()), 2 * lo_decade)
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(a, bins=np.unique(np.geomspace(lo_decade, hi + 1, 50).astype(int)), color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlim(lo_decade, hi * 1.1)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(fmt_count))
    ax.set_xlabel("document length (tokens" + (", estimated)" if estimated else ")"))
    ax.set_ylabel("documents")
    ax.axvline(float(np.median(a)), color="tab:orange", label=f"median {np.median(a):,.0f}")
    if block_size:
        ax.axvline(block_size, color="tab:green", ls="--", label=f"suggested block size {block_size:,}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(Path(path), "wb") as f:
        fig.savefig(f, format="png", dpi=100)
