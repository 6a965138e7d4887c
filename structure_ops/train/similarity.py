"""Kernel layer-similarity metrics for layer selection: RBF-kernel CKA and CKNNA, and the per-layer objects that
let layer selection score every pair, and every permutation-null draw, from work done once per layer.

RBF CKA (Kornblith et al. 2019): K_ij = exp(−‖x_i − x_j‖² / (2σ²)) with σ = ``sigma_frac`` × the median
pairwise distance (over the pairs i < j; the median of an even count is the mean of the two middle distances),
CKA = HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)). Default ``sigma_frac`` 0.4 (one of the three bandwidths of
Kornblith et al.'s Table 2: 0.2, 0.4, 0.8) and the biased estimator HSIC = tr(KHLH) / (n−1)² with
H = I − 11ᵀ/n, as in that paper; ``unbiased=True`` uses Song et al.'s estimator (n ≥ 4). Both are inner
products of transformed kernels: biased, the double-centered HKH; unbiased, the U-centered kernel (diagonal
zeroed, Ũ_ij = K̃_ij − r_i/(n−2) − r_j/(n−2) + Σr/((n−1)(n−2)) off the diagonal, r = row sums of K̃), whose
inner product over n(n−3) is Song et al.'s HSIC. So CKA = ⟨G_K, G_L⟩_F with G = that matrix over its
Frobenius norm, and a permuted pairing is ⟨G_K, P G_L Pᵀ⟩: one (n, n) matrix per layer serves every pair and
every null draw.

CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"; the definition of their public code):
rows L2-normalized, K = XXᵀ, L = YYᵀ (cosine kernels), M_ij = 1 when j ≠ i is among the k nearest neighbours
of i in both X and Y. CKNNA = HSIC_u(M∘K, M∘L) / √(HSIC_u(M_X∘K, M_X∘K)·HSIC_u(M_Y∘L, M_Y∘L)), HSIC_u
Song et al.'s unbiased estimator (tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2·1ᵀK̃L̃1/(n−2)) / (n(n−3)) applied to
the (non-symmetric) masked kernels, M_X the kNN mask of X alone. The public code adds 1e-6 to the
denominator; here the ratio is exact (that constant is not scale-free: HSIC_u of masked kernels shrinks like
k/n). The masked kernels have at most n·k nonzeros, so every term is a sum over the mutual-neighbour edges:
O(n·k) per pair and null draw from the kNN lists (and the kernel values at the neighbours) computed once per
layer. ``k`` >= 2 as in the public code; ties in the kNN lists go to the lower index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import functional as so
from .._options import resolve_k

DEFAULT_SIGMA_FRAC = 0.4
_ROWS_BYTES = 1 << 26  # row chunk size for (chunk, n) / (chunk, k, d) temporaries


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_pair(fn: str, x, y, min_rows: int) -> None:
    for name, t in (("X", x), ("Y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_floating_point() or t.shape[0] < min_rows or t.shape[1] < 1:
            raise ValueError(f"{fn}: {name} must be a floating-point (N, d) tensor with N >= {min_rows}, d >= 1; "
                             f"got {_desc(t)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: X and Y must have the same number of rows N: X has {_desc(x)}, Y has {_desc(y)}")
    if x.device != y.device:
        raise ValueError(f"{fn}: X and Y must be on the same device: X has {_desc(x)}, Y has {_desc(y)}")
    for name, t in (("X", x), ("Y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{fn}: {name} has non-finite values ({_desc(t)})")


# ---------------------------------------------------------------------------------------------- RBF / linear CKA


def median_pairwise_distance(d2: torch.Tensor) -> float:
    """Median of √d2_ij over the pairs i < j of a symmetric (n, n) squared-distance matrix (diagonal ignored)."""
    n = d2.shape[0]
    m = n * (n - 1) // 2
    flat = d2.clone()
    flat.fill_diagonal_(math.inf)
    flat = flat.view(-1)
    # Each pair appears twice off the diagonal: the m-th and (m+1)-th smallest of the 2m off-diagonal values are
    # the two middle values of the m pairs when m is even, and both the middle value when m is odd.
    lo = float(torch.kthvalue(flat, m).values)
    hi = float(torch.kthvalue(flat, m + 1).values)
    return 0.5 * (math.sqrt(max(lo, 0.0)) + math.sqrt(max(hi, 0.0)))


def rbf_kernel(x: torch.Tensor, sigma_frac: float = DEFAULT_SIGMA_FRAC) -> tuple[torch.Tensor, float]:
    """(n, n) float64 Gaussian kernel of the rows of ``x`` and its σ = sigma_frac × median pairwise distance."""
    x = x.to(torch.float64)
    x = x - x.mean(dim=0)  # distances are translation invariant; centering reduces cancellation in ‖a‖²+‖b‖²−2ab
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    d2 = torch.empty(n, n, dtype=torch.float64, device=x.device)
    step = max(1, _ROWS_BYTES // (8 * n))
    for s in range(0, n, step):
        blk = sq[s:s + step, None] + sq[None, :] - 2.0 * (x[s:s + step] @ x.T)
        d2[s:s + step] = blk.clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    med = median_pairwise_distance(d2)
    if not med > 0:
        raise ValueError(f"rbf_cka: the median pairwise distance is 0 (more than half of the {n} rows coincide); "
                         "no bandwidth can be set from it")
    sigma = sigma_frac * med
    return d2.mul_(-1.0 / (2.0 * sigma * sigma)).exp_(), sigma


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x @ x.T


def center_kernel(k: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """In place: HKH (biased HSIC) or the U-centered K̃ (Song et al.'s unbiased HSIC, n >= 4)."""
    n = k.shape[0]
    if unbiased:
        k.fill_diagonal_(0.0)
        r = k.sum(dim=1)
        k -= r[:, None] / (n - 2)
        k -= r[None, :] / (n - 2)
        k += r.sum() / ((n - 1) * (n - 2))
        k.fill_diagonal_(0.0)
    else:
        r = k.mean(dim=1)
        k -= r[:, None]
        k -= r[None, :]
        k += r.mean()
    return k


class KernelLayer:
    """One layer's centered kernel over its Frobenius norm (``g``, (n, n) float64) and ``scale``, the square
    root of HSIC(K, K) on the scale :func:`structure_ops.functional.cka` uses (its 1e-6 floor, ``floor``)."""

    def __init__(self, x: torch.Tensor, kind: str, unbiased: bool, sigma_frac: float = DEFAULT_SIGMA_FRAC):
        n = x.shape[0]
        if kind == "rbf":
            k, self.sigma = rbf_kernel(x, sigma_frac)
            self.floor = 0.0
        elif kind == "linear":
            k, self.sigma = linear_kernel(x), None
            self.floor = 1e-6  # so.cka's denominator floor, applied to √HSIC(K,K)·√HSIC(L,L)
        else:
            raise ValueError(f"kernel must be 'rbf' or 'linear', got {kind!r}")
        g = center_kernel(k, unbiased)
        norm = float(torch.linalg.vector_norm(g))
        if not norm > 0 or not math.isfinite(norm):
            raise ValueError(f"CKA: the centered {kind} kernel of a ({n}, {x.shape[1]}) layer has norm {norm} "
                             "(features constant across samples)")
        self.g = g.div_(norm)
        self.scale = norm / math.sqrt(n * (n - 3)) if unbiased else norm



def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma_frac: float = DEFAULT_SIGMA_FRAC, *,
            unbiased: bool = False) -> torch.Tensor:
    """RBF-kernel CKA of two representations of the same N samples (rows not normalized inside), float64 0-dim.

    σ = ``sigma_frac`` × the median pairwise Euclidean distance of each representation (its own σ). Biased
    HSIC by default (Kornblith et al. 2019), Song et al.'s unbiased one with ``unbiased=True`` (N >= 4).
    Invariant to orthogonal transforms, isotropic scaling and translation of either input. O(N²) memory.
    """
    _check_pair("rbf_cka", x, y, 4 if unbiased else 2)
    if isinstance(sigma_frac, bool) or not isinstance(sigma_frac, (int, float)) or not (
            math.isfinite(sigma_frac) and sigma_frac > 0):
        raise ValueError(f"rbf_cka: sigma_frac must be a positive finite number, got {sigma_frac!r}")
    a = KernelLayer(x, "rbf", unbiased, sigma_frac)
    b = KernelLayer(y, "rbf", unbiased, sigma_frac)
    return (a.g.view(-1) @ b.g.view(-1)).clamp(-1.0, 1.0)


# -------------------------------------------------------------------------------------------------------- CKNNA


class KnnLayer:
    """One layer's kNN lists ``idx`` (n, k), cosine kernel values at them ``val`` (n, k) float64, a membership
    lookup for edges keyed i·n + j, and its CKNNA self-alignment HSIC_u(M_X∘K, M_X∘K) ``self_term``.

    ``dense``: the lookup is an (n, n) int16/int32 table of positions (2–4 n² bytes); otherwise a sorted key
    list searched per query (O(n·k) memory)."""

    def __init__(self, x: torch.Tensor, k: int, *, backend: str = "auto", dense: bool = True,
                 idx: torch.Tensor | None = None):
        n = x.shape[0]
        self.n, self.k = n, k
        self.idx = (so.knn(x, k, backend=backend) if idx is None else idx).to(x.device).long()
        xn = F.normalize(x.to(torch.float64), dim=1)
        val = torch.empty(n, k, dtype=torch.float64, device=x.device)
        step = max(1, _ROWS_BYTES // (8 * k * x.shape[1]))
        for s in range(0, n, step):
            val[s:s + step] = torch.einsum("nd,nkd->nk", xn[s:s + step], xn[self.idx[s:s + step]])
        self.val = val
        self.rows = torch.arange(n, device=x.device)[:, None].expand(n, k)
        keys = (self.rows * n + self.idx).reshape(-1)
        if dense:
            self.table = torch.zeros(n * n, dtype=torch.int16 if k < 32767 else torch.int32, device=x.device)
            pos = torch.arange(1, k + 1, device=x.device).expand(n, k).reshape(-1)
            self.table[keys] = pos.to(self.table.dtype)
            self.keys = self.order = None
        else:
            self.table = None
            self.keys, self.order = torch.sort(keys)
        self.self_term = float(cknna_cross(self, self))

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """For edge keys i·n + j: p + 1 where idx[i, p] == j, else 0 (int64)."""
        if self.table is not None:
            return self.table[keys].long()
        loc = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        found = self.keys[loc] == keys
        return torch.where(found, self.order[loc] % self.k + 1, torch.zeros_like(loc))


def cknna_cross(a: KnnLayer, b: KnnLayer, perm: torch.Tensor | None = None, inv: torch.Tensor | None = None
                ) -> torch.Tensor:
    """HSIC_u(M∘K, M∘L) for the pairing (row i of ``a``, row π(i) of ``b``) (π = ``perm``, identity if None;
    ``inv`` = π⁻¹): the permuted b's lists are π⁻¹(N_b(π(i))), its values val_b[π(i)]. O(n·k), float64."""
    n, k = a.n, a.k
    if b.n != n or b.k != k:
        raise ValueError(f"cknna: kNN lists of different shapes ({n}, {k}) and ({b.n}, {b.k})")
    if perm is None:
        bidx, bval = b.idx, b.val
    else:
        bidx, bval = inv[b.idx[perm]], b.val[perm]
    i, j = a.rows.reshape(-1), bidx.reshape(-1)
    pa = a.lookup(i * n + j)  # is b's edge (i, j) also one of a's? (no compaction: misses contribute zeros)
    hit = pa > 0
    kv = a.val.view(-1)[i * k + (pa - 1).clamp_(min=0)] * hit
    lv = bval.reshape(-1) * hit
    # tr(K̃L̃) = Σ_ij K̃_ij L̃_ji: the edges whose reverse (j, i) is a mutual edge too (K, L symmetric).
    rev = a.lookup(j * n + i) > 0
    rev &= (b.lookup(j * n + i) if perm is None else b.lookup(perm[j] * n + perm[i])) > 0
    t1 = (kv * lv * rev).sum()
    ck = torch.zeros(n, dtype=torch.float64, device=kv.device).index_add_(0, j, kv)  # column sums of K̃
    rl = lv.view(n, k).sum(dim=1)  # row sums of L̃
    value = t1 + kv.sum() * lv.sum() / ((n - 1) * (n - 2)) - 2.0 * (ck @ rl) / (n - 2)
    return value / (n * (n - 3))


def cknna(x: torch.Tensor, y: torch.Tensor, k: int | str = 10, *, backend: str = "auto") -> torch.Tensor:
    """CKNNA (Huh et al. 2024) of two representations of the same N samples, float64 0-dim; rows L2-normalized
    inside (cosine kernels, as mutual kNN). ``k``: int >= 2 or a rule (rice | sqrt | sturges); N >= 4.

    1 for identical inputs; invariant to orthogonal transforms and per-row scaling. Not bounded by 1 in general
    (the two masked kernels of the cross term differ from those of the self terms) but in practice in [−1, 1].
    Raises when a self-alignment is <= 0 (no usable neighbourhood structure)."""
    _check_pair("cknna", x, y, 4)
    kk = resolve_k(k, x.shape[0])
    if kk < 2:
        raise ValueError(f"cknna: k must be >= 2 (as in the reference definition), got k={kk} for N={x.shape[0]}")
    a = KnnLayer(x, kk, backend=backend, dense=x.shape[0] <= 4096)
    b = KnnLayer(y, kk, backend=backend, dense=x.shape[0] <= 4096)
    for name, layer in (("X", a), ("Y", b)):
        if not layer.self_term > 0:
            raise ValueError(f"cknna: the self-alignment of {name} is {layer.self_term:.3g} <= 0 (k={kk}); "
                             "CKNNA is undefined for it")
    return cknna_cross(a, b) / math.sqrt(a.self_term * b.self_term)
