"""Reading and writing feature caches (HDF5 schema v1, see README "Cache schema").

A cache file is only ever written whole, to a temporary name, then renamed into place: a crash leaves either the
old file or the new one, never a torn file. Progress *during* an embed run is kept in shard files beside it (see
`prognosis_cache.cache.shards`), so nothing computed is lost either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
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
STR = h5py.string_dtype("utf-8")
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
    """A cache loaded into memory: features as float32 by default, strings as object arrays."""

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


def _strings(values: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


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
            f.create_dataset("image_id", data=_strings(image_id), dtype=STR)
            f.create_dataset("patient_id", data=_strings(patient_id), dtype=STR)
            f.create_dataset("center", data=_strings(center), dtype=STR)
            group = f.create_group("labels")
            for task, values in labels.items():
                values = np.asarray(values, dtype=np.float32)
                if values.shape != (n,):
                    raise ValueError(f"label {task!r} has shape {values.shape}, expected ({n},)")
                ds = group.create_dataset(task, data=values)
                ds.attrs["classes"] = json.dumps(list(classes.get(task, [])))
            fg = f.create_group("failed")
            fg.create_dataset("image_id", data=_strings([x.image_id for x in failed]), dtype=STR)
            fg.create_dataset("path", data=_strings([x.path for x in failed]), dtype=STR)
            fg.create_dataset("reason", data=_strings([x.reason for x in failed]), dtype=STR)
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
            raw = f["features"]
            features = np.empty(raw.shape, dtype=dtype)
            if raw.shape[0]:
                raw.read_direct(features)
            labels, classes = {}, {}
            for task, ds in f["labels"].items():
                labels[task] = ds[...].astype(np.float32)
                classes[task] = json.loads(ds.attrs.get("classes", "[]"))
            failed = []
            if "failed" in f:
                fg = f["failed"]
                failed = [FailedImage(*row) for row in zip(fg["image_id"].asstr()[...], fg["path"].asstr()[...],
                                                           fg["reason"].asstr()[...], strict=True)]
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            return CacheData(
                path=path,
                features=features,
                image_id=f["image_id"].asstr()[...].astype(object),
                patient_id=f["patient_id"].asstr()[...].astype(object),
                center=f["center"].asstr()[...].astype(object),
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
