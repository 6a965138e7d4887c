"""Layer selection (SPEC.md §3): score every (vision layer, text layer) pair, pick the best or the last.

Mutual kNN: each layer's kNN lists are computed once (``structure_ops.knn``, streamed top-k, ties to the
lower index) and every pair only intersects two (n, k) index tables, so the cost is (L_v + L_t) top-k passes
plus L_v·L_t cheap intersections instead of L_v·L_t Gram matrices. CKA (biased or unbiased) is the
alternative metric. Scores are computed on a random subset of rows (5 000 in the paper).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import functional as so
from .._options import resolve_k
from .features import atomic_write_text

METRICS = ("mutual_knn", "cka", "cka_unbiased")


@dataclass
class LayerScores:
    """``scores[i, j]`` for image layer ``image_layers[i]`` and text layer ``text_layers[j]``."""

    scores: torch.Tensor
    image_layers: list[str]
    text_layers: list[str]
    metric: str
    k: int | None
    n: int

    def best(self) -> tuple[str, str]:
        i, j = divmod(int(torch.argmax(self.scores)), self.scores.shape[1])  # first maximum on ties
        return self.image_layers[i], self.text_layers[j]

    def last(self) -> tuple[str, str]:
        return self.image_layers[-1], self.text_layers[-1]

    def pick(self, rule: str) -> tuple[str, str]:
        if rule not in ("best", "last"):
            raise ValueError(f"layer rule must be 'best' or 'last', got {rule!r}")
        return self.best() if rule == "best" else self.last()

    def to_json(self) -> dict:
        return {
            "metric": self.metric, "k": self.k, "n": self.n, "image_layers": self.image_layers,
            "text_layers": self.text_layers, "scores": self.scores.tolist(), "best": list(self.best()),
            "last": list(self.last()),
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image_layer", "text_layer", self.metric])
        for i, a in enumerate(self.image_layers):
            for j, b in enumerate(self.text_layers):
                w.writerow([a, b, f"{float(self.scores[i, j]):.6f}"])
        return buf.getvalue()

    def save(self, out_dir) -> None:
        from pathlib import Path

        out = Path(out_dir)
        atomic_write_text(out / "layer_scores.json", json.dumps(self.to_json(), indent=1) + "\n")
        atomic_write_text(out / "layer_scores.csv", self.to_csv())

    @classmethod
    def from_json(cls, d: dict) -> LayerScores:
        return cls(torch.tensor(d["scores"], dtype=torch.float64), d["image_layers"], d["text_layers"], d["metric"], d["k"], d["n"])


def score_layers(image_feats: dict[str, torch.Tensor], text_feats: dict[str, torch.Tensor], *,
                 metric: str = "mutual_knn", k: int | str = "rice", subset: int | None = 5000, seed: int = 0,
                 backend: str = "auto") -> LayerScores:
    """Score all layer pairs on the same random ``subset`` of paired rows (all rows if None or larger)."""
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
    scores = torch.empty(len(ia), len(ta), dtype=torch.float64)
    if metric == "mutual_knn":
        kk = resolve_k(k, len(rows))
        # One kNN table per layer (normalized rows, inner product, diagonal excluded), reused by every pair.
        img_idx = [so.knn(image_feats[a][rows], kk, backend=backend) for a in ia]
        txt_idx = [so.knn(text_feats[b][rows], kk, backend=backend) for b in ta]
        for i, x in enumerate(img_idx):
            for j, y in enumerate(txt_idx):
                scores[i, j] = so.mutual_knn_from_indices(x, y)
    else:
        kk = None
        unbiased = metric == "cka_unbiased"
        # Rows are L2-normalized first, as for mutual kNN (SPEC.md §3).
        txt = [F.normalize(text_feats[b][rows].double(), dim=1) for b in ta]
        for i, a in enumerate(ia):
            xa = F.normalize(image_feats[a][rows].double(), dim=1)
            for j, xb in enumerate(txt):
                scores[i, j] = so.cka(xa, xb, unbiased=unbiased)
    return LayerScores(scores, ia, ta, metric, kk, len(rows))
