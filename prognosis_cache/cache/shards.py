"""Work-in-progress of an embed run: one small, atomically written shard file per finished batch.

Why not append to the HDF5 file directly: a process killed while HDF5 updates its metadata can leave the whole file
unreadable. Shards are written to a temporary name, fsynced and renamed, so a SIGKILL loses at most the batch in
flight; the next run reads the shards, skips their rows and recomputes only what is missing. Shards are .npz files of
plain arrays (no pickle: strings are stored as fixed-width unicode).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prognosis_cache.errors import CacheError


@dataclass
class Shard:
    image_id: np.ndarray  # (n,) str
    features: np.ndarray  # (n, D)
    failed_id: np.ndarray  # (m,) str
    failed_reason: np.ndarray  # (m,) str


def partial_dir(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".partial")


def _fsync_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_partial(cache_path: Path, fingerprint: str) -> Path:
    """The shard folder for this cache, created if needed; refuses one left by a run of another fingerprint."""
    folder = partial_dir(cache_path)
    meta = folder / "meta.json"
    if meta.exists():
        found = json.loads(meta.read_text()).get("fingerprint")
        if found != fingerprint:
            raise CacheError(f"{folder} holds unfinished work of fingerprint {str(found)[:12]}, not {fingerprint[:12]}",
                             "re-run with the same backbone/weights/dtype to finish it, or delete that folder")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _fsync_write(meta, lambda fh: fh.write(json.dumps({"fingerprint": fingerprint}).encode()))
    return folder


def write_shard(folder: Path, index: int, shard: Shard) -> Path:
    """Write one batch's results atomically as shard-<index>.npz."""
    path = folder / f"shard-{index:07d}.npz"

    def write(fh) -> None:
        np.savez(fh, image_id=np.asarray(shard.image_id, dtype=str), features=shard.features,
                 failed_id=np.asarray(shard.failed_id, dtype=str),
                 failed_reason=np.asarray(shard.failed_reason, dtype=str))

    _fsync_write(path, write)
    return path


def shard_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.npz")) if folder.is_dir() else []


def read_shards(folder: Path) -> Iterator[Shard]:
    for path in shard_paths(folder):
        try:
            with np.load(path, allow_pickle=False) as z:
                yield Shard(z["image_id"], z["features"], z["failed_id"], z["failed_reason"])
        except (OSError, ValueError, KeyError) as exc:
            raise CacheError(f"shard {path} is unreadable ({exc})", "delete that one shard file; its rows are redone")\
                from exc


def next_index(folder: Path) -> int:
    paths = shard_paths(folder)
    return int(paths[-1].stem.split("-")[1]) + 1 if paths else 0


def discard(folder: Path) -> None:
    """Remove the shard folder once its content is safely inside the cache file."""
    if folder.is_dir():
        shutil.rmtree(folder)
