"""csrc/cuda/clip_cuda.cu, emulated on the CPU (README.md), against the float64 oracle and the C++ CPU op.

Shapes as the CUDA tests (N = 5…37, d = 3/17) plus N = 300 (two column tiles of 256, several row tiles per
panel), panels forced to 1–3 rows (STRUCTURE_OPS_CUDA_PANEL_MB), fp32/fp64/bf16/fp16, NaN/±inf inputs, a large
logit scale, and every block/thread order (bitwise-equal outputs).
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from . import tolerances
from .cases import F64, GRAD, AtenLog, clip_data, clip_oracle, emulate_panel_memory, expected_panel_rows
from .conftest import SCHEDULES, schedule_id

AWKWARD = [(5, 3), (13, 17), (37, 3), (37, 17), (300, 5)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "f64", "bf16", "f16"]
# fp32/fp64: the emulated GEMMs are IEEE (the CPU's), so the error is the kernels' own arithmetic. Half inputs:
# E is rounded to the input dtype for the two backward GEMMs (by design, see clip_cuda.cu) and the outputs are
# cast: tolerances.clip_half models both.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
HALF = (torch.bfloat16, torch.float16)
KEYS = ("loss", "grad_a", "grad_b", "grad_s")


def run(emu, a, b, s, grad=GRAD):
    loss, r, c = emu.ops.clip_fwd(a, b, s)
    g = torch.tensor(grad, dtype=a.dtype)
    da, db, ds = emu.ops.clip_bwd(g, a, b, s, r, c)
    return loss, r, c, da, db, ds


def cpu_run(a, b, s, grad=GRAD):
    ops = torch.ops.structure_ops
    loss, r, c = ops.clip_fwd(a, b, s)
    return (loss, r, c, *ops.clip_bwd(torch.tensor(grad, dtype=a.dtype), a, b, s, r, c))


# N = 300 runs with the default panel only (150 panels of 1–3 rows would take ~20 s)
PARAMS = [
    pytest.param(n, d, dt, SCHEDULES[(i + j) % 4], panels,
                 id=f"{n}x{d}-{DT_IDS[j]}-{schedule_id(SCHEDULES[(i + j) % 4])}-{panels}")
    for panels in ("default", "tiny") for i, (n, d) in enumerate(AWKWARD) for j, dt in enumerate(DTYPES)
    if not (panels == "tiny" and n == 300)
]  # fmt: skip


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize(("n", "d", "dtype", "sched", "panels"), PARAMS)
def test_matches_oracle_and_cpu_op(emu_clip, n, d, dtype, sched, panels, monkeypatch):
    if panels == "tiny":
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0005")  # 1–3 rows per panel, ragged last panel
    a64, b64 = clip_data(n, d)
    a, b = a64.to(dtype), b64.to(dtype)
    s = torch.tensor(7.3, dtype=dtype)
    emu_clip.reset_stats()
    with emu_clip.schedule(**sched, grid=3):
        loss, r, c, da, db, ds = run(emu_clip, a, b, s)
    assert emu_clip.stats()["launches"] > 0
    ref_l, ref_r, ref_c, ref_ga, ref_gb, ref_gs = clip_oracle(a, b, s)
    stat = F64 if dtype == F64 else torch.float32
    assert loss.shape == () and loss.dtype == dtype
    assert r.shape == (n,) and c.shape == (n,) and r.dtype == stat and c.dtype == stat
    assert da.dtype == dtype and db.dtype == dtype and da.shape == (n, d) and db.shape == (n, d)
    assert ds.shape == s.shape and ds.dtype == s.dtype
    stat_tol = 1e-12 if dtype == F64 else 1e-5  # fp32 statistics of exact (half) or fp32 products
    assert rel_err(r, ref_r) <= stat_tol and rel_err(c, ref_c) <= stat_tol
    # half inputs: the tolerances the GPU tests use, from the float64 model of the half path (checked here
    # against the kernels' own arithmetic); fp32/fp64: fixed IEEE tolerances
    t = tolerances.clip_half(a, b, s, GRAD, dtype) if dtype in HALF else dict.fromkeys(KEYS, TOL[dtype])
    outs = (rel_err(loss, ref_l), rel_err(da, ref_ga), rel_err(db, ref_gb), rel_err(ds, ref_gs))
    errs = dict(zip(KEYS, outs, strict=True))
    assert all(errs[k] <= t[k] for k in KEYS), (errs, t)
    cpu = cpu_run(a, b, s)
    for ours, cpp, key in zip((loss, r, c, da, db, ds), cpu, ("loss", None, None, *KEYS[1:]), strict=True):
        assert ours.dtype == cpp.dtype and ours.shape == cpp.shape
        assert rel_err(ours, cpp) <= (2 * t[key] if dtype in HALF and key else max(TOL.get(dtype, 1e-5), 1e-6))
    if dtype in HALF:  # logit_scale in fp32 with half inputs (ds stays fp32: only the fp32 floor applies)
        s32 = s.float()
        *_, ds32 = run(emu_clip, a, b, s32)
        assert ds32.dtype == torch.float32
        assert rel_err(ds32, clip_oracle(a, b, s32)[5]) <= tolerances.clip_half(a, b, s32, GRAD, dtype)["grad_s"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_order_independent(emu_clip, dtype, monkeypatch):
    """Every block/thread order, the generic kernels at 64 and at the host's block size, the grid-stride kernel
    at 1 and 5 blocks: bitwise-equal outputs within a block size."""
    monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.001")
    a64, b64 = clip_data(37, 17, seed=5)
    a, b, s = a64.to(dtype), b64.to(dtype), torch.tensor(5.0, dtype=dtype)
    for block, grid in ((None, None), (64, 1), (64, 5)):
        results = []
        for order, seed in (("inorder", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)):
            with emu_clip.schedule(order, seed=seed, block=block, grid=grid):
                results.append(run(emu_clip, a, b, s))
        for other in results[1:]:
            for u, v in zip(results[0], other, strict=True):
                assert torch.equal(u, v), (block, grid)


@pytest.mark.usefixtures("cpu_ext")
def test_non_finite_like_cpu(emu_clip):
    """NaN and ±inf inputs give the C++ CPU op's NaN/inf pattern in every output (statistics and gradients)."""
    a64, b64 = clip_data(13, 4, seed=6)
    for case in ("nan", "inf", "-inf", "text-nan"):
        a, b = a64.to(torch.float32).clone(), b64.to(torch.float32).clone()
        if case == "nan":
            a[3, 1] = float("nan")
        elif case == "text-nan":
            b[7, 0] = float("nan")
        else:
            a[5] = float(case)
        s = torch.tensor(3.0)
        with emu_clip.schedule("shuffled", seed=7):
            ours = run(emu_clip, a, b, s)
        cpp = cpu_run(a, b, s)
        for x, y in zip(ours, cpp, strict=True):
            assert torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf(), y.isinf()), (case, x, y)
            fin = x.isfinite()
            assert torch.allclose(x[fin], y[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_large_scale_and_scale_dtype(emu_clip, scale_shape):
    """logit_scale fp64 with fp32 inputs, shape () or (1,); s = 100 stresses the log-sum-exp shifts."""
    a64, b64 = clip_data(13, 17, seed=3)
    a, b = a64.to(torch.float32), b64.to(torch.float32)
    s = torch.full(scale_shape, 100.0, dtype=F64)
    loss, r, c, da, db, ds = run(emu_clip, a, b, s)
    ref_l, _, _, ref_ga, ref_gb, ref_gs = clip_oracle(a, b, s)
    assert ds.shape == scale_shape and ds.dtype == F64
    assert torch.isfinite(loss) and rel_err(loss, ref_l) <= 1e-5
    assert rel_err(da, ref_ga) <= 1e-5 and rel_err(db, ref_gb) <= 1e-5 and rel_err(ds.reshape(()), ref_gs) <= 1e-5


def test_input_checks(emu_clip):
    ops = emu_clip.ops
    a = torch.randn(5, 3)
    s = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="same number of rows"):
        ops.clip_fwd(a, torch.randn(4, 3), s)
    with pytest.raises(RuntimeError, match="same embedding width"):
        ops.clip_fwd(a, torch.randn(5, 4), s)
    with pytest.raises(RuntimeError, match="exactly one value"):
        ops.clip_fwd(a, a, torch.ones(2))
    _, r, c = ops.clip_fwd(a, a, s)
    with pytest.raises(RuntimeError, match="lse_row must hold N = 5"):
        ops.clip_bwd(torch.tensor(1.0), a, a, s, r[:4], c)


def _clip_bytes_per_row(n, dtype):
    """Panel bytes per row of clip_cuda.cu, restated: forward = the fp32 logits row, its share of the column
    partials (2 values per column per 64-row tile) and the row partials (2 per 256-column tile); backward = the
    fp32 logits row plus, for half inputs, the E row in the input dtype."""
    fwd = 4 * (n + -(-2 * n // 64) + 2 * -(-n // 256))
    bwd = 4 * n + (torch.empty((), dtype=dtype).element_size() * n if dtype in HALF else 0)
    return fwd, bwd


def _panel_heights(log, d):
    """Row counts of the panel GEMMs P_I = A_I Bᵀ (an A_I operand of width d) in call order."""
    return [c["args"][0][1][0] for c in log.find("mm", "out") if c["args"][0][1][1] == d]


@pytest.mark.parametrize(
    ("dtype", "free_rows", "knob_rows", "want"),
    [(torch.float32, 40, None, (40, 42)), (torch.float32, 100, None, (96, 96)), (torch.float32, None, None, (300, 300)),
     (torch.float32, None, 10, (10, 10)), (torch.float32, 40, 1000, (40, 42)), (torch.bfloat16, 40, None, (40, 28))],
    ids=["mem-40", "mem-100-mult16", "default-one-panel", "knob-below-mem", "knob-above-mem", "bf16-mem-40"],
)  # fmt: skip
def test_panels_sized_from_free_memory(emu_clip, dtype, free_rows, knob_rows, want, monkeypatch):
    """clip_fwd and clip_bwd size their panels by the CUDA level-1 rule (csrc/cuda/common.cuh
    panel_rows_from_memory): half of the free device memory the (emulated) GPU reports, capped by
    STRUCTURE_OPS_CUDA_PANEL_MB when set (else 2048 MiB), a multiple of 16 from 64 rows on. The heights are read
    from the panel GEMMs, expected from cases.expected_panel_rows (the structure tests' restatement of the rule)
    and, independently, by hand (N = 300: forward 1256 B per row, backward 1200 B fp32 / 1800 B bf16)."""
    n, d = 300, 5
    bf, bb = _clip_bytes_per_row(n, dtype)
    free, knob = emulate_panel_memory(monkeypatch, bf, free_rows, knob_rows)
    rows = tuple(expected_panel_rows(n, b, free_bytes=free, knob_mb=knob) for b in (bf, bb))
    assert rows == want
    a64, b64 = clip_data(n, d, seed=11)
    a, b, s = a64.to(dtype), b64.to(dtype), torch.tensor(4.0, dtype=dtype)
    with AtenLog() as log_f:
        loss, r, c = emu_clip.ops.clip_fwd(a, b, s)
    with AtenLog() as log_b:
        da, db, ds = emu_clip.ops.clip_bwd(torch.tensor(GRAD, dtype=dtype), a, b, s, r, c)
    for log, height in ((log_f, rows[0]), (log_b, rows[1])):
        full, last = divmod(n, height)
        assert _panel_heights(log, d) == [height] * full + ([last] if last else [])
    ref_l, _, _, ref_ga, ref_gb, ref_gs = clip_oracle(a, b, s)
    t = tolerances.clip_half(a, b, s, GRAD, dtype) if dtype in HALF else dict.fromkeys(KEYS, TOL[dtype])
    errs = dict(zip(KEYS, (rel_err(loss, ref_l), rel_err(da, ref_ga), rel_err(db, ref_gb), rel_err(ds, ref_gs)),
                    strict=True))  # fmt: skip
    assert all(errs[k] <= t[k] for k in KEYS), (errs, t)
