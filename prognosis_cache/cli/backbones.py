"""`pcache backbones`: what can be embedded with, at which size, and whether its weights are already here."""

from __future__ import annotations

import typer
from rich.table import Table

from prognosis_cache.backbones import PEFT_METHODS, REGISTRY, weights_available
from prognosis_cache.cli._app import app, out, user_errors


def backbone_table(include_tiny: bool) -> Table:
    """One row per registry entry (tiny test entries only on request)."""
    table = Table(title="backbones", show_lines=False)
    table.add_column("name", no_wrap=True)
    for column in ("family", "source", "dim", "input", "feature", "PEFT", "weights here"):
        table.add_column(column, overflow="fold")
    for spec in REGISTRY.values():
        if spec.tiny and not include_tiny:
            continue
        peft = ", ".join(m for m in PEFT_METHODS if m in spec.peft and not spec.peft[m].refusal)
        pre = spec.preprocess
        present = "n/a (test entry)" if spec.tiny else ("yes" if weights_available(spec) else "no")
        table.add_row(
            spec.name,
            spec.family,
            spec.source or "-",
            str(spec.dim),
            f"{pre.crop}px ({pre.interpolation} resize {pre.resize})",
            spec.feature,
            peft,
            present,
        )
    return table


@app.command("backbones")
@user_errors
def backbones(
    show_all: bool = typer.Option(False, "--all", help="Also list the tiny test entries."),
) -> None:
    """List the registered backbones: family, weights source, feature dim, input size, feature, PEFT, weights."""
    out.print(backbone_table(show_all))
