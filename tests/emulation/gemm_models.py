"""cuBLAS TF32 GEMMs for the emulated CUDA builds: ``with cublas_tf32(): ...`` rounds the fp32 operands of every
aten GEMM the ops call (mm, addmm, their in-place and out= forms) to tf32 as cuBLAS does under torch's "high"
float32 matmul precision (nearest, ties away: hardware.tf32_round), then multiplies in IEEE fp32 on the CPU.

A TorchDispatchMode sees the aten calls that the C++ host code of the emulated .cu files makes (at::mm, at::mm_out,
Tensor::addmm_), so the kernels' whole pipeline runs with TF32 GEMM operands: the GPU tests' TF32 tolerances
(tolerances.structure_tf32, from hardware.level1_emulated) can be checked against it on a CPU. It models the operand
rounding only; cuBLAS's summation order and split-K are not modelled (fp32 accumulation either way).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import hardware

_aten = torch.ops.aten
# op → positions of the two matrix operands in args
_GEMMS = {
    _aten.mm.default: (0, 1),
    _aten.mm.out: (0, 1),
    _aten.addmm.default: (1, 2),
    _aten.addmm.out: (1, 2),
    _aten.addmm_.default: (1, 2),
}


def _tf32(t: torch.Tensor) -> torch.Tensor:
    return hardware.tf32_round(t).to(torch.float32).reshape(t.shape)


class _TF32Mode(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pos = _GEMMS.get(func)
        if pos is not None and all(args[p].dtype == torch.float32 for p in pos):
            args = list(args)
            for p in pos:
                args[p] = _tf32(args[p])
            self.counts["gemms"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def cublas_tf32():
    """Inside, fp32 GEMM operands are rounded to tf32 (yields a dict counting the GEMMs so rounded)."""
    counts = {"gemms": 0}
    with _TF32Mode(counts):
        yield counts
