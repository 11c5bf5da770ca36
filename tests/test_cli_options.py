"""The config flags of train and finetune are generated from the config dataclasses' field metadata
(minillm/cli/options.py): one declaration per field gives the flag, its help, which commands have it, and
the TOML key; a field added once shows up everywhere."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import typer
import typer.main

from minillm import config
from minillm.cli import app, options
from minillm.cli import train as cli_train
from minillm.config import FINETUNE, TOML_ONLY, ModelConfig, TrainConfig, flag_name
from minillm.errors import UsageError

# finetune's config flags before they were generated: the base run fixes the model's shape, and Muon's rate
FINETUNE_FIELDS = {
    "dropout", "gradient_checkpointing", "doc_masking", "batch_size", "accumulation_steps", "epochs", "max_steps",
    "max_time", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "optimizer",
    "eval_every", "eval_batches", "patience", "log_every", "precision", "compile", "device", "seed", "num_workers",
    "stride", "val_fraction",
}


def _params(command: str, cli=app) -> dict:
    """{parameter name: click parameter} of a command."""
    return {p.name: p for p in typer.main.get_command(cli).commands[command].params}


def _help(runner, command: str, cli=app) -> str:
    r = runner.invoke(cli, [command, "--help"], terminal_width=1000)
    assert r.exit_code == 0, r.output
    return " ".join(r.stdout.split())


def test_every_field_with_a_flag_has_exactly_one_in_train_and_finetune_its_subset():
    train, ft = _params("train"), _params("finetune")
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            flag = flag_name(f.name)
            assert (f.name in train) == (f.name not in TOML_ONLY), f.name
            assert (f.name in ft) == (f.name in FINETUNE_FIELDS), f.name
            for params in (train, ft):
                if f.name in params:
                    assert [o for o in params[f.name].opts if o.startswith("--")] == [flag], f.name
    assert "vocab_size" in TOML_ONLY and {"mlp", "norm", "rope_theta", "bias", "tie_embeddings", "qk_norm",
                                          "loss_chunk"} <= TOML_ONLY
    assert train["batch_size"].opts == ["--batch-size", "-b"] == ft["batch_size"].opts
    assert train["doc_masking"].secondary_opts == ["--no-doc-masking"]
    assert all(p.default is None for n, p in train.items() if n in {f.name for _, f in options.config_fields("train")})


def test_help_lines_come_from_the_metadata_with_finetunes_own_where_it_differs(runner):
    train, ft = _help(runner, "train"), _help(runner, "finetune")
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name not in TOML_ONLY:
                assert f.metadata["help"] in train, f.name
            if f.name in FINETUNE_FIELDS:
                assert f.metadata.get("finetune_help", f.metadata["help"]) in ft, f.name
            for choice in f.metadata.get("choices", ()):
                assert choice in f.metadata["help"], (f.name, choice)
    assert "Micro-batch size (default: the base run's)." in ft and "Micro-batch size (default" not in train
    # the keys without a flag are listed in train's help, with their TOML table
    for key in TOML_ONLY:
        assert f"[model] {key}" in train


def test_the_source_commands_take_few_parameters_and_typer_sees_every_flag():
    for fn, command in ((cli_train.train, "train"), (cli_train.finetune, "finetune")):
        own = inspect.signature(fn.__wrapped__).parameters
        assert len(own) <= 25 and "overrides" in own
        assert len(_params(command)) == len(own) - 1 + len(options.config_fields(command))


def test_generated_flags_reach_the_resolved_config(runner, tmp_path, corpus, tokenizer_path):
    base = ["train", "-t", str(tokenizer_path), "-c", str(corpus), "-o", str(tmp_path / "run"), "--dry-run"]
    r = runner.invoke(app, [*base, "-b", "7", "--max-time", "2m", "--no-gradient-checkpointing", "--doc-masking",
                            "--attention", "math", "--n-layer", "3", "--lr", "0.01"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["train"]["batch_size"], rep["train"]["max_time"], rep["train"]["doc_masking"], rep["train"]["lr"]) == \
        (7, 120.0, True, 0.01)
    assert (rep["train"]["epochs"], rep["train"]["max_steps"]) == (0.0, 0)  # a time budget alone sets the length
    assert (rep["model"]["gradient_checkpointing"], rep["model"]["attention"], rep["model"]["n_layer"]) == \
        (False, "math", 3)
    r = runner.invoke(app, [*base, "--max-time", "90", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["train"]
    assert (rep["max_time"], rep["epochs"], rep["max_steps"]) == (90.0, 2.0, config.PRESETS["tiny"]["train"]["max_steps"])
    r = runner.invoke(app, [*base, "--max-time", "soon"])
    assert r.exit_code == 2 and "--max-time: cannot read 'soon'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_finetune_hands_model_and_training_flags_apart_and_refuses_the_model_shape(runner, tmp_path, corpus,
                                                                                   monkeypatch):
    seen = {}

    def fake_finetune(fs, model_over, train_over):
        seen.update(model=model_over, train=train_over, mode=fs.mode)
        return {"steps": 0}

    monkeypatch.setattr("minillm.train.finetune.finetune", fake_finetune)
    args = ["finetune", "--ckpt", str(tmp_path / "base"), "--data", str(corpus), "-o", str(tmp_path / "ft")]
    r = runner.invoke(app, [*args, "--dropout", "0.2", "--doc-masking", "-b", "4", "--max-time", "1h30m",
                            "--lr", "0.01", "--no-gradient-checkpointing"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"steps": 0}
    assert seen["model"] == {"dropout": 0.2, "gradient_checkpointing": False}
    assert seen["train"] == {"doc_masking": True, "batch_size": 4, "max_time": 5400.0, "lr": 0.01}
    for flag in ("--n-layer", "--block-size", "--attention", "--loss-kernel", "--muon-lr"):
        r = runner.invoke(app, [*args, flag, "1"])
        assert r.exit_code == 2 and "No such option" in r.stderr, flag


def test_a_field_declared_once_becomes_a_flag_its_help_and_a_toml_key(runner, tmp_path, monkeypatch):
    """A new TrainConfig field, a new model-shape field and a new TOML-only field, each declared once."""

    @dataclasses.dataclass(frozen=True)
    class Model2(ModelConfig):
        n_expert: int = config._m(0, "Experts per MLP layer (0 = a dense MLP).")
        router: str = config._m("topk", "How tokens pick experts: topk or hash.", ("topk", "hash"), cli=())

    @dataclasses.dataclass(frozen=True)
    class Train2(TrainConfig):
        warmup_shape: str = config._f("linear", "Shape of the warmup: linear or cosine.", ("linear", "cosine"))

    for module in (config, options):
        monkeypatch.setattr(module, "ModelConfig", Model2)
        monkeypatch.setattr(module, "TrainConfig", Train2)
    seen = {}

    def command(name: str = typer.Option("x", "--name"), overrides: dict = options.GENERATED) -> None:
        seen.update(overrides)

    cli = typer.Typer(rich_markup_mode=None)
    cli.command("train", epilog=options.toml_only_help())(options.config_flags("train")(command))
    cli.command("finetune")(options.config_flags(FINETUNE)(command))
    train, ft = _help(runner, "train", cli), _help(runner, "finetune", cli)
    assert "--warmup-shape linear|cosine Shape of the warmup: linear or cosine." in train
    assert "--warmup-shape linear|cosine Shape of the warmup: linear or cosine." in ft
    assert "--n-expert INTEGER Experts per MLP layer (0 = a dense MLP)." in train and "--n-expert" not in ft
    assert "--router" not in train and "[model] router How tokens pick experts: topk or hash." in train
    r = runner.invoke(cli, ["train", "--warmup-shape", "cosine", "--n-expert", "2", "--lr", "0.5"])
    assert r.exit_code == 0, r.output
    assert seen == {"warmup_shape": "cosine", "n_expert": 2, "lr": 0.5}

    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[model]\nrouter = "hash"\nn_expert = 4\n[train]\nwarmup_shape = "cosine"\n')
    m, t = config.resolve(str(toml), seen)
    assert (m.router, m.n_expert, t.warmup_shape, t.lr) == ("hash", 2, "cosine", 0.5)
    with pytest.raises(UsageError, match="'sine' is not one of linear, cosine"):
        config.resolve("tiny", {"warmup_shape": "sine"})


def test_help_imports_no_torch():
    code = "import sys; from minillm.cli import app; app(['train', '--help'], standalone_mode=False); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
