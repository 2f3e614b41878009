"""Registry preprocessing: shorter-side resize, centre crop, 3 channels, per-channel mean/std."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from prognosis_cache.backbones.registry import Preprocess
from prognosis_cache.data.transforms import center_crop, resize_shorter_side, to_model_input

PRE = Preprocess(resize=32, crop=28, interpolation="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def test_shape_channels_and_normalisation():
    img = np.random.default_rng(0).random((64, 80), dtype=np.float32)
    x = to_model_input(img, PRE)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    # every channel is the same grayscale image, normalised by its own mean/std
    base = x[0] * 0.2 + 0.5
    torch.testing.assert_close(x[1] * 0.25 + 0.4, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(x[2] * 0.5 + 0.3, base, atol=1e-5, rtol=0)
    assert base.min() >= 0 and base.max() <= 1


@pytest.mark.parametrize("shape", [(64, 80), (90, 45)])
def test_resize_matches_torchvision_within_interpolation_noise(shape):
    img = np.random.default_rng(1).random(shape, dtype=np.float32)
    ours = resize_shorter_side(img, 32, "bilinear")
    ref = tvf.resize(torch.from_numpy(img)[None], [32], interpolation=InterpolationMode.BILINEAR, antialias=True)[0]
    assert ours.shape == tuple(ref.shape)
    assert np.abs(ours - ref.numpy()).mean() < 0.02


def test_crop_is_centred_and_pads_small_images():
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    np.testing.assert_array_equal(center_crop(img, 2), img[2:4, 2:4])
    padded = center_crop(np.ones((2, 2), np.float32), 4)
    assert padded.shape == (4, 4) and padded.sum() == 4 and padded[1:3, 1:3].sum() == 4


def test_already_right_size_is_not_resampled():
    img = np.random.default_rng(2).random((32, 40), dtype=np.float32)
    np.testing.assert_array_equal(resize_shorter_side(img, 32, "bicubic"), img)
