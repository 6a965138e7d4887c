r"""k nearest neighbours by inner product, streamed top-k in Triton (docs/kernels.md §5).

Same semantics as the C++ op ``structure_ops::knn`` (csrc/cpu/knn_cpu.cpp) and the oracle
``structure_ops.reference.knn``: for every row i, the k columns j ≠ i with the largest (A Aᵀ)_ij, best
first; equal similarities go to the lower index; NaN similarities rank as −inf (below every number, tied
with −inf, so among themselves by index). −0.0 and +0.0 are equal. ``a`` is already L2-normalized by the
caller (the kernel does not care). Returns (N, k) int64 on a's device. Never forms an N × N matrix.

Paths:
  fused  (fp32 / bf16 / fp16, k ≤ 128): _knn_topk_kernel, one program per row block of BLOCK_M rows
         loops over column tiles: S_IJ = A_I A_Jᵀ (tl.dot, fp32 accumulation), each similarity is packed
         with its column into one int64 key, the tile's top-KP keys (KP = next power of two ≥ k) are
         selected by a bitonic sort / bitonic top-k and merged into the running per-row list (registers) by one bitonic
         step. GEMM FLOPs 2 N² d. Selection per row and tile: a bitonic sort of the BLOCK_N keys
         ((BN/2)·log₂BN·(log₂BN+1)/2 int64 compare-swaps; top-KP by bitonic halving when BN > KP) plus a
         log₂KP-stage merge, i.e. ≈ N²·(log₂²BN)/4 compare-swaps in all, on the CUDA cores alongside
         the tensor-core GEMM. Extra memory: none beyond the (N, k) output.
  panel  (fp64, or k > 128): row panels of B rows (B from the STRUCTURE_OPS_TRITON_PANEL_MB budget,
         default 256 MiB): a B × N similarity panel with torch.mm in the compute dtype, then an exact,
         deterministic top-k: torch.topk on the same unique int64 keys (fp32 and half types), or a stable
         descending sort with the diagonal removed afterwards (fp64, whose values do not fit a key
         next to an index). Memory O(B·N), never N × N.

Key (why one int64 suffices): for an fp32 value v with bit pattern b (as int32),
    o(v) = b XOR ((b >> 31) & 0x7FFFFFFF)
is a signed int32 that orders like v (negative floats have their magnitude bits flipped). With
    key = (o(v) << 32) | (2³¹ − 1 − j)
a larger key means a larger similarity, and for equal similarities a smaller column index j. Every key
is unique (j is in it), so "top-k of the keys" is exactly the C++ order: value descending, index
ascending — no stable sort needed. NaN becomes −inf before packing; −0.0 becomes +0.0; the diagonal
and the padding columns get INT64_MIN, below every real key (o(v) > −2³¹ for every non-NaN v), and
since k ≤ N − 1 they are never selected.

Precision (docs/kernels.md §6): the similarities are what the C++ op computes (an fp32 GEMM of the inputs
upcast to fp32) up to the summation order: bf16/fp16 products are exact in fp32 and accumulated in fp32
on tensor cores; fp32 inputs follow torch.get_float32_matmul_precision() (TF32 for "high"/"medium",
which can reorder near-ties compared with the C++ op; "highest" gives IEEE fp32).
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
    panel_rows,
    round_tf32,
)

__all__ = ["knn", "fused_config", "aot_configs", "AOT_KERNELS", "MAX_FUSED_K"]

MAX_FUSED_K = 128
_INT64_MIN = -(2**63)
_INT64_MIN_C = tl.constexpr(_INT64_MIN)  # a global constexpr the kernel can read
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------------------------------
# Bitonic selection on int64 keys, from core builtins only
# --------------------------------------------------------------------------------------------------
# The same networks as triton.language.standard's sort/topk/bitonic_merge, rewritten with tl.reduce and
# tl.reshape: the standard ones are @jit functions of triton.language.standard, and when triton was
# imported before TRITON_INTERPRET=1 was set (importing torch._dynamo imports triton) the interpreter
# refuses to call them. Same networks, same code on the GPU.
#
# A (rows × 2^L) tensor is viewed as a hypercube [2] * n_dims (row bits major, position bits minor);
# dimension n_dims − 1 − i of the cube is bit i of the position. Compare-and-swap along bit i: the
# partner of x is x XOR (the XOR of the pair), i.e. a keep-dims XOR reduction over that size-2 axis.
@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    # 0/1 along the cube axis of position bit j, broadcastable to the cube
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    partner = h ^ tl.reduce(h, n_dims - 1 - i, _xor, keep_dims=True)
    is_right = _indicator(n_dims, i)
    # left element keeps the min (ascending) unless flipped; right keeps the max
    return tl.where((h > partner) != (flip ^ is_right), partner, h)


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    # Bitonic merge of runs of 2^stage positions: order 0 ascending, 1 descending, 2 alternating by run
    # (run r sorted descending when bit `stage` of its position is 1), the input of the next stage.
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for t in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - t, n_dims)
    return h


@triton.jit
def _topk_desc(x, ROWS_LOG: tl.constexpr, N_LOG: tl.constexpr, K_LOG: tl.constexpr):
    # The 2^K_LOG largest of each row of x (2^ROWS_LOG × 2^N_LOG), sorted descending: bitonic sort of
    # runs of 2^K_LOG, then repeatedly keep the elementwise max of neighbouring runs (one ascending, one
    # descending: the max is the top half of their union, and bitonic) and re-merge it.
    n_dims: tl.constexpr = ROWS_LOG + N_LOG
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, K_LOG + 1):
        h = _bitonic_stage(h, i, 2 if i < N_LOG else 1, n_dims)
    for i in tl.static_range(K_LOG + 1, N_LOG + 1):
        h = tl.reduce(h, n_dims - (i - K_LOG) - K_LOG, _maximum)
        h = _bitonic_stage(h, K_LOG, 2 if i < N_LOG else 1, n_dims - (i - K_LOG))
    return tl.reshape(h, [2**ROWS_LOG, 2**K_LOG])


@triton.jit
def _merge_asc(best, top, ROWS_LOG: tl.constexpr, K_LOG: tl.constexpr):
    # best ascending, top descending (same shape): max(best, top) is the top half of their union and a
    # bitonic sequence; one bitonic merge (K_LOG compare-swap rounds) sorts it ascending.
    n_dims: tl.constexpr = ROWS_LOG + K_LOG
    h = tl.reshape(tl.maximum(best, top), [2] * n_dims)
    h = _bitonic_stage(h, K_LOG, 0, n_dims)
    return tl.reshape(h, [2**ROWS_LOG, 2**K_LOG])


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _knn_topk_kernel(
    a_ptr,  # (N, D) contiguous, fp32 / bf16 / fp16
    out_ptr,  # (N, K) int64
    N, D, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    M_LOG: tl.constexpr, N_LOG: tl.constexpr, KP_LOG: tl.constexpr,  # log₂ of BLOCK_M, BLOCK_N, KP
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    # Math: for the row block I (this program), over column tiles J:
    #   S_IJ = A_I A_Jᵀ                                         (tl.dot, fp32 accumulation)
    #   key_ij = (o(S_ij) << 32) | (2³¹−1−j)   (o: order-preserving int32 of the fp32 bits; see module doc)
    #   key_ij = INT64_MIN for j = i and for j ≥ N                (diagonal excluded, padding)
    #   T_I   = top-KP keys of the tile, descending              (bitonic sort / bitonic top-k)
    #   R_I   ← top-KP of R_I ∪ T_I:  R_I ascending and T_I descending, so max(R_I, T_I) elementwise is
    #           exactly the top half of the union and is a bitonic sequence; one bitonic merge sorts it
    #           back to ascending (log₂ KP compare-swap stages instead of a full sort of 2·KP keys).
    # At the end R_I holds the row's best KP keys ascending: position p → output column KP−1−p (< K),
    # column index j = 2³¹−1 − (key & 0xFFFFFFFF).
    tl.static_assert((BLOCK_M == 2**M_LOG) & (BLOCK_N == 2**N_LOG) & (KP == 2**KP_LOG) & (KP <= BLOCK_N))
    pid = tl.program_id(0)
    rl = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + rl
    row_ok = rows < N
    cl = tl.arange(0, BLOCK_N)
    kl = tl.arange(0, BLOCK_D)
    # Addresses: scalar int64 block bases (N·D may exceed 2³¹) + int32 offsets inside a block.
    a_blk = a_ptr + (pid * BLOCK_M).to(tl.int64) * D
    c_blk = a_ptr
    best = tl.full((BLOCK_M, KP), _INT64_MIN_C, tl.int64)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + cl
        col_ok = cols < N
        sim = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, D, BLOCK_D):
            k_ok = (k0 + kl) < D
            x = tl.load(a_blk + k0 + rl[:, None] * D + kl[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(c_blk + k0 + cl[:, None] * D + kl[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter miscomputes bf16 dots: feed it fp32 (exact products)
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            # fp32 at TF32: operands rounded to nearest (ties away, as cuBLAS) here, not truncated by the hardware
            x = dot_operand(x, ROUND_TF32)
            y = dot_operand(y, ROUND_TF32)
            sim = tl.dot(x, tl.trans(y), sim, input_precision=DOT_PRECISION)
        c_blk += BLOCK_N * D
        # NaN → −inf (the C++ key), −0.0 → +0.0 (equal values must tie on the index).
        sim = tl.where(sim != sim, float("-inf"), sim)
        sim = tl.where(sim == 0.0, 0.0, sim)
        bits = sim.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        inv_col = (0x7FFFFFFF - cols).to(tl.int64)
        key = (ordered.to(tl.int64) << 32) | inv_col[None, :]
        keep = col_ok[None, :] & (rows[:, None] != cols[None, :])
        key = tl.where(keep, key, _INT64_MIN_C)
        top = _topk_desc(key, M_LOG, N_LOG, KP_LOG)  # (BLOCK_M, KP), descending
        best = _merge_asc(best, top, M_LOG, KP_LOG)  # ascending again
    idx = 0x7FFFFFFF - (best & 0xFFFFFFFF)
    pos = KP - 1 - tl.arange(0, KP)  # output column of each position of the ascending list
    out_offs = rl[:, None] * K + pos[None, :]
    tl.store(out_ptr + (pid * BLOCK_M).to(tl.int64) * K + out_offs, idx, mask=row_ok[:, None] & (pos < K)[None, :])


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _check(a: torch.Tensor, k: int) -> None:
    # The C++ op's checks (csrc/common/checks.h, knn_cpu.cpp), same messages and exception type.
    if a.dim() != 2:
        raise RuntimeError(f"a must be a 2-D (N, d) tensor, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise RuntimeError(f"a must be a floating-point tensor, got {a.dtype}")
    if a.shape[0] < 2:
        raise RuntimeError(f"a needs at least N = 2 rows, got shape {tuple(a.shape)}")
    if a.shape[1] < 1:
        raise RuntimeError(f"a needs at least one feature column, got shape {tuple(a.shape)}")
    n = a.shape[0]
    if not (1 <= k <= n - 1):
        raise RuntimeError(f"k must satisfy 1 <= k <= N - 1 = {n - 1} (diagonal excluded), got {k}")
    if a.dtype not in _SUPPORTED:
        raise NotImplementedError(f"knn (triton): dtype {a.dtype} is not supported (fp32, bf16, fp16, fp64)")
    if not INTERPRET and a.device.type != "cuda":
        raise RuntimeError(f"knn (triton): a must be a CUDA tensor, got {a.device}")


def fused_config(d: int, kp: int, dtype: torch.dtype, precision: str | None = None,
                 interpret: bool = INTERPRET) -> dict:
    """Constexprs and options of ``_knn_topk_kernel`` as the host launches it (list length KP = next power of two
    ≥ k, ≥ 2) for width ``d``, ``dtype`` and, for fp32, torch's float32 matmul ``precision``. aot.py compiles
    exactly these. 8 warps, no register spills on sm_90 (ptxas -v) for KP ≤ 64 at 64 rows, KP = 128 at 32."""
    if interpret:
        bm, bn, bd, w = 32, 64, min(64, max(16, next_pow2(d))), 4
    else:
        bm, bn, bd, w = (64 if kp <= 64 else 32), 64, (32 if dtype == torch.float32 else 64), 8
    bn = max(bn, kp)  # the tile's top-KP needs KP ≤ BLOCK_N
    cst = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, KP=kp, DOT_PRECISION=dot_precision(dtype, precision),
               UPCAST=bool(interpret) and dtype == torch.bfloat16, ROUND_TF32=round_tf32(dtype, precision))
    return {"constexprs": _with_logs(cst), "options": {"num_warps": w}}


def _with_logs(cst: dict) -> dict:
    cst.update(M_LOG=cst["BLOCK_M"].bit_length() - 1, N_LOG=cst["BLOCK_N"].bit_length() - 1,
               KP_LOG=cst["KP"].bit_length() - 1)
    return cst


def _keys_fp32(sim: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The kernel's int64 keys, in torch (panel path): value descending, then column ascending."""
    # NaN → −inf, ±inf kept (the C++ comparator; torch.nan_to_num would also clamp ±inf to ±max)
    sim = torch.where(sim.isnan(), float("-inf"), sim)
    sim = torch.where(sim == 0, 0.0, sim)
    bits = sim.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (0x7FFFFFFF - cols)


def _knn_panels(a: torch.Tensor, k: int) -> torch.Tensor:
    n = a.shape[0]
    cdt = compute_dtype(a.dtype)
    x = a.to(cdt)
    out = torch.empty((n, k), dtype=torch.int64, device=a.device)
    cols = torch.arange(n, device=a.device)
    bytes_per_row = n * (3 * 8 if cdt == torch.float64 else 8 + 4)
    rows_per = panel_rows(n, bytes_per_row)
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        rows = cols[r0:r1]
        sim = x[r0:r1] @ x.T
        if cdt == torch.float32:
            key = _keys_fp32(sim, cols)
            key[torch.arange(r1 - r0, device=a.device), rows] = _INT64_MIN
            top = torch.topk(key, k, dim=1, sorted=True).values  # unique keys: exact, deterministic
            out[r0:r1] = 0x7FFFFFFF - (top & 0xFFFFFFFF)
        else:
            # fp64 values do not fit next to an index: stable descending sort, then drop the diagonal
            # from the first k + 1 (removing one element keeps the rest in stable order).
            sim = torch.where(sim.isnan(), float("-inf"), sim)
            order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, : k + 1]
            keep = order != rows[:, None]
            keep &= keep.cumsum(dim=1) <= k
            out[r0:r1] = order[keep].view(r1 - r0, k)
    return out


def knn(
    a: torch.Tensor,
    k: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``structure_ops::knn`` in Triton: (N, k) int64 neighbour indices, best first (module docstring).

    path: "auto" (fused for fp32/bf16/fp16 and k ≤ 128, else panel), "fused" or "panel".
    ``block_*`` override the fused tile shape (powers of two ≥ 16; for tests).
    """
    k = int(k)
    _check(a, k)
    if path not in ("auto", "fused", "panel"):
        raise ValueError(f"path must be 'auto', 'fused' or 'panel', got {path!r}")
    fused_ok = a.dtype != torch.float64 and k <= MAX_FUSED_K
    if path == "fused" and not fused_ok:
        raise NotImplementedError(
            f"knn (triton): the fused kernel supports fp32/bf16/fp16 and k ≤ {MAX_FUSED_K}; "
            f"got {a.dtype}, k = {k} (use path='panel' or 'auto')"
        )
    a = a.detach().contiguous()
    if path == "panel" or not fused_ok:
        return _knn_panels(a, k)
    n, d = a.shape
    kp = max(2, next_pow2(k))
    cfg = fused_config(d, kp, a.dtype)
    cst = cfg["constexprs"]
    for name, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_D", block_d)):
        if v is None:
            continue
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name.lower()} must be a power of two ≥ 16, got {v}")
        cst[name] = int(v)
    cst["BLOCK_N"] = max(cst["BLOCK_N"], kp)
    _with_logs(cst)
    with device_guard(a.device):
        out = torch.empty((n, k), dtype=torch.int64, device=a.device)
        _knn_topk_kernel[(triton.cdiv(n, cst["BLOCK_M"]),)](a, out, n, d, k, **cst, **cfg["options"])
    return out


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): every fused launch the host can make on a GPU, from fused_config.
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}  # fp64 takes the panel path


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options): fused_config for every dtype, float32 matmul precision and list
    length KP = 2 … MAX_FUSED_K, deduplicated."""
    seen, entries = set(), []
    for dtype, ptr in _PTR.items():
        for precision in PRECISIONS:
            kp = 2
            while kp <= MAX_FUSED_K:
                cfg = fused_config(128, kp, dtype, precision, interpret=False)
                cst = cfg["constexprs"]
                key = (ptr, tuple(cst.items()), tuple(cfg["options"].items()))
                if key not in seen:
                    seen.add(key)
                    sig = {name: ("constexpr" if name in cst else "i32") for name in _knn_topk_kernel.arg_names}
                    sig.update(a_ptr=ptr, out_ptr="*i64")
                    entries.append((_knn_topk_kernel, sig, dict(cst), dict(cfg["options"])))
                kp *= 2
    return entries


AOT_KERNELS = aot_configs()
