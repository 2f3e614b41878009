"""Solvers agree with their plain references (sklearn / numpy) within stated tolerances."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import matthews_corrcoef
from sklearn.neighbors import NearestCentroid
from sklearn.utils.class_weight import compute_sample_weight

from prognosis_cache.evaluate import solvers as sv
from prognosis_cache.evaluate.probe import _linear_fit


def problems(n, d, p=3, seed=0, pos=0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random((p, n)) < pos).astype(int)
    y[:, 0], y[:, 1] = 1, 0
    x = rng.normal(size=(p, n, d)) + 0.4 * y[..., None]
    return x, y, rng.normal(size=(50, d)) + 0.2


def test_balanced_weights_match_sklearn():
    _, y, _ = problems(30, 4)
    for row in y:
        np.testing.assert_allclose(sv.balanced_weights(row), compute_sample_weight("balanced", row))


# Tolerance: decision values within 1e-4 × (1 + max |sklearn value|) on held-out points, sklearn run to tol 1e-10.
@pytest.mark.parametrize(("n", "d"), [(12, 40), (120, 10)])  # few-shot (dual / QR path) and n ≥ d path
@pytest.mark.parametrize("c", [1e-2, 1.0, 1e2])
def test_logistic_matches_sklearn(n, d, c):
    x, y, xt = problems(n, d)
    w, b = sv.logistic_fit(x, y, sv.balanced_weights(y), [c])
    for p in range(len(x)):
        ref = LogisticRegression(C=c, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(x[p], y[p])
        expected = ref.decision_function(xt)
        np.testing.assert_allclose(xt @ w[p, 0] + b[p, 0], expected, atol=1e-4 * (1 + np.abs(expected).max()))


def test_logistic_grid_equals_separate_fits_and_ignores_padding():
    x, y, xt = problems(10, 30, p=2)
    w, b = sv.logistic_fit(x, y, sv.balanced_weights(y), sv.C_GRID)
    # pad problem 0 with masked junk rows: the solution must not move
    xp = np.concatenate([x, np.random.default_rng(1).normal(size=(2, 4, 30))], axis=1)
    yp = np.concatenate([y, np.ones((2, 4), int)], axis=1)
    mask = np.concatenate([np.ones((2, 10), bool), np.zeros((2, 4), bool)], axis=1)
    for g, c in enumerate(sv.C_GRID):
        w1, b1 = sv.logistic_fit(xp, yp, sv.balanced_weights(yp, mask), [c])
        np.testing.assert_allclose(xt @ w1[:, 0].T + b1[:, 0], xt @ w[:, g].T + b[:, g], atol=1e-7)


def test_logistic_tiny_c_is_converged_where_sklearn_stops_early():
    """At C=1e-6 the decision values are ~1e-6: our gradient must be at rounding level."""
    x, y, _ = problems(8, 30, p=1)
    s = sv.balanced_weights(y)
    w, b = sv.logistic_fit(x, y, s, [1e-6])
    yy = np.where(y[0] == 1, 1.0, -1.0)
    q = 1 / (1 + np.exp(yy * (x[0] @ w[0, 0] + b[0, 0])))
    grad_b = 1e-6 * (s[0] * yy * q).sum()
    assert abs(grad_b) < 1e-16


@pytest.mark.parametrize(("n", "d"), [(12, 40), (120, 10)])
def test_ridge_matches_sklearn_ridge_classifier(n, d):
    x, y, xt = problems(n, d)
    w, b = sv.ridge_fit(x, y, sv.balanced_weights(y), sv.RIDGE_GRID)
    for p in range(len(x)):
        for g, lam in enumerate(sv.RIDGE_GRID):
            ref = RidgeClassifier(alpha=lam, class_weight="balanced").fit(x[p], y[p])
            np.testing.assert_allclose(xt @ w[p, g] + b[p, g], ref.decision_function(xt), atol=1e-8)


def test_standardise_is_folded_into_weights():
    x, y, xt = problems(40, 6, p=1)
    x[0] = x[0] * np.arange(1, 7) + 5  # scales and offsets that standardising must undo
    allx = np.concatenate([x[0], xt])
    w, b = _linear_fit("logreg", allx, np.concatenate([y[0], np.zeros(50, int)]), [np.arange(40)], [1.0],
                       "standardise")
    mu, sd = x[0].mean(0), x[0].std(0)
    ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=10_000).fit((x[0] - mu) / sd, y[0])
    expected = ref.decision_function((xt - mu) / sd)
    np.testing.assert_allclose(xt @ w[0, 0] + b[0, 0], expected, atol=1e-4 * (1 + np.abs(expected).max()))


def test_prototype_matches_nearest_centroid_on_normalised_data():
    x, y, xt = problems(60, 8, p=1)
    xn, tn = sv.l2_normalise(x[0]), sv.l2_normalise(xt)
    ref = NearestCentroid().fit(xn, y[0])
    mu = sv.l2_normalise(ref.centroids_)
    expected = tn @ mu[1] - tn @ mu[0]
    np.testing.assert_allclose(sv.prototype_margin(x[0], y[0], xt), expected, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_matches_brute_force(k):
    x, y, xt = problems(80, 8, p=1)
    xn, tn = sv.l2_normalise(x[0]), sv.l2_normalise(xt)
    nbrs = np.argsort(-(tn @ xn.T), axis=1)[:, :k]
    wts = compute_sample_weight("balanced", y[0])[nbrs]
    expected = (wts * (y[0][nbrs] == 1)).sum(1) / wts.sum(1) - 0.5
    np.testing.assert_allclose(sv.knn_margin(x[0], y[0], xt, k), expected, atol=1e-6)


def test_batched_mcc_equals_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 25)
    margins = rng.normal(size=(6, 25))
    margins[0] = 1.0  # all predicted positive: sklearn's convention is 0
    expected = [matthews_corrcoef(y, m > 0) for m in margins]
    np.testing.assert_allclose(sv.batched_mcc(y, margins), expected, atol=1e-12)


def test_pick_best_breaks_ties_to_first():
    assert sv.pick_best(np.array([0.2, 0.5, 0.5, 0.1])) == 1
    np.testing.assert_array_equal(sv.pick_best(np.array([[0.0, 0.0], [0.0, 1.0]])), [0, 1])


def test_wide_full_data_path_agrees_with_newton(monkeypatch):
    """Wide n ≥ d problems go to the shared-matrix L-BFGS one at a time; it must land where exact Newton does.

    Tolerance as for sklearn above: 1e-4 × (1 + max |value|) on held-out points.
    """
    monkeypatch.setattr(sv, "NEWTON_MAX_DIM", 4)
    x, y, xt = problems(60, 10, p=2)
    w, b = sv.logistic_fit(x, y, sv.balanced_weights(y), [0.1, 10.0])
    monkeypatch.setattr(sv, "NEWTON_MAX_DIM", 10_000)
    wn, bn = sv.logistic_fit(x, y, sv.balanced_weights(y), [0.1, 10.0])
    expected = np.einsum("nd,pgd->pgn", xt, wn) + bn[..., None]
    np.testing.assert_allclose(np.einsum("nd,pgd->pgn", xt, w) + b[..., None], expected,
                               atol=1e-4 * (1 + np.abs(expected).max()))


def shared_problem(n=400, d=30, seed=5):
    """One float32 matrix (values exactly representable, so references see the same numbers) and 3 row masks."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    x = (rng.normal(size=(n, d)) + 0.5 * y[:, None] * (rng.random(d) < 0.3) + 0.3).astype(np.float32)
    x[:, 0] *= 10  # an anisotropic direction the preconditioner has to handle
    masks = rng.random((3, n)) < np.array([[0.6], [0.75], [0.9]])
    return x, y, masks


def test_shared_logistic_matches_newton_across_the_c_grid():
    """Every (mask, C) column against float64 Newton on that mask's rows (which agrees with sklearn at 1e-6).

    Tolerance: 1e-4 × (1 + max |value|) over all rows, the same bound as the sklearn tests; at C = 1e-6 the
    decision values are ~1e-4 in size, so there the bound is 1e-4 relative to them (the stopping rule is relative).
    """
    x, y, masks = shared_problem()
    sw = sv.balanced_weights(np.broadcast_to(y, masks.shape), masks)
    w, b = sv.logistic_fit_shared(x, y, sw, sv.C_GRID)
    x64 = x.astype(np.float64)
    for p, mask in enumerate(masks):
        wn, bn = sv.logistic_fit(x64[mask][None], y[mask][None], sv.balanced_weights(y[mask])[None], sv.C_GRID)
        for g, c in enumerate(sv.C_GRID):
            expected = x64 @ wn[0, g] + bn[0, g]
            scale = np.abs(expected).max() if c < 1e-3 else 1 + np.abs(expected).max()
            np.testing.assert_allclose(x64 @ w[p, g] + b[p, g], expected, atol=1e-4 * scale, err_msg=f"p={p} C={c}")


def test_shared_logistic_matches_sklearn():
    x, y, masks = shared_problem(seed=6)
    sw = sv.balanced_weights(np.broadcast_to(y, masks.shape), masks)
    w, b = sv.logistic_fit_shared(x, y, sw, [1e-2, 1.0, 1e2])
    x64 = x.astype(np.float64)
    for g, c in enumerate([1e-2, 1.0, 1e2]):
        ref = LogisticRegression(C=c, class_weight="balanced", tol=1e-10, max_iter=10_000).fit(x64[masks[1]],
                                                                                               y[masks[1]])
        expected = ref.decision_function(x64)
        np.testing.assert_allclose(x64 @ w[1, g] + b[1, g], expected, atol=1e-4 * (1 + np.abs(expected).max()))


def test_shared_logistic_ignores_rows_outside_the_mask():
    """A masked problem over the whole matrix equals the same problem on its rows alone; rows out of every mask
    (here: scaled far away) must not move it."""
    x, y, masks = shared_problem(seed=7)
    x[~masks[0]] *= 50
    sw = sv.balanced_weights(y, masks[0])[None]
    w, b = sv.logistic_fit_shared(x, y, sw, [1.0, 100.0])
    w1, b1 = sv.logistic_fit_shared(x[masks[0]], y[masks[0]], sv.balanced_weights(y[masks[0]])[None], [1.0, 100.0])
    held = x[masks[0]].astype(np.float64)
    expected = held @ w1[0].T + b1[0]
    np.testing.assert_allclose(held @ w[0].T + b[0], expected, atol=1e-4 * (1 + np.abs(expected).max()))


def test_shared_logistic_in_chunks_equals_one_batch(monkeypatch):
    """Big caches are solved a few problems at a time; the columns are independent problems, so chunking must not
    change the answer beyond the solver's own 1e-4 bound."""
    x, y, masks = shared_problem(seed=8)
    sw = sv.balanced_weights(np.broadcast_to(y, masks.shape), masks)
    w, b = sv.logistic_fit_shared(x, y, sw, [1e-2, 1.0, 1e2])
    monkeypatch.setattr(sv, "SHARED_MAX_ELEMENTS", len(y) * 3)  # one problem (3 C columns) per chunk
    wc, bc = sv.logistic_fit_shared(x, y, sw, [1e-2, 1.0, 1e2])
    expected = np.einsum("nd,pgd->pgn", x, w) + b[..., None]
    np.testing.assert_allclose(np.einsum("nd,pgd->pgn", x, wc) + bc[..., None], expected,
                               atol=1e-4 * (1 + np.abs(expected).max()))


def test_shared_logistic_on_ill_conditioned_rank_deficient_features():
    """Features of rank 30 in 80 dims, a large common offset and a 1e3 spread of scales (as real embeddings have).

    Tolerance 1e-3 × (1 + max |value|), looser than the 1e-4 above: the stopping rule bounds the curvature-weighted
    RMS change of the decision values, and at C = 1e6 the weakly curved directions let the worst row move a few
    times more than the RMS. A solver that mishandled the null space or the offset would be off by O(1).
    """
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.3).astype(int)
    z = rng.normal(size=(600, 30)) * np.logspace(0, -3, 30) + 0.7 * y[:, None] * (rng.random(30) < 0.2)
    x = (z @ rng.normal(size=(30, 80)) + 2.0).astype(np.float32)
    masks = rng.random((2, 600)) < np.array([[0.7], [0.9]])
    w, b = sv.logistic_fit_shared(x, y, sv.balanced_weights(np.broadcast_to(y, masks.shape), masks), sv.C_GRID)
    x64 = x.astype(np.float64)
    for p, mask in enumerate(masks):
        wn, bn = sv.logistic_fit(x64[mask][None], y[mask][None], sv.balanced_weights(y[mask])[None], sv.C_GRID)
        for g, c in enumerate(sv.C_GRID):
            expected = x64 @ wn[0, g] + bn[0, g]
            np.testing.assert_allclose(x64 @ w[p, g] + b[p, g], expected, atol=1e-3 * (1 + np.abs(expected).max()),
                                       err_msg=f"p={p} C={c}")


def test_shared_logistic_per_problem_tolerance_only_loosens_its_own_problem():
    """A loose tolerance on one problem leaves the other problems' fits exactly as with the tight one, and the
    loose problem still lands near the tight solution (close enough that its validation predictions agree)."""
    rng = np.random.default_rng(5)
    x = sv.l2_normalise(rng.normal(size=(400, 30)) + 0.3).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=400) > np.median(x[:, 0])).astype(np.int64)
    masks = np.stack([np.arange(400) % 3 != k for k in range(3)])
    sw = sv.balanced_weights(np.broadcast_to(y, masks.shape), masks)
    tight_w, tight_b = sv.logistic_fit_shared(x, y, sw, sv.C_GRID)
    w, b = sv.logistic_fit_shared(x, y, sw, sv.C_GRID, tol=[sv.SELECTION_TOL, sv.REFIT_TOL, sv.REFIT_TOL])
    tight_m = np.einsum("nd,pgd->pgn", x, tight_w) + tight_b[..., None]
    m = np.einsum("nd,pgd->pgn", x, w) + b[..., None]
    scale = np.abs(tight_m).max(-1, keepdims=True)
    np.testing.assert_allclose(m[1:], tight_m[1:], atol=1e-6 * (1 + scale[1:].max()))
    np.testing.assert_allclose(m[0], tight_m[0], atol=2e-2 * (1 + scale[0].max()))
    assert (np.sign(m[0]) != np.sign(tight_m[0])).mean() < 0.01
