"""`pcache synth`: write a synthetic multi-centre chest X-ray cohort (phantoms, no patient data) and its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.table import Table

from prognosis_cache.cli._app import app, console, out, user_errors
from prognosis_cache.data.synthetic import CohortSpec, make_cohort

SYNTH_HELP = (
    "Generate a synthetic chest X-ray cohort: phantom radiographs and a manifest, no real patient data.\n\n"
    "Why: the demo, the tests and benchmarks need a cohort with the awkward parts of real data (several images "
    "per patient, class imbalance, several centres, DICOM quirks) that anyone can make offline in seconds.\n\n"
    "What: each patient gets --images-min..--images-max phantom radiographs (body, lungs, ribs, heart, spine, "
    "noise). Positive patients (outcome = 1, share --prevalence) get lung opacities whose strength is --signal × "
    "their severity, so a probe has something real to find; with --signal 0 it must find nothing.\n\n"
    "Centres differ the way hospitals do: contrast, gamma, noise, 8- vs 16-bit PNG, MONOCHROME1 vs MONOCHROME2 "
    "DICOM, rescale slope/intercept, VOI windows, RLE compression.\n\n"
    "Output: DIR/images/<center>/<image_id>.png|.dcm and DIR/manifest.csv (image_id, path, patient_id, center, "
    "outcome, severity with ~5% unknown), ready for `pcache embed --manifest DIR/manifest.csv`. The same options "
    "always give byte-identical files."
)


@app.command(help=SYNTH_HELP)
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write images/ and manifest.csv into.")],
    n_patients: Annotated[int, typer.Option(min=1, help="Number of synthetic patients.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed: the same options give byte-identical files.")] = 0,
    prevalence: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of positive patients.")] = 0.25,
    images_min: Annotated[int, typer.Option(min=1, help="Fewest images per patient.")] = 1,
    images_max: Annotated[int, typer.Option(min=1, help="Most images per patient.")] = 3,
    centers: Annotated[int, typer.Option(min=1, max=26, help="Number of acquisition centres.")] = 2,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 256,
    dicom_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of images written as DICOM "
                                                                      "(the rest as PNG).")] = 0.5,
    signal: Annotated[float, typer.Option(min=0.0, help="Strength of the outcome-related lung opacities; "
                                                        "0 makes the labels pure noise.")] = 1.0,
) -> None:
    """Generate a synthetic chest X-ray cohort (see SYNTH_HELP: the text `--help` shows)."""
    spec = CohortSpec(n_patients=n_patients, seed=seed, prevalence=prevalence,
                      images_per_patient=(images_min, images_max), n_centers=centers, size=size,
                      dicom_share=dicom_share, signal=signal)
    manifest = make_cohort(out_dir, spec, progress=True)
    out.print(str(manifest), highlight=False, soft_wrap=True)
    console.print(summary_table(pl.read_csv(manifest)))


def summary_table(manifest: pl.DataFrame) -> Table:
    """Images, patients and positive patients per centre, with a total row."""
    patients = manifest.unique("patient_id")
    per_center = (
        manifest.group_by("center").agg(pl.len().alias("images"), pl.col("path").str.ends_with(".dcm").sum()
                                        .alias("dicom"))
        .join(patients.group_by("center").agg(pl.len().alias("patients"), pl.col("outcome").sum()
                                              .alias("positives")), on="center")
        .sort("center")
    )
    table = Table(title="synthetic cohort")
    for col in ("center", "images", "DICOM", "patients", "positive patients"):
        table.add_column(col, justify="left" if col == "center" else "right")
    for r in per_center.iter_rows(named=True):
        table.add_row(r["center"], str(r["images"]), str(r["dicom"]), str(r["patients"]), str(r["positives"]))
    table.add_row("total", str(manifest.height), str(int(per_center["dicom"].sum())), str(patients.height),
                  str(int(patients["outcome"].sum())), style="bold")
    return table
