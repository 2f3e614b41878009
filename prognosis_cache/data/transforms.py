"""From a decoded [0,1] grayscale image to a backbone's input tensor, following its registry `Preprocess`.

Resizing happens on the single grayscale channel and the result is replicated to 3 channels afterwards: the same
numbers as resizing an RGB copy, at a third of the cost.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from prognosis_cache.backbones.registry import Preprocess

_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
          "nearest": InterpolationMode.NEAREST}


def to_model_input(image01: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """(H, W) float image in [0,1] → normalised (3, crop, crop) float32 tensor."""
    x = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None]
    x = tvf.resize(x, [pre.resize], interpolation=_MODES[pre.interpolation], antialias=True)
    x = tvf.center_crop(x, [pre.crop, pre.crop])
    x = x.clamp_(0.0, 1.0).expand(3, -1, -1)
    mean = torch.tensor(pre.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre.std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std
