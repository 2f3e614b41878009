"""The backbone registry: every entry builds offline at its real architecture, weights resolve as documented,
PEFT targets name real modules, and `pcache backbones` lists the entries."""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from peft import IA3Config, LoraConfig, VeraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import save_file
from typer.testing import CliRunner

from prognosis_cache.backbones import PEFT_METHODS, REGISTRY, build_backbone, get_spec, weights_available
from prognosis_cache.errors import PcacheError, WeightsError

STUDY = (
    "resnet18", "resnet50", "densenet121", "dinov2-small", "dinov2-base", "dinov2-large",
    "clip-vit-l14", "pubmedclip", "biomedclip",
)  # fmt: skip
TINY = ("tiny-resnet", "tiny-dinov2", "tiny-clip", "tiny-biomedclip")
# published parameter counts of the feature extractors (classifier heads removed), in millions
KNOWN_PARAMS_M = {
    "resnet18": 11.2, "resnet50": 23.5, "densenet121": 7.0, "dinov2-small": 22.0, "dinov2-base": 86.0,
    "dinov2-large": 304.0, "clip-vit-l14": 303.0, "pubmedclip": 88.0, "biomedclip": 86.0,
}  # fmt: skip
FORWARD_AT_FULL_SIZE = ("resnet18",)  # the rest are too slow on 2 CPU cores for a unit test


def batch(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    crop = get_spec(name).preprocess.crop
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@dataclass(frozen=True)
class Summary:
    """What the tests need from one build of a (possibly large) model, so each is built once and then freed."""

    n_params: int
    modules: dict[str, tuple[str, tuple[int, ...] | None]]  # name -> (class name, weight shape)
    has_bias: bool
    out_dim: int
    training: bool
    dtypes: frozenset[torch.dtype]


def output_dim(name: str, model: torch.nn.Module) -> int:
    """The feature width, from a real forward where affordable, else from the layer that produces it."""
    spec = get_spec(name)
    if spec.tiny or name in FORWARD_AT_FULL_SIZE:
        out = features(model, batch(name))
        assert out.shape[0] == 2 and out.ndim == 2
        return out.shape[1]
    if spec.family == "torchvision":  # a CNN takes a small input just as well
        return features(model, torch.randn(1, 3, 32, 32)).shape[1]
    if name == "dinov2-small":  # 4x4 patches: also checks the position-embedding interpolation from 518 px
        return features(model, torch.randn(1, 3, 56, 56)).shape[1]
    modules = dict(model.named_modules())
    if spec.family == "hf-dinov2":  # pooler_output is the final layernorm's CLS row
        return modules["net.layernorm"].normalized_shape[0]
    return modules[{"hf-clip": "net.visual_projection", "open_clip": "net.head.proj"}[spec.family]].out_features


@functools.cache
def summary(name: str) -> Summary:
    model = build_backbone(name, "random").model
    modules = {
        n: (type(m).__name__, tuple(m.weight.shape) if isinstance(getattr(m, "weight", None), torch.Tensor) else None)
        for n, m in model.named_modules()
    }
    return Summary(
        n_params=sum(p.numel() for p in model.parameters()),
        modules=modules,
        has_bias=any(n.endswith("bias") for n, _ in model.named_parameters()),
        out_dim=output_dim(name, model),
        training=model.training,
        dtypes=frozenset(p.dtype for p in model.parameters()),
    )


# --------------------------------------------------------------------------------------------------- registry
def test_registry_holds_the_study_backbones_and_one_tiny_entry_per_family():
    assert set(STUDY) | set(TINY) <= set(REGISTRY)
    assert all(not REGISTRY[n].tiny for n in STUDY) and all(REGISTRY[n].tiny for n in TINY)
    assert {REGISTRY[n].family for n in STUDY} == {REGISTRY[n].family for n in TINY}
    for spec in REGISTRY.values():
        assert set(spec.peft) == set(PEFT_METHODS), spec.name
        assert spec.preprocess.crop <= spec.preprocess.resize


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(PcacheError) as info:
        get_spec("dinov3-huge")
    assert "dinov3-huge" in info.value.message and "dinov2-small" in info.value.hint


# --------------------------------------------------------------------------------------------------- random builds
@pytest.mark.parametrize("name", TINY)
def test_tiny_entry_is_deterministic_by_seed(name):
    x = batch(name)
    a = build_backbone(name, "random:3")
    b = build_backbone(name, "random:3")
    c = build_backbone(name, "random:4")
    out_a, out_b, out_c = features(a.model, x), features(b.model, x), features(c.model, x)
    assert out_a.shape == (2, get_spec(name).dim) and out_a.dtype == torch.float32
    assert torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_c)
    assert a.weights_id == "random:3" and c.weights_id == "random:4"
    assert not a.model.training and isinstance(a.model.net, torch.nn.Module)
    assert not any(p.requires_grad for p in a.model.parameters())


def test_cnn_accepts_channels_last_inputs():
    """The embed loop switches CNNs and batches to channels_last; the features must not change."""
    model, x = build_backbone("tiny-resnet", "random:1").model, batch("tiny-resnet")
    expected = features(model, x)
    model = model.to(memory_format=torch.channels_last)
    got = features(model, x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_backbone("tiny-clip", "random:9")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", STUDY)
def test_full_size_entry_builds_offline_at_its_real_architecture(name):
    s = summary(name)
    assert s.out_dim == get_spec(name).dim
    assert s.n_params / 1e6 == pytest.approx(KNOWN_PARAMS_M[name], rel=0.02)
    assert not s.training and s.dtypes == {torch.float32}


# --------------------------------------------------------------------------------------------------- weights
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize("name", ["resnet18", "dinov2-small", "pubmedclip", "biomedclip"])
def test_missing_published_weights_fail_fast_with_how_to(name, empty_caches):
    assert not weights_available(get_spec(name))
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        build_backbone(name)
    assert time.perf_counter() - start < 5
    assert name in info.value.message
    assert "--weights PATH" in info.value.hint and "--weights random" in info.value.hint
    if get_spec(name).family != "torchvision":
        assert "hf download" in info.value.hint and "huggingface-cli download" in info.value.hint


def test_tiny_entries_have_no_published_weights():
    assert not weights_available(get_spec("tiny-dinov2"))
    with pytest.raises(WeightsError, match="tiny test entry"):
        build_backbone("tiny-dinov2", "auto")


@pytest.mark.parametrize("bad", ["random:x", "/no/such/weights.safetensors"])
def test_bad_weights_argument_is_a_user_error(bad):
    with pytest.raises(WeightsError):
        build_backbone("tiny-resnet", bad)


def file_sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_file_of_our_model_round_trips(tmp_path):
    original = build_backbone("tiny-resnet", "random:5")
    file = tmp_path / "tiny.safetensors"
    save_file(original.model.state_dict(), str(file))
    again = build_backbone("tiny-resnet", str(file))
    assert torch.equal(features(again.model, batch("tiny-resnet")), features(original.model, batch("tiny-resnet")))
    assert again.weights_id == file_sha256(file)


def test_torchvision_checkpoint_with_classifier_loads_without_its_head(tmp_path):
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(11)
    classifier = ResNet(BasicBlock, [1, 1, 1, 1]).eval()
    file = tmp_path / "resnet.pth"
    torch.save(classifier.state_dict(), file)
    loaded = build_backbone("tiny-resnet", str(file))
    x = batch("tiny-resnet")
    classifier.fc = torch.nn.Identity()
    assert torch.allclose(features(loaded.model, x), features(classifier, x))
    assert loaded.weights_id == file_sha256(file)


def test_old_densenet_checkpoint_keys_are_renamed():
    from prognosis_cache.backbones.torchvision_cnn import modernise_keys

    t = torch.zeros(1)
    renamed = modernise_keys({"features.denseblock1.denselayer2.norm.1.weight": t, "features.conv0.weight": t})
    assert set(renamed) == {"features.denseblock1.denselayer2.norm1.weight", "features.conv0.weight"}


def test_hf_save_pretrained_folder_round_trips(tmp_path):
    original = build_backbone("tiny-dinov2", "random:2")
    original.model.net.save_pretrained(tmp_path / "dino")
    again = build_backbone("tiny-dinov2", str(tmp_path / "dino"))
    x = batch("tiny-dinov2")
    assert torch.allclose(features(again.model, x), features(original.model, x), atol=1e-6)
    assert again.weights_id == file_sha256(tmp_path / "dino" / "model.safetensors")


@pytest.mark.parametrize("old_style_config", [False, True])
def test_full_clip_checkpoint_folder_gives_its_image_tower(tmp_path, old_style_config):
    """PubMedCLIP and CLIP-L are published as whole CLIPModels; the image tower must come out intact, also when the
    config keeps projection_dim only at the top level (as configs of old transformers versions do)."""
    import json

    from transformers import CLIPConfig, CLIPModel

    from prognosis_cache.backbones.build import arch_config

    vision = arch_config(get_spec("tiny-clip"))
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 16, "projection_dim": 16}  # fmt: skip
    torch.manual_seed(4)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    if old_style_config:
        config_file = tmp_path / "clip" / "config.json"
        config = json.loads(config_file.read_text())
        del config["vision_config"]["projection_dim"]
        config_file.write_text(json.dumps(config))
    loaded = build_backbone("tiny-clip", str(tmp_path / "clip"))
    x = batch("tiny-clip")
    with torch.inference_mode():
        expected = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
    assert torch.allclose(features(loaded.model, x), expected, atol=1e-6)


def test_open_clip_checkpoint_folder_uses_only_the_visual_tower(tmp_path):
    original = build_backbone("tiny-biomedclip", "random:6")
    state = {f"visual.{k}": v for k, v in original.model.net.state_dict().items()}
    state |= {"text.proj.weight": torch.zeros(2, 2), "logit_scale": torch.ones(())}
    (tmp_path / "oc").mkdir()
    torch.save(state, tmp_path / "oc" / "open_clip_pytorch_model.bin")
    again = build_backbone("tiny-biomedclip", str(tmp_path / "oc"))
    x = batch("tiny-biomedclip")
    assert torch.equal(features(again.model, x), features(original.model, x))
    assert again.weights_id == file_sha256(tmp_path / "oc" / "open_clip_pytorch_model.bin")


def test_weights_of_another_architecture_are_refused(tmp_path):
    build_backbone("tiny-dinov2", "random").model.net.save_pretrained(tmp_path / "dino")
    with pytest.raises(WeightsError, match="another architecture"):
        build_backbone("dinov2-small", str(tmp_path / "dino"))
    file = tmp_path / "clip.safetensors"
    save_file(build_backbone("tiny-clip", "random").model.state_dict(), str(file))
    with pytest.raises(WeightsError, match="do not"):
        build_backbone("tiny-biomedclip", str(file))


# --------------------------------------------------------------------------------------------------- PEFT targets
def matches(modules: dict[str, tuple[str, tuple[int, ...] | None]], method: str, targets: tuple[str, ...]):
    """Module names peft itself would select for these targets (its own matching function)."""
    config = LoraConfig(target_modules=list(targets))
    return {n: modules[n] for n in modules if n and check_target_module_exists(config, n)}


@pytest.mark.parametrize("name", STUDY + TINY)
def test_peft_targets_name_real_modules(name):
    spec, s = get_spec(name), summary(name)
    cnn = spec.family == "torchvision"
    for method in ("lora", "vera", "ia3"):
        targets = spec.peft[method]
        if targets.refusal:
            assert cnn and method == "vera" and "Conv2d" in targets.refusal
            continue
        for target in targets.modules:  # every target matches something
            assert matches(s.modules, method, (target,)), f"{name}/{method}: {target!r} matches nothing"
        found = matches(s.modules, method, targets.modules)
        kinds = {kind for kind, _ in found.values()}
        if cnn:
            assert len(found) == 1 and kinds == {"Conv2d"}, f"{name}/{method}: stem must match once, got {found}"
        else:
            assert kinds == {"Linear"}, f"{name}/{method}: {kinds}"
        if method == "vera":
            assert len({shape for _, shape in found.values()}) == 1, "VeRA needs same-shape targets"
        if method == "ia3":
            assert set(targets.extra["feedforward_modules"]) <= set(targets.modules)
    assert spec.peft["bitfit"].modules == () and not spec.peft["bitfit"].refusal and s.has_bias


@pytest.mark.parametrize("name", TINY)
def test_peft_applies_the_targets_to_the_built_model(name):
    spec = get_spec(name)
    configs = {
        "lora": lambda t: LoraConfig(r=2, target_modules=list(t.modules)),
        "vera": lambda t: VeraConfig(r=2, target_modules=list(t.modules)),
        "ia3": lambda t: IA3Config(
            target_modules=list(t.modules), feedforward_modules=list(t.extra["feedforward_modules"])
        ),
    }
    for method, make in configs.items():
        targets = spec.peft[method]
        if targets.refusal:
            continue
        wrapped = get_peft_model(build_backbone(name, "random").model, make(targets))
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert trainable > 0, f"{name}/{method} adapted nothing"
        assert features(wrapped, batch(name)).shape == (2, spec.dim)


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_table_lists_entries(monkeypatch):
    from prognosis_cache.cli import backbones as cli_module
    from prognosis_cache.cli._app import app

    assert any(c.name == "backbones" for c in app.registered_commands)
    # a private app with a callback keeps `backbones` a sub-command whatever else is registered on the shared one
    local = typer.Typer()
    local.callback()(lambda: None)
    local.command("backbones")(cli_module.backbones)
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()
    plain = runner.invoke(local, ["backbones"])
    every = runner.invoke(local, ["backbones", "--all"])
    assert plain.exit_code == 0 and every.exit_code == 0, plain.output + every.output
    for name in STUDY:
        assert name in plain.output
    assert "tiny-dinov2" not in plain.output and "tiny-dinov2" in every.output
    assert "lora, ia3, bitfit" in plain.output  # CNNs: VeRA refused
    assert "facebook/dinov2-large" not in plain.output
    wide = runner.invoke(local, ["backbones", "--wide"])
    assert "facebook/dinov2-large" in wide.output and "post-projection" in wide.output


# --------------------------------------------------------------------------------------------------- local caches
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """The HF hub cache layout (refs/main → snapshots/<commit>/<file>), as `hf download` leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    for name, source in files.items():
        (root / "snapshots" / COMMIT / name).write_bytes(source.read_bytes())


def test_published_weights_come_from_the_local_caches(tmp_path, empty_caches, monkeypatch):
    import dataclasses

    from torchvision.models import get_weight

    cache = tmp_path / "hf"
    # transformers family: a cached snapshot of a (tiny) hub repo
    dino = build_backbone("tiny-dinov2", "random:8")
    dino.model.net.save_pretrained(tmp_path / "dino")
    fake_hub_snapshot(cache, "acme/dino", {n: tmp_path / "dino" / n for n in ("config.json", "model.safetensors")})
    spec = dataclasses.replace(get_spec("tiny-dinov2"), source="acme/dino", tiny=False)
    monkeypatch.setitem(REGISTRY, "tiny-dinov2", spec)
    assert weights_available(spec)
    loaded = build_backbone("tiny-dinov2")
    assert loaded.weights_id == f"hf:acme/dino@{COMMIT}"
    x = batch("tiny-dinov2")
    assert torch.allclose(features(loaded.model, x), features(dino.model, x), atol=1e-6)

    # open_clip family: the checkpoint file of a cached hub repo
    oc = build_backbone("tiny-biomedclip", "random:8")
    torch.save({f"visual.{k}": v for k, v in oc.model.net.state_dict().items()}, tmp_path / "oc.bin")
    fake_hub_snapshot(cache, "acme/oc", {"open_clip_pytorch_model.bin": tmp_path / "oc.bin"})
    spec = dataclasses.replace(get_spec("tiny-biomedclip"), source="hf-hub:acme/oc", tiny=False)
    monkeypatch.setitem(REGISTRY, "tiny-biomedclip", spec)
    assert weights_available(spec)
    loaded = build_backbone("tiny-biomedclip", "auto")
    assert loaded.weights_id == f"hf:acme/oc@{COMMIT}"
    x = batch("tiny-biomedclip")
    assert torch.equal(features(loaded.model, x), features(oc.model, x))

    # torchvision: the torch hub checkpoint file named after the weights URL
    spec = get_spec("resnet18")
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / Path(get_weight(spec.source).url).name
    checkpoint.parent.mkdir(parents=True)
    reference = build_backbone("resnet18", "random:8")
    torch.save({**reference.model.net.state_dict(), "fc.weight": torch.zeros(1000, 512)}, checkpoint)
    assert weights_available(spec)
    loaded = build_backbone("resnet18")
    assert loaded.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(features(loaded.model, x), features(reference.model, x))
