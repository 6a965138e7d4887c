"""Shared by the Triton kernels: precision policy, tf32 rounding, device guard, dtypes, interpreter detection,
panel sizing.

TF32 (torch.get_float32_matmul_precision() "high"/"medium" on fp32 inputs): ``tl.dot(..., input_precision="tf32")``
feeds fp32 operands to the tensor cores as they are, and the hardware ignores their low 13 mantissa bits, i.e.
TRUNCATES them toward zero (no cvt.rna in Triton's PTX; upstream triton issue 4574). Truncation biases every
product the same way (|x̃| ≤ |x|): a dot product of two unit vectors shrinks by ~2^-11 on average, so cosine
logits at τ = 0.05 lose ~0.1 % of τ and the error of D is ~7e-4 at N = 4096, d = 1024 where cuBLAS's rounding
(round to nearest, ties away: cvt.rna.tf32.f32) gives ~1e-6 (float64 emulation, tests/emulation/hardware.py).
The kernels therefore round every fp32 tl.dot operand to tf32 themselves (``tf32_rna``: bitcast to uint32, add
half a tf32 ulp, clear the low 13 bits) before a tf32 dot: the hardware then sees operands with nothing left
to truncate and the result is what cuBLAS TF32 computes, up to summation order. Why not "tf32x3": it is three
tensor-core products per dot (the throughput of IEEE-emulating fp32), and "high" is the user's request for
single-pass TF32; "highest" (torch's default) already gives IEEE fp32 dots for those who claim fp32 accuracy.
The rounding is plain integer arithmetic, so the interpreter executes it too: there the dot itself is exact,
and interpreted kernels at "high" reproduce the hardware's rounded operands exactly (the tests compare them with
the float64 model).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernels that take a DOT_PRECISION constexpr pass it to tl.dot(..., input_precision=DOT_PRECISION).
_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}
PRECISIONS = tuple(_PRECISION)  # torch's float32 matmul precision modes


def dot_precision(dtype: torch.dtype, precision: str | None = None) -> str:
    """tl.dot input precision for inputs of ``dtype`` (docs/kernels.md §6).

    fp32 follows ``precision`` (default: torch.get_float32_matmul_precision()): "highest" → IEEE fp32,
    "high"/"medium" → TF32 with operands rounded by the kernel (``round_tf32``; Triton has no bf16 mode for fp32
    operands, and "medium" allows TF32). bf16/fp16 use tensor cores with fp32 accumulation whatever the setting
    (the value is then ignored by tl.dot). fp64 → "ieee".
    """
    if dtype == torch.float32:
        return _PRECISION[precision or torch.get_float32_matmul_precision()]
    return "ieee"


def round_tf32(dtype: torch.dtype, precision: str | None = None) -> bool:
    """Whether the kernels round fp32 dot operands to tf32 (RNA) before tl.dot: exactly when the dot is tf32."""
    return dtype == torch.float32 and dot_precision(dtype, precision) == "tf32"


@triton.jit
def tf32_rna(x):
    # fp32 → the nearest tf32 value (10 mantissa bits), ties away from zero, as cvt.rna.tf32.f32 and cuBLAS: add
    # half a tf32 ulp (0x1000) to the bit pattern and clear the 13 low bits. A carry into the exponent is the next
    # binade (correct), past the largest finite value it is inf (as cvt.rna); inf stays inf; NaN is passed
    # through explicitly (the carry of an all-ones payload would reach the sign bit).
    bits = x.to(tl.uint32, bitcast=True)
    r = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def dot_operand(x, ROUND_TF32: tl.constexpr):
    # An fp32 tl.dot operand as the tf32 tensor cores should see it (see the module docstring).
    if ROUND_TF32:
        return tf32_rna(x)
    return x


# Every kernel launch runs under ``device_guard(t.device)`` of its tensors: Triton launches on the CURRENT CUDA
# device, so a tensor on cuda:1 launched while cuda:0 is current reads another device's memory. The stack of
# guarded devices lets the tests check (behaviourally, on CPU) that each launch path sits inside a guard.
_guard = threading.local()


@contextlib.contextmanager
def device_guard(device: torch.device | str):
    """Make ``device`` current for the launches inside (torch.cuda.device for CUDA; a no-op for CPU tensors in the
    interpreter); records it for ``guarded_device``."""
    device = torch.device(device)
    stack = _guard.__dict__.setdefault("stack", [])
    stack.append(device)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        stack.pop()


def guarded_device() -> torch.device | None:
    """The device of the innermost active ``device_guard`` on this thread (None outside every guard)."""
    stack = getattr(_guard, "stack", None)
    return stack[-1] if stack else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and divergence math: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def panel_rows(n: int, bytes_per_row: int, budget_mb: float | None = None) -> int:
    """Rows per panel so that panel buffers stay within a budget (STRUCTURE_OPS_TRITON_PANEL_MB, default
    256 MiB; at least 1 row, at most n)."""
    mb = budget_mb if budget_mb is not None else float(os.environ.get("STRUCTURE_OPS_TRITON_PANEL_MB", "256"))
    return max(1, min(n, int(mb * (1 << 20)) // max(1, bytes_per_row)))


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))



# ---------------------------------------------------------------------------------------------------------------
# Elementwise and row helpers shared by the kernels (inlined by @triton.jit)
# ---------------------------------------------------------------------------------------------------------------
# Only core builtins inside the kernels (tl.full / tl.reduce, not tl.zeros / tl.sum / tl.max): those are @jit
# functions of triton.language.standard, and when triton was imported before TRITON_INTERPRET=1 was set (torch
# imports triton) the interpreter refuses to call them. Same code on the GPU.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


if INTERPRET:
    # The interpreter reduces with numpy only for the standard combine functions (compared by identity, never
    # called); with our own it runs a Python loop (~3x slower).
    _add = getattr(tl.standard, "_sum_combine", _add)
    _max2 = getattr(tl.standard, "_elementwise_max", _max2)


@triton.jit
def row_sum(x):
    return tl.reduce(x, 1, _add)


@triton.jit
def row_max(x):
    return tl.reduce(x, 1, _max2)


@triton.jit
def log1p(x):
    # No libdevice (portable subset): log1p(x) = log(u)·x/(u − 1), u = fl(1 + x) (Goldberg). u − 1 is exact, and
    # the ratio x/(u − 1) restores what rounding 1 + x lost, so the result is within a few ulp for all x > −1.
    # tl.log is libdevice-accurate on the GPU (not lg2.approx), which this identity needs near u = 1.
    u = 1.0 + x
    d = u - 1.0
    r = tl.log(u) * (x / tl.where(d == 0.0, 1.0, d))
    r = tl.where(d == 0.0, x, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def level1_terms(a, b, eps, ln2, JS: tl.constexpr):
    # The level-1 divergence, elementwise, from log-probabilities a = log P, b = log Q (docs/kernels.md §1).
    # Returns P, Q, term, Q∘g, P∘g_o with g = ∂term/∂Q, g_o = ∂term/∂P up to additive constants (they cancel in
    # g − ḡ because Σ_j Q_ij = 1). ``eps`` and ``ln2`` come in the compute dtype (a float literal would be fp32).
    p = tl.exp(a)
    q = tl.exp(b)
    if JS:
        # log(Q/M) = ln2 − softplus(a − b), log(P/M) = ln2 − softplus(b − a): no ε, never underflows.
        delta = a - b
        sp = tl.maximum(delta, 0.0) + log1p(tl.exp(-tl.abs(delta)))
        log_q_m = ln2 - sp
        log_p_m = ln2 - (sp - delta)
        term = 0.5 * (p * log_p_m + q * log_q_m)
        qg = 0.5 * q * log_q_m
        pg = 0.5 * p * log_p_m
    else:
        # Stable bracket: 2 log M̃ − log P̃ − log Q̃ = log1p((d/P̃)(d/Q̃)/4); the factored product keeps every
        # intermediate within [0, 1/ε] (P̃·Q̃ would underflow for a tiny ε, log1p(−r²) hits −inf in fp32).
        pt = p + eps
        qt = q + eps
        d = pt - qt
        ro = 1.0 / pt
        ra = 1.0 / qt
        t = log1p((d * ro) * (d * ra) * 0.25)
        term = 0.25 * (pt + qt) * t
        # Q·P̃/Q̃ as P̃·(Q/Q̃) ≤ P̃: no 1/ε-sized intermediate.
        qg = 0.25 * q * t - 0.25 * pt * (q * ra)
        pg = 0.25 * p * t - 0.25 * qt * (p * ro)
    return p, q, term, qg, pg
