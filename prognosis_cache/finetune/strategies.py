"""The six fine-tuning strategies of the study, as one config dataclass and one entry point (`adapt`).

FFT trains every weight; LP trains only the head on a frozen backbone; BitFit trains the biases (+ head); LoRA, VeRA
and IA3 are HF peft adapters (`get_peft_model` with LoraConfig / VeraConfig / IA3Config) on the modules the registry
entry names (`spec.peft[method]`). We call peft, we do not re-implement it. Where the registry says a method cannot
apply (`refusal`, e.g. VeRA on a CNN whose only adapted layer is a Conv2d stem) `adapt` raises `StrategyRefused`.

Preset `paper` (Ruffini et al. 2025, CMPB): LoRA r in {4, 8, 16}, lora_alpha 1, dropout 0.1; VeRA r in {4, 8, 16}
with "alpha 4"; backbone LR 1e-5 for FFT and 1e-4 for the PEFT methods; head LR 1e-3; early stopping on the
validation loss with patience 5; class-weighted loss.

How the study's VeRA "alpha" is mapped (peft's VeraConfig has no alpha): in LoRA, alpha scales the low-rank update
by alpha / r. VeRA's update is Λ_b B Λ_d A x with trainable scaling vectors d (initialised to `d_initial`) and b
(initialised to 0). A scale s on the update is s·Λ_b B Λ_d A x = Λ_b B (sΛ_d) A x, i.e. exactly the update of a VeRA
layer whose d starts at s·d. So we set `d_initial = 0.1 · alpha / r` (0.1 is peft's and the VeRA paper's default
d_initial): alpha 4 gives d_initial 0.1 at r 4, 0.05 at r 8 and 0.025 at r 16. The forward function equals the
alpha-scaled one at every step of training; the optimiser sees d in a different unit (Adam is close to invariant
to that), which is the one way this reading differs from an alpha multiplier.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prognosis_cache.backbones.build import LoadedBackbone
from prognosis_cache.errors import PcacheError, StrategyRefused

STRATEGIES = ("fft", "lp", "lora", "vera", "bitfit", "ia3")
PEFT_ADAPTERS = ("lora", "vera", "ia3")
PAPER_RANKS = (4, 8, 16)
VERA_PAPER_ALPHA = 4.0
VERA_BASE_D_INITIAL = 0.1  # peft's default and the VeRA paper's


@dataclass(frozen=True)
class StrategyConfig:
    """One strategy's hyperparameters. `targets` is filled from the registry by `adapt` (and recorded in rows)."""

    strategy: str
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    backbone_lr: float = 0.0
    head_lr: float = 1e-3
    d_initial: float | None = None  # VeRA only: see the module docstring for the alpha mapping
    preset: str = "paper"
    targets: tuple[str, ...] = field(default=())

    def params(self) -> dict[str, Any]:
        """The JSON-able `strategy_params` of a results row (None fields dropped)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v is not None and k != "strategy"}


def paper_preset(strategy: str, rank: int = 8) -> StrategyConfig:
    """The study's hyperparameters for `strategy` (rank only matters for LoRA / VeRA)."""
    if strategy not in STRATEGIES:
        raise PcacheError(f"unknown strategy {strategy!r}", f"choose from {', '.join(STRATEGIES)}")
    if strategy in ("lora", "vera") and rank not in PAPER_RANKS:
        raise PcacheError(f"rank {rank} is not in the paper preset {PAPER_RANKS}", "use --rank 4, 8 or 16")
    if strategy == "fft":
        return StrategyConfig("fft", backbone_lr=1e-5)
    if strategy == "lp":
        return StrategyConfig("lp", backbone_lr=0.0)
    if strategy == "lora":
        return StrategyConfig("lora", rank=rank, alpha=1.0, dropout=0.1, backbone_lr=1e-4)
    if strategy == "vera":
        return StrategyConfig("vera", rank=rank, alpha=VERA_PAPER_ALPHA, dropout=0.0, backbone_lr=1e-4,
                              d_initial=VERA_BASE_D_INITIAL * VERA_PAPER_ALPHA / rank)
    return StrategyConfig(strategy, backbone_lr=1e-4)  # bitfit, ia3


class Classifier(nn.Module):
    """The fine-tuned model: the (possibly peft-wrapped) backbone's features → a linear head → class logits.

    LP keeps the backbone in eval mode and outside autograd (it is the cache probe trained by SGD, so BatchNorm
    statistics and dropout must not move); every other strategy trains the backbone in train mode.
    """

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int, frozen_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, n_classes)
        self.frozen_backbone = frozen_backbone

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_backbone:
            with torch.no_grad():
                feats = self.backbone(x)
            return self.head(feats.float())
        return self.head(self.backbone(x).float())


def peft_config(method: str, config: StrategyConfig, modules: tuple[str, ...], extra: dict[str, Any]) -> Any:
    """The peft config of one adapter method (module-name list semantics: exact name or '.'-suffix)."""
    from peft import IA3Config, LoraConfig, VeraConfig

    targets = list(modules)
    if method == "lora":
        return LoraConfig(r=int(config.rank or 8), lora_alpha=float(config.alpha or 1.0),
                          lora_dropout=config.dropout, target_modules=targets, bias="none")
    if method == "vera":
        rank = int(config.rank or 8)
        d_initial = config.d_initial if config.d_initial is not None else VERA_BASE_D_INITIAL
        return VeraConfig(r=rank, target_modules=targets, vera_dropout=config.dropout, d_initial=d_initial,
                          projection_prng_key=0, save_projection=True)
    if method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=list(extra.get("feedforward_modules", ())))
    raise ValueError(f"{method} is not a peft adapter method")


def mark_bitfit(model: nn.Module, modules: tuple[str, ...]) -> None:
    """Freeze everything but the biases (of `modules`, or of every module when it is empty, BatchNorm shifts too)."""
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        wanted = not modules or any(owner == m or owner.endswith("." + m) for m in modules)
        if name.rsplit(".", 1)[-1] == "bias" and wanted:
            param.requires_grad_(True)


def check_applicable(loaded: LoadedBackbone, strategy: str) -> None:
    """Raise StrategyRefused when the registry entry says `strategy` cannot apply to this backbone."""
    if strategy not in STRATEGIES:
        raise PcacheError(f"unknown strategy {strategy!r}", f"choose from {', '.join(STRATEGIES)}")
    targets = loaded.spec.peft.get(strategy)
    if strategy in ("lora", "vera", "ia3", "bitfit") and targets is None:
        raise StrategyRefused(f"backbone {loaded.spec.name!r} has no {strategy} targets in its registry entry",
                              "pick another strategy or add the targets to the registry entry")
    if targets is not None and targets.refusal:
        raise StrategyRefused(f"{strategy} cannot be applied to backbone {loaded.spec.name!r}: {targets.refusal}",
                              "pick another strategy (lora, ia3, bitfit, fft or lp) for this backbone")


def adapt(loaded: LoadedBackbone, config: StrategyConfig, n_classes: int = 2) -> tuple[Classifier, StrategyConfig]:
    """Apply `config` to the backbone (in place) and put a fresh linear head on it.

    Returns the model and the config with `targets` filled in. Trainable parameters are exactly those with
    `requires_grad`; `param_groups` splits them into backbone and head.
    """
    check_applicable(loaded, config.strategy)
    model = loaded.model
    strategy = config.strategy
    targets: tuple[str, ...] = ()
    if strategy == "fft":
        model.requires_grad_(True)
        targets = ("*",)
    elif strategy == "lp":
        model.requires_grad_(False)
    elif strategy == "bitfit":
        targets = loaded.spec.peft["bitfit"].modules
        mark_bitfit(model, targets)
        targets = targets or ("*.bias",)
    else:
        from peft import get_peft_model

        entry = loaded.spec.peft[strategy]
        targets = entry.modules
        model = get_peft_model(model, peft_config(strategy, config, entry.modules, entry.extra))
    classifier = Classifier(model, loaded.spec.dim, n_classes, frozen_backbone=strategy == "lp")
    return classifier, dataclasses.replace(config, targets=tuple(targets))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared tensors counted once)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    return sum(n for n, t in seen.values() if t), sum(n for n, _ in seen.values())


def param_groups(model: Classifier, config: StrategyConfig, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """AdamW groups: the backbone's trainable parameters at the backbone LR, the head at the head LR."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()), "lr": config.head_lr, "weight_decay": weight_decay,
               "name": "head"}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": config.backbone_lr, "weight_decay": weight_decay,
                          "name": "backbone"})
    return groups
