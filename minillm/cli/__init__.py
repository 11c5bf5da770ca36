"""The ``minillm`` command line: thin commands that resolve options, call the library and print.

Results go to stdout (``--json`` where offered), logs and progress to stderr. Library errors
(``MiniLLMError``) print one red line to stderr and exit 1; usage errors exit 2. ``--debug`` shows
tracebacks. The commands live in data.py, train.py and infer.py; this module registers each of them with
``handle_errors`` (the one place errors are handled). torch is imported inside commands so ``minillm --help``
stays instant.
"""

import contextlib
import functools
import signal

import typer

from minillm import __version__
from minillm.cli import data, infer, train
from minillm.cli.options import readable_metavars, toml_only_help
from minillm.errors import MiniLLMError
from minillm.io import written_count, written_since

app = typer.Typer(
    name="minillm",
    help="Train small transformer language models from scratch on your own text.\n\n"
    "Pipeline: prepare-corpus -> analyze-corpus -> init-tokenizer -> train -> generate / evaluate.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

_DEBUG = {"on": False}


def _err(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {msg}", markup=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a command unwinds as on Ctrl-C: files being written are
    removed (``atomic_open``), worker processes stopped, and it exits 143."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds():
    """Handle SIGTERM like Ctrl-C while a command runs (train and finetune install their own handlers inside)."""
    try:
        old = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def handle_errors(fn):
    """Turn library errors into a one-line message and an exit code (traceback only with --debug); SIGINT and
    SIGTERM end a command with one line and exit 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = written_count()
        try:
            with _sigterm_unwinds():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MiniLLMError as e:
            if _DEBUG["on"]:
                raise
            _err(str(e).replace("[", r"\["))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)
            done = ", ".join(map(str, written_since(before))).replace("[", r"\[")
            _err(f"interrupted ({name}) after {done} had been written in full; no partial output was left" if done
                 else f"interrupted ({name}); no partial output was left, and files from before are unchanged")
            raise typer.Exit(code) from None
        except OSError as e:  # a file the library did not expect to fail: name it and the likely fix
            if _DEBUG["on"] or not e.filename:
                raise
            fix = "check its permissions" if isinstance(e, PermissionError) else "check the path and the disk"
            _err(f"{e.filename}: {e.strerror or e}; {fix}".replace("[", r"\["))
            raise typer.Exit(1) from None
        except Exception as e:  # an unexpected failure: say what, not a traceback
            if _DEBUG["on"]:
                raise
            if _is_oom(e):
                _err(_oom_message())
            else:
                _err(f"{type(e).__name__}: {str(e)[:300]}".replace("[", r"\[") + "  (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def _is_oom(e: Exception) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _oom_message() -> str:
    return ("CUDA out of memory: halve --batch-size and double --accumulation-steps to keep the same batch "
            "(e.g. --batch-size 16 --accumulation-steps 2), or add --gradient-checkpointing; "
            "the last checkpoint in --outdir is intact")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minillm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _DEBUG["on"] = debug


# The commands in the order --help lists them, each with its errors handled by handle_errors and readable
# metavars in its --help.
for _command, _settings in (
    (data.prepare_corpus, {}), (data.analyze_corpus, {}), (data.plan, {}), (data.init_tokenizer, {}),
    (train.train, {"epilog": toml_only_help()}), (infer.generate, {}), (infer.evaluate, {}),
    (train.finetune, {}), (infer.merge, {}), (infer.export, {}),
):
    app.command(**_settings)(handle_errors(readable_metavars(_command)))


def main() -> None:
    app()
