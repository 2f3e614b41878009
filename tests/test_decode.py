"""Every decoder path of data/decode.py against arrays the test wrote itself, and every failure mode."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from images import (
    minmax,
    pattern,
    write_dicom,
    write_dicom_jpeg,
    write_dicom_transfer_syntax,
    write_dicom_without_pixels,
    write_jpeg,
    write_png,
    write_tiff,
)
from PIL import Image

from prognosis_cache.data.decode import DECODABLE_SUFFIXES, decode_image, read_raw
from prognosis_cache.errors import DecodeError


def assert_normalised(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.dtype == np.float32
    assert img.shape == shape
    assert img.min() == 0.0
    assert img.max() == 1.0


# ------------------------------------------------------------------------------------------------ rasters
def test_png_8bit(tmp_path):
    a = pattern((24, 32), hi=200)
    img = decode_image(write_png(tmp_path / "a.png", a))
    assert_normalised(img, a.shape)
    np.testing.assert_allclose(img, minmax(a), atol=1e-6)


def test_png_16bit_keeps_values_beyond_255(tmp_path):
    a = pattern((24, 32), hi=60000, dtype=np.uint16)
    path = write_png(tmp_path / "a16.png", a)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit file, not silently 8-bit
    raw = read_raw(path)
    np.testing.assert_array_equal(raw, a.astype(np.float32))
    assert raw.max() == 60000
    # The fine steps of a 16-bit image survive normalisation (an 8-bit detour would leave <= 256 levels).
    assert len(np.unique(decode_image(path))) > 256


def test_rgb_png_becomes_luminance(tmp_path):
    rgb = np.stack([pattern(seed=1), pattern(seed=2), pattern(seed=3)], axis=-1)
    img = decode_image(write_png(tmp_path / "rgb.png", rgb))
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(img, minmax(lum), atol=1e-6)


def test_jpeg_close_to_source(tmp_path):
    a = pattern((48, 64), hi=255)
    img = decode_image(write_jpeg(tmp_path / "a.jpg", a))
    assert img.shape == a.shape and img.dtype == np.float32
    assert np.abs(img - minmax(a)).mean() < 0.05  # lossy, but the same picture


def test_tiff_16bit_and_float(tmp_path):
    a = pattern((20, 30), hi=50000, dtype=np.uint16)
    np.testing.assert_array_equal(read_raw(write_tiff(tmp_path / "a.tif", a)), a.astype(np.float32))
    f = (pattern((20, 30), hi=1000).astype(np.float32) - 300.5) / 7
    np.testing.assert_allclose(read_raw(write_tiff(tmp_path / "f.tiff", f)), f, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ DICOM
def test_dicom_monochrome2_exact(tmp_path):
    a = pattern((24, 32), hi=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "m2.dcm", a, bits_stored=12)
    np.testing.assert_array_equal(read_raw(path), a.astype(np.float32))
    np.testing.assert_allclose(decode_image(path), minmax(a), atol=1e-6)


def test_dicom_monochrome1_is_inverted_monochrome2(tmp_path):
    a = pattern((24, 32), hi=4095, dtype=np.uint16)
    mono2 = decode_image(write_dicom(tmp_path / "m2.dcm", a, bits_stored=12))
    mono1 = decode_image(write_dicom(tmp_path / "m1.dcm", a, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_rescale_slope_intercept(tmp_path):
    a = pattern((16, 16), hi=3000, dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", a, bits_stored=12, rescale=(2.0, -1024.0))
    np.testing.assert_allclose(read_raw(path), a * 2.0 - 1024.0)


def test_dicom_window_clips_outside_values(tmp_path):
    a = pattern((32, 32), hi=4000, dtype=np.uint16)
    centre, width = 2000.0, 1000.0  # window [1500, 2500]
    raw = read_raw(write_dicom(tmp_path / "w.dcm", a, bits_stored=12, window=(centre, width)))
    below, above = a <= 1400, a >= 2600
    inside = (a > 1600) & (a < 2400)
    assert below.any() and above.any() and inside.any()
    assert np.all(raw[below] == raw.min())
    assert np.all(raw[above] == raw.max())
    assert np.all((raw[inside] > raw.min()) & (raw[inside] < raw.max()))
    # Inside the window the mapping is increasing: order of stored values is kept.
    order = np.argsort(a[inside], kind="stable")
    assert np.all(np.diff(raw[inside][order]) >= 0)


def test_dicom_rle_lossless(tmp_path):
    a = pattern((24, 32), hi=65535, dtype=np.uint16)
    path = write_dicom(tmp_path / "rle.dcm", a, rle=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(read_raw(path), a.astype(np.float32))


def test_dicom_jpeg_baseline(tmp_path):
    a = pattern((48, 64), hi=255)
    path = write_dicom_jpeg(tmp_path / "j.dcm", a)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    img = decode_image(path)
    assert img.shape == a.shape
    assert np.abs(img - minmax(a)).mean() < 0.05


def test_dicom_multiframe_takes_first_frame(tmp_path):
    frames = np.stack([pattern((16, 20), hi=1000, seed=s, dtype=np.uint16) for s in (1, 2, 3)])
    frames[1] = frames[1][::-1]  # make later frames clearly different
    path = write_dicom(tmp_path / "mf.dcm", frames, bits_stored=16)
    assert int(pydicom.dcmread(path).NumberOfFrames) == 3
    raw = read_raw(path)
    np.testing.assert_array_equal(raw, frames[0].astype(np.float32))
    assert not np.array_equal(raw, frames[1].astype(np.float32))


@pytest.mark.parametrize("name", ["IM0001", "scan.img", "export.png"])
def test_dicom_recognised_by_magic_whatever_the_suffix(tmp_path, name):
    a = pattern((16, 16), hi=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / name, a, bits_stored=12)
    np.testing.assert_array_equal(read_raw(path), a.astype(np.float32))


def test_decodable_suffixes():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"} <= DECODABLE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in DECODABLE_SUFFIXES)


# ------------------------------------------------------------------------------------------------ failures
def _bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncated_png(path):
    write_png(path, pattern((64, 64), hi=255))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


FAILURES = {
    "missing": (lambda p: p / "nope.png", "cannot read"),
    "empty": (lambda p: _bytes(p / "empty.png", b""), "empty"),
    "truncated png": (lambda p: _truncated_png(p / "trunc.png"), "cannot decode"),
    "garbage png": (lambda p: _bytes(p / "g.png", b"this is not an image" * 20), "unknown"),
    "garbage dcm": (lambda p: _bytes(p / "g.dcm", b"\x00\x01garbage" * 50), "not a DICOM file"),
    "dicom without pixels": (lambda p: write_dicom_without_pixels(p / "sr.dcm"), "no pixel data"),
    "unsupported transfer syntax": (
        lambda p: write_dicom_transfer_syntax(p / "ts.dcm", "1.2.3.4.5.6.7", b"\xff" * 64), "transfer syntax"),
    "corrupt jpeg 2000": (
        lambda p: write_dicom_transfer_syntax(p / "j2k.dcm", "1.2.840.10008.1.2.4.90", b"\x00" * 64),
        "cannot decode"),
    "constant png": (lambda p: write_png(p / "c.png", np.full((8, 8), 7, np.uint8)), "constant"),
    "constant dicom": (lambda p: write_dicom(p / "c.dcm", np.full((8, 8), 900, np.uint16)), "constant"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_raise_decode_error_naming_the_file(tmp_path, case):
    make, reason = FAILURES[case]
    path = make(tmp_path)
    with pytest.raises(DecodeError) as info:
        decode_image(path)
    message = info.value.message
    assert str(path) in message
    assert reason.lower() in message.lower()
    assert "\n" not in message  # one line: embed stores it per failed image
