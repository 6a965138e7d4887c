"""Invariances of R_S (docs/spec.md §1, numerical facts), on the oracle and on the CPU backend."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, G, random_orthogonal, rel_err, structured

import structure_ops

BACKENDS = ["reference", "cpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu":
        request.getfixturevalue("cpu_ext")
    return request.param


@pytest.fixture(scope="module")
def data():
    return structured(40, 6, 5, seed=3)


def R_S(x, z, backend, **options):
    options.setdefault("temperature", 0.1)
    return structure_ops.structure_loss(x, z, backend=backend, **options)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(temperature=0.05),
        dict(levels=3, weighting="inverse"),
        dict(divergence="js"),
        dict(divergence="js", levels=2),
        dict(similarity="rbf", gamma=2.0),
        dict(centering="standard", center_first=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_divergence_is_exactly_zero(backend, options, dtype):
    x = structured(33, 7, 7, seed=1)[0].to(dtype)
    z = x.clone().requires_grad_()
    loss = R_S(x, z, backend, **options)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()
    assert grad.abs().max().item() <= 1e3 * torch.finfo(dtype).eps


def test_positive_scaling_invariance(backend, data):
    x, z = data
    base = R_S(x, z, backend)
    for c in (1e-3, 0.37, 5.0, 1e4):
        assert R_S(x, c * z, backend).item() == pytest.approx(base.item(), rel=1e-12)
        assert R_S(c * x, z, backend).item() == pytest.approx(base.item(), rel=1e-12)


def test_orthogonal_rotation_invariance(backend, data):
    x, z = data
    base = R_S(x, z, backend)
    q = random_orthogonal(z.shape[1], seed=7)
    assert R_S(x, z @ q, backend).item() == pytest.approx(base.item(), rel=1e-11)
    assert R_S(x @ random_orthogonal(x.shape[1], seed=8), z, backend).item() == pytest.approx(base.item(), rel=1e-11)
    # the gradient rotates with the input: ∂R/∂(ZQ) = (∂R/∂Z) Q
    zr = z.clone().requires_grad_()
    zq = (z @ q).requires_grad_()
    (g,) = torch.autograd.grad(R_S(x, zr, backend), zr)
    (gq,) = torch.autograd.grad(R_S(x, zq, backend), zq)
    assert rel_err(gq, g @ q) < 1e-10


def test_zero_padding_invariance(backend, data):
    x, z = data
    base = R_S(x, z, backend)
    z_pad = torch.cat([z, torch.zeros(z.shape[0], 9, dtype=F64)], dim=1)
    x_pad = torch.cat([torch.zeros(x.shape[0], 4, dtype=F64), x], dim=1)
    assert R_S(x_pad, z_pad, backend).item() == pytest.approx(base.item(), rel=1e-12)
    zp = z_pad.clone().requires_grad_()
    (g,) = torch.autograd.grad(R_S(x, zp, backend), zp)
    assert g[:, z.shape[1] :].abs().max().item() == 0.0  # padded columns get no gradient


def test_translation_invariance_with_center_first(backend, data):
    x, z = data
    shift = torch.linspace(-3.0, 5.0, z.shape[1], dtype=F64)
    base = R_S(x, z, backend, center_first=True)
    assert R_S(x, z + shift, backend, center_first=True).item() == pytest.approx(base.item(), rel=1e-10)


def test_default_order_is_not_translation_invariant(backend, data):
    x, z = data
    shift = torch.linspace(-3.0, 5.0, z.shape[1], dtype=F64)
    base = R_S(x, z, backend)
    moved = R_S(x, z + shift, backend)
    assert abs(moved.item() - base.item()) > 1e-3 * abs(base.item())


def test_spec_anchor_on_both_backends(backend):
    x, z = G(6, 4, torch.sin, 1, 1), G(6, 3, torch.cos, 0.5, 0.3).requires_grad_()
    loss = structure_ops.structure_loss(x, z, backend=backend)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == pytest.approx(1.921506772, rel=0, abs=5e-10)
    assert g.norm().item() == pytest.approx(3.0836637247, rel=0, abs=5e-11)
