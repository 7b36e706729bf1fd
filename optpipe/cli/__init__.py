"""Command line: argument parsing and printing only; every command calls the public API."""

from optpipe.cli.main import main

__all__ = ["main"]
