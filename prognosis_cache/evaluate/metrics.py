"""Metrics of one test set (sklearn.metrics), patient bootstrap CIs for full data, seed intervals for few-shot.

Decision rule: every solver returns a margin and the predicted class is positive exactly when margin > 0
(logistic / ridge decision function, cosine-prototype difference, class-balanced kNN vote − 0.5). Ranking metrics
(PR-AUC = average precision of the positive class, ROC-AUC) use the margin itself.
A test set with a single class makes MCC, the AUCs and balanced accuracy meaningless: such a set is reported as
status "degenerate" with NaN metrics and a reason, never silently as zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from prognosis_cache.results import METRICS


def nan_metrics() -> dict[str, float]:
    return dict.fromkeys(METRICS, float("nan"))


def degenerate_reason(y_true: np.ndarray) -> str:
    """Why metrics cannot be computed on this test set ('' when they can)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return "empty test set"
    present = np.unique(y_true)
    if len(present) < 2:
        return f"test set holds only class {int(present[0])} ({len(y_true)} images)"
    return ""


def binary_metrics(y_true: np.ndarray, margin: np.ndarray) -> dict[str, float]:
    """MCC, PR-AUC, ROC-AUC, balanced accuracy and F1 of the positive class; NaN for a degenerate test set."""
    y_true = np.asarray(y_true).astype(np.int64)
    margin = np.asarray(margin, dtype=np.float64)
    if degenerate_reason(y_true):
        return nan_metrics()
    pred = (margin > 0).astype(np.int64)
    return {
        "mcc": float(skm.matthews_corrcoef(y_true, pred)),
        "pr_auc": float(skm.average_precision_score(y_true, margin)),
        "roc_auc": float(skm.roc_auc_score(y_true, margin)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, pred)),
        "f1": float(skm.f1_score(y_true, pred, zero_division=0.0)),
    }


def patient_bootstrap_ci(y_true: np.ndarray, margin: np.ndarray, groups: np.ndarray, n_boot: int = 1000,
                         seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of each metric, resampling test PATIENTS (all of a patient's images move together).

    Resampling images would pretend a patient's several X-rays were independent and make the interval too narrow.
    Resamples with a single class are skipped (they have no MCC / AUC).
    """
    y_true, margin, groups = np.asarray(y_true), np.asarray(margin), np.asarray(groups)
    patients, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == p) for p in range(len(patients))]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        pick = rng.integers(0, len(patients), len(patients))
        idx = np.concatenate([rows_of[p] for p in pick])
        if degenerate_reason(y_true[idx]):
            continue
        for m, v in binary_metrics(y_true[idx], margin[idx]).items():
            samples[m].append(v)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {m: ((float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else (np.nan, np.nan))
            for m, v in samples.items()}


def fold_bootstrap_ci(folds: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n_boot: int = 200, seed: int = 0,
                      level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile CI of the MEAN over folds, resampling test patients within every fold (seeded).

    `folds` holds (y_true, margin, patient ids) per fold. The table reports the mean of per-fold metrics, and
    pooling margins of different folds' models would rank images against another model's scale, so each
    bootstrap replicate resamples each fold's patients, scores each fold on its own, and averages.
    """
    rng = np.random.default_rng(seed)
    prepared = []
    for y_true, margin, groups in folds:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        prepared.append((np.asarray(y_true), np.asarray(margin), [np.flatnonzero(inverse == p)
                                                                  for p in range(inverse.max() + 1)]))
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        per_fold = []
        for y_true, margin, rows_of in prepared:
            idx = np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))])
            if not degenerate_reason(y_true[idx]):
                per_fold.append(binary_metrics(y_true[idx], margin[idx]))
        if per_fold:
            for m in METRICS:
                samples[m].append(float(np.mean([f[m] for f in per_fold])))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {m: ((float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else (np.nan, np.nan))
            for m, v in samples.items()}


def seed_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, std and Student-t 95% CI of the mean over few-shot seeds (NaN values of degenerate draws dropped).

    A t-interval, because the seeds are independent draws and their mean is what the study reports.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (np.nan, np.nan, np.nan, np.nan)
    mean = float(v.mean())
    if len(v) == 1:
        return (mean, np.nan, np.nan, np.nan)
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * sd / np.sqrt(len(v)))
    return (mean, sd, mean - half, mean + half)

