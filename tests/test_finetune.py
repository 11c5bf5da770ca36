"""Fine-tuning: the learning-rate default, tokenizer refusal, and CLI runs on a tiny base model: continue,
SFT with LoRA (base frozen), generate --adapter, merge, resume. (SFT data: tests/test_sft.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minillm.cli import app
from minillm.train import finetune as ft
from tests.conftest import make_corpus, make_runner

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "64", "--batch-size", "4",
        "--device", "cpu", "--compile", "off", "--eval-batches", "2", "--log-every", "1"]
RUN = ["--device", "cpu", "--batch-size", "4", "--eval-batches", "2", "--log-every", "1"]
PROMPT = "### Instruction:\nsuma 3 y 4\n\n### Response:\n"



pytestmark = pytest.mark.usefixtures("no_plots")


def write_sft(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        lines.append({"instruction": f"suma {a} y {b}", "response": f"{a + b}"})
    lines.append({"messages": [{"role": "user", "content": "hola"}, {"role": "assistant", "content": "hola amigo"}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, runner_module):
    """A tiny pretrained run (6 steps) and its files."""
    d = tmp_path_factory.mktemp("ft")
    make_corpus(d / "a.txt", 40, seed=0)
    make_corpus(d / "b.txt", 30, seed=1)
    write_sft(d / "sft.jsonl")
    r = runner_module.invoke(app, ["init-tokenizer", "-f", str(d / "a.txt"), "--vocab-size", "300", "-o", str(d / "tok.json")])
    assert r.exit_code == 0, r.output
    r = runner_module.invoke(app, ["train", "-t", str(d / "tok.json"), "-c", str(d / "a.txt"), "-o", str(d / "base"),
                                   "--max-steps", "6", "--eval-every", "6", "--lr", "2e-3", *TINY])
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def runner_module():
    return make_runner()


def test_lr_defaults_to_a_tenth_of_the_base_run():
    base = {"lr": 3e-3, "batch_size": 8, "max_steps": 300, "doc_masking": True, "patience": 3}
    t = ft.train_config_for(base, {}, lora=False)
    assert t.lr == pytest.approx(3e-4) and (t.batch_size, t.doc_masking) == (8, True)
    assert (t.max_steps, t.epochs, t.patience) == (0, 1.0, 0)  # the run's length is the fine-tune's own
    assert ft.train_config_for(base, {}, lora=True).lr == pytest.approx(3e-3)
    assert ft.train_config_for(base, {"lr": 1e-5, "max_steps": 7}, lora=False).lr == 1e-5


# ---------------------------------------------------------------- CLI runs


def test_continue_run_and_tokenizer_refusal(base, runner_module):
    d, out = base, base / "cont"
    r = runner_module.invoke(app, ["finetune", "--ckpt", str(d / "base" / "ckpt_best.pt"), "--data", str(d / "b.txt"),
                                   "-o", str(out), "--mode", "continue", "--max-steps", "3", *RUN])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["lr"] == pytest.approx(2e-4) and cfg["finetune"]["mode"] == "continue"
    for name in ("ckpt_best.pt", "ckpt_last.pt", "history.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    ck = torch.load(out / "ckpt_last.pt", weights_only=True)
    base_sd = torch.load(d / "base" / "ckpt_best.pt", weights_only=True)["model"]
    assert not torch.equal(ck["model"]["blocks.0.attn.q_proj.weight"], base_sd["blocks.0.attn.q_proj.weight"])
    other = d / "other_tok.json"
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["otro texto distinto"] * 20, 280), other)
    r = runner_module.invoke(app, ["finetune", "--ckpt", str(d / "base"), "--data", str(d / "b.txt"), "-o",
                                   str(d / "bad"), "--tokenizer", str(other), "--max-steps", "1", *RUN])
    assert r.exit_code == 1
    assert "other_tok.json" in r.stderr and str(d / "base" / "tokenizer.json") in r.stderr.replace("\n", "")


def test_sft_lora_generate_merge_resume(base, runner_module):
    from minillm.checkpoint import load_checkpoint
    from minillm.lora import LoRAConfig, expected_params

    d, out = base, base / "sft"
    base_ckpt = d / "base" / "ckpt_best.pt"
    args = ["finetune", "--ckpt", str(base_ckpt), "--data", str(d / "sft.jsonl"), "-o", str(out), "--mode", "sft",
            "--lora-rank", "4", "--lora-targets", "q,v,down", "--lr", "1e-2", "--eval-every", "2", *RUN]
    r = runner_module.invoke(app, [*args, "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    r = runner_module.invoke(app, [*args, "--max-steps", "4", "--resume"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4
    base_st = load_checkpoint(base_ckpt)
    from minillm.config import model_from_dict

    mcfg = model_from_dict(base_st["model_config"])
    n = expected_params(mcfg, LoRAConfig(rank=4, targets=("q", "v", "down")))
    assert summary["lora"]["trainable_params"] == n == 2 * (4 * (32 + 32) * 2 + 4 * (64 + 32))
    assert summary["lora"]["optimizer_state_bytes_measured"] == 8 * n
    assert "trainable parameters" in r.stderr
    # the adapter alone: small, weights_only, records the base's sha256
    ad = torch.load(out / "adapter.pt", weights_only=True)
    from minillm.io import sha256_file

    assert ad["base_sha256"] == sha256_file(base_ckpt)
    assert (out / "adapter.pt").stat().st_size < base_ckpt.stat().st_size / 4
    # only adapters trained: base weights = merged - (alpha/r) B A; untouched layers identical
    ck = torch.load(out / "ckpt_last.pt", weights_only=True)
    for k, v in base_st["model"].items():
        stem = k[: -len(".weight")]
        if f"{stem}.lora_A" in ck["lora"]["tensors"]:
            delta = ck["lora"]["tensors"][f"{stem}.lora_B"] @ ck["lora"]["tensors"][f"{stem}.lora_A"] * 2.0
            assert delta.abs().max() > 0
            torch.testing.assert_close(ck["model"][k] - delta, v, atol=1e-6, rtol=0)
        else:
            assert torch.equal(ck["model"][k], v), k
    # generate with the adapter == generate with the merged checkpoint (greedy)
    gen = ["generate", "-p", PROMPT, "--max-tokens", "8", "--temperature", "0", "--device", "cpu", "--json"]
    r1 = runner_module.invoke(app, [*gen, "--ckpt", str(base_ckpt), "--adapter", str(out / "adapter.pt")])
    assert r1.exit_code == 0, r1.output
    r = runner_module.invoke(app, ["merge", "--ckpt", str(base_ckpt), "--adapter", str(out / "adapter.pt"),
                                   "--out", str(d / "merged" / "m.pt")])
    assert r.exit_code == 0, r.output
    torch.load(d / "merged" / "m.pt", weights_only=True)
    r2 = runner_module.invoke(app, [*gen, "--ckpt", str(d / "merged" / "m.pt")])
    assert r2.exit_code == 0, r2.output
    with_adapter, merged = json.loads(r1.stdout), json.loads(r2.stdout)
    assert with_adapter["tokens"] > 0 and with_adapter["completion"] == merged["completion"]
    # an adapter refuses a different base
    r = runner_module.invoke(app, [*gen, "--ckpt", str(d / "merged" / "m.pt"), "--adapter", str(out / "adapter.pt")])
    assert r.exit_code == 1 and "was trained on base checkpoint" in r.stderr


def test_cli_bad_lines_stop_or_are_skipped(base, runner_module):
    d = base
    bad = d / "bad.jsonl"
    bad.write_text((d / "sft.jsonl").read_text() + "{oops\n", encoding="utf-8")
    args = ["finetune", "--ckpt", str(d / "base"), "--data", str(bad), "--mode", "sft", "--max-steps", "1", *RUN]
    r = runner_module.invoke(app, [*args, "-o", str(d / "bad1")])
    assert r.exit_code == 1 and "line 26: not valid JSON" in r.stderr and "--skip-bad-lines" in r.stderr
    r = runner_module.invoke(app, [*args, "-o", str(d / "bad2"), "--skip-bad-lines"])
    assert r.exit_code == 0, r.output
    assert json.loads((d / "bad2" / "config.json").read_text())["data"]["bad_lines"] == 1
    r = runner_module.invoke(app, [*args, "-o", str(d / "bad3"), "--lora-alpha", "4"])
    assert r.exit_code == 2 and "--lora-rank" in r.stderr


def test_cli_data_of_the_wrong_mode_is_refused_with_the_other_mode(base, runner_module):
    d = base
    args = ["finetune", "--ckpt", str(d / "base"), "--max-steps", "1", *RUN]
    r = runner_module.invoke(app, [*args, "--data", str(d / "b.txt"), "--mode", "sft", "-o", str(d / "wrong1")])
    assert r.exit_code == 1 and "use --mode continue" in r.stderr
    assert not (d / "wrong1").exists()  # a run that failed in setup leaves no directory behind
    r = runner_module.invoke(app, [*args, "--data", str(d / "sft.jsonl"), "--mode", "continue", "-o", str(d / "wrong2")])
    assert r.exit_code == 2 and "--mode sft" in r.stderr and not (d / "wrong2").exists()
