"""How a plan is shown and kept: the config TOML ``train --config`` runs unchanged, the ``init-tokenizer``
command for the vocabulary it recommends, and the table of choices with their reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minillm.plan.rules import Plan


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_toml(p: Plan, corpus: str = "") -> str:
    """The plan as a config file: ``preset`` and the ``[model]`` / ``[train]`` keys the plan sets."""
    lines = [f"# minillm plan: {p.device}, budget {p.budget_s:g} s{', corpus ' + corpus if corpus else ''}",
             f"# vocabulary {p.vocab_size:,}: train with a tokenizer of that size; expected "
             f"{p.bpb[1]} bits per byte ({p.bpb[0]}-{p.bpb[2]})",
             f'preset = "{p.preset}"', "", "[model]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in p.model.items()]
    lines += ["", "[train]"] + [f"{k} = {_toml_value(v)}" for k, v in p.train.items()]
    return "\n".join(lines) + "\n"


def tokenizer_command(p: Plan, corpus: Path) -> str:
    return f"minillm init-tokenizer --files {corpus} --vocab-size {p.vocab_size} --out tokenizer.json"


def train_command(p: Plan, corpus: Path, tokenizer: Path | None, config: Path | None) -> str:
    return (f"minillm train -t {tokenizer or 'tokenizer.json'} -c {corpus} -o runs/planned "
            f"--config {config or 'auto'} --max-time {p.budget_s:g}s")


def shape_text(p: Plan) -> str:
    m = p.model
    name = p.shape if p.shape != "custom" else f"custom ({p.preset}'s recipe)"
    return f"{name}: {m['n_layer']} layers x {m['n_embd']}, {m['n_head']} heads"


def render_table(p: Plan):
    """A rich Table: each choice, its value and its reason, then what the plan expects."""
    from rich.table import Table

    t = Table(title=f"plan: {p.device}, {p.budget_s:g} s")
    for col, just in (("choice", "left"), ("value", "right"), ("why", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    tr, m = p.train, p.model
    rows = [
        ("model", shape_text(p), "model"),
        ("vocabulary", f"{p.vocab_size:,}", "vocab_size"),
        ("block size", f"{m['block_size']}", "block_size"),
        ("stride", f"{tr['stride']}", "stride"),
        ("batch", f"{tr['batch_size']} x {tr['accumulation_steps']}", "batch_size"),
        ("optimizer", f"{tr.get('optimizer', 'adamw')}, lr {tr['lr']:g}", "optimizer"),
        ("dropout", f"{m['dropout']:g}", "dropout"),
        ("--max-time", f"{p.budget_s:g} s", "max_time"),
        ("--patience", f"{tr.get('patience', 0)}", "patience"),
    ]
    for name, value, key in rows:
        t.add_row(f"[bold]{name}[/bold]", value, p.reasons[key])
    t.add_section()
    for name, value in expectations(p):
        t.add_row(name, value, "")
    t.add_row("bits per byte", f"{p.bpb[1]} ({p.bpb[0]}-{p.bpb[2]})", p.reasons["expected"])
    return t


def expectations(p: Plan) -> list[tuple[str, str]]:
    return [("parameters", f"{p.params / 1e6:.2f}M ({p.params_non_embedding / 1e6:.2f}M without embeddings)"),
            ("memory", f"{p.memory_bytes / 2**30:.2f} GiB"),
            ("tokens/s", f"{p.tokens_per_s:,.0f}"),
            ("steps", f"{p.steps:,} in {p.train_s:.0f} s of training"),
            ("epochs", f"{p.epochs:g} ({p.windows:,} windows each)")]


def plan_lines(d: dict[str, Any]) -> list[str]:
    """The plan (``Plan.to_dict()``, as config.json keeps it) as lines for the start of a run."""
    m, tr, why = d["model"], d["train"], d["reasons"]
    return [f"plan ({d['device']}, {d['budget_s']:g} s): {d['shape']} {m['n_layer']} x {m['n_embd']}, "
            f"vocabulary {d['vocab_size']:,}, block {m['block_size']}, stride {tr['stride']}, batch {tr['batch_size']} x "
            f"{tr['accumulation_steps']}, {tr.get('optimizer', 'adamw')}, dropout {m['dropout']:g}",
            f"plan: expects {d['params'] / 1e6:.2f}M parameters, {d['memory_bytes'] / 2**30:.2f} GiB, {d['steps']:,} steps, "
            f"{d['epochs']:g} epochs, {d['bpb'][1]} bits per byte ({d['bpb'][0]}-{d['bpb'][2]})",
            *(f"plan: {k}: {v}" for k, v in why.items())]
