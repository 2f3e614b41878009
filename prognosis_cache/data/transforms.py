"""From a decoded [0,1] grayscale image to a backbone's input tensor, following its registry `Preprocess`.

Resizing uses Pillow on the single float channel ('F' mode; antialiased when shrinking), as the HF image processors
and open_clip do, and the result is replicated to 3 channels afterwards: the same numbers as resizing an RGB copy,
at a third of the cost. Pillow and numpy run single-threaded, which matters: torch's intra-op threads on tiny
per-image tensors cost more in synchronisation than the work itself and fight the model's forward for the cores.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from prognosis_cache.backbones.registry import Preprocess

_MODES = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
          "nearest": Image.Resampling.NEAREST}


def resize_shorter_side(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Resize so the shorter side is `size`, keeping the aspect ratio (rounded as torchvision does)."""
    h, w = image.shape
    if min(h, w) == size:
        return image
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize(
        (new_w, new_h), resample=_MODES[interpolation])
    return np.asarray(resized, dtype=np.float32)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to size × size, zero-padding first when the image is smaller (torchvision's rule)."""
    h, w = image.shape
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        h, w = image.shape
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image[top: top + size, left: left + size]


def to_model_input(image01: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(H, W) float image in [0,1] → normalised (3, crop, crop) float32 tensor."""
    x = center_crop(resize_shorter_side(image01, pre.resize, pre.interpolation), pre.crop)
    x = np.clip(x, 0.0, 1.0)  # bicubic overshoots slightly past the [0,1] range
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((x[None] - mean) / std)
