"""How repetitive is generated text? distinct-2 and the share of repeated 4-grams, for greedy decoding and
sampling settings (`generate`'s defaults among them), against the held-out human continuations of the same
prompts. Prints a Markdown table (the one in docs/GENERATION.md).

    python scripts/measure_repetition.py --ckpt runs/x --heldout heldout.txt [--prompts 25 --max-tokens 96]

Each held-out document gives a prompt (its first --prompt-tokens tokens) and a human continuation (its next
--max-tokens tokens). Metrics are over words (whitespace-separated), per text, then averaged:
distinct-2 = distinct word pairs / word pairs; rep-4 = share of word 4-grams that already occurred earlier in
the same text (0 for text that never repeats itself; a looping text approaches 1).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from minillm.corpus.read import iter_documents  # noqa: E402
from minillm.generation import Sampling, default_penalty, generate_batch  # noqa: E402
from minillm.model.load import load_model, resolve_tokenizer  # noqa: E402
from minillm.tokenizer import doc_id, load_tokenizer  # noqa: E402


def cli_defaults() -> Sampling:
    """The sampling `minillm generate` uses when no flag is given (read from the command's options)."""
    from minillm.cli.infer import generate

    p = inspect.signature(generate).parameters
    t, k, top_p = (p[n].default.default for n in ("temperature", "top_k", "top_p"))
    return Sampling(t, k, top_p, default_penalty(t))


def settings() -> list[tuple[str, Sampling, int]]:
    """(label, sampling, samples per prompt): greedy ones are deterministic, so one sample."""
    d = cli_defaults()
    greedy = Sampling(0.0, 0, 1.0, default_penalty(0.0))
    return [
        ("greedy, no penalty", Sampling(0.0, 0, 1.0, 1.0), 1),
        ("greedy, penalty 1.1", Sampling(0.0, 0, 1.0, 1.1), 1),
        ("greedy, penalty 1.2", Sampling(0.0, 0, 1.0, 1.2), 1),
        (f"**greedy default** (`--temperature 0`: penalty {greedy.repetition_penalty})", greedy, 1),
        (f"**sampling defaults** (T {d.temperature}, top-k {d.top_k}, top-p {d.top_p}, penalty "
         f"{d.repetition_penalty})", d, 3),
        ("T 0.8, top-k 50, top-p 0.95, penalty 1.0", Sampling(0.8, 50, 0.95, 1.0), 3),
        ("T 0.8, top-k 50, top-p 0.95, penalty 1.2", Sampling(0.8, 50, 0.95, 1.2), 3),
        ("T 1.0, no top-k/top-p, no penalty", Sampling(1.0, 0, 1.0, 1.0), 3),
    ]


def distinct_2(words: list[str]) -> float:
    pairs = list(zip(words, words[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def repeated_4(words: list[str]) -> float:
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def score(texts: list[str]) -> tuple[float, float, float]:
    """(mean distinct-2, mean rep-4, mean words) over the texts."""
    words = [t.split() for t in texts]
    return (statistics.fmean(map(distinct_2, words)), statistics.fmean(map(repeated_4, words)),
            statistics.fmean(map(len, words)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    ap.add_argument("--heldout", required=True, type=Path, help="held-out corpus file (never trained on)")
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    model, state = load_model(a.ckpt, a.device)
    tok = load_tokenizer(resolve_tokenizer(state, None))
    d = doc_id(tok)
    need = a.prompt_tokens + a.max_tokens
    docs = [ids for ids in (tok.encode(t).ids for t in iter_documents(a.heldout)) if len(ids) >= need][: a.prompts]
    if not docs:
        sys.exit(f"{a.heldout}: no document of {need} tokens or more")
    prompts = [[d, *ids[: a.prompt_tokens]] for ids in docs]
    rows = [("held-out human text", *score([tok.decode(ids[a.prompt_tokens : need]) for ids in docs]))]
    for label, sampling, n in settings():
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        outs = generate_batch(model, prompts * n, a.max_tokens, sampling=sampling, stop_id=d, generator=g)
        rows.append((label, *score([tok.decode(o.tokens) for o in outs])))
    print(f"{len(docs)} held-out prompts of {a.prompt_tokens} tokens, {a.max_tokens} new tokens each "
          f"(sampled settings: 3 samples per prompt), seed {a.seed}\n")
    print("| decoding | distinct-2 | repeated 4-grams | words |")
    print("| --- | ---: | ---: | ---: |")
    for label, d2, r4, w in rows:
        print(f"| {label} | {d2:.3f} | {r4:.1%} | {w:.0f} |")


if __name__ == "__main__":
    main()
