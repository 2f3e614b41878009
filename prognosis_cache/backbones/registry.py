"""The backbone registry: one named entry per model, binding everything that changes its features.

Preprocessing travels with the weights (open_clip's lesson): it lives here and in the cache fingerprint, never in a
user's flag. Entries are registered once (a duplicate name is a bug, so `register` refuses it, as kaiko-ai/eva does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PEFT_METHODS = ("lora", "vera", "ia3", "bitfit")


@dataclass(frozen=True)
class Preprocess:
    """How a [0,1] 3-channel image becomes the backbone's input tensor.

    `resize` is the shorter side after resizing, `crop` the centre-crop size (square); mean/std per channel.
    """

    resize: int
    crop: int
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class PeftTargets:
    """Modules a PEFT method adapts on this backbone, or why it cannot (`refusal`)."""

    modules: tuple[str, ...] = ()
    refusal: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. feedforward_modules for IA3


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    `family` picks the builder (see `FAMILY_BUILDERS`); `source` is what that builder loads real weights from (an HF hub
    id, an open_clip hf-hub tag, a torchvision weights enum name); `arch_config` names the shipped JSON in
    `backbones/configs/` that builds the same architecture offline with random weights.
    """

    name: str
    family: str
    source: str
    revision: str | None
    preprocess: Preprocess
    feature: str  # human-readable: which layer / token / pooling / normalisation the feature is
    dim: int
    arch_config: str
    peft: dict[str, PeftTargets]
    description: str = ""
    tiny: bool = False

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything in the entry that changes the numbers (PEFT targets and prose do not)."""
        return {
            "name": self.name,
            "family": self.family,
            "source": self.source,
            "revision": self.revision,
            "arch_config": self.arch_config,
            "preprocess": dataclasses.asdict(self.preprocess),
            "feature": self.feature,
            "dim": self.dim,
        }


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add an entry; a second entry of the same name is a programming error."""
    if spec.name in REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


FAMILY_BUILDERS: dict[str, Callable[..., Any]] = {}


def family_builder(family: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering the function that builds a family's models (refuses duplicates)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if family in FAMILY_BUILDERS:
            raise ValueError(f"family {family!r} has two builders")
        FAMILY_BUILDERS[family] = fn
        return fn

    return wrap
