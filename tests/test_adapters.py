"""Adapter verification for every registry backbone × every PEFT method the registry allows.

Catches the silent failures of PEFT: an adapter that changes the model at init, an adapter that never receives a
gradient (dead, e.g. bypassed by a fused attention kernel), a merge that does not reproduce the adapted model, a
trainable-parameter count that is not the method's formula, targets that match nothing in a full-size model.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from prognosis_cache.backbones import REGISTRY, build_backbone
from prognosis_cache.errors import StrategyRefused
from prognosis_cache.finetune.strategies import STRATEGIES, adapt, count_parameters, paper_preset

TINY = sorted(n for n, s in REGISTRY.items() if s.tiny)
FULL = sorted(n for n, s in REGISTRY.items() if not s.tiny)
ADAPTERS = ("lora", "vera", "ia3")
RANK = 4
# A bias added to every key shifts all attention logits of a query by the same constant, which softmax ignores:
# its gradient is exactly zero by construction, not a dead adapter.
SOFTMAX_INVARIANT = re.compile(r"(k_proj\.bias)$")

_BUILT: dict[str, object] = {}


def base(name: str):
    """A fresh copy of the tiny backbone (built once per test session, copied per test)."""
    if name not in _BUILT:
        _BUILT[name] = build_backbone(name, "random:0")
    loaded = copy.copy(_BUILT[name])
    loaded.model = copy.deepcopy(_BUILT[name].model)
    return loaded


def allowed(name: str) -> list[str]:
    return [m for m in STRATEGIES if m not in REGISTRY[name].peft or not REGISTRY[name].peft[m].refusal]


def pixels(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    crop = REGISTRY[name].preprocess.crop
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(seed))


def matches(module_name: str, targets: tuple[str, ...]) -> bool:
    """peft's list semantics: the full name equals a target or ends with '.' + target."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def targeted(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if matches(n, targets) and isinstance(m, (nn.Linear, nn.Conv2d))]


def expected_trainable(name: str, method: str, model: nn.Module) -> int:
    """The method's parameter formula over the base model's targeted layers, plus the 2-class head."""
    spec = REGISTRY[name]
    head = spec.dim * 2 + 2
    if method == "fft":
        return sum(p.numel() for p in model.parameters()) + head
    if method == "lp":
        return head
    if method == "bitfit":
        return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")) + head
    entry = spec.peft[method]
    feedforward = tuple(entry.extra.get("feedforward_modules", ()))
    total = 0
    for module_name, m in targeted(model, entry.modules):
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        fan_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if method == "lora":
            kernel = 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1] // m.groups
            total += RANK * (fan_in * kernel + fan_out)
        elif method == "vera":
            total += RANK + fan_out  # trainable d (r) and b (out); A and B are frozen shared projections
        else:  # ia3: one scale per output, or per input for feed-forward modules
            total += fan_in if matches(module_name, feedforward) else fan_out
    return total + head


CASES = [(n, m) for n in TINY for m in allowed(n)]
IDENTITY_CASES = [c for c in CASES if c[1] != "fft"]  # FFT changes nothing at init; its count is all parameters


@pytest.mark.parametrize(("name", "method"), IDENTITY_CASES)
def test_adapter_starts_as_identity_and_counts_match_formula(name: str, method: str) -> None:
    loaded = base(name)
    x = pixels(name)
    reference = loaded.model(x)
    formula = expected_trainable(name, method, loaded.model)
    if method in ADAPTERS:
        assert targeted(loaded.model, REGISTRY[name].peft[method].modules), f"{method} targets of {name} match nothing"
    model, _ = adapt(loaded, paper_preset(method, RANK))
    model.eval()
    with torch.no_grad():
        out = model.backbone(x)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
    trainable, total = count_parameters(model)
    assert trainable == formula
    assert 0 < trainable <= total


@pytest.mark.parametrize(("name", "method"), [c for c in CASES if c[1] in (*ADAPTERS, "bitfit")])
def test_every_adapter_tensor_learns_after_one_step(name: str, method: str) -> None:
    """Step once (LoRA's B / VeRA's b leave zero), then every trainable backbone tensor must get a gradient."""
    torch.manual_seed(0)
    model, _ = adapt(base(name), paper_preset(method, RANK))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = pixels(name, n=4, seed=1), torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if _ == 0:
            optimizer.step()
    dead = [n for n, p in model.backbone.named_parameters()
            if p.requires_grad and not SOFTMAX_INVARIANT.search(n) and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"{method} on {name}: tensors without gradient: {dead[:5]}"
    learning = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert learning


@pytest.mark.parametrize(("name", "method"), [c for c in CASES if c[1] in ADAPTERS])
def test_merge_and_unload_reproduces_the_adapted_model(name: str, method: str) -> None:
    model, _ = adapt(base(name), paper_preset(method, RANK))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the adapter away from its identity init so the merge has something to do
        for p in model.backbone.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    model.eval()
    x = pixels(name, seed=2)
    with torch.no_grad():
        adapted = model.backbone(x)
        with model.backbone.disable_adapter():
            plain = model.backbone(x)
        merged = model.backbone.merge_and_unload()
        out = merged(x)
    assert not any("lora_" in n or "vera_" in n or "ia3_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(out, adapted, atol=1e-4, rtol=1e-4)
    assert (adapted - plain).abs().max() > 1e-4  # the perturbed adapter did change the outputs


def test_refusal_of_vera_on_cnn_stems() -> None:
    cnns = [n for n, s in REGISTRY.items() if s.family == "torchvision"]
    assert cnns
    for name in cnns:
        assert REGISTRY[name].peft["vera"].refusal
    with pytest.raises(StrategyRefused, match="VeRA"):
        adapt(base("tiny-resnet"), paper_preset("vera", RANK))


@pytest.mark.parametrize("name", FULL)
def test_full_size_targets_resolve(name: str) -> None:
    """Every target of every allowed method matches a Linear/Conv2d of the real architecture (built on 'meta')."""
    with torch.device("meta"):
        loaded = build_backbone(name, "random:0")
    spec = REGISTRY[name]
    for method, entry in spec.peft.items():
        if entry.refusal or method == "bitfit":
            continue
        for target in entry.modules:
            assert targeted(loaded.model, (target,)), f"{name}: {method} target {target!r} matches nothing"
        assert set(entry.extra.get("feedforward_modules", ())) <= set(entry.modules)
    assert any(n.endswith("bias") for n, _ in loaded.model.named_parameters())  # BitFit has something to train


@pytest.mark.parametrize("name", ["resnet18", "dinov2-small", "pubmedclip"])
def test_full_size_small_entries_adapt_with_formula_counts(name: str) -> None:
    """peft applies every allowed method to the real module tree with the formula's parameter count."""
    with torch.device("meta"):
        pristine = build_backbone(name, "random:0")
    for method in [m for m in allowed(name) if m in ADAPTERS]:
        loaded = copy.copy(pristine)
        with torch.device("meta"):
            loaded.model = copy.deepcopy(pristine.model)
            formula = expected_trainable(name, method, loaded.model)
            model, _ = adapt(loaded, paper_preset(method, RANK))
        assert count_parameters(model)[0] == formula, f"{name} {method}"
