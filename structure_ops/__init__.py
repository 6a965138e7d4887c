"""structure-ops: fused, exact, memory-bounded STRUCTURE and CLIP losses for multimodal alignment.

Public API::

    structure_ops.structure_loss(x, z, *, levels=1, temperature=0.05, ..., backend="auto")
    structure_ops.clip_loss(image, text, logit_scale, *, normalize=True, backend="auto")
    structure_ops.siglip_loss(image, text, logit_scale, logit_bias, *, normalize=True, backend="auto")
    structure_ops.mutual_knn(a, b, k="rice", *, backend="auto"), structure_ops.knn(a, k)
    structure_ops.cka(a, b, *, unbiased=False)
    StructureLoss, ClipLoss, StructureClipLoss, SigLipLoss, StructureSigLipLoss (nn.Modules)
    structure_ops.reference: the float64 oracle with the same signatures

Importing the package never imports triton and never queries CUDA.
"""

from . import reference
from ._backends import AUTO_ORDER, BACKENDS
from .functional import cka, clip_loss, knn, mutual_knn, mutual_knn_from_indices, siglip_loss, structure_loss
from .modules import (
    ClipLoss,
    SigLipLoss,
    StructureClipLoss,
    StructureClipOutput,
    StructureLoss,
    StructureSigLipLoss,
)

__version__ = "0.1.0"

__all__ = [
    "structure_loss",
    "clip_loss",
    "siglip_loss",
    "knn",
    "mutual_knn",
    "mutual_knn_from_indices",
    "cka",
    "StructureLoss",
    "ClipLoss",
    "StructureClipLoss",
    "StructureClipOutput",
    "SigLipLoss",
    "StructureSigLipLoss",
    "reference",
    "BACKENDS",
    "AUTO_ORDER",
    "__version__",
]
