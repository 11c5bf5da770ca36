"""The ``minillm`` command line: thin commands that resolve options, call the library and print.

Results go to stdout (``--json`` where offered), logs and progress to stderr. Library errors
(``MiniLLMError``) print one red line to stderr and exit 1; usage errors exit 2. ``--debug`` shows
tracebacks. torch is imported inside commands so ``minillm --help`` stays instant.
"""

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from minillm import __version__
from minillm.errors import MiniLLMError

app = typer.Typer(
    name="minillm",
    help="Train small transformer language models from scratch on your own text.\n\n"
    "Pipeline: prepare-corpus -> analyze-corpus -> init-tokenizer -> train -> generate / evaluate.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

_DEBUG = {"on": False}


def _err(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {msg}", markup=True)


def handle_errors(fn):
    """Turn library errors into a one-line message and an exit code (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MiniLLMError as e:
            if _DEBUG["on"]:
                raise
            _err(str(e).replace("[", r"\["))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure: say what, not a traceback
            if _DEBUG["on"]:
                raise
            if _is_oom(e):
                _err(_oom_message())
            else:
                _err(f"{type(e).__name__}: {str(e)[:300]}".replace("[", r"\[") + "  (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _is_oom(e: Exception) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _oom_message() -> str:
    return ("CUDA out of memory: halve --batch-size and double --accumulation-steps to keep the same batch "
            "(e.g. --batch-size 16 --accumulation-steps 2), or add --gradient-checkpointing; "
            "the last checkpoint in --outdir is intact")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minillm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _DEBUG["on"] = debug


# ---------------------------------------------------------------- prepare-corpus / analyze-corpus


@app.command("prepare-corpus")
@handle_errors
def prepare_corpus(
    input: list[Path] = typer.Option(..., "--input", "-i", help="Input file(s); repeat for several."),
    output: Path = typer.Option(..., "--output", "-o", help="Clean corpus to write (documents separated by <|doc|> lines)."),
    separator: str = typer.Option("<|doc|>", "--separator", help="The input's document separator line."),
) -> None:
    """Clean raw text into a corpus file: one document per block, separated by <|doc|> lines."""
    from minillm.checkpoint import atomic_open
    from minillm.corpus import iter_documents

    for p in input:
        if not p.is_file():
            raise MiniLLMError(f"--input: {p} does not exist")
        if p.resolve() == output.resolve():
            raise MiniLLMError(f"--output {output} is also an --input; write to another file")
    n = 0
    with atomic_open(output, "w", encoding="utf-8") as f:
        for p in input:
            for doc in iter_documents(p, separator):
                f.write(("\n<|doc|>\n" if n else "") + doc)
                n += 1
        f.write("\n")
    typer.echo(f"wrote {n} documents to {output}", err=True)


@app.command("analyze-corpus")
@handle_errors
def analyze_corpus(
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Corpus file to analyze."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Report corpus statistics and recommend block size, stride and model size."""
    from minillm.corpus import iter_documents

    if not corpus.is_file():
        raise MiniLLMError(f"--corpus: {corpus} does not exist")
    docs = list(iter_documents(corpus))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    report = {"documents": len(docs), "bytes": n_bytes, "est_tokens": n_bytes // 4}
    typer.echo(json.dumps(report, indent=2) if as_json else "\n".join(f"{k}: {v:,}" for k, v in report.items()))


# ---------------------------------------------------------------- init-tokenizer


def _iter_text_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise MiniLLMError(f"--files: {p} does not exist")
    if not files:
        raise MiniLLMError("--files: no input files found")
    return files


@app.command("init-tokenizer")
@handle_errors
def init_tokenizer(
    files: list[Path] = typer.Option(..., "--files", "-f", help="Corpus files or directories to train on; repeat for several."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Vocabulary size, special tokens included."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write tokenizer.json."),
    model: str = typer.Option("bpe", "--model", help="Tokenizer type: bpe (byte-level, never unknown), unigram, wordpiece."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Minimum count for a merge (bpe/wordpiece)."),
    special_tokens: list[str] = typer.Option([], "--special-tokens", help="Extra special tokens; <|doc|> and <|pad|> are always present."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Train a tokenizer (byte-level BPE by default) on corpus files and write tokenizer.json."""
    from minillm.corpus import iter_documents
    from minillm.tokenizer import describe, save_tokenizer, train_tokenizer

    paths = _iter_text_files(files)
    if any(p.resolve() == out.resolve() for p in paths):
        raise MiniLLMError(f"--out {out} is also an input; write the tokenizer to another file")

    def texts():
        for p in paths:
            yield from iter_documents(p)

    tok = train_tokenizer(texts(), vocab_size, model=model, min_frequency=min_frequency,
                          special_tokens=special_tokens, show_progress=sys.stderr.isatty())
    save_tokenizer(tok, out)
    sample = [d for _, d in zip(range(200), texts(), strict=False)]
    info = describe(tok, sample)
    info["path"] = str(out)
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False, indent=2))
    else:
        typer.echo(f"wrote {out}: vocabulary {info['vocab_size']:,}, {info['bytes_per_token']} bytes per token")
        for ex in info["examples"]:
            typer.echo(f"  {ex['text'][:60]!r} -> {ex['tokens'][:12]}")


# ---------------------------------------------------------------- train


@app.command()
@handle_errors
def train(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json from init-tokenizer."),
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Clean corpus file from prepare-corpus."),
    outdir: Path = typer.Option(..., "--outdir", "-o", help="Run directory for checkpoints, history and plots."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, small, medium, large, gpt2-124m) or a TOML file."),
    val_file: Optional[Path] = typer.Option(None, "--val-file", help="Separate validation corpus instead of a split."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Token cache directory (default RUN/cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --outdir from ckpt_last.pt exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --outdir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, parameter count, FLOPs and memory estimate, then exit."),
    log_format: str = typer.Option("text", "--log-format", help="Progress lines on stderr: text or json."),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="Wall-clock budget for the whole run, e.g. 90s, 2m, 1h."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="Context length in tokens."),
    n_layer: Optional[int] = typer.Option(None, "--n-layer", help="Number of transformer blocks."),
    n_head: Optional[int] = typer.Option(None, "--n-head", help="Attention heads."),
    n_kv_head: Optional[int] = typer.Option(None, "--n-kv-head", help="Key/value heads (grouped-query attention); 0 = n_head."),
    n_embd: Optional[int] = typer.Option(None, "--n-embd", help="Model width."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout rate."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Attention kernel: auto, flash, cudnn, efficient, math."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory."),
    doc_masking: Optional[bool] = typer.Option(None, "--doc-masking/--no-doc-masking", help="Restart positions and block attention at document boundaries."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Micro-batch size."),
    accumulation_steps: Optional[int] = typer.Option(None, "--accumulation-steps", help="Micro-batches per optimizer step."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the training windows."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (0 = no limit)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Final learning rate (default lr/10)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay."),
    beta1: Optional[float] = typer.Option(None, "--beta1", help="AdamW beta1."),
    beta2: Optional[float] = typer.Option(None, "--beta2", help="AdamW beta2."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient-norm clip (0 disables)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw, or muon (hidden matrices) + adamw."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps (0 = about 10 per run)."),
    eval_batches: Optional[int] = typer.Option(None, "--eval-batches", help="Validation batches per evaluation."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after N evaluations without improvement (0 = off)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Progress line every N steps."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, bf16, fp16 or fp32."),
    compile: Optional[str] = typer.Option(None, "--compile", help="torch.compile: auto (CUDA only), on, off."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Background threads preparing batches (0 = inline)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Step between windows (default block size: no overlap)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Fraction of documents held out for validation."),
) -> None:
    """Train a model: encode the corpus into a token cache, then train with evaluation and checkpoints."""
    from minillm.config import parse_duration, resolve
    from minillm.errors import UsageError

    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format: {log_format!r} is not one of text, json")
    overrides = {k: v for k, v in locals().items() if k in _TRAIN_KEYS}
    if max_time is not None:
        overrides["max_time"] = parse_duration(max_time)
    mcfg, tcfg = resolve(config, overrides)
    for p, flag in ((tokenizer, "--tokenizer"), (corpus, "--corpus")):
        if not p.is_file():
            raise MiniLLMError(f"{flag}: {p} does not exist")
    if dry_run:
        _dry_run(tokenizer, mcfg, tcfg)
        return
    from minillm.training import RunSpec
    from minillm.training import train as run_train

    spec = RunSpec(tokenizer=tokenizer, corpus=corpus, outdir=outdir, val_file=val_file, cache_dir=cache_dir,
                   resume=resume, overwrite=overwrite, log_format=log_format, config_name=config)
    summary = run_train(spec, mcfg, tcfg)
    typer.echo(json.dumps(summary))


_TRAIN_KEYS = {
    "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "attention", "gradient_checkpointing",
    "doc_masking", "batch_size", "accumulation_steps", "epochs", "max_steps", "lr", "min_lr", "warmup_steps",
    "weight_decay", "beta1", "beta2", "grad_clip", "optimizer", "eval_every", "eval_batches", "patience",
    "log_every", "precision", "compile", "device", "seed", "num_workers", "stride", "val_fraction",
}


def _dry_run(tokenizer: Path, mcfg, tcfg) -> None:
    import dataclasses

    from minillm.config import pad_vocab, to_dict
    from minillm.model import GPT, estimate_memory
    from minillm.tokenizer import load_tokenizer

    mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(load_tokenizer(tokenizer).get_vocab_size()))
    import torch

    with torch.device("meta"):
        model = GPT(mcfg)
    total, non_emb = model.num_params(), model.num_params(non_embedding=True)
    mem = estimate_memory(mcfg, tcfg.batch_size)
    report = {"model": to_dict(mcfg), "train": to_dict(tcfg), "params": total, "params_embedding": total - non_emb,
              "params_non_embedding": non_emb, "flops_per_token": model.flops_per_token(), "memory_estimate": mem}
    typer.echo(json.dumps(report, indent=2))


# ---------------------------------------------------------------- generate / evaluate


@app.command()
@handle_errors
def generate(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint (ckpt_best.pt / ckpt_last.pt) or run directory."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the run's tokenizer.json)."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue; empty starts a new document."),
    max_tokens: int = typer.Option(200, "--max-tokens", help="Maximum new tokens."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Keep the k most likely tokens (0 disables)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold in (0, 1]."),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="CTRL repetition penalty (1 disables)."),
    seed: int = typer.Option(1337, "--seed", help="Random seed: the same seed gives the same text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
) -> None:
    """Generate text from a trained checkpoint."""
    import torch

    from minillm.checkpoint import load_model, resolve_tokenizer
    from minillm.generation import check_sampling
    from minillm.generation import generate as gen
    from minillm.tokenizer import doc_id, load_tokenizer
    from minillm.training import resolve_device

    check_sampling(temperature, top_k, top_p, repetition_penalty)
    dev = resolve_device(device)
    model, state = load_model(ckpt, str(dev))
    tok = load_tokenizer(resolve_tokenizer(state, tokenizer, force_tokenizer))
    ids = [doc_id(tok)] + tok.encode(prompt, add_special_tokens=False).ids
    g = torch.Generator(device=dev).manual_seed(seed)
    out = gen(model, ids, max_tokens, stop_id=doc_id(tok), temperature=temperature, top_k=top_k, top_p=top_p,
              repetition_penalty=repetition_penalty, generator=g)
    typer.echo(prompt + tok.decode(out))


@app.command()
@handle_errors
def evaluate(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint or run directory."),
    test_file: Optional[Path] = typer.Option(None, "--test-file", help="Corpus file to score."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the run's tokenizer.json)."),
    stride: int = typer.Option(0, "--stride", help="Sliding-window stride (default half the block)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass (does not change the result)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
) -> None:
    """Score a checkpoint on a corpus: loss, perplexity and bits per byte."""
    from minillm.checkpoint import load_model, resolve_tokenizer
    from minillm.corpus import iter_documents
    from minillm.evaluation import score, summarize
    from minillm.tokenizer import doc_id, encode_documents, load_tokenizer, pad_id
    from minillm.training import resolve_device

    if test_file is None:
        raise MiniLLMError("--test-file is required")
    if not test_file.is_file():
        raise MiniLLMError(f"--test-file: {test_file} does not exist")
    dev = resolve_device(device)
    model, state = load_model(ckpt, str(dev))
    tok = load_tokenizer(resolve_tokenizer(state, tokenizer, force_tokenizer))
    texts = list(iter_documents(test_file))
    if not texts:
        raise MiniLLMError(f"--test-file: {test_file} holds no documents")
    docs = encode_documents(tok, texts)
    stride = stride or max(1, model.cfg.block_size // 2)
    masking = bool(state.get("train_config", {}).get("doc_masking", False))
    total, n = score(model, docs, stride, batch_size, pad_id(tok), masking, doc_id(tok))
    res = summarize(total, n, sum(len(t.encode("utf-8")) for t in texts))
    res["documents"] = len(texts)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        typer.echo(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  bits/byte {res['bits_per_byte']:.4f}  "
                   f"({res['tokens']:,} tokens, {res['documents']} documents)")


def main() -> None:
    app()
