"""Build a registry entry into a frozen feature extractor, and say exactly which weights it carries.

Three ways to get weights, one identity string each (it goes into the cache fingerprint):
- `None`/"auto": the published weights, from the local HF / torch hub cache, else the network. Offline
  (`HF_HUB_OFFLINE=1`) a missing file fails at once with a `WeightsError` that says how to provide it.
  Identity `hf:<repo>@<commit>` or `torchvision:<enum>`.
- "random" / "random:<seed>": the real architecture from the shipped JSON in `configs/`, seeded init, fully
  offline (smoke runs, tests, CI). Identity `random:<seed>`.
- a PATH: a local folder (HF `save_pretrained` layout, or a folder holding one checkpoint) or a weights file
  (.safetensors, or .pt/.pth/.bin read with `torch.load(weights_only=True)`). Identity `sha256:<hex>`.

Family modules (torchvision_cnn, hf_vit, openclip) register one builder and one availability check per family; this
module holds what they share and the public entry points.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from prognosis_cache.backbones.registry import FAMILY_BUILDERS, REGISTRY, BackboneSpec
from prognosis_cache.errors import PcacheError, WeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class FeatureNet(nn.Module):
    """forward(x) -> (B, dim) features of the library model kept as `net`, whose own forward already yields them.

    The wrapper gives every family the same shape (PEFT targets are named under `net.`), whatever the library.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class LoadedBackbone:
    """A built backbone: `model(x)` maps a normalised (B, 3, crop, crop) float batch to (B, spec.dim) features.

    `model.net` is the underlying library model (PEFT targets modules by name inside it).
    """

    spec: BackboneSpec
    model: torch.nn.Module
    weights_id: str


@dataclass(frozen=True)
class WeightsChoice:
    """The parsed `weights` argument of `build_backbone`."""

    kind: Literal["auto", "random", "path"]
    seed: int = 0
    path: Path | None = None


AVAILABILITY: dict[str, Callable[[BackboneSpec], bool]] = {}


def availability_check(family: str) -> Callable[[Callable[[BackboneSpec], bool]], Callable[[BackboneSpec], bool]]:
    """Decorator registering how a family tells, without network, whether real weights are on this machine."""

    def wrap(fn: Callable[[BackboneSpec], bool]) -> Callable[[BackboneSpec], bool]:
        if family in AVAILABILITY:
            raise ValueError(f"family {family!r} has two availability checks")
        AVAILABILITY[family] = fn
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------
def get_spec(name: str) -> BackboneSpec:
    """The registry entry called `name`; a PcacheError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(n for n, s in REGISTRY.items() if not s.tiny))
        tiny = ", ".join(sorted(n for n, s in REGISTRY.items() if s.tiny))
        raise PcacheError(
            f"unknown backbone {name!r}",
            f"known backbones: {known} (test entries: {tiny}); `pcache backbones --all` lists them",
        ) from None


def build_backbone(name: str, weights: str | None = None) -> LoadedBackbone:
    """Build entry `name` with the requested weights; the model comes back in eval mode, float32, on CPU."""
    spec = get_spec(name)
    choice = parse_weights(weights)
    if choice.kind == "auto" and spec.tiny:
        raise WeightsError(
            f"{spec.name} is a tiny test entry: it has no published weights",
            "pass --weights random[:SEED] or --weights PATH",
        )
    builder = FAMILY_BUILDERS[spec.family]
    model, weights_id = builder(spec, arch_config(spec), choice)
    model = model.float().eval()
    model.requires_grad_(False)
    return LoadedBackbone(spec=spec, model=model, weights_id=weights_id)


def weights_available(spec: BackboneSpec) -> bool:
    """True when the entry's published weights are already on this machine (no network is touched)."""
    if spec.tiny or not spec.source:
        return False
    return AVAILABILITY[spec.family](spec)


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the family modules
# ---------------------------------------------------------------------------------------------------------------
def parse_weights(weights: str | None) -> WeightsChoice:
    """`None`/"auto" | "random" | "random:<seed>" | an existing path."""
    if weights is None or weights == "auto":
        return WeightsChoice("auto")
    if weights == "random":
        return WeightsChoice("random", seed=0)
    if weights.startswith("random:"):
        try:
            return WeightsChoice("random", seed=int(weights.split(":", 1)[1]))
        except ValueError:
            raise WeightsError(
                f"bad weights {weights!r}: the seed after 'random:' must be an integer", "e.g. --weights random:3"
            ) from None
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(
            f"weights path {str(path)!r} does not exist",
            "pass 'auto' (published weights), 'random[:SEED]', or an existing folder / weights file",
        )
    return WeightsChoice("path", path=path)


def arch_config(spec: BackboneSpec) -> dict[str, Any]:
    """The shipped architecture JSON named by the entry (configs/<arch_config>.json), minus `_`-prefixed notes."""
    text = resources.files("prognosis_cache.backbones").joinpath("configs", f"{spec.arch_config}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def is_offline() -> bool:
    """HF's offline switch, read at call time (so a test or a user can flip it), and honoured by every family."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> str:
    """The HF hub cache folder, resolved from the environment at call time (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(home, "hub")


def missing_weights_error(spec: BackboneSpec, reason: str, download_hint: str) -> WeightsError:
    """The one message every family gives when published weights are not here and cannot be fetched."""
    return WeightsError(
        f"no local weights for backbone {spec.name!r} ({spec.source}): {reason}",
        f"on a connected machine run {download_hint} and copy the cache here; or pass --weights PATH to a local "
        "folder / weights file; or --weights random for a smoke run",
    )


def hf_download_hint(repo: str) -> str:
    return f"`hf download {repo}` (older huggingface_hub: `huggingface-cli download {repo}`)"


def sha256_of_files(paths: Iterable[Path]) -> str:
    """`sha256:<hex>` of one weights file (what `sha256sum` prints), or of the per-file digests of several."""
    files = sorted(Path(p) for p in paths)
    digests = []
    for path in files:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return f"sha256:{digests[0]}"
    combined = "".join(f"{f.name}:{d}\n" for f, d in zip(files, digests, strict=True))
    return f"sha256:{hashlib.sha256(combined.encode()).hexdigest()}"


def weight_files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def single_weight_file(folder: Path, preferred: tuple[str, ...] = ()) -> Path:
    """The checkpoint file in `folder`: a preferred name if present, else the only weights file there."""
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    files = weight_files_in(folder)
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise WeightsError(
            f"cannot tell which checkpoint to load from folder {str(folder)!r} (weights files found: {found})",
            "pass --weights with the path of the one file to load",
        )
    return files[0]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pt/.pth/.bin file read with weights_only=True (never unpickled)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: the user must fix the path, not see a traceback
        raise WeightsError(
            f"cannot read weights file {str(path)!r}: {exc}",
            "pass a .safetensors file, or a .pt/.pth/.bin state dict saved with torch.save",
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"weights file {str(path)!r} does not hold a state dict of tensors",
            "save the model with safetensors.torch.save_file(model.state_dict(), ...) or torch.save(state_dict)",
        )
    return dict(state)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only the keys under `prefix` (without it) when any key has it; otherwise leave the dict alone."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_state_into(
    net: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: Path,
    ignorable: tuple[str, ...] = (),
) -> None:
    """Load `state` into `net`: every parameter must be covered; extra keys only under `ignorable` prefixes.

    Our own wrapper's state dict (keys under `net.`) is accepted as well as the library model's.
    """
    state = strip_prefix(state, "net.")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: the checkpoint is of another architecture
        raise WeightsError(
            f"weights in {str(source)!r} do not fit this architecture: {str(exc)[:500]}",
            "check that the checkpoint belongs to this backbone entry",
        ) from exc
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignorable)]
    if result.missing_keys or unexpected:
        raise WeightsError(
            f"weights in {str(source)!r} do not match this architecture: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
            "check that the checkpoint belongs to this backbone entry",
        )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global RNG started at `seed`, and restore it afterwards (builds stay pure)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
