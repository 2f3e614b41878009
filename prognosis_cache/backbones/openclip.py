"""open_clip vision towers built from an open_clip model config: BiomedCLIP's `TimmModel` around timm ViT-B/16.

We build only the visual tower with open_clip's own factory step (`open_clip.model._build_vision_tower`, the call
`create_model` makes for the `vision_cfg` of `open_clip_config.json`), never the text tower: BiomedCLIP's text side
is a PubMedBERT whose config would have to come from the hub, and a feature cache only needs images. Published
weights are the `visual.*` tensors of the hub checkpoint. The feature is the tower's output: timm's default token
pooling (the CLS token after the final norm, since `timm_pool` "" keeps the network default) → linear projection
(post-projection, not L2-normalised).

Tiny configs may add `trunk_input_size` ({img_size, patch_size}) which is applied with timm's `set_input_size`,
because open_clip's TimmModel does not pass an image size to timm; the real BiomedCLIP config does not use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from torch import nn

from prognosis_cache.backbones.build import (
    FeatureNet,
    WeightsChoice,
    availability_check,
    hf_cache_dir,
    hf_download_hint,
    is_offline,
    load_state_into,
    missing_weights_error,
    read_state_dict,
    seeded,
    sha256_of_files,
    single_weight_file,
)
from prognosis_cache.backbones.registry import BackboneSpec, family_builder

FAMILY = "open_clip"
HUB_PREFIX = "hf-hub:"
# the names open_clip looks for in a hub repo / local folder, in its order of preference
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)




def make_architecture(arch: dict[str, Any]) -> nn.Module:
    """open_clip's visual tower for the `embed_dim` + `vision_cfg` of an open_clip model config."""
    visual = _build_vision_tower(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"]))
    if "trunk_input_size" in arch:
        size = arch["trunk_input_size"]
        visual.trunk.set_input_size(img_size=size["img_size"], patch_size=size["patch_size"])
    return visual


def repo_id(spec: BackboneSpec) -> str:
    return spec.source.removeprefix(HUB_PREFIX)


@availability_check(FAMILY)
def published_weights_present(spec: BackboneSpec) -> bool:
    return any(
        isinstance(try_to_load_from_cache(repo_id(spec), name, cache_dir=hf_cache_dir(), revision=spec.revision), str)
        for name in CHECKPOINT_NAMES
    )


def _published_checkpoint(spec: BackboneSpec) -> tuple[str, str]:
    """(local path of the hub checkpoint, its commit), fetching it only when online."""
    offline = is_offline()
    for name in CHECKPOINT_NAMES:
        try:
            path = hf_hub_download(
                repo_id(spec), name, revision=spec.revision, cache_dir=hf_cache_dir(), local_files_only=offline
            )
        except EntryNotFoundError:  # also raised offline for a file not in the cache: try open_clip's next name
            continue
        except Exception as exc:  # network / auth / disk: one actionable message
            raise missing_weights_error(
                spec, f"download failed ({type(exc).__name__})", hf_download_hint(repo_id(spec))
            ) from exc
        return path, Path(path).parent.name  # …/snapshots/<commit>/<file>
    reason = "not in the HF cache and HF_HUB_OFFLINE=1 forbids downloading" if offline else "no checkpoint in repo"
    raise missing_weights_error(spec, reason, hf_download_hint(repo_id(spec)))


@family_builder(FAMILY)
def build(spec: BackboneSpec, arch: dict[str, Any], choice: WeightsChoice) -> tuple[nn.Module, str]:
    # weights are resolved before the (possibly slow) architecture is built, so a missing file fails at once
    file: Path | None = None
    if choice.kind == "path":
        assert choice.path is not None
        file = choice.path if choice.path.is_file() else single_weight_file(choice.path, CHECKPOINT_NAMES)
        weights_id = sha256_of_files([file])
    elif choice.kind == "auto":
        path, commit = _published_checkpoint(spec)
        file, weights_id = Path(path), f"hf:{repo_id(spec)}@{commit}"
    else:
        weights_id = f"random:{choice.seed}"
    with seeded(choice.seed):
        visual = make_architecture(arch)
    if file is not None:
        # a full CLIP checkpoint keeps the tower under `visual.` (text tower and logit scale are not needed);
        # load_state_into also accepts our wrapper's own `net.` keys
        state = read_state_dict(file)
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        load_state_into(visual, state, file)
    return FeatureNet(visual), weights_id
