"""Linear probe: multinomial logistic regression on frozen (aligned or raw) features, CLIP's protocol.

CLIP (Radford et al. 2021, appendix A.3) trains an L-BFGS logistic regression on the frozen features and picks
the L2 regularization on a validation split by a sweep over C ∈ [1e-6, 1e6] refined by a parametric binary
search; :func:`linear_probe` does the same:

1. features are L2-normalized per row, then standardized per coordinate with the mean / std of the rows the
   classifier is fitted on (the test rows never enter any statistic);
2. unless ``C`` is given, a seeded, per-class stratified ``val_frac`` of the training rows is held out; C is
   searched on the grid 10^{-6, -4, …, 6}, then refined around the best value with steps of 1, ½, ¼ decades
   (ties go to the smaller C, i.e. the stronger regularization, so the choice is deterministic);
3. the classifier is refitted on all training rows with the chosen C and scored on the test rows:
   top-1 accuracy, top-5 with more than 5 classes, and mean-per-class recall (top-1 recall of each class in
   ``test_y``, averaged: the metric of unbalanced sets such as Caltech-101, Pets, Flowers-102, Aircraft).

The objective is scikit-learn's ``C·Σ_i CE_i + ½‖W‖²`` (bias not penalized), solved with scikit-learn's L-BFGS
when it is installed (the ``train`` extra) or with ``torch.optim.LBFGS`` in float64 otherwise (``backend``);
both minimize the same strictly convex function.
"""

from __future__ import annotations

import math

import torch

COARSE = tuple(10.0**e for e in range(-6, 7, 2))
SMALL_PROBLEM = 1 << 22  # rows × features × classes up to which scikit-learn runs single-threaded


def _as_tensor(name: str, v, dims: int) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    if t.dim() != dims:
        want = "(n, d)" if dims == 2 else "(n,)"
        raise ValueError(f"linear_probe: {name} must be {want}, got shape {tuple(t.shape)} ({t.dtype})")
    return t.detach().cpu()


def _check(train_x, train_y, test_x, test_y):
    xs = _as_tensor("train_x", train_x, 2), _as_tensor("test_x", test_x, 2)
    ys = _as_tensor("train_y", train_y, 1), _as_tensor("test_y", test_y, 1)
    for name, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"linear_probe: {name}_x has {x.shape[0]} rows but {name}_y has {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ValueError(f"linear_probe: {name}_x is empty")
        if not x.is_floating_point():
            raise ValueError(f"linear_probe: {name}_x must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"linear_probe: {name}_x has NaN or Inf values")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"linear_probe: {name}_y must hold integer class labels, got {y.dtype}")
    if xs[0].shape[1] != xs[1].shape[1]:
        raise ValueError(f"linear_probe: train_x and test_x must have the same width, got {tuple(xs[0].shape)} and "
                         f"{tuple(xs[1].shape)}")
    classes = torch.unique(ys[0])
    if len(classes) < 2:
        raise ValueError(f"linear_probe: train_y needs at least 2 classes, got {classes.tolist()}")
    unseen = sorted(set(torch.unique(ys[1]).tolist()) - set(classes.tolist()))
    if unseen:
        raise ValueError(f"linear_probe: test_y has labels absent from train_y: {unseen[:10]}{' …' if len(unseen) > 10 else ''}")
    # labels → 0…K−1 in the order of the sorted training classes
    return xs[0].double(), torch.searchsorted(classes, ys[0]), xs[1].double(), torch.searchsorted(classes, ys[1]), classes


def _normalize(fit_x: torch.Tensor, *others: torch.Tensor):
    fit_x = torch.nn.functional.normalize(fit_x, dim=1)
    mu, sd = fit_x.mean(0), fit_x.std(0, unbiased=False).clamp_min(1e-12)
    return [(fit_x - mu) / sd] + [(torch.nn.functional.normalize(o, dim=1) - mu) / sd for o in others]


def _fit_torch(x: torch.Tensor, y: torch.Tensor, k: int, C: float, max_iter: int):
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / (C * x.shape[0])  # C·ΣCE + ½‖W‖², divided by C·n (same minimizer, better scaled)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y, reduction="mean") + 0.5 * scale * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: z @ w + b


def _fit_sklearn(x: torch.Tensor, y: torch.Tensor, k: int, C: float, max_iter: int):
    import contextlib
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=1e-6)
    # Small problems run single-threaded: BLAS threads cost more than they save there, and on a shared machine
    # they were measured 30x slower (2 cores, 60 x 4 features: 0.06 s single-threaded for 5 fits, ~2 s with 2).
    small = x.numel() * k <= SMALL_PROBLEM
    with warnings.catch_warnings(), (threadpool_limits(1) if small else contextlib.nullcontext()):
        warnings.simplefilter("ignore", ConvergenceWarning)  # extreme C of the sweep may stop at max_iter
        clf.fit(x.numpy(), y.numpy())
    w = torch.as_tensor(clf.coef_, dtype=torch.float64)
    b = torch.as_tensor(clf.intercept_, dtype=torch.float64)
    if k == 2 and w.shape[0] == 1:  # binary: one logit difference
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    return lambda z: z @ w.T + b


def _backend(backend: str) -> str:
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"linear_probe: backend must be 'auto', 'sklearn' or 'torch', got {backend!r}")
    if backend == "torch":
        return backend
    try:
        import sklearn  # noqa: F401
    except ImportError:
        if backend == "sklearn":
            raise ValueError("linear_probe: backend 'sklearn' needs scikit-learn (pip install scikit-learn)") from None
        return "torch"
    return "sklearn"


def _scores(logits: torch.Tensor, y: torch.Tensor, k: int) -> dict[str, float]:
    ranked = logits.topk(min(5, k), dim=1).indices
    hit = (ranked[:, 0] == y).double()
    out = {"top1": float(hit.mean())}
    if k > 5:
        out["top5"] = float((ranked == y[:, None]).any(1).double().mean())
    out["mean_per_class"] = float(torch.stack([hit[y == c].mean() for c in y.unique()]).mean())
    return out


def _holdout(y: torch.Tensor, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, validation rows): per class, a seeded round(frac·count) rows held out, ≥ 1 row kept to fit."""
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in y.unique(sorted=True):
        rows = torch.nonzero(y == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        m = min(int(round(frac * len(rows))), len(rows) - 1)
        val.append(rows[:m])
        fit.append(rows[m:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def linear_probe(train_x, train_y, test_x, test_y, *, C: float | None = None, seed: int = 0, val_frac: float = 0.2,
                 select_by: str = "top1", max_iter: int = 1000, backend: str = "auto") -> dict:
    """Fit a multinomial logistic regression on ``train_x`` (n, d) / ``train_y`` (n,) integer labels and score
    it on ``test_x`` / ``test_y``; ``C`` (inverse L2 strength) chosen on a held-out split of train when None.

    Returns ``{"top1", "mean_per_class", ["top5" with > 5 classes], "C", "selected", "val_<select_by>",
    "search": [[C, held-out score], ...], "n_train", "n_test", "n_classes", "backend"}``.
    """
    if C is not None and not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
        raise ValueError(f"linear_probe: C must be a finite number > 0, got {C!r}")
    if not 0 < val_frac < 1:
        raise ValueError(f"linear_probe: val_frac must be in (0, 1), got {val_frac!r}")
    if select_by not in ("top1", "mean_per_class"):
        raise ValueError(f"linear_probe: select_by must be 'top1' or 'mean_per_class', got {select_by!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"linear_probe: max_iter must be a positive int, got {max_iter!r}")
    xtr, ytr, xte, yte, classes = _check(train_x, train_y, test_x, test_y)
    k = len(classes)
    be = _backend(backend)
    fit_fn = _fit_sklearn if be == "sklearn" else _fit_torch
    search: list[list[float]] = []
    val_score = None
    if C is None:
        fit_rows, val_rows = _holdout(ytr, val_frac, seed)
        if len(val_rows) < 2 or len(ytr[fit_rows].unique()) < 2:
            raise ValueError(f"linear_probe: {len(ytr)} training rows are too few to hold out a validation split "
                             f"(val_frac {val_frac:g}); pass C")
        fx, vx = _normalize(xtr[fit_rows], xtr[val_rows])
        fy, vy = ytr[fit_rows], ytr[val_rows]
        seen: dict[float, float] = {}

        def score(log_c: float) -> float:
            log_c = round(log_c, 6)
            if log_c not in seen:
                seen[log_c] = _scores(fit_fn(fx, fy, k, 10.0**log_c, max_iter)(vx), vy, k)[select_by]
                search.append([10.0**log_c, seen[log_c]])
            return seen[log_c]

        def better(a: float, b: float) -> bool:  # a beats the current best b: higher score, ties to the smaller C
            return score(a) > score(b) or (score(a) == score(b) and a < b)

        best = None
        for c in COARSE:
            lc = math.log10(c)
            if best is None or better(lc, best):
                best = lc
        for step in (1.0, 0.5, 0.25):
            centre = best
            for lc in (centre - step, centre + step):
                if -6 <= lc <= 6 and better(lc, best):
                    best = lc
        C, val_score = 10.0**best, score(best)
        search.sort()
    tx, sx = _normalize(xtr, xte)
    out = _scores(fit_fn(tx, ytr, k, float(C), max_iter)(sx), yte, k)
    out.update(C=float(C), selected=val_score is not None, n_train=len(ytr), n_test=len(yte), n_classes=k, backend=be,
               search=search)
    if val_score is not None:
        out[f"val_{select_by}"] = val_score
    return out
