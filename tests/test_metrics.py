"""Layer-similarity metrics: CKA (functional O(N·d²) form vs the oracle's Gram form) and mutual kNN."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, G, random_orthogonal, rel_err, structured

import structure_ops
from structure_ops import reference


@pytest.mark.parametrize(("n", "da", "db"), [(4, 3, 5), (7, 3, 64), (50, 7, 13), (129, 130, 64), (300, 64, 3)], ids=str)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_cka_matches_gram_form(n, da, db, unbiased):
    a, b = structured(n, da, db, seed=n)
    expected = reference.cka(a, b, unbiased=unbiased)
    got = structure_ops.cka(a, b, unbiased=unbiased)
    assert got.dtype == F64 and got.shape == ()
    assert rel_err(got, expected) < 1e-10
    if n > 10:
        assert 0.05 < abs(expected.item()) < 0.999  # related but not identical views


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cka_low_precision_inputs(unbiased, dtype):
    a, b = structured(60, 9, 6, seed=1)
    aq, bq = a.to(dtype), b.to(dtype)
    expected = reference.cka(aq.double(), bq.double(), unbiased=unbiased)
    got = structure_ops.cka(aq, bq, unbiased=unbiased)
    assert got.dtype == torch.float32  # fp32 result for fp32 and half inputs
    assert rel_err(got, expected) < 1e-6  # computed in float64 internally


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_cka_invariances(unbiased):
    a, b = structured(40, 6, 5, seed=2)
    base = structure_ops.cka(a, b, unbiased=unbiased).item()
    q = random_orthogonal(6, seed=3)
    assert structure_ops.cka(a @ q, b, unbiased=unbiased).item() == pytest.approx(base, rel=1e-10)
    # scaling is exact up to the +1e-6 in the denominator
    assert structure_ops.cka(2.5 * a, b, unbiased=unbiased).item() == pytest.approx(base, rel=1e-6)
    if not unbiased:  # the biased form centers the features: translation invariant
        assert structure_ops.cka(a + 7.0, b).item() == pytest.approx(base, rel=1e-9)
    assert structure_ops.cka(a, a, unbiased=unbiased).item() == pytest.approx(1.0, abs=1e-5)
    assert structure_ops.cka(b, a, unbiased=unbiased).item() == pytest.approx(base, rel=1e-12)


def test_mutual_knn_from_indices_hand_values():
    ia = torch.tensor([[1, 2], [0, 2], [0, 1]])
    assert structure_ops.mutual_knn_from_indices(ia, ia.flip(1)).item() == 1.0
    ib = torch.tensor([[1, 0], [2, 1], [1, 2]])  # row 0: {1}, row 1: {2}, row 2: {0, 1} ∩ {1, 2} = {1}
    assert structure_ops.mutual_knn_from_indices(ia, ib).item() == pytest.approx(3 / 6, abs=0)
    with pytest.raises(ValueError, match=r"neighbour lists must both be \(N, k\)"):
        structure_ops.mutual_knn_from_indices(ia, ib[:, :1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mutual_knn_spec_anchor(backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ext")
    x, y = G(8, 4, torch.sin, 1, 1), G(8, 3, torch.cos, 0.5, 0.3)
    assert structure_ops.mutual_knn(x, y, 2, backend=backend).item() == 0.1875
    # invariant to the scale of each row (rows are L2-normalized inside)
    scales = torch.linspace(0.1, 10.0, 8, dtype=F64)[:, None]
    assert structure_ops.mutual_knn(x * scales, y, 2, backend=backend).item() == 0.1875


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("k", ["rice", "sqrt", "sturges", 3])
def test_mutual_knn_functional_matches_oracle(backend, k, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_ext")
    a, b = structured(90, 10, 8, seed=5)
    expected = reference.mutual_knn(a, b, k).item()
    assert 0 < expected < 1
    assert structure_ops.mutual_knn(a, b, k, backend=backend).item() == pytest.approx(expected, rel=1e-14)
