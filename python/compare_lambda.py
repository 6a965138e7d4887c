#!/usr/bin/env python
"""Sweep λ (and STRUCTURE levels, layer choices, seeds) on an existing run folder and compare the heads.

The run folder is one written by ``coco_dinov2_roberta.py`` or by ``structure-ops extract`` (+ ``select-layers``
for ``--layers best``): its cached features, splits and zero-shot set are reused, nothing is re-extracted.
Every configuration trains heads with the paper's defaults except the swept values, is evaluated on the test
split (retrieval R@1/5/10 both ways, zero-shot when the run has a zero-shot set), and is aggregated as
mean ± std over ``--seeds`` (initialisation and batch order; the split is the run's).

    python python/compare_lambda.py --run runs/coco --lams 0 1 10 --levels 1 2 --seeds 0 1 2

λ = 0 is CLIP alone, so it is trained once per layer choice whatever ``--levels`` says. With more than one
level, the level weights are 1/l (``--weighting auto``, as in the paper's configs for L ≥ 2).

Writes <run>/compare/: one folder per configuration and seed (heads.safetensors, history.json, a checkpoint:
``--resume`` continues an interrupted sweep), results.json, results.md, accuracy.png, training_curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from structure_ops.train.features import atomic_write_text
from structure_ops.train.pipeline import (
    aggregate,
    evaluate_heads,
    load_heads,
    pick_layers,
    read_manifest,
    run_features,
    save_heads,
    train_heads,
    zero_shot_features,
)
from structure_ops.train.plots import metric_bars, training_curves
from structure_ops.train.trainer import TrainConfig

RETRIEVAL = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
ZERO_SHOT = ("zeroshot_top1", "zeroshot_top5")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder with manifest.json (and layer_scores.json)")
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="λ values")
    p.add_argument("--levels", type=int, nargs="+", default=[1], help="STRUCTURE levels (random-walk steps)")
    p.add_argument("--layers", nargs="+", default=["best"], help="layer choices: best | last | IMAGE_LAYER,TEXT_LAYER")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds to average over")
    p.add_argument("--split", default="test", choices=["val", "test"], help="evaluation split")
    p.add_argument("--weighting", default="auto", choices=["auto", "none", "inverse"], help="auto: none for 1 level, else inverse")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--lr", type=float, help="learning rate (default: LR range test per configuration)")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--patience", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue interrupted configurations from their checkpoints")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if any(lam < 0 for lam in a.lams) or any(lv < 1 for lv in a.levels):
        p.error("--lams must be >= 0 and --levels >= 1")
    return a


def configurations(a: argparse.Namespace, run: Path, img: dict, txt: dict) -> dict[str, tuple]:
    """{name: (layer rule, (image layer, text layer), λ, levels)} in sweep order; λ = 0 once per layer choice."""
    out = {}
    for rule in a.layers:
        layers = pick_layers(run, rule)
        for lam in a.lams:
            for levels in a.levels[:1] if lam == 0 else a.levels:
                name = f"{rule} ({layers[0]} × {layers[1]}), λ={lam:g}" + (f", L={levels}" if lam > 0 and len(a.levels) > 1 else "")
                out[name] = (rule, layers, lam, levels)
    return out


def folder_name(rule: str, lam: float, levels: int, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', rule)}_lam{lam:g}_L{levels}_seed{seed}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        m = read_manifest(a.run)
        img, txt = run_features(a.run, m, "image_features"), run_features(a.run, m, "text_features")
        zs = zero_shot_features(a.run, m)
        configs = configurations(a, a.run, img, txt)
    except (FileNotFoundError, ValueError) as e:
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        return 2
    metrics_shown = RETRIEVAL + (ZERO_SHOT if zs else ())
    base = TrainConfig(head=a.head, dim=a.dim, warmup=a.warmup, temperature=a.temperature, lr=a.lr, epochs=a.epochs,
                       batch_size=a.batch_size, patience=a.patience, backend=a.backend, device=a.device)
    out = a.run / "compare"
    per_seed: dict[str, list[dict]] = {}
    histories: dict[str, list[dict]] = {}
    print(f"{len(configs)} configurations × {len(a.seeds)} seed(s) on {a.run} ({len(m['splits']['train'])} training pairs, "
          f"evaluated on {len(m['splits'][a.split])} {a.split} captions)")
    for name, (rule, layers, lam, levels) in configs.items():
        weighting = a.weighting if a.weighting != "auto" else ("none" if levels == 1 else "inverse")
        per_seed[name] = []
        for seed in a.seeds:
            cfg = dataclasses.replace(base, lam=lam, levels=levels, weighting=weighting, seed=seed)
            folder = out / folder_name(rule, lam, levels, seed)
            res = train_heads(img, txt, m["image_of"], m["splits"], layers, cfg, folder, resume=a.resume)
            save_heads(folder / "heads.safetensors", res, layers, cfg, (img[layers[0]].shape[1], txt[layers[1]].shape[1]))
            image_head, text_head, _ = load_heads(folder / "heads.safetensors")  # evaluate what was saved
            r = evaluate_heads(image_head, text_head, layers, img, txt, m["image_of"], m["splits"][a.split], zs)
            r.update(seed=seed, lr=res.lr, best_epoch=res.best_epoch, epochs=len(res.history))
            per_seed[name].append(r)
            if seed == a.seeds[0]:
                histories[name] = res.history
            print(f"  {name}, seed {seed}: " + "  ".join(f"{k} {r[k]:.3f}" for k in ("i2t_R@1", "t2i_R@1", *ZERO_SHOT[:1]) if k in r)
                  + f"  (lr {res.lr:.2g}, best epoch {res.best_epoch})")

    results = {name: {k: aggregate([r[k] for r in runs]) for k in metrics_shown} for name, runs in per_seed.items()}
    lines = ["| configuration | " + " | ".join(metrics_shown) + " |", "|---" * (len(metrics_shown) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(s[k]) for k in metrics_shown) + " |" for n, s in results.items()]
    table = "\n".join(lines)
    report = {
        "run": str(a.run), "split": a.split, "seeds": a.seeds,
        "configurations": {n: {"rule": c[0], "layers": list(c[1]), "lam": c[2], "levels": c[3]} for n, c in configs.items()},
        "results": {n: {k: dataclasses.asdict(s) for k, s in st.items()} for n, st in results.items()},
        "per_seed": per_seed,
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "results.md", f"# λ sweep on {a.run} ({a.split} split, seeds {a.seeds})\n\n{table}\n")
    bars = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5") + (("zeroshot_top1",) if zs else ())
    metric_bars({n: {k: (s[k].mean, s[k].std) for k in bars} for n, s in results.items()}, out / "accuracy.png")
    training_curves(histories, out / "training_curves.png")
    print(f"\nmean ± std over seeds {a.seeds}:\n\n{table}\n\nwrote {out}/results.{{json,md}}, accuracy.png, training_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
