"""Level-1 flash pass (structure_ops/_triton/structure_flash.py) against the float64 oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel module is imported). The interpreter pays per program and per op, so the shapes are small but
awkward: N = 7, 13, 37 with 16- or 32-row blocks that do not divide N, d = 3, 5, 17 with 16-wide contraction and
gradient chunks (d = 17 spans two of each). Expected values come from ``structure_ops.reference`` in float64:
the value from ``structure_core(levels=1, margin=0)``, the gradients from autograd through it. The GPU class at
the end runs realistic sizes and is skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
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
    kernels = {k for k, _, _ in SF.AOT_KERNELS}
    assert kernels == {SF._lse_kernel, SF._loss_kernel, SF._grad_kernel}
    for k, sig, cst in SF.AOT_KERNELS:
        assert list(sig) == list(k.arg_names)  # every argument, in order
        assert all(sig[name] == "constexpr" for name in cst)
    types = {sig.get("x_ptr", sig.get("u_ptr")) for _, sig, _ in SF.AOT_KERNELS}
    assert types == {"*fp32", "*bf16"}


_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from structure_ops._triton import structure_flash as SF
picked = [e for e in SF.AOT_KERNELS if e[0] is SF._grad_kernel and e[2]["GRAD_X"]]
assert picked
for cc in (80, 90):
    for k, sig, cst in picked:
        c = triton.compile(ASTSource(fn=k, signature=sig, constexprs=cst), target=GPUTarget("cuda", cc, 32))
        ptx = c.asm["ptx"]
        assert ("wgmma" in ptx) == (cc == 90), (cc, cst)
        assert "mma" in ptx, (cc, cst)
print("ok")
"""


def test_aot_grad_kernels_compile_for_sm80_sm90():
    # The heaviest kernel (both gradients) for fp32 (TF32) and bf16, compiled for real GPUs without one, in a
    # process without TRITON_INTERPRET (the interpreter wraps kernels in objects that triton.compile rejects).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------
# GPU: realistic sizes against the float64 oracle
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
class TestGPU:
    @pytest.mark.parametrize(
        ("dtype", "precision", "d", "sim", "div", "dtol", "gtol"),
        [
            # IEEE fp32 (FMA GEMMs, slow: d = 512 only); TF32 (float64 emulation of its operand rounding:
            # D ~1e-5, gradients ~3e-4); bf16 on bf16-rounded inputs (W rounded to bf16 for the second GEMM and
            # the bf16 output: ~2e-3 at N = 4096).
            (torch.float32, "highest", 512, "cosine", "structure", 2e-5, 1e-4),
            (torch.float32, "highest", 512, "rbf", "js", 2e-5, 1e-4),
            (torch.float32, "high", 1024, "cosine", "structure", 2e-4, 5e-3),
            (torch.bfloat16, "highest", 1024, "cosine", "structure", 1e-4, 1e-2),
            (torch.bfloat16, "highest", 512, "cosine", "js", 1e-4, 1e-2),
            (torch.bfloat16, "highest", 1024, "rbf", "structure", 1e-4, 1e-2),
        ],
    )
    def test_realistic_sizes(self, dtype, precision, d, sim, div, dtol, gtol):
        n = 4096
        tau, gamma = (0.05, 1.0) if sim == "cosine" else (1.0, 2.0)
        x, z = structured(n, d, d, seed=1)
        xh, zh = R.prepare(x).to(dtype).to(F64), R.prepare(z).to(dtype).to(F64)
        xr, zr = xh.cuda().requires_grad_(True), zh.cuda().requires_grad_(True)
        ref = R.structure_core(xr, zr, temperature=tau, similarity_kind=sim, divergence=div, gamma=gamma)
        ref_gx, ref_gz = torch.autograd.grad(ref, (xr, zr))
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            d_, gx, gz = SF.structure_level1_flash(
                xh.to(dtype).cuda(), zh.to(dtype).cuda(), tau, SIM[sim], gamma, DIV[div], 1e-12, True, True
            )
        finally:
            torch.set_float32_matmul_precision(old)
        torch.cuda.synchronize()
        assert abs(d_.item() - ref.item()) <= dtol * abs(ref.item()), (d_.item(), ref.item())
        assert rel_err(gz, ref_gz) <= gtol
        assert rel_err(gx, ref_gx) <= gtol
