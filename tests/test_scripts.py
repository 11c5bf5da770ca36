"""Smoke tests of the benchmark scripts on CPU with the tiny config (they print figures; CI checks they run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_bench_train_runs_on_cpu_with_the_tiny_config():
    out = _run("scripts/bench_train.py", "--config", "configs/tiny.toml", "--device", "cpu", "--steps", "2",
               "--warmup", "1", "--vocab", "512", "--json")
    row = json.loads(out.strip().splitlines()[-1])
    assert row["tokens_per_s"] > 0 and row["block"] == 64 and row["step_ms"] > 0


def test_bench_train_ab_runs_each_lever_and_tabulates_the_ratio_to_base():
    """--ab: each variant in turn (its levers' environment variables set for its rows only), --timing total, then
    the table; the levers change the speed, never the numbers (the same loss with and without them)."""
    out = _run("scripts/bench_train.py", "--config", "configs/tiny.toml", "--device", "cpu", "--steps", "2",
               "--warmup", "1", "--vocab", "512", "--json", "--timing", "total", "--set", "optimizer=muon",
               "--ab", "base", "--ab", "sync,ns")
    *rows, last = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["levers"] for r in rows] == ["base", "sync,ns"] and all(r["timing"] == "total" for r in rows)
    assert rows[0]["loss"] == rows[1]["loss"]
    table = last["ab"]
    assert [(t["levers"], t["runs"]) for t in table] == [(r["levers"], [r["tokens_per_s"]]) for r in rows]
    assert table[0]["ratio"] == 1.0
    assert table[1]["ratio"] == round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    r = subprocess.run([sys.executable, "scripts/bench_train.py", "--device", "cpu", "--ab", "warp"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--ab warp: unknown lever warp; use base or any of sync," in r.stderr


def test_bench_train_ab_variant_may_set_a_config_field_for_its_rows_only():
    """``--ab norm_weight=false``: a variant's ``key=value`` items are ``--set`` overrides of its own rows (a model
    change measured beside the defaults in one process); the base row keeps the config's value."""
    out = _run("scripts/bench_train.py", "--config", "configs/tiny.toml", "--device", "cpu", "--steps", "1",
               "--warmup", "1", "--vocab", "512", "--json", "--timing", "total",
               "--ab", "base", "--ab", "norm_weight=false", "--ab", "sync,dropout=0.5")
    *rows, _ = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["levers"], r["set"]) for r in rows] == [("base", []), ("norm_weight=false", ["norm_weight=false"]),
                                                       ("sync,dropout=0.5", ["dropout=0.5"])]


def test_bench_train_ab_table_takes_medians_of_the_rounds_that_ran():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"config": "small", "levers": "base", "tokens_per_s": 100}, {"config": "small", "levers": "sync", "tokens_per_s": 130},
            {"config": "small", "levers": "cudagraphs", "error": "RuntimeError: no"},
            {"config": "small", "levers": "base", "tokens_per_s": 120}, {"config": "small", "levers": "sync", "tokens_per_s": 110},
            {"config": "medium", "levers": "base", "error": "x"}, {"config": "medium", "levers": "sync", "tokens_per_s": 50}]
    rows[0]["syncs_per_step"], rows[1]["syncs_per_step"] = 1.0, 0.0
    none = {"tokens_per_s": None, "ratio": None, "syncs_per_step": None, "runs": []}
    assert mod.ab_table(rows) == [
        {"config": "small", "levers": "base", "tokens_per_s": 110, "ratio": 1.0, "syncs_per_step": 1.0, "runs": [100, 120]},
        {"config": "small", "levers": "sync", "tokens_per_s": 120, "ratio": 1.091, "syncs_per_step": 0.0,
         "runs": [130, 110]},
        {"config": "small", "levers": "cudagraphs", **none}, {"config": "medium", "levers": "base", **none},
        {"config": "medium", "levers": "sync", "tokens_per_s": 50, "ratio": None, "syncs_per_step": None, "runs": [50]}]


def test_bench_train_profile_sums_each_kernel_category_per_step():
    """--profile's breakdown: CUDA kernels by category (first matching name fragment), their time and count divided
    by the profiled steps; the host's events are not kernels and count nowhere."""
    from types import SimpleNamespace

    import torch

    mod = _load("bench_train")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    ev = lambda name, us, dev=cuda: SimpleNamespace(name=name, device_time_total=us, device_type=dev)  # noqa: E731
    events = [ev("nvjet_tst_128x64", 3000), ev("sm90_xmma_gemm_bf16", 1000), ev("flash_fwd_kernel", 500),
              ev("triton_red_fused_add_0", 400), ev("triton_poi_fused_mul_1", 200), ev("triton_per_fused_2", 200),
              ev("multi_tensor_apply_kernel<FusedAdam>", 100), ev("Memcpy HtoD", 50),
              ev("void at::native::elementwise_kernel", 150), ev("aten::mm", 99999, cpu),
              # cuDNN's attention on an H100: "sm90_" in its name is not a matmul (seen in session 30's profile)
              ev("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", 300),
              ev("void cudnn::fusion::compute_dot_do_o_specialized<true>", 100)]
    out = mod.kernel_categories(events, steps=2)
    assert out == {"matmul": {"ms": 2.0, "kernels": 1.0}, "attention": {"ms": 0.45, "kernels": 1.5},
                   "triton reduction": {"ms": 0.3, "kernels": 1.0}, "triton pointwise": {"ms": 0.1, "kernels": 0.5},
                   "optimizer": {"ms": 0.05, "kernels": 0.5}, "copy/memset": {"ms": 0.025, "kernels": 0.5},
                   "aten other": {"ms": 0.075, "kernels": 0.5}, "total_ms": 3.0}
    events.append(ev("nvjet_tst_128x64", 1000))  # a second call of the top kernel
    assert mod.top_kernels(events, steps=2, n=2) == [("nvjet_tst_128x64", 2.0, 1.0), ("sm90_xmma_gemm_bf16", 0.5, 0.5)]
    assert mod.top_kernels([ev("k" * 300, 10)], steps=1, n=5) == [("k" * 240, 0.01, 1.0)]


def test_levers_gpu_script_names_only_levers_and_values_that_exist():
    """scripts/levers_gpu.sh (the one device call of issue 20): valid bash, every lever of its default VARIANTS one
    bench_train knows (and base always run), every MINILLM_ variable it sets a lever's with one of its values, and
    each variant's variable found the way the script finds it (bench_train's LEVERS)."""
    import re

    from minillm.optim.levers import LEVERS

    script = ROOT / "scripts" / "levers_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    items = {n for v in re.search(r'VARIANTS:-"([^"]*)"', text).group(1).split() for n in v.split(",")}
    names, overrides = {n for n in items if "=" not in n}, {n for n in items if "=" in n}
    bench = _load("bench_train")
    assert {"sync", "cudagraphs", "ns", "hostsync", "matmulns", "coord", "concat", "fusednorm"} <= set(bench.LEVERS)
    assert names and names <= set(bench.LEVERS), names
    from minillm.config import resolve

    for item in overrides:  # a config override (a model change): a field the presets resolve with
        key, _, value = item.partition("=")
        resolve("small", {key: json.loads(value)})
    assert "(--ab base)" in text
    assert all(var.removeprefix("MINILLM_") in LEVERS and value in LEVERS[var.removeprefix("MINILLM_")]
               for var, value in bench.LEVERS.values())
    sets = re.findall(r"MINILLM_(\w+)=([\w-]+)", text)
    assert {k for k, _ in sets} <= set(LEVERS) and all(v in LEVERS[k] for k, v in sets)


def test_bench_generate_runs_on_cpu_with_the_tiny_config():
    out = _run("scripts/bench_generate.py", "--config", "tiny", "--device", "cpu", "--vocab", "512", "--new-tokens",
               "20", "--batch", "2", "--prompt-len", "8", "--chunk", "4", "--repeats", "1", "--no-hf", "--no-train")
    rows = [json.loads(line) for line in out.splitlines()]
    decode = [r for r in rows if r["kind"] == "decode"]
    assert len(decode) == 2 * 2 * 3 * 2  # dtypes x samplings x decoders x batch sizes
    assert all(r["tokens"] == 20 * r["batch"] and r["tokens_per_s"] > 0 for r in decode)


def test_bench_generate_loss_check_decodes_as_generate_does():
    """The held-out check measures the decoder ``generate`` uses: the fused step for bf16 weights, the plain one for
    fp32 (it measured the plain bf16 step, which ``generate`` never runs, until session 29)."""
    import importlib.util

    import torch

    from minillm.config import resolve
    from minillm.model.gpt import GPT

    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "scripts" / "bench_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import dataclasses

    torch.manual_seed(0)
    m = GPT(dataclasses.replace(resolve("tiny")[0], vocab_size=64)).eval()
    windows = [[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]]
    fp32 = mod.decode_loss(m, windows)
    assert not any("fused" in k for k in m.decoders)
    m.decoders.clear()
    bf16 = mod.decode_loss(m.to(torch.bfloat16), windows)
    assert any("fused" in k for k in m.decoders)
    assert abs(bf16 - fp32) / fp32 < 0.02


def test_bench_generate_only_runs_the_rows_named():
    out = _run("scripts/bench_generate.py", "--config", "tiny", "--device", "cpu", "--vocab", "512", "--new-tokens",
               "8", "--batch", "2", "--prompt-len", "8", "--chunk", "4", "--repeats", "1", "--no-hf", "--no-train",
               "--only", "greedy batch 1,bf16 default graphK batch 2")
    names = [json.loads(line).get("name") for line in out.splitlines()]
    assert sorted(n for n in names if n) == sorted(
        [f"tiny {d} greedy {k} batch 1" for d in ("fp32", "bf16") for k in ("graph1", "graphK", "graphKf")]
        + ["tiny bf16 default graphK batch 2"])


def _load(name: str):
    """The script ``scripts/<name>.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_corpus(path: Path) -> Path:
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    docs = [" ".join(rng.choice(words) for _ in range(80)) + "." for _ in range(600)]
    path.write_text("\n<|doc|>\n".join(docs) + "\n", encoding="utf-8")
    return path


def test_bench_ddp_runs_two_gloo_processes_and_matches_one_process(tmp_path):
    """Scaling (bench_train in 1 process and under torchrun with 2) and loss parity (train at batch 32 in one
    process vs --nproc 2 at 16 each) on CPU: both rows are produced, and the validation losses agree."""
    corpus = _tiny_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "ddp.json"
    stdout = _run("scripts/bench_ddp.py", "--config", "configs/tiny.toml", "--device", "cpu", "--nproc", "2",
                  "--corpus", str(corpus), "--workdir", str(tmp_path / "work"), "--vocab", "512",
                  "--vocab-size", "512", "--steps", "2", "--warmup", "1", "--max-steps", "6", "--eval-every", "3",
                  "--eval-batches", "1", "--json", str(out))
    res = json.loads(out.read_text())
    assert [r["rc"] for r in res["runs"]] == [0, 0, 0, 0]
    one, two = res["scaling"]["configs/tiny.toml"]["1"], res["scaling"]["configs/tiny.toml"]["ddp"]
    assert "world_size" not in one and two["world_size"] == 2 and two["backend"] == "gloo"
    assert two["tokens_per_s"] > 0 and two["ratio_vs_1"] > 0  # the figure itself: test_bench_ddp_speedup_...
    p1, p2 = res["parity"]["configs/tiny.toml"]["1"], res["parity"]["configs/tiny.toml"]["ddp"]
    assert (p1["batch_per_gpu"], p2["batch_per_gpu"], p2["global_batch"]) == (32, 16, 32)
    assert list(p1["val_loss"]) == list(p2["val_loss"]) == ["3", "6"]
    assert p2["max_abs_diff"] < 1e-4  # fp32 on CPU: the same windows, the same updates
    assert [(r["gpus"], r["wrapper"]) for r in res["table"]] == [(1, "-"), (2, "ddp")]
    assert "| configs/tiny.toml | 2 | ddp | 16 x 64 |" in stdout
    assert "--nproc 2" in stdout and "torch.distributed.run --standalone --nproc_per_node 2" in stdout


def test_bench_ddp_speedup_is_each_configs_rows_ratio(tmp_path, monkeypatch):
    """The speed-up, table and markdown from bench_train rows whose tokens/s the test sets: each N-process row
    over the 1-process row of its own config (the two 1-process runs come first, so the last one run is not
    the other config's)."""
    import argparse

    mod = _load("bench_ddp")
    args = argparse.Namespace(logs=tmp_path / "logs", budget=0, sub_timeout=60, dry_run=False, nproc=2, device="cpu",
                              steps=2, warmup=1, batch_size=0, vocab=0, config=["a.toml", "b.toml"])
    bench = mod.Bench(args)
    tokens_per_s = {("a.toml", False): 1000, ("b.toml", False): 400, ("a.toml", True): 1850, ("b.toml", True): 1000}

    def fake_run(label: str, cmd: list[str]) -> dict:
        row = {"tokens_per_s": tokens_per_s[cmd[cmd.index("--config") + 1], "torch.distributed.run" in cmd],
               "batch": 16, "block": 64, "step_ms": 5.0, "mfu_pct": None, "peak_mem_GiB": None, "first_step_s": 0.1,
               "device": "cpu"}
        rec = {"label": label, "cmd": mod.show(cmd), "rc": 0, "elapsed_s": 0.0, "stdout": f"warm-up\n{json.dumps(row)}\n"}
        bench.runs.append(rec)
        return rec

    monkeypatch.setattr(bench, "run", fake_run)
    for config, mode in (("a.toml", "1"), ("b.toml", "1"), ("a.toml", "ddp"), ("b.toml", "ddp")):
        bench.scaling_run(config, mode)
    assert [(r["preset"], r["gpus"], r["tokens_per_s"], r["ratio_vs_1"]) for r in bench.table()] == [
        ("a.toml", 1, 1000, None), ("a.toml", 2, 1850, 1.85), ("b.toml", 1, 400, None), ("b.toml", 2, 1000, 2.5)]
    md = bench.markdown()
    assert "| a.toml | 1 | - | 16 x 64 | 1,000 | — |" in md and "| a.toml | 2 | ddp | 16 x 64 | 1,850 | 1.85× |" in md
    assert "| b.toml | 2 | ddp | 16 x 64 | 1,000 | 2.50× |" in md


def test_bench_ddp_stop_survives_a_process_that_ends_while_it_looks(monkeypatch):
    """Seen in CI (session 30): a worker that exited between two reads of its /proc entry in the wait for the stopped
    tree made ``_stop`` fail with a TypeError (None subscripted); each process is now read once per look."""
    mod = _load("bench_ddp")
    reads = iter([(1, "100"), None])  # alive at the first read, gone at the second
    monkeypatch.setattr(mod, "_stat", lambda pid: next(reads, None))
    monkeypatch.setattr(mod, "_descendants", lambda pid: [(4242, "999")])
    monkeypatch.setattr(mod, "_kill_tree", lambda tree, sig: None)
    monkeypatch.setattr(mod.os, "killpg", lambda pid, sig: None)

    class Done:
        pid = 4241

        def communicate(self, timeout=None):
            return "out", None
    assert mod.Bench._stop(Done()) == "out"


def test_bench_ddp_sub_run_failure_and_timeout_are_recorded(tmp_path):
    """A failing sub-run is recorded with its exit status and log; one past its time limit is stopped, together
    with a worker it started in a session of its own (as torchrun starts its workers)."""
    import argparse
    import time

    mod = _load("bench_ddp")
    args = argparse.Namespace(logs=tmp_path / "logs", budget=0, sub_timeout=4, dry_run=False)
    bench = mod.Bench(args)
    rec = bench.run("fails", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert rec["rc"] == 3 and "boom" in Path(rec["log"]).read_text()
    pidfile = tmp_path / "worker.pid"
    script = ("import subprocess, sys, time; "
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True, "
              "stdout=subprocess.DEVNULL); "
              f"open({str(pidfile)!r}, 'w').write(str(w.pid)); time.sleep(60)")
    t0 = time.time()
    rec = bench.run("hangs", [sys.executable, "-c", script])
    assert rec["rc"] == 124 and time.time() - t0 < 30
    assert mod._stat(int(pidfile.read_text())) is None  # the worker is gone (or a zombie waiting for its reaper)
    assert [r["label"] for r in bench.runs] == ["fails", "hangs"]


def test_bench_ddp_skips_parity_when_the_corpus_cannot_be_prepared(tmp_path):
    out = tmp_path / "ddp.json"
    _run("scripts/bench_ddp.py", "--config", "configs/tiny.toml", "--device", "cpu", "--skip-scaling",
         "--corpus", str(tmp_path / "missing.txt"), "--workdir", str(tmp_path / "work"), "--json", str(out))
    res = json.loads(out.read_text())
    assert res["prep_error"] and res["parity"] == {}
    assert [r.get("skipped") for r in res["runs"]] == ["preparation failed", "preparation failed"]


def test_bench_startup_times_a_cold_and_a_warm_start_on_cpu(tmp_path):
    """The start-up benchmark on the CPU (no compilation): the floor, then a cold and a warm start whose phases
    add up to the time to the first step, measured from outside within a second."""
    out = _run("scripts/bench_startup.py", "--corpus", "minillm/data/sample_es.txt", "--config", "tiny",
               "--device", "cpu", "--compile", "off", "--vocab", "300", "--workdir", str(tmp_path), "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows[0]["what"] == "floor" and rows[0]["seconds"] > 0
    starts = [r for r in rows if r["what"] == "start-up"]
    assert [r["cache"] for r in starts] == ["cold", "warm"]
    for r in starts:
        phases = r["breakdown"]
        assert set(phases) == {"imports_s", "device_s", "data_s", "model_s", "first_step_s", "total_s"}
        assert abs(sum(v for k, v in phases.items() if k != "total_s") - phases["total_s"]) < 0.05
        assert abs(phases["total_s"] - r["wall_to_first_step_s"]) < 1.0 and r["rc"] == 143  # stopped by SIGTERM


def test_bench_startup_runs_a_warm_budget_after_filling_the_caches(tmp_path):
    """--budget-only --budget-cache warm (issue 20's 5-minute warm share): one start-up run fills the compile caches
    first, then the --max-time run starts from them and reports its share of the budget in training steps. (10 s: at
    4 s a slow 2-core machine's ~5 s set-up of the tiny run spent the whole budget before the first step.)"""
    out = _run("scripts/bench_startup.py", "--corpus", "minillm/data/sample_es.txt", "--config", "tiny",
               "--device", "cpu", "--compile", "off", "--vocab", "300", "--workdir", str(tmp_path), "--json",
               "--max-time", "10s", "--budget-only", "--budget-cache", "warm")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["what"], r["cache"]) for r in rows] == [("max-time", "warm")]
    assert rows[0]["filled_caches_s"] > 0  # the start-up run that filled the caches ran first
    assert rows[0]["steps"] > 0 and 0 < rows[0]["share_in_steps"] <= 1


def test_bench_compile_contention_reports_each_row():
    out = _run("scripts/bench_compile_contention.py", "--seconds", "1", "--intervals", "0.1")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["compiling"], r["eager_steps"] > 0) for r in rows] == [(False, True), (True, False), (True, True)]
    assert rows[2]["switch_interval_ms"] == 0.1 and rows[0]["step_ms"] > 0


def test_bench_quality_prepares_once_and_warms_the_libraries_without_touching_the_compile_cache(tmp_path, monkeypatch):
    """bench_quality's preparation: the split, tokenizer and caches built once; then every time a short eager
    process that reads torch's and the GPU's libraries (a fresh machine's first run otherwise read them during its
    timed budget); the compile cache directory is never created."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    corpus = ROOT / "minillm" / "data" / "sample_es.txt"
    first = mod.prepare(corpus, tmp_path / "work", 600)
    assert {"split_s", "tokenizer_s", "cache_s", "warm_s"} <= first.keys() and first["warm_s"] > 0
    assert (tmp_path / "work" / "val.txt").stat().st_size > 0 and 1.5 < first["val_bytes_per_token"] < 8
    again = mod.prepare(corpus, tmp_path / "work", 600)
    assert "tokenizer_s" not in again and "split_s" not in again and again["warm_s"] > 0
    assert not (tmp_path / "inductor").exists()


def test_prepare_device_call_script_is_valid_and_ships_no_typer():
    """scripts/prepare_device_call.sh: valid bash; the wheels it downloads for the GPU machine are ftfy and wcwidth
    only (PyPI's typer needs pydantic, which that machine lacks: installed over its own typer, it broke the CLI)."""
    import re

    script = ROOT / "scripts" / "prepare_device_call.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    downloads = re.findall(r"pip download .*--dest \S+ (.+)", script.read_text())
    assert [d.split() for d in downloads] == [["ftfy", "wcwidth"]]


def test_bench_loss_shapes_are_the_presets_at_compare_trains_micro_batches():
    """bench_loss.py times the loss at each preset's shape of compare_train.sh: rows = the reference micro-batch x
    the preset's block, its width, its vocabulary (bench_train's REFERENCE, the shapes nanoGPT runs)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_loss
        import bench_train
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from minillm.config import PRESETS

    assert set(bench_loss.SHAPES) == set(bench_train.REFERENCE)
    for name, (rows, width, vocab) in bench_loss.SHAPES.items():
        batch, ref_vocab, _ = bench_train.REFERENCE[name]
        model = PRESETS[name]["model"]
        assert (rows, width, vocab) == (batch * model["block_size"], model["n_embd"], ref_vocab), name
    out = _run("scripts/bench_loss.py", "--help")
    assert "--sweep" in out
