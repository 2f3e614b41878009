"""`pcache probe` and `pcache plot`: linear probes / few-shot grids from feature caches, and their curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from prognosis_cache import results
from prognosis_cache.cache.h5 import read_cache
from prognosis_cache.cli._app import app, console, out, user_errors
from prognosis_cache.errors import PcacheError
from prognosis_cache.evaluate.metrics import fold_bootstrap_ci, seed_interval
from prognosis_cache.evaluate.probe import SOLVERS, Prediction, run_probe

TABLE_METRICS = (("mcc", "MCC"), ("pr_auc", "PR-AUC"))


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PcacheError(f"{what} must be comma-separated integers, got {text!r}", "e.g. --shots 1,2,4,8") from None
    if not values or min(values) < 1:
        raise PcacheError(f"{what} must be positive integers, got {text!r}", "e.g. --shots 1,2,4,8")
    return values


def _full_ci(preds: list[Prediction], y: np.ndarray, groups: np.ndarray, backbone: str,
             solver: str) -> dict[str, tuple[float, float]]:
    """Patient-bootstrap 95% CI of the mean over folds of one (backbone, solver)."""
    folds = [(y[p.test_idx], p.margin, groups[p.test_idx]) for p in preds
             if p.backbone == backbone and p.solver == solver]
    if not folds:
        return {m: (float("nan"), float("nan")) for m, _ in TABLE_METRICS}
    return fold_bootstrap_ci(folds, n_boot=200, seed=0)


def render(frame: pl.DataFrame, preds: list[Prediction], y: np.ndarray, groups: np.ndarray) -> None:
    """Mean ± std and 95% CI per backbone × solver (× K), one column per backbone, one table per metric."""
    backbones = frame["backbone"].unique(maintain_order=True).to_list()
    keys = frame.select("solver", "k_shot").unique(maintain_order=True).rows()
    regime = frame["regime"][0]
    ci_kind = "patient bootstrap of the fold mean" if regime == "full" else "t-interval over seeds"
    full_ci = {(b, s): _full_ci(preds, y, groups, b, s) for b in backbones for s, _ in keys} if regime == "full" else {}
    for metric, name in TABLE_METRICS:
        table = Table(title=f"{name}: mean ± std [95% CI, {ci_kind}]", show_lines=False)
        table.add_column("solver")
        if regime == "few-shot":
            table.add_column("K", justify="right")
        for b in backbones:
            table.add_column(b, justify="right")
        for solver, k in keys:
            cells = []
            for b in backbones:
                sub = frame.filter((pl.col("backbone") == b) & (pl.col("solver") == solver))
                if k is not None:
                    sub = sub.filter(pl.col("k_shot") == k)
                mean, sd, lo, hi = seed_interval(sub[metric].to_numpy())
                if regime == "full":
                    lo, hi = full_ci[(b, solver)][metric]
                bad = int((sub["status"] == "degenerate").sum())
                note = f" ({bad} degenerate)" if bad else ""
                cells.append(f"{mean:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}]{note}")
            table.add_row(solver, *([str(k)] if regime == "few-shot" else []), *cells)
        out.print(table)


@app.command()
@user_errors
def probe(
    caches: list[Path] = typer.Argument(..., help="one or more caches of the same dataset (one per backbone)"),
    task: str = typer.Option(..., "--task", help="label task in the cache (binary 0/1)"),
    regime: str = typer.Option("full", "--regime", help="full | few-shot"),
    shots: str = typer.Option("1,2,4,8,16,32", "--shots", help="few-shot K values (patients per class)"),
    seeds: int = typer.Option(100, "--seeds", help="few-shot draws per K"),
    solver: str = typer.Option("logreg", "--solver", help=f"comma-separated: {','.join(SOLVERS)}"),
    cv: str = typer.Option("5", "--cv", help="number of patient-grouped folds, or loco (leave one centre out)"),
    validation: str = typer.Option(None, "--validation",
                                   help="full: inner-cv (default) | none; few-shot: none (default) | k-shot"),
    transform: str = typer.Option("l2", "--transform", help="none | l2 | standardise (fitted on training side)"),
    seed: int = typer.Option(0, "--seed", help="seed of the fold split"),
    out_path: Path = typer.Option(Path("results.parquet"), "--out", help="results file (appended to)"),
    csv: bool = typer.Option(False, "--csv", help="also write a CSV beside the Parquet file"),
) -> None:
    """Probe frozen features from caches: logistic (lp), ridge, prototype, kNN; full data or few-shot grids.

    Every cache is probed on the same patient-grouped folds and draws. Full data: C / λ / k by inner CV on the
    training side, then refit. Few-shot: K patients per class drawn from fold 0's training side, scored on its
    test side, nested across K. Rows go to --out (one per fold or draw); a table of mean ± std and 95% CI is printed.
    """
    solvers = tuple(s.strip() for s in solver.split(",") if s.strip())
    shot_values = _ints(shots, "--shots")
    data = [read_cache(c) for c in caches]
    preds: list[Prediction] = []
    with Progress(TextColumn("[bold]probe[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        job = bar.add_task("probe", total=None)
        frame = run_probe(data, task, regime=regime, shots=shot_values, seeds=seeds, solvers=solvers, cv=cv,
                          validation=validation, seed=seed, transform=transform,
                          progress=lambda done, total: bar.update(job, completed=done, total=total),
                          predictions=preds if regime == "full" else None)
    results.write(frame, out_path, csv=csv)
    y = np.nan_to_num(np.asarray(data[0].labels[task], dtype=np.float64), nan=-1).astype(np.int64)
    render(frame, preds, y, np.asarray(data[0].patient_id, dtype=str))
    console.print(f"wrote {frame.height} rows to {out_path}")


@app.command()
@user_errors
def plot(
    results_path: Path = typer.Argument(..., help="results file written by pcache probe / finetune"),
    out_path: Path = typer.Option(Path("curves.png"), "--out", help="PNG to write"),
    task: str = typer.Option(None, "--task", help="task to plot (needed when the file holds several)"),
) -> None:
    """MCC- and PR-AUC-vs-K curves with 95% CI bands per backbone and solver (full data as a dashed line)."""
    from prognosis_cache.evaluate.plot import plot_curves

    written = plot_curves(results.read(results_path), out_path, task)
    console.print(f"wrote {written}")
