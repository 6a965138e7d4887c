"""Hostile numerics against the float64 oracle, on every backend that runs here.

Each class of input that once gave a finite wrong value, a NaN from finite inputs or an unclear error:
rows whose norm overflows the input dtype, half inputs on the reference backend, huge rbf γ, options
that overflow the compute dtype, mixed input dtypes, torch.func transforms and meta tensors. The
expected values always come from structure_ops.reference in float64 on the same (rounded) values.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from helpers import G, loss_and_grads, rel_err, require_cpu_extension

import structure_ops as so
from structure_ops import reference as R

BACKENDS = ["reference", "cpu", "triton"]
HALF = (torch.float16, torch.bfloat16)
# Relative tolerance of a loss value (and of a gradient) against the float64 oracle, per input dtype.
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 8e-3}


def _need(backend: str) -> str:
    if backend == "cpu":
        require_cpu_extension()
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the Triton backend is optional)")
    return backend


def _grad_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    """‖out − ref‖ ≤ rtol·‖ref‖ + 2 subnormal ulps per element: fp16 gradients of rows with norm ~1e5
    are ~1e-7, subnormal, so they carry an absolute error of a few 2^-24 on top of the relative one."""
    subnormal = torch.finfo(out.dtype).tiny * torch.finfo(out.dtype).eps
    err = (out.double() - ref).norm().item()
    return err <= rtol * ref.norm().item() + 2 * subnormal * out.numel() ** 0.5


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


# ---------------------------------------------------------------------------------------------------
# 1. Row normalization without overflow
# ---------------------------------------------------------------------------------------------------
# (dtype, scale): fp16 rows with norm far above 65 504; fp32/bf16 entries ~1e19 (squares overflow).
HUGE = [(torch.float16, 3e4), (torch.float32, 1e19), (torch.bfloat16, 1e19), (torch.float32, 3e37)]


def _huge(dtype, scale, n=8):
    x = (G(n, 64, torch.sin, 1, 1) * scale).to(dtype)
    z = (G(n, 48, torch.cos, 0.5, 0.3) * scale).to(dtype)
    return x, z


def test_normalize_rows_matches_float64_and_is_exact_where_fnormalize_is_fine():
    for dtype, scale in HUGE:
        x, _ = _huge(dtype, scale)
        assert torch.isinf(torch.linalg.vector_norm(x, dim=1)).all()  # the naive norm overflows here
        out = R.normalize_rows(x)
        assert out.dtype == dtype
        assert rel_err(out, torch.nn.functional.normalize(x.double(), dim=1)) < TOL[dtype]
    x = G(6, 5, torch.sin, 1, 1)
    torch.testing.assert_close(R.normalize_rows(x), torch.nn.functional.normalize(x, dim=1), rtol=1e-15, atol=0)
    zero = torch.zeros(2, 3, dtype=torch.float16)
    assert torch.equal(R.normalize_rows(zero), zero)  # ε keeps a zero row zero, in every dtype
    x = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: R.normalize_rows(u), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", HUGE, ids=[f"{d}-{s:g}".replace("torch.", "") for d, s in HUGE])
def test_structure_loss_rows_with_overflowing_norm(backend, dtype, scale):
    x, z = _huge(dtype, scale)
    ref = R.structure_loss(x.double(), z.double())
    zg = z.clone().requires_grad_(True)
    loss = so.structure_loss(x, zg, backend=_need(backend))
    (gz,) = torch.autograd.grad(loss, zg)
    z64 = z.double().requires_grad_(True)
    (gref,) = torch.autograd.grad(R.structure_loss(x.double(), z64), z64)
    assert loss.dtype == dtype and _finite(loss, gz)
    assert rel_err(loss, ref) < 4 * TOL[dtype], (loss.item(), ref.item())
    assert _grad_close(gz, gref, 8 * TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", HUGE, ids=[f"{d}-{s:g}".replace("torch.", "") for d, s in HUGE])
def test_clip_knn_mutual_knn_rows_with_overflowing_norm(backend, dtype, scale):
    a = (G(8, 64, torch.sin, 1, 0) * scale).to(dtype)
    t = (G(8, 64, torch.cos, 1, 0.1) * scale).to(dtype)
    ref = R.clip_loss(a.double(), t.double(), 20.0)
    loss = so.clip_loss(a, t, 20.0, backend=_need(backend))
    assert _finite(loss) and rel_err(loss, ref) < 4 * TOL[dtype], (loss.item(), ref.item())
    expect = R.knn(torch.nn.functional.normalize(a.double(), dim=1), 2)
    assert torch.equal(so.knn(a, 2, backend=backend), expect)
    assert so.mutual_knn(a, t, 2, backend=backend).item() == R.mutual_knn(a.double(), t.double(), 2).item()


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 3e37), (torch.float64, 1e150), (torch.float64, 1e-150)])
def test_cka_does_not_overflow(dtype, scale):
    a = (G(8, 64, torch.sin, 1, 0) * scale).to(dtype)
    b = (G(8, 64, torch.cos, 1, 0.1) * scale).to(dtype)
    for unbiased in (False, True):
        out = so.cka(a, b, unbiased=unbiased)
        # CKA is scale-invariant up to its +1e-6: the oracle on the down-scaled values, with the
        # 1e-6 floor rescaled by hand.
        ua, ub = a.double() / scale, b.double() / scale
        hs = R._hsic_unbiased if unbiased else R._hsic_biased
        k, l = ua @ ua.T, ub @ ub.T
        floor = 0.0 if scale > 1 else float("inf")  # 1e-6 / scale⁴: 0 in float64 at 1e150, ∞ at 1e-150
        expect = hs(k, l) / (torch.sqrt(hs(k, k) * hs(l, l)) + floor)
        assert torch.isfinite(out) and abs(out.item() - expect.item()) < 1e-6, (out.item(), expect.item())


# ---------------------------------------------------------------------------------------------------
# 2. The reference backend computes half inputs in fp32 (what "auto" runs on MPS/XPU or without builds)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "options",
    [{}, {"levels": 3, "weighting": "inverse"}, {"divergence": "js"}, {"similarity": "rbf", "gamma": 4.0},
     {"temperature": 0.01, "centering": "standard"}],
    ids=["defaults", "levels3", "js", "rbf", "sharp-standard"],
)  # fmt: skip
def test_reference_half_inputs_compute_in_fp32(dtype, options):
    x, z = G(16, 6, torch.sin, 1, 1, dtype=dtype), G(16, 5, torch.cos, 0.5, 0.3, dtype=dtype)
    zg = z.clone().requires_grad_(True)
    loss = so.structure_loss(x, zg, backend="reference", **options)
    (gz,) = torch.autograd.grad(loss, zg)
    z64 = z.double().requires_grad_(True)
    ref = R.structure_loss(x.double(), z64, **options)
    (gref,) = torch.autograd.grad(ref, z64)
    assert loss.dtype == dtype and gz.dtype == dtype and _finite(loss, gz)
    assert rel_err(loss, ref) < 2 * TOL[dtype], (loss.item(), ref.item())
    assert _grad_close(gz, gref, 4 * TOL[dtype])
    a, t = G(8, 4, torch.sin, 1, 0, dtype=dtype), G(8, 4, torch.cos, 1, 0, dtype=dtype)
    c = so.clip_loss(a, t, 20.0, backend="reference")
    assert c.dtype == dtype and rel_err(c, R.clip_loss(a.double(), t.double(), 20.0)) < 2 * TOL[dtype]


# ---------------------------------------------------------------------------------------------------
# 3. rbf: squared distances clamped at 0, exactly 0 on the diagonal
# ---------------------------------------------------------------------------------------------------
def test_rbf_sq_dist_is_nonnegative_with_exact_zero_diagonal():
    u = R.prepare(G(12, 7, torch.sin, 1, 1, dtype=torch.float32))
    d2 = R.rbf_sq_dist(u, u @ u.T)
    assert torch.equal(torch.diagonal(d2), torch.zeros(12)) and bool((d2 >= 0).all())
    rows = R.rbf_sq_dist(u, u[3:7] @ u.T, row0=3)  # a row panel (the distributed shard)
    assert torch.equal(rows, d2[3:7])
    torch.testing.assert_close(d2.double(), torch.cdist(u.double(), u.double()).square(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [1e6, 1e9])
def test_rbf_huge_gamma_separated_rows(backend, dtype, gamma):
    # Well-separated rows: every off-diagonal kernel value underflows and P = I on both sides, so R_S = 0
    # exactly (before the fix: ~1e-4 at γ = 1e6 in fp32 from exp(−γ·rounding) on the diagonal, NaN at 1e9).
    x, z = G(8, 5, torch.sin, 1, 1, dtype=dtype), G(8, 4, torch.cos, 0.5, 0.3, dtype=dtype)
    zg = z.clone().requires_grad_(True)
    loss = so.structure_loss(x, zg, similarity="rbf", gamma=gamma, backend=_need(backend))
    (gz,) = torch.autograd.grad(loss, zg)
    ref = R.structure_loss(x.double(), z.double(), similarity="rbf", gamma=gamma)
    assert ref.item() == 0.0
    assert _finite(loss, gz) and abs(loss.item()) < 1e-30 and gz.abs().max().item() < 1e-30


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", [1, 2])
def test_rbf_huge_gamma_near_duplicate_rows_matches_oracle(backend, levels):
    # Rows 1e-3 apart: γ = 1e6 puts γ‖û_i − û_j‖² at O(1), a non-trivial softmax (float64: the GEMM-form
    # distance is accurate to ~1e-16 here).
    base = G(4, 6, torch.sin, 1, 1)
    x = base.repeat(3, 1) + 1e-3 * G(12, 6, torch.cos, 0.7, 0.2)
    z = base[:, :5].repeat(3, 1) + 1e-3 * G(12, 5, torch.sin, 0.3, 0.9)
    loss, _, gz = loss_and_grads(lambda a, b: so.structure_loss(a, b, similarity="rbf", gamma=1e6, levels=levels,
                                                                backend=_need(backend)), x, z)
    ref, _, gref = loss_and_grads(lambda a, b: R.structure_loss(a, b, similarity="rbf", gamma=1e6, levels=levels), x, z)
    assert ref.item() > 1e-3  # the case is not degenerate
    assert rel_err(loss, ref) < 1e-6 and rel_err(gz, gref) < 1e-6


# ---------------------------------------------------------------------------------------------------
# 4. Options that overflow the compute dtype: a clear error (or a correct value); NaN/inf module options
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,options,match",
    [
        (torch.float32, {"temperature": 1e-39}, r"temperature=1e-39 .*float32.*max 3\.403e\+38"),
        (torch.float32, {"similarity": "rbf", "gamma": 1e39}, r"gamma=1e\+39 .*float32.*max 3\.403e\+38"),
        (torch.float32, {"eps": 1e-50}, r"eps=1e-50 .*float32.*1\.175e-38"),
        (torch.bfloat16, {"eps": 1e-40}, r"eps=1e-40 .*float32"),  # bf16 computes in fp32
        (torch.float64, {"temperature": 1e-308}, r"temperature=1e-308 .*float64"),
    ],
    ids=["tau-fp32", "gamma-fp32", "eps-fp32", "eps-bf16", "tau-fp64"],
)
def test_structure_options_that_overflow_raise_naming_option_value_and_limit(backend, dtype, options, match):
    x, z = G(8, 5, torch.sin, 1, 1, dtype=dtype), G(8, 4, torch.cos, 0.5, 0.3, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        so.structure_loss(x, z, backend=_need(backend), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_with_options_beyond_the_half_range_compute_correctly(backend, dtype):
    # 1/τ = 1e6 and ε = 1e5 exceed fp16's 65 504, but half inputs are computed in fp32: a correct value.
    x, z = G(8, 5, torch.sin, 1, 1, dtype=dtype), G(8, 4, torch.cos, 0.5, 0.3, dtype=dtype)
    for options in ({"temperature": 1e-6}, {"eps": 1e5}, {"eps": 1e-30}):
        loss = so.structure_loss(x, z, backend=_need(backend), **options)
        ref = R.structure_loss(x.double(), z.double(), **options)
        assert loss.dtype == dtype and torch.isfinite(loss)
        assert abs(loss.item() - ref.item()) <= 2 * TOL[dtype] * abs(ref.item()) + 1e-6, (options, loss, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_logit_scale_that_overflows_raises(backend):
    a, t = G(8, 4, torch.sin, 1, 0), G(8, 4, torch.cos, 1, 0)
    _need(backend)
    with pytest.raises(ValueError, match=r"logit_scale=100000 .*float16.*3\.275e\+04"):
        so.clip_loss(a.half(), t.half(), 1e5, backend=backend)
    with pytest.raises(ValueError, match=r"logit_scale=1e\+39 .*float32"):
        so.clip_loss(a.float(), t.float(), torch.tensor(1e39, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match=r"logit_scale=nan is not finite"):
        so.clip_loss(a, t, float("nan"), backend=backend)
    # the largest allowed value gives the oracle's value
    s = torch.finfo(torch.float16).max / 2
    out = so.clip_loss(a.half(), t.half(), s, backend=backend)
    ref = R.clip_loss(a.half().double(), t.half().double(), torch.tensor(s, dtype=torch.float16).double())
    assert torch.isfinite(out) and rel_err(out, ref) < 2 * TOL[torch.float16]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_modules_refuse_nonfinite_hyper_parameters_at_construction(bad):
    with pytest.raises(ValueError, match="temperature must be finite"):
        so.ClipLoss(temperature=bad)
    with pytest.raises(ValueError, match="lam must be finite"):
        so.StructureClipLoss(lam=bad)
    with pytest.raises(ValueError, match="temperature must be finite"):
        so.StructureClipLoss(temperature=bad)
    with pytest.raises(ValueError, match="temperature must be finite"):
        so.StructureClipLoss(structure_temperature=bad)
    with pytest.raises(ValueError, match="temperature must be finite"):
        so.StructureLoss(temperature=bad)
    with pytest.raises(ValueError, match="margin must be finite"):
        so.StructureLoss(margin=bad)


# ---------------------------------------------------------------------------------------------------
# 5. Mixed precision: compute in the wider dtype, each gradient in its input's dtype
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dx,dz", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
              (torch.float64, torch.float32)],
)  # fmt: skip
def test_structure_loss_mixed_dtypes(backend, dx, dz):
    x, z = structured_pair(dx, dz)
    xg, zg = x.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss = so.structure_loss(xg, zg, backend=_need(backend))
    gx, gz = torch.autograd.grad(loss, (xg, zg))
    x64, z64 = x.double().requires_grad_(True), z.double().requires_grad_(True)
    ref = R.structure_loss(x64, z64)
    rx, rz = torch.autograd.grad(ref, (x64, z64))
    wide = torch.promote_types(dx, dz)
    assert loss.dtype == wide and gx.dtype == dx and gz.dtype == dz
    tol = TOL[torch.float32 if wide in HALF else wide]
    assert rel_err(loss, ref) < 4 * tol
    assert rel_err(gx, rx) < 4 * max(tol, TOL[dx]) and rel_err(gz, rz) < 4 * max(tol, TOL[dz])


def structured_pair(dx, dz):
    x, z = G(12, 6, torch.sin, 1, 1), G(12, 5, torch.cos, 0.5, 0.3)
    return x.to(dx), z.to(dz)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_mixed_dtypes(backend):
    a, t = G(8, 4, torch.sin, 1, 0, dtype=torch.float32), G(8, 4, torch.cos, 1, 0, dtype=torch.bfloat16)
    ag, tg = a.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = so.clip_loss(ag, tg, 20.0, backend=_need(backend))
    ga, gt = torch.autograd.grad(loss, (ag, tg))
    ref = R.clip_loss(a.double(), t.double(), 20.0)
    assert loss.dtype == torch.float32 and ga.dtype == torch.float32 and gt.dtype == torch.bfloat16
    assert rel_err(loss, ref) < 4 * TOL[torch.float32]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_structure_clip_loss_amp_pattern(backend):
    # Frozen fp32 features, bf16 head outputs (the standard AMP pattern).
    _need(backend)
    fi, ft = G(10, 6, torch.sin, 1, 1, dtype=torch.float32), G(10, 5, torch.cos, 0.5, 0.3, dtype=torch.float32)
    ei = G(10, 4, torch.sin, 0.3, 0.2, dtype=torch.bfloat16).requires_grad_(True)
    et = G(10, 4, torch.cos, 0.4, 0.1, dtype=torch.bfloat16).requires_grad_(True)
    out = so.StructureClipLoss(lam=2.0, warmup=0, backend=backend)(ei, et, fi, ft)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and ei.grad.dtype == torch.bfloat16 and et.grad.dtype == torch.bfloat16
    e64, t64 = ei.detach().double(), et.detach().double()
    ref = R.clip_loss(e64, t64, 20.0) + 2.0 * 0.5 * (
        R.structure_loss(fi.double(), e64) + R.structure_loss(ft.double(), t64)
    )
    assert rel_err(out.loss, ref) < 2e-2  # the clip term is computed in bf16 (both of its inputs are bf16)


# ---------------------------------------------------------------------------------------------------
# 6. torch.func on every backend; knn and mutual_knn on meta tensors
# ---------------------------------------------------------------------------------------------------
def _func_cases(backend):
    x, z = G(8, 5, torch.sin, 1, 1), G(8, 4, torch.cos, 0.5, 0.3)
    s = torch.tensor(3.0, dtype=torch.float64)
    return {
        "grad": (lambda: torch.func.grad(lambda zz: so.structure_loss(x, zz, backend=backend))(z),
                 lambda: torch.func.grad(lambda zz: R.structure_loss(x, zz))(z)),
        "jacrev": (lambda: torch.func.jacrev(lambda zz: so.structure_loss(x, zz, levels=2, backend=backend))(z),
                   lambda: torch.func.jacrev(lambda zz: R.structure_loss(x, zz, levels=2))(z)),
        "vjp-clip": (lambda: torch.func.vjp(lambda a: so.clip_loss(a, z, s, backend=backend), x[:, :4])[1](s)[0],
                     lambda: torch.func.vjp(lambda a: R.clip_loss(a, z, s), x[:, :4])[1](s)[0]),
        "grad-logit-scale": (lambda: torch.func.grad(lambda t: so.clip_loss(x[:, :4], z, t, backend=backend))(s),
                             lambda: torch.func.grad(lambda t: R.clip_loss(x[:, :4], z, t))(s)),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["grad", "jacrev", "vjp-clip", "grad-logit-scale"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_func_transforms_work(backend, case):
    got, expect = _func_cases(backend)[case]
    torch.testing.assert_close(got(), expect(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["grad", "jacrev", "vjp-clip", "grad-logit-scale"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_func_on_compiled_backends_names_op_and_reference(backend, case):
    got, _ = _func_cases(_need(backend))[case]
    op = "clip_loss" if "clip" in case or "logit" in case else "structure_loss"
    with pytest.raises(RuntimeError, match=rf"{op}: the '{backend}' backend does not support torch.func .*backend='reference'"):
        got()


def test_knn_and_mutual_knn_on_meta_tensors():
    a = torch.empty(9, 5, device="meta")
    out = so.knn(a, 3)
    assert out.device.type == "meta" and out.shape == (9, 3) and out.dtype == torch.int64
    score = so.mutual_knn(a, torch.empty(9, 4, device="meta"), 2)
    assert score.device.type == "meta" and score.shape == ()
    # the arithmetic column ids give the same lists as before: the diagonal excluded, ties to the lower index
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    assert R.knn(b, 3).tolist() == [[1, 3, 4], [0, 3, 4], [4, 0, 1], [0, 1, 4], [2, 0, 1]]


# ---------------------------------------------------------------------------------------------------
# 8. The levels > 1 memory check counts memory in use and the process limits, not physical RAM only
# ---------------------------------------------------------------------------------------------------
_RLIMIT_CHILD = r"""
import resource, sys
import torch, structure_ops as so
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more than mapped now
torch.set_num_threads(1)
x, z = torch.randn(6000, 4), torch.randn(6000, 3)  # levels=2, fp32: ~1.6 GiB of N x N matrices
try:
    so.structure_loss(x, z, levels=2, backend="cpu")
except RuntimeError as exc:
    print("ERR", str(exc).splitlines()[0])
    sys.exit(0)
print("NO ERROR")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux features")
def test_levels_memory_check_respects_rlimit_as():
    require_cpu_extension()
    out = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip()
    assert line.startswith("ERR structure_loss (cpu) with levels=2 materializes about 1.61 GiB"), line
    assert "left under RLIMIT_AS" in line and "use levels=1" in line, line
