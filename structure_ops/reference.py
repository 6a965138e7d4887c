r"""The float64-capable PyTorch oracle: plain autograd code that defines what every backend computes.

Everything here runs on any device and dtype in the input's own precision (the losses compute fp16/bf16
inputs in float32 and return their dtype, see compute_dtype); pass float64 tensors to get the oracle.
Optimized backends are tested against this module, never the other way round.

STRUCTURE regularizer (docs/spec.md §1), per input U ∈ {X, Z}:

    Û = center(normalize(U))            (or normalize(center(U)) with center_first=True)
    S = Û Ûᵀ / τ                        (cosine)   or   S_ij = exp(-γ ‖û_i - û_j‖²)   (rbf; the squared
                                        distance clamped at 0, exactly 0 on the diagonal)
    P = softmax(S, dim=1),   P⁽ˡ⁾ = Pˡ
    D_l = (1/N) Σ_ij ½ M̃ (2 log M̃ - log Õ - log Ã),   Õ = O + ε, Ã = A + ε, M̃ = (Õ + Ã)/2
    R_S = (1/L) Σ_l w_l · max(D_l - margin, 0),          w_l = 1 or 1/l

with O = P_X⁽ˡ⁾ and A = P_Z⁽ˡ⁾. The bracket is evaluated in the exact, cancellation-free form
2 log M̃ - log Õ - log Ã = log1p((Õ - Ã)² / (4 Õ Ã)), which is what the public code's three logs
compute, without the catastrophic cancellation near Õ ≈ Ã that makes the literal fp32 form useless.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._options import (
    CENTERINGS,
    DIVERGENCES,
    SIMILARITIES,
    WEIGHTINGS,
    option_code,
    resolve_k,
)

__all__ = [
    "normalize_rows",
    "prepare",
    "similarity",
    "structure_divergence",
    "structure_loss",
    "structure_core",
    "structure_core_level1_grad",
    "clip_loss",
    "siglip_loss",
    "knn",
    "mutual_knn",
    "cka",
]


# --------------------------------------------------------------------------------------------------
# Preprocessing: row normalization and batch centering (O(N·d), autograd handles the Jacobians)
# --------------------------------------------------------------------------------------------------
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in for inputs of these dtypes: the widest of them (type promotion),
    and float32 when that is a half type (fp16/bf16 cannot hold ε = 1e-12 or the underflowing
    probabilities of a sharp softmax; every backend computes half inputs in fp32)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return torch.float32 if out in HALF_DTYPES else out


def _pow2_below(m: torch.Tensor) -> torch.Tensor:
    """The power of two 2^(e−1) with m = f · 2^e, ½ ≤ f < 1 (so 2^(e−1) ≤ m < 2^e), elementwise; 0.5 for m = 0."""
    return torch.ldexp(torch.ones_like(m), torch.frexp(m)[1] - 1)


def normalize_rows(u: torch.Tensor, eps: float | torch.Tensor = 1e-12) -> torch.Tensor:
    """Row L2 normalization u / max(‖u‖₂, ε) that cannot overflow or underflow in the norm.

    Each row is first divided by the power of two just below its largest |entry| (detached; an exact
    operation), so the squares summed by the norm are at most 4·d: fp16 rows with norm > 65 504 and
    fp32/bf16 rows with entries ~1e19 normalize correctly instead of becoming zero rows (F.normalize's
    norm overflows to inf there). Same map and same gradient as F.normalize(u, dim=1, eps=ε) wherever
    that one does not overflow. Half inputs are normalized in fp32 and returned in their own dtype.
    """
    out_dtype = u.dtype
    if u.dtype in (torch.float16, torch.bfloat16):
        u = u.float()
    s = _pow2_below(u.detach().abs().amax(dim=1, keepdim=True))
    us = u / s
    norm = torch.linalg.vector_norm(us, dim=1, keepdim=True)
    return (us / torch.maximum(norm, eps / s)).to(out_dtype)


def _center(u: torch.Tensor, centering: str) -> torch.Tensor:
    if centering == "none":
        return u
    if centering == "mean":
        return u - u.mean(dim=0, keepdim=True)
    # "standard": divide by the unbiased (N-1) std, floored relative to the column's magnitude: a constant
    # column leaves a rounding residual of ~eps·|u| after the mean is removed, which must map to ~1, not
    # to 1e290 (then NaN).
    finfo = torch.finfo(u.dtype)
    floor = (finfo.eps * u.detach().abs().amax(dim=0, keepdim=True)).clamp_min(finfo.tiny)
    u = u - u.mean(dim=0, keepdim=True)
    return u / torch.maximum(u.std(dim=0, keepdim=True), floor)


def prepare(u: torch.Tensor, *, centering: str = "mean", center_first: bool = False) -> torch.Tensor:
    """Row L2 normalization x / max(‖x‖₂, 1e-12) and batch centering, in the order of docs/spec.md §1.

    Default order: normalize, then center over the rows (dim 0). ``center_first=True`` centers the raw
    rows and then normalizes. ``centering="standard"`` also divides by the per-column unbiased std.
    The public code skips the normalization when every row already has unit norm (±1e-6); we always
    divide, which is the same map and keeps the function free of data-dependent branches.
    """
    option_code("centering", centering, CENTERINGS)
    if u.dtype in (torch.float16, torch.bfloat16):  # fp32 statistics for half inputs, returned in their dtype
        return prepare(u.float(), centering=centering, center_first=center_first).to(u.dtype)
    if center_first:
        # Centering is linear and the normalization scale-invariant: center u / 2^k (k from the largest
        # |entry|, detached; exact) so that differences of huge entries cannot overflow, then normalize
        # with ε / 2^k, which is the same map as normalizing the unscaled centered rows with ε.
        s = _pow2_below(u.detach().abs().amax()).to(u.dtype)
        return normalize_rows(_center(u / s, centering), eps=1e-12 / s)
    return _center(normalize_rows(u), centering)


def similarity(u: torch.Tensor, *, similarity: str = "cosine", temperature: float = 0.05, gamma: float = 1.0):
    """Similarity logits S (N × N): Û Ûᵀ / τ for "cosine", exp(-γ ‖û_i - û_j‖²) for "rbf" (no τ)."""
    option_code("similarity", similarity, SIMILARITIES)
    gram = u @ u.T
    if similarity == "cosine":
        return gram / temperature
    return torch.exp(-gamma * rbf_sq_dist(u, gram))


def rbf_sq_dist(u: torch.Tensor, gram: torch.Tensor, row0: int = 0) -> torch.Tensor:
    """‖û_i − û_j‖² = ‖û_i‖² + ‖û_j‖² − 2⟨û_i, û_j⟩ for the rows [row0, row0 + gram.shape[0]) of u against
    all rows, clamped at 0 and exactly 0 on the diagonal: rounding leaves ~1e-7 (fp32) there, which a large
    γ turns into exp(−γ·1e-7) ≪ 1 for the self-similarity, or, when negative, into an overflowing exp."""
    sq = (u * u).sum(dim=1)
    d2 = (sq[row0 : row0 + gram.shape[0], None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    rows = torch.arange(row0, row0 + gram.shape[0], device=u.device)[:, None]
    return torch.where(rows == torch.arange(u.shape[0], device=u.device)[None, :], 0.0, d2)


# --------------------------------------------------------------------------------------------------
# Divergences between row-stochastic matrices
# --------------------------------------------------------------------------------------------------
def _structure_terms(o: torch.Tensor, a: torch.Tensor, eps: float) -> torch.Tensor:
    """Elementwise ½ M̃ (2 log M̃ - log Õ - log Ã) in the stable form ½ M̃ log1p((Õ-Ã)²/(4ÕÃ))."""
    ot, at = o + eps, a + eps
    d = ot - at
    return 0.25 * (ot + at) * torch.log1p((d / ot) * (d / at) * 0.25)


def _js_terms_from_logs(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """Elementwise ½[O log(O/M) + A log(A/M)], M = (O+A)/2, from log-probabilities (never underflows).

    log(O/M) = ln2 - softplus(lb - la), log(A/M) = ln2 - softplus(la - lb).
    """
    ln2 = math.log(2.0)
    return 0.5 * (
        torch.exp(la) * (ln2 - F.softplus(lb - la)) + torch.exp(lb) * (ln2 - F.softplus(la - lb))
    )


def _js_terms_from_probs(o: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Elementwise JS terms on probabilities (levels ≥ 2), with entries clamped at the dtype's smallest
    normal number so that underflowed zeros give finite values; the gradient is zero where clamped."""
    tiny = torch.finfo(o.dtype).tiny
    o, a = o.clamp_min(tiny), a.clamp_min(tiny)
    lm = torch.log(0.5 * (o + a))
    return 0.5 * (o * (torch.log(o) - lm) + a * (torch.log(a) - lm))


def structure_divergence(o: torch.Tensor, a: torch.Tensor, *, divergence: str = "structure", eps: float = 1e-12):
    """D(O, A) = (1/N) Σ_ij term(O_ij, A_ij) for row-stochastic N × N matrices O and A.

    ``"structure"``: ½[KL(M̃‖Ã) + KL(M̃‖Õ)] with ε (the public code; KL in the M‖· direction, not
    bounded by log 2). ``"js"``: ½[KL(O‖M) + KL(A‖M)], the textbook Jensen–Shannon divergence.
    """
    option_code("divergence", divergence, DIVERGENCES)
    n = o.shape[0]
    if divergence == "structure":
        return _structure_terms(o, a, eps).sum() / n
    return _js_terms_from_probs(o, a).sum() / n


# --------------------------------------------------------------------------------------------------
# STRUCTURE regularizer
# --------------------------------------------------------------------------------------------------
def structure_core(
    xh: torch.Tensor,
    zh: torch.Tensor,
    *,
    levels: int = 1,
    temperature: float = 0.05,
    weighting: str = "none",
    margin: float = 0.0,
    similarity_kind: str = "cosine",
    gamma: float = 1.0,
    divergence: str = "structure",
    eps: float = 1e-12,
) -> torch.Tensor:
    """R_S on already normalized-and-centered inputs X̂, Ẑ: the N × N part that backends implement."""
    option_code("weighting", weighting, WEIGHTINGS)
    option_code("divergence", divergence, DIVERGENCES)
    n = xh.shape[0]
    sx = similarity(xh, similarity=similarity_kind, temperature=temperature, gamma=gamma)
    sz = similarity(zh, similarity=similarity_kind, temperature=temperature, gamma=gamma)
    lx, lz = torch.log_softmax(sx, dim=1), torch.log_softmax(sz, dim=1)
    px, pz = torch.exp(lx), torch.exp(lz)
    total = xh.new_zeros(())
    ox, oz = px, pz
    for level in range(1, levels + 1):
        if level > 1:
            ox, oz = ox @ px, oz @ pz  # incremental powers: one product per level per side
        if divergence == "js" and level == 1:
            d = _js_terms_from_logs(lx, lz).sum() / n
        else:
            d = structure_divergence(ox, oz, divergence=divergence, eps=eps)
        d = torch.relu(d - margin)
        w = 1.0 if weighting == "none" else 1.0 / level
        total = total + w * d
    return total / levels


def structure_loss(
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    levels: int = 1,
    temperature: float = 0.05,
    weighting: str = "none",
    margin: float = 0.0,
    centering: str = "mean",
    center_first: bool = False,
    similarity: str = "cosine",
    gamma: float = 1.0,
    divergence: str = "structure",
    eps: float = 1e-12,
) -> torch.Tensor:
    r"""STRUCTURE regularizer R_S(X, Z) (docs/spec.md §1), the oracle. Same signature as
    :func:`structure_ops.structure_loss` without ``backend``.

    Args:
        x: frozen features, (N, d_x). z: aligned embeddings, (N, d_z), same row order.
        levels: L ≥ 1 random-walk levels P¹ … Pᴸ. temperature: τ > 0 of the cosine logits.
        weighting: "none" (w_l = 1) or "inverse" (w_l = 1/l). margin: D_l ← max(D_l − margin, 0).
        centering: "mean" | "standard" | "none" over the batch. center_first: center before normalizing.
        similarity: "cosine" or "rbf" (exp(−γ‖û_i − û_j‖²), τ unused). divergence: "structure" | "js".
        eps: the ε of the "structure" form.
    Returns:
        0-dim tensor in the inputs' dtype. Half inputs (fp16/bf16) are computed in float32 (at fp16's
        precision ε = 1e-12 rounds to 0 and underflowed probabilities would give 0/0) and the result and
        gradients are returned in the input dtypes; pass float64 for the oracle.
    """
    out_dtype = torch.promote_types(x.dtype, z.dtype)
    cdt = compute_dtype(x.dtype, z.dtype)
    xh = prepare(x.to(cdt), centering=centering, center_first=center_first)
    zh = prepare(z.to(cdt), centering=centering, center_first=center_first)
    return structure_core(
        xh,
        zh,
        levels=levels,
        temperature=temperature,
        weighting=weighting,
        margin=margin,
        similarity_kind=similarity,
        gamma=gamma,
        divergence=divergence,
        eps=eps,
    ).to(out_dtype)


def structure_core_level1_grad(
    xh: torch.Tensor,
    zh: torch.Tensor,
    *,
    temperature: float = 0.05,
    similarity_kind: str = "cosine",
    gamma: float = 1.0,
    divergence: str = "structure",
    eps: float = 1e-12,
) -> torch.Tensor:
    r"""Analytic ∂D_1/∂Ẑ of the level-1 core (docs/kernels.md §1), the formula the kernels implement.

    With a = log P, b = log Q (row log-softmax of S^X, S^Z) and any row loss ℓ_i = Σ_j f(P_ij, Q_ij):

        g_ij = ∂f/∂Q_ij,   ḡ_i = Σ_j Q_ij g_ij,   W = dS^Z = Q ∘ (g − ḡ) / N
        "structure": g = ¼ log1p((P̃−Q̃)²/(4P̃Q̃)) − ¼ P̃/Q̃      (constants cancel since Σ_j Q_ij = 1)
        "js":        g = ½ log(Q/M) = ½ (ln2 − softplus(a − b))
        cosine: dẐ = (W + Wᵀ) Ẑ / τ
        rbf:    K = 2γ S ∘ W,  dẐ = (K + Kᵀ) Ẑ − (K·1 + Kᵀ·1) ∘ Ẑ

    Tested against autograd of :func:`structure_core` (levels=1, margin=0).
    """
    n = xh.shape[0]
    sx = similarity(xh, similarity=similarity_kind, temperature=temperature, gamma=gamma)
    sz = similarity(zh, similarity=similarity_kind, temperature=temperature, gamma=gamma)
    a, b = torch.log_softmax(sx, dim=1), torch.log_softmax(sz, dim=1)
    p, q = torch.exp(a), torch.exp(b)
    if divergence == "structure":
        pt, qt = p + eps, q + eps
        d = pt - qt
        t = torch.log1p((d / pt) * (d / qt) * 0.25)
        qg = 0.25 * q * t - 0.25 * pt * (q / qt)
    else:
        qg = q * 0.5 * (math.log(2.0) - F.softplus(a - b))
    gbar = qg.sum(dim=1, keepdim=True)
    w = (qg - q * gbar) / n
    if similarity_kind == "cosine":
        return (w + w.T) @ zh / temperature
    k = 2.0 * gamma * sz * w
    return (k + k.T) @ zh - (k.sum(dim=1, keepdim=True) + k.sum(dim=0)[:, None]) * zh


# --------------------------------------------------------------------------------------------------
# CLIP / InfoNCE
# --------------------------------------------------------------------------------------------------
def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, *, normalize: bool = True):
    r"""Symmetric InfoNCE (open_clip's ClipLoss): L = s · a bᵀ,
    loss = ½ [CE(L, diag) + CE(Lᵀ, diag)], mean over rows; ``logit_scale`` is the multiplier s.
    Half inputs are computed in float32 and the loss is returned in their dtype."""
    out_dtype = torch.promote_types(image.dtype, text.dtype)
    cdt = compute_dtype(image.dtype, text.dtype)
    if cdt != image.dtype or cdt != text.dtype:
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = logit_scale.to(cdt)
        return clip_loss(image.to(cdt), text.to(cdt), logit_scale, normalize=normalize).to(out_dtype)
    if normalize:
        image = normalize_rows(image)
        text = normalize_rows(text)
    logits = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# --------------------------------------------------------------------------------------------------
# SigLIP (pairwise sigmoid loss)
# --------------------------------------------------------------------------------------------------
def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Pairwise sigmoid loss (SigLIP; open_clip's SigLipLoss): with â, b̂ the (optionally L2-normalized)
    rows, z = s · â b̂ᵀ + β and y = 2I − 1 (+1 on the diagonal, −1 elsewhere),

        L = −(1/N) Σ_ij log σ(y_ij z_ij) = (1/N) Σ_ij softplus(−y_ij z_ij)

    normalized by the number of image rows N (not N²). ``logit_scale`` is the multiplier s itself (the
    model's exp(t')), ``logit_bias`` the bias β. Gradients, with w_ij = −y_ij σ(−y_ij z_ij) / N:

        ∂L/∂â = s · w b̂,   ∂L/∂b̂ = s · wᵀ â,   ∂L/∂s = Σ_ij w_ij (â b̂ᵀ)_ij,   ∂L/∂β = Σ_ij w_ij.

    Stable form used by every backend: −log σ(x) = max(−x, 0) + log1p(e^{−|x|}), and
    σ(−x) = e^{min(−x, 0)} / (1 + e^{−|x|}) from the same exponential. Here F.logsigmoid, which is stable.
    Half inputs are computed in float32 and the loss is returned in their dtype.
    """
    out_dtype = torch.promote_types(image.dtype, text.dtype)
    cdt = compute_dtype(image.dtype, text.dtype)
    if cdt != image.dtype or cdt != text.dtype:
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = logit_scale.to(cdt)
        if isinstance(logit_bias, torch.Tensor):
            logit_bias = logit_bias.to(cdt)
        return siglip_loss(image.to(cdt), text.to(cdt), logit_scale, logit_bias, normalize=normalize).to(out_dtype)
    if normalize:
        image = normalize_rows(image)
        text = normalize_rows(text)
    n = image.shape[0]
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2.0 * torch.eye(n, text.shape[0], dtype=logits.dtype, device=logits.device) - 1.0
    return -F.logsigmoid(labels * logits).sum() / n


# --------------------------------------------------------------------------------------------------
# Layer-similarity metrics
# --------------------------------------------------------------------------------------------------
def knn(a: torch.Tensor, k: int | str = "rice") -> torch.Tensor:
    """Indices (N, k) of each row's k nearest rows by inner product, diagonal excluded, best first;
    ties go to the lower index (a stable sort on descending similarity); NaN similarities rank last."""
    n = a.shape[0]
    k = resolve_k(k, n)
    # NaN ranks as −inf (ties with real −inf go to the lower index); ±inf stay infinite (nan_to_num's defaults
    # would map them to the largest finite values and rank −inf above NaN).
    sim = torch.nan_to_num(a @ a.T, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    # Column ids without j = i, by arithmetic (no boolean mask, so meta tensors work): row i skips column i.
    j = torch.arange(n - 1, device=a.device)[None, :]
    cols = j + (j >= torch.arange(n, device=a.device)[:, None]).long()
    order = torch.sort(sim.gather(1, cols), dim=1, descending=True, stable=True).indices[:, :k]
    return cols.gather(1, order)


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int | str = "rice") -> torch.Tensor:
    """Mutual kNN alignment: rows L2-normalized, score = mean_i |kNN_A(i) ∩ kNN_B(i)| / k."""
    n = a.shape[0]
    k = resolve_k(k, n)
    ia = knn(normalize_rows(a), k)
    ib = knn(normalize_rows(b), k)
    ma = torch.zeros(n, n, dtype=torch.bool, device=a.device).scatter_(1, ia, True)
    mb = torch.zeros(n, n, dtype=torch.bool, device=a.device).scatter_(1, ib, True)
    return (ma & mb).sum(dim=1).to(a.dtype).mean() / k


def _hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return torch.trace(k @ h @ l @ h)


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    value = (
        (kt * lt.T).sum()
        + kt.sum() * lt.sum() / ((m - 1) * (m - 2))
        - 2.0 * (kt @ lt).sum() / (m - 2)
    )
    return value / (m * (m - 3))


def cka(a: torch.Tensor, b: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Linear CKA from the Gram matrices K = AAᵀ, L = BBᵀ (the public code's O(N²) form):
    HSIC(K, L) / (sqrt(HSIC(K, K) · HSIC(L, L)) + 1e-6), biased tr(KHLH) or unbiased (Song et al.)."""
    k, l = a @ a.T, b @ b.T
    hsic = _hsic_unbiased if unbiased else _hsic_biased
    return hsic(k, l) / (torch.sqrt(hsic(k, k) * hsic(l, l)) + 1e-6)
