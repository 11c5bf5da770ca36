"""Guards on the run directory: an existing run is never overwritten by accident, and a resume may change
only the run's length and reporting; any other difference is refused, naming the keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from minillm.config import ModelConfig, TrainConfig, to_dict
from minillm.errors import MiniLLMError, UsageError

# Keys that may change on --resume; any other difference is refused.
RESUMABLE_KEYS = {"max_steps", "epochs", "max_time", "eval_every", "patience", "log_every", "num_workers", "device", "compile"}
RESUMABLE_MODEL_KEYS = {"loss_kernel"}  # kernel choices that leave the weights' meaning alone (absent in older runs)


def prepare_outdir(spec) -> None:
    """Refuse an existing run without --resume/--overwrite (touching nothing), then create the directory."""
    out = spec.outdir
    if out.exists() and not out.is_dir():
        raise MiniLLMError(f"--outdir {out} is a file; give a directory")
    if spec.resume and spec.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; give one of them")
    try:
        exists = out.is_dir() and any(p.name not in (".lock", "cache") for p in out.iterdir())
    except OSError as e:
        raise MiniLLMError(f"--outdir {out}: cannot read it ({e.strerror}); choose a directory you can write") from e
    if spec.resume:
        if not (out / "ckpt_last.pt").is_file():
            raise MiniLLMError(f"--resume: no checkpoint {out / 'ckpt_last.pt'}; start the run without --resume")
        if not (out / "config.json").is_file():
            raise MiniLLMError(f"--resume: {out / 'config.json'} is missing, so the run's config is unknown; "
                               f"start a new --outdir")
    elif exists and not spec.overwrite:
        raise MiniLLMError(f"--outdir {out} already holds files; add --resume to continue that run or --overwrite "
                           f"to replace it (or choose a new --outdir)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiniLLMError(f"--outdir {out}: cannot create it ({e.strerror}); choose a writable directory") from e


def config_diff(old: dict[str, Any], new: dict[str, Any], sections=("model", "train", "data")) -> list[str]:
    """Keys whose values differ between two resolved run configs, except those a resume may change."""
    diffs = []
    for section in sections:
        a, b = old.get(section, {}), new.get(section, {})
        for k in sorted(set(a) | set(b)):
            if ((section == "train" and k in RESUMABLE_KEYS) or (section == "model" and k in RESUMABLE_MODEL_KEYS)
                    or (section == "data" and k == "corpus")):
                continue  # may change; the corpus path may move (its sha256 is compared)
            if a.get(k) != b.get(k):
                diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs


def refuse_diffs(diffs: list[str]) -> None:
    if diffs:
        raise MiniLLMError("--resume: the run's config differs from the checkpoint's in:\n  " + "\n  ".join(diffs)
                           + "\nonly --max-steps, --epochs, --max-time, --eval-every, --patience, --log-every, --num-workers, "
                             "--device, --compile and --loss-kernel may change on resume; repeat the other flags as they were, "
                             "or start a new --outdir")


def check_resume(spec, old: dict[str, Any], mcfg: ModelConfig, tcfg: TrainConfig, tok_sha: str) -> None:
    """Refuse a resume that changes the tokenizer, model or training config, before any data work."""
    if old.get("data", {}).get("tokenizer_sha256") not in (None, tok_sha):
        raise MiniLLMError(f"--resume: --tokenizer {spec.tokenizer} is not the tokenizer the run in {spec.outdir} "
                           f"was trained with ({spec.outdir / 'tokenizer.json'}; the sha256 differs); resume with "
                           f"--tokenizer {spec.outdir / 'tokenizer.json'}")
    mcfg = dataclasses.replace(mcfg, vocab_size=old.get("model", {}).get("vocab_size", 0))
    refuse_diffs(config_diff(old, {"model": to_dict(mcfg), "train": to_dict(tcfg)}, ("model", "train")))
