"""Training throughput of our fine-tuning loop vs a bare torch loop (same model, LoRA r8, same batch).

Both loops get the same in-memory tensors (the trainer's data path is swapped for an in-memory one that yields the
same `Batch` objects), so the ratio measures the trainer's own overhead: epoch planning, weighted loss, warm-up
schedule, progress bookkeeping. One process; the first epoch of each loop is a warm-up and is not timed.
Target: ratio >= 0.9. The last line is `RESULT ratio=<x>`.

    python scripts/bench_finetune.py --backbone tiny-dinov2 --images 512 --batch-size 32 --epochs 3
    python scripts/bench_finetune.py --backbone dinov2-small --weights random --crop 112   # bigger, GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prognosis_cache.backbones import build_backbone
from prognosis_cache.data.loader import Batch
from prognosis_cache.devices import pick_device
from prognosis_cache.finetune import trainer as trainer_module
from prognosis_cache.finetune.strategies import adapt, paper_preset, param_groups
from prognosis_cache.finetune.trainer import TrainConfig, balanced_class_weight, train


def in_memory_loader(pixels: torch.Tensor):
    """A drop-in for `batched_images` that slices preloaded tensors (no decoding) into the same Batch objects."""

    def loader(paths: Sequence[object], rows: Sequence[int], pre: object, *, batch_size: int = 32, **_: object
               ) -> Iterator[Batch]:
        rows = list(rows)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            yield Batch(rows=chunk, pixels=pixels[chunk], failed={})

    return loader


def bare_loop(model: torch.nn.Module, groups: list[dict], pixels: torch.Tensor, labels: torch.Tensor,
              class_weight: torch.Tensor, batch_size: int, epochs: int, device: torch.device) -> float:
    """img/s of the plainest correct loop: shuffle, forward, weighted CE, backward, AdamW step."""
    optimizer = torch.optim.AdamW(groups)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    model.train()
    seconds, images = 0.0, 0
    for epoch in range(epochs + 1):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = pixels[idx].to(device, non_blocking=True), labels[idx].to(device)
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=class_weight)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:  # epoch 0 warms up kernels and allocators
            seconds += time.perf_counter() - start
            images += len(order)
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-dinov2")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--crop", type=int, default=None, help="input size (default: the entry's crop)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    pristine = build_backbone(args.backbone, args.weights)
    crop = args.crop or pristine.spec.preprocess.crop
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, crop, crop, generator=generator)
    labels_np = (np.arange(args.images) % 3 == 0).astype(np.int64)  # 1:2 imbalance
    rows = np.arange(args.images)

    def fresh():
        loaded = dataclasses.replace(pristine, model=copy.deepcopy(pristine.model))
        torch.manual_seed(0)
        return adapt(loaded, paper_preset("lora", 8))

    model, config = fresh()
    model.to(device)
    weight = torch.as_tensor(balanced_class_weight(labels_np, rows, 2), dtype=torch.float32, device=device)
    bare = bare_loop(model, param_groups(model, config), pixels, torch.as_tensor(labels_np), weight,
                     args.batch_size, args.epochs, device)

    model, config = fresh()
    trainer_module.batched_images = in_memory_loader(pixels)  # same tensors, no decoding, for both loops
    loop = TrainConfig(epochs=args.epochs + 1, batch_size=args.batch_size, progress=False, patience=10**6)
    result = train(model, config, [], labels_np, rows, np.empty(0, np.int64), pristine.spec.preprocess, loop, device)
    timed = result.history[1:]
    ours = args.images * len(timed) / sum(h["seconds"] for h in timed)
    # the reference brackets the measured run (before and after), so a load change on a shared machine hits both
    model, config = fresh()
    model.to(device)
    bare_after = bare_loop(model, param_groups(model, config), pixels, torch.as_tensor(labels_np), weight,
                           args.batch_size, args.epochs, device)
    bare = (bare + bare_after) / 2

    print(f"backbone {args.backbone} crop {crop} images {args.images} batch {args.batch_size} device {device}")
    print(f"bare torch loop: {bare:.1f} img/s")
    print(f"pcache trainer:  {ours:.1f} img/s")
    print(f"RESULT ratio={ours / bare:.3f}")


if __name__ == "__main__":
    main()
