"""Loss, perplexity and bits per byte of a model on whole documents.

Each document is scored on its own as ``<|doc|>`` followed by its tokens: every token of the document is
scored (the first given ``<|doc|>`` alone) and ``<|doc|>`` itself is not. Long documents are scored with
sliding windows ``stride`` apart, each token scored exactly once, with at least ``block - stride`` tokens
of context (all of them when the document fits in a block).
Bits per byte = summed loss in bits over the scored tokens / the UTF-8 bytes of the documents' text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from minillm.errors import MiniLLMError
from minillm.io import progress_bar, read_json, sha256_file

ENCODE_BATCH = 256  # documents per encode_batch call while encoding for evaluation (the bar moves per batch)


def doc_windows(ids: list[int], block: int, stride: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) windows over one document's tokens; targets already scored are -1."""
    n = len(ids) - 1  # number of targets
    step = max(1, min(stride, block))
    start = scored = 0
    while n > 0:
        end = min(start + block, n)
        first_new = scored - start  # index in this window of the first target not yet scored
        yield ids[start:end], [-1] * first_new + ids[start + 1 + first_new : end + 1]
        scored = end
        if end == n:
            break
        start += step


def n_windows(n_ids: int, block: int, stride: int) -> int:
    """How many windows ``doc_windows`` yields for a document of ``n_ids`` tokens."""
    n, step = n_ids - 1, max(1, min(stride, block))
    if n <= 0:
        return 0
    return 1 + max(0, -(-(n - block) // step))


@torch.no_grad()
def score(model, docs: list[list[int]], stride: int, batch_size: int, pad_id: int,
          progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Summed loss in nats and number of scored tokens over ``docs`` (each starting with ``<|doc|>``).
    Windows of several documents share a forward pass, right-padded; causal attention keeps them apart
    from the padding, so the result does not depend on ``batch_size``. ``progress(n)`` after each batch."""
    block = model.cfg.block_size
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync at the end
    count = 0
    batch: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        nonlocal total, count
        T = max(len(i) for i, _ in batch)
        x = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in batch], device=device)  # (B, T)
        y = torch.tensor([t + [-1] * (T - len(t)) for _, t in batch], device=device)  # (B, T)
        losses = model(x, y, reduction="none")  # (B, T), 0 where the target is -1
        total += losses.double().sum()
        count += sum(len(t) - t.count(-1) for _, t in batch)
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
    return float(total), count


def summarize(total_nats: float, n_tokens: int, n_bytes: int) -> dict:
    loss = total_nats / max(1, n_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "bits_per_byte": total_nats / math.log(2) / max(1, n_bytes),
            "tokens": n_tokens, "bytes": n_bytes}


def validation_texts(run_dir: Path) -> tuple[list[str], str]:
    """The documents a run held out for validation, read from its ``config.json``: the ``data.val_file``
    if it had one, else documents ``val_doc_ids`` of ``data.corpus`` (document i = the i-th yielded by
    ``iter_documents``). Returns the texts and a description of where they came from."""
    from minillm.corpus.read import iter_documents

    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise MiniLLMError(f"--split val: {cfg_path} does not exist; give the checkpoint inside its run directory, "
                           f"or score a file with --test-file")
    cfg = read_json(cfg_path, "restore it from a copy of the run, or score a file with --test-file")
    data = cfg.get("data", {})
    if data.get("val_file"):
        path = Path(data["val_file"])
        _check_exists(path, "data.val_file")
        return _read(path), f"{path} (the run's --val-file)"
    # one corpus: corpus, corpus_sha256, val_doc_ids; a mixture (--corpus a --corpus b): a list of each
    corpora, shas, id_lists = data.get("corpus"), data.get("corpus_sha256"), cfg.get("val_doc_ids")
    if not isinstance(corpora, list):
        corpora, shas, id_lists = [corpora or ""], [shas], [id_lists]
    texts: list[str] = []
    for corpus, want, doc_ids in zip(corpora, shas or [None] * len(corpora), id_lists or [None] * len(corpora),
                                     strict=True):
        path = Path(corpus)
        _check_exists(path, "data.corpus")
        if want and sha256_file(path) != want:
            raise MiniLLMError(f"--split val: the corpus {path} changed since training (sha256 differs), so its "
                               f"validation documents are unknown; restore it, or score a file with --test-file")
        ids = set(doc_ids or [])
        with progress_bar(None, f"reading {path.name}", "doc", iterable=iter_documents(path)) as docs:
            found = [t for i, t in enumerate(docs) if i in ids]
        if len(found) != len(ids):
            raise MiniLLMError(f"--split val: {path} holds fewer documents than the run's val_doc_ids need; "
                               f"is it the training corpus?")
        texts += found
    if not texts:
        raise MiniLLMError(f"--split val: {cfg_path} lists no validation documents; score a file with --test-file")
    return texts, f"{len(texts)} validation documents of {', '.join(map(str, corpora))}"


def _check_exists(path: Path, key: str) -> None:
    if not path.is_file():
        raise MiniLLMError(f"--split val: {key} {path} (from the run's config.json) does not exist; run evaluate "
                           f"from the directory train ran in, or score the file with --test-file")


def _read(path: Path) -> list[str]:
    """Every document of ``path``, counted on a bar on stderr when it is a terminal."""
    from minillm.corpus.read import iter_documents

    with progress_bar(None, f"reading {Path(path).name}", "doc", iterable=iter_documents(path)) as docs:
        return list(docs)


def encode_texts(tok, texts: list[str], show: bool | None = None) -> list[list[int]]:
    """``tokenizer.encode_documents`` in batches of ``ENCODE_BATCH``, with a bar on stderr (``show`` None: on
    a terminal)."""
    from minillm.tokenizer import encode_documents

    docs: list[list[int]] = []
    with progress_bar(len(texts), "encoding", "doc", show) as bar:
        for i in range(0, len(texts), ENCODE_BATCH):
            docs += encode_documents(tok, texts[i : i + ENCODE_BATCH])
            bar.update(len(texts[i : i + ENCODE_BATCH]))
    return docs


def eval_texts(test_file: Path | None, run_dir: Path) -> tuple[list[str], str]:
    """The documents to score and where they came from: those of ``test_file``, or with None the validation
    documents of the run in ``run_dir``."""
    if test_file is None:
        return validation_texts(run_dir)
    texts = _read(test_file)
    if not texts:
        raise MiniLLMError(f"--test-file: {test_file} holds no documents")
    return texts, str(test_file)


def evaluate_texts(model, tok, texts: list[str], source: str, stride: int = 0, batch_size: int = 16,
                   show_progress: bool | None = None) -> dict:
    """Score ``texts`` (see the module's docstring) in sliding windows ``stride`` apart (0: half the block),
    ``batch_size`` windows per forward pass, with progress bars on stderr for the encoding and the scoring
    (``show_progress`` None: on a terminal). Returns ``summarize``'s figures plus documents, source, stride
    and block_size."""
    from minillm.tokenizer import pad_id

    docs = encode_texts(tok, texts, show_progress)
    block = model.cfg.block_size
    stride = min(stride or max(1, block // 2), block)
    with progress_bar(sum(n_windows(len(d), block, stride) for d in docs), "evaluate", "win", show_progress) as bar:
        total, n = score(model, docs, stride, batch_size, pad_id(tok), progress=bar.update)
    res = summarize(total, n, sum(len(t.encode("utf-8")) for t in texts))
    res.update(documents=len(texts), source=source, stride=stride, block_size=block)
    return res
