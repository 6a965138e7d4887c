"""Evaluation (docs/spec.md §5): zero-shot classification and image↔text retrieval on aligned embeddings.

Zero-shot: class embedding = mean over prompt templates of the normalized aligned text embeddings,
renormalized; logits = 100·cos(image, class); top-1 / top-5 accuracy.
Retrieval: cosine top-k; image→text is a hit if any of the k retrieved captions belongs to the query image,
text→image if the k retrieved images include the caption's image. R@1/5/10 in both directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_embeddings(prompt_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C·T, d) aligned prompt embeddings, class-major (class c's T prompts are rows c·T … c·T+T−1) → (C, d)."""
    if prompt_emb.shape[0] % n_classes:
        raise ValueError(f"{prompt_emb.shape[0]} prompt embeddings do not split into {n_classes} classes")
    per_class = F.normalize(prompt_emb, dim=1).view(n_classes, -1, prompt_emb.shape[1]).mean(1)
    return F.normalize(per_class, dim=1)


def zero_shot(image_emb: torch.Tensor, class_emb: torch.Tensor, labels, topk=(1, 5),
              mean_per_class: bool = False) -> dict[str, float]:
    """Top-k accuracy of 100·cos(image, class) against ``labels``; a k not below the number of classes (where
    every prediction is a hit) is left out. ``mean_per_class``: also ``mean_per_class`` = the top-1 recall of
    each class present in ``labels``, averaged over those classes (the metric of unbalanced sets such as
    Caltech-101, Oxford Pets, Flowers-102, FGVC Aircraft)."""
    topk = tuple(k for k in topk if k < class_emb.shape[0] or k == 1)
    labels = torch.as_tensor(labels, device=image_emb.device)
    logits = 100.0 * F.normalize(image_emb, dim=1) @ class_emb.T
    ranked = logits.topk(min(max(topk), class_emb.shape[0]), dim=1).indices
    out = {f"top{k}": float((ranked[:, :k] == labels[:, None]).any(1).double().mean()) for k in topk}  # exact counts
    if mean_per_class:
        hit = (ranked[:, 0] == labels).double()
        present = labels.unique()
        out["mean_per_class"] = float(torch.stack([hit[labels == c].mean() for c in present]).mean())
    return out


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, image_of, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k both ways; ``image_of[j]`` is the row of caption j's image in ``image_emb``."""
    image_of = torch.as_tensor(image_of)
    sim = F.normalize(image_emb, dim=1) @ F.normalize(text_emb, dim=1).T  # (images, captions)
    kmax = max(ks)
    out = {}
    t2i = sim.T.topk(min(kmax, sim.shape[0]), dim=1).indices  # images for each caption
    i2t = sim.topk(min(kmax, sim.shape[1]), dim=1).indices  # captions for each image
    own = torch.arange(sim.shape[0])[:, None]
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i[:, :k] == image_of[:, None]).any(1).float().mean())
        out[f"i2t_R@{k}"] = float((image_of[i2t[:, :k]] == own).any(1).float().mean())
    return out


def retrieval_chance(image_of, ks=(1, 5, 10)) -> dict[str, float]:
    """R@k of random rankings, for the captions whose images are ``image_of`` (any ids; one entry per caption).

    text→image: k of the n images are retrieved, so min(k, n)/n. image→text: an image with c of the N captions
    is missed with probability C(N−c, k)/C(N, k); the mean over images of one minus that.
    """
    import math
    from collections import Counter

    counts = list(Counter(int(i) for i in image_of).values())
    n_img, n_cap = len(counts), sum(counts)
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = min(k, n_img) / n_img
        kk = min(k, n_cap)
        out[f"i2t_R@{k}"] = sum(1.0 - math.comb(n_cap - c, kk) / math.comb(n_cap, kk) for c in counts) / n_img
    return out
