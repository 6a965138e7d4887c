"""Registers the Triton host functions as implementations of the structure_ops::triton_* ops.

Schemas, fake kernels and autograd live in structure_ops/_ops.py (shared with the C++ backends). The
implementations are registered for CUDA tensors and, for the interpreter (TRITON_INTERPRET=1, tests without a
GPU), for CPU tensors; the registry only routes CPU tensors here when backend="triton" is explicit.
"""

from __future__ import annotations

import torch

from . import clip as _clip
from . import knn as _knn
from . import siglip as _siglip
from . import structure as _structure

_DEVICES = ("cuda", "cpu")


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


torch.library.register_kernel("structure_ops::triton_structure_fwd", _DEVICES, _structure_fwd)
torch.library.register_kernel("structure_ops::triton_clip_fwd", _DEVICES, _clip_fwd)
torch.library.register_kernel("structure_ops::triton_clip_bwd", _DEVICES, _clip_bwd)
torch.library.register_kernel("structure_ops::triton_knn", _DEVICES, _knn_op)


def _siglip_fwd(image, text, logit_scale, logit_bias, row_offset, grad_image, grad_text):
    return _siglip.siglip_fwd(image.contiguous(), text.contiguous(), logit_scale, logit_bias, row_offset, grad_image, grad_text)


torch.library.register_kernel("structure_ops::triton_siglip_fwd", _DEVICES, _siglip_fwd)
