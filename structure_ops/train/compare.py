"""Compare training configurations on one run folder (``structure-ops compare``; ``python/compare_lambda.py``).

Sweeps λ (and STRUCTURE levels, layer choices, seeds) on an existing run folder: its cached features, splits
and zero-shot set are reused, nothing is re-extracted. Every configuration is a named training run
(``<run>/train/<name>``, so ``evaluate --name``, ``embed`` and ``AlignedModel.from_run(run, name)`` work on
it), trained with the library's defaults except the swept values, evaluated on the test split (retrieval
R@1/5/10 both ways, zero-shot when the run has a zero-shot set), and aggregated as mean ± std over
``--seeds`` (initialisation and batch order; the split is the run's).

λ = 0 is CLIP alone, so it is trained once per layer choice whatever ``--levels`` says. With more than one
level, the level weights are 1/l (``--weighting auto``, as in the paper's configs for L ≥ 2).

Writes <run>/compare/results.json, results.md, accuracy.png, training_curves.png; ``--resume`` continues
interrupted configurations from their checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .features import atomic_write_text
from .pipeline import (
    aggregate,
    evaluate_heads,
    load_heads,
    pick_layers,
    read_manifest,
    run_features,
    train_run,
    zero_shot_features,
)
from .trainer import TrainConfig

RETRIEVAL = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
ZERO_SHOT = ("zeroshot_top1", "zeroshot_top5")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run folder with manifest.json (and layer_scores.json)")
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="λ values")
    p.add_argument("--levels", type=int, nargs="+", default=[1], help="STRUCTURE levels (random-walk steps)")
    p.add_argument("--layers", nargs="+", default=["best"], help="layer choices: best | last | IMAGE_LAYER,TEXT_LAYER")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds to average over")
    p.add_argument("--split", default="test", choices=["val", "test"], help="evaluation split")
    p.add_argument("--weighting", default="auto", choices=["auto", "none", "inverse"], help="auto: none for 1 level, else inverse")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"])
    p.add_argument("--dim", type=int, default=512)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--warmup", type=int, help="λ warm-up in optimizer steps (default: --warmup-frac 0.05)")
    w.add_argument("--warmup-epochs", type=float, help="λ warm-up in epochs")
    w.add_argument("--warmup-frac", type=float, help="λ warm-up as a fraction of epochs × steps per epoch (default 0.05)")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--lr", type=float, help="learning rate (default: LR range test per configuration)")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, help="default: adapts to the training set (a power of two near n/8, 32…4096)")
    p.add_argument("--patience", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue interrupted configurations from their checkpoints")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")


def configurations(a: argparse.Namespace, run: Path) -> dict[str, tuple]:
    """{name: (layer rule, (image layer, text layer), λ, levels)} in sweep order; λ = 0 once per layer choice."""
    if any(lam < 0 for lam in a.lams) or any(lv < 1 for lv in a.levels):
        raise ValueError("--lams must be >= 0 and --levels >= 1")
    out = {}
    m = read_manifest(run)
    for rule in a.layers:
        layers = pick_layers(run, rule, m)
        for lam in a.lams:
            for levels in a.levels[:1] if lam == 0 else a.levels:
                name = f"{rule} ({layers[0]} × {layers[1]}), λ={lam:g}" + (f", L={levels}" if lam > 0 and len(a.levels) > 1 else "")
                out[name] = (rule, layers, lam, levels)
    return out


def run_name(rule: str, lam: float, levels: int, seed: int) -> str:
    import re

    return f"compare_{re.sub(r'[^A-Za-z0-9._-]+', '-', rule)}_lam{lam:g}_L{levels}_seed{seed}"


def compare(a: argparse.Namespace, log=print) -> dict:
    """Train and evaluate every configuration; returns the report written to <run>/compare/results.json."""
    from .plots import metric_bars, training_curves

    run = Path(a.run)
    m = read_manifest(run)
    zs_all = zero_shot_features(run, m)
    configs = configurations(a, run)
    metrics_shown = RETRIEVAL + (ZERO_SHOT[: 2 if zs_all and zs_all[3] > 5 else 1] if zs_all else ())
    base = TrainConfig(head=a.head, dim=a.dim, warmup=a.warmup, warmup_epochs=a.warmup_epochs, warmup_frac=a.warmup_frac,
                       temperature=a.temperature, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, patience=a.patience,
                       backend=a.backend, device=a.device)
    out = run / "compare"
    per_seed: dict[str, list[dict]] = {}
    histories: dict[str, list[dict]] = {}
    log(f"{len(configs)} configurations × {len(a.seeds)} seed(s) on {run} ({len(m['splits']['train'])} training pairs, "
        f"evaluated on {len(m['splits'][a.split])} {a.split} captions)")
    for name, (rule, layers, lam, levels) in configs.items():
        weighting = a.weighting if a.weighting != "auto" else ("none" if levels == 1 else "inverse")
        per_seed[name] = []
        for seed in a.seeds:
            cfg = dataclasses.replace(base, lam=lam, levels=levels, weighting=weighting, seed=seed)
            rname, folder, res = train_run(run, f"{layers[0]},{layers[1]}", cfg, name=run_name(rule, lam, levels, seed),
                                           resume=a.resume, manifest=m)
            image_head, text_head, _ = load_heads(folder / "heads.safetensors")  # evaluate what was saved
            img = run_features(run, m, "image_features", layers=[layers[0]])
            txt = run_features(run, m, "text_features", layers=[layers[1]])
            zs = zero_shot_features(run, m, layers)
            r = evaluate_heads(image_head, text_head, layers, img, txt, m["image_of"], m["splits"][a.split], zs)
            r.update(seed=seed, name=rname, lr=res.lr, best_epoch=res.best_epoch, epochs=len(res.history),
                     batch_size=res.batch_size, warmup_steps=res.warmup_steps)
            per_seed[name].append(r)
            if seed == a.seeds[0]:
                histories[name] = res.history
            log(f"  {name}, seed {seed}: " + "  ".join(f"{k} {r[k]:.3f}" for k in ("i2t_R@1", "t2i_R@1", *ZERO_SHOT[:1]) if k in r)
                + f"  (lr {res.lr:.2g}, best epoch {res.best_epoch}; run {rname})")

    results = {name: {k: aggregate([r[k] for r in runs]) for k in metrics_shown} for name, runs in per_seed.items()}
    lines = ["| configuration | " + " | ".join(metrics_shown) + " |", "|---" * (len(metrics_shown) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(s[k]) for k in metrics_shown) + " |" for n, s in results.items()]
    table = "\n".join(lines)
    report = {
        "run": str(run), "split": a.split, "seeds": a.seeds,
        "configurations": {n: {"rule": c[0], "layers": list(c[1]), "lam": c[2], "levels": c[3]} for n, c in configs.items()},
        "results": {n: {k: dataclasses.asdict(s) for k, s in st.items()} for n, st in results.items()},
        "per_seed": per_seed,
    }
    atomic_write_text(out / "results.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "results.md", f"# λ sweep on {run} ({a.split} split, seeds {a.seeds})\n\n{table}\n")
    bars = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5") + (("zeroshot_top1",) if zs_all else ())
    metric_bars({n: {k: (s[k].mean, s[k].std) for k in bars} for n, s in results.items()}, out / "accuracy.png")
    training_curves(histories, out / "training_curves.png")
    log(f"\nmean ± std over seeds {a.seeds}:\n\n{table}\n\nwrote {out}/results.{{json,md}}, accuracy.png, training_curves.png")
    return report
