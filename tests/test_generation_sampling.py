"""``minillm.generation.sampling``: the graph-safe draw is torch.multinomial's, number for number; top-p over the top-k
candidates decides as the sort of the whole vocabulary does."""

from __future__ import annotations

import pytest
import torch

from minillm.generation.sampling import draw, sample_next_token, skip_draws


def test_draw_equals_multinomial_and_consumes_the_same_random_numbers():
    probs = torch.softmax(torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3, -1)
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(20):
        assert torch.equal(draw(probs, a), torch.multinomial(probs, 1, generator=b).squeeze(-1))
    assert torch.equal(a.get_state(), b.get_state())
    picked = {int(draw(probs, a)[0]) for _ in range(50)}
    assert len(picked) > 1  # it samples, not argmax


def test_skip_draws_advances_as_draws_do():
    probs = torch.softmax(torch.randn(2, 64), -1)
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(3):
        draw(probs, a)
    skip_draws(b, 3, (2, 64), torch.device("cpu"))
    assert torch.equal(a.get_state(), b.get_state())


def reference_token(logits, temperature, top_k, top_p, generator):
    """The full-vocabulary path (one sort of (B, V)), drawing the same random numbers."""
    from minillm.generation.sampling import nucleus_sorted

    return draw(torch.softmax(nucleus_sorted(logits.float() / temperature, top_k, top_p), -1), generator)


def test_top_k_candidates_decide_top_p_as_the_whole_vocabulary_does_ties_included():
    """bf16-rounded logits tie often (at the k-th value and inside the nucleus): the candidates' result is the
    full sort's, logit for logit, and every row is sure."""
    from minillm.generation.sampling import nucleus_sorted, nucleus_top_k

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 2000, generator=g) * 2).bfloat16().float()
    ties = 0
    for k, p in [(50, 0.95), (5, 0.5), (20, 0.999), (1, 0.9), (3, 0.01)]:
        kth = torch.topk(logits, k, -1).values[:, -1:]
        ties += int(((logits >= kth).sum(-1) > k).sum())
        kept, unsure = nucleus_top_k(logits, k, p)
        assert not unsure.any()
        assert torch.equal(kept, nucleus_sorted(logits, k, p))
    assert ties > 20  # the case the margin is for really occurred


def test_ties_past_the_margin_are_flagged_and_redone_over_the_vocabulary():
    from minillm.generation.sampling import MARGIN, nucleus_sorted, nucleus_top_k

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    logits[1] = 0.0  # every logit ties: top-k keeps them all
    logits[2, :MARGIN + 10] = 5.0  # more ties at the k-th than the margin holds
    kept, unsure = nucleus_top_k(logits, 10, 0.9)
    assert unsure.tolist() == [False, True, True]
    assert torch.equal(kept[0], nucleus_sorted(logits, 10, 0.9)[0])
    assert int(torch.isfinite(nucleus_sorted(logits, 10, 0.9)[1]).sum()) == 450  # all kept by top-k; 0.9 of them
    for seed in range(5):  # the host check redoes those rows: the full path's tokens, same random numbers
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got = sample_next_token(logits, 0.7, 10, 0.9, generator=a)
        assert torch.equal(got, reference_token(logits, 0.7, 10, 0.9, b))
        assert torch.equal(a.get_state(), b.get_state())
    flag = torch.zeros(3, dtype=torch.bool)  # inside a graph: not redone, marked for the caller
    sample_next_token(logits, 0.7, 10, 0.9, generator=torch.Generator().manual_seed(0), unsure=flag)
    assert flag.tolist() == [False, True, True]


def test_sampled_tokens_equal_the_full_sort_s():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 3000, generator=g) * 3
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    got = torch.stack([sample_next_token(logits, 0.8, 50, 0.95, generator=a) for _ in range(50)])
    want = torch.stack([reference_token(logits, 0.8, 50, 0.95, b) for _ in range(50)])
    assert torch.equal(got, want) and len(set(got[:, 0].tolist())) > 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_top_k_candidates_decide_as_the_full_sort_on_cuda():
    """CUDA's topk and sorts, a 32,000-token vocabulary, bf16-rounded logits (ties): the same kept logits."""
    from minillm.generation.sampling import nucleus_sorted, nucleus_top_k

    logits = (torch.randn(64, 32000, generator=torch.Generator().manual_seed(3)) * 2).bfloat16().float().cuda()
    for k, p in [(50, 0.95), (5, 0.5), (1, 0.9)]:
        kept, unsure = nucleus_top_k(logits, k, p)
        assert not unsure.any() and torch.equal(kept, nucleus_sorted(logits, k, p))
