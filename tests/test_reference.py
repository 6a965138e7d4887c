"""The float64 oracle first: docs/spec.md anchoring values, gradcheck, the analytic level-1 backward, and a
literal transcription of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import F64, G, rel_err

from structure_ops import reference as R
from structure_ops._options import resolve_k


def spec(text: str):
    """A docs/spec.md anchor printed with a fixed number of decimals: equal up to half a unit of the last one."""
    decimals = len(text.split(".")[1])
    return pytest.approx(float(text), rel=0, abs=0.5 * 10.0**-decimals + 1e-15)


TWO_X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
TWO_Z = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)


def spec_x():
    return G(6, 4, torch.sin, 1, 1)


def spec_z():
    return G(6, 3, torch.cos, 0.5, 0.3)


# ---------------------------------------------------------------------------------------------------
# docs/spec.md anchoring values
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("centering", ["none", "mean"])
def test_two_point_anchor(centering):
    value = R.structure_loss(TWO_X, TWO_Z, temperature=1.0, centering=centering)
    assert value.dtype == F64 and value.shape == ()
    assert value.item() == spec("0.0140896209")


@pytest.mark.parametrize("centering", ["none", "mean"])
def test_two_point_textbook_js(centering):
    # SPEC: the textbook JS of the same rows is 0.0139037264; with two points mean-centering only
    # reflects the two rows through their midpoint, so both centerings give the same value.
    js = R.structure_loss(TWO_X, TWO_Z, temperature=1.0, centering=centering, divergence="js")
    assert js.item() == spec("0.0139037264")
    # and the default (public-code) direction is not the textbook one:
    default = R.structure_loss(TWO_X, TWO_Z, temperature=1.0, centering=centering)
    assert abs(default.item() - js.item()) > 1e-4


@pytest.mark.parametrize(("tau", "expected"), [(0.05, "1.921506772"), (0.1, "1.73567932"), (0.5, "0.3334592893")])
def test_spec_G_anchor_values(tau, expected):
    value = R.structure_loss(spec_x(), spec_z(), temperature=tau)
    assert value.item() == spec(expected)


def test_spec_G_anchor_gradient():
    z = spec_z().requires_grad_()
    (grad,) = torch.autograd.grad(R.structure_loss(spec_x(), z), z)
    expected_row0 = torch.tensor([-0.5119053203, 0.3019244889, 1.0418326532], dtype=F64)
    torch.testing.assert_close(grad[0], expected_row0, rtol=0, atol=0.5e-10 + 1e-15)
    assert grad.norm().item() == spec("3.0836637247")


@pytest.mark.parametrize(("logit_scale", "expected"), [(20.0, "4.601090522"), (1.0, "1.356212372")])
def test_clip_anchor(logit_scale, expected):
    a, b = G(4, 3, torch.sin, 1, 0), G(4, 3, torch.cos, 1, 0)
    value = R.clip_loss(a, b, torch.tensor(logit_scale, dtype=F64))
    assert value.item() == spec(expected)
    # normalize=True means the rows may be passed pre-normalized or raw: same value.
    pre = R.clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), logit_scale, normalize=False)
    assert pre.item() == pytest.approx(value.item(), rel=1e-13)


def test_mutual_knn_anchor():
    x = F.normalize(G(8, 4, torch.sin, 1, 1), dim=1)
    y = F.normalize(G(8, 3, torch.cos, 0.5, 0.3), dim=1)
    assert R.mutual_knn(x, y, 2).item() == 0.1875  # = 3/16: exact in binary


# ---------------------------------------------------------------------------------------------------
# gradcheck of the oracle (float64 finite differences)
# ---------------------------------------------------------------------------------------------------
GRADCHECK_OPTIONS = [
    dict(temperature=0.1),
    dict(temperature=0.3, levels=3, weighting="inverse"),
    dict(temperature=0.2, levels=2, margin=0.01),
    dict(temperature=0.2, centering="standard"),
    dict(temperature=0.2, centering="none"),
    dict(temperature=0.2, center_first=True),
    dict(similarity="rbf", gamma=0.7),
    dict(similarity="rbf", gamma=2.0, levels=2),
    dict(temperature=0.2, divergence="js"),
    dict(temperature=0.3, divergence="js", levels=2),
]


@pytest.mark.parametrize("options", GRADCHECK_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gradcheck_structure_loss(options):
    x = G(6, 4, torch.sin, 1, 1).requires_grad_()
    z = G(6, 3, torch.cos, 0.5, 0.3).requires_grad_()
    assert R.structure_loss(x, z, **options).item() > 1e-3  # a non-trivial point
    assert torch.autograd.gradcheck(lambda x, z: R.structure_loss(x, z, **options), (x, z), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_clip_loss(normalize):
    a = (0.7 * G(5, 3, torch.sin, 1, 0)).requires_grad_()
    b = (0.9 * G(5, 3, torch.cos, 1, 0)).requires_grad_()
    s = torch.tensor(3.0, dtype=F64, requires_grad=True)
    fn = lambda a, b, s: R.clip_loss(a, b, s, normalize=normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b, s), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# The analytic level-1 backward (what the kernels implement) vs autograd of the core
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("similarity", ["cosine", "rbf"])
@pytest.mark.parametrize("divergence", ["structure", "js"])
@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_level1_analytic_grad_matches_autograd(similarity, divergence, tau):
    xh = R.prepare(G(9, 4, torch.sin, 1, 1))
    zh = R.prepare(G(9, 5, torch.cos, 0.5, 0.3)).requires_grad_()
    kwargs = dict(temperature=tau, similarity_kind=similarity, gamma=1.3, divergence=divergence)
    (auto,) = torch.autograd.grad(R.structure_core(xh, zh, **kwargs), zh)
    analytic = R.structure_core_level1_grad(xh, zh.detach(), **kwargs)
    assert auto.norm() > 1e-6
    assert rel_err(analytic, auto) < 1e-10


# ---------------------------------------------------------------------------------------------------
# A literal transcription of the paper's formula (three logs, no stable rewrite) in float64
# ---------------------------------------------------------------------------------------------------
def literal_structure_divergence(o, a, eps=1e-12):
    """½ [KL(M̃‖Ã) + KL(M̃‖Õ)] summed over all entries, divided by N (docs/spec.md §1 step 7)."""
    m = (o + a) / 2 + eps
    ot, at = o + eps, a + eps
    kl_m_a = (m * (torch.log(m) - torch.log(at))).sum()
    kl_m_o = (m * (torch.log(m) - torch.log(ot))).sum()
    return 0.5 * (kl_m_a + kl_m_o) / o.shape[0]


def literal_js(o, a):
    m = (o + a) / 2
    return 0.5 * ((o * torch.log(o / m)).sum() + (a * torch.log(a / m)).sum()) / o.shape[0]


def literal_structure_loss(x, z, *, levels, temperature, weighting, margin, divergence="structure"):
    """R_S straight from docs/spec.md §1 steps 2–10 with the default centering and cosine similarity."""

    def side(u):
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = u - u.mean(dim=0, keepdim=True)
        return torch.softmax(u @ u.T / temperature, dim=1)

    px, pz = side(x), side(z)
    total = 0.0
    for level in range(1, levels + 1):
        o, a = torch.linalg.matrix_power(px, level), torch.linalg.matrix_power(pz, level)
        d = literal_structure_divergence(o, a) if divergence == "structure" else literal_js(o, a)
        w = 1.0 if weighting == "none" else 1.0 / level
        total = total + w * max(d.item() - margin, 0.0)
    return total / levels


def _row_stochastic(n, seed_shift, tau=2.0):
    u = G(n, 5, torch.sin, 0.37, seed_shift)
    return torch.softmax(u @ u.T / tau, dim=1)


@pytest.mark.parametrize("n", [3, 10, 40])
def test_literal_paper_formula_matches_divergence(n):
    o, a = _row_stochastic(n, 0.0), _row_stochastic(n, 1.1)
    assert o.min() > 1e-6 and a.min() > 1e-6  # non-degenerate: the three logs are accurate here
    lit = literal_structure_divergence(o, a)
    assert lit.item() > 1e-3
    assert rel_err(R.structure_divergence(o, a), lit) < 1e-12
    assert rel_err(R.structure_divergence(o, a, divergence="js"), literal_js(o, a)) < 1e-12


@pytest.mark.parametrize(
    "options",
    [
        dict(levels=1, temperature=0.5, weighting="none", margin=0.0),
        dict(levels=3, temperature=0.5, weighting="inverse", margin=0.0),
        dict(levels=4, temperature=0.7, weighting="none", margin=0.0),
        dict(levels=2, temperature=0.5, weighting="inverse", margin=0.0, divergence="js"),
    ],
)
def test_literal_paper_loss_matches_reference(options):
    x, z = G(12, 4, torch.sin, 1, 1), G(12, 3, torch.cos, 0.5, 0.3)
    lit = literal_structure_loss(x, z, **options)
    assert lit > 1e-3
    assert R.structure_loss(x, z, **options).item() == pytest.approx(lit, rel=1e-11)


def test_literal_paper_loss_margin_gates_each_level():
    x, z = G(12, 4, torch.sin, 1, 1), G(12, 3, torch.cos, 0.5, 0.3)
    d_levels = [literal_structure_loss(x, z, levels=1, temperature=0.5, weighting="none", margin=0.0)]
    px = torch.softmax(R.prepare(x) @ R.prepare(x).T / 0.5, dim=1)
    pz = torch.softmax(R.prepare(z) @ R.prepare(z).T / 0.5, dim=1)
    for level in (2, 3):
        o, a = torch.linalg.matrix_power(px, level), torch.linalg.matrix_power(pz, level)
        d_levels.append(literal_structure_divergence(o, a).item())
    margin = 0.5 * (max(d_levels) + min(d_levels))
    assert sum(d > margin for d in d_levels) in (1, 2)  # the hinge is open on some levels, closed on others
    expected = sum(max(d - margin, 0.0) for d in d_levels) / 3
    got = R.structure_loss(x, z, levels=3, temperature=0.5, margin=margin)
    assert got.item() == pytest.approx(expected, rel=1e-11)
    assert literal_structure_loss(x, z, levels=3, temperature=0.5, weighting="none", margin=margin) == pytest.approx(
        expected, rel=1e-14
    )


# ---------------------------------------------------------------------------------------------------
# Small pieces of the oracle
# ---------------------------------------------------------------------------------------------------
def test_prepare_orders():
    u = G(5, 3, torch.sin, 1, 0.2) + 2.0
    normed = u / u.norm(dim=1, keepdim=True)
    torch.testing.assert_close(R.prepare(u), normed - normed.mean(0), rtol=0, atol=1e-15)
    centered = u - u.mean(0)
    torch.testing.assert_close(
        R.prepare(u, center_first=True), centered / centered.norm(dim=1, keepdim=True), rtol=0, atol=1e-15
    )
    std = (normed - normed.mean(0)) / (normed - normed.mean(0)).std(dim=0, unbiased=True)
    torch.testing.assert_close(R.prepare(u, centering="standard"), std, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(R.prepare(u, centering="none"), normed, rtol=0, atol=1e-15)


def test_rbf_similarity_definition():
    u = R.prepare(G(5, 3, torch.sin, 1, 0.2))
    s = R.similarity(u, similarity="rbf", gamma=1.7)
    expected = torch.exp(-1.7 * torch.cdist(u, u).square())
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=1e-14)


def test_reference_knn_ties_go_to_lower_index():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    expected = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [4, 0, 1], [3, 0, 1]])
    assert torch.equal(R.knn(a, 3), expected)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        ("rice", 5000, 35),  # docs/spec.md §3
        ("rice", 1000, 20),  # an exact cube must not round up
        ("sqrt", 5000, 71),
        ("sqrt", 100, 10),
        ("sturges", 5000, 14),
        ("sturges", 1024, 11),
        ("rice", 2, 1),  # clipped to N − 1
        ("sturges", 3, 2),  # ceil(log2 3 + 1) = 3, clipped
        (7, 100, 7),
    ],
)
def test_resolve_k_rules(k, n, expected):
    assert resolve_k(k, n) == expected


def test_reference_cka_properties():
    a, b = G(20, 5, torch.sin, 0.3, 0.1), G(20, 4, torch.cos, 0.7, 0.2)
    q = torch.linalg.qr(G(5, 5, torch.sin, 1.3, 0.4))[0]
    for unbiased in (False, True):
        self_sim = R.cka(a, a, unbiased=unbiased).item()
        assert self_sim == pytest.approx(1.0, abs=1e-5)
        base = R.cka(a, b, unbiased=unbiased).item()
        assert 0 < abs(base) < 1
        # linear CKA is invariant to orthogonal maps and isotropic scaling of either side
        assert R.cka(3.0 * a @ q, b, unbiased=unbiased).item() == pytest.approx(base, rel=1e-6)


def test_reference_cka_biased_matches_hsic_definition():
    a, b = G(15, 5, torch.sin, 0.3, 0.1), G(15, 4, torch.cos, 0.7, 0.2)
    n = a.shape[0]
    h = torch.eye(n, dtype=F64) - torch.full((n, n), 1.0 / n, dtype=F64)

    def hsic(k, l):  # noqa: E741
        return torch.trace(k @ h @ l @ h)

    k, l = a @ a.T, b @ b.T  # noqa: E741
    expected = hsic(k, l) / (math.sqrt(hsic(k, k) * hsic(l, l)) + 1e-6)
    assert R.cka(a, b).item() == pytest.approx(expected.item(), rel=1e-12)
