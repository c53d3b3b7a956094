"""The `ssb-fast` command line: a thin typer layer over the library."""

from __future__ import annotations

from ssb_fast.cli import (
    bench,  # noqa: F401  (registers the `bench` commands)
    data,  # noqa: F401  (registers the `data` commands)
    evaluate,  # noqa: F401  (registers the command)
    info,  # noqa: F401  (registers the command)
    sample,  # noqa: F401  (registers the command)
    train,  # noqa: F401  (registers the command)
)
from ssb_fast.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
