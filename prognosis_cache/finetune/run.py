"""`pcache finetune` as a Python API: folds / few-shot draws → train → evaluate → results rows.

The folds and draws come from `prognosis_cache.evaluate.splits` called exactly as the probe engine calls them (same
labels, patient ids, centres, cv and seed), so a fine-tuning run and `pcache probe` see the same patients on the
same side, and their rows land in one results table.

Protocol:
- full data: every outer split of `cv` (5 patient-grouped stratified folds, or leave-one-centre-out); early stopping
  on a patient-grouped holdout of the training side (fold 0 of a 5-fold StratifiedGroupKFold of the training
  patients: about 20 %, never a test patient; fewer folds when a class has fewer than 5 patients),
  validation="grouped-holdout".
- few-shot: the probe's draws (`few_shot_draws`, validation "none") from the training side of `few_shot_folds`; the
  early-stopping set is the next K patients per class of the same permutation (the probe's "k-shot" validation
  draw: disjoint, from the training side only), validation="k-shot"; when the class has too few patients for that,
  every epoch runs and validation="none".
- the test side is scored with `binary_metrics` on the margin logit(1) − logit(0).

Saved per fold under `save_dir/<run key>/` (rank 0 only):
- `model.safetensors`: the fitted head + every trained tensor (adapter, biases or the full backbone) + buffers;
- `adapter/`: for LoRA / VeRA / IA3 also peft's own `save_pretrained` folder (PeftModel.from_pretrained(backbone, …));
- `finetune.json`: what to rebuild it from; `row.json`: the results row (a rerun skips finished folds);
- `checkpoint/`: the per-epoch state an interrupted run resumes from.
Reload a fitted model with `load_finetuned(folder)` → a Classifier whose `forward(pixels)` gives class logits.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from prognosis_cache.backbones import build_backbone
from prognosis_cache.data.manifest import Manifest, load_manifest
from prognosis_cache.devices import compute_precision, pick_device
from prognosis_cache.embed import cache_fingerprint
from prognosis_cache.errors import PcacheError
from prognosis_cache.evaluate.metrics import binary_metrics, degenerate_reason
from prognosis_cache.evaluate.probe import binary_column
from prognosis_cache.evaluate.splits import Split, few_shot_draws, leave_one_center_out, patient_kfold
from prognosis_cache.finetune.strategies import (
    PEFT_ADAPTERS,
    Classifier,
    StrategyConfig,
    adapt,
    check_applicable,
    count_parameters,
    paper_preset,
)
from prognosis_cache.finetune.trainer import (
    TrainConfig,
    barrier,
    init_distributed,
    load_safetensors,
    load_trainable,
    predict_logits,
    save_safetensors,
    train,
    trainable_state,
)
from prognosis_cache.results import make_row, to_frame, write

HOLDOUT_FOLDS = 5  # the early-stopping holdout is one fold of a 5-fold grouped split of the training side
MODEL_FILE = "model.safetensors"
META_FILE = "finetune.json"
ROW_FILE = "row.json"


@dataclass(frozen=True)
class RunPlan:
    """One fine-tuning run: which rows train, stop early, and test (indices into the manifest)."""

    regime: str
    fold: int
    seed: int
    k: int | None
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    validation: str
    test_center: str | None = None
    degenerate: str = ""

    @property
    def key(self) -> str:
        shot = f"k{self.k}_" if self.k is not None else ""
        return f"{self.regime}_{shot}seed{self.seed}_fold{self.fold}"


# ---------------------------------------------------------------------------------------------- planning
def binary_task(manifest: Manifest, task: str) -> np.ndarray:
    """The task's labels as 0/1 floats (NaN unknown), refused as the probe refuses them (`binary_column`)."""
    values, classes = manifest.labels()
    return binary_column(values, classes, task, str(manifest.path))


def outer_splits(y: np.ndarray, groups: np.ndarray, centers: np.ndarray, cv: str, seed: int) -> list[Split]:
    """The probe engine's outer splits for `cv` ("5" or another number of folds, or "loco")."""
    if cv == "loco":
        return leave_one_center_out(y, groups, centers)
    if not cv.isdigit():
        raise PcacheError(f"cv must be a number of folds or 'loco', got {cv!r}", "use --cv 5 or --cv loco")
    try:
        return patient_kfold(y, groups, int(cv), seed)
    except ValueError as exc:
        raise PcacheError(str(exc), "use fewer folds (--cv) or a cohort with more patients") from exc


def grouped_holdout(y: np.ndarray, groups: np.ndarray, train_idx: np.ndarray, seed: int) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """(fit rows, early-stopping rows): one fold of a stratified patient-grouped split of the training side."""
    patients_per_class = [len(np.unique(groups[train_idx][y[train_idx] == c])) for c in np.unique(y[train_idx])]
    # fewer folds when a class has fewer patients than folds, so the holdout can hold every class
    n_splits = min(HOLDOUT_FOLDS, *patients_per_class) if patients_per_class else 0
    if n_splits < 2:
        return train_idx, np.empty(0, np.int64)
    inner = patient_kfold(y[train_idx], groups[train_idx], n_splits, seed)[0]
    return train_idx[inner.train_idx], train_idx[inner.test_idx]


def plan_runs(y: np.ndarray, groups: np.ndarray, centers: np.ndarray, regime: str = "full", cv: str = "5",
              shots: Sequence[int] = (1, 2, 4, 8, 16), seeds: int = 5, seed: int = 0,
              folds: Sequence[int] | None = None, few_shot_folds: Sequence[int] = (0,),
              images_per_patient: int = 1) -> list[RunPlan]:
    """Every run of one `pcache finetune` call, with the probe engine's splits and draws."""
    if regime not in ("full", "few-shot"):
        raise PcacheError(f"regime must be full or few-shot, got {regime!r}", "use --regime full|few-shot")
    y = np.asarray(y, dtype=np.float64)
    groups, centers = np.asarray(groups, dtype=str), np.asarray(centers, dtype=str)
    splits = outer_splits(y, groups, centers, cv, seed)
    plans = []
    if regime == "full":
        for split in splits:
            if folds is not None and split.fold not in folds:
                continue
            fit, val = grouped_holdout(y, groups, split.train_idx, seed)
            plans.append(RunPlan("full", split.fold, seed, None, fit, val, split.test_idx, "grouped-holdout",
                                 split.test_center))
        return plans
    bad = [f for f in few_shot_folds if not 0 <= f < len(splits)]
    if bad:
        raise PcacheError(f"few-shot folds {bad} do not exist ({len(splits)} splits)", "pick folds from 0")
    for f in few_shot_folds:
        split = splits[f]
        draws = few_shot_draws(y, groups, split.train_idx, shots, range(seeds), images_per_patient, "none", fold=f,
                               n_classes=2)
        with_val = few_shot_draws(y, groups, split.train_idx, shots, range(seeds), images_per_patient, "k-shot",
                                  fold=f, n_classes=2)
        for d, v in zip(draws, with_val, strict=True):
            usable = not v.degenerate and np.array_equal(v.train_idx, d.train_idx)
            plans.append(RunPlan("few-shot", f, d.seed, d.k, d.train_idx,
                                 v.val_idx if usable else np.empty(0, np.int64), split.test_idx,
                                 "k-shot" if usable else "none", split.test_center, d.degenerate))
    return plans


# ---------------------------------------------------------------------------------------------- saving / loading
def save_finetuned(folder: Path, model: Classifier, meta: dict[str, Any]) -> None:
    """The fitted model of one run: trained tensors (safetensors), peft's adapter folder, and how to rebuild."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(trainable_state(model), folder / MODEL_FILE)
    if meta["strategy"] in PEFT_ADAPTERS:
        model.backbone.save_pretrained(str(folder / "adapter"))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_finetuned(folder: str | Path) -> Classifier:
    """Rebuild a fitted model saved by `pcache finetune --save-dir` (eval mode, CPU).

    Example: `model = load_finetuned("runs/lora/full_seed0_fold0"); logits = model(pixels)` where pixels are
    preprocessed as the backbone entry says (`prognosis_cache.data.loader.batched_images` does it).
    """
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise PcacheError(f"{folder} holds no {META_FILE}", "pass a run folder written by pcache finetune --save-dir")
    meta = json.loads((folder / META_FILE).read_text())
    loaded = build_backbone(meta["backbone"], meta["weights"])
    config = StrategyConfig(**{**meta["config"], "targets": tuple(meta["config"].get("targets", ()))})
    model, _ = adapt(loaded, config, n_classes=int(meta["n_classes"]))
    load_trainable(model, load_safetensors(folder / MODEL_FILE))
    return model.eval()


# ---------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class FinetuneRequest:
    """Everything one `pcache finetune` call asks for."""

    manifest: Path
    backbone: str
    strategy: str
    task: str
    root: Path | None = None
    weights: str | None = None
    rank: int = 8
    regime: str = "full"
    cv: str = "5"
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: int = 5
    seed: int = 0
    folds: tuple[int, ...] | None = None
    few_shot_folds: tuple[int, ...] = (0,)
    images_per_patient: int = 1
    preset: str = "paper"
    loop: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    out: Path | None = None
    save_dir: Path | None = None
    dataset: str | None = None


def strategy_config(request: FinetuneRequest) -> StrategyConfig:
    if request.preset != "paper":
        raise PcacheError(f"unknown preset {request.preset!r}", "use --preset paper")
    return paper_preset(request.strategy, request.rank)


def _degenerate_reason(plan: RunPlan, yi: np.ndarray) -> str:
    if plan.degenerate:
        return plan.degenerate
    if len(np.unique(yi[plan.train_idx])) < 2:
        return "training side holds one class"
    return degenerate_reason(yi[plan.test_idx])


def run_finetune(request: FinetuneRequest, progress: Callable[[str], None] | None = None) -> pl.DataFrame:
    """Run every planned fold / draw and return the results rows (written to `request.out` by rank 0)."""
    manifest = load_manifest(request.manifest, request.root)
    y = binary_task(manifest, request.task)
    frame = manifest.frame
    plans = plan_runs(y, frame["patient_id"].to_numpy(), frame["center"].to_numpy(), request.regime, request.cv,
                      request.shots, request.seeds, request.seed, request.folds, request.few_shot_folds,
                      request.images_per_patient)
    config = strategy_config(request)
    pristine = build_backbone(request.backbone, request.weights)
    check_applicable(pristine, request.strategy)  # refuse before any training
    device = pick_device(request.device)
    dist = init_distributed(device)
    device = pick_device(request.device, dist.local_rank)
    _, fingerprint = cache_fingerprint(pristine, "float16", compute_precision(device))
    yi = np.nan_to_num(y, nan=-1).astype(np.int64)  # NaN rows are never in a split
    paths = manifest.image_paths()
    pre = pristine.spec.preprocess
    base = {"dataset": request.dataset or manifest.dataset, "task": request.task, "backbone": pristine.spec.name,
            "fingerprint": fingerprint, "strategy": request.strategy, "solver": "sgd", "regime": request.regime}
    rows = []
    for plan in plans:
        folder = request.save_dir / request.strategy / plan.key if request.save_dir is not None else None
        if folder is not None and (folder / ROW_FILE).is_file():
            rows.append(json.loads((folder / ROW_FILE).read_text()))
            continue
        if progress is not None and dist.main:
            progress(f"{request.strategy} {plan.key}")
        common = {**base, "k_shot": plan.k, "seed": plan.seed, "fold": plan.fold, "test_center": plan.test_center,
                  "n_train": len(plan.train_idx), "n_test": len(plan.test_idx)}
        reason = _degenerate_reason(plan, yi)
        if reason:
            rows.append(make_row(**common, strategy_params=config.params(), validation=plan.validation,
                                 status="degenerate", reason=reason, fit_seconds=0.0))
            continue
        run_seed = plan.seed * 1000 + plan.fold
        loaded = copy.copy(pristine)
        loaded.model = copy.deepcopy(pristine.model)
        torch.manual_seed(run_seed)  # head and adapter initialisation
        model, used = adapt(loaded, config, n_classes=2)
        trainable, total = count_parameters(model)
        loop = TrainConfig(**{**request.loop.__dict__, "seed": run_seed})
        start = time.perf_counter()
        result = train(model, used, paths, yi, plan.train_idx, plan.val_idx, pre, loop, device, dist,
                       checkpoint=folder / "checkpoint" if folder is not None else None,
                       description=f"{request.strategy} {plan.key}")
        fit_seconds = time.perf_counter() - start
        test_rows, logits = predict_logits(model, paths, plan.test_idx, pre, loop.batch_size, device, dist,
                                           loop.workers)
        margin = logits[:, 1] - logits[:, 0]
        params = {**used.params(), "epochs": loop.epochs, "epochs_run": result.epochs_run,
                  "best_epoch": result.best_epoch, "early_stopped": result.early_stopped,
                  "batch_size": loop.batch_size, "accumulation": loop.accumulation, "patience": loop.patience,
                  "warmup_epochs": loop.warmup_epochs, "weight_decay": loop.weight_decay, "optimizer": "adamw",
                  "class_weight": "balanced", "n_val": len(plan.val_idx), "weights": pristine.weights_id,
                  "world_size": dist.world, "images_per_second": round(result.images_per_second, 2)}
        row = make_row(**{**common, "n_test": len(test_rows)}, strategy_params=params, validation=plan.validation,
                       trainable_params=trainable, trainable_share=trainable / total, fit_seconds=fit_seconds,
                       **binary_metrics(yi[test_rows], margin))
        rows.append(row)
        if folder is not None and dist.main:
            save_finetuned(folder, model, {"backbone": pristine.spec.name, "weights": request.weights,
                                           "strategy": request.strategy, "config": used.params() | {
                                               "strategy": used.strategy}, "n_classes": 2, "task": request.task,
                                           "classes": manifest.labels()[1][request.task]})
            (folder / ROW_FILE).write_text(json.dumps(row))
        barrier(dist)
    frame_out = to_frame(rows)
    if request.out is not None and dist.main:
        write(frame_out, request.out)
    return frame_out
