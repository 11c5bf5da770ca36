"""Training commands: train (from scratch) and finetune (a checkpoint on new text or instructions). Their
config flags come from minillm/config.py through ``config_flags`` (options.py)."""

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from minillm.cli.options import GENERATED, config_flags
from minillm.config import FINETUNE, TRAIN
from minillm.errors import UsageError

# train and finetune print their result as JSON with or without --json (scripts parse it; docs/FORMATS.md)
JSON_SUMMARY: Any = typer.Option(False, "--json", help="Print the result as JSON on stdout: one line with the "
                                 "steps, best validation loss and run directory (also without --json; "
                                 "--dry-run: the resolved config). Progress lines go to stderr.")
# the run options train and finetune share (their config flags come from config_flags)
RESUME: Any = typer.Option(False, "--resume", help="Continue the run in --outdir from ckpt_last.pt exactly.")
OVERWRITE: Any = typer.Option(False, "--overwrite", help="Replace an existing run in --outdir.")
LOG_FORMAT: Any = typer.Option("text", "--log-format", help="Progress lines on stderr: text or json.")
TENSORBOARD: Any = typer.Option(False, "--tensorboard", help="Also write TensorBoard event files to OUTDIR/tb (needs "
                                "`pip install tensorboard`).")


@config_flags(TRAIN)
def train(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json from init-tokenizer."),
    corpus: list[Path] = typer.Option(..., "--corpus", "-c", help="Clean corpus file from prepare-corpus; repeat to mix several (see --mix)."),
    mix: Optional[str] = typer.Option(None, "--mix", help="Weights of the --corpus files, comma-separated in the same order (e.g. 0.7,0.3): each window's corpus is drawn by weight. Default: proportional to their sizes."),
    outdir: Path = typer.Option(..., "--outdir", "-o", help="Run directory for checkpoints, history and plots."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, small, medium, large, gpt2-124m), a TOML file, or auto: plan the run for the tokenizer, the first --corpus, --max-time and --device (see `minillm plan`; flags given override the plan; --resume reuses the run's saved plan)."),
    val_file: Optional[Path] = typer.Option(None, "--val-file", help="Separate validation corpus instead of a split."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Token cache directory (default RUN/cache)."),
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, parameter count, FLOPs and memory estimate, then exit."),
    log_format: str = LOG_FORMAT,
    tensorboard: bool = TENSORBOARD,
    as_json: bool = JSON_SUMMARY,
    overrides: dict[str, Any] = GENERATED,
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train on N GPUs of this machine: re-launches this command under torchrun (DistributedDataParallel, or FSDP2 with --fsdp); --batch-size is per GPU."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With several processes (--nproc N or torchrun): shard weights, gradients and optimizer state across the GPUs (FSDP2) instead of copying them to each (DDP), for models whose optimizer state does not fit one GPU. Needs --optimizer adamw (small/medium default to muon). Checkpoints keep the one-GPU format."),
) -> None:
    """Train a model: encode the corpus into a token cache, then train with evaluation and checkpoints.

    Model and training flags without a default shown take the --config preset's value (see --dry-run)."""
    started = _started()  # --max-time counts from the process's start
    from minillm.config import resolve

    _check_log_format(log_format)
    record = {}
    if config == "auto":
        config, overrides, record = _auto_config(tokenizer, corpus[0], outdir, resume, overrides)
    if "max_time" in overrides and not {"epochs", "max_steps"} & overrides.keys():
        overrides.update(epochs=0.0, max_steps=0)  # a time budget alone: the preset's length does not cap it
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
        _dry_run(tokenizer, corpus_arg.corpora, mcfg, tcfg)
        return
    if nproc is not None and nproc != 1:  # after the checks above, so that a mistake is reported once
        _relaunch_torchrun(nproc)  # does not return (--fsdp and the other arguments pass through)
    from minillm.train.run import RunSpec
    from minillm.train.run import train as run_train

    spec = RunSpec(tokenizer=tokenizer, corpus=corpus_arg, outdir=outdir, val_file=val_file, cache_dir=cache_dir,
                   resume=resume, overwrite=overwrite, log_format=log_format, config_name="auto" if record else config,
                   tensorboard=tensorboard, started=started, fsdp=fsdp, record=record)
    _run_and_report(outdir, lambda: run_train(spec, mcfg, tcfg))


@config_flags(FINETUNE)
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
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
    log_format: str = LOG_FORMAT,
    tensorboard: bool = TENSORBOARD,
    as_json: bool = JSON_SUMMARY,
    overrides: dict[str, Any] = GENERATED,
) -> None:
    """Fine-tune a checkpoint: continued pretraining on a corpus, or instruction tuning on JSONL; all weights or LoRA."""
    started = _started()
    from minillm.config import split_overrides
    from minillm.train.finetune import MODES, FinetuneSpec
    from minillm.train.finetune import finetune as run_finetune

    _check_log_format(log_format)
    if mode not in MODES:
        raise UsageError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode != "continue" and ("stride" in overrides or cache_dir is not None):
        raise UsageError("--stride and --cache-dir apply to --mode continue only (sft has one row per example)")
    if mode != "sft" and skip_bad_lines:
        raise UsageError("--skip-bad-lines applies to --mode sft (JSONL) only")
    if mode == "continue" and data.name.endswith((".jsonl", ".jsonl.gz")):
        raise UsageError(f"--data {data}: --mode continue takes a clean corpus (prepare-corpus -i {data} -o corpus.txt); "
                         "for instruction JSONL use --mode sft")
    lora = _lora_config(lora_rank, lora_alpha, lora_dropout, lora_targets)
    model_over, train_over, _ = split_overrides(overrides)
    fs = FinetuneSpec(ckpt=ckpt, data=data, outdir=outdir, mode=mode, tokenizer=tokenizer,
                      force_tokenizer=force_tokenizer, lora=lora, val_file=val_file, cache_dir=cache_dir,
                      skip_bad_lines=skip_bad_lines, resume=resume, overwrite=overwrite, log_format=log_format,
                      tensorboard=tensorboard, started=started)
    _run_and_report(outdir, lambda: run_finetune(fs, model_over, train_over))


def _started() -> float:
    """When this process started (``--max-time`` counts from then), or now if that is unknown."""
    import time

    from minillm.io import process_started_at

    return process_started_at() or time.time()


def _check_log_format(log_format: str) -> None:
    if log_format not in ("text", "json"):
        raise UsageError(f"--log-format: {log_format!r} is not one of text, json")


def _lora_config(rank: int, alpha: Optional[float], dropout: Optional[float], targets: Optional[str]):
    """The LoRA settings of ``--lora-*``, or None to train all weights (``--lora-rank 0``)."""
    if rank < 0:
        raise UsageError(f"--lora-rank must be >= 0 (got {rank}); 0 trains all weights")
    if not rank:
        if alpha is not None or dropout is not None or targets is not None:
            raise UsageError("--lora-alpha, --lora-dropout and --lora-targets need --lora-rank R (R >= 1)")
        return None
    from minillm.lora import DEFAULT_TARGETS, LoRAConfig, parse_targets

    return LoRAConfig(rank=rank, alpha=alpha if alpha is not None else 2.0 * rank, dropout=dropout or 0.0,
                      targets=parse_targets(targets) if targets is not None else DEFAULT_TARGETS)


def _run_and_report(outdir: Path, run: Callable[[], dict[str, Any]]) -> None:
    """Run a training or fine-tuning run and print its summary as JSON (rank 0 alone under torchrun). A new run
    that failed in setup leaves no empty directory behind; Ctrl-C (130) and SIGTERM (143) end it with one
    yellow line, not an error: the checkpoint is saved."""
    from minillm.train.log import is_main_process
    from minillm.train.run import Interrupted

    fresh = not outdir.exists()
    try:
        summary = run()
    except BaseException as e:
        _remove_if_unused(outdir, fresh)
        if isinstance(e, Interrupted):
            if is_main_process():
                typer.secho(str(e), fg="yellow", err=True)
            raise typer.Exit(e.exit_code) from None
        raise
    if is_main_process():
        typer.echo(json.dumps(summary))


def _remove_if_unused(outdir: Path, fresh: bool) -> None:
    """Remove a run directory this command created when it holds nothing but the token cache (rank 0 only)."""
    import shutil

    from minillm.train.log import is_main_process

    if fresh and outdir.is_dir() and is_main_process():
        if all(p.name == "cache" for p in outdir.iterdir()):  # a .lock: another run holds it, leave it be
            shutil.rmtree(outdir, ignore_errors=True)


def _relaunch_torchrun(nproc: int) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node N -m minillm <the same arguments>``."""
    import os

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


def _dry_run(tokenizer: Path, corpora: tuple[Path, ...], mcfg, tcfg) -> None:
    from minillm.train.dryrun import dry_run_report

    typer.echo(json.dumps(dry_run_report(tokenizer, corpora, mcfg, tcfg), indent=2))


def _auto_config(tokenizer: Path, corpus: Path, outdir: Path, resume: bool,
                 overrides: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``--config auto``: (the plan's base preset, its keys under the flags given, ``{"plan": plan}`` for
    config.json). The plan is made for the tokenizer, ``corpus``, ``--max-time`` and ``--device``, and printed;
    on ``--resume`` it is the one saved in the run's config.json, never a new one."""
    from minillm.plan.report import plan_lines

    if resume:
        from minillm.train.rundir import run_config

        if not (outdir / "config.json").is_file():
            raise UsageError(f"--config auto --resume: {outdir / 'config.json'} is missing; start the run without --resume")
        plan = run_config(outdir).get("plan")
        if not isinstance(plan, dict):
            raise UsageError(f"--config auto --resume: the run in {outdir} was not planned (its config.json holds no "
                             "plan); resume it with the --config it was started with")
    else:
        if not overrides.get("max_time"):
            raise UsageError("--config auto plans the run for a time budget: add --max-time, e.g. --max-time 10m")
        from minillm.cli.data import build_plan

        p = build_plan(corpus, tokenizer, overrides["max_time"], overrides.get("device", "auto"), None)
        plan = json.loads(json.dumps({k: v for k, v in p.to_dict().items() if k != "candidates"}))
    for line in plan_lines(plan):
        typer.echo(line, err=True)
    return plan["preset"], {**plan["model"], **plan["train"], **overrides}, {"plan": plan}
