"""Token cache, split, document-aligned windows, mixing, DDP sharding and the resumable loader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.corpus.read import iter_documents
from minillm.data import loader as ds
from minillm.errors import UsageError
from minillm.tokenizer import DOC, load_tokenizer, save_tokenizer, train_tokenizer
from tests.conftest import make_corpus


def _tcfg(**kw):
    base = dict(stride=0, val_fraction=0.2, seed=3, batch_size=4, eval_batches=2)
    return SimpleNamespace(**{**base, **kw})


def test_cache_holds_every_document_after_doc(tmp_path, corpus, tokenizer_path):
    cache = ds.build_token_cache(tokenizer_path, corpus, tmp_path / "cache", batch_chars=500)  # many batches
    tok = load_tokenizer(tokenizer_path)
    docs = list(iter_documents(corpus))
    d = tok.token_to_id(DOC)
    expect = np.concatenate([[d, *tok.encode(t, add_special_tokens=False).ids] for t in docs])
    assert cache.tokens.dtype == np.uint16 and cache.n_docs == len(docs)
    assert np.array_equal(np.asarray(cache.tokens), expect)
    assert np.array_equal(np.flatnonzero(expect == d), cache.doc_starts[:-1])


def test_long_document_is_encoded_in_pieces_exactly(tmp_path, tokenizer_path):
    path = tmp_path / "long.txt"
    text = "".join(f"el rio {i}\n  y el mar\n\nla tierra\n" for i in range(300))
    path.write_text(text + "\n<|doc|>\ncorto\n", encoding="utf-8")
    cache = ds.build_token_cache(tokenizer_path, path, tmp_path / "c", batch_chars=700)
    tok = load_tokenizer(tokenizer_path)
    d = tok.token_to_id(DOC)
    whole = [d, *tok.encode(text.strip("\n"), add_special_tokens=False).ids, d, *tok.encode("corto").ids]
    assert cache.n_docs == 2 and np.array_equal(np.asarray(cache.tokens), whole)


def test_cache_rebuilt_when_tokenizer_or_corpus_change_reused_otherwise(tmp_path, corpus, tokenizer_path, monkeypatch):
    calls = []
    real = ds.encode_pieces
    monkeypatch.setattr(ds, "encode_pieces", lambda *a: calls.append(1) or real(*a))
    cdir = tmp_path / "cache"
    ds.build_token_cache(tokenizer_path, corpus, cdir)
    n = len(calls)
    assert n > 0
    ds.build_token_cache(tokenizer_path, corpus, cdir)
    assert len(calls) == n  # reused
    corpus.write_text(corpus.read_text() + "\n<|doc|>\nun documento nuevo\n", encoding="utf-8")
    c2 = ds.build_token_cache(tokenizer_path, corpus, cdir)
    assert len(calls) > n and c2.n_docs == 41
    n = len(calls)
    tok2 = train_tokenizer(iter_documents(corpus), 280)
    save_tokenizer(tok2, tokenizer_path)
    c3 = ds.build_token_cache(tokenizer_path, corpus, cdir)
    assert len(calls) > n and c3.meta["vocab_size"] == tok2.get_vocab_size()
    # the split streams follow the cache, even when the same document ids are selected
    s1 = ds.write_stream(c2, np.arange(5), tmp_path / "s.bin")
    s1_tokens = np.array(s1.tokens)
    s3 = ds.write_stream(c3, np.arange(5), tmp_path / "s.bin")
    assert not np.array_equal(s1_tokens, np.asarray(s3.tokens))
    assert np.array_equal(np.asarray(s3.tokens), np.asarray(c3.tokens[: c3.doc_starts[5]]))


def _big_vocab_tokenizer(path):
    """A byte-level BPE whose real tokens all have ids above 65535 (a vocabulary of 70,300)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<|filler{i}|>": i for i in range(70000)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([DOC, "<|pad|>"])
    save_tokenizer(tok, path)
    return tok


def test_uint32_path(tmp_path, corpus, tokenizer_path):
    tok = _big_vocab_tokenizer(tmp_path / "big.json")
    assert tok.get_vocab_size() > 65536
    cache = ds.build_token_cache(tmp_path / "big.json", corpus, tmp_path / "c")
    assert cache.tokens.dtype == np.uint32 and int(np.asarray(cache.tokens).min()) >= 65536
    docs = list(iter_documents(corpus))
    first = np.asarray(cache.tokens[cache.doc_starts[0] + 1 : cache.doc_starts[1]])
    assert tok.decode(first.tolist()) == docs[0]
    # forcing uint32 for a small vocabulary stores the same ids
    small = ds.build_token_cache(tokenizer_path, corpus, tmp_path / "s16")
    forced = ds.build_token_cache(tokenizer_path, corpus, tmp_path / "s32", dtype="uint32")
    assert forced.tokens.dtype == np.uint32 and np.array_equal(np.asarray(forced.tokens), np.asarray(small.tokens))
    with pytest.raises(Exception, match="does not fit uint16"):
        ds.build_token_cache(tmp_path / "big.json", corpus, tmp_path / "bad", dtype="uint16")


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


def test_segment_ids_follow_the_recorded_boundaries(tmp_path, corpus, tokenizer_path):
    torch = pytest.importorskip("torch")
    from minillm.model.gpt import segment_ids

    data = ds.prepare_data(tokenizer_path, corpus, tmp_path / "c", 32, _tcfg(stride=24))
    src = data.loader.sources[0]
    w = ds.gather(src.tokens, src.starts, 33)
    seg = segment_ids(torch.from_numpy(w), data.doc_id).numpy()
    is_doc = w == data.doc_id
    # positions restart exactly at each <|doc|> the window holds, nowhere else
    assert ((np.diff(seg, axis=1) != 0) == is_doc[:, 1:]).all()


def test_split_is_by_document_deterministic_and_nothing_leaks(tmp_path, corpus, tokenizer_path):
    val = ds.split_documents(40, 0.2, 3)
    assert np.array_equal(val, ds.split_documents(40, 0.2, 3)) and not np.array_equal(val, ds.split_documents(40, 0.2, 4))
    assert len(ds.split_documents(5, 1e-9, 0)) == 1 and len(ds.split_documents(2, 0.999, 0)) == 1
    data = ds.prepare_data(tokenizer_path, corpus, tmp_path / "c", 16, _tcfg())
    cache = ds.open_token_cache(tmp_path / "c")
    assert data.val_doc_ids == val.tolist()
    train_ids = [i for i in range(40) if i not in set(val.tolist())]
    expect = np.concatenate([cache.tokens[cache.doc_starts[i] : cache.doc_starts[i + 1]] for i in train_ids])
    train = np.asarray(data.loader.sources[0].tokens)
    assert np.array_equal(train, expect)
    # no validation document's text appears among the training documents
    docs = list(iter_documents(corpus))
    assert not {docs[i] for i in val} & {docs[i] for i in train_ids}
    assert data.meta["train_tokens"] == len(expect) and data.meta["n_docs"] == 40


def test_val_file_uses_all_documents_for_training(tmp_path, corpus, tokenizer_path):
    vf = make_corpus(tmp_path / "val.txt", n_docs=5, seed=9)
    data = ds.prepare_data(tokenizer_path, corpus, tmp_path / "c", 16, _tcfg(), val_file=vf)
    assert data.val_doc_ids == [] and data.meta["val_file"] == str(vf)
    assert len(data.loader.sources[0].tokens) == ds.open_token_cache(tmp_path / "c").n_tokens


def _loader(n_windows=37, batch=5, seed=1, rank=0, world=1, weights=None):
    span = 9
    stream = np.arange(n_windows * 8 + 1) % 60000
    if weights is None:
        return ds.Loader(stream, ds.window_starts(len(stream), 8, 8), 8, batch, seed, rank, world)
    sources = [ds.Source(f"s{i}", stream + 100_000 * i, np.arange(n_windows * (i + 1) // 2) * 8, w)
               for i, w in enumerate(weights)]
    assert span == 9
    return ds.Loader(None, None, 8, batch, seed, rank, world, sources=sources)


@pytest.mark.parametrize("weights", [None, (0.7, 0.3)])
def test_loader_resume_yields_the_uninterrupted_batches(weights):
    ref = _loader(weights=weights)
    want = [ref.next_batch() for _ in range(25)]
    a = _loader(weights=weights)
    got = [a.next_batch() for _ in range(11)]
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    b = _loader(weights=weights)
    b.load_state_dict(state)
    got += [b.next_batch() for _ in range(14)]
    assert all(np.array_equal(x, y) for x, y in zip(want, got, strict=True))
    assert not np.array_equal(want[0], want[8])  # epochs are reshuffled


def test_loader_epoch_order_is_seeded_and_complete():
    a = _loader(n_windows=40, batch=8)
    first = np.concatenate([a.next_batch()[:, 0] for _ in range(5)])
    assert sorted(first.tolist()) == list(range(0, 320, 8)) and a.epoch == 1 and a.pos == 0
    second = np.concatenate([a.next_batch()[:, 0] for _ in range(5)])
    assert sorted(second.tolist()) == sorted(first.tolist()) and not np.array_equal(first, second)
    again = _loader(n_windows=40, batch=8)
    assert np.array_equal(first, np.concatenate([again.next_batch()[:, 0] for _ in range(5)]))
    old = _loader(n_windows=40, batch=8)
    old.load_state_dict({"epoch": 1, "pos": 0})  # a format-1 checkpoint's state
    assert np.array_equal(old.next_batch()[:, 0], second[:8])


@pytest.mark.parametrize("weights", [None, (0.5, 0.5)])
def test_rank_shards_are_disjoint_and_their_union_is_the_single_process_epoch(weights):
    world, batch, steps = 3, 4, 9  # 108 windows read: more than an epoch of 37 (remainders flow on)
    single = _loader(batch=batch * world, weights=weights)
    ranks = [_loader(batch=batch, rank=r, world=world, weights=weights) for r in range(world)]
    assert ranks[0].windows_per_epoch == -(-sum(ranks[0].n_windows) // world)
    for _ in range(steps):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert Counter(map(bytes, np.concatenate(parts).astype(np.int64))) == Counter(map(bytes, whole))
        assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_mixing_proportions_without_replacement_and_source_epochs():
    lo = _loader(n_windows=40, batch=50, weights=(0.7, 0.3))  # sources of 20 and 40 windows: sizes don't matter
    n0, n1 = lo.n_windows
    batches = [lo.next_batch() for _ in range(40)]
    src = np.concatenate([b[:, 0] >= 100_000 for b in batches])
    assert abs(1 - src.mean() - 0.7) < 0.03
    # within a source, each run of n_s draws is a permutation of its windows
    firsts = np.concatenate([b[:, 0] for b in batches])
    s0 = firsts[firsts < 100_000]
    assert sorted(s0[:n0].tolist()) == list(range(0, 8 * n0, 8))
    assert sorted(s0[n0 : 2 * n0].tolist()) == list(range(0, 8 * n0, 8))
    ep = lo.source_epochs()
    assert ep["s0"] == pytest.approx(lo.drawn[0] / n0, abs=1e-3) and ep["s0"] > 4 * ep["s1"]


def test_mixture_parse():
    from pathlib import Path

    assert ds.Mixture.parse([Path("a")], None) == Path("a")
    m = ds.Mixture.parse([Path("a"), Path("b")], "7,3")
    assert m.weights == pytest.approx((0.7, 0.3)) and "a (0.7)" in str(m)
    assert ds.Mixture.parse([Path("a"), Path("b")], None).weights is None
    for bad, msg in (("0.5", "1 weight"), ("a,b", "comma-separated"), ("1,-1", "positive"), ("1,nan", "positive")):
        with pytest.raises(UsageError, match=msg):
            ds.Mixture.parse([Path("a"), Path("b")], bad)


def test_prepare_data_mixture_is_recorded(tmp_path, tokenizer_path):
    a = make_corpus(tmp_path / "a.txt", n_docs=30, seed=1)
    b = make_corpus(tmp_path / "b.txt", n_docs=10, seed=2)
    mix = ds.Mixture.parse([a, b], "0.25,0.75")
    data = ds.prepare_data(tokenizer_path, mix, tmp_path / "c", 16, _tcfg(eval_batches=4))
    m = data.meta["mixture"]
    assert [x["corpus"] for x in m] == [str(a), str(b)] and [x["weight"] for x in m] == [0.25, 0.75]
    assert (tmp_path / "c" / "source1" / "tokens.bin").is_file() and len(data.val_doc_ids) == 2
    assert data.loader.windows_per_epoch == sum(x["windows"] for x in m)
    assert sum(len(v) for v in data.val_batches) == 16
    plain = ds.prepare_data(tokenizer_path, ds.Mixture.parse([a, b], None), tmp_path / "c", 16, _tcfg())
    w = [x["weight"] for x in plain.meta["mixture"]]
    assert w[0] > w[1] and sum(w) == pytest.approx(1.0)  # by default, proportional to size


def test_train_command_mixes_corpora(tmp_path, tokenizer_path, runner):
    from minillm.cli import app

    a = make_corpus(tmp_path / "a.txt", n_docs=20, seed=1)
    b = make_corpus(tmp_path / "b.txt", n_docs=10, seed=2)
    out = tmp_path / "run"
    args = ["train", "-t", str(tokenizer_path), "--corpus", str(a), "--corpus", str(b), "--outdir", str(out),
            "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "2",
            "--max-steps", "2", "--eval-batches", "1", "--device", "cpu", "--compile", "off"]
    r = runner.invoke(app, [*args, "--mix", "0.7"])
    assert r.exit_code == 2 and "--mix" in r.stderr
    r = runner.invoke(app, [*args, "--mix", "0.7,0.3"])
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert [x["weight"] for x in cfg["data"]["mixture"]] == [0.7, 0.3]
    last = json.loads((out / "history.json").read_text())["evals"][-1]
    epochs = last["source_epochs"]  # each corpus's own epochs are reported
    assert {Path(k).name for k in epochs} == {"a.txt", "b.txt"} and all(v > 0 for v in epochs.values())
