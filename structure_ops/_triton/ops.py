"""The Triton host functions that implement the structure_ops::triton_* ops (TRITON_IMPLS).

Schemas, fake kernels, autograd and the registration live in structure_ops/_ops.py (shared with the C++
backends). The implementations are registered for CUDA tensors and, for the interpreter (TRITON_INTERPRET=1,
tests without a GPU), for CPU tensors; the registry only routes CPU tensors here when backend="triton" is explicit.
"""

from __future__ import annotations

from . import clip as _clip
from . import knn as _knn
from . import siglip as _siglip
from . import structure as _structure


def _structure_fwd(xh, zh, levels, temperature, weighting, margin, similarity, gamma, divergence, eps, mode, grad_x, grad_z):
    return _structure.structure_fwd(
        xh.contiguous(), zh.contiguous(), levels, temperature, weighting, margin, similarity, gamma, divergence, eps,
        grad_x, grad_z, mode=mode,
    )  # fmt: skip


def _clip_fwd(image, text, logit_scale):
    return _clip.clip_fwd(image.contiguous(), text.contiguous(), logit_scale)


def _clip_bwd(grad, image, text, logit_scale, lse_row, lse_col):
    return _clip.clip_bwd(grad, image.contiguous(), text.contiguous(), logit_scale, lse_row, lse_col)


def _knn_op(a, k):
    return _knn.knn(a.contiguous(), k)


def _siglip_fwd(image, text, logit_scale, logit_bias, row_offset, grad_image, grad_text):
    return _siglip.siglip_fwd(image.contiguous(), text.contiguous(), logit_scale, logit_bias, row_offset, grad_image, grad_text)


# The implementations of the structure_ops::triton_* ops. structure_ops/_ops.py registers them at import
# (for CUDA and CPU tensors) as wrappers that import this module on their first call: this module must not
# register them again (a second registration of an op and dispatch key raises on torch < 2.12). A new
# triton_* op goes into this table and into structure_ops._ops.TRITON_OPS.
TRITON_IMPLS = {
    "triton_structure_fwd": _structure_fwd,
    "triton_clip_fwd": _clip_fwd,
    "triton_clip_bwd": _clip_bwd,
    "triton_knn": _knn_op,
    "triton_siglip_fwd": _siglip_fwd,
}
