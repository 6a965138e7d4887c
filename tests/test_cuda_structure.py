"""CUDA STRUCTURE kernels (csrc/cuda/structure_cuda.cu: structure_fwd, structure_rows_fwd) against the float64 oracle.

Two groups (the CPU emulation of this file's kernels lives in tests/emulation/test_structure.py):

* GPU tests (classes marked ``cuda``): they skip unless a CUDA GPU is present and ``structure_ops._C_cuda``
  loads (with STRUCTURE_OPS_BUILD_CUDA=1, the build knob that makes CUDA required, a missing extension fails
  instead). Awkward shapes (N = 7, 13, 37; d = 3, 5, 17) with the level-1 panel height forced small through
  STRUCTURE_OPS_CUDA_PANEL_MB (ragged last panels), realistic shapes (N = 4096, d = 768/512), every option
  (cosine/rbf, structure/js, ε, levels 1–3, weighting, margin active/inactive/between levels, grad_x on/off),
  fp32/fp64/bf16/fp16, the row-range op, the public API with backend="cuda", opcheck, torch.compile(fullgraph),
  determinism, streams, the memory estimate. Expected values come from structure_ops.reference in float64
  (autograd gradients) on the same rounded inputs, and from the C++ CPU op for the return conventions. The
  tolerances of the TF32 and half-precision cases come from the float64 hardware models
  (tests/emulation/tolerances.py over hardware.py), not from fixed numbers.
* ``test_nvcc_compiles_sm90a`` (slow, no GPU needed): nvcc compiles the .cu for sm_90a against the torch
  headers, and ptxas reports no register spills.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from emulation import cases, tolerances
from emulation.cases import L1_CASES, ML_CASES, call, force_panel_rows, pick_margin, rows_call
from emulation.cases import check_structure as check
from emulation.cases import l1_id as _l1_id
from emulation.cases import ml_id as _ml_id
from helpers import level_values, loss_and_grads, opts, oracle, rel_err, structured

import structure_ops
from structure_ops import reference
from structure_ops._ops import extension_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILE = ROOT / "csrc" / "cuda" / "structure_cuda.cu"
ENV_KNOBS = ("STRUCTURE_OPS_CUDA_PANEL_MB", "STRUCTURE_OPS_CUDA_MEM_LIMIT_MB")
GRAD_SCALE = 1.7


@pytest.fixture(autouse=True)
def _clean_cuda_env(monkeypatch):
    for name in ENV_KNOBS:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture(scope="module")
def gpu():
    """Skip (never at import time) unless a GPU is present and structure_ops._C_cuda loads."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    err = extension_error("_C_cuda")
    if err:
        if os.environ.get("STRUCTURE_OPS_BUILD_CUDA") == "1":
            pytest.fail(f"STRUCTURE_OPS_BUILD_CUDA=1 but the CUDA extension is missing: {err}")
        pytest.skip(err)
    return torch.device("cuda")


@pytest.fixture
def ieee_fp32():
    """IEEE fp32 GEMMs (no TF32) for the fp32 tolerances against the oracle."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


# ---------------------------------------------------------------------------------------------------------------
# Helpers (shared with the emulated twin of these tests, tests/emulation/test_structure.py)
# ---------------------------------------------------------------------------------------------------------------
def ops():
    return torch.ops.structure_ops


def prepared(n, dx, dz, dtype=torch.float32, seed=0, device="cuda"):
    """Normalized-and-centered X̂, Ẑ (prepared in float64, then rounded to ``dtype``)."""
    return cases.prepared(n, dx, dz, dtype=dtype, seed=seed, device=device)


TOL = cases.STRUCTURE_TOL


def _model_kw(o):
    """The hardware model's keyword arguments for an option dict of helpers.opts."""
    return dict(temperature=o["temperature"], similarity=("cosine", "rbf")[o["similarity"]], gamma=o["gamma"],
                divergence=("structure", "js")[o["divergence"]], eps=o["eps"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# GPU: awkward shapes, every option
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.usefixtures("gpu", "ieee_fp32")
class TestSmallShapes:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("case", L1_CASES, ids=_l1_id)
    def test_level1(self, case, dtype, monkeypatch):
        xh, zh = prepared(case["n"], case["dx"], case["dz"], dtype=dtype)
        o, gxf = case["o"], case["grad_x"]
        force_panel_rows(monkeypatch, 5, case["n"], gxf, True, dtype)
        check(call(ops().structure_fwd, xh, zh, o, gxf), oracle(xh, zh, o), TOL[dtype], xh, zh, gxf)
        # An active margin: the value shifts, the gradient is unchanged.
        om = opts(**{**o, "margin": 0.5 * level_values(xh, zh, o)[0]})
        check(call(ops().structure_fwd, xh, zh, om, gxf), oracle(xh, zh, om), TOL[dtype], xh, zh, gxf)

    def test_level1_default_panels_and_budget_invariance(self, monkeypatch):
        """One panel (default budget) vs one row per panel: same values to rounding."""
        xh, zh = prepared(37, 5, 17, dtype=torch.float64, seed=3)
        o = opts(temperature=0.1)
        one = call(ops().structure_fwd, xh, zh, o)
        check(one, oracle(xh, zh, o), 1e-10, xh, zh)
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "1e-6")  # → 1 row per panel
        many = call(ops().structure_fwd, xh, zh, o)
        for a, b in zip(one, many, strict=True):
            assert rel_err(a, b) < 1e-13

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("case", ML_CASES, ids=_ml_id)
    def test_levels(self, case, dtype):
        xh, zh = prepared(case["n"], case["dx"], case["dz"], dtype=dtype, seed=1)
        o = pick_margin(xh, zh, case["o"], case["margin"])
        check(
            call(ops().structure_fwd, xh, zh, o, case["grad_x"]), oracle(xh, zh, o), TOL[dtype], xh, zh, case["grad_x"]
        )

    @pytest.mark.parametrize("levels", [1, 2, 3])
    def test_margin_clips_everything(self, levels):
        """A margin above every level's value: loss 0 and gradients exactly 0 (torch.relu's backward)."""
        xh, zh = prepared(13, 5, 3, seed=2)
        o = opts(levels=levels, weighting=1)
        o["margin"] = 2.0 * max(level_values(xh, zh, o))
        loss, gx, gz = call(ops().structure_fwd, xh, zh, o)
        assert loss.item() == 0.0
        assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gz) == 0
        assert gx.shape == xh.shape and gz.shape == zh.shape

    @pytest.mark.parametrize(
        "dtype,o",
        [
            (torch.bfloat16, opts()),
            (torch.bfloat16, opts(levels=2, weighting=1, divergence=1, temperature=0.1, margin=0.01)),
            (torch.float16, opts(similarity=1, eps=1e-3)),
            (torch.float16, opts(levels=3, temperature=0.1)),
        ],
        ids=["bf16-L1", "bf16-L2-js", "fp16-L1-rbf", "fp16-L3"],
    )
    def test_half_inputs(self, dtype, o, monkeypatch):
        """Half inputs. Level 1: tensor-core GEMMs, W rounded to the dtype for the gradient GEMMs, fp32 math and
        accumulation, outputs cast (tolerances.structure_half); levels > 1: fp32 math on the exactly upcast inputs,
        the error is the rounding of the outputs to the dtype (tolerances.output_cast)."""
        xh, zh = prepared(13, 17, 5, dtype=dtype, seed=4)
        force_panel_rows(monkeypatch, 5, 13, True, True, dtype)
        ref = oracle(xh, zh, o)
        if o["levels"] == 1:
            tols = tolerances.structure_half(xh, zh, ref, dtype, **_model_kw(o))
        else:
            tols = tolerances.output_cast(ref, dtype)
        check(call(ops().structure_fwd, xh, zh, o), ref, tols, xh, zh)

    @pytest.mark.parametrize(
        "dtype,o,flags",
        [
            (torch.float64, opts(levels=2, weighting=1, margin=0.05, divergence=1), (True, True)),
            (torch.float32, opts(similarity=1), (False, True)),
            (torch.float32, opts(levels=2), (True, False)),
            (torch.bfloat16, opts(), (False, False)),
            (torch.float64, opts(levels=3, similarity=1, divergence=1), (False, False)),
        ],
        ids=["f64-L2", "f32-rbf-gz", "f32-L2-gx", "bf16-none", "f64-L3-none"],
    )
    def test_matches_cpu_op(self, dtype, o, flags, cpu_ext):
        """Same dtypes, shapes, empty (0,) tensors for gradients not asked for, and values as the CPU op."""
        xh, zh = prepared(13, 5, 3, dtype=dtype, seed=6)
        ours = call(ops().structure_fwd, xh, zh, o, *flags)
        ref = call(ops().structure_fwd, xh.cpu(), zh.cpu(), o, *flags)
        if dtype == torch.bfloat16:  # both sides cast fp32 results to bf16: two casts (model: 2 × the safety)
            tols = tolerances.output_cast(ref, dtype, safety=2 * tolerances.SAFETY)
        else:
            tols = [{torch.float64: 1e-12, torch.float32: 2e-5}[dtype]] * 3
        for a, b, tol in zip(ours, ref, tols, strict=True):
            assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape
            assert rel_err(a.cpu(), b) <= tol

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize(("similarity", "divergence"), [(0, 0), (1, 1), (1, 0)])
    def test_rows_fwd(self, dtype, similarity, divergence, monkeypatch, cpu_ext):
        """Row shards (one rank's rows each, several panels) sum to the full level-1 loss and gradient."""
        n = 37
        xh, zh = prepared(n, 5, 17, dtype=dtype, seed=7)
        o = opts(temperature=0.1, similarity=similarity, divergence=divergence, gamma=1.5)
        force_panel_rows(monkeypatch, 4, n, True, True, dtype)
        shards = [(0, 10), (10, 10), (10, 11), (11, n)]
        parts = [rows_call(ops().structure_rows_fwd, xh, zh, a, b, o) for a, b in shards]
        ref = oracle(xh, zh, o)
        tol = TOL[dtype]
        assert rel_err(sum(p[0] for p in parts), ref[0]) <= tol
        assert rel_err(sum(p[1] for p in parts), ref[1]) <= tol
        assert rel_err(sum(p[2] for p in parts), ref[2]) <= tol
        empty = parts[1]
        assert empty[0].item() == 0.0 and torch.count_nonzero(empty[1]) == 0 and torch.count_nonzero(empty[2]) == 0
        # the CPU op's conventions: dtype, shapes, values; flags off → (0,) tensors
        for (a, b), part in zip(shards, parts, strict=True):
            cpu = rows_call(ops().structure_rows_fwd, xh.cpu(), zh.cpu(), a, b, o)
            for u, v in zip(part, cpu, strict=True):
                assert u.dtype == v.dtype and u.shape == v.shape
                assert (u.cpu() - v).abs().max().item() <= tol * max(1.0, v.abs().max().item())
        p, gx, gz = rows_call(ops().structure_rows_fwd, xh, zh, 3, 30, o, False, False)
        assert gx.shape == (0,) and gz.shape == (0,) and p.dtype == dtype
        with pytest.raises(RuntimeError, match="row_begin <= row_end <= N = 37"):
            rows_call(ops().structure_rows_fwd, xh, zh, 4, 38, o)

    def test_nan_propagates(self):
        xh, zh = prepared(7, 3, 3, seed=8)
        zh[2, 1] = float("nan")
        for levels in (1, 2):
            loss, _, gz = call(ops().structure_fwd, xh, zh, opts(levels=levels, margin=0.1))
            assert torch.isnan(loss) and torch.isnan(gz).any()

    def test_input_checks(self):
        xh, zh = prepared(7, 3, 3)
        f = ops().structure_fwd
        with pytest.raises(RuntimeError, match="levels must be >= 1"):
            call(f, xh, zh, opts(levels=0))
        with pytest.raises(RuntimeError, match="same dtype"):
            call(f, xh, zh.double(), opts())
        with pytest.raises(RuntimeError, match="same number of rows"):
            call(f, xh, zh[:5], opts())
        with pytest.raises(RuntimeError, match="same device"):
            call(f, xh, zh.cpu(), opts())
        with pytest.raises(RuntimeError, match="eps must be > 0"):
            call(f, xh, zh, opts(eps=0.0))
        with pytest.raises(RuntimeError, match="temperature must be > 0"):
            call(f, xh, zh, opts(temperature=0.0))
        with pytest.raises(RuntimeError, match="unknown divergence code"):
            call(f, xh, zh, opts(divergence=2))
        with pytest.raises(RuntimeError, match="unknown weighting code"):
            call(f, xh, zh, opts(weighting=5))
        with pytest.raises(RuntimeError, match="unknown similarity code"):
            call(f, xh, zh, opts(similarity=2))
        with pytest.raises(RuntimeError, match="2-D"):
            call(f, xh[0], zh, opts())

    def test_memory_limit_error(self, monkeypatch):
        xh, zh = prepared(13, 5, 3)
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_MEM_LIMIT_MB", "0.001")
        with pytest.raises(
            RuntimeError, match=r"levels=2 materializes about 0\.00 GiB .* N=13, more than STRUCTURE_OPS"
        ):
            call(ops().structure_fwd, xh, zh, opts(levels=2))
        loss, _, _ = call(ops().structure_fwd, xh, zh, opts(levels=1))  # level 1 is row panels: not limited
        assert torch.isfinite(loss)
        monkeypatch.delenv("STRUCTURE_OPS_CUDA_MEM_LIMIT_MB")
        # the real probe: N = 400 000 needs terabytes; refused before any N × N allocation
        big = torch.randn(400_000, 3, device="cuda")
        with pytest.raises(RuntimeError, match=r"levels=2 materializes about [0-9.]+ GiB .* GiB free on cuda"):
            call(ops().structure_fwd, big, big, opts(levels=2), False, True)

    @pytest.mark.parametrize(
        "o", [opts(), opts(levels=3, weighting=1, similarity=1, divergence=1, margin=0.01)], ids=["L1", "L3-rbf-js"]
    )
    def test_deterministic(self, o, monkeypatch):
        xh, zh = prepared(600, 17, 5, seed=9)
        force_panel_rows(monkeypatch, 37, 600, True, True, torch.float32)
        a = call(ops().structure_fwd, xh, zh, o)
        b = call(ops().structure_fwd, xh, zh, o)
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
        check(a, oracle(xh, zh, o), 1e-4, xh, zh)

    def test_side_stream_and_device_guard(self):
        xh, zh = prepared(37, 5, 17, seed=10)
        o = opts(levels=2)
        ref = call(ops().structure_fwd, xh, zh, o)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = call(ops().structure_fwd, xh, zh, o)
        torch.cuda.current_stream().wait_stream(side)
        for u, v in zip(out, ref, strict=True):
            assert rel_err(u, v) <= 1e-6
        if torch.cuda.device_count() > 1:
            x1, z1 = xh.to("cuda:1"), zh.to("cuda:1")
            with torch.cuda.device(0):
                out1 = call(ops().structure_fwd, x1, z1, o)
            for u, v in zip(out1, ref, strict=True):
                assert u.device == torch.device("cuda:1")
                assert rel_err(u.cpu(), v.cpu()) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# GPU: the public API, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------------
API_OPTIONS = [
    dict(temperature=0.1),
    dict(temperature=0.05, margin=0.1),
    dict(temperature=0.1, levels=3, weighting="inverse", margin=0.05),
    dict(similarity="rbf", gamma=2.5),
    dict(temperature=0.1, divergence="js", levels=2),
    dict(temperature=0.1, centering="standard", center_first=True, eps=1e-6),
]


def _opt_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.cuda
@pytest.mark.usefixtures("gpu", "ieee_fp32")
class TestAPI:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("grad_x", [False, True])
    @pytest.mark.parametrize("options", API_OPTIONS, ids=_opt_id)
    def test_structure_loss_backend_cuda(self, options, grad_x, dtype):
        x, z = structured(129, 17, 5, seed=11)
        x, z = x.cuda(), z.cuda()  # the float64 oracle on the GPU: outputs compare on one device
        ref = loss_and_grads(
            lambda a, b: reference.structure_loss(a, b, **options), x, z, grad_x=grad_x, scale=GRAD_SCALE
        )
        out = loss_and_grads(
            lambda a, b: structure_ops.structure_loss(a, b, backend="cuda", **options),
            x.to("cuda", dtype), z.to("cuda", dtype), grad_x=grad_x, scale=GRAD_SCALE,
        )  # fmt: skip
        tol = TOL[dtype]
        assert out[0].dtype == dtype and out[0].device.type == "cuda"
        assert rel_err(out[0], ref[0]) <= tol
        assert rel_err(out[2], ref[2]) <= tol
        if grad_x:
            assert rel_err(out[1], ref[1]) <= tol

    def test_non_contiguous_and_no_grad(self):
        n, dx, dz = 129, 64, 3
        x, z = structured(n, dx, dz, seed=12)
        o = dict(temperature=0.1, levels=2)
        x, z = x.cuda(), z.cuda()
        ref_l, ref_gx, ref_gz = loss_and_grads(lambda a, b: reference.structure_loss(a, b, **o), x, z, scale=GRAD_SCALE)
        x_buf = torch.zeros(n, 2 * dx, dtype=torch.float64, device="cuda")
        x_buf[:, ::2] = x
        x_buf.requires_grad_()
        zt = z.T.contiguous().requires_grad_()
        xv, zv = x_buf[:, ::2], zt.T
        assert not xv.is_contiguous() and not zv.is_contiguous()
        loss = structure_ops.structure_loss(xv, zv, backend="cuda", **o)
        gbuf, gzt = torch.autograd.grad(GRAD_SCALE * loss, (x_buf, zt))
        assert rel_err(loss, ref_l) <= 1e-10
        assert rel_err(gbuf[:, ::2], ref_gx) <= 1e-10 and gbuf[:, 1::2].abs().max().item() == 0.0
        assert rel_err(gzt.T, ref_gz) <= 1e-10
        with torch.no_grad():
            value = structure_ops.structure_loss(xv, zv, backend="cuda", **o)
        assert not value.requires_grad and rel_err(value, ref_l) <= 1e-10

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize(("grad_x", "grad_z"), [(True, True), (False, True), (True, False), (False, False)])
    @pytest.mark.parametrize(("levels", "similarity", "divergence"), [(1, 0, 0), (2, 1, 1)], ids=["l1", "l2-rbf-js"])
    def test_opcheck_structure_fwd(self, dtype, grad_x, grad_z, levels, similarity, divergence):
        xh, zh = prepared(9, 4, 3, dtype=dtype, seed=5)
        xh.requires_grad_(grad_x)
        zh.requires_grad_(grad_z)
        args = (xh, zh, levels, 0.1, 1, 0.0, similarity, 1.5, divergence, 1e-12, grad_x, grad_z)
        torch.library.opcheck(ops().structure_fwd, args)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_opcheck_structure_rows_fwd(self, dtype):
        xh, zh = prepared(9, 4, 3, dtype=dtype, seed=5)
        xh.requires_grad_()
        zh.requires_grad_()
        torch.library.opcheck(ops().structure_rows_fwd, (xh, zh, 2, 7, 0.1, 0, 1.0, 0, 1e-12, True, True))

    def test_opcheck_non_contiguous(self):
        xh, zh = prepared(9, 4, 3, dtype=torch.float64, seed=5)
        xh = xh.T.contiguous().T.requires_grad_()
        zh = zh.T.contiguous().T.requires_grad_()
        assert not xh.is_contiguous()
        torch.library.opcheck(ops().structure_fwd, (xh, zh, 1, 0.1, 0, 0.0, 0, 1.0, 0, 1e-12, True, True))

    @pytest.mark.parametrize(
        "options", [dict(temperature=0.1), dict(levels=2, weighting="inverse", similarity="rbf")], ids=["l1", "l2-rbf"]
    )
    def test_compile_fullgraph(self, options, dynamo_reset):
        x, z = structured(33, 5, 4, seed=6)
        x, z = x.cuda(), z.cuda()

        def fn(a, b):
            return structure_ops.structure_loss(a, b, backend="cuda", **options)

        results = []
        for f in (fn, torch.compile(fn, fullgraph=True)):
            xx, zz = x.clone().requires_grad_(), z.clone().requires_grad_()
            loss = f(xx, zz)
            results.append((loss.detach(), *torch.autograd.grad(GRAD_SCALE * loss, (xx, zz))))
        ref = reference.structure_loss(x, z, **options)
        assert rel_err(results[0][0], ref) < 1e-10
        for eager, compiled in zip(*results, strict=True):
            assert rel_err(compiled, eager) < 1e-10


# ---------------------------------------------------------------------------------------------------------------
# GPU: realistic sizes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.usefixtures("gpu", "ieee_fp32")
class TestRealistic:
    @pytest.mark.parametrize(
        "dtype,o,tol",
        [
            (torch.float32, opts(), 1e-4),
            (torch.float32, opts(divergence=1, margin=0.01), 1e-4),
            (torch.float32, opts(similarity=1, gamma=2.0), 1e-4),
            (torch.float64, opts(temperature=0.1), 1e-9),
            (torch.bfloat16, opts(temperature=0.1), None),
            (torch.float16, opts(temperature=0.05), None),
            (torch.bfloat16, opts(similarity=1, gamma=2.0, divergence=1), None),
        ],
        ids=["f32-structure", "f32-js", "f32-rbf", "f64", "bf16", "f16", "bf16-rbf-js"],
    )
    def test_level1_n4096(self, dtype, o, tol):
        xh, zh = prepared(4096, 768, 512, dtype=dtype, seed=12)
        ref = oracle(xh, zh, o)
        if tol is None:  # half inputs: the float64 model of the tensor-core path (W rounded, outputs cast)
            tol = tolerances.structure_half(xh, zh, ref, dtype, floor=tolerances.FP32_FLOOR["realistic"], **_model_kw(o))
        check(call(ops().structure_fwd, xh, zh, o), ref, tol, xh, zh)

    @pytest.mark.parametrize("grad_x", [False, True])
    def test_levels_n4096(self, grad_x):
        xh, zh = prepared(4096, 768, 512, seed=13)
        o = opts(levels=3, weighting=1, temperature=0.1)
        check(call(ops().structure_fwd, xh, zh, o, grad_x), oracle(xh, zh, o), 1e-4, xh, zh, grad_x)

    def test_panels_n4096(self, monkeypatch):
        """Several row panels at a realistic size (a 16 MiB budget → 256-row panels), margin active."""
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "16")
        xh, zh = prepared(4096, 512, 768, seed=14)
        o = opts(margin=0.01)
        check(call(ops().structure_fwd, xh, zh, o), oracle(xh, zh, o), 1e-4, xh, zh)

    def test_api_frozen_x_n4096(self):
        x, z = structured(4096, 768, 512, seed=15)
        ref = loss_and_grads(lambda a, b: reference.structure_loss(a, b), x.cuda(), z.cuda(), grad_x=False)
        out = loss_and_grads(lambda a, b: structure_ops.structure_loss(a, b, backend="cuda"), x.float().cuda(),
                             z.float().cuda(), grad_x=False)  # fmt: skip
        assert out[1] is None
        assert rel_err(out[0], ref[0]) <= 1e-4 and rel_err(out[2], ref[2]) <= 1e-4

    def test_tf32_runs(self):
        """torch's "high" float32 matmul precision reaches the GEMMs (cuBLAS TF32): the error stays within the
        float64 model of TF32 operand rounding (hardware.level1_emulated(..., "tf32")), times the safety factor."""
        xh, zh = prepared(4096, 768, 512, seed=16)
        o = opts(temperature=0.1)
        ref = oracle(xh, zh, o)
        tols = tolerances.structure_tf32(xh, zh, ref, temperature=0.1)
        torch.set_float32_matmul_precision("high")
        out = call(ops().structure_fwd, xh, zh, o)
        errs = [rel_err(u, r) for u, r in zip(out, ref, strict=True)]
        assert all(e <= t for e, t in zip(errs, tols, strict=True)), (errs, tols)


# ---------------------------------------------------------------------------------------------------------------
# GPU, issue 14: tensor-core GEMMs for half inputs, 2-D row grids, panels sized from free memory
# ---------------------------------------------------------------------------------------------------------------
def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _available_bytes() -> int:
    """What structure_cuda.cu counts as available: free device memory + torch's cached-unused bytes."""
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


@pytest.mark.cuda
@pytest.mark.usefixtures("gpu", "ieee_fp32")
class TestIssue14:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
    def test_half_gemms_on_tensor_cores(self, dtype, monkeypatch):
        """bf16/fp16 level 1: the Gram GEMMs take the half operands with an fp32 output (aten mm.dtype_out), the
        gradient GEMMs take W and Û in the half dtype and accumulate into the fp32 gradient in place with
        beta = 1 (addmm.dtype_out; torch < 2.10: mm.dtype_out + one add), and X̂/Ẑ are never widened to fp32."""
        n, dx, dz, rows = 700, 64, 32, 96
        xh, zh = prepared(n, dx, dz, dtype=dtype, seed=30)
        force_panel_rows(monkeypatch, rows, n, True, True, dtype)
        o = opts(temperature=0.1)
        with cases.AtenLog() as log:
            out = call(ops().structure_fwd, xh, zh, o)
        ref = oracle(xh, zh, o)
        check(out, ref, tolerances.structure_half(xh, zh, ref, dtype, **_model_kw(o)), xh, zh)
        panels = -(-n // rows)
        grams = log.find("mm", "dtype_out")
        assert len(grams) >= 2 * panels
        assert all(c["args"][0][0] == dtype and c["kwargs"]["out"][0] == torch.float32 for c in grams)
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10):
            acc = log.find("addmm", "dtype_out")
            assert len(acc) == 2 * 2 * panels and len(grams) == 2 * panels
            for c in acc:
                assert c["args"][1][0] == c["args"][2][0] == dtype  # W and Û: half operands
                assert c["args"][0] == c["kwargs"]["out"] and c["args"][0][0] == torch.float32  # in place, fp32
                assert c["kwargs"]["beta"] == 1
        widened = [c for c in log.find("_to_copy") if c["args"][0][0] == dtype and c["args"][0][1] in ((n, dx), (n, dz))
                   and c["kwargs"].get("dtype") == torch.float32]  # fmt: skip
        assert not widened, widened

    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
    def test_2d_grid_and_fused_rows(self, dtype, monkeypatch):
        """Panels with ≥ SM-count rows run the fused row kernel, shorter ones the 2-D grid (several column
        blocks): a panel height on each side of the SM count, and a ragged last panel, agree with the oracle."""
        sms = _sms()
        n = 2 * sms + 61
        xh, zh = prepared(n, 17, 9, dtype=dtype, seed=31)
        o = opts(temperature=0.1, similarity=0, divergence=1)
        ref = oracle(xh, zh, o)
        tol = 1e-10 if dtype == torch.float64 else tolerances.structure_half(xh, zh, ref, dtype, **_model_kw(o))
        outs = []
        for rows in (-(-(sms + 1) // 16) * 16, 7):  # ≥ 64-row heights are multiples of 16
            force_panel_rows(monkeypatch, rows, n, True, True, dtype)
            outs.append(call(ops().structure_fwd, xh, zh, o))
            check(outs[-1], ref, tol, xh, zh)
        if dtype == torch.float64:
            for a, b in zip(*outs, strict=True):
                assert rel_err(a, b) <= 1e-12

    def test_default_panels_capped_at_2gib(self):
        """Without the knob, on a device with ≥ 4 GiB available, the cap (2048 MiB) sets the panel height:
        N = 32 768, fp32, grad_z only → 32 768·12 B per row → 5456 rows (multiple of 16) → 7 panels."""
        n = 32768
        xh, zh = prepared(n, 8, 8, seed=32)
        if _available_bytes() < 5 * 2**30:
            pytest.skip("needs ≥ 5 GiB of free device memory")
        bpr = cases.panel_bytes_per_row(n, False, True, torch.float32)
        rows = cases.expected_panel_rows(n, bpr, free_bytes=_available_bytes())
        assert rows == 5456
        with cases.AtenLog() as log:
            loss, _, gz = call(ops().structure_fwd, xh, zh, opts(temperature=0.1), False, True)
        assert len(log.find("mm", "out")) == 2 * 7
        assert torch.isfinite(loss) and torch.isfinite(gz).all()

    def test_panels_follow_free_memory(self):
        """With the device nearly full (a filler tensor), the panels take half of what is available: the count of
        Gram GEMMs matches the rule (cases.expected_panel_rows) for the memory measured just before the call,
        within ±2 % of that measurement (the call's own small allocations)."""
        n = 32768
        xh, zh = prepared(n, 8, 8, seed=33)
        bpr = cases.panel_bytes_per_row(n, False, True, torch.float32)
        torch.cuda.empty_cache()
        target = 2 * 1500 * bpr  # → about 1500-row panels
        spare = _available_bytes() - target
        if spare < 2**30:
            pytest.skip("not enough device memory to shape")
        filler = torch.empty(spare, dtype=torch.uint8, device="cuda")
        try:
            avail = _available_bytes()
            lo = cases.expected_panel_rows(n, bpr, free_bytes=0.98 * avail)
            hi = cases.expected_panel_rows(n, bpr, free_bytes=1.02 * avail)
            assert 1000 < lo <= hi < 2000
            with cases.AtenLog() as log:
                loss, _, _ = call(ops().structure_fwd, xh, zh, opts(temperature=0.1), False, True)
            panels = len(log.find("mm", "out")) // 2
            assert -(-n // hi) <= panels <= -(-n // lo)
            assert torch.isfinite(loss)
        finally:
            del filler
            torch.cuda.empty_cache()

    def test_level1_memory_at_n65536(self):
        """Level 1 at N = 65 536 (fp32, d = 64, grad_z) allocates at most the 2 GiB panel cap plus O(N·d) beyond
        its inputs and outputs (the issue's memory target, at a size a test can afford)."""
        n, d = 65536, 64
        xh, zh = prepared(n, d, d, seed=34)
        if _available_bytes() < 5 * 2**30:
            pytest.skip("needs ≥ 5 GiB of free device memory")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, _, gz = call(ops().structure_fwd, xh, zh, opts(temperature=0.1), False, True)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - gz.numel() * gz.element_size()
        assert extra <= 2 * 2**30 + 8 * n * d * 4, extra / 2**30
        assert torch.isfinite(loss) and torch.isfinite(gz).all()


# ---------------------------------------------------------------------------------------------------------------
# No GPU needed: nvcc compiles the file for sm_90a without spills
# ---------------------------------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (pathlib.Path(cand) / "bin" / "nvcc").exists():
            return str(pathlib.Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _torch_include() -> pathlib.Path:
    return pathlib.Path(torch.__file__).parent / "include"


@pytest.mark.slow
def test_nvcc_compiles_sm90a(tmp_path):
    nvcc = _nvcc()
    inc = _torch_include()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
    if not (inc / "c10" / "cuda" / "CUDAStream.h").exists() or not (inc / "torch" / "library.h").exists():
        pytest.skip(f"torch headers with c10/cuda not found under {inc}")
    cmd = [
        nvcc, "-std=c++20", "-c", str(CU_FILE), "-o", str(tmp_path / "structure_cuda.o"),
        "-gencode=arch=compute_90a,code=sm_90a", f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-Xptxas", "-v",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    assert (tmp_path / "structure_cuda.o").stat().st_size > 0
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'", log)
    for name in ("l1_rows_kernel", "l1_lse_kernel", "l1_terms_kernel", "l1_grad_kernel", "level_div_kernel",
                 "softmax_bwd_kernel", "finalize_levels_kernel"):
        assert any(name in k for k in kernels), f"{name} was not compiled"
    spills = [(k, s) for k, s in zip(kernels, re.findall(r"(\d+) bytes spill stores", log), strict=True) if s != "0"]
    assert not spills, f"register spills on sm_90a: {spills}"
