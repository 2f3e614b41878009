"""Splits: patient-grouped, NaN-free, nested and reproducible few-shot draws (property-based)."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.model_selection import StratifiedGroupKFold

from prognosis_cache.evaluate.splits import (
    few_shot_draws,
    leave_one_center_out,
    patient_kfold,
    stratified_group_folds,
)


def cohort(seed: int, n_patients: int = 60, max_images: int = 4, pos_rate: float = 0.3, nan_rate: float = 0.05):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_images + 1, n_patients)
    groups = np.repeat(np.array([f"p{i:03d}" for i in range(n_patients)]), counts)
    y = np.repeat((rng.random(n_patients) < pos_rate).astype(float), counts)
    y[rng.random(len(y)) < nan_rate] = np.nan
    centers = np.repeat(rng.choice(["A", "B", "C"], n_patients), counts)
    return y, groups, centers


def no_shared_patient(groups, a, b):
    return not set(groups[a]) & set(groups[b])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6))
def test_kfold_is_patient_grouped_and_covers_labelled_rows(seed, n_splits):
    y, groups, _ = cohort(seed)
    splits = patient_kfold(y, groups, n_splits, seed)
    assert len(splits) == n_splits
    for s in splits:
        assert no_shared_patient(groups, s.train_idx, s.test_idx)
        assert not np.isnan(y[s.train_idx]).any() and not np.isnan(y[s.test_idx]).any()
    tests = np.sort(np.concatenate([s.test_idx for s in splits]))
    np.testing.assert_array_equal(tests, np.flatnonzero(~np.isnan(y)))


def test_kfold_same_seed_same_folds_other_seed_differs():
    y, groups, _ = cohort(3)
    a, b, c = patient_kfold(y, groups, 5, 1), patient_kfold(y, groups, 5, 1), patient_kfold(y, groups, 5, 2)
    assert all(np.array_equal(x.test_idx, z.test_idx) for x, z in zip(a, b, strict=True))
    assert any(not np.array_equal(x.test_idx, z.test_idx) for x, z in zip(a, c, strict=True))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_loco_holds_out_each_centre_without_patient_leak(seed):
    y, groups, centers = cohort(seed)
    # a patient seen at two centres must not leak into training
    centers = centers.copy()
    centers[0] = "B" if centers[0] != "B" else "A"
    for s in leave_one_center_out(y, groups, centers):
        assert set(centers[s.test_idx]) == {s.test_center}
        assert no_shared_patient(groups, s.train_idx, s.test_idx)
        assert not np.isnan(y[s.train_idx]).any()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["none", "k-shot"]))
def test_draws_are_nested_balanced_one_image_per_patient_and_inside_train(seed, validation):
    y, groups, _ = cohort(seed, n_patients=120)
    split = patient_kfold(y, groups, 5, 0)[0]
    shots = (1, 2, 4, 8)
    draws = few_shot_draws(y, groups, split.train_idx, shots, seeds=range(3), validation=validation)
    train_set = set(split.train_idx.tolist())
    by_seed = {}
    for d in draws:
        if d.degenerate:
            assert len(d.train_idx) == 0 and d.degenerate
            continue
        assert set(d.train_idx.tolist()) <= train_set and set(d.val_idx.tolist()) <= train_set
        assert no_shared_patient(groups, d.train_idx, d.val_idx)
        assert no_shared_patient(groups, d.train_idx, split.test_idx)
        for idx in (d.train_idx, d.val_idx) if validation == "k-shot" else (d.train_idx,):
            assert len(set(groups[idx])) == len(idx)  # one image per patient
            for c in (0, 1):
                assert int((y[idx] == c).sum()) == d.k  # K patients per class
        by_seed.setdefault(d.seed, []).append(d)
    for ds in by_seed.values():
        ds = sorted(ds, key=lambda d: d.k)
        for small, big in itertools.pairwise(ds):
            assert set(small.train_idx.tolist()) <= set(big.train_idx.tolist())


def test_draws_reproducible_and_seed_dependent():
    y, groups, _ = cohort(7, n_patients=150)
    split = patient_kfold(y, groups, 5, 0)[0]
    a = few_shot_draws(y, groups, split.train_idx, (4,), seeds=range(5))
    b = few_shot_draws(y, groups, split.train_idx[::-1], (4,), seeds=range(5))  # row order must not matter
    assert all(np.array_equal(x.train_idx, z.train_idx) for x, z in zip(a, b, strict=True))
    assert len({tuple(d.train_idx) for d in a}) == 5


def test_too_few_patients_marks_degenerate_instead_of_crashing():
    y, groups, _ = cohort(1, n_patients=30, pos_rate=0.2, nan_rate=0.0)
    split = patient_kfold(y, groups, 5, 0)[0]
    n_pos = len(set(groups[split.train_idx][y[split.train_idx] == 1]))
    draws = few_shot_draws(y, groups, split.train_idx, (1, n_pos + 1), seeds=range(2))
    assert [bool(d.degenerate) for d in draws] == [False, True, False, True]
    assert "class 1" in draws[1].degenerate


@settings(max_examples=40, deadline=None)
@given(n_patients=st.integers(5, 60), prevalence=st.floats(0.1, 0.9), n_splits=st.integers(2, 5),
       seed=st.integers(0, 2**31 - 1))
def test_fast_group_folds_equal_sklearns(n_patients, prevalence, n_splits, seed):
    """Our vectorised greedy must give exactly sklearn's StratifiedGroupKFold folds (same seed, same rows)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 4, n_patients)
    groups = np.repeat([f"p{i:03d}" for i in range(n_patients)], per_patient)
    y = np.repeat((rng.random(n_patients) < prevalence).astype(int), per_patient)
    y[rng.random(len(y)) < 0.1] ^= 1  # some patients with mixed labels
    if len(np.unique(y)) < 2 or np.bincount(y).min() < n_splits:
        return
    ours = stratified_group_folds(y, groups, n_splits, seed % 1000)
    ref = [te for _, te in StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed % 1000).split(y, y, groups)]
    assert [a.tolist() for a in ours] == [b.tolist() for b in ref]
