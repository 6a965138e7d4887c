"""Level-1 flash pass (structure_ops/_triton/structure_flash.py) against the float64 oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel module is imported). The interpreter pays per program and per op, so the shapes are small but
awkward: N = 7, 13, 37 with 16- or 32-row blocks that do not divide N, d = 3, 5, 17 with 16-wide contraction and
gradient chunks (d = 17 spans two of each). Expected values come from ``structure_ops.reference`` in float64:
the value from ``structure_core(levels=1, margin=0)``, the gradients from autograd through it. The GPU class at
the end runs realistic sizes and is skipped without CUDA.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from emulation import hardware as hw
from helpers import F64, rel_err, structured

pytest.importorskip("triton")

from structure_ops import reference as R  # noqa: E402
from structure_ops._triton import structure_flash as SF  # noqa: E402

pytestmark = pytest.mark.triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs a GPU or the Triton interpreter")

SIM = {"cosine": SF.COSINE, "rbf": SF.RBF}
DIV = {"structure": SF.STRUCTURE, "js": SF.JS}
SMALL = dict(block_m=16, block_n=16, block_k=16, block_d=16)  # blocks that divide none of the test N


def _inputs(n, dx, dz, seed=0, dtype=F64):
    """Normalized-and-centered structured inputs (fp64), rounded to ``dtype`` and back when it is lower."""
    x, z = structured(n, dx, dz, seed=seed)
    xh, zh = R.prepare(x), R.prepare(z)
    return xh.to(dtype).to(F64), zh.to(dtype).to(F64)


def _oracle(xh, zh, *, tau, sim, div, eps, gamma):
    """D and (∂D/∂X̂, ∂D/∂Ẑ) by float64 autograd through reference.structure_core (levels=1, margin=0)."""
    xr = xh.detach().clone().requires_grad_(True)
    zr = zh.detach().clone().requires_grad_(True)
    d = R.structure_core(
        xr, zr, levels=1, margin=0.0, temperature=tau, similarity_kind=sim, divergence=div, eps=eps, gamma=gamma
    )
    gx, gz = torch.autograd.grad(d, (xr, zr))
    return d.detach(), gx, gz


def _flash(xh, zh, dtype, *, tau, sim, div, eps, gamma, grad_x=True, grad_z=True, **blocks):
    return SF.structure_level1_flash(
        xh.to(dtype).to(DEV), zh.to(dtype).to(DEV), tau, SIM[sim], gamma, DIV[div], eps, grad_x, grad_z, **blocks
    )


def _check(out, ref, tol, what):
    err = rel_err(out.cpu(), ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


# ---------------------------------------------------------------------------------------------------
# fp32 vs the float64 oracle: values and gradients, every option, awkward shapes
# ---------------------------------------------------------------------------------------------------
SHAPES = [
    # (N, d_x, d_z, blocks)
    pytest.param(7, 5, 3, SMALL, id="N7-dx5-dz3"),
    pytest.param(13, 17, 5, SMALL, id="N13-dx17-dz5"),  # d_x spans two K chunks and two gradient chunks
    pytest.param(37, 3, 17, SMALL, id="N37-dx3-dz17"),  # 3 × 3 tiles, ragged last tile, dz > one chunk
    pytest.param(37, 17, 17, dict(block_m=32, block_n=16, block_k=16, block_d=16), id="N37-rect-blocks"),
]


@needs_kernels
@pytest.mark.parametrize(("n", "dx", "dz", "blocks"), SHAPES)
@pytest.mark.parametrize("sim", ["cosine", "rbf"])
@pytest.mark.parametrize("div", ["structure", "js"])
def test_fp32_matches_oracle(n, dx, dz, blocks, sim, div):
    tau, gamma = (0.05, 1.0) if sim == "cosine" else (1.0, 2.5)
    xh, zh = _inputs(n, dx, dz, seed=n + dx)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=tau, sim=sim, div=div, eps=1e-12, gamma=gamma)
    d, gx, gz = _flash(xh, zh, torch.float32, tau=tau, sim=sim, div=div, eps=1e-12, gamma=gamma, **blocks)
    assert d.shape == () and d.dtype == torch.float32
    assert gx.shape == (n, dx) and gz.shape == (n, dz) and gx.dtype == gz.dtype == torch.float32
    assert gx.is_contiguous() and gz.is_contiguous()
    assert abs(d.item() - ref_d.item()) <= 1e-5 * abs(ref_d.item()), (d.item(), ref_d.item())
    _check(gz, ref_gz, 2e-5, "dZ")
    _check(gx, ref_gx, 2e-5, "dX")
    # elementwise too: no entry may hide behind a good norm
    torch.testing.assert_close(gz.cpu().double(), ref_gz, rtol=0, atol=2e-5 * ref_gz.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("sim", ["cosine", "rbf"])
@pytest.mark.parametrize("eps", [1e-12, 1e-3, 0.05])
def test_fp32_eps_exact(sim, eps):
    # With τ = 0.05 most probabilities are far below any of these ε, so ε changes the value and the gradient:
    # the kernel must apply it entry by entry exactly as the oracle does.
    n, dx, dz = 37, 5, 17
    tau, gamma = (0.05, 1.0) if sim == "cosine" else (1.0, 4.0)
    xh, zh = _inputs(n, dx, dz, seed=3)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=tau, sim=sim, div="structure", eps=eps, gamma=gamma)
    d, gx, gz = _flash(xh, zh, torch.float32, tau=tau, sim=sim, div="structure", eps=eps, gamma=gamma, **SMALL)
    assert abs(d.item() - ref_d.item()) <= 1e-5 * abs(ref_d.item())
    _check(gz, ref_gz, 2e-5, "dZ")
    _check(gx, ref_gx, 2e-5, "dX")
    if eps != 1e-12:  # the test can tell ε apart: a kernel ignoring it would be caught
        other, _, _ = _oracle(xh, zh, tau=tau, sim=sim, div="structure", eps=1e-12, gamma=gamma)
        assert abs(other.item() - ref_d.item()) > 1e-3 * abs(ref_d.item())


@needs_kernels
@pytest.mark.parametrize(("grad_x", "grad_z"), [(False, True), (True, False), (False, False)])
def test_gradient_flags(grad_x, grad_z):
    n, dx, dz = 13, 5, 17
    xh, zh = _inputs(n, dx, dz, seed=5)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=0.1, sim="cosine", div="structure", eps=1e-12, gamma=1.0)
    d, gx, gz = _flash(
        xh, zh, torch.float32, tau=0.1, sim="cosine", div="structure", eps=1e-12, gamma=1.0,
        grad_x=grad_x, grad_z=grad_z, **SMALL,
    )  # fmt: skip
    assert abs(d.item() - ref_d.item()) <= 1e-5 * abs(ref_d.item())
    for flag, g, ref, d_ in ((grad_x, gx, ref_gx, dx), (grad_z, gz, ref_gz, dz)):
        if flag:
            assert g.shape == (n, d_)
            _check(g, ref, 2e-5, "gradient")
        else:
            assert g.shape == (0,) and g.dtype == torch.float32


@needs_kernels
def test_default_blocks_and_noncontiguous_inputs():
    # Non-contiguous views of X̂, Ẑ (column-major storage) and the host's default launch parameters.
    n, dx, dz = 37, 17, 5
    xh, zh = _inputs(n, dx, dz, seed=7)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=0.2, sim="cosine", div="js", eps=1e-12, gamma=1.0)
    xs = xh.float().t().contiguous().t().to(DEV)
    zs = zh.float().t().contiguous().t().to(DEV)
    assert not xs.is_contiguous()
    d, gx, gz = SF.structure_level1_flash(xs, zs, 0.2, SF.COSINE, 1.0, SF.JS, 1e-12, True, True)
    assert abs(d.item() - ref_d.item()) <= 1e-5 * abs(ref_d.item())
    assert gx.is_contiguous() and gz.is_contiguous()
    _check(gz, ref_gz, 2e-5, "dZ")
    _check(gx, ref_gx, 2e-5, "dX")


@needs_kernels
def test_identical_inputs_give_zero_and_deterministic():
    # R_S(X, X) = 0 exactly (SPEC invariance: every bracket is log1p(0)); the gradient Q∘(g − ḡ) is zero up to
    # the rounding of Σ_j Q_ij = 1. Two runs are bitwise identical (no atomics).
    xh, _ = _inputs(13, 5, 5, seed=11)
    x32 = xh.float().to(DEV)
    d, gx, gz = SF.structure_level1_flash(x32, x32, 0.05, SF.COSINE, 1.0, SF.STRUCTURE, 1e-12, True, True, **SMALL)
    assert d.item() == 0.0
    assert gz.abs().max().item() <= 1e-5 and gx.abs().max().item() <= 1e-5
    _, zh = _inputs(13, 5, 17, seed=11)
    z32 = zh.float().to(DEV)
    a = SF.structure_level1_flash(x32, z32, 0.05, SF.RBF, 2.0, SF.JS, 1e-12, True, True, **SMALL)
    b = SF.structure_level1_flash(x32, z32, 0.05, SF.RBF, 2.0, SF.JS, 1e-12, True, True, **SMALL)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@needs_kernels
@pytest.mark.parametrize("sim", ["cosine", "rbf"])
def test_fp32_near_identical_inputs_stable(sim):
    # Z = X + 1e-3 noise: D ~ 1e-6 (cosine) / 1e-8 (rbf). The literal 2 log M̃ − log P̃ − log Q̃ cancels to ~15 %
    # error here (SPEC numerical facts) and log(1 + x) instead of log1p to ~100 %; the stable bracket keeps fp32
    # within the rounding of the logits. (The "js" softplus form shares the CPU path's fp32 floor of ~1e-8
    # absolute on D, so it is not held to a relative bound at such tiny values.)
    x, _ = structured(37, 17, 17, seed=4)
    g = torch.Generator().manual_seed(0)
    z = x + 1e-3 * torch.randn(x.shape, generator=g, dtype=F64)
    xh, zh = R.prepare(x).float().to(F64), R.prepare(z).float().to(F64)  # exact in fp32
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=0.05, sim=sim, div="structure", eps=1e-12, gamma=3.0)
    d, gx, gz = _flash(xh, zh, torch.float32, tau=0.05, sim=sim, div="structure", eps=1e-12, gamma=3.0, **SMALL)
    assert abs(d.item() - ref_d.item()) <= 1e-3 * abs(ref_d.item()), (d.item(), ref_d.item())
    _check(gz, ref_gz, 1e-2, "dZ")
    _check(gx, ref_gx, 1e-2, "dX")


# ---------------------------------------------------------------------------------------------------
# bf16 / fp16: the oracle runs on the low-precision-rounded inputs; W is rounded to the operand dtype for the
# second GEMM and the gradient is returned in the input dtype, hence the looser gradient tolerance.
# ---------------------------------------------------------------------------------------------------
LOW = [
    pytest.param(torch.bfloat16, 37, 5, 17, "cosine", "structure", 3e-2, id="bf16-cos-structure"),
    pytest.param(torch.bfloat16, 13, 17, 3, "rbf", "js", 3e-2, id="bf16-rbf-js"),
    pytest.param(torch.bfloat16, 37, 17, 5, "rbf", "structure", 3e-2, id="bf16-rbf-structure"),
    pytest.param(torch.float16, 37, 3, 17, "cosine", "js", 3e-3, id="fp16-cos-js"),
]


@needs_kernels
@pytest.mark.parametrize(("dtype", "n", "dx", "dz", "sim", "div", "gtol"), LOW)
def test_low_precision_matches_oracle(dtype, n, dx, dz, sim, div, gtol):
    tau, gamma = (0.1, 1.0) if sim == "cosine" else (1.0, 2.0)
    xh, zh = _inputs(n, dx, dz, seed=2, dtype=dtype)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=tau, sim=sim, div=div, eps=1e-12, gamma=gamma)
    d, gx, gz = _flash(xh, zh, dtype, tau=tau, sim=sim, div=div, eps=1e-12, gamma=gamma, **SMALL)
    assert d.dtype == torch.float32 and gx.dtype == gz.dtype == dtype
    # The value is computed in fp32 from exactly representable products: fp32-level agreement.
    assert abs(d.item() - ref_d.item()) <= 1e-5 * abs(ref_d.item()), (d.item(), ref_d.item())
    _check(gz, ref_gz, gtol, "dZ")
    _check(gx, ref_gx, gtol, "dX")


# ---------------------------------------------------------------------------------------------------
# The autotune spaces: oracle parity for EVERY config (forced with STRUCTURE_OPS_AUTOTUNE_FORCE), both operand modes
# ---------------------------------------------------------------------------------------------------
SPACE_SIZE = max(len(SF.LSE_SPACE.configs), len(SF.LOSS_SPACE.configs), len(SF.GRAD_SPACE.configs))


def _force(monkeypatch, i):
    """Force config i (mod each space's size) of all three spaces; returns the forced configs."""
    from structure_ops._triton._common import AUTOTUNE_FORCE_ENV

    picked = {sp: sp.configs[i % len(sp.configs)] for sp in (SF.LSE_SPACE, SF.LOSS_SPACE, SF.GRAD_SPACE)}
    monkeypatch.setenv(AUTOTUNE_FORCE_ENV, ",".join(f"{sp.name}:{i % len(sp.configs)}" for sp in picked))
    return picked


@needs_kernels
@pytest.mark.parametrize("i", range(SPACE_SIZE))
def test_every_space_config_matches_oracle(monkeypatch, i):
    # N = 70: one ragged 128-block or a full and a ragged 64-block per dimension. Each config runs twice: fp32 and a
    # half type, one with the row operand resident (max d ≤ RESIDENT_K) and one chunked (d spans 3 BLOCK_K chunks),
    # the modes swapped between odd and even i so that every config meets both; similarity and divergence rotate.
    # (Small widths on the other side: the interpreter's cost is per program and op.)
    from structure_ops._triton._common import autotune_cache, clear_autotune_cache

    picked = _force(monkeypatch, i)
    n = 70
    half = (torch.bfloat16, torch.float16)[(i // 2) % 2]
    fp32_resident = i % 2 == 0
    runs = [
        (torch.float32, (24, 40) if fp32_resident else (70, 9), 2e-5, 1e-5),
        (half, (130, 9) if fp32_resident else (24, 40), 3e-2 if half == torch.bfloat16 else 3e-3, 1e-5),
    ]
    sim, div = ("cosine", "rbf")[i % 2], ("structure", "js", "js", "structure")[i % 4]
    tau, gamma = (0.1, 1.0) if sim == "cosine" else (1.0, 2.0)
    for dtype, (dx, dz), gtol, dtol in runs:
        res, bk = SF.operand_mode(dx, dz, dtype)
        assert res == (max(dx, dz) <= bk) and (res or -(-max(dx, dz) // bk) >= 3)
        xh, zh = _inputs(n, dx, dz, seed=i, dtype=dtype)
        ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=tau, sim=sim, div=div, eps=1e-12, gamma=gamma)
        clear_autotune_cache()
        d, gx, gz = _flash(xh, zh, dtype, tau=tau, sim=sim, div=div, eps=1e-12, gamma=gamma)
        what = f"config {i} {dtype} d=({dx},{dz}) {'resident' if res else 'chunked'} {sim}/{div}"
        assert abs(d.item() - ref_d.item()) <= dtol * abs(ref_d.item()), (what, d.item(), ref_d.item())
        _check(gz, ref_gz, gtol, f"dZ, {what}")
        _check(gx, ref_gx, gtol, f"dX, {what}")
        # the launches used the forced configs (the choices are recorded)
        used = {name: {r["config"] for r in recs.values()} for name, recs in autotune_cache().items()}
        for sp, cfg in picked.items():
            assert used[sp.name] == {cfg.name}, (sp.name, used[sp.name], cfg.name)


def test_spaces_hold_the_tiles_and_heuristics_are_candidates():
    # ≥ 128 × 128 tiles in every space, 4 and 8 warps; the heuristic choice of every key is a candidate (allowed,
    # within sm_90 shared memory), and without benchmarking launch_config returns exactly it.
    for sp in (SF.LSE_SPACE, SF.LOSS_SPACE, SF.GRAD_SPACE):
        tiles = {(c["BLOCK_M"], c["BLOCK_N"]) for c in sp.configs}
        assert (128, 128) in tiles and (64, 64) in tiles, sp.name
        assert {c.num_warps for c in sp.configs} == {4, 8}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for prec in ("highest", "high"):
            for n, dx, dz in ((100, 16, 16), (5000, 64, 128), (70000, 1024, 512), (3000, 200, 64)):
                keys = SF.tune_keys(n, dx, dz, dtype, prec)
                cfg = SF.launch_config(n, dx, dz, dtype, similarity=0, divergence=0, grad_x=True, grad_z=True,
                                       precision=prec, interpret=False)  # fmt: skip
                for name, sp in SF.SPACES.items():
                    h = sp.heuristic(keys[name])
                    assert h in sp.candidates(keys[name]), (name, dtype, prec, dx, dz, h.name)
                    assert cfg[name]["options"] == h.options
                    assert {k: cfg[name]["constexprs"][k] for k in h.meta} == h.meta
                res, bk = SF.operand_mode(dx, dz, dtype, prec)
                assert cfg["loss"]["constexprs"]["RESIDENT"] == res and cfg["loss"]["constexprs"]["BLOCK_K"] == bk


def test_tune_keys_bucket_shapes_and_modes():
    a = SF.tune_keys(3000, 100, 60, torch.bfloat16)
    b = SF.tune_keys(4096, 128, 64, torch.bfloat16)
    assert a == b
    assert a["loss"]["n"] == 4096 and a["loss"]["resident"] is True and a["loss"]["block_k"] == 128
    assert SF.tune_keys(4097, 128, 64, torch.bfloat16)["loss"]["n"] == 8192
    assert a["grad_x"]["d_own"] == 128 and a["grad_z"]["d_own"] == 64
    # fp32: resident up to 64, then IEEE chunks of 32 or TF32 chunks of 16
    assert SF.operand_mode(64, 3, torch.float32, "highest") == (True, 64)
    assert SF.operand_mode(65, 3, torch.float32, "highest") == (False, 32)
    assert SF.operand_mode(65, 3, torch.float32, "high") == (False, 16)
    assert SF.operand_mode(129, 3, torch.float16) == (False, 64)
    assert SF.operand_mode(17, 5, torch.float32, block_k=16) == (False, 16)
    assert SF.tune_keys(10, 5, 5, torch.float32, "high")["lse"]["precision"] == "tf32"


def test_aot_space_entries_cover_every_candidate():
    # aot_space_configs holds every candidate of each space for every dtype/precision/operand mode: what aot.py
    # compiles with --no-spills, so no config the autotuner can pick escapes the check.
    entries = {(k.__name__ if hasattr(k, "__name__") else k.fn.__name__, sig.get("x_ptr", sig.get("u_ptr", sig.get("own_ptr"))),
                tuple(sorted(c.items())), tuple(sorted(o.items()))) for k, sig, c, o in SF.aot_space_configs()}  # fmt: skip
    kname = {"lse": "_lse_kernel", "loss": "_loss_kernel", "grad_z": "_grad_kernel", "grad_x": "_grad_kernel"}
    count = 0
    for dtype, ptr in SF._PTR.items():
        for prec in ("highest", "high", "medium"):
            for n, dx, dz in ((4096, 64, 64), (4096, 1024, 512), (100, 3, 100), (100, 1000, 1)):
                res, bk = SF.operand_mode(dx, dz, dtype, prec)
                keys = SF.tune_keys(n, dx, dz, dtype, prec)
                base = dict(UPCAST=False, DOT_PRECISION=SF.dot_precision(dtype, prec), ROUND_TF32=SF.round_tf32(dtype, prec),
                            RESIDENT=res, BLOCK_K=bk)  # fmt: skip
                for name, sp in SF.SPACES.items():
                    for c in sp.candidates(keys[name]):
                        kern = getattr(SF, kname[name])
                        cst = {a: v for a, v in {**base, **c.meta}.items() if a in kern.arg_names}
                        assert (kname[name], ptr, tuple(sorted(cst.items())), tuple(sorted(c.options.items()))) in entries
                        count += 1
    assert count > 0


# ---------------------------------------------------------------------------------------------------
# Errors, FLOP model, AOT
# ---------------------------------------------------------------------------------------------------
def test_rejects_unsupported_inputs():
    x = torch.randn(8, 4, device=DEV)
    with pytest.raises(NotImplementedError, match="float64"):
        SF.structure_level1_flash(x.double(), x.double(), 0.1, SF.COSINE, 1.0, SF.STRUCTURE, 1e-12, False, True)
    with pytest.raises(ValueError, match="same number of rows"):
        SF.structure_level1_flash(x, x[:5], 0.1, SF.COSINE, 1.0, SF.STRUCTURE, 1e-12, False, True)
    with pytest.raises(ValueError, match="same dtype"):
        SF.structure_level1_flash(x, x.half(), 0.1, SF.COSINE, 1.0, SF.STRUCTURE, 1e-12, False, True)
    with pytest.raises(ValueError, match="eps must be > 0"):
        SF.structure_level1_flash(x, x, 0.1, SF.COSINE, 1.0, SF.STRUCTURE, 0.0, False, True)
    with pytest.raises(ValueError, match="temperature"):
        SF.structure_level1_flash(x, x, 0.0, SF.COSINE, 1.0, SF.JS, 1e-12, False, True)
    with pytest.raises(ValueError, match="similarity code"):
        SF.structure_level1_flash(x, x, 0.1, 7, 1.0, SF.JS, 1e-12, False, True)
    with pytest.raises(ValueError, match="power of two"):
        SF.structure_level1_flash(x, x, 0.1, SF.COSINE, 1.0, SF.JS, 1e-12, False, True, block_m=24)


def test_flop_model():
    n, d = 4096, 128
    assert SF.flash_flops(n, d, d, grad_z=True, block_d=128) == 14 * n * n * d
    assert SF.flash_flops(n, d, d, grad_z=False) == 8 * n * n * d
    # two feature chunks recompute the S tiles twice in pass C
    assert SF.flash_flops(n, 256, 256, grad_z=True, block_d=128) == (8 + 2 * 4 + 2) * n * n * 256


def test_aot_entries_cover_every_kernel():
    kernels = {k for k, _, _, _ in SF.AOT_KERNELS}
    assert kernels == {SF._lse_kernel, SF._loss_kernel, SF._grad_kernel}
    for k, sig, cst, _ in SF.AOT_KERNELS:
        assert list(sig) == list(k.arg_names)  # every argument, in order
        assert all(sig[name] == "constexpr" for name in cst)
    types = {sig.get("x_ptr", sig.get("u_ptr", sig.get("own_ptr"))) for _, sig, _, _ in SF.AOT_KERNELS}
    assert types == {"*fp32", "*bf16", "*fp16"}
    # IEEE fp32 ("highest") and rounded TF32 ("high"/"medium") both compiled
    fp32 = {(c["DOT_PRECISION"], c["ROUND_TF32"]) for _, sig, c, _ in SF.AOT_KERNELS if "*fp32" in sig.values()
            and sig.get("own_ptr", sig.get("x_ptr", sig.get("u_ptr"))) == "*fp32"}  # fmt: skip
    assert fp32 == {("ieee", False), ("tf32", True)}


_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from structure_ops._triton import structure_flash as SF
picked = [e for e in SF.AOT_KERNELS if e[0] is SF._grad_kernel and not e[2]["RESIDENT"] and e[2]["BLOCK_D"] == 128]
assert picked
for cc in (80, 90):
    for k, sig, cst, opts in picked[:2]:
        c = triton.compile(ASTSource(fn=k, signature=sig, constexprs=cst), target=GPUTarget("cuda", cc, 32), options=opts)
        ptx = c.asm["ptx"]
        assert ("wgmma" in ptx) == (cc == 90 and cst["DOT_PRECISION"] != "ieee"), (cc, cst)
print("ok")
"""


def test_aot_grad_kernels_compile_for_sm80_sm90():
    # The gradient kernel for fp32 (IEEE) and fp32 (rounded TF32), compiled for real GPUs without one, in a process
    # without TRITON_INTERPRET (the interpreter wraps kernels in objects that triton.compile rejects).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------
# TF32: the kernels round fp32 operands (RNA) before a tf32 dot; tolerances from the float64 hardware model
# ---------------------------------------------------------------------------------------------------
def test_tf32_model_truncation_exceeds_tolerance_rounding_stays_within():
    """The model-level check behind every tf32 tolerance, at the realistic GPU size (N = 4096, d = 1024, τ = 0.05).

    The tolerance of D at precision "high" is derived from rounded (RNA, cuBLAS) tf32 operands; Triton's plain
    tf32 dot truncates them instead, and that bias must land far outside the tolerance, or a test using it could
    not tell a kernel that forgot to round."""
    x, z = structured(4096, 1024, 1024, seed=1)
    xh, zh = R.prepare(x), R.prepare(z)
    exact = hw.level1_value(xh, zh, "fp32")  # what the kernel receives: fp32 operands
    err_round = abs(hw.level1_value(xh, zh, "tf32") - exact) / abs(exact)
    err_trunc = abs(hw.level1_value(xh, zh, "tf32_trunc") - exact) / abs(exact)
    tol = hw.tolerance(err_round, safety=4.0, floor=1e-6)
    assert err_round <= tol < 1e-4, (err_round, tol)
    assert err_trunc > 10 * tol, (err_trunc, tol)  # ~7e-4 vs ~1e-6 (docs/kernels.md §6)


@needs_kernels
@pytest.mark.parametrize("div", ["structure", "js"])
def test_tf32_kernel_rounds_operands_like_cublas(div):
    """At precision "high" the kernels round X̂, Ẑ to tf32 (RNA) before tl.dot: the value matches the float64 model
    of rounded operands to fp32 accuracy and is far from the model of truncated ones. (Under the interpreter the
    dot itself is exact, so this checks the kernel's own rounding; on a GPU it checks what the hardware does.) The
    gradients, whose W operand is also rounded, stay within the model-derived tolerance of the exact oracle."""
    n, d = 37, 64
    xh, zh = _inputs(n, d, d, seed=21, dtype=torch.float32)  # exact in fp32
    kw = dict(temperature=0.05, divergence=div)
    d_round, d_trunc = hw.level1_value(xh, zh, "tf32", **kw), hw.level1_value(xh, zh, "tf32_trunc", **kw)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=0.05, sim="cosine", div=div, eps=1e-12, gamma=1.0)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        dv, gx, gz = _flash(xh, zh, torch.float32, tau=0.05, sim="cosine", div=div, eps=1e-12, gamma=1.0, **SMALL)
    finally:
        torch.set_float32_matmul_precision(old)
    assert abs(dv.item() - d_round) <= 2e-6 * abs(d_round), (dv.item(), d_round)
    # the check can tell truncation apart, and a kernel that does not round at all (exact fp32 operands)
    assert abs(d_trunc - d_round) > 20 * 2e-6 * abs(d_round)
    assert abs(hw.level1_value(xh, zh, "fp32", **kw) - d_round) > 5 * 2e-6 * abs(d_round)
    _, mgx, mgz = hw.level1_emulated(xh, zh, "tf32", temperature=0.05, divergence=div)
    for g, ref, mg in ((gz, ref_gz, mgz), (gx, ref_gx, mgx)):
        tol = hw.tolerance(rel_err(mg, ref), safety=4.0, floor=2e-5)
        _check(g, ref, tol, f"tf32 gradient ({div})")


# ---------------------------------------------------------------------------------------------------
# fp16 gradient operands: power-of-two scaling before the half cast
# ---------------------------------------------------------------------------------------------------
def test_half_scaling_model_at_large_n():
    """The W entries cast to fp16 for the gradient GEMM are ~1/N: without scaling they fall below fp16's normal range
    at large N (emulated cast error grows with N); with the power of two the kernel picks (half_scale_exp) the error
    stays at fp16's rounding (rms ≤ the unit roundoff 2⁻¹¹), and the scaled values stay finite."""
    u = 2.0**-11
    for n in (65536, 262144):
        x, z = structured(n, 16, 16, seed=0)
        xh, zh = R.prepare(x), R.prepare(z)
        w = hw.level1_w_rows(xh, zh, torch.arange(0, n, n // 8), temperature=0.2)
        k = SF.half_scale_exp(n, torch.float16, SF.STRUCTURE, 1e-12)
        assert k >= 10
        plain, scaled = hw.half_cast_error(w, torch.float16, 0), hw.half_cast_error(w, torch.float16, k)
        assert plain > 2 * u, (n, plain)  # measured 1.2e-3 (65 536), 4.4e-3 (262 144)
        assert scaled <= u, (n, scaled)
        assert torch.isfinite(hw.half_cast(w, torch.float16, k)).all()


@pytest.mark.parametrize("eps", [1e-12, 1e-30, 1e-3])
@pytest.mark.parametrize("div", [SF.STRUCTURE, SF.JS])
def test_half_scale_never_overflows(eps, div):
    # The bound B of |W| (half_scale_exp's docstring) times 2^k stays below fp16's largest value, at every N; and the
    # model's W (both directions) at a peaked softmax respects B.
    for n in (1024, 65536, 1 << 20, 1 << 24):
        k = SF.half_scale_exp(n, torch.float16, div, eps)
        assert 0 < k <= math.log2(n)
        t_max = math.log1p((1 + eps) / (4 * eps))
        bound = 2.0 if div == SF.JS else t_max + 2.0 + 0.25 * n * eps
        assert math.ldexp(bound, k) <= 65504.0 / 2
    assert SF.half_scale_exp(1 << 20, torch.bfloat16, div, eps) == 0  # bf16 / fp32 have fp32's exponent range
    assert SF.half_scale_exp(100, torch.float16, div, eps) == 0  # below HALF_SCALE_MIN_N
    if div == SF.STRUCTURE:  # the bound holds for a peaked softmax (τ = 0.01) and inputs far apart
        xh, zh = _inputs(13, 5, 5, seed=4)
        w = hw.level1_w_rows(xh, zh, torch.arange(13), temperature=0.01, eps=eps)
        assert 2 * w.abs().max().item() <= math.log1p((1 + eps) / (4 * eps)) + 2.0 + 0.25 * 13 * eps


@needs_kernels
@pytest.mark.parametrize("div", ["structure", "js"])
def test_fp16_scaled_gradient_path_matches_oracle(div):
    # Force the scaling path at a small N (threshold 1): the kernel multiplies W by 2^k before the fp16 cast and
    # divides the fp32 accumulator by it; a missing undo (or a scale applied twice) is off by 2^k ≥ 32.
    n, dx, dz = 37, 5, 17
    k = SF.half_scale_exp(n, torch.float16, DIV[div], 1e-12, min_n=1)
    assert k == 5
    xh, zh = _inputs(n, dx, dz, seed=2, dtype=torch.float16)
    ref_d, ref_gx, ref_gz = _oracle(xh, zh, tau=0.1, sim="cosine", div=div, eps=1e-12, gamma=1.0)
    # tolerance: the model of the half operands (W and Ẑ rounded to fp16) plus the fp16 output rounding
    _, _, mgz = hw.level1_emulated(xh, zh, "fp16", temperature=0.1, divergence=div)
    tol = hw.tolerance(rel_err(mgz, ref_gz) + 2.0**-11, safety=4.0)
    for min_n in (1, 10**9):  # scaled, unscaled
        d, gx, gz = _flash(xh, zh, torch.float16, tau=0.1, sim="cosine", div=div, eps=1e-12, gamma=1.0,
                           half_scale_min_n=min_n, **SMALL)  # fmt: skip
        assert abs(d.item() - ref_d.item()) <= 1e-5 * abs(ref_d.item())
        _check(gz, ref_gz, tol, f"dZ fp16 (min_n={min_n})")
        _check(gx, ref_gx, tol, f"dX fp16 (min_n={min_n})")


# ---------------------------------------------------------------------------------------------------
# GPU: realistic sizes against the float64 oracle
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.mark.parametrize(
        ("dtype", "precision", "d", "sim", "div"),
        [
            (torch.float32, "highest", 512, "cosine", "structure"),  # IEEE fp32 (FMA GEMMs, slow: d = 512 only)
            (torch.float32, "highest", 512, "rbf", "js"),
            (torch.float32, "high", 1024, "cosine", "structure"),  # TF32, operands rounded by the kernel
            (torch.bfloat16, "highest", 1024, "cosine", "structure"),  # bf16 inputs, W rounded to bf16
            (torch.bfloat16, "highest", 512, "cosine", "js"),
            (torch.bfloat16, "highest", 1024, "rbf", "structure"),
            (torch.float16, "highest", 1024, "cosine", "structure"),  # fp16: W scaled by 2^k before the cast
        ],
    )
    def test_realistic_sizes(self, dtype, precision, d, sim, div):
        # Tolerances from the float64 hardware model (tests/emulation/hardware.py), evaluated on the GPU in fp64:
        # the error of the oracle on operands rounded as the kernel's GEMMs see them, times 4, floored at the fp32
        # math of the kernels (softmax, divergence: 2e-5 on gradients, 1e-5 on D).
        n = 4096
        tau, gamma = (0.05, 1.0) if sim == "cosine" else (1.0, 2.0)
        x, z = structured(n, d, d, seed=1)
        xh, zh = R.prepare(x).to(dtype).to(F64), R.prepare(z).to(dtype).to(F64)
        xr, zr = xh.cuda().requires_grad_(True), zh.cuda().requires_grad_(True)
        ref = R.structure_core(xr, zr, temperature=tau, similarity_kind=sim, divergence=div, gamma=gamma)
        ref_gx, ref_gz = torch.autograd.grad(ref, (xr, zr))
        fmt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "tf32" if precision == "high" else "fp32")
        md, mgx, mgz = hw.level1_emulated(xh.cuda(), zh.cuda(), fmt, temperature=tau, similarity=sim, gamma=gamma,
                                          divergence=div)  # fmt: skip
        dtol = hw.tolerance(abs(md.item() - ref.item()) / abs(ref.item()), floor=1e-5)
        half_out = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11 if dtype == torch.float16 else 0.0
        gtol = hw.tolerance(max(rel_err(mgx, ref_gx), rel_err(mgz, ref_gz)) + half_out, floor=2e-5)
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            d_, gx, gz = SF.structure_level1_flash(
                xh.to(dtype).cuda(), zh.to(dtype).cuda(), tau, SIM[sim], gamma, DIV[div], 1e-12, True, True
            )
        finally:
            torch.set_float32_matmul_precision(old)
        torch.cuda.synchronize()
        assert abs(d_.item() - ref.item()) <= dtol * abs(ref.item()), (d_.item(), ref.item(), dtol)
        assert rel_err(gz, ref_gz) <= gtol, (rel_err(gz, ref_gz), gtol)
        assert rel_err(gx, ref_gx) <= gtol, (rel_err(gx, ref_gx), gtol)


def test_hardware_model_basics():
    # The float64 models the tolerances come from: tf32 rounding is to nearest with ties away from zero (cvt.rna),
    # truncation is toward zero, both keep inf/NaN and differ from fp32 only in the low 13 mantissa bits; half
    # operands with fp32 accumulation stay within fp32 rounding of the fp64-accumulated product.
    one, u = 1.0, 2.0**-10  # tf32 ulp at 1
    x = torch.tensor([one + 0.5 * u, -(one + 0.5 * u), one + 0.49 * u, one + 0.99 * u, float("inf"), float("nan")],
                     dtype=F64)  # fmt: skip
    r, t = hw.tf32_round(x), hw.tf32_truncate(x)
    assert r[:4].tolist() == [one + u, -(one + u), one, one + u]  # ties away from zero
    assert t[:4].tolist() == [one, -one, one, one]
    assert r[4].item() == float("inf") and r[5].isnan() and t[5].isnan()
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 256, generator=g, dtype=F64)
    b = torch.randn(256, 32, generator=g, dtype=F64)
    assert ((hw.tf32_round(a) - a.float().double()).abs() <= a.abs() * 2.0**-11).all()
    for fmt in ("bf16", "fp16", "tf32"):
        exact = hw.emulated_matmul(a, b, fmt, accumulate="fp64")
        acc32 = hw.emulated_matmul(a, b, fmt, accumulate="fp32", block_k=32)
        assert rel_err(acc32, exact) <= 1e-6
        assert rel_err(exact, a @ b) > 1e-4 if fmt == "bf16" else True
    assert hw.half_cast_error(torch.full((8,), 1e-6, dtype=F64), torch.float16, 0) > 1e-2  # subnormal
    assert hw.half_cast_error(torch.full((8,), 1e-6, dtype=F64), torch.float16, 20) <= 2.0**-11
