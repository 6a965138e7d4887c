"""Layer selection (docs/spec.md §3): score every (vision layer, text layer) pair, pick the best or the last.

Mutual kNN: each layer's kNN lists are computed once (``structure_ops.knn``, streamed top-k, ties to the
lower index) and every pair only intersects two (n, k) index tables, so the cost is (L_v + L_t) top-k passes
plus L_v·L_t cheap intersections instead of L_v·L_t Gram matrices. CKA (biased or unbiased) is the
alternative metric. Scores are computed on a random subset of rows (5 000 in the paper).

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

METRICS = ("mutual_knn", "cka", "cka_unbiased")
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
            "provenance": self.provenance, "calibration": self.calibration,
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
                   d.get("provenance"), d.get("calibration"))


def score_layers(image_feats: dict[str, torch.Tensor], text_feats: dict[str, torch.Tensor], *,
                 metric: str = "mutual_knn", k: int | str = "rice", subset: int | None = 5000, seed: int = 0,
                 backend: str = "auto", permutations: int = 0) -> LayerScores:
    """Score all layer pairs on the same random ``subset`` of paired rows (all rows if None or larger).

    ``permutations > 0`` (mutual kNN only) also calibrates the scores against a permutation null, from the same
    kNN lists (:func:`calibrate`); the result is in ``LayerScores.calibration``."""
    if permutations and metric != "mutual_knn":
        raise ValueError(f"permutation calibration (--calibrate) is implemented for metric 'mutual_knn', not {metric!r}")
    if permutations < 0:
        raise ValueError(f"permutations must be >= 0, got {permutations}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    n = {t.shape[0] for t in (*image_feats.values(), *text_feats.values())}
    if len(n) != 1:
        raise ValueError(f"image and text features must have the same number of rows, got {sorted(n)}")
    n = n.pop()
    rows = torch.arange(n)
    if subset is not None and subset < n:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset].sort().values
    ia, ta = list(image_feats), list(text_feats)
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
    scores = torch.full((len(ia), len(ta)), math.nan, dtype=torch.float64)
    sub = _score(image_feats, text_feats, ia_ok, ta_ok, rows, metric, k, backend)
    for i, a in enumerate(ia_ok):
        for j, b in enumerate(ta_ok):
            scores[ia.index(a), ta.index(b)] = sub[0][i, j]
    cal = None
    if permutations:
        null, null_max = calibrate(sub[2], sub[3], permutations, seed=seed)
        cal = _calibration_record(scores, null, null_max, [ia.index(a) for a in ia_ok], [ta.index(b) for b in ta_ok],
                                  sub[1], len(rows), seed)
    return LayerScores(scores, ia, ta, metric, sub[1], len(rows), excluded, calibration=cal)


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
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=g) for _ in range(permutations)]
    invs = [torch.empty_like(p).scatter_(0, p, torch.arange(n)) for p in perms]
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
                        jj: list[int], k: int, n: int, seed: int) -> dict:
    """Per pair: calibrated = raw − null mean (0 at chance), z = that over the null std, p_value = (1 + #{null ≥
    raw}) / (1 + P) (one pair, one-sided), p_max = (1 + #{max-over-pairs null ≥ raw}) / (1 + P) (family-wise,
    valid for the pair picked as the max). For the best pair: its raw score, the max-null mean and its p."""
    P = null.shape[0]
    out = {c: torch.full_like(scores, math.nan) for c in CALIBRATED_COLUMNS}
    out["null_mean"] = torch.full_like(scores, math.nan)
    for a, i in enumerate(ii):
        for b, j in enumerate(jj):
            raw, nl = float(scores[i, j]), null[:, a, b]
            mean, std = float(nl.mean()), float(nl.std()) if P > 1 else math.nan
            out["null_mean"][i, j] = mean
            out["calibrated"][i, j] = raw - mean
            out["z"][i, j] = (raw - mean) / std if std > 0 else math.nan
            out["p_value"][i, j] = (1 + int((nl >= raw - 1e-12).sum())) / (1 + P)
            out["p_max"][i, j] = (1 + int((null_max >= raw - 1e-12).sum())) / (1 + P)
    sub = scores[ii][:, jj]
    best = float(sub.max())
    rec = {key: [[None if math.isnan(v) else v for v in row] for row in t.tolist()] for key, t in out.items()}
    rec.update({
        "method": "permutation null: rows of the text side permuted (the same permutation for every layer pair); "
                  "kNN lists reused", "permutations": P, "seed": seed, "chance": k / (n - 1),
        "best": {"raw": best, "null_max_mean": float(null_max.mean()), "null_max_std": float(null_max.std()) if P > 1 else None,
                 "calibrated": best - float(null_max.mean()),
                 "p_value": (1 + int((null_max >= best - 1e-12).sum())) / (1 + P)},
    })
    return rec


def degenerate(x: torch.Tensor, rtol: float = 1e-6) -> bool:
    """True when the rows of ``x`` are (numerically) one vector: zero variance across samples after the L2
    normalization the metrics use."""
    x = F.normalize(x.double(), dim=1)
    return bool(x.std(dim=0).max() <= rtol) if x.shape[0] > 1 else True


def _score(image_feats, text_feats, ia, ta, rows, metric, k, backend):
    scores = torch.empty(len(ia), len(ta), dtype=torch.float64)
    if metric == "mutual_knn":
        kk = resolve_k(k, len(rows))
        # One kNN table per layer (normalized rows, inner product, diagonal excluded), reused by every pair.
        img_idx = [so.knn(image_feats[a][rows], kk, backend=backend) for a in ia]
        txt_idx = [so.knn(text_feats[b][rows], kk, backend=backend) for b in ta]
        for i, x in enumerate(img_idx):
            for j, y in enumerate(txt_idx):
                scores[i, j] = so.mutual_knn_from_indices(x, y)
        return scores, kk, img_idx, txt_idx
    else:
        kk = None
        unbiased = metric == "cka_unbiased"
        # Rows are L2-normalized first, as for mutual kNN (docs/spec.md §3).
        txt = [F.normalize(text_feats[b][rows].double(), dim=1) for b in ta]
        for i, a in enumerate(ia):
            xa = F.normalize(image_feats[a][rows].double(), dim=1)
            for j, xb in enumerate(txt):
                scores[i, j] = so.cka(xa, xb, unbiased=unbiased)
    return scores, kk, None, None
