"""Benchmark: `embed` end-to-end throughput against the bare forward pass, same model, batch and process.

End-to-end = decode PNG + min-max + resize/crop/normalise + forward + shard writes + final HDF5 consolidation.
Reference = the same model's forward on pre-made tensors. Both are timed in this process, back to back, so machine
noise hits both alike. Target: ratio ≥ 0.9. The last line reads `RESULT ratio=<x>`.

    python scripts/bench_embed.py [--images 256] [--batch-size 32] [--size 256] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from prognosis_cache.backbones import build_backbone
from prognosis_cache.data.synthetic import CohortSpec, make_cohort
from prognosis_cache.embed import embed_manifest


def raw_forward_rate(model: torch.nn.Module, n: int, batch: int, crop: int) -> float:
    """img/s of model(x) alone on pre-made tensors (one warm-up batch not timed)."""
    x = torch.randn(batch, 3, crop, crop)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        done = 0
        while done < n:
            model(x[: min(batch, n - done)])
            done += min(batch, n - done)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic PNGs in pixels")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--backbone", default="dinov2-small", help="ViT-S/14 at 224 px by default")
    args = ap.parse_args()

    loaded = build_backbone(args.backbone, "random:0")
    model = loaded.model.eval()
    crop = loaded.spec.preprocess.crop
    with tempfile.TemporaryDirectory() as tmp:
        # 1-3 images per patient: ask for enough patients, then embed exactly --images rows.
        manifest = make_cohort(Path(tmp) / "cohort", CohortSpec(n_patients=args.images, seed=0, size=args.size,
                                                                dicom_share=0.0, n_centers=2))
        lines = manifest.read_text().splitlines()
        manifest.write_text("\n".join(lines[: args.images + 1]) + "\n")
        raw_forward_rate(model, args.batch_size, args.batch_size, crop)  # warm-up of kernels and allocator
        raw = raw_forward_rate(model, args.images, args.batch_size, crop)
        start = time.perf_counter()
        report = embed_manifest(manifest, args.backbone, loaded=loaded, cache_root=Path(tmp) / "cache",
                                batch_size=args.batch_size, workers=args.workers, device="cpu")
        e2e = (report.n_new) / (time.perf_counter() - start)
        raw_again = raw_forward_rate(model, args.images, args.batch_size, crop)
    raw = (raw + raw_again) / 2  # the reference brackets the measured run
    print(f"backbone={args.backbone} images={args.images} png_size={args.size} batch={args.batch_size} "
          f"workers={args.workers} threads={torch.get_num_threads()}")
    print(f"raw forward: {raw:.1f} img/s   embed end-to-end: {e2e:.1f} img/s   failed: {len(report.failed)}")
    print(f"RESULT ratio={e2e / raw:.3f}")


if __name__ == "__main__":
    main()
