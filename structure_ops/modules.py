"""nn.Module wrappers that hold the hyper-parameters of the losses (docs/spec.md §1–2)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import functional as F_
from ._backends import check_name as check_backend_name

__all__ = ["StructureLoss", "ClipLoss", "StructureClipLoss", "StructureClipOutput", "SigLipLoss", "StructureSigLipLoss"]


class StructureLoss(nn.Module):
    """R_S(x, z) with fixed options; ``forward(x, z)`` calls :func:`structure_ops.structure_loss`."""

    def __init__(self, **options) -> None:
        super().__init__()
        # Validate eagerly on a tiny input so a typo fails at construction, not at step 1000.
        check_backend_name(options.get("backend", "auto"))
        probe = torch.eye(2, 3, dtype=torch.float64)
        F_.structure_loss(probe, probe, **{**options, "backend": "reference"})
        self.options = options

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return F_.structure_loss(x, z, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class ClipLoss(nn.Module):
    """Symmetric InfoNCE with temperature T (logit scale s = 1/T).

    Args:
        temperature: initial T (0.05 in every config of the paper).
        learnable: hold θ = log(1/T) as a parameter and use s = exp(θ) (CLIP's learnable temperature).
        normalize: L2-normalize rows. backend: see :func:`structure_ops.clip_loss`.
    ``forward(image, text, logit_scale=None)``: an explicit ``logit_scale`` (the multiplier s) overrides.
    """

    def __init__(self, temperature: float = 0.05, *, learnable: bool = False, normalize: bool = True, backend: str = "auto"):
        super().__init__()
        temperature = F_._check_number("temperature", temperature, positive=True)  # NaN/inf refused here
        init = torch.tensor(math.log(1.0 / temperature), dtype=torch.float64)
        if learnable:
            self.log_logit_scale = nn.Parameter(init.float())
        else:  # float64, so that float64 inputs get s = 1/T to full precision (the loss casts s to their dtype)
            self.register_buffer("log_logit_scale", init)
        self.normalize, self.backend = normalize, backend

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.logit_scale if logit_scale is None else logit_scale
        return F_.clip_loss(image, text, scale, normalize=self.normalize, backend=self.backend)


class StructureClipOutput(NamedTuple):
    loss: torch.Tensor  # L_clip + λ_t · structure
    clip: torch.Tensor  # L_clip
    structure: torch.Tensor  # ½ [R_S(X_img, a) + R_S(X_txt, b)] (0 when λ_t = 0)
    structure_image: torch.Tensor
    structure_text: torch.Tensor
    lambda_t: float


class StructureClipLoss(nn.Module):
    r"""The paper's objective (docs/spec.md §2): L = L_clip + λ_t · ½ [R_S(X_img, a) + R_S(X_txt, b)],
    λ_t = λ · min(1, (t − 1)/warmup) at optimizer step t (1-based); the regularizer is skipped when λ_t = 0.

    Args:
        lam: λ (10 in the paper). warmup: warm-up steps (1000); 0 disables the warm-up.
        temperature, learnable_temperature: CLIP temperature T and whether s = exp(θ) is learned.
        structure_temperature: τ of R_S (None: tie it to the CLIP temperature T, as the public code does).
        structure_use_only_unimodal: compute R_S on the extra unimodal rows alone.
        **structure_options: levels, weighting, margin, centering, … of :func:`structure_ops.structure_loss`.

    ``forward(image_emb, text_emb, image_feats, text_feats, *, step=None, image_extra=None, text_extra=None)``:
    ``*_extra = (features, embeddings)`` of unpaired rows, stacked under the paired rows for R_S only.
    ``step=None`` uses an internal counter that advances on every forward in training mode.
    """

    def __init__(
        self,
        lam: float = 10.0,
        warmup: int = 1000,
        *,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        structure_temperature: float | None = None,
        structure_use_only_unimodal: bool = False,
        backend: str = "auto",
        **structure_options,
    ) -> None:
        super().__init__()
        lam = F_._check_number("lam", lam, nonnegative=True)  # NaN/inf refused here, not at step 1000
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.lam, self.warmup = float(lam), warmup
        self.clip = ClipLoss(temperature, learnable=learnable_temperature, backend=backend)
        self.structure_temperature = structure_temperature
        self.use_only_unimodal = structure_use_only_unimodal
        self.structure = StructureLoss(
            temperature=structure_temperature if structure_temperature is not None else temperature,
            backend=backend,
            **structure_options,
        )
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

    def lambda_at(self, step: int) -> float:
        """λ_t for optimizer step t (1-based)."""
        if self.warmup == 0:
            return self.lam
        return self.lam * min(1.0, max(0, step - 1) / self.warmup)

    def _check_schedule(self, step: int, lam_t: float) -> None:
        """Hook run before any loss term (structure_ops.distributed checks that every rank agrees on λ_t)."""

    def _rows(self, feats, emb, extra, name):
        if extra is None:
            if self.use_only_unimodal:
                raise ValueError(f"structure_use_only_unimodal=True needs {name}=(features, embeddings)")
            return feats, emb
        if not (isinstance(extra, (tuple, list)) and len(extra) == 2):
            raise TypeError(f"{name} must be a (features, embeddings) pair, got {type(extra).__name__}")
        fx, ex = extra
        if self.use_only_unimodal:
            return fx, ex
        return torch.cat([feats, fx]), torch.cat([emb, ex])

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        *,
        step: int | None = None,
        image_extra=None,
        text_extra=None,
    ) -> StructureClipOutput:
        if step is None:
            if self.training:
                self.step_count += 1
            step = int(self.step_count)
        lam_t = self.lambda_at(step)
        self._check_schedule(step, lam_t)
        clip = self.clip(image_emb, text_emb)
        if lam_t == 0.0:
            zero = clip.new_zeros(())
            return StructureClipOutput(clip, clip, zero, zero, zero, 0.0)
        # R_S keeps the fixed τ it was built with, also when the CLIP temperature is learned.
        xi, ai = self._rows(image_feats, image_emb, image_extra, "image_extra")
        xt, bt = self._rows(text_feats, text_emb, text_extra, "text_extra")
        r_img = self.structure(xi, ai)
        r_txt = self.structure(xt, bt)
        structure = 0.5 * (r_img + r_txt)
        return StructureClipOutput(clip + lam_t * structure, clip, structure, r_img, r_txt, lam_t)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) with a learnable scale and bias, initialized as in the SigLIP paper.

    Args:
        init_logit_scale: initial t' (s = exp(t')); log 10 in the paper.
        init_logit_bias: initial bias b; −10 in the paper.
        learnable: hold t' and b as parameters (default) or as fixed float64 buffers.
        normalize: L2-normalize rows. backend: see :func:`structure_ops.siglip_loss`.
    ``forward(image, text, logit_scale=None, logit_bias=None)``: explicit values (the multiplier s and β) override.
    """

    def __init__(
        self,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        *,
        learnable: bool = True,
        normalize: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        check_backend_name(backend)
        t = torch.tensor(F_._check_number("init_logit_scale", init_logit_scale), dtype=torch.float64)
        b = torch.tensor(F_._check_number("init_logit_bias", init_logit_bias), dtype=torch.float64)
        if learnable:
            self.log_logit_scale = nn.Parameter(t.float())
            self.logit_bias = nn.Parameter(b.float())
        else:  # float64, so that float64 inputs see the values to full precision (the loss casts them)
            self.register_buffer("log_logit_scale", t)
            self.register_buffer("logit_bias", b)
        self.normalize, self.backend = normalize, backend

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale = self.logit_scale if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        return F_.siglip_loss(image, text, scale, bias, normalize=self.normalize, backend=self.backend)


class StructureSigLipLoss(StructureClipLoss):
    r"""SigLIP + STRUCTURE: L = L_siglip + λ_t · ½ [R_S(X_img, a) + R_S(X_txt, b)], with the warm-up, the
    extra unimodal rows and the output of :class:`StructureClipLoss` (whose code it runs: only the contrastive
    term differs). The ``clip`` member is a :class:`SigLipLoss` and the output's ``clip`` field holds L_siglip.

    Args:
        lam, warmup, structure_use_only_unimodal, backend, **structure_options: as StructureClipLoss.
        init_logit_scale, init_logit_bias, learnable: of the :class:`SigLipLoss` (t' = log 10, b = −10, learned).
        structure_temperature: τ of R_S (0.05, the paper's value; SigLIP's scale is not a temperature to tie to).
    """

    def __init__(
        self,
        lam: float = 10.0,
        warmup: int = 1000,
        *,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        learnable: bool = True,
        structure_temperature: float = 0.05,
        structure_use_only_unimodal: bool = False,
        backend: str = "auto",
        **structure_options,
    ) -> None:
        super().__init__(
            lam, warmup, temperature=structure_temperature, structure_temperature=structure_temperature,
            structure_use_only_unimodal=structure_use_only_unimodal, backend=backend, **structure_options,
        )  # fmt: skip
        self.clip = SigLipLoss(init_logit_scale, init_logit_bias, learnable=learnable, backend=backend)
