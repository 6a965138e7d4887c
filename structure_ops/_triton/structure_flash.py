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
    TuneConfig,
    TuneSpace,
    autotune_key,
    config_grid,
    device_guard,
    dot_operand,
    dot_precision,
    level1_terms,
    log1p,
    next_pow2,
    round_tf32,
    row_max,
    row_sum,
    space_aot_entries,
)

__all__ = ["structure_level1_flash", "flash_flops", "launch_config", "operand_mode", "tune_keys", "half_scale_exp",
           "aot_configs", "aot_space_configs", "AOT_KERNELS", "LSE_SPACE", "LOSS_SPACE", "GRAD_SPACE"]

# Option codes: the order of the tuples in structure_ops/_options.py (csrc/common/checks.h).
COSINE, RBF = 0, 1
STRUCTURE, JS = 0, 1

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------
# Row reductions and log1p: structure_ops/_triton/_common.py (shared by every kernel). The similarity ``sim`` and
# the divergence ``div`` are RUNTIME arguments (uniform branches, negligible next to the tiles' GEMMs and exps):
# every compiled variant serves all four options, so the autotune space compiles 4× fewer kernels (on the GPU when
# it tunes, and in aot.py).
_LN2 = 0.6931471805599453


@triton.jit
def _rows_operand(
    u_ptr, stride, rows, N, D,
    UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Û of ``rows`` (BLOCK_R × BLOCK_K: all of d when the caller is RESIDENT), zeros past N and d, as tl.dot sees it.
    ks = tl.arange(0, BLOCK_K)
    a = tl.load(
        u_ptr + rows.to(tl.int64)[:, None] * stride + ks[None, :],
        mask=(rows < N)[:, None] & (ks < D)[None, :],
        other=0.0,
    )
    if UPCAST:
        a = a.to(tl.float32)
    # fp32 at TF32: round the operands (RNA) here, or the tensor cores truncate them (_common.py)
    return dot_operand(a, ROUND_TF32)


@triton.jit
def _gram(
    u_ptr, stride, a_rows, rows_i, rows_j, N, D,
    RESIDENT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Û_I Û_Jᵀ with fp32 accumulation. RESIDENT: ``a_rows`` is Û_I over all of d (BLOCK_K ≥ d), loaded ONCE per
    # program before the column loop (it stays on chip), and one dot per tile reads only the column operand.
    # Otherwise d is walked in BLOCK_K chunks and each chunk of Û_I is re-read (from L2) for every column tile.
    if RESIDENT:
        b = _rows_operand(u_ptr, stride, rows_j, N, D, UPCAST, ROUND_TF32, BLOCK_N, BLOCK_K)
        acc = tl.dot(a_rows, tl.trans(b), input_precision=DOT_PRECISION)
    else:
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
            a = dot_operand(a, ROUND_TF32)
            b = dot_operand(b, ROUND_TF32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logits(acc, rows_i, rows_j, sq_i, sq_j, scale, gamma, sim):
    # S from a Gram tile: cosine (sim 0) Û_IÛ_Jᵀ/τ; rbf (sim 1) exp(−γ(‖û_i‖² + ‖û_j‖² − 2 û_i·û_j)), the squared
    # distance clamped at 0 (NaN kept) and exactly 0 on the diagonal, as the other backends.
    if sim == 1:
        d2 = sq_i[:, None] + sq_j[None, :] - 2.0 * acc
        d2 = tl.where(d2 < 0.0, 0.0, d2)
        d2 = tl.where(rows_i[:, None] == rows_j[None, :], 0.0, d2)
        s = tl.exp(-gamma * d2)
    else:
        s = acc * scale
    return s


@triton.jit
def _sq(sq_ptr, idx, mask, sim, BLOCK: tl.constexpr):
    # squared row norms of rbf (sim 1); zeros (never read) for cosine
    if sim == 1:
        v = tl.load(sq_ptr + idx, mask=mask, other=0.0)
    else:
        v = tl.full((BLOCK,), 0.0, dtype=tl.float32)
    return v


@triton.jit
def _terms(a, b, eps, div):
    # The shared elementwise divergence (structure_ops/_triton/_common.py); this pass is fp32 only. div 1: "js".
    if div == 1:
        p, q, term, qg, pg = level1_terms(a, b, eps, 0.6931471805599453, True)
    else:
        p, q, term, qg, pg = level1_terms(a, b, eps, 0.6931471805599453, False)
    return term, qg, pg


# --------------------------------------------------------------------------------------------------
# Pass A: per-row log-sum-exp of one side
# --------------------------------------------------------------------------------------------------
@triton.jit
def _lse_kernel(
    u_ptr, sq_ptr, lse_ptr, N, D, stride, scale, gamma, sim,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # lse_i = log Σ_j exp(S_ij), S = ÛÛᵀ/τ or the rbf kernel, with the online (running max m, running sum l)
    # update l ← l·e^(m − m') + Σ_j e^(S_ij − m'): one pass over the columns, no N-sized row buffer.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    sq_i = _sq(sq_ptr, rows, rmask, sim, BLOCK_M)
    a_rows = None
    if RESIDENT:
        a_rows = _rows_operand(u_ptr, stride, rows, N, D, UPCAST, ROUND_TF32, BLOCK_M, BLOCK_K)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        sq_j = _sq(sq_ptr, cols, cmask, sim, BLOCK_N)
        g = _gram(u_ptr, stride, a_rows, rows, cols, N, D, RESIDENT, UPCAST, DOT_PRECISION, ROUND_TF32,
                  BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        s = _logits(g, rows, cols, sq_i, sq_j, scale, gamma, sim)
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
    x_ptr, z_ptr, sqx_ptr, sqz_ptr, lsex_ptr, lsez_ptr, loss_ptr, gbx_ptr, gbz_ptr,
    N, DX, DZ, stride_x, stride_z, scale, gamma, eps, sim, div, grad,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # ℓ_i = Σ_j term(P_ij, Q_ij), ḡZ_i = Σ_j Q_ij g_ij, ḡX_i = Σ_j P_ij g^o_ij with P = exp(S^X − lseX),
    # Q = exp(S^Z − lseZ): both S tiles recomputed, the ε terms applied exactly once both lse are final. ``grad``
    # (runtime): also ḡ of both sides (two row sums per tile; the tiles cost the GEMMs).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    lx = tl.load(lsex_ptr + rows, mask=rmask, other=0.0)
    lz = tl.load(lsez_ptr + rows, mask=rmask, other=0.0)
    sqx_i = _sq(sqx_ptr, rows, rmask, sim, BLOCK_M)
    sqz_i = _sq(sqz_ptr, rows, rmask, sim, BLOCK_M)
    ax = None
    az = None
    if RESIDENT:
        ax = _rows_operand(x_ptr, stride_x, rows, N, DX, UPCAST, ROUND_TF32, BLOCK_M, BLOCK_K)
        az = _rows_operand(z_ptr, stride_z, rows, N, DZ, UPCAST, ROUND_TF32, BLOCK_M, BLOCK_K)
    acc_l = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc_gx = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc_gz = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        sqx_j = _sq(sqx_ptr, cols, cmask, sim, BLOCK_N)
        sqz_j = _sq(sqz_ptr, cols, cmask, sim, BLOCK_N)
        gx = _gram(x_ptr, stride_x, ax, rows, cols, N, DX, RESIDENT, UPCAST, DOT_PRECISION, ROUND_TF32,
                   BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        sx = _logits(gx, rows, cols, sqx_i, sqx_j, scale, gamma, sim)
        gz = _gram(z_ptr, stride_z, az, rows, cols, N, DZ, RESIDENT, UPCAST, DOT_PRECISION, ROUND_TF32,
                   BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        sz = _logits(gz, rows, cols, sqz_i, sqz_j, scale, gamma, sim)
        term, qg, pg = _terms(sx - lx[:, None], sz - lz[:, None], eps, div)
        valid = rmask[:, None] & cmask[None, :]
        acc_l += row_sum(tl.where(valid, term, 0.0))
        if grad != 0:
            acc_gz += row_sum(tl.where(valid, qg, 0.0))
            acc_gx += row_sum(tl.where(valid, pg, 0.0))
    tl.store(loss_ptr + rows, acc_l, mask=rmask)
    if grad != 0:
        tl.store(gbz_ptr + rows, acc_gz, mask=rmask)
        tl.store(gbx_ptr + rows, acc_gx, mask=rmask)


# --------------------------------------------------------------------------------------------------
# Pass C: gradients, one launch per requested side
# --------------------------------------------------------------------------------------------------
@triton.jit
def _own_terms(a, b, eps, ln2, div):
    # Q and Q∘g of the side whose log-probabilities are b (a: the other side's). The divergence is symmetric in
    # (P, Q), so the X̂ side is the same function with the arguments swapped. Same expressions as level1_terms
    # (the ḡ of pass B and the W here must agree), without the value and the other side's gradient.
    q = tl.exp(b)
    if div == 1:
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
    own_ptr, oth_ptr, sq_own_ptr, sq_oth_ptr, lse_own_ptr, lse_oth_ptr, gb_ptr, g_ptr,
    N, D_OWN, D_OTH, stride_own, stride_oth, scale, gamma, eps, out_scale, w_scale, sim, div,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
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
    sqo_k = _sq(sq_own_ptr, rows, rmask, sim, BLOCK_M)
    sqt_k = _sq(sq_oth_ptr, rows, rmask, sim, BLOCK_M)
    a_own = None
    a_oth = None
    if RESIDENT:
        a_own = _rows_operand(own_ptr, stride_own, rows, N, D_OWN, UPCAST, ROUND_TF32, BLOCK_M, BLOCK_K)
        a_oth = _rows_operand(oth_ptr, stride_oth, rows, N, D_OTH, UPCAST, ROUND_TF32, BLOCK_M, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    rs = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for l0 in range(0, N, BLOCK_N):
        cols = l0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        sqo_l = _sq(sq_own_ptr, cols, cmask, sim, BLOCK_N)
        sqt_l = _sq(sq_oth_ptr, cols, cmask, sim, BLOCK_N)
        g_oth = _gram(oth_ptr, stride_oth, a_oth, rows, cols, N, D_OTH, RESIDENT, UPCAST, DOT_PRECISION, ROUND_TF32,
                      BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        s_oth = _logits(g_oth, rows, cols, sqt_k, sqt_l, scale, gamma, sim)
        g_own = _gram(own_ptr, stride_own, a_own, rows, cols, N, D_OWN, RESIDENT, UPCAST, DOT_PRECISION, ROUND_TF32,
                      BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        s_own = _logits(g_own, rows, cols, sqo_k, sqo_l, scale, gamma, sim)
        # Tile (K, L) normalized by rows K, then tile (L, K)ᵀ normalized by rows L: one term set live at a time.
        q, qg = _own_terms(s_oth - lt_k[:, None], s_own - lo_k[:, None], eps, ln2, div)
        w = qg - q * gb_k[:, None]
        lo_l = tl.load(lse_own_ptr + cols, mask=cmask, other=0.0)
        lt_l = tl.load(lse_oth_ptr + cols, mask=cmask, other=0.0)
        gb_l = tl.load(gb_ptr + cols, mask=cmask, other=0.0)
        q, qg = _own_terms(s_oth - lt_l[None, :], s_own - lo_l[None, :], eps, ln2, div)
        w += qg - q * gb_l[None, :]
        w = tl.where(rmask[:, None] & cmask[None, :], w, 0.0)
        if sim == 1:
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
    if sim == 1:
        uk = tl.load(own_ptr + rows.to(tl.int64)[:, None] * stride_own + dcols[None, :], mask=omask, other=0.0)
        g = out_scale * (acc * (1.0 / w_scale) - rs[:, None] * uk.to(tl.float32))
    else:
        g = acc * (out_scale / w_scale)
    tl.store(out, g.to(g_ptr.dtype.element_ty), mask=omask)


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


# --------------------------------------------------------------------------------------------------
# Launch configuration: operand modes, autotune spaces (the host's launches and aot.py both come from here)
# --------------------------------------------------------------------------------------------------
# Contraction width. RESIDENT (max(d_x, d_z) ≤ RESIDENT_K): each program loads its row block of X̂ and Ẑ once, all
# of d (zero-padded to RESIDENT_K), and keeps it on chip for the whole column loop; every tile then reads only the
# column operand (L2 traffic per tile BLOCK_N·d instead of (BLOCK_M + BLOCK_N)·d). Wider inputs walk d in
# CHUNK_K chunks, re-reading the row chunk per column tile. Fixed widths (not next_pow2(d)) keep the number of
# compiled variants small; the padding costs tensor-core FLOPs only where d is small and the exps dominate.
RESIDENT_K = {"half": 128, "fp32": 64}
# fp32 chunks: IEEE 32; TF32 16 (the tf32 rounding of both operands adds live registers: pass B spilled at 32).
CHUNK_K = {"half": 64, "ieee": 32, "tf32": 16}


def operand_mode(dx: int, dz: int, dtype: torch.dtype, precision: str | None = None,
                 block_k: int | None = None) -> tuple[bool, int]:  # fmt: skip
    """(RESIDENT, BLOCK_K) of every pass for these widths: the row operand on chip when max(d_x, d_z) fits
    RESIDENT_K (or ``block_k`` when given), else BLOCK_K-wide chunks."""
    d = max(dx, dz)
    if block_k is not None:
        return d <= block_k, int(block_k)
    if dtype == torch.float32:
        return (True, RESIDENT_K["fp32"]) if d <= RESIDENT_K["fp32"] else (False, CHUNK_K[dot_precision(dtype, precision)])
    return (True, RESIDENT_K["half"]) if d <= RESIDENT_K["half"] else (False, CHUNK_K["half"])


def _esize(key: dict) -> int:
    return 4 if key["dtype"] == "float32" else 2


def _operand_smem(cfg: TuneConfig, key: dict, sides: int) -> int:
    # pipelined dot operands of ``sides`` Gram tiles: resident row block + num_stages column tiles, or num_stages
    # (row chunk + column chunk) when chunked
    bm, bn, bk, st, e = cfg["BLOCK_M"], cfg["BLOCK_N"], key["block_k"], cfg.num_stages, _esize(key)
    per = (bm * bk + st * bn * bk) * e if key["resident"] else st * (bm + bn) * bk * e
    return sides * per


# Tile spaces, declared once. Registers bound them, not shared memory: sm_90 has 64 K 32-bit registers per SM, and
# a thread holds BLOCK_M·BLOCK_N/(32·num_warps) elements of every live fp32 tile ("elements" below). Declared
# pruning (``allowed``): every config of the declared grids was compiled for sm_90 by aot.py (triton 3.7, ptxas -v)
# in every variant (operands half / IEEE fp32 / TF32, row operand resident / chunked); the configs that spilled are
# removed per variant, by the rules below (59 of 192 compiled candidates spilled 20 B–2.1 KB; none of what is left).
# The variant matters: chunked half operands (BLOCK_K 64 pipelined through the inner loop) and IEEE fp32 (FMA
# dots, operands in registers) cost the most registers, TF32 chunks of 16 the least.
_ELEMS = lambda c, cols: c["BLOCK_M"] * cols // (32 * c.num_warps)  # noqa: E731


def _variant(key: dict) -> str:
    return "half" if key["dtype"] != "float32" else key["precision"]  # "half" | "ieee" | "tf32"


def _lse_allowed(cfg: TuneConfig, key: dict) -> bool:
    # one S tile and the online max/sum. Resident: ≤ 64 elements (128 × 128 needs 8 warps: 128 elements spilled),
    # except half 64 × 128 with 4 warps (64 B). Chunked TF32: ≤ 64 elements. Chunked half / IEEE: 8 warps and ≤ 32
    # elements (128 × 128 spilled 20–656 B, every 4-warp tile 32 B–1.8 KB), and IEEE 128 × 64 only with 2 stages
    # (3 stages: 40 B).
    e, v, bm, w = _ELEMS(cfg, cfg["BLOCK_N"]), _variant(key), cfg["BLOCK_M"], cfg.num_warps
    if key["resident"]:
        return e <= 64 and not (v == "half" and bm == 64 and cfg["BLOCK_N"] == 128 and w == 4)
    if v == "tf32":
        return e <= 64
    return w == 8 and e <= 32 and not (v == "ieee" and bm == 128 and cfg.num_stages == 3)


def _loss_allowed(cfg: TuneConfig, key: dict) -> bool:
    # both S tiles and the divergence terms (~6 live tiles): ≤ 8 elements always; 16 elements when resident (IEEE
    # 128 × 32: 32 B), chunked TF32, or chunked IEEE 64 × 64 / 8 warps (128 × 32 and 64 × 32 / 4 warps: 124 B);
    # chunked half spilled at 16 (24 B at 64 × 64 / 8 warps, 0.9–1.1 KB otherwise); every 32-element tile spilled
    # (0.2–3.2 KB, 128 × 128 with 8 or 16 warps 4–7 KB).
    e, v = _ELEMS(cfg, cfg["BLOCK_N"]), _variant(key)
    if e <= 8:
        return True
    if e > 16:
        return False
    if key["resident"]:
        return not (v == "ieee" and cfg["BLOCK_M"] == 128)
    return v == "tf32" or (v == "ieee" and cfg["BLOCK_M"] == 64 and cfg["BLOCK_N"] == 64)


# pass C adds W and the BLOCK_M × BLOCK_D accumulator to both S tiles: the compiled candidates that did not spill,
# per variant (tiles as (BLOCK_M, BLOCK_N, BLOCK_D, num_warps); the 32-element S tiles all spilled 5–6 KB, so the
# grid below ≤ 16 elements is what was compiled).
_GRAD_OK = {
    ("half", True): {(128, 32, 64, 8), (64, 32, 64, 4), (64, 32, 64, 8), (64, 64, 64, 8)},
    ("half", False): {(64, 32, 128, 8), (64, 32, 64, 8)},  # 64 × 64 × 64: 320 B, 128 × 32: 2.1 KB
    ("ieee", True): {(64, 32, 128, 8)},  # 64 × 32 × 64 / 8 warps: 176 B (!), 64 × 64 × 64: 360 B
    ("ieee", False): {(128, 32, 64, 8), (64, 32, 128, 8), (64, 32, 64, 8), (64, 64, 64, 8)},
    ("tf32", True): {(64, 32, 64, 8), (64, 64, 128, 8), (64, 64, 64, 8)},
    ("tf32", False): {(128, 32, 64, 8), (64, 32, 128, 8), (64, 32, 64, 4), (64, 32, 64, 8), (64, 64, 128, 8),
                      (64, 64, 64, 8)},
}  # fmt: skip


def _grad_allowed(cfg: TuneConfig, key: dict) -> bool:
    tile = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg.num_warps)
    return tile in _GRAD_OK[(_variant(key), bool(key["resident"]))]


def _first_candidate(space: TuneSpace, key: dict, prefs) -> TuneConfig:
    # the first of ``prefs`` (dicts of constexprs + num_warps/num_stages) that is a candidate for ``key``
    cands = space.candidates(key)
    for want in prefs:
        for c in cands:
            if all((c.options if k.startswith("num_") else c.meta).get(k) == v for k, v in want.items()):
                return c
    return cands[0]


# Heuristics (no benchmark: interpreter, STRUCTURE_OPS_AUTOTUNE=0): the largest allowed tiles, 8 warps.
def _lse_heuristic(key: dict) -> TuneConfig:
    return _first_candidate(LSE_SPACE, key, [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=8, num_stages=2)
                                             for bm, bn in ((128, 128), (128, 64), (64, 128), (64, 64))])  # fmt: skip


def _loss_heuristic(key: dict) -> TuneConfig:
    return _first_candidate(LOSS_SPACE, key, [dict(BLOCK_M=64, BLOCK_N=bn, num_warps=8) for bn in (64, 32)])


def _grad_heuristic(key: dict) -> TuneConfig:
    bd = (64, 128) if key["d_own"] <= 64 else (128, 64)  # one chunk when d ≤ 64, else the wider chunk first
    return _first_candidate(GRAD_SPACE, key, [dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_D=d, num_warps=8)
                                              for d in bd for bn in (64, 32)])  # fmt: skip


LSE_SPACE = TuneSpace(
    "structure_flash.lse",
    config_grid(BLOCK_M=(64, 128), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    heuristic=_lse_heuristic, smem=lambda c, k: _operand_smem(c, k, 1), allowed=_lse_allowed,
)  # fmt: skip
LOSS_SPACE = TuneSpace(
    "structure_flash.loss",
    config_grid(BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2,)),
    heuristic=_loss_heuristic, smem=lambda c, k: _operand_smem(c, k, 2), allowed=_loss_allowed,
)  # fmt: skip
GRAD_SPACE = TuneSpace(
    "structure_flash.grad",
    config_grid(BLOCK_M=(64, 128), BLOCK_N=(32, 64, 128), BLOCK_D=(64, 128), num_warps=(4, 8), num_stages=(2,)),
    heuristic=_grad_heuristic, allowed=_grad_allowed,
    # + the W tile and the pipelined Û_L chunk of the second GEMM
    smem=lambda c, k: _operand_smem(c, k, 2) + _esize(k) * (c["BLOCK_M"] * c["BLOCK_N"]
                                                            + c.num_stages * c["BLOCK_N"] * c["BLOCK_D"]),
)  # fmt: skip
SPACES = {"lse": LSE_SPACE, "loss": LOSS_SPACE, "grad_z": GRAD_SPACE, "grad_x": GRAD_SPACE}


def tune_keys(n: int, dx: int, dz: int, dtype: torch.dtype, precision: str | None = None,
              block_k: int | None = None) -> dict[str, dict]:  # fmt: skip
    """The autotune key of each pass: N, d_x, d_z bucketed (next power of two), dtype, tl.dot precision, the operand
    mode; pass C also the width of its side."""
    res, bk = operand_mode(dx, dz, dtype, precision, block_k)
    base = autotune_key(n=n, dtype=dtype, precision=precision, dx=next_pow2(dx), dz=next_pow2(dz), resident=res,
                        block_k=bk)  # fmt: skip
    return {"lse": base, "loss": base, "grad_z": {**base, "d_own": next_pow2(dz)},
            "grad_x": {**base, "d_own": next_pow2(dx)}}  # fmt: skip


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
    """The launches of :func:`structure_level1_flash` when it does not benchmark (the interpreter,
    STRUCTURE_OPS_AUTOTUNE=0, block overrides): {"lse", "loss", "grad_z", "grad_x"} → {"constexprs", "options"}
    ("grad_*" only when requested), each the space's heuristic choice (or STRUCTURE_OPS_AUTOTUNE_FORCE's) plus the
    operand mode. On a GPU with autotuning the host picks from the same spaces by timing; aot.py compiles every
    candidate of every space. ``similarity`` and ``divergence`` are runtime kernel arguments (no constexpr).
    """
    prec = dot_precision(dtype, precision)
    res, bk = operand_mode(dx, dz, dtype, precision)
    common = dict(UPCAST=bool(interpret), DOT_PRECISION=prec, ROUND_TF32=round_tf32(dtype, precision), RESIDENT=res,
                  BLOCK_K=bk)  # fmt: skip
    keys = tune_keys(n, dx, dz, dtype, precision)
    out = {}
    for name in ("lse", "loss", "grad_z", "grad_x"):
        if name == "grad_z" and not grad_z or name == "grad_x" and not grad_x:
            continue
        cfg = SPACES[name].choose(keys[name])
        out[name] = {"constexprs": {**common, **cfg.meta}, "options": cfg.options}
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
        block_m, block_n, block_k, block_d, num_warps, num_stages: launch overrides (tests, tuning) of every pass
        (then nothing is benchmarked); BLOCK_M/N are the row/column tile, BLOCK_K the contraction width (the row
        operand stays on chip when max(d_x, d_z) ≤ block_k), BLOCK_D the gradient feature chunk. Without them each
        pass's tile comes from its autotune space (``LSE_SPACE``, ``LOSS_SPACE``, ``GRAD_SPACE``; docs/kernels.md,
        "Autotuning").
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
    overrides = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_d}
    for name, b in overrides.items():
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"{name.lower()} must be a power of two >= 16 (tl.dot tiles), got {b}")
    for name, v in (("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    overrides = {k: int(v) for k, v in overrides.items() if v is not None}
    opt_over = {k: int(v) for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    tune = not overrides and not opt_over

    dtype, dev = xh.dtype, xh.device
    xh = xh.contiguous()
    zh = zh.contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    precision = torch.get_float32_matmul_precision()
    res, bk = operand_mode(dx, dz, dtype, precision, overrides.get("BLOCK_K"))
    common = dict(UPCAST=INTERPRET, DOT_PRECISION=dot_precision(dtype, precision),
                  ROUND_TF32=round_tf32(dtype, precision), RESIDENT=res, BLOCK_K=bk)  # fmt: skip
    keys = tune_keys(n, dx, dz, dtype, precision, overrides.get("BLOCK_K"))

    def choose(name: str, bench) -> dict:
        # the pass's config: benchmarked (GPU, autotuning on, no overrides), else heuristic or forced; overrides
        # replace single fields
        cfg = SPACES[name].choose(keys[name], bench if tune else None, dev)
        cst = {**common, **cfg.meta, **{k: v for k, v in overrides.items() if k in cfg.meta}}
        return {"constexprs": cst, "options": {**cfg.options, **opt_over}}

    def as_launch(cfg: TuneConfig) -> dict:
        return {"constexprs": {**common, **cfg.meta}, "options": cfg.options}

    scale = 1.0 / float(temperature) if similarity == COSINE else 1.0
    gamma = float(gamma)
    epsf = float(eps) if divergence == STRUCTURE else 0.0
    grad = bool(grad_x or grad_z)

    # Triton launches on the current device: make it the inputs' device (a no-op for the interpreter).
    with device_guard(dev):
        lse_x = torch.empty(n, **f32)
        lse_z = torch.empty(n, **f32)
        if similarity == RBF:
            # Row norms in fp32 from the operand values that the GEMM sees (O(N·d)).
            sq_x = xh.float().square().sum(dim=1)
            sq_z = zh.float().square().sum(dim=1)
        else:
            sq_x, sq_z = lse_x, lse_z  # never read (sim = 0)

        # Pass A
        def run_lse(launch: dict):
            cst = launch["constexprs"]
            grid = (triton.cdiv(n, cst["BLOCK_M"]),)
            return [
                _lse_kernel[grid](u, sq, lse, n, d, u.stride(0), scale, gamma, similarity, **cst, **launch["options"])
                for u, sq, lse, d in ((xh, sq_x, lse_x, dx), (zh, sq_z, lse_z, dz))
            ]

        run_lse(choose("lse", lambda c: run_lse(as_launch(c))))

        # Pass B
        row_loss = torch.empty(n, **f32)
        gb_x = torch.empty(n if grad else 1, **f32)  # ḡ of both sides whenever a gradient is asked for
        gb_z = torch.empty(n if grad else 1, **f32)

        def run_loss(launch: dict):
            cst = launch["constexprs"]
            return _loss_kernel[(triton.cdiv(n, cst["BLOCK_M"]),)](
                xh, zh, sq_x, sq_z, lse_x, lse_z, row_loss, gb_x, gb_z, n, dx, dz, xh.stride(0), zh.stride(0),
                scale, gamma, epsf, similarity, divergence, int(grad), **cst, **launch["options"],
            )  # fmt: skip

        run_loss(choose("loss", lambda c: run_loss(as_launch(c))))
        # Fixed-order reduction of N row losses (deterministic), fp64 so that large N loses nothing here.
        loss = (row_loss.to(torch.float64).sum() / n).to(torch.float32)

        empty = torch.empty(0, dtype=dtype, device=dev)
        gx = torch.empty((n, dx), dtype=dtype, device=dev) if grad_x else empty
        gz = torch.empty((n, dz), dtype=dtype, device=dev) if grad_z else empty
        # Pass C, one launch per side: (own, other) = (Ẑ, X̂) for dẐ, (X̂, Ẑ) for dX̂.
        k = half_scale_exp(n, dtype, divergence, epsf, half_scale_min_n)
        w_scale = math.ldexp(1.0, k)
        out_scale = (scale if similarity == COSINE else 2.0 * gamma) / n
        sides = (("grad_z", grad_z, zh, xh, sq_z, sq_x, lse_z, lse_x, gb_z, gz),
                 ("grad_x", grad_x, xh, zh, sq_x, sq_z, lse_x, lse_z, gb_x, gx))  # fmt: skip
        for side, want, own, oth, sq_own, sq_oth, lse_own, lse_oth, gb, g in sides:
            if not want:
                continue

            def run_grad(launch: dict, own=own, oth=oth, sq_own=sq_own, sq_oth=sq_oth, lse_own=lse_own,
                         lse_oth=lse_oth, gb=gb, g=g):  # fmt: skip
                cst = launch["constexprs"]
                grid = (triton.cdiv(n, cst["BLOCK_M"]), triton.cdiv(own.shape[1], cst["BLOCK_D"]))
                return _grad_kernel[grid](
                    own, oth, sq_own, sq_oth, lse_own, lse_oth, gb, g,
                    n, own.shape[1], oth.shape[1], own.stride(0), oth.stride(0), scale, gamma, epsf, out_scale,
                    w_scale, similarity, divergence, **cst, **launch["options"],
                )  # fmt: skip

            run_grad(choose(side, lambda c, run=run_grad: run(as_launch(c))))
        return loss, gx, gz


def flash_flops(
    n: int, dx: int, dz: int, *, grad_x: bool = False, grad_z: bool = True, block_d: int | None = None
) -> float:
    """GEMM FLOPs of :func:`structure_level1_flash` (the benchmark's FLOP model; d unpadded).

    4N²(d_x + d_z) for passes A and B; pass C, once per requested side u ∈ {X̂, Ẑ}: n_c(u)·2N²(d_x + d_z) (tile
    recomputation, once per BLOCK_D feature chunk of d_u) + 2N²·d_u. d_x = d_z = d ≤ BLOCK_D, grad_z only:
    14 N² d. ``block_d`` None: the BLOCK_D of the heuristic's choice for each side (64 for d ≤ 64, else 128).
    """
    flops = 4.0 * n * n * (dx + dz)
    for want, d in ((grad_z, dz), (grad_x, dx)):
        if want:
            bd = block_d or (64 if d <= 64 else 128)
            flops += math.ceil(d / bd) * 2.0 * n * n * (dx + dz) + 2.0 * n * n * d
    return flops


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): the host's non-benchmarked launches and every candidate of the three spaces
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
_OPERANDS = ("u_ptr", "x_ptr", "z_ptr", "own_ptr", "oth_ptr", "g_ptr")
_FLOATS = ("scale", "gamma", "eps", "out_scale", "w_scale")
# Widths that reach both operand modes (resident: d ≤ RESIDENT_K; chunked above) and both BLOCK_D heuristics.
AOT_SHAPES = ((4096, 64, 64), (4096, 1024, 512))
# fp32's precisions compile to two variants (IEEE; rounded TF32 for "high" and "medium")
_AOT_PRECISIONS = {torch.float32: ("highest", "high"), torch.bfloat16: ("highest",), torch.float16: ("highest",)}


def _signature(kernel, ptr: str, constexprs: dict) -> dict[str, str]:
    # Every argument in the kernel's own order: operand pointers in the input dtype, statistics fp32, sizes and the
    # sim/div/grad codes i32.
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


_KERNEL_FNS = {"_lse_kernel": _lse_kernel, "_loss_kernel": _loss_kernel, "_grad_kernel": _grad_kernel}


def _entry(kernel, ptr: str, launch: dict) -> tuple:
    cst = {a: launch["constexprs"][a] for a in kernel.arg_names if a in launch["constexprs"]}
    return kernel, _signature(kernel, ptr, cst), cst, dict(launch["options"])


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options) of every launch the host makes on a GPU without benchmarking
    (launch_config over every dtype, float32 matmul precision, operand mode and gradient flag), deduplicated."""
    seen, entries = set(), []
    for dtype, ptr in _PTR.items():
        for precision in PRECISIONS:
            for n, dx, dz in AOT_SHAPES:
                cfg = launch_config(n, dx, dz, dtype, similarity=COSINE, divergence=STRUCTURE, grad_x=True,
                                    grad_z=True, precision=precision, interpret=False)  # fmt: skip
                for name, launch in cfg.items():
                    e = _entry(_KERNEL_FNS[_KERNELS[name]], ptr, launch)
                    key = (_KERNELS[name], ptr, tuple(e[2].items()), tuple(sorted(e[3].items())))
                    if key not in seen:
                        seen.add(key)
                        entries.append(e)
    return entries


def aot_space_configs() -> list[tuple]:
    """Every candidate of LSE_SPACE, LOSS_SPACE and GRAD_SPACE for every variant the host can launch: dtype,
    tl.dot precision and operand mode (the sim/div/grad options are runtime arguments); aot.py compiles them all."""
    out = []
    for name, kname in (("lse", "_lse_kernel"), ("loss", "_loss_kernel"), ("grad_z", "_grad_kernel")):
        variants = []
        for dtype, ptr in _PTR.items():
            for precision in _AOT_PRECISIONS[dtype]:
                for n, dx, dz in AOT_SHAPES:
                    res, bk = operand_mode(dx, dz, dtype, precision)
                    base = dict(UPCAST=False, DOT_PRECISION=dot_precision(dtype, precision),
                                ROUND_TF32=round_tf32(dtype, precision), RESIDENT=res, BLOCK_K=bk)  # fmt: skip
                    variants.append((ptr, base, tune_keys(n, dx, dz, dtype, precision)[name]))
        out += space_aot_entries(SPACES[name], _KERNEL_FNS[kname], variants, _signature)
    return out


def _all_entries() -> list[tuple]:
    seen, out = set(), []
    for e in aot_configs() + aot_space_configs():
        key = (e[0].__name__ if hasattr(e[0], "__name__") else e[0].fn.__name__, tuple(e[1].items()),
               tuple(e[2].items()), tuple(sorted(e[3].items())))  # fmt: skip
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


# Every launch the host can make on a GPU: the non-benchmarked ones and every autotune candidate.
AOT_KERNELS = _all_entries()
