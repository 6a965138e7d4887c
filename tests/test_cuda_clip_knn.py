"""CUDA clip_fwd / clip_bwd and knn (csrc/cuda/clip_cuda.cu, knn_cuda.cu) against the float64 oracle.

The class ``TestCuda`` (marked ``cuda``) runs the compiled kernels through the public API with
backend="cuda" and through the raw ops: awkward shapes with forced tiny row panels, realistic sizes,
opcheck, torch.compile(fullgraph=True), bitwise determinism, kNN ties. It skips unless a GPU is present
and structure_ops._C_cuda loads. The half-precision tolerances come from the float64 model of the half path
(tests/emulation/tolerances.py over hardware.py). The same sources run without a GPU, emulated on the CPU,
in tests/emulation/test_clip.py and test_knn.py. ``test_nvcc_compiles_sources`` (marked ``slow``) runs on any machine
with nvcc and the torch headers: both sources must compile for sm_90a without register spills.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from emulation import cases, tolerances
from helpers import F64, rel_err

import structure_ops
from structure_ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("csrc/cuda/clip_cuda.cu", "csrc/cuda/knn_cuda.cu")
GRAD = cases.GRAD  # grad_output ≠ 1 (exact in every dtype): the backward must scale by it
ops = torch.ops.structure_ops


# --------------------------------------------------------------------------------------------------
# Data and oracles (float64, on the inputs rounded to the kernel's dtype): tests/emulation/cases.py, shared with
# the emulated twins of these tests (tests/emulation/test_clip.py, test_knn.py)
# --------------------------------------------------------------------------------------------------
_clip_data = cases.clip_data
_clip_oracle = cases.clip_oracle
_tied = cases.tied


def _api_clip(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, normalize: bool = False):
    """clip_loss(backend="cuda") and the gradients of GRAD·loss w.r.t. (a, b, s)."""
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    loss = structure_ops.clip_loss(a, b, s, normalize=normalize, backend="cuda")
    ga, gb, gs = torch.autograd.grad(GRAD * loss, (a, b, s))
    return loss.detach(), ga, gb, gs


def _check_knn(a: torch.Tensor, k: int) -> torch.Tensor:
    """The op on a (CUDA) equals the float64 oracle and the C++ CPU op exactly; returns the result."""
    out = structure_ops.knn(a, k, normalize=False, backend="cuda")
    assert out.dtype == torch.int64 and out.shape == (a.shape[0], k) and out.device == a.device
    ref = reference.knn(a.detach().cpu().to(F64), k)
    assert torch.equal(out.cpu(), ref), (out.cpu() != ref).nonzero()[:5]
    if structure_ops._ops.extension_error("_C") is None:
        assert torch.equal(out.cpu(), ops.knn(a.detach().cpu(), k))
    return out


AWKWARD = [(5, 3), (5, 17), (13, 3), (13, 17), (37, 3), (37, 17)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DT_IDS = ["f32", "f64", "bf16"]


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
class TestCuda:
    pytestmark = pytest.mark.cuda

    @pytest.fixture(autouse=True)
    def _cuda_env(self, monkeypatch):
        # Skips are decided here, at run time (no CUDA query at import).
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        err = structure_ops._ops.extension_error("_C_cuda")
        if err is not None:
            pytest.skip(err)
        monkeypatch.delenv("STRUCTURE_OPS_CUDA_PANEL_MB", raising=False)
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # IEEE fp32 GEMMs: the fp32 tolerances assume them
        yield
        torch.set_float32_matmul_precision(precision)

    @pytest.fixture
    def tiny_cuda_panels(self, monkeypatch):
        """~0.5 KB panel budget (read on every call): 1–3 rows per panel and a ragged last panel."""
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0005")

    # ---------------------------------------------------------------------------------------- CLIP
    @pytest.mark.parametrize("panels", ["default", "tiny"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
    @pytest.mark.parametrize(("n", "d"), AWKWARD, ids=[f"{n}x{d}" for n, d in AWKWARD])
    def test_clip_api_matches_oracle(self, n, d, dtype, panels, monkeypatch):
        if panels == "tiny":
            monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0005")
        a64, b64 = _clip_data(n, d)
        a, b = a64.to("cuda", dtype), b64.to("cuda", dtype)
        s = torch.tensor(7.3, device="cuda", dtype=dtype)
        loss, ga, gb, gs = _api_clip(a, b, s)
        ref_l, _, _, ref_ga, ref_gb, ref_gs = _clip_oracle(a.cpu(), b.cpu(), s.cpu())
        assert loss.dtype == dtype and loss.shape == () and ga.dtype == dtype and gb.dtype == dtype
        assert gs.dtype == dtype and gs.shape == ()
        if dtype == torch.bfloat16:  # tolerances from the float64 model of the half path (tolerances.clip_half)
            t = tolerances.clip_half(a, b, s, GRAD, dtype)
        else:
            t = dict.fromkeys(("loss", "grad_a", "grad_b", "grad_s"), {torch.float64: 1e-12, torch.float32: 1e-5}[dtype])
        assert rel_err(loss, ref_l) <= t["loss"]
        assert rel_err(ga, ref_ga) <= t["grad_a"] and rel_err(gb, ref_gb) <= t["grad_b"]
        assert rel_err(gs, ref_gs) <= t["grad_s"]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                             ids=["f32", "f64", "bf16", "f16"])
    def test_clip_ops_conventions_and_cpu_parity(self, dtype, tiny_cuda_panels):
        """Raw ops: output dtypes/shapes/devices of the C++ CPU op, values equal to it and to the oracle."""
        n, d = 37, 17
        a64, b64 = _clip_data(n, d, seed=1)
        a, b = a64.to("cuda", dtype), b64.to("cuda", dtype)
        s = torch.tensor(20.0, device="cuda")  # fp32 scale with any input dtype
        loss, r, c = ops.clip_fwd(a, b, s)
        grad = torch.tensor(GRAD, device="cuda", dtype=dtype)
        da, db, ds = ops.clip_bwd(grad, a, b, s, r, c)
        stat = F64 if dtype == F64 else torch.float32
        assert loss.shape == () and loss.dtype == dtype and loss.device == a.device
        assert r.shape == (n,) and c.shape == (n,) and r.dtype == stat and c.dtype == stat
        assert da.shape == (n, d) and db.shape == (n, d) and da.dtype == dtype and db.dtype == dtype
        assert da.is_contiguous() and db.is_contiguous()
        assert ds.shape == s.shape and ds.dtype == s.dtype and ds.device == s.device
        ref_l, ref_r, ref_c, ref_ga, ref_gb, ref_gs = _clip_oracle(a.cpu(), b.cpu(), s.cpu())
        half = dtype in (torch.bfloat16, torch.float16)
        tol = 1e-12 if dtype == F64 else 1e-5
        assert rel_err(r, ref_r) <= tol and rel_err(c, ref_c) <= tol  # fp32 statistics of exact products
        # half inputs: tolerances from the float64 model of the half path (E rounded for the GEMMs, output casts)
        t = tolerances.clip_half(a, b, s, GRAD, dtype) if half else {}
        assert rel_err(loss, ref_l) <= t.get("loss", tol)
        assert rel_err(da, ref_ga) <= t.get("grad_a", tol) and rel_err(db, ref_gb) <= t.get("grad_b", tol)
        assert rel_err(ds, ref_gs) <= t.get("grad_s", max(tol, 1e-6))  # ds in fp32 (logit_scale's dtype)
        if structure_ops._ops.extension_error("_C") is None:
            cl, cr, cc = ops.clip_fwd(a.cpu(), b.cpu(), s.cpu())
            cpu_b = ops.clip_bwd(grad.cpu(), a.cpu(), b.cpu(), s.cpu(), cr, cc)
            # two implementations of the same half path: each within the model of the oracle, so 2 × apart
            for ours, cpp, key in zip((loss, r, c), (cl, cr, cc), ("loss", None, None), strict=True):
                assert ours.dtype == cpp.dtype and ours.shape == cpp.shape
                assert rel_err(ours.cpu(), cpp) <= (2 * t[key] if half and key else max(tol, 1e-6))
            for ours, cpp, key in zip((da, db, ds), cpu_b, ("grad_a", "grad_b", "grad_s"), strict=True):
                assert ours.dtype == cpp.dtype and ours.shape == cpp.shape
                assert rel_err(ours.cpu(), cpp) <= (2 * t[key] if half else max(tol, 1e-6))

    @pytest.mark.parametrize("scale_shape", [(), (1,)])
    def test_clip_logit_scale_shape_dtype_device_and_large_scale(self, scale_shape):
        """logit_scale fp64 with fp32 inputs, (), (1,) or on the CPU; s = 100 stresses the lse shifts."""
        n, d = 13, 17
        a64, b64 = _clip_data(n, d, seed=3)
        a, b = a64.to("cuda", torch.float32), b64.to("cuda", torch.float32)
        for dev in ("cuda", "cpu"):
            s = torch.full(scale_shape, 100.0, dtype=F64, device=dev)
            loss, r, c = ops.clip_fwd(a, b, s)
            da, db, ds = ops.clip_bwd(torch.tensor(GRAD, device="cuda"), a, b, s, r, c)
            ref_l, _, _, ref_ga, ref_gb, ref_gs = _clip_oracle(a.cpu(), b.cpu(), s.cpu())
            assert ds.shape == scale_shape and ds.dtype == F64 and ds.device == s.device
            assert torch.isfinite(loss) and rel_err(loss, ref_l) <= 1e-5
            assert rel_err(da, ref_ga) <= 1e-5 and rel_err(db, ref_gb) <= 1e-5
            assert rel_err(ds.reshape(()), ref_gs) <= 1e-5

    def test_clip_normalize_and_non_contiguous_inputs(self):
        a64, b64 = _clip_data(37, 17, seed=4)
        a = (3.0 * a64).to("cuda", torch.float32).T.contiguous().T  # column-major view, not unit rows
        b = (0.5 * b64).to("cuda", torch.float32)
        assert not a.is_contiguous()
        s = torch.tensor(9.0, device="cuda")
        loss, ga, gb, gs = _api_clip(a, b, s, normalize=True)
        ref_l, _, _, ref_ga, ref_gb, ref_gs = _clip_oracle(a.cpu(), b.cpu(), s.cpu(), normalize=True)
        assert rel_err(loss, ref_l) <= 1e-5 and rel_err(gs, ref_gs) <= 1e-5
        assert rel_err(ga, ref_ga) <= 1e-5 and rel_err(gb, ref_gb) <= 1e-5

    def test_clip_deterministic_and_scales_with_grad(self, tiny_cuda_panels):
        a64, b64 = _clip_data(37, 17, seed=5)
        a, b = a64.to("cuda", torch.float32), b64.to("cuda", torch.float32)
        s = torch.tensor(5.0, device="cuda")
        fwd1, fwd2 = ops.clip_fwd(a, b, s), ops.clip_fwd(a, b, s)
        assert all(torch.equal(x, y) for x, y in zip(fwd1, fwd2, strict=True))
        _, r, c = fwd1
        one = ops.clip_bwd(torch.tensor(1.0, device="cuda"), a, b, s, r, c)
        again = ops.clip_bwd(torch.tensor(1.0, device="cuda"), a, b, s, r, c)
        four = ops.clip_bwd(torch.tensor(4.0, device="cuda"), a, b, s, r, c)
        for x, y, z in zip(one, again, four, strict=True):
            assert torch.equal(x, y)
            assert torch.allclose(4 * x, z, rtol=1e-6, atol=0)

    def test_clip_non_finite_like_cpu(self):
        """NaN and ±inf inputs give the C++ CPU op's NaN/inf pattern in the statistics."""
        if structure_ops._ops.extension_error("_C") is not None:
            pytest.skip("needs the C++ CPU extension")
        a64, b64 = _clip_data(13, 4, seed=6)
        for case in ("nan", "inf", "-inf"):
            a = a64.to(torch.float32).clone()
            if case == "nan":
                a[3, 1] = float("nan")
            else:
                a[5] = float(case)
            b = b64.to(torch.float32)
            s = torch.tensor(3.0)
            ours = ops.clip_fwd(a.cuda(), b.cuda(), s.cuda())
            cpp = ops.clip_fwd(a, b, s)
            for x, y in zip(ours, cpp, strict=True):
                x = x.cpu()
                assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf(), y.isinf()), (case, x, y)
                fin = x.isfinite()
                assert torch.allclose(x[fin], y[fin], rtol=1e-5, atol=1e-5)

    def test_clip_input_checks(self):
        a = torch.randn(5, 3, device="cuda")
        s = torch.tensor(1.0, device="cuda")
        with pytest.raises(RuntimeError, match="same number of rows"):
            ops.clip_fwd(a, torch.randn(4, 3, device="cuda"), s)
        with pytest.raises(RuntimeError, match="same embedding width"):
            ops.clip_fwd(a, torch.randn(5, 4, device="cuda"), s)
        with pytest.raises(RuntimeError, match="exactly one value"):
            ops.clip_fwd(a, a, torch.ones(2, device="cuda"))
        with pytest.raises(RuntimeError, match="floating-point"):
            ops.clip_fwd(a.long(), a.long(), s)
        with pytest.raises(RuntimeError, match="same dtype"):
            ops.clip_fwd(a, a.double(), s)
        _, r, c = ops.clip_fwd(a, a, s)
        with pytest.raises(RuntimeError, match="lse_row must hold N = 5"):
            ops.clip_bwd(torch.tensor(1.0, device="cuda"), a, a, s, r[:4], c)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_clip_realistic(self, dtype):
        n, d = 8192, 512
        g = torch.Generator(device="cuda").manual_seed(0)
        a64 = F.normalize(torch.randn(n, d, generator=g, device="cuda", dtype=F64), dim=1)
        b64 = F.normalize(a64 + 0.7 * torch.randn(n, d, generator=g, device="cuda", dtype=F64), dim=1)
        a, b = a64.to(dtype), b64.to(dtype)
        s = torch.tensor(20.0, device="cuda", dtype=dtype)
        loss, ga, gb, gs = _api_clip(a, b, s)
        ref_l, _, _, ref_ga, ref_gb, ref_gs = _clip_oracle(a, b, s)
        if dtype == torch.float32:
            t = dict.fromkeys(("loss", "grad_a", "grad_b", "grad_s"), 1e-5)
        else:  # the float64 model of the half path at this size
            t = tolerances.clip_half(a, b, s, GRAD, dtype, floor=tolerances.FP32_FLOOR["realistic"])
        assert rel_err(loss, ref_l) <= t["loss"]
        assert rel_err(ga, ref_ga) <= t["grad_a"] and rel_err(gb, ref_gb) <= t["grad_b"]
        assert rel_err(gs, ref_gs) <= t["grad_s"]
        again = _api_clip(a, b, s)
        assert all(torch.equal(x, y) for x, y in zip((loss, ga, gb, gs), again, strict=True))  # bitwise

    def test_clip_realistic_many_panels(self, monkeypatch):
        """A 16 MiB budget splits N = 8192 into panels of a few hundred rows (ragged last): the values of one panel."""
        n, d = 8192, 512
        g = torch.Generator(device="cuda").manual_seed(1)
        a = F.normalize(torch.randn(n, d, generator=g, device="cuda"), dim=1)
        b = F.normalize(a + 0.7 * torch.randn(n, d, generator=g, device="cuda"), dim=1)
        s = torch.tensor(20.0, device="cuda")
        one = _api_clip(a, b, s)
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "16")
        many = _api_clip(a, b, s)
        for x, y in zip(one, many, strict=True):
            assert rel_err(y, x) <= 1e-6

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("scale_shape", [(), (1,)])
    def test_opcheck_clip(self, dtype, scale_shape):
        a64, b64 = _clip_data(13, 5, seed=7)
        a = a64.to("cuda", dtype).requires_grad_()
        b = b64.to("cuda", dtype).requires_grad_()
        s = torch.full(scale_shape, 7.0, dtype=dtype, device="cuda", requires_grad=True)
        torch.library.opcheck(ops.clip_fwd, (a, b, s))
        _, r, c = ops.clip_fwd(a.detach(), b.detach(), s.detach())
        grad = torch.tensor(1.7, dtype=dtype, device="cuda")
        torch.library.opcheck(ops.clip_bwd, (grad, a.detach(), b.detach(), s.detach(), r, c))

    @pytest.mark.parametrize("normalize", [True, False])
    def test_compile_clip_loss_fullgraph(self, normalize, dynamo_reset):
        a64, b64 = _clip_data(37, 17, seed=8)
        a, b = a64.to("cuda", torch.float32), b64.to("cuda", torch.float32)
        s = torch.tensor(9.0, device="cuda")

        def fn(a, b, s):
            return structure_ops.clip_loss(a, b, s, normalize=normalize, backend="cuda")

        results = []
        for f in (fn, torch.compile(fn, fullgraph=True)):
            aa, bb, ss = a.clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_()
            loss = f(aa, bb, ss)
            results.append((loss.detach(), *torch.autograd.grad(GRAD * loss, (aa, bb, ss))))
        ref = _clip_oracle(a.cpu(), b.cpu(), s.cpu(), normalize=normalize)
        assert rel_err(results[0][0], ref[0]) <= 1e-5
        for eager, compiled in zip(*results, strict=True):
            assert rel_err(compiled, eager) <= 1e-6

    # ----------------------------------------------------------------------------------------- kNN
    KNN_CASES = [(5, 3, 1), (5, 17, 4), (13, 3, 12), (13, 17, 5), (37, 3, 1), (37, 17, 5), (37, 17, 36)]

    @pytest.mark.parametrize("panels", ["default", "tiny"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
    @pytest.mark.parametrize(("n", "d", "k"), KNN_CASES, ids=[f"{n}x{d}k{k}" for n, d, k in KNN_CASES])
    def test_knn_ties_lower_index(self, n, d, k, dtype, panels, monkeypatch):
        if panels == "tiny":
            monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0005")
        _check_knn(_tied(n, d).to("cuda", dtype), k)

    def test_knn_duplicates_rank_by_index(self):
        """Rows 1, 6 and 12 are identical: for row 1 the best neighbours are 6 then 12 (equal sims)."""
        a = _tied(13, 17).to("cuda", torch.float32)
        out = _check_knn(a, 3)
        assert out[1, :2].tolist() == [6, 12]
        assert out[6, :2].tolist() == [1, 12]
        assert out[12, :2].tolist() == [1, 6]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("k", [1, 4, 12])
    def test_knn_nan_rows_and_values(self, k, dtype):
        a = _tied(13, 5, seed=1)
        a[2] = float("nan")  # every similarity with row 2 is NaN → −inf, ranked by index
        a[7, 3] = float("nan")
        _check_knn(a.to("cuda", dtype), k)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    def test_knn_signed_zero_ties(self, dtype):
        """−0.0 and +0.0 similarities are equal: the lower index wins."""
        a = torch.zeros(6, 2, dtype=dtype)
        a[:, 0] = torch.tensor([1.0, 0.0, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
        a[:, 1] = torch.tensor([0.0, 1.0, -1.0, 1.0, 0.0, 0.0], dtype=dtype)
        _check_knn(a.to("cuda"), 5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("k", [1, 35, 700, 1024, 1025, 2999])
    def test_knn_large_rows_compaction_and_sort_path(self, k, dtype):
        """N = 3000 with 3 features in {−1, 0, 1}: few distinct similarities, so every row is mostly ties
        and the candidate buffer is compacted many times (k ≤ 1024); k > 1024 takes the sort path."""
        g = torch.Generator().manual_seed(9)
        a = torch.randint(-1, 2, (3000, 3), generator=g).to(F64)
        a[100] = float("nan")
        _check_knn(a.to("cuda", dtype), k)

    def test_knn_tiny_panels_both_paths(self, tiny_cuda_panels):
        """1–3 rows per panel: the fused path (k ≤ 1024) and the sort path (k > 1024)."""
        a = _tied(150, 3, seed=2)
        a[9] = float("nan")
        _check_knn(a.to("cuda", torch.float32), 149)
        a = _tied(1100, 3, seed=3)
        for dtype in (torch.float32, torch.float64):
            _check_knn(a.to("cuda", dtype), 1050)

    def test_knn_api_normalize_and_non_contiguous(self):
        g = torch.Generator().manual_seed(10)
        x = (torch.randn(37, 17, generator=g, dtype=F64) * 3).to("cuda", torch.float32).T.contiguous().T
        assert not x.is_contiguous()
        out = structure_ops.knn(x, 5, backend="cuda")
        xn = F.normalize(x.to(F64), dim=1)
        sim = xn @ xn.T
        ref = reference.knn(xn, 5)
        # equal up to fp32 near-ties: compare the selected similarities
        assert (sim.gather(1, out) - sim.gather(1, ref)).abs().max() <= 1e-6

    def test_knn_deterministic(self):
        g = torch.Generator().manual_seed(11)
        a = F.normalize(torch.randn(2000, 64, generator=g), dim=1).cuda()
        assert torch.equal(ops.knn(a, 35), ops.knn(a, 35))
        assert torch.equal(ops.knn(a, 1500), ops.knn(a, 1500))

    def test_knn_checks(self):
        a = torch.randn(5, 3, device="cuda")
        for k in (0, 5):
            with pytest.raises(RuntimeError, match="1 <= k <= N - 1"):
                ops.knn(a, k)
        with pytest.raises(RuntimeError, match="2-D"):
            ops.knn(a[0], 1)
        with pytest.raises(RuntimeError, match="floating-point"):
            ops.knn(a.long(), 1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("k", [1, 3, 8])
    def test_opcheck_knn(self, dtype, k):
        a = _tied(9, 4, seed=12).to("cuda", dtype)
        torch.library.opcheck(ops.knn, (a, k))

    def test_compile_knn_fullgraph(self, dynamo_reset):
        g = torch.Generator().manual_seed(13)
        a = torch.randn(37, 17, generator=g).cuda()

        def fn(a):
            return structure_ops.knn(a, 5, backend="cuda")

        assert torch.equal(torch.compile(fn, fullgraph=True)(a), fn(a))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_knn_realistic(self, dtype):
        n, d, k = 8192, 768, 35
        g = torch.Generator(device="cuda").manual_seed(0)
        # exact integer similarities with many ties: the result must equal the oracle exactly
        a = torch.randint(-1, 2, (n, d), generator=g, device="cuda").to(F64)
        a[n // 2 :: 97] = a[3]
        out = structure_ops.knn(a.to(dtype), k, normalize=False, backend="cuda")
        assert out.dtype == torch.int64 and out.shape == (n, k)
        assert torch.equal(out, reference.knn(a, k))  # the oracle on the GPU, float64
        assert torch.equal(out, ops.knn(a.to(dtype), k))  # deterministic
        # random normalized rows: equal up to fp32 near-ties (compare the selected similarities)
        x = F.normalize(torch.randn(n, d, generator=g, device="cuda", dtype=F64), dim=1).to(dtype)
        out = structure_ops.knn(x, k, normalize=False, backend="cuda")
        xr = x.to(F64)
        ref = reference.knn(xr, k)
        sim = xr @ xr.T
        assert (out == ref).all(dim=1).float().mean() > 0.95
        assert (sim.gather(1, out) - sim.gather(1, ref)).abs().max() <= 1e-5

    # --------------------------------------------------------------------------------- panel rule
    # clip and knn size their row panels by the CUDA level-1 rule (csrc/cuda/common.cuh panel_rows_from_memory):
    # at most half of the available device memory, capped by STRUCTURE_OPS_CUDA_PANEL_MB (default 2048 MiB),
    # multiples of 16 from 64 rows on. The heights are read from the panel GEMMs (a dispatch-mode log).
    CAP_MB = 2048.0

    def _cap_binds_or_skip(self):
        """What available_device_bytes sees: free memory plus the caching allocator's reserved-but-unused bytes."""
        free, _ = torch.cuda.mem_get_info()
        avail = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        if 0.5 * avail < (self.CAP_MB + 512) * 2**20:
            pytest.skip("needs ≥ 5 GiB of free GPU memory (so that the 2048 MiB default cap binds)")

    @staticmethod
    def _panel_heights(log, d):
        """Row counts of the panel GEMMs (an A_I operand of width d; mm.out, or mm.dtype_out for half inputs)."""
        return [c["args"][0][1][0] for c in log.calls
                if c["op"] == "mm" and "out" in c["overload"] and c["args"][0][1][1] == d]  # fmt: skip

    @staticmethod
    def _split(n, rows):
        full, last = divmod(n, rows)
        return [rows] * full + ([last] if last else [])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_clip_panels_follow_the_shared_rule(self, dtype, monkeypatch):
        """N = 65 536: forward rows of 4·(N + 2N/64 + 2N/256) = 272 384 B, backward 4N (fp32) or 6N (bf16) B.
        Default (the 2048 MiB cap binds): 7 872 forward / 8 192 (fp32) or 5 456 (bf16) backward rows;
        STRUCTURE_OPS_CUDA_PANEL_MB = 64: 240 / 256 or 160 rows. Both runs give the same result."""
        self._cap_binds_or_skip()
        n, d = 65536, 32
        bf = 4 * (n + 2 * n // 64 + 2 * n // 256)
        bb = 4 * n + (2 * n if dtype == torch.bfloat16 else 0)
        fp32 = dtype == torch.float32
        by_hand = {None: (7872, 8192 if fp32 else 5456), 64.0: (240, 256 if fp32 else 160)}
        g = torch.Generator(device="cuda").manual_seed(3)
        a32 = F.normalize(torch.randn(n, d, generator=g, device="cuda"), dim=1)
        a = a32.to(dtype)
        b = F.normalize(a32 + 0.7 * torch.randn(n, d, generator=g, device="cuda"), dim=1).to(dtype)
        s = torch.tensor(10.0, device="cuda", dtype=dtype)
        results = []
        for knob, want in by_hand.items():
            if knob is None:
                monkeypatch.delenv("STRUCTURE_OPS_CUDA_PANEL_MB", raising=False)
            else:
                monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", repr(knob))
            rule = tuple(cases.expected_panel_rows(n, x, free_bytes=2**50, knob_mb=knob) for x in (bf, bb))
            assert rule == want
            with cases.AtenLog() as log_f:
                loss, r, c = ops.clip_fwd(a, b, s)
            with cases.AtenLog() as log_b:
                grads = ops.clip_bwd(torch.tensor(GRAD, device="cuda", dtype=dtype), a, b, s, r, c)
            assert self._panel_heights(log_f, d) == self._split(n, want[0])
            assert self._panel_heights(log_b, d) == self._split(n, want[1])
            results.append((r, c, *grads))
        tol = 1e-5 if fp32 else 2.0**-7  # bf16 outputs: one rounding flip (≤ 1 bf16 ulp) at most
        for x, y in zip(*results, strict=True):
            assert rel_err(y, x) <= (1e-5 if x.dtype == torch.float32 else tol)

    def test_knn_panels_follow_the_shared_rule(self, monkeypatch):
        """N = 65 536 fp32: 4N = 262 144 B per panel row. Default (the 2048 MiB cap binds): 8 192 rows;
        STRUCTURE_OPS_CUDA_PANEL_MB = 64: 256 rows. Integer rows (exact similarities): equal results."""
        self._cap_binds_or_skip()
        n, d, k = 65536, 16, 10
        g = torch.Generator(device="cuda").manual_seed(4)
        a = torch.randint(-2, 3, (n, d), generator=g, device="cuda").float()
        outs = []
        for knob, want in ((None, 8192), (64.0, 256)):
            if knob is None:
                monkeypatch.delenv("STRUCTURE_OPS_CUDA_PANEL_MB", raising=False)
            else:
                monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", repr(knob))
            assert cases.expected_panel_rows(n, 4 * n, free_bytes=2**50, knob_mb=knob) == want
            with cases.AtenLog() as log:
                outs.append(ops.knn(a, k))
            assert self._panel_heights(log, d) == self._split(n, want)
        assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------------
# CPU: the sources compile for Hopper (no GPU needed)
# --------------------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand):
            return cand
    return None


@pytest.mark.slow
def test_nvcc_compiles_sources(tmp_path):
    """Both .cu files compile with nvcc for sm_90a against the installed torch headers (the CPU wheel's
    headers suffice), and ptxas reports their kernels with no register spills."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.isfile(os.path.join(inc, "c10", "cuda", "CUDAGuard.h")) or not os.path.isfile(
        os.path.join(inc, "torch", "library.h")
    ):
        pytest.skip(f"torch C++/CUDA headers not found under {inc}")
    procs = {}
    for src in SOURCES:
        cmd = [nvcc, "-std=c++20", "-O3", "-c", os.path.join(ROOT, src), "-o", str(tmp_path / (os.path.basename(src) + ".o")),
               "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
               "-I", inc, "-I", os.path.join(inc, "torch", "csrc", "api", "include"),
               "-I", sysconfig.get_paths()["include"], "-I", os.path.join(ROOT, "csrc"),
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
        procs[src] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    expected = {
        "csrc/cuda/clip_cuda.cu": ["clip_fwd_tile_kernel", "clip_fwd_merge_kernel", "clip_fwd_finalize_kernel",
                                   "clip_bwd_rows_kernel", "clip_bwd_finalize_kernel", "scale_accumulate_kernel"],
        "csrc/cuda/knn_cuda.cu": ["knn_topk_rows_kernel", "knn_sanitize_kernel", "knn_drop_diag_kernel"],
    }
    for src, proc in procs.items():
        log, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"{src} failed to compile:\n{log[-6000:]}"
        entries = re.findall(r"Compiling entry function '([^']+)' for 'sm_90a'", log)
        for name in expected[src]:
            assert any(name in e for e in entries), f"{src}: no sm_90a kernel named {name} in the ptxas log"
        spills = [int(x) + int(y) for x, y in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
        assert spills and not any(spills), f"{src}: register spills in\n{log[-6000:]}"
