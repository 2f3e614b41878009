"""`pcache embed` and `pcache cache info`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from prognosis_cache.cache.h5 import read_attrs, read_cache
from prognosis_cache.cli._app import app, console, user_errors
from prognosis_cache.cli._app import out as stdout
from prognosis_cache.data.manifest import load_manifest
from prognosis_cache.embed import DEFAULT_CACHE_ROOT, EmbedReport, embed_manifest

EXIT_CODES = """Exit codes: 0 every image embedded; 1 some images failed (the cache is written, failures are listed in
/failed and retried by the next run); 2 bad input (manifest, weights, cache mismatch); 3 stopped by --on-error fail
(finished batches are kept); 130 interrupted (finished batches are kept; re-run the same command to resume)."""


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=False)


def print_report(report: EmbedReport) -> None:
    console.print(f"[green]cache[/] {report.path}  (fingerprint {report.fingerprint[:12]})")
    console.print(f"{report.n_total} manifest rows: {report.n_new} embedded now, {report.n_reused} already cached"
                  + (f", {report.images_per_second:.1f} img/s" if report.n_new else ""))
    if report.failed:
        table = Table(title=f"{len(report.failed)} image(s) could not be embedded", title_style="bold red")
        for col in ("image_id", "path", "reason"):
            table.add_column(col, overflow="fold")
        for f in report.failed[:50]:
            table.add_row(f.image_id, f.path, f.reason)
        console.print(table)
        if len(report.failed) > 50:
            console.print(f"... and {len(report.failed) - 50} more: `pcache cache info {report.path} --failed`")


@app.command(epilog=EXIT_CODES)
@user_errors
def embed(
    manifest: Annotated[Path, typer.Option(
        help="CSV/Parquet manifest: image_id, path, patient_id, optional center, labels.")],
    backbone: Annotated[str, typer.Option(help="Registry entry (see `pcache backbones`).")] = "dinov2-small",
    weights: Annotated[str | None, typer.Option(
        help="Default: real weights from the local HF/torch cache. PATH: a local folder or weights file. "
             "random[:SEED]: the real architecture with random weights (smoke runs; numbers mean nothing).")] = None,
    root: Annotated[Path | None, typer.Option(help="Folder the manifest's relative paths start from "
                                                   "[default: the manifest's folder].")] = None,
    out: Annotated[Path | None, typer.Option(help="Cache file [default: CACHE_ROOT/<dataset>__<backbone>__<fp>.h5].")]
    = None,
    cache_root: Annotated[Path, typer.Option(help="Folder for default cache names.")] = DEFAULT_CACHE_ROOT,
    dataset: Annotated[str | None, typer.Option(help="Dataset name [default: the manifest's folder name].")] = None,
    device: Annotated[str, typer.Option(help="auto (GPU if present), cpu, cuda, cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Decoding worker processes (0 = in the main process).")] = 0,
    dtype: Annotated[str, typer.Option(help="Stored feature dtype: float16 or float32.")] = "float16",
    on_error: Annotated[str, typer.Option(help="record: list failing images and go on; fail: stop at the first.")]
    = "record",
) -> None:
    """Embed every image of a manifest once with a frozen backbone into a fingerprinted HDF5 cache.

    Re-running the same command resumes after a crash (nothing finished is recomputed) and appends rows that are new
    in the manifest. Unreadable images are recorded with the reason, never a crash.
    """
    loaded_manifest = load_manifest(manifest, root)
    if loaded_manifest.skipped_columns:
        console.print(f"[yellow]note:[/] columns {list(loaded_manifest.skipped_columns)} have too many distinct "
                      "values to be class labels; they are not stored")
    with progress_bar() as bar:
        task = bar.add_task(f"embed {backbone}", total=None, rate="")
        state = {"done": 0, "t0": 0.0}

        def on_start(n: int) -> None:
            bar.update(task, total=n)
            state["t0"] = time.perf_counter()

        def on_batch(n: int) -> None:
            state["done"] += n
            rate = state["done"] / max(time.perf_counter() - state["t0"], 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.1f} img/s")

        try:
            report = embed_manifest(loaded_manifest, backbone, weights=weights, out=out, cache_root=cache_root,
                                    dataset=dataset, device=device, batch_size=batch_size, workers=workers,
                                    dtype=dtype, on_error=on_error, on_start=on_start, on_batch=on_batch)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/] finished batches are kept; re-run the same command to resume")
            raise typer.Exit(130) from None
    print_report(report)
    stdout.print(str(report.path))
    raise typer.Exit(1 if report.failed else 0)


cache_app = typer.Typer(help="Inspect feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
@user_errors
def cache_info(
    file: Annotated[Path, typer.Argument(help="A .h5 cache written by `pcache embed`.")],
    failed: Annotated[bool, typer.Option("--failed", help="List every failed image.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print a cache's schema version, fingerprint, counts, labels and failures."""
    attrs = read_attrs(file)
    cache = read_cache(file, dtype="float16")
    info = {
        "file": str(file),
        "schema_version": attrs["schema_version"],
        "fingerprint": cache.fingerprint,
        "dataset": cache.dataset,
        "backbone": cache.backbone,
        "weights": cache.fingerprint_json.get("weights"),
        "dtype": attrs.get("dtype"),
        "precision": cache.fingerprint_json.get("precision"),
        "images": len(cache),
        "dim": int(cache.features.shape[1]),
        "patients": len(set(cache.patient_id.tolist())),
        "centers": sorted(set(cache.center.tolist())),
        "labels": {t: {"classes": cache.classes[t], "known": int((v == v).sum())} for t, v in cache.labels.items()},
        "failed": len(cache.failed),
        "complete": bool(attrs.get("complete")),
        "created": attrs.get("created"),
        "manifest_sha256": attrs.get("manifest_sha256"),
    }
    if as_json:
        stdout.print_json(json.dumps(info | {"failures": [vars(f) for f in cache.failed]}))
        return
    table = Table(show_header=False, title=str(file))
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        table.add_row(key, str(value))
    stdout.print(table)
    if cache.failed and (failed or len(cache.failed) <= 10):
        ft = Table(title="failed images")
        for col in ("image_id", "path", "reason"):
            ft.add_column(col, overflow="fold")
        for f in cache.failed:
            ft.add_row(f.image_id, f.path, f.reason)
        stdout.print(ft)
