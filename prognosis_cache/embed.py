"""`pcache embed`: every image of a manifest through one frozen backbone, once, into a fingerprinted cache.

Crash-safe and resumable: each finished batch is a shard on disk (see cache/shards.py); a re-run skips rows that
are already in the cache or in a shard, recomputes only the rest, with the same batch boundaries, and so ends
bit-identical to an uninterrupted run. New manifest rows are appended to an existing cache; its rows are never
recomputed. Failed images are recorded with their reason and retried by the next run (the file may be fixed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prognosis_cache.backbones import LoadedBackbone, build_backbone
from prognosis_cache.cache import shards
from prognosis_cache.cache.fingerprint import fingerprint_fields, fingerprint_of
from prognosis_cache.cache.h5 import CacheData, FailedImage, read_cache, write_cache
from prognosis_cache.data.loader import batched_images
from prognosis_cache.data.manifest import Manifest, check_files, load_manifest
from prognosis_cache.devices import autocast, compute_precision, pick_device
from prognosis_cache.errors import CacheError, PcacheError

DTYPES = {"float16": np.float16, "float32": np.float32}
DEFAULT_CACHE_ROOT = Path("cache")


class EmbedStopped(PcacheError):
    """`--on-error fail` met a failing image: the run stopped, finished batches are kept."""

    exit_code = 3


@dataclass
class EmbedReport:
    path: Path
    fingerprint: str
    n_total: int
    n_new: int
    n_reused: int
    failed: list[FailedImage] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("nan")


def cache_fingerprint(loaded: LoadedBackbone, dtype: str, precision: str) -> tuple[dict, str]:
    fields = fingerprint_fields(loaded.spec.fingerprint_fields(), loaded.weights_id, dtype)
    fields["precision"] = precision
    return fields, fingerprint_of(fields)


def default_cache_path(root: Path, dataset: str, backbone: str, fingerprint: str) -> Path:
    return root / f"{dataset}__{backbone}__{fingerprint[:12]}.h5"


def _existing(path: Path, fingerprint: str) -> CacheData | None:
    if not path.exists():
        return None
    cache = read_cache(path, dtype=np.float32)
    if cache.fingerprint != fingerprint:
        raise CacheError(
            f"{path} was made with fingerprint {cache.fingerprint[:12]} ({cache.backbone}), this run has "
            f"{fingerprint[:12]}: appending would mix incompatible features",
            "write to another --out, or delete the old cache to rebuild it")
    return cache


def _forward(model: torch.nn.Module, pixels: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = pixels.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device):
        return model(x).float().cpu()


def embed_manifest(
    manifest: Manifest | str | Path,
    backbone: str,
    *,
    weights: str | None = None,
    out: Path | None = None,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    dataset: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
    dtype: str = "float16",
    on_error: str = "record",
    loaded: LoadedBackbone | None = None,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EmbedReport:
    """Embed every manifest row not yet in the cache; return what happened.

    `on_start(n_pending)` and `on_batch(n_rows_done_in_batch)` let a caller draw progress. `loaded` reuses an already
    built backbone (benchmarks, tests). `on_error="fail"` stops at the first image that cannot be embedded.
    """
    if dtype not in DTYPES:
        raise PcacheError(f"unknown --dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if on_error not in ("record", "fail"):
        raise PcacheError(f"unknown --on-error {on_error!r}", "use record (default) or fail")
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    check_files(manifest)
    dev = pick_device(device)
    loaded = loaded or build_backbone(backbone, weights)
    fields, fingerprint = cache_fingerprint(loaded, dtype, compute_precision(dev))
    dataset = dataset or manifest.dataset
    path = out or default_cache_path(cache_root, dataset, loaded.spec.name, fingerprint)
    existing = _existing(path, fingerprint)
    folder = shards.open_partial(path, fingerprint)

    done: set[str] = set(existing.image_id.tolist()) if existing is not None else set()
    for shard in shards.read_shards(folder):
        done.update(shard.image_id.tolist())
        done.update(shard.failed_id.tolist())  # failures of this unfinished run stay failed until it ends
    ids = manifest.frame["image_id"].to_list()
    pending = [i for i, image_id in enumerate(ids) if image_id not in done]
    n_reused = len(ids) - len(pending)

    start = time.perf_counter()
    if on_start:
        on_start(len(pending))
    if pending:
        model = loaded.model.to(dev).eval()
        channels_last = loaded.spec.family == "torchvision"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        paths = manifest.image_paths()
        index = shards.next_index(folder)
        loader = batched_images(paths, pending, loaded.spec.preprocess, batch_size=batch_size, workers=workers,
                                pin_memory=dev.type == "cuda")
        for batch in loader:
            feats = (_forward(model, batch.pixels, dev, channels_last).numpy() if batch.rows
                     else np.empty((0, loaded.spec.dim), np.float32))
            failed_rows = sorted(batch.failed)
            shards.write_shard(folder, index, shards.Shard(
                image_id=np.asarray([ids[r] for r in batch.rows], dtype=str),
                features=feats.astype(DTYPES[dtype]),
                failed_id=np.asarray([ids[r] for r in failed_rows], dtype=str),
                failed_reason=np.asarray([batch.failed[r] for r in failed_rows], dtype=str)))
            index += 1
            if on_batch:
                on_batch(len(batch.rows) + len(failed_rows))
            if failed_rows and on_error == "fail":
                r = failed_rows[0]
                raise EmbedStopped(f"image {ids[r]!r} (manifest row {r + 2}) failed: {batch.failed[r]}",
                                   "fix or remove it and re-run: finished batches are kept and not recomputed")
    seconds = time.perf_counter() - start

    failed = consolidate(path, manifest, existing, folder, fields, dataset)
    shards.discard(folder)
    failed_ids = {f.image_id for f in failed}  # may also list old rows no longer in the manifest
    n_new = sum(ids[r] not in failed_ids for r in pending)
    return EmbedReport(path=path, fingerprint=fingerprint, n_total=len(ids), n_new=n_new,
                       n_reused=n_reused, failed=failed, seconds=seconds)


def consolidate(path: Path, manifest: Manifest, existing: CacheData | None, folder: Path, fields: dict,
                dataset: str) -> list[FailedImage]:
    """Merge the old cache and this run's shards into one cache file (atomically), rows in manifest order.

    Rows of the old cache that are no longer in the manifest are kept after the manifest's rows (appending never
    loses computed features); their labels come from the old cache.
    """
    feats: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    if existing is not None:
        feats.update(zip(existing.image_id.tolist(), existing.features, strict=True))
    for shard in shards.read_shards(folder):
        for image_id, row in zip(shard.image_id.tolist(), shard.features, strict=True):
            feats.setdefault(image_id, row)
        failures.update(zip(shard.failed_id.tolist(), shard.failed_reason.tolist(), strict=True))
    frame = manifest.frame
    ids = frame["image_id"].to_list()
    paths = frame["path"].to_list()
    order = [i for i, x in enumerate(ids) if x in feats]
    m_labels, classes = manifest.labels()
    out_ids = [ids[i] for i in order]
    patients = [frame["patient_id"][i] for i in order]
    centers = [frame["center"][i] for i in order]
    labels = {task: values[order] for task, values in m_labels.items()}
    failed = [FailedImage(ids[i], paths[i], failures[ids[i]]) for i in range(len(ids))
              if ids[i] in failures and ids[i] not in feats]
    if existing is not None:
        in_manifest = set(ids)
        keep = [j for j, x in enumerate(existing.image_id.tolist()) if x not in in_manifest]
        out_ids += [existing.image_id[j] for j in keep]
        patients += [existing.patient_id[j] for j in keep]
        centers += [existing.center[j] for j in keep]
        for task in set(labels) | set(existing.labels):
            old = existing.labels.get(task, np.full(len(existing), np.nan, np.float32))[keep]
            new = labels.get(task, np.full(len(order), np.nan, np.float32))
            labels[task] = np.concatenate([new, old])
            classes.setdefault(task, existing.classes.get(task, []))
        failed += [f for f in existing.failed if f.image_id not in in_manifest]
    dim = int(fields["backbone"]["dim"])
    matrix = np.stack([feats[x] for x in out_ids]) if out_ids else np.empty((0, dim), np.float32)
    write_cache(path, features=matrix, image_id=out_ids, patient_id=patients, center=centers, labels=labels,
                classes=classes, fingerprint_json=fields, manifest_sha256=manifest.sha256, dataset=dataset,
                failed=failed, complete=not failed)
    return failed
