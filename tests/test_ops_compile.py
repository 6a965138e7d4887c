"""The op boundary: torch.library.opcheck on every op, and torch.compile(fullgraph=True) of the public
functions (aot_eager on the CPU), forward and backward equal to eager."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, G, rel_err, structured

import structure_ops

pytestmark = pytest.mark.usefixtures("cpu_ext")

ops = torch.ops.structure_ops


def _structure_args(xh, zh, grad_x, grad_z, levels=1, similarity=0, divergence=0):
    # (xh, zh, levels, temperature, weighting, margin, similarity, gamma, divergence, eps, grad_x, grad_z)
    return (xh, zh, levels, 0.1, 1, 0.0, similarity, 1.5, divergence, 1e-12, grad_x, grad_z)


def _prepared(dtype, n=9):
    x, z = structured(n, 4, 3, seed=5)
    return structure_ops.reference.prepare(x).to(dtype), structure_ops.reference.prepare(z).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("grad_x", "grad_z"), [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize(("levels", "similarity", "divergence"), [(1, 0, 0), (2, 1, 1)], ids=["l1", "l2-rbf-js"])
def test_opcheck_structure_fwd(dtype, grad_x, grad_z, levels, similarity, divergence):
    xh, zh = _prepared(dtype)
    xh.requires_grad_(grad_x)
    zh.requires_grad_(grad_z)
    torch.library.opcheck(ops.structure_fwd, _structure_args(xh, zh, grad_x, grad_z, levels, similarity, divergence))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_opcheck_clip_fwd(dtype, scale_shape):
    a = G(6, 4, torch.sin, 1, 0, dtype).requires_grad_()
    b = G(6, 4, torch.cos, 1, 0, dtype).requires_grad_()
    s = torch.full(scale_shape, 7.0, dtype=dtype, requires_grad=True)
    torch.library.opcheck(ops.clip_fwd, (a, b, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_clip_bwd(dtype):
    a, b = G(6, 4, torch.sin, 1, 0, dtype), G(6, 4, torch.cos, 1, 0, dtype)
    s = torch.tensor(7.0, dtype=dtype)
    _, lse_r, lse_c = ops.clip_fwd(a, b, s)
    torch.library.opcheck(ops.clip_bwd, (torch.tensor(1.7, dtype=dtype), a, b, s, lse_r, lse_c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_opcheck_knn(dtype, k):
    a = torch.nn.functional.normalize(G(9, 4, torch.sin, 1, 0.5, dtype), dim=1)
    torch.library.opcheck(ops.knn, (a, k))


# The fakes must describe the real outputs for non-contiguous inputs too: structure_loss passes a
# transposed view straight through normalize/center (which keep its layout) into structure_fwd, and
# clip_loss(normalize=False) saves the caller's views for clip_bwd; inductor asserts the fake strides on
# the real outputs.
def test_opcheck_structure_fwd_non_contiguous():
    x, z = structured(9, 4, 3, seed=5)
    xh = structure_ops.reference.prepare(x).T.contiguous().T.requires_grad_()
    zh = structure_ops.reference.prepare(z).T.contiguous().T.requires_grad_()
    assert not xh.is_contiguous()
    torch.library.opcheck(ops.structure_fwd, _structure_args(xh, zh, True, True))


@pytest.mark.parametrize("centering", ["mean", "none"])
def test_functional_passes_non_contiguous_prepared_inputs_to_the_op(centering, monkeypatch):
    """Why the test above matters: a transposed z reaches structure_fwd still transposed."""
    seen = []
    real = ops.structure_fwd

    def spy(xh, zh, *args):
        seen.append((xh.is_contiguous(), zh.is_contiguous()))
        return real(xh, zh, *args)

    monkeypatch.setattr(torch.ops.structure_ops, "structure_fwd", spy)
    x = G(9, 4, torch.sin, 1, 1)
    z = G(3, 9, torch.cos, 0.5, 0.3).T
    structure_ops.structure_loss(x, z, centering=centering, backend="cpu")
    assert seen == [(True, False)]


def test_opcheck_clip_bwd_non_contiguous():
    a = G(4, 6, torch.sin, 1, 0).T
    b = G(6, 4, torch.cos, 1, 0)
    s = torch.tensor(7.0, dtype=F64)
    _, lse_r, lse_c = ops.clip_fwd(a, b, s)
    torch.library.opcheck(ops.clip_bwd, (torch.tensor(1.7, dtype=F64), a, b, s, lse_r, lse_c))


def test_opcheck_clip_fwd_non_contiguous():
    a = G(4, 6, torch.sin, 1, 0).T.requires_grad_()
    b = G(6, 8, torch.cos, 1, 0)[:, ::2].requires_grad_()
    torch.library.opcheck(ops.clip_fwd, (a, b, torch.tensor(7.0, dtype=F64, requires_grad=True)))


def test_ops_direct_call_grad_flags_guard():
    """Calling the raw op with grad_z=False on an input that requires grad must not silently give 0."""
    xh, zh = _prepared(torch.float64)
    zh.requires_grad_()
    loss, _, gz = ops.structure_fwd(*_structure_args(xh, zh, False, False))
    assert gz.numel() == 0
    with pytest.raises(RuntimeError, match="grad_x/grad_z"):
        loss.backward()


# ---------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True, backend="aot_eager")
# ---------------------------------------------------------------------------------------------------
def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(
    "options", [dict(temperature=0.1), dict(levels=2, weighting="inverse", similarity="rbf")], ids=["l1", "l2-rbf"]
)
def test_compile_structure_loss(backend, options, dynamo_reset):
    x, z = structured(33, 5, 4, seed=6)

    def fn(x, z):
        return structure_ops.structure_loss(x, z, backend=backend, **options)

    results = []
    for f in (fn, _compiled(fn)):
        xx, zz = x.clone().requires_grad_(), z.clone().requires_grad_()
        loss = f(xx, zz)
        results.append((loss.detach(), *torch.autograd.grad(1.7 * loss, (xx, zz))))
    ref = structure_ops.reference.structure_loss(x, z, **options)
    assert rel_err(results[0][0], ref) < 1e-12
    for eager, compiled in zip(*results, strict=True):
        assert rel_err(compiled, eager) < 1e-12


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_compile_clip_loss(backend, normalize, dynamo_reset):
    a, b = G(12, 5, torch.sin, 0.3, 0), G(12, 5, torch.cos, 0.4, 0.1)
    s = torch.tensor(9.0, dtype=F64)

    def fn(a, b, s):
        return structure_ops.clip_loss(a, b, s, normalize=normalize, backend=backend)

    results = []
    for f in (fn, _compiled(fn)):
        aa, bb, ss = a.clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_()
        loss = f(aa, bb, ss)
        results.append((loss.detach(), *torch.autograd.grad(1.7 * loss, (aa, bb, ss))))
    ref = structure_ops.reference.clip_loss(a, b, s, normalize=normalize)
    assert rel_err(results[0][0], ref) < 1e-12
    for eager, compiled in zip(*results, strict=True):
        assert rel_err(compiled, eager) < 1e-12


def test_compile_training_step_with_modules(dynamo_reset):
    """The combined objective with a learnable temperature compiles as one graph."""
    crit = structure_ops.StructureClipLoss(lam=2.0, warmup=0, learnable_temperature=True, backend="cpu")
    crit = crit.double()
    x_img, x_txt = structured(16, 6, 5, seed=7)
    a, b = (x_img @ G(6, 4, torch.sin, 1, 0)).requires_grad_(), (x_txt @ G(5, 4, torch.cos, 1, 0)).requires_grad_()

    def step(a, b):
        return crit(a, b, x_img, x_txt, step=10).loss

    eager = step(a, b)
    g_eager = torch.autograd.grad(eager, (a, b, crit.clip.log_logit_scale))
    compiled = _compiled(step)(a, b)
    g_comp = torch.autograd.grad(compiled, (a, b, crit.clip.log_logit_scale))
    assert rel_err(compiled, eager) < 1e-12
    for u, v in zip(g_comp, g_eager, strict=True):
        assert rel_err(u, v) < 1e-12
