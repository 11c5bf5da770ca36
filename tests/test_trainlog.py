"""Progress logging, MFU peaks and durations (minillm/train/log.py)."""

from __future__ import annotations

import json

import pytest
import torch

from minillm.train.log import TrainLog, fmt_duration, peak_flops


@pytest.mark.parametrize("secs,text", [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m05s")])
def test_fmt_duration(secs, text):
    assert fmt_duration(secs) == text


# Real device names as torch reports them -> the vendor's dense bf16 tensor-core peak, written out here (not read
# from the table): several names hold a shorter key ("NVIDIA A100" holds "A10", "NVIDIA L40S" holds "L40" and
# "L4"), so a lookup that tries the keys in the wrong order gives the wrong peak.
KNOWN_GPUS = [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12),
              ("NVIDIA B200", 2250e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A800 80GB PCIe", 312e12),
              ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12),
              ("NVIDIA A10", 125e12), ("NVIDIA RTX A6000", 155e12), ("NVIDIA GeForce RTX 4090", 165e12),
              ("NVIDIA GeForce RTX 3090", 71e12), ("Tesla T4", 65e12), ("Tesla V100-SXM2-16GB", 125e12)]


@pytest.mark.parametrize("name,peak", KNOWN_GPUS, ids=[n for n, _ in KNOWN_GPUS])
def test_peak_flops_of_each_known_gpu(monkeypatch, name, peak):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: asked.append(d) or name)
    assert peak_flops(torch.device("cuda", 1)) == peak
    assert asked == [torch.device("cuda", 1)]  # the name of the run's own GPU, not of GPU 0


def test_peak_flops_none_on_cpu_and_unknown_gpus(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Mystery GPU")
    assert peak_flops(torch.device("cuda")) is None


def test_json_events_are_one_object_per_line(capsys):
    log = TrainLog(fmt="json", bar=False)
    log.event("eval", step=3, val_loss=4.5)
    log.close()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert lines == [{"event": "eval", "step": 3, "val_loss": 4.5}]


def test_epoch_helper_counts_consumed_windows():
    import numpy as np

    from minillm.train.log import epoch_of

    class L:
        windows_per_epoch, n_windows = 10, np.array([10])

    assert epoch_of(L(), {"epoch": 2, "pos": 5}) == 2.5


def test_an_evaluation_record_and_the_history_files(tmp_path):
    import math

    import numpy as np

    from minillm.data.loader import Loader, Source
    from minillm.train.log import eval_record, write_history
    from minillm.train.state import RunState

    state = RunState(step=6, tokens=1200, elapsed_s=2.0, running=[3.0, 2.0], train_s=1.5, first_step_s=0.4)
    one = Loader(np.arange(200), np.arange(0, 160, 16), 16, 2, seed=0)
    rec = eval_record(state, 2.25, 1e-3, one, {"epoch": 1, "pos": 5, "drawn": [15]})
    assert rec == {"step": 6, "epoch": 1.5, "tokens": 1200, "train_loss": 2.5, "val_loss": 2.25,
                   "val_ppl": math.exp(2.25), "lr": 1e-3, "tokens_per_s": 600.0, "elapsed_s": 2.0,
                   "train_s": 1.5, "first_step_s": 0.4}
    two = Loader(None, None, 16, 2, seed=0, sources=[Source("a.txt", np.arange(200), np.arange(0, 160, 16)),
                                                    Source("b.txt", np.arange(100), np.arange(0, 80, 16))])
    rec = eval_record(RunState(), 9.0, 0.0, two, {"epoch": 0, "pos": 3, "drawn": [4, 1]})
    assert rec["source_epochs"] == {"a.txt": 0.4, "b.txt": 0.2} and rec["train_loss"] is None
    write_history(tmp_path, [rec])
    assert json.loads((tmp_path / "history.json").read_text()) == {"format": 1, "evals": [rec]}
    assert (tmp_path / "curves.png").stat().st_size > 1000
