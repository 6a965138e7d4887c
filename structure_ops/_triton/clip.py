r"""Symmetric InfoNCE (CLIP) loss, both directions in one op, as Triton kernels (docs/kernels.md §4).

Same semantics and return conventions as the C++ ops ``structure_ops::clip_fwd`` / ``clip_bwd``
(csrc/cpu/clip_cpu.cpp); the inputs are already L2-normalized by the caller and ``logit_scale`` is the
multiplier s itself (a tensor; its gradient is Σ_ij dL_ij (A Bᵀ)_ij, no exp chain rule here):

    L = s · A Bᵀ,   r_i = lse_j L_ij,   c_j = lse_i L_ij
    loss = (1/2N) [Σ_i (r_i − L_ii) + Σ_j (c_j − L_jj)]                    (0-dim, dtype of image)
    dL_ij = (g/2N) (e^{L_ij − r_i} + e^{L_ij − c_j} − 2δ_ij)
    dA = s · dL B,   dB = s · dLᵀ A,   ds = Σ_ij dL_ij (A Bᵀ)_ij

Returns: clip_fwd → (loss [image dtype, 0-dim], lse_row, lse_col [fp32, fp64 for fp64 inputs]);
clip_bwd → (grad_image [image dtype], grad_text [text dtype], grad_logit_scale [shape, dtype and device
of logit_scale]).

Pass structure (GEMM FLOPs; C = ⌈d / BLOCK_DO⌉ output column chunks of the backward; BLOCK_DO is capped
at 256 (128 for fp64) so that the fp32 dX accumulator fits in registers without spills (ptxas -v,
sm_80/sm_90), hence C = 1 for d ≤ 256 and C = 2 at d = 512):

  forward   _clip_fwd_kernel: one program per row block I loops over all column blocks J; each tile
            L_IJ = s·A_I B_Jᵀ (tl.dot, K-loop over d) feeds an online row log-sum-exp (registers) and a
            column partial (max, Σexp) per (I, j) written to a (⌈N/BM⌉ × N) buffer; the diagonal logits
            are picked from the tiles that hold them.                                           2 N² d
            _clip_col_merge_kernel: logaddexp of the column partials over the row blocks → c_j, and
            per-block partial sums of (r_j − L_jj) + (c_j − L_jj) for the loss (O(N²/BM) floats).
  backward  _clip_bwd_kernel, one launch, grid (⌈N/BM⌉, 2, C): role 0 programs own a row block of A
            and emit dA_I = s·dL_I,: B (+ the ds partial of their rows); role 1 programs own a row block
            of B (a column block of L) and emit dB_J = s·dL_:,Jᵀ A. Each recomputes its tiles
            (2 N² d per role and chunk) and multiplies (2 N² d per role).                 (4C + 4) N² d
  total     10 N² d for C = 1 (2 forward + 8 backward); 14 N² d at d = 512 (C = 2).

Why 10 and not the 8 N² d of a single backward sweep: emitting dA and dB from the same recomputed tile
needs a cross-program reduction of dB (atomics: not deterministic) or an N × d partial per row block
(O(N² d / BM) memory). Recomputing each tile once per owner costs 2 N² d more and keeps the result
bitwise deterministic with O(N) extra memory (2N lse + the O(N²/BM) column partial buffer of the
forward; the backward keeps only per-row-block ds partials).

Precision (docs/kernels.md §6): fp32 tiles use tl.dot(input_precision=dot_precision(fp32)) ("ieee" for
torch's "highest", TF32 otherwise); bf16/fp16 use tensor cores with fp32 accumulation; fp64 uses fp64
dots (DMMA on sm_80/sm_90). Log-sum-exp and softmax math run in fp32 (fp64 for fp64 inputs). In the
backward the bracket E = e^{L−r} + e^{L−c} − 2δ ∈ [−2, 2] is cast to the input dtype for the second
GEMM (the factor g·s/2N is applied to the fp32 accumulator afterwards, so no 1/N-sized value is ever
rounded to bf16/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    PRECISIONS,
    compute_dtype,
    device_guard,
    dot_operand,
    dot_precision,
    next_pow2,
    round_tf32,
)

__all__ = ["clip_fwd", "clip_bwd", "gemm_flops", "fwd_config", "bwd_config", "aot_configs", "AOT_KERNELS"]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def gemm_flops(n: int, d: int, block_do: int = 256) -> dict[str, int]:
    """GEMM FLOPs of the forward and backward passes (the module docstring's model)."""
    c = -(-d // block_do)
    return {"forward": 2 * n * n * d, "backward": (4 * c + 4) * n * n * d, "total": (4 * c + 6) * n * n * d}


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
# Only core builtins inside the kernels (tl.full / tl.reduce, not tl.zeros / tl.sum / tl.max): those are
# @jit functions of triton.language.standard, and when triton was imported before TRITON_INTERPRET=1 was
# set (importing torch._dynamo imports triton) the interpreter refuses to call them. Same code on the GPU.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _maximum)


@triton.jit
def _clip_fwd_kernel(
    a_ptr, b_ptr, s_ptr,  # A, B: (N, D) contiguous; s: 1 value in the statistics dtype
    lse_row_ptr, diag_ptr,  # (N,) outputs: r_i and L_ii
    cmax_ptr, csum_ptr,  # (⌈N/BM⌉, N) column partials: max_i∈I L_ij and Σ_i∈I e^{L_ij − max}
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    # Math: for the row block I (this program) and every column block J,
    #   L_IJ = s · A_I B_Jᵀ                                   (tl.dot over D in BLOCK_D chunks)
    #   row:    m_i ← max(m_i, max_j L_ij),  l_i ← l_i e^{m_i,old − m_i} + Σ_j e^{L_ij − m_i}
    #           r_i = m_i + log l_i                            (online log-sum-exp, registers)
    #   column: M_Ij = max_{i∈I} L_ij,  S_Ij = Σ_{i∈I} e^{L_ij − M_Ij}   → buffers, merged by
    #           _clip_col_merge_kernel as c_j = logaddexp_I (M_Ij + log S_Ij)
    #   diag:   L_ii is read from the tile J ∋ i (the C++ op uses the same product).
    # Why one pass for both directions: the column statistics need the same tiles as the row ones, so
    # the second direction costs only exps and an O(N²/BM) buffer, not another 2 N² d GEMM.
    ACC: tl.constexpr = lse_row_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rl = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + rl
    row_ok = rows < N
    cl = tl.arange(0, BLOCK_N)
    kl = tl.arange(0, BLOCK_D)
    # Addresses: scalar int64 block bases (N·D may exceed 2³¹) + int32 offsets inside a block, so the
    # per-element address arithmetic stays 32-bit (fewer registers than int64 offset tensors).
    a_blk = a_ptr + (pid * BLOCK_M).to(tl.int64) * D
    s = tl.load(s_ptr).to(ACC)

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.full((BLOCK_M,), 0.0, ACC)
    diag = tl.full((BLOCK_M,), 0.0, ACC)
    buf_off = pid.to(tl.int64) * N
    b_blk = b_ptr
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + cl
        col_ok = cols < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
        for k0 in range(0, D, BLOCK_D):
            k_ok = (k0 + kl) < D
            x = tl.load(a_blk + k0 + rl[:, None] * D + kl[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(b_blk + k0 + cl[:, None] * D + kl[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter miscomputes bf16 dots: feed it fp32 (exact products)
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            # fp32 at TF32: operands rounded to nearest (ties away) here, not truncated by the tensor cores
            x = dot_operand(x, ROUND_TF32)
            y = dot_operand(y, ROUND_TF32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        b_blk += BLOCK_N * D
        logits = acc * s
        diag += _rsum(tl.where(rows[:, None] == cols[None, :], logits, 0.0), 1)

        # Row direction: masked columns are −inf, so they add e^{−inf} = 0. A non-finite running max
        # is replaced by 0 in the exponent (the C++ op's rule), so ±inf logits give inf/NaN, not a trap.
        lv = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, _rmax(lv, 1))
        m_use = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        l_i = l_i * tl.exp(m_i - m_use) + _rsum(tl.exp(lv - m_use[:, None]), 1)
        m_i = m_new

        # Column direction: this row block's partial statistics of every column of the tile.
        cv = tl.where(row_ok[:, None], logits, float("-inf"))
        cm = _rmax(cv, 0)
        cm_use = tl.where(tl.abs(cm) < float("inf"), cm, 0.0)
        cs = _rsum(tl.exp(cv - cm_use[None, :]), 0)
        tl.store(cmax_ptr + buf_off + cols, cm_use, mask=col_ok)
        tl.store(csum_ptr + buf_off + cols, cs, mask=col_ok)

    m_fin = tl.where(tl.abs(m_i) < float("inf"), m_i, 0.0)
    tl.store(lse_row_ptr + rows, m_fin + tl.log(l_i), mask=row_ok)
    tl.store(diag_ptr + rows, diag, mask=row_ok)


@triton.jit
def _clip_col_merge_kernel(
    cmax_ptr, csum_ptr, lse_row_ptr, diag_ptr,  # inputs (see _clip_fwd_kernel)
    lse_col_ptr, loss_part_ptr,  # outputs: c_j (N,), per-block Σ_j (r_j − L_jj) + (c_j − L_jj) (fp64)
    N, NUM_ROW_BLOCKS,
    BLOCK: tl.constexpr,
):
    # Math: c_j = log Σ_I S_Ij e^{M_Ij}, evaluated as a running logaddexp over the row blocks I
    #   m ← max(m, M_Ij),  l ← l e^{m_old − m} + S_Ij e^{M_Ij − m},  c_j = m + log l,
    # then the loss terms of this column block, (r_j − L_jj) + (c_j − L_jj), summed in fp64 (the C++ op
    # accumulates the loss in double). Deterministic: fixed loop order, one program per column block.
    ACC: tl.constexpr = lse_col_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    m = tl.full((BLOCK,), float("-inf"), ACC)
    l = tl.full((BLOCK,), 0.0, ACC)
    off = cols.to(tl.int64)  # int64 running offset: (N/BM)·N may exceed 2³¹
    for _ in range(0, NUM_ROW_BLOCKS):
        cm = tl.load(cmax_ptr + off, mask=ok, other=0.0)
        cs = tl.load(csum_ptr + off, mask=ok, other=1.0)
        m_new = tl.maximum(m, cm)
        l = l * tl.exp(m - m_new) + cs * tl.exp(cm - m_new)
        m = m_new
        off += N
    c = m + tl.log(l)
    tl.store(lse_col_ptr + cols, c, mask=ok)
    r = tl.load(lse_row_ptr + cols, mask=ok, other=0.0)
    dg = tl.load(diag_ptr + cols, mask=ok, other=0.0)
    t = ((r - dg) + (c - dg)).to(tl.float64)
    tl.store(loss_part_ptr + pid, _rsum(tl.where(ok, t, 0.0), 0))


@triton.jit
def _clip_bwd_kernel(
    a_ptr, b_ptr, s_ptr, g_ptr,  # A, B (N, D) contiguous; s, g: 1 value each in the statistics dtype
    lse_row_ptr, lse_col_ptr,  # r, c (N,)
    da_ptr, db_ptr,  # (N, D) outputs, dtype of A / B
    ds_part_ptr,  # (⌈N/BM⌉,) per-row-block partials of ds (written by role 0, chunk 0)
    N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    # Math: dL_ij = coef · E_ij with coef = g/2N and E_ij = e^{L_ij − r_i} + e^{L_ij − c_j} − 2δ_ij.
    # E is symmetric in the roles of (A, r) and (B, c): with M = X Yᵀ·s, u = own lse, v = other lse,
    #   dX_I = s · coef · Σ_J E(M_IJ; u_I, v_J) Y_J          (X, Y, u, v) = (A, B, r, c) → dA (role 0)
    #                                                        (X, Y, u, v) = (B, A, c, r) → dB (role 1)
    # so one kernel body serves both owners: program (I, role, chunk) owns rows I of X and the output
    # columns [chunk·BLOCK_DO, …) of dX, recomputes M_IJ for every J (2·BM·BN·D) and accumulates
    # E_IJ · Y_J[:, chunk] (2·BM·BN·BLOCK_DO) in fp32 registers. Every output element is written once
    # by one program: deterministic, no atomics, no N × N buffer.
    #   ds = Σ_ij dL_ij (A Bᵀ)_ij = coef · Σ_I Σ_i∈I Σ_j E_ij (A Bᵀ)_ij: role 0, chunk 0 writes its block's sum.
    # Why E and not dL in the second GEMM: E ∈ [−2, 2] survives the cast to bf16/fp16 for tensor cores;
    # coef ~ 1/N would underflow fp16 at large N. coef·s scales the fp32 accumulator at the end.
    ACC: tl.constexpr = lse_row_ptr.dtype.element_ty
    pid = tl.program_id(0)
    role = tl.program_id(1)
    chunk = tl.program_id(2)
    if role == 0:
        x_ptr = a_ptr
        y_ptr = b_ptr
        u_ptr = lse_row_ptr
        v_ptr = lse_col_ptr
        o_ptr = da_ptr
    else:
        x_ptr = b_ptr
        y_ptr = a_ptr
        u_ptr = lse_col_ptr
        v_ptr = lse_row_ptr
        o_ptr = db_ptr

    # Addresses: scalar int64 block bases + int32 offsets inside a block (see _clip_fwd_kernel).
    rl = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + rl
    row_ok = rows < N
    x_blk = x_ptr + (pid * BLOCK_M).to(tl.int64) * D
    s = tl.load(s_ptr).to(ACC)
    g = tl.load(g_ptr).to(ACC)
    coef = g / (2 * N).to(ACC)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
    cl = tl.arange(0, BLOCK_N)
    kl = tl.arange(0, BLOCK_D)
    dos = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = dos < D

    out = tl.full((BLOCK_M, BLOCK_DO), 0.0, ACC)
    ds_rows = tl.full((BLOCK_M,), 0.0, ACC)
    y_blk = y_ptr
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + cl
        col_ok = cols < N
        # other=+inf: a masked column contributes e^{M − inf} = 0 (it is also zeroed below).
        v = tl.load(v_ptr + cols, mask=col_ok, other=float("inf"))
        dot = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
        for k0 in range(0, D, BLOCK_D):
            k_ok = (k0 + kl) < D
            x = tl.load(x_blk + k0 + rl[:, None] * D + kl[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(y_blk + k0 + cl[:, None] * D + kl[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            x = dot_operand(x, ROUND_TF32)
            y = dot_operand(y, ROUND_TF32)
            dot = tl.dot(x, tl.trans(y), dot, input_precision=DOT_PRECISION, out_dtype=ACC)
        m = dot * s
        e = tl.exp(m - u[:, None]) + tl.exp(m - v[None, :])
        e = tl.where(rows[:, None] == cols[None, :], e - 2.0, e)
        e = tl.where(row_ok[:, None] & col_ok[None, :], e, 0.0)
        ds_rows += _rsum(e * dot, 1)
        yo = tl.load(y_blk + cl[:, None] * D + dos[None, :], mask=col_ok[:, None] & do_ok[None, :], other=0.0)
        if UPCAST:
            yo = yo.to(tl.float32)
        eo = dot_operand(e.to(yo.dtype), ROUND_TF32)
        yo = dot_operand(yo, ROUND_TF32)
        out = tl.dot(eo, yo, out, input_precision=DOT_PRECISION, out_dtype=ACC)
        y_blk += BLOCK_N * D

    out = out * (coef * s)
    o_offs = rl[:, None] * D + dos[None, :]
    tl.store(o_ptr + (pid * BLOCK_M).to(tl.int64) * D + o_offs, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & do_ok[None, :])
    if role == 0:
        if chunk == 0:
            tl.store(ds_part_ptr + pid, coef * _rsum(ds_rows, 0))


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _check(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, op: str) -> None:
    # The C++ op's checks (csrc/common/checks.h), same messages, same exception type (RuntimeError).
    for t, name in ((image, "image"), (text, "text")):
        if t.dim() != 2:
            raise RuntimeError(f"{name} must be a 2-D (N, d) tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[0] < 2:
            raise RuntimeError(f"{name} needs at least N = 2 rows, got shape {tuple(t.shape)}")
        if t.shape[1] < 1:
            raise RuntimeError(f"{name} needs at least one feature column, got shape {tuple(t.shape)}")
    if image.shape[0] != text.shape[0]:
        raise RuntimeError(f"image and text must have the same number of rows N, got {tuple(image.shape)} and {tuple(text.shape)}")
    if image.dtype != text.dtype:
        raise RuntimeError(f"image and text must have the same dtype, got {image.dtype} and {text.dtype}")
    if image.device != text.device:
        raise RuntimeError(f"image and text must be on the same device, got {image.device} and {text.device}")
    if image.shape[1] != text.shape[1]:
        raise RuntimeError(f"image and text must have the same embedding width, got {tuple(image.shape)} and {tuple(text.shape)}")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        shape = tuple(logit_scale.shape) if isinstance(logit_scale, torch.Tensor) else type(logit_scale).__name__
        raise RuntimeError(f"logit_scale must hold exactly one value, got shape {shape}")
    if image.dtype not in _SUPPORTED:
        raise NotImplementedError(f"{op} (triton): dtype {image.dtype} is not supported (fp32, bf16, fp16, fp64)")
    if not INTERPRET and image.device.type != "cuda":
        raise RuntimeError(f"{op} (triton): image must be a CUDA tensor, got {image.device}")


def fwd_config(d: int, dtype: torch.dtype, precision: str | None = None, interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_clip_fwd_kernel`` as the host launches it for width ``d`` and ``dtype`` (fp32:
    torch's float32 matmul ``precision``, default the current one). aot.py compiles exactly these."""
    if interpret:  # few programs, big blocks: the interpreter pays per program and per op
        bm, bn, bd, w = 32, 32, min(64, max(16, next_pow2(d))), 4
    elif dtype == torch.float64:
        bm, bn, bd, w = 64, 32, 16, 4
    elif dtype == torch.float32:
        bm, bn, bd, w = 64, 64, 32, 8
    else:
        bm, bn, bd, w = 128, 64, 64, 8
    cst = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PRECISION=dot_precision(dtype, precision),
               UPCAST=bool(interpret) and dtype == torch.bfloat16, ROUND_TF32=round_tf32(dtype, precision))
    return {"constexprs": cst, "options": {"num_warps": w}}


def merge_config(dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_clip_col_merge_kernel``."""
    return {"constexprs": {"BLOCK": 64 if interpret else 256}, "options": {"num_warps": 4}}


def bwd_config(d: int, dtype: torch.dtype, precision: str | None = None, interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_clip_bwd_kernel`` (host launch and aot.py). BLOCK_DO covers all of d when d ≤
    the cap (C = 1, 10 N² d in all); above it the tiles are recomputed once per output chunk. The cap keeps the
    fp32 dX accumulator in registers without spills on sm_90 (ptxas -v, aot.py --no-spills): 128 for fp64 and for
    IEEE fp32 (FMA dots hold their operands in registers), 256 otherwise."""
    prec = dot_precision(dtype, precision)
    if interpret:
        bm, bn, bd, w, cap = 32, 32, min(64, max(16, next_pow2(d))), 4, 128
    elif dtype == torch.float64:
        bm, bn, bd, w, cap = 32, 32, 16, 4, 128
    elif dtype == torch.float32:
        # IEEE fp32 (FMA dots hold their operands in registers): BLOCK_D 16 (68 B of spills at 32, BLOCK_DO 128)
        bm, bn, bd, w, cap = 64, 32, (16 if prec == "ieee" else 32), 8, (128 if prec == "ieee" else 256)
    else:
        bm, bn, bd, w, cap = 64, 32, 32, 8, 256  # BLOCK_D 32: 24 B of spills at 64 with BLOCK_DO 128
    bdo = min(cap, max(16, next_pow2(d)))
    cst = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo, DOT_PRECISION=prec,
               UPCAST=bool(interpret) and dtype == torch.bfloat16, ROUND_TF32=round_tf32(dtype, precision))
    return {"constexprs": cst, "options": {"num_warps": w}}


def _override(cfg: dict, **blocks) -> dict:
    cst = cfg["constexprs"]
    for name, v in blocks.items():
        if v is None:
            continue
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name.lower()} must be a power of two ≥ 16, got {v}")
        cst[name] = int(v)
    return cfg


def _scalar(t: torch.Tensor, device, dtype) -> torch.Tensor:
    # A device-side copy: the kernels load s and g themselves (no host synchronization, unlike .item()).
    return t.detach().reshape(1).to(device=device, dtype=dtype)


def clip_fwd(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
):
    """``structure_ops::clip_fwd`` in Triton: (loss, lse_row, lse_col). See the module docstring.

    loss is 0-dim in image's dtype; lse_row/lse_col are (N,) in fp32 (fp64 for fp64 inputs). Extra
    O(N + N²/BLOCK_M) memory. ``block_*`` override the tile shape (powers of two ≥ 16; for tests).
    """
    _check(image, text, logit_scale, "clip_fwd")
    a, b = image.detach().contiguous(), text.detach().contiguous()
    n, d = a.shape
    cdt = compute_dtype(a.dtype)
    cfg = _override(fwd_config(d, a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    nrb = triton.cdiv(n, cfg["constexprs"]["BLOCK_M"])
    dev = a.device
    with device_guard(dev):
        s = _scalar(logit_scale, dev, cdt)
        lse_row = torch.empty(n, device=dev, dtype=cdt)
        lse_col = torch.empty(n, device=dev, dtype=cdt)
        diag = torch.empty(n, device=dev, dtype=cdt)
        cmax = torch.empty((nrb, n), device=dev, dtype=cdt)
        csum = torch.empty((nrb, n), device=dev, dtype=cdt)
        _clip_fwd_kernel[(nrb,)](a, b, s, lse_row, diag, cmax, csum, n, d, **cfg["constexprs"], **cfg["options"])
        mcfg = merge_config(a.dtype)
        ncb = triton.cdiv(n, mcfg["constexprs"]["BLOCK"])
        loss_part = torch.empty(ncb, device=dev, dtype=torch.float64)
        _clip_col_merge_kernel[(ncb,)](
            cmax, csum, lse_row, diag, lse_col, loss_part, n, nrb, **mcfg["constexprs"], **mcfg["options"]
        )
    loss = (loss_part.sum() / (2.0 * n)).to(image.dtype)
    return loss, lse_row, lse_col


def clip_bwd(
    grad: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    block_do: int | None = None,
):
    """``structure_ops::clip_bwd`` in Triton: (grad_image, grad_text, grad_logit_scale).

    grad is the upstream gradient of the loss (a 1-element tensor). grad_logit_scale = Σ dL ∘ (A Bᵀ)
    has logit_scale's shape, dtype and device. Deterministic (no atomics); extra memory O(N/BLOCK_M).
    """
    _check(image, text, logit_scale, "clip_bwd")
    a, b = image.detach().contiguous(), text.detach().contiguous()
    n, d = a.shape
    cdt = compute_dtype(a.dtype)
    for t, name in ((lse_row, "lse_row"), (lse_col, "lse_col")):
        if t.numel() != n:
            raise RuntimeError(f"{name} must hold N = {n} values, got shape {tuple(t.shape)}")
    cfg = _override(bwd_config(d, a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DO=block_do)
    cst = cfg["constexprs"]
    dev = a.device
    with device_guard(dev):
        s = _scalar(logit_scale, dev, cdt)
        g = _scalar(grad, dev, cdt)
        r = lse_row.detach().reshape(n).to(device=dev, dtype=cdt).contiguous()
        c = lse_col.detach().reshape(n).to(device=dev, dtype=cdt).contiguous()
        da = torch.empty((n, d), device=dev, dtype=image.dtype)
        db = torch.empty((n, d), device=dev, dtype=text.dtype)
        nrb = triton.cdiv(n, cst["BLOCK_M"])
        ds_part = torch.empty(nrb, device=dev, dtype=cdt)
        _clip_bwd_kernel[(nrb, 2, triton.cdiv(d, cst["BLOCK_DO"]))](
            a, b, s, g, r, c, da, db, ds_part, n, d, **cst, **cfg["options"]
        )
    ds = ds_part.sum().reshape(logit_scale.shape).to(device=logit_scale.device, dtype=logit_scale.dtype)
    return da, db, ds


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): every launch the host can make on a GPU, from fwd/merge/bwd_config.
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
AOT_WIDTHS = (16, 32, 64, 128, 256, 512)  # every BLOCK_DO below and at the caps


def _signature(kernel, ptr: str, stat: str, constexprs: dict) -> dict[str, str]:
    operands = ("a_ptr", "b_ptr", "da_ptr", "db_ptr")
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "loss_part_ptr":
            sig[name] = "*fp64"
        elif name.endswith("_ptr"):
            sig[name] = ptr if name in operands else stat
        else:
            sig[name] = "i32"
    return sig


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options) for every dtype, float32 matmul precision and width class,
    from the host's own config functions, deduplicated."""
    seen, entries = set(), []
    for dtype, ptr in _PTR.items():
        stat = "*fp64" if dtype == torch.float64 else "*fp32"
        for precision in PRECISIONS:
            for d in AOT_WIDTHS:
                for kernel, cfg in (
                    (_clip_fwd_kernel, fwd_config(d, dtype, precision, interpret=False)),
                    (_clip_col_merge_kernel, merge_config(dtype, interpret=False)),
                    (_clip_bwd_kernel, bwd_config(d, dtype, precision, interpret=False)),
                ):
                    cst = cfg["constexprs"]
                    key = (id(kernel), ptr, tuple(cst.items()),
                           tuple(cfg["options"].items()))
                    if key not in seen:
                        seen.add(key)
                        entries.append((kernel, _signature(kernel, ptr, stat, cst), dict(cst), dict(cfg["options"])))
    return entries


AOT_KERNELS = aot_configs()
