"""Checkpoints: a crash (even SIGKILL mid-save) leaves the previous checkpoint, and a corrupted or malicious .pt
is refused with a clear message and never executed. (Atomic writes and the run lock: test_io.py; rebuilding a
model: test_load.py.)"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.errors import MiniLLMError
from minillm.io import clean_stale_temps

ROOT = Path(__file__).resolve().parents[1]


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "model_config": {"n_embd": 64}, "step": 3}


def test_save_and_load_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", _state(2.0))
    ck = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(ck["model"]["w"], torch.full((64, 64), 2.0)) and ck["format"] == 1 and ck["step"] == 3
    with pytest.raises(MiniLLMError, match="without ckpt_best.pt or ckpt_last.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(MiniLLMError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_an_os_error_names_the_file_and_says_the_old_one_is_intact(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state(1.0))

    def fail(f):
        raise OSError(28, "No space left on device")

    from minillm.io import atomic_save

    with pytest.raises(MiniLLMError, match=r"no space left on .* while writing .*c\.pt; the previous checkpoint is intact"):
        atomic_save(path, fail)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(64, 64))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


_SLOW_SAVE = r"""
import sys, time, torch
from minillm import checkpoint
real_save = torch.save
def slow_save(obj, f):
    real_save(obj, f)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)  # SIGKILL arrives here: the temporary file is half done, the rename never happens
torch.save = slow_save
checkpoint.save_checkpoint(sys.argv[1], {"model": {"w": torch.full((256, 256), 2.0)}, "model_config": {}})
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt_last.pt"
    save_checkpoint(path, _state(1.0))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "writing"
    temps = list(tmp_path.glob(".ckpt_last.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    proc.kill()
    proc.wait(timeout=30)
    ck = load_checkpoint(path)
    assert torch.equal(ck["model"]["w"], torch.ones(64, 64))  # the previous checkpoint, whole
    assert clean_stale_temps(tmp_path) == temps and [p.name for p in tmp_path.iterdir()] == ["ckpt_last.pt"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "text", "flipped"])
def test_a_damaged_checkpoint_gives_a_clear_error(tmp_path, damage):
    path = tmp_path / "ckpt_last.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096),
           "text": b"hello, this is not a checkpoint\n",
           "flipped": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:]}[damage]
    path.write_bytes(bad)
    with pytest.raises(MiniLLMError, match=r"ckpt_last\.pt is (truncated or )?corrupted.*other checkpoint"):
        load_checkpoint(path)


class _Payload:
    """What an attacker would put in a .pt: unpickling it runs a command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("via", ["torch.save", "pickle"])
def test_a_pickled_object_is_refused_and_never_executed(tmp_path, via):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"model": {"w": torch.zeros(2)}, "model_config": {}, "x": _Payload(marker)}
    if via == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    with pytest.raises(MiniLLMError, match="nothing in it was executed|corrupted"):
        load_checkpoint(path)
    assert not marker.exists()
    if via == "torch.save":
        with pytest.raises(MiniLLMError, match="holds pickled objects other than tensors"):
            load_checkpoint(path)


def test_a_file_without_weights_is_not_a_checkpoint(tmp_path):
    torch.save({"hello": 1}, tmp_path / "x.pt")
    with pytest.raises(MiniLLMError, match="not a minillm checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
