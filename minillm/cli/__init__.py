"""The command line: see docs/ARCHITECTURE.md."""

from minillm.cli.commands import app, main

__all__ = ["app", "main"]
