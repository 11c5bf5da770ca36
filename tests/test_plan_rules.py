"""The planner is a pure function of the corpus figures, the device figures and the budget: tested on known
inputs (corpora described by their sizes, the H100 and CPU entries of the device table)."""

from __future__ import annotations

import dataclasses

import pytest

from minillm.config import resolve
from minillm.corpus.stats import expected_windows
from minillm.errors import MiniLLMError
from minillm.plan import rules
from minillm.plan.devices import DEVICES
from minillm.plan.rules import (
    Candidate,
    CorpusFigures,
    block_for,
    choose_shape,
    choose_vocab,
    dropout_for,
    patience_for,
    plan,
)

H100, CPU = DEVICES["h100"], DEVICES["cpu"]


def corpus(mb: float, docs: int = 1000, vocab: int | None = None, bpt: float | None = None) -> CorpusFigures:
    total = int(mb * 1e6)
    return CorpusFigures(total, docs, [total / docs] * docs, vocab, bpt)


def test_a_4mb_corpus_on_an_h100_for_2_minutes_gets_small_with_a_2k_vocabulary_and_dropout_for_many_epochs():
    p = plan(corpus(4), H100, 120)
    assert (p.shape, p.preset, p.vocab_size) == ("small", "small", 2048)
    assert p.model == {"n_layer": 6, "n_embd": 256, "n_head": 4, "block_size": 256, "dropout": 0.2}
    assert p.train["optimizer"] == "muon" and p.train["max_time"] == 120.0 and p.train["epochs"] == 0.0
    assert p.train["stride"] == 128 and p.epochs > 8  # many passes: overlap and dropout 0.2
    assert "medium) lacks data" in p.reasons["model"]
    assert p.memory_bytes < 0.85 * H100.memory and p.bpb[0] < p.bpb[1] < p.bpb[2]


def test_a_32mb_corpus_gets_medium_and_large_lacks_data_and_time():
    p = plan(corpus(32), H100, 120)
    assert p.shape == "medium" and p.vocab_size == 16384
    large = next(c for c in p.candidates if c.shape == "large")
    assert large.data_ratio < rules.DATA_RATIO and large.compute_ratio < rules.COMPUTE_RATIO


def test_a_longer_budget_never_plans_a_smaller_model():
    order = [s.name if s.name != "custom" else f"custom {s.n_layer}x{s.n_embd}" for s in rules.SHAPES]
    sizes = [order.index(plan(corpus(32), H100, t).candidates[0].shape) for t in (60, 120)]  # candidates: all shapes
    assert sizes == [0, 0]
    chosen = [order.index(_shape_id(plan(corpus(32), H100, t))) for t in (60, 120, 600, 3600)]
    assert chosen == sorted(chosen)


def _shape_id(p) -> str:
    return p.shape if p.shape != "custom" else f"custom {p.model['n_layer']}x{p.model['n_embd']}"


def test_a_cpu_budget_plans_a_small_custom_shape_on_tinys_recipe():
    p = plan(corpus(4), CPU, 300)
    assert p.shape == "custom" and p.preset == "tiny" and p.train["optimizer"] == "adamw"
    assert (p.model["n_layer"], p.model["n_embd"]) == (4, 128) and p.model["block_size"] == 128
    assert p.train["lr"] == 3e-3 and p.train["batch_size"] == 16 and p.model["dropout"] == 0.0  # under 2 epochs
    assert "lacks time" in p.reasons["model"]


def test_the_plan_is_pure_and_every_choice_has_a_one_line_reason():
    a, b = plan(corpus(4), H100, 120), plan(corpus(4), H100, 120)
    assert a == b
    assert set(a.reasons) >= {"model", "vocab_size", "block_size", "stride", "windows", "epochs", "dropout",
                              "batch_size", "optimizer", "max_time", "expected"}
    assert all(10 < len(v) < 300 and "\n" not in v for v in a.reasons.values())


def test_the_plans_config_resolves_to_what_it_planned():
    p = plan(corpus(4), H100, 120)
    m, t = resolve(p.preset, {**p.model, **p.train})
    assert (m.n_layer, m.n_embd, m.block_size, m.dropout, m.qk_norm) == (6, 256, 256, 0.2, True)
    assert (t.batch_size, t.stride, t.max_time, t.optimizer) == (128, 128, 120.0, "muon")


def test_a_given_tokenizer_fixes_the_vocabulary_and_its_bytes_per_token_the_token_count():
    p = plan(corpus(4, vocab=32000, bpt=4.0), H100, 120)
    assert p.vocab_size == 32000 and p.tokenizer_given and "tokenizer's" in p.reasons["vocab_size"]
    small = next(c for c in p.candidates if c.shape == "small")
    assert small.corpus_tokens == 1_000_000 + 1000  # 4 MB at 4 bytes a token, one <|doc|> per document


def test_the_vocabulary_grows_with_the_corpus_and_stays_within_the_models_size():
    small = rules.SHAPES[5]
    assert [choose_vocab(corpus(mb), small)[0] for mb in (1, 4, 8.5, 32, 200)] == [2048, 2048, 4096, 16384, 16384]
    medium = rules.SHAPES[6]
    assert choose_vocab(corpus(200), medium)[0] == 32768
    assert "no larger than the blocks" in choose_vocab(corpus(200), small)[1]


def test_memory_too_small_for_the_batch_halves_it_and_accumulates():
    tight = dataclasses.replace(H100, memory=2 * 2**30)
    p = plan(corpus(32), tight, 120)
    b, a = p.train["batch_size"], p.train["accumulation_steps"]
    assert a > 1 and b * a == rules.PRESETS[p.preset]["train"]["batch_size"]
    assert p.memory_bytes <= rules.MEMORY_MARGIN * tight.memory


def test_no_model_fitting_the_memory_is_an_error():
    with pytest.raises(MiniLLMError, match="--gpu-memory"):
        plan(corpus(4), dataclasses.replace(H100, memory=1000), 120)


def test_nothing_to_plan_is_an_error():
    with pytest.raises(MiniLLMError, match="no documents"):
        plan(CorpusFigures(0, 0, []), H100, 120)


def _cand(name: str, params: int, corpus_tokens: int, tokens: int, fits: bool = True) -> Candidate:
    return Candidate(name, params, 2048, 1e6, tokens, corpus_tokens, 1, fits)


def test_choose_shape_takes_the_largest_the_data_and_the_budget_both_feed():
    cands = [_cand("a", 100, 1000, 1000), _cand("b", 1000, 1000, 10_000), _cand("c", 10_000, 1000, 100_000)]
    i, why = choose_shape(cands)
    assert i == 1 and "next size (c) lacks data" in why  # c: 0.1 corpus tokens per parameter
    cands[2] = _cand("c", 10_000, 100_000, 10_000)  # enough data, too little time (1 token per parameter)
    assert choose_shape(cands)[0] == 1 and "lacks time" in choose_shape(cands)[1]
    cands[2] = _cand("c", 10_000, 100_000, 100_000, fits=False)
    assert "lacks memory" in choose_shape(cands)[1]
    i, why = choose_shape([_cand("a", 100, 10, 1000), _cand("b", 1000, 10, 10_000)])
    assert i == 0 and "smallest" in why and "lacks data" in why


def test_block_size_covers_most_documents_within_the_shape_and_is_halved_when_windows_are_scarce():
    assert block_for([100] * 10_000, 1_010_000, 256)[0] == 128
    assert block_for([10] * 1000, 11_000, 256)[0] == 64  # short documents pack
    assert block_for([5000] * 1000, 5_001_000, 256)[0] == 256  # the shape's context caps it
    block, why = block_for([8230] * 150, 1_234_650, 1024)  # the original tool's example: 1.2M tokens
    assert block == 512 and "halved" in why


def test_dropout_follows_the_epochs():
    assert [dropout_for(e)[0] for e in (0.5, 1.9, 2.0, 7.9, 8.0, 90)] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2]


def test_early_stopping_only_where_the_budget_reads_the_corpus_many_times():
    assert [patience_for(e)[0] for e in (0.5, 8.0, 15.9, 16.0, 90)] == [0, 0, 0, 3, 3]
    many, few = plan(corpus(4), H100, 120), plan(corpus(32), H100, 120)
    assert many.epochs > 16 and many.train["patience"] == 3 and "best" in many.reasons["patience"]
    assert few.epochs < 16 and few.train["patience"] == 0


def test_the_windows_are_the_loaders_windows():
    lengths = [50, 300, 1000, 7] * 300
    fig = CorpusFigures(sum(lengths) * 4, len(lengths), [n * 4 for n in lengths], 2048, 4.0, lengths)
    p = plan(fig, CPU, 300)
    assert p.windows == expected_windows(lengths, p.model["block_size"], p.train["stride"])


def test_the_planner_reads_no_files_and_builds_no_model(monkeypatch):
    """Pure: a plan needs neither the file system nor torch modules."""
    import builtins

    import torch

    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail("the planner opened a file"))
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: pytest.fail("the planner built a model"))
    assert plan(corpus(4), H100, 120).shape == "small"


def test_the_expected_range_is_the_tables_leave_one_out_error():
    assert rules.held_out_error([(1e6, 1.0), (4e6, 2.0)]) == pytest.approx(1.0)  # 1.0 predicted as 2.0
    assert rules.held_out_error([(1e6, 1.0), (2e6, 1.5), (4e6, 2.0)]) == pytest.approx(0.5)
    lo, mid, hi = rules.expected_bpb("cuda", 8_500_000)
    assert mid == pytest.approx(0.93, abs=0.01) and lo < mid < hi
