r"""k nearest neighbours by inner product, streamed top-k in Triton (docs/kernels.md §5).

Same semantics as the C++ op ``structure_ops::knn`` (csrc/cpu/knn_cpu.cpp) and the oracle
``structure_ops.reference.knn``: for every row i, the k columns j ≠ i with the largest (A Aᵀ)_ij, best
first; equal similarities go to the lower index; NaN similarities rank as −inf (below every number, tied
with −inf, so among themselves by index). −0.0 and +0.0 are equal. ``a`` is already L2-normalized by the
caller (the kernel does not care). Returns (N, k) int64 on a's device. Never forms an N × N matrix.

Paths:
  fused  (fp32 / bf16 / fp16, k ≤ 128): _knn_topk_kernel, one program per row block of BLOCK_M rows
         loops over column tiles in ascending order: S_IJ = A_I A_Jᵀ (tl.dot, fp32 accumulation; A_I loaded
         once and kept on chip when d fits, RESIDENT), GEMM FLOPs 2 N² d. Each row keeps its best k keys in an
         unsorted list of KP slots (registers, KP = list_slots(k)), whose minimum is the running k-th key.
         Tile skipping: a tile none of whose similarities is strictly above its row's k-th value, for every
         row of the block, is skipped before anything is packed or selected (an equal value has a higher
         column index, so it loses the tie). Otherwise m = the most keys of one row that beat its k-th (≤ k)
         insertion rounds: each row's largest entering key replaces its list minimum. Selection per row and
         tile: one compare per similarity, plus ~6·BLOCK_N int32 + ~3·KP int64 operations per round; the
         rounds total about k(1 + ln(N/k)) per row on random data, far fewer tiles than N/BLOCK_N merge once
         the list is warm. Tiles, BLOCK_D, RESIDENT: KNN_SPACE (autotuned on a GPU, _common.TuneSpace).
         Extra memory: none beyond the (N, k) output.
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
and the padding columns never enter (their o is INT32_MIN, below o(v) for every non-NaN v, −inf included),
and since k ≤ N − 1 every list slot ends with a real key.

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
    TuneConfig,
    TuneSpace,
    _max2,  # numpy's max in the interpreter (a Python loop for our own combine functions)
    autotune_key,
    compute_dtype,
    config_grid,
    device_guard,
    dot_operand,
    dot_precision,
    next_pow2,
    panel_rows,
    round_tf32,
    row_sum,
)

__all__ = ["knn", "fused_config", "tile_space", "tile_stats", "tune_key", "KNN_SPACE", "aot_configs", "aot_space_configs",
           "AOT_KERNELS", "MAX_FUSED_K"]

MAX_FUSED_K = 128
_INT64_MIN = -(2**63)
_INT64_MIN_C = tl.constexpr(_INT64_MIN)  # global constexprs the kernel can read
_INT32_MIN_C = tl.constexpr(-(2**31))
_INT64_MAX_C = tl.constexpr(2**63 - 1)
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _min2(a, b):
    return tl.minimum(a, b)


if INTERPRET:  # numpy's min in the interpreter (see _common._max2)
    _min2 = getattr(tl.standard, "_elementwise_min", _min2)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _knn_topk_kernel(
    a_ptr,  # (N, D) contiguous, fp32 / bf16 / fp16
    out_ptr,  # (N, K) int64
    stats_ptr,  # (programs, 2) int32: column tiles merged, insertion rounds (written only when STATS ≠ 0)
    N, D, K, STATS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr,
    RESIDENT: tl.constexpr,  # D ≤ BLOCK_D: the row block A_I is loaded once and stays on chip
):
    # Math: for the row block I (this program), over column tiles J in ascending column order:
    #   S_IJ = A_I A_Jᵀ                                         (tl.dot, fp32 accumulation)
    #   o_ij = o(S_ij) (order-preserving int32 of the fp32 bits; see module doc), INT32_MIN for j = i, j ≥ N
    # The running list R_i of row i: KP int64 key slots, UNSORTED: k slots hold the row's best k keys so far
    # (placeholders INT64_MIN + 1 + slot, below every real key, until k columns were seen) and KP − k slots hold
    # INT64_MAX (never replaced). So κ_i = min(R_i) is the key of the row's running k-th best, exactly.
    #   c_i = #{j in J : o_ij > θ_i},  θ_i = κ_i >> 32 (the k-th value, INT32_MIN for a placeholder)
    # is the number of the tile's keys that beat κ_i: a larger value is needed, because an EQUAL value loses
    # the tie (every column of this tile has a higher index than every column already in R_i: tiles go in
    # ascending order). m = min(k, max_i c_i) over the block (after k rounds a row's remaining entering keys
    # are below the k it took from this tile):
    #   m = 0 → the tile is skipped (no key packing, no selection);
    #   else m insertion rounds on the entering keys only: t_i = the row's largest remaining entering key
    #     (key_ij = (o_ij << 32) | (2³¹−1−j): the largest o_ij, then its lowest column; int32 work on the tile,
    #     the int64 key packed per row); if t_i > κ_i the slot holding κ_i gets t_i (keys are unique, so one
    #     slot); t_i's column is removed from the tile; κ_i = min(R_i). Each row's entering keys are its
    #     c_i largest, taken in order, so after m rounds R_i = top-k of (R_i ∪ J's keys).
    # At the end the top k leave R_i largest first (k rounds of a row max); column j = 2³¹−1 − (key & 0xFFFFFFFF).
    # Selection work per row and tile: one compare per element (the count), plus per round ~6·BLOCK_N int32 and
    # ~3·KP int64 compares/selects/reductions; no per-tile sort.
    pid = tl.program_id(0)
    rl = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + rl
    row_ok = rows < N
    cl = tl.arange(0, BLOCK_N)
    kl = tl.arange(0, BLOCK_D)
    slot = tl.arange(0, KP)[None, :]
    # Addresses: scalar int64 block bases (N·D may exceed 2³¹) + int32 offsets inside a block.
    a_blk = a_ptr + (pid * BLOCK_M).to(tl.int64) * D
    c_blk = a_ptr
    if RESIDENT:  # the whole row block, once (D ≤ BLOCK_D)
        x_res = tl.load(a_blk + rl[:, None] * D + kl[None, :], mask=row_ok[:, None] & (kl < D)[None, :], other=0.0)
        if UPCAST:  # the interpreter miscomputes bf16 dots: feed it fp32 (exact products)
            x_res = x_res.to(tl.float32)
        x_res = dot_operand(x_res, ROUND_TF32)
    placeholder = tl.full((BLOCK_M, KP), _INT64_MIN_C, tl.int64) + 1 + slot.to(tl.int64)
    best = tl.where(slot < K, placeholder, _INT64_MAX_C)
    kth = tl.reduce(best, 1, _min2)
    tiles = 0
    rounds = 0
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + cl
        col_ok = cols < N
        sim = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        if RESIDENT:
            y = tl.load(c_blk + cl[:, None] * D + kl[None, :], mask=col_ok[:, None] & (kl < D)[None, :], other=0.0)
            if UPCAST:
                y = y.to(tl.float32)
            y = dot_operand(y, ROUND_TF32)
            sim = tl.dot(x_res, tl.trans(y), sim, input_precision=DOT_PRECISION)
        else:
            for k0 in range(0, D, BLOCK_D):
                k_ok = (k0 + kl) < D
                x = tl.load(a_blk + k0 + rl[:, None] * D + kl[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                y = tl.load(c_blk + k0 + cl[:, None] * D + kl[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
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
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # > INT32_MIN for every value, −inf included
        keep = col_ok[None, :] & (rows[:, None] != cols[None, :])
        theta = (kth >> 32).to(tl.int32)
        enter = keep & (ordered > theta[:, None])
        # rounds: the most entering keys of a row, at most K (after K rounds a row's remaining ones are below
        # the K keys it took from this tile)
        m = tl.minimum(tl.reduce(row_sum(enter.to(tl.int32)), 0, _max2), K)
        if m > 0:
            # the entering values only; a key is (value, column) and is packed per row only (int32 tile work)
            oe = tl.where(enter, ordered, _INT32_MIN_C)
            for _ in range(m):
                tv = tl.reduce(oe, 1, _max2)
                tc = tl.reduce(tl.where(oe == tv[:, None], cols[None, :], 0x7FFFFFFF), 1, _min2)  # lowest column
                t = (tv.to(tl.int64) << 32) | (0x7FFFFFFF - tc).to(tl.int64)
                hit = (best == kth[:, None]) & ((tv != _INT32_MIN_C) & (t > kth))[:, None]
                best = tl.where(hit, t[:, None], best)
                oe = tl.where(cols[None, :] == tc[:, None], _INT32_MIN_C, oe)
                kth = tl.reduce(best, 1, _min2)
            tiles += 1
            rounds += m
    # output: K rounds of "take the row's largest key" (the INT64_MAX slots dropped first), best first
    best = tl.where(best == _INT64_MAX_C, _INT64_MIN_C, best)
    out_row = out_ptr + (pid * BLOCK_M).to(tl.int64) * K + rl * K
    for r in range(K):
        t = tl.reduce(best, 1, _max2)
        tl.store(out_row + r, 0x7FFFFFFF - (t & 0xFFFFFFFF), mask=row_ok)
        best = tl.where(best == t[:, None], _INT64_MIN_C, best)
    if STATS != 0:
        tl.store(stats_ptr + 2 * pid, tiles)
        tl.store(stats_ptr + 2 * pid + 1, rounds)


_ARG_NAMES = tuple(_knn_topk_kernel.arg_names)  # (the tests may replace the kernel object by a recorder)


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


# One space for every variant; ``_allowed`` keeps, per key (dtype, tl.dot precision, list length KP, width bucket
# d, N bucket), the configurations that apply and compile without spills on sm_90:
#   RESIDENT = 1: the row block A_I (BLOCK_M × d) is loaded once and stays on chip: BLOCK_D = max(64, d) ≤ 256
#     and BLOCK_M · BLOCK_D · element size ≤ ROW_ONCHIP_BYTES;
#   RESIDENT = 0: A_I and A_J stream through BLOCK_D-wide chunks (BLOCK_D < d; fp32 32/64, bf16/fp16 64/128);
#   the running list is BLOCK_M × KP int64 in registers: BLOCK_M · KP ≤ LIST_SLOTS.
_SPACE_AXES = dict(BLOCK_M=(32, 64, 128), BLOCK_N=(64, 128), BLOCK_D=(32, 64, 128, 256), RESIDENT=(0, 1))
STREAM_BLOCK_D = {"float32": 32, "bfloat16": 64, "float16": 64}
ROW_ONCHIP_BYTES = 64 * 1024
LIST_SLOTS = 64 * 64


MIN_KP = 16  # list slots at least (a few more int64 compares per round; 4 list lengths instead of 7 to compile)


def list_slots(k: int) -> int:
    """KP, the running list's slots for ``k`` neighbours: the next power of two ≥ k, at least MIN_KP."""
    return max(MIN_KP, next_pow2(k))


def _esize_name(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _resident_block_d(d: int) -> int:
    return max(64, next_pow2(d))


def _allowed(cfg: TuneConfig, key: dict) -> bool:
    bm, bn, bd, res = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["RESIDENT"]
    kp, dt = key["kp"], key["dtype"]
    if bm == 32 and kp < 128:  # 32-row blocks only for the longest lists
        return False
    if bm * kp > LIST_SLOTS or (kp >= 64 and bm * bn > 64 * 64):  # list registers (ptxas: 64 × 128 at KP 64 spills)
        return False
    if bm * bn > 128 * 64 and not (res and dt != "float32"):  # 128 × 128: half inputs with A_I on chip only
        return False
    # Spill pruning from aot.py --targets 90 --no-spills (triton 3.7.1, ptxas -v; bytes = spill stores + loads):
    if key["precision"] == "ieee" and dt == "float32" and bm * bn > 64 * 64:
        return False  # IEEE fp32 (FMA dot): 128 × 64 streamed 56 B, 64 × 128 resident BLOCK_D 128 1480 B
    if dt == "float32" and res and (bd > 64 and bm * bn >= 64 * 64 or bm * bn > 64 * 64 and kp > 16):
        return False  # TF32 resident: 64 × 128 BLOCK_D 128 384–552 B, 32 × 128 BLOCK_D 128 64 B, 64 × 128 KP 32 24 B
    if dt != "float32" and res and (bd == 128 and bn == 128 or bm * bn > 128 * 64 and bd == 64 and kp > 16):
        return False  # half resident: BLOCK_N 128 at BLOCK_D 128 48–600 B; 128 × 128 at BLOCK_D 64, KP 32 80 B
    if res:
        return bd == _resident_block_d(key["d"]) and bm * bd * _esize_name(dt) <= ROW_ONCHIP_BYTES
    return bd == STREAM_BLOCK_D[dt] and bd < key["d"]


def _heuristic(key: dict) -> TuneConfig:
    """Without benchmarking: 128-row blocks once there are enough of them to fill an H100/H200 (N ≥ 128 · 132),
    128-column tiles from N ≥ 128, the row block resident where it fits, else the wider streamed BLOCK_D."""
    cands = KNN_SPACE.candidates(key)

    def score(c: TuneConfig):
        return (c["BLOCK_M"] == (128 if key["n"] >= 128 * 132 else 64), c["BLOCK_N"] == (128 if key["n"] >= 128 else 64),
                c["RESIDENT"], c["BLOCK_D"])  # fmt: skip

    return max(cands, key=score)


def _smem(cfg: TuneConfig, key: dict) -> int:
    e = _esize_name(key["dtype"])
    bm, bn, bd, st = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg.num_stages
    return (bm * bd + st * bn * bd) * e if cfg["RESIDENT"] else st * (bm + bn) * bd * e


KNN_SPACE = TuneSpace("knn.topk", config_grid(**_SPACE_AXES, num_warps=(8,), num_stages=(2,)),
                      heuristic=_heuristic, smem=_smem, allowed=_allowed)  # fmt: skip


def tune_key(n: int, d: int, k: int, dtype: torch.dtype, precision: str | None = None) -> dict:
    """The autotune key: N and d bucketed (next power of two), dtype, tl.dot precision, list length KP."""
    return autotune_key(n=n, d=d, dtype=dtype, precision=precision, kp=list_slots(k))


def _launch(cfg: TuneConfig, key: dict, dtype: torch.dtype, precision: str | None, interpret: bool) -> dict:
    """{"constexprs", "options"} of ``_knn_topk_kernel`` for a space config and key: the config's tiles, KP and the
    logs, the dot precision flags, UPCAST (bf16 in the interpreter)."""
    cst = dict(cfg.meta, KP=key["kp"], DOT_PRECISION=dot_precision(dtype, precision),
               UPCAST=bool(interpret) and dtype == torch.bfloat16, ROUND_TF32=round_tf32(dtype, precision))
    return {"constexprs": {a: cst[a] for a in _ARG_NAMES if a in cst}, "options": cfg.options}


def tile_space(d: int, k: int, dtype: torch.dtype, precision: str | None = None, n: int = 1 << 16,
               interpret: bool = INTERPRET) -> list[dict]:
    """Every launch the autotuner may choose from for (N, d, k, dtype, precision): KNN_SPACE's candidates for the
    key, as {"constexprs", "options"} (UPCAST as ``interpret`` needs it: the interpreted tests run each)."""
    key = tune_key(n, d, k, dtype, precision)
    return [_launch(c, key, dtype, precision, interpret) for c in KNN_SPACE.candidates(key)]


def fused_config(d: int, kp: int, dtype: torch.dtype, precision: str | None = None,
                 interpret: bool = INTERPRET, n: int = 1 << 16) -> dict:
    """The launch without benchmarking (interpreter, STRUCTURE_OPS_AUTOTUNE=0, block overrides): KNN_SPACE's
    heuristic (or STRUCTURE_OPS_AUTOTUNE_FORCE) choice for list length ``kp``."""
    key = tune_key(n, d, kp, dtype, precision)
    return _launch(KNN_SPACE.choose(key), key, dtype, precision, interpret)


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
    config: dict | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``structure_ops::knn`` in Triton: (N, k) int64 neighbour indices, best first (module docstring).

    path: "auto" (fused for fp32/bf16/fp16 and k ≤ 128, else panel), "fused" or "panel".
    ``block_*`` override the fused tile shape (powers of two ≥ 16; for tests); ``config`` runs one entry of
    ``tile_space`` (for tests; in the interpreter too).
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
    out = torch.empty((n, k), dtype=torch.int64, device=a.device)
    if config is not None or block_m is not None or block_n is not None or block_d is not None:
        _run(a, out, None, _fused_launch_config(a, k, block_m, block_n, block_d, config))
        return out
    precision = torch.get_float32_matmul_precision()
    key = tune_key(n, d, k, a.dtype, precision)

    def bench(c: TuneConfig):  # overwrites ``out`` only; returns the compiled kernel (spills are skipped)
        return _run(a, out, None, _launch(c, key, a.dtype, precision, INTERPRET))

    cfg = KNN_SPACE.choose(key, bench, a.device)
    if cfg["RESIDENT"] and d > cfg["BLOCK_D"]:  # only a forced config can be outside the key's candidates
        raise ValueError(f"knn (triton): config {cfg.name} (STRUCTURE_OPS_AUTOTUNE_FORCE?) keeps the row block on chip "
                         f"at BLOCK_D = {cfg['BLOCK_D']} < d = {d}")  # fmt: skip
    _run(a, out, None, _launch(cfg, key, a.dtype, precision, INTERPRET))
    return out


def _fused_launch_config(a, k, block_m=None, block_n=None, block_d=None, config=None) -> dict:
    """An explicit launch: ``config`` (an entry of ``tile_space``, checked against the input) or the heuristic's with
    block overrides (RESIDENT follows BLOCK_D ≥ d when block_d is given)."""
    n, d = a.shape
    kp = list_slots(k)
    if config is not None:
        cst = dict(config["constexprs"])
        upcast = INTERPRET and a.dtype == torch.bfloat16
        if cst["KP"] != kp or cst["UPCAST"] != upcast or (cst["RESIDENT"] and d > cst["BLOCK_D"]):
            raise ValueError(f"knn (triton): config {cst} does not fit k = {k}, d = {d}, dtype {a.dtype}")
        return {"constexprs": cst, "options": dict(config["options"])}
    cfg = fused_config(d, kp, a.dtype, n=n)
    cst = cfg["constexprs"]
    for name, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_D", block_d)):
        if v is None:
            continue
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name.lower()} must be a power of two ≥ 16, got {v}")
        cst[name] = int(v)
    if block_d is not None:
        cst["RESIDENT"] = int(d <= cst["BLOCK_D"])
    return cfg


def _run(a: torch.Tensor, out: torch.Tensor, stats: torch.Tensor | None, cfg: dict):
    """One launch of the fused kernel with ``cfg`` into ``out``; with ``stats`` (an int32 (programs, 2) tensor) also,
    per program (row block), the column tiles it merged (the others were skipped) and its insertion rounds."""
    n, d = a.shape
    cst = cfg["constexprs"]
    with device_guard(a.device):
        return _knn_topk_kernel[(triton.cdiv(n, cst["BLOCK_M"]),)](
            a, out, out if stats is None else stats, n, d, out.shape[1], int(stats is not None), **cst, **cfg["options"])


def tile_stats(a: torch.Tensor, k: int, config: dict | None = None) -> dict:
    """Run the fused kernel once (``config`` or the heuristic's) with statistics: {"out": the (N, k) result,
    "merged": column tiles merged per row block, "rounds": insertion rounds per row block, "tiles": column tiles
    per row block, "total": all (row block, column tile) pairs, "skipped": pairs skipped}. For tests and
    benchmarks (two int32 stores per program)."""
    k = int(k)
    _check(a, k)
    if a.dtype == torch.float64 or k > MAX_FUSED_K:
        raise NotImplementedError(f"knn (triton): statistics come from the fused kernel (fp32/bf16/fp16, k ≤ "
                                  f"{MAX_FUSED_K}), got {a.dtype}, k = {k}")  # fmt: skip
    a = a.detach().contiguous()
    cfg = _fused_launch_config(a, k, config=config)
    n = a.shape[0]
    out = torch.empty((n, k), dtype=torch.int64, device=a.device)
    st = torch.full((triton.cdiv(n, cfg["constexprs"]["BLOCK_M"]), 2), -1, dtype=torch.int32, device=a.device)
    _run(a, out, st, cfg)
    tiles = triton.cdiv(n, cfg["constexprs"]["BLOCK_N"])
    merged, rounds = st[:, 0].cpu(), st[:, 1].cpu()
    total = tiles * merged.numel()
    return {"out": out, "merged": merged, "rounds": rounds, "tiles": tiles, "total": total,
            "skipped": int(total - merged.sum().item())}


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): every configuration the autotuner or the heuristic can launch on a GPU.
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}  # fp64 takes the panel path
AOT_D = (16, 64, 128, 256, 512)  # width buckets: every resident BLOCK_D, and streamed only (d > 256)


def _entries(kind: str) -> list[tuple]:
    seen, entries = set(), []
    for dtype, ptr in _PTR.items():
        for precision in PRECISIONS:
            for d in AOT_D:
                kp = 2
                while kp <= MAX_FUSED_K:
                    key = tune_key(1 << 16, d, kp, dtype, precision)
                    cfgs = KNN_SPACE.candidates(key) if kind == "space" else [KNN_SPACE.heuristic(key)]
                    for c in cfgs:
                        launch = _launch(c, key, dtype, precision, interpret=False)
                        cst, opts = launch["constexprs"], launch["options"]
                        ident = (ptr, tuple(cst.items()), tuple(opts.items()))
                        if ident not in seen:
                            seen.add(ident)
                            sig = {name: ("constexpr" if name in cst else "i32") for name in _ARG_NAMES}
                            sig.update(a_ptr=ptr, out_ptr="*i64", stats_ptr="*i32")
                            entries.append((_knn_topk_kernel, sig, dict(cst), dict(opts)))
                    kp *= 2
    return entries


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options): the heuristic's launch for every dtype, float32 matmul precision,
    list length KP = 2 … MAX_FUSED_K and width bucket, deduplicated (``aot_space_configs`` adds the rest)."""
    return _entries("heuristic")


def aot_space_configs() -> list[tuple]:
    """Every candidate of KNN_SPACE for every variant (dtype, precision, KP, width bucket): everything the autotuner
    can launch on a GPU (the candidates do not depend on N)."""
    return _entries("space")


AOT_KERNELS = aot_configs()
