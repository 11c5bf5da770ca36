"""Progress logging, MFU peaks and durations (minillm/train/log.py)."""

from __future__ import annotations

import json

import pytest
import torch

from minillm.train.log import PEAK_FLOPS, TrainLog, fmt_duration, peak_flops


@pytest.mark.parametrize("secs,text", [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m05s")])
def test_fmt_duration(secs, text):
    assert fmt_duration(secs) == text


def test_peak_flops_only_on_known_gpus(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == PEAK_FLOPS["H100"] == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Mystery GPU")
    assert peak_flops(torch.device("cuda")) is None


def test_json_events_are_one_object_per_line(capsys):
    log = TrainLog(fmt="json", bar=False)
    log.event("eval", step=3, val_loss=4.5)
    log.close()
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert lines == [{"event": "eval", "step": 3, "val_loss": 4.5}]
