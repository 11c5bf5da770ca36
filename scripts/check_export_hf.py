"""Check `minillm export --format hf` against transformers itself (no network needed).

For each architecture variant (Llama tied, Llama untied + GQA, Llama with biases, Qwen3 with QK-norm) it builds
a tiny model -- briefly trained on the bundled sample corpus with a tokenizer trained in-process, so its
logits are realistic -- exports it, loads the directory with transformers' AutoModelForCausalLM and
AutoTokenizer (local files only), and prints one PASS/FAIL line per check with the measured figure:

  - logits: max |transformers - minillm| in fp32 (must be < 1e-4)
  - greedy: 32 greedy tokens from transformers' generate() equal minillm's generate()
  - tokenizer: AutoTokenizer(text) == [<|doc|>] + minillm's encoding (BOS prepended, specials as text)
  - roundtrip: minillm's own loader gives bit-identical logits
  - bf16: the bf16 export's logits (transformers, fp32 compute) stay near (printed; PASS if < 0.1)

Usage (on a machine with transformers 5.x):
  .venv/bin/python scripts/check_export_hf.py [--device cpu|cuda] [--steps 150] [--ckpt RUN_OR_CKPT]
--ckpt checks one existing run instead of the built-in variants. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minillm.checkpoint import save_checkpoint  # noqa: E402
from minillm.config import ModelConfig, pad_vocab, to_dict  # noqa: E402
from minillm.export import export  # noqa: E402
from minillm.generation import generate  # noqa: E402
from minillm.io import sha256_file  # noqa: E402
from minillm.model.gpt import GPT  # noqa: E402
from minillm.model.load import load_exported, load_model  # noqa: E402
from minillm.tokenizer import doc_id, encode_documents, load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402

VARIANTS = {
    "llama": {},
    "llama-untied-gqa": {"tie_embeddings": False, "n_kv_head": 2},
    "llama-bias": {"bias": True},
    "qwen3-qknorm": {"qk_norm": True},
}
SAMPLE = ROOT / "minillm" / "data" / "sample_es.txt"
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def sample_docs() -> list[str]:
    from minillm.corpus.read import iter_documents

    return [d for d in iter_documents(SAMPLE) if d.strip()]


def make_run(root: Path, tok_path: Path, docs: list[list[int]], steps: int, seed: int, record: dict | None = None,
             **kw) -> Path:
    """A run directory holding a tiny model trained ``steps`` AdamW steps on ``docs``; ``record`` adds keys to
    its checkpoint (``check_export_gguf.py`` records a fine-tuning mode)."""
    tok = load_tokenizer(tok_path)
    cfg = ModelConfig(**{**dict(vocab_size=pad_vocab(tok.get_vocab_size()), block_size=64, n_layer=2, n_head=4,
                                n_embd=64), **kw})
    torch.manual_seed(seed)
    model = GPT(cfg)
    flat = torch.tensor([t for d in docs for t in d])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, flat.numel() - cfg.block_size - 1, (16,))
        batch = torch.stack([flat[s:s + cfg.block_size + 1] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if kw.get("bias"):
        with torch.no_grad():  # biases trained briefly stay near 0: make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    run = root / "run"
    run.mkdir(parents=True)
    tok_copy = run / "tokenizer.json"
    tok_copy.write_bytes(tok_path.read_bytes())
    save_checkpoint(run / "ckpt_best.pt", {"model": model.state_dict(), "model_config": to_dict(cfg),
                                           "train_config": {"doc_masking": False}, **(record or {}),
                                           "tokenizer_sha256": sha256_file(tok_copy)})
    print(f"  trained {steps} steps, final loss {loss.item():.3f}", flush=True)
    return run


def check(name: str, run: Path, work: Path, device: str, texts: list[str]) -> None:
    import transformers

    dkey = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model, state = load_model(run, device)
    out = work / f"{name}-hf"
    t0 = time.time()
    res = export(run, out)
    print(f"  exported {res['architecture']} ({res['params']:,} params) in {time.time() - t0:.2f}s", flush=True)
    tok = load_tokenizer(out / "tokenizer.json")
    doc = doc_id(tok)
    block = model.cfg.block_size
    prompts = [[doc, *tok.encode(t, add_special_tokens=False).ids][: block // 2] for t in texts]
    x = torch.tensor([p[:block // 2] for p in prompts if len(p) >= block // 2][:4] or [prompts[0]], device=device)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True, **{dkey: torch.float32})
    hf = hf.to(device).eval()
    with torch.no_grad():
        ours = model(x)
        diff = (hf(x).logits.float() - ours).abs().max().item()
    report(f"{name} logits", diff < 1e-4, f"max abs diff {diff:.3e} over {tuple(ours.shape)} fp32 logits "
           f"(|logits| max {ours.abs().max().item():.2f}), transformers {transformers.__version__}")

    n_new = block // 2
    same, total = 0, 0
    for p in prompts[:4]:
        p = p[: block // 4]
        want = generate(model, p, n_new, stop_id=doc, temperature=0)
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            got = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=doc, pad_token_id=tok.token_to_id("<|pad|>"))[0, len(p):].tolist()
        if got and got[-1] == doc and len(got) == len(want) + 1:
            got = got[:-1]
        total += 1
        same += got == want
    report(f"{name} greedy", same == total, f"{same}/{total} prompts give identical greedy tokens ({n_new} max)")

    hft = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    bad = [t for t in texts + ["texto con <|doc|> dentro"]
           if hft(t)["input_ids"] != [doc, *tok.encode(t, add_special_tokens=False).ids]]
    report(f"{name} tokenizer", not bad, f"{type(hft).__name__}: {len(texts) + 1 - len(bad)}/{len(texts) + 1} "
           f"texts encode identically with <|doc|> prepended" + (f"; first mismatch {bad[0][:40]!r}" if bad else ""))
    dec = hft.decode(hft(texts[0])["input_ids"], skip_special_tokens=True)
    report(f"{name} decode", dec == texts[0], "AutoTokenizer.decode(encode(text)) == text")

    back, _ = load_exported(out, device)
    with torch.no_grad():
        exact = torch.equal(back(x), ours)
    report(f"{name} roundtrip", exact, "minillm load_exported(export) logits bit-identical" if exact else "differ")

    export(run, work / f"{name}-bf16", dtype="bf16")
    hb = transformers.AutoModelForCausalLM.from_pretrained(work / f"{name}-bf16", local_files_only=True,
                                                           **{dkey: torch.float32}).to(device).eval()
    with torch.no_grad():
        d16 = (hb(x).logits.float() - ours).abs().max().item()
    report(f"{name} bf16", d16 < 0.1, f"bf16 weights (fp32 compute): max abs diff {d16:.3e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per tiny model")
    ap.add_argument("--ckpt", type=Path, default=None, help="check this run/checkpoint instead of the variants")
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        print("FAIL setup: transformers is not installed (pip install transformers)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}", flush=True)
    texts = sample_docs()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.ckpt is not None:
            check("ckpt", args.ckpt, work, args.device, [t[:300] for t in texts[:8]])
        else:
            tok = train_tokenizer(texts, 2000)
            tok_path = work / "tokenizer.json"
            save_tokenizer(tok, tok_path)
            docs = encode_documents(tok, texts)
            for i, (name, kw) in enumerate(VARIANTS.items()):
                print(f"== {name} {kw}", flush=True)
                run = make_run(work / name, tok_path, docs, args.steps, seed=i, **kw)
                check(name, run, work, args.device, [t[:300] for t in texts[:8]])
    print(f"{'FAIL' if FAILED else 'PASS'} overall: {len(FAILED)} failed check(s) {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
