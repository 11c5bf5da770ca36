"""The run's data (minillm.data.loader): prepare_data's split and windows, --val-file, mixing several
corpora, one corpus as a mixture of one (the plain cache layout), DDP sharding and the resumable loader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minillm.corpus.read import iter_documents
from minillm.data import loader as ds
from minillm.data.cache import open_token_cache
from minillm.data.windows import gather, split_documents, window_starts
from minillm.errors import UsageError
from tests.conftest import make_corpus


def _tcfg(**kw):
    base = dict(stride=0, val_fraction=0.2, seed=3, batch_size=4, eval_batches=2)
    return SimpleNamespace(**{**base, **kw})


def _one(corpus: Path) -> ds.Mixture:
    return ds.Mixture.parse([corpus], None)


def test_segment_ids_follow_the_recorded_boundaries(tmp_path, corpus, tokenizer_path):
    torch = pytest.importorskip("torch")
    from minillm.model.gpt import segment_ids

    data = ds.prepare_data(tokenizer_path, _one(corpus), tmp_path / "c", 32, _tcfg(stride=24))
    src = data.loader.sources[0]
    w = gather(src.tokens, src.starts, 33)
    seg = segment_ids(torch.from_numpy(w), data.doc_id).numpy()
    is_doc = w == data.doc_id
    # positions restart exactly at each <|doc|> the window holds, nowhere else
    assert ((np.diff(seg, axis=1) != 0) == is_doc[:, 1:]).all()


def test_split_is_by_document_deterministic_and_nothing_leaks(tmp_path, corpus, tokenizer_path):
    val = split_documents(40, 0.2, 3)
    assert np.array_equal(val, split_documents(40, 0.2, 3)) and not np.array_equal(val, split_documents(40, 0.2, 4))
    assert len(split_documents(5, 1e-9, 0)) == 1 and len(split_documents(2, 0.999, 0)) == 1
    data = ds.prepare_data(tokenizer_path, _one(corpus), tmp_path / "c", 16, _tcfg())
    cache = open_token_cache(tmp_path / "c")
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
    data = ds.prepare_data(tokenizer_path, _one(corpus), tmp_path / "c", 16, _tcfg(), val_file=vf)
    assert data.val_doc_ids == [] and data.meta["val_file"] == str(vf)
    assert len(data.loader.sources[0].tokens) == open_token_cache(tmp_path / "c").n_tokens


def _loader(n_windows=37, batch=5, seed=1, rank=0, world=1, weights=None):
    span = 9
    stream = np.arange(n_windows * 8 + 1) % 60000
    if weights is None:
        return ds.Loader(stream, window_starts(len(stream), 8, 8), 8, batch, seed, rank, world)
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
    one = ds.Mixture.parse([Path("a")], None)  # one corpus is a mixture of one, with the plain layout
    assert one == ds.Mixture((Path("a"),)) and one.single and str(one) == "a"
    assert not ds.Mixture.parse([Path("a")], "1").single and not ds.Mixture.parse([Path("a"), Path("b")], None).single
    m = ds.Mixture.parse([Path("a"), Path("b")], "7,3")
    assert m.weights == pytest.approx((0.7, 0.3)) and "a (0.7)" in str(m)
    assert ds.Mixture.parse([Path("a"), Path("b")], None).weights is None
    for bad, msg in (("0.5", "1 weight"), ("a,b", "comma-separated"), ("1,-1", "positive"), ("1,nan", "positive")):
        with pytest.raises(UsageError, match=msg):
            ds.Mixture.parse([Path("a"), Path("b")], bad)


def test_one_corpus_keeps_the_plain_cache_layout_and_records(tmp_path, corpus, tokenizer_path):
    """A mixture of one without --mix is what one --corpus always was: the cache in --cache-dir itself (so
    the caches of earlier runs are reused) and config.json's corpus, sha256 and val_doc_ids unnested."""
    data = ds.prepare_data(tokenizer_path, _one(corpus), tmp_path / "c", 16, _tcfg())
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "docs.npy", "meta.json", "tokens.bin", "train.bin", "train.key", "val.bin", "val.key"]
    assert data.meta["corpus"] == str(corpus) and isinstance(data.meta["corpus_sha256"], str)
    assert "mixture" not in data.meta and data.val_doc_ids == split_documents(40, 0.2, 3).tolist()
    weighted = ds.prepare_data(tokenizer_path, ds.Mixture.parse([corpus], "1"), tmp_path / "w", 16, _tcfg())
    assert (tmp_path / "w" / "source0" / "tokens.bin").is_file() and weighted.meta["corpus"] == [str(corpus)]
    assert weighted.val_doc_ids == [data.val_doc_ids]


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
