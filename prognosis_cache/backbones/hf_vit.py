"""Hugging Face transformers vision towers: DINOv2 (`Dinov2Model`) and CLIP (`CLIPVisionModelWithProjection`).

DINOv2's feature is `pooler_output` (the last layer's CLS token after the final layernorm); CLIP's is `image_embeds`
(CLS → post_layernorm → visual_projection, not L2-normalised). The shipped JSON is the hub `config.json` of the same
architecture (for CLIP: the vision_config plus projection_dim), so a random build is the real module tree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    PreTrainedModel,
)

from prognosis_cache.backbones.build import (
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
    weight_files_in,
)
from prognosis_cache.backbones.registry import BackboneSpec, family_builder
from prognosis_cache.errors import WeightsError

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# keys of a full CLIPModel checkpoint that the vision tower does not use
CLIP_TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale")
# fields whose disagreement means a folder holds another architecture than the entry names
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "projection_dim")


class HFVisionFeatures(nn.Module):
    """forward(pixel_values) -> the `output` field of the transformers model kept as `net`."""

    def __init__(self, net: PreTrainedModel, output: str) -> None:
        super().__init__()
        self.net = net
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net(pixel_values=x), self.output)


FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], str, tuple[str, ...]]] = {
    "hf-dinov2": (Dinov2Config, Dinov2Model, "pooler_output", ()),
    "hf-clip": (CLIPVisionConfig, CLIPVisionModelWithProjection, "image_embeds", CLIP_TEXT_KEYS),
}


def _check_same_architecture(spec: BackboneSpec, arch: dict[str, Any], config: PretrainedConfig, where: str) -> None:
    wrong = {
        f: (getattr(config, f, None), arch[f]) for f in ARCH_FIELDS if f in arch and getattr(config, f, None) != arch[f]
    }
    if wrong:
        raise WeightsError(
            f"{where} holds another architecture than {spec.name!r}: "
            + ", ".join(f"{f}={got} (expected {want})" for f, (got, want) in wrong.items()),
            "pass the weights of this backbone, or pick the registry entry that matches them",
        )


def clip_config_overrides(config_file: Path) -> dict[str, Any]:
    """The projection width of a whole-CLIPModel config whose vision_config does not repeat it.

    Configs saved by old transformers versions (as some hub CLIP checkpoints were) keep `projection_dim` only at the
    top level; CLIPVisionConfig reads just the vision_config and would fall back to its default of 512.
    """
    config = json.loads(config_file.read_text())
    vision = config.get("vision_config") or {}
    if config.get("model_type") == "clip" and "projection_dim" not in vision and "projection_dim" in config:
        return {"projection_dim": config["projection_dim"]}
    return {}


def _from_pretrained(
    spec: BackboneSpec, arch: dict[str, Any], where: str, config_file: Path, **kwargs: Any
) -> PreTrainedModel:
    _, model_cls, _, _ = FAMILIES[spec.family]
    kwargs |= clip_config_overrides(config_file)
    try:
        net, info = model_cls.from_pretrained(where, output_loading_info=True, **kwargs)
    except RuntimeError as exc:  # transformers' report of tensors whose shapes do not fit
        raise WeightsError(
            f"weights at {where!r} do not fit {spec.name!r}: {str(exc)[-300:]}",
            "check that the checkpoint belongs to this backbone entry",
        ) from exc
    _check_same_architecture(spec, arch, net.config, where)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise WeightsError(
            f"weights at {where!r} leave {len(missing)} parameters of {spec.name!r} uninitialised (e.g. {missing[:3]})",
            "check that the checkpoint belongs to this backbone entry",
        )
    return net


def _published(spec: BackboneSpec, arch: dict[str, Any]) -> tuple[PreTrainedModel, str]:
    """Load from the HF cache (or the hub when online); identity `hf:<repo>@<commit>`."""
    offline = is_offline()
    reason = "not in the HF cache and HF_HUB_OFFLINE=1 forbids downloading" if offline else "download failed"
    try:
        config_file = hf_hub_download(
            spec.source, "config.json", revision=spec.revision, cache_dir=hf_cache_dir(), local_files_only=offline
        )
        commit = Path(config_file).parent.name  # …/snapshots/<commit>/config.json
        net = _from_pretrained(
            spec,
            arch,
            spec.source,
            Path(config_file),
            revision=commit,
            cache_dir=hf_cache_dir(),
            local_files_only=offline,
        )
    except WeightsError:
        raise
    except Exception as exc:  # hub / network / missing-file errors of several libraries: one actionable message
        raise missing_weights_error(spec, f"{reason} ({type(exc).__name__})", hf_download_hint(spec.source)) from exc
    return net, f"hf:{spec.source}@{commit}"


@availability_check("hf-dinov2")
@availability_check("hf-clip")
def published_weights_present(spec: BackboneSpec) -> bool:
    def cached(filename: str) -> bool:
        found = try_to_load_from_cache(spec.source, filename, cache_dir=hf_cache_dir(), revision=spec.revision)
        return isinstance(found, str)

    return cached("config.json") and any(cached(f) for f in HF_WEIGHT_FILES)


def build(spec: BackboneSpec, arch: dict[str, Any], choice: WeightsChoice) -> tuple[nn.Module, str]:
    config_cls, model_cls, output, ignorable = FAMILIES[spec.family]
    if choice.kind == "auto":
        net, weights_id = _published(spec, arch)
    elif choice.kind == "path" and choice.path is not None and (choice.path / "config.json").is_file():
        net = _from_pretrained(spec, arch, str(choice.path), choice.path / "config.json", local_files_only=True)
        weights_id = sha256_of_files(weight_files_in(choice.path))
    else:
        with seeded(choice.seed):
            net = model_cls(config_cls(**arch))
        weights_id = f"random:{choice.seed}"
        if choice.kind == "path":
            assert choice.path is not None
            file = choice.path if choice.path.is_file() else single_weight_file(choice.path, HF_WEIGHT_FILES)
            load_state_into(net, read_state_dict(file), file, ignorable=ignorable)
            weights_id = sha256_of_files([file])
    return HFVisionFeatures(net, output), weights_id


family_builder("hf-dinov2")(build)
family_builder("hf-clip")(build)
