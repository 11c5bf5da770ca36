"""docs/ARCHITECTURE.md's rules, checked on the source: which module may import which (imports inside
functions count), no import cycle, no module over 500 lines, no function over 25 parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "minillm"

# A module may import modules of a lower level; within its own package, of the same level or lower.
# The levels are the dependency table of docs/ARCHITECTURE.md, most specific prefix first.
LEVELS = [
    ("minillm.errors", 0), ("minillm.config", 1), ("minillm.io", 1),
    ("minillm.corpus", 2), ("minillm.tokenizer", 3), ("minillm.data", 4),
    ("minillm.model.load", 8), ("minillm.model", 5), ("minillm.optim", 5), ("minillm.distributed", 5),
    ("minillm.checkpoint", 6), ("minillm.plan", 6), ("minillm.export.layout", 7),
    ("minillm.lora", 9), ("minillm.generation", 9), ("minillm.evaluation", 9),
    ("minillm.export", 10), ("minillm.train", 11), ("minillm.cli", 12), ("minillm", 12),
]
EXCEPTIONS = {("minillm.corpus.stats", "minillm.data.windows")}  # analyze-corpus counts windows by the loader's rule


def level(mod: str) -> int:
    return next(n for prefix, n in LEVELS if mod == prefix or mod.startswith(prefix + "."))


def package(mod: str) -> str | None:
    """The subpackage a module belongs to (``minillm.train`` for ``minillm.train.loop`` and for the package
    itself), or None for a top-level module."""
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (PKG / parts[1]).is_dir() else None


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The minillm modules ``name`` imports, at any depth of the file."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                if target in mods and target != name:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in mods and a.name != name)
    return found


MODS = modules()
GRAPH = {name: imports(name, path, MODS) for name, path in MODS.items()}


@pytest.mark.parametrize("name", sorted(MODS))
def test_imports_follow_the_layers(name):
    bad = []
    for target in sorted(GRAPH[name]):
        if (name, target) in EXCEPTIONS or target == "minillm" or name in ("minillm", "minillm.__main__"):
            continue
        same_pkg = package(name) is not None and package(name) == package(target)
        if not (level(target) < level(name) or (same_pkg and level(target) <= level(name))):
            bad.append(target)
    assert not bad, f"{name} (level {level(name)}) imports higher layers: {bad}"


# the planner: a pure function of corpus figures, device figures and a budget (no model, no training)
PLAN_MAY_IMPORT = ("minillm.errors", "minillm.config", "minillm.io", "minillm.corpus", "minillm.tokenizer",
                   "minillm.data.windows", "minillm.model.memory", "minillm.plan")


def test_the_planner_imports_only_statistics_and_costs():
    bad = {n: sorted(t for t in GRAPH[n] if not any(t == a or t.startswith(a + ".") for a in PLAN_MAY_IMPORT))
           for n in GRAPH if n.startswith("minillm.plan")}
    assert set(bad) >= {"minillm.plan.rules", "minillm.plan.devices"} and not any(bad.values()), bad


def test_no_import_cycle():
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for b in GRAPH[todo.pop()]:
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    loops = sorted({tuple(sorted((a, b))) for a in GRAPH for b in GRAPH[a] if a in reach(b)})
    assert not loops


def test_modules_and_functions_stay_small():
    long = [f"{n} ({len(p.read_text().splitlines())} lines)" for n, p in MODS.items()
            if len(p.read_text().splitlines()) > 500]
    wide = [f"{n}:{f.lineno} {f.name}" for n, p in MODS.items() for f in ast.walk(ast.parse(p.read_text()))
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            and len(f.args.args) + len(f.args.kwonlyargs) + len(f.args.posonlyargs) > 25]
    assert not long and not wide, (long, wide)


def test_the_rules_catch_a_wrong_import(tmp_path):
    """The checker itself: a model module importing the trainer is a violation."""
    src = tmp_path / "gpt.py"
    src.write_text("def f():\n    from minillm.train.run import train\n", encoding="utf-8")
    found = imports("minillm.model.gpt", src, MODS)
    assert found == {"minillm.train.run"} and level("minillm.train.run") > level("minillm.model.gpt")
