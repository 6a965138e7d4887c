r"""STRUCTURE regularizer, Triton backend: host entry ``structure_fwd`` and the row-panel kernels.

Math (X̂ = xh: N × d_x, Ẑ = zh: N × d_z, already normalized and centered; csrc/cpu/structure_cpu.cpp computes
the same thing, option codes as in structure_ops/_options.py):

    S^U = Û Ûᵀ / τ   (cosine)   or   S^U_ij = exp(−γ (‖û_i‖² + ‖û_j‖² − 2 ⟨û_i, û_j⟩))   (rbf, no τ)
    P = softmax_rows(S^X), Q = softmax_rows(S^Z) (diagonal kept),  O_l = Pˡ, A_l = Qˡ
    D_l = (1/N) Σ_ij term(O_l,ij, A_l,ij)
      "structure": term = ¼ (Õ + Ã) log1p((Õ − Ã)² / (4 Õ Ã)),  Õ = O + ε, Ã = A + ε
                   (= ½ M̃ · (−log1p(−r²)), r = (Õ − Ã)/(Õ + Ã); evaluated as log1p((d/Õ)(d/Ã)/4), d = Õ − Ã, which
                   has no cancellation and, unlike log1p(−r²), no log1p(−1) = −inf in fp32 when Õ/Ã ~ 1/ε)
      "js":        term = ½ [O log(O/M) + A log(A/M)],  M = (O + A)/2 (level 1 from log-probabilities)
    R_S = (1/L) Σ_l w_l · relu(D_l − margin),  w_l = 1 ("none") or 1/l ("inverse")

Gradient (docs/kernels.md §1, §3), computed in the forward call (the loss is a scalar: backward only scales it):
    level 1:  g = ∂term/∂Q, ḡ_i = Σ_j Q_ij g_ij, dS^Z = W = Q∘(g − ḡ)/N     (dS^X: same with P, ∂term/∂P)
    levels:   adj(A_L) = c_L G_L,  adj(A_{l−1}) = c_{l−1} G_{l−1} + adj(A_l) Qᵀ,  adj(Q) += A_{l−1}ᵀ adj(A_l),
              G_l = ∂D_l/∂A_l, c_l = w_l/L when the margin gate is open (else 0);
              dS^Z = Q∘(adj(Q) − rowsum(Q∘adj(Q))) + c_1 W_1
    chain:    cosine dẐ = (dS + dSᵀ) Ẑ / τ;   rbf K = S∘dS, dẐ = 2γ [(K + Kᵀ) Ẑ − (K·1 + Kᵀ·1)∘Ẑ]

Pass structures:
  level 1, mode "rows" (docs/kernels.md §2a): row panels I of B rows, B from the free device memory
    (_common.panel_rows: half of it, capped at 2048 MiB or STRUCTURE_OPS_TRITON_PANEL_MB; 256 MiB or the knob on CPU). Per panel:
    1. ``_gram_kernel`` (per side): S_I = logits of Û_I Ûᵀ by tl.dot on the input dtype, its epilogue writes S_I and
       each tile's per-row (max, Σexp); the host merges them into lse_I in a fixed order.
    2. ``_rows_loss_kernel``: ℓ_i and the ḡ partial sums per (row, column chunk);
    3. ``_rows_grad_kernel``: W_I = 2^k·Q∘(g − ḡ) (terms recomputed from both logits rows; rbf: S∘W and row sums),
       stored in the GEMM operand dtype (half for half inputs);
       both row kernels run on a 2-D grid (row blocks × column chunks, ``row_grid``) when a panel has fewer row
       blocks than SMs; partial sums are combined by the host in a fixed order (deterministic, no atomics).
    4. ``_grad_gemm_kernel``: dÛ_I += W_I Û and dÛ += W_Iᵀ Û_I accumulated in place (beta = 1, no scale); the scale
       α/(N·2^k) (α = 1/τ or 2γ) is applied ONCE to the accumulated gradient at the end.
    Main-memory bytes per (i, j) pair (compute dtype fp32, e_w = W element size; forward / grad_z / both sides):
      before (torch Gram GEMMs, one 3-pass row kernel: online lse pass, pass writing Q∘g, pass writing W):
        Gram write 8 + row kernel 16 / 32 / 48 + W reads by the GEMMs 0 / 8 / 16  = 24 / 48 / 72 B
      now (lse in the Gram epilogue, 2 row passes, W written once):
        Gram write 8 + row kernels 8 / 16 + e_w / 16 + 2e_w + W reads 0 / 2e_w / 4e_w
        = 16 / 36 / 48 B with fp32 W, 16 / 30 / 36 B with bf16/fp16 W.
  level 1, mode "flash" (docs/kernels.md §2b): structure_flash.structure_level1_flash (O(N) memory); margin on top.
  levels > 1 (docs/kernels.md §3): the level-1 Gram and loss kernels also write P, Q into N × N buffers and the
    gradient row kernel W_1 (2^k = 1/N); powers by one torch GEMM per level and side; ``_level_div_kernel`` is the
    fused divergence epilogue of each level (row losses and G_l in one pass); the adjoint products by torch GEMMs;
    ``_softmax_bwd_kernel`` applies the softmax Jacobian, adds c_1 W_1 and (rbf) multiplies by S.

Precision (docs/kernels.md §6): level 1 "rows" keeps the input dtype for both GEMMs: bf16/fp16 operands on the
tensor cores with fp32 accumulation (a half product is exact in fp32; logits, softmax, lse and the divergence
math stay fp32; W is cast to the half dtype as the gradient GEMMs' operand, fp16 scaled by 2^k = ``fp16_w_exp``
so that its ~1/N entries stay in fp16's normal range); fp32 operands follow torch.get_float32_matmul_precision()
("highest" IEEE, "high"/"medium" TF32 with operands rounded RNA by the kernel: _common.dot_operand). Under the
interpreter half operands are converted to fp32 before tl.dot (UPCAST: the same exact products). Levels > 1 upcast
half inputs once (their N × N powers are fp32). fp64 inputs compute in fp64 throughout (scalars reach the kernels
through a small tensor in the compute dtype, so 1/τ, γ, ε, 1/N, ln 2 are not rounded to fp32).
"""

from __future__ import annotations

import logging
import math
import os

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
    level1_terms,
    log1p,
    next_pow2,
    panel_rows,
    round_tf32,
    row_max,
    row_sum,
)

log = logging.getLogger("structure_ops")

__all__ = [
    "structure_fwd", "choose_mode", "multilevel_memory_estimate", "rows_config", "gram_config", "grad_gemm_config",
    "row_grid", "fp16_w_exp", "level_div_config", "softmax_bwd_config", "aot_configs", "MODES", "AOT_KERNELS",
]  # fmt: skip

MODES = ("auto", "rows", "flash")
_COSINE, _RBF = 0, 1
_STRUCTURE, _JS = 0, 1
_NONE, _INVERSE = 0, 1

# Tiles of the row kernels: a program owns BLOCK_M rows and streams them in column blocks of BLOCK_N. On a GPU
# a tile holds ≤ 2048 fp32 / 512 fp64 elements (16 / 4 per thread at 4 warps: the live temporaries of pass 2
# fit in registers, ≤ 170 fp32 registers and no spills for sm_80/sm_90; accumulators are per row); under the interpreter a whole panel in one program is fastest (its
# cost is per program and per op). Tests lower the caps to run the column loop and ragged row blocks.
MAX_BLOCK_N = 4096 if INTERPRET else 1024
MAX_BLOCK_M = 64 if INTERPRET else 8
_TILE_BYTES = 1 << 30 if INTERPRET else 8192

# Layout of the scalar-parameter tensor read by every kernel (compute dtype, so fp64 keeps full precision).
_P_INV_TAU, _P_GAMMA, _P_EPS, _P_INV_N, _P_LN2, _P_TINY, _P_W_SCALE = range(7)
# The SM count the row kernels' grid rule (row_grid) assumes under the interpreter (a GPU reports its own): 1, so
# interpreted runs use the 1-D grid (fewest programs); the tests raise it to run the 2-D grid.
INTERPRET_SMS = 1


# ---------------------------------------------------------------------------------------------------------------
# Elementwise helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------------------------------
# Row reductions and log1p: structure_ops/_triton/_common.py (shared by every kernel).


@triton.jit
def _tile_logits(g_rows, sq_ptr, sq_i, offs, cmask, mask, inv_tau, gamma, RBF: tl.constexpr, gi):
    # A [BLOCK_M, BLOCK_N] tile of logits from Gram rows g_ij = ⟨û_i, û_j⟩ (g_rows: [BLOCK_M, 1] row pointers,
    # offs/cmask: [1, BLOCK_N] columns, sq_i: [BLOCK_M, 1]). Padding gets −1e30, not −inf: its probability is
    # still exactly 0 (every real row has a real logit in its first block), and padded lanes never evaluate
    # −inf − (−inf) (NaN, and numpy warnings under the interpreter).
    g = tl.load(g_rows + offs, mask=mask, other=0.0)
    if RBF:
        sq_j = tl.load(sq_ptr + offs, mask=cmask, other=0.0)
        # rbf (gi: [BLOCK_M] global rows): squared distance clamped at 0 (NaN kept), exactly 0 on the diagonal.
        d2 = sq_i + sq_j - 2.0 * g
        d2 = tl.where(d2 < 0.0, 0.0, d2)
        d2 = tl.where(gi[:, None] == offs, 0.0, d2)
        s = tl.exp(-gamma * d2)
    else:
        s = g * inv_tau
    return tl.where(mask, s, -1e30)


# ---------------------------------------------------------------------------------------------------------------
# Kernel 1: Gram panel GEMM with the logits and log-sum-exp partials in its epilogue
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _gram_kernel(
    u_ptr, stride_u,                 # Û (N × d, input dtype: half operands stay half), row stride
    s_ptr, stride_s,                 # out: logits panel S_I (b × N, compute dtype, local rows)
    pm_ptr, pl_ptr, stride_p,        # out: per (row, column block) max and Σ exp(S − max) (b × ⌈N/BLOCK_N⌉)
    sq_ptr, par_ptr,                 # ‖û_j‖² (N, compute dtype; rbf only), scalars
    row0, b, n, d,                   # first global row of the panel, its rows, N, feature width
    RBF: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # S_I = Û_I Ûᵀ/τ (cosine) or exp(−γ max(0, ‖û_i‖² + ‖û_j‖² − 2⟨û_i, û_j⟩)) (rbf, 0 distance on the diagonal):
    # tl.dot on the input dtype (bf16/fp16 on tensor cores, fp32 per DOT_PRECISION with RNA-rounded tf32 operands,
    # fp64 IEEE), accumulated in the compute dtype. The epilogue stores S and the tile's (max, Σexp) per row, so the
    # row kernels never run an online log-sum-exp pass over the panel (one read of S per pair saved).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dt = s_ptr.dtype.element_ty
    inv_tau = tl.load(par_ptr + 0)
    gamma = tl.load(par_ptr + 1)
    loc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = loc < b
    gi = row0 + loc
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n
    kk = tl.arange(0, BLOCK_K)
    a_rows = u_ptr + gi.to(tl.int64)[:, None] * stride_u
    b_cols = u_ptr + cols.to(tl.int64)[None, :] * stride_u
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dt)
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + kk
        kmask = ks < d
        a = tl.load(a_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(b_cols + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # the interpreter miscomputes raw half dots; half products are exact in fp32
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        a = dot_operand(a, ROUND_TF32)
        bt = dot_operand(bt, ROUND_TF32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION, out_dtype=dt)
    mask = rmask[:, None] & cmask[None, :]
    if RBF:
        sq_i = tl.load(sq_ptr + gi, mask=rmask, other=0.0)
        sq_j = tl.load(sq_ptr + cols, mask=cmask, other=0.0)
        d2 = sq_i[:, None] + sq_j[None, :] - 2.0 * acc
        d2 = tl.where(d2 < 0.0, 0.0, d2)
        d2 = tl.where(gi[:, None] == cols[None, :], 0.0, d2)
        s = tl.exp(-gamma * d2)
    else:
        s = acc * inv_tau
    tl.store(s_ptr + loc.to(tl.int64)[:, None] * stride_s + cols[None, :], s, mask=mask)
    # Padding gets −1e30 (weight exactly 0; every column block holds at least one real column).
    s = tl.where(mask, s, -1e30)
    m = row_max(s)
    lsum = row_sum(tl.exp(s - m[:, None]))
    poff = loc.to(tl.int64) * stride_p + pid_n
    tl.store(pm_ptr + poff, m, mask=rmask)
    tl.store(pl_ptr + poff, lsum, mask=rmask)


# ---------------------------------------------------------------------------------------------------------------
# Kernels 2, 3: the level-1 row kernels (grid: row blocks × column chunks)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _rows_loss_kernel(
    sx_ptr, sz_ptr, stride_s,        # logits panels S^X_I, S^Z_I (b × N, local rows)
    lsex_ptr, lsez_ptr,              # lse of the panel's rows (b)
    par_ptr, row0, b, n, chunk,      # scalars, first global row, rows, N, columns per program (multiple of BLOCK_N)
    loss_ptr, gbx_ptr, gbz_ptr,      # out: partial Σ_j term, Σ_j P∘g_P, Σ_j Q∘g_Q per (row, chunk) (b × chunks)
    p_ptr, q_ptr, stride_p,          # out (WRITE_PQ): rows of P, Q (N × N, global rows)
    JS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Z: tl.constexpr, WRITE_PQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a = S^X − lseX, b = S^Z − lseZ, P = e^a, Q = e^b over this program's column chunk:
    #   ℓ_i partial = Σ_j term(P_ij, Q_ij), ḡ partials Σ_j Q∘g, Σ_j P∘g (docs/kernels.md §1; level1_terms).
    # One partial per (row, chunk): the host sums them in a fixed order (deterministic, no atomics).
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    nchunks = tl.num_programs(1)
    dt = sz_ptr.dtype.element_ty
    eps = tl.load(par_ptr + 2)
    ln2 = tl.load(par_ptr + 4)
    loc = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = loc < b
    loc64 = loc.to(tl.int64)[:, None]
    sx_rows = sx_ptr + loc64 * stride_s
    sz_rows = sz_ptr + loc64 * stride_s
    lse_x = tl.load(lsex_ptr + loc, mask=rmask, other=0.0)[:, None]
    lse_z = tl.load(lsez_ptr + loc, mask=rmask, other=0.0)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    c0 = pid_c * chunk
    c1 = tl.minimum(c0 + chunk, n)
    acc = tl.full([BLOCK_M], 0.0, dt)
    acc_gx = tl.full([BLOCK_M], 0.0, dt)
    acc_gz = tl.full([BLOCK_M], 0.0, dt)
    for start in range(c0, c1, BLOCK_N):
        offs = start + cols
        mask = rmask[:, None] & (offs < c1)
        a = tl.load(sx_rows + offs, mask=mask, other=0.0) - lse_x
        b_ = tl.load(sz_rows + offs, mask=mask, other=0.0) - lse_z
        p, q, val, qg, pg = level1_terms(a, b_, eps, ln2, JS)
        acc += row_sum(tl.where(mask, val, 0.0))
        if GRAD_Z:
            acc_gz += row_sum(tl.where(mask, qg, 0.0))
        if GRAD_X:
            acc_gx += row_sum(tl.where(mask, pg, 0.0))
        if WRITE_PQ:
            prow = (row0 + loc).to(tl.int64)[:, None] * stride_p
            tl.store(p_ptr + prow + offs, p, mask=mask)
            tl.store(q_ptr + prow + offs, q, mask=mask)
    poff = loc.to(tl.int64) * nchunks + pid_c
    tl.store(loss_ptr + poff, acc, mask=rmask)
    if GRAD_Z:
        tl.store(gbz_ptr + poff, acc_gz, mask=rmask)
    if GRAD_X:
        tl.store(gbx_ptr + poff, acc_gx, mask=rmask)


@triton.jit
def _rows_grad_kernel(
    sx_ptr, sz_ptr, stride_s,        # logits panels (b × N, local rows)
    lsex_ptr, lsez_ptr, gbx_ptr, gbz_ptr,  # lse and the complete ḡ of the panel's rows (b)
    par_ptr, b, n, chunk,
    wx_ptr, wz_ptr, stride_w,        # out: W_X, W_Z panel rows (b × N; the gradient GEMM's operand dtype)
    ksx_ptr, ksz_ptr,                # out (RBF_K): partial Σ_j S_ij W_ij per (row, chunk) (b × chunks)
    JS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_Z: tl.constexpr, RBF_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # W = w_scale·(Q∘g − Q ḡ) (the terms recomputed from both logits rows: no Q∘g scratch written and re-read);
    # RBF_K: W ← S∘W and its row sums. w_scale (par[6]) is 1, a power of two for fp16 operands (half_scale_exp), or
    # 1/N for levels > 1; the remaining factors are applied once to the accumulated gradient.
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    nchunks = tl.num_programs(1)
    dt = sz_ptr.dtype.element_ty
    eps = tl.load(par_ptr + 2)
    ln2 = tl.load(par_ptr + 4)
    w_scale = tl.load(par_ptr + 6)
    loc = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = loc < b
    loc64 = loc.to(tl.int64)[:, None]
    sx_rows = sx_ptr + loc64 * stride_s
    sz_rows = sz_ptr + loc64 * stride_s
    wx_rows = wx_ptr + loc64 * stride_w
    wz_rows = wz_ptr + loc64 * stride_w
    lse_x = tl.load(lsex_ptr + loc, mask=rmask, other=0.0)[:, None]
    lse_z = tl.load(lsez_ptr + loc, mask=rmask, other=0.0)[:, None]
    if GRAD_X:
        gbar_x = tl.load(gbx_ptr + loc, mask=rmask, other=0.0)[:, None]
    if GRAD_Z:
        gbar_z = tl.load(gbz_ptr + loc, mask=rmask, other=0.0)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    c0 = pid_c * chunk
    c1 = tl.minimum(c0 + chunk, n)
    ks_x = tl.full([BLOCK_M], 0.0, dt)
    ks_z = tl.full([BLOCK_M], 0.0, dt)
    for start in range(c0, c1, BLOCK_N):
        offs = start + cols
        mask = rmask[:, None] & (offs < c1)
        sx = tl.load(sx_rows + offs, mask=mask, other=0.0)
        sz = tl.load(sz_rows + offs, mask=mask, other=0.0)
        p, q, val, qg, pg = level1_terms(sx - lse_x, sz - lse_z, eps, ln2, JS)
        if GRAD_Z:
            w = (qg - q * gbar_z) * w_scale
            if RBF_K:
                w = tl.where(mask, sz * w, 0.0)
                ks_z += row_sum(w)
            tl.store(wz_rows + offs, w.to(wz_ptr.dtype.element_ty), mask=mask)
        if GRAD_X:
            w = (pg - p * gbar_x) * w_scale
            if RBF_K:
                w = tl.where(mask, sx * w, 0.0)
                ks_x += row_sum(w)
            tl.store(wx_rows + offs, w.to(wx_ptr.dtype.element_ty), mask=mask)
    if RBF_K:
        poff = loc.to(tl.int64) * nchunks + pid_c
        if GRAD_Z:
            tl.store(ksz_ptr + poff, ks_z, mask=rmask)
        if GRAD_X:
            tl.store(ksx_ptr + poff, ks_x, mask=rmask)


# ---------------------------------------------------------------------------------------------------------------
# Kernel 4: gradient GEMM C += A·B (C in the compute dtype, beta = 1; the scale is applied once by the host)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _grad_gemm_kernel(
    a_ptr, stride_am, stride_ak,     # A (M × K): W_I (b × N) or W_Iᵀ (N × b, by strides), operand dtype
    b_ptr, stride_b,                 # B (K × D), row-major: Û or Û_I, input dtype
    c_ptr, stride_c,                 # C (M × D), compute dtype, accumulated in place
    m, k, d,
    DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Each program owns one C tile and runs the K loop in a fixed order: deterministic, no atomics.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    dt = c_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < m
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    kk = tl.arange(0, BLOCK_K)
    cmask = rmask[:, None] & dmask[None, :]
    c_tile = c_ptr + rows.to(tl.int64)[:, None] * stride_c + dcols[None, :]
    acc = tl.load(c_tile, mask=cmask, other=0.0)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + kk
        kmask = ks < k
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(b_ptr + ks.to(tl.int64)[:, None] * stride_b + dcols[None, :], mask=kmask[:, None] & dmask[None, :],
                     other=0.0)  # fmt: skip
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        a = dot_operand(a, ROUND_TF32)
        bt = dot_operand(bt, ROUND_TF32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION, out_dtype=dt)
    tl.store(c_tile, acc, mask=cmask)


# ---------------------------------------------------------------------------------------------------------------
# Kernel 5: divergence epilogue of one level > 1 (one program per BLOCK_M rows of the two powers)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _level_div_kernel(
    o_ptr, a_ptr, stride,            # O = Pˡ, A = Qˡ (N × N)
    par_ptr, n,
    loss_ptr,                        # Σ_j term per row (N)
    go_ptr, ga_ptr,                  # out: ∂D/∂O, ∂D/∂A (N × N, same strides), already / N
    JS: tl.constexpr, GRAD_O: tl.constexpr, GRAD_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # "structure": T = log1p((d/Õ)(d/Ã)/4), term = ¼(Õ + Ã)T, ∂term/∂A = ¼T − ¼Õ/Ã (+¼, dropped: a constant
    #   adjoint is annihilated by the power chain and the softmax Jacobian because every row sums to 1).
    # "js" on probabilities, clamped at the dtype's smallest normal number (as the C++ op and the reference):
    #   log(O/M) = log1p(r), log(A/M) = log1p(−r), r = (O − A)/(O + A) where |r| < ½ (no cancellation of two
    #   logs), log O − log M elsewhere; term = ½[O log(O/M) + A log(A/M)], ∂term/∂A = ½ log(A/M), zero where A
    #   was clamped.
    pid = tl.program_id(0)
    dt = a_ptr.dtype.element_ty
    eps = tl.load(par_ptr + 2)
    inv_n = tl.load(par_ptr + 3)
    tiny = tl.load(par_ptr + 5)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    base = rows.to(tl.int64)[:, None] * stride
    cols = tl.arange(0, BLOCK_N)[None, :]
    acc = tl.full([BLOCK_M], 0.0, dt)
    for start in range(0, n, BLOCK_N):
        offs = start + cols
        cmask = offs < n
        mask = rmask[:, None] & cmask
        o = tl.load(o_ptr + base + offs, mask=mask, other=1.0)
        a = tl.load(a_ptr + base + offs, mask=mask, other=1.0)
        if JS:
            oc = tl.maximum(o, tiny)
            ac = tl.maximum(a, tiny)
            # Near O ≈ A the two-log difference cancels: use log1p(±r) there; far apart r rounds to ±1 (log1p(−1)
            # = −inf for O ≪ A), so use the logs there.
            r = (oc - ac) / (oc + ac)
            lm = tl.log(0.5 * (oc + ac))
            near = tl.abs(r) < 0.5
            rn = tl.where(near, r, 0.0)  # both branches are evaluated: keep log1p away from −1
            lo = tl.where(near, log1p(rn), tl.log(oc) - lm)
            la = tl.where(near, log1p(-rn), tl.log(ac) - lm)
            val = 0.5 * (oc * lo + ac * la)
            ga = tl.where(a >= tiny, 0.5 * la, 0.0)
            go = tl.where(o >= tiny, 0.5 * lo, 0.0)
        else:
            ot = o + eps
            at = a + eps
            d = ot - at
            t = log1p((d / ot) * (d / at) * 0.25)
            val = 0.25 * (ot + at) * t
            ga = 0.25 * t - 0.25 * (ot / at)
            go = 0.25 * t - 0.25 * (at / ot)
        acc += row_sum(tl.where(mask, val, 0.0))
        if GRAD_A:
            tl.store(ga_ptr + base + offs, ga * inv_n, mask=mask)
        if GRAD_O:
            tl.store(go_ptr + base + offs, go * inv_n, mask=mask)
    tl.store(loss_ptr + rows, acc, mask=rmask)


# ---------------------------------------------------------------------------------------------------------------
# Kernel 6: softmax Jacobian of the multilevel backward (+ level-1 term, + rbf factor)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _softmax_bwd_kernel(
    p_ptr, adj_ptr, w_ptr, stride,   # P (softmax), adj(P), W_1 (N × N, global rows); the result overwrites W_1
    coef_ptr,                        # c_1 (device scalar: the level-1 gate·weight, no host sync)
    g_ptr, stride_g, sq_ptr,         # rbf: Gram panel rows (local) and ‖û_j‖² (N)
    par_ptr, row0, b, n,             # first global row, rows in this launch, N
    ks_ptr,                          # out (rbf): Σ_j K_ij per global row (N)
    RBF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dS_ij = P_ij (adj_ij − Σ_k P_ik adj_ik) + c_1 W_1,ij;   rbf: K_ij = S_ij dS_ij (2γ applied by the caller).
    pid = tl.program_id(0)
    dt = p_ptr.dtype.element_ty
    inv_tau = tl.load(par_ptr + 0)
    gamma = tl.load(par_ptr + 1)
    c1 = tl.load(coef_ptr)
    loc = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = loc < b
    gi = row0 + loc
    base = gi.to(tl.int64)[:, None] * stride
    g_rows = g_ptr + loc.to(tl.int64)[:, None] * stride_g
    if RBF:
        sq_i = tl.load(sq_ptr + gi, mask=rmask, other=0.0)[:, None]
    else:
        sq_i = inv_tau
    cols = tl.arange(0, BLOCK_N)[None, :]
    dot = tl.full([BLOCK_M], 0.0, dt)
    for start in range(0, n, BLOCK_N):
        offs = start + cols
        cmask = offs < n
        mask = rmask[:, None] & cmask
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
        adj = tl.load(adj_ptr + base + offs, mask=mask, other=0.0)
        dot += row_sum(p * adj)
    rdot = dot[:, None]
    ks = tl.full([BLOCK_M], 0.0, dt)
    for start in range(0, n, BLOCK_N):
        offs = start + cols
        cmask = offs < n
        mask = rmask[:, None] & cmask
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
        adj = tl.load(adj_ptr + base + offs, mask=mask, other=0.0)
        w1 = tl.load(w_ptr + base + offs, mask=mask, other=0.0)
        ds = p * (adj - rdot) + c1 * w1
        if RBF:
            s = _tile_logits(g_rows, sq_ptr, sq_i, offs, cmask, mask, inv_tau, gamma, RBF, gi)
            ds = tl.where(mask, s * ds, 0.0)
            ks += row_sum(ds)
        tl.store(w_ptr + base + offs, ds, mask=mask)
    if RBF:
        tl.store(ks_ptr + gi, ks, mask=rmask)

# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------
def choose_mode(n: int, dx: int, dz: int, dtype: torch.dtype) -> str:
    """Level-1 pass for mode="auto": "rows" (pass a) or "flash" (pass b).

    LEAD: fill from GPU measurements (benchmarks/bench_structure.py). Until then: always "rows". If this returns
    "flash" and structure_flash is missing or raises NotImplementedError for the options, "auto" runs "rows".
    """
    return "rows"


def _tiles(n: int, rows: int, esize: int, interpret: bool = INTERPRET) -> dict:
    """Launch meta-parameters of the row kernels: rows of length n, launches of up to ``rows`` rows.

    On a GPU one fixed tile per compute dtype: one row per program (memory-bound streaming) and a 1024-column (fp32)
    / 512-column (fp64, twice the registers) block, 4 warps: no spills on sm_90 (aot.py --no-spills), and the
    number of compiled variants stays small (a small N only masks lanes); a panel with fewer rows than SMs splits
    its columns over a 2-D grid (``row_grid``). Under the interpreter a whole panel in one program is fastest (its
    cost is per program and per op); tests lower MAX_BLOCK_M/N to run the column loop and ragged row blocks.
    """
    if not interpret:
        return dict(BLOCK_M=1, BLOCK_N=512 if esize == 8 else 1024, num_warps=4)
    cap = max(16, _TILE_BYTES // esize // (2 if esize == 8 else 1))  # fp64 math needs twice the registers
    block_n = min(next_pow2(n), next_pow2(MAX_BLOCK_N), cap)
    block_m = max(1, min(next_pow2(rows), next_pow2(MAX_BLOCK_M), cap // block_n))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


def row_grid(b: int, n: int, block_m: int, block_n: int, sms: int) -> tuple[tuple[int, int], int]:
    """(grid, chunk) of the row kernels for a panel of ``b`` rows: ⌈b/BLOCK_M⌉ row blocks × column chunks of
    ``chunk`` columns (a multiple of BLOCK_N). One chunk (a 1-D grid) when the row blocks alone fill ``sms`` SMs;
    otherwise the columns are split so that about 2·sms programs run. Each program writes its own partial sums
    (per row and chunk) and the host adds them in a fixed order: deterministic for a given device."""
    rb = triton.cdiv(b, block_m)
    nblk = triton.cdiv(n, block_n)
    splits = 1 if rb >= sms else max(1, min(nblk, triton.cdiv(2 * sms, rb)))
    chunk = triton.cdiv(nblk, splits) * block_n
    return (rb, triton.cdiv(n, chunk)), chunk


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRET_SMS


def _clamp_pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(next_pow2(x), next_pow2(hi)))


def _dot_flags(dtype: torch.dtype, precision: str | None, interpret: bool) -> dict:
    half = dtype in (torch.bfloat16, torch.float16)
    return dict(DOT_PRECISION=dot_precision(dtype, precision), ROUND_TF32=round_tf32(dtype, precision),
                UPCAST=bool(interpret and half))  # fmt: skip


def gram_config(n: int, rows: int, d: int, dtype: torch.dtype, *, rbf: bool, precision: str | None = None,
                interpret: bool = INTERPRET) -> dict:  # fmt: skip
    """Constexprs and options of ``_gram_kernel`` for inputs of ``dtype`` (the operand dtype of the GEMM).

    GPU tiles (sm_90, ptxas: no spills, ≤ 255 registers with the rbf epilogue): 128 × 128 × 32 for bf16/fp16 and
    TF32 (tensor cores), 64 × 128 × 32 for IEEE fp32 (FMA: 128 × 128 spilled 216 B), 8 warps, 3 stages; fp64
    64 × 64 × 16, 4 warps. N, d and the panel height only mask lanes on a GPU."""
    if interpret:
        bm, bn, bk = _clamp_pow2(rows, 16, 64), _clamp_pow2(n, 16, MAX_BLOCK_N), _clamp_pow2(d, 16, 64)
        opts = {"num_warps": 4}
    elif dtype == torch.float64:
        bm, bn, bk = 64, 64, 16
        opts = {"num_warps": 4, "num_stages": 2}
    else:
        bm, bn, bk = 64 if dot_precision(dtype, precision) == "ieee" and dtype == torch.float32 else 128, 128, 32
        opts = {"num_warps": 8, "num_stages": 3}
    cst = dict(RBF=bool(rbf), **_dot_flags(dtype, precision, interpret), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return {"constexprs": cst, "options": opts}


def grad_gemm_config(m: int, k: int, d: int, dtype: torch.dtype, *, precision: str | None = None,
                     interpret: bool = INTERPRET) -> dict:  # fmt: skip
    """Constexprs and options of ``_grad_gemm_kernel`` (C[m × d] += A[m × k]·B[k × d], operands of ``dtype``).

    GPU tiles (sm_90, ptxas: no spills; 128 × 128 spilled 32–560 B): 64 × 128 × 32 (bf16/fp16 with d > 64, fp32
    IEEE or TF32), 128 × 64 × 32 for half with d ≤ 64, 8 warps, 3 stages; fp64 64 × 64 × 16, 4 warps."""
    if interpret:
        bm, bd, bk = _clamp_pow2(m, 16, 64), _clamp_pow2(d, 16, 64), _clamp_pow2(k, 16, MAX_BLOCK_N)
        opts = {"num_warps": 4}
    elif dtype == torch.float64:
        bm, bd, bk = 64, 64, 16
        opts = {"num_warps": 4, "num_stages": 2}
    else:
        half_narrow = dtype in (torch.bfloat16, torch.float16) and d <= 64
        bm, bd, bk = (128, 64, 32) if half_narrow else (64, 128, 32)
        opts = {"num_warps": 8, "num_stages": 3}
    cst = dict(**_dot_flags(dtype, precision, interpret), BLOCK_M=bm, BLOCK_D=bd, BLOCK_K=bk)
    return {"constexprs": cst, "options": opts}


def rows_config(n: int, rows: int, esize: int, *, rbf: bool, js: bool, grad_x: bool, grad_z: bool, multilevel: bool,
                interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of the row kernels as the host launches them: {"loss": ``_rows_loss_kernel``, "grad":
    ``_rows_grad_kernel`` (only with a gradient)}, for the row-panel pass (RBF_K for rbf) or the first step of
    levels > 1 (WRITE_PQ). ``esize``: the compute dtype's element size. aot.py compiles exactly these."""
    t = _tiles(n, rows, esize, interpret)
    blocks = dict(BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"])
    opts = {"num_warps": t["num_warps"]}
    out = {"loss": {"constexprs": dict(JS=bool(js), GRAD_X=bool(grad_x), GRAD_Z=bool(grad_z),
                                       WRITE_PQ=bool(multilevel), **blocks), "options": dict(opts)}}  # fmt: skip
    if grad_x or grad_z:
        out["grad"] = {"constexprs": dict(JS=bool(js), GRAD_X=bool(grad_x), GRAD_Z=bool(grad_z),
                                          RBF_K=bool(rbf) and not multilevel, **blocks), "options": dict(opts)}  # fmt: skip
    return out


def level_div_config(n: int, esize: int, *, js: bool, grad_o: bool, grad_a: bool, interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_level_div_kernel`` (the divergence epilogue of a level > 1)."""
    t = _tiles(n, n, esize, interpret)
    cst = dict(JS=bool(js), GRAD_O=bool(grad_o), GRAD_A=bool(grad_a), BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"])
    return {"constexprs": cst, "options": {"num_warps": t["num_warps"]}}


def softmax_bwd_config(n: int, rows: int, esize: int, *, rbf: bool, interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_softmax_bwd_kernel`` (the softmax Jacobian of the levels > 1 backward)."""
    t = _tiles(n, rows, esize, interpret)
    return {"constexprs": dict(RBF=bool(rbf), BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"]),
            "options": {"num_warps": t["num_warps"]}}  # fmt: skip


_FP16_MAX = 65504.0


def fp16_w_exp(n: int, js: bool, eps: float) -> int:
    """k of the power of two 2^k by which the row kernel scales W = Q∘(g − ḡ) before its fp16 cast (the gradient
    GEMM's operand; 2^-k is applied once to the accumulated gradient). Entries are ~1/N, below fp16's normal range
    (6.1e-5) from N ≈ 16 k on; k = ⌊log₂ N⌋ brings them to O(1), capped so that the largest possible entry keeps a
    bit of headroom below 65504: |W| ≤ |Q∘g| + |ḡ| ≤ ½T_max + ½ + ¼Nε for "structure" (T_max = log1p((1 + ε)/(4ε)),
    |Q∘g| ≤ ¼T_max + ¼P̃), ≤ ln 2 for "js"; rbf's S ≤ 1 only shrinks W. bf16 and fp32 have fp32's range: k = 0."""
    if js:
        bound = 1.0
    else:
        bound = 0.5 * math.log1p((1.0 + eps) / (4.0 * eps)) + 0.5 + 0.25 * n * eps
    k_max = math.floor(math.log2(_FP16_MAX / 2.0 / bound))
    return max(0, min(k_max, int(math.floor(math.log2(max(n, 1))))))


def _params(cdt: torch.dtype, device, n: int, temperature: float, gamma: float, eps: float,
            w_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    # Built by fill_ (a kernel launch), not torch.tensor(list) (an H2D copy): safe under CUDA-graph capture.
    par = torch.empty(7, dtype=cdt, device=device)
    vals = (1.0 / temperature if temperature > 0 else 0.0, gamma, eps, 1.0 / n, math.log(2.0), torch.finfo(cdt).tiny,
            w_scale)  # fmt: skip
    for i, v in enumerate(vals):
        par[i].fill_(v)
    return par


def _unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"structure_fwd (triton) needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import), "
            f"got {device}")


def _check_inputs(xh, zh, levels, temperature, weighting, similarity, divergence, eps, mode) -> None:
    # The checks of the C++ op (csrc/common/checks.h and structure_fwd_cpu), RuntimeError as TORCH_CHECK raises.
    for name, t in (("x", xh), ("z", zh)):
        if t.dim() != 2:
            raise RuntimeError(f"{name} must be a 2-D (N, d) tensor, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[0] < 2:
            raise RuntimeError(f"{name} needs at least N = 2 rows, got shape {tuple(t.shape)}")
        if t.shape[1] < 1:
            raise RuntimeError(f"{name} needs at least one feature column, got shape {tuple(t.shape)}")
    if xh.shape[0] != zh.shape[0]:
        raise RuntimeError(f"x and z must have the same number of rows N, got {tuple(xh.shape)} and {tuple(zh.shape)}")
    if xh.dtype != zh.dtype:
        raise RuntimeError(f"x and z must have the same dtype, got {xh.dtype} and {zh.dtype}")
    if xh.device != zh.device:
        raise RuntimeError(f"x and z must be on the same device, got {xh.device} and {zh.device}")
    if xh.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise RuntimeError(f"structure_fwd (triton) supports float16, bfloat16, float32 and float64, got {xh.dtype}")
    if levels < 1:
        raise RuntimeError(f"levels must be >= 1, got {levels}")
    if similarity not in (_COSINE, _RBF):
        raise RuntimeError(f"unknown similarity code {similarity}")
    if divergence not in (_STRUCTURE, _JS):
        raise RuntimeError(f"unknown divergence code {divergence}")
    if weighting not in (_NONE, _INVERSE):
        raise RuntimeError(f"unknown weighting code {weighting}")
    if similarity != _RBF and not temperature > 0:
        raise RuntimeError(f"temperature must be > 0, got {temperature}")
    if divergence != _JS and not eps > 0:
        raise RuntimeError(f"eps must be > 0 for divergence='structure', got {eps}")
    if mode not in MODES:
        raise RuntimeError(f"mode must be one of {list(MODES)}, got {mode!r}")
    reason = _unavailable_reason(xh.device)
    if reason:
        raise RuntimeError(reason)


def _gate(d: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(d − margin) with torch.relu's semantics, as the C++ op: (value, gate); NaN propagates with an open gate.
    Device tensors only: no host sync."""
    shifted = d - margin
    gate = (shifted > 0) | torch.isnan(shifted)
    return torch.where(gate, shifted, torch.zeros_like(shifted)), gate


# ---------------------------------------------------------------------------------------------------------------
# Level 1, pass (a): row panels
# ---------------------------------------------------------------------------------------------------------------
def _sq_norms(u: torch.Tensor) -> torch.Tensor:
    return (u * u).sum(dim=1)


def _panel_bytes_per_row(n: int, ec: int, ew: int, sides: int) -> int:
    # Two logits rows (compute dtype), a W row per gradient side, and the (max, Σexp) / partial-sum rows (≤ N/16).
    return n * (2 * ec + sides * ew) + 8 * ec * triton.cdiv(n, 16)


def _gram_panel(u, r0, b, s, pm, pl, sq, par, cfg):
    """S_I = logits of rows r0..r0+b (into ``s``) and lse of those rows: the GEMM epilogue's (max, Σexp) per column
    block merged in a fixed order (deterministic)."""
    n, d = u.shape
    cst = cfg["constexprs"]
    grid = (triton.cdiv(b, cst["BLOCK_M"]), triton.cdiv(n, cst["BLOCK_N"]))
    pm, pl = pm[:b, : grid[1]], pl[:b, : grid[1]]
    _gram_kernel[grid](u, u.stride(0), s, s.stride(0), pm, pl, pm.stride(0), sq, par, r0, b, n, d,
                       **cst, **cfg["options"])  # fmt: skip
    m = pm.amax(dim=1)
    return m + torch.log((pl * torch.exp(pm - m[:, None])).sum(dim=1))


def _grad_gemm(a, b_op, c, cfg):
    """c += a @ b_op on the Triton GEMM (a may be a transposed view: any strides; b_op row-major)."""
    m, k = a.shape
    d = b_op.shape[1]
    cst = cfg["constexprs"]
    grid = (triton.cdiv(m, cst["BLOCK_M"]), triton.cdiv(d, cst["BLOCK_D"]))
    _grad_gemm_kernel[grid](a, a.stride(0), a.stride(1), b_op, b_op.stride(0), c, c.stride(0), m, k, d,
                            **cst, **cfg["options"])  # fmt: skip


def _level1_rows(x, z, par, temperature, gamma, rbf, js, grad_x, grad_z, w_exp=0, precision=None):
    """D_1 (0-dim fp64 tensor) and ∂D_1/∂X̂, ∂D_1/∂Ẑ (compute dtype, or None) by row panels.

    x, z in the input dtype (bf16/fp16 stay half: tensor-core GEMMs with fp32 accumulation; W is cast to the half
    dtype, ×2^w_exp for fp16, as the gradient GEMMs' operand). Per panel: 2 Gram launches (logits + lse partials),
    the loss row kernel (ℓ_i, ḡ partials), the gradient row kernel (W) and 2 GEMM launches per side accumulating
    the unscaled gradient in place; α/(N·2^w_exp) is applied once at the end."""
    n = x.shape[0]
    dev, dtype = x.device, x.dtype
    cdt = compute_dtype(dtype)
    half = dtype in (torch.bfloat16, torch.float16)
    wdt = dtype if half else cdt
    ec = torch.finfo(cdt).bits // 8
    ew = torch.finfo(wdt).bits // 8
    sides = int(grad_x) + int(grad_z)
    rows = panel_rows(n, _panel_bytes_per_row(n, ec, ew, sides), device=dev)
    f = dict(dtype=cdt, device=dev)
    gcfg = {u: gram_config(n, rows, t.shape[1], dtype, rbf=rbf, precision=precision) for u, t in (("x", x), ("z", z))}
    nb = max(triton.cdiv(n, c["constexprs"]["BLOCK_N"]) for c in gcfg.values())
    sx, sz = torch.empty(rows, n, **f), torch.empty(rows, n, **f)
    pm, pl = torch.empty(rows, nb, **f), torch.empty(rows, nb, **f)
    wx = torch.empty(rows, n, dtype=wdt, device=dev) if grad_x else par
    wz = torch.empty(rows, n, dtype=wdt, device=dev) if grad_z else par
    sqx = _sq_norms(x.to(cdt)) if rbf else par
    sqz = _sq_norms(z.to(cdt)) if rbf else par
    ksx = torch.empty(n, **f) if rbf and grad_x else None
    ksz = torch.empty(n, **f) if rbf and grad_z else None
    colx = torch.zeros(n, **f) if rbf and grad_x else None
    colz = torch.zeros(n, **f) if rbf and grad_z else None
    gx = torch.zeros(x.shape, **f) if grad_x else None
    gz = torch.zeros(z.shape, **f) if grad_z else None
    row_loss = torch.empty(n, **f)
    cfg = rows_config(n, rows, ec, rbf=rbf, js=js, grad_x=grad_x, grad_z=grad_z, multilevel=False)
    bm, bn = cfg["loss"]["constexprs"]["BLOCK_M"], cfg["loss"]["constexprs"]["BLOCK_N"]
    sms = _sm_count(dev)
    for r0 in range(0, n, rows):
        b = min(rows, n - r0)
        lse_x = _gram_panel(x, r0, b, sx, pm, pl, sqx, par, gcfg["x"])
        lse_z = _gram_panel(z, r0, b, sz, pm, pl, sqz, par, gcfg["z"])
        grid, chunk = row_grid(b, n, bm, bn, sms)
        parts = torch.empty(3, b, grid[1], **f)
        _rows_loss_kernel[grid](
            sx, sz, n, lse_x, lse_z, par, r0, b, n, chunk, parts[0], parts[1], parts[2], par, par, 0,
            **cfg["loss"]["constexprs"], **cfg["loss"]["options"],
        )  # fmt: skip
        sums = parts.sum(dim=2)  # fixed order over the chunks: deterministic
        row_loss[r0 : r0 + b] = sums[0]
        if not sides:
            continue
        ks = torch.empty(2, b, grid[1], **f) if rbf else par
        _rows_grad_kernel[grid](
            sx, sz, n, lse_x, lse_z, sums[1], sums[2], par, b, n, chunk, wx, wz, n,
            ks[0] if rbf else par, ks[1] if rbf else par, **cfg["grad"]["constexprs"], **cfg["grad"]["options"],
        )  # fmt: skip
        for want, w, u, g, col, kk, i in ((grad_z, wz, z, gz, colz, ksz, 1), (grad_x, wx, x, gx, colx, ksx, 0)):
            if not want:
                continue
            wb = w[:b]
            _grad_gemm(wb, u, g[r0 : r0 + b], grad_gemm_config(b, n, u.shape[1], dtype, precision=precision))
            _grad_gemm(wb.T, u[r0 : r0 + b], g, grad_gemm_config(n, b, u.shape[1], dtype, precision=precision))
            if rbf:
                col += wb.sum(dim=0, dtype=cdt)
                kk[r0 : r0 + b] = ks[i].sum(dim=1)
    # cosine: dÛ = (W + Wᵀ) Û / τ;  rbf: the kernel emits K' = S∘W, dÛ = 2γ[(K' + K'ᵀ) Û − (K'1 + K'ᵀ1)∘Û]; W was
    # accumulated without 1/N and with the fp16 scale 2^w_exp: one scale for everything, applied once.
    scale = (2.0 * gamma if rbf else 1.0 / temperature) / (n * math.ldexp(1.0, w_exp))
    for g, u, kk, col in ((gx, x, ksx, colx), (gz, z, ksz, colz)):
        if g is None:
            continue
        if rbf:
            g.sub_((kk + col)[:, None] * u.to(cdt))
        g.mul_(scale)
    d = row_loss.sum(dtype=torch.float64) / n  # fixed reduction order: deterministic
    return d, gx, gz


def _flash(xh, zh, temperature, similarity, gamma, divergence, eps, grad_x, grad_z):
    from .structure_flash import structure_level1_flash  # lazy: the module is optional

    return structure_level1_flash(xh, zh, temperature, similarity, gamma, divergence, eps, grad_x, grad_z)


# ---------------------------------------------------------------------------------------------------------------
# Levels > 1: materialized powers
# ---------------------------------------------------------------------------------------------------------------
def multilevel_memory_estimate(n: int, levels: int, element_size: int, grad_x: bool, grad_z: bool) -> int:
    """Bytes of N × N buffers held at the peak of the levels > 1 path.

    P and Q; per side with a gradient: the powers 2..L, G_2..G_L, W_1 and adj(P) (2L); per side without one: the
    current and the next power (2); plus one transient product.
    """
    per_side = [2 * levels if g else 2 for g in (grad_x, grad_z)]
    return (2 + sum(per_side) + 1) * n * n * element_size


def _available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes usable for new N × N buffers, description) — monkeypatched by the tests."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + cached)), f"90% of the {(free + cached) / 2**30:.2f} GiB free on {device}"
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62, "unknown RAM"
    return int(0.8 * phys), f"80% of this machine's {phys / 2**30:.2f} GiB of RAM"


def _check_multilevel_memory(n, levels, esize, grad_x, grad_z, device) -> None:
    est = multilevel_memory_estimate(n, levels, esize, grad_x, grad_z)
    avail, what = _available_memory(device)
    if est > avail:
        raise RuntimeError(
            f"structure_loss (triton) with levels={levels} materializes about {est / 2**30:.2f} GiB of N x N matrices "
            f"at N={n}, more than {what}; use levels=1 (row panels, bounded memory) or a smaller batch"
        )


def _multilevel(x, z, par, levels, temperature, weighting, margin, gamma, rbf, js, grad_x, grad_z):
    n = x.shape[0]
    dev, cdt = x.device, x.dtype
    esize = x.element_size()
    _check_multilevel_memory(n, levels, esize, grad_x, grad_z, dev)
    nn = dict(dtype=cdt, device=dev)
    p, q = torch.empty(n, n, **nn), torch.empty(n, n, **nn)
    w1x = torch.empty(n, n, **nn) if grad_x else par
    w1z = torch.empty(n, n, **nn) if grad_z else par
    row_loss = torch.empty(levels, n, **nn)
    sqx = _sq_norms(x) if rbf else par
    sqz = _sq_norms(z) if rbf else par

    # Level 1: logits panels (Gram GEMM + lse epilogue) → the loss row kernel writes P, Q and ℓ_i, the gradient row
    # kernel W_1 (= ∂D_1/∂S: par[6] = 1/N). fp32 operands here (half inputs were upcast: the N × N powers are fp32).
    rows = panel_rows(n, _panel_bytes_per_row(n, esize, esize, 0), device=dev)
    gcfg = {u: gram_config(n, rows, t.shape[1], cdt, rbf=rbf) for u, t in (("x", x), ("z", z))}
    nb = max(triton.cdiv(n, c["constexprs"]["BLOCK_N"]) for c in gcfg.values())
    sx, sz = torch.empty(rows, n, **nn), torch.empty(rows, n, **nn)
    pm, pl = torch.empty(rows, nb, **nn), torch.empty(rows, nb, **nn)
    cfg = rows_config(n, rows, esize, rbf=rbf, js=js, grad_x=grad_x, grad_z=grad_z, multilevel=True)
    bm, bn = cfg["loss"]["constexprs"]["BLOCK_M"], cfg["loss"]["constexprs"]["BLOCK_N"]
    sms = _sm_count(dev)
    for r0 in range(0, n, rows):
        b = min(rows, n - r0)
        lse_x = _gram_panel(x, r0, b, sx, pm, pl, sqx, par, gcfg["x"])
        lse_z = _gram_panel(z, r0, b, sz, pm, pl, sqz, par, gcfg["z"])
        grid, chunk = row_grid(b, n, bm, bn, sms)
        parts = torch.empty(3, b, grid[1], **nn)
        _rows_loss_kernel[grid](
            sx, sz, n, lse_x, lse_z, par, r0, b, n, chunk, parts[0], parts[1], parts[2], p, q, n,
            **cfg["loss"]["constexprs"], **cfg["loss"]["options"],
        )  # fmt: skip
        sums = parts.sum(dim=2)
        row_loss[0, r0 : r0 + b] = sums[0]
        if "grad" in cfg:
            wx = w1x[r0 : r0 + b] if grad_x else par
            wz = w1z[r0 : r0 + b] if grad_z else par
            _rows_grad_kernel[grid](
                sx, sz, n, lse_x, lse_z, sums[1], sums[2], par, b, n, chunk, wx, wz, n, par, par,
                **cfg["grad"]["constexprs"], **cfg["grad"]["options"],
            )  # fmt: skip
    del sx, sz, pm, pl

    # Levels 2..L: one product per side and level, then the fused divergence epilogue.
    cfg = level_div_config(n, esize, js=js, grad_o=grad_x, grad_a=grad_z)
    powers_x, powers_z = [p], [q]
    gs_x, gs_z = [None], [None]
    for level in range(2, levels + 1):
        nx = torch.mm(powers_x[-1], p)
        nz = torch.mm(powers_z[-1], q)
        go = torch.empty(n, n, **nn) if grad_x else par
        ga = torch.empty(n, n, **nn) if grad_z else par
        _level_div_kernel[(triton.cdiv(n, cfg["constexprs"]["BLOCK_M"]),)](
            nx, nz, n, par, n, row_loss[level - 1], go, ga, **cfg["constexprs"], **cfg["options"]
        )
        # Keep every power (and G_l) of a side that needs a gradient; otherwise only P and the current power.
        powers_x = powers_x + [nx] if grad_x else [p, nx]
        powers_z = powers_z + [nz] if grad_z else [q, nz]
        if grad_x:
            gs_x.append(go)
        if grad_z:
            gs_z.append(ga)

    # Margin gate and weights per level, on the device (no host sync).
    d = row_loss.sum(dim=1, dtype=torch.float64) / n
    lv = torch.arange(1, levels + 1, dtype=torch.float64, device=dev)
    w = 1.0 / lv if weighting == _INVERSE else torch.ones_like(lv)
    value, gate = _gate(d, margin)
    loss = (w * value).sum() / levels
    coef = torch.where(gate, w / levels, torch.zeros_like(w)).to(cdt)

    grads = []
    for want, powers, gs, w1, u, sq in ((grad_x, powers_x, gs_x, w1x, x, sqx), (grad_z, powers_z, gs_z, w1z, z, sqz)):
        if not want:
            grads.append(None)
            continue
        grads.append(_side_backward(powers, gs, coef, w1, u, sq, par, temperature, gamma, rbf))
        powers.clear()
        gs.clear()
    return loss, grads[0], grads[1]


def _side_backward(powers, gs, coef, w1, u, sq, par, temperature, gamma, rbf):
    """Adjoint of the power chain of one side, the softmax Jacobian (+ c_1 W_1) and the chain to Û."""
    levels = len(powers)
    p = powers[0]
    n = p.shape[0]
    adj = gs[levels - 1].mul_(coef[levels - 1])  # adj(R_L) = c_L G_L
    gs[levels - 1] = None
    adj_p = torch.zeros_like(p)
    for level in range(levels, 1, -1):
        adj_p.addmm_(powers[level - 2].T, adj)  # adj(P) += R_{l−1}ᵀ adj(R_l)
        if level - 1 >= 2:
            prev = gs[level - 2].mul_(coef[level - 2])  # adj(R_{l−1}) = c_{l−1} G_{l−1} + adj(R_l) Pᵀ
            gs[level - 2] = None
            prev.addmm_(adj, p.T)
            adj = prev
        else:
            adj_p.addmm_(adj, p.T)  # R_1 = P: its adjoint joins adj(P) directly (level 1 itself is c_1 W_1)
        powers[level - 1] = None
    del adj
    # dS = P∘(adj(P) − rowsum(P∘adj(P))) + c_1 W_1, written over W_1 (rbf: times S, per Gram panel).
    ks = torch.empty(n, dtype=p.dtype, device=p.device) if rbf else par
    if rbf:
        rows = panel_rows(n, n * p.element_size())
        gram = torch.empty(rows, n, dtype=p.dtype, device=p.device)
        cfg = softmax_bwd_config(n, rows, p.element_size(), rbf=True)
        for r0 in range(0, n, rows):
            b = min(rows, n - r0)
            g = gram[:b]
            torch.mm(u[r0 : r0 + b], u.T, out=g)
            _softmax_bwd_kernel[(triton.cdiv(b, cfg["constexprs"]["BLOCK_M"]),)](
                p, adj_p, w1, n, coef, g, n, sq, par, r0, b, n, ks, **cfg["constexprs"], **cfg["options"]
            )
        del gram
    else:
        cfg = softmax_bwd_config(n, n, p.element_size(), rbf=False)
        _softmax_bwd_kernel[(triton.cdiv(n, cfg["constexprs"]["BLOCK_M"]),)](
            p, adj_p, w1, n, coef, par, 0, par, par, 0, n, n, par, **cfg["constexprs"], **cfg["options"]
        )
    del adj_p
    alpha = 2.0 * gamma if rbf else 1.0 / temperature
    grad = torch.mm(w1, u).mul_(alpha)
    grad.addmm_(w1.T, u, alpha=alpha)
    if rbf:
        grad.sub_((ks + w1.sum(dim=0))[:, None] * u, alpha=alpha)
    return grad


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def structure_fwd(
    xh: torch.Tensor,
    zh: torch.Tensor,
    levels: int,
    temperature: float,
    weighting: int,
    margin: float,
    similarity: int,
    gamma: float,
    divergence: int,
    eps: float,
    grad_x: bool,
    grad_z: bool,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""R_S on normalized-and-centered inputs and, when asked, ∂R_S/∂X̂, ∂R_S/∂Ẑ: torch.ops.structure_ops.structure_fwd's
    contract, on the Triton kernels.

    Args:
        xh: X̂, (N, d_x). zh: Ẑ, (N, d_z); same N, dtype and device (CUDA, or CPU under TRITON_INTERPRET=1).
        levels: L ≥ 1. temperature: τ > 0 (cosine). weighting: 0 "none", 1 "inverse". margin: per-level hinge.
        similarity: 0 "cosine", 1 "rbf". gamma: γ of rbf. divergence: 0 "structure", 1 "js". eps: ε > 0 of
        "structure". grad_x, grad_z: compute the gradient w.r.t. X̂ / Ẑ in the same call.
        mode: level-1 pass: "rows" (row panels), "flash" (structure_flash, O(N) memory) or "auto"
        (:func:`choose_mode`; "rows" when flash is unavailable for the inputs). Levels > 1 always materialize P, Q.
    Returns:
        (loss, gx, gz): loss a 0-dim tensor in the input dtype; gx (N, d_x), gz (N, d_z) contiguous in the input
        dtype, or empty (0,) tensors when not requested.
    Shape:
        xh (N, d_x), zh (N, d_z) with N ≥ 2.
    Supported: float32, bfloat16, float16 (fp32 math) and float64 (fp64 math; mode "flash" has no fp64).

    Equivalent to ``structure_ops.reference.structure_core`` (value) and its autograd gradients.
    """
    _check_inputs(xh, zh, levels, temperature, weighting, similarity, divergence, eps, mode)
    in_dtype, dev = xh.dtype, xh.device
    cdt = compute_dtype(in_dtype)
    n = xh.shape[0]
    rbf, js = similarity == _RBF, divergence == _JS
    # Triton launches on the current CUDA device: every launch below runs under the inputs' device.
    with torch.no_grad(), device_guard(dev):
        gx = gz = None
        if levels == 1:
            use = mode
            if mode == "auto":
                use = choose_mode(n, xh.shape[1], zh.shape[1], in_dtype)
            result = None
            if use == "flash":
                try:
                    result = _flash(xh, zh, temperature, similarity, gamma, divergence, eps, grad_x, grad_z)
                except (ImportError, NotImplementedError) as exc:
                    if mode == "flash":
                        raise RuntimeError(
                            f"structure_fwd (triton): mode='flash' is unavailable for {tuple(xh.shape)} "
                            f"{in_dtype} on {dev}: {type(exc).__name__}: {exc}; use mode='rows' or 'auto'"
                        ) from exc
                    log.debug("structure_fwd (triton): flash unavailable (%s), using rows", exc)
            if result is not None:
                d, gx, gz = result
                d = d.to(torch.float64)
                gx = gx if grad_x else None
                gz = gz if grad_z else None
            else:
                # Inputs stay in their dtype: half operands go to the tensor cores (fp32 accumulation).
                x, z = xh.contiguous(), zh.contiguous()
                w_exp = fp16_w_exp(n, js, eps) if in_dtype == torch.float16 else 0
                par = _params(cdt, dev, n, temperature, gamma, eps, math.ldexp(1.0, w_exp))
                d, gx, gz = _level1_rows(x, z, par, temperature, gamma, rbf, js, grad_x, grad_z, w_exp,
                                         torch.get_float32_matmul_precision())  # fmt: skip
            loss, gate = _gate(d, margin)
            # A closed gate zeroes the gradient (torch.relu's backward); where, not a product, so NaN·0 stays 0.
            gx = None if gx is None else torch.where(gate, gx, torch.zeros((), dtype=gx.dtype, device=dev))
            gz = None if gz is None else torch.where(gate, gz, torch.zeros((), dtype=gz.dtype, device=dev))
        else:
            x = xh.to(cdt).contiguous()
            z = zh.to(cdt).contiguous()
            par = _params(cdt, dev, n, temperature, gamma, eps, 1.0 / n)
            loss, gx, gz = _multilevel(x, z, par, levels, temperature, weighting, margin, gamma, rbf, js, grad_x, grad_z)
        out = loss.to(in_dtype)
        gx = gx.to(in_dtype).contiguous() if grad_x else xh.new_empty((0,))
        gz = gz.to(in_dtype).contiguous() if grad_z else zh.new_empty((0,))
    return out, gx, gz


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation entries (structure_ops/_triton/aot.py compiles them for sm_80 and sm_90)
# ---------------------------------------------------------------------------------------------------------------
_AOT_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
# Pointer arguments in the input (operand) dtype and in the W dtype; every other pointer is in the compute dtype.
_INPUT_PTRS = {"u_ptr", "b_ptr"}
_W_PTRS = {"wx_ptr", "wz_ptr", "a_ptr"}


def _signature(kernel, constexprs: dict, cdt: torch.dtype, in_dtype: torch.dtype | None = None,
               w_dtype: torch.dtype | None = None) -> dict[str, str]:  # fmt: skip
    def ptr(name):
        if name in _INPUT_PTRS and in_dtype is not None:
            return _AOT_PTR[in_dtype]
        if name in _W_PTRS and w_dtype is not None:
            return _AOT_PTR[w_dtype]
        return _AOT_PTR[cdt]

    return {name: ("constexpr" if name in constexprs else ptr(name) if name.endswith("_ptr") else "i32")
            for name in kernel.arg_names}  # fmt: skip


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options) of every launch the host can make on a GPU, deduplicated:
    gram_config and grad_gemm_config over every input dtype (fp16, bf16, fp32 at each float32 matmul precision,
    fp64) and both similarities / GEMM widths; rows_config, level_div_config and softmax_bwd_config over both
    compute dtypes, both similarities and divergences, every gradient flag, the row-panel pass and levels > 1
    (whose Gram GEMMs run on fp32 operands, or fp64). N and the panel height do not change the GPU tiles."""
    seen, entries = set(), []
    n = 4096

    def add(kernel, cfg, cdt, in_dtype=None, w_dtype=None):
        cst = cfg["constexprs"]
        sig = _signature(kernel, cst, cdt, in_dtype, w_dtype)
        key = (id(kernel), tuple(sig.items()), tuple(cst.items()), tuple(cfg["options"].items()))
        if key not in seen:
            seen.add(key)
            entries.append((kernel, sig, dict(cst), dict(cfg["options"])))

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        cdt = compute_dtype(dtype)
        wdt = dtype if dtype in (torch.float16, torch.bfloat16) else cdt
        for precision in PRECISIONS:
            for d in (64, 512):
                for rbf in (False, True):
                    add(_gram_kernel, gram_config(n, n, d, dtype, rbf=rbf, precision=precision, interpret=False),
                        cdt, dtype)  # fmt: skip
                for m, k in ((n, 256), (256, n)):
                    cfg = grad_gemm_config(m, k, d, dtype, precision=precision, interpret=False)
                    add(_grad_gemm_kernel, cfg, cdt, dtype, wdt)
                    # as launched: Triton specializes an int argument equal to 1, i.e. the unit stride of W_I (A's
                    # columns) or of W_Iᵀ (A's rows): each access pattern compiles (and is checked) on its own
                    for unit in ("stride_ak", "stride_am"):
                        add(_grad_gemm_kernel, {"constexprs": {**cfg["constexprs"], unit: 1}, "options": cfg["options"]},
                            cdt, dtype, wdt)  # fmt: skip
        esize = torch.finfo(cdt).bits // 8
        for rbf in (False, True):
            for js in (False, True):
                for gx, gz in ((False, False), (False, True), (True, False), (True, True)):
                    for multilevel in (False, True):
                        cfgs = rows_config(n, n, esize, rbf=rbf, js=js, grad_x=gx, grad_z=gz, multilevel=multilevel,
                                           interpret=False)  # fmt: skip
                        add(_rows_loss_kernel, cfgs["loss"], cdt)
                        if "grad" in cfgs:
                            add(_rows_grad_kernel, cfgs["grad"], cdt, None, cdt if multilevel else wdt)
                    add(_level_div_kernel, level_div_config(n, esize, js=js, grad_o=gx, grad_a=gz, interpret=False),
                        cdt)  # fmt: skip
            add(_softmax_bwd_kernel, softmax_bwd_config(n, n, esize, rbf=rbf, interpret=False), cdt)
    return entries


AOT_KERNELS = aot_configs()
