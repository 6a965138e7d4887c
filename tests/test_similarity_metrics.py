"""RBF-kernel CKA and CKNNA (structure_ops.train.similarity) against float64 brute force written here from the
formulas (explicit distance loops, H-matrix HSIC, Song et al.'s estimator, dense neighbour masks), their
invariances, the layer-selection paths that reuse per-layer kernels / kNN lists, and their null draws."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from structure_ops import functional as so
from structure_ops.train import selection
from structure_ops.train.selection import _permutations, score_layers
from structure_ops.train.similarity import KnnLayer, cknna, cknna_cross, rbf_cka

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(n, dx=7, dy=5, noise=0.5, seed=0):
    g = _gen(seed)
    x = torch.randn(n, dx, generator=g, dtype=D)
    return x, x @ torch.randn(dx, dy, generator=g, dtype=D) + noise * torch.randn(n, dy, generator=g, dtype=D)


# ------------------------------------------------------------------------------------------ brute-force oracles


def _hsic_biased(K, L):
    n = K.shape[0]
    H = torch.eye(n, dtype=D) - torch.full((n, n), 1.0 / n, dtype=D)
    return torch.trace(K @ H @ L @ H) / (n - 1) ** 2


def _hsic_unbiased(K, L):
    """Song et al. 2012, eq. 5, term by term with explicit loops over the entries for the trace term."""
    n = K.shape[0]
    Kt, Lt = K.clone(), L.clone()
    for i in range(n):
        Kt[i, i] = 0.0
        Lt[i, i] = 0.0
    tr = sum(float(Kt[i, j]) * float(Lt[j, i]) for i in range(n) for j in range(n))
    ones = torch.ones(n, dtype=D)
    return (tr + float(ones @ Kt @ ones) * float(ones @ Lt @ ones) / ((n - 1) * (n - 2))
            - 2.0 * float(ones @ Kt @ Lt @ ones) / (n - 2)) / (n * (n - 3))


def _rbf_gram(x, frac):
    n = x.shape[0]
    dist = [[math.sqrt(sum((float(x[i, c]) - float(x[j, c])) ** 2 for c in range(x.shape[1]))) for j in range(n)]
            for i in range(n)]
    sigma = frac * statistics.median(dist[i][j] for i in range(n) for j in range(i + 1, n))
    return torch.tensor([[math.exp(-dist[i][j] ** 2 / (2 * sigma * sigma)) for j in range(n)] for i in range(n)],
                        dtype=D)


def _cka_brute(x, y, frac, unbiased):
    K, L = _rbf_gram(x, frac), _rbf_gram(y, frac)
    h = _hsic_unbiased if unbiased else _hsic_biased
    return float(h(K, L)) / math.sqrt(float(h(K, K)) * float(h(L, L)))


def _knn_mask(S, k):
    """Dense 0/1 mask of each row's k largest entries off the diagonal (ties: lower index), from a full sort."""
    n = S.shape[0]
    M = torch.zeros(n, n, dtype=D)
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j: (-float(S[i, j]), j))
        for j in order[:k]:
            M[i, j] = 1.0
    return M


def _cknna_brute(x, y, k):
    xn, yn = F.normalize(x.to(D), dim=1), F.normalize(y.to(D), dim=1)
    K, L = xn @ xn.T, yn @ yn.T
    mk, ml = _knn_mask(K, k), _knn_mask(L, k)
    m = mk * ml
    return float(_hsic_unbiased(m * K, m * L)) / math.sqrt(
        float(_hsic_unbiased(mk * K, mk * K)) * float(_hsic_unbiased(ml * L, ml * L)))


# ----------------------------------------------------------------------------------------------------- RBF CKA


@pytest.mark.parametrize("n,frac,unbiased", [(24, 0.4, False), (25, 0.2, False), (25, 0.8, True), (24, 0.4, True)])
def test_rbf_cka_matches_brute_force(n, frac, unbiased):
    # n = 24, 25: 276 and 300 pairs (even counts: the median averages the two middle distances); odd counts in
    # test_rbf_cka_median_parity.
    x, y = _pair(n, seed=n)
    want = _cka_brute(x, y, frac, unbiased)
    got = float(rbf_cka(x.float(), y, frac, unbiased=unbiased))  # float32 input: computed in float64 all the same
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert float(rbf_cka(x, y, frac, unbiased=unbiased)) == pytest.approx(want, rel=1e-11, abs=1e-12)


def test_rbf_cka_median_parity():
    """n = 6: 15 pairs (odd count, the middle distance); n = 5: 10 pairs (even, mean of the two middle)."""
    for n in (5, 6):
        x, y = _pair(n, seed=100 + n)
        assert float(rbf_cka(x, y, 0.5)) == pytest.approx(_cka_brute(x, y, 0.5, False), rel=1e-11)


def test_rbf_cka_invariances():
    x, y = _pair(60, dx=8, dy=6, seed=3)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=_gen(4), dtype=D))
    base = float(rbf_cka(x, y))
    for xt in (x @ q, 3.7 * x, 1e-3 * x @ q + 5.0):  # orthogonal, isotropic scaling, both plus a translation
        assert float(rbf_cka(xt, y)) == pytest.approx(base, rel=1e-10)
    assert float(rbf_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(rbf_cka(x, x, unbiased=True)) == pytest.approx(1.0, abs=1e-12)
    # Not invariant to anisotropic scaling (a check that the test could fail).
    aniso = x * torch.linspace(0.1, 3.0, 8, dtype=D)
    assert abs(float(rbf_cka(aniso, y)) - base) > 1e-3
    # Related features score above unrelated ones; the biased estimator is inflated for unrelated features
    # (≈ 0.6 here, at n = 60), the unbiased one is near 0.
    z = torch.randn(60, 6, generator=_gen(9), dtype=D)
    assert base > float(rbf_cka(x, z)) > 0.3
    assert float(rbf_cka(x, y, unbiased=True)) > 0.3 and abs(float(rbf_cka(x, z, unbiased=True))) < 0.1


def test_rbf_cka_bad_inputs():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"rbf_cka: X and Y must have the same number of rows N: X has shape \(10, 3\)"):
        rbf_cka(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match=r"rbf_cka: Y must be a floating-point \(N, d\) tensor.*shape \(10,\)"):
        rbf_cka(x, torch.randn(10))
    with pytest.raises(ValueError, match="N >= 4"):
        rbf_cka(x[:3], x[:3], unbiased=True)
    with pytest.raises(ValueError, match="sigma_frac must be a positive finite number"):
        rbf_cka(x, x, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        rbf_cka(x, torch.full((10, 3), math.nan))
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        rbf_cka(torch.zeros(10, 3), x)


# ------------------------------------------------------------------------------------------------------- CKNNA


@pytest.mark.parametrize("n,k", [(30, 2), (30, 5), (41, 9)])
def test_cknna_matches_brute_force(n, k):
    x, y = _pair(n, seed=k)
    want = _cknna_brute(x, y, k)
    assert float(cknna(x, y, k)) == pytest.approx(want, rel=1e-10, abs=1e-12)
    # The dense-table and sorted-key membership paths agree.
    for dense in (True, False):
        a, b = KnnLayer(x, k, dense=dense), KnnLayer(y, k, dense=not dense)
        got = float(cknna_cross(a, b)) / math.sqrt(a.self_term * b.self_term)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_cknna_permuted_cross_term_equals_a_fresh_computation():
    """A null draw (text row π(i) paired with image row i) from the once-computed lists equals CKNNA recomputed
    from scratch on the permuted rows."""
    n, k = 40, 5
    x, y = _pair(n, seed=11)
    for dense in (True, False):
        a, b = KnnLayer(x, k, dense=dense), KnnLayer(y, k, dense=dense)
        perm = torch.randperm(n, generator=_gen(12))
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(n))
        got = float(cknna_cross(a, b, perm, inv)) / math.sqrt(a.self_term * b.self_term)
        assert got == pytest.approx(_cknna_brute(x, y[perm], k), rel=1e-10, abs=1e-12)


def test_cknna_properties():
    x, y = _pair(80, dx=8, dy=6, seed=5)
    k = 6
    assert float(cknna(x, x, k)) == pytest.approx(1.0, abs=1e-12)
    base = float(cknna(x, y, k))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=_gen(6), dtype=D))
    scale = torch.rand(80, 1, generator=_gen(7), dtype=D) + 0.5
    assert float(cknna(x @ q, y, k)) == pytest.approx(base, rel=1e-10)  # orthogonal transform
    assert float(cknna(x * scale, y, k)) == pytest.approx(base, rel=1e-10)  # per-row scaling (cosine kernel)
    unrelated = [float(cknna(x, torch.randn(80, 6, generator=_gen(s), dtype=D), k)) for s in range(20, 26)]
    assert 0.3 < base <= 1.0 and all(abs(u) < 0.2 for u in unrelated)
    assert abs(sum(unrelated) / len(unrelated)) < 0.08
    assert -1.0 <= float(cknna(x, -x @ q, k)) <= 1.0


def test_cknna_bad_inputs():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"cknna: X and Y must have the same number of rows N"):
        cknna(x, torch.randn(8, 3), 3)
    with pytest.raises(ValueError, match="k must be >= 2"):
        cknna(x, x, 1)
    with pytest.raises(ValueError, match="N >= 4"):
        cknna(x[:3], x[:3], 2)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= N - 1 = 9"):
        cknna(x, x, 10)


# --------------------------------------------------------------------------------------------- layer selection


def _layers(n, dims, seed):
    g = _gen(seed)
    return {f"l{i}": torch.randn(n, d, generator=g) for i, d in enumerate(dims)}


def test_selection_scores_equal_the_standalone_metrics(monkeypatch):
    n = 50
    img, txt = _layers(n, [4, 9, 6], 0), _layers(n, [5, 3], 1)
    txt["l1"] = img["l1"][:, :5] + 0.3 * txt["l1"][:, :1]
    norm = {s: {a: F.normalize(t.double(), dim=1) for a, t in d.items()} for s, d in (("i", img), ("t", txt))}
    for metric, fn in (("rbf_cka", lambda a, b: rbf_cka(a, b, 0.4)),
                       ("rbf_cka_unbiased", lambda a, b: rbf_cka(a, b, 0.4, unbiased=True)),
                       ("cknna", lambda a, b: cknna(a, b, 5))):
        s = score_layers(img, txt, metric=metric, k=5, subset=None)
        want = torch.tensor([[float(fn(norm["i"][a], norm["t"][b])) for b in txt] for a in img], dtype=D)
        assert torch.allclose(s.scores, want, rtol=1e-10, atol=1e-12), metric
    # Grouped image kernels (one per group) and the sorted-key CKNNA path give the same scores and nulls.
    ref = {m: score_layers(img, txt, metric=m, k=5, subset=None, permutations=4) for m in ("rbf_cka", "cknna", "cka")}
    monkeypatch.setattr(selection, "_KERNELS_MAX_BYTES", 0)
    monkeypatch.setattr(selection, "_DENSE_MAX_N", 10)
    for m, r in ref.items():
        s = score_layers(img, txt, metric=m, k=5, subset=None, permutations=4)
        assert torch.allclose(s.scores, r.scores, rtol=1e-12, atol=1e-14), m
        assert torch.allclose(torch.tensor(s.calibration["null_mean"]), torch.tensor(r.calibration["null_mean"]),
                              rtol=1e-12, atol=1e-14), m


def test_calibrated_linear_cka_raw_scores_match_functional_cka():
    """--calibrate scores linear CKA from (n, n) kernels; the raw scores equal structure_ops.functional.cka's."""
    img, txt = _layers(40, [4, 7], 2), _layers(40, [3, 6], 3)
    for metric in ("cka", "cka_unbiased"):
        plain = score_layers(img, txt, metric=metric, subset=None)
        cal = score_layers(img, txt, metric=metric, subset=None, permutations=3)
        assert torch.allclose(plain.scores, cal.scores, rtol=1e-9, atol=1e-12), metric


@pytest.mark.parametrize("metric", ["rbf_cka", "rbf_cka_unbiased", "cknna", "cka"])
def test_null_draws_equal_recomputed_metrics(metric):
    """Every null draw of every pair equals the metric recomputed from scratch on the permuted text rows."""
    n, P, seed = 36, 3, 4
    img, txt = _layers(n, [4, 6], 5), _layers(n, [5], 6)
    s = score_layers(img, txt, metric=metric, k=4, subset=None, permutations=P, seed=seed)
    perms, _ = _permutations(n, P, seed)
    fn = {"rbf_cka": lambda a, b: rbf_cka(a, b), "rbf_cka_unbiased": lambda a, b: rbf_cka(a, b, unbiased=True),
          "cknna": lambda a, b: cknna(a, b, 4), "cka": lambda a, b: so.cka(a, b)}[metric]
    nulls = []
    for perm in perms:
        nulls.append([[float(fn(F.normalize(img[a].double(), dim=1), F.normalize(txt[b][perm].double(), dim=1)))
                       for b in txt] for a in img])
    want = torch.tensor(nulls, dtype=D)
    assert torch.allclose(torch.tensor(s.calibration["null_mean"], dtype=D), want.mean(0), rtol=1e-9, atol=1e-12)
    raw = s.scores
    p_want = (1 + (want >= raw - 1e-12).sum(0)) / (P + 1)
    assert torch.equal(torch.tensor(s.calibration["p_value"], dtype=D), p_want.to(D))


def test_rbf_null_mean_matches_the_analytic_permutation_mean():
    """Biased HSIC: E_π⟨G_K, P G_L Pᵀ⟩ = tr(G_K)·tr(G_L)/(n−1) for double-centered kernels; unbiased: 0."""
    from structure_ops.train.similarity import KernelLayer

    n, P = 60, 400
    img, txt = _layers(n, [6], 7), _layers(n, [8], 8)
    a = KernelLayer(F.normalize(img["l0"].double(), dim=1), "rbf", False)
    b = KernelLayer(F.normalize(txt["l0"].double(), dim=1), "rbf", False)
    expect = float(torch.trace(a.g) * torch.trace(b.g)) / (n - 1)
    for unbiased, mean in ((False, expect), (True, 0.0)):
        s = score_layers(img, txt, metric="rbf_cka_unbiased" if unbiased else "rbf_cka", subset=None, permutations=P)
        null_mean = s.calibration["null_mean"][0][0]
        se = (s.calibration["calibrated"][0][0] / s.calibration["z"][0][0]) / math.sqrt(P)  # null std / √P
        assert abs(null_mean - mean) < 5 * se, (unbiased, null_mean, mean, se)
    assert expect > 0.05  # the biased null is far from 0 here (not a vacuous check)


def test_score_layers_bad_arguments():
    img, txt = _layers(20, [3], 0), _layers(20, [3], 1)
    with pytest.raises(ValueError, match="sigma_frac must be a positive finite number"):
        score_layers(img, txt, metric="rbf_cka", subset=None, sigma_frac=-1.0)
    with pytest.raises(ValueError, match="metric must be one of"):
        score_layers(img, txt, metric="rbf", subset=None)
    with pytest.raises(ValueError, match="cknna needs k >= 2"):
        score_layers(img, txt, metric="cknna", k=1, subset=None)
    with pytest.raises(ValueError, match="needs at least 4 rows"):
        score_layers(img, txt, metric="cknna", subset=3)
    img["l0"][3, 1] = math.nan
    with pytest.raises(ValueError, match="image layer 'l0' has non-finite values"):
        score_layers(img, txt, metric="rbf_cka", subset=None)
