"""The config flags of ``train`` and ``finetune``, generated from the field metadata of ``ModelConfig`` and
``TrainConfig`` (minillm/config.py): flag, short flag, help, and which commands have it come from the field's
one declaration there. ``config_flags(command)`` puts one ``typer.Option`` per field in the command's
signature where its ``overrides`` parameter stands, and hands the command the flags given as one dict."""

import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from minillm.config import FINETUNE, ModelConfig, TrainConfig, flag_name, key_name, parse_duration

GENERATED: Any = None  # the default of a command's ``overrides`` parameter: ``config_flags`` replaces it
METAVARS = {Path: "PATH", int: "INTEGER", float: "NUMBER", str: "TEXT"}


def metavar(annotation: Any, choices: tuple[str, ...] = (), duration: bool = False) -> str | None:
    """The word ``--help`` shows for an option's value: ``PATH``, ``INTEGER``, ``NUMBER``, ``TEXT``, ``DURATION``
    or the choices (``adamw|muon``), for the value type of ``annotation`` (``Optional`` and ``list`` unwrapped:
    a repeatable option names one value); None for a flag (bool) or a type without a word."""
    while typing.get_origin(annotation) in (typing.Union, list, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if choices:
        return "|".join(choices)
    return "DURATION" if duration else METAVARS.get(annotation)


def readable_metavars(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give each option of the command ``fn`` that has none a readable metavar (``metavar``), in place: typer's
    own are Python types (``<list[Path]>``)."""
    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        if isinstance(p.default, typer.models.OptionInfo) and p.default.metavar is None:
            p.default.metavar = metavar(hints.get(p.name, p.annotation))
    return fn


def config_fields(command: str) -> list[tuple[type, dataclasses.Field]]:
    """(class, field) of ``ModelConfig`` then ``TrainConfig`` (declaration order) for each flag ``command`` has."""
    return [(cls, f) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)
            if command in f.metadata["cli"]]


def _parameter(cls: type, f: dataclasses.Field, command: str) -> inspect.Parameter:
    """One parameter holding the field's ``typer.Option``, default None (the preset's or the base run's value).
    A duration is text on the command line (``90s``); every other flag takes the field's own type."""
    tp = str if f.metadata.get("duration") else typing.get_type_hints(cls)[f.name]
    flag = flag_name(f.name)
    decls = [f"{flag}/--no-{flag[2:]}" if tp is bool else flag, *([f.metadata["short"]] if "short" in f.metadata else [])]
    own_help = f.metadata.get("finetune_help") if command == FINETUNE else None
    return inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[tp],
                             default=typer.Option(None, *decls, help=own_help or f.metadata["help"],
                                                  metavar=metavar(tp, f.metadata.get("choices", ()),
                                                                  f.metadata.get("duration", False))))


def config_flags(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command whose ``overrides`` parameter stands for the config flags of ``command``: Typer sees one
    option per field there; the command receives ``overrides``: {field: value} of the flags given (durations in
    seconds)."""
    fields = config_fields(command)
    names = {f.name for _, f in fields}
    durations = {f.name for _, f in fields if f.metadata.get("duration")}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig, hints = inspect.signature(fn), typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
        if clash := names & set(sig.parameters):
            raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} are also config flags")
        at = list(sig.parameters).index("overrides")
        params = own[:at] + [_parameter(cls, f, command) for cls, f in fields] + own[at + 1:]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {k: kwargs.pop(k) for k in names}
            overrides = {k: parse_duration(v) if k in durations else v for k, v in given.items() if v is not None}
            return fn(**kwargs, overrides=overrides)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def toml_only_help() -> str:
    """A help paragraph listing the keys a ``--config`` TOML file sets that have no flag, with their help."""
    rows = [textwrap.fill(f.metadata["help"], 78, initial_indent=f"  {key_name(f.name):<24}", subsequent_indent=" " * 26)
            for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls) if not f.metadata["cli"]]
    return "\b\nKeys without a flag (set them in a --config TOML file):\n" + "\n".join(rows)
