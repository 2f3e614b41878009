"""Contract 2: the results row, one schema for every strategy (cache probes and fine-tuning alike).

One row per (run, fold or few-shot draw). Aggregation and plots read only this table, so a probe from the cache and
a LoRA run over images land side by side. Columns beyond the plan's list (solver, validation, trainable params,
status/reason) are documented in docs/DESIGN.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from prognosis_cache import __version__
from prognosis_cache.errors import PcacheError

METRICS = ("mcc", "pr_auc", "roc_auc", "balanced_accuracy", "f1")

SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "task": pl.String(),
    "backbone": pl.String(),
    "fingerprint": pl.String(),
    "strategy": pl.String(),  # lp | ridge | prototype | knn | fft | lora | vera | bitfit | ia3
    "strategy_params": pl.String(),  # JSON
    "solver": pl.String(),  # logreg | ridge | prototype | knn | sgd (fine-tuning)
    "regime": pl.String(),  # full | few-shot
    "k_shot": pl.Int64(),  # null for full data
    "seed": pl.Int64(),
    "fold": pl.Int64(),  # fold index; for loco the held-out centre's index
    "test_center": pl.String(),  # loco only
    "validation": pl.String(),  # none | inner-cv | k-shot | grouped-holdout
    "n_train": pl.Int64(),
    "n_test": pl.Int64(),
    "mcc": pl.Float64(),
    "pr_auc": pl.Float64(),
    "roc_auc": pl.Float64(),
    "balanced_accuracy": pl.Float64(),
    "f1": pl.Float64(),
    "trainable_params": pl.Int64(),
    "trainable_share": pl.Float64(),
    "fit_seconds": pl.Float64(),
    "status": pl.String(),  # ok | degenerate
    "reason": pl.String(),  # why a degenerate row has NaN metrics
    "pcache_version": pl.String(),
}

REQUIRED = ("dataset", "task", "backbone", "fingerprint", "strategy", "regime", "seed", "n_train", "n_test")


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every schema column: unknown keys are a bug, missing optional ones become null / NaN."""
    unknown = set(fields) - set(SCHEMA)
    if unknown:
        raise ValueError(f"not results columns: {sorted(unknown)}")
    missing = [k for k in REQUIRED if fields.get(k) is None]
    if missing:
        raise ValueError(f"results row lacks {missing}")
    row: dict[str, Any] = dict.fromkeys(SCHEMA)
    row.update(fields)
    if isinstance(row["strategy_params"], Mapping):
        row["strategy_params"] = json.dumps(row["strategy_params"], sort_keys=True)
    row["strategy_params"] = row["strategy_params"] or "{}"
    for m in METRICS:
        row[m] = math.nan if row[m] is None else float(row[m])
    row["status"] = row["status"] or "ok"
    row["reason"] = row["reason"] or ""
    row["pcache_version"] = row["pcache_version"] or __version__
    return row


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Rows → a DataFrame with exactly the schema's columns and types, in schema order."""
    return pl.DataFrame(list(rows), schema=SCHEMA, orient="row")


def write(rows: Sequence[Mapping[str, Any]] | pl.DataFrame, path: str | Path, *, append: bool = True,
          csv: bool = False) -> pl.DataFrame:
    """Write results to Parquet (and CSV beside it on request), appending to an existing file by default.

    Written to a temporary name and renamed, so a crash never leaves half a results file.
    """
    path = Path(path)
    frame = rows if isinstance(rows, pl.DataFrame) else to_frame(rows)
    if append and path.exists():
        frame = pl.concat([read(path), frame], how="vertical")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
    if csv:
        frame.write_csv(path.with_suffix(".csv"))
    return frame


def read(path: str | Path) -> pl.DataFrame:
    """Read a results file, checking it carries the schema (older files gain missing columns as nulls)."""
    path = Path(path)
    if not path.exists():
        raise PcacheError(f"results file {path} does not exist", "give the --out file a probe or finetune run wrote")
    try:
        frame = pl.read_parquet(path) if path.suffix != ".csv" else pl.read_csv(path, schema_overrides=SCHEMA)
    except Exception as exc:  # polars raises several types for a non-parquet file
        raise PcacheError(f"{path} is not a readable results table: {exc}",
                          "pass a .parquet written by pcache") from exc
    lacking = [c for c in REQUIRED if c not in frame.columns]
    if lacking:
        raise PcacheError(f"{path} lacks results columns {lacking}", "it was not written by pcache probe/finetune")
    for col, dtype in SCHEMA.items():
        if col not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(col))
    return frame.select([pl.col(c).cast(t) for c, t in SCHEMA.items()])


def summarise(frame: pl.DataFrame, by: Sequence[str] = ("dataset", "task", "backbone", "strategy", "solver",
                                                        "regime", "k_shot")) -> pl.DataFrame:
    """Mean, std and count of every metric per group (NaN rows of degenerate folds are left out of the means)."""
    keys = [k for k in by if k in frame.columns]
    aggs: list[pl.Expr] = [pl.len().alias("n_rows")]
    for m in METRICS:
        valid = pl.col(m).filter(pl.col(m).is_not_nan())
        aggs += [valid.mean().alias(f"{m}_mean"), valid.std().alias(f"{m}_std")]
    return frame.group_by(keys, maintain_order=True).agg(aggs).sort(keys, nulls_last=False)
