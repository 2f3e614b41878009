"""Every registry entry: the study's 9 backbones (Ruffini et al., CMPB 2025) and one tiny test entry per family.

PEFT targets are module names relative to the model `build_backbone` returns, in peft's `target_modules` list
semantics (an entry matches a module whose full name equals it or ends with "." + it). The study's choices:
- LoRA: q/k/v + fc1/fc2 on DINOv2 and BiomedCLIP, q/k/v on CLIP and PubMedCLIP, the stem conv on CNNs.
  A CNN stem is named in full (`net.conv1`, `net.features.conv0`) because a bare `conv1` would also match every
  ResNet block's conv1.
- VeRA: the same-shape attention projections of ViTs; refused for CNNs (peft's VeRA adapts only Linear layers).
- IA3: the feed-forward layers of ViTs, fc2 listed as feed-forward (its *input*, the FFN activation, is scaled);
  on CNNs the stem conv, not feed-forward, i.e. one learned scale per stem output channel (peft's IA3 supports
  Conv2d). That keeps every strategy applicable to every backbone with the stem as the one adapted CNN layer.
- BitFit: `modules=()` means "every bias"; all our models have biases (ResNets: the BatchNorm shifts).
"""

from __future__ import annotations

from prognosis_cache.backbones.registry import BackboneSpec, PeftTargets, Preprocess, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# torchvision's ImageNet V1 eval transform: resize 256 bilinear, centre crop 224
TORCHVISION_PRE = Preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
DINOV2_PRE = Preprocess(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
CLIP_PRE = Preprocess(224, 224, "bicubic", CLIP_MEAN, CLIP_STD)

RAW = "not normalised (raw features)"
VERA_CNN_REFUSAL = (
    "VeRA cannot adapt Conv2d; peft's VeRA shares one pair of random matrices across same-shape Linear layers, "
    "and the study adapts only the stem conv of CNNs"
)


def cnn_peft(stem: str) -> dict[str, PeftTargets]:
    return {
        "lora": PeftTargets(modules=(stem,)),
        "vera": PeftTargets(refusal=VERA_CNN_REFUSAL),
        "ia3": PeftTargets(modules=(stem,), extra={"feedforward_modules": ()}),
        "bitfit": PeftTargets(),
    }


def vit_peft(attention: tuple[str, ...], lora: tuple[str, ...]) -> dict[str, PeftTargets]:
    return {
        "lora": PeftTargets(modules=lora),
        "vera": PeftTargets(modules=attention),
        "ia3": PeftTargets(modules=("fc1", "fc2"), extra={"feedforward_modules": ("fc2",)}),
        "bitfit": PeftTargets(),
    }


HF_QKV = ("q_proj", "k_proj", "v_proj")
DINOV2_PEFT = vit_peft(HF_QKV, (*HF_QKV, "fc1", "fc2"))
CLIP_PEFT = vit_peft(HF_QKV, HF_QKV)
BIOMEDCLIP_PEFT = vit_peft(("qkv",), ("qkv", "fc1", "fc2"))  # timm fuses q/k/v into one Linear

# ----------------------------------------------------------------------------------------------------- CNNs
for _name, _enum, _dim, _stem, _pool in (
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 512, "net.conv1", "layer4"),
    ("resnet50", "ResNet50_Weights.IMAGENET1K_V1", 2048, "net.conv1", "layer4"),
    ("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", 1024, "net.features.conv0", "ReLU(features.norm5)"),
):
    register(
        BackboneSpec(
            name=_name,
            family="torchvision",
            source=_enum,
            revision=None,
            preprocess=TORCHVISION_PRE,
            feature=f"global average pool of the last conv map ({_pool}); no projection; {RAW}",
            dim=_dim,
            arch_config=_name,
            peft=cnn_peft(_stem),
            description=f"torchvision {_name}, ImageNet-1k supervised ({_enum})",
        )
    )

# ----------------------------------------------------------------------------------------------------- DINOv2
for _size, _dim in (("small", 384), ("base", 768), ("large", 1024)):
    register(
        BackboneSpec(
            name=f"dinov2-{_size}",
            family="hf-dinov2",
            source=f"facebook/dinov2-{_size}",
            revision=None,
            preprocess=DINOV2_PRE,
            feature=f"last layer CLS token after the final layernorm (pooler_output); no projection; {RAW}",
            dim=_dim,
            arch_config=f"dinov2-{_size}",
            peft=DINOV2_PEFT,
            description=f"DINOv2 ViT-{_size[0].upper()}/14, self-supervised on LVD-142M (transformers Dinov2Model)",
        )
    )

# ----------------------------------------------------------------------------------------------------- CLIPs
CLIP_FEATURE = (
    "image_embeds: last layer CLS token → post_layernorm → visual_projection (post-projection); "
    "not L2-normalised (raw features)"
)
register(
    BackboneSpec(
        name="clip-vit-l14",
        family="hf-clip",
        source="openai/clip-vit-large-patch14",
        revision=None,
        preprocess=CLIP_PRE,
        feature=CLIP_FEATURE,
        dim=768,
        arch_config="clip-vit-l14",
        peft=CLIP_PEFT,
        description="OpenAI CLIP ViT-L/14 image tower (transformers CLIPVisionModelWithProjection)",
    )
)
register(
    BackboneSpec(
        name="pubmedclip",
        family="hf-clip",
        source="flaviagiammarino/pubmed-clip-vit-base-patch32",
        revision=None,
        preprocess=CLIP_PRE,
        feature=CLIP_FEATURE,
        dim=512,
        arch_config="pubmedclip",
        peft=CLIP_PEFT,
        description="PubMedCLIP: CLIP ViT-B/32 fine-tuned on ROCO radiology captions (image tower)",
    )
)
register(
    BackboneSpec(
        name="biomedclip",
        family="open_clip",
        source="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        revision=None,
        preprocess=CLIP_PRE,
        feature=(
            "timm ViT-B/16 CLS token after the final norm → linear projection to 512 (post-projection); "
            "not L2-normalised (raw features)"
        ),
        dim=512,
        arch_config="biomedclip",
        peft=BIOMEDCLIP_PEFT,
        description="BiomedCLIP image tower (open_clip TimmModel), trained on PMC-15M figure-caption pairs",
    )
)

# ----------------------------------------------------------------------------------------------------- tiny
# Same builders and module trees as the real entries, small enough for unit tests; no published weights.
register(
    BackboneSpec(
        name="tiny-resnet",
        family="torchvision",
        source="",
        revision=None,
        preprocess=Preprocess(64, 64, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
        feature=f"global average pool of the last conv map (layer4); no projection; {RAW}",
        dim=512,
        arch_config="tiny-resnet",
        peft=cnn_peft("net.conv1"),
        description="test entry: torchvision ResNet with one BasicBlock per stage",
        tiny=True,
    )
)
register(
    BackboneSpec(
        name="tiny-dinov2",
        family="hf-dinov2",
        source="",
        revision=None,
        preprocess=Preprocess(32, 32, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
        feature=f"last layer CLS token after the final layernorm (pooler_output); no projection; {RAW}",
        dim=32,
        arch_config="tiny-dinov2",
        peft=DINOV2_PEFT,
        description="test entry: Dinov2Model, hidden 32, 2 layers, patch 8",
        tiny=True,
    )
)
register(
    BackboneSpec(
        name="tiny-clip",
        family="hf-clip",
        source="",
        revision=None,
        preprocess=Preprocess(32, 32, "bicubic", CLIP_MEAN, CLIP_STD),
        feature=CLIP_FEATURE,
        dim=16,
        arch_config="tiny-clip",
        peft=CLIP_PEFT,
        description="test entry: CLIPVisionModelWithProjection, hidden 32, 2 layers, patch 8, projection 16",
        tiny=True,
    )
)
register(
    BackboneSpec(
        name="tiny-biomedclip",
        family="open_clip",
        source="",
        revision=None,
        preprocess=Preprocess(32, 32, "bicubic", CLIP_MEAN, CLIP_STD),
        feature="timm ViT CLS token after the final norm → linear projection to 16 (post-projection); "
        "not L2-normalised (raw features)",
        dim=16,
        arch_config="tiny-biomedclip",
        peft=BIOMEDCLIP_PEFT,
        description="test entry: open_clip TimmModel around timm test_vit (6 blocks, width 64) at 32 px, patch 8",
        tiny=True,
    )
)
