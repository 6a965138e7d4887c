"""Public functional API: input validation, backend selection, and the call into the chosen backend.

Each function is equivalent to the function of the same name in :mod:`structure_ops.reference` (the
float64 oracle), which the test-suite keeps true for every backend, dtype and option.
"""

from __future__ import annotations

import numbers
import os

import torch

from . import _backends, _ops  # noqa: F401  (_ops defines the op schemas)
from . import reference as _reference
from ._options import CENTERINGS, DIVERGENCES, SIMILARITIES, WEIGHTINGS, option_code, resolve_k

__all__ = ["structure_loss", "clip_loss", "siglip_loss", "knn", "mutual_knn", "cka"]


# ---------------------------------------------------------------------------------------------------
# Validation: errors name the argument and show shapes, dtypes and devices.
# ---------------------------------------------------------------------------------------------------
def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_matrix(name: str, t, min_rows: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) tensor, got {_desc(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {_desc(t)}")
    if t.shape[0] < min_rows or t.shape[1] < 1:
        raise ValueError(f"{name} needs N >= {min_rows} rows and d >= 1 columns, got {_desc(t)}")


def _check_pair(an: str, a, bn: str, b, min_rows: int = 2, same_width: bool = False, mixed_dtype: bool = False) -> None:
    _check_matrix(an, a, min_rows)
    _check_matrix(bn, b, min_rows)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{an} and {bn} must have the same number of rows N: {an} has {_desc(a)}, {bn} has {_desc(b)}")
    if same_width and a.shape[1] != b.shape[1]:
        raise ValueError(f"{an} and {bn} must have the same width: {an} has {_desc(a)}, {bn} has {_desc(b)}")
    if a.dtype != b.dtype and not mixed_dtype:
        raise TypeError(f"{an} and {bn} must have the same dtype: {an} has {_desc(a)}, {bn} has {_desc(b)}")
    if a.device != b.device:
        raise ValueError(f"{an} and {bn} must be on the same device: {an} has {_desc(a)}, {bn} has {_desc(b)}")


def _select(op: str, backend: str, tensors) -> str:
    """The backend for ``op`` (structure_ops._backends.select), with torch.func in mind: the compiled
    backends compute gradients inside their forward and cannot run under grad/vjp/jacrev/vmap. Under a
    transform "auto" takes the reference backend (plain autograd, which the transforms support) and an
    explicit compiled backend raises an error naming the op and backend="reference"."""
    name = _backends.select(op, backend, tensors)
    if name == "reference" or torch.compiler.is_compiling() or not _under_functorch(tensors):
        return name
    if backend == "auto" and not os.environ.get("STRUCTURE_OPS_BACKEND"):
        return "reference"
    raise RuntimeError(
        f"{op}: the {name!r} backend does not support torch.func transforms (grad, vjp, jacrev, vmap): its "
        f"kernels compute the gradient inside the forward pass; pass backend='reference' to {op} under torch.func"
    )


def _under_functorch(tensors) -> bool:
    is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return is_wrapped is not None and any(isinstance(t, torch.Tensor) and is_wrapped(t) for t in tensors)


def _promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed input dtypes (e.g. frozen fp32 features with bf16 head outputs under AMP): both inputs are cast
    to the wider dtype (torch.promote_types) and the op computes there; autograd casts each gradient back
    to its input's dtype. A no-op when the dtypes agree."""
    wide = torch.promote_types(a.dtype, b.dtype)
    return a.to(wide), b.to(wide)


def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_range(op: str, cdt: torch.dtype, temperature: float, gamma: float, eps: float, similarity: str,
                 divergence: str) -> None:
    """Options whose use would overflow (or round to 0 in) the compute dtype ``cdt`` of ``op``: a ValueError
    naming the option, its value and the dtype's limit, instead of an inf/NaN loss. Centered unit rows have
    |⟨û_i, û_j⟩| ≤ 4 and ‖û_i − û_j‖² ≤ 16, so the logits reach 4/τ (differences 8/τ) and γ·16."""
    fi = torch.finfo(cdt)
    hint = "" if cdt == torch.float64 else " (or pass float64 inputs)"
    if similarity == "cosine" and 8.0 / temperature > fi.max:
        raise ValueError(
            f"{op}: temperature={temperature:g} overflows the {cdt} computation: the logit differences reach "
            f"8/temperature, above {cdt}'s max {fi.max:.4g}; use temperature >= {8.0 / fi.max:.4g}{hint}"
        )
    if similarity == "rbf" and 16.0 * gamma > fi.max:
        raise ValueError(
            f"{op}: gamma={gamma:g} overflows the {cdt} computation: gamma·‖û_i − û_j‖² reaches 16·gamma, above "
            f"{cdt}'s max {fi.max:.4g}; use gamma <= {fi.max / 16:.4g}{hint}"
        )
    if divergence == "structure" and not fi.tiny <= eps <= fi.max / 4:
        raise ValueError(
            f"{op}: eps={eps:g} is outside what the {cdt} computation can hold: it must lie in "
            f"[{fi.tiny:.4g} ({cdt}'s smallest normal number), {fi.max / 4:.4g}]{hint}"
        )


# ---------------------------------------------------------------------------------------------------
# STRUCTURE
# ---------------------------------------------------------------------------------------------------
def _structure_options(levels, temperature, weighting, margin, centering, center_first, similarity, gamma, divergence, eps):
    """Validate the options of structure_loss (also used by structure_ops.distributed);
    returns (temperature, margin, gamma, eps) as floats and the weighting/similarity/divergence codes."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    temperature = _check_number("temperature", temperature, positive=True)
    margin = _check_number("margin", margin, nonnegative=True)
    gamma = _check_number("gamma", gamma, positive=True)
    eps = _check_number("eps", eps, positive=True)
    w_code = option_code("weighting", weighting, WEIGHTINGS)
    option_code("centering", centering, CENTERINGS)
    s_code = option_code("similarity", similarity, SIMILARITIES)
    d_code = option_code("divergence", divergence, DIVERGENCES)
    if not isinstance(center_first, bool):
        raise TypeError(f"center_first must be a bool, got {center_first!r}")
    return temperature, margin, gamma, eps, w_code, s_code, d_code


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
    backend: str = "auto",
) -> torch.Tensor:
    r"""STRUCTURE regularizer R_S(X, Z) of docs/spec.md §1 (the public code's semantics).

    .. math::
        R_S = \frac{1}{L}\sum_{l=1}^{L} w_l \max(D_l - m, 0),\quad
        D_l = \frac{1}{N}\sum_{ij} \tfrac12 \tilde M_{ij}\,(2\log\tilde M_{ij} - \log\tilde O_{ij} - \log\tilde A_{ij})

    with O = softmax(X̂X̂ᵀ/τ)ˡ, A = softmax(ẐẐᵀ/τ)ˡ, Õ = O + ε, Ã = A + ε, M̃ = (Õ + Ã)/2.

    Args:
        x: frozen encoder features, shape (N, d_x). Gradients flow into x too if it requires grad.
        z: aligned embeddings, shape (N, d_z), same rows as x, same device as x. The dtypes may differ
            (AMP: fp32 features, bf16 head outputs): the op computes in the wider dtype and each gradient is
            returned in its input's dtype. fp16/bf16 are computed in fp32 by every backend.
        levels: number of random-walk levels L >= 1 (P¹ … Pᴸ).
        temperature: τ > 0 of the cosine similarity logits (unused for "rbf").
        weighting: "none" (w_l = 1) or "inverse" (w_l = 1/l).
        margin: m >= 0, per-level hinge max(D_l − m, 0).
        centering: "mean" (default), "standard" (also divide by the column std) or "none".
        center_first: center the raw rows before normalizing (default: normalize, then center).
        similarity: "cosine" (default) or "rbf" (S_ij = exp(−γ‖x̂_i − x̂_j‖²)).
        gamma: γ > 0 of "rbf".
        divergence: "structure" (default; the public code's KL(M̃‖·) form) or "js" (textbook JS).
        eps: ε > 0 of the "structure" form.
        backend: "auto" | "reference" | "cpu" | "triton" | "cuda" (see structure_ops.info).

    Returns:
        0-dim tensor in the wider of the inputs' dtypes.

    Equivalent to :func:`structure_ops.reference.structure_loss`.
    """
    _check_pair("x", x, "z", z, mixed_dtype=True)
    x, z = _promote(x, z)
    temperature, margin, gamma, eps, w_code, s_code, d_code = _structure_options(
        levels, temperature, weighting, margin, centering, center_first, similarity, gamma, divergence, eps
    )
    _check_range("structure_loss", _reference.compute_dtype(x.dtype, z.dtype), temperature, gamma, eps, similarity,
                 divergence)

    name = _select("structure_loss", backend, (x, z))
    if name == "reference":
        return _reference.structure_loss(
            x, z, levels=levels, temperature=temperature, weighting=weighting, margin=margin, centering=centering,
            center_first=center_first, similarity=similarity, gamma=gamma, divergence=divergence, eps=eps,
        )  # fmt: skip
    # Normalization and centering are O(N·d): every backend leaves them to PyTorch autograd.
    xh = _reference.prepare(x, centering=centering, center_first=center_first)
    zh = _reference.prepare(z, centering=centering, center_first=center_first)
    grad_on = torch.is_grad_enabled()
    flags = (grad_on and xh.requires_grad, grad_on and zh.requires_grad)
    if name == "triton":
        loss, _, _ = torch.ops.structure_ops.triton_structure_fwd(
            xh, zh, levels, temperature, w_code, margin, s_code, gamma, d_code, eps, _backends.triton_pass(), *flags
        )  # fmt: skip
        return loss
    loss, _, _ = torch.ops.structure_ops.structure_fwd(
        xh, zh, levels, temperature, w_code, margin, s_code, gamma, d_code, eps, *flags
    )  # fmt: skip
    return loss


# ---------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------
def _clip_scale(logit_scale, image: torch.Tensor, normalize, name: str = "logit_scale") -> torch.Tensor:
    """Validate logit_scale (or another scalar parameter ``name``, e.g. SigLIP's logit_bias) and normalize
    (also used by structure_ops.distributed); returns it as a one-element tensor in image's dtype and
    device (a number becomes a constant tensor)."""
    if isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        _check_scale_range(name, float(logit_scale), image.dtype)
        logit_scale = torch.tensor(float(logit_scale), dtype=image.dtype, device=image.device)
    if not isinstance(logit_scale, torch.Tensor):
        raise TypeError(f"{name} must be a one-element tensor or a number, got {type(logit_scale).__name__}")
    if logit_scale.numel() != 1:
        raise ValueError(f"{name} must be a scalar (one element), got {_desc(logit_scale)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {_desc(logit_scale)}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    _check_scale_range(name, logit_scale, image.dtype)
    return logit_scale.to(device=image.device, dtype=image.dtype)


def _check_scale_range(name: str, value: torch.Tensor | float, dtype: torch.dtype) -> None:
    """The scalar is cast to the inputs' dtype and the logits of normalized rows reach ±|value|, their
    differences 2|value|: refuse values that overflow there, and NaN/inf, with the dtype's limit. Checked
    wherever the value is readable without a device sync (CPU tensors outside torch.compile); a CUDA
    parameter that diverges shows up as a NaN/inf loss instead."""
    if isinstance(value, float):
        v = value
    elif torch.compiler.is_compiling() or value.device.type != "cpu":
        return
    else:
        try:
            v = float(value.detach().reshape(()))
        except RuntimeError:  # a tensor without data (fake, or under a torch.func transform)
            return
    limit = torch.finfo(dtype).max / 2
    if not abs(v) <= limit:
        raise ValueError(
            f"{name}={v:g} is not finite or overflows the {dtype} logits: |{name}| must be <= {limit:.4g} "
            f"(half of {dtype}'s max, the logit differences reach 2·|{name}|)"
        )


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Symmetric InfoNCE, both directions in one op (open_clip's ClipLoss).

    .. math::
        \ell = s\,\hat a \hat b^\top,\qquad
        L = \tfrac{1}{2N}\Big[\sum_i (\operatorname{lse}_j \ell_{ij} - \ell_{ii}) + \sum_j (\operatorname{lse}_i \ell_{ij} - \ell_{jj})\Big]

    Args:
        image: (N, k) image embeddings. text: (N, k) text embeddings, row i paired with image row i.
        logit_scale: the multiplier s (open_clip convention: pass ``param.exp()``), a one-element tensor
            (it receives a gradient) or a Python number.
        normalize: L2-normalize rows first (true in every config of the paper).
        backend: see :func:`structure_loss`.

    Returns:
        0-dim tensor in the wider of the inputs' dtypes (mixed dtypes compute there; each gradient comes
        back in its input's dtype). Equivalent to :func:`structure_ops.reference.clip_loss`.
    """
    _check_pair("image", image, "text", text, same_width=True, mixed_dtype=True)
    image, text = _promote(image, text)
    scale = _clip_scale(logit_scale, image, normalize)

    name = _select("clip_loss", backend, (image, text, scale))
    if name == "reference":
        return _reference.clip_loss(image, text, scale.reshape(()), normalize=normalize).reshape(())
    if normalize:
        image = _reference.normalize_rows(image)
        text = _reference.normalize_rows(text)
    clip_fwd = torch.ops.structure_ops.triton_clip_fwd if name == "triton" else torch.ops.structure_ops.clip_fwd
    loss, _, _ = clip_fwd(image, text, scale)
    return loss


# ---------------------------------------------------------------------------------------------------
# SigLIP
# ---------------------------------------------------------------------------------------------------
def _siglip_call(name: str, image, text, scale, bias, row_offset: int):
    """The fused op of backend ``name`` (not "reference") on normalized rows; image rows are the text
    rows [row_offset, row_offset + M) (M = N for the single-process loss). Returns the 0-dim loss."""
    grad_on = torch.is_grad_enabled()
    fwd = torch.ops.structure_ops.triton_siglip_fwd if name == "triton" else torch.ops.structure_ops.siglip_fwd
    return fwd(image, text, scale, bias, row_offset, grad_on and image.requires_grad, grad_on and text.requires_grad)[0]


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Pairwise sigmoid loss (SigLIP; open_clip's SigLipLoss), value and gradient in one fused pass.

    .. math::
        z = s\,\hat a \hat b^\top + \beta,\quad y = 2I - 1,\qquad
        L = -\frac{1}{N}\sum_{ij} \log\sigma(y_{ij} z_{ij})

    normalized by N (the batch), as open_clip does. No N × N matrix is materialized by the compiled
    backends (row panels or fused tiles); log σ is evaluated in the stable form min(x, 0) − log1p(e^{−|x|}).

    Args:
        image: (N, k) image embeddings. text: (N, k) text embeddings, row i paired with image row i.
        logit_scale: the multiplier s (pass ``param.exp()``; SigLIP initializes the parameter at log 10),
            a one-element tensor (it receives a gradient) or a Python number.
        logit_bias: the bias β (SigLIP initializes it at −10), a one-element tensor or a number.
        normalize: L2-normalize rows first.
        backend: see :func:`structure_loss`.

    Returns:
        0-dim tensor in the wider of the inputs' dtypes (mixed dtypes compute there; each gradient comes
        back in its input's dtype). Equivalent to :func:`structure_ops.reference.siglip_loss`.
    """
    _check_pair("image", image, "text", text, same_width=True, mixed_dtype=True)
    image, text = _promote(image, text)
    scale = _clip_scale(logit_scale, image, normalize)
    bias = _clip_scale(logit_bias, image, normalize, name="logit_bias")

    name = _select("siglip_loss", backend, (image, text, scale, bias))
    if name == "reference":
        return _reference.siglip_loss(image, text, scale.reshape(()), bias.reshape(()), normalize=normalize).reshape(())
    if normalize:
        image = _reference.normalize_rows(image)
        text = _reference.normalize_rows(text)
    return _siglip_call(name, image, text, scale, bias, 0)


# ---------------------------------------------------------------------------------------------------
# kNN metrics and CKA
# ---------------------------------------------------------------------------------------------------
def knn(a: torch.Tensor, k: int | str = "rice", *, normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    """Indices (N, k), int64, of each row's k nearest rows by inner product (after L2 row normalization
    when ``normalize``), best first, the row itself excluded; ties go to the lower index.

    These lists are what layer selection computes once per layer and intersects for every pair.
    Equivalent to ``structure_ops.reference.knn(structure_ops.reference.normalize_rows(a), k)``.
    """
    _check_matrix("a", a)
    k = resolve_k(k, a.shape[0])
    if normalize:
        a = _reference.normalize_rows(a)
    name = _backends.select("knn", backend, (a,))
    if name == "reference":
        return _reference.knn(a, k)
    if name == "triton":
        return torch.ops.structure_ops.triton_knn(a, k)
    return torch.ops.structure_ops.knn(a, k)


def mutual_knn_from_indices(ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """mean_i |ia[i] ∩ ib[i]| / k for two (N, k) neighbour lists: O(N·k²), in row chunks (no N × N)."""
    if ia.shape != ib.shape or ia.dim() != 2:
        raise ValueError(f"neighbour lists must both be (N, k), got {tuple(ia.shape)} and {tuple(ib.shape)}")
    n, k = ia.shape
    chunk = max(1, (1 << 24) // (k * k))
    hits = sum(
        (ia[i : i + chunk, :, None] == ib[i : i + chunk, None, :]).any(dim=2).sum()
        for i in range(0, n, chunk)
    )
    return hits.to(torch.float64) / (n * k)


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int | str = "rice", *, backend: str = "auto") -> torch.Tensor:
    """Mutual kNN alignment of two representations of the same N samples (docs/spec.md §3):
    rows L2-normalized, score = mean_i |kNN_A(i) ∩ kNN_B(i)| / k, diagonal excluded, ties to the lower
    index. ``k``: an int in [1, N−1] or "rice" ⌈2N^{1/3}⌉ / "sqrt" ⌈√N⌉ / "sturges" ⌈log₂N + 1⌉.

    Returns a 0-dim tensor (dtype of the inputs; fp32 for half types); NaN if an input is not finite.
    Equivalent to :func:`structure_ops.reference.mutual_knn`.
    """
    _check_matrix("a", a)
    _check_matrix("b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows N: a has {_desc(a)}, b has {_desc(b)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device: a has {_desc(a)}, b has {_desc(b)}")
    k = resolve_k(k, a.shape[0])
    out_dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    score = mutual_knn_from_indices(knn(a, k, backend=backend), knn(b, k, backend=backend)).to(out_dtype)
    # Non-finite inputs give NaN, like torch losses, without a host sync.
    finite = torch.isfinite(a).all() & torch.isfinite(b).all()
    return torch.where(finite, score, torch.full_like(score, float("nan")))


def cka(a: torch.Tensor, b: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    r"""Linear CKA between two representations of the same N samples (no row normalization inside).

    Biased: ‖A_cᵀB_c‖²_F / (‖A_cᵀA_c‖_F ‖B_cᵀB_c‖_F + 1e-6) with column-centered A_c, B_c, which equals
    the public code's tr(KHLH)-based HSIC on the Gram matrices. Unbiased: Song et al.'s estimator,
    N >= 4. Both in O(N·d²) time and O(d²) memory (no N × N Gram), computed in float64.
    Equivalent to :func:`structure_ops.reference.cka`.
    """
    _check_matrix("a", a, min_rows=4 if unbiased else 2)
    _check_matrix("b", b, min_rows=4 if unbiased else 2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows N: a has {_desc(a)}, b has {_desc(b)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device: a has {_desc(a)}, b has {_desc(b)}")
    out_dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    # HSIC is a degree-4 form: scale A and B by powers of two (exact) so that it cannot overflow or
    # underflow float64; with A = 2^p A', B = 2^q B' the ratio is HSIC' / (√HSIC'_AA √HSIC'_BB + 1e-6 / 2^(2p+2q)).
    ea = torch.frexp(a64.detach().abs().amax())[1] - 1
    eb = torch.frexp(b64.detach().abs().amax())[1] - 1
    a64, b64 = torch.ldexp(a64, -ea), torch.ldexp(b64, -eb)
    hsic = _hsic_unbiased_linear if unbiased else _hsic_biased_linear
    kl, kk, ll = hsic(a64, b64), hsic(a64, a64), hsic(b64, b64)
    floor = torch.ldexp(torch.tensor(1e-6, dtype=torch.float64, device=a.device), -2 * (ea + eb))
    return (kl / (torch.sqrt(kk) * torch.sqrt(ll) + floor)).to(out_dtype)


def _hsic_biased_linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ac, bc = a - a.mean(dim=0), b - b.mean(dim=0)
    return (ac.T @ bc).square().sum()


def _hsic_unbiased_linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # K = AAᵀ, L = BBᵀ with zeroed diagonals K̃, L̃, all sums expanded so that no N × N matrix is formed.
    m = a.shape[0]
    ka, lb = (a * a).sum(dim=1), (b * b).sum(dim=1)  # diag(K), diag(L)
    kl_sum = (a.T @ b).square().sum() - (ka * lb).sum()  # Σ K̃ ∘ L̃ᵀ
    k_row = a @ a.sum(dim=0) - ka  # K̃·1
    l_row = b @ b.sum(dim=0) - lb  # L̃·1
    value = kl_sum + k_row.sum() * l_row.sum() / ((m - 1) * (m - 2)) - 2.0 * (k_row @ l_row) / (m - 2)
    return value / (m * (m - 3))
