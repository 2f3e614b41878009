"""THE batched data path: manifest rows → decoded, preprocessed tensors in batches, failures as records.

`embed` uses it now and fine-tuning streams through it too, so both see exactly the same pixels. It is a plain
torch DataLoader (workers, prefetch, pinned memory on GPU) over a dataset whose items never raise: an unreadable
image becomes a failure record that travels beside the batch instead of killing the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from prognosis_cache.backbones.registry import Preprocess
from prognosis_cache.data.decode import decode_image
from prognosis_cache.data.transforms import to_model_input
from prognosis_cache.errors import DecodeError


@dataclass
class Batch:
    """Rows that decoded (`rows`, `pixels`) and rows that failed (`failed`: row → reason), in request order."""

    rows: list[int]
    pixels: torch.Tensor
    failed: dict[int, str]


class ImageRows(Dataset):
    """Items are (row, tensor or None, reason) so a bad file is data, not an exception."""

    def __init__(self, paths: Sequence[Path], rows: Sequence[int], pre: Preprocess) -> None:
        self.paths = list(paths)
        self.rows = list(rows)
        self.pre = pre

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        row = self.rows[i]
        try:
            return row, to_model_input(decode_image(self.paths[row]), self.pre), ""
        except DecodeError as exc:
            return row, None, exc.message
        except Exception as exc:  # a decoder bug must not take a 10,000-image run down with it
            return row, None, f"{type(exc).__name__}: {exc}"


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> Batch:
    ok = [(r, t) for r, t, _ in items if t is not None]
    pixels = torch.stack([t for _, t in ok]) if ok else torch.empty(0)
    return Batch(rows=[r for r, _ in ok], pixels=pixels, failed={r: why for r, t, why in items if t is None})


def batched_images(paths: Sequence[Path], rows: Sequence[int], pre: Preprocess, *, batch_size: int = 32,
                   workers: int = 0, pin_memory: bool = False, prefetch: int = 2,
                   shuffle_seed: int | None = None) -> DataLoader:
    """Batches over `rows` (indices into `paths`): `Batch.rows` says which rows each batch holds.

    Without `shuffle_seed` (embedding) batch b always holds rows[b*B:(b+1)*B]. The fixed boundaries matter: a
    resumed embed recomputes exactly the batches it lost, with the same composition, so its features are
    bit-identical to an uninterrupted run. With `shuffle_seed` (training) the order is a seeded permutation per epoch,
    reproducible from the seed.
    """
    generator = None
    if shuffle_seed is not None:
        generator = torch.Generator()
        generator.manual_seed(shuffle_seed)
    return DataLoader(
        ImageRows(paths, rows, pre),
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=generator,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
    )
