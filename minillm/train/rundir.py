"""Guards on the run directory: an existing run is never overwritten by accident, never lost to a failed
replacement, and a resume may change only the run's length and reporting; any other difference is refused,
naming the keys.

What minillm recognises as its own run (docs/FORMATS.md): a directory whose ``config.json`` is a run config
(``format``, ``model`` and ``train``, as every version wrote it). A run that holds a checkpoint is protected: only
``--resume`` continues it and only ``--overwrite`` replaces it; one that holds no checkpoint yet (a run that
failed or was killed before its first evaluation) is taken over by the next ``train``, keeping its token cache.

Replacing a run (``replacing``): everything is validated and built first; then the old run's files are moved
to ``RUN/.replaced/`` (marked complete by ``.replaced/.complete``), and deleted once the new run has written its
first checkpoint. Any earlier end (an error, Ctrl-C) removes the new run's files and puts the old ones back; a
``.replaced`` left by a killed process is settled by the next command (``recover_replaced``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from minillm.config import ModelConfig, TrainConfig, to_dict
from minillm.errors import MiniLLMError, UsageError
from minillm.io import atomic_open, atomic_write_json, fsync_dir, read_json

# Keys that may change on --resume; any other difference is refused.
RESUMABLE_KEYS = {"max_steps", "epochs", "max_time", "eval_every", "patience", "log_every", "num_workers", "device", "compile"}
RESUMABLE_MODEL_KEYS = {"loss_kernel"}  # kernel choices that leave the weights' meaning alone

# A run's own files (train and finetune write them; a replacement sets them aside), its checkpoints, and what a
# starting run writes before its first checkpoint.
RUN_FILES = ("ckpt_best.pt", "ckpt_last.pt", "history.json", "curves.png", "config.json", "tokenizer.json",
             "adapter.pt", "tb")
CHECKPOINTS = ("ckpt_last.pt", "ckpt_best.pt")
STARTED = ("config.json", "tokenizer.json", "tb")
REPLACED, DISCARDED, COMPLETE = ".replaced", ".replaced.del", ".complete"
INFRA = ("cache", ".lock", REPLACED, DISCARDED)  # beside the run's files: never counted as the user's
RUN_CONFIG_FIX = "restore it from a copy of the run, or choose another --outdir"


# ---------------------------------------------------------------- reading our JSON files


def is_run_config(obj: dict[str, Any]) -> bool:
    """True for a run's ``config.json`` as any minillm version wrote it (train and finetune)."""
    return isinstance(obj.get("format"), int) and isinstance(obj.get("model"), dict) and isinstance(obj.get("train"), dict)


def run_config(outdir: Path, fix: str = RUN_CONFIG_FIX) -> dict[str, Any]:
    """``OUTDIR/config.json``, refused unless it is a run config minillm wrote."""
    path = Path(outdir) / "config.json"
    cfg = read_json(path, fix)
    if not is_run_config(cfg):
        raise MiniLLMError(f"{path} is not a minillm run's config.json (it lacks format, model or train); {fix}")
    return cfg


# ---------------------------------------------------------------- checking --outdir


def inputs_of(spec) -> list[Path]:
    """The files a train or finetune run reads (never deleted or set aside, even inside its --outdir)."""
    return [Path(p) for p in (spec.tokenizer, *spec.corpus.corpora, spec.val_file) if p is not None]


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (symlinks resolved); False when either cannot be resolved."""
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve()
    return False


def check_outdir_not_base(ckpt: Path, outdir: Path) -> None:
    """Refuse an --outdir that is the base checkpoint's own run directory (the base is an input)."""
    if same_file(Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent, Path(outdir)):
        raise UsageError(f"--outdir {outdir} is the directory of the base checkpoint --ckpt {ckpt}, an input of "
                         f"this run; choose another --outdir")


def _user_names(out: Path, inputs: Iterable[Path]) -> list[str]:
    """Entries of ``out`` that count as held files: all but the lock, cache, replacement, temporaries and inputs."""
    inputs = list(inputs)
    return sorted(p.name for p in out.iterdir() if p.name not in INFRA and not
                  (p.name.startswith(".") and p.name.endswith(".tmp")) and not any(same_file(p, i) for i in inputs))


def prepare_outdir(spec, inputs: Iterable[Path] = ()) -> list[str]:
    """Check --outdir before anything is written, then create it. Refuses a run without --resume/--overwrite,
    a directory that is not a run, --resume without a checkpoint. A replacement a killed process left is
    settled first (call it holding the run's ``RunLock``). Returns notes for the log (a settled replacement, a run set aside or taken over)."""
    out = spec.outdir
    if out.exists() and not out.is_dir():
        raise MiniLLMError(f"--outdir {out} is a file; give a directory")
    if spec.resume and spec.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; give one of them")
    notes = []
    try:
        if (out / REPLACED).exists() or (out / DISCARDED).exists():
            notes.append(recover_replaced(out))  # the caller holds the run's lock: no live replacement
        names = _user_names(out, inputs) if out.is_dir() else []
    except OSError as e:
        raise MiniLLMError(f"--outdir {out}: cannot read it ({e.strerror}); choose a directory you can write") from e
    if spec.resume:
        if not (out / "ckpt_last.pt").is_file():
            raise MiniLLMError(f"--resume: no checkpoint {out / 'ckpt_last.pt'}; start the run without --resume")
        if not (out / "config.json").is_file():
            raise MiniLLMError(f"--resume: {out / 'config.json'} is missing, so the run's config is unknown; "
                               f"start a new --outdir")
        run_config(out)
    elif names:
        if "config.json" not in names or not is_run_config(read_json(out / "config.json", RUN_CONFIG_FIX)):
            why = f"{out / 'config.json'} is not a run's" if "config.json" in names else "no config.json"
            raise MiniLLMError(f"--outdir {out} holds files ({', '.join(names[:5])}) and is not a minillm run ({why}); "
                               f"nothing was touched: choose another --outdir (or empty it)")
        held = any((out / c).is_file() for c in CHECKPOINTS)
        if not spec.overwrite and (held or set(names) - set(RUN_FILES)):
            raise MiniLLMError(f"--outdir {out} already holds files; add --resume to continue that run or --overwrite "
                               f"to replace it (or choose a new --outdir)")
        notes.append(f"--overwrite: the run in {out} is set aside in {out / REPLACED} until the new run saves its "
                     f"first checkpoint" if held else
                     f"--outdir {out} holds a run that saved no checkpoint ({', '.join(names)}): it is replaced, "
                     f"keeping its token cache")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiniLLMError(f"--outdir {out}: cannot create it ({e.strerror}); choose a writable directory") from e
    return [n for n in notes if n]


# ---------------------------------------------------------------- replacing a run


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _set_aside(out: Path, keep: set[str]) -> None:
    """Move the run's files (but ``keep``) into ``.replaced``, then mark it complete; undone if it fails."""
    present = [n for n in RUN_FILES if n not in keep and (out / n).exists()]
    if not present:
        return
    aside = out / REPLACED
    aside.mkdir()  # none is left: prepare_outdir settled any under the lock
    try:
        for n in present:
            os.replace(out / n, aside / n)
        (aside / COMPLETE).touch()
        fsync_dir(aside)
        fsync_dir(out)
    except BaseException:
        _put_back(out)
        raise


def _put_back(out: Path, started: Iterable[str] = ()) -> None:
    """Undo a replacement: remove the new run's ``started`` files (only once the old ones were all set aside),
    then move the old ones back."""
    aside = out / REPLACED
    if (aside / COMPLETE).exists():
        for n in started:
            _remove(out / n)
        (aside / COMPLETE).unlink()
    if aside.is_dir():
        for p in aside.iterdir():
            _remove(out / p.name)
            os.replace(p, out / p.name)
        aside.rmdir()
        fsync_dir(out)


def _discard(out: Path) -> None:
    """Delete the old run's files once the new run has its first checkpoint (renamed first, so a kill mid-way
    leaves ``.replaced.del``, deleted at the next start, never a half-deleted ``.replaced``)."""
    shutil.rmtree(out / DISCARDED, ignore_errors=True)
    if (out / REPLACED).exists():
        os.replace(out / REPLACED, out / DISCARDED)
        shutil.rmtree(out / DISCARDED, ignore_errors=True)


def recover_replaced(out: Path) -> str | None:
    """Settle a replacement a killed process left in ``out`` (call it holding the run's lock): when the new run
    wrote a checkpoint after setting the old run aside, the old run is deleted; otherwise the new run's files
    are removed and the old run is put back. Returns what was done, or None when there was nothing."""
    out = Path(out)
    aside = out / REPLACED
    if not aside.exists():
        if not (out / DISCARDED).exists():
            return None
        _discard(out)
        return f"deleted {out / DISCARDED}, the run a killed --overwrite had replaced"
    shutil.rmtree(out / DISCARDED, ignore_errors=True)
    if (aside / COMPLETE).exists() and any((out / c).is_file() for c in CHECKPOINTS):
        _discard(out)
        return f"deleted {aside}: the run a killed --overwrite had replaced (the new run has a checkpoint)"
    _put_back(out, ("config.json", "tb"))
    return f"put back the run in {out}: a replacement of it was killed before its first checkpoint"


@contextlib.contextmanager
def replacing(outdir: Path, inputs: Iterable[Path], active: bool = True) -> Iterator[Callable[[], None]]:
    """Around writing a new run into ``outdir`` (config.json, tokenizer.json, the loop): the old run's files
    are set aside (never an input's), and the body gets ``saved``, to call each time a checkpoint is written;
    the first call deletes the old files. An end before it (an error, Ctrl-C, a run that saved nothing) removes
    the new run's files and puts the old ones back. ``active`` False (a resume, another rank): does nothing."""
    if not active:
        yield lambda: None
        return
    out = Path(outdir)
    keep = {n for n in RUN_FILES if any(same_file(out / n, Path(i)) for i in inputs)}
    _set_aside(out, keep)
    done = False

    def saved() -> None:
        nonlocal done
        if not done:
            done = True
            with contextlib.suppress(OSError):  # what stays is deleted at the next start (recover_replaced)
                _discard(out)

    try:
        yield saved
    finally:
        if not done:
            started = [n for n in STARTED if n not in keep]
            if (out / REPLACED).exists():
                _put_back(out, started)
            else:  # nothing was set aside (a new directory): the new run's files go all the same
                for n in started:
                    _remove(out / n)


def write_run_files(outdir: Path, run_cfg: dict[str, Any], tokenizer: Path) -> None:
    """``config.json`` and a copy of the tokenizer (unless it is the run's own ``tokenizer.json``)."""
    atomic_write_json(outdir / "config.json", run_cfg)
    if not same_file(Path(tokenizer), outdir / "tokenizer.json"):
        with open(tokenizer, "rb") as src, atomic_open(outdir / "tokenizer.json") as dst:
            shutil.copyfileobj(src, dst)


# ---------------------------------------------------------------- resume


def _defaults(cls: type) -> dict[str, Any]:
    return to_dict(cls())


SECTION_DEFAULTS = {"model": _defaults(ModelConfig), "train": _defaults(TrainConfig)}


def config_diff(old: dict[str, Any], new: dict[str, Any], sections=("model", "train", "data")) -> list[str]:
    """Keys whose values differ between two resolved run configs, except those a resume may change. In
    ``model`` and ``train``, a key missing on one side (a field added since) counts as the field's default and a
    key no field has (one removed since) is ignored; in other sections only keys present on both sides count."""
    diffs = []
    for section in sections:
        a, b = old.get(section) or {}, new.get(section) or {}
        if section in SECTION_DEFAULTS:
            base = SECTION_DEFAULTS[section]
            a, b = ({k: d.get(k, v) for k, v in base.items()} for d in (a, b))
        keys = sorted(set(a) & set(b))
        for k in keys:
            if ((section == "train" and k in RESUMABLE_KEYS) or (section == "model" and k in RESUMABLE_MODEL_KEYS)
                    or (section == "data" and k == "corpus")):
                continue  # may change; the corpus path may move (its sha256 is compared)
            if a[k] != b[k]:
                diffs.append(f"{section}.{k}: {a[k]!r} -> {b[k]!r}")
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
