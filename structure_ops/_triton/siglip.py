r"""Pairwise sigmoid (SigLIP) loss as fused Triton tiles: GEMM + stable log-sigmoid epilogue + gradient.

Same contract as the C++ op ``structure_ops::siglip_fwd`` (csrc/common/siglip.h, csrc/cpu/siglip_cpu.cpp):
image A (M, d) and text B (N, d) rows already normalized by the caller, s = logit_scale and β = logit_bias
(tensors; their gradients are returned, no exp chain rule here), the image rows are the text rows
[o, o + M) (o = row_offset; M = N, o = 0 for the single-process loss):

    z = s · A Bᵀ + β,   y_ij = +1 if j = o + i else −1
    loss = (1/N) Σ_ij softplus(−y_ij z_ij)          (= −(1/N) Σ log σ(y z), open_clip's SigLipLoss for M = N)
    w_ij = ∂loss/∂z_ij = −y_ij σ(−y_ij z_ij) / N
    dA = s · w B,   dB = s · wᵀ A,   ds = Σ_ij w_ij (A Bᵀ)_ij,   dβ = Σ_ij w_ij

Returns (loss [image dtype, 0-dim], grad_image [(M, d) or empty], grad_text [(N, d) or empty],
grad_logit_scale, grad_logit_bias [shape, dtype and device of logit_scale / logit_bias]).

Stability: with e = exp(−|z|) ∈ (0, 1], softplus(u) = max(u, 0) + log1p(e) for u = ±z and σ(u) =
(u ≥ 0 ? 1 : e)/(1 + e): one exponential per pair, no overflow for any finite z (s up to 1e4 and beyond).

Pass structure: ONE kernel body, launched once per owner role (a constexpr), each program owning a row
block of its side and streaming the other side's rows in column tiles:

  role 0  rows I of A: tile z_IJ = s·A_I B_Jᵀ + β (tl.dot over d) → term, w in registers (epilogue)
          → per-row sums of the loss, Σ w·(A Bᵀ) and Σ w (fp64 accumulators) → one partial per block;
          with a gradient: dA_I += w_IJ B_J[:, chunk]  (tl.dot), scaled by s/N once at the end
  role 1  rows J of B: the transposed tiles z_JI = s·B_J A_Iᵀ + β, positives where j = o + i
          → dB_J += w_JI A_I[:, chunk]   (launched only when text requires grad)

Every output element is written by exactly one program and the partials are summed in a fixed order:
deterministic, no atomics, no N × N buffer (extra memory O(M/BLOCK_M)). Why two roles rather than emitting
dA and dB from one tile: that needs a cross-program reduction of dB (atomics, not deterministic) or an
N × d partial per row block. GEMM FLOPs, C = ⌈d / BLOCK_DO⌉ output chunks per role (launch_config: BLOCK_DO
≤ 256, ≤ 128 for fp32 role 1 and fp64): with gradients (2C₀ + 2C₁ + 4) M N d (8 N² d for C = 1), loss only 2 M N d.

Precision (docs/kernels.md §6): fp32 tiles use tl.dot(input_precision=dot_precision(fp32)); bf16/fp16 use
tensor cores with fp32 accumulation; fp64 uses fp64 dots. The epilogue runs in fp32 (fp64 for fp64
inputs). In the gradient GEMM the factor N·w = ±σ ∈ [−1, 1] is cast to the operand dtype and s/N is
applied to the fp32 accumulator afterwards (no 1/N-sized value is rounded to fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    _add,
    compute_dtype,
    device_guard,
    dot_operand,
    dot_precision,
    log1p,
    next_pow2,
    row_sum,
)

__all__ = ["siglip_fwd", "launch_config", "gemm_flops", "AOT_KERNELS"]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def gemm_flops(m: int, n: int, d: int, grad: bool = True, block_do: tuple[int, int] = (256, 128)) -> int:
    """GEMM FLOPs of one call (the module docstring's model; ``block_do`` of roles 0 and 1)."""
    if not grad:
        return 2 * m * n * d
    c0, c1 = (-(-d // b) for b in block_do)
    return (2 * c0 + 2 * c1 + 4) * m * n * d


@triton.jit
def _siglip_kernel(
    x_ptr, y_ptr,  # owner rows X (MX, D) and streamed rows Y (MY, D), contiguous: (A, B) for role 0, (B, A) for role 1
    s_ptr, beta_ptr,  # 1 value each, statistics dtype
    out_ptr,  # (MX, D) gradient of X (GRAD), dtype of X
    part_ptr,  # (3, num_programs) fp64: per-block Σ term, Σ w·(A Bᵀ), Σ w (role 0, chunk 0), all × N
    MX, MY, D, OFFSET, NORM,  # NORM = N (text rows), the loss normalizer
    ROLE: tl.constexpr, GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ROUND_TF32: tl.constexpr = False,
):
    # Math (module docstring): for this program's row block I of X and every column block J of Y,
    #   P_IJ = X_I Y_Jᵀ, z = s·P + β, positive pairs: j = o + i (role 0) / i = o + j (role 1, X = B)
    #   u = −z on positives, z on negatives;  term = softplus(u) = max(u, 0) + log1p(e),  e = exp(−|z|)
    #   N·w = ±σ(u) = ±(u ≥ 0 ? 1 : e)/(1 + e)  (− on positives)
    #   GRAD: dX_I[:, chunk] = (s/N) Σ_J (N·w_IJ) Y_J[:, chunk]
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    rl = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + rl
    row_ok = rows < MX
    cl = tl.arange(0, BLOCK_N)
    kl = tl.arange(0, BLOCK_D)
    dos = chunk * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = dos < D
    # Addresses: scalar int64 block bases (N·D may exceed 2³¹) + int32 offsets inside a block.
    x_blk = x_ptr + (pid * BLOCK_M).to(tl.int64) * D
    s = tl.load(s_ptr).to(ACC)
    beta = tl.load(beta_ptr).to(ACC)

    out = tl.full((BLOCK_M, BLOCK_DO), 0.0, ACC)
    loss_r = tl.full((BLOCK_M,), 0.0, tl.float64)
    ds_r = tl.full((BLOCK_M,), 0.0, tl.float64)
    db_r = tl.full((BLOCK_M,), 0.0, tl.float64)
    y_blk = y_ptr
    for j0 in range(0, MY, BLOCK_N):
        cols = j0 + cl
        col_ok = cols < MY
        dot = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC)
        for k0 in range(0, D, BLOCK_D):
            k_ok = (k0 + kl) < D
            x = tl.load(x_blk + k0 + rl[:, None] * D + kl[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            y = tl.load(y_blk + k0 + cl[:, None] * D + kl[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter miscomputes bf16 dots: feed it fp32 (exact products)
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            # fp32 at TF32: operands rounded to nearest (ties away) as cuBLAS, not truncated (_common.py)
            x = dot_operand(x, ROUND_TF32)
            y = dot_operand(y, ROUND_TF32)
            dot = tl.dot(x, tl.trans(y), dot, input_precision=DOT_PRECISION, out_dtype=ACC)
        z = dot * s + beta
        if ROLE == 0:
            pos = cols[None, :] == rows[:, None] + OFFSET
        else:
            pos = rows[:, None] == cols[None, :] + OFFSET
        valid = row_ok[:, None] & col_ok[None, :]
        u = tl.where(pos, -z, z)
        e = tl.exp(-tl.abs(z))
        sig = tl.where(u >= 0.0, 1.0, e) / (1.0 + e)
        w = tl.where(valid, tl.where(pos, -sig, sig), 0.0)
        if ROLE == 0:
            term = tl.where(valid, tl.maximum(u, 0.0) + log1p(e), 0.0)
            loss_r += row_sum(term).to(tl.float64)
            ds_r += row_sum(w * dot).to(tl.float64)
            db_r += row_sum(w).to(tl.float64)
        if GRAD:
            yo = tl.load(y_blk + cl[:, None] * D + dos[None, :], mask=col_ok[:, None] & do_ok[None, :], other=0.0)
            if UPCAST:
                yo = yo.to(tl.float32)
            wo = dot_operand(w.to(yo.dtype), ROUND_TF32)
            yo = dot_operand(yo, ROUND_TF32)
            out = tl.dot(wo, yo, out, input_precision=DOT_PRECISION, out_dtype=ACC)
        y_blk += BLOCK_N * D

    if GRAD:
        out = out * (s / NORM)
        o_offs = rl[:, None] * D + dos[None, :]
        tl.store(out_ptr + (pid * BLOCK_M).to(tl.int64) * D + o_offs, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & do_ok[None, :])
    if ROLE == 0:
        if chunk == 0:
            nprog = tl.num_programs(0)
            tl.store(part_ptr + pid, tl.reduce(loss_r, 0, _add))
            tl.store(part_ptr + nprog + pid, tl.reduce(ds_r, 0, _add))
            tl.store(part_ptr + 2 * nprog + pid, tl.reduce(db_r, 0, _add))


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------
def _check(image, text, logit_scale, logit_bias, row_offset: int) -> None:
    # The C++ op's checks (csrc/common/siglip.h), same messages, same exception type (RuntimeError).
    for t, name, dims in ((image, "image", "(M, d)"), (text, "text", "(N, d)")):
        if t.dim() != 2:
            raise RuntimeError(f"{name} must be a 2-D {dims} tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if text.shape[0] < 1:
        raise RuntimeError(f"text needs at least one row, got shape {tuple(text.shape)}")
    if image.shape[1] < 1:
        raise RuntimeError(f"image needs at least one feature column, got shape {tuple(image.shape)}")
    if image.shape[1] != text.shape[1]:
        raise RuntimeError(f"image and text must have the same embedding width, got {tuple(image.shape)} and {tuple(text.shape)}")
    if image.dtype != text.dtype:
        raise RuntimeError(f"image and text must have the same dtype, got {image.dtype} and {text.dtype}")
    if image.device != text.device:
        raise RuntimeError(f"image and text must be on the same device, got {image.device} and {text.device}")
    for t, name in ((logit_scale, "logit_scale"), (logit_bias, "logit_bias")):
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"{name} must hold exactly one value, got shape {shape}")
        if not t.is_floating_point():
            raise RuntimeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    m, n = image.shape[0], text.shape[0]
    if not (0 <= row_offset and row_offset + m <= n):
        raise RuntimeError(
            "siglip_fwd: the image rows must be a row range of the text batch: need 0 <= row_offset and "
            f"row_offset + M <= N, got row_offset={row_offset}, M={m}, N={n}"
        )
    if image.dtype not in _SUPPORTED:
        raise NotImplementedError(f"siglip_fwd (triton): dtype {image.dtype} is not supported (fp32, bf16, fp16, fp64)")
    if not INTERPRET and image.device.type != "cuda":
        raise RuntimeError(f"siglip_fwd (triton): image must be a CUDA tensor, got {image.device}")


def launch_config(d: int, dtype: torch.dtype, grad: bool, role: int = 0, interpret: bool = INTERPRET) -> dict:
    """The launch configuration the host uses for width ``d``, input ``dtype``, gradient flag and owner
    ``role``: the constexpr blocks and num_warps. BLOCK_DO covers all of d up to a cap (one output chunk), so
    the fp32 accumulator fits in registers; with grad=False BLOCK_DO is unused (16). The shapes are the ones
    that ptxas compiles without spills for sm_90 (python -m structure_ops._triton.aot): the fp32/fp64 gradient
    tiles are 16 columns wide (the epilogue's temporaries plus a BLOCK_M × BLOCK_DO accumulator), role 1 fp32
    caps BLOCK_DO at 128."""
    if interpret:  # few programs, big blocks: the interpreter pays per program and per op
        bm, bn, bd, w, cap = 32, 32, min(64, max(16, next_pow2(d))), 4, 128
    elif dtype == torch.float64:
        bm, bn, bd, w, cap = 32, 16 if grad else 32, 16, 4, 128
    elif dtype == torch.float32:
        bm, bn, bd, w, cap = 64, 16 if grad else 64, 32, 8, 128 if role == 1 else 256
    else:
        bm, bn, bd, w, cap = 64, 32 if grad else 64, 64, 8, 256
    bdo = min(cap, max(16, next_pow2(d))) if grad else 16
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DO": bdo, "num_warps": w}


def _scalar(t: torch.Tensor, device, dtype) -> torch.Tensor:
    # A device-side copy: the kernel loads it (no host synchronization, unlike .item()).
    return t.detach().reshape(1).to(device=device, dtype=dtype)


def siglip_fwd(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    row_offset: int = 0,
    grad_image: bool = True,
    grad_text: bool = True,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    block_do: int | None = None,
):
    """``structure_ops::siglip_fwd`` in Triton (module docstring). ``block_*`` override the tile shape
    (powers of two ≥ 16; for tests)."""
    _check(image, text, logit_scale, logit_bias, row_offset)
    a, b = image.detach().contiguous(), text.detach().contiguous()
    m, d = a.shape
    n = b.shape[0]
    dev = a.device
    cdt = compute_dtype(a.dtype)
    s = _scalar(logit_scale, dev, cdt)
    beta = _scalar(logit_bias, dev, cdt)
    da = torch.empty((m, d) if grad_image else (0,), device=dev, dtype=image.dtype)
    db = torch.empty((n, d) if grad_text else (0,), device=dev, dtype=text.dtype)
    upcast = INTERPRET and a.dtype == torch.bfloat16
    prec = dot_precision(a.dtype)

    def config(grad: bool, role: int) -> dict:
        cfg = launch_config(d, a.dtype, grad, role)
        for key, v in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_D", block_d), ("BLOCK_DO", block_do)):
            if v is None or (key == "BLOCK_DO" and not grad):
                continue
            if v < 16 or v & (v - 1):
                raise ValueError(f"{key.lower()} must be a power of two ≥ 16, got {v}")
            cfg[key] = v
        return cfg

    with device_guard(dev):  # Triton launches on the current CUDA device: the inputs' one
        if m == 0:  # an empty row shard: its part of the loss and of every gradient is 0
            zero = torch.zeros((), device=dev, dtype=torch.float64)
            parts = (zero, zero, zero)
            if grad_text:
                db.zero_()
        else:
            cfg = config(grad_image, 0)
            warps = cfg.pop("num_warps")
            nrb = triton.cdiv(m, cfg["BLOCK_M"])
            part = torch.empty((3, nrb), device=dev, dtype=torch.float64)
            chunks = triton.cdiv(d, cfg["BLOCK_DO"]) if grad_image else 1
            _siglip_kernel[(nrb, chunks)](
                a, b, s, beta, da, part, m, n, d, row_offset, n,
                ROLE=0, GRAD=grad_image, DOT_PRECISION=prec, UPCAST=upcast, ROUND_TF32=prec == "tf32", num_warps=warps, **cfg,
            )  # fmt: skip
            parts = part.sum(dim=1).unbind()
            if grad_text:
                cfg = config(True, 1)
                warps = cfg.pop("num_warps")
                grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_DO"]))
                _siglip_kernel[grid](
                    b, a, s, beta, db, part, n, m, d, row_offset, n,
                    ROLE=1, GRAD=True, DOT_PRECISION=prec, UPCAST=upcast, ROUND_TF32=prec == "tf32", num_warps=warps, **cfg,
                )  # fmt: skip
    loss = (parts[0] / n).to(image.dtype)
    gs = (parts[1] / n).reshape(logit_scale.shape).to(device=logit_scale.device, dtype=logit_scale.dtype)
    gb = (parts[2] / n).reshape(logit_bias.shape).to(device=logit_bias.device, dtype=logit_bias.dtype)
    return loss, da, db, gs, gb


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (aot.py): every configuration the host can launch on a GPU, from
# launch_config: each dtype × precision × {loss only, role 0 with gradient, role 1} × BLOCK_DO ∈ 16 … cap.
# --------------------------------------------------------------------------------------------------
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64"}


def aot_configs() -> list[tuple]:
    """(kernel, signature, constexprs, options) for every launch the host code can make on a GPU."""
    entries = []
    for dtype, ptr in _PTR.items():
        stat = "*fp64" if dtype == torch.float64 else "*fp32"
        precs = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for prec in precs:
            launches = [(0, False, 16)]
            for role in (0, 1):
                for d in (16, 32, 64, 128, 256):  # BLOCK_DO = next_pow2(d) below the cap, then the cap itself
                    if launch_config(d, dtype, True, role, interpret=False)["BLOCK_DO"] == d:
                        launches.append((role, True, d))
            for role, grad, width in launches:
                cfg = launch_config(width, dtype, grad, role, interpret=False)
                warps = cfg.pop("num_warps")
                sig = {
                    "x_ptr": ptr, "y_ptr": ptr, "s_ptr": stat, "beta_ptr": stat, "out_ptr": ptr, "part_ptr": "*fp64",
                    "MX": "i32", "MY": "i32", "D": "i32", "OFFSET": "i32", "NORM": "i32",
                    "ROLE": "constexpr", "GRAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                    "BLOCK_D": "constexpr", "BLOCK_DO": "constexpr", "DOT_PRECISION": "constexpr", "UPCAST": "constexpr",
                    "ROUND_TF32": "constexpr",
                }  # fmt: skip
                const = {"ROLE": role, "GRAD": grad, **cfg, "DOT_PRECISION": prec, "UPCAST": False, "ROUND_TF32": prec == "tf32"}
                entries.append((_siglip_kernel, sig, const, {"num_warps": warps}))
    return entries


AOT_KERNELS = aot_configs()
