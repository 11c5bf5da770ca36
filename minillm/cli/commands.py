"""The ``minillm`` command line: thin commands that resolve options, call the library and print.

Results go to stdout (``--json`` where offered), logs and progress to stderr. Library errors
(``MiniLLMError``) print one red line to stderr and exit 1; usage errors exit 2. ``--debug`` shows
tracebacks. torch is imported inside commands so ``minillm --help`` stays instant.
"""

import contextlib
import functools
import json
import signal
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command unwinds as on Ctrl-C: files being written are
    removed (``atomic_open``), worker processes stopped, and it exits 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds():
    """Handle SIGTERM like Ctrl-C while a command runs (train and finetune install their own handlers inside)."""
    try:
        old = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def handle_errors(fn):
    """Turn library errors into a one-line message and an exit code (traceback only with --debug); SIGINT and
    SIGTERM end a command with one line and exit 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_unwinds():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MiniLLMError as e:
            if _DEBUG["on"]:
                raise
            _err(str(e).replace("[", r"\["))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)
            _err(f"interrupted ({name}); no partial output was left, and files from before are unchanged")
            raise typer.Exit(code) from None
        except OSError as e:  # a file the library did not expect to fail: name it and the likely fix
            if _DEBUG["on"] or not e.filename:
                raise
            fix = "check its permissions" if isinstance(e, PermissionError) else "check the path and the disk"
            _err(f"{e.filename}: {e.strerror or e}; {fix}".replace("[", r"\["))
            raise typer.Exit(1) from None
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
    input: list[Path] = typer.Option(..., "--input", "-i", help="Input file or directory (recursive: .txt/.md/.jsonl and .gz of them); repeat for several."),
    output: Path = typer.Option(..., "--output", "-o", help="Clean corpus to write (documents separated by <|doc|> lines); never one of the inputs."),
    separator: str = typer.Option("<|doc|>", "--separator", help="A line holding exactly this ends a document in the input."),
    split_on_blank_lines: bool = typer.Option(False, "--split-on-blank-lines", help="Also end a document at every blank line."),
    text_field: str = typer.Option("text", "--text-field", help="JSON key holding the text of each .jsonl line."),
    encoding: str = typer.Option("auto", "--encoding", help="auto (UTF-8, falling back to cp1252 per file, said on stderr), utf-8, cp1252, latin-1, or any Python codec."),
    strict: bool = typer.Option(False, "--strict", help="Make undecodable bytes an error naming the file and byte offset (no fallback)."),
    ftfy: bool = typer.Option(True, "--ftfy/--no-ftfy", help="Repair mojibake and broken HTML entities with ftfy."),
    nfc: bool = typer.Option(True, "--nfc/--no-nfc", help="Normalize Unicode to NFC."),
    control: bool = typer.Option(True, "--remove-control/--keep-control", help="Remove control characters except tab and newline."),
    newlines: bool = typer.Option(True, "--fix-newlines/--no-fix-newlines", help="Turn CRLF and lone CR line endings into LF."),
    trailing: bool = typer.Option(True, "--strip-trailing/--no-strip-trailing", help="Strip spaces and tabs at line ends (indentation is kept)."),
    blank_lines: bool = typer.Option(True, "--collapse-blank-lines/--no-collapse-blank-lines", help="Turn three or more newlines into two."),
    lowercase: bool = typer.Option(False, "--lowercase/--preserve-case", help="Lowercase all text (default: preserve case)."),
    min_chars: int = typer.Option(1, "--min-chars", help="Drop documents shorter than this many characters after cleaning."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop exact duplicate documents (hash of whitespace-normalized text)."),
    near_dedup: bool = typer.Option(False, "--near-dedup", help="Also drop near-duplicates (MinHash + LSH; needs pip install 'minillm[dedup]')."),
    dedup_threshold: float = typer.Option(0.8, "--dedup-threshold", help="Estimated Jaccard similarity (word 3-grams) from which --near-dedup drops a document."),
    workers: int = typer.Option(0, "--workers", help="Processes cleaning documents; 0 means one per CPU core."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout instead of a table."),
) -> None:
    """Clean raw text into a corpus file: documents separated by <|doc|> lines, deduplicated."""
    from minillm.corpus.clean import CleanOptions
    from minillm.corpus.prepare import DedupOptions
    from minillm.corpus.prepare import prepare_corpus as run_prepare
    from minillm.corpus.read import ReadOptions

    if not near_dedup and dedup_threshold != 0.8:
        _err("--dedup-threshold has no effect without --near-dedup")
        raise typer.Exit(2)
    read = ReadOptions(separator=separator, split_on_blank_lines=split_on_blank_lines, text_field=text_field,
                       encoding=encoding, strict=strict)
    clean = CleanOptions(ftfy=ftfy, newlines=newlines, control=control, nfc=nfc, trailing=trailing,
                         blank_lines=blank_lines, lowercase=lowercase, min_chars=min_chars)
    summary = run_prepare(list(input), output, read, clean, DedupOptions(dedup, near_dedup, dedup_threshold),
                          workers, log=lambda m: typer.echo(f"note: {m}", err=True))
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"prepare-corpus -> {output}")
    t.add_column("")
    t.add_column("in", justify="right")
    t.add_column("out", justify="right")
    t.add_row("files", f"{summary.files:,}", "")
    t.add_row("documents", f"{summary.documents_in:,}", f"{summary.documents_out:,}")
    t.add_row("bytes", f"{summary.bytes_in:,}", f"{summary.bytes_out:,}")
    for reason, n in summary.removed.items():
        t.add_row(f"removed: {reason.replace('_', ' ')}", "", f"{n:,}")
    t.add_row("repaired by ftfy", "", f"{summary.repaired_by_ftfy:,}")
    t.add_row("special strings rewritten", "", f"{summary.special_rewritten:,}")
    t.add_row("files read as cp1252", f"{len(summary.fallback_files):,}", "")
    if summary.long_documents_split:
        t.add_row("documents over 8M chars split", "", f"{summary.long_documents_split:,}")
    t.add_row("speed", f"{summary.mb_per_s:,.1f} MB/s", f"{summary.seconds:,.1f} s, {summary.workers} workers")
    Console(stderr=True).print(t)


@app.command("analyze-corpus")
@handle_errors
def analyze_corpus(
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Corpus file to analyze (documents separated by --separator lines)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="tokenizer.json for exact token counts; without it tokens are estimated as bytes / 4."),
    separator: str = typer.Option("<|doc|>", "--separator", help="The corpus's document separator line."),
    lang: str = typer.Option("en", "--lang", help="Language of the summary lines: en or es."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a histogram of document lengths to this PNG file."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Report corpus statistics and recommend block size, stride, model size, epochs and vocabulary."""
    from minillm.corpus.stats import (
        LABELS,
        analyze,
        plot_lengths,
        recommend,
        render_table,
        report,
        summary_lines,
    )

    if lang not in LABELS:
        _err(f"--lang {lang!r}: use en or es")
        raise typer.Exit(2)
    if plot is not None and any(plot.resolve() == p.resolve() for p in (corpus, *([tokenizer] if tokenizer else []))):
        raise MiniLLMError(f"--plot {plot} is also an input; write the histogram to another file, e.g. lengths.png")
    tok = None
    if tokenizer is not None:
        from minillm.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    stats = analyze(corpus, separator, tok)
    rec = recommend(stats.lengths, stats.bytes)
    if plot is not None:
        plot_lengths(stats.lengths, plot, stats.tokens_estimated)
        typer.echo(f"wrote {plot}", err=True)
    if as_json:
        typer.echo(json.dumps(report(stats, rec), indent=2, ensure_ascii=False))
        return
    from rich.console import Console

    Console().print(render_table(stats, rec))
    typer.echo("\n".join(summary_lines(stats, rec, lang)))


# ---------------------------------------------------------------- init-tokenizer


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
    from minillm import tokenizer as tk

    paths = tk.collect_files(files)
    if any(p.resolve() == out.resolve() for p in paths):
        raise MiniLLMError(f"--out {out} is also an input; write the tokenizer to another file")
    if not any(t.strip() for t in tk.iter_training_texts(paths)):  # stops at the first text: cheap
        names = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise MiniLLMError(f"--files: {names} hold no text (empty, or only <|doc|> separator lines); "
                           f"give a corpus from `minillm prepare-corpus`")
    tok = tk.train_tokenizer(tk.iter_training_texts(paths), vocab_size, model=model, min_frequency=min_frequency,
                             special_tokens=special_tokens, show_progress=sys.stderr.isatty())
    tk.save_tokenizer(tok, out)
    if warning := tk.shortfall(tok, vocab_size, model, min_frequency):
        typer.secho(f"warning: {warning}", fg="yellow", err=True)
    sample = [d[:20000] for _, d in zip(range(200), tk.iter_training_texts(paths), strict=False)]
    info = tk.describe(tok, sample)
    info["path"] = str(out)
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False, indent=2))
    else:
        typer.echo(f"wrote {out}: vocabulary {info['vocab_size']:,}, {info['bytes_per_token']} bytes per token")
        for ex in info["examples"]:
            pieces = [tok.decode([tok.token_to_id(t)], skip_special_tokens=False) for t in ex["tokens"][:12]]
            typer.echo(f"  {ex['text'][:60]!r} -> {pieces}")  # readable text, not byte-level symbols


# ---------------------------------------------------------------- train


@app.command()
@handle_errors
def train(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json from init-tokenizer."),
    corpus: list[Path] = typer.Option(..., "--corpus", "-c", help="Clean corpus file from prepare-corpus; repeat to mix several (see --mix)."),
    mix: Optional[str] = typer.Option(None, "--mix", help="Weights of the --corpus files, comma-separated in the same order (e.g. 0.7,0.3): each window's corpus is drawn by weight. Default: proportional to their sizes."),
    outdir: Path = typer.Option(..., "--outdir", "-o", help="Run directory for checkpoints, history and plots."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, small, medium, large, gpt2-124m) or a TOML file."),
    val_file: Optional[Path] = typer.Option(None, "--val-file", help="Separate validation corpus instead of a split."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Token cache directory (default RUN/cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --outdir from ckpt_last.pt exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --outdir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, parameter count, FLOPs and memory estimate, then exit."),
    log_format: str = typer.Option("text", "--log-format", help="Progress lines on stderr: text or json."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard event files to OUTDIR/tb (needs `pip install tensorboard`)."),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="Wall-clock budget for the whole run, e.g. 90s, 2m, 1h."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="Context length in tokens."),
    n_layer: Optional[int] = typer.Option(None, "--n-layer", help="Number of transformer blocks."),
    n_head: Optional[int] = typer.Option(None, "--n-head", help="Attention heads."),
    n_kv_head: Optional[int] = typer.Option(None, "--n-kv-head", help="Key/value heads (grouped-query attention); 0 = n_head."),
    n_embd: Optional[int] = typer.Option(None, "--n-embd", help="Model width."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout rate."),
    attention: Optional[str] = typer.Option(None, "--attention", help="Attention kernel: auto, flash, cudnn, efficient, math."),
    loss_kernel: Optional[str] = typer.Option(None, "--loss-kernel", help="Output layer + loss: torch, or liger (fused Triton kernel from pip install 'minillm[kernels]'; CUDA; less memory)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory."),
    doc_masking: Optional[bool] = typer.Option(None, "--doc-masking/--no-doc-masking", help="Restart positions and block attention at document boundaries."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Micro-batch size."),
    accumulation_steps: Optional[int] = typer.Option(None, "--accumulation-steps", help="Micro-batches per optimizer step."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the training windows; the run ends at whichever of --epochs / --max-steps comes first (0 = no epoch limit)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps, or at --epochs if that comes first (0 = no step limit)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Final learning rate (default lr/10)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay."),
    beta1: Optional[float] = typer.Option(None, "--beta1", help="AdamW beta1."),
    beta2: Optional[float] = typer.Option(None, "--beta2", help="AdamW beta2."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient-norm clip (0 disables)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw, or muon (hidden matrices) + adamw."),
    muon_lr: Optional[float] = typer.Option(None, "--muon-lr", help="Muon learning rate for hidden matrices (with --optimizer muon)."),
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
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train on N GPUs of this machine: re-launches this command under torchrun (DistributedDataParallel, or FSDP2 with --fsdp); --batch-size is per GPU."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With several processes (--nproc N or torchrun): shard weights, gradients and optimizer state across the GPUs (FSDP2) instead of copying them to each (DDP), for models whose optimizer state does not fit one GPU. Needs --optimizer adamw (small/medium default to muon). Checkpoints keep the one-GPU format."),
) -> None:
    """Train a model: encode the corpus into a token cache, then train with evaluation and checkpoints.

    Model and training flags without a default shown take the --config preset's value (see --dry-run)."""
    import os
    import time

    from minillm.checkpoint import process_started_at

    started = process_started_at() or time.time()  # --max-time counts from the process's start
    from minillm.config import parse_duration, resolve
    from minillm.errors import UsageError

    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format: {log_format!r} is not one of text, json")
    overrides = {k: v for k, v in locals().items() if k in _TRAIN_KEYS}
    if max_time is not None:
        overrides["max_time"] = parse_duration(max_time)
        if epochs is None and max_steps is None:  # a time budget alone: the preset's length does not cap it
            overrides.update(epochs=0.0, max_steps=0)
    mcfg, tcfg = resolve(config, overrides)
    if fsdp:
        from minillm.distributed import env_ranks, fsdp_problem

        world = 2 if dry_run else (nproc or env_ranks()[1])  # --dry-run: only the optimizer is checked
        if problem := fsdp_problem(tcfg.optimizer, world):
            raise UsageError(problem)
    from minillm.corpus.read import check_input_file

    for p, flag in ((tokenizer, "--tokenizer"), *((c, "--corpus") for c in corpus),
                    *(((val_file, "--val-file"),) if val_file else ())):
        check_input_file(p, flag, "give the tokenizer file" if flag == "--tokenizer" else "give the corpus file")
    from minillm.data.loader import Mixture
    from minillm.tokenizer import load_tokenizer

    load_tokenizer(tokenizer)  # a file that is not a tokenizer fails here, before --outdir is touched

    corpus_arg = Mixture.parse(corpus, mix)
    if dry_run:
        _dry_run(tokenizer, mcfg, tcfg)
        return
    if nproc is not None and nproc != 1:  # after the checks above, so that a mistake is reported once
        _relaunch_torchrun(nproc)  # does not return (--fsdp and the other arguments pass through)
    from minillm.train.run import Interrupted, RunSpec
    from minillm.train.run import train as run_train

    spec = RunSpec(tokenizer=tokenizer, corpus=corpus_arg, outdir=outdir, val_file=val_file, cache_dir=cache_dir,
                   resume=resume, overwrite=overwrite, log_format=log_format, config_name=config,
                   tensorboard=tensorboard, started=started, fsdp=fsdp)
    fresh = not outdir.exists()
    try:
        summary = run_train(spec, mcfg, tcfg)
    except BaseException as e:
        _remove_if_unused(outdir, fresh)  # a new run that failed in setup leaves no empty directory behind
        if isinstance(e, Interrupted):  # Ctrl-C (130) / SIGTERM (143): not an error, the checkpoint is saved
            if os.environ.get("RANK", "0") == "0":
                typer.secho(str(e), fg="yellow", err=True)
            raise typer.Exit(e.exit_code) from None
        raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        typer.echo(json.dumps(summary))


def _relaunch_torchrun(nproc: int) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node N -m minillm <the same arguments>``."""
    import os

    from minillm.errors import UsageError

    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: give the number of GPUs (processes) to train on, 1 or more")
    if "WORLD_SIZE" in os.environ:
        raise UsageError("--nproc: this process already runs under torchrun; leave out --nproc")
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "minillm", *args]
    typer.echo("launching: " + " ".join(cmd[1:]), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def _remove_if_unused(outdir: Path, fresh: bool) -> None:
    """Remove a run directory this command created when it holds nothing but the token cache (rank 0 only)."""
    import os
    import shutil

    if fresh and outdir.is_dir() and os.environ.get("RANK", "0") == "0":
        if all(p.name == "cache" for p in outdir.iterdir()):  # a .lock: another run holds it, leave it be
            shutil.rmtree(outdir, ignore_errors=True)


_TRAIN_KEYS = {
    "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "attention", "loss_kernel",
    "gradient_checkpointing", "doc_masking", "batch_size", "accumulation_steps", "epochs", "max_steps", "lr",
    "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "optimizer", "muon_lr", "eval_every", "eval_batches", "patience",
    "log_every", "precision", "compile", "device", "seed", "num_workers", "stride", "val_fraction",
}


def _dry_run(tokenizer: Path, mcfg, tcfg) -> None:
    import dataclasses

    from minillm.config import pad_vocab, to_dict
    from minillm.model.gpt import GPT
    from minillm.model.memory import estimate_memory
    from minillm.tokenizer import load_tokenizer

    mcfg = dataclasses.replace(mcfg, vocab_size=pad_vocab(load_tokenizer(tokenizer).get_vocab_size()))
    import torch

    with torch.device("meta"):
        model = GPT(mcfg)
    total, non_emb = model.num_params(), model.num_params(non_embedding=True)
    mem = estimate_memory(mcfg, tcfg.batch_size, optimizer=tcfg.optimizer)
    report = {"model": to_dict(mcfg), "train": to_dict(tcfg), "params": total, "params_embedding": total - non_emb,
              "params_non_embedding": non_emb, "flops_per_token": model.flops_per_token(), "memory_estimate": mem}
    typer.echo(json.dumps(report, indent=2))


# ---------------------------------------------------------------- generate / evaluate


@app.command()
@handle_errors
def generate(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint (ckpt_best.pt / ckpt_last.pt) or run directory."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the run's tokenizer.json)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue; empty (the default) starts a new document."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="UTF-8 file with one prompt per line (blank lines skipped)."),
    max_tokens: int = typer.Option(200, "--max-tokens", help="Maximum new tokens per sample."),
    temperature: float = typer.Option(0.8, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Keep the k most likely tokens (0 disables)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold in (0, 1]."),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty", help="CTRL repetition penalty (1 disables)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop when this text appears (not printed); repeatable."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Samples per prompt."),
    batch_generate: bool = typer.Option(False, "--batch-generate", help="Decode prompts and samples together in batches of --batch-size."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per batch with --batch-generate (default 8)."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is produced (one sample at a time)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results to this file instead of stdout."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one per sample: prompt, completion, tokens, seconds, finish_reason."),
    seed: int = typer.Option(1337, "--seed", help="Random seed: the same seed gives the same text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    compile: str = typer.Option("auto", "--compile", help="Decode step: auto (a CUDA graph on CUDA, plain on CPU), on (torch.compile as well: faster per token, slower to start), off (plain PyTorch)."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter.pt (from finetune --lora-rank) to apply on top of --ckpt, which must be the base it was trained on."),
) -> None:
    """Generate text from a trained checkpoint. Samples are separated by a <|doc|> line in text output."""
    import torch

    from minillm.checkpoint import load_model, resolve_tokenizer
    from minillm.errors import UsageError
    from minillm.generation import DOC_JOIN, Sampling, check_sampling, complete, decode_mode
    from minillm.tokenizer import load_tokenizer
    from minillm.train.run import resolve_device

    check_sampling(temperature, top_k, top_p, repetition_penalty)
    problems = [m for bad, m in (
        (prompt is not None and prompt_file is not None, "give --prompt or --prompt-file, not both"),
        (max_tokens < 0, "--max-tokens must be >= 0"), (num_samples < 1, "--num-samples must be >= 1"),
        (batch_size is not None and not batch_generate, "--batch-size needs --batch-generate"),
        (batch_size is not None and batch_size < 1, "--batch-size must be >= 1"),
        (stream and batch_generate, "--stream prints one sample at a time; drop --batch-generate"),
        (stream and (as_json or output is not None), "--stream prints text to the terminal; drop --json / --output"),
    ) if bad]
    problems += [m for m in (_not_utf8("--prompt", prompt), *(_not_utf8("--stop", s) for s in stop or ())) if m]
    if problems:
        raise UsageError("; ".join(problems))
    if prompt_file is not None:
        from minillm.corpus.read import check_input_file

        check_input_file(prompt_file, "--prompt-file", "give a UTF-8 text file with one prompt per line")
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise MiniLLMError(f"--prompt-file: {prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                               f"offset {e.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {prompt_file} > "
                               f"prompts.txt` (or `minillm prepare-corpus`, which reads cp1252)") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise MiniLLMError(f"--prompt-file: {prompt_file} holds no prompts (one per line)")
    else:
        prompts = [prompt or ""]
    inputs = (ckpt, prompt_file, tokenizer, *(ckpt / n for n in ("ckpt_best.pt", "ckpt_last.pt", "tokenizer.json")))
    if output is not None and any(output.resolve() == p.resolve() for p in inputs if p):
        raise UsageError(f"--output {output} is also an input; write the samples to another file")
    dev = resolve_device(device)
    mode = decode_mode(dev, compile)
    model, state = load_model(ckpt, str(dev))
    if adapter is not None:  # merged into the weights: same logits, no extra cost per token
        from minillm.lora import attach_adapter

        attach_adapter(model, state, adapter)
    tok = load_tokenizer(resolve_tokenizer(state, tokenizer, force_tokenizer))
    g = torch.Generator(device=dev).manual_seed(seed)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    records = complete(model, tok, prompts, max_tokens, sampling=Sampling(temperature, top_k, top_p, repetition_penalty),
                       num_samples=num_samples, batch_size=(batch_size or 8) if batch_generate else 1, stops=stop or (),
                       generator=g, stream=write if stream else None, warn=lambda m: typer.secho(f"warning: {m}", fg="yellow", err=True),
                       mode=mode)
    if stream:
        write("\n")
        return
    if as_json:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = DOC_JOIN.join(r["prompt"] + r["completion"] for r in records) + "\n"
    if output is None:
        write(text)
    else:
        from minillm.checkpoint import atomic_write_text

        atomic_write_text(output, text)
        typer.echo(f"wrote {len(records)} sample(s) to {output}", err=True)


def _not_utf8(flag: str, text: str | None) -> str | None:
    """A problem line when a command-line text holds bytes that are not UTF-8 (Python keeps each as a lone
    surrogate, which the tokenizer cannot take)."""
    try:
        (text or "").encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        c = ord(e.object[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        return (f"{flag} holds {what} at character {e.start + 1}, which is not UTF-8 text; set the terminal to UTF-8 "
                f"(e.g. LANG=C.UTF-8) or put the text in a UTF-8 file and pass --prompt-file")


@app.command()
@handle_errors
def evaluate(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint or run directory."),
    test_file: Optional[Path] = typer.Option(None, "--test-file", help="Corpus file to score (documents separated by <|doc|> lines)."),
    split: Optional[str] = typer.Option(None, "--split", help="val: score exactly the run's validation documents (from RUN/config.json)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the run's tokenizer.json)."),
    stride: int = typer.Option(0, "--stride", help="Sliding-window stride in tokens (default half the block)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass (does not change the result)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
) -> None:
    """Score a checkpoint on whole documents: loss, perplexity and bits per byte."""
    from tqdm import tqdm

    from minillm.checkpoint import load_model, resolve_tokenizer
    from minillm.corpus.read import iter_documents
    from minillm.errors import UsageError
    from minillm.evaluation import n_windows, score, summarize, validation_texts
    from minillm.tokenizer import encode_documents, load_tokenizer, pad_id
    from minillm.train.run import resolve_device

    if (test_file is None) == (split is None):
        raise UsageError("give --test-file FILE or --split val (one of them)")
    if split is not None and split != "val":
        raise UsageError(f"--split: {split!r} is not supported; use --split val or --test-file")
    if test_file is not None:
        from minillm.corpus.read import check_input_file

        check_input_file(test_file, "--test-file", "give a corpus file")
    if stride < 0 or batch_size < 1:
        raise UsageError("--stride must be >= 0 (0 = half the block) and --batch-size >= 1")
    dev = resolve_device(device)
    model, state = load_model(ckpt, str(dev))
    tok = load_tokenizer(resolve_tokenizer(state, tokenizer, force_tokenizer))
    if split:
        texts, source = validation_texts(Path(state["path"]).parent)
    else:
        texts, source = list(iter_documents(test_file)), str(test_file)
        if not texts:
            raise MiniLLMError(f"--test-file: {test_file} holds no documents")
    docs = encode_documents(tok, texts)
    block = model.cfg.block_size
    stride = min(stride or max(1, block // 2), block)
    with tqdm(total=sum(n_windows(len(d), block, stride) for d in docs), unit="win", file=sys.stderr,
              disable=not sys.stderr.isatty(), desc="evaluate") as bar:
        total, n = score(model, docs, stride, batch_size, pad_id(tok), progress=bar.update)
    res = summarize(total, n, sum(len(t.encode("utf-8")) for t in texts))
    res.update(documents=len(texts), source=source, stride=stride, block_size=block)
    if as_json:
        typer.echo(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        typer.echo(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  bits/byte {res['bits_per_byte']:.4f}  "
                   f"({res['tokens']:,} tokens, {res['documents']} documents)")


# ---------------------------------------------------------------- finetune / merge


@app.command()
@handle_errors
def finetune(
    ckpt: Path = typer.Option(..., "--ckpt", help="Base checkpoint (a run's ckpt_best.pt) or run directory to start from."),
    data: Path = typer.Option(..., "--data", "-d", help="continue: a clean corpus file (<|doc|>-separated); sft: a JSONL file of {instruction, input?, response} or {messages: [...]}."),
    outdir: Path = typer.Option(..., "--outdir", "-o", help="Run directory for checkpoints, history, plots (and adapter.pt with LoRA)."),
    mode: str = typer.Option("continue", "--mode", help="continue (more pretraining on new text) or sft (instruction tuning: loss on responses only)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="Tokenizer (default: the base run's tokenizer.json); must be the base's."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the base checkpoint's."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="Train LoRA adapters of this rank only (base frozen; adapter.pt saved alone); 0 trains all weights."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scaling numerator: updates are scaled by alpha / rank (default 2 x rank)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="Dropout on the adapters' input (default 0)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Comma-separated layers to adapt: q,k,v,o,gate,up,down (default all)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="sft: skip malformed JSONL lines (counted) instead of stopping at them."),
    val_file: Optional[Path] = typer.Option(None, "--val-file", help="Separate validation data (corpus or JSONL, as --data) instead of a split."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="continue: token cache directory (default OUTDIR/cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --outdir from ckpt_last.pt exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in --outdir."),
    log_format: str = typer.Option("text", "--log-format", help="Progress lines on stderr: text or json."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard event files to OUTDIR/tb."),
    max_time: Optional[str] = typer.Option(None, "--max-time", help="Wall-clock budget for the whole run, e.g. 90s, 2m, 1h."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Model dropout during fine-tuning (default: the base's)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory."),
    doc_masking: Optional[bool] = typer.Option(None, "--doc-masking/--no-doc-masking", help="Restart positions and block attention at document boundaries (default: the base run's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Micro-batch size (default: the base run's)."),
    accumulation_steps: Optional[int] = typer.Option(None, "--accumulation-steps", help="Micro-batches per optimizer step."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the training windows / examples (default 1; 0 = no epoch limit); the run ends at whichever of --epochs / --max-steps comes first."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps, or at --epochs if that comes first (0 = no step limit)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default: a tenth of the base run's; with LoRA the base run's)."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Final learning rate (default lr/10)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps (capped at a tenth of the run)."),
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
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (data order, split, dropout, adapter init)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Background threads preparing batches (0 = inline)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="continue: step between windows (default block size)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Fraction of documents / examples held out for validation."),
) -> None:
    """Fine-tune a checkpoint: continued pretraining on a corpus, or instruction tuning on JSONL; all weights or LoRA."""
    import time

    from minillm.checkpoint import process_started_at

    started = process_started_at() or time.time()
    from minillm.config import parse_duration
    from minillm.errors import UsageError
    from minillm.train.finetune import MODES, FinetuneSpec
    from minillm.train.finetune import finetune as run_finetune

    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format: {log_format!r} is not one of text, json")
    if mode not in MODES:
        raise UsageError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode != "continue" and (stride is not None or cache_dir is not None):
        raise UsageError("--stride and --cache-dir apply to --mode continue only (sft has one row per example)")
    if mode != "sft" and skip_bad_lines:
        raise UsageError("--skip-bad-lines applies to --mode sft (JSONL) only")
    if mode == "continue" and data.name.endswith((".jsonl", ".jsonl.gz")):
        raise UsageError(f"--data {data}: --mode continue takes a clean corpus (prepare-corpus -i {data} -o corpus.txt); "
                         "for instruction JSONL use --mode sft")
    lora = None
    if lora_rank < 0:
        raise UsageError(f"--lora-rank must be >= 0 (got {lora_rank}); 0 trains all weights")
    if lora_rank:
        from minillm.lora import DEFAULT_TARGETS, LoRAConfig, parse_targets

        lora = LoRAConfig(rank=lora_rank, alpha=lora_alpha if lora_alpha is not None else 2.0 * lora_rank,
                          dropout=lora_dropout or 0.0,
                          targets=parse_targets(lora_targets) if lora_targets is not None else DEFAULT_TARGETS)
    elif lora_alpha is not None or lora_dropout is not None or lora_targets is not None:
        raise UsageError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank R (R >= 1)")
    keys = {"dropout", "gradient_checkpointing"}
    vals = locals()
    model_over = {k: vals[k] for k in keys if vals[k] is not None}
    train_over = {k: vals[k] for k in _TRAIN_KEYS - keys - _MODEL_ONLY if vals.get(k) is not None}
    if max_time is not None:
        train_over["max_time"] = parse_duration(max_time)
    from minillm.train.run import Interrupted

    fs = FinetuneSpec(ckpt=ckpt, data=data, outdir=outdir, mode=mode, tokenizer=tokenizer,
                      force_tokenizer=force_tokenizer, lora=lora, val_file=val_file, cache_dir=cache_dir,
                      skip_bad_lines=skip_bad_lines, resume=resume, overwrite=overwrite, log_format=log_format,
                      tensorboard=tensorboard, started=started)
    fresh = not outdir.exists()
    try:
        summary = run_finetune(fs, model_over, train_over)
    except Interrupted as e:
        typer.secho(str(e), fg="yellow", err=True)
        raise typer.Exit(e.exit_code) from None
    except BaseException:
        _remove_if_unused(outdir, fresh)  # a new run that failed in setup leaves no empty directory behind
        raise
    typer.echo(json.dumps(summary))


_MODEL_ONLY = {"block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "attention"}  # fixed by the base


@app.command()
@handle_errors
def merge(
    ckpt: Path = typer.Option(..., "--ckpt", help="The base checkpoint the adapter was trained on."),
    adapter: Path = typer.Option(..., "--adapter", help="adapter.pt from a LoRA finetune run."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged checkpoint to write (generate / evaluate / export load it; tokenizer.json is put beside it)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer (default: the base run's tokenizer.json)."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Merge a LoRA adapter into its base checkpoint, writing one plain checkpoint."""
    from minillm.lora import merge_checkpoint

    if out.exists() and not overwrite:
        raise MiniLLMError(f"--out {out} already exists; add --overwrite to replace it or choose another file")
    res = merge_checkpoint(ckpt, adapter, out, tokenizer, force_tokenizer)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        typer.echo(f"wrote {res['out']}: {res['base']} + {res['adapter']} (rank {res['rank']}, "
                   f"{','.join(res['targets'])}); tokenizer {res['tokenizer']}")


# ---------------------------------------------------------------- export


@app.command()
@handle_errors
def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint, run directory, or an earlier export to convert."),
    out: Path = typer.Option(..., "--out", "-o", help="hf: the directory to create; safetensors: the *.safetensors file to write; gguf: the *.gguf file."),
    format: str = typer.Option("hf", "--format", help="hf (a Hugging Face directory, Llama or Qwen3 format), safetensors (weights alone, config as metadata) or gguf (one file for llama.cpp / Ollama)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer to ship (default: the run's tokenizer.json)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weight dtype: auto (the checkpoint's own), fp32, bf16 or fp16; q8_0 too with --format gguf."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing, non-empty --out."),
    force_tokenizer: bool = typer.Option(False, "--force-tokenizer", help="Use --tokenizer even if its hash differs from the checkpoint's."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter.pt to merge into --ckpt (its base) before exporting."),
) -> None:
    """Export a model to a Hugging Face directory (transformers loads it offline), a safetensors file or a GGUF file (llama.cpp)."""
    import tempfile

    from minillm.export.hf import export as run_export

    with tempfile.TemporaryDirectory(prefix="minillm-merge-") as tmp:
        if adapter is not None:  # merge first, then export the merged checkpoint (with the base's tokenizer)
            from minillm.lora import merge_checkpoint

            ckpt = Path(merge_checkpoint(ckpt, adapter, Path(tmp) / "merged.pt", tokenizer, force_tokenizer)["out"])
        res = run_export(ckpt, out, format, tokenizer=tokenizer, force_tokenizer=force_tokenizer,
                         overwrite=overwrite, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        arch = f" ({res['architecture']})" if "architecture" in res else ""
        typer.echo(f"wrote {res['out']}{arch}: {res['params']:,} parameters in {res['tensors']} tensors, "
                   f"{res['dtype']}; files: {', '.join(res['files'])}")


def main() -> None:
    app()
