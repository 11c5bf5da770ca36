"""prepare-corpus: read inputs, clean documents on every core, deduplicate, write atomically.

Memory stays bounded: documents stream from the inputs in batches, at most a few batches are in
flight per worker, and the only thing that grows is the dedup index (one 64-bit hash per kept
document for exact dedup; MinHash LSH buckets, about 1-2 KB per document, with ``--near-dedup``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minillm.corpus.clean import CleanOptions, CleanResult, clean_batch
from minillm.corpus.read import (
    DOC_JOIN,
    FileInfo,
    ReadOptions,
    batch_documents,
    check_head,
    find_inputs,
    is_jsonl,
    read_documents,
    validate_encoding,
)
from minillm.corpus.workers import ordered_map
from minillm.errors import MiniLLMError, UsageError

BATCH_CHARS = 1 << 20  # characters per unit of work sent to a worker
BATCH_DOCS = 2000
NUM_PERM = 128
SMALL_INPUT = 4_000_000  # bytes of text under which --workers 0 cleans in-process
PACKED_RATIO = 4  # text bytes per byte assumed of a compressed input whose size is not recorded (.bz2, .xz, .zst)


@dataclass(frozen=True)
class DedupOptions:
    """Which duplicates are removed."""

    exact: bool = True  # drop documents whose whitespace-normalized text was seen before
    near: bool = False  # drop near-duplicates (MinHash + LSH on word 3-grams)
    threshold: float = 0.8  # estimated Jaccard similarity at which a document counts as a near-duplicate


@dataclass
class PrepareSummary:
    """What prepare-corpus did (printed as a table, or as JSON with --json)."""

    output: str
    files: int = 0
    files_skipped: int = 0  # directory entries without a text extension
    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0  # bytes read from the inputs (decompressed)
    bytes_out: int = 0
    removed: dict[str, int] = field(default_factory=lambda: {"empty": 0, "too_short": 0, "duplicate": 0, "near_duplicate": 0})
    repaired_by_ftfy: int = 0  # documents ftfy changed
    special_rewritten: int = 0  # special-token strings rewritten to read as text
    long_documents_split: int = 0  # documents over 8M characters cut at a blank line
    fallback_files: list[dict] = field(default_factory=list)  # files read as cp1252 (not valid UTF-8)
    workers: int = 1
    seconds: float = 0.0
    mb_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _clean_stream(
    batches: Iterator[list[str]], opts: CleanOptions, dedup: bool, num_perm: int, workers: int
) -> Iterator[list[CleanResult]]:
    """Clean batches in order, on ``workers`` processes, with at most 2 batches in flight per worker; closing the
    stream (or a signal while it runs) stops the workers at once."""
    if workers <= 1:
        return (clean_batch(b, opts, dedup, num_perm) for b in batches)
    return ordered_map(clean_batch, ((b, opts, dedup, num_perm) for b in batches), workers)


class _NearDedup:
    def __init__(self, threshold: float, num_perm: int):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise MiniLLMError(
                "--near-dedup needs the datasketch package: pip install 'minillm[dedup]' (or pip install datasketch)"
            ) from None
        self._minhash = MinHash
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.n = 0

    def seen(self, signature) -> bool:
        """True when a near-duplicate was kept before; otherwise index this document and return False."""
        values, scheme = signature
        m = self._minhash(num_perm=self.num_perm, hashvalues=values, **({"scheme": scheme} if scheme else {}))
        if self.lsh.query(m):
            return True
        self.lsh.insert(self.n, m, check_duplication=False)
        self.n += 1
        return False


def validate_paths(inputs: list[Path], output: Path, log: Callable[[str], None] = lambda s: None) -> tuple[list[Path], int]:
    """Expand the inputs and refuse an output that is one of them (before anything is written)."""
    files, skipped = find_inputs(inputs, log)
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory; name a file, e.g. {out / 'corpus.txt'}")
    out_real = os.path.realpath(out)
    for f in files:
        if os.path.realpath(f) == out_real or (out.exists() and os.path.samefile(f, out)):
            raise UsageError(f"--output {out} is also an input; write the cleaned corpus to another file")
    return files, skipped


def _nothing_left(s: PrepareSummary, clean: CleanOptions) -> str:
    """Why no document survived: which filter removed how many, and what to change."""
    if s.documents_in == 0:
        return (f"the inputs hold no documents (empty files, or only separator lines); nothing was written "
                f"to {s.output}")
    fixes = {"empty": "they are empty after cleaning", "too_short": f"shorter than --min-chars {clean.min_chars}",
             "duplicate": "exact duplicates (--no-dedup keeps them)",
             "near_duplicate": "near-duplicates (drop --near-dedup or raise --dedup-threshold)"}
    why = "; ".join(f"{n} {fixes[k]}" for k, n in s.removed.items() if n)
    return (f"every one of the {s.documents_in} documents was removed ({why}); nothing was written to {s.output}"
            + ("; lower --min-chars" if s.removed.get("too_short") else ""))


def text_size(path: Path) -> int:
    """About how many bytes of text a file holds: a ``.gz`` file's trailer records it (modulo 4 GiB, so never
    less than the compressed size is assumed); other compressed files count ``PACKED_RATIO`` times their size."""
    size = path.stat().st_size
    name = path.name.lower()
    if name.endswith(".gz") and size >= 18:  # 10-byte header, 8-byte trailer: CRC32, then the size
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return max(size, int.from_bytes(f.read(4), "little"))
    return size * PACKED_RATIO if name.endswith((".bz2", ".xz", ".zst")) else size


def _single_document_note(s: PrepareSummary, read: ReadOptions, files: list[Path]) -> str | None:
    """What to do when the text became one document (a validation split and ``train`` need at least 2)."""
    if s.documents_out != 1 or all(is_jsonl(f) for f in files):
        return None
    what = f"{files[0]}" if len(files) == 1 else f"the {len(files)} files"
    head = f"{what} became a single document of {s.bytes_out / 1e6:.1f} MB"
    if read.split_on_blank_lines:
        return (f"{head}: it holds no blank line and no {read.separator} line; put one between documents "
                f"(articles, chapters, paragraphs): train needs at least 2")
    return (f"{head}: documents end at {read.separator} lines (--separator); if blank lines separate yours "
            f"(paragraphs, articles), run again with --split-on-blank-lines")


def prepare_corpus(
    inputs: list[Path],
    output: Path,
    read: ReadOptions = ReadOptions(),
    clean: CleanOptions = CleanOptions(),
    dedup: DedupOptions = DedupOptions(),
    workers: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> PrepareSummary:
    """Clean ``inputs`` into one corpus file at ``output`` (documents separated by ``<|doc|>`` lines)."""
    from minillm.io import atomic_open

    if not 0.0 < dedup.threshold <= 1.0:
        raise UsageError(f"--dedup-threshold {dedup.threshold} must be in (0, 1]; 0.8 is a common choice")
    if clean.min_chars < 0:
        raise UsageError(f"--min-chars {clean.min_chars} must be >= 0")
    if not read.separator or "\n" in read.separator:
        raise UsageError("--separator must be a non-empty single line, e.g. '<|doc|>'")
    if workers < 0:
        raise UsageError(f"--workers {workers} must be >= 0 (0 means one per CPU core)")
    validate_encoding(read.encoding)
    files, skipped = validate_paths(inputs, output, log)
    if workers == 0:  # one per core, but not worth starting processes for a few megabytes
        small = sum(map(text_size, files)) < SMALL_INPUT
        workers = 1 if small else (os.cpu_count() or 1)
    for f in files:
        check_head(f, read.encoding)
    near = _NearDedup(dedup.threshold, NUM_PERM) if dedup.near else None

    s = PrepareSummary(output=str(output), files=len(files), files_skipped=skipped, workers=workers)
    infos: list[FileInfo] = []
    seen: set[int] = set()
    t0 = time.perf_counter()

    def on_long() -> None:
        s.long_documents_split += 1

    def counted(docs: Iterator[str]) -> Iterator[str]:
        for d in docs:
            s.documents_in += 1
            yield d

    docs = counted(read_documents(files, read, infos, log, on_long))
    stream = _clean_stream(batch_documents(docs, BATCH_CHARS, BATCH_DOCS), clean, dedup.exact, NUM_PERM if near else 0, workers)
    sep = DOC_JOIN.encode()
    with atomic_open(output, "wb") as f, contextlib.closing(stream):  # workers stopped, then the temp file removed
        first = True
        for results in stream:
            for r in results:
                s.special_rewritten += r.n_special
                s.repaired_by_ftfy += r.repaired
                if r.reason:
                    s.removed[r.reason] += 1
                    continue
                if dedup.exact:
                    if r.key in seen:
                        s.removed["duplicate"] += 1
                        continue
                    seen.add(r.key)
                if near is not None and near.seen(r.minhash):
                    s.removed["near_duplicate"] += 1
                    continue
                data = r.text.encode("utf-8")
                if not first:
                    f.write(sep)
                    s.bytes_out += len(sep)
                f.write(data)
                s.bytes_out += len(data)
                s.documents_out += 1
                first = False
        if first:
            raise MiniLLMError(_nothing_left(s, clean))
        f.write(b"\n")
        s.bytes_out += 1
    s.bytes_in = sum(i.bytes for i in infos)
    s.fallback_files = [
        {"path": i.path, "encoding": i.encoding, "first_bad_byte": i.fallback_from_byte}
        for i in infos
        if i.fallback_from_byte is not None
    ]
    s.seconds = round(time.perf_counter() - t0, 3)
    s.mb_per_s = round(s.bytes_in / 1e6 / max(s.seconds, 1e-9), 2)
    note = _single_document_note(s, read, files)
    if note:
        log(note)
    return s
