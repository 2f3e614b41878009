"""Metrics equal sklearn's; degenerate sets give NaN; intervals behave."""

import math

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from prognosis_cache.evaluate.metrics import (
    binary_metrics,
    degenerate_reason,
    fold_bootstrap_ci,
    patient_bootstrap_ci,
    seed_interval,
)


def sample(seed=0, n=80):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    margin = rng.normal(size=n) + 0.8 * (y - 0.5)
    return y, margin


def test_metrics_equal_sklearn_with_margin_gt_zero_rule():
    y, m = sample()
    got = binary_metrics(y, m)
    pred = m > 0
    assert math.isclose(got["mcc"], skm.matthews_corrcoef(y, pred))
    assert math.isclose(got["pr_auc"], skm.average_precision_score(y, m))
    assert math.isclose(got["roc_auc"], skm.roc_auc_score(y, m))
    assert math.isclose(got["balanced_accuracy"], skm.balanced_accuracy_score(y, pred))
    assert math.isclose(got["f1"], skm.f1_score(y, pred))


def test_single_class_test_set_is_nan_with_reason():
    y = np.zeros(10, int)
    assert all(math.isnan(v) for v in binary_metrics(y, np.linspace(-1, 1, 10)).values())
    assert "only class 0" in degenerate_reason(y)
    assert degenerate_reason(np.array([], int)) == "empty test set"
    assert degenerate_reason(np.array([0, 1])) == ""


def test_patient_bootstrap_is_seeded_and_brackets_the_estimate():
    y, m = sample(1, 120)
    groups = np.repeat(np.arange(40), 3)
    a = patient_bootstrap_ci(y, m, groups, n_boot=200, seed=3)
    b = patient_bootstrap_ci(y, m, groups, n_boot=200, seed=3)
    c = patient_bootstrap_ci(y, m, groups, n_boot=200, seed=4)
    assert a == b and a != c
    point = binary_metrics(y, m)
    for name, (lo, hi) in a.items():
        assert lo <= point[name] <= hi


def test_patient_bootstrap_resamples_patients_not_images():
    """Images of one patient are copies here: resampling images would give a narrower interval than patients."""
    y, m = sample(2, 30)
    groups = np.repeat(np.arange(30), 4)
    lo, hi = patient_bootstrap_ci(np.repeat(y, 4), np.repeat(m, 4), groups, n_boot=300, seed=0)["roc_auc"]
    ilo, ihi = patient_bootstrap_ci(np.repeat(y, 4), np.repeat(m, 4), np.arange(120), n_boot=300, seed=0)["roc_auc"]
    assert hi - lo > 1.5 * (ihi - ilo)


def test_seed_interval_is_student_t_and_drops_nan():
    v = np.array([0.1, 0.3, 0.2, np.nan, 0.4])
    mean, sd, lo, hi = seed_interval(v)
    clean = v[~np.isnan(v)]
    lo_ref, hi_ref = stats.t.interval(0.95, len(clean) - 1, loc=clean.mean(), scale=stats.sem(clean))
    assert math.isclose(mean, clean.mean()) and math.isclose(sd, clean.std(ddof=1))
    assert math.isclose(lo, lo_ref) and math.isclose(hi, hi_ref)
    assert all(math.isnan(x) for x in seed_interval(np.array([np.nan])))


def test_fold_bootstrap_ci_brackets_the_mean_over_folds_and_is_seeded():
    folds = []
    for f in range(3):
        y, m = sample(10 + f, 60)
        folds.append((y, m + f, np.repeat(np.arange(30), 2)))  # each fold's model on its own scale
    point = np.mean([binary_metrics(y, m)["roc_auc"] for y, m, _ in folds])
    a = fold_bootstrap_ci(folds, n_boot=100, seed=1)
    assert a == fold_bootstrap_ci(folds, n_boot=100, seed=1)
    lo, hi = a["roc_auc"]
    assert lo <= point <= hi and hi - lo < 0.3
