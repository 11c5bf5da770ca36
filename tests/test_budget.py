"""--max-time planning (minillm/train/budget.py): the plan table, the step-time estimate, when to plan and
replan, and whole runs that must end within their budget."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from minillm.checkpoint import load_checkpoint
from minillm.config import resolve
from minillm.optim.groups import UNBOUNDED, Schedule, schedule_for
from minillm.train import budget, loop
from minillm.train.state import RunState
from tests.test_training import run

pytestmark = pytest.mark.usefixtures("no_plots")


def test_time_budget_plan_table():
    # 100 s budget, 10 s used, 0.1 s/step, 1 s per evaluation, ~10 evaluations
    total, every = budget.plan_time_budget(20, 10.0, 100.0, 0.1, 1.0, 0, 10**12)
    assert 20 + 700 < total < 20 + 800 and every == pytest.approx((total - 20) / 10, rel=0.02)
    assert budget.plan_time_budget(20, 10.0, 100.0, 0.1, 1.0, 0, 100)[0] == 100  # --max-steps first
    total, every = budget.plan_time_budget(0, 0.0, 100.0, 0.1, 1.0, 50, 10**12)
    assert every == 50 and total * 0.1 + (total / 50 + 1) * 1.0 <= 100 - 3 - 1.5
    assert budget.plan_time_budget(5, 99.0, 100.0, 0.1, 1.0, 0, 10**12)[0] == 5  # nothing left: stop now


def test_max_time_run_outlives_a_first_step_that_took_most_of_the_budget(tmp_path, tokenizer_path, corpus,
                                                                          monkeypatch):
    """The first step stands in for compilation (3 s of a 6 s budget): it says nothing about the next steps, so
    the run must go on training instead of predicting another 3 s step and stopping after one."""
    real = loop.make_train_step

    def slow_first(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def wrapped(prefetch, lr_scale):
            if not calls:
                time.sleep(3.0)
            calls.append(1)
            return step(prefetch, lr_scale)
        return wrapped

    monkeypatch.setattr(loop, "make_train_step", slow_first)
    t0 = time.time()
    s = run(tokenizer_path, corpus, tmp_path / "r", max_time=6.0, max_steps=0, epochs=0.0, log_every=50)
    assert s["end"] in ("max_time", "schedule") and s["steps"] > 5, s
    assert time.time() - t0 <= 6.0


def test_max_time_run_fits_its_budget(tmp_path, tokenizer_path, corpus, capsys):
    t0 = time.time()
    s = run(tokenizer_path, corpus, tmp_path / "r", max_time=5.0, max_steps=0, epochs=0.0, log_every=50)
    wall = time.time() - t0
    err = capsys.readouterr().err
    assert s["elapsed_s"] <= 5.0 and wall <= 5.0, (s, wall)
    assert "--max-time 5s" in err and s["steps"] > 5
    ck = load_checkpoint(tmp_path / "r" / "ckpt_last.pt")
    sched = Schedule(**ck["run_state"]["schedule"])
    assert ck["run_state"]["step"] == s["steps"] and sched.total < 10**9
    hist = json.loads((tmp_path / "r" / "history.json").read_text())["evals"]
    assert hist[-1]["step"] == s["steps"] and len(hist) >= 2  # the planning evaluation and the final one


def test_step_time_leaves_out_the_first_step_until_a_hundred_follow():
    assert budget.step_time([]) == 0.0
    assert budget.step_time([9.0]) == 9.0  # nothing else measured yet
    assert budget.step_time([9.0, 1.0, 3.0]) == 2.0  # the first (compilation) left out
    assert budget.step_time([9.0] + [1.0] * 99 + [3.0]) == pytest.approx(1.02)  # the last 100


def test_out_of_time_counts_the_next_step_the_final_evaluation_and_a_margin():
    assert not budget.out_of_time(0.0, 10**6, 1.0, 1.0)  # no budget
    assert not budget.out_of_time(100.0, 90.0, 4.0, 4.0)  # 98 + 1% margin = 99 <= 100
    assert budget.out_of_time(100.0, 90.0, 4.0, 5.5)  # 99.5 + 1 > 100
    assert budget.out_of_time(100.0, 100.5, 0.0, 0.0)


def test_a_run_plans_once_it_has_timed_enough_steps():
    state = RunState(planned=False)
    assert not budget.ready_to_plan(state, [5.0] + [0.1] * 4, 100.0)  # 5 steps: too few
    assert not budget.ready_to_plan(state, [5.0] + [0.1] * 5, 1000.0)  # 0.5 s measured, 5.5 s of 1000
    assert budget.ready_to_plan(state, [5.0] + [0.1] * 5, 100.0)  # 5.5 s >= 5% of 100
    assert budget.ready_to_plan(state, [0.0] + [0.2] * 5, 1000.0)  # 1 s of steps after the first
    assert budget.ready_to_plan(state, [0.0] * 50, 1000.0)  # 50 steps
    assert not budget.ready_to_plan(RunState(planned=True), [1.0] * 60, 10.0)


def test_replan_fixes_the_total_then_moves_it_only_by_more_than_one_percent():
    tcfg = resolve("tiny", {"max_time": 100.0, "max_steps": 0, "epochs": 0.0})[1]
    state = RunState(step=20, planned=False)
    sched = schedule_for(tcfg, UNBOUNDED)
    state.schedule = dataclasses.asdict(sched)
    notes: list[str] = []
    new = budget.replan(state, sched, tcfg, 10.0, 0.1, 1.0, UNBOUNDED, notes.append)
    total, every = budget.plan_time_budget(20, 10.0, 100.0, 0.1, 1.0, 0, UNBOUNDED)
    assert new.total == total and state.schedule == dataclasses.asdict(new) and state.planned
    assert state.eval_every == every and len(notes) == 1
    assert notes[0].startswith("--max-time 1m40s: 100.0 ms/step, 1.0 s per evaluation") and f"{total} steps" in notes[0]
    again = budget.replan(state, new, tcfg, 10.0, 0.1002, 1.0, UNBOUNDED, notes.append)  # within 1%: kept
    assert again is new and len(notes) == 1
    slower = budget.replan(state, new, tcfg, 10.0, 0.2, 1.0, UNBOUNDED, notes.append)  # twice as slow
    assert slower.total < new.total and state.schedule == dataclasses.asdict(slower) and len(notes) == 2
    assert slower.anchor_step == 20  # the decay is recomputed from the current step
