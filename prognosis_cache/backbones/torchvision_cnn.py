"""torchvision CNNs (ResNet, DenseNet) as feature extractors: the global-average-pooled last conv map.

The classifier head is replaced by Identity, so torchvision's own forward ends at the pooled vector (ResNet: avgpool
of layer4; DenseNet: ReLU(norm5) then adaptive average pool). The architecture classes are torchvision's, built from
the shipped JSON (`constructor`, block / layers or DenseNet growth / blocks), so random, file and published weights
all go through the same module tree. Nothing here reshapes with `.view`, so channels_last inputs stay fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_weight
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from prognosis_cache.backbones.build import (
    FeatureNet,
    WeightsChoice,
    availability_check,
    is_offline,
    load_state_into,
    missing_weights_error,
    read_state_dict,
    seeded,
    sha256_of_files,
    single_weight_file,
)
from prognosis_cache.backbones.registry import BackboneSpec, family_builder

FAMILY = "torchvision"
HEAD_KEYS = ("fc.", "classifier.")  # the ImageNet classifier in published checkpoints; we drop it
BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
# torchvision's published DenseNet checkpoints predate the ban on '.' in module names ('norm.1' for 'norm1'); the
# same rename torchvision.models.densenet applies privately while loading (its helper also downloads, so we cannot
# call it for a local file).
OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)




def make_architecture(arch: dict[str, Any]) -> nn.Module:
    """The torchvision module tree described by the JSON, classifier head removed."""
    if arch["constructor"] == "resnet":
        net: nn.Module = ResNet(BLOCKS[arch["block"]], arch["layers"])
        net.fc = nn.Identity()
    elif arch["constructor"] == "densenet":
        net = DenseNet(
            growth_rate=arch["growth_rate"],
            block_config=tuple(arch["block_config"]),
            num_init_features=arch["num_init_features"],
        )
        net.classifier = nn.Identity()
    else:
        raise ValueError(f"unknown torchvision constructor {arch['constructor']!r}")
    return net


def modernise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old DenseNet keys ('...denselayer1.norm.1.weight' -> '...denselayer1.norm1.weight')."""
    renamed = {}
    for key, value in state.items():
        match = OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def cached_checkpoint(spec: BackboneSpec) -> Path:
    """Where torch.hub keeps the published checkpoint of `spec.source` (a torchvision weights enum name)."""
    url = get_weight(spec.source).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


@availability_check(FAMILY)
def published_weights_present(spec: BackboneSpec) -> bool:
    return cached_checkpoint(spec).is_file()


def _published_state(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor], Path]:
    """The published checkpoint from the torch hub cache, downloaded only when online."""
    file = cached_checkpoint(spec)
    if file.is_file():
        return read_state_dict(file), file
    if is_offline():
        raise missing_weights_error(
            spec,
            f"{file} is not in the torch hub cache and HF_HUB_OFFLINE=1 forbids downloading",
            f"`python -c \"import torchvision; torchvision.models.get_weight('{spec.source}').get_state_dict()\"` "
            f"(it fills {file.parent})",
        )
    try:
        return get_weight(spec.source).get_state_dict(progress=False, check_hash=True), file
    except Exception as exc:  # any network / disk failure becomes the same actionable message
        raise missing_weights_error(spec, f"download failed ({exc})", f"the download of {spec.source}") from exc


@family_builder(FAMILY)
def build(spec: BackboneSpec, arch: dict[str, Any], choice: WeightsChoice) -> tuple[nn.Module, str]:
    # weights are resolved before the (possibly slow) architecture is built, so a missing file fails at once
    state: dict[str, torch.Tensor] | None = None
    if choice.kind == "path":
        assert choice.path is not None
        file = choice.path if choice.path.is_file() else single_weight_file(choice.path)
        state, weights_id = read_state_dict(file), sha256_of_files([file])
    elif choice.kind == "auto":
        state, file = _published_state(spec)
        weights_id = f"torchvision:{spec.source}"
    else:
        weights_id = f"random:{choice.seed}"
    with seeded(choice.seed):
        net = make_architecture(arch)
    if state is not None:
        load_state_into(net, modernise_keys(state), file, ignorable=HEAD_KEYS)
    return FeatureNet(net), weights_id
