"""Helpers that write small test images and DICOM files, for any test that needs a file on disk.

Import from a test module as `from images import ...` (pytest puts tests/ on sys.path: there is no
tests/__init__.py). Every writer returns the path it wrote so calls can be inlined.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from prognosis_cache.data.synthetic import write_dicom as _write_dicom

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def pattern(shape: tuple[int, ...] = (24, 32), hi: int = 255, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """A smooth gradient plus random texture spanning exactly [0, hi]: never constant, both extremes present."""
    rng = np.random.default_rng(seed)
    h, w = shape[-2:]
    grad = np.add.outer(np.linspace(0, 1, h), np.linspace(0, 1, w)) / 2
    base = np.broadcast_to(grad, shape) * 0.8 + 0.2 * rng.random(shape)
    base = (base - base.min()) / (base.max() - base.min())
    return np.round(base * hi).astype(dtype)


def minmax(a: np.ndarray) -> np.ndarray:
    """The reference normalisation, computed independently of the decoder (float64)."""
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def write_png(path: Path, arr: np.ndarray) -> Path:
    """uint8 → 8-bit grayscale PNG, uint16 → 16-bit PNG, (H, W, 3) uint8 → RGB PNG."""
    Image.fromarray(arr).save(path, format="PNG")
    return path


def write_jpeg(path: Path, arr: np.ndarray, quality: int = 95) -> Path:
    Image.fromarray(arr).save(path, format="JPEG", quality=quality)
    return path


def write_tiff(path: Path, arr: np.ndarray) -> Path:
    """uint16 → 16-bit TIFF ('I;16'), float32 → 32-bit float TIFF ('F')."""
    Image.fromarray(arr).save(path, format="TIFF")
    return path


def write_dicom(path: Path, stored: np.ndarray, **kwargs) -> Path:
    """An uncompressed (or, with rle=True, RLE) DICOM; kwargs as in `prognosis_cache.data.synthetic.write_dicom`
    (photometric, bits_stored, rescale=(slope, intercept), window=(centre, width), patient_id, ...)."""
    kwargs.setdefault("bits_stored", 8 * stored.dtype.itemsize)
    kwargs.setdefault("uid_key", path.name)
    _write_dicom(path, stored, **kwargs)
    return path


def write_dicom_jpeg(path: Path, arr: np.ndarray, quality: int = 95) -> Path:
    """An 8-bit MONOCHROME2 DICOM whose pixel data is a Pillow-made JPEG, encapsulated (JPEG Baseline)."""
    import pydicom
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    write_dicom(path, arr)  # a valid uncompressed file first, then swap the pixel data for the JPEG stream
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG_BASELINE
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_without_pixels(path: Path) -> Path:
    """A well-formed DICOM file (e.g. a structured report) that has no Pixel Data element."""
    import pydicom

    write_dicom(path, pattern())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_transfer_syntax(path: Path, transfer_syntax: str, payload: bytes) -> Path:
    """A DICOM claiming `transfer_syntax` with `payload` as its single encapsulated frame (for failure tests)."""
    import pydicom
    from pydicom.encaps import encapsulate

    write_dicom(path, pattern())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([payload])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path
