"""Run-directory guards and resume comparisons (minillm/train/rundir.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from minillm.errors import MiniLLMError, UsageError
from minillm.train.rundir import RESUMABLE_KEYS, config_diff, prepare_outdir, refuse_diffs


def spec(out, resume=False, overwrite=False):
    return SimpleNamespace(outdir=out, resume=resume, overwrite=overwrite)


def test_config_diff_names_changed_keys_and_ignores_the_resumable_ones():
    old = {"model": {"n_layer": 2}, "train": {"lr": 1e-3, "max_steps": 10}, "data": {"corpus": "a", "corpus_sha256": "x"}}
    new = {"model": {"n_layer": 3}, "train": {"lr": 1e-3, "max_steps": 99}, "data": {"corpus": "b", "corpus_sha256": "x"}}
    assert "max_steps" in RESUMABLE_KEYS
    assert config_diff(old, new) == ["model.n_layer: 2 -> 3"]
    new["data"]["corpus_sha256"] = "y"
    assert "data.corpus_sha256: 'x' -> 'y'" in config_diff(old, new)


def test_loss_kernel_may_change_on_resume_and_may_be_absent_from_an_older_run():
    old = {"model": {"n_layer": 2}}  # a run written before loss_kernel existed
    assert config_diff(old, {"model": {"n_layer": 2, "loss_kernel": "torch"}}) == []
    assert config_diff({"model": {"loss_kernel": "liger"}}, {"model": {"loss_kernel": "torch"}}) == []
    assert config_diff({"model": {"attention": "auto"}}, {"model": {"attention": "math"}}) != []  # others stay fixed


def test_refuse_diffs_lists_every_key():
    refuse_diffs([])  # nothing differs: accepted
    with pytest.raises(MiniLLMError) as e:
        refuse_diffs(["model.n_layer: 2 -> 3", "train.lr: 0.001 -> 0.002"])
    assert "model.n_layer" in str(e.value) and "train.lr" in str(e.value)


def test_prepare_outdir_refuses_an_existing_run_untouched(tmp_path):
    out = tmp_path / "run"
    prepare_outdir(spec(out))  # new: created
    assert out.is_dir()
    (out / "config.json").write_text('{"format": 1, "model": {}, "train": {}}')  # a run with a checkpoint
    (out / "ckpt_last.pt").write_text("x")
    with pytest.raises(MiniLLMError, match="--resume.*--overwrite"):
        prepare_outdir(spec(out))
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_last.pt", "config.json"]
    prepare_outdir(spec(out, overwrite=True))  # allowed
    (out / "ckpt_last.pt").unlink()
    with pytest.raises(MiniLLMError, match="no checkpoint"):
        prepare_outdir(spec(out, resume=True))
    with pytest.raises(UsageError):
        prepare_outdir(spec(out, resume=True, overwrite=True))


def test_prepare_outdir_refuses_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(MiniLLMError, match="is a file"):
        prepare_outdir(spec(f))
