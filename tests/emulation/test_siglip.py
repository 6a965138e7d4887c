"""csrc/cuda/siglip_cuda.cu, emulated on the CPU (README.md), against the float64 oracle and the C++ CPU op.

Square batches (M = N, offset 0) against reference.siglip_loss; row shards (M < N, row_offset) that sum to the
full loss and gradient; M = 0; panels of 1–3 rows; fp32/fp64/bf16/fp16 (half: the tolerances of the float64
model of the half path); NaN/±inf inputs; every block/thread order (bitwise-equal outputs).
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from structure_ops import reference

from . import tolerances
from .cases import F64, GRAD, clip_data
from .conftest import SCHEDULES, schedule_id

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "f64", "bf16", "f16"]
HALF = (torch.bfloat16, torch.float16)
KEYS = ("loss", "grad_a", "grad_b", "grad_s", "grad_bias")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def oracle(a, b, s, beta):
    """Loss and the gradients of GRAD·loss w.r.t. (a, b, s, β) in float64 (M = N, offset 0)."""
    a = a.detach().to(F64).clone().requires_grad_()
    b = b.detach().to(F64).clone().requires_grad_()
    st = s.detach().to(F64).reshape(()).clone().requires_grad_()
    bt = beta.detach().to(F64).reshape(()).clone().requires_grad_()
    with torch.enable_grad():
        loss = reference.siglip_loss(a, b, st, bt, normalize=False)
        grads = torch.autograd.grad(GRAD * loss, (a, b, st, bt))
    return (loss.detach(), *grads)


def run(op, a, b, s, beta, offset=0, ga=True, gb=True):
    """The op's (loss, dA, dB, ds, dβ), gradients scaled by GRAD (the op returns ∂loss; autograd scales it)."""
    loss, da, db, ds, dbeta = op(a, b, s, beta, offset, ga, gb)
    return loss, GRAD * da, GRAD * db, GRAD * ds, GRAD * dbeta


def half_tol(a, b, s, beta, dtype):
    """The model of the half path: N·w = ±σ ∈ [−1, 1] rounded to ``dtype`` for both gradient GEMMs, f = s/N applied
    in fp32, outputs cast (tolerances.clip_half's construction for the sigmoid loss)."""
    from . import hardware

    a64, b64 = a.detach().to(F64), b.detach().to(F64)
    s64, b0 = float(s.to(F64)), float(beta.to(F64))
    n = b64.shape[0]
    z = s64 * (a64 @ b64.T) + b0
    y = 2.0 * torch.eye(n, dtype=F64) - 1.0
    nw = -y * torch.sigmoid(-y * z)
    f = s64 / n
    da, db = f * (nw @ b64), f * (nw.T @ a64)
    fmt = "bf16" if dtype == torch.bfloat16 else "fp16"
    nwr = hardware.round_operand(nw, fmt)
    da_m, db_m = hardware.half_cast(f * (nwr @ b64), dtype), hardware.half_cast(f * (nwr.T @ a64), dtype)
    loss = torch.nn.functional.softplus(-y * z).sum() / n
    u = tolerances.unit_roundoff(dtype)
    floor = tolerances.FP32_FLOOR["small"]
    return {
        "loss": hardware.tolerance(hardware.half_cast_error(loss.reshape(1), dtype), tolerances.SAFETY, max(floor, u)),
        "grad_a": hardware.tolerance(hardware.rel_err(da_m, da), tolerances.SAFETY, max(floor, u)),
        "grad_b": hardware.tolerance(hardware.rel_err(db_m, db), tolerances.SAFETY, max(floor, u)),
        "grad_s": max(floor, u),  # fp64 sums of fp32 terms, cast to logit_scale's dtype (here the input dtype)
        "grad_bias": max(floor, u),
    }


SHAPES = [(5, 3), (13, 17), (37, 5), (300, 3)]
PARAMS = [
    pytest.param(n, d, dt, SCHEDULES[(i + j) % 4], id=f"{n}x{d}-{DT_IDS[j]}-{schedule_id(SCHEDULES[(i + j) % 4])}")
    for i, (n, d) in enumerate(SHAPES) for j, dt in enumerate(DTYPES)
]  # fmt: skip


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize(("n", "d", "dtype", "sched"), PARAMS)
def test_matches_oracle_and_cpu_op(emu_siglip, n, d, dtype, sched, monkeypatch):
    if n <= 13:
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0001")  # 1–3 rows per panel, ragged last panel
    a64, b64 = clip_data(n, d, seed=2)
    a, b = a64.to(dtype), b64.to(dtype)
    s, beta = torch.tensor(10.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
    emu_siglip.reset_stats()
    with emu_siglip.schedule(**sched, grid=2):
        out = run(emu_siglip.ops.siglip_fwd, a, b, s, beta)
    assert emu_siglip.stats()["launches"] > 0
    ref = oracle(a, b, s, beta)
    t = half_tol(a, b, s, beta, dtype) if dtype in HALF else dict.fromkeys(KEYS, TOL[dtype])
    errs = {k: rel_err(u, r) for k, u, r in zip(KEYS, out, ref, strict=True)}
    assert all(errs[k] <= t[k] for k in KEYS), (errs, t)
    cpu = run(torch.ops.structure_ops.siglip_fwd, a, b, s, beta)
    for k, u, v in zip(KEYS, out, cpu, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape, k
        assert rel_err(u, v) <= (2 * t[k] if dtype in HALF else max(TOL[dtype], 1e-6)), k


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_row_shards_sum_to_full(emu_siglip, dtype, monkeypatch):
    """Image row shards [o, o + M) of a batch of N text rows (M = 0 included) sum to the full loss and gradients;
    each shard equals the C++ CPU op; flags off give (0,) tensors."""
    monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0003")
    a64, b64 = clip_data(37, 5, seed=3)
    a, b = a64.to(dtype), b64.to(dtype)
    s, beta = torch.tensor(7.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)
    ref = oracle(a, b, s, beta)
    loss, ds, dbeta = 0.0, 0.0, 0.0
    da, db = torch.zeros_like(a, dtype=F64), torch.zeros_like(b, dtype=F64)
    for o0, o1 in ((0, 10), (10, 10), (10, 11), (11, 37)):
        with emu_siglip.schedule("reversed", block=64):
            part = run(emu_siglip.ops.siglip_fwd, a[o0:o1], b, s, beta, o0)
        cpu = run(torch.ops.structure_ops.siglip_fwd, a[o0:o1], b, s, beta, o0)
        for u, v in zip(part, cpu, strict=True):
            assert u.dtype == v.dtype and u.shape == v.shape
            if v.numel():
                assert (u.to(F64) - v.to(F64)).abs().max().item() <= 1e-5 * max(1.0, v.abs().max().item())
        loss, ds, dbeta = loss + part[0].to(F64), ds + part[3].to(F64), dbeta + part[4].to(F64)
        da[o0:o1] += part[1].to(F64)
        db += part[2].to(F64)
    tol = TOL[dtype] * 10
    for u, r in zip((loss, da, db, ds, dbeta), ref, strict=True):
        assert rel_err(u, r) <= tol
    loss_only = emu_siglip.ops.siglip_fwd(a, b, s, beta, 0, False, False)
    assert loss_only[1].shape == (0,) and loss_only[2].shape == (0,) and rel_err(loss_only[0], ref[0]) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_order_independent(emu_siglip, dtype, monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.001")
    a64, b64 = clip_data(37, 17, seed=4)
    a, b = a64.to(dtype), b64.to(dtype)
    s, beta = torch.tensor(10.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
    for block, grid in ((None, None), (96, 1), (96, 5)):
        results = []
        for order, seed in (("inorder", 0), ("reversed", 0), ("shuffled", 1)):
            with emu_siglip.schedule(order, seed=seed, block=block, grid=grid):
                results.append(emu_siglip.ops.siglip_fwd(a, b, s, beta, 0, True, True))
        for other in results[1:]:
            for u, v in zip(results[0], other, strict=True):
                assert torch.equal(u, v), (block, grid)


@pytest.mark.usefixtures("cpu_ext")
def test_non_finite_like_cpu(emu_siglip):
    a64, b64 = clip_data(13, 4, seed=6)
    for case in ("nan", "inf", "-inf"):
        a, b = a64.to(torch.float32).clone(), b64.to(torch.float32).clone()
        if case == "nan":
            a[3, 1] = float("nan")
        else:
            b[5] = float(case)
        s, beta = torch.tensor(3.0), torch.tensor(-1.0)
        with emu_siglip.schedule("shuffled", seed=7):
            ours = emu_siglip.ops.siglip_fwd(a, b, s, beta, 0, True, True)
        cpp = torch.ops.structure_ops.siglip_fwd(a, b, s, beta, 0, True, True)
        for x, y in zip(ours, cpp, strict=True):
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf(), y.isinf()), (case, x, y)
            fin = x.isfinite()
            assert torch.allclose(x[fin], y[fin], rtol=1e-5, atol=1e-5)


def test_checks(emu_siglip):
    a = torch.randn(5, 3)
    s = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="same embedding width"):
        emu_siglip.ops.siglip_fwd(a, torch.randn(5, 4), s, s, 0, True, True)
    with pytest.raises(RuntimeError, match="row_offset"):
        emu_siglip.ops.siglip_fwd(a, a, s, s, 1, True, True)
