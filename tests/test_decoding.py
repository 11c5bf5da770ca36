"""Decoding defaults: greedy decoding gets a stronger repetition penalty (at 1.1 it loops; measured with
scripts/measure_repetition.py, table in docs/GENERATION.md), sampling keeps 1.1; and the script's metrics."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from minillm.generation import GREEDY_PENALTY, SAMPLING_PENALTY, default_penalty

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "v_c624e6b"


def _script():
    spec = importlib.util.spec_from_file_location("measure_repetition", ROOT / "scripts" / "measure_repetition.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_penalty_is_stronger_for_greedy():
    assert default_penalty(0.0) == GREEDY_PENALTY == 1.3
    assert default_penalty(0.8) == default_penalty(1.0) == SAMPLING_PENALTY == 1.1


@pytest.mark.parametrize("flags,penalty", [(["--temperature", "0"], GREEDY_PENALTY), ([], SAMPLING_PENALTY),
                                           (["--temperature", "0", "--repetition-penalty", "1.0"], 1.0),
                                           (["--repetition-penalty", "1.25"], 1.25)])
def test_generate_picks_the_penalty_by_temperature_unless_given(tmp_path, runner, monkeypatch, flags, penalty):
    import minillm.generation as generation
    from minillm.cli import app

    shutil.copytree(FIXTURE, tmp_path / "old")
    seen = []
    real = generation.complete

    def spy(*args, sampling, **kw):
        seen.append(sampling)
        return real(*args, sampling=sampling, **kw)

    monkeypatch.setattr(generation, "complete", spy)
    r = runner.invoke(app, ["generate", "--ckpt", str(tmp_path / "old" / "run"), "-p", "el rey", "--max-tokens", "4",
                            "--device", "cpu", *flags])
    assert r.exit_code == 0, r.output
    assert [s.repetition_penalty for s in seen] == [penalty]


def test_the_measures_see_loops():
    m = _script()
    loop = "a b c d " * 10
    assert m.repeated_4(loop.split()) == pytest.approx(33 / 37)
    assert m.distinct_2(loop.split()) == pytest.approx(4 / 39)
    fresh = "uno dos tres cuatro cinco seis".split()
    assert m.repeated_4(fresh) == 0.0 and m.distinct_2(fresh) == 1.0


def test_the_script_reads_generates_defaults():
    d = _script().cli_defaults()
    assert (d.temperature, d.top_k, d.top_p, d.repetition_penalty) == (0.8, 50, 0.95, SAMPLING_PENALTY)
