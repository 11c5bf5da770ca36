"""Data commands: prepare-corpus (raw text -> a clean corpus), analyze-corpus (statistics and advice),
init-tokenizer (train a tokenizer on a corpus)."""

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from minillm.errors import MiniLLMError, UsageError

# the options analyze-corpus and plan share (its recommendations are the plan: the same question, one declaration)
CORPUS_SEPARATOR: Any = typer.Option("<|doc|>", "--separator", help="The corpus's document separator line.")
PLAN_BUDGET: Any = typer.Option("5m", "--budget", help="Wall-clock budget of the whole training run the plan is for, "
                                                         "e.g. 90s, 5m, 1h (becomes train --max-time).")
PLAN_DEVICE: Any = typer.Option("auto", "--device", help="Device to plan for: auto (CUDA when present), cuda, cuda:N, "
                                                           "cpu, or a table entry (h100, h200).")


def plural(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def prepare_corpus(
    input: list[Path] = typer.Option(..., "--input", "-i", help="Input file or directory (recursive: .txt/.md/.jsonl, .gz/.bz2/.xz/.zst of them, .parquet); repeat for several."),
    output: Path = typer.Option(..., "--output", "-o", help="Clean corpus to write (documents separated by <|doc|> lines); never one of the inputs."),
    separator: str = typer.Option("<|doc|>", "--separator", help="A line holding exactly this ends a document in the input."),
    split_on_blank_lines: bool = typer.Option(False, "--split-on-blank-lines", help="Also end a document at every blank line."),
    text_field: str = typer.Option("text", "--text-field", help="JSON key of each .jsonl line, or column of a .parquet file, holding the text."),
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
        raise UsageError("--dedup-threshold has no effect without --near-dedup")
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
    t.add_row("speed", f"{summary.mb_per_s:,.1f} MB/s", f"{summary.seconds:,.1f} s, {plural(summary.workers, 'worker')}")
    Console().print(t)


def analyze_corpus(
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Corpus file to analyze (documents separated by --separator lines)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="tokenizer.json for exact token counts; without it tokens are estimated as bytes / 4."),
    separator: str = CORPUS_SEPARATOR,
    lang: str = typer.Option("en", "--lang", help="Language of the summary lines: en or es."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a histogram of document lengths to this PNG file."),
    budget: str = PLAN_BUDGET,
    device: str = PLAN_DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Report corpus statistics and recommend block size, stride, model size, epochs and vocabulary (the plan
    `minillm plan` makes for --budget on --device)."""
    from minillm.corpus.stats import LABELS, analyze, plot_lengths, render_table, report, summary_lines
    from minillm.plan.devices import detect
    from minillm.plan.recommend import recommend

    seconds = budget_seconds(budget)
    if lang not in LABELS:
        raise UsageError(f"--lang {lang!r}: use en or es")
    if plot is not None and any(plot.resolve() == p.resolve() for p in (corpus, *([tokenizer] if tokenizer else []))):
        raise MiniLLMError(f"--plot {plot} is also an input; write the histogram to another file, e.g. lengths.png")
    tok = None
    if tokenizer is not None:
        from minillm.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    dev = detect(device)
    stats = analyze(corpus, separator, tok)
    rec = recommend(stats, dev, seconds, tok.get_vocab_size() if tok is not None else None)
    if plot is not None:
        plot_lengths(stats.lengths, plot, stats.tokens_estimated, rec.block_size)
        typer.echo(f"wrote {plot}", err=True)
    if as_json:
        typer.echo(json.dumps(report(stats, rec), indent=2, ensure_ascii=False))
        return
    from rich.console import Console

    Console().print(render_table(stats, rec))
    typer.echo("\n".join(summary_lines(stats, rec, lang)))


def plan(
    corpus: Path = typer.Option(..., "--corpus", "-c", help="Corpus file to plan for (documents separated by --separator lines)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t", help="Plan for this tokenizer.json (its vocabulary); without it the plan recommends a vocabulary and prints the init-tokenizer command."),
    budget: str = PLAN_BUDGET,
    device: str = PLAN_DEVICE,
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory the run may use, e.g. 80GB (default: the device's)."),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="Write the plan as a TOML file that `train --config FILE` runs unchanged."),
    measure: bool = typer.Option(False, "--measure", help="Time a few eager training steps here (seconds) instead of using the table of measured speeds (on a GPU the compiled run is faster: a lower bound)."),
    separator: str = CORPUS_SEPARATOR,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
) -> None:
    """Plan a run: the model, vocabulary and settings to train on a corpus, a device and a time budget."""
    from minillm.plan import report

    p = build_plan(corpus, tokenizer, budget_seconds(budget), device, gpu_memory, measure, separator)
    if write_config is not None:
        if any(write_config.resolve() == q.resolve() for q in (corpus, *([tokenizer] if tokenizer else []))):
            raise MiniLLMError(f"--write-config {write_config} is also an input; write the plan to another file")
        from minillm.io import atomic_write_text

        atomic_write_text(write_config, report.plan_toml(p, str(corpus)))
        typer.echo(f"wrote {write_config}", err=True)
    commands = ([] if tokenizer else [report.tokenizer_command(p, corpus)]) + [
        report.train_command(p, corpus, tokenizer, write_config)]
    if as_json:
        typer.echo(json.dumps({"format": 1, **p.to_dict(), "commands": commands}, indent=2))
        return
    from rich.console import Console

    Console().print(report.render_table(p))
    typer.echo("\n".join(commands))


def budget_seconds(text: str) -> float:
    """``--budget`` in seconds (the durations of --max-time)."""
    from minillm.config import parse_duration

    try:
        seconds = parse_duration(text)
    except UsageError as e:
        raise UsageError(str(e).replace("--max-time", "--budget")) from None
    if seconds <= 0:
        raise UsageError(f"--budget {text!r}: give a time above zero, e.g. 10m")
    return seconds


def build_plan(corpus: Path, tokenizer: Optional[Path], budget_s: float, device: str, gpu_memory: Optional[str],
               measure: bool = False, separator: str = "<|doc|>"):
    """The plan for ``corpus`` (and ``tokenizer``, when given) on ``device`` within ``budget_s`` seconds: the
    figures read fast, the device from the table (or timed with ``measure``), then the pure planner."""
    from minillm.plan.devices import detect, parse_memory
    from minillm.plan.figures import corpus_figures
    from minillm.plan.rules import plan as make_plan

    dev = detect(device, parse_memory(gpu_memory) if gpu_memory else None)
    tok = None
    if tokenizer is not None:
        from minillm.corpus.read import check_input_file
        from minillm.tokenizer import load_tokenizer

        check_input_file(tokenizer, "--tokenizer", "give the tokenizer file")
        tok = load_tokenizer(tokenizer)
    if measure:
        dev = measured_device(dev, device)
    return make_plan(corpus_figures(corpus, tok, separator), dev, budget_s)


def measured_device(dev, device: str):
    """``dev`` with its speed scaled to a few timed eager steps of a reference model on ``device`` (on CUDA
    the trainer compiles, so the figure is a lower bound there)."""
    import dataclasses

    from minillm.config import ModelConfig, TrainConfig
    from minillm.train.dryrun import measure_step
    from minillm.train.step import resolve_device, resolve_precision

    cfg = (ModelConfig(n_layer=6, n_embd=256, n_head=4, block_size=256, vocab_size=8192) if dev.kind == "cuda"
           else ModelConfig(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=2048))
    tcfg = TrainConfig(batch_size=64 if dev.kind == "cuda" else 16, device=device)
    where = resolve_device(device)
    seconds = min(measure_step(cfg, tcfg, where, resolve_precision("auto", where)) for _ in range(2))
    speed = tcfg.batch_size * cfg.block_size / seconds
    return dataclasses.replace(dev, peak_flops=dev.peak_flops * speed / dev.tokens_per_s(cfg, "adamw", tcfg.batch_size * cfg.block_size))


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
            typer.echo(f"  {ex['text'][:60]!r} -> {ex['tokens'][:12]}")
