"""Check `minillm export --format gguf` against llama.cpp itself, through llama-cpp-python (no network needed
once llama-cpp-python is built).

llama-cpp-python is built from source by pip (`pip wheel --no-binary :all: llama-cpp-python`, which compiles
llama.cpp with cmake) into the cache directory you name, once: the script prints how long the build took
(and records it in CACHE/build.json); later runs reuse CACHE/site.

It trains a tokenizer and tiny models of each architecture variant we export (Llama tied; Llama untied +
GQA; Llama with biases; Qwen3 (QK-norm) tied; Qwen3 untied + GQA) for --steps AdamW steps on the bundled
sample corpus, holding out its last documents, exports each one and prints one PASS/FAIL line per check:

  - tokens: llama.cpp's tokenizer (special-token parsing off, BOS added) gives [<|doc|>] + minillm's ids on
    every held-out document and on texts with accents, emoji, leading spaces, newlines, tabs and `<|doc|>`
    inside the text; with special-token parsing on, the difference (`<|doc|>` becomes one control token) is
    printed, not checked
  - logits: max |llama.cpp - minillm| over fp32 logits of held-out windows, fp32 KV cache (< 1e-4); the
    default f16 KV cache is printed too
  - greedy: 64 greedy tokens from llama.cpp's own sampler (temp 0) == minillm's generate(), per prompt
  - q8_0: held-out loss of the q8_0 file under llama.cpp within 2% of minillm's fp32 loss
  - chat: the SFT chat template in the file, rendered by llama-cpp-python's Jinja2ChatFormatter, is the
    text `finetune --mode sft` trains on (first variant only)

Usage:
  .venv/bin/python scripts/check_export_gguf.py --cache ~/.cache/minillm-llamacpp [--jobs 2] [--steps 150]
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minillm.export import export  # noqa: E402
from minillm.generation import generate  # noqa: E402
from minillm.model.load import load_model  # noqa: E402
from minillm.tokenizer import doc_id, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402

VARIANTS = {
    "llama": {},
    "llama-untied-gqa": {"tie_embeddings": False, "n_kv_head": 2},
    "llama-bias": {"bias": True},
    "qwen3": {"qk_norm": True},
    "qwen3-untied-gqa": {"qk_norm": True, "tie_embeddings": False, "n_kv_head": 2},
}
SAMPLE = ROOT / "minillm" / "data" / "sample_es.txt"
HARD_TEXTS = [
    "Él comió pingüino y ñandú en Cádiz; ¿qué más? ¡Añejo!",
    "emoji: 🦙🚀 👍🏽 👨‍👩‍👧 ✅ fin",
    "   tres espacios delante, y dos  en medio",
    "línea uno\n\nlínea dos\n  sangrada\n\n\n",
    "\ttabulador\t y retorno\r\n final",
    "un <|doc|> dentro del texto y <|pad|> también",
    "números 3.14159, 1000000 y 12:30h — «comillas» “tipográficas” …",
    "日本語のテキスト と 中文 混合 mixed",
]
GGML_TYPE_F32 = 0
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


# ------------------------------------------------------------------------------ llama-cpp-python


def ensure_llama_cpp(cache: Path, jobs: int, spec: str):
    """Import llama_cpp from ``cache/site``, building it there first if absent; prints the build time."""
    site, meta = cache / "site", cache / "build.json"
    if not (site / "llama_cpp").is_dir():
        wheels = cache / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
        print(f"building llama-cpp-python from source ({spec}) with {jobs} parallel jobs into {cache}; "
              f"this takes minutes ...", flush=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", ":all:", "-w",
                        str(wheels), spec], check=True, env=env)
        seconds = time.time() - t0
        wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel),
                        "diskcache"], check=True)
        meta.write_text(json.dumps({"build_seconds": round(seconds, 1), "jobs": jobs, "wheel": wheel.name,
                                    "cpus": os.cpu_count(), "date": datetime.date.today().isoformat()}))
    sys.path.insert(0, str(site))
    import llama_cpp

    built = json.loads(meta.read_text()) if meta.is_file() else {}
    print(f"llama-cpp-python {llama_cpp.__version__} from {site} (built in {built.get('build_seconds', '?')} s with "
          f"{built.get('jobs', '?')} jobs on {built.get('cpus', '?')} CPUs, {built.get('date', '?')})", flush=True)
    return llama_cpp


def load(llama_cpp, path: Path, n_ctx: int, threads: int, f32_cache: bool = True, repack: bool = True):
    """A ``Llama`` with every position's logits; ``repack=False`` is llama.cpp's ``--no-repack`` (no extra
    weight buffer types such as AMX)."""
    kw = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    lib = llama_cpp.llama_cpp  # the ctypes module Llama reads its default model parameters from
    default = lib.llama_model_default_params

    def params():
        mp = default()
        mp.use_extra_bufts = repack
        return mp

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                               verbose=False, n_threads=threads, n_threads_batch=threads, seed=0, **kw)
    finally:
        lib.llama_model_default_params = default


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits (T, V) for one sequence, from an empty context."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy())


# ------------------------------------------------------------------------------------ the models


def sample_docs() -> list[str]:
    from minillm.corpus.read import iter_documents

    return [d for d in iter_documents(SAMPLE) if d.strip()]


def make_run(root: Path, tok_path: Path, docs: list[list[int]], steps: int, seed: int, mode: str | None = None,
             **kw) -> Path:
    """``check_export_hf.make_run``'s tiny trained model, block 128; ``mode`` records a fine-tuning mode in the
    checkpoint as ``finetune`` does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from check_export_hf import make_run as trained_run

    return trained_run(root, tok_path, docs, steps, seed, record={"finetune": {"mode": mode}} if mode else None,
                       **{"block_size": 128, **kw})


# ---------------------------------------------------------------------------------------- checks


def check_tokens(name: str, llm, tok, texts: list[str]) -> None:
    doc = doc_id(tok)
    bad, special_diff = [], []
    for t in texts:
        ours = [doc, *tok.encode(t, add_special_tokens=False).ids]
        if llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) != ours:
            bad.append(t)
        with_special = llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)
        if with_special != ours:
            special_diff.append((t, with_special, ours))
    n_tok = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
    report(f"{name} tokens", not bad, f"{len(texts) - len(bad)}/{len(texts)} texts ({n_tok} tokens, incl. accents, "
           f"emoji, leading spaces, newlines, <|doc|> in text) give identical ids, special-token parsing off"
           + (f"; first mismatch {bad[0][:50]!r}" if bad else ""))
    if special_diff:
        t, got, want = special_diff[0]
        print(f"  note: with special-token parsing on, {len(special_diff)} text(s) differ, e.g. {t[:40]!r}: "
              f"llama.cpp {len(got)} ids vs minillm {len(want)} (<|doc|> parsed as the control token {doc})")


def windows(docs: list[list[int]], block: int, n: int) -> list[list[int]]:
    """Up to ``n`` consecutive windows of ``block`` tokens of the held-out documents (each with its <|doc|>)."""
    flat = [t for d in docs for t in d]
    return [flat[i:i + block] for i in range(0, len(flat) - block, block)][:n]


def check_logits(name: str, llama_cpp, path: Path, model, wins: list[list[int]], threads: int) -> None:
    block = model.cfg.block_size
    for f32 in (True, False):
        llm = load(llama_cpp, path, block, threads, f32_cache=f32)
        diff, top = 0.0, 0.0
        for w in wins:
            with torch.no_grad():
                ours = model(torch.tensor([w]))[0]
            diff = max(diff, (llama_logits(llm, w) - ours).abs().max().item())
            top = max(top, ours.abs().max().item())
        if f32:
            report(f"{name} logits", diff < 1e-4, f"max abs diff {diff:.2e} over {len(wins)} x {block} fp32 logits "
                   f"(|logits| max {top:.1f}), fp32 KV cache")
        else:
            print(f"  note: with llama.cpp's default f16 KV cache the max abs diff is {diff:.2e}", flush=True)
        del llm


def check_greedy(name: str, llama_cpp, path: Path, model, tok, prompts: list[list[int]], threads: int) -> None:
    doc, n_new = doc_id(tok), 64
    llm = load(llama_cpp, path, model.cfg.block_size, threads)
    same, lengths = 0, []
    for p in prompts:
        want = generate(model, p, n_new, stop_id=doc, temperature=0)
        got = []
        for t in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if t == doc or len(got) == n_new:
                break
            got.append(t)
        same += got == want
        lengths.append(len(want))
    report(f"{name} greedy", same == len(prompts), f"{same}/{len(prompts)} prompts give identical greedy "
           f"continuations (lengths {lengths}, {n_new} max)")


def held_out_loss(logits_of, wins: list[list[int]]) -> float:
    total, n = 0.0, 0
    for w in wins:
        x = torch.tensor(w)
        total += F.cross_entropy(logits_of(w)[:-1], x[1:], reduction="sum").item()
        n += len(w) - 1
    return total / n


def check_q8(name: str, llama_cpp, run: Path, work: Path, model, wins: list[list[int]], threads: int,
             repack: bool) -> None:
    out = work / f"{name}-q8_0.gguf"
    res = export(run, out, "gguf", dtype="q8_0")
    # repacking off: this llama.cpp's AMX repacking of Q8_0 segfaults on AMX CPUs (llama.cpp issues #20824,
    # #19184), with llama.cpp's own Q8_0 files too
    llm = load(llama_cpp, out, model.cfg.block_size, threads, repack=repack)
    with torch.no_grad():
        ours = held_out_loss(lambda w: model(torch.tensor([w]))[0], wins)
    theirs = held_out_loss(lambda w: llama_logits(llm, w), wins)
    rel = abs(theirs - ours) / ours
    report(f"{name} q8_0", rel < 0.02, f"held-out loss {theirs:.4f} (llama.cpp, q8_0, {out.stat().st_size / 1e6:.2f} MB, "
           f"{res['tensor_types']}{'' if repack else ', --no-repack'}) vs {ours:.4f} (minillm fp32): "
           f"{100 * rel:.2f}% apart")


def check_chat(llama_cpp, tok_path: Path, docs: list[list[int]], work: Path, threads: int) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from minillm.data.sft import format_example

    run = make_run(work / "sft", tok_path, docs, 1, seed=99, mode="sft")
    out = work / "sft.gguf"
    export(run, out, "gguf")
    llm = load(llama_cpp, out, 128, threads)
    template = llm.metadata.get("tokenizer.chat_template")
    msgs = [{"role": "system", "content": "Responde en una palabra."}, {"role": "user", "content": "¿Capital de Perú?"},
            {"role": "assistant", "content": "Lima"}, {"role": "user", "content": "¿Y de Chile?"}]
    fmt = Jinja2ChatFormatter(template or "", eos_token="<|doc|>", bos_token="<|doc|>")
    prompt = fmt(messages=msgs).prompt
    trained = "".join(t for t, _ in format_example({"messages": [*msgs, {"role": "assistant", "content": "x"}]})
                      .segments[:-1])
    report("sft chat template", template is not None and prompt == trained,
           f"llama-cpp-python's Jinja2ChatFormatter renders the file's template to the SFT training text "
           f"({len(prompt)} chars, ends {prompt[-16:]!r})")


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="directory to build llama-cpp-python in (reused)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for the build")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp and torch CPU threads")
    ap.add_argument("--steps", type=int, default=150, help="training steps per tiny model")
    ap.add_argument("--llama-cpp-python", default="llama-cpp-python", help="pip requirement or sdist to build")
    ap.add_argument("--repack", action="store_true", help="let llama.cpp repack the q8_0 weights (AMX: may crash)")
    args = ap.parse_args()
    t_start = time.time()
    llama_cpp = ensure_llama_cpp(args.cache.expanduser(), args.jobs, args.llama_cpp_python)
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, gguf {version('gguf')}, "
          f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    texts = sample_docs()
    n_held = max(4, len(texts) // 10)
    train_texts, held = texts[:-n_held], texts[-n_held:]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tok_path = work / "tokenizer.json"
        save_tokenizer(train_tokenizer(train_texts, 2000), tok_path)
        tok = load_tokenizer(tok_path)
        docs, held_docs = encode_documents(tok, train_texts), encode_documents(tok, held)
        wins = windows(held_docs, 128, 8)
        prompts = [d[:16] for d in held_docs if len(d) >= 16][:4]
        print(f"tokenizer {tok.get_vocab_size()} tokens; {len(train_texts)} training / {len(held)} held-out "
              f"documents; {len(wins)} held-out windows of 128", flush=True)
        for i, (name, kw) in enumerate(VARIANTS.items()):
            print(f"== {name} {kw}", flush=True)
            run = make_run(work / name, tok_path, docs, args.steps, seed=i, **kw)
            model, _ = load_model(run)
            path = work / f"{name}.gguf"
            res = export(run, path, "gguf", dtype="fp32")
            print(f"  exported {res['architecture']}: {res['params']:,} params, {res['vocab']} tokens "
                  f"({res['unused_tokens']} unused padding)", flush=True)
            llm = load(llama_cpp, path, 128, args.threads)
            check_tokens(name, llm, tok, held + HARD_TEXTS)
            del llm
            check_logits(name, llama_cpp, path, model, wins, args.threads)
            check_greedy(name, llama_cpp, path, model, tok, prompts, args.threads)
            check_q8(name, llama_cpp, run, work, model, wins, args.threads, args.repack)
        check_chat(llama_cpp, tok_path, docs, work, args.threads)
    print(f"{'FAIL' if FAILED else 'PASS'} overall: {len(FAILED)} failed check(s) {FAILED} "
          f"in {time.time() - t_start:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
