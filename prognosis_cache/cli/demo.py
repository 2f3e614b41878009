"""`pcache demo`: the whole path on a built-in synthetic cohort — synth → embed → probe → table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.panel import Panel
from rich.table import Table

from prognosis_cache.backbones import build_backbone, get_spec, weights_available
from prognosis_cache.cache.h5 import read_cache
from prognosis_cache.cli._app import app, console, out, user_errors
from prognosis_cache.cli.embed import print_report, progress_bar
from prognosis_cache.cli.probe import render
from prognosis_cache.data.synthetic import CohortSpec, make_cohort
from prognosis_cache.embed import embed_manifest
from prognosis_cache.evaluate.probe import binary_labels, run_probe
from prognosis_cache.results import write

RANDOM_BANNER = (
    "No real weights for {name} were found locally, so this demo runs the REAL ARCHITECTURE WITH RANDOM WEIGHTS.\n"
    "The numbers below say nothing about the model; they show the pipeline working end to end.\n"
    "For real numbers: download the weights on a connected machine (huggingface-cli download {source}) "
    "or pass --weights PATH."
)


@app.command()
@user_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the cohort, cache and results.")]
    = Path("demo-out"),
    backbone: Annotated[str, typer.Option(help="Registry entry to embed with.")] = "dinov2-small",
    weights: Annotated[str | None, typer.Option(help="Weights (default: real if present locally, else random:0).")]
    = None,
    n_patients: Annotated[int, typer.Option(min=20, help="Synthetic patients (1-3 images each).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the cohort and the folds.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Run the main job on a synthetic cohort (~400 images, 2 centres, ~1:3 imbalance) in a few minutes on a laptop.

    Writes DIR/cohort (PNG + DICOM phantoms and manifest.csv), DIR/cache/*.h5 and DIR/results.parquet, then prints
    MCC / PR-AUC / ROC-AUC per fold as mean ± std of a 5-fold patient-grouped logistic probe on `outcome`.
    """
    spec = get_spec(backbone)
    if weights is None and not weights_available(spec):
        weights = "random:0"
        console.print(Panel(RANDOM_BANNER.format(name=spec.name, source=spec.source), title="RANDOM WEIGHTS",
                            border_style="bold red"))
    console.print(f"[bold]1/3[/] synthesising {n_patients} patients into {out_dir / 'cohort'}")
    manifest = make_cohort(out_dir / "cohort", CohortSpec(n_patients=n_patients, seed=seed, n_centers=2,
                                                          prevalence=0.25), progress=True)
    console.print(f"[bold]2/3[/] embedding with {spec.name}")
    loaded = build_backbone(spec.name, weights)
    with progress_bar() as bar:
        task = bar.add_task(f"embed {spec.name}", total=None, rate="")
        report = embed_manifest(manifest, spec.name, loaded=loaded, cache_root=out_dir / "cache",
                                batch_size=batch_size, on_start=lambda n: bar.update(task, total=n),
                                on_batch=lambda n: bar.update(task, advance=n))
    print_report(report)
    console.print("[bold]3/3[/] 5-fold patient-grouped logistic probe on `outcome` (C by inner CV)")
    predictions: list = []
    rows = run_probe([report.path], task="outcome", regime="full", solvers=("logreg",), cv="5", seed=seed,
                     predictions=predictions)
    write(rows, out_dir / "results.parquet", append=False)
    cache = read_cache(report.path)
    per_fold = Table(title="per fold (test side)")
    for col in ("fold", "n_train", "n_test", "mcc", "pr_auc", "roc_auc", "balanced_accuracy", "f1"):
        per_fold.add_column(col, justify="right")
    for row in rows.sort("fold").iter_rows(named=True):
        per_fold.add_row(str(row["fold"]), str(row["n_train"]), str(row["n_test"]),
                         *(f"{row[m]:.3f}" for m in ("mcc", "pr_auc", "roc_auc", "balanced_accuracy", "f1")))
    out.print(per_fold)
    render(rows, predictions, binary_labels(cache, "outcome"), np.asarray(cache.patient_id, dtype=str))
    console.print(f"results: {out_dir / 'results.parquet'} ({rows.height} rows, one per fold). Next: "
                  f"pcache probe {report.path} --task outcome --regime few-shot --solver logreg,ridge,prototype,knn")
