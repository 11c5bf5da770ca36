"""Evaluation: sliding windows score every target once; the summed loss equals a hand computation;
the result does not depend on batch size (nor on stride for documents inside one block); bits per byte;
the `evaluate` command on --test-file and on exactly the run's validation documents (--split val)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.cli import app
from minillm.corpus.read import iter_documents
from minillm.evaluation import doc_windows, n_windows, score, summarize
from minillm.io import sha256_file
from tests.conftest import make_corpus
from tests.test_generation import make_run, varied_model

DOC, PAD = 1, 0



@settings(max_examples=300, deadline=None)
@given(n_ids=st.integers(0, 150), block=st.integers(1, 40), stride=st.integers(1, 60))
def test_doc_windows_score_every_target_exactly_once(n_ids, block, stride):
    ids = list(range(100, 100 + n_ids))  # distinct tokens: a target's value tells its position
    scored = []
    wins = list(doc_windows(ids, block, stride))
    for inputs, targets in wins:
        assert 1 <= len(inputs) <= block and len(targets) == len(inputs)
        start = inputs[0] - 100
        assert inputs == ids[start:start + len(inputs)]
        for j, t in enumerate(targets):
            if t >= 0:
                assert t == ids[start + j + 1]  # predicted from inputs[: j + 1]
                pos = start + j  # the target is ids[pos + 1], seen with pos - start + 1 tokens of context
                assert j + 1 >= min(pos + 1, block - min(stride, block) + 1)
                scored.append(pos)
    assert scored == list(range(max(0, n_ids - 1)))
    assert len(wins) == n_windows(n_ids, block, stride)


@torch.no_grad()
def direct_loss(m, docs):
    """Sum of the loss of every token after <|doc|>, each document in one full forward pass."""
    total = 0.0
    for ids in docs:
        x = torch.tensor([ids])
        total += float(F.cross_entropy(m(x[:, :-1])[0], x[0, 1:], reduction="sum"))
    return total


def docs_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[DOC] + torch.randint(2, 64, (n,), generator=g).tolist() for n in lengths]


def test_score_matches_a_hand_computed_loss_and_ignores_stride_and_batch_for_short_docs():
    m = varied_model(block_size=32)
    docs = docs_of([5, 31, 1, 12, 20])  # each fits in one block (<= 32 inputs)
    want = direct_loss(m, docs)
    for stride in (1, 7, 16, 32):
        for bs in (1, 2, 64):
            total, count = score(m, docs, stride, bs, PAD)
            assert count == sum(len(d) - 1 for d in docs)
            assert total == pytest.approx(want, rel=1e-6)
    assert score(m, [[DOC]], 16, 4, PAD) == (0.0, 0)  # an empty document scores nothing


def test_score_long_docs_gives_each_token_its_window_context_and_ignores_batch_size():
    m = varied_model(block_size=16)
    docs = docs_of([50, 3, 40, 17])
    want = 0.0  # stride 1: each target seen with min(position + 1, block) tokens of context
    for ids in docs:
        for t in range(len(ids) - 1):
            ctx = ids[max(0, t + 1 - 16): t + 1]
            with torch.no_grad():
                want += float(F.cross_entropy(m(torch.tensor([ctx]))[0, -1:], torch.tensor([ids[t + 1]])))
    assert score(m, docs, 1, 5, PAD)[0] == pytest.approx(want, rel=1e-6)
    ref = score(m, docs, 8, 1, PAD)
    for bs in (2, 3, 100):
        total, count = score(m, docs, 8, bs, PAD)
        assert count == ref[1] == sum(len(d) - 1 for d in docs)
        assert total == pytest.approx(ref[0], rel=1e-6)
        assert score(m, docs, 4, 4, PAD)[0] != pytest.approx(score(m, docs, 16, 4, PAD)[0], rel=1e-6)  # context matters


def test_summarize_bits_per_byte():
    res = summarize(total_nats=10 * math.log(2), n_tokens=4, n_bytes=5)
    assert res["bits_per_byte"] == pytest.approx(2.0)
    assert res["loss"] == pytest.approx(10 * math.log(2) / 4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


# ---------------------------------------------------------------------------------------------- CLI


def evaluate(runner, run, *args):
    r = runner.invoke(app, ["evaluate", "--ckpt", str(run / "ckpt_best.pt"), "--device", "cpu", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_cli_evaluate_test_file_matches_the_library_and_batch_size(runner, tmp_path, tokenizer_path):
    from minillm.model.load import load_model
    from minillm.tokenizer import encode_documents, load_tokenizer, pad_id

    run = make_run(tmp_path, tokenizer_path, block_size=32)
    held = make_corpus(tmp_path / "held.txt", n_docs=4, words_per_doc=(5, 40), seed=7)
    texts = list(iter_documents(held))
    res = evaluate(runner, run, "--test-file", str(held))
    model, _ = load_model(run / "ckpt_best.pt")
    tok = load_tokenizer(run / "tokenizer.json")
    total, n = score(model, encode_documents(tok, texts), 16, 3, pad_id(tok))
    assert res["tokens"] == n and res["documents"] == 4 and res["stride"] == 16
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["bytes"] == sum(len(t.encode()) for t in texts)
    assert res["bits_per_byte"] == pytest.approx(total / math.log(2) / res["bytes"], rel=1e-5)
    other = evaluate(runner, run, "--test-file", str(held), "--batch-size", "1")
    assert other["loss"] == pytest.approx(res["loss"], rel=1e-5)
    plain = runner.invoke(app, ["evaluate", "--ckpt", str(run), "--device", "cpu", "--test-file", str(held)])
    assert plain.exit_code == 0 and "bits/byte" in plain.stdout and plain.stderr == ""  # no bar off a terminal


def test_cli_split_val_scores_exactly_the_validation_documents(runner, tmp_path, tokenizer_path, corpus):
    run = make_run(tmp_path, tokenizer_path, block_size=32)
    docs = list(iter_documents(corpus))
    val_ids = [1, 4, 9]
    cfg = {"format": 1, "data": {"corpus": str(corpus), "corpus_sha256": sha256_file(corpus), "val_file": None},
           "val_doc_ids": val_ids}
    (run / "config.json").write_text(json.dumps(cfg))
    expected_file = tmp_path / "val_only.txt"
    expected_file.write_text("\n<|doc|>\n".join(docs[i] for i in val_ids) + "\n", encoding="utf-8")
    got = evaluate(runner, run, "--split", "val")
    want = evaluate(runner, run, "--test-file", str(expected_file))
    assert got["documents"] == 3 and got["tokens"] == want["tokens"] and got["bytes"] == want["bytes"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    # a mixture run records one list per corpus
    cfg2 = {"data": {"corpus": [str(corpus), str(expected_file)], "corpus_sha256": [sha256_file(corpus),
            sha256_file(expected_file)], "val_file": None}, "val_doc_ids": [[], [0, 2]]}
    (run / "config.json").write_text(json.dumps(cfg2))
    mixed = evaluate(runner, run, "--split", "val")
    assert mixed["documents"] == 2 and mixed["bytes"] == len(docs[1].encode()) + len(docs[9].encode())
    # a run trained with --val-file is scored on that file
    (run / "config.json").write_text(json.dumps({"data": {"corpus": str(corpus), "val_file": str(expected_file)},
                                                 "val_doc_ids": []}))
    assert evaluate(runner, run, "--split", "val")["loss"] == pytest.approx(want["loss"], rel=1e-6)
    # a corpus that changed since training is refused
    (run / "config.json").write_text(json.dumps(cfg))
    corpus.write_text(corpus.read_text(encoding="utf-8") + "\n<|doc|>\nmore\n", encoding="utf-8")
    r = runner.invoke(app, ["evaluate", "--ckpt", str(run), "--device", "cpu", "--split", "val"])
    assert r.exit_code == 1 and "changed since training" in r.stderr


def test_cli_split_val_on_a_trained_run(runner, tmp_path, tokenizer_path, corpus):
    """The keys --split val reads are the ones train writes."""
    run = tmp_path / "trained"
    r = runner.invoke(app, ["train", "--tokenizer", str(tokenizer_path), "--corpus", str(corpus), "--outdir", str(run),
                            "--config", "tiny", "--max-steps", "2", "--block-size", "32", "--device", "cpu",
                            "--eval-every", "2", "--batch-size", "4", "--eval-batches", "1"])
    assert r.exit_code == 0, r.output
    val_ids = json.loads((run / "config.json").read_text())["val_doc_ids"]
    docs = list(iter_documents(corpus))
    res = evaluate(runner, run, "--split", "val")
    assert res["documents"] == len(val_ids) > 0
    assert res["bytes"] == sum(len(docs[i].encode()) for i in val_ids)


def test_cli_evaluate_usage_errors(runner, tmp_path, tokenizer_path):
    run = make_run(tmp_path, tokenizer_path)
    for bad in ([], ["--split", "train"], ["--split", "val", "--test-file", "x.txt"]):
        r = runner.invoke(app, ["evaluate", "--ckpt", str(run), "--device", "cpu", *bad])
        assert r.exit_code == 2, (bad, r.output)
    r = runner.invoke(app, ["evaluate", "--ckpt", str(run), "--device", "cpu", "--split", "val"])
    assert r.exit_code == 1 and "config.json" in r.stderr  # this run dir has no config.json
