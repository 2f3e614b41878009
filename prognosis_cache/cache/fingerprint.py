"""The cache fingerprint: a hash of everything that changes the numbers in /features.

Two caches with equal fingerprints hold interchangeable features; readers refuse to mix caches whose fingerprints
differ. The canonical JSON is stored beside the hash so anyone can see *what* differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# What decoding does to every image before the backbone's own preprocessing. Changing any of it changes features,
# so it is part of the fingerprint (bump the version when decode.py's behaviour changes).
DECODE_RULES = {
    "version": 1,
    "raster": "Pillow, 8/16-bit grayscale (colour → luminance)",
    "dicom": "modality LUT, then VOI LUT / first window, MONOCHROME1 inverted, first frame of multi-frame",
    "normalisation": "per-image min-max to [0,1]",
    "channels": "grayscale replicated to 3 channels after resize",
    "resize": "Pillow float resize of the shorter side (antialiased), centre crop, clip to [0,1]",
}


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: the same content always gives the same bytes, hence the same hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint_of(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `fields`, hex."""
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


def fingerprint_fields(backbone: dict[str, Any], weights_id: str, dtype: str) -> dict[str, Any]:
    """The fields hashed into a cache's fingerprint: backbone entry, weights identity, decode rules, feature dtype."""
    return {"backbone": backbone, "weights": weights_id, "decode": DECODE_RULES, "dtype": dtype}
