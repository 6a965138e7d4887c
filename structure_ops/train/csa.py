"""CSA, the closed-form canonical-correlation baseline of the STRUCTURE paper (``train --method csa``).

Both sides are centered; CCA by whitening and an SVD of the whitened cross-covariance:

    C_xx = X̄ᵀX̄/(n−1) + r_x I,   C_yy likewise,   C_xy = X̄ᵀȲ/(n−1)
    M = C_xx^{-1/2} C_xy C_yy^{-1/2} = U S Vᵀ,   W_x = C_xx^{-1/2} U_k,   W_y = C_yy^{-1/2} V_k

and the shared space is the top ``k`` canonical directions: z_x = W_xᵀ(x − μ_x), z_y = W_yᵀ(y − μ_y), whose
coordinates have unit variance, are uncorrelated within each side, and correlate pairwise by the canonical
correlations S (sorted, descending). ``r = ridge · trace(C)/d`` keeps the whitening defined when features
outnumber samples or are collinear. All in float64. The maps are exactly linear heads (weight W_ᵀ, bias
−W_ᵀμ), so a CSA run is saved, evaluated and exported like a trained linear run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch


@dataclass
class CSA:
    w_x: torch.Tensor  # (d_x, k)
    w_y: torch.Tensor  # (d_y, k)
    mu_x: torch.Tensor
    mu_y: torch.Tensor
    correlations: torch.Tensor  # (k,), descending

    def heads(self):
        """(image head, text head): :class:`~structure_ops.train.heads.LinearHead` computing z = Wᵀ(x − μ)."""
        from .heads import LinearHead

        out = []
        for w, mu in ((self.w_x, self.mu_x), (self.w_y, self.mu_y)):
            h = LinearHead(w.shape[0], w.shape[1])
            with torch.no_grad():
                h.weight.copy_(w.T.float())
                h.bias.copy_((-(mu @ w)).float())
            out.append(h.eval())
        return out[0], out[1]


def _inv_sqrt(c: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(c)
    return (evecs * evals.clamp_min(torch.finfo(c.dtype).tiny).rsqrt()) @ evecs.T


def fit_csa(x: torch.Tensor, y: torch.Tensor, dim: int, ridge: float = 1e-4) -> CSA:
    """CCA of paired rows ``x`` (n, d_x) and ``y`` (n, d_y); ``dim`` directions (at most min(d_x, d_y, n − 1))."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_csa: x and y must be (n, d) with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"fit_csa: needs at least 3 paired rows, got {n}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("fit_csa: x or y has NaN or Inf values")
    if not ridge >= 0:
        raise ValueError(f"fit_csa: ridge must be >= 0, got {ridge}")
    k = min(dim, x.shape[1], y.shape[1], n - 1)
    if k < 1:
        raise ValueError(f"fit_csa: dim must be >= 1, got {dim}")
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y

    def cov(a, b):
        return a.T @ b / (n - 1)

    def reg(c):
        r = ridge * float(torch.trace(c)) / c.shape[0]
        return c + (r if r > 0 else 0.0) * torch.eye(c.shape[0], dtype=c.dtype)

    cxx, cyy = reg(cov(xc, xc)), reg(cov(yc, yc))
    wx, wy = _inv_sqrt(cxx), _inv_sqrt(cyy)
    u, s, vh = torch.linalg.svd(wx @ cov(xc, yc) @ wy, full_matrices=False)
    return CSA(wx @ u[:, :k], wy @ vh[:k].T, mu_x, mu_y, s[:k].clone())


def csa_run(run: str | os.PathLike, layers_rule: str, dim: int = 512, ridge: float = 1e-4, *, name: str | None = None):
    """Fit CSA on the training split of a run folder and save it as a named training run (linear heads).
    Returns (name, folder, CSA)."""
    from .pipeline import (
        paired_rows,
        pick_layers,
        read_manifest,
        run_features,
        run_lock,
        run_provenance,
        safe_name,
        save_heads,
        train_dir,
    )
    from .trainer import TrainConfig, TrainResult

    m = read_manifest(run)
    layers = pick_layers(run, layers_rule, m)
    img = run_features(run, m, "image_features", layers=[layers[0]])
    txt = run_features(run, m, "text_features", layers=[layers[1]])
    x, y = paired_rows(img, txt, m["image_of"], m["splits"]["train"], layers)
    fit = fit_csa(x, y, dim, ridge)
    k = fit.w_x.shape[1]
    name = safe_name(name) if name else safe_name(f"csa_k{k}_{layers[0]}x{layers[1]}")
    folder = train_dir(run, name)
    cfg = dataclasses.replace(TrainConfig(), head="linear", dim=k, lam=0.0, epochs=1)
    hi, ht = fit.heads()
    res = TrainResult(hi, ht, history=[], best_val=math.nan, best_epoch=0, lr=0.0,
                      notes=[f"method csa: closed-form CCA, {k} directions, ridge {ridge:g}; canonical correlations "
                             f"{', '.join(f'{v:.4f}' for v in fit.correlations[:5].tolist())}{' …' if k > 5 else ''}"])
    prov = {"layers": list(layers), **run_provenance(run, m)}
    with run_lock(folder):
        save_heads(folder / "heads.safetensors", res, layers, cfg, (x.shape[1], y.shape[1]), provenance=prov, name=name)
    return name, folder, fit
