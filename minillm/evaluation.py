"""Loss, perplexity and bits per byte of a model on whole documents.

Each document is scored on its own as ``<|doc|>`` followed by its tokens: every token of the document is
scored (the first given ``<|doc|>`` alone) and ``<|doc|>`` itself is not. Long documents are scored with
sliding windows ``stride`` apart, each token scored once with up to a block of context.
Bits per byte = summed loss in bits over the scored tokens / the UTF-8 bytes of the documents' text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def doc_windows(ids: list[int], block: int, stride: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) windows over one document's tokens; targets already scored are -1."""
    n = len(ids) - 1  # number of targets
    start = scored = 0
    while n > 0:
        end = min(start + block, n)
        first_new = scored - start  # index in this window of the first target not yet scored
        yield ids[start:end], [-1] * first_new + ids[start + 1 + first_new : end + 1]
        scored = end
        if end == n:
            break
        start += min(stride, block)


@torch.no_grad()
def score(model, docs: list[list[int]], stride: int, batch_size: int, pad_id: int,
          doc_masking: bool = False, doc_id: int | None = None, progress=None) -> tuple[float, int]:
    """Summed loss in nats and number of scored tokens over ``docs`` (each starting with ``<|doc|>``)."""
    from minillm.model import segment_ids

    block = model.cfg.block_size
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batch: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        nonlocal total, count
        T = max(len(i) for i, _ in batch)
        x = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in batch], device=device)
        y = torch.tensor([t + [-1] * (T - len(t)) for _, t in batch], device=device)
        seg = segment_ids(x, doc_id) if doc_masking and doc_id is not None else None
        losses = model(x, y, seg_ids=seg, reduction="none")  # (B, T)
        total += float(losses.double().sum())
        count += int((y >= 0).sum())
        if progress:
            progress(len(batch))
        batch.clear()

    for ids in docs:
        for w in doc_windows(ids, block, stride):
            batch.append(w)
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    return total, count


def summarize(total_nats: float, n_tokens: int, n_bytes: int) -> dict:
    loss = total_nats / max(1, n_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": total_nats / math.log(2) / max(1, n_bytes),
            "tokens": n_tokens, "bytes": n_bytes}
