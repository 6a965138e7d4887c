"""CSA, the closed-form canonical-correlation baseline of the STRUCTURE paper (``train --method csa``).

Both sides are centered; CCA by whitening and an SVD of the whitened cross-covariance:

    C_xx = X̄ᵀX̄/(n−1) + r_x I,   C_yy likewise,   C_xy = X̄ᵀȲ/(n−1)
    M = C_xx^{-1/2} C_xy C_yy^{-1/2} = U S Vᵀ,   W_x = C_xx^{-1/2} U_k,   W_y = C_yy^{-1/2} V_k

and the shared space is the top ``k`` canonical directions: z_x = W_xᵀ(x − μ_x), z_y = W_yᵀ(y − μ_y), whose
coordinates have unit variance, are uncorrelated within each side, and correlate pairwise by the canonical
correlations S (sorted, descending). ``r = ridge · trace(C)/d`` keeps the whitening defined when features
outnumber samples or are collinear. All in float64. The maps are exactly linear heads (weight W_ᵀ, bias
−W_ᵀμ), so a CSA run is saved, evaluated and exported like a trained linear run.

CSA + STRUCTURE (``train --method csa+structure``, :func:`refine_csa`) follows the paper's public code
(``RSMixin._rs_refine`` of its ``src/alignment/cca_class.py``, configs ``configs/csa/csa_structure_*.yaml``):
starting from the CSA projections, W_x and W_y are fine-tuned with Adam (lr 5e-4, 10 epochs, batches of
4 096 shuffled training pairs) on

    L = λ · ½ [R_S(x̄_b, ẑ_x) + R_S(ȳ_b, ẑ_y)] − λ_cca · Σ_b ⟨ẑ_x, ẑ_y⟩ / k,   ẑ = normalize(x̄_b W)

(x̄ the centered features, R_S with L levels, τ = 0.2, 1/l level weights, λ = 10, λ_cca = 1e-2; the second
term keeps the pairs together, "negative trace to avoid degenerate solutions"), then each side is
re-whitened on the whole training set, W ← W (WᵀX̄ᵀX̄W / n)^{-1/2}, so the projections have unit covariance
again as CSA's do. Differences from the public code: the batch order is seeded, R_S is this library's
:func:`structure_ops.functional.structure_loss` (the same semantics), and the final whitening is in float64.
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


@dataclass
class RefineConfig:
    """:func:`refine_csa`'s options; the defaults are the paper code's ``configs/csa/csa_structure_1.yaml``."""

    lam: float = 10.0  # λ of R_S (lambda_rs)
    cca_weight: float = 1e-2  # λ_cca (lambda_cca_coeff) of the pairing term
    levels: int = 1  # L
    temperature: float = 0.2  # τ of R_S
    epochs: int = 10  # refine_epochs
    lr: float = 5e-4
    batch_size: int | None = 4096  # None: the whole training set; larger than it: the whole training set
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for k in ("levels", "epochs"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"refine_csa: {k} must be a positive int, got {v!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 2):
            raise ValueError(f"refine_csa: batch_size must be an int >= 2 or None, got {self.batch_size!r}")
        for k in ("lam", "cca_weight"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) >= 0):
                raise ValueError(f"refine_csa: {k} must be a finite number >= 0, got {getattr(self, k)!r}")
        for k in ("temperature", "lr"):
            if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0):
                raise ValueError(f"refine_csa: {k} must be a finite number > 0, got {getattr(self, k)!r}")


def structure_of(fit: CSA, x: torch.Tensor, y: torch.Tensor, *, levels: int = 1, temperature: float = 0.2,
                 backend: str = "auto") -> float:
    """½ [R_S(x, CSA image map(x)) + R_S(y, CSA text map(y))] on the given rows (one batch, 1/l weights)."""
    from ..functional import structure_loss

    kw = dict(levels=levels, temperature=temperature, weighting="inverse", backend=backend)
    with torch.no_grad():
        zx = ((x.double() - fit.mu_x) @ fit.w_x).float()
        zy = ((y.double() - fit.mu_y) @ fit.w_y).float()
        return 0.5 * float(structure_loss(x.float(), zx, **kw) + structure_loss(y.float(), zy, **kw))


def _whiten(w: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    c = (w.T @ xc.T @ xc @ w) / xc.shape[0]
    return w @ _inv_sqrt(c)


def refine_csa(fit: CSA, x: torch.Tensor, y: torch.Tensor, cfg: RefineConfig | None = None, *, progress=None) -> tuple[CSA, list[dict]]:
    """CSA refined with R_S as in the paper's public code (see the module docstring): Adam on (W_x, W_y) from
    the CSA solution, then both sides re-whitened. ``x``, ``y`` are the paired training rows ``fit`` was fitted
    on. Returns (refined CSA, per-epoch history [{epoch, loss, structure, pairing}]); ``correlations`` of the
    result are the per-direction correlations of its projections on (x, y)."""
    from ..functional import structure_loss

    cfg = cfg or RefineConfig()
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"refine_csa: x and y must be (n, d) with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != fit.w_x.shape[0] or y.shape[1] != fit.w_y.shape[0]:
        raise ValueError(f"refine_csa: the CSA fit maps ({fit.w_x.shape[0]}, {fit.w_y.shape[0]}) features, got x "
                         f"{tuple(x.shape)} and y {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("refine_csa: x or y has NaN or Inf values")
    dev = torch.device(cfg.device)
    n, k = x.shape[0], fit.w_x.shape[1]
    xc = (x.detach().double().cpu() - fit.mu_x).float().to(dev)
    yc = (y.detach().double().cpu() - fit.mu_y).float().to(dev)
    ws = [torch.nn.Parameter(fit.w_x.float().to(dev).clone()), torch.nn.Parameter(fit.w_y.float().to(dev).clone())]
    opt = torch.optim.Adam(ws, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = n if cfg.batch_size is None else min(cfg.batch_size, n)
    kw = dict(levels=cfg.levels, temperature=cfg.temperature, weighting="inverse", backend=cfg.backend)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(dev)
        sums, steps = {"loss": 0.0, "structure": 0.0, "pairing": 0.0}, 0
        for s in range(0, n, bs):
            rows = perm[s : s + bs]
            if len(rows) < 2:  # R_S needs two rows (the public code would pass a 1-row tail; it contributes ~0)
                continue
            bx, by = xc[rows], yc[rows]
            zx = torch.nn.functional.normalize(bx @ ws[0], dim=1)
            zy = torch.nn.functional.normalize(by @ ws[1], dim=1)
            r_s = 0.5 * (structure_loss(bx, zx, **kw) + structure_loss(by, zy, **kw))
            pairing = -(zx * zy).sum() / k
            loss = cfg.lam * r_s + cfg.cca_weight * pairing
            if not torch.isfinite(loss.detach()):
                raise ValueError(f"refine_csa: the loss is {float(loss):g} at epoch {epoch}; pass a smaller lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += loss.item()
            sums["structure"] += r_s.item()
            sums["pairing"] += pairing.item()
            steps += 1
        history.append({"epoch": epoch, **{key: v / max(steps, 1) for key, v in sums.items()}})
        if progress is not None:
            progress(history[-1])
    with torch.no_grad():
        wx = _whiten(ws[0].detach().double().cpu(), xc.double().cpu())
        wy = _whiten(ws[1].detach().double().cpu(), yc.double().cpu())
        zx, zy = xc.double().cpu() @ wx, yc.double().cpu() @ wy
        corr = ((zx - zx.mean(0)) * (zy - zy.mean(0))).sum(0) / (n - 1)
        corr = corr / ((zx.std(0) * zy.std(0)).clamp_min(1e-300))
    if not (torch.isfinite(wx).all() and torch.isfinite(wy).all()):
        raise ValueError("refine_csa: the refined projections are not finite (a collapsed direction); pass a smaller lr")
    return CSA(wx, wy, fit.mu_x.clone(), fit.mu_y.clone(), corr), history


def csa_run(run: str | os.PathLike, layers_rule: str, dim: int = 512, ridge: float = 1e-4, *, name: str | None = None,
            refine: RefineConfig | None = None, manifest: dict | None = None, log=None):
    """Fit CSA on the training split of a run folder and save it as a named training run (linear heads);
    with ``refine``, CSA + STRUCTURE (:func:`refine_csa`). Returns (name, folder, CSA)."""
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

    m = manifest if manifest is not None else read_manifest(run)
    layers = pick_layers(run, layers_rule, m)
    img = run_features(run, m, "image_features", layers=[layers[0]])
    txt = run_features(run, m, "text_features", layers=[layers[1]])
    x, y = paired_rows(img, txt, m["image_of"], m["splits"]["train"], layers)
    fit = fit_csa(x, y, dim, ridge)
    k = fit.w_x.shape[1]
    corr_note = (f"canonical correlations {', '.join(f'{v:.4f}' for v in fit.correlations[:5].tolist())}"
                 f"{' …' if k > 5 else ''}")
    notes = [f"method csa: closed-form CCA, {k} directions, ridge {ridge:g}; {corr_note}"]
    history = []
    if refine is not None:
        before = structure_of(fit, x, y, levels=refine.levels, temperature=refine.temperature, backend=refine.backend) \
            if x.shape[0] <= 4096 else None
        fit, history = refine_csa(fit, x, y, refine, progress=log)
        after = structure_of(fit, x, y, levels=refine.levels, temperature=refine.temperature, backend=refine.backend) \
            if x.shape[0] <= 4096 else None
        notes.append(f"method csa+structure: refined with R_S (λ {refine.lam:g}, pairing weight {refine.cca_weight:g}, "
                     f"L {refine.levels}, τ {refine.temperature:g}, {refine.epochs} epochs of Adam at lr {refine.lr:g}, "
                     f"batch {refine.batch_size}, seed {refine.seed}) and re-whitened"
                     + (f"; R_S on the training pairs {before:.4f} -> {after:.4f}" if before is not None else ""))
    default = f"csa_k{k}_{layers[0]}x{layers[1]}" if refine is None else \
        f"csa+structure_k{k}_lam{refine.lam:g}_L{refine.levels}_{layers[0]}x{layers[1]}" + (f"_seed{refine.seed}" if refine.seed else "")
    name = safe_name(name) if name else safe_name(default)
    folder = train_dir(run, name)
    cfg = dataclasses.replace(TrainConfig(), head="linear", dim=k, lam=0.0 if refine is None else refine.lam, epochs=1,
                              levels=1 if refine is None else refine.levels,
                              seed=0 if refine is None else refine.seed)
    hi, ht = fit.heads()
    res = TrainResult(hi, ht, history=history, best_val=math.nan, best_epoch=0, lr=0.0 if refine is None else refine.lr,
                      notes=notes)
    prov = {"layers": list(layers), **run_provenance(run, m)}
    with run_lock(folder):
        save_heads(folder / "heads.safetensors", res, layers, cfg, (x.shape[1], y.shape[1]), provenance=prov, name=name)
    return name, folder, fit
