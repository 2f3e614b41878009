"""`pcache backbones`: what can be embedded with, at which size, and whether its weights are already here."""

from __future__ import annotations

import typer
from rich.table import Table

from prognosis_cache.backbones import PEFT_METHODS, REGISTRY, weights_available
from prognosis_cache.cli._app import app, out, user_errors


def backbone_table(include_tiny: bool, wide: bool = False) -> Table:
    """One row per registry entry (tiny test entries only on request); the long feature text only with `wide`."""
    table = Table(title="backbones", show_lines=wide)
    table.add_column("name", no_wrap=True)
    columns = ("family", "source", "dim", "input", "feature", "PEFT", "weights here") if wide else (
        "family", "dim", "input", "PEFT", "weights here")
    for column in columns:
        table.add_column(column, overflow="fold")
    for spec in REGISTRY.values():
        if spec.tiny and not include_tiny:
            continue
        peft = ", ".join(m for m in PEFT_METHODS if m in spec.peft and not spec.peft[m].refusal)
        pre = spec.preprocess
        present = "n/a (test entry)" if spec.tiny else ("yes" if weights_available(spec) else "no")
        cells = {"family": spec.family, "source": spec.source or "-", "dim": str(spec.dim),
                 "input": f"{pre.crop}px", "feature": spec.feature, "PEFT": peft, "weights here": present}
        if wide:
            cells["input"] = f"{pre.crop}px ({pre.interpolation} resize {pre.resize})"
        table.add_row(spec.name, *(cells[c] for c in columns))
    return table


@app.command("backbones")
@user_errors
def backbones(
    show_all: bool = typer.Option(False, "--all", help="Also list the tiny test entries."),
    wide: bool = typer.Option(False, "--wide", help="Also show the weights source and which feature is taken."),
) -> None:
    """List the registered backbones: family, feature dim, input size, PEFT methods, weights present locally.

    `--wide` adds the weights source (HF hub id / open_clip tag / torchvision enum) and the exact feature taken
    (layer, token or pooling, pre/post projection).
    """
    out.print(backbone_table(show_all, wide))
