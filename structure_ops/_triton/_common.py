"""Shared by the Triton kernels: precision policy, dtypes, interpreter detection, panel sizing."""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernels that take a DOT_PRECISION constexpr pass it to tl.dot(..., input_precision=DOT_PRECISION).
_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for inputs of ``dtype`` (KERNELS.md §6).

    fp32 follows torch.get_float32_matmul_precision(): "highest" → IEEE fp32, "high"/"medium" → TF32
    (Triton has no bf16 mode for fp32 operands; "medium" allows TF32). bf16/fp16 use tensor cores with
    fp32 accumulation whatever the setting (the value is then ignored by tl.dot). fp64 → "ieee". The
    interpreter computes every dot in full precision, so tests there see IEEE results.
    """
    if dtype == torch.float32:
        return _PRECISION[torch.get_float32_matmul_precision()]
    return "ieee"


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

