"""Nothing that existed before is lost (issue 18): ``train``/``finetune --overwrite`` set the old run aside and
put it back on any failure before the new run's first checkpoint (a SIGKILL included); an input of the command
is never deleted; ``export --overwrite`` replaces only an export minillm wrote; a run directory that holds no
checkpoint yet is taken over; every numeric config field is range-checked before the outdir is touched;
``--resume`` of an older run ignores keys added or removed since; a damaged ``config.json`` gets a one-line
error naming it. Runs start from the run written by an earlier version (tests/fixtures/v_c624e6b)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.cli import app
from tests.conftest import wait_for_step

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "v_c624e6b"
CPU = ["--device", "cpu", "--compile", "off", "--log-format", "json"]
TRAIN = ["train", "-t", "run/tokenizer.json", "-c", "corpus.txt", "--config", "fx.toml", *CPU]

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture
def old(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the fixture (a run, a LoRA fine-tune of it, an HF export of it); the current directory."""
    dst = tmp_path / "old"
    shutil.copytree(FIXTURE, dst)
    monkeypatch.chdir(dst)
    return dst


def cli(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args])


def failed(r, code: int, *needles: str) -> str:
    """A clean failure: the exit code, every needle on stderr, one error line, no traceback."""
    err = r.stderr
    assert r.exit_code == code, f"exit {r.exit_code} (want {code}):\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("{", "encoding ", "note:"))]
    assert lines and lines[0].startswith("error:"), err
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"
    return err


def snapshot(d: Path) -> dict[str, tuple[bytes, float]]:
    """Every file under ``d`` (hidden ones included): its bytes and mtime."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime) for p in sorted(d.rglob("*")) if p.is_file()}


def without_lock(snap: dict) -> dict:
    """A snapshot without the lock file and the token cache (kept when a run is replaced)."""
    return {k: v for k, v in snap.items() if k != ".lock" and not k.startswith("cache/")}


def spawn(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "minillm", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def sigkill_at_step(cwd: Path, step: int, *args: str) -> None:
    proc = spawn(cwd, *args)
    try:
        wait_for_step(proc, step)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def summary(r) -> dict:
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def generates(runner, ckpt: str) -> None:
    r = cli(runner, "generate", "--ckpt", ckpt, "-p", "el rey", "--max-tokens", "4", "--device", "cpu")
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ 1. an input of the command is never deleted


def test_train_overwrite_with_the_runs_own_tokenizer_keeps_it(old, runner):
    tok = (old / "run" / "tokenizer.json").read_bytes()
    s = summary(cli(runner, *TRAIN, "-o", "run", "--overwrite", "--max-steps", "4", "--eval-every", "2"))
    assert s["steps"] == 4
    assert (old / "run" / "tokenizer.json").read_bytes() == tok
    assert not (old / "run" / ".replaced").exists() and not (old / "run" / ".replaced.del").exists()
    history = json.loads((old / "run" / "history.json").read_text())["evals"]
    assert [h["step"] for h in history] == [2, 4]  # the new run's; the old one (6 steps) is gone
    generates(runner, "run")


@pytest.mark.parametrize("ckpt", ["run", "run/ckpt_best.pt", "run/ckpt_last.pt"])
@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_finetune_into_the_base_checkpoints_own_directory_is_refused(old, runner, ckpt, extra):
    before = snapshot(old / "run")
    r = cli(runner, "finetune", "--ckpt", ckpt, "-d", "corpus.txt", "-o", "run", "--max-steps", "2", *CPU, *extra)
    failed(r, 2, "--ckpt", "choose another --outdir")
    assert snapshot(old / "run") == before
    generates(runner, "run")


# ------------------------------------------------------------------ 2. a failed --overwrite keeps the old run


def test_overwrite_with_a_bad_value_leaves_the_old_run_untouched(old, runner):
    before = snapshot(old / "run")
    failed(cli(runner, *TRAIN, "-o", "run", "--overwrite", "--beta1", "1.5"), 2, "--beta1", "[0, 1)")
    assert snapshot(old / "run") == before


def test_overwrite_failing_before_its_first_checkpoint_puts_the_old_run_back(old, runner, monkeypatch):
    from minillm.train import loop as training
    def boom(*a, **kw):
        raise RuntimeError("boom in the first evaluation")

    monkeypatch.setattr(training, "estimate_val_loss", boom)
    before = snapshot(old / "run")
    failed(cli(runner, *TRAIN, "-o", "run", "--overwrite", "--max-steps", "4", "--eval-every", "2"), 1, "boom")
    assert without_lock(snapshot(old / "run")) == without_lock(before)
    assert sorted(p.name for p in (old / "run").iterdir() if p.name != ".lock") == sorted(
        p.name for p in (FIXTURE / "run").iterdir())


def test_finetune_overwrite_failing_puts_the_old_finetune_back(old, runner, monkeypatch):
    from minillm.train import loop as training
    def boom(*a, **kw):
        raise RuntimeError("boom in the first evaluation")

    monkeypatch.setattr(training, "estimate_val_loss", boom)
    before = snapshot(old / "lora")
    r = cli(runner, "finetune", "--ckpt", "run/ckpt_best.pt", "-d", "corpus.txt", "-o", "lora", "--overwrite",
            "--lora-rank", "2", "--max-steps", "4", "--eval-every", "2", *CPU)
    failed(r, 1, "boom")
    assert without_lock(snapshot(old / "lora")) == without_lock(before)  # adapter.pt too


def test_ctrl_c_before_the_first_checkpoint_of_an_overwrite_puts_the_old_run_back(old, runner, monkeypatch):
    from minillm.train.log import TrainLog

    enter = TrainLog.__enter__

    def interrupted(self):  # a real SIGINT, as the run starts its loop (the old run is set aside by then)
        os.kill(os.getpid(), signal.SIGINT)
        return enter(self)

    monkeypatch.setattr(TrainLog, "__enter__", interrupted)
    before = snapshot(old / "run")
    r = cli(runner, *TRAIN, "-o", "run", "--overwrite", "--max-steps", "4", "--eval-every", "2")
    assert r.exit_code == 130, r.output
    assert without_lock(snapshot(old / "run")) == without_lock(before)


def test_sigkill_during_an_overwrite_then_the_old_run_resumes(old, runner):
    """SIGKILL after the old run was set aside, before the new one saved a checkpoint: the next command puts the
    old run back (it resumes to the figure c624e6b printed, as tests/test_compat.py checks)."""
    sigkill_at_step(old, 3, *TRAIN, "-o", "run", "--overwrite", "--max-steps", "100000", "--eval-every", "100000",
                    "--log-every", "1")
    aside = old / "run" / ".replaced"
    assert (aside / "ckpt_last.pt").is_file() and not (old / "run" / "ckpt_last.pt").exists()
    r = cli(runner, *TRAIN, "-o", "run", "--resume", "--max-steps", "9")
    s = summary(r)
    assert s["steps"] == 9 and s["best_val_loss"] == pytest.approx(5.343135833740234, abs=1e-4)
    assert "put back" in r.stderr and not aside.exists()


def _run_dir(d: Path, *names: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_text(json.dumps({"format": 1, "model": {}, "train": {}}) if n == "config.json" else n)
    return d


def test_a_leftover_replacement_is_settled_at_the_next_start(tmp_path):
    from minillm.train.rundir import recover_replaced

    # killed after the new run's first checkpoint, before the old run was deleted: the old one goes
    run = _run_dir(tmp_path / "a", "config.json", "ckpt_last.pt")
    _run_dir(run / ".replaced", "config.json", "ckpt_last.pt", "history.json", ".complete")
    assert "deleted" in recover_replaced(run)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_last.pt", "config.json"]
    # killed while setting the old run aside (no .complete mark): the checkpoint left in place is the old run's
    run = _run_dir(tmp_path / "b", "config.json", "ckpt_last.pt", "notes.txt")
    _run_dir(run / ".replaced", "ckpt_best.pt", "history.json")
    assert "put back" in recover_replaced(run)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_best.pt", "ckpt_last.pt", "config.json", "history.json",
                                                    "notes.txt"]
    assert (run / "ckpt_best.pt").read_text() == "ckpt_best.pt"
    # killed before the new run's first checkpoint: its own files go, the old run's come back
    run = _run_dir(tmp_path / "c", "config.json", "tb")
    (run / "config.json").write_text("new")
    _run_dir(run / ".replaced", "config.json", "ckpt_last.pt", ".complete")
    assert "put back" in recover_replaced(run)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_last.pt", "config.json"]
    assert json.loads((run / "config.json").read_text())["format"] == 1
    # killed while deleting the old run
    run = _run_dir(tmp_path / "d", "config.json", "ckpt_last.pt")
    _run_dir(run / ".replaced.del", "ckpt_last.pt")
    recover_replaced(run)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_last.pt", "config.json"]
    assert recover_replaced(run) is None


# ------------------------------------------------------------------ 3. export --overwrite: only an export of ours


@pytest.fixture
def user_dir(old: Path) -> Path:
    d = old / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    return d


def test_export_overwrite_refuses_a_directory_that_is_not_an_export(old, runner, user_dir):
    pytest.importorskip("safetensors")
    before = snapshot(user_dir)
    failed(cli(runner, "export", "--ckpt", "run", "-o", user_dir, "--overwrite"), 2, str(user_dir),
           "not an export minillm wrote")
    assert snapshot(user_dir) == before
    (user_dir / "config.json").write_text('{"model_type": "llama"}')  # someone else's HF model
    before = snapshot(user_dir)
    failed(cli(runner, "export", "--ckpt", "run", "-o", user_dir, "--overwrite"), 2, "not an export minillm wrote")
    assert snapshot(user_dir) == before
    before = snapshot(old / "lora")  # a run of ours is not an export either
    failed(cli(runner, "export", "--ckpt", "run", "-o", "lora", "--overwrite"), 2, "not an export minillm wrote")
    assert snapshot(old / "lora") == before
    assert not [p for p in old.iterdir() if p.name.startswith(".")]


def test_export_overwrite_keeps_files_the_user_added_to_an_export(old, runner):
    pytest.importorskip("safetensors")
    (old / "hf" / "README.md").write_text("# my model card")
    before = snapshot(old / "hf")
    failed(cli(runner, "export", "--ckpt", "run", "-o", "hf", "--overwrite"), 2, "README.md")
    assert snapshot(old / "hf") == before


def test_export_overwrite_replaces_an_export_written_by_an_earlier_version(old, runner):
    pytest.importorskip("safetensors")
    before = snapshot(old / "hf")
    r = cli(runner, "export", "--ckpt", "lora", "-o", "hf", "--overwrite")
    assert r.exit_code == 0, r.output
    after = snapshot(old / "hf")
    assert sorted(after) == sorted(before) and after["model.safetensors"] != before["model.safetensors"]
    assert not [p for p in old.iterdir() if p.name.startswith(".")]
    generates(runner, "hf")


# ------------------------------------------------------------------ 5. a run dir without a checkpoint is taken over


@pytest.mark.parametrize("flags,model,train,needle", [
    (["--beta1", "1.5"], "", "", "--beta1 must be in [0, 1) (got 1.5)"),
    ([], "rope_theta = -1.0", "", "[model] rope_theta must be a finite number > 0"),
    ([], "", "epochs = inf", "--epochs must be a finite number >= 0 (got inf)"),
])
def test_a_bad_value_is_refused_before_the_outdir_is_touched(old, runner, flags, model, train, needle):
    toml = (old / "fx.toml").read_text().replace("[train]", f"{model}\n[train]") + train + "\n"
    (old / "bad.toml").write_text(toml)
    args = [*TRAIN, "-o", "new", "--max-steps", "2", "--eval-every", "2"]
    err = failed(cli(runner, *args, "--config", "bad.toml", *flags), 2, needle)
    assert "learning rate" not in err and "--lr" not in err
    assert not (old / "new").exists()
    assert summary(cli(runner, *args))["steps"] == 2


def test_a_run_killed_before_its_first_checkpoint_is_taken_over_keeping_the_cache(old, runner):
    sigkill_at_step(old, 2, *TRAIN, "-o", "new", "--max-steps", "100000", "--eval-every", "100000", "--log-every", "1")
    left = {p.name for p in (old / "new").iterdir()}
    assert {"config.json", "tokenizer.json", "cache"} <= left and not left & {"ckpt_last.pt", "ckpt_best.pt"}
    cache = {p.name: p.stat().st_mtime_ns for p in (old / "new" / "cache").iterdir()}
    r = cli(runner, *TRAIN, "-o", "new", "--max-steps", "2", "--eval-every", "2")
    assert summary(r)["steps"] == 2
    assert "no checkpoint" in r.stderr  # the take-over is said
    assert {p.name: p.stat().st_mtime_ns for p in (old / "new" / "cache").iterdir()} == cache  # reused as it was


def test_a_directory_that_is_not_a_run_is_never_taken_over_or_overwritten(old, runner, user_dir):
    (user_dir / "config.json").write_text('{"mine": true}')
    (user_dir / "tokenizer.json").write_text("my own file")
    before = snapshot(user_dir)
    for extra in ([], ["--overwrite"]):
        failed(cli(runner, *TRAIN, "-o", user_dir, "--max-steps", "2", *extra), 1, str(user_dir),
               "not a minillm run", "another --outdir")
        assert without_lock(snapshot(user_dir)) == before
    # a run's leftovers beside a file of the user's are not taken over without --overwrite, which keeps that file
    leftover = old / "left"
    shutil.copytree(old / "run", leftover)
    for name in ("ckpt_best.pt", "ckpt_last.pt", "history.json"):
        (leftover / name).unlink()
    (leftover / "notes.txt").write_text("mine")
    failed(cli(runner, *TRAIN, "-o", leftover, "--max-steps", "2"), 1, "--overwrite")
    assert summary(cli(runner, *TRAIN, "-o", leftover, "--max-steps", "2", "--overwrite"))["steps"] == 2
    assert (leftover / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ 6. every numeric field's range


def _flag(name: str) -> str:
    from minillm.config import TOML_ONLY

    return f"[model] {name}" if name in TOML_ONLY else "--" + name.replace("_", "-")


def test_every_field_but_the_toml_only_ones_is_a_train_flag():
    import typer.main

    from minillm.config import TOML_ONLY, ModelConfig, TrainConfig

    cmd = typer.main.get_command(app).commands["train"]
    flags = {o for p in cmd.params for o in p.opts}
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert (_flag(f.name) in flags) != (f.name in TOML_ONLY), f.name


def test_every_numeric_field_is_range_checked_naming_its_flag_or_key():
    """-1 is out of range for every integer field and NaN for every float field."""
    import typing

    from minillm.config import ModelConfig, TrainConfig, resolve
    from minillm.errors import UsageError

    for cls in (ModelConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            bad = {int: -1, float: math.nan}.get(hints[f.name])
            if bad is None:
                continue
            with pytest.raises(UsageError) as e:
                resolve("tiny", {f.name: bad, **({"max_time": 60.0} if f.name in ("epochs", "max_steps") else {})})
            assert f"{_flag(f.name)} must be" in str(e.value), (f.name, str(e.value))


@pytest.mark.parametrize("over,needle", [
    ({"rope_theta": -10000.0}, "[model] rope_theta must be a finite number > 0 (got -10000.0)"),
    ({"weight_decay": -1.0}, "--weight-decay must be a finite number >= 0 (got -1.0)"),
    ({"grad_clip": -1.0}, "--grad-clip must be a finite number >= 0 (0 disables clipping)"),
    ({"lr": 1e-3, "min_lr": 1e-2}, "--min-lr (0.01) must be at most --lr (0.001)"),
    ({"seed": 2**64}, "--seed must be in [0, 2**64 - 1]"),
    ({"seed": -1}, "--seed must be in [0, 2**64 - 1]"),
    ({"beta1": 1.0}, "--beta1 must be in [0, 1)"),
    ({"beta2": -0.1}, "--beta2 must be in [0, 1)"),
    ({"epochs": math.inf}, "--epochs must be a finite number >= 0"),
    ({"lr": math.inf}, "--lr must be a finite number > 0"),
    ({"max_time": math.inf}, "--max-time must be a finite number of seconds >= 0"),
    ({"muon_lr": 0.0}, "--muon-lr must be a finite number > 0"),
    ({"min_lr": math.nan}, "--min-lr must be a finite number"),
])
def test_range_errors(over, needle):
    from minillm.config import resolve
    from minillm.errors import UsageError

    with pytest.raises(UsageError) as e:
        resolve("tiny", over)
    assert needle in str(e.value)
    if "rope" in needle:
        assert "lr" not in str(e.value)


def test_all_range_problems_in_one_message():
    from minillm.config import resolve
    from minillm.errors import UsageError

    with pytest.raises(UsageError) as e:
        resolve("tiny", {"weight_decay": -1.0, "grad_clip": -1.0, "beta1": 2.0, "seed": 2**64, "rope_theta": -1.0})
    msg = str(e.value)
    assert msg.startswith("invalid config:") and len(msg.splitlines()) == 6
    for needle in ("--weight-decay", "--grad-clip", "--beta1", "--seed", "rope_theta"):
        assert needle in msg


def test_the_presets_and_the_fixture_run_are_in_range():
    from minillm.config import PRESETS, model_from_dict, resolve, train_from_dict, validate

    for name in PRESETS:
        resolve(name)
    cfg = json.loads((FIXTURE / "run" / "config.json").read_text())
    assert validate(model_from_dict(cfg["model"]), train_from_dict(cfg["train"])) == []


# ------------------------------------------------------------------ 7. --resume across added and removed keys


def test_config_diff_takes_a_missing_key_as_its_default_and_ignores_unknown_ones():
    from minillm.train.rundir import config_diff

    old = {"model": {"n_layer": 2, "gone": 1}, "train": {"lr": 1e-3}, "data": {"corpus_sha256": "x"}}
    new = {"model": {"n_layer": 2, "qk_norm": False}, "train": {"lr": 1e-3, "doc_masking": False},
           "data": {"corpus_sha256": "x", "added": 3}}
    assert config_diff(old, new) == []
    assert config_diff(old, {**new, "model": {"n_layer": 2, "qk_norm": True}}) == ["model.qk_norm: False -> True"]
    assert config_diff({"train": {"doc_masking": True}}, {"train": {}}) == ["train.doc_masking: True -> False"]


def test_an_older_run_with_a_key_dropped_and_an_unknown_one_resumes(old, runner):
    path = old / "run" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["model"]["loss_chunk"], cfg["train"]["doc_masking"]  # added after the run was written
    cfg["model"]["retired_knob"] = 3  # removed since
    cfg["train"]["old_schedule"] = "linear"
    path.write_text(json.dumps(cfg, indent=2))
    s = summary(cli(runner, *TRAIN, "-o", "run", "--resume", "--max-steps", "9"))
    assert s["steps"] == 9 and s["best_val_loss"] == pytest.approx(5.343135833740234, abs=1e-4)


# ------------------------------------------------------------------ 8. a damaged config.json


def _truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_resume_with_a_truncated_config_json_names_it(old, runner):
    _truncate(old / "run" / "config.json")
    before = snapshot(old / "run")
    failed(cli(runner, *TRAIN, "-o", "run", "--resume", "--max-steps", "9"), 1,
           str(Path("run") / "config.json"), "not valid JSON", "another --outdir")
    assert snapshot(old / "run") == before
    failed(cli(runner, *TRAIN, "-o", "run", "--overwrite", "--max-steps", "9"), 1, "config.json", "not valid JSON")
    assert snapshot(old / "run") == before


def test_finetune_resume_with_a_truncated_config_json_names_it(old, runner):
    _truncate(old / "lora" / "config.json")
    r = cli(runner, "finetune", "--ckpt", "run/ckpt_best.pt", "-d", "corpus.txt", "-o", "lora", "--resume",
            "--lora-rank", "2", "--max-steps", "6", "--eval-every", "2", *CPU)
    failed(r, 1, str(Path("lora") / "config.json"), "not valid JSON")


def test_a_truncated_export_config_json_names_it(old, runner):
    pytest.importorskip("safetensors")
    _truncate(old / "hf" / "config.json")
    r = cli(runner, "generate", "--ckpt", "hf", "-p", "x", "--max-tokens", "2", "--device", "cpu")
    failed(r, 1, str(Path("hf") / "config.json"), "not valid JSON", "re-export")


def test_evaluate_split_val_with_a_truncated_config_json_names_it(old, runner):
    _truncate(old / "run" / "config.json")
    r = cli(runner, "evaluate", "--ckpt", "run", "--split", "val", "--device", "cpu")
    failed(r, 1, str(Path("run") / "config.json"), "not valid JSON")
