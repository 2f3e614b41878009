"""Image files → float32 (H, W) arrays: where file formats, bit depths and DICOM semantics end.

Why this is strict: a cache row is only as trustworthy as the pixels behind it. A 16-bit PNG squashed to 8
bits, a MONOCHROME1 radiograph left inverted, or a windowed DICOM read without its window all silently change
what a backbone sees, and the error would be frozen into every cached feature. So the rules below are
explicit, and every failure is a `DecodeError` naming the file (embed records it in `/failed` and goes on)
rather than a library exception that would stop a long run.

Rules
-----
* Rasters (PNG, JPEG, TIFF, ...) through Pillow, loaded fully so that truncated files fail here. The native
  bit depth is kept (8-bit, 16-bit 'I;16*', 32-bit 'I', float 'F'); colour images become luminance in float
  (ITU-R BT.601 weights), because Pillow's own convert("L") would first cut a 16-bit image to 8 bits.
* DICOM (suffix .dcm/.dicom, or the 'DICM' magic at byte 128 whatever the suffix) through pydicom:
  `pixel_array` (compressed transfer syntaxes decode through the installed pylibjpeg plugins), then the
  Modality LUT (rescale slope/intercept), then the VOI LUT (VOI LUT sequence, else the *first* window
  centre/width), then MONOCHROME1 is flipped so that, as in MONOCHROME2, higher = brighter = denser.
  Multi-frame: the first frame is taken (a chest radiograph has one frame; a multi-frame file is most often a
  stack of re-exposures, and the first is the acquisition of record). RGB DICOM → luminance.
* `decode_image` then min-max normalises each image to [0, 1] (the normalisation of the reference study); a
  constant image carries no information and is refused.

No resizing and no grayscale → 3-channel here: those belong to the backbone's preprocessing
(`data/transforms.py`), which travels with the weights in the cache fingerprint.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from prognosis_cache.errors import DecodeError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DECODABLE_SUFFIXES: frozenset[str] = DICOM_SUFFIXES | RASTER_SUFFIXES

# ITU-R BT.601 luma weights, the ones Pillow uses for convert("L"); applied in float so 16-bit data keeps its
# depth.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

_HINT = "check the file (re-export it as PNG or uncompressed DICOM) or remove its row from the manifest"


def _fail(path: Path, reason: str) -> DecodeError:
    # One line: embed stores the message per failed image, a traceback-like multi-line text would be
    # unreadable there.
    return DecodeError(f"{path}: {' '.join(reason.split())}", _HINT)


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM suffix, or the 'DICM' magic after the 128-byte preamble (whatever the suffix)."""
    p = Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    return _has_dicm_magic(p)


def _has_dicm_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ _LUMA


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode so that truncated / corrupt data raises now
            mode = im.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in mode or "transparency" in im.info else "RGB")
                mode = im.mode
            arr = np.asarray(im)
    except Image.UnidentifiedImageError:
        raise _fail(path, "unknown image format (not PNG/JPEG/TIFF and no DICOM 'DICM' marker)") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on bad data
        raise _fail(path, f"cannot decode image data ({type(exc).__name__}: {exc})") from exc
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        return _luminance(arr)
    if mode in ("LA", "La"):
        return arr[..., 0].astype(np.float64)
    if arr.ndim != 2:
        raise _fail(path, f"unsupported Pillow mode {mode!r} with shape {arr.shape}")
    return arr.astype(np.float64)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        # A file named .dcm without the 128-byte preamble is still often DICOM (old exporters): force it, and
        # let a non-DICOM file fail below on its missing pixel data.
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except Exception as exc:
        raise _fail(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}) and not _has_dicm_magic(path):
            raise _fail(path, "not a DICOM file (no 'DICM' marker, no file meta, no pixel data)")
        raise _fail(path, "DICOM file has no pixel data (PixelData element missing)")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # unsupported transfer syntax, truncated pixel data, missing Rows/Columns ...
        reason = f"cannot decode DICOM pixel data, transfer syntax {tsyntax} ({type(exc).__name__}: {exc})"
        raise _fail(path, reason) from exc
    try:
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        if frames > 1:
            arr = arr[0]  # documented rule: the first frame
        if samples > 1:
            # Colour radiographs are screen captures; modality / VOI LUTs are defined for grayscale only.
            return _luminance(arr)
        out = apply_modality_lut(arr, ds)
        out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
    except Exception as exc:
        raise _fail(path, f"cannot apply the DICOM modality/VOI LUT ({type(exc).__name__}: {exc})") from exc
    out = np.asarray(out, dtype=np.float64)
    if photometric == "MONOCHROME1":
        # Flip within the image's own range: only the direction matters, since decode_image min-max
        # normalises.
        out = out.max() + out.min() - out
    return out


def read_raw(path: str | os.PathLike) -> np.ndarray:
    """The decoded image before min-max: float32 (H, W), modality/VOI LUTs applied, MONOCHROME1 flipped.

    Raises DecodeError (naming the file) for a missing/empty file, unknown format, corrupt or truncated data,
    missing pixel data, an unsupported transfer syntax, or non-finite values.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise _fail(p, f"cannot read file ({exc.strerror or exc})") from exc
    if not p.is_file():
        raise _fail(p, "not a regular file")
    if size == 0:
        raise _fail(p, "file is empty (0 bytes)")
    arr = _read_dicom(p) if is_dicom(p) else _read_raster(p)
    if arr.ndim != 2 or arr.size == 0:
        raise _fail(p, f"expected a 2-D image, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise _fail(p, "image contains NaN or infinite values")
    return arr.astype(np.float32)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """float32 array (H, W), per-image min-max normalised to [0, 1] (the paper's normalisation).

    Raises DecodeError (naming the file) for everything `read_raw` refuses, and for a constant image.

    See the module docstring for the format rules (bit depth kept, DICOM LUTs and polarity, first frame of a
    multi-frame file). A constant image is refused: min-max is undefined and a backbone would see no anatomy.
    """
    raw = read_raw(path).astype(np.float64)
    lo, hi = float(raw.min()), float(raw.max())
    if hi <= lo:
        raise _fail(Path(path), f"image is constant (every pixel = {lo:g}); nothing to normalise")
    return ((raw - lo) / (hi - lo)).astype(np.float32)
