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

Passes (four launches plus one N-element host reduction; saved state lseX, lseZ, ḡ_Z (, ḡ_X), ℓ_i and, for
rbf, the squared row norms: ≤ 7N floats, nothing N × N):

  A  ``_lse_kernel`` (once per side): a program owns BLOCK_M rows, loops over column blocks, builds the S tile
     with tl.dot over d in BLOCK_K chunks and keeps an online (max, sum) per row → lse (N floats per side).
  B  ``_loss_kernel``: recomputes both S tiles of a row block; with both final normalizers known, exact ε terms
     → ℓ_i and ḡ_i. (A and B cannot merge: the ε terms need the final lse of both rows.)
  C  ``_grad_kernel`` (only when a gradient is requested): a program owns row block K (and one BLOCK_D chunk of
     the feature columns: grid (⌈N/BLOCK_M⌉, n_c)) and loops over column blocks L. S is symmetric, so the one
     tile S_KL also gives S_LK = S_KLᵀ: the program evaluates W_KL (normalized by rows K) and W_LKᵀ (same
     entries normalized by rows L, whose lse/ḡ were saved) and accumulates (W + Wᵀ)_KL Ẑ_L with ONE GEMM into
     a BLOCK_M × BLOCK_D fp32 accumulator. Every output row is written by exactly one program: deterministic,
     no atomics, no N × N buffer.

FLOP model (GEMM FLOPs; see ``flash_flops``), n_c = ⌈max(d of the requested gradients) / BLOCK_D⌉:

    A: 2N²(d_x + d_z)    B: 2N²(d_x + d_z)    C: n_c · 2N²(d_x + d_z) + 2N²(d_z [grad_z] + d_x [grad_x])

  = 14 N² d for d_x = d_z = d ≤ BLOCK_D with grad_z only (docs/kernels.md §2b); 4N²d without gradients. A wider d
  recomputes the S tiles once per feature chunk (n_c > 1): for d ≥ 512 the row-panel pass (a) is usually cheaper.
  Special functions per (i, j) entry: A 1 exp per side; B 2 exp + 1 log (+1 exp for js) and 2–3 divisions;
  C twice B's; rbf adds 1 exp per side and pass for the kernel value.

Precision: operands in the input dtype (fp32 via ``dot_precision``: IEEE or TF32; bf16/fp16 on tensor cores),
fp32 accumulation; every softmax / divergence quantity in fp32. In pass C the W tile is cast to the operand
dtype for the second GEMM (as FlashAttention does with dS), scaled by N (values O(1), so fp16 does not underflow);
1/N, 1/τ, 2γ are applied to the fp32 accumulator. Under TRITON_INTERPRET=1 operands are converted to fp32
before tl.dot (the interpreter miscomputes raw bf16 dots); bf16×bf16 products are exact in fp32, so the result
matches a tensor-core dot up to summation order.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_precision, level1_terms, next_pow2, row_max, row_sum

__all__ = ["structure_level1_flash", "flash_flops", "AOT_KERNELS", "AOT_OPTIONS"]

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
            SIM, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
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
            SIM, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        sz = _logits_tile(
            z_ptr, stride_z, rows, cols, N, DZ, sqz_i, sqz_j, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
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
# Pass C: gradients
# --------------------------------------------------------------------------------------------------
@triton.jit
def _grad_kernel(
    x_ptr,
    z_ptr,
    sqx_ptr,
    sqz_ptr,
    lsex_ptr,
    lsez_ptr,
    gbx_ptr,
    gbz_ptr,
    gx_ptr,
    gz_ptr,
    N,
    DX,
    DZ,
    stride_x,
    stride_z,
    scale,
    gamma,
    eps,
    inv_n,
    SIM: tl.constexpr,
    DIV: tl.constexpr,
    GRAD_X: tl.constexpr,
    GRAD_Z: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # For row block K and feature chunk c: with N·W_KL = Q∘(g − ḡ_K) (rows K normalized by lse_K) and
    # N·W_LKᵀ = the same S entries normalized by rows L (S symmetric: S_LK = S_KLᵀ),
    #   cosine: dẐ_K,c = (1/(Nτ)) Σ_L (N·W_KL + N·W_LKᵀ) Ẑ_L,c
    #   rbf:    dẐ_K,c = (2γ/N) [Σ_L E_KL Ẑ_L,c − (Σ_L E_KL) Ẑ_K,c],  E = S^Z∘(N·W + N·Wᵀ)
    # and the same for X̂ with P. One GEMM per tile for both W and Wᵀ; each output row has one owner.
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    dcols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    lx_k = tl.load(lsex_ptr + rows, mask=rmask, other=0.0)
    lz_k = tl.load(lsez_ptr + rows, mask=rmask, other=0.0)
    if GRAD_Z:
        gbz_k = tl.load(gbz_ptr + rows, mask=rmask, other=0.0)
    if GRAD_X:
        gbx_k = tl.load(gbx_ptr + rows, mask=rmask, other=0.0)
    if SIM == 1:
        sqx_k = tl.load(sqx_ptr + rows, mask=rmask, other=0.0)
        sqz_k = tl.load(sqz_ptr + rows, mask=rmask, other=0.0)
    else:
        sqx_k = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
        sqz_k = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc_z = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    acc_x = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    rs_z = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    rs_x = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    for l0 in range(0, N, BLOCK_N):
        cols = l0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        lx_l = tl.load(lsex_ptr + cols, mask=cmask, other=0.0)
        lz_l = tl.load(lsez_ptr + cols, mask=cmask, other=0.0)
        if SIM == 1:
            sqx_l = tl.load(sqx_ptr + cols, mask=cmask, other=0.0)
            sqz_l = tl.load(sqz_ptr + cols, mask=cmask, other=0.0)
        else:
            sqx_l = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
            sqz_l = tl.full((BLOCK_N,), 0.0, dtype=tl.float32)
        sx = _logits_tile(
            x_ptr, stride_x, rows, cols, N, DX, sqx_k, sqx_l, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        sz = _logits_tile(
            z_ptr, stride_z, rows, cols, N, DZ, sqz_k, sqz_l, scale, gamma,
            SIM, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        valid = rmask[:, None] & cmask[None, :]
        # Tile (K, L) normalized by rows K, and tile (L, K)ᵀ normalized by rows L.
        p1, q1, _t1, qg1, pg1 = _terms(sx - lx_k[:, None], sz - lz_k[:, None], eps, DIV)
        p2, q2, _t2, qg2, pg2 = _terms(sx - lx_l[None, :], sz - lz_l[None, :], eps, DIV)
        if GRAD_Z:
            gbz_l = tl.load(gbz_ptr + cols, mask=cmask, other=0.0)
            w = (qg1 - q1 * gbz_k[:, None]) + (qg2 - q2 * gbz_l[None, :])
            w = tl.where(valid, w, 0.0)
            if SIM == 1:
                w = w * sz
                rs_z += row_sum(w)
            zl = tl.load(
                z_ptr + cols.to(tl.int64)[:, None] * stride_z + dcols[None, :],
                mask=cmask[:, None] & (dcols[None, :] < DZ),
                other=0.0,
            )
            # W enters the second GEMM in the operand dtype (tensor cores for bf16/fp16), accumulated in fp32.
            w_op = w.to(zl.dtype)
            if UPCAST:
                w_op = w_op.to(tl.float32)
                zl = zl.to(tl.float32)
            acc_z = tl.dot(w_op, zl, acc_z, input_precision=DOT_PRECISION)
        if GRAD_X:
            gbx_l = tl.load(gbx_ptr + cols, mask=cmask, other=0.0)
            wx = (pg1 - p1 * gbx_k[:, None]) + (pg2 - p2 * gbx_l[None, :])
            wx = tl.where(valid, wx, 0.0)
            if SIM == 1:
                wx = wx * sx
                rs_x += row_sum(wx)
            xl = tl.load(
                x_ptr + cols.to(tl.int64)[:, None] * stride_x + dcols[None, :],
                mask=cmask[:, None] & (dcols[None, :] < DX),
                other=0.0,
            )
            wx_op = wx.to(xl.dtype)
            if UPCAST:
                wx_op = wx_op.to(tl.float32)
                xl = xl.to(tl.float32)
            acc_x = tl.dot(wx_op, xl, acc_x, input_precision=DOT_PRECISION)
    if GRAD_Z:
        zmask = rmask[:, None] & (dcols[None, :] < DZ)
        out_z = gz_ptr + rows.to(tl.int64)[:, None] * stride_z + dcols[None, :]
        if SIM == 0:
            gz = acc_z * (scale * inv_n)
        else:
            zk = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + dcols[None, :], mask=zmask, other=0.0)
            gz = (2.0 * gamma * inv_n) * (acc_z - rs_z[:, None] * zk.to(tl.float32))
        tl.store(out_z, gz.to(gz_ptr.dtype.element_ty), mask=zmask)
    if GRAD_X:
        xmask = rmask[:, None] & (dcols[None, :] < DX)
        out_x = gx_ptr + rows.to(tl.int64)[:, None] * stride_x + dcols[None, :]
        if SIM == 0:
            gx = acc_x * (scale * inv_n)
        else:
            xk = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dcols[None, :], mask=xmask, other=0.0)
            gx = (2.0 * gamma * inv_n) * (acc_x - rs_x[:, None] * xk.to(tl.float32))
        tl.store(out_x, gx.to(gx_ptr.dtype.element_ty), mask=xmask)


# --------------------------------------------------------------------------------------------------
# Host entry
# --------------------------------------------------------------------------------------------------
def _pick(value, default):
    return default if value is None else int(value)


def flash_flops(n: int, dx: int, dz: int, *, grad_x: bool = False, grad_z: bool = True, block_d: int = 128) -> float:
    """GEMM FLOPs of :func:`structure_level1_flash` (the benchmark's FLOP model).

    4N²(d_x + d_z) for passes A and B; with a gradient, pass C adds n_c·2N²(d_x + d_z) (tile recomputation, once
    per BLOCK_D feature chunk) + 2N²·d of each requested gradient. d_x = d_z = d ≤ block_d, grad_z: 14 N² d.
    """
    flops = 4.0 * n * n * (dx + dz)
    if grad_x or grad_z:
        dmax = max(dz if grad_z else 0, dx if grad_x else 0)
        n_c = math.ceil(dmax / block_d)
        flops += n_c * 2.0 * n * n * (dx + dz)
        flops += 2.0 * n * n * ((dz if grad_z else 0) + (dx if grad_x else 0))
    return flops


def _default_blocks(n: int, dx: int, dz: int, dgrad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if INTERPRET:
        # The interpreter pays per program and per op: few, large blocks.
        bmn = min(64, max(16, next_pow2(n)))
        return bmn, bmn, min(64, max(16, next_pow2(max(dx, dz)))), min(64, max(16, next_pow2(dgrad)))
    bk = 32 if dtype == torch.float32 else 64
    return 64, 64, bk, min(128, max(16, next_pow2(dgrad)))


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
        block_m, block_n, block_k, block_d, num_warps, num_stages: launch overrides (tests, tuning); BLOCK_M/N
        are the row/column tile, BLOCK_K the contraction chunk, BLOCK_D the gradient feature chunk per program.
    Returns:
        (D, gx, gz): D a 0-dim fp32 tensor; gx (N, d_x) and gz (N, d_z) contiguous in the input dtype, or empty
        (0,) tensors when not requested.
    Supported: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; fp32 (tl.dot precision from
    torch.get_float32_matmul_precision()), bf16, fp16. fp64 raises NotImplementedError.
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
    dgrad = max(dz if grad_z else 1, dx if grad_x else 1)
    bm0, bn0, bk0, bd0 = _default_blocks(n, dx, dz, dgrad, dtype)
    bm, bn, bk, bd = _pick(block_m, bm0), _pick(block_n, bn0), _pick(block_k, bk0), _pick(block_d, bd0)
    for name, b in (("block_m", bm), ("block_n", bn), ("block_k", bk), ("block_d", bd)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles), got {b}")
    launch = {}
    if not INTERPRET:
        # 8 warps: with 4, the loss/grad kernels spill (two S tiles and their elementwise terms live at once).
        launch["num_warps"] = _pick(num_warps, AOT_OPTIONS["num_warps"])
        launch["num_stages"] = _pick(num_stages, AOT_OPTIONS["num_stages"])
    common = dict(UPCAST=INTERPRET, DOT_PRECISION=dot_precision(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    scale = 1.0 / float(temperature) if similarity == COSINE else 1.0
    gamma = float(gamma)
    epsf = float(eps) if divergence == STRUCTURE else 0.0

    # Triton launches on the current device: make it the inputs' device (a no-op for cuda:0 / the interpreter).
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        lse_x = torch.empty(n, **f32)
        lse_z = torch.empty(n, **f32)
        if similarity == RBF:
            # Row norms in fp32 from the operand values that the GEMM sees (O(N·d)).
            sq_x = xh.float().square().sum(dim=1)
            sq_z = zh.float().square().sum(dim=1)
        else:
            sq_x, sq_z = lse_x, lse_z  # never read (SIM constexpr)

        grid_rows = (triton.cdiv(n, bm),)
        # Pass A
        _lse_kernel[grid_rows](xh, sq_x, lse_x, n, dx, xh.stride(0), scale, gamma, SIM=similarity, **common, **launch)
        _lse_kernel[grid_rows](zh, sq_z, lse_z, n, dz, zh.stride(0), scale, gamma, SIM=similarity, **common, **launch)

        # Pass B
        row_loss = torch.empty(n, **f32)
        gb_x = torch.empty(n if grad_x else 1, **f32)
        gb_z = torch.empty(n if grad_z else 1, **f32)
        _loss_kernel[grid_rows](
            xh, zh, sq_x, sq_z, lse_x, lse_z, row_loss, gb_x, gb_z,
            n, dx, dz, xh.stride(0), zh.stride(0), scale, gamma, epsf,
            SIM=similarity, DIV=divergence, GRAD_X=bool(grad_x), GRAD_Z=bool(grad_z), **common, **launch,
        )  # fmt: skip
        # Fixed-order reduction of N row losses (deterministic), fp64 so that large N loses nothing here.
        loss = (row_loss.to(torch.float64).sum() / n).to(torch.float32)

        empty = torch.empty(0, dtype=dtype, device=dev)
        gx = torch.empty((n, dx), dtype=dtype, device=dev) if grad_x else empty
        gz = torch.empty((n, dz), dtype=dtype, device=dev) if grad_z else empty
        if grad_x or grad_z:
            # Pass C
            grid = (triton.cdiv(n, bm), triton.cdiv(dgrad, bd))
            _grad_kernel[grid](
                xh, zh, sq_x, sq_z, lse_x, lse_z, gb_x, gb_z, gx if grad_x else xh, gz if grad_z else zh,
                n, dx, dz, xh.stride(0), zh.stride(0), scale, gamma, epsf, 1.0 / n,
                SIM=similarity, DIV=divergence, GRAD_X=bool(grad_x), GRAD_Z=bool(grad_z), BLOCK_D=bd,
                **common, **launch,
            )  # fmt: skip
        return loss, gx, gz


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation entries (aot.py: triton.compile(ASTSource(fn, signature, constexprs), GPUTarget))
# --------------------------------------------------------------------------------------------------
def _aot_signature(kernel, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    # Every argument in the kernel's own order: pointers/scalars typed, constexprs marked.
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = types.get(name, "*fp32")
        elif name in ("scale", "gamma", "eps", "inv_n"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


_AOT_CONFIGS = (
    # (kernel, BLOCK_M, kernel-specific constexprs)
    ("lse", 64, dict(SIM=COSINE)),
    ("lse", 128, dict(SIM=RBF)),
    ("loss", 64, dict(SIM=COSINE, DIV=STRUCTURE, GRAD_X=False, GRAD_Z=True)),
    ("loss", 128, dict(SIM=RBF, DIV=JS, GRAD_X=True, GRAD_Z=True)),
    ("grad", 64, dict(SIM=COSINE, DIV=STRUCTURE, GRAD_X=False, GRAD_Z=True, BLOCK_D=64)),
    ("grad", 64, dict(SIM=COSINE, DIV=JS, GRAD_X=True, GRAD_Z=True, BLOCK_D=64)),
    ("grad", 128, dict(SIM=RBF, DIV=STRUCTURE, GRAD_X=False, GRAD_Z=True, BLOCK_D=64)),
    ("grad", 64, dict(SIM=COSINE, DIV=STRUCTURE, GRAD_X=False, GRAD_Z=True, BLOCK_D=128)),
)

# Options that the host launch uses and that aot.py may pass as triton.compile(..., options=AOT_OPTIONS): with
# the compiler's default of 4 warps the loss/grad kernels spill registers (ptxas -v), with 8 they do not (64-row).
AOT_OPTIONS = {"num_warps": 8, "num_stages": 2}


def _aot_entries() -> list[tuple[object, dict[str, str], dict[str, object]]]:
    # Representative configurations (the launch defaults and the tuning candidates), fp32 (TF32 dots) and bf16:
    # each kernel with 64- and 128-row blocks, both similarities and divergences, with and without grad_x.
    kernels = {"lse": _lse_kernel, "loss": _loss_kernel, "grad": _grad_kernel}
    entries: list[tuple[object, dict[str, str], dict[str, object]]] = []
    for ty, prec, bk in (("fp32", "tf32", 32), ("bf16", "ieee", 64)):
        operand = {name: f"*{ty}" for name in ("u_ptr", "x_ptr", "z_ptr", "gx_ptr", "gz_ptr")}
        for name, block_m, extra in _AOT_CONFIGS:
            kernel = kernels[name]
            cst = {**extra, "UPCAST": False, "DOT_PRECISION": prec, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": bk}
            cst = {arg: cst[arg] for arg in kernel.arg_names if arg in cst}  # the kernel's own order
            entries.append((kernel, _aot_signature(kernel, operand, cst), cst))
    return entries


AOT_KERNELS = _aot_entries()
