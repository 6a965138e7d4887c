"""Triton STRUCTURE kernels (structure_ops/_triton/structure.py) against the float64 oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py),
which is slow per program and per op: small awkward shapes (N = 7, 13, 37; d = 3, 5, 17), with the panel height
and the tile caps forced small so that every path runs several ragged row panels, ragged row blocks and a
column-block loop with a ragged last block. Expected values come from structure_ops.reference (float64, autograd
gradients) evaluated on the same rounded inputs, and from the C++ op for the return conventions.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from emulation import hardware as hw  # noqa: E402
from emulation import tolerances as TOL  # noqa: E402
from helpers import level_values, opts, oracle, rel_err, structured  # noqa: E402

from structure_ops import reference  # noqa: E402
from structure_ops._triton import structure as S  # noqa: E402

pytestmark = pytest.mark.triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FLASH_MOD = "structure_ops._triton.structure_flash"


def inputs(n, dx, dz, dtype=torch.float32, seed=0, device=DEV):
    """Normalized-and-centered X̂, Ẑ (prepared in float64, then rounded to ``dtype``)."""
    x, z = structured(n, dx, dz, seed=seed)
    xh, zh = reference.prepare(x), reference.prepare(z)
    return xh.to(device=device, dtype=dtype), zh.to(device=device, dtype=dtype)



def run(xh, zh, o, grad_x=True, grad_z=True, mode="rows"):
    return S.structure_fwd(
        xh, zh, o["levels"], o["temperature"], o["weighting"], o["margin"], o["similarity"], o["gamma"],
        o["divergence"], o["eps"], grad_x, grad_z, mode=mode,
    )  # fmt: skip




def check(out, ref, tol, xh, zh, grad_x=True):
    loss, gx, gz = out
    rl, rgx, rgz = ref
    assert loss.shape == () and loss.dtype == xh.dtype and loss.device == xh.device
    assert gz.shape == zh.shape and gz.dtype == zh.dtype and gz.is_contiguous()
    errs = {"loss": rel_err(loss, rl), "gz": rel_err(gz, rgz)}
    if grad_x:
        assert gx.shape == xh.shape and gx.dtype == xh.dtype and gx.is_contiguous()
        errs["gx"] = rel_err(gx, rgx)
    else:
        assert gx.shape == (0,) and gx.dtype == xh.dtype
    assert all(e <= tol for e in errs.values()), errs
    return errs


@pytest.fixture
def small_tiles(monkeypatch):
    """Row panels of 9 rows, row blocks of 4 and column blocks of 16 (N = 37: 5 panels, the last of 1 row, row
    blocks of 4, 4, 1; 3 column blocks, the last of 5 columns; the 1-D row grid)."""
    monkeypatch.setattr(S, "panel_rows", lambda n, bytes_per_row, budget_mb=None, device=None: min(n, 9))
    monkeypatch.setattr(S, "MAX_BLOCK_M", 4)
    monkeypatch.setattr(S, "MAX_BLOCK_N", 16)


# ---------------------------------------------------------------------------------------------------------------
# Level 1, row panels
# ---------------------------------------------------------------------------------------------------------------
L1_CASES = [
    dict(n=37, dx=17, dz=5, grad_x=True, o=opts()),
    dict(n=13, dx=3, dz=5, grad_x=False, o=opts(divergence=1, temperature=0.1)),
    dict(n=7, dx=5, dz=3, grad_x=True, o=opts(similarity=1, gamma=2.0, eps=1e-3)),
    dict(n=37, dx=5, dz=17, grad_x=True, o=opts(similarity=1, divergence=1, gamma=0.5)),
    dict(n=13, dx=17, dz=3, grad_x=True, o=opts(eps=1e-3, temperature=0.2)),
]


@pytest.mark.parametrize("case", L1_CASES, ids=lambda c: f"n{c['n']}-s{c['o']['similarity']}-d{c['o']['divergence']}")
def test_level1_fp32(case, small_tiles):
    xh, zh = inputs(case["n"], case["dx"], case["dz"])
    o = case["o"]
    check(run(xh, zh, o, case["grad_x"]), oracle(xh, zh, o), 1e-5, xh, zh, case["grad_x"])
    # An active margin: the value shifts, the gradient is unchanged.
    d1 = level_values(xh, zh, o)[0]
    om = opts(**{**o, "margin": 0.5 * d1})
    check(run(xh, zh, om, case["grad_x"]), oracle(xh, zh, om), 1e-5, xh, zh, case["grad_x"])


def test_level1_one_block_default_tiles():
    """The default tiles (whole row per block, whole panel per program under the interpreter)."""
    xh, zh = inputs(37, 5, 17, seed=3)
    o = opts(temperature=0.1)
    check(run(xh, zh, o), oracle(xh, zh, o), 1e-5, xh, zh)


# ---------------------------------------------------------------------------------------------------------------
# Levels > 1
# ---------------------------------------------------------------------------------------------------------------
ML_CASES = [
    dict(n=13, dx=5, dz=3, grad_x=True, margin="mid", o=opts(levels=2)),
    dict(n=37, dx=3, dz=17, grad_x=False, margin="mid", o=opts(levels=3, weighting=1, divergence=1, temperature=0.1)),
    dict(n=7, dx=17, dz=5, grad_x=True, margin=None, o=opts(levels=3, weighting=1, similarity=1, eps=1e-3)),
    dict(n=13, dx=5, dz=5, grad_x=True, margin="low", o=opts(levels=2, weighting=1, similarity=1, divergence=1)),
]


def pick_margin(xh, zh, o, how):
    if how is None:
        return o
    d = level_values(xh, zh, o)
    if how == "low":  # every level active
        return opts(**{**o, "margin": 0.5 * min(d)})
    # between the two smallest level values: at least one level clipped, at least one active
    lo, hi = sorted(d)[:2]
    margin = 0.5 * (lo + hi)
    assert any(v > margin for v in d) and any(v < margin for v in d)
    return opts(**{**o, "margin": margin})


@pytest.mark.parametrize(
    "case", ML_CASES, ids=lambda c: f"L{c['o']['levels']}-n{c['n']}-s{c['o']['similarity']}-d{c['o']['divergence']}"
)
def test_levels_fp32(case, small_tiles):
    xh, zh = inputs(case["n"], case["dx"], case["dz"], seed=1)
    o = pick_margin(xh, zh, case["o"], case["margin"])
    check(run(xh, zh, o, case["grad_x"]), oracle(xh, zh, o), 1e-5, xh, zh, case["grad_x"])


@pytest.mark.parametrize("levels", [1, 2])
def test_margin_clips_everything(levels):
    """A margin above every level's value: loss 0 and gradients exactly 0 (torch.relu's backward)."""
    xh, zh = inputs(13, 5, 3, seed=2)
    o = opts(levels=levels, weighting=1)
    o["margin"] = 2.0 * max(level_values(xh, zh, o))
    loss, gx, gz = run(xh, zh, o)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gz) == 0
    assert gx.shape == xh.shape and gz.shape == zh.shape


# ---------------------------------------------------------------------------------------------------------------
# Half and double precision
# ---------------------------------------------------------------------------------------------------------------
_SIM = {0: "cosine", 1: "rbf"}
_DIV = {0: "structure", 1: "js"}


def half_tolerances(xh, zh, o, ref, dtype, size="small"):
    """(loss, gx, gz) tolerances of level 1 with half inputs, from the float64 model of what the kernels do
    (tests/emulation/hardware.py): exact half products accumulated in fp32 (the Gram), fp32 softmax math, W cast to
    ``dtype`` as the gradient GEMMs' operand (a power-of-two scale does not change its relative rounding in the
    normal range), then each output cast to ``dtype``. Model error + output-cast error, times the safety factor;
    floor: the fp32 floor or the dtype's unit roundoff (a 0-dim loss is one rounding)."""
    fmt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    model = hw.level1_emulated(xh, zh, fmt, temperature=o["temperature"], similarity=_SIM[o["similarity"]],
                               gamma=o["gamma"], divergence=_DIV[o["divergence"]], eps=o["eps"], round_w=True)  # fmt: skip
    floor = max(TOL.FP32_FLOOR[size], TOL.unit_roundoff(dtype))
    return [hw.tolerance(hw.rel_err(m, r) + hw.half_cast_error(r, dtype), TOL.SAFETY, floor)
            for m, r in zip(model, ref, strict=True)]  # fmt: skip


@pytest.mark.parametrize(
    "dtype,o",
    [
        (torch.bfloat16, opts()),
        (torch.bfloat16, opts(divergence=1, temperature=0.1, margin=0.01)),
        (torch.float16, opts(similarity=1, eps=1e-3)),
        (torch.float16, opts(temperature=0.2)),
    ],
    ids=["bf16", "bf16-js", "fp16-rbf", "fp16"],
)
def test_level1_half_inputs(dtype, o, small_tiles, monkeypatch):
    """Half operands for both GEMMs (no upcast): error within the float64 model of the half path."""
    seen = []
    gram, gemm = S._gram_panel, S._grad_gemm
    monkeypatch.setattr(S, "_gram_panel", lambda u, *a: seen.append(u.dtype) or gram(u, *a))
    monkeypatch.setattr(S, "_grad_gemm", lambda a, b, *r: seen.extend((a.dtype, b.dtype)) or gemm(a, b, *r))
    xh, zh = inputs(37, 17, 5, dtype=dtype, seed=4)
    ref = oracle(xh, zh, o)
    check_each(run(xh, zh, o), ref, half_tolerances(xh, zh, o, ref, dtype), xh, zh)
    assert len(seen) == 5 * 2 + 5 * 4 * 2 and set(seen) == {dtype}  # 5 panels: 2 Gram, 4 GEMMs of 2 operands


def check_each(out, ref, tols, xh, zh):
    loss, gx, gz = out
    assert loss.dtype == xh.dtype and gx.dtype == xh.dtype and gz.dtype == zh.dtype
    assert gx.shape == xh.shape and gz.shape == zh.shape
    errs = [rel_err(a, r) for a, r in zip(out, ref, strict=True)]
    assert all(e <= t for e, t in zip(errs, tols, strict=True)), (errs, tols)


def test_levels_half_inputs(small_tiles):
    """Levels > 1 upcast half inputs once (the N × N powers are fp32): fp32 math, only the outputs are cast."""
    dtype = torch.bfloat16
    xh, zh = inputs(13, 17, 5, dtype=dtype, seed=4)
    o = opts(levels=2, weighting=1, divergence=1, temperature=0.1, margin=0.01)
    ref = oracle(xh, zh, o)
    check_each(run(xh, zh, o), ref, TOL.output_cast(ref, dtype), xh, zh)


def test_fp16_w_scale():
    """fp16_w_exp (active in the fp16 tests above: 2^5 at N = 37): ⌊log₂ N⌋, capped so that the W bound times 2^k keeps a bit of headroom below 65504."""
    assert S.fp16_w_exp(13, True, 1e-12) == 3  # js: bound 1, cap ⌊log₂ 32752⌋ = 14
    assert S.fp16_w_exp(1 << 20, True, 1e-12) == 14
    # structure, ε = 1e-12: T_max = log1p((1 + ε)/(4ε)) = 26.24, bound ½T_max + ½ + ¼Nε = 13.62 → cap 11
    assert S.fp16_w_exp(1 << 20, False, 1e-12) == 11
    assert S.fp16_w_exp(1 << 20, False, 1e-12) == math.floor(math.log2(32752 / (0.5 * math.log1p(1 / 4e-12) + 0.5)))


@pytest.fixture
def precision():
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("o", [opts(temperature=0.1), opts(similarity=1, divergence=1, gamma=0.5)], ids=["cos", "rbf-js"])
def test_level1_fp32_each_precision(o, precision):
    """fp32 inputs follow torch's matmul precision: "highest" IEEE (the fp32 floor), "high" and "medium" TF32 with
    RNA-rounded operands (both GEMMs): within the float64 TF32 model's error, and different from "highest"."""
    xh, zh = inputs(13, 17, 5, seed=16)
    ref = oracle(xh, zh, o)
    precision("highest")
    ieee = run(xh, zh, o)
    check(ieee, ref, 1e-5, xh, zh)
    tols = TOL.structure_tf32(xh, zh, ref, temperature=o["temperature"], similarity=_SIM[o["similarity"]],
                              gamma=o["gamma"], divergence=_DIV[o["divergence"]], eps=o["eps"],
                              floor=TOL.FP32_FLOOR["small"])  # fmt: skip
    for mode in ("high", "medium"):
        precision(mode)
        out = run(xh, zh, o)
        check_each(out, ref, tols, xh, zh)
        assert not torch.equal(out[2], ieee[2]), mode


# ---------------------------------------------------------------------------------------------------------------
# Panels from free memory, the 2-D grid
# ---------------------------------------------------------------------------------------------------------------
def test_panel_rows_budget(monkeypatch):
    from structure_ops._triton import _common as C

    bpr = 3000
    monkeypatch.delenv("STRUCTURE_OPS_TRITON_PANEL_MB", raising=False)
    assert C.panel_rows(10**6, bpr) == (256 << 20) // bpr  # no device: 256 MiB
    assert C.panel_rows(10**6, bpr, device="cpu") == (256 << 20) // bpr
    # on a device: half the free memory, capped at 2048 MiB by default (as STRUCTURE_OPS_CUDA_PANEL_MB's default)
    assert C.PANEL_FREE_FRACTION == 0.5 and C.PANEL_CAP_MB == 2048
    monkeypatch.setattr(C, "free_device_bytes", lambda device: 2 << 30)  # 1 GiB < the cap: free memory binds
    assert C.panel_rows(10**7, bpr, device="cuda") == (1 << 30) // bpr
    monkeypatch.setattr(C, "free_device_bytes", lambda device: 141 << 30)  # an H200: the 2 GiB cap binds
    assert C.panel_rows(10**7, bpr, device="cuda") == (2048 << 20) // bpr
    monkeypatch.setenv("STRUCTURE_OPS_TRITON_PANEL_MB", "8192")  # the knob replaces the default cap (up or down)
    assert C.panel_rows(10**7, bpr, device="cuda") == (8192 << 20) // bpr
    monkeypatch.setattr(C, "free_device_bytes", lambda device: 8 << 30)
    monkeypatch.setenv("STRUCTURE_OPS_TRITON_PANEL_MB", "16")  # the knob caps the free-memory budget
    assert C.panel_rows(10**7, bpr, device="cuda") == (16 << 20) // bpr
    monkeypatch.setattr(C, "free_device_bytes", lambda device: 1 << 20)  # ... and never raises it
    assert C.panel_rows(10**7, bpr, device="cuda") == int(C.PANEL_FREE_FRACTION * (1 << 20)) // bpr
    assert C.panel_rows(5, bpr, device="cuda") == 5 and C.panel_rows(10, 1 << 30, device="cuda") == 1


def test_panels_follow_free_memory(monkeypatch):
    """structure_fwd sizes its panels from the inputs' device's free memory (here a faked 5-row budget)."""
    from structure_ops._triton import _common as C

    n = 37
    bpr = S._panel_bytes_per_row(n, 4, 4, 2)
    monkeypatch.setattr(C, "free_device_bytes", lambda device: int(5.5 * bpr / C.PANEL_FREE_FRACTION))
    heights = []
    orig = S._gram_panel
    monkeypatch.setattr(S, "_gram_panel", lambda u, r0, b, *a: heights.append(b) or orig(u, r0, b, *a))
    xh, zh = inputs(n, 5, 3, seed=17)
    o = opts()
    check(run(xh, zh, o), oracle(xh, zh, o), 1e-5, xh, zh)
    assert heights[::2] == [5] * 7 + [2]


@pytest.mark.parametrize(
    "o,grad_x",
    [(opts(), True), (opts(similarity=1, divergence=1, gamma=0.5), True), (opts(levels=2, margin=0.0), False)],
    ids=["cos", "rbf-js", "L2"],
)
def test_two_d_grid_ragged_panels(o, grad_x, monkeypatch):
    """Panels of 7 rows (forced by STRUCTURE_OPS_TRITON_PANEL_MB; the last of 2 rows) in row blocks of 4 have fewer
    row blocks than the (interpreter's 4) SMs: the row kernels split the columns over a 2-D grid (3 chunks of 16,
    the last of 5 columns). Oracle parity, and the same bits on a second run (fixed-order combine)."""
    n = 37
    monkeypatch.setattr(S, "MAX_BLOCK_M", 4)
    monkeypatch.setattr(S, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(S, "INTERPRET_SMS", 4)
    sides = 1 + int(grad_x) if o["levels"] == 1 else 0
    bpr = S._panel_bytes_per_row(n, 4, 4, sides)
    monkeypatch.setenv("STRUCTURE_OPS_TRITON_PANEL_MB", repr(7.5 * bpr / (1 << 20)))
    grids = []
    orig = S.row_grid
    monkeypatch.setattr(S, "row_grid", lambda *a: grids.append(orig(*a)) or grids[-1])
    xh, zh = inputs(n, 17, 5, seed=18)
    out = run(xh, zh, o, grad_x)
    check(out, oracle(xh, zh, o), 1e-5, xh, zh, grad_x)
    assert [g for (g, _) in grids] == [(2, 3)] * 5 + [(1, 3)] and {c for (_, c) in grids} == {16}
    again = run(xh, zh, o, grad_x)
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b)


def test_row_grid_rule():
    # ≥ SMs row blocks: one chunk of all columns; fewer: about 2·SMs programs, chunks a multiple of BLOCK_N.
    assert S.row_grid(300, 10_000, 1, 1024, 132) == ((300, 1), 10 * 1024)
    assert S.row_grid(85, 262_144, 1, 1024, 132) == ((85, 4), 64 * 1024)  # 340 ≥ 2·132 programs
    assert S.row_grid(5, 37, 4, 16, 4) == ((2, 3), 16)
    assert S.row_grid(1, 100, 1, 1024, 132) == ((1, 1), 1024)


@pytest.mark.parametrize(
    "o",
    [opts(eps=1e-3), opts(levels=3, weighting=1, similarity=1, divergence=1, margin="mid")],
    ids=["L1", "L3-rbf-js"],
)
def test_fp64(o, small_tiles):
    xh, zh = inputs(37, 5, 17, dtype=torch.float64, seed=5)
    if o["margin"] == "mid":
        o = pick_margin(xh, zh, opts(**{**o, "margin": 0.0}), "mid")
    check(run(xh, zh, o), oracle(xh, zh, o), 1e-10, xh, zh)


# ---------------------------------------------------------------------------------------------------------------
# The C++ op's contract
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,o,flags",
    [
        (torch.float64, opts(levels=2, weighting=1, margin=0.05, divergence=1), (True, True)),
        (torch.float32, opts(similarity=1), (False, True)),
        (torch.float32, opts(levels=2), (True, False)),
        (torch.bfloat16, opts(), (False, False)),
    ],
    ids=["f64-L2", "f32-rbf-gz", "f32-L2-gx", "bf16-none"],
)
def test_matches_cpu_op(dtype, o, flags, cpu_ext):
    """Same dtypes, shapes, empty (0,) tensors for gradients not asked for, and values as torch.ops.structure_fwd."""
    xh, zh = inputs(13, 5, 3, dtype=dtype, seed=6)
    args = (o["levels"], o["temperature"], o["weighting"], o["margin"], o["similarity"], o["gamma"],
            o["divergence"], o["eps"], *flags)  # fmt: skip
    ours = S.structure_fwd(xh, zh, *args)
    ref = torch.ops.structure_ops.structure_fwd(xh.cpu(), zh.cpu(), *args)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_err(a.cpu(), b) <= tol


def test_noncontiguous_inputs_and_no_grads():
    xh, zh = inputs(13, 5, 3, seed=7)
    o = opts(levels=2)
    ref = run(xh, zh, o)
    xt, zt = xh.T.contiguous().T, zh.T.contiguous().T  # same values, column-major
    assert not xt.is_contiguous()
    out = run(xt, zt, o)
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    loss, gx, gz = run(xh, zh, o, grad_x=False, grad_z=False)
    assert gx.shape == (0,) and gz.shape == (0,)
    assert rel_err(loss, ref[0]) <= 1e-6


def test_nan_propagates():
    xh, zh = inputs(7, 3, 3, seed=8)
    zh[2, 1] = float("nan")
    for levels in (1, 2):
        loss, _, gz = run(xh, zh, opts(levels=levels, margin=0.1))
        assert torch.isnan(loss) and torch.isnan(gz).any()


def test_input_checks():
    xh, zh = inputs(7, 3, 3)
    with pytest.raises(RuntimeError, match="levels must be >= 1"):
        run(xh, zh, opts(levels=0))
    with pytest.raises(RuntimeError, match="mode must be one of"):
        run(xh, zh, opts(), mode="tiles")
    with pytest.raises(RuntimeError, match="same dtype"):
        run(xh, zh.double(), opts())
    with pytest.raises(RuntimeError, match="same number of rows"):
        run(xh, zh[:5], opts())
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        run(xh, zh, opts(eps=0.0))
    with pytest.raises(RuntimeError, match="unknown divergence code"):
        run(xh, zh, opts(divergence=2))


# ---------------------------------------------------------------------------------------------------------------
# Levels > 1: the memory estimate
# ---------------------------------------------------------------------------------------------------------------
def test_multilevel_memory_error(monkeypatch):
    xh, zh = inputs(13, 5, 3)
    monkeypatch.setattr(S, "_available_memory", lambda device: (1000, "the test's 1000 bytes"))
    with pytest.raises(RuntimeError, match=r"levels=2 materializes about 0\.00 GiB .* N=13, more than the test's 1000"):
        run(xh, zh, opts(levels=2))
    loss, _, _ = run(xh, zh, opts(levels=1))  # level 1 is row panels: not limited
    assert torch.isfinite(loss)
    # P, Q, 2L per side with a gradient, 2 per side without, one transient.
    assert S.multilevel_memory_estimate(1000, 3, 4, False, True) == (2 + 2 + 6 + 1) * 1000 * 1000 * 4
    assert S.multilevel_memory_estimate(1000, 3, 8, True, True) == (2 + 6 + 6 + 1) * 1000 * 1000 * 8
    monkeypatch.undo()
    avail, what = S._available_memory(xh.device)  # the real probe
    assert avail > 0 and "GiB" in what


# ---------------------------------------------------------------------------------------------------------------
# mode="flash" / "auto": structure_flash's contract, the margin applied on top
# ---------------------------------------------------------------------------------------------------------------
def _flash_stub(calls):
    mod = types.ModuleType(FLASH_MOD)

    def structure_level1_flash(xh, zh, temperature, similarity, gamma, divergence, eps, grad_x, grad_z):
        calls.append((temperature, similarity, gamma, divergence, eps, grad_x, grad_z))
        d, gx, gz = oracle(xh, zh, opts(temperature=temperature, similarity=similarity, gamma=gamma,
                                        divergence=divergence, eps=eps))  # fmt: skip
        empty = xh.new_empty((0,))
        return (d.float(), gx.to(xh.dtype) if grad_x else empty, gz.to(zh.dtype) if grad_z else empty)

    mod.structure_level1_flash = structure_level1_flash
    return mod


def _raising_stub():
    mod = types.ModuleType(FLASH_MOD)

    def structure_level1_flash(*args, **kwargs):
        raise NotImplementedError("stub: not for these options")

    mod.structure_level1_flash = structure_level1_flash
    return mod


def test_flash_mode_applies_margin(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, FLASH_MOD, _flash_stub(calls))
    xh, zh = inputs(13, 5, 3, seed=9)
    o = opts(temperature=0.1, similarity=1, gamma=0.7, divergence=1, eps=1e-6)
    d1 = level_values(xh, zh, o)[0]
    om = opts(**{**o, "margin": 0.5 * d1})
    check(run(xh, zh, om, grad_x=False, mode="flash"), oracle(xh, zh, om), 1e-6, xh, zh, grad_x=False)
    assert calls[-1] == (0.1, 1, 0.7, 1, 1e-6, False, True)
    oc = opts(**{**o, "margin": 2.0 * d1})
    loss, gx, gz = run(xh, zh, oc, mode="flash")
    assert loss.item() == 0.0 and torch.count_nonzero(gx) == 0 and torch.count_nonzero(gz) == 0


@pytest.mark.parametrize("stub", ["raises", "missing"])
def test_flash_unavailable(monkeypatch, stub):
    monkeypatch.setitem(sys.modules, FLASH_MOD, _raising_stub() if stub == "raises" else None)
    xh, zh = inputs(13, 5, 3, seed=10)
    o = opts(margin=0.01)
    with pytest.raises(RuntimeError, match="mode='flash' is unavailable"):
        run(xh, zh, o, mode="flash")
    monkeypatch.setattr(S, "choose_mode", lambda n, dx, dz, dtype: "flash")
    out = run(xh, zh, o, mode="auto")  # falls back to rows
    for a, b in zip(out, run(xh, zh, o, mode="rows"), strict=True):
        assert torch.equal(a, b)


def test_flash_real_matches_rows():
    """The real structure_flash module (pass b) under the same margin gate, when it is present."""
    try:
        from structure_ops._triton.structure_flash import structure_level1_flash  # noqa: F401
    except ImportError:
        pytest.skip("structure_flash is not available")
    xh, zh = inputs(13, 5, 3, seed=11)
    o = opts(temperature=0.1, margin=0.05)
    check(run(xh, zh, o, mode="flash"), oracle(xh, zh, o), 1e-5, xh, zh)


# ---------------------------------------------------------------------------------------------------------------
# GPU: realistic sizes against the float64 oracle
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _ieee_fp32(self):
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        yield
        torch.set_float32_matmul_precision(old)

    @pytest.mark.parametrize(
        "dtype,o,tol",
        [
            (torch.float32, opts(), 1e-4),
            (torch.float32, opts(divergence=1, margin=0.01), 1e-4),
            (torch.float32, opts(similarity=1, gamma=2.0), 1e-4),
            (torch.bfloat16, opts(temperature=0.1), None),
            (torch.float16, opts(temperature=0.1), None),
        ],
        ids=["f32-structure", "f32-js", "f32-rbf", "bf16", "fp16"],
    )
    def test_level1_n4096(self, dtype, o, tol):
        """Half inputs: tensor-core GEMMs, tolerance from the float64 model of the half path (fp16: W scaled by
        2^11 before its cast)."""
        xh, zh = inputs(4096, 768, 512, dtype=dtype, seed=12, device="cuda")
        ref = oracle(xh, zh, o)
        if tol is None:
            check_each(run(xh, zh, o), ref, half_tolerances(xh, zh, o, ref, dtype, "realistic"), xh, zh)
        else:
            check(run(xh, zh, o), ref, tol, xh, zh)

    def test_levels_n4096(self):
        xh, zh = inputs(4096, 768, 512, seed=13, device="cuda")
        o = opts(levels=3, weighting=1, temperature=0.1)
        check(run(xh, zh, o), oracle(xh, zh, o), 1e-4, xh, zh)

    def test_panels_n4096(self, monkeypatch):
        """Several row panels at a realistic size, capped by the knob: 4 MiB → 56-row panels (the last of 8 rows),
        fewer rows than SMs: the 2-D row grid."""
        monkeypatch.setenv("STRUCTURE_OPS_TRITON_PANEL_MB", "4")
        xh, zh = inputs(4096, 512, 768, seed=14, device="cuda")
        o = opts(margin=0.01)
        check(run(xh, zh, o), oracle(xh, zh, o), 1e-4, xh, zh)
