"""Decoding speed and quality (issue 22): tokens/s of the K-steps-per-graph decoder against the one-token graph
decoder and Hugging Face transformers on the same shape, the time to the first streamed token against its floor,
and the teacher-forced loss of the bf16 decode step against fp32 on a model trained here.

    python scripts/bench_generate.py                       # all of it on a CUDA GPU (about 5 minutes on an H100)
    python scripts/bench_generate.py --config tiny --device cpu --vocab 512 --no-hf --no-train   # smoke test
    # issue 22's rows: the compiled decoder against today's default, and the transformers row
    python scripts/bench_generate.py --no-train --dtypes bf16 --decoders graphKf,graphKc --repeats 2 \\
        --only "large default batch 1,large greedy batch 1,large default batch 32,small default batch 1,HF large default"

Decode rows: for each --configs preset (random weights, vocab --vocab) and --dtypes, each --sampling setting
(default = generate's defaults: temperature 0.8, top-k 50, top-p 0.95, repetition penalty 1.1; greedy = argmax,
no penalty), each --decoders entry (graph1: one token per CUDA-graph replay and read-back, the decoder before
issue 22; graphK: --chunk tokens per replay, sampling on the GPU; graphKf: graphK decoding with each layer's q/k/v
and gate/up projections concatenated, three matrix products fewer a layer, and in bf16 on CUDA the step as Triton
kernels (six a layer, ``minillm.model.triton_decode``: generate's default); graphKe: graphKf without the kernels
(MINILLM_DECODE=torch); on CPU the static step run eagerly; graphKc: graphKf with each step, sampling included, torch.compile'd, generate's --compile on; graphKb: generate's
--compile background, graphKf while graphKc's step compiles on a thread, then graphKc: the row reports the first run's
tokens/s, the background compile's seconds and a profile of the compile thread's stack sampled every 0.5 s (also when
--compile-wait runs out first), then the compiled chunk's tokens/s; graphKct, graphKca: graphKb compiling under
inductor's coordinate_descent_tuning, or mode max-autotune-no-cudagraphs's options), at
batch 1 (one --prompt-len prompt) and each --batch size of prompts batched (random lengths in [prompt-len/4, prompt-len]):
--new-tokens each, no stop token, so every run makes exactly that many. Each row runs once untimed (CUDA-graph capture,
warm-up), then --repeats times; the median is reported. --row-timeout runs each row in a process of its own (and
a cold inductor cache of its own), killed after that many seconds (a "timeout" line). graphKc rows are followed by a "warm_start" line: the
first run's seconds again with the compiled kernels cached (dynamo's caches reset, the inductor cache kept, as a
second ``generate --compile on`` would start); their ``first_run_s`` is cold when --compile-cache is new (the default: a
temporary directory). --only picks rows by the words of their names. A preset whose block is shorter than prompt + new tokens
slides (re-encodes its context) as generate does: `small` (block 256) does every 64 tokens at these settings.

Hugging Face rows (last; --hf-configs, batch 1): ``LlamaForCausalLM`` of the same shape, random weights, static cache
(which transformers compiles), ``generate`` with the same sampling settings and no end token.

Training and quality (first; not with --no-train): a `small` model trained --train-steps steps on --corpus (default the
bundled Spanish sample) without its last --heldout documents; the mean next-token loss of the held-out documents'
first block fed one token at a time through the CUDA-graph decode step (``GPT.decode_step``) in fp32 and in bf16
(the target: within 0.5%); then the seconds from starting ``minillm generate --stream`` on that checkpoint to its
first printed byte, for --decode-chunk 16 and 1, against the floor (a process that imports torch, initialises CUDA
and loads the checkpoint).

Output: one JSON object a line on stdout, also appended to $OUT/bench_generate.jsonl when OUT is set; a readable
line per row on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

from minillm.config import resolve  # noqa: E402
from minillm.generation import (  # noqa: E402
    DECODE_CHUNK,
    Sampling,
    _Decoder,
    decode_mode,
    finish_background,
    generate_batch,
)
from minillm.model.gpt import GPT  # noqa: E402

SAMPLINGS = {"default": Sampling(0.8, 50, 0.95, 1.1), "greedy": Sampling(temperature=0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def emit(row: dict) -> dict:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "bench_generate.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(row: dict, fn, device: torch.device, repeats: int) -> dict:
    """Run ``fn`` (-> the number of new tokens) once untimed, then ``repeats`` times; the median tokens/s."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    warm = time.perf_counter() - t0
    secs, tokens = [], 0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        tokens = fn()
        sync(device)
        secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    row |= {"tokens": tokens, "seconds": round(med, 4), "tokens_per_s": round(tokens / med, 1),
            "runs_tokens_per_s": [round(tokens / s, 1) for s in secs], "first_run_s": round(warm, 2)}
    print(f"{row['name']:<52} {row['tokens_per_s']:>10.1f} tok/s  (first run {warm:.2f} s)", file=sys.stderr, flush=True)
    return emit(row)


def decoders(names: list[str], device: torch.device, chunk: int) -> dict[str, tuple[str, int, bool, dict]]:
    """Decoder name -> (generate_batch's mode, chunk, fused, inductor options while the row runs). graphKe runs
    with MINILLM_DECODE=torch (``decode_env``)."""
    k_mode = "graph" if device.type == "cuda" else "static"
    table = {"graph1": (decode_mode(device, "auto"), 1, False, {}), "graphK": (k_mode, chunk, False, {}),
             "graphKf": (k_mode, chunk, True, {}), "graphKe": (k_mode, chunk, True, {}),
             "graphKc": ("compiled", chunk, True, {}),
             "graphKb": ("background", chunk, True, {}),
             "graphKct": ("background", chunk, True, {"coordinate_descent_tuning": True}),
             "graphKca": ("background", chunk, True, torch._inductor.list_mode_options()["max-autotune-no-cudagraphs"])}
    return {n: table[n] for n in names}


@contextlib.contextmanager
def decode_env(decoder: str):
    """graphKe: the fused step without the Triton kernels (MINILLM_DECODE=torch, the default decoder before them)."""
    old = os.environ.get("MINILLM_DECODE")
    if decoder == "graphKe":
        os.environ["MINILLM_DECODE"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINILLM_DECODE", None)
        else:
            os.environ["MINILLM_DECODE"] = old


def selected(name: str, only: str) -> bool:
    """Whether the row ``name`` is asked for: --only is comma-separated patterns, each a few words that must all be
    words of the name ('large default batch 1' picks every large batch-1 row with default sampling); empty: all."""
    words = set(name.split())
    return not only or any(set(p.split()) <= words for p in only.split(",") if p.strip())


def warm_start(name: str, model: GPT, fn) -> dict:
    """The seconds of ``fn``'s first run again with dynamo's caches reset and the compiled kernels cached, as a
    later process would start (a compiled row ``name``)."""
    import torch._dynamo

    torch._dynamo.reset()
    model.decoders.clear()
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    secs = time.perf_counter() - t0
    print(f"{name:<52} warm start {secs:.2f} s", file=sys.stderr, flush=True)
    return emit({"kind": "warm_start", "name": name, "seconds": round(secs, 2)})


def row_specs(args) -> list[tuple[str, str, str, str, str, int]]:
    """The decode rows asked for: (name, config, dtype, sampling, decoder, rows) in the order they run."""
    return [(f"{config} {dtype} {sname} {dname} batch {rows}", config, dtype, sname, dname, rows)
            for config in args.configs.split(",") for dtype in args.dtypes.split(",")
            for sname in args.sampling.split(",") for dname in args.decoders.split(",")
            for rows in (1, *batches(args)) if selected(f"{config} {dtype} {sname} {dname} batch {rows}", args.only)]


def batches(args) -> list[int]:
    return [int(b) for b in str(args.batch).split(",") if b]


def child_rows(args, specs) -> None:
    """--row-timeout: each row in a process of its own (and, without --compile-cache, a cold inductor cache of its
    own), killed after --row-timeout seconds: a compile that takes minutes says so and the next rows still run."""
    for name, *_ in specs:
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--only", name, "--row-timeout", "0",
               "--no-train", "--no-hf", "--child"]
        env = os.environ | ({} if args.compile_cache else
                            {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="bench-inductor-")})
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.row_timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"{name:<52} stopped after {args.row_timeout} s", file=sys.stderr, flush=True)
            emit({"kind": "timeout", "name": name, "seconds": args.row_timeout})
            continue
        if rc:
            emit({"kind": "error", "name": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)})


def compile_report(name: str) -> dict:
    """Where the compiles of the row went: dynamo's and inductor's timed phases (seconds, summed; the top 12) and
    inductor's counters (cache hits, autotuning); both reset for the next row."""
    from torch._dynamo.utils import compilation_time_metrics, compile_times, counters

    phases, values = compile_times(repr="csv", aggregate=True)
    top = sorted(((p, round(float(v), 2)) for p, v in zip(phases, values, strict=True)), key=lambda x: -x[1])[:12]
    row = {"kind": "compile_times", "name": name, "phases_s": dict(top), "inductor": dict(counters["inductor"]),
           "stats": dict(counters["stats"])}
    print(f"{name:<52} compile: " + ", ".join(f"{p} {v}" for p, v in top[:5]), file=sys.stderr, flush=True)
    compilation_time_metrics.clear()
    counters.clear()
    return emit(row)


def where(stack: list[tuple[str, str]]) -> str:
    """A compile thread's stack in a few words: its five innermost frames in torch's compiler or triton, outermost
    first (e.g. 'triton_heuristics.autotune_to_one_config > ... > triton_heuristics.benchmark_all_configs')."""
    marks = ("_dynamo", "_inductor", "triton", "_functorch")
    return " > ".join([f"{Path(path).stem}.{fn}" for path, fn in stack if any(m in path for m in marks)][-5:])


def wait_sampled(built: list, timeout: float | None, every: float = 0.5) -> tuple[bool, dict[str, int]]:
    """Wait for the background compiles (at most ``timeout`` seconds), sampling their threads' stacks every
    ``every`` seconds: whether they ended, and how many samples each place (``where``) had: the compile's profile."""
    import collections

    seen: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    while any(not b.done() for b in built) and (timeout is None or time.perf_counter() - t0 < timeout):
        for b in built:
            if not b.done():
                seen[where(b.stack()) or "(outside torch's compiler)"] += 1
        time.sleep(every)
    return all(b.done() for b in built), dict(seen.most_common(15))


def background_row(row: dict, fn, model: GPT, device: torch.device, repeats: int, wait: float | None) -> dict:
    """graphKb (``--compile background``): the first run's tokens/s (the graph chunks, the chunk step compiling on
    a thread meanwhile), the background compile's seconds, waited for (at most ``wait``) while its stack is sampled;
    then ``measure``: its untimed run switches to the compiled chunk (warm-up, capture), the timed ones are the
    compiled chunk's. A compile still running after ``wait`` is reported with its profile so far, not measured."""
    sync(device)
    t0 = time.perf_counter()
    tokens = fn()
    sync(device)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    built = finish_background(model, timeout=0)
    ended, profile = wait_sampled(built, wait)
    row |= {"first_run_tokens_per_s": round(tokens / first, 1), "compile_ended": ended,
            "background_s": round(max((b.seconds for b in built), default=0.0), 2) if ended else None,
            "waited_after_first_run_s": round(time.perf_counter() - t1, 2), "notes": [b.note for b in built],
            "compile_profile_samples": profile}
    print(f"{row['name']:<52} first run {tokens / first:.1f} tok/s while compiling; "
          + (("no chunk ran: nothing compiled" if not built else f"compiled in {row['background_s']} s") if ended
             else f"still compiling after {wait} s"),
          file=sys.stderr, flush=True)
    for place, n in list(profile.items())[:5]:
        print(f"    {n:>4} x 0.5 s  {place}", file=sys.stderr, flush=True)
    if not ended:
        return emit(row)
    emit(row | {"kind": "background_compile"})  # said before the timed runs, which a --row-timeout may cut short
    return measure(row, fn, device, repeats)


def decode_rows(args, device: torch.device) -> None:
    specs = row_specs(args)
    if args.row_timeout:
        return child_rows(args, specs)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist()
    lens = torch.randint(max(1, args.prompt_len // 4), args.prompt_len + 1, (max(batches(args)),), generator=g).tolist()
    prompts = [torch.randint(0, args.vocab, (n,), generator=g).tolist() for n in lens]
    models: dict[tuple[str, str], GPT] = {}
    for name, config, dtype, sname, dname, rows in specs:
        if (config, dtype) not in models:
            models.clear()
            mcfg = dataclasses.replace(resolve(config)[0], vocab_size=-(-args.vocab // 64) * 64)
            torch.manual_seed(0)
            models[(config, dtype)] = GPT(mcfg).to(device, DTYPES[dtype]).eval()
        model = models[(config, dtype)]
        model.decoders.clear()  # each row builds its own decoders (graphKe's are not graphKf's)
        mode, chunk, fused, options = decoders([dname], device, args.chunk)[dname]
        batch = [prompt] if rows == 1 else prompts[:rows]

        def run(model=model, batch=batch, sname=sname, mode=mode, chunk=chunk, fused=fused) -> int:
            gen = torch.Generator(device).manual_seed(0)
            out = generate_batch(model, batch, args.new_tokens, sampling=SAMPLINGS[sname], generator=gen, mode=mode,
                                 chunk=chunk, fused=fused, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
            return sum(len(c.tokens) for c in out)

        row = {"kind": "decode", "name": name, "config": config, "dtype": dtype, "sampling": sname, "decoder": dname,
               "mode": mode, "chunk": chunk, "fused": fused, "batch": rows, "params": model.num_params(),
               "inductor_options": options}
        with torch._inductor.config.patch(options), decode_env(dname):
            if mode == "background":
                background_row(row, run, model, device, args.repeats, args.compile_wait or None)
            else:
                measure(row, run, device, args.repeats)
            if mode in ("compiled", "background"):
                compile_report(name)
            if mode == "compiled":
                warm_start(name, model, run)


def hf_rows(args, device: torch.device) -> None:
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        emit({"kind": "hf", "skipped": f"transformers not importable: {e}"})
        return
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    for config in [c for c in args.hf_configs.split(",") if c]:
        m = resolve(config)[0]
        hcfg = LlamaConfig(vocab_size=-(-args.vocab // 64) * 64, hidden_size=m.n_embd, intermediate_size=m.mlp_hidden,
                           num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads,
                           head_dim=m.head_dim, max_position_embeddings=m.block_size, rope_theta=m.rope_theta,
                           rms_norm_eps=1e-6, tie_word_embeddings=m.tie_embeddings, attention_bias=False)
        for dtype in args.dtypes.split(","):
            torch.manual_seed(0)
            model = LlamaForCausalLM(hcfg).to(device, DTYPES[dtype]).eval()
            model.generation_config.eos_token_id = None
            for sname in args.sampling.split(","):
                s = SAMPLINGS[sname]
                kw = ({"do_sample": True, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
                      if s.temperature > 0 else {"do_sample": False})

                def run(model=model, kw=kw, s=s) -> int:
                    out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                         repetition_penalty=s.repetition_penalty, cache_implementation="static",
                                         pad_token_id=0, **kw)
                    return out.shape[1] - prompt.shape[1]

                name = f"HF {config} {dtype} {sname} static cache batch 1"
                if not selected(name, args.only):
                    continue
                try:
                    measure({"kind": "hf", "name": name, "config": config,
                             "dtype": dtype, "sampling": sname, "batch": 1, "transformers": transformers.__version__},
                            run, device, args.repeats)
                except Exception as e:  # a transformers version without these options: say so, keep the rest
                    emit({"kind": "hf", "name": f"HF {config} {dtype} {sname}", "error": f"{type(e).__name__}: {e}"})


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "minillm", *args]


def train_small(args, work: Path) -> tuple[Path, list[str]]:
    """A `small` run on --corpus without its last --heldout documents -> (run directory, held-out texts)."""
    from minillm.corpus.read import iter_documents

    docs = list(iter_documents(Path(args.corpus)))
    train, held = docs[: -args.heldout], docs[-args.heldout:]
    (work / "train.txt").write_text("\n<|doc|>\n".join(train) + "\n", encoding="utf-8")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    for cmd in (cli("init-tokenizer", "-f", str(work / "train.txt"), "--vocab-size", "4096", "-o", str(work / "tok.json")),
                cli("train", "-t", str(work / "tok.json"), "-c", str(work / "train.txt"), "-o", str(work / "run"),
                    "--config", "small", "--max-steps", str(args.train_steps), "--epochs", "0", "--compile", "off")):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    emit({"kind": "train", "config": "small", "steps": args.train_steps, "train_docs": len(train),
          "heldout_docs": len(held), "seconds": round(time.perf_counter() - t0, 1)})
    return work / "run", held


def decode_loss(model: GPT, windows: list[list[int]]) -> float:
    """Mean next-token cross-entropy of ``windows`` (same lengths), each token fed alone through the static step
    ``generate`` decodes with (a CUDA graph on CUDA; the fused step where the weights are not fp32, as
    ``minillm generate`` picks it), the KV cache in the weights' dtype."""
    p = next(model.parameters())
    x = torch.tensor(windows, device=p.device)  # (B, T)
    mode = decode_mode(p.device, "auto") if p.device.type == "cuda" else "static"
    dec = _Decoder(model, len(windows), mode, x.size(1), fused=p.dtype != torch.float32)
    with torch.no_grad():
        logits = [dec.prefill([w[:1] for w in windows])]
        for t in range(1, x.size(1) - 1):
            logits.append(dec.step(x[:, t]))
    out = torch.stack(logits, 1).float()  # (B, T-1, V)
    return float(torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()))


def loss_check(run: Path, held: list[str], device: torch.device) -> None:
    from minillm.model.load import load_model
    from minillm.tokenizer import encode_documents, load_tokenizer

    model, _ = load_model(run, str(device))
    tok = load_tokenizer(run / "tokenizer.json")
    T = model.cfg.block_size
    windows = [d[:T] for d in encode_documents(tok, held) if len(d) >= T]
    with torch.no_grad():
        full = float(model(torch.tensor(windows, device=device)[:, :-1], torch.tensor(windows, device=device)[:, 1:]))
    fp32 = decode_loss(model.eval(), windows)
    model.decoders.clear()
    bf16 = decode_loss(model.to(torch.bfloat16), windows)
    rel = abs(bf16 - fp32) / fp32
    emit({"kind": "loss", "windows": len(windows), "tokens": len(windows) * (T - 1), "full_forward_fp32": round(full, 5),
          "decode_fp32": round(fp32, 5), "decode_bf16": round(bf16, 5), "relative_difference": round(rel, 5),
          "target": 0.005, "met": rel <= 0.005})
    print(f"held-out loss: forward fp32 {full:.4f}, decode fp32 {fp32:.4f}, decode bf16 {bf16:.4f} "
          f"({rel:.3%} apart; target <= 0.5%)", file=sys.stderr, flush=True)


def first_byte(cmd: list[str]) -> tuple[float, float, int]:
    """Seconds from starting ``cmd`` to its first byte on stdout and to its exit, and its exit status."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    os.read(p.stdout.fileno(), 1)
    first = time.perf_counter() - t0
    p.communicate()
    return first, time.perf_counter() - t0, p.returncode


def first_token_rows(run: Path, device: torch.device) -> None:
    ckpt = str(run / "ckpt_last.pt" if (run / "ckpt_last.pt").exists() else run)
    floor = ("import torch; from minillm.model.load import load_model; "
             f"torch.zeros(1, device={str(device)!r}); load_model({ckpt!r}, {str(device)!r}); print('x')")
    s, total, rc = first_byte([sys.executable, "-c", floor])
    emit_floor = s
    emit({"kind": "first_token", "name": "floor: import torch + CUDA init + load the checkpoint", "seconds": round(s, 3),
          "rc": rc})
    for chunk in (DECODE_CHUNK, 1):
        for run_ in ("first", "again"):  # first: Triton compiles this model's kernels (then cached on disk)
            s, total, rc = first_byte(cli("generate", "--ckpt", ckpt, "--stream", "--max-tokens", "128", "--seed", "0",
                                          "--device", str(device), "--decode-chunk", str(chunk)))
            emit({"kind": "first_token", "name": f"minillm generate --stream --decode-chunk {chunk} ({run_} run)",
                  "seconds": round(s, 3), "total_s": round(total, 3), "rc": rc, "target_s": 3.0})
            print(f"first streamed byte --decode-chunk {chunk}, {run_} run: {s:.2f} s (whole run {total:.2f} s)",
                  file=sys.stderr)
    print(f"floor: {emit_floor:.2f} s", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", "--config", default="small,large", help="presets, comma-separated (default small,large)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (padded to a multiple of 64)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="weight and KV-cache dtypes: fp32, bf16, comma-separated")
    ap.add_argument("--sampling", default="default,greedy", help="default (generate's), greedy; comma-separated")
    ap.add_argument("--decoders", default="graph1,graphK,graphKf",
                    help="graph1 (one token per replay), graphKe (graphKf without the Triton kernels: MINILLM_DECODE=torch), graphK (--chunk per replay), graphKf (graphK with the fused "
                         "q/k/v and gate/up projections), graphKc (graphKf torch.compile'd, --compile on: a compile per row, "
                         "so not in the default), graphKb (--compile background: graphKf, then graphKc once compiled on "
                         "a thread), graphKct (graphKb compiling with inductor's coordinate_descent_tuning), graphKca "
                         "(graphKb compiling with mode max-autotune-no-cudagraphs's options)")
    ap.add_argument("--only", default="", help="rows whose names hold all the words of one of these comma-separated "
                                               "patterns, e.g. 'large default batch 1,HF large' (default: every row)")
    ap.add_argument("--compile-cache", default="", help="inductor's cache for graphKc (TORCHINDUCTOR_CACHE_DIR; "
                                                        "default a new temporary directory: cold compiles)")
    ap.add_argument("--chunk", type=int, default=DECODE_CHUNK, help="tokens per replay for graphK")
    ap.add_argument("--new-tokens", type=int, default=512, help="new tokens per prompt")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (the longest of the batch)")
    ap.add_argument("--batch", default="32", help="prompts in the batched rows, comma-separated sizes (each besides "
                                                   "batch 1), e.g. 8,32")
    ap.add_argument("--row-timeout", type=int, default=0, help="seconds: each decode row in a process of its own, "
                                                              "killed after this long (a timeout line); 0 = in this one")
    ap.add_argument("--compile-wait", type=float, default=0, help="seconds a graphKb row waits for its background "
                                                                   "compile (then reports where it is); 0 = until done")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each row; the median is reported")
    ap.add_argument("--hf-configs", default="large", help="presets for the transformers rows ('' for none)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--no-train", action="store_true", help="skip training, the loss check and the first-token times")
    ap.add_argument("--corpus", default=str(ROOT / "minillm" / "data" / "sample_es.txt"), help="corpus to train on")
    ap.add_argument("--heldout", type=int, default=25, help="last documents of --corpus held out for the loss check")
    ap.add_argument("--train-steps", type=int, default=300, help="optimizer steps of the small model")
    ap.add_argument("--workdir", default="", help="where the trained run goes (default a temporary directory)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if not args.child:
        emit({"kind": "setup", "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__,
              "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "batch": args.batch, "chunk": args.chunk,
              "vocab": args.vocab, "command": " ".join(sys.argv)})
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.compile_cache or (os.environ.get("TORCHINDUCTOR_CACHE_DIR") if args.child
                                                                   else "") or tempfile.mkdtemp(prefix="bench-inductor-")
    t0 = time.perf_counter()
    if not args.no_train:  # first: quick, and what the acceptance needs besides speed
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-generate-"))
        work.mkdir(parents=True, exist_ok=True)
        run, held = train_small(args, work)
        loss_check(run, held, device)
        first_token_rows(run, device)
    decode_rows(args, device)
    if not args.no_hf:  # last: transformers compiles its static-cache step (tens of seconds per dtype)
        hf_rows(args, device)
    if not args.child:
        emit({"kind": "done", "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
