"""Integrity of what minillm reads back (issue 18): a checksum of the tensors in every checkpoint, adapter and
export, verified on load (bytes flipped inside tensor data are refused, naming the file and what to use
instead); messages name the flag of the command that reads the file; a checkpoint's config is bounded by its
own tensors before any model is built; the token cache is checked at every start and rebuilt, never trained
on, when it is damaged. Files written before the checksums (tests/fixtures/v_c624e6b) still load."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.cli import app
from minillm.config import ModelConfig, TrainConfig, to_dict
from minillm.errors import MiniLLMError
from minillm.io import sha256_file
from minillm.model.gpt import GPT
from minillm.model.load import load_model
from tests.conftest import events, make_corpus

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v_c624e6b"
TINY = ["--config", "tiny", "--block-size", "16", "--n-embd", "32", "--n-layer", "1", "--n-head", "2",
        "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2", "--device", "cpu", "--compile", "off",
        "--log-format", "json", "--log-every", "1"]
CFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)

pytestmark = pytest.mark.usefixtures("no_plots")


def cli(runner, *args: object):
    return runner.invoke(app, [str(a) for a in args])


def error_line(r, code: int = 1) -> str:
    """The one ``error:`` line of a clean failure (no traceback)."""
    assert r.exit_code == code, f"exit {r.exit_code}:\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A corpus, its tokenizer and a 4-step run (evaluated at steps 2 and 4)."""
    from typer.testing import CliRunner

    from minillm.corpus.read import iter_documents
    from minillm.tokenizer import save_tokenizer, train_tokenizer

    d = tmp_path_factory.mktemp("base")
    corpus = make_corpus(d / "corpus.txt")
    save_tokenizer(train_tokenizer(iter_documents(corpus), 300), d / "tok.json")
    r = CliRunner().invoke(app, ["train", "-t", str(d / "tok.json"), "-c", str(corpus), "-o", str(d / "run"), *TINY,
                                 "--max-steps", "4", "--eval-every", "2"])
    assert r.exit_code == 0, r.output
    return {"corpus": corpus, "tok": d / "tok.json", "run": d / "run"}


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A copy of the base run (its two checkpoints separate files, as after any copy)."""
    shutil.copytree(base["run"], tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------ flipping bytes inside tensor data


def zip_records(path: Path) -> dict[str, tuple[int, int]]:
    """``name -> (offset of the data in the file, size)`` of each stored (uncompressed) zip member."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            out[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return out


def flip_tensor_bytes(path: Path, n: int = 16) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor storage (a ``data/N`` member of the zip)."""
    records = {k: v for k, v in zip_records(path).items() if "/data/" in k and not k.endswith(".pkl")}
    offset, size = max(records.values(), key=lambda r: r[1])
    assert size > 2 * n
    data = bytearray(path.read_bytes())
    start = offset + size // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def flip_safetensors_bytes(path: Path, n: int = 16) -> None:
    """Flip ``n`` bytes in the middle of a safetensors file's tensor data (after its JSON header)."""
    data = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    start = header + (len(data) - header) // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def tiny_state(seed: int = 0) -> tuple[GPT, dict]:
    torch.manual_seed(seed)
    model = GPT(CFG)
    return model, {"model": model.state_dict(), "model_config": to_dict(CFG),
                   "optimizer": [{"state": {0: {"exp_avg": torch.randn(32, 32)}}, "param_groups": []}],
                   "rng": {"cpu": torch.get_rng_state()}}


def test_flipped_bytes_in_tensor_data_are_refused_naming_the_other_checkpoint(tmp_path):
    model, state = tiny_state()
    path = tmp_path / "ckpt_best.pt"
    save_checkpoint(path, state)
    save_checkpoint(tmp_path / "ckpt_last.pt", state)
    assert isinstance(load_checkpoint(path)["tensors_sha256"], str)
    flip_tensor_bytes(path)
    raw = torch.load(path, weights_only=True)  # torch itself reads it without complaint: the flip is in the data
    assert any(not torch.equal(raw["model"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(MiniLLMError, match=r"^--ckpt: .*ckpt_best\.pt is corrupted \(its tensors do not match the "
                                           r"checksum stored in it\); use the run's other checkpoint .*ckpt_last\.pt"):
        load_checkpoint(path)
    with pytest.raises(MiniLLMError, match="ckpt_best.pt is corrupted"):
        load_model(path)


def test_a_damaged_checkpoint_without_another_one_says_so(tmp_path):
    _, state = tiny_state()
    path = tmp_path / "ckpt_last.pt"
    save_checkpoint(path, state)
    os.link(path, tmp_path / "ckpt_best.pt")  # the last evaluation was the best: one file under two names
    flip_tensor_bytes(path)
    with pytest.raises(MiniLLMError, match=r"ckpt_last\.pt is corrupted .*no other checkpoint"):
        load_checkpoint(path)


def test_generate_refuses_a_checkpoint_with_flipped_tensor_bytes(runner, run):
    flip_tensor_bytes(run / "ckpt_best.pt")
    err = error_line(cli(runner, "generate", "--ckpt", run, "-p", "el", "--max-tokens", "2", "--device", "cpu"))
    assert "--ckpt: " in err and "ckpt_best.pt is corrupted" in err and "ckpt_last.pt" in err, err


def test_checkpoints_without_a_checksum_still_load():
    for name in ("run/ckpt_best.pt", "run/ckpt_last.pt", "lora/ckpt_last.pt"):
        state = load_checkpoint(FIXTURE / name)
        assert "tensors_sha256" not in state and state["model"]


def test_the_checksum_covers_every_tensor_and_costs_little(tmp_path):
    """A tensor of the optimizer state or the RNG counts too; and hashing 200 MB takes well under the save."""
    import time

    from minillm.checkpoint import tensors_sha256

    _, state = tiny_state()
    digest = tensors_sha256(state)
    for change in (lambda s: s["optimizer"][0]["state"][0]["exp_avg"].add_(1e-3),
                   lambda s: s["rng"]["cpu"].__setitem__(5, 255 - int(s["rng"]["cpu"][5]))):
        _, st = tiny_state()
        change(st)
        assert tensors_sha256(st) != digest
    big = {"model": {f"w{i}": torch.ones(1024, 1024) for i in range(50)}}  # 200 MB
    t0 = time.perf_counter()
    tensors_sha256(big)
    assert time.perf_counter() - t0 < 5.0


# ------------------------------------------------------------------ adapters and exports


def test_an_adapter_with_flipped_tensor_bytes_is_refused(tmp_path):
    from minillm import lora as L

    model, state = tiny_state()
    save_checkpoint(tmp_path / "base.pt", state)
    L.apply_lora(model, L.LoRAConfig(rank=4, alpha=8, targets=("q", "v")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_()
    ad = tmp_path / "adapter.pt"
    L.save_adapter(ad, model, L.LoRAConfig(rank=4, alpha=8, targets=("q", "v")), sha256_file(tmp_path / "base.pt"),
                   str(tmp_path / "base.pt"))
    assert L.load_adapter(ad)["tensors_sha256"]
    flip_tensor_bytes(ad)
    with pytest.raises(MiniLLMError, match=r"^--adapter: .*adapter\.pt is corrupted \(its tensors do not match"):
        L.load_adapter(ad)


def test_an_old_adapter_without_a_checksum_loads():
    from minillm import lora as L

    ad = L.load_adapter(FIXTURE / "lora" / "adapter.pt")
    assert "tensors_sha256" not in ad and ad["tensors"]


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_an_export_with_flipped_tensor_bytes_is_refused(tmp_path, tokenizer_path, fmt):
    pytest.importorskip("safetensors")
    from minillm.export import export
    from minillm.export.layout import WEIGHTS
    from minillm.model.load import load_exported

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tokenizer_path, run / "tokenizer.json")
    cfg = dataclasses_replace(CFG, vocab_size=320)
    torch.manual_seed(0)
    model = GPT(cfg)
    save_checkpoint(run / "ckpt_best.pt", {"model": model.state_dict(), "model_config": to_dict(cfg),
                                           "tokenizer_sha256": sha256_file(tokenizer_path)})
    out = tmp_path / ("hf" if fmt == "hf" else "w.safetensors")
    export(run, out, fmt)
    load_exported(out)  # intact: loads
    weights = out / WEIGHTS if fmt == "hf" else out
    flip_safetensors_bytes(weights)
    with pytest.raises(MiniLLMError, match=rf"^--ckpt: .*{weights.name} is corrupted \(its tensors do not match the "
                                           rf"checksum stored in it\); export it again"):
        load_exported(out)


def dataclasses_replace(cfg: ModelConfig, **kw) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_an_old_export_without_a_checksum_loads():
    pytest.importorskip("safetensors")
    from minillm.model.load import load_exported

    model, state = load_exported(FIXTURE / "hf")
    assert model.cfg.n_layer == 1


# ------------------------------------------------------------------ the flag in the message, and its advice


def test_resume_with_a_damaged_last_checkpoint_names_resume_and_the_way_out(runner, base, run):
    flip_tensor_bytes(run / "ckpt_last.pt")
    args = ["train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6", "--eval-every",
            "2", "--resume"]
    err = error_line(cli(runner, *args))
    assert err.startswith(f"error: --resume: {run / 'ckpt_last.pt'} is corrupted"), err
    assert "--ckpt" not in err and f"copy {run / 'ckpt_best.pt'} over it" in err and "new --outdir" in err, err
    best_step = load_checkpoint(run / "ckpt_best.pt")["run_state"]["step"]
    shutil.copy(run / "ckpt_best.pt", run / "ckpt_last.pt")  # the advice works
    r = cli(runner, *args)
    assert r.exit_code == 0, r.output
    assert any(e["event"].startswith(f"resuming at step {best_step}") for e in map(json.loads, (
        ln for ln in r.stderr.splitlines() if ln.startswith("{")))), r.stderr


def test_resume_when_both_checkpoints_are_one_damaged_file(runner, base, run):
    (run / "ckpt_best.pt").unlink()
    os.link(run / "ckpt_last.pt", run / "ckpt_best.pt")
    flip_tensor_bytes(run / "ckpt_last.pt")
    err = error_line(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps",
                         "6", "--resume"))
    assert err.startswith("error: --resume: ") and "start a new --outdir" in err and "copy" not in err, err


def test_finetune_names_the_flag_that_read_the_damaged_file(runner, base, run, tmp_path):
    data = make_corpus(tmp_path / "ft.txt", seed=3)
    flip_tensor_bytes(run / "ckpt_best.pt")
    err = error_line(cli(runner, "finetune", "--ckpt", run / "ckpt_best.pt", "--data", data, "-o", tmp_path / "ft",
                         "--max-steps", "2", "--device", "cpu", "--compile", "off"))
    assert err.startswith(f"error: --ckpt: {run / 'ckpt_best.pt'} is corrupted"), err
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").glob("ckpt_*.pt"))


# ------------------------------------------------------------------ a checkpoint's config is untrusted


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test (instead of allocating terabytes) if a model is built."""
    real = GPT.__init__

    def guarded(self, cfg):
        if cfg.n_layer > 100 or cfg.n_embd > 1024 or cfg.block_size > 1 << 20:
            raise AssertionError(f"a model of {cfg.n_layer} layers x {cfg.n_embd} (block {cfg.block_size}) was built")
        real(self, cfg)

    monkeypatch.setattr(GPT, "__init__", guarded)


def hostile_checkpoint(path: Path, **cfg) -> Path:
    """A 1 KB checkpoint: one small tensor, a config asking for a huge model."""
    config = {**to_dict(dataclasses_replace(CFG, vocab_size=16, n_layer=1, n_embd=8, n_head=2)), **cfg}
    save_checkpoint(path, {"model": {"tok_emb.weight": torch.zeros(16, 8)}, "model_config": config})
    assert path.stat().st_size < 4096
    return path


@pytest.mark.parametrize("cfg", [{"n_layer": 4000, "n_embd": 4096, "n_head": 32}, {"n_layer": 10**9},
                                 {"vocab_size": 10**12}, {"block_size": 10**10}, {"n_layer": 4000.5},
                                 {"n_embd": "4096"}],
                         ids=["4000x4096", "1e9-layers", "vocab", "block", "float-layers", "str-width"])
def test_a_config_larger_than_the_files_tensors_is_refused_before_building(tmp_path, no_model_built, cfg):
    path = hostile_checkpoint(tmp_path / "evil.pt", **cfg)
    with pytest.raises(MiniLLMError, match=rf"^--ckpt: {path}: its model config .* file|^--ckpt: {path}: .*config"):
        load_model(path)


def test_every_command_bounds_a_checkpoint_config(runner, base, tmp_path, no_model_built):
    pytest.importorskip("safetensors")
    path = hostile_checkpoint(tmp_path / "ckpt_best.pt", n_layer=4000, n_embd=4096, n_head=32)
    shutil.copy(base["tok"], tmp_path / "tokenizer.json")
    data = make_corpus(tmp_path / "ft.txt", seed=3)
    for args in (["generate", "--ckpt", path, "-p", "el", "--device", "cpu"],
                 ["evaluate", "--ckpt", path, "--test-file", base["corpus"], "--device", "cpu"],
                 ["export", "--ckpt", path, "-o", tmp_path / "ex"],
                 ["finetune", "--ckpt", path, "--data", data, "-o", tmp_path / "ft", "--device", "cpu"]):
        err = error_line(cli(runner, *args))
        assert f"--ckpt: {path}" in err and "model config" in err, (args[0], err)


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_an_export_whose_config_is_larger_than_its_tensors_is_refused(tmp_path, tokenizer_path, no_model_built, fmt):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    from minillm.export import export
    from minillm.export.layout import WEIGHTS
    from minillm.model.load import load_exported

    cfg = dataclasses_replace(CFG, vocab_size=320)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tokenizer_path, run / "tokenizer.json")
    save_checkpoint(run / "ckpt_best.pt", {"model": GPT(cfg).state_dict(), "model_config": to_dict(cfg)})
    out = tmp_path / ("hf" if fmt == "hf" else "w.safetensors")
    export(run, out, fmt)
    if fmt == "hf":
        c = json.loads((out / "config.json").read_text())
        c.update(num_hidden_layers=4000, hidden_size=4096, intermediate_size=10944, head_dim=128,
                     num_attention_heads=32, num_key_value_heads=32)
        (out / "config.json").write_text(json.dumps(c))
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        meta["model_config"] = json.dumps({**json.loads(meta["model_config"]), "n_layer": 4000, "n_embd": 4096})
        save_file(load_file(str(out)), str(out), metadata=meta)
    with pytest.raises(MiniLLMError, match=r"^--ckpt: .*model config .*larger than the tensors"):
        load_exported(out)
    assert (out / WEIGHTS).is_file() or out.is_file()


# ------------------------------------------------------------------ the token cache


def _prepare(base, cdir: Path, capsys) -> tuple[tuple, list[str]]:
    """The data prepared from ``cdir`` (fingerprinted), and the notes said on stderr meanwhile (but whether
    the cache was encoded or reused)."""
    from minillm.data import loader as ds
    capsys.readouterr()
    data = ds.prepare_data(base["tok"], ds.Mixture((base["corpus"],)), cdir, 16, TrainConfig(batch_size=4, eval_batches=2, seed=1))
    return _fingerprint(data), [ln.removeprefix("note: ") for ln in capsys.readouterr().err.splitlines()
                                if ln.startswith("note: ") and not ln.startswith(("note: encoding", "note: reusing"))]


def _fingerprint(data) -> tuple:
    src = data.loader.sources[0]
    return data.meta["train_tokens"], len(src.starts), bytes(np.asarray(src.tokens)), data.meta["n_docs"]


@pytest.fixture
def cache(base, tmp_path, capsys) -> tuple[Path, tuple]:
    cdir = tmp_path / "cache"
    good, notes = _prepare(base, cdir, capsys)
    assert notes == []
    return cdir, good


def _truncate_tokens(cdir: Path) -> None:
    size = (cdir / "tokens.bin").stat().st_size
    os.truncate(cdir / "tokens.bin", size // 4 * 2)  # half, and still whole uint16 tokens


def _truncate_train(cdir: Path) -> None:
    os.truncate(cdir / "train.bin", (cdir / "train.bin").stat().st_size // 2)


def _zero_tokens_in_meta(cdir: Path) -> None:
    meta = json.loads((cdir / "meta.json").read_text())
    (cdir / "meta.json").write_text(json.dumps({**meta, "n_tokens": 0}))


def _corrupt_tokens(cdir: Path) -> None:
    """8 tokens inside the longest document changed (no ``<|doc|>`` among them): the size stays right."""
    starts = np.load(cdir / "docs.npy")
    i = int(np.argmax(np.diff(starts)))
    at = 2 * int((starts[i] + starts[i + 1]) // 2)
    data = bytearray((cdir / "tokens.bin").read_bytes())
    data[at : at + 16] = bytes(b ^ 0x55 for b in data[at : at + 16])
    (cdir / "tokens.bin").write_bytes(bytes(data))
    for name in ("train.bin", "val.bin"):  # as on the first start after copying a damaged cache
        (cdir / name).unlink()


def _corrupt_and_resize(cdir: Path) -> None:
    data = (cdir / "tokens.bin").read_bytes()
    (cdir / "tokens.bin").write_bytes(bytes(b ^ 0x55 for b in data[:100]) + data[100:] + b"\x07\x00" * 10)


def _bad_docs(cdir: Path) -> None:
    starts = np.load(cdir / "docs.npy")
    starts[3] = starts[5]
    with open(cdir / "docs.npy", "wb") as f:
        np.save(f, starts)


def _bad_json(cdir: Path) -> None:
    (cdir / "meta.json").write_text((cdir / "meta.json").read_text()[:40])


DAMAGE = {"tokens-half": (_truncate_tokens, "tokens.bin"), "train-half": (_truncate_train, "train.bin"),
          "meta-0-tokens": (_zero_tokens_in_meta, "0 tokens"), "corrupt-bytes": (_corrupt_tokens, "checksum"),
          "corrupt-and-size": (_corrupt_and_resize, "tokens.bin"), "docs": (_bad_docs, "docs.npy"),
          "meta-json": (_bad_json, "meta.json")}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_token_cache_is_rebuilt_and_trains_on_all_the_data(base, cache, capsys, damage):
    cdir, good = cache
    damage[0](cdir)
    data, notes = _prepare(base, cdir, capsys)
    assert data == good
    assert len(notes) == 1 and f"token cache {cdir}" in notes[0] and damage[1] in notes[0], notes
    assert notes[0].endswith("rebuilding") or notes[0].endswith("rewriting"), notes
    assert _prepare(base, cdir, capsys) == (good, [])  # rebuilt once


def test_a_normal_start_does_not_hash_a_big_cache(base, cache, capsys, monkeypatch):
    from minillm.data import cache as ds
    cdir, good = cache
    assert {"tokens_sha256", "docs_sha256"} <= set(json.loads((cdir / "meta.json").read_text()))
    monkeypatch.setattr(ds, "VERIFY_BYTES", 0)  # every cache counts as big
    calls = []
    real = ds._digest_ok
    monkeypatch.setattr(ds, "_digest_ok", lambda *a: calls.append(a) or real(*a))
    assert _prepare(base, cdir, capsys) == (good, []) and calls == []
    _truncate_tokens(cdir)  # a size that looks wrong is still caught without hashing
    data, notes = _prepare(base, cdir, capsys)
    assert data == good and "tokens.bin" in notes[0] and calls == []


def test_train_on_a_damaged_cache_rebuilds_it_and_says_so(runner, base, run):
    windows = events(cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps",
                         "5", "--resume").stderr, "run")[0]["windows"]
    _truncate_tokens(run / "cache")
    (run / "cache" / "train.bin").unlink()
    r = cli(runner, "train", "-t", base["tok"], "-c", base["corpus"], "-o", run, *TINY, "--max-steps", "6",
            "--resume")
    assert r.exit_code == 0, r.output
    assert events(r.stderr, "run")[0]["windows"] == windows
    assert any(f"token cache {run / 'cache'} is damaged" in e["event"] for e in map(json.loads, (
        ln for ln in r.stderr.splitlines() if ln.startswith("{")))), r.stderr


def test_an_old_cache_is_rebuilt_once_with_a_message(runner, tmp_path, monkeypatch):
    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    old_tokens = Path("run/cache/tokens.bin").read_bytes()
    args = ["train", "-t", "run/tokenizer.json", "-c", "corpus.txt", "-o", "run", "--config", "fx.toml", "--resume",
            "--max-steps", "8"]
    r = cli(runner, *args)
    assert r.exit_code == 0, r.output
    assert "token cache run/cache was written by an earlier version" in r.stderr and "rebuilding" in r.stderr
    assert Path("run/cache/tokens.bin").read_bytes() == old_tokens  # the same tokens, now with a checksum
    r = cli(runner, *args[:-1], "9")
    assert r.exit_code == 0, r.output
    assert "rebuilding" not in r.stderr and "reusing the token cache run/cache" in r.stderr
