"""``--max-time``: fitting a run to a wall-clock budget. The loop times its steps and evaluations; once it has
measured a few steps (and after each evaluation) the rest of the run is planned so that the remaining steps,
their evaluations and a final evaluation + checkpoint end within the budget, and the learning-rate decay is
stretched or shortened to end there too."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from minillm.config import TrainConfig
from minillm.optim.groups import UNBOUNDED, Schedule, rescheduled
from minillm.train.log import fmt_duration
from minillm.train.state import RunState


def plan_time_budget(step: int, elapsed: float, max_time: float, step_s: float, eval_s: float,
                     eval_every: int, limit: int) -> tuple[int, int]:
    """``(total_steps, eval_every)`` for a run that has done ``step`` steps in ``elapsed`` seconds so that the
    rest, its evaluations and a final evaluation + checkpoint fit in ``max_time`` (a 3% + 1.5 s margin).
    ``eval_every`` 0 asks for about 10 evaluations in all (fewer when each one is costly); ``limit`` caps
    the total (from --max-steps / --epochs)."""
    left = max_time - elapsed - eval_s - (0.03 * max_time + 1.5)  # margin: jitter and the process's exit
    if eval_every:
        steps = left / (step_s + eval_s / eval_every)
    else:
        n_evals = min(9, int(0.25 * left / eval_s)) if eval_s > 0 else 9
        steps = (left - max(0, n_evals) * eval_s) / step_s
        eval_every = max(1, int(steps / (n_evals + 1))) if n_evals > 0 else UNBOUNDED
    return max(step, min(limit, step + int(max(0.0, steps)))), eval_every


def step_time(durs: list[float]) -> float:
    """Mean seconds per step over the last 100 steps, leaving out the first (compilation) while it is among them."""
    recent = durs[-100:] if len(durs) > 100 else (durs[1:] or durs)
    return sum(recent) / len(recent) if recent else 0.0


def out_of_time(max_time: float, elapsed: float, next_s: float, eval_s: float) -> bool:
    """Whether another step and the final evaluation would end past ``max_time`` (0: no budget; a 1% margin)."""
    return bool(max_time) and elapsed + next_s + eval_s + 0.01 * max_time > max_time


def ready_to_plan(state: RunState, durs: list[float], max_time: float) -> bool:
    """Whether an unplanned --max-time run has timed enough steps (the first, compilation, apart) to plan."""
    return not state.planned and len(durs) >= 6 and (
        sum(durs[1:]) >= 1.0 or len(durs) >= 50 or sum(durs) >= 0.05 * max_time)


def replan(state: RunState, sched: Schedule, tcfg: TrainConfig, elapsed: float, step_s: float, eval_s: float,
           limit: int, note: Callable[[str], None]) -> Schedule:
    """Fit the rest of a --max-time run to its budget from measured step and evaluation times; the decay is
    recomputed from the current step when the total moves by more than 1%."""
    total, every = plan_time_budget(state.step, elapsed, tcfg.max_time, step_s, eval_s, tcfg.eval_every, limit)
    first = not state.planned
    state.planned, state.eval_every = True, (0 if tcfg.eval_every else every)
    if not first and abs(total - sched.total) <= max(1, 0.01 * sched.total):
        return sched
    new = rescheduled(sched, state.step, total)
    state.schedule = dataclasses.asdict(new)
    note(f"--max-time {fmt_duration(tcfg.max_time)}: {step_s * 1000:.1f} ms/step, {eval_s:.1f} s per evaluation "
         f"-> {new.total} steps in all, " + (f"evaluating every {tcfg.eval_every or every}"
                                             if (tcfg.eval_every or every) < UNBOUNDED else "evaluating at the end"))
    return new
