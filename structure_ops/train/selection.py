"""Layer selection (docs/spec.md §3): score every (vision layer, text layer) pair, pick the best or the last.

Mutual kNN: each layer's kNN lists are computed once (``structure_ops.knn``, streamed top-k, ties to the
lower index) and every pair only intersects two (n, k) index tables, so the cost is (L_v + L_t) top-k passes
plus L_v·L_t cheap intersections instead of L_v·L_t Gram matrices. Alternatives: linear CKA (biased or
unbiased), RBF-kernel CKA and CKNNA (``structure_ops.train.similarity``: one centered kernel, or one kNN list with
its kernel values, per layer, reused by every pair and every permutation-null draw). Scores are computed on a
random subset of rows (5 000 in the paper).

Degenerate layers, whose features (nearly) do not vary across samples (a ViT's embeddings-layer CLS token is
the same learned vector for every image), carry no information and would give arbitrary kNN lists (ties):
they are excluded (score NaN, never "best") with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import functional as so
from .._options import resolve_k
from .features import atomic_write_text
from .similarity import DEFAULT_SIGMA_FRAC, KernelLayer, KnnLayer, cknna_cross

METRICS = ("mutual_knn", "cka", "cka_unbiased", "rbf_cka", "rbf_cka_unbiased", "cknna")
# metric -> (kernel, unbiased HSIC) for the metrics scored as inner products of per-layer centered kernels
_KERNEL_METRICS = {"cka": ("linear", False), "cka_unbiased": ("linear", True), "rbf_cka": ("rbf", False),
                   "rbf_cka_unbiased": ("rbf", True)}
_KERNELS_MAX_BYTES = 2 << 30  # kernel metrics: (n, n) float64 image-layer kernels held at once (at least one)
# Per-pair columns that --calibrate adds to layer_scores.csv (see :func:`calibrate`).
CALIBRATED_COLUMNS = ("calibrated", "z", "p_value", "p_max")
_DENSE_MAX_N = 16384  # calibration: up to this n, an (n, n) boolean neighbour mask per image layer
_MASKS_MAX_BYTES = 2 << 30  # ... all image layers' masks held at once up to this size


@dataclass
class LayerScores:
    """``scores[i, j]`` for image layer ``image_layers[i]`` and text layer ``text_layers[j]``."""

    scores: torch.Tensor
    image_layers: list[str]
    text_layers: list[str]
    metric: str
    k: int | None
    n: int
    excluded: list[str] = field(default_factory=list)  # degenerate layers ("image:NAME" / "text:NAME"), scored NaN
    provenance: dict | None = None  # the feature digests and training split the scores were computed on
    calibration: dict | None = None  # permutation-null calibration (see :func:`calibrate`), lists of lists
    params: dict | None = None  # metric settings besides k (RBF bandwidth rule and per-layer σ, HSIC estimator)

    def best(self) -> tuple[str, str]:
        s = torch.nan_to_num(self.scores.double(), nan=-math.inf)
        if not torch.isfinite(s).any():
            raise ValueError("every layer pair was excluded (degenerate features); no best layer pair")
        i, j = divmod(int(torch.argmax(s)), self.scores.shape[1])  # first maximum on ties
        return self.image_layers[i], self.text_layers[j]

    @property
    def best_score(self) -> float:
        i, j = self.best()
        return float(self.scores[self.image_layers.index(i), self.text_layers.index(j)])

    def last(self) -> tuple[str, str]:
        return self.image_layers[-1], self.text_layers[-1]

    def pick(self, rule: str) -> tuple[str, str]:
        if rule not in ("best", "last"):
            raise ValueError(f"layer rule must be 'best' or 'last', got {rule!r}")
        return self.best() if rule == "best" else self.last()

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "k": self.k, "n": self.n, "image_layers": self.image_layers,
            "text_layers": self.text_layers,
            "scores": [[None if math.isnan(v) else v for v in row] for row in self.scores.tolist()],
            "best": list(self.best()), "last": list(self.last()), "excluded": self.excluded,
            "provenance": self.provenance, "calibration": self.calibration, "params": self.params,
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        cal = self.calibration
        extra = list(CALIBRATED_COLUMNS) if cal else []
        w.writerow(["image_layer", "text_layer", self.metric, *extra])
        for i, a in enumerate(self.image_layers):
            for j, b in enumerate(self.text_layers):
                v = float(self.scores[i, j])
                if math.isnan(v):
                    w.writerow([a, b, "excluded", *["" for _ in extra]])
                else:
                    w.writerow([a, b, f"{v:.6f}", *[f"{cal[c][i][j]:.6g}" for c in extra]])
        return buf.getvalue()

    def save(self, out_dir) -> None:
        from pathlib import Path

        out = Path(out_dir)
        atomic_write_text(out / "layer_scores.json", json.dumps(self.to_json(), indent=1) + "\n")
        atomic_write_text(out / "layer_scores.csv", self.to_csv())

    @classmethod
    def from_json(cls, d: dict) -> LayerScores:
        scores = torch.tensor([[math.nan if v is None else v for v in row] for row in d["scores"]], dtype=torch.float64)
        return cls(scores, d["image_layers"], d["text_layers"], d["metric"], d["k"], d["n"], d.get("excluded", []),
                   d.get("provenance"), d.get("calibration"), d.get("params"))


def score_layers(image_feats: dict[str, torch.Tensor], text_feats: dict[str, torch.Tensor], *,
                 metric: str = "mutual_knn", k: int | str = "rice", subset: int | None = 5000, seed: int = 0,
                 backend: str = "auto", permutations: int = 0, sigma_frac: float = DEFAULT_SIGMA_FRAC,
                 device: str | torch.device | None = None) -> LayerScores:
    """Score all layer pairs on the same random ``subset`` of paired rows (all rows if None or larger).

    ``metric``: one of :data:`METRICS`; rows are L2-normalized first for every metric. ``k`` (mutual kNN,
    CKNNA): an int or a rule. ``sigma_frac`` (RBF CKA): σ = sigma_frac × the median pairwise distance of each
    layer. ``device``: where the kernel metrics (RBF CKA, CKNNA, calibrated linear CKA) compute (default: the
    features'). ``permutations > 0`` also calibrates the scores against a permutation null from the same
    per-layer kNN lists or kernels (:func:`calibrate` for mutual kNN); the result is in
    ``LayerScores.calibration``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 0:
        raise ValueError(f"permutations must be an int >= 0, got {permutations!r}")
    if isinstance(sigma_frac, bool) or not isinstance(sigma_frac, (int, float)) or not (
            math.isfinite(sigma_frac) and sigma_frac > 0):
        raise ValueError(f"sigma_frac must be a positive finite number, got {sigma_frac!r}")
    n = {t.shape[0] for t in (*image_feats.values(), *text_feats.values())}
    if len(n) != 1:
        raise ValueError(f"image and text features must have the same number of rows, got {sorted(n)}")
    n = n.pop()
    rows = torch.arange(n)
    if subset is not None and subset < n:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset].sort().values
    min_rows = 4 if metric in ("cka_unbiased", "rbf_cka_unbiased", "cknna") else 2
    if len(rows) < min_rows:
        raise ValueError(f"metric {metric!r} needs at least {min_rows} rows, got {len(rows)}")
    ia, ta = list(image_feats), list(text_feats)
    for side, feats in (("image", image_feats), ("text", text_feats)):
        for name, t in feats.items():
            if not bool(torch.isfinite(t[rows]).all()):
                raise ValueError(f"layer selection: {side} layer {name!r} has non-finite values (shape "
                                 f"{tuple(t.shape)}, dtype {t.dtype})")
    bad_i = [a for a in ia if degenerate(image_feats[a][rows])]
    bad_t = [b for b in ta if degenerate(text_feats[b][rows])]
    excluded = [f"image:{a}" for a in bad_i] + [f"text:{b}" for b in bad_t]
    if excluded:
        warnings.warn(f"layer selection: excluded {len(excluded)} degenerate layer(s) whose features do not vary "
                      f"across samples: {', '.join(excluded)}", stacklevel=2)
    if len(bad_i) == len(ia) or len(bad_t) == len(ta):
        raise ValueError(f"layer selection: every {'image' if len(bad_i) == len(ia) else 'text'} layer is degenerate "
                         f"(constant across samples): {excluded}")
    ia_ok, ta_ok = [a for a in ia if a not in bad_i], [b for b in ta if b not in bad_t]
    perms = _permutations(len(rows), permutations, seed) if permutations else None
    res = _score(image_feats, text_feats, ia_ok, ta_ok, rows, metric, k, backend, perms, sigma_frac, device, seed)
    if res.get("excluded"):
        warnings.warn(f"layer selection: excluded {len(res['excluded'])} layer(s) on which {metric} is undefined: "
                      + "; ".join(res["excluded"]), stacklevel=2)
        excluded += [e.split(" (")[0] for e in res["excluded"]]
    ia_ok, ta_ok = res["image_layers"], res["text_layers"]
    scores = torch.full((len(ia), len(ta)), math.nan, dtype=torch.float64)
    ii, jj = [ia.index(a) for a in ia_ok], [ta.index(b) for b in ta_ok]
    for i, a in enumerate(ii):
        for j, b in enumerate(jj):
            scores[a, b] = res["scores"][i, j]
    cal = None
    if permutations:
        null = res["null"]
        cal = _calibration_record(scores, null, null.flatten(1).max(1).values, ii, jj, res["chance"], seed,
                                  res["method"])
    return LayerScores(scores, ia, ta, metric, res["k"], len(rows), excluded, calibration=cal,
                       params=res.get("params"))


def _permutations(n: int, permutations: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The null draws π (text row π(i) paired with image row i) and their inverses; the same for every metric."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) for _ in range(permutations)]
    return perms, [torch.empty_like(p).scatter_(0, p, torch.arange(n)) for p in perms]


def calibrate(image_knn: list[torch.Tensor], text_knn: list[torch.Tensor], permutations: int = 200, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation null of mutual kNN for every layer pair, from precomputed (n, k) neighbour lists.

    One null draw permutes the rows of the text side by π (text row π(i) paired with image row i), the same π for
    every layer pair. Permuting rows needs no new kNN search: row i's neighbours after the permutation are
    π⁻¹(N_t(π(i))), an index lookup in the list computed once per layer. Returns ``null`` (P, L_i, L_t), the
    null scores of each pair, and ``null_max`` (P,), the max over all pairs of each draw: the null of the
    max-over-pairs statistic (aggregation-aware), which per-pair nulls would understate. The expected null
    score of one pair is k/(n−1).
    """
    if not image_knn or not text_knn:
        raise ValueError("calibrate: no kNN lists")
    shapes = {tuple(t.shape) for t in (*image_knn, *text_knn)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"calibrate: the kNN lists must all be (n, k) of one shape, got {sorted(shapes)}")
    if permutations < 1:
        raise ValueError(f"calibrate: permutations must be >= 1, got {permutations}")
    n, k = next(iter(shapes))
    perms, invs = _permutations(n, permutations, seed)
    null = torch.empty(permutations, len(image_knn), len(text_knn), dtype=torch.float64)
    image_knn = [x.cpu().long() for x in image_knn]
    text_knn = [y.cpu().long() for y in text_knn]
    offsets = (torch.arange(n) * n)[:, None]

    def membership(x):  # flattened (n, n) mask: entry i·n + j set when j is among row i's neighbours
        mask = torch.zeros(n * n, dtype=torch.bool)
        mask[(x + offsets).view(-1)] = True
        return mask

    def score(mask, x, yp):
        if mask is not None:
            return int(torch.count_nonzero(mask[(yp + offsets).view(-1)])) / (n * k)
        return float(so.mutual_knn_from_indices(x, yp))

    dense = n <= _DENSE_MAX_N
    if dense and len(image_knn) * n * n <= _MASKS_MAX_BYTES:
        # Every image layer's mask held at once (≤ 2 GiB): each permuted text list is built once per draw.
        masks = [membership(x) for x in image_knn]
        for p, (perm, inv) in enumerate(zip(perms, invs, strict=True)):
            for j, y in enumerate(text_knn):
                yp = inv[y[perm]]
                for i, mask in enumerate(masks):
                    null[p, i, j] = score(mask, None, yp)
    else:
        for i, x in enumerate(image_knn):
            mask = membership(x) if dense else None
            for p, (perm, inv) in enumerate(zip(perms, invs, strict=True)):
                for j, y in enumerate(text_knn):
                    null[p, i, j] = score(mask, x, inv[y[perm]])
    return null, null.flatten(1).max(1).values


def _calibration_record(scores: torch.Tensor, null: torch.Tensor, null_max: torch.Tensor, ii: list[int],
                        jj: list[int], chance: float | None, seed: int, method: str) -> dict:
    """Per pair: calibrated = raw − null mean (0 at chance), z = that over the null std, p_value = (1 + #{null ≥
    raw}) / (1 + P) (one pair, one-sided), p_max = (1 + #{max-over-pairs null ≥ raw}) / (1 + P) (family-wise,
    valid for the pair picked as the max). For the best pair: its raw score, the max-null mean and its p.
    ``chance``: the metric's analytic null mean where one number is known (mutual kNN: k/(n−1)), else None."""
    P = null.shape[0]
    out = {c: torch.full_like(scores, math.nan) for c in CALIBRATED_COLUMNS}
    out["null_mean"] = torch.full_like(scores, math.nan)
    # Ties within float64 rounding of the score count as "≥" (a pair whose raw equals a null draw is not significant).
    tol = 1e-12 * max(1.0, float(null.abs().max()))
    for a, i in enumerate(ii):
        for b, j in enumerate(jj):
            raw, nl = float(scores[i, j]), null[:, a, b]
            mean, std = float(nl.mean()), float(nl.std()) if P > 1 else math.nan
            out["null_mean"][i, j] = mean
            out["calibrated"][i, j] = raw - mean
            out["z"][i, j] = (raw - mean) / std if std > 0 else math.nan
            out["p_value"][i, j] = (1 + int((nl >= raw - tol).sum())) / (1 + P)
            out["p_max"][i, j] = (1 + int((null_max >= raw - tol).sum())) / (1 + P)
    sub = scores[ii][:, jj]
    best = float(sub.max())
    rec = {key: [[None if math.isnan(v) else v for v in row] for row in t.tolist()] for key, t in out.items()}
    rec.update({
        "method": method, "permutations": P, "seed": seed, "chance": chance,
        "best": {"raw": best, "null_max_mean": float(null_max.mean()), "null_max_std": float(null_max.std()) if P > 1 else None,
                 "calibrated": best - float(null_max.mean()),
                 "p_value": (1 + int((null_max >= best - tol).sum())) / (1 + P)},
    })
    return rec


def degenerate(x: torch.Tensor, rtol: float = 1e-6) -> bool:
    """True when the rows of ``x`` are (numerically) one vector: zero variance across samples after the L2
    normalization the metrics use."""
    x = F.normalize(x.double(), dim=1)
    return bool(x.std(dim=0).max() <= rtol) if x.shape[0] > 1 else True


def _score(image_feats, text_feats, ia, ta, rows, metric, k, backend, perms, sigma_frac, device, seed) -> dict:
    """Raw scores of every (ia × ta) pair and, with ``perms``, the null (P, |ia|, |ta|) of the same pairs."""
    n = len(rows)
    P = len(perms[0]) if perms else 0
    permuted = "permutation null: rows of the text side permuted (the same permutation for every layer pair)"
    res = {"image_layers": ia, "text_layers": ta, "k": None, "chance": None, "null": None}
    if metric == "mutual_knn":
        kk = resolve_k(k, n)
        # One kNN table per layer (normalized rows, inner product, diagonal excluded), reused by every pair.
        img_idx = [so.knn(image_feats[a][rows], kk, backend=backend) for a in ia]
        txt_idx = [so.knn(text_feats[b][rows], kk, backend=backend) for b in ta]
        scores = torch.empty(len(ia), len(ta), dtype=torch.float64)
        for i, x in enumerate(img_idx):
            for j, y in enumerate(txt_idx):
                scores[i, j] = so.mutual_knn_from_indices(x, y)
        res.update(scores=scores, k=kk, chance=kk / (n - 1), method=f"{permuted}; kNN lists reused")
        if P:
            res["null"] = calibrate(img_idx, txt_idx, P, seed=seed)[0]  # the same draws as ``perms``
        return res
    if metric == "cknna":
        return _score_cknna(image_feats, text_feats, ia, ta, rows, k, backend, perms, device, res, permuted)
    # Rows are L2-normalized first, as for mutual kNN (docs/spec.md §3).
    img = [lambda a=a: F.normalize(image_feats[a][rows].to(device).double(), dim=1) for a in ia]
    txt = [lambda b=b: F.normalize(text_feats[b][rows].to(device).double(), dim=1) for b in ta]
    kind, unbiased = _KERNEL_METRICS[metric]
    if kind == "linear" and not P:
        # O(N·d²), no N × N Gram (structure_ops.functional.cka).
        scores = torch.empty(len(ia), len(ta), dtype=torch.float64)
        t = [f() for f in txt]
        for i, f in enumerate(img):
            xa = f()
            for j, xb in enumerate(t):
                scores[i, j] = so.cka(xa, xb, unbiased=unbiased)
        res["scores"] = scores
        return res
    scores, null, sig_i, sig_t = _kernel_scores(img, txt, kind, unbiased, sigma_frac, perms)
    res.update(scores=scores, null=null, method=f"{permuted}; one centered {kind} kernel per layer, permuted by index")
    est = "unbiased (Song et al.)" if unbiased else "biased (tr(KHLH))"
    if kind == "rbf":
        res["params"] = {"kernel": "rbf", "sigma_frac": sigma_frac, "hsic": est,
                         "sigma_rule": "sigma_frac × median pairwise distance of the L2-normalized rows",
                         "sigma": {**{f"image:{a}": s for a, s in zip(ia, sig_i, strict=True)},
                                   **{f"text:{b}": s for b, s in zip(ta, sig_t, strict=True)}}}
    else:
        res["params"] = {"kernel": "linear", "hsic": est}
    return res


def _kernel_scores(img, txt, kind, unbiased, sigma_frac, perms):
    """CKA of every pair as ⟨G_i, G_j⟩ of per-layer centered, normalized kernels; null draws as ⟨G_i, P G_j Pᵀ⟩.

    Image-layer kernels are held in groups of up to ``_KERNELS_MAX_BYTES`` as one (m, n²) matrix; each text
    kernel is built once per group (once in all when every image kernel fits) and each of its P permutations
    once per group, scored against the whole group by one matrix-vector product (float64)."""
    first = img[0]()
    n, dev = first.shape[0], first.device
    per = 8 * n * n
    group = max(1, _KERNELS_MAX_BYTES // per - 4)  # besides the group: one text kernel, a permuted copy, temporaries
    P = len(perms[0]) if perms else 0
    dperms = [p.to(dev) for p in perms[0]] if P else []
    scores = torch.empty(len(img), len(txt), dtype=torch.float64)
    null = torch.empty(P, len(img), len(txt), dtype=torch.float64) if P else None
    sig_i, sig_t = [None] * len(img), [None] * len(txt)
    for s in range(0, len(img), group):
        e = min(len(img), s + group)
        mat = torch.empty(e - s, n * n, dtype=torch.float64, device=dev)
        scale = torch.empty(e - s, dtype=torch.float64)
        for r in range(s, e):
            lay = KernelLayer(first if r == 0 else img[r](), kind, unbiased, sigma_frac)
            mat[r - s] = lay.g.view(-1)
            scale[r - s], sig_i[r], floor = lay.scale, lay.sigma, lay.floor
            del lay
        first = None

        for j, f in enumerate(txt):
            t = KernelLayer(f(), kind, unbiased, sigma_frac)
            sig_t[j] = t.sigma
            scores[s:e, j] = _floored(mat @ t.g.view(-1), scale, t.scale, floor)
            for p, perm in enumerate(dperms):
                null[p, s:e, j] = _floored(mat @ t.g.index_select(0, perm).index_select(1, perm).view(-1), scale,
                                            t.scale, floor)
            del t
        del mat
    return scores.clamp_(-1.0, 1.0), null, sig_i, sig_t


def _floored(inner: torch.Tensor, scale: torch.Tensor, t_scale: float, floor: float) -> torch.Tensor:
    """CKA from ⟨G_i, G_j⟩: exact, or for linear kernels with structure_ops.functional.cka's 1e-6 floor on
    √HSIC(K,K)·√HSIC(L,L)."""
    inner = inner.cpu()
    return inner if not floor else inner * (scale * t_scale / (scale * t_scale + floor))


def _score_cknna(image_feats, text_feats, ia, ta, rows, k, backend, perms, device, res, permuted) -> dict:
    """CKNNA: one kNN list (with its kernel values and a membership table) per layer, every pair and null draw
    scored from them in O(n·k)."""
    n = len(rows)
    kk = resolve_k(k, n)
    if kk < 2:
        raise ValueError(f"cknna needs k >= 2, got k={kk} for n={n}")
    dense = n <= _DENSE_MAX_N and (len(ia) + len(ta)) * n * n * 2 <= _MASKS_MAX_BYTES
    img = [KnnLayer(image_feats[a][rows].to(device), kk, backend=backend, dense=dense) for a in ia]
    txt = [KnnLayer(text_feats[b][rows].to(device), kk, backend=backend, dense=dense) for b in ta]
    # A layer whose self-alignment HSIC_u(M∘K, M∘K) is <= 0 has no usable neighbourhood structure: excluded.
    excl = [f"{side}:{name} (self-alignment {lay.self_term:.3g} <= 0)" for side, names, lays in
            (("image", ia, img), ("text", ta, txt)) for name, lay in zip(names, lays, strict=True)
            if not lay.self_term > 0]
    keep_i = [i for i, lay in enumerate(img) if lay.self_term > 0]
    keep_t = [j for j, lay in enumerate(txt) if lay.self_term > 0]
    if not keep_i or not keep_t:
        raise ValueError(f"cknna: every {'image' if not keep_i else 'text'} layer has self-alignment <= 0: {excl}")
    img, txt = [img[i] for i in keep_i], [txt[j] for j in keep_t]
    norm = torch.tensor([[math.sqrt(a.self_term * b.self_term) for b in txt] for a in img], dtype=torch.float64)
    scores = torch.tensor([[float(cknna_cross(a, b)) for b in txt] for a in img], dtype=torch.float64) / norm
    res.update(image_layers=[ia[i] for i in keep_i], text_layers=[ta[j] for j in keep_t], scores=scores, k=kk,
               excluded=excl, method=f"{permuted}; kNN lists and kernel values reused",
               params={"kernel": "cosine, masked to mutual k-nearest neighbours", "hsic": "unbiased (Song et al.)"})
    if perms:
        dev = img[0].idx.device
        null = torch.empty(len(perms[0]), len(img), len(txt), dtype=torch.float64)
        for p, (perm, inv) in enumerate(zip(*perms, strict=True)):
            perm, inv = perm.to(dev), inv.to(dev)
            for i, a in enumerate(img):
                for j, b in enumerate(txt):
                    null[p, i, j] = float(cknna_cross(a, b, perm, inv))
        res["null"] = null / norm
    return res
