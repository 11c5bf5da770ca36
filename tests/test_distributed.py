"""Data-parallel training on the CPU over gloo: real ``torchrun`` runs of two processes against one process with
the same global batch, resume under torchrun (through ``--nproc``), a two-rank checkpoint in one-process
generate/evaluate, rank 0 alone writing, every rank stopping at the same step on SIGTERM, and the loader's
per-rank shares of an epoch. The same for FSDP2 (``--fsdp``): parity with one process, the one-process
checkpoint format, resume (also as DDP), and the refusals (Muon, one process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm import distributed
from minillm.checkpoint import load_checkpoint
from minillm.config import resolve
from minillm.errors import MiniLLMError, UsageError
from tests.conftest import events, make_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "tiny", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--device", "cpu",
        "--eval-batches", "2", "--log-every", "1", "--compile", "off", "--dropout", "0", "--log-format", "json",
        "--num-workers", "0", "--warmup-steps", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(d / "corpus.txt", n_docs=40)
    tok = d / "tok.json"
    save_tokenizer(train_tokenizer(iter_documents(corpus), 300), tok)
    return tok, corpus


def launch(nproc: int, data, out: Path, *extra: str, via: str = "torchrun", wait: bool = True, env: dict | None = None):
    tok, corpus = data
    env = {**ENV, **(env or {})}
    args = ["train", "-t", str(tok), "-c", str(corpus), "-o", str(out), *TINY, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "minillm", *args]
    elif via == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "minillm", *args]
    else:
        cmd = [sys.executable, "-m", "minillm", *args, "--nproc", str(nproc)]
    if not wait:
        return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=120)


def both(*procs: subprocess.Popen) -> list[subprocess.CompletedProcess]:
    """Wait for runs started together (startup dominates these tiny runs, so they overlap well)."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out




def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["evals"]


def assert_same_run(a: Path, b: Path, ea: str, eb: str) -> None:
    sa, sb = events(ea, "step"), events(eb, "step")
    assert [e["step"] for e in sa] == [e["step"] for e in sb] and sa
    for x, y in zip(sa, sb, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
        assert x["lr"] == y["lr"] and x["epoch"] == y["epoch"]
    ha, hb = history(a), history(b)
    assert len(ha) == len(hb) > 0
    for x, y in zip(ha, hb, strict=True):
        assert (x["step"], x["tokens"], x["epoch"]) == (y["step"], y["tokens"], y["epoch"])
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5 and abs(x["train_loss"] - y["train_loss"]) < 1e-5


@pytest.fixture(scope="module")
def pair(data, tmp_path_factory):
    """One process with batch 4 and two processes with batch 2 (accumulation 2: no_sync on the inner micro-batch)."""
    d = tmp_path_factory.mktemp("pair")
    common = ["--max-steps", "6", "--eval-every", "3", "--accumulation-steps", "2"]
    one, two = both(launch(1, data, d / "one", "--batch-size", "4", *common, wait=False),
                    launch(2, data, d / "two", "--batch-size", "2", *common, wait=False))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    return d, one, two


def test_two_ranks_match_one_process_with_the_same_global_batch(pair):
    d, one, two = pair
    assert_same_run(d / "one", d / "two", one.stderr, two.stderr)
    # the global batch: 2 ranks x 2 windows x 2 micro-batches x 16 tokens per step
    assert history(d / "two")[-1]["tokens"] == 6 * 2 * 2 * 2 * 16
    assert json.loads((d / "two" / "config.json").read_text())["world_size"] == 2


def test_the_deferred_check_under_ddp_and_fsdp_matches_the_synchronous_one_process_run(pair, fsdp_pair, data,
                                                                                        tmp_path):
    """MINILLM_STEP_SYNC=log, CUDA's default (no host sync per step; the skip decided on the device from the reduced
    loss and norm), forced here on gloo: two DDP ranks and two FSDP ranks each give the one-process synchronous run."""
    deferred = {"MINILLM_STEP_SYNC": "log"}
    ddp, fsdp = both(
        launch(2, data, tmp_path / "ddp", "--batch-size", "2", "--max-steps", "6", "--eval-every", "3",
               "--accumulation-steps", "2", wait=False, env=deferred),
        launch(2, data, tmp_path / "fsdp", "--batch-size", "2", "--max-steps", "6", "--fsdp", *FSDP_RUN, wait=False,
               env=deferred))
    assert ddp.returncode == 0 and fsdp.returncode == 0, (ddp.stderr[-2000:], fsdp.stderr[-2000:])
    assert_same_run(pair[0] / "one", tmp_path / "ddp", pair[1].stderr, ddp.stderr)
    assert_same_run(fsdp_pair[0] / "one", tmp_path / "fsdp", fsdp_pair[1].stderr, fsdp.stderr)


def test_only_rank_zero_writes_and_logs(pair):
    d, one, two = pair
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.name != ".lock")  # noqa: E731
    assert files(d / "two") == files(d / "one")  # no stray, duplicate or temporary files
    assert [json.loads(line)["steps"] for line in two.stdout.splitlines()] == [6]  # one summary, from rank 0
    for kind in ("run", "eval", "done"):
        assert len(events(two.stderr, kind)) == len(events(one.stderr, kind)) > 0, kind
    assert "Traceback" not in two.stderr and "Error" not in two.stderr


def test_two_rank_checkpoint_loads_in_one_process_generate_and_evaluate(pair, data, runner):
    from minillm.cli import app
    from minillm.model.load import load_model

    d = pair[0]
    ck = load_checkpoint(d / "two" / "ckpt_last.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    model, _ = load_model(d / "two" / "ckpt_last.pt")
    ref = load_checkpoint(d / "one" / "ckpt_last.pt")["model"]
    for k, v in model.state_dict().items():  # the same weights as the one-process run's
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0)
    r = runner.invoke(app, ["generate", "--ckpt", str(d / "two"), "--max-tokens", "5", "--device", "cpu", "--json",
                            "--prompt", "el"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.splitlines()[0])["completion"] is not None
    r = runner.invoke(app, ["evaluate", "--ckpt", str(d / "two"), "--test-file", str(data[1]), "--device", "cpu",
                            "--json"])
    assert r.exit_code == 0, r.output


def test_resume_under_torchrun_matches_one_process_and_refuses_another_world_size(pair, data):
    d = pair[0]
    more = ["--max-steps", "8", "--eval-every", "3", "--accumulation-steps", "2", "--resume"]
    bad = launch(1, data, d / "two", "--batch-size", "2", *more)
    assert bad.returncode == 1 and "2 process(es), this one has 1" in bad.stderr
    one, two = both(launch(1, data, d / "one", "--batch-size", "4", *more, wait=False),
                    launch(2, data, d / "two", "--batch-size", "2", *more, via="--nproc", wait=False))  # re-launch
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert "launching: -m torch.distributed.run --standalone --nproc_per_node 2" in two.stderr
    assert [e["step"] for e in events(two.stderr, "step")] == [7, 8]
    assert_same_run(d / "one", d / "two", one.stderr, two.stderr)


def test_sigterm_stops_every_rank_at_the_same_step(data, tmp_path):
    out = tmp_path / "sig"
    p = launch(2, data, out, "--batch-size", "2", "--max-steps", "100000", "--eval-every", "100000", wait=False)
    seen, deadline = "", time.time() + 60
    while time.time() < deadline and '"step": 3,' not in seen:
        line = p.stderr.readline()
        if not line:
            break
        seen += line
    p.send_signal(signal.SIGTERM)  # to torchrun's agent, which forwards it to both ranks
    _, rest = p.communicate(timeout=60)
    stderr = seen + rest
    assert "interrupted at step" in stderr
    step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert stderr.count("interrupted at step") == 1  # rank 0 alone reports
    assert "forcefully exiting" not in stderr  # no rank was left waiting in a collective (then SIGKILLed)
    assert load_checkpoint(out / "ckpt_last.pt")["run_state"]["step"] == step >= 3


def test_each_rank_reads_a_disjoint_share_and_together_the_single_process_epoch(data, tmp_path):
    from minillm.data.loader import Mixture, prepare_data

    tok, corpus = data
    corpus = Mixture((corpus,))
    _, tcfg = resolve("tiny", {"batch_size": 3, "block_size": 16})
    big = resolve("tiny", {"batch_size": 6, "block_size": 16})[1]
    one = prepare_data(tok, corpus, tmp_path / "cache", 16, big).loader
    ranks = [prepare_data(tok, corpus, tmp_path / "cache", 16, tcfg, rank=r, world_size=2).loader for r in (0, 1)]
    n = int(one.n_windows.sum())
    steps = -(-n // 6)
    assert ranks[0].windows_per_epoch * 2 >= n
    seen_one, seen_ranks = [], []
    for _ in range(steps):
        a, b = ranks[0].next_indices()[1], ranks[1].next_indices()[1]
        assert not set(a) & set(b)  # disjoint at every step
        merged = np.empty(6, dtype=np.int64)
        merged[0::2], merged[1::2] = a, b  # global sample g is rank g % 2's
        g = one.next_indices()[1]
        assert merged.tolist() == g.tolist()  # exactly the batch-6 process's windows, in its order
        seen_one.extend(g)
        seen_ranks.extend(merged)
    assert sorted(seen_ranks[:n]) == sorted(seen_one[:n]) == list(range(n))  # an epoch: every window once


def test_one_process_setup_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = distributed.setup("cpu")
    assert not d.enabled and d.is_main
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_(t, d, "mean") is t and t.tolist() == [1.0, 2.0]
    assert distributed.agree_max([0, 1.5], d) == [0.0, 1.5]
    with distributed.main_first(d):
        pass
    with pytest.raises(MiniLLMError, match="trained by 2 process"):
        distributed.check_world_size(2, d, Path("runs/x"))
    with pytest.raises(UsageError, match="cuda:LOCAL_RANK"):
        distributed.rank_device("cuda:1", 0)


# ---------------------------------------------------------------- FSDP2 (--fsdp)

FSDP_RUN = ["--eval-every", "3", "--accumulation-steps", "2", "--grad-clip", "0.1"]  # clipping on at every step


@pytest.fixture(scope="module")
def fsdp_pair(data, tmp_path_factory):
    """One process with batch 4 and two FSDP processes with batch 2, 6 steps; --grad-clip 0.1 clips every step, so
    the gradient norm must be the global one over both ranks' shards."""
    d = tmp_path_factory.mktemp("fsdp")
    one, two = both(launch(1, data, d / "one", "--batch-size", "4", "--max-steps", "6", *FSDP_RUN, wait=False),
                    launch(2, data, d / "fsdp", "--batch-size", "2", "--max-steps", "6", "--fsdp", *FSDP_RUN,
                           wait=False))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    return d, one, two


def test_fsdp_two_ranks_match_one_process_with_the_same_global_batch(fsdp_pair):
    d, one, two = fsdp_pair
    assert [e.get("parallel") for e in events(two.stderr, "run")] == ["fsdp"]
    assert_same_run(d / "one", d / "fsdp", one.stderr, two.stderr)
    assert [json.loads(line)["steps"] for line in two.stdout.splitlines()] == [6]  # rank 0 alone reports
    assert "Traceback" not in two.stderr


def test_fsdp_with_the_chunked_loss_matches_one_process_with_the_plain_one(fsdp_pair, data):
    """The chunked output layer + loss (what an eager training step on a GPU takes; here through the TOML key
    ``loss_chunk``) under FSDP2, the output layer's weight gathered from both ranks' shards and tied to the
    embedding: the one-process run with the plain loss, step by step."""
    d, one, _ = fsdp_pair
    toml = d / "chunked.toml"
    toml.write_text('preset = "tiny"\n[model]\nloss_chunk = 5\n')
    two = launch(2, data, d / "fsdp-chunked", "--batch-size", "2", "--max-steps", "6", "--fsdp", *FSDP_RUN,
                 "--config", str(toml))  # the last --config wins
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((d / "fsdp-chunked" / "config.json").read_text())["model"]["loss_chunk"] == 5
    assert_same_run(d / "one", d / "fsdp-chunked", one.stderr, two.stderr)


def test_fsdp_checkpoint_has_the_one_process_format_and_loads_in_generate_and_evaluate(fsdp_pair, data, runner):
    from minillm.cli import app
    from minillm.model.load import load_model

    d = fsdp_pair[0]
    ck = torch.load(d / "fsdp" / "ckpt_last.pt", weights_only=True)
    ref = torch.load(d / "one" / "ckpt_last.pt", weights_only=True)
    assert ck.keys() == ref.keys() and list(ck["model"]) == list(ref["model"])  # whole weights, no prefixes
    for k, v in ref["model"].items():
        assert type(ck["model"][k]) is torch.Tensor and ck["model"][k].shape == v.shape
        torch.testing.assert_close(ck["model"][k], v, atol=1e-5, rtol=0)
    assert len(ck["optimizer"]) == len(ref["optimizer"]) == 1
    for got, want in zip(ck["optimizer"], ref["optimizer"], strict=True):  # Optimizer.state_dict(): ids, not names
        assert got["param_groups"] == want["param_groups"]
        assert got["state"].keys() == want["state"].keys() and all(isinstance(i, int) for i in got["state"])
        for i, st in want["state"].items():
            assert got["state"][i].keys() == st.keys()
            for name, t in st.items():
                assert type(got["state"][i][name]) is torch.Tensor and got["state"][i][name].shape == t.shape
                torch.testing.assert_close(got["state"][i][name], t, atol=1e-5, rtol=1e-4)
    model, _ = load_model(d / "fsdp" / "ckpt_last.pt")  # a plain GPT in one process
    assert model.lm_head.weight is model.tok_emb.weight  # still tied after the load
    r = runner.invoke(app, ["evaluate", "--ckpt", str(d / "fsdp"), "--test-file", str(data[1]), "--device", "cpu",
                            "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--ckpt", str(d / "fsdp"), "--max-tokens", "5", "--device", "cpu", "--json",
                            "--prompt", "el"])
    assert r.exit_code == 0, r.output


def test_fsdp_resume_through_nproc_matches_one_process_and_a_ddp_resume(fsdp_pair, data):
    """Resumed under --nproc 2 --fsdp, the run continues as the one-process run does (whose resume is exact,
    tests/test_training.py); the same checkpoint resumed without --fsdp (DDP) gives the same steps too."""
    import shutil

    d = fsdp_pair[0]
    shutil.copytree(d / "fsdp", d / "ddp")
    more = ["--max-steps", "8", *FSDP_RUN, "--resume"]
    one, fsdp, ddp = both(launch(1, data, d / "one", "--batch-size", "4", *more, wait=False),
                          launch(2, data, d / "fsdp", "--batch-size", "2", *more, "--fsdp", via="--nproc", wait=False),
                          launch(2, data, d / "ddp", "--batch-size", "2", *more, wait=False))
    for r in (one, fsdp, ddp):
        assert r.returncode == 0, r.stderr[-2000:]
    assert "--nproc_per_node 2 -m minillm train" in fsdp.stderr and "--fsdp" in fsdp.stderr.split("launching:")[1]
    assert [e["step"] for e in events(fsdp.stderr, "step")] == [7, 8]
    assert [e.get("parallel") for e in events(ddp.stderr, "run")] == ["ddp"]
    assert_same_run(d / "one", d / "fsdp", one.stderr, fsdp.stderr)
    assert_same_run(d / "fsdp", d / "ddp", fsdp.stderr, ddp.stderr)


def test_fsdp_is_refused_with_muon_and_with_one_process(data, tmp_path, runner, monkeypatch):
    from minillm.cli import app

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    tok, corpus = data
    base = ["train", "-t", str(tok), "-c", str(corpus), "-o", str(tmp_path / "run"), "--device", "cpu", "--fsdp"]
    for extra in (["--config", "small", "--nproc", "2"], ["--optimizer", "muon", "--nproc", "2"]):
        r = runner.invoke(app, [*base, *extra])  # refused before torchrun is started
        assert r.exit_code == 2, r.output
        assert "--fsdp" in r.stderr and "--optimizer muon" in r.stderr and "--optimizer adamw" in r.stderr
        assert "launching" not in r.stderr
    for extra in ([], ["--nproc", "1"]):
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == 2, r.output
        assert "--fsdp" in r.stderr and "--nproc N" in r.stderr and "torchrun" in r.stderr
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1
    assert runner.invoke(app, base).exit_code == 2
    assert not (tmp_path / "run").exists()


def test_wrap_fsdp_for_one_process_returns_the_model_unchanged():
    from minillm.config import ModelConfig
    from minillm.model.gpt import GPT

    model = GPT(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert distributed.wrap_fsdp(model, distributed.Dist()) is model
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())  # nothing sharded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert distributed.fsdp_problem("adamw", 2) is None
    assert distributed.fsdp_problem("adamw", 2, torch.float16) is not None  # fp16 loss scaling is per shard


# ---------------------------------------------------------------- finetune under torchrun

FT = ["--device", "cpu", "--eval-batches", "2", "--log-every", "1", "--compile", "off", "--log-format", "json",
      "--num-workers", "0", "--warmup-steps", "2"]


def launch_finetune(nproc: int, base: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = ["finetune", "--ckpt", str(base), "--data", str(data), "-o", str(out), *FT, *extra]
    pre = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return subprocess.Popen([sys.executable, *pre, "-m", "minillm", *args], cwd=out.parent, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def ft_base(data, tmp_path_factory) -> Path:
    """A 2-step base run and an SFT JSONL file beside it."""
    d = tmp_path_factory.mktemp("ftbase")
    r = launch(1, data, d / "base", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--block-size", "48")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [{"instruction": f"suma {a} y {b}", "response": f"{a + b}"} for a in range(1, 7) for b in range(1, 7)]
    (d / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return d


def test_finetune_with_lora_under_torchrun_matches_one_process_with_the_same_global_batch(ft_base, data):
    """Fine-tuning shares train's run setup: under torchrun it trains data-parallel (LoRA adapters in DDP), rank 0
    alone writes the run and adapter.pt, and a resume with another number of processes is refused."""
    d = ft_base
    common = ["--lora-rank", "2", "--max-steps", "4", "--eval-every", "2", "--accumulation-steps", "2", "--lr", "1e-2"]
    one, two = both(launch_finetune(1, d / "base", data[1], d / "one", "--batch-size", "4", *common),
                    launch_finetune(2, d / "base", data[1], d / "two", "--batch-size", "2", *common))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert_same_run(d / "one", d / "two", one.stderr, two.stderr)
    assert [e.get("parallel") for e in events(two.stderr, "run")] == ["ddp"]
    assert json.loads((d / "two" / "config.json").read_text())["world_size"] == 2
    files = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.name != ".lock")  # noqa: E731
    assert files(d / "two") == files(d / "one") and "adapter.pt" in files(d / "two")
    a, b = (torch.load(d / r / "adapter.pt", weights_only=True)["tensors"] for r in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert "Traceback" not in two.stderr
    bad = launch_finetune(1, d / "base", data[1], d / "two", "--batch-size", "2", *common, "--resume")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 1 and "2 process(es), this one has 1" in err


def test_sft_under_torchrun_reads_each_ranks_share_of_the_examples(ft_base):
    """SFT rows under torchrun: the two ranks together read what one process with their global batch reads (the
    same steps, epochs and learning rates; the loss is each rank's mean over its own response tokens, so it is
    close to the one-process loss, not equal)."""
    d = ft_base
    common = ["--mode", "sft", "--max-steps", "3", "--eval-every", "3"]
    one, two = both(launch_finetune(1, d / "base", d / "sft.jsonl", d / "sft1", "--batch-size", "4", *common),
                    launch_finetune(2, d / "base", d / "sft.jsonl", d / "sft2", "--batch-size", "2", *common))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    s1, s2 = events(one.stderr, "step"), events(two.stderr, "step")
    assert [(e["step"], e["epoch"], e["lr"]) for e in s1] == [(e["step"], e["epoch"], e["lr"]) for e in s2] and s1
    assert all(abs(x["loss"] - y["loss"]) < 0.05 * x["loss"] for x, y in zip(s1, s2, strict=True))
    h1, h2 = history(d / "sft1"), history(d / "sft2")
    assert [(h["step"], h["tokens"]) for h in h1] == [(h["step"], h["tokens"]) for h in h2]
