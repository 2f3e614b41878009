"""The typer app every `pcache` sub-command registers on, and the one place user errors become exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from prognosis_cache.errors import PcacheError

app = typer.Typer(
    name="pcache",
    help=(
        "prognosis-cache: embed every image once per frozen backbone into a fingerprinted HDF5 cache, then answer "
        "linear-probe and few-shot questions from the cache in seconds.\n\n"
        "Typical session:  pcache synth --out cohort  →  pcache embed --manifest cohort/manifest.csv "
        "--backbone dinov2-small  →  pcache probe cache/<file>.h5 --task outcome"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts show literal [brackets] (defaults, optional parts), not markup
)
console = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a PcacheError into a red message and its exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PcacheError as exc:
            console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            if exc.hint:
                console.print(f"  [yellow]→ {exc.hint}[/]", highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
