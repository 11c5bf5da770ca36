from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from minillm.config import PRESETS, ModelConfig, TrainConfig, parse_duration, resolve
from minillm.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_files_mirror_presets(name):
    assert resolve(name) == resolve(str(CONFIGS / f"{name}.toml"))


def _train_flag_help() -> dict[str, str]:
    """``train --help``'s text for each flag: its name, metavar (choices, where shown) and help line."""
    import click
    import typer.main

    from minillm.cli import app

    cmd = typer.main.get_command(app).commands["train"]
    ctx = click.Context(cmd)
    return {o: " ".join(rec) for p in cmd.params if (rec := p.get_help_record(ctx)) for o in p.opts}


def test_every_field_has_its_own_help_naming_its_choices():
    """A help line of its own per field (not a copy of another's), and a field with choices names each one in
    its help and in its ``train`` flag's help, so a choice added to the config shows where users look."""
    flags, seen = _train_flag_help(), {}
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            text, flag = f.metadata.get("help", ""), "--" + f.name.replace("_", "-")
            assert len(text.split()) >= 2, f"{cls.__name__}.{f.name} has no help line"
            assert seen.setdefault(text, f.name) == f.name, f"{f.name} repeats the help of {seen[text]}"
            for choice in f.metadata.get("choices", ()):
                assert re.search(rf"\b{re.escape(choice)}\b", text), f"{f.name}'s help omits {choice!r}"
                if flag in flags:
                    assert re.search(rf"\b{re.escape(choice)}\b", flags[flag]), f"train {flag} omits {choice!r}"
    assert {"--attention", "--precision", "--compile", "--optimizer", "--loss-kernel"} <= set(flags)


def test_precedence_preset_file_flags(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('preset = "small"\n[model]\nn_layer = 3\n[train]\nlr = 0.01\n')
    m, t = resolve(str(p), {"lr": 0.02})
    assert (m.n_layer, m.n_embd, t.lr) == (3, 256, 0.02)


def test_all_problems_in_one_message(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[model]\nn_embd = 100\nn_head = 3\nbogus = 1\n[train]\nlr = "fast"\n')
    with pytest.raises(UsageError) as e:
        resolve(str(p))
    msg = str(e.value)
    assert "bogus" in msg and "lr" in msg and "expected float" in msg


def test_divisibility_errors_name_keys():
    with pytest.raises(UsageError) as e:
        resolve("tiny", {"n_embd": 100, "n_head": 3})
    assert "n_embd" in str(e.value) and "n_head" in str(e.value)
    with pytest.raises(UsageError) as e:
        resolve("tiny", {"n_head": 4, "n_kv_head": 3})
    assert "n_kv_head" in str(e.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(UsageError) as e:
        resolve("huge")
    assert "small" in str(e.value)


def test_choices_checked():
    with pytest.raises(UsageError) as e:
        resolve("tiny", {"mlp": "relu"})
    assert "swiglu" in str(e.value)


@pytest.mark.parametrize("text,secs", [("90", 90), ("90s", 90), ("2m", 120), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400)])
def test_parse_duration(text, secs):
    assert parse_duration(text) == secs


def test_parse_duration_rejects_garbage():
    with pytest.raises(UsageError):
        parse_duration("soon")


def test_swiglu_hidden_keeps_8d2_params():
    m = ModelConfig(n_embd=384)
    assert m.mlp_hidden % 64 == 0 and abs(3 * m.mlp_hidden * 384 - 8 * 384**2) / (8 * 384**2) < 0.1
