"""The typer application `ssb-fast` and what every command shares: exit codes, errors, JSON output."""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from typing import Annotated, NoReturn

import typer

app = typer.Typer(
    name="ssb-fast",
    help=(
        "Sample hundreds of plausible lesion masks per scan with the Segmentation Schrödinger Bridge "
        "(SSB / SSB++), measure how right and how diverse they are, and see where the GPU time goes."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from ssb_fast import __version__

        typer.echo(f"ssb-fast {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Sample hundreds of plausible lesion masks per scan with the Segmentation Schrödinger Bridge."""


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1
    BAD_ARGUMENTS = 2
    BAD_DATA = 3
    BAD_CHECKPOINT = 4


def fail(message: str, code: ExitCode = ExitCode.RUNTIME) -> NoReturn:
    """Print `error: message` on stderr and exit with `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(int(code))


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
DeviceOption = Annotated[
    str,
    typer.Option("--device", metavar="DEVICE", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N.",
                 show_default=True),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option("--threads", metavar="N", min=0,
                 help="CPU threads for torch [default: half the usable cores, at least 1, which suits shared "
                      "machines; 0 = torch's own choice]."),
]
