"""The corpus figures a plan needs, read fast: every document's size in one streaming pass, and the bytes
per token of the given tokenizer from an evenly spread sample of documents (never the whole corpus)."""

from __future__ import annotations

from pathlib import Path

from minillm.corpus.read import DOC, check_input_file, iter_documents
from minillm.errors import MiniLLMError
from minillm.plan.rules import CorpusFigures

SAMPLE_BYTES = 1 << 20  # bytes of documents encoded to measure the tokenizer's bytes per token


def corpus_figures(path: Path, tokenizer=None, separator: str = DOC) -> CorpusFigures:
    """Sizes of ``path``'s documents, and with ``tokenizer`` (a ``tokenizers.Tokenizer``) its vocabulary and
    bytes per token measured on about ``SAMPLE_BYTES`` of documents taken evenly through the corpus."""
    check_input_file(path, "--corpus", "create it with `minillm prepare-corpus`")
    sizes = [len(d.encode("utf-8")) for d in iter_documents(path, separator)]
    if not sizes:
        raise MiniLLMError(f"{path} holds no documents; check --separator or run `minillm prepare-corpus`")
    total = path.stat().st_size
    if tokenizer is None:
        return CorpusFigures(total, len(sizes), sizes)
    every = max(1, round(sum(sizes) / SAMPLE_BYTES))
    sample = [d for i, d in enumerate(iter_documents(path, separator)) if i % every == 0]
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(sample, add_special_tokens=False))
    nbytes = sum(len(d.encode("utf-8")) for d in sample)
    return CorpusFigures(total, len(sizes), sizes, tokenizer.get_vocab_size(), nbytes / max(tokens, 1))


def figures_from_stats(stats, vocab_size: int | None = None) -> CorpusFigures:
    """The figures of an ``analyze-corpus`` pass (``corpus.stats.CorpusStats``): with its tokens counted by a
    tokenizer of ``vocab_size``, those counts; estimated (bytes / 4), only the documents' bytes (the planner
    estimates tokens for the vocabulary it picks)."""
    if stats.tokens_estimated:
        return CorpusFigures(stats.bytes, stats.documents, [n * 4.0 for n in stats.lengths])
    bpt = stats.bytes / max(stats.total_tokens, 1)
    return CorpusFigures(stats.bytes, stats.documents, [n * bpt for n in stats.lengths], vocab_size, bpt,
                         list(stats.lengths))
