"""nn.Module wrappers: StructureLoss, ClipLoss, StructureClipLoss (docs/spec.md §2 objective and λ schedule)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import F64, G, rel_err, structured

import structure_ops
from structure_ops import StructureClipLoss, reference

pytestmark = pytest.mark.usefixtures("cpu_ext")


# ---------------------------------------------------------------------------------------------------
# StructureLoss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_structure_loss_module_matches_functional(backend):
    options = dict(levels=2, weighting="inverse", temperature=0.1, backend=backend)
    module = structure_ops.StructureLoss(**options)
    x, z = structured(20, 6, 4, seed=1)
    expected = reference.structure_loss(x, z, levels=2, weighting="inverse", temperature=0.1)
    assert module(x, z).item() == pytest.approx(expected.item(), rel=1e-12)
    assert "levels=2" in repr(module) and "weighting='inverse'" in repr(module)
    assert list(module.parameters()) == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (dict(weighting="bogus"), ValueError),
        (dict(levels=0), ValueError),
        (dict(temperature=-1.0), ValueError),
        (dict(tau=0.1), TypeError),  # misspelled option name
    ],
)
def test_structure_loss_module_validates_at_construction(options, error):
    with pytest.raises(error):
        structure_ops.StructureLoss(**options)


def test_structure_loss_module_rejects_unknown_backend_at_construction():
    with pytest.raises((ValueError, RuntimeError), match="gpu"):
        structure_ops.StructureLoss(backend="gpu")


# ---------------------------------------------------------------------------------------------------
# ClipLoss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_clip_loss_module_fixed_temperature(backend):
    a, b = G(4, 3, torch.sin, 1, 0), G(4, 3, torch.cos, 1, 0)
    module = structure_ops.ClipLoss(0.05, backend=backend).double()
    assert list(module.parameters()) == []
    s = module.logit_scale
    assert s.item() == pytest.approx(20.0, rel=1e-6)
    assert module(a, b).item() == pytest.approx(reference.clip_loss(a, b, s).item(), rel=1e-12)
    # an explicit multiplier overrides the module's temperature
    assert module(a, b, torch.tensor(1.0, dtype=F64)).item() == pytest.approx(1.356212372, rel=0, abs=5e-10)


def test_clip_loss_module_float64_hits_spec_anchor():
    a, b = G(4, 3, torch.sin, 1, 0), G(4, 3, torch.cos, 1, 0)
    module = structure_ops.ClipLoss(0.05).double()
    assert module(a, b).item() == pytest.approx(4.601090522, rel=0, abs=5e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_clip_loss_learnable_temperature_gets_gradient(backend):
    module = structure_ops.ClipLoss(0.07, learnable=True, backend=backend).double()
    (param,) = list(module.parameters())
    assert param.item() == pytest.approx(math.log(1 / 0.07), rel=1e-7)
    a, b = structured(16, 8, 8, seed=2)
    a, b = a.requires_grad_(), b.requires_grad_()
    loss = module(a, b)
    loss.backward()
    assert param.grad is not None and param.grad.item() != 0.0
    # expected: d/dθ L(s = e^θ) = e^θ · ∂L/∂s from the oracle
    s = module.logit_scale.detach().clone().requires_grad_()
    assert s.item() == pytest.approx(1 / 0.07, rel=1e-6)
    (ds,) = torch.autograd.grad(reference.clip_loss(a.detach(), b.detach(), s), s)
    assert param.grad.item() == pytest.approx(s.item() * ds.item(), rel=1e-9)
    assert a.grad is not None and b.grad is not None


def test_clip_loss_module_rejects_bad_temperature():
    for t in (0.0, -0.1):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            structure_ops.ClipLoss(t)
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be finite"):
            structure_ops.ClipLoss(t)


# ---------------------------------------------------------------------------------------------------
# StructureClipLoss
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    x_img, x_txt = structured(24, 10, 8, seed=4)
    w_img = torch.randn(10, 6, generator=g, dtype=F64)
    w_txt = torch.randn(8, 6, generator=g, dtype=F64)
    return x_img, x_txt, x_img @ w_img, x_txt @ w_txt, w_img, w_txt


def _expected_total(a, b, x_img, x_txt, lam_t, crit, tau=0.05, **options):
    clip = reference.clip_loss(a, b, crit.clip.logit_scale.detach())
    if lam_t == 0:
        return clip
    r_img = reference.structure_loss(x_img, a, temperature=tau, **options)
    r_txt = reference.structure_loss(x_txt, b, temperature=tau, **options)
    return clip + lam_t * 0.5 * (r_img + r_txt)


@pytest.mark.parametrize(("step", "lam_t"), [(1, 0.0), (2, 10 * 1 / 4), (3, 10 * 2 / 4), (5, 10.0), (1000, 10.0)])
def test_lambda_schedule(step, lam_t):
    crit = StructureClipLoss(lam=10.0, warmup=4)
    assert crit.lambda_at(step) == pytest.approx(lam_t, abs=1e-15)


def test_lambda_schedule_without_warmup():
    crit = StructureClipLoss(lam=3.0, warmup=0)
    assert [crit.lambda_at(t) for t in (1, 2, 50)] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("step", [2, 3, 9])
def test_total_matches_functional_combination(batch, backend, step):
    x_img, x_txt, a0, b0, _, _ = batch
    crit = StructureClipLoss(lam=10.0, warmup=4, backend=backend, levels=2, weighting="inverse").double()
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    out = crit(a, b, x_img, x_txt, step=step)
    lam_t = 10.0 * min(1.0, (step - 1) / 4)
    assert out.lambda_t == pytest.approx(lam_t)
    a_ref, b_ref = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    expected = _expected_total(a_ref, b_ref, x_img, x_txt, lam_t, crit, levels=2, weighting="inverse")
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert out.clip.item() == pytest.approx(reference.clip_loss(a0, b0, crit.clip.logit_scale).item(), rel=1e-12)
    r_img = reference.structure_loss(x_img, a0, temperature=0.05, levels=2, weighting="inverse")
    r_txt = reference.structure_loss(x_txt, b0, temperature=0.05, levels=2, weighting="inverse")
    assert out.structure_image.item() == pytest.approx(r_img.item(), rel=1e-12)
    assert out.structure_text.item() == pytest.approx(r_txt.item(), rel=1e-12)
    assert out.structure.item() == pytest.approx(0.5 * (r_img + r_txt).item(), rel=1e-12)
    # gradients of the whole objective
    ga, gb = torch.autograd.grad(1.7 * out.loss, (a, b))
    ea, eb = torch.autograd.grad(1.7 * expected, (a_ref, b_ref))
    assert rel_err(ga, ea) < 1e-10 and rel_err(gb, eb) < 1e-10


def test_regularizer_skipped_when_lambda_is_zero(batch, monkeypatch):
    x_img, x_txt, a, b, _, _ = batch
    calls = []
    real = structure_ops.functional.structure_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(structure_ops.functional, "structure_loss", spy)
    crit = StructureClipLoss(lam=10.0, warmup=4).double()
    calls.clear()
    out = crit(a, b, x_img, x_txt, step=1)
    assert calls == []  # λ_1 = 0: R_S is not computed at all
    assert out.lambda_t == 0.0 and out.structure.item() == 0.0
    assert out.loss.item() == pytest.approx(reference.clip_loss(a, b, crit.clip.logit_scale).item(), rel=1e-12)
    crit(a, b, x_img, x_txt, step=2)
    assert len(calls) == 2  # one R_S per modality
    # λ = 0 disables the regularizer at every step
    off = StructureClipLoss(lam=0.0, warmup=0).double()
    calls.clear()  # (construction validates the options with one probe call)
    off(a, b, x_img, x_txt, step=10)
    assert calls == []


def test_internal_step_counter(batch):
    x_img, x_txt, a, b, _, _ = batch
    crit = StructureClipLoss(lam=8.0, warmup=4).double()
    crit.train()
    lams = [crit(a, b, x_img, x_txt).lambda_t for _ in range(6)]
    assert lams == [0.0, 2.0, 4.0, 6.0, 8.0, 8.0]
    assert int(crit.step_count) == 6
    crit.eval()  # evaluation does not advance the schedule
    assert crit(a, b, x_img, x_txt).lambda_t == 8.0
    assert int(crit.step_count) == 6
    assert "step_count" in crit.state_dict()  # the schedule survives a checkpoint


def test_structure_temperature_and_learnable_clip_temperature(batch):
    x_img, x_txt, a0, b0, _, _ = batch
    crit = StructureClipLoss(
        lam=2.0, warmup=0, temperature=0.07, learnable_temperature=True, structure_temperature=0.2
    ).double()
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    out = crit(a, b, x_img, x_txt, step=5)
    expected = _expected_total(a0, b0, x_img, x_txt, 2.0, crit, tau=0.2)
    assert crit.clip.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-10)
    out.loss.backward()
    assert crit.clip.log_logit_scale.grad is not None and crit.clip.log_logit_scale.grad.item() != 0.0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_unimodal_extra_rows(batch, backend):
    x_img, x_txt, a0, b0, w_img, w_txt = batch
    g = torch.Generator().manual_seed(5)
    fx_img = torch.randn(9, x_img.shape[1], generator=g, dtype=F64)
    fx_txt = torch.randn(7, x_txt.shape[1], generator=g, dtype=F64)
    ex_img, ex_txt = fx_img @ w_img + 0.1, fx_txt @ w_txt - 0.2
    crit = StructureClipLoss(lam=4.0, warmup=0, backend=backend).double()
    out = crit(a0, b0, x_img, x_txt, step=1, image_extra=(fx_img, ex_img), text_extra=(fx_txt, ex_txt))
    r_img = reference.structure_loss(torch.cat([x_img, fx_img]), torch.cat([a0, ex_img]))
    r_txt = reference.structure_loss(torch.cat([x_txt, fx_txt]), torch.cat([b0, ex_txt]))
    clip = reference.clip_loss(a0, b0, crit.clip.logit_scale)  # the contrastive term sees only the paired rows
    assert out.clip.item() == pytest.approx(clip.item(), rel=1e-12)
    assert out.structure_image.item() == pytest.approx(r_img.item(), rel=1e-12)
    assert out.structure_text.item() == pytest.approx(r_txt.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx((clip + 4.0 * 0.5 * (r_img + r_txt)).item(), rel=1e-12)

    only = StructureClipLoss(lam=4.0, warmup=0, structure_use_only_unimodal=True, backend=backend).double()
    out = only(a0, b0, x_img, x_txt, step=1, image_extra=(fx_img, ex_img), text_extra=(fx_txt, ex_txt))
    assert out.structure_image.item() == pytest.approx(reference.structure_loss(fx_img, ex_img).item(), rel=1e-12)
    assert out.structure_text.item() == pytest.approx(reference.structure_loss(fx_txt, ex_txt).item(), rel=1e-12)
    assert out.clip.item() == pytest.approx(clip.item(), rel=1e-12)
    with pytest.raises(ValueError, match="structure_use_only_unimodal=True needs image_extra"):
        only(a0, b0, x_img, x_txt, step=1)
    with pytest.raises(TypeError, match="image_extra must be a \\(features, embeddings\\) pair"):
        crit(a0, b0, x_img, x_txt, step=1, image_extra=fx_img)


def test_structure_clip_loss_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="lam must be >= 0"):
        StructureClipLoss(lam=-1.0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        StructureClipLoss(warmup=-5)
    with pytest.raises(ValueError, match="weighting must be one of"):
        StructureClipLoss(weighting="bogus")
