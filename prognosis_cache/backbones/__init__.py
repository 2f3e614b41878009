"""Backbones: the registry of named feature extractors and the one way to build them.

Importing this package registers every entry (catalog) and every family builder (torchvision, transformers,
open_clip), so `REGISTRY` is complete and `build_backbone(name, weights)` works for any entry.
"""

from prognosis_cache.backbones import catalog, hf_vit, openclip, torchvision_cnn  # noqa: F401  (registration)
from prognosis_cache.backbones.build import LoadedBackbone, build_backbone, get_spec, weights_available
from prognosis_cache.backbones.registry import (
    PEFT_METHODS,
    REGISTRY,
    BackboneSpec,
    PeftTargets,
    Preprocess,
)

__all__ = [
    "PEFT_METHODS",
    "REGISTRY",
    "BackboneSpec",
    "LoadedBackbone",
    "PeftTargets",
    "Preprocess",
    "build_backbone",
    "get_spec",
    "weights_available",
]
