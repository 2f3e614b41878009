"""MCC- and PR-AUC-vs-K curves from a results table (matplotlib, Agg, PNG).

One line per (backbone, solver) with its 95% t-interval band over seeds; full-data results, when present, are a
dashed horizontal reference at their mean over folds.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from prognosis_cache.errors import PcacheError
from prognosis_cache.evaluate.metrics import seed_interval

PANELS = (("mcc", "MCC"), ("pr_auc", "PR-AUC"))


def plot_curves(frame: pl.DataFrame, out: str | os.PathLike[str], task: str | None = None) -> Path:
    """Write the curves of one task to `out` (PNG) and return its path."""
    tasks = sorted(frame["task"].unique().to_list())
    if task is None:
        if len(tasks) != 1:
            raise PcacheError(f"the results hold several tasks {tasks}", "pick one with --task")
        task = tasks[0]
    frame = frame.filter(pl.col("task") == task)
    if frame.is_empty():
        raise PcacheError(f"no results for task {task!r}; the file has {tasks}", "pick one with --task")
    few = frame.filter(pl.col("regime") == "few-shot")
    full = frame.filter(pl.col("regime") == "full")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = frame.select("backbone", "solver").unique(maintain_order=True).sort("backbone", "solver").rows()
    for ax, (metric, name) in zip(axes[0], PANELS, strict=True):
        for i, (backbone, solver) in enumerate(keys):
            colour = colours[i % len(colours)]
            label = f"{backbone} · {solver}"
            sub = few.filter((pl.col("backbone") == backbone) & (pl.col("solver") == solver))
            if not sub.is_empty():
                shots = sorted(sub["k_shot"].unique().to_list())
                stats = [seed_interval(sub.filter(pl.col("k_shot") == k)[metric].to_numpy()) for k in shots]
                mean = np.array([s[0] for s in stats])
                lo, hi = np.array([s[2] for s in stats]), np.array([s[3] for s in stats])
                ax.plot(shots, mean, marker="o", color=colour, label=label)
                ax.fill_between(shots, lo, hi, color=colour, alpha=0.2, linewidth=0)
            ref = full.filter((pl.col("backbone") == backbone) & (pl.col("solver") == solver))[metric].drop_nans()
            if len(ref):
                ax.axhline(float(ref.mean()), color=colour, linestyle="--", linewidth=1,
                           label=f"{label} (full data)")
        if not few.is_empty():
            ax.set_xscale("log", base=2)
        ax.set_xlabel("K (patients per class)")
        ax.set_ylabel(name)
        ax.set_title(f"{task}: {name} vs K (95% CI over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
