"""Reading and writing feature caches (HDF5 schema v1, see README "Cache schema").

A cache file is only ever written whole, to a temporary name, then renamed into place: a crash leaves either the
old file or the new one, never a torn file. Progress *during* an embed run is kept in shard files beside it (see
`prognosis_cache.cache.shards`), so nothing computed is lost either.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from prognosis_cache import __version__
from prognosis_cache.cache.fingerprint import canonical_json, fingerprint_of
from prognosis_cache.errors import CacheError

SCHEMA_VERSION = 1
_VERSIONED_PACKAGES = ("torch", "torchvision", "transformers", "open_clip_torch", "timm", "h5py", "numpy", "pydicom",
                       "pillow")


@dataclass
class FailedImage:
    """An image that could not be embedded, and why."""

    image_id: str
    path: str
    reason: str


@dataclass
class CacheData:
    """A cache loaded into memory: features as float32 by default, strings as numpy unicode arrays."""

    path: Path
    features: np.ndarray
    image_id: np.ndarray
    patient_id: np.ndarray
    center: np.ndarray
    labels: dict[str, np.ndarray]
    classes: dict[str, list[str]]
    fingerprint: str
    fingerprint_json: dict[str, Any]
    attrs: dict[str, Any]
    failed: list[FailedImage] = field(default_factory=list)

    @property
    def dataset(self) -> str:
        return str(self.attrs.get("dataset", ""))

    @property
    def backbone(self) -> str:
        return str(self.fingerprint_json.get("backbone", {}).get("name", ""))

    def __len__(self) -> int:
        return int(self.features.shape[0])


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers, recorded in every cache for provenance."""
    found = {"prognosis-cache": __version__}
    for name in _VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _write_strings(group: h5py.Group, name: str, values: Sequence[str] | np.ndarray) -> None:
    """Fixed-length UTF-8: reads back in milliseconds (variable-length strings cost ~50 ms per 100k rows)."""
    encoded = np.char.encode(np.asarray([str(v) for v in values], dtype=str), "utf-8")
    dtype = h5py.string_dtype("utf-8", length=max(encoded.dtype.itemsize, 1))
    group.create_dataset(name, data=encoded.astype(dtype), dtype=dtype)


def _read_strings(ds: h5py.Dataset) -> np.ndarray:
    """Any HDF5 string dataset → numpy unicode array (fast path for ASCII fixed-length, the common case)."""
    if ds.dtype.kind == "S":
        raw = ds[...]
        try:
            return raw.astype(str)  # numpy decodes ASCII bytes in C; ids are almost always ASCII
        except UnicodeDecodeError:
            pass
    return np.asarray(ds.asstr()[...], dtype=str)


def _to_dtype(raw: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Convert features in row blocks on two threads: numpy releases the GIL while casting, and a float16 →
    float32 cast of a 100k × 768 cache is otherwise the slowest step of loading it."""
    if raw.dtype == np.dtype(dtype):
        return raw
    out = np.empty(raw.shape, dtype=dtype)
    bounds = np.linspace(0, raw.shape[0], 9).astype(int)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda ab: np.copyto(out[ab[0]:ab[1]], raw[ab[0]:ab[1]]), itertools.pairwise(bounds)))
    return out


def write_cache(
    path: str | os.PathLike[str],
    *,
    features: np.ndarray,
    image_id: Sequence[str] | np.ndarray,
    patient_id: Sequence[str] | np.ndarray,
    center: Sequence[str] | np.ndarray,
    labels: Mapping[str, np.ndarray],
    classes: Mapping[str, Sequence[str]],
    fingerprint_json: Mapping[str, Any],
    manifest_sha256: str,
    dataset: str,
    failed: Sequence[FailedImage] = (),
    complete: bool = True,
    created: str | None = None,
) -> Path:
    """Write a whole cache atomically (temporary file, fsync, rename) and return its path.

    Features are stored uncompressed: on float16 features gzip saves ~10% and costs seconds per read.
    """
    path = Path(path)
    n = len(image_id)
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"features {features.shape} do not match {n} image ids")
    for name, col in (("patient_id", patient_id), ("center", center)):
        if len(col) != n:
            raise ValueError(f"{name} has {len(col)} rows, expected {n}")
    dtype = np.dtype(fingerprint_json.get("dtype", "float16"))
    fp_json = canonical_json(dict(fingerprint_json))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            chunk = (max(1, min(n, 4096)), features.shape[1]) if n else None
            f.create_dataset("features", data=features.astype(dtype, copy=False), chunks=chunk,
                             maxshape=(None, features.shape[1]))
            _write_strings(f, "image_id", image_id)
            _write_strings(f, "patient_id", patient_id)
            _write_strings(f, "center", center)
            group = f.create_group("labels")
            for task, values in labels.items():
                values = np.asarray(values, dtype=np.float32)
                if values.shape != (n,):
                    raise ValueError(f"label {task!r} has shape {values.shape}, expected ({n},)")
                ds = group.create_dataset(task, data=values)
                ds.attrs["classes"] = json.dumps(list(classes.get(task, [])))
            fg = f.create_group("failed")
            _write_strings(fg, "image_id", [x.image_id for x in failed])
            _write_strings(fg, "path", [x.path for x in failed])
            _write_strings(fg, "reason", [x.reason for x in failed])
            f.attrs.update({
                "schema_version": SCHEMA_VERSION,
                "fingerprint": fingerprint_of(json.loads(fp_json)),
                "fingerprint_json": fp_json,
                "manifest_sha256": manifest_sha256,
                "complete": bool(complete),
                "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
                "package_versions": json.dumps(package_versions(), sort_keys=True),
                "dataset": dataset,
                "backbone": str(fingerprint_json.get("backbone", {}).get("name", "")),
                "dtype": dtype.name,
            })
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise CacheError(f"cache {path} does not exist", "run `pcache embed` first, or check the path")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path} is not a readable HDF5 cache ({exc})", "re-run `pcache embed` to rebuild it") from exc
    version = f.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        f.close()
        raise CacheError(f"{path} has cache schema version {version}; this pcache reads version {SCHEMA_VERSION}",
                         "re-embed with this version of pcache or use the version that wrote it")
    return f


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Root attributes only (cheap: no feature read)."""
    with _open(Path(path)) as f:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def read_cache(path: str | os.PathLike[str], *, dtype: np.dtype | type = np.float32) -> CacheData:
    """Load a whole cache into memory, features converted to `dtype` (float32 by default)."""
    path = Path(path)
    with _open(path) as f:
        try:
            features = _to_dtype(f["features"][...], dtype)
            labels, classes = {}, {}
            for task, ds in f["labels"].items():
                labels[task] = ds[...].astype(np.float32)
                classes[task] = json.loads(ds.attrs.get("classes", "[]"))
            failed = []
            if "failed" in f:
                fg = f["failed"]
                failed = [FailedImage(*row) for row in zip(*(_read_strings(fg[k]).tolist()
                                                              for k in ("image_id", "path", "reason")), strict=True)]
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            return CacheData(
                path=path,
                features=features,
                image_id=_read_strings(f["image_id"]),
                patient_id=_read_strings(f["patient_id"]),
                center=_read_strings(f["center"]),
                labels=labels,
                classes=classes,
                fingerprint=str(attrs["fingerprint"]),
                fingerprint_json=json.loads(attrs["fingerprint_json"]),
                attrs=attrs,
                failed=failed,
            )
        except KeyError as exc:
            raise CacheError(f"{path} lacks {exc} required by cache schema v1", "re-run `pcache embed`") from exc


def require_same_fingerprint(caches: Sequence[CacheData]) -> str:
    """Refuse to combine caches whose features came from different backbones/weights/preprocessing."""
    prints = {c.fingerprint for c in caches}
    if len(prints) > 1:
        listing = ", ".join(f"{c.path.name}={c.fingerprint[:12]}" for c in caches)
        raise CacheError(f"these caches have different fingerprints and cannot be mixed: {listing}",
                         "combine only caches made with the same backbone, weights and preprocessing")
    return prints.pop()
