"""Which torch device a run uses, shared by `embed` and `finetune` so `--device` means the same in both."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from prognosis_cache.errors import PcacheError


def pick_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """auto → this rank's GPU when torch sees one (LOCAL_RANK under torchrun), else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if device == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise PcacheError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PcacheError("--device cuda asked for, but torch sees no GPU", "use --device cpu or auto")
        if dev.index is None:
            dev = torch.device(f"cuda:{local}")
    return dev


def compute_precision(device: torch.device) -> str:
    """bf16 autocast on GPU, fp32 on CPU: it changes the numbers, so caches record it in their fingerprint."""
    return "bf16-autocast" if device.type == "cuda" else "fp32"


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The forward-pass precision `compute_precision` names: bf16 autocast on GPU, plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
