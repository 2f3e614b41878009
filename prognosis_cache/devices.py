"""Which torch device a run uses, shared by `embed` and `finetune` so `--device` means the same in both."""

from __future__ import annotations

import os

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
