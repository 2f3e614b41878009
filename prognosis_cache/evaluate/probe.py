"""The probe engine: results rows for linear probes, ridge, prototypes and kNN straight from feature caches.

`run_probe` mirrors `pcache probe`. Splits depend only on labels, patient ids, centres and the seed, so several
caches of one dataset (several backbones) are probed on exactly the same folds and draws.

Protocol choices (also in the CLI help):
- full data: the chosen cv (5 patient-grouped stratified folds, or leave-one-centre-out); hyperparameters (C, λ, k)
  by an inner patient-grouped CV on the training side only (validation="inner-cv", selection by mean MCC), then a
  refit on the whole training side; validation="none" uses the defaults (C=1, λ=1, k=5).
- few-shot: draws from the training side of fold 0 of the 5-fold split (`few_shot_folds` picks others), scored on
  that fold's full test side; validation="k-shot" picks the hyperparameter on a disjoint K-shot validation draw
  (selection by MCC, ties to the most regularised value), "none" uses the defaults.
- `fit_seconds` is the only nondeterministic column: batched fits share their wall time equally between the
  problems solved together. Everything else is a function of the inputs and the seed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from prognosis_cache.cache.h5 import CacheData, read_cache
from prognosis_cache.errors import CacheError, PcacheError
from prognosis_cache.evaluate import solvers as sv
from prognosis_cache.evaluate.metrics import binary_metrics, degenerate_reason
from prognosis_cache.evaluate.splits import Split, few_shot_draws, leave_one_center_out, patient_kfold
from prognosis_cache.results import make_row, to_frame

SOLVERS = ("logreg", "ridge", "prototype", "knn")
STRATEGY = {"logreg": "lp", "ridge": "ridge", "prototype": "prototype", "knn": "knn"}
DEFAULTS = {"logreg": 1.0, "ridge": 1.0, "knn": 5}
GRIDS: dict[str, tuple[float, ...]] = {"logreg": sv.C_GRID, "ridge": sv.RIDGE_GRID, "knn": sv.K_GRID}
PARAM_NAME = {"logreg": "C", "ridge": "lambda", "knn": "k"}
Progress = Callable[[int, int], None]


@dataclass
class Prediction:
    """Test margins of one row, for patient-bootstrap CIs (collected only when asked for)."""

    backbone: str
    solver: str
    regime: str
    k_shot: int | None
    seed: int
    fold: int
    test_idx: np.ndarray
    margin: np.ndarray


# ---------------------------------------------------------------------------------------------- inputs
def binary_column(labels: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]], task: str,
                  source: str) -> np.ndarray:
    """A task's labels as 0/1 floats (NaN unknown) from `labels`/`classes` of a cache or manifest named `source`.

    Refuses unknown tasks and tasks with more than two classes: probes and fine-tuning are scored as binary (the
    study's one-vs-rest case), so a categorical column must first be turned into a 0/1 column.
    """
    if task not in labels:
        raise PcacheError(f"task {task!r} is not a label of {source}; it has: {sorted(labels)}",
                          "pass one of those with --task")
    y = np.asarray(labels[task], dtype=np.float64)
    codes = np.unique(y[~np.isnan(y)])
    names = list(classes.get(task, []))
    n_classes = max(len(names), len(codes))
    if n_classes > 2 or not set(codes.tolist()) <= {0.0, 1.0}:
        raise PcacheError(f"task {task!r} has {n_classes} classes {names}; probes and fine-tuning are binary",
                          "derive a one-vs-rest binary task (labels 0/1) in the manifest and re-embed or relabel")
    return y


def binary_labels(cache: CacheData, task: str) -> np.ndarray:
    """The task's labels (0/1, NaN unknown) of a cache; see `binary_column`."""
    return binary_column(cache.labels, cache.classes, task, f"cache {cache.path.name}")


def _load(caches: Sequence[str | os.PathLike[str] | CacheData]) -> list[CacheData]:
    if not caches:
        raise PcacheError("no cache given", "pass at least one cache file")
    return [c if isinstance(c, CacheData) else read_cache(c) for c in caches]


def check_agree(caches: Sequence[CacheData], task: str) -> None:
    """Caches probed together must describe the same images, patients, centres and labels, in the same order."""
    first = caches[0]
    y0 = binary_labels(first, task)
    for other in caches[1:]:
        problems = [name for name in ("image_id", "patient_id", "center")
                    if not np.array_equal(np.asarray(getattr(first, name), str), np.asarray(getattr(other, name), str))]
        if not np.array_equal(y0, binary_labels(other, task), equal_nan=True):
            problems.append(f"labels/{task}")
        if problems:
            raise CacheError(f"{other.path.name} and {first.path.name} disagree on {', '.join(problems)}",
                             "probe together only caches embedded from the same manifest (re-embed the stale one)")


# ---------------------------------------------------------------------------------------------- fitting
def _stack(idx_list: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pad index arrays to one length: (indices [P, n], mask [P, n]); padded slots point at row 0, masked out."""
    n = max(len(i) for i in idx_list)
    idx = np.zeros((len(idx_list), n), dtype=np.int64)
    mask = np.zeros((len(idx_list), n), dtype=bool)
    for p, i in enumerate(idx_list):
        idx[p, : len(i)] = i
        mask[p, : len(i)] = True
    return idx, mask


def _linear_fit(solver: str, x: np.ndarray, y: np.ndarray, train: Sequence[np.ndarray], grid: Sequence[float],
                transform: str) -> tuple[np.ndarray, np.ndarray]:
    """Fit logreg / ridge on each training index set for every grid value: weights [P, G, d], bias [P, G].

    `x` is already l2-normalised when transform="l2". "standardise" is fitted per training set and folded back
    into the weights (w/σ, b − w·μ/σ), so test features are never copied per problem.
    """
    idx, mask = _stack(train)
    xs, ys = x[idx], y[idx].astype(np.int64)
    xs[~mask] = 0.0
    mu = sd = None
    if transform == "standardise":
        cnt = mask.sum(1)[:, None, None]
        mu = xs.sum(1, keepdims=True) / cnt
        sd = np.sqrt((((xs - mu) * mask[..., None]) ** 2).sum(1, keepdims=True) / cnt)
        sd = np.where(sd > 1e-12, sd, 1.0)
        xs = np.where(mask[..., None], (xs - mu) / sd, 0.0)
    sw = sv.balanced_weights(ys, mask)
    fit = sv.logistic_fit if solver == "logreg" else sv.ridge_fit
    w, b = fit(xs, ys, sw, np.asarray(grid, dtype=np.float64))
    if mu is not None and sd is not None:
        w = w / sd[:, 0][:, None, :]
        b = b - np.einsum("pgd,pd->pg", w, mu[:, 0])
    return w, b


def _scores(solver: str, x: np.ndarray, y: np.ndarray, train: Sequence[np.ndarray],
            evals: Sequence[Sequence[np.ndarray]], grid: Sequence[float], transform: str) -> list[list[np.ndarray]]:
    """For training set p and each of its eval sets: margins [G, len(eval)] for every grid value (one fit each)."""
    if solver in ("logreg", "ridge"):
        w, b = _linear_fit(solver, x, y, train, grid, transform)
        # a few-shot test side is one array shared by every draw: score it for all draws in ONE matmul (one
        # float64 copy of it, not one per draw); other eval sets are small and scored per problem
        users: dict[int, list[int]] = {}
        for p, ev in enumerate(evals):
            for e in ev:
                users.setdefault(id(e), []).append(p)
        shared: dict[int, dict[int, np.ndarray]] = {}
        for ev in evals:
            for e in ev:
                ps = users[id(e)]
                if len(ps) > 1 and id(e) not in shared:
                    m = x[e].astype(np.float64) @ w[ps].reshape(-1, w.shape[-1]).T + b[ps].reshape(-1)
                    shared[id(e)] = dict(zip(ps, m.T.reshape(len(ps), w.shape[1], -1), strict=True))
        return [[shared[id(e)][p] if id(e) in shared else (x[e] @ w[p].T + b[p]).T for e in ev]
                for p, ev in enumerate(evals)]
    out = []
    for tr, ev in zip(train, evals, strict=True):
        fitted = sv.apply_transform(transform if transform == "standardise" else "none", x[tr], *[x[e] for e in ev])
        xtr, xev = fitted[0], fitted[1:]
        if solver == "prototype":
            out.append([sv.prototype_margin(xtr, y[tr], xe)[None] for xe in xev])
        else:
            out.append([np.stack([sv.knn_margin(xtr, y[tr], xe, int(k)) for k in grid]) for xe in xev])
    return out


def _odd_k(k: float, n_train: int) -> int:
    """k capped at the training size and kept odd: an even k ties 1:1 on a balanced 1-shot draw."""
    k = int(min(k, max(n_train, 1)))
    return k - 1 if k > 1 and k % 2 == 0 else k


def _grid(solver: str, validation: str, n_train: int) -> tuple[float, ...]:
    if solver == "prototype":
        return (0.0,)
    if validation == "none":
        default = DEFAULTS[solver]
        return (_odd_k(default, n_train),) if solver == "knn" else (default,)
    grid = GRIDS[solver]
    if solver == "knn":
        grid = tuple(sorted({_odd_k(k, n_train) for k in grid}, reverse=True))
    return grid


def _params(solver: str, grid: Sequence[float], chosen: int, validation: str, transform: str) -> dict[str, Any]:
    params: dict[str, Any] = {"transform": transform}
    if solver != "prototype":
        value = grid[chosen]
        params[PARAM_NAME[solver]] = int(value) if solver == "knn" else float(value)
        if validation != "none":
            params[f"{PARAM_NAME[solver]}_grid"] = [int(g) if solver == "knn" else float(g) for g in grid]
    if solver in ("logreg", "ridge"):
        params["class_weight"] = "balanced"
    return params


# ---------------------------------------------------------------------------------------------- regimes
def _full_rows(solver: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray, splits: Sequence[Split],
               validation: str, transform: str, seed: int, inner_folds: int,
               ) -> list[tuple[Split, dict[str, Any], np.ndarray | None]]:
    """(split, row fields, test margin) per outer split: inner-CV selection, refit, test margins."""
    if solver == "logreg" and validation == "inner-cv" and transform != "standardise":
        return _full_logreg_shared(x, y, groups, splits, transform, seed, inner_folds)
    return _full_rows_generic(solver, x, y, groups, splits, validation, transform, seed, inner_folds)


def _full_rows_generic(solver: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray, splits: Sequence[Split],
                       validation: str, transform: str, seed: int, inner_folds: int,
                       ) -> list[tuple[Split, dict[str, Any], np.ndarray | None]]:
    """`_full_rows` one outer split at a time (every solver; the reference for the batched logreg path)."""
    out = []
    for split in splits:
        start = time.perf_counter()
        reason = degenerate_reason(y[split.test_idx]) or (
            "training side holds one class" if len(np.unique(y[split.train_idx])) < 2 else "")
        grid = _grid(solver, validation, len(split.train_idx))
        chosen = 0
        if not reason and validation == "inner-cv" and len(grid) > 1:
            try:
                inner = patient_kfold(y[split.train_idx], groups[split.train_idx], inner_folds, seed)
            except ValueError as exc:
                reason = f"inner CV impossible: {exc}"
            else:
                tr = [split.train_idx[s.train_idx] for s in inner]
                te = [split.train_idx[s.test_idx] for s in inner]
                if solver == "knn":
                    grid = _grid(solver, validation, min(len(t) for t in tr))
                margins = _scores(solver, x, y, tr, [[e] for e in te], grid, transform)
                mcc = np.stack([sv.batched_mcc(y[e], m[0]) for e, m in zip(te, margins, strict=True)]).mean(0)
                chosen = int(sv.pick_best(mcc))
        margin = None
        if not reason:
            margin = _scores(solver, x, y, [split.train_idx], [[split.test_idx]], grid[chosen:chosen + 1],
                             transform)[0][0][0]
        fields = {
            "strategy_params": _params(solver, grid, chosen, validation, transform),
            "n_train": len(split.train_idx), "n_test": len(split.test_idx),
            "fit_seconds": time.perf_counter() - start, "status": "degenerate" if reason else "ok", "reason": reason,
        }
        out.append((split, fields, margin))
    return out


def _full_logreg_shared(x: np.ndarray, y: np.ndarray, groups: np.ndarray, splits: Sequence[Split], transform: str,
                        seed: int, inner_folds: int) -> list[tuple[Split, dict[str, Any], np.ndarray | None]]:
    """`_full_rows` for logreg + inner-CV: every outer fold's inner folds AND refits in ONE batched solve.

    Same protocol as the generic path: per outer split, the C with the best mean inner-CV MCC (ties to the most
    regularised), refitted on the whole training side. Why batched: all these problems are row subsets of the same
    matrix, so they are sample-weight masks over x and `sv.logistic_fit_shared` solves them together. Every grid
    value of the refit is fitted too and the chosen one read off: cheaper than a second, sequential solve, since a
    matmul over ~200 columns costs about what one over ~30 does on 2 cores.
    """
    start = time.perf_counter()
    grid = GRIDS["logreg"]
    reasons: list[str] = []
    inner_sets: list[list[Any]] = []
    masks: list[np.ndarray] = []
    tols: list[float] = []  # inner folds only score C: a looser stop (their large-C columns dominate the solve)
    for split in splits:
        reason = degenerate_reason(y[split.test_idx]) or (
            "training side holds one class" if len(np.unique(y[split.train_idx])) < 2 else "")
        inner: list[Any] = []
        if not reason:
            try:
                inner = patient_kfold(y[split.train_idx], groups[split.train_idx], inner_folds, seed)
            except ValueError as exc:
                reason = f"inner CV impossible: {exc}"
        reasons.append(reason)
        inner_sets.append(inner)
        fits = [(split.train_idx[s.train_idx], sv.SELECTION_TOL) for s in inner]
        for tr, tol in fits + ([(split.train_idx, sv.REFIT_TOL)] if not reason else []):
            mask = np.zeros(len(y), dtype=bool)
            mask[tr] = True
            masks.append(mask)
            tols.append(tol)
    w = b = np.zeros((0, len(grid), x.shape[1]))
    if masks:
        stacked = np.stack(masks)
        weights = sv.balanced_weights(np.broadcast_to(y, stacked.shape), stacked)
        w, b = sv.logistic_fit_shared(x, np.where(y == 1, 1, 0), weights, grid, tol=np.asarray(tols))
    n_fitted = sum(not r for r in reasons)
    per_split = (time.perf_counter() - start) / max(n_fitted, 1)
    out = []
    p = 0
    for split, reason, inner in zip(splits, reasons, inner_sets, strict=True):
        chosen, margin = 0, None
        if not reason:
            mcc = []
            for s in inner:
                held = split.train_idx[s.test_idx]
                mcc.append(sv.batched_mcc(y[held], (x[held] @ w[p].T + b[p]).T))
                p += 1
            chosen = int(sv.pick_best(np.stack(mcc).mean(0)))
            margin = x[split.test_idx] @ w[p, chosen] + b[p, chosen]
            p += 1
        fields = {
            "strategy_params": _params("logreg", grid, chosen, "inner-cv", transform),
            "n_train": len(split.train_idx), "n_test": len(split.test_idx),
            "fit_seconds": per_split if not reason else 0.0, "status": "degenerate" if reason else "ok",
            "reason": reason,
        }
        out.append((split, fields, margin))
    return out


def _few_shot_rows(solver: str, x: np.ndarray, y: np.ndarray, draws: Sequence[Any], test_idx: np.ndarray,
                   validation: str, transform: str) -> list[tuple[Any, dict[str, Any], np.ndarray | None]]:
    """(draw, row fields, test margin) for draws of ONE K and fold, all solved in one batch."""
    test_reason = degenerate_reason(y[test_idx])
    good = [d for d in draws if not d.degenerate and not test_reason]
    start = time.perf_counter()
    results: dict[int, tuple[np.ndarray, int, tuple[float, ...]]] = {}
    if good:
        n_train = min(len(d.train_idx) for d in good)
        grid = _grid(solver, validation, n_train)
        select = validation == "k-shot" and len(grid) > 1
        evals = [[d.val_idx, test_idx] if select else [test_idx] for d in good]
        margins = _scores(solver, x, y, [d.train_idx for d in good], evals, grid, transform)
        for d, m in zip(good, margins, strict=True):
            g = int(sv.pick_best(sv.batched_mcc(y[d.val_idx], m[0]))) if select else 0
            results[id(d)] = (m[-1][g], g, grid)
    per_fit = (time.perf_counter() - start) / max(len(good), 1)
    out = []
    for d in draws:
        reason = d.degenerate or test_reason
        margin, chosen, grid = results.get(id(d), (None, 0, _grid(solver, validation, max(len(d.train_idx), 1))))
        fields = {
            "strategy_params": _params(solver, grid, chosen, validation, transform),
            "n_train": len(d.train_idx), "n_test": len(test_idx),
            "fit_seconds": per_fit if not reason else 0.0, "status": "degenerate" if reason else "ok",
            "reason": reason,
        }
        out.append((d, fields, margin))
    return out


def run_probe(caches: Sequence[str | os.PathLike[str] | CacheData], task: str, regime: str = "full",
              shots: Sequence[int] = (1, 2, 4, 8, 16, 32), seeds: int = 100, solvers: Sequence[str] = ("logreg",),
              cv: str = "5", validation: str | None = None, seed: int = 0, transform: str = "l2",
              few_shot_folds: Sequence[int] = (0,), images_per_patient: int = 1, inner_folds: int = 5,
              progress: Progress | None = None, predictions: list[Prediction] | None = None) -> pl.DataFrame:
    """Probe every cache on the same splits; returns results rows (prognosis_cache.results schema).

    validation defaults to "inner-cv" for full data and "none" for few-shot. Pass a list as `predictions` to
    receive each row's test margins (for patient-bootstrap CIs).
    """
    if regime not in ("full", "few-shot"):
        raise PcacheError(f"regime must be full or few-shot, got {regime!r}", "use --regime full|few-shot")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:
        raise PcacheError(f"unknown solver(s) {unknown}", f"choose from {', '.join(SOLVERS)}")
    if transform not in sv.TRANSFORMS:
        raise PcacheError(f"unknown transform {transform!r}", f"choose from {', '.join(sv.TRANSFORMS)}")
    validation = validation or ("inner-cv" if regime == "full" else "none")
    allowed = ("none", "inner-cv") if regime == "full" else ("none", "k-shot")
    if validation not in allowed:
        raise PcacheError(f"validation {validation!r} does not apply to the {regime} regime",
                          f"use one of {', '.join(allowed)}")
    data = _load(caches)
    check_agree(data, task)
    y = binary_labels(data[0], task)
    groups = np.asarray(data[0].patient_id, dtype=str)
    centers = np.asarray(data[0].center, dtype=str)
    if cv == "loco":
        splits = leave_one_center_out(y, groups, centers)
    elif cv.isdigit():
        splits = patient_kfold(y, groups, int(cv), seed)
    else:
        raise PcacheError(f"cv must be a number of folds or 'loco', got {cv!r}", "use --cv 5 or --cv loco")
    yi = np.nan_to_num(y, nan=-1).astype(np.int64)  # NaN rows are never in a split; -1 keeps ints
    if regime == "few-shot":
        bad = [f for f in few_shot_folds if not 0 <= f < len(splits)]
        if bad:
            raise PcacheError(f"few-shot folds {bad} do not exist ({len(splits)} splits)", "pick folds from 0")
        draws = {f: few_shot_draws(y, groups, splits[f].train_idx, shots, range(seeds), images_per_patient,
                                   validation, fold=f, n_classes=2) for f in few_shot_folds}
        total = len(data) * len(solvers) * len(few_shot_folds) * len(shots)
    else:
        total = len(data) * len(solvers)
    done = 0
    rows = []
    for cache in data:
        x = cache.features.astype(np.float32, copy=False)
        if transform == "l2":
            x = sv.l2_normalise(x)
        base = {"dataset": cache.dataset, "task": task, "backbone": cache.backbone, "fingerprint": cache.fingerprint,
                "regime": regime, "validation": validation}
        for solver in solvers:
            common = {**base, "strategy": STRATEGY[solver], "solver": solver}
            if regime == "full":
                for split, fields, margin in _full_rows(solver, x, yi, groups, splits, validation, transform, seed,
                                                        inner_folds):
                    metrics = binary_metrics(yi[split.test_idx], margin) if margin is not None else {}
                    rows.append(make_row(**common, **fields, **metrics, k_shot=None, seed=seed, fold=split.fold,
                                         test_center=split.test_center))
                    if predictions is not None and margin is not None:
                        predictions.append(Prediction(cache.backbone, solver, regime, None, seed, split.fold,
                                                      split.test_idx, margin))
                done += 1
                if progress:
                    progress(done, total)
                continue
            for f in few_shot_folds:
                split = splits[f]
                for k in shots:
                    these = [d for d in draws[f] if d.k == k]
                    for d, fields, margin in _few_shot_rows(solver, x, yi, these, split.test_idx, validation,
                                                            transform):
                        metrics = binary_metrics(yi[split.test_idx], margin) if margin is not None else {}
                        rows.append(make_row(**common, **fields, **metrics, k_shot=k, seed=d.seed, fold=f,
                                             test_center=split.test_center))
                        if predictions is not None and margin is not None:
                            predictions.append(Prediction(cache.backbone, solver, regime, k, d.seed, f,
                                                          split.test_idx, margin))
                    done += 1
                    if progress:
                        progress(done, total)
    return to_frame(rows)
