"""Probe solvers: small pure functions over arrays, batched over problems (seeds, folds) and regularisation values.

Every solver returns a *margin*: the predicted class is positive exactly when margin > 0, and the margin ranks test
images for PR-AUC / ROC-AUC. Binary tasks only (labels 0/1); the probe refuses categorical tasks with more than
two classes and asks for a derived binary task, which is the study's one-vs-rest case.

Why hand-written rather than one sklearn fit per draw per C: a few-shot grid is thousands of tiny, identical-shape
problems; solving them as one stacked tensor program (all seeds × all C at once) is the project's speed claim.
Each solver is tested against its sklearn / numpy reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import faiss
import numpy as np
import torch

C_GRID = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)
RIDGE_GRID = (1e3, 1e2, 1e1, 1.0, 1e-1, 1e-2, 1e-3)  # most regularised first: ties pick it
K_GRID = (21, 11, 5, 3, 1)  # smoothest first: ties pick it
TRANSFORMS = ("none", "l2", "standardise")
REFIT_TOL = 3e-5  # logistic_fit_shared's default stop (fits whose margins are reported)
SELECTION_TOL = 1e-3  # logistic_fit_shared tolerance for fits that only score a C (inner-CV folds)
SHARED_MAX_ELEMENTS = 2**23  # per [n, columns] float64 working array of logistic_fit_shared (64 MiB)
NEWTON_MAX_DIM = 256  # n ≥ d above this: a Newton step's n·d² costs more than a whole L-BFGS fit


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded inside, restoring the setting after.

    Why: the few-shot (n < d) Newton solver is hundreds of small batched ops (bmm over [P, ≤64, ≤65], tiny Cholesky
    factorisations) where a second intra-op thread only adds synchronisation; measured on 2 cores it is ~1.4×
    faster with one thread, and far less sensitive to other processes competing for the cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- transforms
def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (stateless: needs no training side)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def fit_standardise(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training side only (a constant feature keeps std 1 so it stays finite)."""
    mu = x_train.mean(axis=-2, keepdims=True)
    sd = x_train.std(axis=-2, keepdims=True)
    return mu, np.where(sd > 1e-12, sd, 1.0)


def apply_transform(kind: str, x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Fit `kind` on x_train, apply it to x_train and every array in `others` (same trailing feature axis)."""
    if kind not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {kind!r}")
    if kind == "none":
        return [x_train, *others]
    if kind == "l2":
        return [l2_normalise(a) for a in (x_train, *others)]
    mu, sd = fit_standardise(x_train)
    return [(a - mu) / sd for a in (x_train, *others)]


def balanced_weights(y: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """sklearn's class_weight='balanced' per sample: n / (n_classes * count(class)), over the rows in `mask`.

    Works on stacks [..., n]; padded rows (mask False) get weight 0 so they vanish from every sum.
    """
    y = np.asarray(y)
    mask = np.ones(y.shape, bool) if mask is None else np.asarray(mask, bool)
    n = mask.sum(-1, keepdims=True)
    pos = (mask & (y == 1)).sum(-1, keepdims=True)
    neg = n - pos
    n_classes = (pos > 0).astype(int) + (neg > 0).astype(int)
    w_pos = n / np.maximum(n_classes * pos, 1)
    w_neg = n / np.maximum(n_classes * neg, 1)
    return np.where(mask, np.where(y == 1, w_pos, w_neg), 0.0)


# ---------------------------------------------------------------------------------------------- logistic
def _newton_logistic(z: torch.Tensor, yy: torch.Tensor, sw: torch.Tensor, c: torch.Tensor,
                     max_iter: int = 100, tol: float = 1e-14) -> torch.Tensor:
    """Damped Newton for min 0.5|v|² + C Σ s_i log(1+exp(-y_i(z_i·v + b))), batched over [P] problems × [G] C.

    z [P, n, m], yy/sw [P, n] (±1 targets, sample weights), c [P, G]. Returns theta [P, G, m+1] (v, then b).
    The intercept is unpenalised, as in sklearn. The C columns are solved in order of increasing C, each
    warm-started from the previous solutions (the regularisation path, extrapolated linearly in log C when that
    lowers the objective): from a warm start Newton needs a few
    steps even at C = 1e6 on separable data, where a cold start needs many damped ones.
    """
    p_, n, m = z.shape
    zb = torch.cat([z, torch.ones(p_, n, 1, dtype=z.dtype)], dim=2)  # [P, n, m+1]
    reg = torch.ones(m + 1, dtype=z.dtype)
    reg[-1] = 0.0
    swy = sw * yy

    def objective(th: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:  # th [P, m+1], cc [P] → [P]
        f = torch.bmm(zb, th[..., None])[..., 0]
        loss = (sw * torch.nn.functional.softplus(-yy * f)).sum(-1)
        return 0.5 * (th * th * reg).sum(-1) + cc * loss

    order = torch.argsort(c[0], stable=True)
    out = torch.zeros(p_, c.shape[1], m + 1, dtype=z.dtype)
    theta = torch.zeros(p_, m + 1, dtype=z.dtype)
    previous = None
    for g in order.tolist():
        cc = c[:, g]
        start = theta
        if previous is not None:  # extrapolate along the path (grids are evenly spaced in log C)
            guess = 2 * theta - previous
            better = objective(guess, cc) < objective(theta, cc)
            start = torch.where(better[:, None], guess, theta)
        previous, theta = theta, start
        obj = objective(theta, cc)
        for _ in range(max_iter):
            f = torch.bmm(zb, theta[..., None])[..., 0]
            q = torch.sigmoid(-yy * f)  # = 1 - p(correct class)
            grad = theta * reg - cc[:, None] * torch.bmm((swy * q)[:, None], zb)[:, 0]
            curv = cc[:, None] * sw * q * (1 - q)
            hess = torch.bmm(zb.transpose(1, 2), zb * curv[..., None]) + torch.diag(reg)
            hess[..., -1, -1] += 1e-12  # the intercept's curvature can underflow for confident, tiny-C fits
            chol, info = torch.linalg.cholesky_ex(hess)
            if bool((info == 0).all()):
                step = torch.cholesky_solve(grad[..., None], chol)[..., 0]
            else:  # numerically indefinite for some problem: the general solver copes
                step = torch.linalg.lstsq(hess, grad[..., None]).solution[..., 0]
            decrement = (grad * step).sum(-1)  # Newton decrement², ≥ 0
            # relative to the objective, not absolute: at C = 1e-6 the objective and the decision values are
            # ~1e-6 in scale, and an absolute tolerance would leave the intercept visibly unconverged
            if bool((decrement <= tol * obj.abs()).all()):
                break
            # batched backtracking: every problem halves its own step until Armijo holds (usually at t = 1)
            t = torch.ones_like(obj)
            pending = torch.ones_like(obj, dtype=torch.bool)
            new_theta, new_obj = theta, obj
            for _ in range(40):
                cand = theta - t[:, None] * step
                cand_obj = objective(cand, cc)
                ok = pending & (cand_obj <= obj - 1e-4 * t * decrement)
                new_theta = torch.where(ok[:, None], cand, new_theta)
                new_obj = torch.where(ok, cand_obj, new_obj)
                pending &= ~ok
                if not bool(pending.any()):
                    break
                t = torch.where(pending, t * 0.5, t)
            stalled = bool((new_obj >= obj).all())  # rounding floor reached everywhere: nothing left to gain
            theta, obj = new_theta, new_obj
            if stalled:
                break
        out[:, g] = theta
    return out


def logistic_fit(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, cs: Sequence[float] | np.ndarray,
                 max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Class-weighted L2 logistic regression for a stack of problems and a C grid, sklearn's objective exactly.

    Few-shot problems (n < d) and narrow full-data ones (d ≤ NEWTON_MAX_DIM) are solved all at once by batched
    Newton; wide full-data problems (n ≥ d > NEWTON_MAX_DIM) by `logistic_fit_shared`, one matrix at a time (the
    probe sends problems that share one matrix to `logistic_fit_shared` directly, all at once).

    x [P, n, d], y [P, n] in {0, 1}, sample_weight [P, n] (use `balanced_weights`; 0 marks a padded row),
    cs [G] (shared) or [P, G]. Returns weights [P, G, d] and intercepts [P, G] in the space of x.

    When n < d the optimum lies in the span of the training rows (representer theorem), so each problem is solved
    in an n-dimensional basis from a QR of x^T and mapped back: exact, and it turns a 768-wide few-shot problem
    into a 2K-wide one. Float64 throughout so decision values match sklearn to ~1e-6.
    """
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    yy = torch.as_tensor(np.where(np.asarray(y) == 1, 1.0, -1.0))
    sw = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64))
    c = torch.as_tensor(np.asarray(cs, dtype=np.float64))
    if c.ndim == 1:
        c = c[None].expand(xt.shape[0], -1)
    _, n, d = xt.shape
    if n >= d > NEWTON_MAX_DIM:  # one problem at a time over its own matrix (the shared solver's P = 1 case)
        fits = [logistic_fit_shared(np.asarray(x[p], dtype=np.float32), np.asarray(y[p]),
                                    np.asarray(sample_weight[p])[None], c[p].numpy()) for p in range(len(xt))]
        return np.concatenate([f[0] for f in fits]), np.concatenate([f[1] for f in fits])
    with _one_thread() if n < d else nullcontext():  # few-shot: many tiny ops (see _one_thread)
        theta, w = _small_logistic(xt, yy, sw, c, max_iter)
    return w.numpy(), theta[..., -1].numpy()


def _small_logistic(xt: torch.Tensor, yy: torch.Tensor, sw: torch.Tensor, c: torch.Tensor,
                    max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logistic_fit`'s Newton paths: (theta [P, G, m+1], weights [P, G, d] in the space of x)."""
    _, n, d = xt.shape
    if n < d:
        # x x^T = L L^T, so z = L gives every inner product of x, and w = x^T L^{-T} v maps back. A Cholesky of the
        # n×n Gram is far cheaper than a QR of x^T; padded (all-zero) rows get a unit diagonal, which leaves the
        # real rows' block untouched. Exact duplicates would make the Gram singular: then QR.
        gram = xt @ xt.transpose(1, 2)
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        jitter = 1e-12 * diag.mean(-1, keepdim=True).clamp_min(1e-30)
        gram = gram + torch.diag_embed(torch.where(diag > 0, jitter, torch.ones_like(diag)))
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info == 0).all()):
            theta = _newton_logistic(chol, yy, sw, c, max_iter=max_iter)
            coef = torch.linalg.solve_triangular(chol.transpose(1, 2), theta[..., :-1].transpose(1, 2), upper=True)
            w = torch.einsum("pnd,png->pgd", xt, coef)
        else:
            q, r = torch.linalg.qr(xt.transpose(1, 2))  # x = r^T q^T, q [P, d, n] orthonormal columns
            theta = _newton_logistic(r.transpose(1, 2), yy, sw, c, max_iter=max_iter)
            w = torch.einsum("pdn,pgn->pgd", q, theta[..., :-1])
    else:
        theta = _newton_logistic(xt, yy, sw, c, max_iter=max_iter)
        w = theta[..., :-1]
    return theta, w


# ---------------------------------------------------------------------------------------------- logistic, shared x
def _eigen_preconditioner(x: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted mean μ [d], eigenvalues λ [d] and eigenvectors V [d, d] (float32) of the centred weighted Gram.

    `sw` [n] is the mean sample weight over the problems: each problem's own centred Gram is close to a multiple of
    this one (its rows are a large subset of them), which is all a preconditioner needs.
    """
    total = sw.sum()
    mu = (sw.to(x.dtype) @ x).double() / total
    xs = x * sw.sqrt().to(x.dtype)[:, None]
    gram = (xs.T @ xs).double() - total * torch.outer(mu, mu)
    lam, vec = torch.linalg.eigh(gram.float())
    return mu, lam.double().clamp_min(0.0), vec


def _weighted_softplus(s: torch.Tensor, yy: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Σ_i s_i log(1 + exp(−y_i f_i)) per column."""
    return (s * torch.nn.functional.softplus(-yy * f)).sum(0)


def _shared_gradient(x: torch.Tensor, mu: torch.Tensor, yy: torch.Tensor, s: torch.Tensor, c: torch.Tensor,
                     w: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient [d+1, Q] in (w, β) (x centred at μ, so ∂/∂w is taken at fixed β) and the curvature Σ s q(1−q)."""
    q = torch.sigmoid(-yy * f)
    r = s * yy * q  # −∂loss/∂f
    rsum = r.sum(0)
    g_w = w / c - (x.T @ r.float()).double() + mu[:, None] * rsum
    return torch.cat([g_w, -rsum[None]]), (s * q * (1 - q)).sum(0)


def _two_loop(grad: torch.Tensor, hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], vec: torch.Tensor,
              diag: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    """L-BFGS H·grad, batched over columns; H₀ is diag⁻¹ in the eigenbasis `vec` for w and 1/curv for β."""
    qv = grad.clone()
    alphas = []
    for hs, hy, rho in reversed(hist):
        a = rho * (hs * qv).sum(0)
        qv -= a[None] * hy
        alphas.append(a)
    rot = (vec.T @ qv[:-1].float()).double() / diag
    r = torch.cat([(vec @ rot.float()).double(), (qv[-1] / curv.clamp_min(1e-300))[None]])
    for (hs, hy, rho), a in zip(hist, reversed(alphas), strict=True):
        r += (a - rho * (hy * r).sum(0))[None] * hs
    return r


def _line_search(s: torch.Tensor, yy: torch.Tensor, c: torch.Tensor, w: torch.Tensor, f: torch.Tensor,
                 obj: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, u: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Armijo backtracking from t = 1 along `step`; decision values along it are f + t·u (no matmul).

    Returns (t, data term at the new point, ok); t = 0 where no decrease was found (the rounding floor).
    """
    pen0 = 0.5 * (w * w).sum(0) / c
    base = pen0 + obj
    slope = (grad * step).sum(0)
    t = torch.ones_like(obj)
    data = _weighted_softplus(s, yy, f + u)
    new = 0.5 * ((w + step[:-1]) ** 2).sum(0) / c + data
    ok = new <= base + 1e-4 * slope
    for _ in range(30):
        if bool(ok.all()):
            break
        t = torch.where(ok, t, 0.5 * t)
        cand_data = _weighted_softplus(s, yy, f + t * u)
        cand = 0.5 * ((w + t * step[:-1]) ** 2).sum(0) / c + cand_data
        better = ~ok & (cand <= base + 1e-4 * t * slope)
        data = torch.where(better, cand_data, data)
        ok = ok | better
    return torch.where(ok, t, torch.zeros_like(t)), torch.where(ok, data, obj), ok


def logistic_fit_shared(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, cs: Sequence[float] | np.ndarray,
                        tol: float | Sequence[float] | np.ndarray = REFIT_TOL, max_iter: int = 500, history: int = 20,
                        preconditioner: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Class-weighted L2 logistic regression for many problems over ONE matrix (the full-data case).

    Same objective as sklearn's: 0.5|w|² + C Σ s_i log(1 + exp(−y_i(x_i·w + b))), intercept unpenalised.
    x [n, d] (shared), y [n] in {0, 1}, sample_weight [P, n] (0 = the row is not in problem p: an inner fold's
    held-out side, the outer test side), cs [G]. Returns weights [P, G, d] and intercepts [P, G].

    Why hand-written: a full-data C search is dozens of problems over the same n × d matrix, which sklearn fits one
    at a time with a mat-vec per iteration. Here every (problem, C) is a column, so an iteration is one x @ W
    forward and one xᵀ @ R backward for all of them at once (compute-bound, not memory-bound).
    The method is L-BFGS whose initial inverse Hessian is diagonal in the eigenbasis of the centred weighted Gram
    xᵀSx (one d × d eigh per call): there the curvature of 0.5|w|²/C + Σ s·softplus is ≈ κ·λ_j + 1/C, κ being the
    problem's current mean curvature s·q(1−q), exact at small C and the right scale at large C; the intercept
    decouples once x is centred, so the parameters are (w, β) with b = β − μ·w. The line search needs no extra
    matmul: decision values are linear in the step, f + t·(x @ δ). Matmuls are float32 (caches are float32), sums
    and parameters float64.

    A problem stops when gᵀHg (H the L-BFGS inverse Hessian: the Newton decrement's estimate) is below
    tol² · Σ s q(1−q) · (mean f² + 1e-12): the remaining Newton step would move the curvature-weighted RMS
    decision value by less than `tol` times the RMS decision value. Converged problems leave the batch. `tol` may
    be one value per problem [P]: a fit that only feeds a selection score (an inner-CV fold's validation MCC) can
    stop looser than a refit whose margins are reported; in the full-data C search the inner folds' large-C
    columns are most of the iterations.
    Problems are solved in chunks of at most SHARED_MAX_ELEMENTS / (n·G) so the float64 [n, columns] working
    arrays stay bounded on big caches; `preconditioner` (μ, λ, V, mean Σs) lets the chunks share one eigh.
    """
    xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    n, d = xt.shape
    yy = torch.as_tensor(np.where(np.asarray(y) == 1, 1.0, -1.0))[:, None]
    sw = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64))
    cs = np.asarray(cs, dtype=np.float64)
    p_, g_ = sw.shape[0], len(cs)
    tols = np.broadcast_to(np.asarray(tol, dtype=np.float64), (p_,))
    if preconditioner is None:
        preconditioner = (*_eigen_preconditioner(xt, sw.mean(0)), float(sw.mean(0).sum()))
    mu, lam, vec, mean_total = preconditioner
    chunk = max(1, SHARED_MAX_ELEMENTS // (n * g_))
    if p_ > chunk:  # bound the [n, P·G] working arrays; the chunks share one preconditioner
        parts = [logistic_fit_shared(xt.numpy(), y, sample_weight[i:i + chunk], cs, tols[i:i + chunk], max_iter,
                                     history, preconditioner) for i in range(0, p_, chunk)]
        return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
    q_ = p_ * g_  # columns: problem-major, C-minor
    w_out = torch.zeros(d, q_, dtype=torch.float64)
    b_out = torch.zeros(q_, dtype=torch.float64)

    act = torch.arange(q_)
    s = sw.repeat_interleave(g_, dim=0).T.contiguous()  # [n, Q]
    c = torch.as_tensor(np.tile(cs, p_))
    tol2 = torch.as_tensor(np.repeat(tols * tols, g_))  # per column
    stot = s.sum(0)
    w = torch.zeros(d, q_, dtype=torch.float64)
    beta = torch.zeros(q_, dtype=torch.float64)
    f = torch.zeros(n, q_, dtype=torch.float64)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # L-BFGS pairs (s_k, y_k, ρ_k)
    grad, curv = _shared_gradient(xt, mu, yy, s, c, w, f)
    obj = _weighted_softplus(s, yy, f)  # data term only; the penalty is added where needed
    for _ in range(max_iter):
        direction = _two_loop(grad, hist, vec, (curv / mean_total)[None] * lam[:, None] + 1.0 / c[None], curv)
        dec = (grad * direction).sum(0)
        done = dec <= tol2 * curv * ((s * f * f).sum(0) / stot + 1e-12)
        if bool(done.any()):
            keep = ~done
            w_out[:, act[done]], b_out[act[done]] = w[:, done], beta[done]
            act = act[keep]
            if act.numel() == 0:
                break
            s, c, tol2, stot = s[:, keep], c[keep], tol2[keep], stot[keep]
            w, beta, f = w[:, keep], beta[keep], f[:, keep]
            grad, curv, obj, direction = grad[:, keep], curv[keep], obj[keep], direction[:, keep]
            hist = [(hs[:, keep], hy[:, keep], rho[keep]) for hs, hy, rho in hist]
        step_w = (-direction[:-1]).float()
        step = torch.cat([step_w.double(), -direction[-1:]])  # exactly the step the float32 matmul sees
        u = (xt @ step_w).double() + (step[-1] - mu @ step[:-1])[None]
        t, obj, ok = _line_search(s, yy, c, w, f, obj, grad, step, u)
        w, beta, f = w + t * step[:-1], beta + t * step[-1], f + t * u
        new_grad, curv = _shared_gradient(xt, mu, yy, s, c, w, f)
        sk, yk = t * step, new_grad - grad
        sy = (sk * yk).sum(0)
        good = sy > 1e-10 * sk.norm(dim=0) * yk.norm(dim=0)
        hist.append((torch.where(good, sk, 0.0), torch.where(good, yk, 0.0),
                     torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)))
        hist = hist[-history:]
        # no decrease found along a descent direction: the rounding floor; a zero gradient retires the problem
        grad = torch.where(ok[None], new_grad, torch.zeros_like(new_grad))
    if act.numel():  # max_iter reached
        w_out[:, act], b_out[act] = w, beta
    b = b_out - mu @ w_out
    return w_out.T.reshape(p_, g_, d).numpy(), b.reshape(p_, g_).numpy()


# ---------------------------------------------------------------------------------------------- ridge
def ridge_fit(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray,
              lambdas: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ridge on ±1 targets (sklearn RidgeClassifier), the whole λ path from ONE eigendecomposition.

    x [P, n, d], y [P, n] in {0,1}, sample_weight [P, n] (0 = padded row), lambdas [G] → w [P, G, d], b [P, G].
    The intercept comes from weighted centring, as sklearn does. The eigendecomposition is of the n×n kernel when
    n ≤ d (the dual form) and of the d×d Gram otherwise, so its cost never exceeds min(n, d)³.
    """
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64))
    yy = torch.as_tensor(np.where(np.asarray(y) == 1, 1.0, -1.0))
    sw = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64))
    lam = torch.as_tensor(np.asarray(lambdas, dtype=np.float64))
    total = sw.sum(-1, keepdim=True)
    xm = (sw[..., None] * xt).sum(1, keepdim=True) / total[..., None]
    ym = (sw * yy).sum(-1, keepdim=True) / total
    root = sw.sqrt()
    xc = root[..., None] * (xt - xm)
    yc = root * (yy - ym)
    n, d = xt.shape[1:]
    if n <= d:
        evals, u = torch.linalg.eigh(xc @ xc.transpose(1, 2))
        proj = torch.einsum("pnk,pn->pk", u, yc)  # [P, n]
        alpha = torch.einsum("pnk,pgk->pgn", u, proj[:, None] / (evals[:, None] + lam[None, :, None]))
        w = torch.einsum("pnd,pgn->pgd", xc, alpha)
    else:
        evals, v = torch.linalg.eigh(xc.transpose(1, 2) @ xc)
        proj = torch.einsum("pdk,pd->pk", v, torch.einsum("pnd,pn->pd", xc, yc))
        w = torch.einsum("pdk,pgk->pgd", v, proj[:, None] / (evals.clamp_min(0)[:, None] + lam[None, :, None]))
    b = ym - torch.einsum("pgd,pd->pg", w, xm[:, 0])
    return w.numpy(), b.numpy()


# ---------------------------------------------------------------------------------------------- prototype, kNN
def prototype_margin(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Nearest class centroid by cosine similarity: margin = cos(x, μ1) − cos(x, μ0).

    The centroids are means of L2-normalised training rows (as in SimpleShot), so one long feature vector cannot
    dominate its class's prototype.
    """
    xn = l2_normalise(x_train)
    mu1 = l2_normalise(xn[y_train == 1].mean(0))
    mu0 = l2_normalise(xn[y_train == 0].mean(0))
    xt = l2_normalise(x_test)
    return xt @ mu1 - xt @ mu0


def knn_margin(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, k: int) -> np.ndarray:
    """k nearest neighbours by cosine (faiss IndexFlatIP on L2-normalised rows).

    margin = class-balanced share of positive neighbours − 0.5, each neighbour weighted by its class's balanced
    weight so a 1:4 training set does not vote 'negative' by default. For a fixed k this ranks test images exactly
    as the plain share of positive neighbours does.
    """
    k = int(min(k, len(y_train)))
    index = faiss.IndexFlatIP(x_train.shape[1])
    index.add(np.ascontiguousarray(l2_normalise(x_train), dtype=np.float32))
    _, nbrs = index.search(np.ascontiguousarray(l2_normalise(x_test), dtype=np.float32), k)
    w = balanced_weights(y_train)
    nb_w = w[nbrs]
    pos = (nb_w * (y_train[nbrs] == 1)).sum(1)
    return pos / nb_w.sum(1) - 0.5


# ---------------------------------------------------------------------------------------------- selection
def batched_mcc(y: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """MCC of (margin > 0) against y over the last axis, for a whole stack at once; 0 where undefined.

    Written out because C selection scores every (draw, C) pair of a grid in one go; sklearn's
    matthews_corrcoef would be one Python call per pair. Tested equal to sklearn's (which also returns 0 when a
    row or column of the confusion matrix is empty).
    """
    y = np.broadcast_to(np.asarray(y) == 1, margin.shape)
    p = margin > 0
    tp = (y & p).sum(-1).astype(np.float64)
    tn = (~y & ~p).sum(-1).astype(np.float64)
    fp = (~y & p).sum(-1).astype(np.float64)
    fn = (y & ~p).sum(-1).astype(np.float64)
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1.0), 0.0)


def pick_best(scores: np.ndarray) -> np.ndarray:
    """Index of the best score along the last axis; ties go to the FIRST grid value (the most regularised)."""
    return np.argmax(np.nan_to_num(scores, nan=-np.inf) >= np.nanmax(scores, axis=-1, keepdims=True) - 1e-12,
                     axis=-1)
