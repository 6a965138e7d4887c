"""The embedded demo (``structure-ops demo``): the whole pipeline, offline, on real encoders and real images.

1. Exactness: the docs/spec.md anchoring values recomputed by the selected backend in float64.
2. Data: scikit-learn's handwritten digits as images, captions generated from the labels in varied templates
   (with stroke weight and size), a low-data split (a few hundred training pairs), re-drawn for every seed.
3. Encoders (installed from the package registry, run offline): EfficientNet-lite0 (ImageNet weights, every
   block hooked) and all-MiniLM-L6-v2 (every hidden state, masked mean). Features cached in the run folder.
4. For each seed: layer selection by mutual kNN on the training pairs, then four heads trained with
   CLIP (+ λ·STRUCTURE): last layers (baseline), selected layers, last layers + STRUCTURE, both.
5. Evaluation on held-out images: zero-shot digit classification (prompts unlike the training captions) and
   image↔text retrieval; mean ± std over seeds. Writes report.json, summary.md, PNG plots; prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from . import functional as so
from .train import data as D
from .train.encoders import build_encoder
from .train.features import atomic_write_text
from .train.pipeline import aggregate, evaluate_heads, extract_run, run_features, split_by_image, train_heads
from .train.plots import layer_heatmap, metric_bars, training_curves
from .train.selection import score_layers
from .train.trainer import TrainConfig

_G = lambda n, d, f, a, b: torch.tensor(  # noqa: E731 - docs/spec.md's structured test matrices
    [[f(a * (i * d + j) + b) for j in range(d)] for i in range(n)], dtype=torch.float64
)


def anchors(backend: str) -> list[dict]:
    """docs/spec.md anchoring values, recomputed."""
    x2, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    x, z = _G(6, 4, math.sin, 1, 1), _G(6, 3, math.cos, 0.5, 0.3).requires_grad_()
    r = so.structure_loss(x, z, backend=backend)
    (gz,) = torch.autograd.grad(r, z)
    a, b = _G(4, 3, math.sin, 1, 0), _G(4, 3, math.cos, 1, 0)
    rows = [
        ("R_S two points, tau=1", 0.0140896209, so.structure_loss(x2, z2, temperature=1.0, backend=backend)),
        ("R_S G-matrices, tau=0.05", 1.921506772, r),
        ("R_S G-matrices, tau=0.1", 1.73567932, so.structure_loss(x, z, temperature=0.1, backend=backend)),
        ("R_S G-matrices, tau=0.5", 0.3334592893, so.structure_loss(x, z, temperature=0.5, backend=backend)),
        ("||dR_S/dZ||_F", 3.0836637247, gz.norm()),
        ("CLIP, T=0.05", 4.601090522, so.clip_loss(a, b, 20.0, backend=backend)),
        ("CLIP, T=1", 1.356212372, so.clip_loss(a, b, 1.0, backend=backend)),
        ("mutual kNN k=2", 0.1875, so.mutual_knn(_G(8, 4, math.sin, 1, 1), _G(8, 3, math.cos, 0.5, 0.3), 2, backend=backend)),
    ]
    return [{"quantity": q, "spec": s, "ours": float(v.detach()), "rel_err": abs(float(v.detach()) - s) / abs(s)} for q, s, v in rows]


CONFIGS = {  # name: (layer rule, λ)
    "last layers, CLIP": ("last", 0.0),
    "selected layers, CLIP": ("best", 0.0),
    "last layers, CLIP+STRUCTURE": ("last", 10.0),
    "selected layers, CLIP+STRUCTURE": ("best", 10.0),
}
METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")


@dataclasses.dataclass
class DemoSize:
    images: int | None  # None: all 1 797
    image_size: int
    train: int
    val: int
    epochs: int
    patience: int
    warmup: int


FULL = DemoSize(images=None, image_size=128, train=250, val=150, epochs=400, patience=100, warmup=50)
QUICK = DemoSize(images=300, image_size=64, train=100, val=50, epochs=40, patience=20, warmup=10)


def _table(results: dict[str, dict[str, object]]) -> str:
    lines = ["| configuration | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, stats in results.items():
        lines.append(f"| {name} | " + " | ".join(str(stats[m]) for m in METRICS) + " |")
    return "\n".join(lines)


def run(out_dir: str = "runs/demo", backend: str = "auto", quick: bool = False, seeds: int = 3,
        progress: bool = True) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the demo loads is installed; never reach a hub
    t0 = time.perf_counter()
    size = QUICK if quick else FULL
    seed_list = list(range(1 if quick else seeds))
    out = Path(out_dir)
    print(f"structure-ops demo ({'quick' if quick else 'full'}; backend={backend}, threads={torch.get_num_threads()})\n")

    rows = anchors(backend)
    worst = max(r["rel_err"] for r in rows)
    print(f"1. Exactness: {len(rows)} docs/spec.md anchoring values recomputed in float64, max rel. error {worst:.1e}")
    if worst > 1e-8:
        raise RuntimeError(f"anchors do not match docs/spec.md (max rel. error {worst:.2e}): {rows}")

    pairs = D.digits_pairs(limit=size.images, image_size=64)
    n_test = len(pairs.images) - size.train - size.val
    print(f"2. Data: {len(pairs)} digit images with generated captions, e.g. {pairs.captions[0]!r}; "
          f"split per seed: {size.train} train / {size.val} val / {n_test} test pairs")

    t = time.perf_counter()
    image_enc = build_encoder("efficientnet-lite0", "image", image_size=size.image_size)
    text_enc = build_encoder("minilm", "text")
    splits0 = split_by_image(pairs, size.val, n_test, seed=0)
    manifest = extract_run(out, pairs, image_enc, text_enc, splits=splits0,
                           zero_shot_set=(pairs.images, pairs.labels, D.DIGIT_NAMES),
                           templates=D.ZERO_SHOT_TEMPLATES, progress=progress)
    img, txt = run_features(out, manifest, "image_features"), run_features(out, manifest, "text_features")
    zi = run_features(out, manifest, "image_features", "zero_shot")
    zt = run_features(out, manifest, "prompt_features", "zero_shot")
    extract_s = time.perf_counter() - t
    print(f"3. Features: {len(img)} image layers ({image_enc.name}, {size.image_size}px), {len(txt)} text layers "
          f"(all-MiniLM-L6-v2), {extract_s:.0f} s (cached in {Path(manifest['image_features']).parent})")

    per_seed, histories, selections = {name: [] for name in CONFIGS}, {}, []
    labels = torch.tensor(pairs.labels)
    for seed in seed_list:
        splits = split_by_image(pairs, size.val, n_test, seed=seed)
        train_rows = splits["train"]
        scores = score_layers({k: v[train_rows] for k, v in img.items()}, {k: v[train_rows] for k, v in txt.items()},
                              k="rice", subset=None, seed=seed, backend=backend)
        if seed == seed_list[0]:
            scores.save(out)
            layer_heatmap(scores, out / "layer_scores.png")
        best, last = scores.best(), scores.last()
        selections.append({"seed": seed, "best": list(best), "best_score": scores.best_score,
                           "last_score": float(scores.scores[-1, -1])})
        print(f"   seed {seed}: layer selection (mutual kNN, k={scores.k}): best {best[0]} × {best[1]} "
              f"({scores.best_score:.3f}) vs last {last[0]} × {last[1]} ({scores.scores[-1, -1]:.3f})")
        test_imgs = sorted({pairs.image_of[j] for j in splits["test"]})
        zs = (*(({k: v[test_imgs] for k, v in zi.items()}), zt), labels[test_imgs], len(D.DIGIT_NAMES))
        for name, (rule, lam) in CONFIGS.items():
            layers = best if rule == "best" else last
            cfg = TrainConfig(head="linear", dim=256, lam=lam, warmup=size.warmup, epochs=size.epochs,
                              patience=size.patience, batch_size=size.train, seed=seed, backend=backend, checkpoint_every=0)
            res = train_heads(img, txt, pairs.image_of, splits, layers, cfg, None, progress=False)  # a line per run below
            m = evaluate_heads(res.image_head, res.text_head, layers, img, txt, pairs.image_of, splits["test"], zs)
            m.update(lr=res.lr, best_epoch=res.best_epoch)
            per_seed[name].append(m)
            if seed == seed_list[0]:
                histories[name] = res.history
            print(f"      {name:34s} zero-shot top-1 {m['zeroshot_top1']:.3f}  i2t R@1 {m['i2t_R@1']:.3f}  "
                  f"t2i R@1 {m['t2i_R@1']:.3f}  (lr {res.lr:.2g}, best epoch {res.best_epoch})")

    results = {name: {m: aggregate([r[m] for r in runs]) for m in METRICS} for name, runs in per_seed.items()}
    training_curves(histories, out / "training_curves.png")
    metric_bars({n: {m: (s.mean, s.std) for m, s in st.items() if m in METRICS[:4]} for n, st in results.items()},
                out / "accuracy.png")
    seconds = time.perf_counter() - t0
    table = _table(results)
    print(f"\n4. Held-out results, mean ± std over seeds {seed_list} ({n_test} test images each):\n")
    print(table)
    report = {
        "mode": "quick" if quick else "full", "backend": backend, "seeds": seed_list, "anchors": rows,
        "data": {"dataset": pairs.name, "pairs": len(pairs), "train": size.train, "val": size.val, "test": n_test},
        "encoders": {"image": image_enc.describe(), "text": text_enc.describe()}, "layer_selection": selections,
        "results": {n: {m: dataclasses.asdict(s) for m, s in st.items()} for n, st in results.items()},
        "per_seed": per_seed, "extract_seconds": extract_s, "seconds": seconds, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    summary = (
        f"# structure-ops demo ({report['mode']})\n\n{len(pairs)} sklearn digits with generated captions; "
        f"{size.train} training pairs per seed; EfficientNet-lite0 × all-MiniLM-L6-v2; seeds {seed_list}; "
        f"{seconds:.0f} s, {torch.get_num_threads()} threads.\n\n{table}\n\n"
        "![layer scores](layer_scores.png)\n![accuracy](accuracy.png)\n![training curves](training_curves.png)\n"
    )
    atomic_write_text(out / "summary.md", summary)
    print(f"\nwrote {out / 'report.json'}, summary.md and 3 PNG plots ({seconds:.0f} s)")
    return report
