"""The fine-tuning loop: images stream through THE batched data path (`batched_images`) into a Classifier.

What it does and why:
- class-weighted cross-entropy (sklearn's "balanced" weights of the training rows), as in the study;
- AdamW with two parameter groups (backbone LR, head LR) and a linear warm-up (transformers' constant schedule
  with warm-up) over the first `warmup_epochs` epochs;
- early stopping on the (class-weighted) validation loss with `patience`, keeping the best epoch's weights;
- bf16 autocast on GPU, gradient accumulation, a rich progress bar with loss and img/s;
- deterministic: the epoch's order comes from np.random.default_rng([seed, epoch]) and torch is reseeded at every
  epoch start (dropout masks), so a run resumed after an interruption continues exactly like an uninterrupted one;
- resumable: each epoch ends with a checkpoint (trainable state + buffers in safetensors, optimiser / scheduler /
  early-stopping state via torch.save, read back with torch.load(weights_only=True));
- data-parallel under torchrun (gloo on CPU, nccl on GPU): an optimiser step always covers the same global rows,
  split across ranks and micro-batches, and the loss is normalised by the class weight of the WHOLE global step,
  so the summed gradient equals a single-process step (up to float rounding; BatchNorm statistics of CNNs are
  per-rank and the padding of a short last step enters them, the one place DDP differs).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from prognosis_cache.backbones.registry import Preprocess
from prognosis_cache.data.loader import batched_images
from prognosis_cache.devices import autocast
from prognosis_cache.errors import PcacheError
from prognosis_cache.finetune.strategies import Classifier, StrategyConfig, param_groups

STATE_FILE = "state.pt"
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. `batch_size` is the number of images per optimiser step over all ranks and micro-batches."""

    epochs: int = 50
    batch_size: int = 32
    accumulation: int = 1
    patience: int = 5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    workers: int = 0
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0
    train_seconds: float = 0.0
    early_stopped: bool = False


# ---------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        tdist.barrier()


# ---------------------------------------------------------------------------------------------- epoch plan
@dataclass(frozen=True)
class EpochPlan:
    """One rank's row sequence for an epoch, cut into micro-batches of `micro` positions.

    `weights[i]` is the loss weight of position i (0 for padding), `denominators[j]` the total class weight of the
    global optimiser step that micro-batch j belongs to, `sync[j]` whether micro-batch j ends a step.
    """

    rows: np.ndarray
    weights: np.ndarray
    micro: int
    denominators: list[float]
    sync: list[bool]


def epoch_plan(rows: np.ndarray, labels: np.ndarray, class_weight: np.ndarray, seed: int, epoch: int,
               batch_size: int, accumulation: int, dist: Dist) -> EpochPlan:
    """Split a seeded permutation of `rows` into global steps, and each step into (micro-batch, rank) pieces.

    Every rank gets the same number of micro-batches (DDP needs one all-reduce per step on every rank), so a short
    piece of the last step is padded with weight-0 copies, except a rank's very last micro-batch, which may be
    short (the loader's last batch). Written by hand: no sampler in torch splits one global batch this way.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(np.asarray(rows, dtype=np.int64))
    step = max(1, min(batch_size, len(perm)))
    n_steps = math.ceil(len(perm) / step)
    micro = math.ceil(step / (dist.world * accumulation))
    out_rows, out_w, denominators, sync = [], [], [], []
    for s in range(n_steps):
        chunk = perm[s * step:(s + 1) * step]
        total = float(class_weight[labels[chunk]].sum())
        for a in range(accumulation):
            i = a * dist.world + dist.rank
            piece = chunk[i * micro:(i + 1) * micro]
            weights = class_weight[labels[piece]].astype(np.float64)
            last_of_rank = s == n_steps - 1 and a == accumulation - 1
            size = max(len(piece), 1) if last_of_rank else micro
            if len(piece) < size:
                pad = size - len(piece)
                piece = np.concatenate([piece, np.resize(chunk, pad)])
                weights = np.concatenate([weights, np.zeros(pad)])
            out_rows.append(piece)
            out_w.append(weights)
            denominators.append(total)
            sync.append(a == accumulation - 1)
    return EpochPlan(np.concatenate(out_rows), np.concatenate(out_w), micro, denominators, sync)


# ---------------------------------------------------------------------------------------------- state
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + persistent buffers (BatchNorm statistics, VeRA projections), cloned to CPU.

    Cloning breaks storage sharing (VeRA shares its projections), which safetensors refuses to save.
    """
    buffers = {n for n, _ in model.named_buffers()}  # non-persistent buffers are not in state_dict: skipped
    return {n: t.detach().cpu().clone() for n, t in model.state_dict(keep_vars=True).items()
            if n in buffers or t.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state` back; every key must exist in the model."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise PcacheError(f"checkpoint holds tensors this model lacks: {result.unexpected_keys[:3]}",
                          "resume with the same backbone, strategy and rank, or use another --save-dir")


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def save_checkpoint(folder: Path, model: nn.Module, best: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Crash-safe: every file is written to a temporary name and renamed; state.pt goes last."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(trainable_state(model), folder / TRAINABLE_FILE)
    save_safetensors(best, folder / BEST_FILE)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None:
    if not (folder / STATE_FILE).is_file():
        return None
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return load_safetensors(folder / TRAINABLE_FILE), load_safetensors(folder / BEST_FILE), state


# ---------------------------------------------------------------------------------------------- loop
def _bar(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True)


def balanced_class_weight(labels: np.ndarray, rows: np.ndarray, n_classes: int) -> np.ndarray:
    """sklearn's 'balanced' weights n / (C · n_c) of the training rows (a class absent there gets weight 0)."""
    y = labels[rows]
    present = np.unique(y)
    weights = np.zeros(n_classes, dtype=np.float64)
    weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return weights


def predict_logits(model: nn.Module, paths: Sequence[Path], rows: np.ndarray, pre: Preprocess, batch_size: int,
                   device: torch.device, dist: Dist, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows that decoded, their logits), sorted by row; under torchrun each rank does a share, all get all."""
    module = model.module if hasattr(model, "module") else model
    was_training = module.training
    module.eval()
    shard = np.asarray(rows, dtype=np.int64)[dist.rank::dist.world]
    got_rows, got_logits = [], []
    if len(shard):
        loader = batched_images(paths, shard.tolist(), pre, batch_size=batch_size, workers=workers,
                                pin_memory=device.type == "cuda")
        with torch.inference_mode(), autocast(device):
            for batch in loader:
                if not batch.rows:
                    continue
                got_logits.append(module(batch.pixels.to(device, non_blocking=True)).float().cpu())
                got_rows.extend(batch.rows)
    module.train(was_training)
    logits = torch.cat(got_logits) if got_logits else torch.empty(0, module.head.out_features)
    table = torch.cat([torch.tensor(got_rows, dtype=torch.float64)[:, None], logits.double()], 1)
    if dist.world > 1:
        table = _gather_rows(table, device)
    order = torch.argsort(table[:, 0])
    table = table[order]
    return table[:, 0].long().numpy(), table[:, 1:].float().numpy()


def _gather_rows(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """all_gather of tables of different lengths (padded to the longest, then trimmed)."""
    comm = device if device.type == "cuda" else torch.device("cpu")
    n = torch.tensor([table.shape[0]], device=comm)
    sizes = [torch.zeros_like(n) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, table.shape[1], dtype=table.dtype, device=comm)
    padded[: table.shape[0]] = table.to(comm)
    parts = [torch.zeros_like(padded) for _ in sizes]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]).cpu()


def weighted_loss(logits: np.ndarray, y: np.ndarray, class_weight: np.ndarray) -> float:
    """Class-weighted mean cross-entropy (the validation loss early stopping watches)."""
    if len(y) == 0:
        return float("nan")
    w = torch.as_tensor(class_weight, dtype=torch.float32)
    return float(F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(y, dtype=torch.long), weight=w))


def _micro_batches(plan: EpochPlan, loader: Any) -> Iterator[tuple[int, Any, np.ndarray]]:
    """(micro-batch index, Batch, loss weights of the rows that decoded) — positions matched by order."""
    for j, batch in enumerate(loader):
        rows = plan.rows[j * plan.micro:(j + 1) * plan.micro]
        weights = plan.weights[j * plan.micro:(j + 1) * plan.micro]
        keep = np.array([r not in batch.failed for r in rows], dtype=bool)
        yield j, batch, weights[keep]


def train(model: Classifier, config: StrategyConfig, paths: Sequence[Path], labels: np.ndarray,
          train_rows: np.ndarray, val_rows: np.ndarray, pre: Preprocess, loop: TrainConfig,
          device: torch.device, dist: Dist = Dist(), checkpoint: Path | None = None,
          description: str = "train") -> TrainResult:
    """Train `model` in place (ending with the best epoch's weights) and return what happened.

    `labels[row]` is the integer class of every row; `val_rows` may be empty (then every epoch runs and the last
    one is kept). With `checkpoint`, an interrupted call resumes from the last finished epoch.
    """
    n_classes = model.head.out_features
    class_weight = balanced_class_weight(labels, train_rows, n_classes)
    model.to(device)
    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, config, loop.weight_decay))
    steps_per_epoch = math.ceil(len(train_rows) / max(1, min(loop.batch_size, len(train_rows))))
    from transformers import get_constant_schedule_with_warmup

    scheduler = get_constant_schedule_with_warmup(optimizer, math.ceil(loop.warmup_epochs * steps_per_epoch))
    result = TrainResult(epochs_run=0, best_epoch=-1, best_val_loss=float("inf"))
    best = trainable_state(model)
    bad_epochs, start = 0, 0
    resumed = load_checkpoint(checkpoint) if checkpoint is not None else None
    if resumed is not None:
        current, best, state = resumed
        load_trainable(model, current)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, bad_epochs = int(state["epoch"]) + 1, int(state["bad_epochs"])
        result = TrainResult(epochs_run=start, best_epoch=int(state["best_epoch"]),
                             best_val_loss=float(state["best_val_loss"]), history=list(state["history"]),
                             early_stopped=bool(state["early_stopped"]), train_seconds=float(state["train_seconds"]))
    n_images = 0
    bar = _bar(loop.progress and dist.main)
    with bar if bar is not None else contextlib.nullcontext():
        for epoch in range(start, loop.epochs):
            if result.early_stopped:
                break
            torch.manual_seed(loop.seed * 100_003 + epoch)
            plan = epoch_plan(train_rows, labels, class_weight, loop.seed, epoch, loop.batch_size,
                              loop.accumulation, dist)
            loader = batched_images(paths, plan.rows.tolist(), pre, batch_size=plan.micro, workers=loop.workers,
                                    pin_memory=device.type == "cuda")
            task = bar.add_task(f"{description} epoch {epoch + 1}/{loop.epochs}", total=len(plan.sync), loss="-",
                                rate="-") if bar is not None else None
            net.train()
            t0 = time.perf_counter()
            seen, loss_sum = 0, 0.0
            for j, batch, weights in _micro_batches(plan, loader):
                sync = plan.sync[j]
                context = net.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
                with context:
                    if batch.rows:
                        x = batch.pixels.to(device, non_blocking=True)
                        y = torch.as_tensor(labels[batch.rows], dtype=torch.long, device=device)
                        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
                        with autocast(device):
                            logits = net(x)
                        ce = F.cross_entropy(logits.float(), y, reduction="none")
                        loss = (ce * w).sum() * (dist.world / plan.denominators[j])
                    else:  # every image failed to decode: a zero loss keeps DDP's all-reduce in step
                        loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
                    loss.backward()
                if sync:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                seen += int(np.count_nonzero(weights))
                loss_sum += float(loss.detach()) / dist.world
                if bar is not None and task is not None:
                    elapsed = time.perf_counter() - t0
                    bar.update(task, advance=1, loss=f"{loss_sum / (j + 1):.4f}",
                               rate=f"{seen * dist.world / max(elapsed, 1e-9):.1f}")
            epoch_seconds = time.perf_counter() - t0
            n_images += seen * dist.world
            result.train_seconds += epoch_seconds
            if bar is not None and task is not None:
                bar.remove_task(task)
            val_loss = float("nan")
            if len(val_rows):
                rows, logits = predict_logits(model, paths, val_rows, pre, plan.micro * dist.world, device, dist,
                                              loop.workers)
                val_loss = weighted_loss(logits, labels[rows], class_weight)
            result.history.append({"epoch": epoch, "train_loss": loss_sum / max(len(plan.sync), 1),
                                   "val_loss": val_loss, "seconds": epoch_seconds})
            result.epochs_run = epoch + 1
            if not len(val_rows) or val_loss < result.best_val_loss:
                result.best_val_loss = val_loss if len(val_rows) else float("nan")
                result.best_epoch = epoch
                best = trainable_state(model)
                bad_epochs = 0
            else:
                bad_epochs += 1
                result.early_stopped = bad_epochs >= loop.patience
            if checkpoint is not None and dist.main:
                save_checkpoint(checkpoint, model, best, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                    "bad_epochs": bad_epochs, "best_epoch": result.best_epoch,
                    "best_val_loss": result.best_val_loss, "history": result.history,
                    "early_stopped": result.early_stopped, "train_seconds": result.train_seconds})
            barrier(dist)
    load_trainable(model, best)
    run_seconds = sum(h["seconds"] for h in result.history[start:])
    result.images_per_second = n_images / run_seconds if run_seconds > 0 else 0.0
    return result
