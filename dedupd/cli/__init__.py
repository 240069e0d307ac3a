"""Command line: ``dedupd [--config PATH] COMMAND`` (parser and dispatch in cli.main, one
module per command family beside it, shared output in cli.output)."""

from dedupd.cli.main import main

__all__ = ["main"]
