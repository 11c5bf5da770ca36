"""analyze-corpus's recommendations: the plan (``rules.plan``, the one function ``minillm plan`` and
``train --config auto`` use) for the corpus it measured, a device and a budget, in the report's terms."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from minillm.plan.devices import Device
from minillm.plan.figures import figures_from_stats
from minillm.plan.rules import Plan, plan


@dataclass(frozen=True)
class Recommendation:
    """Training settings suggested for a corpus, each with a one-line reason (docs/FORMATS.md)."""

    block_size: int
    stride: int
    preset: str  # a preset name, or "custom"
    n_layer: int
    n_embd: int
    n_head: int
    params: int  # non-embedding parameters of the suggested model
    epochs: float  # passes over the windows the budget allows
    vocab_size: int
    windows: int  # training windows at this block size and stride (data.windows' rule)
    dropout: float
    device: str
    budget_s: float
    reasons: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def from_plan(p: Plan) -> Recommendation:
    m = p.model
    return Recommendation(m["block_size"], p.train["stride"], p.shape, m["n_layer"], m["n_embd"], m["n_head"],
                          p.params_non_embedding, p.epochs, p.vocab_size, p.windows, m["dropout"], p.device, p.budget_s,
                          p.reasons)


def recommend(stats, device: Device, budget_s: float, vocab_size: int | None = None) -> Recommendation:
    """The recommendations for ``stats`` (``corpus.stats.CorpusStats``; ``vocab_size``: the tokenizer it was
    counted with) on ``device`` within ``budget_s`` seconds."""
    return from_plan(plan(figures_from_stats(stats, vocab_size), device, budget_s))
