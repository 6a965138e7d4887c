#!/usr/bin/env python
"""Do the default training flags work in the low-data regime? Default flags vs a tuned configuration.

A fresh dataset of a few hundred pairs is generated (scikit-learn's handwritten digits drawn with a seed the
demo does not use, one generated caption per image, written as PNG files + a captions CSV), and run through
the command line exactly as a new user would: ``extract`` (built-in EfficientNet-lite0 × all-MiniLM-L6-v2),
``select-layers``, ``train`` with no training flag at all, ``evaluate``. Then a grid of learning rates and
batch sizes (same layers, same λ) is trained and the configuration with the best *validation* R@1 is the
"tuned" one; both are compared on the test split. Also trained: the paper's fixed 1 000-step warm-up at batch
4 096, which on a small set is one step per epoch (what the old defaults did).

    python python/low_data_defaults.py --out runs/low-data        # all parts, one after the other

The parts can run as separate processes (``--part defaults``, ``--part grid --lrs 1e-3``, ...; each writes its
results under <out>/parts/) and ``--part report`` combines them.

Prints a table and writes <out>/low_data_defaults.json. Exit status 1 when the default is more than 10 %
(relative, mean of image→text and text→image R@1) below the tuned configuration.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch


def make_dataset(root: Path, n: int, seed: int) -> Path:
    from structure_ops.train.data import digits_pairs

    pairs = digits_pairs(limit=n, image_size=64, seed=seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, (im, cap) in enumerate(zip(pairs.images, pairs.captions, strict=True)):
            im.save(root / "images" / f"{i:04d}.png")
            w.writerow([f"images/{i:04d}.png", cap])
    return root / "pairs.csv"


def r1(m: dict) -> float:
    return (m["i2t_R@1"] + m["t2i_R@1"]) / 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/low-data"))
    p.add_argument("--images", type=int, default=600, help="generated image-caption pairs")
    p.add_argument("--seed", type=int, default=11, help="data seed (the demo uses 0)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 360])
    p.add_argument("--part", choices=["all", "defaults", "grid", "old", "report"], default="all")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    parts = a.out / "parts"
    parts.mkdir(parents=True, exist_ok=True)

    from structure_ops.cli import main as cli
    from structure_ops.train.pipeline import evaluate_heads, pick_layers, read_manifest, run_features, train_heads
    from structure_ops.train.trainer import TrainConfig

    t0 = time.perf_counter()
    run = str(a.out / "run")
    if a.part in ("all", "defaults"):
        captions = make_dataset(a.out / "data", a.images, a.seed)
        steps = [["extract", "--captions", str(captions), "--out", run, "--val", "0.15", "--test", "0.25"],
                 ["select-layers", "--run", run],
                 ["train", "--run", run, "--name", "defaults"],
                 ["evaluate", "--run", run, "--name", "defaults"]]
        for argv_ in steps:
            print("$ structure-ops " + " ".join(argv_), flush=True)
            if cli(argv_) != 0:
                return 2
        if a.part == "defaults":
            return 0

    m = read_manifest(run)
    layers = pick_layers(run, "best", m)
    img = run_features(run, m, "image_features", layers=[layers[0]])
    txt = run_features(run, m, "text_features", layers=[layers[1]])
    n_train = len(m["splits"]["train"])

    def fit(**kw):
        cfg = TrainConfig(**kw)
        res = train_heads(img, txt, m["image_of"], m["splits"], layers, cfg, None, progress=False)
        ev = {s: evaluate_heads(res.image_head, res.text_head, layers, img, txt, m["image_of"], m["splits"][s])
              for s in ("val", "test")}
        return {"config": {k: v for k, v in kw.items()}, "batch_size": res.batch_size, "warmup_steps": res.warmup_steps,
                "lr": res.lr, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                "val_R@1": r1(ev["val"]), "test_R@1": r1(ev["test"]), "test": ev["test"], "notes": res.notes}

    if a.part in ("all", "grid"):
        for lr in a.lrs:
            for bs in a.batch_sizes:
                bs = min(bs, n_train)
                r = fit(lr=lr, batch_size=bs)
                (parts / f"grid_lr{lr:g}_bs{bs}.json").write_text(json.dumps(r, default=str))
                print(f"  lr {lr:g}, batch {bs}: val R@1 {r['val_R@1']:.3f}, test R@1 {r['test_R@1']:.3f} "
                      f"(best epoch {r['best_epoch']} of {r['epochs_run']})", flush=True)
    if a.part in ("all", "old"):  # the paper's step warm-up at the paper's batch: the old defaults
        (parts / "old.json").write_text(json.dumps(fit(warmup=1000, batch_size=4096), default=str))
    if a.part not in ("all", "report"):
        return 0
    default = json.loads((Path(run) / "metrics.json").read_text())["defaults"]["test"]
    grid = [json.loads(f.read_text()) for f in sorted(parts.glob("grid_*.json"))]
    old = json.loads((parts / "old.json").read_text())
    tuned = max(grid, key=lambda r: r["val_R@1"])

    d = r1(default)
    rows = [("defaults (no training flag)", d, default["i2t_R@1"], default["t2i_R@1"],
             f"batch {default['heads']['batch_size']}, warm-up {default['heads']['warmup_steps']} steps, "
             f"lr {default['heads']['lr']:.2g} (range test), best epoch {default['heads']['best_epoch']}"),
            ("tuned (best val R@1 of the grid)", tuned["test_R@1"], tuned["test"]["i2t_R@1"], tuned["test"]["t2i_R@1"],
             f"lr {tuned['config']['lr']:g}, batch {tuned['batch_size']}, best epoch {tuned['best_epoch']}"),
            ("best test R@1 of the grid", max(r["test_R@1"] for r in grid), float("nan"), float("nan"), "(an oracle)"),
            ("--warmup 1000 --batch-size 4096", old["test_R@1"], old["test"]["i2t_R@1"], old["test"]["t2i_R@1"],
             f"batch {old['batch_size']}, best epoch {old['best_epoch']}, lr {old['lr']:.2g}")]
    ratio = d / tuned["test_R@1"] if tuned["test_R@1"] > 0 else float("nan")
    print(f"\n{len(m['splits']['train'])} train / {len(m['splits']['val'])} val / {len(m['splits']['test'])} test pairs; "
          f"layers {layers[0]} × {layers[1]}; λ = 10\n")
    print("| configuration | test R@1 (mean) | i2t R@1 | t2i R@1 | |\n|---|---|---|---|---|")
    for name, v, i2t, t2i, info in rows:
        print(f"| {name} | {v:.3f} | {i2t:.3f} | {t2i:.3f} | {info} |")
    print(f"\ndefaults / tuned = {ratio:.3f} ({'within' if ratio >= 0.9 else 'NOT within'} 10 %); "
          f"{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads")
    report = {"default": default, "tuned": tuned, "grid": grid, "old_defaults": old, "ratio": ratio,
              "layers": list(layers), "splits": {k: len(v) for k, v in m["splits"].items()},
              "seconds": time.perf_counter() - t0}
    (a.out / "low_data_defaults.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
