"""Triton clip_loss tiles: every configuration of the tile spaces against the float64 oracle, the O(N) forward
statistics, the 8 N² d backward, determinism, and the launch code's extra memory.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU tensors.
Each configuration of fwd_space / bwd_space (exactly the set aot.py compiles, ``tclip.AOT_KERNELS``) is forced
with ``config=`` at a width it is launched for, on a ragged N (no block divides it), with several row groups and
column panels. Tolerances: fp64/IEEE fp32 from fp32 arithmetic; TF32 and bf16/fp16 from the float64 models of the
hardware (tests/emulation/hardware.py): the oracle on operands rounded as the tensor cores see them.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from emulation import hardware as hw
from helpers import F64, rel_err

from structure_ops import reference

pytest.importorskip("triton")

from structure_ops._triton import clip as tclip  # noqa: E402 - after the importorskip
from structure_ops._triton._common import autotune_cache, clear_autotune_cache  # noqa: E402

pytestmark = [pytest.mark.triton]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD = 1.75
_PTR_DTYPE = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16, "*fp64": torch.float64}
_FMT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def _data(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    b = F.normalize(a + 0.7 * torch.randn(n, d, generator=g, dtype=F64), dim=1)
    return a, b


def _model(a, b, s: float, fmt: str, out_dtype):
    """Float64 model of the kernels: loss, r, c on operands rounded to ``fmt`` (what the dots see), and the
    gradients with the bracket E rounded to ``fmt`` too (the second GEMM's operand) and the result rounded to the
    output dtype. ``fmt="fp64"``: the exact oracle."""
    a, b = hw.round_operand(a, fmt), hw.round_operand(b, fmt)
    n = a.shape[0]
    logits = s * a @ b.T
    r, c = logits.logsumexp(1), logits.logsumexp(0)
    loss = ((r - logits.diagonal()).sum() + (c - logits.diagonal()).sum()) / (2 * n)
    e = torch.exp(logits - r[:, None]) + torch.exp(logits - c[None, :]) - 2 * torch.eye(n, dtype=F64)
    er = hw.round_operand(e, fmt)
    coef = GRAD / (2 * n)
    da, db = (s * coef * er @ b), (s * coef * er.T @ a)
    ds = coef * (e * (a @ b.T)).sum()
    if out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        da, db = da.to(out_dtype).to(F64), db.to(out_dtype).to(F64)
    return loss, r, c, da, db, ds


def _width_for(cst: dict) -> int:
    """A ragged width this configuration is launched for: A_I on chip needs d ≤ BLOCK_D (take the largest odd
    width above half of it); the K-loop needs d > BLOCK_D (two K steps, the second partial)."""
    bd = cst["BLOCK_D"]
    d = bd - 3 if cst["X_ON_CHIP"] else bd + bd // 2 + 1
    if "BLOCK_DO" in cst:
        d = min(d, cst["BLOCK_DO"] + 5) if not cst["X_ON_CHIP"] else d  # ≤ 2 output chunks
    return d


_VARIANTS = ((torch.bfloat16, None), (torch.float16, None), (torch.float32, "high"), (torch.float32, "highest"),
             (torch.float64, None))  # fmt: skip


def _space_ids():
    """(space, index, dtype, precision) for every configuration of FWD_SPACE and BWD_SPACE, with a dtype and
    precision for which it is a candidate (alternating between the variants that share it: bf16 and fp16 share
    every half configuration)."""
    out = []
    for space, spec in ((tclip.FWD_SPACE, tclip.fwd_space), (tclip.BWD_SPACE, tclip.bwd_space)):
        for i, tc in enumerate(space.configs):
            names = [n for n, _ in tc.constexprs]
            owners = []
            for dtype, prec in _VARIANTS:
                for d in tclip.AOT_WIDTHS:
                    if any(tclip._tune_config(c, names) == tc for c in spec(d, dtype, prec)):
                        owners.append((dtype, prec))
                        break
            dtype, prec = owners[i % len(owners)]
            tag = f"{space.name}-{i}-{str(dtype)[6:]}-{prec or ''}-{tc.name.replace(',', '-')}"
            out.append(pytest.param(space.name, i, dtype, prec, id=tag))
    return out


@pytest.mark.parametrize(("space", "index", "dtype", "precision"), _space_ids())
def test_every_space_configuration_matches_the_oracle(monkeypatch, space, index, dtype, precision):
    """Each configuration of the autotune spaces (= every AOT entry), forced through the autotune layer's knob
    (STRUCTURE_OPS_AUTOTUNE_FORCE) in the interpreter at a width it is launched for: N = max(BM, BN) + min/2 + 3 rows
    (ragged row and column blocks), the forward with 2 row groups × 2 column panels where there are blocks."""
    sp = tclip.FWD_SPACE if space == "clip.fwd" else tclip.BWD_SPACE
    cst = sp.configs[index].meta
    monkeypatch.setenv("STRUCTURE_OPS_AUTOTUNE_FORCE", f"{space}:{index}")
    clear_autotune_cache()
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision or old)
    try:
        _check_forced(space, cst, dtype, round_tf32=precision == "high")
    finally:
        torch.set_float32_matmul_precision(old)
    choice = [r for r in autotune_cache()[space].values() if r["source"] == "forced"]
    assert choice and all(r["index"] == index for r in choice)


def _check_forced(space, cst, dtype, round_tf32):
    bm, bn = cst["BLOCK_M"], cst["BLOCK_N"]
    d = _width_for(cst)
    n = max(bm, bn) + min(bm, bn) // 2 + 3
    a64, b64 = _data(n, d, seed=bm % 5)
    a, b = a64.to(DEV, dtype), b64.to(DEV, dtype)
    s = 11.0
    scale = torch.tensor(s, device=DEV)
    fmt = _FMT.get(dtype) or ("tf32" if round_tf32 else "fp64")
    model = _model(a.to(F64), b.to(F64), s, fmt, dtype)
    exact = _model(a.to(F64), b.to(F64), s, "fp64", dtype)
    if space == "clip.fwd":
        groups = (min(2, -(-n // bm)), min(2, -(-n // bn)))
        loss, r, c = tclip.clip_fwd(a, b, scale, groups=groups)
        tol = 1e-12 if dtype == F64 else 2e-6
        assert rel_err(r, model[1]) <= tol and rel_err(c, model[2]) <= tol
        loss_tol = tol if dtype in (F64, torch.float32) else 2.0 ** -8  # loss returned in the input dtype
        assert rel_err(loss, model[0]) <= loss_tol
        return
    # backward from the exact statistics of the rounded operands (the forward's output up to fp32 rounding)
    stat = F64 if dtype == F64 else torch.float32
    r, c = model[1].to(DEV, stat), model[2].to(DEV, stat)
    da, db, ds = tclip.clip_bwd(torch.tensor(GRAD, device=DEV), a, b, scale, r, c)
    if fmt == "fp64":  # fp64 / IEEE fp32: arithmetic rounding only
        tol = 1e-12 if dtype == F64 else 1e-5
        assert rel_err(da, exact[3]) <= tol and rel_err(db, exact[4]) <= tol
    else:
        # the kernel reproduces the hardware model (E and the operands rounded) up to fp32 accumulation and one
        # output ulp; the model's own distance to the exact gradient sets the tolerance against the oracle
        ulp = {"bf16": 2.0**-8, "fp16": 2.0**-11, "tf32": 2.0**-11}[fmt]
        for got, mod, ex in ((da, model[3], exact[3]), (db, model[4], exact[4])):
            assert rel_err(got, mod) <= ulp
            assert rel_err(got, ex) <= hw.tolerance(rel_err(mod, ex), floor=ulp)
    # ds comes back in logit_scale's dtype (fp32 here): fp32 rounding is its floor even for fp64 inputs
    assert rel_err(ds, exact[5]) <= (1e-6 if dtype == F64 else 1e-5 if fmt == "fp64" else 4 * 2.0**-11)


def test_spaces_have_large_tiles_one_output_chunk_and_are_in_the_aot_set():
    keys = {(getattr(k, "fn", k).__name__, sig.get("a_ptr"), tuple(sorted(c.items())), tuple(sorted(o.items())))
            for k, sig, c, o in tclip.AOT_KERNELS}  # fmt: skip
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
    for dtype in ptr:
        for prec in ("highest", "high", "medium"):
            for d in (3, 64, 100, 256, 384, 512, 768, 1024, 4096):
                for name, space in (("_clip_fwd_kernel", tclip.fwd_space(d, dtype, prec)),
                                    ("_clip_bwd_kernel", tclip.bwd_space(d, dtype, prec))):  # fmt: skip
                    assert space, (name, dtype, prec, d)
                    for cfg in space:
                        key = (name, ptr[dtype], tuple(sorted(cfg["constexprs"].items())),
                               tuple(sorted(cfg["options"].items())))  # fmt: skip
                        assert key in keys, key
                        assert cfg["constexprs"]["X_ON_CHIP"] == (cfg["constexprs"]["BLOCK_D"] >= d)
                bwd = tclip.bwd_space(d, dtype, prec)
                half = dtype in (torch.bfloat16, torch.float16)
                if d <= (512 if half else 256):  # one output chunk: the backward is 8 N² d
                    assert all(c["constexprs"]["BLOCK_DO"] >= d for c in bwd), (dtype, prec, d)
                if half and d <= 128:  # 128 × 128 forward tiles with A_I on chip (fp32 operands spill there)
                    big = [c for c in tclip.fwd_space(d, dtype, prec) if c["constexprs"]["BLOCK_M"] >= 128
                           and c["constexprs"]["BLOCK_N"] >= 128 and c["constexprs"]["X_ON_CHIP"]]  # fmt: skip
                    assert big, (dtype, prec, d)


def test_gemm_flops_backward_is_8_n2_d_up_to_512():
    n = 4096
    for d in (64, 256, 512):
        f = tclip.gemm_flops(n, d)
        assert f["backward"] == 8 * n * n * d and f["total"] == 10 * n * n * d
    assert tclip.gemm_flops(n, 1024)["backward"] == 12 * n * n * 1024  # two output chunks of 512


@pytest.mark.parametrize("groups", [(1, 1), (3, 1), (1, 3), (2, 3), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_forward_groups_and_panels(groups, dtype):
    """N = 41 with 16-row blocks: 3 row and 3 column blocks, every split of them into groups × panels."""
    n, d = 41, 9
    a64, b64 = _data(n, d, seed=1)
    a, b = a64.to(DEV, dtype), b64.to(DEV, dtype)
    scale = torch.tensor(9.0, device=DEV)
    loss, r, c = tclip.clip_fwd(a, b, scale, block_m=16, block_n=16, block_d=16, groups=groups)
    ex = _model(a.to(F64), b.to(F64), 9.0, "fp64", dtype)
    tol = 1e-13 if dtype == F64 else 1e-6
    assert rel_err(loss, ex[0]) <= tol and rel_err(r, ex[1]) <= tol and rel_err(c, ex[2]) <= tol


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_at_each_precision(precision):
    """The default launch path at each float32 matmul precision: IEEE for "highest" (fp32 arithmetic only),
    TF32 with RNA-rounded operands otherwise (the float64 model on tf32-rounded operands)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        n, d = 45, 70  # d > 64: the interpreter's K-loop (BLOCK_D 64) with a partial second step
        a64, b64 = _data(n, d, seed=2)
        a, b = a64.to(DEV, torch.float32), b64.to(DEV, torch.float32)
        scale = torch.tensor(20.0, device=DEV)
        loss, r, c = tclip.clip_fwd(a, b, scale)
        da, db, ds = tclip.clip_bwd(torch.tensor(GRAD, device=DEV), a, b, scale, r, c)
    finally:
        torch.set_float32_matmul_precision(old)
    fmt = "fp64" if precision == "highest" else "tf32"
    model = _model(a.to(F64), b.to(F64), 20.0, fmt, torch.float32)
    exact = _model(a.to(F64), b.to(F64), 20.0, "fp64", torch.float32)
    assert rel_err(loss, model[0]) <= 2e-6 and rel_err(r, model[1]) <= 2e-6 and rel_err(c, model[2]) <= 2e-6
    if fmt == "tf32":  # the value check tells rounding from the exact product
        assert rel_err(exact[0], model[0]) > 10 * 2e-6
    ulp = 1e-5 if fmt == "fp64" else 2.0**-11
    for got, mod, ex in ((da, model[3], exact[3]), (db, model[4], exact[4])):
        assert rel_err(got, mod) <= ulp
        assert rel_err(got, ex) <= hw.tolerance(rel_err(mod, ex), floor=ulp)
    assert rel_err(ds, exact[5]) <= 4 * ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_inputs_default_path(dtype):
    n, d = 53, 24
    a64, b64 = _data(n, d, seed=3)
    a, b = a64.to(DEV, dtype), b64.to(DEV, dtype)
    scale = torch.tensor(14.0, device=DEV)
    loss, r, c = tclip.clip_fwd(a, b, scale)
    da, db, ds = tclip.clip_bwd(torch.tensor(GRAD, device=DEV), a, b, scale, r, c)
    fmt = _FMT[dtype]
    model = _model(a.to(F64), b.to(F64), 14.0, fmt, dtype)
    exact = _model(a.to(F64), b.to(F64), 14.0, "fp64", dtype)
    assert loss.dtype == dtype and r.dtype == torch.float32 and da.dtype == dtype and db.dtype == dtype
    assert rel_err(r, model[1]) <= 2e-6 and rel_err(c, model[2]) <= 2e-6  # fp32 statistics of exact products
    ulp = {"bf16": 2.0**-8, "fp16": 2.0**-11}[fmt]
    for got, mod, ex in ((da, model[3], exact[3]), (db, model[4], exact[4])):
        assert rel_err(got, mod) <= ulp
        assert rel_err(got, ex) <= hw.tolerance(rel_err(mod, ex), floor=ulp)
    assert rel_err(ds, exact[5]) <= 1e-5


@pytest.mark.parametrize("scale_dtype", [torch.float32, F64])
def test_logit_scale_gradient(scale_dtype):
    """ds = Σ dL ∘ (A Bᵀ) against autograd through the oracle, at a small and a large scale, and against a central
    finite difference of the float64 loss (an independent check of the formula)."""
    n, d = 29, 12
    a64, b64 = _data(n, d, seed=4)
    for s in (0.5, 100.0):
        scale = torch.tensor(s, dtype=scale_dtype, device=DEV)
        _, r, c = tclip.clip_fwd(a64.to(DEV), b64.to(DEV), scale, groups=(2, 1))
        _, _, ds = tclip.clip_bwd(torch.tensor(GRAD, device=DEV), a64.to(DEV), b64.to(DEV), scale, r, c)
        st = torch.tensor(s, dtype=F64, requires_grad=True)
        (gs,) = torch.autograd.grad(GRAD * reference.clip_loss(a64, b64, st, normalize=False), (st,))
        h = 1e-5 * s
        fd = GRAD * (reference.clip_loss(a64, b64, s + h, normalize=False)
                     - reference.clip_loss(a64, b64, s - h, normalize=False)) / (2 * h)  # fmt: skip
        assert ds.dtype == scale_dtype and ds.shape == ()
        tol = 1e-12 if scale_dtype == F64 else 1e-6
        assert rel_err(ds, gs) <= tol
        assert rel_err(gs, fd) <= 1e-7


def test_two_runs_are_bitwise_equal():
    n, d = 70, 20
    a64, b64 = _data(n, d, seed=5)
    a, b = a64.to(DEV, torch.float32), b64.to(DEV, torch.float32)
    scale = torch.tensor(12.0, device=DEV)
    runs = []
    for _ in range(2):
        loss, r, c = tclip.clip_fwd(a, b, scale, block_m=16, block_n=32, groups=(3, 2))
        grads = tclip.clip_bwd(torch.tensor(GRAD, device=DEV), a, b, scale, r, c, block_m=16, block_n=32)
        runs.append((loss, r, c, *grads))
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------
# Extra memory: what the launch code allocates, with the kernels replaced by recorders (no compute)
# --------------------------------------------------------------------------------------------------
class _NoLaunch:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, grid))

        return launch


def _allocations(fn):
    """Bytes of every tensor created by torch.empty/zeros/full/*_like while ``fn`` runs (kernels not run)."""
    sizes, names = [], ("empty", "zeros", "full", "empty_like", "zeros_like")
    saved = {name: getattr(torch, name) for name in names}

    def spy(orig):
        def wrapped(*args, **kwargs):
            t = orig(*args, **kwargs)
            sizes.append(t.numel() * t.element_size())
            return t

        return wrapped

    try:
        for name in names:
            setattr(torch, name, spy(saved[name]))
        out = fn()
    finally:
        for name in names:
            setattr(torch, name, saved[name])
    return sizes, out


@pytest.mark.parametrize("sms", [1, 132])
def test_extra_memory_is_linear_in_n(monkeypatch, sms):
    """Forward: diag, the (m, l) partials of RG row groups and CP column panels (RG, CP ≤ GROUP_CAP) and the
    per-block loss sums; backward: the per-row-block ds partials. Counted from the launch code's allocations at
    N up to 262 144 (d = 4 keeps the inputs small), with ≈ 2 programs per SM for ``sms`` SMs: the bytes per row
    are bounded by a constant (2·(2·GROUP_CAP) statistics + 1), never N/BLOCK_M-sized per row as the former
    per-row-block column partials (8.6 GB at N = 262 144)."""
    log = []
    monkeypatch.setattr(tclip, "_clip_fwd_kernel", _NoLaunch(log, "fwd"))
    monkeypatch.setattr(tclip, "_clip_col_merge_kernel", _NoLaunch(log, "merge"))
    monkeypatch.setattr(tclip, "_clip_bwd_kernel", _NoLaunch(log, "bwd"))
    monkeypatch.setattr(tclip, "_num_sms", lambda dev: sms)
    monkeypatch.setenv("STRUCTURE_OPS_AUTOTUNE", "0")  # the default configuration, no timing runs
    per_row = []
    for n in (1024, 16384, 262144):
        a = torch.zeros(n, 4, device=DEV)
        scale = torch.tensor(1.0, device=DEV)
        cfg = tclip.fwd_config(4, torch.float32)
        sizes, (_, r, c) = _allocations(lambda a=a, scale=scale: tclip.clip_fwd(a, a, scale))
        rg, cp = log[-2][1]
        assert (rg, cp) == tclip.fwd_grid(n, cfg["constexprs"]["BLOCK_M"], cfg["constexprs"]["BLOCK_N"], sms)
        assert rg <= tclip.GROUP_CAP and cp <= tclip.GROUP_CAP and rg * cp <= max(2 * sms, 1) + rg
        outputs = r.numel() * 4 + c.numel() * 4 + 4  # lse_row, lse_col, the loss
        extra = sum(sizes) - outputs
        want = tclip.workspace_bytes(n, torch.float32, cfg["constexprs"]["BLOCK_M"], rg, cp)["forward"]
        assert extra <= want + 64, (extra, want)  # + the loss reduction's scalars
        assert extra <= 4 * (2 * 2 * tclip.GROUP_CAP + 2) * n + 8 * n // 64 + 64
        per_row.append(extra / n)
        bcfg = tclip.bwd_config(4, torch.float32)
        sizes, _ = _allocations(lambda a=a, scale=scale, r=r, c=c: tclip.clip_bwd(torch.tensor(1.0), a, a, scale, r, c))
        extra_b = sum(sizes) - 2 * n * 4 * 4 - 4  # minus dA, dB and ds
        assert extra_b <= tclip.workspace_bytes(n, torch.float32, bcfg["constexprs"]["BLOCK_M"], 1, 1)["backward"] + 64
        assert extra_b <= 4 * n // bcfg["constexprs"]["BLOCK_M"] + 64
    # bytes per row do not grow with N (they shrink once RG, CP reach their caps or the block counts)
    assert per_row[-1] <= per_row[0] + 1e-9 or per_row[-1] <= 4 * (2 * 2 * tclip.GROUP_CAP + 2)


def test_forced_configuration_is_validated():
    a64, b64 = _data(20, 40)
    a, b = a64.to(DEV, torch.float32), b64.to(DEV, torch.float32)
    cfg = tclip.fwd_space(16, torch.float32, "highest")[0]  # A_I on chip for d ≤ BLOCK_D, not for d = 40
    if cfg["constexprs"]["BLOCK_D"] < 40:
        with pytest.raises(ValueError, match="X_ON_CHIP"):
            tclip.clip_fwd(a, b, torch.tensor(1.0, device=DEV), config=cfg)
    with pytest.raises(ValueError, match="groups"):
        tclip.clip_fwd(a, b, torch.tensor(1.0, device=DEV), groups=(0, 1))
