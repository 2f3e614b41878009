"""The manifest: which images, where, whose, from which centre, with which labels.

CSV or Parquet. Required columns `image_id` (unique), `path` (relative to the root — by default the manifest's own
folder — or absolute), `patient_id`; optional `center`; every other column is a label (binary or categorical,
blank = unknown). Every problem is reported with the file, the row (as a spreadsheet shows it: header = row 1) and
the column, and what to do.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from prognosis_cache.errors import ManifestError

REQUIRED = ("image_id", "path", "patient_id")
RESERVED = (*REQUIRED, "center")
MAX_CLASSES = 20  # a column with more distinct values is metadata (age, dates), not a class label
DEFAULT_CENTER = "all"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. `frame` holds the reserved columns as strings plus the label columns as read."""

    path: Path
    root: Path
    frame: pl.DataFrame
    label_columns: tuple[str, ...]
    sha256: str
    skipped_columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.frame.height

    @property
    def dataset(self) -> str:
        """Default dataset name: the manifest's folder name (used in cache file names and results rows)."""
        return self.path.resolve().parent.name or "dataset"

    def image_paths(self) -> list[Path]:
        return [_resolve(self.root, p) for p in self.frame["path"].to_list()]

    def labels(self) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
        """Labels as float32 codes (NaN = unknown) and the class names per code, for the cache's /labels group."""
        values, classes = {}, {}
        for col in self.label_columns:
            values[col], classes[col] = encode_label(self.frame[col])
        return values, classes


def _resolve(root: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else root / path


def _row(i: int) -> int:
    """0-based data index → the row number a spreadsheet shows (header is row 1)."""
    return int(i) + 2


def encode_label(column: pl.Series) -> tuple[np.ndarray, list[str]]:
    """Encode one label column as float32 codes with NaN for blanks.

    Numeric columns keep their sorted distinct values as classes (0/1 stays 0/1); text columns get sorted class names
    (so for a binary text label the positive class — code 1 — is the later name in sorted order: no<yes, alive<dead).
    """
    as_text = column.cast(pl.String).str.strip_chars()
    blank = as_text.is_null() | (as_text == "") | as_text.str.to_lowercase().is_in(["nan", "na", "n/a", "none"])
    present = as_text.filter(~blank)
    numeric = present.cast(pl.Float64, strict=False)
    codes = np.full(column.len(), np.nan, dtype=np.float32)
    mask = (~blank).to_numpy()
    if present.len() and numeric.null_count() == 0:
        distinct = sorted(set(numeric.to_list()))
        index = {v: i for i, v in enumerate(distinct)}
        codes[mask] = [index[v] for v in numeric.to_list()]
        names = [str(int(v)) if float(v).is_integer() else str(v) for v in distinct]
    else:
        distinct_s = sorted(set(present.to_list()))
        index_s = {v: i for i, v in enumerate(distinct_s)}
        codes[mask] = [index_s[v] for v in present.to_list()]
        names = distinct_s
    return codes, names


def _read_table(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist", "check the --manifest path")
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # polars raises several error types for unreadable input
        raise ManifestError(f"manifest {path} cannot be read as {'Parquet' if path.suffix == '.parquet' else 'CSV'}: "
                            f"{exc}", "save it as UTF-8 CSV with a header row, or as Parquet") from exc


def load_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read and validate a manifest. Raises ManifestError naming the file, row and column of the first problem kind.

    Missing image files are not an error here (embed records them as failures, so one lost file does not stop a
    10,000-image run); `missing_files` lists them for callers that want to stop early.
    """
    path = Path(path)
    frame = _read_table(path)
    frame = frame.rename({c: c.strip() for c in frame.columns})
    if frame.height == 0:
        raise ManifestError(f"manifest {path} has no rows", "add one row per image below the header")
    lacking = [c for c in REQUIRED if c not in frame.columns]
    if lacking:
        raise ManifestError(
            f"manifest {path} lacks required column(s) {', '.join(lacking)} (it has: {', '.join(frame.columns)})",
            "add columns image_id, path, patient_id (optional: center, then one column per label)")
    for col in (*REQUIRED, *(["center"] if "center" in frame.columns else [])):
        text = frame[col].cast(pl.String).str.strip_chars()
        blank = (text.is_null() | (text == "")).to_numpy()
        if blank.any():
            rows = [_row(i) for i in np.flatnonzero(blank)[:5]]
            raise ManifestError(f"{path}: column {col!r} is empty in row(s) {rows}",
                                f"fill in {col} for every image (or drop those rows)")
        frame = frame.with_columns(text.alias(col))
    ids = frame["image_id"]
    dup = ids.is_duplicated().to_numpy()
    if dup.any():
        first = ids.filter(pl.Series(dup))[0]
        rows = [_row(i) for i in np.flatnonzero((ids == first).to_numpy())]
        raise ManifestError(f"{path}: image_id {first!r} appears in rows {rows} (column 'image_id' must be unique)",
                            "give every image its own id")
    if "center" not in frame.columns:
        frame = frame.with_columns(pl.lit(DEFAULT_CENTER).alias("center"))
    labels, skipped = [], []
    for col in frame.columns:
        if col in RESERVED:
            continue
        n_distinct = frame[col].cast(pl.String).drop_nulls().n_unique()
        (labels if n_distinct <= MAX_CLASSES else skipped).append(col)
    root_dir = Path(root) if root is not None else path.resolve().parent
    if not root_dir.is_dir():
        raise ManifestError(f"image root {root_dir} is not a folder",
                            "pass --root the folder the paths are relative to")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Manifest(path=path, root=root_dir, frame=frame.select([*RESERVED, *labels]), label_columns=tuple(labels),
                    sha256=digest, skipped_columns=tuple(skipped))


def missing_files(manifest: Manifest) -> list[tuple[int, str]]:
    """(spreadsheet row, path) of every image file that does not exist."""
    return [(_row(i), str(p)) for i, p in enumerate(manifest.image_paths()) if not p.is_file()]


def check_files(manifest: Manifest) -> None:
    """Stop early when no image at all is found: the root is almost certainly wrong."""
    missing = missing_files(manifest)
    if missing and len(missing) == len(manifest):
        row, p = missing[0]
        raise ManifestError(f"{manifest.path}: none of the {len(manifest)} image files exist (row {row}, column "
                            f"'path': {p})", f"paths are relative to {manifest.root}; pass --root the right folder")
