"""The split and the one window rule (minillm.data.windows): windows cover every token and cross into
another document only through its <|doc|>, start at documents where cheap; analyze-corpus counts the
windows train builds."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.data import windows as ds
from tests.conftest import events, make_corpus


def _stream(doc_lens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A stream of documents (<|doc|> = 0, then tokens tagged with the doc's index + 1)."""
    parts = [np.concatenate([[0], np.full(n - 1, i + 1)]) for i, n in enumerate(doc_lens)]
    starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]]).astype(np.int64)
    return np.concatenate(parts).astype(np.int64), starts


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(2, 64), st.integers(1, 64))
def test_windows_cover_every_token_and_cross_documents_only_through_doc(doc_lens, block, stride):
    stride = min(stride, block)
    stream, doc_starts = _stream(doc_lens)
    starts = ds.window_starts(len(stream), block, stride, doc_starts)
    if len(stream) < block + 1:
        assert len(starts) == 0
        return
    gaps = np.diff(starts)
    assert starts[0] == 0 and starts[-1] == len(stream) - block - 1
    assert (gaps > 0).all() and (gaps <= stride).all()
    assert len(starts) <= len(stream) / stride * 4 / 3 + 2  # alignment costs at most a third more windows
    covered = np.zeros(len(stream), dtype=bool)
    for s in starts:
        covered[s : s + block + 1] = True
    assert covered.all()
    # a window that moves into another document does so through that document's <|doc|>
    w = ds.gather(stream, starts, block + 1)
    doc_of = np.searchsorted(doc_starts, starts[:, None] + np.arange(block + 1), side="right") - 1
    change = np.diff(doc_of, axis=1) != 0
    assert (w[:, 1:][change] == 0).all() and (w[:, 1:][~change] != 0).all()


def test_windows_start_at_documents_when_cheap():
    stream, doc_starts = _stream([57] * 50)  # short documents, block 64: packed, each window at a <|doc|>
    starts = ds.window_starts(len(stream), 64, 64, doc_starts)
    assert np.isin(starts[:-1], doc_starts).all() and len(starts) == 50
    stream, doc_starts = _stream([8] * 400)  # tiny ones: a window moves back at most 8 tokens to align
    starts = ds.window_starts(len(stream), 64, 64, doc_starts)
    assert np.isin(starts[:-1], doc_starts).all() and len(starts) <= 3200 // 56 + 2
    stream, doc_starts = _stream([1000, 700])  # long documents: cut stride apart, the next starts aligned
    starts = ds.window_starts(len(stream), 128, 96, doc_starts)
    assert list(starts[:11]) == [0, 96, 192, 288, 384, 480, 576, 672, 768, 864, 960] and 1000 in starts




# ---------------------------------------------------------------- analyze-corpus counts what train builds


def test_analyze_corpus_counts_the_windows_train_builds(tmp_path, tokenizer_path, runner):
    """analyze-corpus --tokenizer reports the training windows at its suggested block size and stride; train
    on the same corpus (all of it: --val-file), block size and stride builds exactly that many."""
    from minillm.cli import app

    corpus = make_corpus(tmp_path / "c.txt", n_docs=80, words_per_doc=(2, 150), seed=4)  # short ones pack
    val = make_corpus(tmp_path / "v.txt", n_docs=6, seed=9)
    r = runner.invoke(app, ["analyze-corpus", "-c", str(corpus), "-t", str(tokenizer_path), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["recommendations"]
    assert rec["stride"] < rec["block_size"]  # scarce data: overlapping windows, the case the rules differed on
    r = runner.invoke(app, ["train", "-t", str(tokenizer_path), "-c", str(corpus), "--val-file", str(val),
                            "-o", str(tmp_path / "run"), "--block-size", str(rec["block_size"]), "--stride",
                            str(rec["stride"]), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size",
                            "2", "--max-steps", "1", "--eval-batches", "1", "--device", "cpu", "--compile", "off",
                            "--log-format", "json"])
    assert r.exit_code == 0, r.output
    assert events(r.stderr, "run")[0]["windows"] == rec["windows"]

