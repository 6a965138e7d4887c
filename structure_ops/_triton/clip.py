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

Pass structure (GEMM FLOPs):

  forward   _clip_fwd_kernel, grid (RG, CP) = (row groups, column panels): program (g, q) owns the row
            blocks I ≡ g (mod RG) and the column blocks J ≡ q (mod CP). For each of its row blocks it
            loads A_I once (on chip when BLOCK_D ≥ d) and loops over its column blocks: the tile
            L_IJ = s·A_I B_Jᵀ (tl.dot) feeds the online row log-sum-exp of I over the panel (registers,
            written once per (q, I)) and the running column statistics of J over the group (a (max, Σexp)
            pair per (g, j) that only this program reads and writes). The diagonal logits come from the
            tiles that hold them.                                                                2 N² d
            _clip_col_merge_kernel: logaddexp of the CP row partials → r_i, of the RG column partials
            → c_j, and per-block sums of (r_j − L_jj) + (c_j − L_jj) for the loss.
            Extra memory: 2·(RG + CP)·N statistics + 3N, RG, CP ≤ GROUP_CAP (32): O(N) (at most 66 KiB per
            1 024 rows in fp32), whatever the tile shape. RG·CP ≈ 2 programs per SM.
  backward  _clip_bwd_kernel, one launch, grid (⌈N/BM⌉, 2, C): role 0 programs own a row block of A and
            emit dA_I = s·dL_I,: B (+ the ds partial of their rows); role 1 programs own a row block of B
            (a column block of L) and emit dB_J = s·dL_:,Jᵀ A. Each recomputes its tiles (2 N² d per
            role) and multiplies (2 N² d per role).                                             8 N² d
            C = ⌈d / BLOCK_DO⌉ = 1 for every width whose fp32 BM × d accumulator compiles without spills for
            some tile of the space: d ≤ 512 for bf16/fp16 (64 × 16 tiles at d = 512), d ≤ 256 for fp32 (TF32 or
            IEEE) and fp64 operands; wider d recomputes the tiles once per output chunk: (4C + 4) N² d.
            Extra memory: the ds partials, one per row block (O(N/BM)).
  total     10 N² d (2 forward + 8 backward) for C = 1; 14 N² d for fp32 operands at d = 512 (C = 2).

Why not a single backward sweep (6 N² d): emitting dA and dB from the same recomputed tile needs a
cross-program reduction of dB (atomics: not deterministic) or an N × d partial per row block (O(N² d/BM)
memory). Recomputing each tile once per owner costs 2 N² d more and keeps the result bitwise deterministic
with O(N) extra memory. Every output element and every statistic is written by exactly one program, in a
fixed order.

Tiles (docs/kernels.md §4, §11): fwd_space / bwd_space list the configurations for a width, dtype and float32
matmul precision (128 × 128 forward tiles for bf16/fp16; the row operand A_I kept on chip when BM·d fits), the
spilling ones pruned (_SPILLS). FWD_SPACE / BWD_SPACE declare their union to the shared autotune layer
(_common.TuneSpace): on a GPU the launch times the candidates of its key once (shape buckets, dtype, precision);
STRUCTURE_OPS_AUTOTUNE_FORCE="clip.fwd:i" / "clip.bwd:j" or ``config=`` force one (the tests run every entry in
the interpreter). aot_configs() is the union of the spaces, and every entry compiles for sm_90 without spills
(``python -m structure_ops._triton.aot --targets 90 --no-spills``).

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

from ._common import (  # numpy's reductions in the interpreter (see _common)
    INTERPRET,
    PRECISIONS,
    TuneConfig,
    TuneSpace,
    _add,
    _max2,
    autotune_key,
    compute_dtype,
    device_guard,
    dot_precision,
    forced_config_index,
    next_pow2,
    round_tf32,
    tf32_rna,
)

__all__ = ["clip_fwd", "clip_bwd", "gemm_flops", "fwd_config", "bwd_config", "merge_config", "fwd_space",
           "bwd_space", "fwd_grid", "workspace_bytes", "tune_key", "FWD_SPACE", "BWD_SPACE", "aot_configs",
           "AOT_KERNELS", "GROUP_CAP"]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GROUP_CAP = 32  # row groups and column panels of the forward: the statistics are ≤ 2·(2·GROUP_CAP)·N values


def gemm_flops(n: int, d: int, block_do: int | None = None) -> dict[str, int]:
    """GEMM FLOPs of the forward and backward passes (the module docstring's model). ``block_do``: the
    backward's output chunk (default: what bwd_config picks for bf16 on a GPU; C = ⌈d / block_do⌉)."""
    if block_do is None:
        block_do = bwd_config(d, torch.bfloat16, interpret=False)["constexprs"]["BLOCK_DO"]
    c = -(-d // block_do)
    return {"forward": 2 * n * n * d, "backward": (4 * c + 4) * n * n * d, "total": (4 * c + 6) * n * n * d}


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
# Only core builtins inside the kernels (tl.full / tl.reduce, not tl.zeros / tl.sum / tl.max): those are
# @jit functions of triton.language.standard, and when triton was imported before TRITON_INTERPRET=1 was
# set (importing torch._dynamo imports triton) the interpreter refuses to call them. Same code on the GPU.
# In the interpreter every call of a @triton.jit helper re-patches triton.language (~5 ms a call, most of an
# interpreted tile): there the helpers below run as plain Python functions on the module the kernel's launch has
# already patched. On a GPU they are @triton.jit functions, inlined by the compiler: the same bodies either way.
_helper = (lambda f: f) if INTERPRET else triton.jit
_tf32_rna = getattr(tf32_rna, "fn", tf32_rna) if INTERPRET else tf32_rna


@_helper
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@_helper
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max2)


@_helper
def _finite_or_zero(m):
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@_helper
def _tile_lse(x, axis: tl.constexpr):
    # A log-sum-exp partial (m, l) of x along ``axis``: lse = m + log l with l = Σ e^{x − m}. The shift m is the
    # max when finite; a ±inf/NaN max shifts by 0 (the C++ op's rule: ±inf logits give inf/NaN, never a trap);
    # an all −inf slice is the empty partial (−inf, 0).
    t = _rmax(x, axis)
    sh = _finite_or_zero(t)
    if axis == 1:
        e = tl.exp(x - sh[:, None])
    else:
        e = tl.exp(x - sh[None, :])
    return tl.where(t == float("-inf"), t, sh), _rsum(e, axis)


@_helper
def _lse_merge(m1, l1, m2, l2):
    # logaddexp of two partials in the (m, l) form of _tile_lse; (−inf, 0) is the identity.
    m = tl.maximum(m1, m2)
    sh = _finite_or_zero(m)
    l = l1 * tl.exp(m1 - sh) + l2 * tl.exp(m2 - sh)
    return tl.where(m == float("-inf"), m, sh), l


@_helper
def _round_to(x, dt: tl.constexpr, EMULATE: tl.constexpr):
    # fp32 → dt rounded to nearest even, as the GPU's cvt.rn does. The interpreter truncates fp32 → bf16 (even with
    # fp_downcast_rounding="rtne"), so there (EMULATE) the rounding is done on the bits first: add 0x7FFF plus the
    # lowest kept bit, clear the 16 dropped bits; the cast that follows is then exact. NaN passes through.
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, r)
    return x.to(dt)


@_helper
def _operand(x, ROUND_TF32: tl.constexpr):
    # _common.dot_operand: fp32 at TF32 rounded to nearest (ties away) before the tensor cores truncate it
    if ROUND_TF32:
        x = _tf32_rna(x)
    return x


@_helper
def _load_operand(ptr, mask, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr):
    v = tl.load(ptr, mask=mask, other=0.0)
    if UPCAST:  # the interpreter miscomputes bf16 dots: feed it fp32 (exact products)
        v = v.to(tl.float32)
    # fp32 at TF32: operands rounded to nearest (ties away) here, not truncated by the tensor cores
    return _operand(v, ROUND_TF32)


@triton.jit
def _clip_fwd_kernel(
    a_ptr, b_ptr, s_ptr,  # A, B: (N, D) contiguous; s: 1 value in the statistics dtype
    diag_ptr,  # (N,) output: L_ii
    rm_ptr, rl_ptr,  # (CP, N) row partials (m, l) of r_i over column panel q
    cm_ptr, cl_ptr,  # (RG, N) column partials (m, l) of c_j over row group g
    N, D, RG, CP,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, X_ON_CHIP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    # Math: program (g, q), for each row block I ≡ g (mod RG) and column block J ≡ q (mod CP):
    #   L_IJ = s · A_I B_Jᵀ                                       (one tl.dot when A_I is on chip, else a K-loop)
    #   row:    (m, l)_i ← logaddexp((m, l)_i, tile partial)      registers; → rm/rl[q, I] after the panel
    #   column: (m, l)_gj ← logaddexp((m, l)_gj, tile partial)    cm/cl[g, J]: owned by this program
    #   diag:   L_ii from the tile J ∋ i, stored by the one program whose panel holds J.
    # Why this grid: one pass makes both directions (the column statistics need the same tiles as the row ones)
    # and the partial statistics stay O((RG + CP)·N) = O(N) for any N, with RG·CP programs to fill the GPU.
    ACC: tl.constexpr = rm_ptr.dtype.element_ty
    g = tl.program_id(0)
    q = tl.program_id(1)
    nrb = tl.cdiv(N, BLOCK_M)
    ncb = tl.cdiv(N, BLOCK_N)
    rl = tl.arange(0, BLOCK_M)
    cl = tl.arange(0, BLOCK_N)
    kl = tl.arange(0, BLOCK_D)
    s = tl.load(s_ptr).to(ACC)
    # Addresses: scalar int64 block bases (N·D may exceed 2³¹) + int32 offsets inside a block.
    for ib in range(g, nrb, RG):
        rows = ib * BLOCK_M + rl
        row_ok = rows < N
        a_blk = a_ptr + tl.cast(ib * BLOCK_M, tl.int64) * D
        if X_ON_CHIP:  # BLOCK_D ≥ D: A_I stays on chip for the whole panel
            x_full = _load_operand(a_blk + rl[:, None] * D + kl[None, :], row_ok[:, None] & (kl < D)[None, :],
                                   UPCAST, ROUND_TF32)
        m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
        l_i = tl.full((BLOCK_M,), 0.0, ACC)
        diag = tl.full((BLOCK_M,), 0.0, ACC)
        for jb in range(q, ncb, CP):
            cols = jb * BLOCK_N + cl
            col_ok = cols < N
            b_blk = b_ptr + tl.cast(jb * BLOCK_N, tl.int64) * D
            if X_ON_CHIP:
                y = _load_operand(b_blk + cl[:, None] * D + kl[None, :], col_ok[:, None] & (kl < D)[None, :],
                                  UPCAST, ROUND_TF32)
                acc = tl.dot(x_full, tl.trans(y), input_precision=DOT_PRECISION, out_dtype=ACC)
            else:
                acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
                for k0 in range(0, D, BLOCK_D):
                    k_ok = (k0 + kl) < D
                    x = _load_operand(a_blk + k0 + rl[:, None] * D + kl[None, :], row_ok[:, None] & k_ok[None, :],
                                      UPCAST, ROUND_TF32)
                    y = _load_operand(b_blk + k0 + cl[:, None] * D + kl[None, :], col_ok[:, None] & k_ok[None, :],
                                      UPCAST, ROUND_TF32)
                    acc = tl.dot(x, tl.trans(y), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
            logits = acc * s
            if (ib * BLOCK_M < jb * BLOCK_N + BLOCK_N) & (jb * BLOCK_N < ib * BLOCK_M + BLOCK_M):  # tile ∋ a diagonal
                diag += _rsum(tl.where(rows[:, None] == cols[None, :], logits, 0.0), 1)
            # One masked tile for both directions: masked entries are −inf (they add e^{−inf} = 0); a masked row's
            # (column's) own statistics are never stored.
            lm = tl.where(row_ok[:, None] & col_ok[None, :], logits, float("-inf"))
            tm, tsum = _tile_lse(lm, 1)
            m_i, l_i = _lse_merge(m_i, l_i, tm, tsum)
            # Column direction: this tile's partial, merged into the group's running one (read back from the
            # second row block of the group on; only this program touches cm/cl[g, J]).
            cm, csum = _tile_lse(lm, 0)
            coff = g.to(tl.int64) * N + cols
            old = col_ok & (ib != g)
            om = tl.load(cm_ptr + coff, mask=old, other=float("-inf"))
            osum = tl.load(cl_ptr + coff, mask=old, other=0.0)
            cm, csum = _lse_merge(om, osum, cm, csum)
            tl.store(cm_ptr + coff, cm, mask=col_ok)
            tl.store(cl_ptr + coff, csum, mask=col_ok)
        roff = q.to(tl.int64) * N + rows
        tl.store(rm_ptr + roff, m_i, mask=row_ok)
        tl.store(rl_ptr + roff, l_i, mask=row_ok)
        tl.store(diag_ptr + rows, diag, mask=row_ok & ((rows // BLOCK_N) % CP == q))
        # the column statistics stored above are read back (possibly by other threads of this program) for the
        # group's next row block: a CTA barrier orders the global stores before those loads
        tl.debug_barrier()


@triton.jit
def _clip_col_merge_kernel(
    rm_ptr, rl_ptr, cm_ptr, cl_ptr, diag_ptr,  # inputs (see _clip_fwd_kernel)
    lse_row_ptr, lse_col_ptr, loss_part_ptr,  # outputs: r, c (N,), per-block Σ_j (r_j − L_jj) + (c_j − L_jj) (fp64)
    N, RG, CP,
    BLOCK: tl.constexpr,
):
    # Math: r_i = logaddexp over the CP panels of (m, l)[q, i]; c_j = logaddexp over the RG groups of (m, l)[g, j];
    # then the loss terms of this block, (r_j − L_jj) + (c_j − L_jj), summed in fp64 (the C++ op accumulates the
    # loss in double). Deterministic: fixed loop order, one program per block of indices.
    ACC: tl.constexpr = lse_col_ptr.dtype.element_ty
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    off = idx.to(tl.int64)  # int64 running offset: GROUP_CAP·N may exceed 2³¹
    m = tl.full((BLOCK,), float("-inf"), ACC)
    l = tl.full((BLOCK,), 0.0, ACC)
    for _ in range(0, CP):
        m, l = _lse_merge(m, l, tl.load(rm_ptr + off, mask=ok, other=float("-inf")),
                          tl.load(rl_ptr + off, mask=ok, other=0.0))
        off += N
    r = m + tl.log(tl.where(ok, l, 1.0))  # masked lanes: no log(0)
    off = idx.to(tl.int64)
    m = tl.full((BLOCK,), float("-inf"), ACC)
    l = tl.full((BLOCK,), 0.0, ACC)
    for _ in range(0, RG):
        m, l = _lse_merge(m, l, tl.load(cm_ptr + off, mask=ok, other=float("-inf")),
                          tl.load(cl_ptr + off, mask=ok, other=0.0))
        off += N
    c = m + tl.log(tl.where(ok, l, 1.0))
    tl.store(lse_row_ptr + idx, r, mask=ok)
    tl.store(lse_col_ptr + idx, c, mask=ok)
    dg = tl.load(diag_ptr + idx, mask=ok, other=0.0)
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
    X_ON_CHIP: tl.constexpr, ONE_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    # Math: dL_ij = coef · E_ij with coef = g/2N and E_ij = e^{L_ij − r_i} + e^{L_ij − c_j} − 2δ_ij.
    # E is symmetric in the roles of (A, r) and (B, c): with M = X Yᵀ·s, u = own lse, v = other lse,
    #   dX_I = s · coef · Σ_J E(M_IJ; u_I, v_J) Y_J          (X, Y, u, v) = (A, B, r, c) → dA (role 0)
    #                                                        (X, Y, u, v) = (B, A, c, r) → dB (role 1)
    # so one kernel body serves both owners: program (I, role, chunk) owns rows I of X and the output
    # columns [chunk·BLOCK_DO, …) of dX, recomputes M_IJ for every J (2·BM·BN·D) and accumulates
    # E_IJ · Y_J[:, chunk] (2·BM·BN·BLOCK_DO) in fp32 registers. Every output element is written once
    # by one program: deterministic, no atomics, no N × N or N × d buffer.
    #   ds = Σ_ij dL_ij (A Bᵀ)_ij = coef · Σ_I Σ_i∈I Σ_j E_ij (A Bᵀ)_ij: role 0, chunk 0 writes its block's sum.
    # X_ON_CHIP (BLOCK_D ≥ D): X_I is loaded once for all J. ONE_TILE (X_ON_CHIP and BLOCK_DO = BLOCK_D): the Y_J
    # tile of the recompute is also the operand of the second GEMM (one load of Y_J per tile).
    # Why E and not dL in the second GEMM: E ∈ [−2, 2] survives the cast to bf16/fp16 for tensor cores;
    # coef ~ 1/N would underflow fp16 at large N. coef·s scales the fp32 accumulator at the end.
    ACC: tl.constexpr = lse_row_ptr.dtype.element_ty
    IN: tl.constexpr = a_ptr.dtype.element_ty
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
    if X_ON_CHIP:
        x_full = _load_operand(x_blk + rl[:, None] * D + kl[None, :], row_ok[:, None] & (kl < D)[None, :],
                               UPCAST, ROUND_TF32)

    out = tl.full((BLOCK_M, BLOCK_DO), 0.0, ACC)
    ds_rows = tl.full((BLOCK_M,), 0.0, ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + cl
        col_ok = cols < N
        y_blk = y_ptr + tl.cast(j0, tl.int64) * D
        # other=+inf: a masked column contributes e^{M − inf} = 0 (it is also zeroed below).
        v = tl.load(v_ptr + cols, mask=col_ok, other=float("inf"))
        if X_ON_CHIP:
            y = _load_operand(y_blk + cl[:, None] * D + kl[None, :], col_ok[:, None] & (kl < D)[None, :],
                              UPCAST, ROUND_TF32)
            dot = tl.dot(x_full, tl.trans(y), input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            dot = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
            for k0 in range(0, D, BLOCK_D):
                k_ok = (k0 + kl) < D
                x = _load_operand(x_blk + k0 + rl[:, None] * D + kl[None, :], row_ok[:, None] & k_ok[None, :],
                                  UPCAST, ROUND_TF32)
                y = _load_operand(y_blk + k0 + cl[:, None] * D + kl[None, :], col_ok[:, None] & k_ok[None, :],
                                  UPCAST, ROUND_TF32)
                dot = tl.dot(x, tl.trans(y), dot, input_precision=DOT_PRECISION, out_dtype=ACC)
        m = dot * s
        e = tl.exp(m - u[:, None]) + tl.exp(m - v[None, :])
        e = tl.where(rows[:, None] == cols[None, :], e - 2.0, e)
        e = tl.where(row_ok[:, None] & col_ok[None, :], e, 0.0)
        ds_rows += _rsum(e * dot, 1)
        if ONE_TILE:
            yo = y
        else:
            yo = _load_operand(y_blk + cl[:, None] * D + dos[None, :], col_ok[:, None] & do_ok[None, :],
                               UPCAST, ROUND_TF32)
        # E rounded to the input dtype as the tensor cores see it (in the interpreter too: to IN, then to fp32)
        eo = _operand(_round_to(e, IN, UPCAST).to(yo.dtype), ROUND_TF32)
        out = tl.dot(eo, yo, out, input_precision=DOT_PRECISION, out_dtype=ACC)

    out = out * (coef * s)
    o_offs = rl[:, None] * D + dos[None, :]
    tl.store(o_ptr + (pid * BLOCK_M).to(tl.int64) * D + o_offs, _round_to(out, o_ptr.dtype.element_ty, UPCAST),
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




# --------------------------------------------------------------------------------------------------
# Configurations: the tile spaces (every entry compiles for sm_90 without spills: aot.py --no-spills)
# --------------------------------------------------------------------------------------------------
def _kind(dtype: torch.dtype, precision: str | None) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "ieee" if dot_precision(dtype, precision) == "ieee" else "tf32"
    return "half"


_ESIZE = {"half": 2, "tf32": 4, "ieee": 4, "fp64": 8}
# (BLOCK_M, BLOCK_N, num_warps) candidates, best guess first (the default without timing).
_FWD_TILES = {
    "half": ((128, 128, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4)),
    "tf32": ((128, 128, 8), (128, 64, 8), (64, 128, 4), (64, 64, 4)),
    "ieee": ((128, 64, 8), (64, 64, 4), (64, 32, 4)),
    "fp64": ((64, 32, 4), (32, 32, 4)),
}
_BWD_TILES = {
    "half": ((128, 64, 8), (64, 64, 8), (64, 32, 8), (64, 16, 8)),
    "tf32": ((128, 64, 8), (64, 64, 8), (64, 32, 8), (64, 16, 8)),
    "ieee": ((64, 64, 8), (64, 32, 8), (64, 16, 8), (32, 32, 4)),
    "fp64": ((64, 32, 8), (32, 32, 4), (32, 16, 4)),
}
_K_STEP = {"half": 64, "tf32": 32, "ieee": 16, "fp64": 16}  # BLOCK_D of the K-loop when A_I is not on chip
# A_I (BM × d_pad) stays on chip when it is at most this many bytes (the dot operand lives in shared memory
# or registers for the whole loop over J).
_ON_CHIP_BYTES = {"half": 32 * 1024, "tf32": 32 * 1024, "ieee": 16 * 1024, "fp64": 16 * 1024}
# The fp32 (fp64) BM × BLOCK_DO accumulator of the backward: at most this many registers per thread.
_ACC_REGS = {"half": 128, "tf32": 128, "ieee": 64, "fp64": 64}
# (kind, kernel, BM, BN, warps, BLOCK_D, BLOCK_DO, X_ON_CHIP) that spill on sm_90 (ptxas -v of the compiled
# kernel; aot.py --no-spills): pruned from the spaces. Measured with Triton 3.7.1 (regenerate after a kernel change).
_SPILLS: frozenset = frozenset({
    ('fp64', 'bwd', 32, 16, 4, 32, 32, True),
    ('fp64', 'bwd', 32, 32, 4, 16, 256, False),
    ('fp64', 'bwd', 64, 32, 8, 16, 256, False),
    ('fp64', 'fwd', 32, 32, 4, 64, 0, True),
    ('fp64', 'fwd', 64, 32, 4, 32, 0, True),
    ('half', 'bwd', 64, 32, 8, 64, 512, False),
    ('half', 'bwd', 64, 64, 8, 64, 512, False),
    ('half', 'bwd', 64, 64, 8, 256, 256, True),
    ('half', 'bwd', 128, 64, 8, 64, 256, False),
    ('half', 'bwd', 128, 64, 8, 128, 128, True),
    ('half', 'bwd', 128, 128, 8, 64, 64, True),
    ('half', 'bwd', 128, 128, 8, 64, 256, False),
    ('half', 'bwd', 128, 128, 8, 128, 128, True),
    ('half', 'fwd', 64, 128, 4, 64, 0, False),
    ('half', 'fwd', 64, 128, 4, 256, 0, True),
    ('half', 'fwd', 128, 128, 8, 64, 0, False),
    ('ieee', 'bwd', 64, 64, 8, 16, 128, False),
    ('ieee', 'bwd', 64, 64, 8, 16, 256, False),
    ('ieee', 'bwd', 64, 64, 8, 64, 64, True),
    ('ieee', 'fwd', 64, 32, 4, 16, 0, False),
    ('ieee', 'fwd', 64, 32, 4, 64, 0, True),
    ('ieee', 'fwd', 64, 64, 4, 32, 0, True),
    ('ieee', 'fwd', 64, 64, 4, 64, 0, True),
    ('ieee', 'fwd', 128, 64, 8, 32, 0, True),
    ('tf32', 'bwd', 64, 16, 8, 32, 512, False),
    ('tf32', 'bwd', 64, 32, 8, 32, 512, False),
    ('tf32', 'bwd', 64, 64, 8, 32, 256, False),
    ('tf32', 'bwd', 64, 64, 8, 32, 512, False),
    ('tf32', 'bwd', 128, 64, 8, 32, 128, False),
    ('tf32', 'bwd', 128, 64, 8, 32, 256, False),
    ('tf32', 'fwd', 64, 64, 4, 32, 0, False),
    ('tf32', 'fwd', 64, 64, 4, 32, 0, True),
    ('tf32', 'fwd', 64, 64, 4, 64, 0, True),
    ('tf32', 'fwd', 64, 64, 4, 128, 0, True),
    ('tf32', 'fwd', 64, 128, 4, 32, 0, False),
    ('tf32', 'fwd', 64, 128, 4, 32, 0, True),
    ('tf32', 'fwd', 64, 128, 4, 64, 0, True),
    ('tf32', 'fwd', 64, 128, 4, 128, 0, True),
    ('tf32', 'fwd', 128, 64, 8, 64, 0, True),
    ('tf32', 'fwd', 128, 128, 8, 32, 0, False),
    ('tf32', 'fwd', 128, 128, 8, 32, 0, True),
    ('tf32', 'fwd', 128, 128, 8, 64, 0, True),
})


def _width(d: int) -> int:
    return max(16, next_pow2(d))


def _fwd_entry(kind: str, bm: int, bn: int, w: int, d: int, dtype, precision, on_chip: bool = True) -> dict:
    dp = max(_width(d), _K_STEP[kind])  # on chip: at least one K step wide (fewer width classes to compile)
    bd = dp if on_chip and bm * dp * _ESIZE[kind] <= _ON_CHIP_BYTES[kind] else _K_STEP[kind]
    cst = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, X_ON_CHIP=bd >= d, DOT_PRECISION=dot_precision(dtype, precision),
               UPCAST=False, ROUND_TF32=round_tf32(dtype, precision))
    return {"constexprs": cst, "options": {"num_warps": w}}


def _bwd_entry(kind: str, bm: int, bn: int, w: int, d: int, dtype, precision, bdo: int) -> dict:
    dp = max(_width(d), _K_STEP[kind])
    if bdo >= dp and bm * dp * _ESIZE[kind] <= _ON_CHIP_BYTES[kind]:
        bd = dp  # A_I on chip and one Y_J tile for both GEMMs
    else:
        bd = min(_K_STEP[kind], dp)
    on_chip = bd >= d
    cst = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo, X_ON_CHIP=on_chip, ONE_TILE=on_chip and bd == bdo,
               DOT_PRECISION=dot_precision(dtype, precision), UPCAST=False, ROUND_TF32=round_tf32(dtype, precision))
    return {"constexprs": cst, "options": {"num_warps": w}}


def _spills(kind: str, kernel: str, cfg: dict) -> bool:
    c = cfg["constexprs"]
    key = (kind, kernel, c["BLOCK_M"], c["BLOCK_N"], cfg["options"]["num_warps"], c["BLOCK_D"], c.get("BLOCK_DO", 0),
           c["X_ON_CHIP"])  # fmt: skip
    return key in _SPILLS


def fwd_space(d: int, dtype: torch.dtype, precision: str | None = None) -> list[dict]:
    """Every GPU configuration of ``_clip_fwd_kernel`` for width ``d`` and ``dtype`` (fp32: torch's float32 matmul
    ``precision``, default the current one), best guess first. aot.py compiles all of them."""
    kind = _kind(dtype, precision)
    out = []
    for bm, bn, w in _FWD_TILES[kind]:
        for on_chip in (True, False):  # A_I on chip where it fits and compiles without spills, else the K-loop
            cfg = _fwd_entry(kind, bm, bn, w, d, dtype, precision, on_chip)
            if not _spills(kind, "fwd", cfg):
                out.append(cfg)
                break
    return out


def bwd_space(d: int, dtype: torch.dtype, precision: str | None = None) -> list[dict]:
    """Every GPU configuration of ``_clip_bwd_kernel`` for width ``d`` and ``dtype``, best guess first: the tiles
    whose BM × d_pad fp32 accumulator fits (one output chunk: 8 N² d); when none does, every tile with the widest
    chunk that fits it (C = ⌈d / BLOCK_DO⌉ chunks, (4C + 4) N² d)."""
    kind = _kind(dtype, precision)
    dp = max(_width(d), _K_STEP[kind])  # at least one K step wide (fewer width classes to compile)
    whole, chunked = [], []
    for bm, bn, w in _BWD_TILES[kind]:
        cap = _ACC_REGS[kind] * 32 * w // bm  # accumulator columns that fit the register budget
        bdo = min(dp, 1 << (cap.bit_length() - 1))
        while bdo >= 16:  # the widest output chunk of this tile that compiles without spills
            cfg = _bwd_entry(kind, bm, bn, w, d, dtype, precision, bdo)
            if not _spills(kind, "bwd", cfg):
                (whole if bdo >= dp else chunked).append(cfg)
                break
            bdo //= 2
    if whole:
        return whole
    widest = max(c["constexprs"]["BLOCK_DO"] for c in chunked)
    return [c for c in chunked if c["constexprs"]["BLOCK_DO"] == widest]


def _interpret_cfg(cfg: dict, dtype: torch.dtype) -> dict:
    # the interpreter computes bf16 dots wrongly: it gets fp32 operands (exact products), otherwise the same
    cfg = {"constexprs": dict(cfg["constexprs"]), "options": dict(cfg["options"])}
    cfg["constexprs"]["UPCAST"] = bool(INTERPRET) and dtype == torch.bfloat16
    return cfg


def fwd_config(d: int, dtype: torch.dtype, precision: str | None = None, interpret: bool = INTERPRET) -> dict:
    """The default ``_clip_fwd_kernel`` configuration (without timing): the first entry of fwd_space on a GPU;
    32 × 32 tiles in the interpreter (it pays per program and per op)."""
    if interpret:
        dp = _width(d)
        bd = dp if dp <= 64 else 64
        cst = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=bd, X_ON_CHIP=bd >= d, DOT_PRECISION=dot_precision(dtype, precision),
                   UPCAST=dtype == torch.bfloat16, ROUND_TF32=round_tf32(dtype, precision))
        return {"constexprs": cst, "options": {"num_warps": 4}}
    return fwd_space(d, dtype, precision)[0]


def merge_config(dtype: torch.dtype, interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_clip_col_merge_kernel``."""
    return {"constexprs": {"BLOCK": 64 if interpret else 256}, "options": {"num_warps": 4}}


def bwd_config(d: int, dtype: torch.dtype, precision: str | None = None, interpret: bool = INTERPRET) -> dict:
    """The default ``_clip_bwd_kernel`` configuration (without timing): the first entry of bwd_space on a GPU."""
    if interpret:
        dp = _width(d)
        bd = dp if dp <= 64 else 64
        bdo = min(dp, 128)
        on_chip = bd >= d
        cst = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=bd, BLOCK_DO=bdo, X_ON_CHIP=on_chip,
                   ONE_TILE=on_chip and bd == bdo, DOT_PRECISION=dot_precision(dtype, precision),
                   UPCAST=dtype == torch.bfloat16, ROUND_TF32=round_tf32(dtype, precision))
        return {"constexprs": cst, "options": {"num_warps": 4}}
    return bwd_space(d, dtype, precision)[0]


def _override(cfg: dict, d: int, **blocks) -> dict:
    cfg = {"constexprs": dict(cfg["constexprs"]), "options": dict(cfg["options"])}
    cst = cfg["constexprs"]
    for name, v in blocks.items():
        if v is None:
            continue
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name.lower()} must be a power of two ≥ 16, got {v}")
        cst[name] = int(v)
    cst["X_ON_CHIP"] = cst["BLOCK_D"] >= d
    if "ONE_TILE" in cst:
        cst["ONE_TILE"] = cst["X_ON_CHIP"] and cst["BLOCK_DO"] == cst["BLOCK_D"]
    return cfg


def _validate(cfg: dict, d: int, kernel: str) -> dict:
    """A forced configuration (``config=``): the flags must agree with the width (a wrong X_ON_CHIP would drop
    columns), then the interpreter's UPCAST rule applies."""
    cst = cfg["constexprs"]
    if cst["X_ON_CHIP"] != (cst["BLOCK_D"] >= d):
        raise ValueError(f"{kernel} config: X_ON_CHIP={cst['X_ON_CHIP']} but BLOCK_D={cst['BLOCK_D']}, d={d}")
    if "ONE_TILE" in cst and cst["ONE_TILE"] != (cst["X_ON_CHIP"] and cst["BLOCK_DO"] == cst["BLOCK_D"]):
        raise ValueError(f"{kernel} config: ONE_TILE={cst['ONE_TILE']} disagrees with BLOCK_D/BLOCK_DO/X_ON_CHIP")
    return cfg


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def fwd_grid(n: int, block_m: int, block_n: int, sms: int) -> tuple[int, int]:
    """(RG, CP): row groups × column panels of the forward, ≈ 2 programs per SM, each ≤ GROUP_CAP (so the
    partial statistics are at most 2·(RG + CP)·N values) and never more than there are blocks."""
    nrb, ncb = triton.cdiv(n, block_m), triton.cdiv(n, block_n)
    rg = min(nrb, GROUP_CAP)
    cp = max(1, min(ncb, GROUP_CAP, triton.cdiv(2 * max(1, sms), rg)))
    return rg, cp


def workspace_bytes(n: int, dtype: torch.dtype, block_m: int, rg: int, cp: int) -> dict[str, int]:
    """Extra device memory of one clip_fwd / clip_bwd call beyond inputs and outputs, by the launch code's own
    allocations (the tests check them against what the launch code allocates)."""
    e = 8 if dtype == torch.float64 else 4
    fwd = e * (2 * (rg + cp) * n + n + 1) + 8 * triton.cdiv(n, 256 if not INTERPRET else 64)
    bwd = e * (2 + triton.cdiv(n, block_m))
    return {"forward": fwd, "backward": bwd}


# --------------------------------------------------------------------------------------------------
# Selection through the shared autotune layer (_common.TuneSpace): FWD_SPACE / BWD_SPACE hold the union of the
# tile spaces as data; the candidates for a key (N and d buckets, dtype, tl.dot precision) are exactly
# fwd_space / bwd_space of that width, the heuristic is their first entry. A launch takes a forced config
# (``config=``, or STRUCTURE_OPS_AUTOTUNE_FORCE="clip.fwd:i,clip.bwd:j"), block overrides, else the layer's choice
# (timed on a GPU, the heuristic with STRUCTURE_OPS_AUTOTUNE=0); the interpreter's default is the small-tile
# fwd_config / bwd_config (it pays per program and per op).
# --------------------------------------------------------------------------------------------------
_TUNE_WIDTHS = tuple(2**i for i in range(4, 14))  # 16 … 8192: every width class until the configs stop changing
_TUNE_VARIANTS = ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, None), (torch.float16, None),
                  (torch.float64, None))  # fmt: skip
_FWD_TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "X_ON_CHIP")
_BWD_TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO", "X_ON_CHIP", "ONE_TILE")
_STAGES = 3  # Triton's default num_stages, what every configuration was compiled and checked with


def _tune_config(cfg: dict, names) -> TuneConfig:
    return TuneConfig(tuple((k, cfg["constexprs"][k]) for k in names), cfg["options"]["num_warps"], _STAGES)


def _from_key(key: dict) -> tuple[int, torch.dtype, str | None]:
    dtype = getattr(torch, key["dtype"])
    return key["d"], dtype, ("highest" if key["precision"] == "ieee" else "high") if dtype == torch.float32 else None


def _tune_space(name: str, space_fn, names) -> TuneSpace:
    configs = []
    for dtype, prec in _TUNE_VARIANTS:
        for d in _TUNE_WIDTHS:
            for cfg in space_fn(d, dtype, prec):
                tc = _tune_config(cfg, names)
                if tc not in configs:
                    configs.append(tc)

    def candidates(key):
        return [_tune_config(c, names) for c in space_fn(*_from_key(key))]

    return TuneSpace(name, tuple(configs), heuristic=lambda key: candidates(key)[0],
                     allowed=lambda c, key: c in candidates(key))  # fmt: skip


FWD_SPACE = _tune_space("clip.fwd", fwd_space, _FWD_TUNED)
BWD_SPACE = _tune_space("clip.bwd", bwd_space, _BWD_TUNED)


def tune_key(n: int, d: int, dtype: torch.dtype, precision: str | None = None) -> dict:
    """The autotune key of a clip launch (shape buckets, dtype, tl.dot precision)."""
    return autotune_key(n=n, d=max(16, d), dtype=dtype, precision=precision)


def _launch_cfg(tc: TuneConfig, dtype: torch.dtype, precision: str | None = None) -> dict:
    cst = dict(tc.meta, DOT_PRECISION=dot_precision(dtype, precision), UPCAST=bool(INTERPRET) and dtype == torch.bfloat16,
               ROUND_TF32=round_tf32(dtype, precision))  # fmt: skip
    return {"constexprs": cst, "options": {"num_warps": tc.num_warps}}


def _select(space: TuneSpace, kernel: str, n: int, d: int, dtype, run, device, config, default, blocks) -> dict:
    if config is not None:
        return _interpret_cfg(_validate(config, d, kernel), dtype)
    if any(v is not None for v in blocks.values()):
        return _override(default(d, dtype), d, **blocks)
    if INTERPRET and forced_config_index(space.name) is None:
        return default(d, dtype)
    tc = space.choose(tune_key(n, d, dtype), lambda c: run(_launch_cfg(c, dtype)), device)
    return _validate(_launch_cfg(tc, dtype), d, kernel)


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
    config: dict | None = None,
    groups: tuple[int, int] | None = None,
):
    """``structure_ops::clip_fwd`` in Triton: (loss, lse_row, lse_col). See the module docstring.

    loss is 0-dim in image's dtype; lse_row/lse_col are (N,) in fp32 (fp64 for fp64 inputs). Extra memory
    O(N) (``workspace_bytes``). ``block_*`` override the default tile (powers of two ≥ 16), ``config`` forces an
    entry of fwd_space, ``groups`` the (RG, CP) grid (each ≤ GROUP_CAP, clamped to the block counts); for tests.
    """
    _check(image, text, logit_scale, "clip_fwd")
    a, b = image.detach().contiguous(), text.detach().contiguous()
    n, d = a.shape
    cdt = compute_dtype(a.dtype)
    dev = a.device
    mcfg = merge_config(a.dtype)
    with device_guard(dev):
        s = _scalar(logit_scale, dev, cdt)

        def run(cfg):
            cst = cfg["constexprs"]
            rg, cp = groups or fwd_grid(n, cst["BLOCK_M"], cst["BLOCK_N"], _num_sms(dev))
            if not (1 <= rg <= GROUP_CAP and 1 <= cp <= GROUP_CAP):
                raise ValueError(f"groups must be two integers in [1, {GROUP_CAP}], got {(rg, cp)}")
            # every group and panel needs at least one block (its statistics are written by its programs)
            rg, cp = min(rg, triton.cdiv(n, cst["BLOCK_M"])), min(cp, triton.cdiv(n, cst["BLOCK_N"]))
            diag = torch.empty(n, device=dev, dtype=cdt)
            part = torch.empty((2, rg + cp, n), device=dev, dtype=cdt)  # (m, l) × (row panels, column groups)
            _clip_fwd_kernel[(rg, cp)](a, b, s, diag, part[0, :cp], part[1, :cp], part[0, cp:], part[1, cp:],
                                       n, d, rg, cp, **cst, **cfg["options"])  # fmt: skip
            return diag, part, rg, cp

        cfg = _select(FWD_SPACE, "_clip_fwd_kernel", n, d, a.dtype, run, dev, config, fwd_config,
                      dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d))  # fmt: skip
        diag, part, rg, cp = run(cfg)
        ncb = triton.cdiv(n, mcfg["constexprs"]["BLOCK"])
        lse_row = torch.empty(n, device=dev, dtype=cdt)
        lse_col = torch.empty(n, device=dev, dtype=cdt)
        loss_part = torch.empty(ncb, device=dev, dtype=torch.float64)
        _clip_col_merge_kernel[(ncb,)](part[0, :cp], part[1, :cp], part[0, cp:], part[1, cp:], diag, lse_row,
                                       lse_col, loss_part, n, rg, cp, **mcfg["constexprs"], **mcfg["options"])  # fmt: skip
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
    config: dict | None = None,
):
    """``structure_ops::clip_bwd`` in Triton: (grad_image, grad_text, grad_logit_scale).

    grad is the upstream gradient of the loss (a 1-element tensor). grad_logit_scale = Σ dL ∘ (A Bᵀ)
    has logit_scale's shape, dtype and device. Deterministic (no atomics); extra memory O(N/BLOCK_M).
    ``block_*`` override the default tile, ``config`` forces an entry of bwd_space (tests).
    """
    _check(image, text, logit_scale, "clip_bwd")
    a, b = image.detach().contiguous(), text.detach().contiguous()
    n, d = a.shape
    cdt = compute_dtype(a.dtype)
    for t, name in ((lse_row, "lse_row"), (lse_col, "lse_col")):
        if t.numel() != n:
            raise RuntimeError(f"{name} must hold N = {n} values, got shape {tuple(t.shape)}")
    dev = a.device
    with device_guard(dev):
        s = _scalar(logit_scale, dev, cdt)
        g = _scalar(grad, dev, cdt)
        r = lse_row.detach().reshape(n).to(device=dev, dtype=cdt).contiguous()
        c = lse_col.detach().reshape(n).to(device=dev, dtype=cdt).contiguous()
        da = torch.empty((n, d), device=dev, dtype=image.dtype)
        db = torch.empty((n, d), device=dev, dtype=text.dtype)

        def run(cfg):
            cst = cfg["constexprs"]
            nrb = triton.cdiv(n, cst["BLOCK_M"])
            ds_part = torch.empty(nrb, device=dev, dtype=cdt)
            _clip_bwd_kernel[(nrb, 2, triton.cdiv(d, cst["BLOCK_DO"]))](
                a, b, s, g, r, c, da, db, ds_part, n, d, **cst, **cfg["options"]
            )
            return ds_part

        cfg = _select(BWD_SPACE, "_clip_bwd_kernel", n, d, a.dtype, run, dev, config, bwd_config,
                      dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DO=block_do))  # fmt: skip
        ds_part = run(cfg)
    ds = ds_part.sum().reshape(logit_scale.shape).to(device=logit_scale.device, dtype=logit_scale.dtype)
    return da, db, ds


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): every launch the host can make on a GPU: the union of the spaces.
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}
AOT_WIDTHS = _TUNE_WIDTHS


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
    """(kernel, signature, constexprs, options) for every dtype, float32 matmul precision and width class:
    every entry of fwd_space / bwd_space and the merge kernel's config, deduplicated."""
    seen, entries = set(), []
    for dtype, ptr in _PTR.items():
        stat = "*fp64" if dtype == torch.float64 else "*fp32"
        for precision in PRECISIONS:
            for d in AOT_WIDTHS:
                cands = [(_clip_fwd_kernel, c) for c in fwd_space(d, dtype, precision)]
                cands += [(_clip_bwd_kernel, c) for c in bwd_space(d, dtype, precision)]
                cands.append((_clip_col_merge_kernel, merge_config(dtype, interpret=False)))
                for kernel, cfg in cands:
                    cst = cfg["constexprs"]
                    key = (id(kernel), ptr, tuple(cst.items()), tuple(cfg["options"].items()))
                    if key not in seen:
                        seen.add(key)
                        entries.append((kernel, _signature(kernel, ptr, stat, cst), dict(cst), dict(cfg["options"])))
    return entries


AOT_KERNELS = aot_configs()
