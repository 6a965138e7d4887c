"""Float64 models of what GPU hardware does to GEMM operands and to half-precision casts.

The Triton and CUDA tests derive their tf32 / bf16 / fp16 tolerances from these models instead of guessing
them: run the float64 oracle once on exact operands and once on operands rounded the way the hardware rounds
them, take the relative error, and multiply by a safety factor (``tolerance``). Everything here runs on a CPU
in float64 (bit manipulation goes through float32 / int32 views, which is exact).

Formats (``fmt`` arguments):
  "fp64"        no rounding
  "fp32"        round to IEEE fp32 (round to nearest even)
  "tf32"        fp32, then tf32 round-to-nearest, ties away from zero (cvt.rna.tf32.f32; what cuBLAS does and
                what the Triton kernels do explicitly before a tf32 tl.dot)
  "tf32_trunc"  fp32, then the low 13 mantissa bits cleared (what Triton's tl.dot(input_precision="tf32")
                does to fp32 operands without an explicit rounding step: a biased truncation)
  "tf32x3"      fp32 split into a tf32 head and a tf32 tail (3 tensor-core products): fp32-level accuracy,
                modelled as the head + tail sum
  "bf16", "fp16"  round to that dtype (round to nearest even), as a bf16/fp16 tensor-core operand

Functions:
  tf32_truncate(x)            values of ``x`` (as fp32) with the low 13 mantissa bits cleared; inf/nan kept
  tf32_round(x)               values of ``x`` (as fp32) rounded to tf32, nearest, ties away; inf/nan kept, a
                              finite value past the largest tf32 value rounds to ±inf (as cvt.rna does)
  round_operand(x, fmt)       ``x`` rounded to ``fmt`` and returned in float64 (see the list above)
  emulated_matmul(a, b, fmt, accumulate="fp32", block_k=None)
                              a @ b with both operands rounded to ``fmt``; products exact (tf32/bf16/fp16
                              products fit in fp32), sums in float64 ("fp64") or, for "fp32", per ``block_k``
                              chunk in float64 and rounded to fp32 after each chunk (an fp32 accumulator)
  half_cast(x, dtype, scale_exp=0)
                              x·2^k cast to fp16/bf16 and back, divided by 2^k in float64: the half cast of
                              small values (e.g. gradient weights ~1/N) without (k = 0) or with power-of-two
                              scaling (exact, so only the cast rounds)
  half_cast_error(x, dtype, scale_exp=0)
                              ‖half_cast(x) − x‖ / ‖x‖
  pow2_exponent(max_abs, dtype, headroom_exp=1)
                              the k that brings ``max_abs``·2^k just below the dtype's largest power of two,
                              less ``headroom_exp`` (a model of the scale a kernel can pick from a bound)
  rel_err(out, ref)           ‖out − ref‖ / ‖ref‖ in float64
  emulated_error(fn, operands, fmt, ...)
                              per-output relative error of fn(rounded operands) vs fn(exact operands); fn
                              returns a tensor or a tuple of tensors (e.g. the oracle's value and gradients)
  tolerance(err, safety=4.0, floor=0.0)
                              a test tolerance from an emulated error: max(safety·err, floor)
  level1_emulated(xh, zh, fmt, ...)
                              the level-1 STRUCTURE core value and both gradients (float64) with every GEMM
                              operand (X̂, Ẑ for S; W and Ẑ for the gradient GEMM) rounded to ``fmt``: a
                              model of a kernel's fp32 "high" (tf32) or half tensor-core path
  level1_value(xh, zh, fmt, ...)
                              the value alone (cosine), forward only: cheap enough for N = 4096, d = 1024 on CPU
  level1_w_rows(xh, zh, rows, ...)
                              N·W = Q∘(g − ḡ) for a few rows at any N: the ~1/N values a kernel casts to half
                              for the gradient GEMM (model input for half_cast at N = 65 536 / 262 144)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

F64 = torch.float64
FORMATS = ("fp64", "fp32", "tf32", "tf32_trunc", "tf32x3", "bf16", "fp16")

_LOW13 = 0x1FFF  # the fp32 mantissa bits that tf32 drops
_HALF_ULP = 0x1000  # half a tf32 ulp, in fp32 mantissa units
_MASK = ~_LOW13  # as int32: 0xFFFFE000


def _as_f32_bits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = x.detach().to(torch.float32).contiguous()
    return f, f.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # unsigned 32-bit pattern in int64


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    bits = bits & 0xFFFFFFFF
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    return signed.view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32 with the low 13 mantissa bits cleared (toward zero), in float64; inf and nan kept."""
    f, bits = _as_f32_bits(x)
    out = _from_bits(bits & 0xFFFFE000)
    return torch.where(torch.isnan(f), f, out).to(F64)


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32 rounded to tf32 (10 mantissa bits), to nearest with ties away from zero, in float64.

    Adding half a tf32 ulp to the magnitude bits and clearing the low 13 bits rounds the magnitude half up, i.e.
    ties away from zero for either sign; a carry into the exponent is the correct next binade, and past the
    largest finite value it gives inf (cvt.rna.tf32.f32 behaves the same). inf stays inf; nan stays nan (the
    addition would carry a nan payload into the sign bit, hence the explicit select).
    """
    f, bits = _as_f32_bits(x)
    out = _from_bits((bits + _HALF_ULP) & 0xFFFFE000)
    return torch.where(torch.isnan(f) | torch.isinf(f), f, out).to(F64)


def round_operand(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` rounded as a GEMM operand of format ``fmt`` (module docstring), returned in float64."""
    if fmt == "fp64":
        return x.detach().to(F64)
    if fmt == "fp32":
        return x.detach().to(torch.float32).to(F64)
    if fmt == "tf32":
        return tf32_round(x)
    if fmt == "tf32_trunc":
        return tf32_truncate(x)
    if fmt == "tf32x3":
        f = x.detach().to(torch.float32)
        head = tf32_round(f)
        tail = tf32_round(f.to(F64) - head)
        return head + tail
    if fmt == "bf16":
        return x.detach().to(torch.bfloat16).to(F64)
    if fmt == "fp16":
        return x.detach().to(torch.float16).to(F64)
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def emulated_matmul(
    a: torch.Tensor, b: torch.Tensor, fmt: str, accumulate: str = "fp32", block_k: int | None = None
) -> torch.Tensor:
    """a @ b (float64 result) with both operands rounded to ``fmt``.

    The products of tf32/bf16/fp16 operands are exact in fp32, so the only other rounding is the accumulator:
    ``accumulate="fp64"`` sums exactly (to float64 precision); ``"fp32"`` sums each ``block_k``-wide chunk of the
    contraction in float64 and rounds the running sum to fp32 after every chunk (a tensor-core tile accumulating
    into fp32 registers; ``block_k=None``: one chunk, i.e. one final rounding).
    """
    if accumulate not in ("fp32", "fp64"):
        raise ValueError(f"accumulate must be 'fp32' or 'fp64', got {accumulate!r}")
    ar, br = round_operand(a, fmt), round_operand(b, fmt)
    if accumulate == "fp64":
        return ar @ br
    k = ar.shape[-1]
    step = k if not block_k else int(block_k)
    acc = torch.zeros(ar.shape[:-1] + br.shape[-1:], dtype=F64, device=ar.device)
    for s in range(0, k, step):
        acc = (acc + ar[..., s : s + step] @ br[s : s + step]).to(torch.float32).to(F64)
    return acc


def half_cast(x: torch.Tensor, dtype: torch.dtype = torch.float16, scale_exp: int = 0) -> torch.Tensor:
    """x·2^scale_exp cast to ``dtype`` (fp16/bf16) and back to float64, divided by 2^scale_exp.

    Scaling by a power of two is exact (barring overflow/underflow of the scaled value itself), so the result
    differs from ``x`` only by the cast: values below the dtype's normal range lose relative precision (fp16
    subnormals below 6.1e-5, zero below 6e-8) unless ``scale_exp`` lifts them.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    s = math.ldexp(1.0, int(scale_exp))
    return (x.detach().to(F64) * s).to(dtype).to(F64) / s


def half_cast_error(x: torch.Tensor, dtype: torch.dtype = torch.float16, scale_exp: int = 0) -> float:
    """‖half_cast(x, dtype, scale_exp) − x‖ / ‖x‖."""
    return rel_err(half_cast(x, dtype, scale_exp), x)


def pow2_exponent(max_abs: float, dtype: torch.dtype = torch.float16, headroom_exp: int = 1) -> int:
    """The k with max_abs·2^k in [2^(e_max − headroom − 1), 2^(e_max − headroom)), e_max = log2 of the dtype's
    largest power of two (15 for fp16, 127 for bf16): the scale that uses the dtype's whole range from the top.
    ``max_abs`` = 0 gives 0."""
    if max_abs <= 0 or not math.isfinite(max_abs):
        return 0
    e_max = math.floor(math.log2(torch.finfo(dtype).max))
    _, e = math.frexp(max_abs)  # max_abs = m·2^e, m in [0.5, 1)
    return (e_max - headroom_exp) - e


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is exactly zero)."""
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def emulated_error(
    fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    operands: Sequence[torch.Tensor],
    fmt: str,
    *,
    base: str = "fp32",
) -> list[float]:
    """Relative error of each output of fn(operands rounded to ``fmt``) against fn(operands rounded to ``base``).

    ``base`` is what the kernel receives (fp32 inputs: "fp32"), so the error isolates what the operand format
    adds. ``fn`` runs in float64 (e.g. the oracle, or ``level1_emulated`` with fmt="fp64").
    """
    exact = fn(*[round_operand(t, base) for t in operands])
    rounded = fn(*[round_operand(t, fmt) for t in operands])
    if isinstance(exact, torch.Tensor):
        exact, rounded = (exact,), (rounded,)
    return [rel_err(r, e) for r, e in zip(rounded, exact, strict=True)]


def tolerance(err: float, safety: float = 4.0, floor: float = 0.0) -> float:
    """A test tolerance from an emulated error: ``max(safety·err, floor)`` (``floor`` covers what the model
    leaves out, e.g. fp32 rounding of the softmax math, when the emulated error is tiny)."""
    return max(safety * float(err), float(floor))


def level1_emulated(
    xh: torch.Tensor,
    zh: torch.Tensor,
    fmt: str,
    *,
    temperature: float = 0.05,
    similarity: str = "cosine",
    gamma: float = 1.0,
    divergence: str = "structure",
    eps: float = 1e-12,
    round_w: bool = True,
    w_scale_exp: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, ∂D/∂X̂, ∂D/∂Ẑ) of the level-1 core in float64 with every GEMM operand rounded to ``fmt``.

    S^X = r(X̂)r(X̂)ᵀ/τ and S^Z = r(Ẑ)r(Ẑ)ᵀ/τ (rbf: the squared distances from the same rounded Gram and the
    rounded rows' norms), then the exact float64 softmax/divergence math; the gradient GEMMs use r(W)·r(Ẑ)
    (``round_w``: the kernel casts W to the operand format before the second GEMM; ``w_scale_exp`` = k: W·2^k
    is what gets rounded, as a kernel that stores W scaled into the format's normal range). Operand rounding is treated
    as the identity in the backward pass (a straight-through model, as the kernels differentiate). Works on any
    device (on a GPU the N = 4096 model takes well under a second).
    """
    from structure_ops import reference as R

    x = round_operand(xh, fmt).requires_grad_(True)
    z = round_operand(zh, fmt).requires_grad_(True)

    class _RoundGrad(torch.autograd.Function):
        # identity forward; the incoming gradient (W-shaped on S) is rounded as the kernel's GEMM operand
        @staticmethod
        def forward(ctx, s):
            return s.view_as(s)

        @staticmethod
        def backward(ctx, g):
            if not round_w:
                return g
            s = math.ldexp(1.0, int(w_scale_exp))
            return round_operand(g * s, fmt) / s

    with torch.enable_grad():
        def sim(u):
            gram = _RoundGrad.apply(u @ u.T)
            if similarity == "cosine":
                return gram / temperature
            sq = (u * u).sum(dim=1)
            return torch.exp(-gamma * (sq[:, None] + sq[None, :] - 2.0 * gram))

        sx, sz = sim(x), sim(z)
        n = x.shape[0]
        lx, lz = torch.log_softmax(sx, dim=1), torch.log_softmax(sz, dim=1)
        if divergence == "js":
            d = R._js_terms_from_logs(lx, lz).sum() / n
        else:
            d = R._structure_terms(torch.exp(lx), torch.exp(lz), eps).sum() / n
        gx, gz = torch.autograd.grad(d, (x, z))
    return d.detach(), gx, gz


def level1_value(
    xh: torch.Tensor, zh: torch.Tensor, fmt: str, *, temperature: float = 0.05, divergence: str = "structure",
    eps: float = 1e-12,
) -> float:
    """D of the level-1 core (cosine) with the S GEMM operands rounded to ``fmt``, forward only (no autograd
    graph: the cheap model for large N, e.g. N = 4096, d = 1024 on a CPU). float64 math on any device."""
    from structure_ops import reference as R

    with torch.no_grad():
        n = xh.shape[0]
        x, z = round_operand(xh, fmt), round_operand(zh, fmt)
        lx = torch.log_softmax(x @ x.T / temperature, dim=1)
        lz = torch.log_softmax(z @ z.T / temperature, dim=1)
        if divergence == "js":
            return (R._js_terms_from_logs(lx, lz).sum() / n).item()
        return (R._structure_terms(lx.exp_(), lz.exp_(), eps).sum() / n).item()


def level1_w_rows(
    xh: torch.Tensor, zh: torch.Tensor, rows: torch.Tensor, *, temperature: float = 0.05, eps: float = 1e-12
) -> torch.Tensor:
    """N·W restricted to ``rows`` (the row-normalized half of the level-1 gradient weights, "structure" form):
    Q∘(g − ḡ) per row i, what a kernel casts to the operand dtype for the gradient GEMM (before any 1/N). Entries
    are ~1/N for a spread-out softmax; only the rows' own normalizers are needed, so this is O(len(rows)·N·d) at
    any N (the transposed half has the same distribution by symmetry). float64."""
    with torch.no_grad():
        x, z = xh.to(F64), zh.to(F64)
        a = torch.log_softmax(x[rows] @ x.T / temperature, dim=1)
        b = torch.log_softmax(z[rows] @ z.T / temperature, dim=1)
        p, q = a.exp(), b.exp()
        pt, qt = p + eps, q + eps
        d = pt - qt
        t = torch.log1p((d / pt) * (d / qt) * 0.25)
        qg = 0.25 * q * t - 0.25 * pt * (q / qt)
        return qg - q * qg.sum(dim=1, keepdim=True)
