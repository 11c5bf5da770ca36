"""Fine-tuning: SFT parsing and masking (prompt tokens carry no loss), bad JSONL lines, the learning-rate
default, tokenizer refusal, and CLI runs on a tiny base model: continue, SFT with LoRA (base frozen),
generate --adapter, merge, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minillm.cli import app
from minillm.errors import MiniLLMError
from minillm.train import finetune as ft
from tests.conftest import make_corpus

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
    from typer.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def tok_of(d: Path):
    from minillm.tokenizer import load_tokenizer

    return load_tokenizer(d / "tok.json")


# ---------------------------------------------------------------- parsing and masking


def test_template_for_both_formats():
    ex = ft.format_example({"instruction": "di hola", "input": "en voz alta", "response": "hola"})
    assert ex.segments == (("### Instruction:\ndi hola\n\n### Input:\nen voz alta\n\n### Response:\n", False),
                           ("hola", True))
    assert ft.format_example({"instruction": "x", "response": "y"}).segments[0][0] == ft.format_prompt("x")
    chat = ft.format_example({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                                           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                                           {"role": "assistant", "content": "A2"}]})
    assert [t for t, trained in chat.segments if trained] == ["A1", "A2"]
    assert "".join(t for t, _ in chat.segments) == ("### System:\nS\n\n### Instruction:\nU1\n\n### Response:\nA1\n\n"
                                                   "### Instruction:\nU2\n\n### Response:\nA2")
    for bad, msg in (([1], "JSON object"), ({"instruction": "x"}, 'missing "response"'),
                     ({"instruction": 3, "response": "y"}, '"instruction" must be a string'),
                     ({"messages": [{"role": "user", "content": "u"}]}, "last message"),
                     ({"messages": [{"role": "assistant", "content": "a"}]}, "must follow a user"),
                     ({"messages": [{"role": "bot", "content": "a"}]}, "messages\\[0\\]")):
        with pytest.raises(ValueError, match=msg):
            ft.format_example(bad)


def test_sft_targets_mask_the_prompt(base):
    tok = tok_of(base)
    doc = tok.token_to_id("<|doc|>")
    ex = ft.format_example({"instruction": "suma 3 y 4", "response": "siete"})
    ids, tgt = ft.encode_example(tok, ex, doc)
    n_prompt = len(tok.encode(PROMPT, add_special_tokens=False).ids)
    n_resp = len(tok.encode("siete", add_special_tokens=False).ids)
    assert ids[0] == doc and ids[-1] == doc and len(ids) == 1 + n_prompt + n_resp + 1
    assert tgt == [False] * (1 + n_prompt) + [True] * (n_resp + 1)  # response + the final <|doc|>
    rows, info = ft.encode_rows(tok, [ex], 64, pad=0)
    assert rows.shape == (1, 65) and info["target_tokens"] == n_resp + 1
    x, y = ft.decode_rows(torch.from_numpy(rows))
    assert x[0, : len(ids)].tolist() == ids
    targets = y[0, 1:]  # the targets of positions 0..T-1
    assert (targets[: n_prompt] == -1).all() and (targets[n_prompt : n_prompt + n_resp + 1] >= 0).all()
    assert (targets[n_prompt + n_resp + 1 :] == -1).all()  # padding


def test_changing_a_prompt_label_does_not_change_the_loss(base):
    from minillm.model.load import load_model

    tok = tok_of(base)
    model, _ = load_model(base / "base" / "ckpt_best.pt")
    ex = ft.format_example({"instruction": "suma 3 y 4", "response": "siete"})
    rows = torch.from_numpy(ft.encode_rows(tok, [ex], 64, pad=0)[0])
    handle = ft.decode_masked_inputs(model, tok.token_to_id("<|doc|>"))
    net = model
    x, y = rows[:, :-1], rows[:, 1:]
    loss = net(x, y)
    n_prompt = len(tok.encode(PROMPT, add_special_tokens=False).ids)
    y2 = y.clone()
    y2[0, 3] = ~((~y2[0, 3] + 1) % 300)  # another label for a prompt position (still masked)
    assert y2[0, 3] != y[0, 3]
    assert torch.equal(net(x, y2), loss)
    y3 = y.clone()
    y3[0, n_prompt] = (y3[0, n_prompt] + 1) % 300  # a response label: the loss must move
    assert not torch.equal(net(x, y3), loss)
    handle.remove()
    full = model(ft.decode_rows(x)[0], ft.decode_rows(rows)[0][:, 1:])  # no mask: prompt tokens would count
    assert not torch.allclose(full, loss)


def test_bad_jsonl_lines_are_reported_or_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "response": "b"})
    p.write_text("\n".join([good, "{not json", good, "", json.dumps({"instruction": "x"}), good, "[1, 2]"]) + "\n")
    with pytest.raises(MiniLLMError) as e:
        ft.read_jsonl(p)
    msg = str(e.value)
    assert "3 malformed line(s)" in msg and "line 2: not valid JSON" in msg and 'line 5: missing "response"' in msg
    assert "line 7: expected a JSON object" in msg and "--skip-bad-lines" in msg
    logs = []
    examples, bad = ft.read_jsonl(p, skip_bad_lines=True, log=logs.append)
    assert (len(examples), bad) == (3, 3) and "skipped 3" in logs[0]


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
