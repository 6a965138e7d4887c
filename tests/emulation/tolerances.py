"""GPU test tolerances derived from the float64 hardware models of hardware.py (never fixed numbers for tf32/half).

Each function runs a float64 model of what the device does to one op's arithmetic (operands rounded as tensor
cores or cuBLAS round them, outputs cast to the input dtype) on the test's own inputs, measures the model's
relative error per output against the exact float64 result, and turns it into a tolerance with
``hardware.tolerance(err, safety, floor)``. ``floor`` is the one number each function states: the error of what
the model leaves out (fp32 softmax/divergence math, summation order), which the IEEE-fp32 tests of the same
file bound.
"""

from __future__ import annotations

import math

import torch

from . import hardware

F64 = torch.float64
SAFETY = 4.0
HALF = (torch.bfloat16, torch.float16)
# Relative error floor of the fp32 parts the models do not round (softmax, log-sum-exp, divergence math and GEMM
# summation order): what the IEEE-fp32 tests of tests/test_cuda_*.py bound at the same sizes.
FP32_FLOOR = {"small": 2e-5, "realistic": 1e-4}


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of one round-to-nearest cast to ``dtype`` (2^-p, p = significand bits)."""
    return float(torch.finfo(dtype).eps) / 2.0


def output_cast(refs, dtype: torch.dtype, safety: float = SAFETY, floor: float = FP32_FLOOR["small"]) -> list[float]:
    """Tolerances for outputs computed in fp32 and returned in a half ``dtype`` (the kernels' half-input path: exact
    upcast of the inputs, fp32 math, one cast of each output): per output, the model error is half_cast_error(ref),
    and the floor is the larger of ``floor`` and the dtype's unit roundoff (the cast of a 0-dim output, one number,
    can reach it)."""
    out = []
    for r in refs:
        err = hardware.half_cast_error(r.detach().to(F64).cpu(), dtype)
        out.append(hardware.tolerance(err, safety, max(floor, unit_roundoff(dtype))))
    return out


def structure_tf32(xh, zh, ref, *, temperature=0.05, similarity="cosine", gamma=1.0, divergence="structure",
                   eps=1e-12, safety=SAFETY, floor=FP32_FLOOR["realistic"]) -> list[float]:  # fmt: skip
    """Tolerances (loss, ∂/∂X̂, ∂/∂Ẑ) of the level-1 op with fp32 inputs under torch's "high" matmul precision:
    cuBLAS TF32 rounds every GEMM operand (X̂, Ẑ for the Gram panels, W and Ẑ for the gradient GEMMs) to tf32
    (nearest, ties away): hardware.level1_emulated(..., "tf32") against the exact oracle values ``ref``."""
    model = hardware.level1_emulated(
        xh.detach().to(F64), zh.detach().to(F64), "tf32", temperature=temperature, similarity=similarity, gamma=gamma,
        divergence=divergence, eps=eps,
    )  # fmt: skip
    return [hardware.tolerance(hardware.rel_err(m, r), safety, floor) for m, r in zip(model, ref, strict=True)]


def structure_half(xh, zh, ref, dtype, *, temperature=0.05, similarity="cosine", gamma=1.0, divergence="structure",
                   eps=1e-12, safety=SAFETY, floor=FP32_FLOOR["small"]) -> list[float]:  # fmt: skip
    """Tolerances (loss, ∂/∂X̂, ∂/∂Ẑ) of the level-1 op with bf16/fp16 inputs on the CUDA tensor-core path
    (csrc/cuda/structure_cuda.cu): exact half operands and products in the Gram GEMMs, fp32 softmax/divergence
    math, W rounded to ``dtype`` as the operand of both gradient GEMMs (fp16: W stored as 2⁹·N·W, modelled by a
    power-of-two scale of the same size, so the same relative rounding), fp32 accumulation, every output cast
    to ``dtype``: hardware.level1_emulated(..., fmt, w_scale_exp=k), then hardware.half_cast, against ``ref``."""
    fmt = "bf16" if dtype == torch.bfloat16 else "fp16"
    n = xh.shape[0]
    # the model rounds ∂D/∂Gram: W/τ (cosine) or 2γ·S∘W (rbf); the kernel stores 2⁹·N·W (S∘W): scale by the ratio
    ratio = n * 512.0 * (temperature if similarity == "cosine" else 1.0 / (2.0 * gamma))
    k = round(math.log2(ratio)) if dtype == torch.float16 else 0
    model = hardware.level1_emulated(
        xh.detach().to(F64), zh.detach().to(F64), fmt, temperature=temperature, similarity=similarity, gamma=gamma,
        divergence=divergence, eps=eps, w_scale_exp=k,
    )  # fmt: skip
    u = unit_roundoff(dtype)
    out = []
    for m, r in zip(model, ref, strict=True):
        cast = hardware.half_cast(m.reshape(-1), dtype).reshape(m.shape)
        out.append(hardware.tolerance(hardware.rel_err(cast, r), safety, max(floor, u)))
    return out


def clip_half(a, b, s, grad, dtype, safety=SAFETY, floor=FP32_FLOOR["small"]) -> dict[str, float]:
    """Tolerances of clip_fwd/clip_bwd with half (bf16/fp16) inputs, from a float64 model of clip_cuda.cu's half
    path: logits from exact products (a half product is exact in fp32), fp32 statistics; backward
    E = e^{L−r} + e^{L−c} − 2I rounded to ``dtype`` as the operand of both tensor-core GEMMs, dA = f·E B and
    dB = f·Eᵀ A (f = s·g/2N applied to the fp32 results), outputs cast to ``dtype``. Keys: loss, grad_a, grad_b,
    grad_s (ds = f·Σ E∘(A Bᵀ) uses the unrounded E in fp32: only the floor applies)."""
    a64, b64 = a.detach().to(F64), b.detach().to(F64)
    s64 = float(s.detach().to(F64).reshape(()))
    n = a64.shape[0]
    logits = s64 * (a64 @ b64.T)
    r, c = logits.logsumexp(1, keepdim=True), logits.logsumexp(0, keepdim=True)
    e = torch.exp(logits - r) + torch.exp(logits - c) - 2.0 * torch.eye(n, dtype=F64, device=a64.device)
    f = s64 * float(grad) / (2.0 * n)
    da, db = f * (e @ b64), f * (e.T @ a64)
    er = hardware.round_operand(e, "bf16" if dtype == torch.bfloat16 else "fp16")
    da_m = hardware.half_cast(f * (er @ b64), dtype)
    db_m = hardware.half_cast(f * (er.T @ a64), dtype)
    loss = ((r.squeeze(1) - logits.diagonal()).sum() + (c.squeeze(0) - logits.diagonal()).sum()) / (2.0 * n)
    u = unit_roundoff(dtype)
    return {
        "loss": hardware.tolerance(hardware.half_cast_error(loss.reshape(1), dtype), safety, max(floor, u)),
        "grad_a": hardware.tolerance(hardware.rel_err(da_m, da), safety, max(floor, u)),
        "grad_b": hardware.tolerance(hardware.rel_err(db_m, db), safety, max(floor, u)),
        "grad_s": hardware.tolerance(0.0, safety, max(floor, unit_roundoff(s.dtype)) if s.dtype in HALF else floor),
    }
