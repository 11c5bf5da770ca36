"""The token cache (minillm.data.cache): every document after its <|doc|>, long documents encoded in pieces
exactly, rebuilt when the tokenizer or the corpus change and reused otherwise, the split's stream files,
uint16/uint32. (Damage and its repair: tests/test_integrity.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from minillm.corpus.read import DOC, iter_documents
from minillm.data import cache as ds
from minillm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


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


