"""Triton clip_fwd / clip_bwd and knn against the float64 oracle and the C++ CPU ops.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors: small, awkward shapes with blocks that do not divide N or d. The ``cuda`` class runs the
compiled kernels at realistic sizes and is skipped without a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import F64, rel_err

from structure_ops import reference

pytest.importorskip("triton")

from structure_ops._triton import clip as tclip  # noqa: E402 - after the importorskip
from structure_ops._triton import knn as tknn  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("cpu_ext")]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD = 1.75  # grad_output ≠ 1 (exact in fp32): the backward must scale by it
CLIP_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------
@functools.cache
def _clip_data(n: int, d: int, seed: int = 0):
    """Normalized, correlated pairs (row i of B is a noisy copy of row i of A), float64."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    b = F.normalize(a + 0.7 * torch.randn(n, d, generator=g, dtype=F64), dim=1)
    return a, b


def _oracle(a: torch.Tensor, b: torch.Tensor, s: float):
    """Loss, row/column lse and the gradients of GRAD·loss w.r.t. (a, b, s), all in float64 (on the
    rounded inputs and the rounded scale the kernels see)."""
    a = a.detach().to("cpu", F64).clone().requires_grad_()
    b = b.detach().to("cpu", F64).clone().requires_grad_()
    st = torch.tensor(float(s), dtype=F64, requires_grad=True)
    loss = reference.clip_loss(a, b, st, normalize=False)
    ga, gb, gs = torch.autograd.grad(GRAD * loss, (a, b, st))
    with torch.no_grad():
        logits = st * a @ b.T
        lse_r, lse_c = logits.logsumexp(1), logits.logsumexp(0)
    return loss.detach(), lse_r, lse_c, ga, gb, gs


def _run_clip(a, b, scale, **blocks):
    bwd_blocks = {k: v for k, v in blocks.items()}
    fwd_blocks = {k: v for k, v in blocks.items() if k != "block_do"}
    loss, r, c = tclip.clip_fwd(a, b, scale, **fwd_blocks)
    grad = torch.tensor(GRAD, device=a.device)
    da, db, ds = tclip.clip_bwd(grad, a, b, scale, r, c, **bwd_blocks)
    return loss, r, c, da, db, ds


CLIP_SHAPES = [  # (N, d, blocks): no block divides N; d=17 spans two d-chunks of 16
    (5, 17, dict(block_m=16, block_n=16, block_d=16)),
    (13, 3, dict(block_m=16, block_n=16, block_d=16)),
    (37, 17, dict(block_m=16, block_n=32, block_d=16)),
    (37, 3, dict(block_m=32, block_n=16, block_d=16)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("n", "d", "blocks"), CLIP_SHAPES, ids=[f"{n}x{d}" for n, d, _ in CLIP_SHAPES])
def test_clip_matches_oracle_and_cpp(n, d, blocks, dtype):
    a64, b64 = _clip_data(n, d)
    a, b = a64.to(DEV, dtype), b64.to(DEV, dtype)
    scale = torch.tensor(7.3, dtype=torch.float32, device=DEV)
    loss, r, c, da, db, ds = _run_clip(a, b, scale, **blocks)
    ref_l, ref_r, ref_c, ref_ga, ref_gb, ref_gs = _oracle(a, b, scale.item())
    tol = CLIP_TOL[dtype]
    stat = F64 if dtype == F64 else torch.float32
    # the C++ op's conventions: loss 0-dim in the input dtype, lse in fp32 (fp64), grads like the inputs,
    # grad_logit_scale like logit_scale
    assert loss.shape == () and loss.dtype == dtype
    assert r.shape == (n,) and c.shape == (n,) and r.dtype == stat and c.dtype == stat
    assert da.dtype == dtype and db.dtype == dtype and da.shape == (n, d) and db.shape == (n, d)
    assert ds.shape == scale.shape and ds.dtype == scale.dtype
    assert rel_err(loss, ref_l) <= tol
    assert rel_err(r, ref_r) <= tol and rel_err(c, ref_c) <= tol
    assert rel_err(da, ref_ga) <= tol and rel_err(db, ref_gb) <= tol
    # ds is returned in logit_scale's dtype (fp32 here): fp32 rounding is the floor even for fp64 inputs
    assert rel_err(ds, ref_gs) <= max(tol, 1e-6)

    cl, cr, cc = torch.ops.structure_ops.clip_fwd(a.cpu(), b.cpu(), scale.cpu())
    cda, cdb, cds = torch.ops.structure_ops.clip_bwd(torch.tensor(GRAD), a.cpu(), b.cpu(), scale.cpu(), cr, cc)
    for ours, cpp in ((loss, cl), (r, cr), (c, cc), (da, cda), (db, cdb), (ds, cds)):
        assert ours.dtype == cpp.dtype and ours.shape == cpp.shape
        assert rel_err(ours.cpu(), cpp) <= max(tol, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_clip_half_precision(dtype):
    n, d = 37, 17
    a64, b64 = _clip_data(n, d, seed=1)
    a, b = a64.to(DEV, dtype), b64.to(DEV, dtype)
    scale = torch.tensor(1.0 / 0.05, device=DEV)
    loss, r, c, da, db, ds = _run_clip(a, b, scale, block_m=16, block_n=32, block_d=16)
    # the oracle on the rounded inputs: what remains is the output rounding and fp32 statistics
    ref_l, ref_r, ref_c, ref_ga, ref_gb, ref_gs = _oracle(a, b, 20.0)
    assert loss.dtype == dtype and r.dtype == torch.float32 and da.dtype == dtype and db.dtype == dtype
    assert rel_err(r, ref_r) <= 1e-5 and rel_err(c, ref_c) <= 1e-5  # fp32 statistics of exact products
    assert rel_err(loss, ref_l) <= 1e-2
    assert rel_err(da, ref_ga) <= 1e-2 and rel_err(db, ref_gb) <= 1e-2
    assert rel_err(ds, ref_gs) <= 1e-4


def test_clip_backward_output_chunks():
    """d = 37 with BLOCK_DO = 16: three output chunks, each recomputing its tiles."""
    n, d = 13, 37
    a64, b64 = _clip_data(n, d, seed=2)
    a, b = a64.to(DEV, torch.float32), b64.to(DEV, torch.float32)
    scale = torch.tensor(3.0, device=DEV)
    loss, r, c, da, db, ds = _run_clip(a, b, scale, block_m=16, block_n=16, block_d=16, block_do=16)
    _, _, _, ref_ga, ref_gb, ref_gs = _oracle(a, b, 3.0)
    assert rel_err(da, ref_ga) <= 1e-5 and rel_err(db, ref_gb) <= 1e-5 and rel_err(ds, ref_gs) <= 1e-5


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_clip_logit_scale_shape_dtype_and_large_scale(scale_shape):
    """logit_scale as () or (1,), in fp64 while the inputs are fp32; s = 100 stresses the lse shifts."""
    n, d = 13, 17
    a64, b64 = _clip_data(n, d, seed=3)
    a, b = a64.to(DEV, torch.float32), b64.to(DEV, torch.float32)
    scale = torch.full(scale_shape, 100.0, dtype=F64, device=DEV)
    loss, r, c, da, db, ds = _run_clip(a, b, scale)
    ref_l, _, _, ref_ga, ref_gb, ref_gs = _oracle(a, b, 100.0)
    assert ds.shape == scale_shape and ds.dtype == F64
    assert torch.isfinite(loss) and rel_err(loss, ref_l) <= 1e-5
    assert rel_err(da, ref_ga) <= 1e-5 and rel_err(db, ref_gb) <= 1e-5 and rel_err(ds.reshape(()), ref_gs) <= 1e-5


def test_clip_backward_is_deterministic_and_scales_with_grad():
    a64, b64 = _clip_data(37, 17, seed=4)
    a, b = a64.to(DEV, torch.float32), b64.to(DEV, torch.float32)
    scale = torch.tensor(5.0, device=DEV)
    _, r, c = tclip.clip_fwd(a, b, scale)
    one = tclip.clip_bwd(torch.tensor(1.0, device=DEV), a, b, scale, r, c)
    again = tclip.clip_bwd(torch.tensor(1.0, device=DEV), a, b, scale, r, c)
    four = tclip.clip_bwd(torch.tensor(4.0, device=DEV), a, b, scale, r, c)
    for x, y, z in zip(one, again, four, strict=True):
        assert torch.equal(x, y)
        assert torch.allclose(4 * x, z, rtol=1e-6, atol=0)


def test_clip_input_checks():
    a = torch.randn(5, 3, device=DEV)
    s = torch.tensor(1.0, device=DEV)
    with pytest.raises(RuntimeError, match="same number of rows"):
        tclip.clip_fwd(a, torch.randn(4, 3, device=DEV), s)
    with pytest.raises(RuntimeError, match="same embedding width"):
        tclip.clip_fwd(a, torch.randn(5, 4, device=DEV), s)
    with pytest.raises(RuntimeError, match="exactly one value"):
        tclip.clip_fwd(a, a, torch.ones(2, device=DEV))
    with pytest.raises(RuntimeError, match="floating-point"):
        tclip.clip_fwd(a.long(), a.long(), s)


# --------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------
def _tied(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Small-integer rows (every product and sum exact in fp32/bf16/fp16, so similarities tie exactly)
    with duplicated rows: the tie rule decides most of the order."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (n, d), generator=g).to(F64)
    a[n // 2] = a[1]
    a[n - 1] = a[1]
    return a


def _check_knn(a: torch.Tensor, k: int, **kw) -> None:
    out = tknn.knn(a, k, **kw)
    assert out.dtype == torch.int64 and out.shape == (a.shape[0], k) and out.device == a.device
    ref = reference.knn(a.cpu().to(F64), k)
    assert torch.equal(out.cpu(), ref), (out.cpu() - ref).nonzero()[:5]
    cpp = torch.ops.structure_ops.knn(a.cpu(), k)
    assert torch.equal(out.cpu(), cpp)


KNN_CASES = [  # (N, d, k, blocks): blocks not dividing N, k = 1, k = N − 1
    (5, 17, 1, dict(block_m=16, block_n=16, block_d=16)),
    (5, 17, 4, dict(block_m=16, block_n=16, block_d=16)),
    (13, 3, 12, dict(block_m=16, block_n=16, block_d=16)),
    (37, 3, 1, dict(block_m=16, block_n=16, block_d=16)),
    (37, 17, 5, dict(block_m=16, block_n=16, block_d=16)),
    (37, 17, 36, dict(block_m=32, block_n=64, block_d=16)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize(("n", "d", "k", "blocks"), KNN_CASES, ids=[f"{n}x{d}k{k}" for n, d, k, _ in KNN_CASES])
def test_knn_ties_lower_index(n, d, k, blocks, dtype):
    _check_knn(_tied(n, d).to(DEV, dtype), k, **blocks)


def test_knn_duplicates_rank_by_index():
    """Rows 1, 6 and 12 are identical: for row 1 the best neighbours are 6 then 12 (equal sims)."""
    a = _tied(13, 17).to(DEV, torch.float32)
    out = tknn.knn(a, 3, block_m=16, block_n=16, block_d=16)
    assert out[1, :2].tolist() == [6, 12]
    assert out[6, :2].tolist() == [1, 12]
    assert out[12, :2].tolist() == [1, 6]


@pytest.mark.parametrize("k", [1, 4, 12])
def test_knn_nan_rows_and_values(k):
    a = _tied(13, 5, seed=1)
    a[2] = float("nan")  # every similarity with row 2 is NaN → −inf, ranked by index
    a[7, 3] = float("nan")
    _check_knn(a.to(DEV, torch.float32), k, block_m=16, block_n=16, block_d=16)


@pytest.mark.parametrize(("n", "d", "k"), [(37, 17, 5), (37, 3, 36)])
def test_knn_random_normalized(n, d, k):
    g = torch.Generator().manual_seed(5)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    _check_knn(a.to(DEV, torch.float32), k, block_m=16, block_n=64, block_d=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_knn_panel_path(dtype, monkeypatch):
    """fp64 and k > 128 take the panel path; a tiny budget forces many ragged panels."""
    monkeypatch.setenv("STRUCTURE_OPS_TRITON_PANEL_MB", "0.005")
    a = _tied(150, 3, seed=2)
    a[9] = float("nan")
    a = a.to(DEV, dtype)
    for k in (1, 7, 140, 149):
        _check_knn(a, k, path="panel")
    _check_knn(a, 140)  # "auto": k > 128 → panel


def test_knn_keys_order_like_the_cpp_comparator():
    vals = torch.tensor([float("nan"), -float("inf"), -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, float("inf"), 0.0])
    cols = torch.arange(vals.numel())
    keys = tknn._keys_fp32(vals[None, :], cols)[0]
    order = torch.argsort(keys, descending=True)
    # the C++ comparator: NaN is −inf (tied with −inf, so by index), −0.0 == +0.0, then the lower index
    expect = sorted(range(vals.numel()), key=lambda j: (-(float("-inf") if vals[j].isnan() else vals[j].item()), j))
    assert order.tolist() == expect
    assert keys[4] > keys[5]  # −0.0 == +0.0 → the lower index wins


def test_knn_checks():
    a = torch.randn(5, 3, device=DEV)
    for k in (0, 5):
        with pytest.raises(RuntimeError, match="1 <= k <= N - 1"):
            tknn.knn(a, k)
    with pytest.raises(NotImplementedError, match="fused kernel"):
        tknn.knn(a.double(), 2, path="fused")
    with pytest.raises(RuntimeError, match="2-D"):
        tknn.knn(a[0], 1)


def test_aot_entries_are_well_formed():
    """Every AOT entry names each kernel argument once, gives a value to each constexpr and the launch options."""
    for fn, sig, const, opts in tclip.AOT_KERNELS + tknn.AOT_KERNELS:
        assert list(sig) == fn.arg_names
        assert {k for k, v in sig.items() if v == "constexpr"} == set(const)
        fn = getattr(fn, "fn", fn)  # the Python function under the JIT / interpreter wrapper
        assert {name for name, ann in fn.__annotations__.items() if "constexpr" in str(ann)} == set(const)
        assert opts["num_warps"] in (4, 8)
    # every dtype and both fp32 dot modes (IEEE; TF32 with rounded operands)
    fp32 = {(c["DOT_PRECISION"], c["ROUND_TF32"]) for _, sig, c, _ in tclip.AOT_KERNELS if sig.get("a_ptr") == "*fp32"}
    assert fp32 == {("ieee", False), ("tf32", True)}
    assert {sig["a_ptr"] for _, sig, _, _ in tknn.AOT_KERNELS} == {"*fp32", "*bf16", "*fp16"}
    assert {c["KP"] for _, _, c, _ in tknn.AOT_KERNELS} == {tknn.list_slots(2**i) for i in range(8)}


# --------------------------------------------------------------------------------------------------
# TF32 ("high"): the kernels round fp32 operands to nearest (ties away), as cuBLAS, before the tf32 dot
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def precision_high():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(old)


def test_knn_tf32_orders_by_rounded_similarities(precision_high):
    # Row 0 = e₀, so sim(0, j) = a_j[0], which is chosen between tf32 values (ulp 2⁻¹⁰ at 1): 1 + 0.3u (j = 1),
    # 1 + 0.45u (j = 2), 1 + 0.7u (j = 3). Exact order 3, 2, 1; rounded to nearest (RNA) 1 + u, 1, 1 → 3, 1, 2 (ties:
    # lower index); truncated 1, 1, 1 → 1, 2, 3. The kernel must give the rounded order (what the hardware gives
    # for pre-rounded operands, and what cuBLAS TF32 gives).
    n, d, u = 12, 5, 2.0**-10
    g = torch.Generator().manual_seed(0)
    a = 0.3 * torch.rand(n, d, generator=g, dtype=F64)
    a[0] = 0.0
    a[0, 0] = 1.0
    for j, frac in ((1, 0.3), (2, 0.45), (3, 0.7)):
        a[j, 0] = 1.0 + frac * u
    from emulation import hardware as hw

    want = reference.knn(hw.tf32_round(a), 3)[0].tolist()
    assert want == [3, 1, 2]
    assert reference.knn(a, 3)[0].tolist() == [3, 2, 1] and reference.knn(hw.tf32_truncate(a), 3)[0].tolist() == [1, 2, 3]
    out = tknn.knn(a.to(DEV, torch.float32), 3, path="fused")
    assert out[0].tolist() == want


def test_clip_tf32_matches_the_rounded_operand_model(precision_high):
    # Loss at "high" = the float64 oracle on tf32-rounded (RNA) operands to fp32 accuracy, and far from the model of
    # truncated operands; the gradients (whose E operand is rounded too) within the model-derived tolerance.
    from emulation import hardware as hw

    n, d = 37, 64
    a, b = _clip_data(n, d, seed=3)
    a, b = a.float().double(), b.float().double()
    scale = 20.0

    def oracle(x, y):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = reference.clip_loss(xr, yr, scale, normalize=False)
        return (loss.detach(), *torch.autograd.grad(loss, (xr, yr)))

    exact = oracle(a, b)
    rounded = oracle(hw.tf32_round(a), hw.tf32_round(b))
    trunc = oracle(hw.tf32_truncate(a), hw.tf32_truncate(b))
    s = torch.tensor(scale, device=DEV)
    loss, r, c = tclip.clip_fwd(a.float().to(DEV), b.float().to(DEV), s)
    da, db, _ = tclip.clip_bwd(torch.tensor(1.0, device=DEV), a.float().to(DEV), b.float().to(DEV), s, r, c)
    tol_value = 2e-6
    assert rel_err(loss, rounded[0]) <= tol_value, (rel_err(loss, rounded[0]), rel_err(loss, exact[0]))
    # the value check tells truncation apart, and a kernel that does not round (exact fp32 operands)
    assert rel_err(trunc[0], rounded[0]) > 10 * tol_value and rel_err(exact[0], rounded[0]) > 10 * tol_value
    for got, ref, model in ((da, exact[1], rounded[1]), (db, exact[2], rounded[2])):
        tol = hw.tolerance(rel_err(model, ref) + 2.0**-11, safety=4.0, floor=2e-5)  # + E rounded to tf32
        assert rel_err(got, ref) <= tol


# --------------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic sizes
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_clip_realistic(self, dtype):
        n, d = 8192, 512
        g = torch.Generator(device="cuda").manual_seed(0)
        a64 = F.normalize(torch.randn(n, d, generator=g, device="cuda", dtype=F64), dim=1)
        b64 = F.normalize(a64 + 0.7 * torch.randn(n, d, generator=g, device="cuda", dtype=F64), dim=1)
        a, b = a64.to(dtype), b64.to(dtype)
        scale = torch.tensor(20.0, device="cuda")
        loss, r, c, da, db, ds = _run_clip(a, b, scale)
        a_r, b_r = a.to(F64).requires_grad_(), b.to(F64).requires_grad_()
        st = torch.tensor(20.0, dtype=F64, device="cuda", requires_grad=True)
        ref = reference.clip_loss(a_r, b_r, st, normalize=False)
        ga, gb, gs = torch.autograd.grad(GRAD * ref, (a_r, b_r, st))
        # tolerance from the float64 hardware model: the oracle on operands rounded as the kernel's dots see them
        # (bf16 inputs are already bf16; fp32 at "high": tf32 RNA) plus the unit roundoff of the rounded E operand
        # and of the output dtype, times 4; IEEE fp32: fp32 math only
        from emulation import hardware as hw

        fmt = "bf16" if dtype == torch.bfloat16 else ("fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32")
        u = {"bf16": 2.0**-8, "tf32": 2.0**-11, "fp32": 0.0}[fmt]
        am, bm = hw.round_operand(a.to(F64), fmt).requires_grad_(), hw.round_operand(b.to(F64), fmt).requires_grad_()
        model = reference.clip_loss(am, bm, st.detach(), normalize=False)
        gam, gbm = torch.autograd.grad(GRAD * model, (am, bm))
        vtol = hw.tolerance(rel_err(model, ref), floor=1e-5)
        gtol = hw.tolerance(max(rel_err(gam, ga), rel_err(gbm, gb)) + 2 * u, floor=1e-5)
        assert rel_err(loss, ref) <= vtol
        assert rel_err(da, ga) <= gtol and rel_err(db, gb) <= gtol and rel_err(ds, gs) <= max(gtol, 1e-4)
        again = tclip.clip_bwd(torch.tensor(GRAD, device="cuda"), a, b, scale, r, c)
        assert all(torch.equal(x, y) for x, y in zip((da, db, ds), again, strict=True))  # deterministic

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    def test_knn_realistic(self, dtype):
        n, d, k = 8192, 768, 35
        g = torch.Generator(device="cuda").manual_seed(0)
        # exact integer similarities with many ties: the result must equal the oracle exactly
        a = torch.randint(-1, 2, (n, d), generator=g, device="cuda").to(F64)
        a[n // 2 :: 97] = a[3]
        out = tknn.knn(a.to(dtype), k)
        assert torch.equal(out, reference.knn(a, k))
        # random normalized rows: equal up to fp32 near-ties (compare the selected similarities)
        x = F.normalize(torch.randn(n, d, generator=g, device="cuda", dtype=F64), dim=1)
        out = tknn.knn(x.to(dtype), k)
        ref = reference.knn(x.to(dtype).to(F64), k)
        sim = x.to(dtype).to(F64) @ x.to(dtype).to(F64).T
        assert (out == ref).all(dim=1).float().mean() > 0.95
        assert (sim.gather(1, out) - sim.gather(1, ref)).abs().max() <= 1e-5
