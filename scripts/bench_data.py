"""Data pipeline benchmark: tokenizer training time, token-cache build speed against the tokenizers
library's own ``encode_batch`` on the same text, and loader throughput.

    .venv/bin/python scripts/bench_data.py [--corpus ../shared/corpora/en_techdocs.txt] [--repeats 3]

Each figure is the median of ``--repeats`` runs (the spread is printed too). Results on stdout
(``--json`` for one JSON object), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.data import cache  # noqa: E402
from minillm.data.loader import Loader, Prefetcher  # noqa: E402
from minillm.data.windows import window_starts  # noqa: E402
from minillm.tokenizer import iter_training_texts, load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3), "runs": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "corpora" / "en_techdocs.txt")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-repeats", type=int, default=1, help="tokenizer trainings (slow)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--loader-batches", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    corpus = args.corpus
    n_bytes = corpus.stat().st_size
    res: dict = {"corpus": str(corpus), "corpus_mb": round(n_bytes / 1e6, 2), "cpus": os.cpu_count(),
                 "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)")}
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    tok_path = work / "tokenizer.json"

    times = []
    for i in range(0 if args.tokenizer else args.train_repeats):
        t = time.perf_counter()
        tok = train_tokenizer(iter_training_texts([corpus]), args.vocab_size)
        times.append(time.perf_counter() - t)
        log(f"tokenizer training {i + 1}: {times[-1]:.1f}s")
    if args.tokenizer:
        tok_path = args.tokenizer
    else:
        save_tokenizer(tok, tok_path)
        res["tokenizer_train_s"] = med(times)

    # the library's own encode_batch on the same text, in the same batches, text already in memory
    tok = load_tokenizer(tok_path)
    batches = [texts for texts, _, _ in cache._piece_batches(corpus, cache.BATCH_CHARS)]
    text_bytes = sum(len(t.encode("utf-8")) for b in batches for t in b)
    lib, fast = [], []
    for i in range(args.repeats):
        t = time.perf_counter()
        for b in batches:
            tok.encode_batch(b, add_special_tokens=False)
        lib.append(text_bytes / 1e6 / (time.perf_counter() - t))
        if hasattr(tok, "encode_batch_fast"):
            t = time.perf_counter()
            for b in batches:
                tok.encode_batch_fast(b, add_special_tokens=False)
            fast.append(text_bytes / 1e6 / (time.perf_counter() - t))
        log(f"encode_batch {i + 1}: {lib[-1]:.2f} MB/s" + (f" (encode_batch_fast {fast[-1]:.2f})" if fast else ""))
    del batches
    res["encode_batch_mb_s"] = med(lib)
    if fast:
        res["encode_batch_fast_mb_s"] = med(fast)

    # the token cache, from the file on disk to tokens.bin + docs.npy (fresh each time)
    build = []
    for i in range(args.repeats):
        cdir = work / f"cache{i}"
        t = time.perf_counter()
        built = cache.build_token_cache(tok_path, corpus, cdir)
        build.append(n_bytes / 1e6 / (time.perf_counter() - t))
        log(f"cache build {i + 1}: {build[-1]:.2f} MB/s ({built.n_tokens:,} tokens, {built.n_docs:,} documents)")
    res["cache_build_mb_s"] = med(build)
    res["cache_vs_encode_batch"] = round(statistics.median(build) / statistics.median(lib), 3)
    res["tokens"], res["documents"] = built.n_tokens, built.n_docs
    res["bytes_per_token"] = round(n_bytes / built.n_tokens, 3)

    # the loader: document-aligned windows, seeded order, vectorized gather (+ torch tensor via Prefetcher)
    stream = cache.write_stream(built, np.arange(built.n_docs), work / "train.bin")
    starts = window_starts(len(stream), args.block_size, args.block_size, stream.doc_starts)
    res["windows"] = len(starts)
    res["windows_at_doc_start"] = round(float(np.isin(starts, stream.doc_starts).mean()), 3)
    per_batch = args.batch_size * args.block_size
    raw, pre = [], []
    for i in range(args.repeats):
        lo = Loader(stream.tokens, starts, args.block_size, args.batch_size, seed=i)
        t = time.perf_counter()
        for _ in range(args.loader_batches):
            lo.next_batch()
        raw.append(per_batch * args.loader_batches / (time.perf_counter() - t) / 1e6)
        pf = Prefetcher(Loader(stream.tokens, starts, args.block_size, args.batch_size, seed=i), pin=False)
        pf.next()
        t = time.perf_counter()
        for _ in range(args.loader_batches):
            pf.next()
        pre.append(per_batch * args.loader_batches / (time.perf_counter() - t) / 1e6)
        pf.close()
        log(f"loader {i + 1}: {raw[-1]:.1f}M tokens/s (next_batch), {pre[-1]:.1f}M tokens/s (Prefetcher, torch)")
    res["loader_mtokens_s"] = med(raw)
    res["prefetcher_mtokens_s"] = med(pre)
    res["loader_config"] = {"block_size": args.block_size, "batch_size": args.batch_size, "batches": args.loader_batches}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
