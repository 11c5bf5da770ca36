"""The device table: speeds from measured shares of the peak, the step-time floor, the budget's training
seconds, the compiled-memory fit against the measured peaks it came from, and finding a device's entry."""

from __future__ import annotations

import dataclasses

import pytest

from minillm.config import PRESETS, ModelConfig
from minillm.errors import UsageError
from minillm.plan.devices import (
    DEVICES,
    GIB,
    compiled_memory,
    detect,
    device_named,
    interpolate,
    parse_memory,
)

H100 = DEVICES["h100"]


def preset(name: str, vocab: int) -> ModelConfig:
    return ModelConfig(**{**PRESETS[name]["model"], "vocab_size": vocab})


def test_interpolate_is_linear_in_log_x_and_flat_beyond_the_ends():
    pts = ((100, 1.0), (400, 3.0))
    assert interpolate(pts, 200) == pytest.approx(2.0)
    assert interpolate(pts, 10) == 1.0 and interpolate(pts, 10_000) == 3.0 and interpolate(pts, 400) == 3.0


@pytest.mark.parametrize("name, batch, vocab, measured_gib", [
    ("small", 256, 32000, 8.22), ("medium", 128, 32000, 12.35), ("large", 64, 32000, 19.25),
    ("gpt2-124m", 32, 50304, 15.07)])
def test_compiled_memory_is_within_5_percent_of_the_peaks_it_was_fitted_to(name, batch, vocab, measured_gib):
    """docs/BENCHMARKS.md, Training throughput session 3 (one H200, compiled, AdamW, torch.cuda peak)."""
    assert compiled_memory(preset(name, vocab), batch) / GIB == pytest.approx(measured_gib, rel=0.05)


def test_tokens_per_s_matches_the_measured_small_and_medium_speeds():
    """docs/BENCHMARKS.md, Training throughput (H100, AdamW): small 2.43M, medium 1.48-1.57M tokens/s."""
    assert H100.tokens_per_s(preset("small", 32000), "adamw", 256 * 256) == pytest.approx(2.43e6, rel=0.1)
    assert H100.tokens_per_s(preset("medium", 32000), "adamw", 128 * 512) == pytest.approx(1.52e6, rel=0.1)
    assert H100.tokens_per_s(preset("small", 32000), "muon", 256 * 256) < H100.tokens_per_s(preset("small", 32000),
                                                                                            "adamw", 256 * 256)


def test_a_small_model_is_limited_by_the_shortest_step():
    tiny = ModelConfig(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=2048)
    assert H100.tokens_per_s(tiny, "adamw", 1024) == pytest.approx(1024 / H100.min_step_s)
    assert DEVICES["cpu"].tokens_per_s(tiny, "adamw", 1024) > 1024 / 1.0  # no floor on a CPU


def test_train_seconds_leave_out_start_up_and_evaluations():
    assert H100.train_seconds(H100.startup_s) == 0 and H100.train_seconds(10) == 0
    assert H100.train_seconds(120) == pytest.approx((120 - H100.startup_s) * H100.train_share)


def test_a_device_is_found_by_its_cuda_name_and_memory_can_be_given():
    assert device_named("NVIDIA H100 80GB HBM3").name == "h100"
    assert device_named("NVIDIA H200").name == "h200" and device_named("h200").memory > H100.memory
    assert device_named("NVIDIA A100-SXM4-40GB", 40 * GIB) == dataclasses.replace(H100, memory=40 * GIB)
    assert device_named("cpu") == DEVICES["cpu"]
    with pytest.raises(UsageError, match="--device 'tpu'"):
        device_named("tpu")


def test_detect_cpu_and_a_cuda_plan_without_cuda_needs_its_memory():
    import torch

    assert detect("cpu").kind == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--gpu-memory"):
            detect("cuda")
        assert detect("cuda", 24 * GIB).memory == 24 * GIB


def test_parse_memory():
    assert parse_memory("80GB") == 80 * GIB and parse_memory("24 GiB") == 24 * GIB and parse_memory("512MB") == 512 * 2**20
    with pytest.raises(UsageError, match="--gpu-memory"):
        parse_memory("lots")


# The held-out es_bible_rv1909 runs of docs/BENCHMARKS.md "Planning the run (issue 21)" (one H100, 2-minute
# --max-time, --compile auto): preset, vocabulary (as the tokenizer reached it), dropout, measured peak in bytes
BIBLE_PEAKS = [("small", 2048, 0.2, 6_060_901_376), ("small", 8192, 0.1, 9_717_857_280),
               ("small", 24960, 0.1, 19_144_558_592), ("medium", 8192, 0.1, 14_601_275_392),
               ("medium", 24960, 0.1, 24_071_885_824), ("large", 8192, 0.0, 12_262_038_528),
               ("large", 24960, 0.0, 17_147_799_552)]


@pytest.mark.parametrize("name, vocab, dropout, peak", BIBLE_PEAKS)
def test_the_planned_memory_is_within_10_percent_of_a_compile_auto_runs_measured_peak(name, vocab, dropout, peak):
    """The peak comes while the first steps run eagerly beside the copy compiling in the background: the
    compiled step's figure alone was a fifth to a third of it."""
    cfg = dataclasses.replace(preset(name, vocab), dropout=dropout)
    train = PRESETS[name]["train"]
    optimizer = train.get("optimizer", "adamw")
    assert H100.memory_needed(cfg, train["batch_size"], optimizer) == pytest.approx(peak, rel=0.10)
    assert compiled_memory(cfg, train["batch_size"]) < 0.4 * peak


def test_without_room_for_the_background_copy_the_plan_counts_the_compiled_run():
    cfg, batch = preset("medium", 24960), PRESETS["medium"]["train"]["batch_size"]
    tight = dataclasses.replace(H100, memory=16 * GIB)  # the run compiles before its first step there
    assert tight.memory_needed(cfg, batch, "muon") == compiled_memory(cfg, batch)
    assert H100.memory_needed(cfg, batch, "muon") > 3 * compiled_memory(cfg, batch)


# the same runs: millions of tokens trained in their 2 minutes (steps x tokens a step)
BIBLE_TOKENS = [("small", 2048, 86.6), ("small", 8192, 130.2), ("small", 24960, 133.3), ("medium", 8192, 102.4),
                ("medium", 24960, 94.1), ("large", 8192, 57.3), ("large", 24960, 44.5)]


@pytest.mark.parametrize("name, vocab, measured_m", BIBLE_TOKENS)
def test_the_tokens_a_2_minute_cold_run_trains_are_within_30_percent_of_the_plans(name, vocab, measured_m):
    """The step floor (25 ms) and the eager steps while the compile ends (``eager_s``); with the MFU table and a
    12 ms floor alone the plan expected 1.4-2.9x these."""
    cfg, train = preset(name, vocab), PRESETS[name]["train"]
    speed = H100.tokens_per_s(cfg, train.get("optimizer", "adamw"), train["batch_size"] * cfg.block_size)
    assert speed * H100.steady_seconds(120) / 1e6 == pytest.approx(measured_m, rel=0.30)
    assert H100.steady_seconds(120) == H100.train_seconds(120) - H100.eager_s


def test_a_budget_under_a_minute_plans_eager_steps_throughout():
    """Under ``train.step.COLD_BUDGET_S`` a cold cache trains eagerly: the plan counts every step at the eager speed.
    Measured on one H100 (medium 64 x 512 at a 32k vocabulary, cold caches, session 30): 348 steps in 30 s, eager,
    against 758 in 60 s, compiled: 0.46. The plan's ratio was 0.19 with the compile's ``eager_s`` alone. (Its absolute
    figures at a 32k vocabulary are high: the 25 ms step floor was fitted at 2k-8k.)"""
    from minillm.train.step import COLD_BUDGET_S

    assert H100.cold_budget_s == COLD_BUDGET_S and H100.trains_eagerly(30) and not H100.trains_eagerly(60)
    assert H100.steady_seconds(30) == pytest.approx(H100.train_seconds(30) * H100.eager_speed)
    assert H100.steady_seconds(120) == H100.train_seconds(120) - H100.eager_s
    assert H100.steady_seconds(30) / H100.steady_seconds(60) == pytest.approx(348 / 758, rel=0.25)
