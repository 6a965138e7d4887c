"""csrc/cuda/structure_cuda.cu, emulated on the CPU (README.md), against the float64 oracle and the C++ CPU op.

Every oracle case runs under one of the schedules of conftest.SCHEDULES (block and thread orders, block sizes of
the row kernels from 32 to 1024 threads); the order tests run the same inputs under every order and require
bitwise-equal outputs (the kernels claim determinism: no atomics, fixed reduction trees).
"""

from __future__ import annotations

import pytest
import torch
from helpers import level_values, opts, oracle, rel_err

from . import tolerances
from .cases import (
    L1_CASES,
    ML_CASES,
    STRUCTURE_TOL,
    AtenLog,
    call,
    check_structure,
    emulate_panel_memory,
    expected_panel_rows,
    force_panel_rows,
    l1_id,
    ml_id,
    panel_bytes_per_row,
    pick_margin,
    prepared,
    rows_call,
)
from .conftest import SCHEDULES, schedule_id

TOL = STRUCTURE_TOL
L1_PARAMS = [(c, torch.float32, SCHEDULES[i % 4]) for i, c in enumerate(L1_CASES)] + [
    (L1_CASES[1], torch.float64, SCHEDULES[2]),
    (L1_CASES[3], torch.float64, SCHEDULES[1]),
]
ML_PARAMS = [(c, torch.float64, SCHEDULES[(i + 1) % 4]) for i, c in enumerate(ML_CASES[:4])] + [
    (ML_CASES[1], torch.float32, SCHEDULES[0]),
    (ML_CASES[3], torch.float32, SCHEDULES[2]),
]


def _ids(params, idf):
    return [f"{idf(c)}-{'f64' if d == torch.float64 else 'f32'}-{schedule_id(s)}" for c, d, s in params]


def cpu_op():
    return torch.ops.structure_ops.structure_fwd


@pytest.mark.usefixtures("cpu_ext")
class TestOracle:
    @pytest.mark.parametrize(("case", "dtype", "sched"), L1_PARAMS, ids=_ids(L1_PARAMS, l1_id))
    def test_level1(self, emu_structure, case, dtype, sched, monkeypatch):
        emu = emu_structure
        xh, zh = prepared(case["n"], case["dx"], case["dz"], dtype=dtype)
        o, gxf = case["o"], case["grad_x"]
        force_panel_rows(monkeypatch, 5, case["n"], gxf, True, dtype)
        emu.reset_stats()
        with emu.schedule(**sched):
            check_structure(call(emu.ops.structure_fwd, xh, zh, o, gxf), oracle(xh, zh, o), TOL[dtype], xh, zh, gxf)
            om = opts(**{**o, "margin": 0.5 * level_values(xh, zh, o)[0]})  # an active margin
            check_structure(call(emu.ops.structure_fwd, xh, zh, om, gxf), oracle(xh, zh, om), TOL[dtype], xh, zh, gxf)
            out = call(emu.ops.structure_fwd, xh, zh, o, False, False)  # no gradient at all
            check_structure(out, oracle(xh, zh, o), TOL[dtype], xh, zh, False, False)
        st = emu.stats()
        assert st["launches"] > 0 and st["threads"] > 0  # the kernels really ran here
        if sched["block"]:
            assert st["overridden"] > 0 and st["max_overridden"] == sched["block"]  # the finalize kernels: any size
            rows_block = max(v for k, v in emu.kernel_blocks().items() if k.startswith("l1_"))
            assert rows_block == min(sched["block"], 512)  # the row kernels' __launch_bounds__

    @pytest.mark.parametrize(("case", "dtype", "sched"), ML_PARAMS, ids=_ids(ML_PARAMS, ml_id))
    def test_levels(self, emu_structure, case, dtype, sched):
        emu = emu_structure
        xh, zh = prepared(case["n"], case["dx"], case["dz"], dtype=dtype, seed=1)
        o = pick_margin(xh, zh, case["o"], case["margin"])
        ref = oracle(xh, zh, o)
        with emu.schedule(**sched):
            gxf = case["grad_x"]
            check_structure(call(emu.ops.structure_fwd, xh, zh, o, gxf), ref, TOL[dtype], xh, zh, gxf)
            check_structure(call(emu.ops.structure_fwd, xh, zh, o, True, False), ref, TOL[dtype], xh, zh, True, False)

    @pytest.mark.parametrize(
        ("n", "dx", "dz", "o"),
        [(2, 1, 1, opts(levels=2, similarity=1)), (3, 1, 4, opts(divergence=1, temperature=0.5)),
         (33, 2, 1, opts(levels=2, weighting=1, divergence=1))],
        ids=["n2-d1-L2-rbf", "n3-d1-js", "n33-L2-js"],
    )  # fmt: skip
    def test_tiny_shapes(self, emu_structure, n, dx, dz, o):
        """N = 2, d = 1, and N = 33 (one warp + 1 row); N = 1 is refused like the CPU op."""
        xh, zh = prepared(n, dx, dz, dtype=torch.float64, seed=5)
        with emu_structure.schedule("shuffled", seed=3, block=64):
            out = call(emu_structure.ops.structure_fwd, xh, zh, o)
        check_structure(out, oracle(xh, zh, o), 1e-10, xh, zh)
        cpu = call(cpu_op(), xh, zh, o)
        for u, v in zip(out, cpu, strict=True):
            assert rel_err(u, v) <= 1e-12
        one = (torch.randn(1, dx, dtype=torch.float64), torch.randn(1, dz, dtype=torch.float64))
        for op in (emu_structure.ops.structure_fwd, cpu_op()):
            with pytest.raises(RuntimeError, match="at least N = 2 rows"):
                call(op, *one, o)

    @pytest.mark.parametrize("levels", [1, 3])
    def test_margin_clips_everything(self, emu_structure, levels):
        xh, zh = prepared(13, 5, 3, seed=2)
        o = opts(levels=levels, weighting=1)
        o["margin"] = 2.0 * max(level_values(xh, zh, o))
        loss, gx, gz = call(emu_structure.ops.structure_fwd, xh, zh, o)
        assert loss.item() == 0.0 and torch.count_nonzero(gx) == 0 and torch.count_nonzero(gz) == 0

    def test_rows_fwd_matches_cpu_op(self, emu_structure, monkeypatch):
        n = 37
        xh, zh = prepared(n, 5, 17, dtype=torch.float64, seed=7)
        o = opts(temperature=0.1, similarity=1, divergence=1, gamma=1.5)
        force_panel_rows(monkeypatch, 4, n, True, True, torch.float64)
        shards = [(0, 10), (10, 10), (10, 11), (11, n)]
        with emu_structure.schedule("reversed", block=96):
            parts = [rows_call(emu_structure.ops.structure_rows_fwd, xh, zh, a, b, o) for a, b in shards]
        ref = oracle(xh, zh, o)
        for k in range(3):
            assert rel_err(sum(p[k] for p in parts), ref[k]) <= 1e-10
        for (a, b), part in zip(shards, parts, strict=True):
            cpu = rows_call(torch.ops.structure_ops.structure_rows_fwd, xh, zh, a, b, o)
            for u, v in zip(part, cpu, strict=True):
                assert u.dtype == v.dtype and u.shape == v.shape
                assert (u - v).abs().max().item() <= 1e-12
        with pytest.raises(RuntimeError, match="row_begin <= row_end <= N = 37"):
            rows_call(emu_structure.ops.structure_rows_fwd, xh, zh, 4, 38, o)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
    def test_half_matches_cpu_op(self, emu_structure, dtype):
        xh, zh = prepared(13, 17, 5, dtype=dtype, seed=4)
        for o in (opts(), opts(levels=2, divergence=1, temperature=0.1), opts(similarity=1)):
            with emu_structure.schedule("shuffled", seed=4, block=256):
                ours = call(emu_structure.ops.structure_fwd, xh, zh, o)
            cpu = call(cpu_op(), xh, zh, o)
            ref = oracle(xh, zh, o)
            tols = tolerances.output_cast(ref, dtype)  # the GPU tests' model: fp32 math, outputs cast to dtype
            for u, v, tol in zip(ours, cpu, tols, strict=True):
                assert u.dtype == v.dtype == dtype and u.shape == v.shape
                assert rel_err(u, v) <= 2 * tol
            check_structure(ours, ref, tols, xh, zh)

    def test_host_block_sizes(self, emu_structure):
        """N = 520 and 1100: the host itself picks 64 and 128 threads per row block (two and four warps)."""
        for n in (520, 1100):
            xh, zh = prepared(n, 5, 7, seed=3)
            o = opts(temperature=0.1)
            emu_structure.reset_stats()
            check_structure(call(emu_structure.ops.structure_fwd, xh, zh, o, False), oracle(xh, zh, o), 2e-5, xh, zh,
                            False)  # fmt: skip
            blocks = emu_structure.kernel_blocks()
            assert blocks["l1_rows_kernel"] == (64 if n == 520 else 128) and blocks["finalize_level1_kernel"] == 256

    def test_non_finite_like_cpu(self, emu_structure):
        """NaN or ±inf inputs: the NaN/inf pattern of every output equals the C++ CPU op's (no silent finite values)."""
        xh, zh = prepared(13, 5, 3, dtype=torch.float64, seed=8)
        for where, value in (((2, 1), float("nan")), ((4, 0), float("inf")), ((0, 2), float("-inf"))):
            for side in ("x", "z"):
                x, z = xh.clone(), zh.clone()
                (x if side == "x" else z)[where] = value
                for o in (opts(), opts(levels=2, margin=0.1), opts(similarity=1, divergence=1)):
                    ours = call(emu_structure.ops.structure_fwd, x, z, o)
                    cpu = call(cpu_op(), x, z, o)
                    assert not torch.isfinite(ours[0]), (side, value, o)
                    for u, v in zip(ours, cpu, strict=True):
                        assert torch.equal(u.isnan(), v.isnan()) and torch.equal(u.isinf(), v.isinf()), (side, value, o)

    def test_checks_and_memory_estimate(self, emu_structure, monkeypatch):
        emu = emu_structure
        xh, zh = prepared(13, 5, 3)
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_MEM_LIMIT_MB", "0.001")
        with pytest.raises(RuntimeError, match=r"levels=2 materializes about 0\.00 GiB .* N=13, more than STRUCTURE_OPS"):
            call(emu.ops.structure_fwd, xh, zh, opts(levels=2))
        assert torch.isfinite(call(emu.ops.structure_fwd, xh, zh, opts())[0])
        monkeypatch.delenv("STRUCTURE_OPS_CUDA_MEM_LIMIT_MB")
        for bad, msg in (
            (opts(levels=0), "levels must be >= 1"),
            (opts(eps=0.0), "eps must be > 0"),
            (opts(divergence=2), "unknown divergence code"),
            (opts(weighting=3), "unknown weighting code"),
        ):
            with pytest.raises(RuntimeError, match=msg):
                call(emu.ops.structure_fwd, xh, zh, bad)
        with pytest.raises(RuntimeError, match="same dtype"):
            call(emu.ops.structure_fwd, xh, zh.double(), opts())


ORDER_CASES = [
    (opts(), torch.float32),
    (opts(similarity=1, divergence=1, gamma=1.5), torch.float32),
    (opts(levels=3, weighting=1, similarity=1, divergence=1, margin=0.01), torch.float64),
    (opts(levels=2, temperature=0.1), torch.float32),
]


@pytest.mark.parametrize("block", [None, 96], ids=["host", "b96"])
@pytest.mark.parametrize(("o", "dtype"), ORDER_CASES, ids=["L1", "L1-rbf-js", "L3-rbf-js-f64", "L2"])
def test_order_independent(emu_structure, o, dtype, block, monkeypatch):
    """The same inputs under every block/thread order (and two shuffles) give bitwise-equal outputs."""
    xh, zh = prepared(37, 5, 17, dtype=dtype, seed=3)
    force_panel_rows(monkeypatch, 5, 37, True, True, dtype)
    results = []
    for order, seed in (("inorder", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)):
        with emu_structure.schedule(order, seed=seed, block=block):
            results.append(call(emu_structure.ops.structure_fwd, xh, zh, o))
    for other in results[1:]:
        for u, v in zip(results[0], other, strict=True):
            assert torch.equal(u, v)
    check_structure(results[0], oracle(xh, zh, o), TOL[dtype], xh, zh)


def test_launch_bounds_enforced(emu_structure):
    """fp64 row kernels are bounded at 512 threads: an override to 1024 is clamped (the emulation reads the
    kernel's __launch_bounds__), and the result still matches the oracle."""
    xh, zh = prepared(13, 5, 3, dtype=torch.float64, seed=2)
    emu_structure.reset_stats()
    with emu_structure.schedule("inorder", block=1024):
        out = call(emu_structure.ops.structure_fwd, xh, zh, opts(levels=2))
    assert emu_structure.stats()["clamped"] > 0
    check_structure(out, oracle(xh, zh, opts(levels=2)), 1e-10, xh, zh)


@pytest.mark.parametrize(
    "o", [opts(temperature=0.1), opts(similarity=1, divergence=1, gamma=1.5), opts(temperature=0.05, eps=1e-6)],
    ids=["cosine", "rbf-js", "cosine-t0.05"],
)
def test_tf32_gemms_within_model_tolerance(emu_structure, o):
    """The GPU test of TF32 ("high" precision) takes its tolerance from hardware.level1_emulated(..., "tf32")
    (tolerances.structure_tf32). Here the emulated kernels run with every GEMM operand rounded to tf32 as cuBLAS
    rounds it (gemm_models.cublas_tf32): the error of the whole pipeline must stay within that tolerance, and the
    rounding must really act (the error exceeds the IEEE-fp32 run's by far)."""
    from .gemm_models import cublas_tf32

    xh, zh = prepared(96, 24, 16, seed=16)
    ref = oracle(xh, zh, o)
    kw = dict(temperature=o["temperature"], similarity=("cosine", "rbf")[o["similarity"]], gamma=o["gamma"],
              divergence=("structure", "js")[o["divergence"]], eps=o["eps"])  # fmt: skip
    tols = tolerances.structure_tf32(xh, zh, ref, floor=tolerances.FP32_FLOOR["small"], **kw)
    ieee = call(emu_structure.ops.structure_fwd, xh, zh, o)
    with cublas_tf32() as counts:
        out = call(emu_structure.ops.structure_fwd, xh, zh, o)
    assert counts["gemms"] >= 4
    errs = [rel_err(u, r) for u, r in zip(out, ref, strict=True)]
    assert all(e <= t for e, t in zip(errs, tols, strict=True)), (errs, tols)
    assert errs[2] > 10 * rel_err(ieee[2], ref[2]), (errs, rel_err(ieee[2], ref[2]))


# ------------------------------------------------------------------------------------------------------------
# Issue 14: 2-D grids for short panels, half operands on the GEMMs, accumulation by the GEMM, memory-sized panels
# ------------------------------------------------------------------------------------------------------------
SMS = 132  # the emulated device's multiprocessor count (cuda_emu.h cudaDeviceGetAttribute)


def _rows_kernels(emu):
    """Which row-kernel paths ran since the last reset: the fused 1-D kernel and/or the three 2-D kernels."""
    blocks = emu.kernel_blocks()
    two_d = {"l1_lse_kernel", "l1_terms_kernel", "l1_grad_kernel"} & set(blocks)
    return "l1_rows_kernel" in blocks, two_d


# (options, dtype, panel rows, block override): N = 300 has 2 column blocks of 160 + 140 columns in a 2-D panel
# (≥ 256 columns each, a multiple of 32); 144-row panels (≥ 132 SMs; heights ≥ 64 are multiples of 16) run the
# fused kernel and leave a ragged 12-row panel on the 2-D grid; 37-row panels run only 2-D grids (the last one
# 4 rows). The grad_z-only call has smaller rows, so the same budget gives 192-row panels (fused + 108 rows 2-D)
# and 49-row panels (2-D only).
GRID_CASES = [
    (opts(temperature=0.1), torch.float32, 144, None),
    (opts(temperature=0.1), torch.float32, 37, 32),
    (opts(similarity=1, gamma=1.5), torch.float32, 144, 96),
    (opts(divergence=1, temperature=0.2), torch.float64, 37, 256),
    (opts(similarity=1, divergence=1, gamma=0.7, eps=1e-3), torch.float64, 144, 64),
]


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize(("o", "dtype", "rows", "block"), GRID_CASES,
                         ids=["cos-144-host", "cos-37-b32", "rbf-144-b96", "js-37-b256-f64", "rbf-js-144-b64-f64"])  # fmt: skip
def test_2d_grid_ragged_panels(emu_structure, o, dtype, rows, block, monkeypatch):
    n = 300
    xh, zh = prepared(n, 5, 17, dtype=dtype, seed=21)
    force_panel_rows(monkeypatch, rows, n, True, True, dtype)
    ref = oracle(xh, zh, o)
    all_2d = {"l1_lse_kernel", "l1_terms_kernel", "l1_grad_kernel"}
    with emu_structure.schedule("shuffled", seed=5, block=block):
        emu_structure.reset_stats()
        check_structure(call(emu_structure.ops.structure_fwd, xh, zh, o), ref, TOL[dtype], xh, zh)
        assert _rows_kernels(emu_structure) == (rows >= SMS, all_2d)
        emu_structure.reset_stats()
        check_structure(call(emu_structure.ops.structure_fwd, xh, zh, o, False, True), ref, TOL[dtype], xh, zh, False)
        assert _rows_kernels(emu_structure) == (rows >= SMS, all_2d)
    # the row-range op on the same panels: shards sum to the full loss and gradient
    with emu_structure.schedule("reversed", block=block):
        parts = [rows_call(emu_structure.ops.structure_rows_fwd, xh, zh, a, b, o) for a, b in ((0, 161), (161, n))]
    for k in range(3):
        assert rel_err(parts[0][k] + parts[1][k], ref[k]) <= TOL[dtype]


def test_2d_and_fused_rows_agree(emu_structure, monkeypatch):
    """One 300-row panel (fused kernel only) and 5-row panels (2-D grids only, 2 column blocks): both match the
    oracle, and each other to fp64 rounding."""
    n = 300
    xh, zh = prepared(n, 7, 5, dtype=torch.float64, seed=22)
    o = opts(temperature=0.1, eps=1e-6)
    emu = emu_structure
    emu.reset_stats()
    one = call(emu.ops.structure_fwd, xh, zh, o)
    assert _rows_kernels(emu) == (True, set())
    force_panel_rows(monkeypatch, 5, n, True, True, torch.float64)
    emu.reset_stats()
    many = call(emu.ops.structure_fwd, xh, zh, o)
    assert _rows_kernels(emu)[0] is False
    ref = oracle(xh, zh, o)
    check_structure(one, ref, 1e-10, xh, zh)
    check_structure(many, ref, 1e-10, xh, zh)
    for a, b in zip(one, many, strict=True):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize(("o", "n"), [(opts(temperature=0.1), 300), (opts(similarity=1, divergence=1, gamma=1.5), 520)],
                         ids=["cos-n300", "rbf-js-n520"])  # fmt: skip
def test_2d_grid_order_independent(emu_structure, o, n, monkeypatch):
    """N = 300: 2 column blocks (160 + 140 columns); N = 520: 3 (192 + 192 + 136); 47-row panels (ragged last
    panel): bitwise equal outputs under every block and thread order (the column blocks' partials combine in a
    fixed order)."""
    xh, zh = prepared(n, 5, 9, seed=23)
    force_panel_rows(monkeypatch, 47, n, True, True, torch.float32)
    results = []
    for order, seed in (("inorder", 0), ("reversed", 0), ("shuffled", 3)):
        with emu_structure.schedule(order, seed=seed, block=64):
            results.append(call(emu_structure.ops.structure_fwd, xh, zh, o))
    for other in results[1:]:
        for u, v in zip(results[0], other, strict=True):
            assert torch.equal(u, v)
    check_structure(results[0], oracle(xh, zh, o), TOL[torch.float32], xh, zh)


def _model_kw(o):
    return dict(temperature=o["temperature"], similarity=("cosine", "rbf")[o["similarity"]], gamma=o["gamma"],
                divergence=("structure", "js")[o["divergence"]], eps=o["eps"])  # fmt: skip


HALF_CASES = [
    (torch.bfloat16, opts(temperature=0.1), 144),
    (torch.float16, opts(temperature=0.1), 37),
    (torch.bfloat16, opts(similarity=1, gamma=1.5, eps=1e-3), 37),
    (torch.float16, opts(divergence=1, temperature=0.2), 144),
]


@pytest.mark.parametrize(("dtype", "o", "rows"), HALF_CASES, ids=["bf16-cos", "f16-cos", "bf16-rbf", "f16-js"])
def test_half_level1_within_model(emu_structure, dtype, o, rows, monkeypatch):
    """bf16/fp16 inputs at level 1 (fused and 2-D panels): within the tolerance of the float64 model of the
    tensor-core path (tolerances.structure_half: exact Gram products, W rounded to the input dtype as the operand of
    both gradient GEMMs, fp32 accumulation, outputs cast), for both gradients and for z only."""
    n = 300
    xh, zh = prepared(n, 17, 5, dtype=dtype, seed=24)
    force_panel_rows(monkeypatch, rows, n, True, True, dtype)
    ref = oracle(xh, zh, o)
    tols = tolerances.structure_half(xh, zh, ref, dtype, **_model_kw(o))
    with emu_structure.schedule("shuffled", seed=6, block=96):
        out = call(emu_structure.ops.structure_fwd, xh, zh, o)
        check_structure(out, ref, tols, xh, zh)
        check_structure(call(emu_structure.ops.structure_fwd, xh, zh, o, False, True), ref, tols, xh, zh, False)


def _gemm_log(emu, xh, zh, o, grad_x=True):
    with AtenLog() as log:
        out = call(emu.ops.structure_fwd, xh, zh, o, grad_x, True)
    return out, log


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_gradient_accumulated_by_the_gemm(emu_structure, dtype, monkeypatch):
    """Per panel and side, two GEMMs accumulate into the gradient with beta = 1 and the whole scale as alpha
    (1/τ; fp16: 1/(τ·N·2⁹), W being stored as 2⁹·N·W); no other aten op touches an (N, d)-shaped tensor except
    the zero fill, the hinge's where and the final cast. Half inputs: the Gram GEMMs write fp32 panels, W is
    handed to the GEMMs in the input dtype, and only GEMM operands are widened (the emulation's stand-in for
    tensor cores: cuda_emu.h so_emu::mm_out / addmm_out)."""
    n, dx, dz, rows, tau = 37, 5, 17, 5, 0.1
    xh, zh = prepared(n, dx, dz, dtype=dtype, seed=25)
    force_panel_rows(monkeypatch, rows, n, True, True, dtype)
    o = opts(temperature=tau)
    out, log = _gemm_log(emu_structure, xh, zh, o)
    ref = oracle(xh, zh, o)
    tol = TOL[dtype] if dtype == torch.float32 else tolerances.structure_half(xh, zh, ref, dtype, temperature=tau)
    check_structure(out, ref, tol, xh, zh)
    panels = -(-n // rows)
    acc = log.find("addmm_") if dtype == torch.float32 else log.find("addmm", "out")
    assert len(acc) == 2 * 2 * panels  # two GEMMs per panel and side
    want_alpha = 1.0 / tau if dtype != torch.float16 else 1.0 / (tau * n * 512.0)
    for c in acc:
        assert c["kwargs"]["beta"] == 1.0 and c["kwargs"]["alpha"] == pytest.approx(want_alpha, rel=1e-12)
        grad = c["args"][0]
        assert grad[0] == torch.float32 and grad[1][1] in (dx, dz)  # fp32 accumulators of the gradient
        if dtype != torch.float32:
            assert c["kwargs"]["out"] == grad  # accumulates in place
    grams = log.find("mm", "out")
    assert len(grams) == 2 * panels and all(c["kwargs"]["out"][0] == torch.float32 for c in grams)
    if dtype != torch.float32:
        widened = [c["args"][0] for c in log.find("_to_copy") if c["kwargs"].get("dtype") == torch.float32]
        # what gets widened is a GEMM operand: a row block, the full X̂/Ẑ (Bᵀ of the Gram, B of W·B) or W (b × N)
        assert widened and all(d == dtype for d, _ in widened)
        assert {s for _, s in widened} >= {(rows, n), (n, dx), (n, dz)}
    shaped = {(n, dx), (n, dz)}
    others = [c for c in log.calls if c["op"] in ("mul", "mul_", "add", "add_", "div", "div_", "copy_", "addcmul_")
              and any(isinstance(a, tuple) and a[1] in shaped for a in c["args"])]  # fmt: skip
    assert not others, others


@pytest.mark.parametrize(
    ("free_rows", "knob_rows", "grad_x", "want"),
    [(40, None, False, 40), (100, None, False, 96), (40, 1000, False, 40), (300, 10, False, 10), (None, None, True, 300),
     (20, None, True, 20)],
    ids=["mem-40", "mem-100-mult16", "knob-above-mem", "knob-below-mem", "default-one-panel", "mem-20-both"],
)  # fmt: skip
def test_panels_sized_from_free_memory(emu_structure, free_rows, knob_rows, grad_x, want, monkeypatch):
    """The panel height follows the free device memory the (emulated) GPU reports: half of it, capped by
    STRUCTURE_OPS_CUDA_PANEL_MB when set (else 2048 MiB), a multiple of 16 from 64 rows on; counted from the Gram
    GEMMs (two per panel), with the expected height from cases.expected_panel_rows and, independently, by hand."""
    n = 300
    xh, zh = prepared(n, 5, 3, seed=26)
    bpr = panel_bytes_per_row(n, grad_x, True, torch.float32)
    free, knob = emulate_panel_memory(monkeypatch, bpr, free_rows, knob_rows)
    rows = expected_panel_rows(n, bpr, free_bytes=free, knob_mb=knob)
    assert rows == want
    o = opts(temperature=0.1)
    out, log = _gemm_log(emu_structure, xh, zh, o, grad_x)
    assert len(log.find("mm", "out")) == 2 * -(-n // rows)
    check_structure(out, oracle(xh, zh, o), TOL[torch.float32], xh, zh, grad_x)
