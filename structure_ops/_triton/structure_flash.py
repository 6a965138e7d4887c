r"""STRUCTURE level 1, pass structure (b) of docs/kernels.md §2: flash-style fused tiles, O(N) saved state.

Math (X̂ = xh: N × d_x, Ẑ = zh: N × d_z, both already normalized and centered):

    S^U = Û Ûᵀ / τ                     (cosine)    or    S^U_ij = exp(−γ ‖û_i − û_j‖²)        (rbf)
    a_ij = S^X_ij − lseX_i,  b_ij = S^Z_ij − lseZ_i,  P = e^a,  Q = e^b       (row softmax, diagonal kept)
    D = (1/N) Σ_i ℓ_i,  ℓ_i = Σ_j term(P_ij, Q_ij)
      "structure": term = ¼ (P̃ + Q̃) log1p((P̃ − Q̃)² / (4 P̃ Q̃)),  P̃ = P + ε, Q̃ = Q + ε
      "js":        term = ½ [P log(P/M) + Q log(Q/M)],  log(Q/M) = ln2 − softplus(a − b)   (no ε)

Gradient (docs/kernels.md §1), the loss being a scalar it is computed in the same call:

    Q∘g: "structure" ¼ Q T − ¼ P̃ (Q/Q̃),   T = log1p(...);   "js" ½ Q log(Q/M)
    ḡ_i = Σ_j Q_ij g_ij,   W = Q∘(g − ḡ)/N
    cosine: dẐ = (W + Wᵀ) Ẑ / τ;     rbf: K = 2γ S^Z∘W, dẐ = (K + Kᵀ) Ẑ − (K·1 + Kᵀ·1)∘Ẑ
    dX̂ the same with P, ∂term/∂P (the divergence is symmetric in P, Q).

This is what ``structure_ops.reference.structure_core`` (levels=1, margin=0) and
``reference.structure_core_level1_grad`` compute, and what csrc/cpu/structure_cpu.cpp's level-1 path computes
(same stable bracket, same softplus form of js, same ε placement).

Passes (three launches plus one per requested gradient and one N-element host reduction; saved state lseX, lseZ,
ḡ_Z, ḡ_X, ℓ_i and, for rbf, the squared row norms: ≤ 7N floats, nothing N × N):

  A  ``_lse_kernel`` (once per side): a program owns BLOCK_M rows, loops over column blocks, builds the S tile
     with tl.dot over d in BLOCK_K chunks and keeps an online (max, sum) per row → lse (N floats per side).
  B  ``_loss_kernel``: recomputes both S tiles of a row block; with both final normalizers known, exact ε terms
     → ℓ_i and ḡ_i. (A and B cannot merge: the ε terms need the final lse of both rows.)
  C  ``_grad_kernel`` (only when a gradient is requested), ONE LAUNCH PER REQUESTED SIDE ("own" = Ẑ with Q, or X̂
     with P): a program owns row block K and one BLOCK_D chunk of the own side's feature columns (grid
     (⌈N/BLOCK_M⌉, n_c)) and loops over column blocks L. S is symmetric, so the tiles S_KL also give S_LK = S_KLᵀ:
     the program evaluates W_KL (normalized by rows K) and W_LKᵀ (same entries normalized by rows L, whose lse/ḡ
     were saved) and accumulates (W + Wᵀ)_KL Û_L with ONE GEMM into a BLOCK_M × BLOCK_D fp32 accumulator. Every
     output row is written by exactly one program: deterministic, no atomics, no N × N buffer. One side per
     launch keeps one accumulator and one set of elementwise terms live, so no configuration the host launches
     spills registers on sm_90 (aot.py --no-spills; the two-sided kernel spilled 0.1–5.8 KB).

FLOP model (GEMM FLOPs; see ``flash_flops``), n_c(u) = ⌈d_u / BLOCK_D⌉ for each requested side u:

    A: 2N²(d_x + d_z)    B: 2N²(d_x + d_z)    C: Σ_u [n_c(u) · 2N²(d_x + d_z) + 2N² d_u]

  = 14 N² d for d_x = d_z = d ≤ BLOCK_D with grad_z only (docs/kernels.md §2b); 4N²d without gradients. A wider d
  recomputes the S tiles once per feature chunk (n_c > 1), and each requested side recomputes them once more:
  for d ≥ 512 the row-panel pass (a) is usually cheaper.
  Special functions per (i, j) entry: A 1 exp per side; B 2 exp + 1 log (+1 exp for js) and 2–3 divisions;
  C twice B's per side; rbf adds 1 exp per side and pass for the kernel value.

Precision: operands in the input dtype, fp32 accumulation; every softmax / divergence quantity in fp32. fp32 dots
follow torch.get_float32_matmul_precision(): IEEE for "highest", TF32 for "high"/"medium" with every operand
rounded to tf32 (RNA, as cuBLAS) by the kernel first (``dot_operand``; Triton's tf32 dot alone truncates them:
_common.py). bf16/fp16 on tensor cores. In pass C the W tile is cast to the operand dtype for the second GEMM (as
FlashAttention does with dS) as N·dS = Q∘(g − ḡ), whose entries are still ~1/N (Q is a probability); for fp16 at
N ≥ HALF_SCALE_MIN_N it is multiplied by 2^k first (``half_scale_exp``: ~1/N falls below fp16's normal range at
large N), and 2^-k, 1/N, 1/τ, 2γ are applied to the fp32 accumulator. Under TRITON_INTERPRET=1 operands are converted to fp32 before tl.dot (the
interpreter miscomputes raw bf16 dots); bf16×bf16 products are exact in fp32, so the result matches a tensor-core
dot up to summation order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    PRECISIONS,
    device_guard,
    dot_operand,
    dot_precision,
    level1_terms,
    log1p,
    next_pow2,
    round_tf32,
    row_max,
    row_sum,
)

__all__ = ["structure_level1_flash", "flash_flops", "launch_config", "half_scale_exp", "aot_configs", "AOT_KERNELS"]

# Option codes: the order of the tuples in structure_ops/_options.py (csrc/common/checks.h).
COSINE, RBF = 0, 1
STRUCTURE, JS = 0, 1

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------
# Row reductions and log1p: structure_ops/_triton/_common.py (shared by every kernel).


@triton.jit
def _logits_tile(
    u_ptr,
    stride,
    rows_i,
    rows_j,
    N,
    D,
    sq_i,
    sq_j,
    scale,
    gamma,
    SIM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # S_IJ = Û_I Û_Jᵀ / τ (cosine) or exp(−γ(‖û_i‖² + ‖û_j‖² − 2 û_i·û_j)) (rbf), fp32 accumulation over d.
    # Out-of-range rows/columns load zeros, so the tile stays finite; callers mask what they reduce.
    mi = rows_i < N
    mj = rows_j < N
    base_i = u_ptr + rows_i.to(tl.int64)[:, None] * stride
    base_j = u_ptr + rows_j.to(tl.int64)[:, None] * stride
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        a = tl.load(base_i + ks[None, :], mask=mi[:, None] & km[None, :], other=0.0)
        b = tl.load(base_j + ks[None, :], mask=mj[:, None] & km[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # fp32 at TF32: round the operands (RNA) here, or the tensor cores truncate them (_common.py)
        a = dot_operand(a, ROUND_TF32)
        b = dot_operand(b, ROUND_TF32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    if SIM == 0:
        s = acc * scale
    else:
        # squared distance clamped at 0 (NaN kept) and exactly 0 on the diagonal, as the other backends
        d2 = sq_i[:, None] + sq_j[None, :] - 2.0 * acc
        d2 = tl.where(d2 < 0.0, 0.0, d2)
        d2 = tl.where(rows_i[:, None] == rows_j[None, :], 0.0, d2)
        s = tl.exp(-gamma * d2)
    return s


@triton.jit
def _terms(a, b, eps, DIV: tl.constexpr):
    # The shared elementwise divergence (structure_ops/_triton/_common.py); this pass is fp32 only.
    return level1_terms(a, b, eps, 0.6931471805599453, DIV == 1)


# --------------------------------------------------------------------------------------------------
# Pass A: per-row log-sum-exp of one side
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lse_kernel(
    u_ptr,
    sq_ptr,
    lse_ptr,
    N,
    D,
    stride,
    scale,
    gamma,
    SIM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # lse_i = log Σ_j exp(S_ij), S = ÛÛᵀ/τ or the rbf kernel, with the online (running max m, running sum l)
    # update l ← l·e^(m − m') + Σ_j e^(S_ij − m'): one pass over the columns, no N-sized row buffer.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    if SIM == 1:
        sq_i = tl.load(sq_ptr + rows, mask=rmask, other=0.0)
    else:
        sq_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        if SIM == 1:
            sq_j = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
        else:
            sq_j = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
        s = _logits_tile(
            u_ptr, stride, rows, cols, N, D, sq_i, sq_j, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, ROUND_TF32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        s = tl.where(cmask[None, :], s, float("-inf"))
        # Column block 0 always holds a valid column, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, row_max(s))
        l_i = l_i * tl.exp(m_i - m_new) + row_sum(tl.exp(s - m_new[:, None]))
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=rmask)


# --------------------------------------------------------------------------------------------------
# Pass B: row losses ℓ_i and ḡ_i
# --------------------------------------------------------------------------------------------------
@triton.jit
def _loss_kernel(
    x_ptr,
    z_ptr,
    sqx_ptr,
    sqz_ptr,
    lsex_ptr,
    lsez_ptr,
    loss_ptr,
    gbx_ptr,
    gbz_ptr,
    N,
    DX,
    DZ,
    stride_x,
    stride_z,
    scale,
    gamma,
    eps,
    SIM: tl.constexpr,
    DIV: tl.constexpr,
    GRAD_X: tl.constexpr,
    GRAD_Z: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # ℓ_i = Σ_j term(P_ij, Q_ij), ḡZ_i = Σ_j Q_ij g_ij, ḡX_i = Σ_j P_ij g^o_ij with P = exp(S^X − lseX),
    # Q = exp(S^Z − lseZ): both S tiles recomputed, the ε terms applied exactly once both lse are final.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    lx = tl.load(lsex_ptr + rows, mask=rmask, other=0.0)
    lz = tl.load(lsez_ptr + rows, mask=rmask, other=0.0)
    if SIM == 1:
        sqx_i = tl.load(sqx_ptr + rows, mask=rmask, other=0.0)
        sqz_i = tl.load(sqz_ptr + rows, mask=rmask, other=0.0)
    else:
        sqx_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
        sqz_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc_l = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc_gx = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc_gz = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        if SIM == 1:
            sqx_j = tl.load(sqx_ptr + cols, mask=cmask, other=0.0)
            sqz_j = tl.load(sqz_ptr + cols, mask=cmask, other=0.0)
        else:
            sqx_j = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
            sqz_j = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
        sx = _logits_tile(
            x_ptr, stride_x, rows, cols, N, DX, sqx_i, sqx_j, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, ROUND_TF32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        sz = _logits_tile(
            z_ptr, stride_z, rows, cols, N, DZ, sqz_i, sqz_j, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, ROUND_TF32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        p, q, term, qg, pg = _terms(sx - lx[:, None], sz - lz[:, None], eps, DIV)
        valid = rmask[:, None] & cmask[None, :]
        acc_l += row_sum(tl.where(valid, term, 0.0))
        if GRAD_Z:
            acc_gz += row_sum(tl.where(valid, qg, 0.0))
        if GRAD_X:
            acc_gx += row_sum(tl.where(valid, pg, 0.0))
    tl.store(loss_ptr + rows, acc_l, mask=rmask)
    if GRAD_Z:
        tl.store(gbz_ptr + rows, acc_gz, mask=rmask)
    if GRAD_X:
        tl.store(gbx_ptr + rows, acc_gx, mask=rmask)


# --------------------------------------------------------------------------------------------------
# Pass C: gradients, one launch per requested side
# --------------------------------------------------------------------------------------------------
@triton.jit
def _own_terms(a, b, eps, ln2, JS: tl.constexpr):
    # Q and Q∘g of the side whose log-probabilities are b (a: the other side's). The divergence is symmetric in
    # (P, Q), so the X̂ side is the same function with the arguments swapped. Same expressions as level1_terms
    # (the ḡ of pass B and the W here must agree), without the value and the other side's gradient.
    q = tl.exp(b)
    if JS:
        delta = a - b
        sp = tl.maximum(delta, 0.0) + log1p(tl.exp(-tl.abs(delta)))
        qg = 0.5 * q * (ln2 - sp)
    else:
        pt = tl.exp(a) + eps
        qt = q + eps
        d = pt - qt
        t = log1p((d * (1.0 / pt)) * (d * (1.0 / qt)) * 0.25)
        qg = 0.25 * q * t - 0.25 * pt * (q * (1.0 / qt))
    return q, qg


@triton.jit
def _grad_kernel(
    own_ptr,
    oth_ptr,
    sq_own_ptr,
    sq_oth_ptr,
    lse_own_ptr,
    lse_oth_ptr,
    gb_ptr,
    g_ptr,
    N,
    D_OWN,
    D_OTH,
    stride_own,
    stride_oth,
    scale,
    gamma,
    eps,
    out_scale,
    w_scale,
    SIM: tl.constexpr,
    DIV: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The gradient of ONE side ("own": Ẑ with Q, or X̂ with P; "oth": the other side) for row block K and feature
    # chunk c. With N·W_KL = Q∘(g − ḡ_K) (rows K normalized by lse_K) and N·W_LKᵀ = the same S entries normalized
    # by rows L (S symmetric: S_LK = S_KLᵀ),
    #   cosine: dÛ_K,c = (1/(Nτ)) Σ_L (N·W_KL + N·W_LKᵀ) Û_L,c
    #   rbf:    dÛ_K,c = (2γ/N) [Σ_L E_KL Û_L,c − (Σ_L E_KL) Û_K,c],  E = S∘(N·W + N·Wᵀ)
    # One GEMM per tile for both W and Wᵀ; each output row has one owner (deterministic, no atomics). The W tile
    # enters the GEMM times w_scale (a power of two: fp16 operands ~1/N would underflow at large N), undone on the
    # fp32 accumulator (out_scale = 1/(Nτ) or 2γ/N, divided by w_scale). One side per launch keeps one
    # accumulator and one set of elementwise terms live: no register spills (aot.py --no-spills).
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dcols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D_OWN
    ln2 = 0.6931471805599453
    lo_k = tl.load(lse_own_ptr + rows, mask=rmask, other=0.0)
    lt_k = tl.load(lse_oth_ptr + rows, mask=rmask, other=0.0)
    gb_k = tl.load(gb_ptr + rows, mask=rmask, other=0.0)
    if SIM == 1:
        sqo_k = tl.load(sq_own_ptr + rows, mask=rmask, other=0.0)
        sqt_k = tl.load(sq_oth_ptr + rows, mask=rmask, other=0.0)
    else:
        sqo_k = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
        sqt_k = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    rs = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for l0 in range(0, N, BLOCK_N):
        cols = l0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        if SIM == 1:
            sqo_l = tl.load(sq_own_ptr + cols, mask=cmask, other=0.0)
            sqt_l = tl.load(sq_oth_ptr + cols, mask=cmask, other=0.0)
        else:
            sqo_l = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
            sqt_l = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
        s_oth = _logits_tile(
            oth_ptr, stride_oth, rows, cols, N, D_OTH, sqt_k, sqt_l, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, ROUND_TF32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        s_own = _logits_tile(
            own_ptr, stride_own, rows, cols, N, D_OWN, sqo_k, sqo_l, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, ROUND_TF32, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        # Tile (K, L) normalized by rows K, then tile (L, K)ᵀ normalized by rows L: one term set live at a time.
        q, qg = _own_terms(s_oth - lt_k[:, None], s_own - lo_k[:, None], eps, ln2, DIV == 1)
        w = qg - q * gb_k[:, None]
        lo_l = tl.load(lse_own_ptr + cols, mask=cmask, other=0.0)
        lt_l = tl.load(lse_oth_ptr + cols, mask=cmask, other=0.0)
        gb_l = tl.load(gb_ptr + cols, mask=cmask, other=0.0)
        q, qg = _own_terms(s_oth - lt_l[None, :], s_own - lo_l[None, :], eps, ln2, DIV == 1)
        w += qg - q * gb_l[None, :]
        w = tl.where(rmask[:, None] & cmask[None, :], w, 0.0)
        if SIM == 1:
            w = w * s_own
            rs += row_sum(w)
        ul = tl.load(
            own_ptr + cols.to(tl.int64)[:, None] * stride_own + dcols[None, :],
            mask=cmask[:, None] & dmask[None, :],
            other=0.0,
        )
        # W enters the second GEMM in the operand dtype (tensor cores for bf16/fp16), accumulated in fp32.
        w_op = (w * w_scale).to(ul.dtype)
        if UPCAST:
            w_op = w_op.to(tl.float32)
            ul = ul.to(tl.float32)
        w_op = dot_operand(w_op, ROUND_TF32)
        ul = dot_operand(ul, ROUND_TF32)
        acc = tl.dot(w_op, ul, acc, input_precision=DOT_PRECISION)
    omask = rmask[:, None] & dmask[None, :]
    out = g_ptr + rows.to(tl.int64)[:, None] * stride_own + dcols[None, :]
    if SIM == 0:
        g = acc * (out_scale / w_scale)
    else:
        uk = tl.load(own_ptr + rows.to(tl.int64)[:, None] * stride_own + dcols[None, :], mask=omask, other=0.0)
        g = out_scale * (acc * (1.0 / w_scale) - rs[:, None] * uk.to(tl.float32))
    tl.store(out, g.to(g_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------------------------------
# Launch configuration (the host's launches and aot.py both come from launch_config)
# --------------------------------------------------------------------------------------------------
def flash_flops(
    n: int, dx: int, dz: int, *, grad_x: bool = False, grad_z: bool = True, block_d: int | None = None
) -> float:
    """GEMM FLOPs of :func:`structure_level1_flash` (the benchmark's FLOP model).

    4N²(d_x + d_z) for passes A and B; pass C, once per requested side u ∈ {X̂, Ẑ}: n_c(u)·2N²(d_x + d_z) (tile
    recomputation, once per BLOCK_D feature chunk of d_u) + 2N²·d_u. d_x = d_z = d ≤ BLOCK_D, grad_z only:
    14 N² d. ``block_d`` None: the BLOCK_D the host picks for each side (``launch_config``).
    """
    flops = 4.0 * n * n * (dx + dz)
    for want, d in ((grad_z, dz), (grad_x, dx)):
        if want:
            bd = block_d or _grad_block_d(d)
            flops += math.ceil(d / bd) * 2.0 * n * n * (dx + dz) + 2.0 * n * n * d
    return flops


def _grad_block_d(d: int, interpret: bool = INTERPRET) -> int:
    if interpret:
        return min(64, max(16, next_pow2(d)))
    return 64 if d <= 64 else 128


# fp16 gradient operands: W·2^k is cast to fp16 with k = half_scale_exp(...) when N ≥ HALF_SCALE_MIN_N.
HALF_SCALE_MIN_N = 1024
_FP16_MAX = 65504.0


def half_scale_exp(n: int, dtype: torch.dtype, divergence: int, eps: float, min_n: int | None = None) -> int:
    """The power of two k by which pass C scales the W tile before its fp16 cast (0: no scaling).

    W's entries are Q∘(g − ḡ) summed over both directions, typically ~1/N: below fp16's normal range (6.1e-5)
    from N ≈ 16 k on, so they would lose their precision (emulated cast error of the gradient ~1e-3 at N = 65 536,
    ~1e-2 at 262 144; tests/emulation/hardware.py). Scaling by 2^k, k = ⌊log₂ N⌋, brings them to O(1); k is capped
    so that the largest possible entry cannot overflow fp16: |W| ≤ B with B = T_max + 2 for "structure"
    (T = log1p((P̃ − Q̃)²/(4P̃Q̃)) ≤ log1p((1 + ε)/(4ε)), |Q∘g| ≤ ¼T_max + ¼, |ḡ| ≤ ¼ max(T_max, 1 + Nε), two
    directions) and B = 2 for "js" (|½ Q log(Q/M)| ≤ ½ ln 2); the rbf factor S ≤ 1 only shrinks W. One bit of
    headroom: 2^k·B ≤ 65504/2. Only fp16 (bf16 and fp32/tf32 have fp32's exponent range), only N ≥ ``min_n``
    (default HALF_SCALE_MIN_N; below it ~1/N is well inside the normal range).
    """
    min_n = HALF_SCALE_MIN_N if min_n is None else min_n
    if dtype != torch.float16 or n < min_n or n < 2:
        return 0
    if divergence == JS:
        bound = 2.0
    else:
        t_max = math.log1p((1.0 + eps) / (4.0 * eps))
        bound = t_max + 2.0 + 0.25 * n * eps
    k_max = math.floor(math.log2(_FP16_MAX / 2.0 / bound))
    return max(0, min(k_max, int(math.floor(math.log2(n)))))


def launch_config(
    n: int,
    dx: int,
    dz: int,
    dtype: torch.dtype,
    *,
    similarity: int,
    divergence: int,
    grad_x: bool,
    grad_z: bool,
    precision: str | None = None,
    interpret: bool = INTERPRET,
) -> dict[str, dict]:
    """The launches of :func:`structure_level1_flash` for these inputs: {"lse", "loss", "grad_z", "grad_x"} →
    {"constexprs": ..., "options": ...} ("grad_*" only when requested). The host launches exactly these (block
    overrides aside) and aot.py compiles exactly these for every dtype, precision, option and gradient flag.

    GPU tiles (sm_90, ptxas -v, no spills): passes A/B 64 × 64 with BLOCK_K 32 (IEEE fp32) / 16 (TF32) / 64 (half)
    and 8 warps; pass C 64 × 32 tiles, BLOCK_K 32, BLOCK_D 64 (d ≤ 64) or 128, 8 warps, one launch per side. Under the interpreter: few,
    large blocks (its cost is per program and per op).
    """
    prec = dot_precision(dtype, precision)
    grad = bool(grad_x or grad_z)
    common = dict(UPCAST=bool(interpret), DOT_PRECISION=prec, ROUND_TF32=round_tf32(dtype, precision))
    if interpret:
        bmn = min(64, max(16, next_pow2(n)))
        bk = min(64, max(16, next_pow2(max(dx, dz))))
        ab = dict(BLOCK_M=bmn, BLOCK_N=bmn, BLOCK_K=bk)
        cb = dict(ab)
        options: dict = {}
        grad_options: dict = {}
    else:
        # fp32 operands take twice the registers of half ones, and the tf32 rounding adds a few more: BLOCK_K 16
        # there (pass B spilled 12 B at 32); pass C keeps its extra live tiles within 255 registers at BLOCK_K 32
        # (half types spilled 76 B at 64).
        bk = 64 if dtype != torch.float32 else (16 if common["ROUND_TF32"] else 32)
        ab = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk)
        cb = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
        options = {"num_warps": 8, "num_stages": 2}
        grad_options = {"num_warps": 8, "num_stages": 2}
    out = {
        "lse": {"constexprs": dict(SIM=similarity, **common, **ab), "options": options},
        "loss": {
            # ḡ of both sides whenever a gradient is asked for: two row sums per tile (the tiles cost the GEMMs),
            # half as many compiled variants
            "constexprs": dict(SIM=similarity, DIV=divergence, GRAD_X=grad, GRAD_Z=grad, **common, **ab),
            "options": options,
        },
    }
    for side, want, d in (("grad_z", grad_z, dz), ("grad_x", grad_x, dx)):
        if want:
            cst = dict(SIM=similarity, DIV=divergence, **common, **cb, BLOCK_D=_grad_block_d(d, interpret))
            out[side] = {"constexprs": cst, "options": grad_options}
    return out


_KERNELS = {"lse": "_lse_kernel", "loss": "_loss_kernel", "grad_z": "_grad_kernel", "grad_x": "_grad_kernel"}


# --------------------------------------------------------------------------------------------------
# Host entry
# --------------------------------------------------------------------------------------------------
def structure_level1_flash(
    xh: torch.Tensor,
    zh: torch.Tensor,
    temperature: float,
    similarity: int,
    gamma: float,
    divergence: int,
    eps: float,
    grad_x: bool,
    grad_z: bool,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    half_scale_min_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Level-1 STRUCTURE core divergence and its gradients, flash-style (docs/kernels.md §2b), O(N) extra memory.

    D = (1/N) Σ_ij term(P_ij, Q_ij) with P = softmax_rows(S(X̂)), Q = softmax_rows(S(Ẑ)) — no margin, no level
    weighting (the caller applies both). Equivalent to ``structure_ops.reference.structure_core(xh, zh, levels=1,
    margin=0, ...)``; the gradients to ``reference.structure_core_level1_grad`` (and its X̂ analogue).

    Args:
        xh: X̂, (N, d_x), normalized and centered. zh: Ẑ, (N, d_z), same N, dtype and device.
        temperature: τ > 0 (cosine only). similarity: 0 cosine, 1 rbf. gamma: γ of rbf.
        divergence: 0 "structure" (needs eps > 0), 1 "js". eps: the ε of "structure".
        grad_x, grad_z: compute ∂D/∂X̂, ∂D/∂Ẑ.
        block_m, block_n, block_k, block_d, num_warps, num_stages: launch overrides (tests, tuning) of every pass;
        BLOCK_M/N are the row/column tile, BLOCK_K the contraction chunk, BLOCK_D the gradient feature chunk.
        half_scale_min_n: N from which fp16 gradient operands are scaled (default HALF_SCALE_MIN_N; tests).
    Returns:
        (D, gx, gz): D a 0-dim fp32 tensor; gx (N, d_x) and gz (N, d_z) contiguous in the input dtype, or empty
        (0,) tensors when not requested.
    Supported: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; fp32 (tl.dot precision from
    torch.get_float32_matmul_precision(); TF32 operands rounded RNA), bf16, fp16. fp64 raises NotImplementedError.
    """
    if xh.dim() != 2 or zh.dim() != 2:
        raise ValueError(f"xh and zh must be 2-D (N, d) tensors, got shapes {tuple(xh.shape)} and {tuple(zh.shape)}")
    n, dx = xh.shape
    dz = zh.shape[1]
    if zh.shape[0] != n:
        raise ValueError(f"xh and zh must have the same number of rows N, got {tuple(xh.shape)} and {tuple(zh.shape)}")
    if n < 1 or dx < 1 or dz < 1:
        raise ValueError(f"xh and zh need N >= 1 rows and d >= 1 columns, got {tuple(xh.shape)}, {tuple(zh.shape)}")
    if xh.dtype != zh.dtype:
        raise ValueError(f"xh and zh must have the same dtype, got {xh.dtype} and {zh.dtype}")
    if xh.device != zh.device:
        raise ValueError(f"xh and zh must be on the same device, got {xh.device} and {zh.device}")
    if xh.dtype not in _SUPPORTED:
        raise NotImplementedError(
            f"structure_level1_flash (triton) supports float32, bfloat16 and float16, got {xh.dtype}; "
            "use the cpu/cuda backend (or structure_ops.reference) for float64"
        )
    if xh.device.type == "cpu" and not INTERPRET:
        raise NotImplementedError(
            "structure_level1_flash (triton) needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got cpu"
        )
    if similarity not in (COSINE, RBF):
        raise ValueError(f"unknown similarity code {similarity} (0 cosine, 1 rbf)")
    if divergence not in (STRUCTURE, JS):
        raise ValueError(f"unknown divergence code {divergence} (0 structure, 1 js)")
    if similarity == COSINE and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == STRUCTURE and not eps > 0:
        raise ValueError(f"eps must be > 0 for divergence='structure', got {eps}")

    dtype, dev = xh.dtype, xh.device
    xh = xh.contiguous()
    zh = zh.contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    cfg = launch_config(n, dx, dz, dtype, similarity=similarity, divergence=divergence, grad_x=grad_x, grad_z=grad_z)
    overrides = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_d}
    for name, b in overrides.items():
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"{name.lower()} must be a power of two >= 16 (tl.dot tiles), got {b}")
    for launch in cfg.values():
        cst = launch["constexprs"]
        cst.update({k: int(v) for k, v in overrides.items() if v is not None and k in cst})
        opts = launch["options"] = dict(launch["options"])
        if not INTERPRET:
            for key, v in (("num_warps", num_warps), ("num_stages", num_stages)):
                if v is not None:
                    opts[key] = int(v)
    scale = 1.0 / float(temperature) if similarity == COSINE else 1.0
    gamma = float(gamma)
    epsf = float(eps) if divergence == STRUCTURE else 0.0

    # Triton launches on the current device: make it the inputs' device (a no-op for the interpreter).
    with device_guard(dev):
        lse_x = torch.empty(n, **f32)
        lse_z = torch.empty(n, **f32)
        if similarity == RBF:
            # Row norms in fp32 from the operand values that the GEMM sees (O(N·d)).
            sq_x = xh.float().square().sum(dim=1)
            sq_z = zh.float().square().sum(dim=1)
        else:
            sq_x, sq_z = lse_x, lse_z  # never read (SIM constexpr)

        a = cfg["lse"]
        grid = (triton.cdiv(n, a["constexprs"]["BLOCK_M"]),)
        # Pass A
        _lse_kernel[grid](xh, sq_x, lse_x, n, dx, xh.stride(0), scale, gamma, **a["constexprs"], **a["options"])
        _lse_kernel[grid](zh, sq_z, lse_z, n, dz, zh.stride(0), scale, gamma, **a["constexprs"], **a["options"])

        # Pass B
        b = cfg["loss"]
        row_loss = torch.empty(n, **f32)
        gb_x = torch.empty(n if grad_x or grad_z else 1, **f32)  # the loss kernel writes both ḡ (launch_config)
        gb_z = torch.empty(n if grad_x or grad_z else 1, **f32)
        _loss_kernel[(triton.cdiv(n, b["constexprs"]["BLOCK_M"]),)](
            xh, zh, sq_x, sq_z, lse_x, lse_z, row_loss, gb_x, gb_z,
            n, dx, dz, xh.stride(0), zh.stride(0), scale, gamma, epsf, **b["constexprs"], **b["options"],
        )  # fmt: skip
        # Fixed-order reduction of N row losses (deterministic), fp64 so that large N loses nothing here.
        loss = (row_loss.to(torch.float64).sum() / n).to(torch.float32)

        empty = torch.empty(0, dtype=dtype, device=dev)
        gx = torch.empty((n, dx), dtype=dtype, device=dev) if grad_x else empty
        gz = torch.empty((n, dz), dtype=dtype, device=dev) if grad_z else empty
        # Pass C, one launch per side: (own, other) = (Ẑ, X̂) for dẐ, (X̂, Ẑ) for dX̂.
        k = half_scale_exp(n, dtype, divergence, epsf, half_scale_min_n)
        w_scale = math.ldexp(1.0, k)
        out_scale = (scale if similarity == COSINE else 2.0 * gamma) / n
        sides = (("grad_z", zh, xh, sq_z, sq_x, lse_z, lse_x, gb_z, gz), ("grad_x", xh, zh, sq_x, sq_z, lse_x, lse_z, gb_x, gx))
        for side, own, oth, sq_own, sq_oth, lse_own, lse_oth, gb, g in sides:
            if side not in cfg:
                continue
            c = cfg[side]
            cst = c["constexprs"]
            grid = (triton.cdiv(n, cst["BLOCK_M"]), triton.cdiv(own.shape[1], cst["BLOCK_D"]))
            _grad_kernel[grid](
                own, oth, sq_own, sq_oth, lse_own, lse_oth, gb, g,
                n, own.shape[1], oth.shape[1], own.stride(0), oth.stride(0), scale, gamma, epsf, out_scale, w_scale,
                **cst, **c["options"],
            )  # fmt: skip
        return loss, gx, gz


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): every launch the host can make on a GPU, from launch_config
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_OPERANDS = ("u_ptr", "x_ptr", "z_ptr", "own_ptr", "oth_ptr", "g_ptr")
_FLOATS = ("scale", "gamma", "eps", "out_scale", "w_scale")
# Widths that reach every branch of launch_config (BLOCK_D 64 for d ≤ 64, 128 above); N does not matter on a GPU.
AOT_SHAPES = ((4096, 64, 64), (4096, 1024, 512))


def _signature(kernel, ptr: str, constexprs: dict) -> dict[str, str]:
    # Every argument in the kernel's own order: operand pointers in the input dtype, statistics fp32.
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr if name in _OPERANDS else "*fp32"
        elif name in _FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options) of every launch the host can make on a GPU: launch_config over
    every dtype, float32 matmul precision, similarity, divergence and gradient flag, deduplicated."""
    kernels = {"_lse_kernel": _lse_kernel, "_loss_kernel": _loss_kernel, "_grad_kernel": _grad_kernel}
    seen, entries = set(), []
    for dtype, ptr in _PTR.items():
        for precision in PRECISIONS:
            for n, dx, dz in AOT_SHAPES:
                for sim in (COSINE, RBF):
                    for div in (STRUCTURE, JS):
                        for gx, gz in ((False, False), (False, True), (True, False), (True, True)):
                            cfg = launch_config(n, dx, dz, dtype, similarity=sim, divergence=div, grad_x=gx,
                                                grad_z=gz, precision=precision, interpret=False)  # fmt: skip
                            for name, launch in cfg.items():
                                kernel = kernels[_KERNELS[name]]
                                cst = {a: launch["constexprs"][a] for a in kernel.arg_names if a in launch["constexprs"]}
                                key = (kernel.__name__ if hasattr(kernel, "__name__") else _KERNELS[name], ptr,
                                       tuple(cst.items()), tuple(sorted(launch["options"].items())))
                                if key in seen:
                                    continue
                                seen.add(key)
                                entries.append((kernel, _signature(kernel, ptr, cst), cst, dict(launch["options"])))
    return entries


AOT_KERNELS = aot_configs()
