"""The stages after train, end to end through the CLI on a tiny CPU model: finetune (continue, SFT, LoRA),
merge (base + adapter = the model generate --adapter uses) and export (hf, safetensors: generate and evaluate
read an export exactly as its checkpoint)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minillm.cli import app
from tests.conftest import make_corpus, make_runner

RUN = ["--device", "cpu", "--compile", "off", "--batch-size", "4", "--eval-batches", "2", "--log-every", "1"]
PROMPT = "### Instruction:\nsuma 3 y 4\n\n### Response:\n"

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture(scope="module")
def runner():
    return make_runner()


def cli(runner, *args) -> str:
    """Run one command, which must succeed; its stdout."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args[0], r.output)
    return r.stdout


def evaluate(runner, ckpt: Path, text: Path, *extra) -> float:
    return json.loads(cli(runner, "evaluate", "--ckpt", ckpt, "--test-file", text, "--json", "--device", "cpu",
                          *extra))["loss"]


def generate(runner, ckpt: Path, *extra) -> list[tuple[str, int, str]]:
    """(completion, tokens, finish_reason) of each sample: two sampled at temperature 1 (seed 3), one greedy."""
    out = []
    for sampling in (["--temperature", "1", "--top-k", "0", "--top-p", "1", "-n", "2", "--seed", "3"],
                     ["--temperature", "0"]):
        lines = cli(runner, "generate", "--ckpt", ckpt, "-p", PROMPT, "--max-tokens", "12", "--device", "cpu",
                    "--json", *sampling, *extra).splitlines()
        out += [(r["completion"], r["tokens"], r["finish_reason"]) for r in map(json.loads, lines)]
    assert len(out) == 3 and sum(r[1] for r in out) > 0
    return out


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def write_sft(path: Path, n: int = 32) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"instruction": f"suma {a} y {b}", "response": f"{a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, runner) -> Path:
    """A tiny pretrained run (``base/``), its tokenizer, two more corpora of the same kind and SFT data."""
    d = tmp_path_factory.mktemp("pipeline")
    make_corpus(d / "a.txt", 40, seed=0)
    make_corpus(d / "b.txt", 40, seed=1)
    make_corpus(d / "held.txt", 6, seed=2)
    write_sft(d / "sft.jsonl")
    cli(runner, "init-tokenizer", "-f", d / "a.txt", "--vocab-size", "300", "-o", d / "tok.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("minillm.train.plots.plot_curves", lambda *a, **k: None)
        cli(runner, "train", "-t", d / "tok.json", "-c", d / "a.txt", "-o", d / "base", "--n-layer", "2",
            "--n-embd", "32", "--n-head", "2", "--block-size", "64", "--max-steps", "12", "--eval-every", "12",
            "--lr", "3e-3", *RUN)
    return d


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["model"]


def test_finetune_continue_starts_from_the_base_and_learns(base, runner):
    """Continued pretraining on more text of the same kind, from the run directory: the base's shape, every
    weight trained, and a held-out loss below the base's (a run from fresh weights would be far above it)."""
    out = base / "cont"
    s = summary(cli(runner, "finetune", "--ckpt", base / "base", "--data", base / "b.txt", "-o", out,
                    "--mode", "continue", "--max-steps", "8", "--lr", "3e-3", "--eval-every", "4", *RUN))
    assert s["steps"] == 8
    before, after = (torch.load(p, weights_only=True) for p in (base / "base" / "ckpt_best.pt", out / "ckpt_last.pt"))
    assert after["model_config"] == before["model_config"]
    assert [k for k, v in before["model"].items() if torch.equal(v, after["model"][k])] == []  # all weights trained
    assert json.loads((out / "config.json").read_text())["finetune"]["mode"] == "continue"
    assert evaluate(runner, out, base / "held.txt") < evaluate(runner, base / "base", base / "held.txt") - 0.05
    generate(runner, out)


def test_finetune_sft_trains_every_weight_on_the_responses(base, runner):
    out = base / "sft"
    s = summary(cli(runner, "finetune", "--ckpt", base / "base" / "ckpt_best.pt", "--data", base / "sft.jsonl",
                    "-o", out, "--mode", "sft", "--max-steps", "10", "--epochs", "0", "--lr", "3e-3", "--eval-every", "5",
                    *RUN))
    assert s["steps"] == 10 and "lora" not in s
    hist = json.loads((out / "history.json").read_text())["evals"]
    assert [h["step"] for h in hist] == [5, 10] and hist[-1]["val_loss"] < hist[0]["val_loss"]
    base_sd, sd = weights(base / "base" / "ckpt_best.pt"), weights(out / "ckpt_last.pt")
    assert [k for k, v in base_sd.items() if torch.equal(v, sd[k])] == []
    assert not (out / "adapter.pt").exists()
    generate(runner, out)


@pytest.fixture(scope="module")
def lora(base, runner) -> dict[str, Path]:
    """An SFT LoRA run on the base, and its adapter merged into ``merged/m.pt``."""
    out = base / "lora"
    s = summary(cli(runner, "finetune", "--ckpt", base / "base" / "ckpt_best.pt", "--data", base / "sft.jsonl",
                    "-o", out, "--mode", "sft", "--lora-rank", "4", "--lr", "1e-2", "--max-steps", "6",
                    "--eval-every", "6", *RUN))
    assert s["steps"] == 6 and s["lora"]["trainable_params"] > 0
    merged = base / "merged" / "m.pt"
    res = json.loads(cli(runner, "merge", "--ckpt", base / "base" / "ckpt_best.pt", "--adapter", out / "adapter.pt",
                         "--out", merged, "--json"))
    assert Path(res["out"]) == merged and res["rank"] == 4
    return {"base": base / "base" / "ckpt_best.pt", "adapter": out / "adapter.pt", "merged": merged}


def test_merge_gives_the_model_generate_adapter_uses(base, lora, runner):
    """Sampled and greedy tokens from the merged checkpoint are those of base + --adapter; the adapter did
    change the model (the scores differ from the base's); merge copies the tokenizer beside its output and
    never replaces a file without --overwrite."""
    merged = lora["merged"]
    assert generate(runner, merged) == generate(runner, lora["base"], "--adapter", lora["adapter"])
    assert evaluate(runner, merged, base / "held.txt") != evaluate(runner, lora["base"], base / "held.txt")
    assert (merged.parent / "tokenizer.json").read_bytes() == (base / "base" / "tokenizer.json").read_bytes()
    before = merged.read_bytes()
    again = ["merge", "--ckpt", lora["base"], "--adapter", lora["adapter"], "--out", merged]
    r = runner.invoke(app, [str(a) for a in again])
    assert r.exit_code == 1 and "--overwrite" in r.stderr and merged.read_bytes() == before
    cli(runner, *again, "--overwrite")
    assert weights(merged).keys() == weights(lora["base"]).keys()  # a plain checkpoint: no LoRA tensors


def test_exports_generate_and_evaluate_as_their_checkpoint(base, lora, runner):
    """hf and safetensors exports of the merged checkpoint, and an hf export of base + --adapter: evaluate gives
    the checkpoint's loss and generate its tokens, from each."""
    tok = ["--tokenizer", base / "tok.json"]  # a safetensors file travels without its tokenizer
    hf, st, hf_adapter = base / "export" / "hf", base / "export" / "m.safetensors", base / "export" / "hf_adapter"
    cli(runner, "export", "--ckpt", lora["merged"], "--out", hf)
    cli(runner, "export", "--ckpt", lora["merged"], "--out", st, "--format", "safetensors")
    cli(runner, "export", "--ckpt", lora["base"], "--adapter", lora["adapter"], "--out", hf_adapter)
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    want = evaluate(runner, lora["merged"], base / "held.txt")
    assert [evaluate(runner, hf, base / "held.txt"), evaluate(runner, st, base / "held.txt", *tok),
            evaluate(runner, hf_adapter, base / "held.txt")] == [want] * 3
    tokens = generate(runner, lora["merged"])
    assert generate(runner, hf) == generate(runner, st, *tok) == generate(runner, hf_adapter) == tokens
