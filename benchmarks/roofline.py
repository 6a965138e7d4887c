#!/usr/bin/env python
r"""Roofline models of every structure-ops kernel: GEMM FLOPs, special-function ops, memory bytes, the bound.

For one call of a kernel (op, implementation, mode, N, dims, dtype, matmul precision) the model counts, per
phase of the kernel's pass structure (derived from the code: structure_ops/_triton/*.py, csrc/cuda/*.cu,
csrc/cpu/*.cpp; docs/roofline.md states every assumption):

    gemm_flops   multiply-add FLOPs (2 per MAC) of the GEMMs the kernel runs, including recomputation
    sfu_ops      special-function ops per call: exp, log, and reciprocal/division (one each)
    hbm_bytes    bytes between the processor and main memory (HBM / DRAM), read + write
    l2_bytes     (GPU Triton tiles) operand tile loads from L2 into shared memory
    int_ops      (GPU kNN) integer ops of the top-k selection (compare-swaps of packed int64 keys)

and the bound on a device with ceilings C (peak rate per resource):

    t_r     = Σ_phases amount_r / (C_r · parallel_phase)       (parallel < 1: a grid smaller than the device)
    bound_s = max_r t_r        (perfect overlap of the resources: a floor, never a prediction of more)

``fraction_of_bound = bound_s / measured_s`` is how close a measurement came to its own kernel's floor.
The implementation ``ideal`` is the op's floor (minimal GEMM FLOPs, one evaluation of the elementwise math,
inputs read and outputs written once): the fraction of an eager/compiled reference is measured against it.

    python benchmarks/roofline.py predict            # H200 prediction table (docs/roofline.md)
    python benchmarks/roofline.py ceilings           # measure this machine's CPU ceilings (JSON)

Used by benchmarks/_harness.py (CPU: measured ceilings, every record annotated) and by the GPU suite::

    import roofline
    ceil = roofline.ceilings_for_device(torch.cuda.get_device_name())   # docs/kernels.md §7 numbers for an H200
    roofline.annotate(rec, ceil, op=op, dims=dims, params=params, precision=torch.get_float32_matmul_precision())
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

__all__ = [
    "Ceilings", "Phase", "Cost", "H200", "GEMM_CLASSES", "cost", "bound", "annotate", "gemm_class",
    "measure_cpu_ceilings", "ceilings_for_device", "panel_rows", "prediction_rows", "prediction_table",
    "row_kernel_bytes_per_pair", "IMPLS", "DESIGNS",
]  # fmt: skip

GEMM_CLASSES = ("fp64", "fp32", "tf32", "bf16", "fp16")
IMPLS = ("ideal", "cpu", "cuda", "triton_rows", "triton_flash", "triton", "chunked")
# Designs (the same meaning for every kernel):
#   "before"  the code before issue 14, as modelled before the rewrite (the before column of docs/roofline.md);
#   "built"   the code as it stands on main (annotate's default: what a measurement is compared with);
#   "planned" the issue-14 design as first modelled, before it was built. Where the plan was built as modelled
#             (CUDA structure rows; cpu, ideal, chunked, siglip: no plan) "planned" is the "built" model.
DESIGNS = ("before", "built", "planned")
MIB = 1 << 20
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ceilings:
    """Peak rates of one device. gemm: FLOP/s per GEMM class (GEMM_CLASSES); sfu: special-function ops/s;
    mem_bw: main-memory bytes/s counting read + write; l2_bw: L2 → SM bytes/s (GPU; None: not modelled);
    int_ops: 32-bit integer ops/s (GPU; None: not modelled); sms: streaming multiprocessors (None: CPU);
    mem_bytes: memory capacity; source: where each number comes from ("measured", "datasheet", "assumed")."""

    name: str
    gemm: dict
    sfu: float
    mem_bw: float
    l2_bw: float | None = None
    int_ops: float | None = None
    sms: int | None = None
    mem_bytes: float | None = None
    source: dict = field(default_factory=dict)

    def gemm_rate(self, cls: str) -> float:
        if cls in self.gemm:
            return self.gemm[cls]
        # a CPU has no TF32/bf16 GEMM units that torch uses for fp32 inputs: fall back to the fp32 rate
        fallback = {"tf32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp64": "fp32"}[cls]
        return self.gemm[fallback] / (2.0 if cls == "fp64" else 1.0)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Ceilings:
        return Ceilings(**{k: d[k] for k in Ceilings.__dataclass_fields__ if k in d})


# docs/kernels.md §7: H200 measured on the GPU machine (bf16 GEMM 769–798 TFLOP/s on random data; device copy
# ≈ 4.3 TB/s counting read + write); datasheet tf32 495, fp32 FFMA 67, fp64 (tensor) 67 TFLOP/s; 132 SMs,
# 141 GB. exp/log ≈ 3.9 T ops/s is unverified (16 SFU ops/clk/SM × 132 SMs × ~1.8 GHz). L2 → SM 6 TB/s and
# int32 15 T ops/s are assumptions (the first is what issue 14's "~32 FLOP/B reaches ~20 % of bf16 peak"
# implies; the second 64 INT32 lanes/clk/SM × 132 × ~1.8 GHz): measure both before trusting an L2- or
# selection-bound prediction. A floor uses the best measured rate (798, not 769).
H200 = Ceilings(
    name="NVIDIA H200 (docs/kernels.md §7 ceilings)",
    gemm={"bf16": 798e12, "fp16": 798e12, "tf32": 495e12, "fp32": 67e12, "fp64": 67e12},
    sfu=3.9e12,
    mem_bw=4.3e12,
    l2_bw=6.0e12,
    int_ops=15.0e12,
    sms=132,
    mem_bytes=141e9,
    source={"bf16": "measured 769-798 TFLOP/s", "fp16": "assumed = bf16 (same tensor-core rate on the datasheet)",
            "tf32": "datasheet dense", "fp32": "datasheet FFMA", "fp64": "datasheet tensor core",
            "sfu": "unverified (SFU issue rate)", "mem_bw": "measured device copy, read + write",
            "l2_bw": "assumed", "int_ops": "assumed", "mem_bytes": "datasheet"},
)  # fmt: skip


def ceilings_for_device(name: str) -> Ceilings | None:
    """The stored ceilings of a GPU by its torch.cuda.get_device_name() (None: no numbers for it yet)."""
    return H200 if "H200" in (name or "") else None


def gemm_class(compute: str, precision: str = "high") -> str:
    """The GEMM rate class of a GEMM whose operands are in ``compute`` ("float32", "bfloat16", ...):
    half operands run on tensor cores; fp32 operands follow torch.get_float32_matmul_precision()."""
    c = _short(compute)
    if c in ("bf16", "fp16", "fp64"):
        return c
    return {"highest": "fp32", "high": "tf32", "medium": "bf16"}[precision]


def _short(dtype: str) -> str:
    return {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _esize(dtype: str) -> int:
    return {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}[_short(dtype)]


# ---------------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    gemm_flops: float = 0.0
    gemm_class: str = "fp32"
    sfu_ops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    int_ops: float = 0.0
    parallel: float = 1.0  # share of the device this phase's grid can occupy (≤ 1)


@dataclass
class Cost:
    op: str
    impl: str
    design: str
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # panel rows, tiles, memory, ...

    def total(self, what: str) -> float:
        return float(sum(getattr(p, what) for p in self.phases))

    @property
    def gemm_flops(self) -> float:
        return self.total("gemm_flops")

    @property
    def sfu_ops(self) -> float:
        return self.total("sfu_ops")

    @property
    def hbm_bytes(self) -> float:
        return self.total("hbm_bytes")

    @property
    def l2_bytes(self) -> float:
        return self.total("l2_bytes")

    @property
    def int_ops(self) -> float:
        return self.total("int_ops")


def bound(c: Cost, ceil: Ceilings) -> dict:
    """{bound_s, bound_by, terms_s}: per resource the summed phase times, the bound is their maximum."""
    terms = {"gemm": 0.0, "sfu": 0.0, "mem": 0.0}
    if ceil.l2_bw:
        terms["l2"] = 0.0
    if ceil.int_ops:
        terms["int"] = 0.0
    for p in c.phases:
        par = max(min(p.parallel, 1.0), 1e-9)
        terms["gemm"] += p.gemm_flops / ceil.gemm_rate(p.gemm_class) / par
        terms["sfu"] += p.sfu_ops / ceil.sfu / par
        terms["mem"] += p.hbm_bytes / ceil.mem_bw / par
        if "l2" in terms:
            terms["l2"] += p.l2_bytes / ceil.l2_bw / par
        if "int" in terms:
            terms["int"] += p.int_ops / ceil.int_ops / par
    by = max(terms, key=terms.get)
    return {"bound_s": terms[by], "bound_by": by, "terms_s": terms}


# ---------------------------------------------------------------------------------------------------
# Panel sizes (csrc/common/panel.h, structure_ops/_triton/_common.py)
# ---------------------------------------------------------------------------------------------------
def panel_rows(n: int, bytes_per_row: int, budget_mb: float, min_rows: int = 1, multiple: int = 1) -> int:
    """panel_rows_budget of csrc/common/panel.h: max(min_rows, budget // bytes_per_row), rounded down to a
    multiple of ``multiple`` when ≥ 4·multiple, at most n. (multiple = 1, min_rows = 1: the Triton rule.)"""
    rows = max(min_rows, int(budget_mb * MIB) // max(1, bytes_per_row))
    if multiple > 1 and rows >= 4 * multiple:
        rows -= rows % multiple
    return max(1, min(rows, n))


# The panel rule of each implementation as it stands: (budget MiB, min rows, multiple).
PANEL_RULES = {
    "cpu": (32.0, 512, 16),            # csrc/common/panel.h panel_rows
    "cuda": (256.0, 256, 16),          # csrc/cuda/structure_cuda.cu cuda_panel_rows
    "cuda_clip": (256.0, 1, 64),       # csrc/cuda/clip_cuda.cu before issue 14
    "cuda_knn": (256.0, 1, 16),        # csrc/cuda/knn_cuda.cu before issue 14
    "triton_rows": (256.0, 1, 1),      # structure_ops/_triton/_common.py panel_rows before issue 14
}  # fmt: skip
DESIGN_PANEL_MB = 2048.0  # issue 14 design: panels from free memory, capped so level 1 stays ≤ 2 GiB extra
# As built: CUDA level 1 (structure_cuda.cu panel_rows_from_memory) and Triton rows (_common.panel_rows) take half
# of the free device memory capped at 2048 MiB (STRUCTURE_OPS_CUDA_PANEL_MB / STRUCTURE_OPS_TRITON_PANEL_MB); on an
# H200 the cap binds. CUDA: ≥ 256 rows, multiples of 16; Triton: no floor, no multiple. CUDA clip and knn use the
# same rule as CUDA level 1 (csrc/cuda/common.cuh panel_rows_from_memory, one knob for all of them), and so does
# CUDA siglip (not modelled here: siglip has a CPU model only).


def _n_panels(n: int, rows: int) -> int:
    return -(-n // rows)


def _waves(n_programs: int, sms: int, per_sm: int = 1) -> int:
    return max(1, -(-n_programs // (sms * per_sm)))


def _par(n_programs: int, sms: int | None) -> float:
    return 1.0 if not sms else min(1.0, n_programs / sms)


# ---------------------------------------------------------------------------------------------------
# The CUDA / Triton / CPU level-1 row kernels: bytes and special-function ops per (i, j) pair
# ---------------------------------------------------------------------------------------------------
def row_kernel_bytes_per_pair(impl: str, design: str, grad_x: bool, grad_z: bool, ec: int = 4, ew: int = 4) -> int:
    """Main-memory bytes per (i, j) pair of the fused level-1 row kernel alone (Gram rows in, W out), from its
    loads and stores; ec: compute element size (Gram, P, Q), ew: the W element size.

    cpu (any design; fused_row): each row in cache, read once, P, Q in place and W written once: 4 + sides elements
        (fp32: 16, 20, 24 B).
    cuda before (l1_rows_kernel before issue 14): pass 1 reads both Gram rows; pass 2 reads them again and writes,
        per side with a gradient, Q∘g into W and Q over the Gram row; pass 3 reads both and writes W:
        4 + 5·sides elements (fp32: 16 B forward, 36 B grad_z, 56 B grad_x and grad_z).
    cuda built = planned (csrc/cuda/structure_cuda.cu l1_rows_kernel, and l1_lse/terms/grad_kernel on the 2-D grid
        of panels shorter than the SM count, whose partials add O(rows · column blocks), not per pair): pass 3
        recomputes P, Q and the terms from the Gram rows instead of storing Q and Q∘g: 3 reads of both Gram rows +
        W once per side: 6 elements + sides·ew (fp32 W: 16 / 28 / 32 B; bf16/fp16 W: 16 / 26 / 28 B).
    triton_rows before (_l1_rows_kernel): pass 2 writes only Q∘g; pass 3 re-reads the Gram row (Q is recomputed)
        and Q∘g and writes W: 4 + 4·sides elements (fp32: 16, 32, 48 B).
    triton_rows built (structure_ops/_triton/structure.py): lse from the Gram GEMM's epilogue (no online-lse pass),
        the loss pass reads both logits rows, the gradient pass reads them again and writes W once per side:
        4·ec + sides·ew, 2·ec without a gradient (fp32 W: 8 / 20 / 24 B; half W: 8 / 18 / 20 B; with the Gram write
        and the gradient GEMMs' W reads 16 / 36 / 48 B and 16 / 30 / 36 B).
    triton_rows planned: the CUDA design (6 elements + sides·ew).
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    sides = int(grad_x) + int(grad_z)
    if impl == "cpu":
        return (4 + sides) * ec
    if impl not in ("cuda", "triton_rows"):
        raise ValueError(f"no row kernel for impl {impl!r}")
    if impl == "triton_rows" and design == "built":
        return 2 * ec if sides == 0 else 4 * ec + sides * ew
    if sides == 0:
        return 4 * ec
    if design != "before":
        return 6 * ec + sides * ew
    return (4 + 5 * sides) * ec if impl == "cuda" else (4 + 4 * sides) * ec


def _row_kernel_sfu(impl: str, design: str, grad_x: bool, grad_z: bool) -> int:
    """exp/log/reciprocal per pair (cosine, "structure" divergence). Terms of one evaluation: P and Q (2 exp),
    1/P̃, 1/Q̃ (2), log1p (1 on CUDA/CPU; 2 in Triton: log(u)·x/(u − 1)). Log-sum-exp: 1 exp per side (online
    pass, or the Gram epilogue of the built Triton rows)."""
    sides = int(grad_x) + int(grad_z)
    log1p = 2 if impl.startswith("triton") else 1
    terms = 4 + log1p
    if impl == "cpu":
        return 2 + 2 + 1  # exp once per side (stored), then 2 divisions and log1p on probabilities
    if design != "before":
        return 2 + terms + (terms if sides else 0)  # the gradient pass recomputes the terms
    if impl == "cuda":
        return 2 + terms  # pass 3 reads what pass 2 stored
    return 2 + terms + sides  # triton: pass 3 recomputes exp per gradient side


# ---------------------------------------------------------------------------------------------------
# structure_loss
# ---------------------------------------------------------------------------------------------------
def _structure_level1_rows(n, dx, dz, dtype, precision, impl, design, grad_x, grad_z, ceil_sms, panel_mb):
    half = _short(dtype) in ("bf16", "fp16")
    fp64 = _short(dtype) == "fp64"
    ec = 8 if fp64 else 4
    eo_in = _esize(dtype)
    new = design != "before" and impl != "cpu"
    if new:
        eo = eo_in  # half operands stay half (tensor cores), fp32 Gram
        ew = eo_in if half else ec  # W in the operand dtype for the gradient GEMMs
        cls = gemm_class(dtype, precision)
        if impl == "triton_rows" and design == "built":  # _common.panel_rows: no floor, no multiple
            budget, min_rows, mult = (panel_mb or DESIGN_PANEL_MB), 1, 1
        else:
            budget, min_rows, mult = (panel_mb or DESIGN_PANEL_MB), 256, 16
    else:
        eo = ec  # half inputs are upcast once to fp32 (all three backends before issue 14)
        ew = ec
        cls = "fp64" if fp64 else ("fp32" if impl == "cpu" else gemm_class("float32", precision))
        budget, min_rows, mult = PANEL_RULES["cpu" if impl == "cpu" else impl]
        if panel_mb:
            budget = panel_mb
    nbuf = 2 + int(grad_x) + int(grad_z)
    # panel buffers per row: two Gram rows (e_c) and a W row per side with a gradient; the built CUDA code
    # (csrc/cuda/structure_cuda.cu panel_rows_from_memory) keeps W in the operand dtype (e_w), and so does the built
    # Triton rows pass (structure.py _panel_bytes_per_row), plus its (max, Σexp) / partial-sum rows (8·e_c per 16 columns)
    row_bytes = n * (2 * ec + (nbuf - 2) * (ew if (new and design == "built") else ec))
    if impl == "triton_rows" and design == "built":
        row_bytes += 8 * ec * -(-n // 16)
    rows = panel_rows(n, row_bytes, budget, min_rows, mult)
    npan = _n_panels(n, rows)
    phases = []
    if eo != eo_in or (half and impl == "cpu"):
        phases.append(Phase("upcast inputs to fp32", hbm_bytes=n * (dx + dz) * (eo_in + 4)))
    # Gram panels S^X_I = X̂_I X̂ᵀ, S^Z_I = Ẑ_I Ẑᵀ: every panel rereads both operands, writes b × N per side
    phases.append(Phase("Gram panels (GEMM)", gemm_flops=2.0 * n * n * (dx + dz), gemm_class=cls,
                        hbm_bytes=npan * n * (dx + dz) * eo + n * (dx + dz) * eo + 2.0 * n * n * ec))  # fmt: skip
    # the fused row kernel
    if impl == "cpu":
        programs = rows
    elif impl == "cuda":
        programs = rows  # one block per row
    else:  # triton rows: BLOCK_M rows per program, halved until ≥ 1024 programs (one row per program below that)
        block_m = 8
        while block_m > 1 and -(-rows // block_m) < 1024:
            block_m //= 2
        programs = -(-rows // block_m) if design == "before" else rows
    par = 1.0 if impl == "cpu" else _par(programs, ceil_sms)
    if new and programs < (ceil_sms or 0):
        par = 1.0  # issue 14 item 2: a 2-D grid (rows × column blocks) when a panel has fewer rows than SMs
    bpp = row_kernel_bytes_per_pair(impl, design, grad_x, grad_z, ec, ew)
    phases.append(Phase("fused row kernel", sfu_ops=float(n) * n * _row_kernel_sfu(impl, design, grad_x, grad_z),
                        hbm_bytes=float(n) * n * bpp, parallel=par))  # fmt: skip
    for want, d in ((grad_z, dz), (grad_x, dx)):
        if not want:
            continue
        # dÛ_I += α W_I Û (reads W_I, Û, r/w the panel's rows of dÛ); dÛ += α W_Iᵀ Û_I (reads W_I again, r/w dÛ)
        phases.append(Phase("gradient GEMMs W_I Û, W_Iᵀ Û_I", gemm_flops=4.0 * n * n * d, gemm_class=cls,
                            hbm_bytes=2.0 * n * n * ew + npan * (n * d * eo + 2.0 * n * d * ec)
                            + n * d * eo + 2.0 * n * d * ec))  # fmt: skip
        if half:
            phases.append(Phase("gradient cast to the input dtype", hbm_bytes=n * d * (ec + eo_in)))
    info = {"panel_rows": rows, "panels": npan, "row_kernel_bytes_per_pair": bpp,
            "row_kernel_programs": programs, "gemm_class": cls,
            "extra_memory_bytes": rows * row_bytes}  # fmt: skip
    notes = []
    if impl == "triton_rows" and design == "before" and par < 1:
        notes.append(f"row kernel grid of {programs} programs on {ceil_sms} SMs")
    return phases, info, notes


def _structure_level1_flash_before_or_planned(n, dx, dz, dtype, precision, design, grad_x, grad_z, sms):
    """The flash model as written before issue 14 was built: "before" 64 × 64 tiles (_default_blocks on a GPU), every
    tile rereads the row chunk from L2; "planned" 128 × 128 tiles, the row operand on chip when BM·d·e_o ≤ 160 KB."""
    eo = _esize(dtype)
    cls = gemm_class(dtype, precision)
    bm = bn = 128 if design == "planned" else 64
    dgrad = max(dz if grad_z else 1, dx if grad_x else 1)
    bd = min(128, max(16, 1 << max(0, (dgrad - 1).bit_length())))
    n_c = -(-dgrad // bd) if (grad_x or grad_z) else 0

    def l2_gemm(d: int) -> float:  # tile loads of one S = Û_I Û_Jᵀ over all tiles
        keep = design == "planned" and bm * d * eo <= 160 * 1024
        return float(n) * n * d * eo * ((0.0 if keep else 1.0 / bn) + 1.0 / bm)

    blocks = -(-n // bm)
    waves = _waves(blocks, sms or 1)
    phases = [
        Phase("A: lse per side", gemm_flops=2.0 * n * n * (dx + dz), gemm_class=cls, sfu_ops=2.0 * n * n,
              hbm_bytes=waves * n * (dx + dz) * eo, l2_bytes=l2_gemm(dx) + l2_gemm(dz)),
        Phase("B: loss, ḡ", gemm_flops=2.0 * n * n * (dx + dz), gemm_class=cls, sfu_ops=6.0 * n * n,
              hbm_bytes=waves * n * (dx + dz) * eo, l2_bytes=l2_gemm(dx) + l2_gemm(dz)),
    ]  # fmt: skip
    if n_c:
        dsum = (dz if grad_z else 0) + (dx if grad_x else 0)
        phases.append(Phase(
            f"C: gradient, S recomputed per BLOCK_D={bd} chunk (×{n_c})",
            gemm_flops=n_c * 2.0 * n * n * (dx + dz) + 2.0 * n * n * dsum, gemm_class=cls,
            sfu_ops=12.0 * n_c * n * n,
            hbm_bytes=_waves(blocks * n_c, sms or 1) * n * (dx + dz + dsum) * eo + n * dsum * eo,
            l2_bytes=n_c * (l2_gemm(dx) + l2_gemm(dz)) + float(n) * n * dsum * eo / bm,
            parallel=_par(blocks * n_c, sms),
        ))  # fmt: skip
    info = {"tiles": (bm, bn), "block_d": bd, "n_c": n_c, "gemm_class": cls, "extra_memory_bytes": 7 * n * 4}
    return phases, info, []


def _structure_level1_flash(n, dx, dz, dtype, precision, design, grad_x, grad_z, sms):
    """Triton pass (b) (structure_flash.py): A per side lse, B loss + ḡ, C gradient per BLOCK_D chunk.

    "built" (below): each pass's tile is the heuristic
    choice of its register-pruned autotune space (lse 128 × 128, 128 × 64 for chunked half / IEEE operands; loss
    and gradient 64 × 64, 64 × 32 for chunked half operands: their ~6 live fp32 tiles allow ≤ 16 elements per
    thread), and the row operand stays on chip (loaded once per program) when max(d_x, d_z) ≤ RESIDENT_K (128
    for bf16/fp16, 64 for fp32/tf32: structure_flash.operand_mode); otherwise every tile re-reads the row chunk
    from L2. GEMM FLOPs count d, not the zero-padded width of the resident operand."""
    if design != "built":
        return _structure_level1_flash_before_or_planned(n, dx, dz, dtype, precision, design, grad_x, grad_z, sms)
    eo = _esize(dtype)
    cls = gemm_class(dtype, precision)
    resident = max(dx, dz) <= (128 if eo == 2 else 64)
    wide = resident or cls == "tf32"
    tiles = {"lse": (128, 128 if wide else 64), "loss": (64, 32 if eo == 2 and not resident else 64),
             "grad": (64, 32 if eo == 2 and not resident else 64)}  # fmt: skip
    dgrad = max(dz if grad_z else 1, dx if grad_x else 1)
    bd = 64 if dgrad <= 64 else 128
    n_c = -(-dgrad // bd) if (grad_x or grad_z) else 0

    def l2_gemm(d: int, p: str) -> float:  # operand tile loads from L2 of one S = Û_I Û_Jᵀ over all tiles
        bm, bn = tiles[p]
        if resident:  # row block once per program, column tiles per tile
            return float(n) * n * d * eo / bm + n * d * eo
        return float(n) * n * d * eo * (1.0 / bn + 1.0 / bm)

    def waves(p: str, chunks: int = 1) -> int:
        return _waves(-(-n // tiles[p][0]) * chunks, sms or 1)

    # HBM: co-resident programs stream the same column tiles (shared through L2): one stream per wave
    phases = [
        Phase("A: lse per side", gemm_flops=2.0 * n * n * (dx + dz), gemm_class=cls, sfu_ops=2.0 * n * n,
              hbm_bytes=waves("lse") * n * (dx + dz) * eo, l2_bytes=l2_gemm(dx, "lse") + l2_gemm(dz, "lse")),
        Phase("B: loss, ḡ", gemm_flops=2.0 * n * n * (dx + dz), gemm_class=cls, sfu_ops=6.0 * n * n,
              hbm_bytes=waves("loss") * n * (dx + dz) * eo, l2_bytes=l2_gemm(dx, "loss") + l2_gemm(dz, "loss")),
    ]  # fmt: skip
    if n_c:
        dsum = (dz if grad_z else 0) + (dx if grad_x else 0)
        blocks = -(-n // tiles["grad"][0])
        phases.append(Phase(
            f"C: gradient, S recomputed per BLOCK_D={bd} chunk (×{n_c})",
            gemm_flops=n_c * 2.0 * n * n * (dx + dz) + 2.0 * n * n * dsum, gemm_class=cls,
            sfu_ops=12.0 * n_c * n * n,
            hbm_bytes=waves("grad", n_c) * n * (dx + dz + dsum) * eo + n * dsum * eo,
            l2_bytes=n_c * (l2_gemm(dx, "grad") + l2_gemm(dz, "grad")) + float(n) * n * dsum * eo / tiles["grad"][0],
            parallel=_par(blocks * n_c, sms),
        ))  # fmt: skip
    info = {"tiles": tiles, "row_operand_on_chip": resident, "block_d": bd, "n_c": n_c, "gemm_class": cls,
            "extra_memory_bytes": 7 * n * 4}  # fmt: skip
    return phases, info, []


def _structure_levels(n, dx, dz, levels, dtype, precision, impl, design, grad_x, grad_z):
    """Levels > 1 (materialized P, Q; powers by GEMMs; fused divergence epilogues; adjoint products)."""
    fp64 = _short(dtype) == "fp64"
    ec = 8 if fp64 else 4
    half = _short(dtype) in ("bf16", "fp16")
    if impl == "cpu":
        cls_in = cls = "fp64" if fp64 else "fp32"
    else:
        cls = gemm_class("float64" if fp64 else "float32", precision)  # P, Q products: fp32 policy
        # as built (CUDA and Triton) levels > 1 upcast half inputs once; the plan ran the Gram GEMMs on tensor cores
        cls_in = gemm_class(dtype, precision) if (design == "planned" and half) else cls
    nn = float(n) * n
    L = levels
    sides_g = int(grad_x) + int(grad_z)
    phases = [
        Phase("Gram matrices", gemm_flops=2.0 * nn * (dx + dz), gemm_class=cls_in,
              hbm_bytes=n * (dx + dz) * ec + 2 * nn * ec),
        # level-1 row kernel writing P, Q (and W_1 per gradient side)
        Phase("level-1 row kernel (P, Q, W_1)", sfu_ops=nn * 7, hbm_bytes=nn * ec * (6 + 3 * sides_g)),
        Phase(f"powers 2..{L} (2 GEMMs per level)", gemm_flops=4.0 * (L - 1) * n**3, gemm_class=cls,
              hbm_bytes=(L - 1) * 6 * nn * ec),
        Phase("divergence epilogues", sfu_ops=(L - 1) * nn * 4, hbm_bytes=(L - 1) * nn * ec * (2 + sides_g)),
    ]  # fmt: skip
    for want, d in ((grad_z, dz), (grad_x, dx)):
        if want:
            phases += [
                Phase("adjoint products (2 per level)", gemm_flops=4.0 * (L - 1) * n**3, gemm_class=cls,
                      hbm_bytes=(L - 1) * 10 * nn * ec),
                Phase("softmax Jacobian kernel", hbm_bytes=6 * nn * ec),
                Phase("chain GEMMs (W + Wᵀ) Û", gemm_flops=4.0 * nn * d, gemm_class=cls_in, hbm_bytes=2 * nn * ec),
            ]  # fmt: skip
    per_x = 2 * L if grad_x else 2
    per_z = 2 * L if grad_z else 2
    mem = (2 + per_x + per_z + 1) * nn * ec  # multilevel_memory_estimate / multilevel_bytes
    return phases, {"extra_memory_bytes": mem, "gemm_class": cls}, []


def _structure(n, dims, mode, dtype, precision, impl, design, params, sms, panel_mb, grad_x):
    dx, dz = int(dims["d_x"]), int(dims["d_z"])
    levels = int(params.get("levels", 1))
    grad_z = mode != "fwd"
    grad_x = bool(grad_x) and grad_z
    notes = []
    if params.get("similarity", "cosine") != "cosine" or params.get("divergence", "structure") != "structure":
        notes.append("model counts the cosine similarity and the 'structure' divergence")
    if impl == "ideal":
        eo = _esize(dtype)
        cls = gemm_class(dtype, precision)
        flops = 2.0 * n * n * (dx + dz) + (4.0 * n * n * dz if grad_z else 0.0)
        flops += (4.0 if not grad_z else 8.0) * (levels - 1) * float(n) ** 3
        io = n * (dx + dz) * eo + (n * dz * eo if grad_z else 0)
        phases = [Phase("minimal work", gemm_flops=flops, gemm_class=cls, sfu_ops=7.0 * n * n * levels, hbm_bytes=io)]
        return phases, {"gemm_class": cls}, notes
    if impl == "chunked":  # gpu_suite.chunked_structure_loss: row chunks under activation checkpointing
        eo = _esize(dtype)
        cls = gemm_class(dtype, precision)
        flops = 2.0 * n * n * (dx + dz) * (2 if grad_z else 1) + (4.0 * n * n * dz if grad_z else 0.0)
        # autograd keeps chunk × N intermediates; ~10 chunk × N fp32 tensors written and read per pass
        hbm = 10.0 * n * n * 4 * (3 if grad_z else 1)
        return [Phase("chunked torch ops", gemm_flops=flops, gemm_class=cls, sfu_ops=6.0 * n * n * (3 if grad_z else 1),
                      hbm_bytes=hbm + n * (dx + dz) * eo)], {"gemm_class": cls}, notes  # fmt: skip
    if levels > 1:
        ph, info, nt = _structure_levels(n, dx, dz, levels, dtype, precision, impl, design, grad_x, grad_z)
        return ph, info, notes + nt
    if impl == "triton_flash":
        ph, info, nt = _structure_level1_flash(n, dx, dz, dtype, precision, design, grad_x, grad_z, sms)
        return ph, info, notes + nt
    if impl in ("cpu", "cuda", "triton_rows"):
        ph, info, nt = _structure_level1_rows(n, dx, dz, dtype, precision, impl, design, grad_x, grad_z, sms, panel_mb)
        return ph, info, notes + nt
    raise ValueError(f"no structure model for impl {impl!r}")


# ---------------------------------------------------------------------------------------------------
# clip_loss
# ---------------------------------------------------------------------------------------------------
def _clip(n, dims, mode, dtype, precision, impl, design, sms, panel_mb):
    d = int(dims["d"])
    bwd = mode != "fwd"
    nn = float(n) * n
    eo_in = _esize(dtype)
    half = _short(dtype) in ("bf16", "fp16")
    if impl == "ideal":  # logits once (materialized), dA, dB: 2N²d + 4N²d
        cls = gemm_class(dtype, precision)
        return (
            [
                Phase(
                    "minimal work",
                    gemm_flops=(6.0 if bwd else 2.0) * nn * d,
                    gemm_class=cls,
                    sfu_ops=2.0 * nn,
                    hbm_bytes=2 * n * d * eo_in * (2 if bwd else 1),
                )
            ],
            {"gemm_class": cls},
            [],
        )
    if impl == "cpu":
        ec = 8 if _short(dtype) == "fp64" else 4
        cls = "fp64" if ec == 8 else "fp32"
        rows = panel_rows(n, n * ec, *PANEL_RULES["cpu"])
        npan = _n_panels(n, rows)
        # forward: GEMM writes the panel; row pass scales in place (r + w), the exp pass stays in cache;
        # the column pass walks the panel twice (max, then Σexp)
        phases = [Phase("forward panels", gemm_flops=2.0 * nn * d, gemm_class=cls, sfu_ops=2.0 * nn,
                        hbm_bytes=npan * n * d * ec + nn * ec * (1 + 2 + 2))]  # fmt: skip
        if bwd:
            # backward: panel recomputed (write), row loop r + w, dA_I = W_I B and dB += W_Iᵀ A_I read it twice;
            # per panel B is read twice and dB read + written
            phases.append(Phase("backward panels", gemm_flops=6.0 * nn * d, gemm_class=cls, sfu_ops=2.0 * nn,
                                hbm_bytes=nn * ec * (1 + 2 + 2) + npan * n * d * ec * 4))  # fmt: skip
        return phases, {"panel_rows": rows, "panels": npan, "gemm_class": cls}, []
    cls = gemm_class(dtype, precision)
    ec = 8 if _short(dtype) == "fp64" else 4
    if impl == "cuda":
        if design == "planned":  # as planned: the 2 GiB panels and no half tmp_b buffer
            budget, min_rows, mult = (panel_mb or DESIGN_PANEL_MB), 256, 64
        elif design == "built":  # clip_cuda.cu: common.cuh panel_rows_from_memory (2 GiB cap binds); tmp_b kept
            budget, min_rows, mult = (panel_mb or DESIGN_PANEL_MB), 256, 16
        else:
            budget, min_rows, mult = PANEL_RULES["cuda_clip"]
        tr = 64 if ec == 4 else 32
        rows_f = panel_rows(n, ec * (n + -(-2 * n // tr) + 2 * -(-n // 256)), budget, min_rows, mult)
        rows_b = panel_rows(n, ec * n + (eo_in * n if half else 0), budget, min_rows, mult)
        pf, pb = _n_panels(n, rows_f), _n_panels(n, rows_b)
        phases = [Phase("forward: panel GEMM + one tile pass", gemm_flops=2.0 * nn * d, gemm_class=cls,
                        sfu_ops=2.0 * nn, hbm_bytes=pf * n * d * eo_in + nn * ec * 2)]  # fmt: skip
        if bwd:
            ew = eo_in if half else ec
            # rows kernel: reads the recomputed panel, writes W (fp32 in place, or E in the half dtype)
            pair = ec + ec + (ew if half else ec) + 2 * ew
            if half and design != "planned":
                per_panel = n * d * eo_in * 2 + n * d * 4 * 4  # B twice; tmp_b written + read, dB read + written
            else:
                per_panel = n * d * eo_in * 2 + n * d * 4 * 2  # B twice; dB += (beta = 1) read + written
            phases.append(Phase("backward: panel GEMM, rows kernel, dA/dB GEMMs", gemm_flops=6.0 * nn * d,
                                gemm_class=cls, sfu_ops=2.0 * nn, hbm_bytes=nn * pair + pb * per_panel))  # fmt: skip
        return phases, {"panel_rows": (rows_f, rows_b), "panels": (pf, pb), "gemm_class": cls}, []
    if impl != "triton":
        raise ValueError(f"no clip model for impl {impl!r}")
    # Triton clip.py
    if design == "before":  # the pre-issue-14 kernel: 64 × 64 (fp32) / 128 × 64 tiles, (N/BM) × N column partials,
        # the backward in C output chunks of ≤ 256 columns, each recomputing its tiles ((4C + 4) N²d), no tile on chip
        if _short(dtype) == "fp64":
            bm, bn = 64, 32
        elif _short(dtype) == "fp32":
            bm, bn = 64, 64
        else:
            bm, bn = 128, 64
        cap = 128 if _short(dtype) == "fp64" else 256
        c = -(-d // min(cap, 1 << max(0, (d - 1).bit_length())))
        l2_s = nn * d * eo_in * (1.0 / bm + 1.0 / bn)
        rb = -(-n // bm)
        acc = 8 if _short(dtype) == "fp64" else 4
        phases = [Phase("forward tiles + column partials", gemm_flops=2.0 * nn * d, gemm_class=cls, sfu_ops=2.0 * nn,
                        hbm_bytes=_waves(rb, sms or 1) * n * d * eo_in + 2 * 2 * rb * n * acc, l2_bytes=l2_s)]  # fmt: skip
        if bwd:
            bbm, bbn = (32, 32) if _short(dtype) == "fp64" else (64, 32)  # _bwd_blocks on a GPU
            brb = -(-n // bbm)
            l2_b = nn * d * eo_in * (1.0 / bbm + 1.0 / bbn)
            phases.append(Phase(f"backward: 2 roles × {c} output chunks, each recomputes its tiles",
                                gemm_flops=(4.0 * c + 4.0) * nn * d, gemm_class=cls, sfu_ops=4.0 * c * nn,
                                hbm_bytes=_waves(2 * c * brb, sms or 1) * n * d * eo_in * 2 + 2 * n * d * eo_in,
                                l2_bytes=2 * c * l2_b + 2 * nn * d * eo_in / bbm,
                                parallel=_par(2 * c * brb, sms)))  # fmt: skip
        return phases, {"tiles": (bm, bn), "out_chunks": c, "gemm_class": cls,
                        "extra_memory_bytes": 2 * rb * n * acc}, []  # fmt: skip
    if design == "planned":  # the design as first modelled (128 × 128, one recompute, dA and dB from one tile)
        bm = bn = 128
        keep = bm * d * eo_in <= 160 * 1024
        l2_s = nn * d * eo_in * ((0.0 if keep else 1.0 / bn) + 1.0 / bm)
        waves = _waves(-(-n // bm), sms or 1)
        phases = [Phase("forward (O(N) column state)", gemm_flops=2.0 * nn * d, gemm_class=cls, sfu_ops=2.0 * nn,
                        hbm_bytes=waves * n * d * eo_in, l2_bytes=l2_s)]  # fmt: skip
        if bwd:
            phases.append(Phase("backward: one recompute, dA and dB from the same tile (8N²d in all)",
                                gemm_flops=6.0 * nn * d, gemm_class=cls, sfu_ops=2.0 * nn,
                                hbm_bytes=waves * n * d * eo_in * 2 + 2 * n * d * 4, l2_bytes=2 * l2_s))  # fmt: skip
        return phases, {"tiles": (bm, bn), "gemm_class": cls}, []
    # "built": the kernel as it stands. Forward: grid RG × CP (row groups
    # × column panels, ≈ 2 programs per SM, each ≤ 32), A_I on chip when BM·d_pad fits 32 KiB (16 KiB for 4-byte
    # IEEE / 8-byte operands), O(N) statistics. Backward: 2 roles (dA rows, dB rows), each recomputes its tiles;
    # one output chunk when the BM × d fp32 accumulator compiles without spills (bf16/fp16 up to d = 512, tf32, IEEE
    # fp32 and fp64 up to 256): 8 N²d, else (4C + 4) N²d. Tiles: the first entries of clip.fwd_space / bwd_space.
    tc = cls in ("tf32", "bf16", "fp16")
    acc = 8 if _short(dtype) == "fp64" else 4
    dp = max(16, 1 << max(0, (d - 1).bit_length()))
    chip_bytes = 32 * 1024 if (half or cls == "tf32") else 16 * 1024
    if _short(dtype) == "fp64":
        bm, bn = 64, 32
    elif half and 128 * max(dp, 64) * eo_in <= chip_bytes:
        bm, bn = 128, 128  # fp32 operands spill at 128 × 128 (tf32 and IEEE: 128 × 64, K-loop)
    else:
        bm, bn = 128, 64
    keep = half and bm * max(dp, 64) * eo_in <= chip_bytes
    rb, cb = -(-n // bm), -(-n // bn)
    rg = min(rb, 32)
    cp = max(1, min(cb, 32, -(-2 * (sms or 1) // rg)))
    stats = 2 * (rg + cp) * n * acc + n * acc  # (m, l) partials of the row groups and column panels, diag
    l2_s = nn * d * eo_in * ((0.0 if keep else 1.0 / bn) + 1.0 / bm)
    phases = [Phase("forward: tiles, row lse online, column partials per row group (O(N))", gemm_flops=2.0 * nn * d,
                    gemm_class=cls, sfu_ops=2.0 * nn, hbm_bytes=_waves(rg * cp, sms or 1) * n * d * eo_in + 4 * rb * n * acc,
                    l2_bytes=l2_s, parallel=_par(rg * cp, sms))]  # fmt: skip
    if bwd:
        cap = 512 if half else 256  # the widest spill-free output chunk (bf16/fp16 at BN = 16; fp32 operands: 256)
        c = -(-d // min(cap, dp))
        bbm = 64
        bbn = 64 if tc and dp <= 128 else 16 if half and dp >= 512 else 32
        one_tile = c == 1 and bbm * dp * eo_in <= chip_bytes
        brb = -(-n // bbm)
        # per role and chunk: Y_J tiles once per row block (twice without the shared tile), X_I per tile unless on chip
        l2_b = nn * d * eo_in * ((1.0 if one_tile else 2.0) / bbm + (0.0 if one_tile else 1.0 / bbn))
        phases.append(Phase(f"backward: 2 roles × {c} output chunk(s), each recomputes its tiles",
                            gemm_flops=(4.0 * c + 4.0) * nn * d, gemm_class=cls, sfu_ops=4.0 * c * nn,
                            hbm_bytes=_waves(2 * c * brb, sms or 1) * n * d * eo_in * 2 + 2 * n * d * eo_in,
                            l2_bytes=2 * c * l2_b, parallel=_par(2 * c * brb, sms)))  # fmt: skip
    else:
        c = 0
    return phases, {"tiles": (bm, bn), "groups": (rg, cp), "out_chunks": c, "gemm_class": cls,
                    "extra_memory_bytes": stats}, []  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# knn / mutual_knn
# ---------------------------------------------------------------------------------------------------
def resolve_k(k, n: int) -> int:
    """structure_ops._options.resolve_k (SPEC rules "rice", "sqrt", "sturges"; the same slack for exact cubes)."""
    if isinstance(k, str):
        raw = {"rice": 2.0 * n ** (1.0 / 3.0), "sqrt": math.sqrt(n), "sturges": math.log2(n) + 1.0}[k]
        k = math.ceil(raw - 1e-9)
    return int(min(max(1, k), n - 1))


def _bitonic_cs(bn: int, kp: int) -> float:
    """Compare-swaps per row and tile of a bitonic tile selection (the issue-14 design as first modelled, and the
    Triton kNN kernel before tile skipping): the tile's top-KP (full bitonic sort of BN keys) and the merge of two
    sorted KP lists (KP + (KP/2)·log₂KP)."""
    lg = int(math.log2(bn))
    return (bn / 2) * lg * (lg + 1) / 2 + kp + (kp / 2) * math.log2(kp)


INT_OPS_PER_CS = 8  # int32 ops per compare-swap of two packed int64 keys (compare + 2 selects, 2 halves each)
KNN_SCAN_INT_OPS = 10  # int32 ops per similarity in the Triton kNN tile scan (order bits, masks, compare, count)


def _knn_tiles(n: int, d: int, kp: int, dtype: str) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, resident) the Triton kNN kernel's heuristic picks (structure_ops/_triton/knn.py _heuristic
    over KNN_SPACE's candidates): 128-row blocks from N ≥ 128·132 when the list fits (KP ≤ 32), 32 rows at KP = 128,
    128 × 128 only for half inputs with the row block on chip (d ≤ 256), KP ≥ 64 on ≤ 64 × 64-element tiles."""
    half = _short(dtype) in ("bf16", "fp16")
    e = 2 if half else 4
    bd = max(64, 1 << max(0, (d - 1).bit_length()))
    bm = 32 if kp >= 128 else (128 if n >= 128 * 132 and kp <= 32 else 64)
    bn = 128 if n >= 128 else 64
    if kp >= 64 and bm * bn > 64 * 64:
        bn = 64 if bm == 64 else bn
    resident = bd <= 256 and bm * bd * e <= 64 * 1024
    if bm * bn > 128 * 64 and not (resident and half):
        bn = 64
    return bm, bn, resident


def _poisson_max_rounds(lam: float, rows: int, cap: int) -> tuple[float, float]:
    """(P(max ≥ 1), E[min(cap, max)]) of ``rows`` independent Poisson(lam) counts: the probability that a row block
    merges a tile and its expected insertion rounds."""
    if lam <= 0:
        return 0.0, 0.0
    p = math.exp(-lam)  # P(X = 0)
    cdf, rounds, p_merge = p, 0.0, 0.0
    for m in range(1, cap + 1):
        tail = 1.0 - cdf**rows  # P(max ≥ m)
        if m == 1:
            p_merge = tail
        rounds += tail
        if tail < 1e-9:
            break
        p *= lam / m
        cdf = min(1.0, cdf + p)
    return p_merge, rounds


@functools.lru_cache(maxsize=256)
def _knn_merges(n: int, k: int, bm: int, bn: int) -> tuple[float, float]:
    """Expected (merged tiles, insertion rounds) per row block of the Triton kNN kernel on rows in random order:
    the c-th column seen enters a row's top k with probability min(1, k/c), so tile t brings
    λ_t = Σ_c min(1, k/c) ≈ k·ln((s + BN)/s) entering keys per row (s = columns before it), counted as Poisson;
    a block merges the tile when any of its rows has one and runs max over its rows (≤ k) rounds."""
    tiles = -(-n // bn)
    merged = rounds = 0.0
    for t in range(tiles):
        s, e = t * bn, min(n, (t + 1) * bn)
        full = max(0, min(e, k) - s)  # columns before the list is full enter surely
        lam = full + (k * math.log(e / max(s, k)) if e > k else 0.0)
        p, r = _poisson_max_rounds(lam, bm, k)
        merged += p
        rounds += r
    return merged, rounds


def _knn(n, dims, dtype, precision, impl, design, params, sms, panel_mb):
    d = int(dims["d"])
    k = resolve_k(params.get("k", "rice"), n)
    nn = float(n) * n
    eo_in = _esize(dtype)
    cls = gemm_class(dtype, precision)
    if impl == "ideal":
        return [Phase("minimal work", gemm_flops=2.0 * nn * d, gemm_class=cls, int_ops=nn,
                      hbm_bytes=n * d * eo_in + n * k * 8)], {"k": k}, []  # fmt: skip
    if impl == "cpu":
        ec = 8 if _short(dtype) == "fp64" else 4
        rows = panel_rows(n, n * ec, *PANEL_RULES["cpu"])
        npan = _n_panels(n, rows)
        return [Phase("panel GEMM + nth_element per row", gemm_flops=2.0 * nn * d, gemm_class="fp64" if ec == 8 else "fp32",
                      hbm_bytes=npan * n * d * ec + nn * ec * 2)], \
            {"k": k, "panel_rows": rows}, ["CPU selection (nth_element) not in the bound: no integer ceiling measured"]  # fmt: skip
    if impl == "cuda":
        budget, min_rows, mult = (  # built = planned: common.cuh panel_rows_from_memory (the 2 GiB cap binds)
            PANEL_RULES["cuda_knn"] if design == "before" else (panel_mb or DESIGN_PANEL_MB, 256, 16)
        )
        rows = panel_rows(n, 4 * n, budget, min_rows, mult)
        npan = _n_panels(n, rows)
        # threshold filter + key packing per element; compactions (bitonic sort of the 2048-key buffer) when the
        # buffer could overflow: ~k(1 + ln(N/k)) entries per row pass the running threshold
        entering = k * (1 + math.log(max(n / k, 1.0)))
        compactions = 1 + entering / max(1, 2048 - 512 - k)
        sort_cs = 1024 * 11 * 12 / 2
        ints = nn * 6 + n * compactions * sort_cs * INT_OPS_PER_CS
        return [Phase("panel GEMM (cuBLAS) + streamed top-k rows kernel", gemm_flops=2.0 * nn * d, gemm_class=cls,
                      hbm_bytes=npan * n * d * eo_in + nn * 8, int_ops=ints, parallel=_par(rows, sms))], \
            {"k": k, "panel_rows": rows}, ["latency-bound per issue 14 (2 loads per thread, 2 blocks per SM): not a roofline term"]  # fmt: skip
    if impl != "triton":
        raise ValueError(f"no knn model for impl {impl!r}")
    kp = max(16, 1 << max(0, (k - 1).bit_length()))  # knn.list_slots
    if _short(dtype) == "fp64" or k > 128:
        return _knn(n, dims, dtype, precision, "cuda", "built", params, sms, panel_mb)  # torch panel path
    if design == "before":  # the pre-issue-14 kernel: a bitonic sort of every tile per row and a merge, no skipping
        kp0 = 1 << max(0, (k - 1).bit_length())
        bm, bn = (64 if kp0 <= 64 else 32), max(64, kp0)
        ints = n * (n / bn) * _bitonic_cs(bn, kp0) * INT_OPS_PER_CS
        l2 = nn * d * eo_in * (1.0 / bn + 1.0 / bm)
        rb = -(-n // bm)
        return [Phase("fused GEMM + bitonic top-k", gemm_flops=2.0 * nn * d, gemm_class=cls, int_ops=ints,
                      hbm_bytes=_waves(rb, sms or 1) * n * d * eo_in + n * k * 8, l2_bytes=l2,
                      parallel=_par(rb, sms))], {"k": k, "kp": kp0, "tiles": (bm, bn)}, []  # fmt: skip
    if design == "planned":
        # the design as first modelled: 128 × 128 tiles, the row operand on chip, per-row tile skipping before a
        # bitonic sort (random order: Σ_t min(1, k/t) = k + k ln(T/k) sorted tiles per row)
        bm, bn = 128, max(128, kp)
        tiles = n / bn
        sorted_tiles = tiles if tiles <= k else k + k * math.log(tiles / k)
        ints = nn * 2 + n * sorted_tiles * _bitonic_cs(bn, kp) * INT_OPS_PER_CS
        keep = bm * d * eo_in <= 160 * 1024
        l2 = nn * d * eo_in * ((0.0 if keep else 1.0 / bn) + 1.0 / bm)
        rb = -(-n // bm)
        return [Phase("fused GEMM + bitonic top-k", gemm_flops=2.0 * nn * d, gemm_class=cls, int_ops=ints,
                      hbm_bytes=_waves(rb, sms or 1) * n * d * eo_in + n * k * 8, l2_bytes=l2,
                      parallel=_par(rb, sms))], {"k": k, "kp": kp, "tiles": (bm, bn)}, []  # fmt: skip
    # The kernel as built: KNN_SPACE tiles by its heuristic, the row block on chip for d ≤ 256, block-level tile
    # skipping. Tile scan: KNN_SCAN_INT_OPS per similarity; merged tiles: insertion rounds of ~6·BN int32 + ~3·KP
    # int64 (6·KP int32) ops per row; the output: k rounds over the KP-slot list. At d = 1024 the per-row list
    # (BLOCK_M · KP ≤ 4096 registers) keeps BLOCK_M at 32–64, so the column stream makes it L2-bound.
    bm, bn, resident = _knn_tiles(n, d, kp, dtype)
    rb = -(-n // bm)
    merged, rounds = _knn_merges(n, k, bm, bn)
    ints = nn * KNN_SCAN_INT_OPS + rb * bm * (rounds * (6 * bn + 6 * kp) + k * 4 * kp)
    l2 = nn * d * eo_in * ((0.0 if resident else 1.0 / bn) + 1.0 / bm)
    return [Phase("fused GEMM + tile skipping + insertion rounds", gemm_flops=2.0 * nn * d, gemm_class=cls, int_ops=ints,
                  hbm_bytes=_waves(rb, sms or 1) * n * d * eo_in + n * k * 8, l2_bytes=l2,
                  parallel=_par(rb, sms))], \
        {"k": k, "kp": kp, "tiles": (bm, bn), "resident": resident, "merged_tiles_per_block": round(merged, 1),
         "tiles_per_block": -(-n // bn), "rounds_per_block": round(rounds, 1)}, []  # fmt: skip


def _siglip(n, dims, mode, dtype, precision, impl, design, sms, panel_mb):
    """Pairwise sigmoid loss (csrc/cpu/siglip_cpu.cpp): value and gradient in one pass over row panels."""
    d = int(dims["d"])
    grad = mode != "fwd"
    nn = float(n) * n
    ec = 8 if _short(dtype) == "fp64" else 4
    cls = ("fp64" if ec == 8 else "fp32") if impl == "cpu" else gemm_class(dtype, precision)
    if impl == "ideal":
        return [Phase("minimal work", gemm_flops=(6.0 if grad else 2.0) * nn * d, gemm_class=cls, sfu_ops=3 * nn,
                      hbm_bytes=2 * n * d * _esize(dtype) * (2 if grad else 1))], {}, []  # fmt: skip
    if impl != "cpu":
        raise ValueError(f"no siglip model for impl {impl!r}")
    rows = panel_rows(n, n * ec * (2 if grad else 1), *PANEL_RULES["cpu"])
    npan = _n_panels(n, rows)
    # one exp, one log1p, one division per pair; GEMM writes the panel, the loop reads it (+ writes w),
    # the two gradient GEMMs read w
    pair = ec * (2 + (1 + 2 if grad else 0))
    per_panel = n * d * ec * (1 + (3 if grad else 0))
    return [Phase("one pass over row panels", gemm_flops=(6.0 if grad else 2.0) * nn * d, gemm_class=cls,
                  sfu_ops=3 * nn, hbm_bytes=nn * pair + npan * per_panel)], {"panel_rows": rows}, []  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------
def cost(op: str, impl: str, n: int, dims: dict, mode: str = "fwd+bwd", dtype: str = "float32",
         precision: str = "high", design: str = "built", params: dict | None = None, sms: int | None = 132,
         panel_mb: float | None = None, grad_x: bool = False) -> Cost:  # fmt: skip
    """The model of one call. impl: "ideal" (the op's floor), "cpu", "cuda", "triton_rows", "triton_flash"
    (structure), "triton" (clip, knn), "chunked" (structure, the GPU suite's baseline). design: "built" (the
    code as it stands on main), "before" (the code before issue 14, as modelled before the rewrite) or "planned"
    (the issue-14 design as first modelled: tensor cores for half inputs, 2 GiB panels, 128 × 128 tiles with the
    row operand on chip, kNN tile skipping, clip backward at 8N²d; the "built" model where it was built as
    planned). sms: SMs of the GPU (None for a CPU). panel_mb: override of the panel budget. grad_x: the X side needs a gradient too (structure)."""
    params = dict(params or {})
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if op == "structure":
        phases, info, notes = _structure(n, dims, mode, dtype, precision, impl, design, params, sms, panel_mb, grad_x)
    elif op == "clip":
        phases, info, notes = _clip(n, dims, mode, dtype, precision, impl, design, sms, panel_mb)
    elif op == "knn":
        phases, info, notes = _knn(n, dims, dtype, precision, impl, design, params, sms, panel_mb)
    elif op == "mutual_knn":  # two knn calls (one per side) + an O(N·k) intersection
        one, info, notes = _knn(n, dims, dtype, precision, impl, design, params, sms, panel_mb)
        phases = [Phase(p.name + " (×2 sides)", p.gemm_flops * 2, p.gemm_class, p.sfu_ops * 2, p.hbm_bytes * 2,
                        p.l2_bytes * 2, p.int_ops * 2, p.parallel) for p in one]  # fmt: skip
    elif op == "siglip":
        phases, info, notes = _siglip(n, dims, mode, dtype, precision, impl, design, sms, panel_mb)
    else:
        raise ValueError(f"no roofline model for op {op!r}")
    if "gemm_class" not in info:
        info["gemm_class"] = next((p.gemm_class for p in phases if p.gemm_flops), None)
    return Cost(op, impl, design, phases, notes, info)


# provider name (CPU harness, GPU suite) → model implementation
_PROVIDER_IMPL = {"cpu": "cpu", "cuda": "cuda", "triton_rows": "triton_rows", "triton_flash": "triton_flash",
                  "triton": "triton", "chunked": "chunked"}  # fmt: skip


def impl_for(op: str, provider: str) -> str:
    impl = _PROVIDER_IMPL.get(provider, "ideal")
    if impl == "triton_rows" and op != "structure":
        impl = "triton"  # the GPU suite's "triton_rows" provider is backend="triton" for clip and knn
    return impl


def annotate(record: dict, ceil: Ceilings | None, *, op: str | None = None, dims: dict | None = None,
             params: dict | None = None, precision: str | None = None, design: str = "built") -> dict:  # fmt: skip
    """Add the roofline of ``record``'s kernel (in place; also returned): model_gemm_flops, model_sfu_ops,
    model_mem_bytes, model_l2_bytes, model_int_ops, roofline_model, and with ceilings bound_s, bound_by,
    bound_terms_s and fraction_of_bound = bound_s / median_s (when the record holds a median).

    ``op``/``dims``/``params`` default to the record's own keys (the CPU harness writes them; the GPU suite
    passes them). Providers without a kernel model (reference, compile_reference, inf_cl) get the op's floor
    ("ideal"). Never raises for a record it cannot model: it records ``roofline_error`` instead."""
    op = op or record.get("op")
    dims = dims or record.get("dims")
    params = params if params is not None else record.get("params", {})
    provider = record.get("provider", "")
    impl = impl_for(op, provider)
    try:
        c = cost(op, impl, int(record["N"]), dims, record.get("mode", "fwd"), record.get("dtype", "float32"),
                 precision or record.get("precision") or "high", design, params,
                 sms=(ceil.sms if ceil else None))  # fmt: skip
    except (KeyError, ValueError, TypeError) as exc:
        record["roofline_error"] = f"{type(exc).__name__}: {exc}"
        return record
    record.update(
        roofline_model=f"{op}/{impl}/{design}", model_gemm_flops=c.gemm_flops, model_gemm_class=c.info.get("gemm_class"),
        model_sfu_ops=c.sfu_ops, model_mem_bytes=c.hbm_bytes, model_l2_bytes=c.l2_bytes, model_int_ops=c.int_ops,
    )  # fmt: skip
    if c.notes:
        record["roofline_notes"] = c.notes
    if ceil is not None:
        b = bound(c, ceil)
        record.update(bound_s=b["bound_s"], bound_by=b["bound_by"], bound_terms_s=b["terms_s"],
                      roofline_ceilings=ceil.name)  # fmt: skip
        med = record.get("median_s")
        record["fraction_of_bound"] = (b["bound_s"] / med) if med else None
    return record


# ---------------------------------------------------------------------------------------------------
# CPU ceilings, measured
# ---------------------------------------------------------------------------------------------------
def _best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_ceilings(gemm_n: int = 2048, copy_mb: int = 512, exp_elems: int = 1 << 16, exp_iters: int = 200,
                         reps: int = 5, threads: int | None = None) -> Ceilings:  # fmt: skip
    """This machine's ceilings with torch at the current thread count, best of ``reps``:
    fp32 / fp64 GEMM FLOP/s (torch.mm at gemm_n³; fp64 at gemm_n/2), memory bytes/s (a copy of copy_mb MiB,
    read + write counted), exp ops/s (one thread's torch.exp on an L2-resident fp32 vector, exp_iters times,
    times the thread count).
    Under load from other processes these are lower than the idle machine's (record other_busy_cores)."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    g = torch.Generator().manual_seed(0)

    def gemm_rate(m: int, dtype) -> float:
        a = torch.randn(m, m, generator=g).to(dtype)
        b = torch.randn(m, m, generator=g).to(dtype)
        out = torch.empty(m, m, dtype=dtype)
        torch.mm(a, b, out=out)
        return 2.0 * m**3 / _best_time(lambda: torch.mm(a, b, out=out), reps)

    def copy_rate(mb: int) -> float:
        src = torch.empty(mb * MIB // 4).fill_(1.0)
        dst = torch.empty_like(src)
        dst.copy_(src)
        return 2.0 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), reps)

    fp32 = gemm_rate(gemm_n, torch.float32)
    h = max(64, gemm_n // 2)
    fp64 = gemm_rate(h, torch.float64)
    bw = copy_rate(copy_mb)
    # exp: one thread on an L2-resident vector, times the thread count (a per-core unit: the ceiling is what
    # every core can issue; a 2-thread torch.exp on a short vector measures OpenMP barriers instead)
    x = torch.rand(exp_elems, generator=g) - 0.5
    y = torch.empty_like(x)
    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.exp(x, out=y)

        def exps():
            for _ in range(exp_iters):
                torch.exp(x, out=y)

        sfu = nthreads * exp_elems * exp_iters / _best_time(exps, max(2, reps))
    finally:
        torch.set_num_threads(nthreads)
    from _harness import cpu_model  # imported here: _harness imports this module at its end

    name = cpu_model()
    return Ceilings(
        name=f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads; measured)",
        gemm={"fp32": fp32, "fp64": fp64}, sfu=sfu, mem_bw=bw, l2_bw=None, int_ops=None, sms=None,
        source={"fp32": f"torch.mm {gemm_n}^3, best of {reps}", "fp64": f"torch.mm {h}^3 float64, best of {reps}",
                "sfu": f"1-thread torch.exp on {exp_elems} fp32 values (L2-resident) x {exp_iters}, x {nthreads} threads",
                "mem_bw": f"copy of {copy_mb} MiB fp32, read + write counted", "torch": torch.__version__},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# H200 predictions (docs/roofline.md)
# ---------------------------------------------------------------------------------------------------
PRED_NS = (16384, 65536, 262144)
STRUCT_DIMS = {"d_x": 1024, "d_z": 512}
CLIP_DIMS = {"d": 512}
KNN_DIMS = {"d": 1024}


def _same_model(a: Cost, b: Cost) -> bool:
    return [asdict(p) for p in a.phases] == [asdict(p) for p in b.phases]


def plan_differs(op: str, impl: str, n: int, dims: dict, mode: str = "fwd+bwd", dtype: str = "float32",
                 precision: str = "high", params: dict | None = None, sms: int | None = 132) -> bool:  # fmt: skip
    """Whether the issue-14 plan as first modelled differs from what was built for this kernel and shape."""
    built = cost(op, impl, n, dims, mode, dtype, precision, "built", params, sms=sms)
    return not _same_model(built, cost(op, impl, n, dims, mode, dtype, precision, "planned", params, sms=sms))


def prediction_rows(ceil: Ceilings = H200, ns=PRED_NS) -> list[dict]:
    """One row per (kernel, dtype/precision, N, design): the bound and what binds. fp32 at precision "high"
    (TF32) and bf16; structure and clip fwd+bwd (grad w.r.t. z / both inputs), knn forward. Designs: "before" and
    "built" for every kernel model, "planned" only where it differs from "built"; "ideal" (the floor) once, as
    "built"."""
    cases = []
    for dtype, prec in (("float32", "high"), ("bfloat16", "high")):
        for impl in ("ideal", "cuda", "triton_rows", "triton_flash"):
            cases.append(("structure L1", "structure", impl, STRUCT_DIMS, "fwd+bwd", dtype, prec, {"levels": 1}))
        for impl in ("ideal", "cuda", "triton"):
            cases.append(("clip", "clip", impl, CLIP_DIMS, "fwd+bwd", dtype, prec, {}))
        for impl in ("ideal", "cuda", "triton"):
            cases.append(("knn k=rice", "knn", impl, KNN_DIMS, "fwd", dtype, prec, {"k": "rice"}))
    for impl in ("cuda", "triton_rows"):
        cases.append(("structure L2", "structure", impl, STRUCT_DIMS, "fwd+bwd", "float32", "high", {"levels": 2}))
    rows = []
    for label, op, impl, dims, mode, dtype, prec, params in cases:
        for n in ns:
            costs = {}
            for design in ("built",) if impl == "ideal" else DESIGNS:
                costs[design] = cost(op, impl, n, dims, mode, dtype, prec, design, params, sms=ceil.sms)
            if "planned" in costs and _same_model(costs["planned"], costs["built"]):
                del costs["planned"]
            for design, c in costs.items():
                b = bound(c, ceil)
                mem = c.info.get("extra_memory_bytes")
                fits = mem is None or ceil.mem_bytes is None or mem <= 0.9 * ceil.mem_bytes
                rows.append({"kernel": label, "impl": impl, "dtype": f"{_short(dtype)}" + ("/tf32" if dtype == "float32" else ""),
                             "N": n, "design": design, "bound_s": b["bound_s"], "bound_by": b["bound_by"],
                             "terms_s": b["terms_s"], "gemm_flops": c.gemm_flops, "mem_bytes": c.hbm_bytes,
                             "fits": fits, "extra_memory_bytes": mem, "info": c.info})  # fmt: skip
    return rows


def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s * 1e6:.0f} µs"


def _cell(r: dict) -> str:
    if not r["fits"]:
        return f"does not fit ({r['extra_memory_bytes'] / 1e9:.0f} GB)"
    return f"{_fmt_s(r['bound_s'])} ({r['bound_by']})"


def prediction_table(ceil: Ceilings = H200, ns=PRED_NS, planned: bool = False) -> str:
    """Markdown: per kernel and dtype, the bound at each N, ``before → built`` (binding term); ``planned``: instead
    ``planned vs built`` for the kernels whose issue-14 plan differs from what was built."""
    rows = prediction_rows(ceil, ns)
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["impl"], r["dtype"]), {})[(r["N"], r["design"])] = r
    head = "| kernel | impl | dtype | " + " | ".join(f"N = {n:,}".replace(",", " ") for n in ns) + " |"
    out = [head, "|---|---|---|" + "---|" * len(ns)]
    for (kernel, impl, dt), cells in by.items():
        if planned and not any(d == "planned" for _, d in cells):
            continue
        row = [kernel, impl, dt]
        for n in ns:
            built = cells.get((n, "built"))
            other = cells.get((n, "planned" if planned else "before"))
            if planned:
                row.append("= built" if other is None else f"{_cell(other)} vs {_cell(built)}")
            else:
                row.append(_cell(built) if other is None else f"{_cell(other)} → {_cell(built)}")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def terms_table(n: int, ceil: Ceilings = H200) -> str:
    """Markdown: every resource's time (s) at one N, per design (before, built, and planned where it differs)."""
    rows = [r for r in prediction_rows(ceil, (n,))]
    keys = ["gemm", "sfu", "mem"] + (["l2"] if ceil.l2_bw else []) + (["int"] if ceil.int_ops else [])
    out = ["| kernel | impl | dtype | design | " + " | ".join(keys) + " | bound | GEMM FLOPs | memory bytes |",
           "|---|---|---|---|" + "--:|" * (len(keys) + 3)]  # fmt: skip
    for r in rows:
        cells = [_fmt_s(r["terms_s"][k]) for k in keys]
        bound_cell = _fmt_s(r["bound_s"]) if r["fits"] else f"does not fit ({r['extra_memory_bytes'] / 1e9:.0f} GB)"
        out.append(f"| {r['kernel']} | {r['impl']} | {r['dtype']} | {r['design']} | " + " | ".join(cells)
                   + f" | {bound_cell} | {r['gemm_flops']:.3g} | {r['mem_bytes']:.3g} |")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("predict", help="the H200 prediction table (markdown)")
    pp.add_argument("--terms", type=int, default=None, help="instead: every resource's time at this N")
    pp.add_argument("--planned", action="store_true", help="instead: planned vs built where the plan differs")
    pj = sub.add_parser("predict-json", help="the H200 predictions as JSON")
    pj.add_argument("--out", default=None)
    pc = sub.add_parser("ceilings", help="measure this machine's CPU ceilings (JSON on stdout)")
    pc.add_argument("--threads", type=int, default=None)
    pa = sub.add_parser("annotate", help="add the roofline fields to the records of existing <op>.json files")
    pa.add_argument("files", nargs="+")
    pa.add_argument("--ceilings", required=True, help="a JSON file of ceilings (the 'ceilings' command's output)")
    pb = sub.add_parser("bytes-per-pair", help="bytes per (i, j) pair of the level-1 row kernels")
    pb.add_argument("--ec", type=int, default=4)
    a = p.parse_args(argv)
    if a.cmd == "predict":
        print(terms_table(a.terms) if a.terms is not None else prediction_table(planned=a.planned))
    elif a.cmd == "predict-json":
        text = json.dumps({"ceilings": H200.to_dict(), "rows": prediction_rows()}, indent=1, default=str)
        if a.out:
            tmp = a.out + ".tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, a.out)
        else:
            print(text)
    elif a.cmd == "ceilings":
        print(json.dumps(measure_cpu_ceilings(threads=a.threads).to_dict(), indent=1))
    elif a.cmd == "annotate":
        with open(a.ceilings) as f:
            raw = json.load(f)
        ceil = Ceilings.from_dict(raw)
        for path in a.files:
            with open(path) as f:
                data = json.load(f)
            for rec in data.get("records", []):
                annotate(rec, ceil)
            data.setdefault("environment", {})["ceilings"] = {**raw, "file": os.path.basename(a.ceilings)}
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
            print(f"annotated {len(data.get('records', []))} records in {path}")
    else:
        for impl, design in (("cuda", "before"), ("cuda", "built"), ("triton_rows", "before"), ("triton_rows", "built"),
                             ("triton_rows", "planned"), ("cpu", "built")):  # fmt: skip
            for ew, label in ((a.ec, "fp32 W"), (2, "bf16 W")):
                if (design == "before" or impl == "cpu") and ew != a.ec:
                    continue
                vals = [row_kernel_bytes_per_pair(impl, design, gx, gz, a.ec, ew)
                        for gx, gz in ((False, False), (False, True), (True, True))]  # fmt: skip
                if impl == "cpu":
                    tot = ""
                else:  # + the Gram write (2 e_c) and the two W reads of the gradient GEMMs per side (2 e_w)
                    w = a.ec if design == "before" else ew
                    t = [v + 2 * a.ec + 2 * w * s for v, s in zip(vals, (0, 1, 2), strict=True)]
                    tot = f"  (with Gram write and W reads: {t[0]} / {t[1]} / {t[2]} B)"
                print(
                    f"{impl:12s} {design:8s} {label}: fwd {vals[0]} B, grad_z {vals[1]} B, grad_x+grad_z {vals[2]} B{tot}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
