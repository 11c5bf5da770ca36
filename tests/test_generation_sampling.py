"""``minillm.generation.sampling``: the graph-safe draw is torch.multinomial's, number for number."""

from __future__ import annotations

import torch

from minillm.generation.sampling import draw, skip_draws


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
