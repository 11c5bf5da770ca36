"""Atomic writes, safe checkpoint loading and the run lock: a crash (even SIGKILL mid-write) leaves the
previous file, a corrupted or malicious .pt is refused with a clear message and never executed, and a
lock protects a run directory until its process is gone."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import (
    RunLock,
    atomic_open,
    atomic_write_json,
    clean_stale_temps,
    load_checkpoint,
    save_checkpoint,
)
from minillm.errors import MiniLLMError

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


def test_an_error_mid_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "h.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path, "w", encoding="utf-8") as f:
        f.write('{"v": 2, "half')
        raise RuntimeError("disk on fire")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]


def test_an_os_error_names_the_file_and_says_the_old_one_is_intact(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state(1.0))

    def fail(f):
        raise OSError(28, "No space left on device")

    from minillm.checkpoint import atomic_save

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


def test_the_lock_refuses_a_live_owner_and_clears_a_dead_one(tmp_path):
    lock = RunLock(tmp_path)
    with lock:
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(MiniLLMError, match=rf"in use by another process \(pid {os.getpid()} "):
            RunLock(tmp_path).acquire()  # this very process holds it
    assert not (tmp_path / ".lock").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleeper.kill()
    sleeper.wait()
    # a record without a kernel lock on the file is a killed run's (or an older version's): free
    for stale in (f"{sleeper.pid} {time.time():.0f} {os.uname().nodename}\n", "", "garbage"):  # dead, half-written
        (tmp_path / ".lock").write_text(stale)
        with RunLock(tmp_path) as lock:
            assert lock.held
        assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_load_model_rebuilds_the_saved_model_exactly(tmp_path, tie):
    """A checkpoint in the train format loads back to the same function: identical logits, eval mode, tied
    weights still one tensor, and a fresh model of the same config would differ (so the test can fail)."""
    from minillm.checkpoint import load_model
    from minillm.config import ModelConfig, to_dict
    from minillm.model.gpt import GPT

    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qk_norm=True,
                      tie_embeddings=tie)
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the init a fresh GPT(cfg) would have
    save_checkpoint(tmp_path / "ckpt_best.pt", {"model": m.state_dict(), "model_config": to_dict(cfg)})
    loaded, state = load_model(tmp_path)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m.eval()(x)
        assert torch.equal(loaded(x), want) and not loaded.training
        torch.manual_seed(0)
        assert not torch.allclose(GPT(cfg).eval()(x), want, atol=1e-3)
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    assert state["path"] == str(tmp_path / "ckpt_best.pt")
