#!/usr/bin/env python
"""COCO captions × DINOv2 × all-roberta-large-v1 at the paper's hyper-parameters (STRUCTURE, NeurIPS 2025).

Copy this file and edit it: every step is a call into ``structure_ops.train``; this script only reads COCO's
annotation files and chooses the splits. Four stages, each reading what the previous one wrote into the run
folder (``--stages`` runs a subset; a re-run reuses the cached features and ``--resume`` continues training):

  extract   every layer of both encoders for the train / val / test pairs (and the zero-shot images), cached
  select    mutual kNN score of every (image layer, text layer) pair on ≤ 5 000 training pairs → best pair
  train     linear heads → 512 with CLIP + λ·STRUCTURE: AdamW (0.9, 0.95), wd 1e-4, batch 4 096, LR range
            test, cosine schedule, λ = 10 after a 1 000-step warm-up, τ = 0.05, 1 level, ≤ 1 000 epochs with
            early stopping on the validation loss (patience 200)
  evaluate  retrieval R@1/5/10 image→text and text→image on the test images (+ zero-shot top-1/5 when
            ``--zero-shot-imagenet-root`` is given); writes metrics.json and prints a table

Data, the standard COCO 2014 layout:

  COCO/annotations/captions_train2014.json   COCO/train2014/*.jpg   training pairs (one caption per image)
  COCO/annotations/captions_val2014.json     COCO/val2014/*.jpg     validation (early stopping) + test images

Validation and test images are disjoint random draws (``--seed``) from val2014; without captions_val2014.json
they are held out of train2014 instead. Validation pairs use one caption per image (a contrastive loss
over duplicated images would count true pairs as negatives), test images keep ``--test-captions`` captions
(COCO retrieval convention: 5).

    python python/coco_dinov2_roberta.py --coco-root /data/coco --out runs/coco

The run folder is also a ``structure-ops`` run folder (manifest.json, features/, layer_scores.json, train/),
so the CLI's commands work on it, e.g. multi-GPU training:
``torchrun --nproc_per_node=K -m structure_ops train --run runs/coco`` between ``--stages extract,select``
and ``--stages evaluate``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from structure_ops.train.data import Pairs, check_templates, load_image_folder
from structure_ops.train.encoders import build_encoder
from structure_ops.train.features import atomic_write_text
from structure_ops.train.pipeline import (
    evaluate_run,
    extract_run,
    read_manifest,
    run_features,
    selection_provenance,
    train_run,
)
from structure_ops.train.plots import layer_heatmap, training_curves
from structure_ops.train.selection import score_layers
from structure_ops.train.trainer import TrainConfig

STAGES = ("extract", "select", "train", "evaluate")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--coco-root", type=Path, help="COCO 2014 folder (annotations/, train2014/, val2014/); needed by extract")
    p.add_argument("--out", type=Path, default=Path("runs/coco-dinov2-roberta"), help="run folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")

    g = p.add_argument_group("data")
    g.add_argument("--max-pairs", type=int, help="random subset of this many training pairs (default: all)")
    g.add_argument("--one-caption-per-image", action=argparse.BooleanOptionalAction, default=True,
                   help="training pairs: the first caption of each image (the paper), or all of them")
    g.add_argument("--val-images", type=int, default=5000, help="validation images (early stopping)")
    g.add_argument("--test-images", type=int, default=5000, help="test images (retrieval)")
    g.add_argument("--test-captions", type=int, default=5, help="captions per test image (0: all)")
    g.add_argument("--zero-shot-imagenet-root", type=Path, help="class-labelled folder <root>/<class>/<image> (e.g. ImageNet val)")
    g.add_argument("--zero-shot-class-names", type=Path,
                   help="text file: lines '<folder> <class name>' (e.g. ImageNet's 'n01440764 tench'), or one class name "
                   "per line in the sorted order of the class folders (default: the folder names)")
    g.add_argument("--zero-shot-max-images", type=int, help="random subset of the zero-shot images")
    g.add_argument("--template", action="append", help="zero-shot prompt with {c}, repeatable (default: 'a photo of a {c}.')")
    g.add_argument("--seed", type=int, default=0, help="data subsets and splits; also the training seed")

    g = p.add_argument_group("encoders (frozen; every layer is extracted)")
    g.add_argument("--vision", default="facebook/dinov2-large", help="HF hub name or local folder")
    g.add_argument("--text", default="sentence-transformers/all-roberta-large-v1", help="HF hub name or local folder")
    g.add_argument("--vision-pooling", default="cls", choices=["cls", "mean", "last"])
    g.add_argument("--text-pooling", default="mean", choices=["cls", "mean", "last"])
    g.add_argument("--image-size", type=int, help="input resolution (default: the model's preprocessor config, else 224)")
    g.add_argument("--encoder-dtype", default="auto", choices=list(DTYPES), help="auto: bf16 on GPUs that have it, else fp32")
    g.add_argument("--extract-batch-size", type=int, default=64)

    g = p.add_argument_group("layer selection")
    g.add_argument("--selection-subset", type=int, default=5000, help="random training pairs to score on")
    g.add_argument("--metric", default="mutual_knn", choices=["mutual_knn", "cka", "cka_unbiased"])
    g.add_argument("--k", default="rice", help="mutual kNN k: an int or rice | sqrt | sturges")
    g.add_argument("--layers", default="best", help="best | last | IMAGE_LAYER,TEXT_LAYER")

    g = p.add_argument_group("training (paper defaults)")
    g.add_argument("--head", default="linear", choices=["linear", "mlp"])
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--lam", type=float, default=10.0, help="λ of STRUCTURE (0: CLIP alone)")
    g.add_argument("--warmup", type=int, default=1000, help="λ warm-up, optimizer steps")
    g.add_argument("--levels", type=int, default=1)
    g.add_argument("--weighting", default="none", choices=["none", "inverse"])
    g.add_argument("--temperature", type=float, default=0.05)
    g.add_argument("--lr", type=float, help="learning rate (default: LR range test)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=1000)
    g.add_argument("--batch-size", type=int, default=4096)
    g.add_argument("--patience", type=int, default=200)
    g.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
    g.add_argument("--name", default="paper", help="training run name: <out>/train/<name>/ (evaluate uses it too)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/train/<name>/checkpoint.pt")
    g.add_argument("--backend", default="auto", help="loss backend: auto | reference | cpu | triton | cuda")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (encoders and training)")

    a = p.parse_args(argv)
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if not a.stages or set(a.stages) - set(STAGES):
        p.error(f"--stages must name some of {', '.join(STAGES)}, got {a.stages}")
    if "extract" in a.stages and a.coco_root is None:
        p.error("the extract stage needs --coco-root")
    if a.template:
        try:
            check_templates(a.template)
        except ValueError as e:
            p.error(str(e))
    for name in ("max_pairs", "zero_shot_max_images"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


# ---------------------------------------------------------------------------------------------------------
# Data: COCO's annotation files → one Pairs object (train, then val, then test rows) and its splits.

def load_coco_split(root: Path, split: str) -> list[tuple[str, list[str]]]:
    """(image path, its captions in annotation order) for every captioned image of ``split``, by image id."""
    ann_path, folder = root / "annotations" / f"captions_{split}.json", root / split
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path} not found (expected the COCO 2014 layout: annotations/captions_{split}.json)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found (expected the COCO 2014 layout: {split}/<file_name>)")
    data = json.loads(ann_path.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    captions: dict[int, list[str]] = {}
    for a in data["annotations"]:
        captions.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    out = [(str(folder / files[i]), caps) for i, caps in sorted(captions.items()) if i in files]
    missing = [path for path, _ in out if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {ann_path} are missing, e.g. {missing[:3]}")
    return out


def coco_pairs(a: argparse.Namespace) -> tuple[Pairs, dict[str, list[int]], dict]:
    rng = random.Random(a.seed)
    train = load_coco_split(a.coco_root, "train2014")
    n_held = a.val_images + a.test_images
    if (a.coco_root / "annotations" / "captions_val2014.json").is_file():
        held, source = load_coco_split(a.coco_root, "val2014"), "val2014"
    else:  # no val2014: hold the evaluation images out of train2014
        rng.shuffle(train)
        held, train, source = train[:n_held], train[n_held:], "train2014 (held out)"
    if len(held) < n_held or min(a.val_images, a.test_images) < 2:
        raise ValueError(f"{source} has {len(held)} captioned images; --val-images {a.val_images} + "
                         f"--test-images {a.test_images} (each >= 2) do not fit")
    rng.shuffle(held)
    val, test = held[: a.val_images], held[a.val_images : n_held]

    train_rows = [(path, c) for path, caps in train for c in (caps[:1] if a.one_caption_per_image else caps)]
    if a.max_pairs is not None and a.max_pairs < len(train_rows):
        train_rows = [train_rows[i] for i in sorted(rng.sample(range(len(train_rows)), a.max_pairs))]
    rows = {
        "train": train_rows,
        "val": [(path, caps[0]) for path, caps in val],
        "test": [(path, c) for path, caps in test for c in caps[: a.test_captions or None]],
    }
    images, index, captions, image_of, splits = [], {}, [], [], {}
    for split, pairs in rows.items():
        splits[split] = list(range(len(captions), len(captions) + len(pairs)))
        for path, caption in pairs:
            if path not in index:
                index[path] = len(images)
                images.append(path)
            captions.append(caption)
            image_of.append(index[path])
    info = {"eval_source": source, **{f"{s}_pairs": len(r) for s, r in rows.items()},
            **{f"{s}_images": len({p for p, _ in r}) for s, r in rows.items()}}
    return Pairs(images, captions, image_of, name="coco2014"), splits, info


def zero_shot_set(a: argparse.Namespace):
    paths, labels, names = load_image_folder(a.zero_shot_imagenet_root, a.zero_shot_class_names)
    if a.zero_shot_max_images is not None and a.zero_shot_max_images < len(paths):
        keep = sorted(random.Random(a.seed).sample(range(len(paths)), a.zero_shot_max_images))
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels, names


# ---------------------------------------------------------------------------------------------------------
# The four stages.

def stage_extract(a: argparse.Namespace) -> None:
    pairs, splits, info = coco_pairs(a)
    zs = zero_shot_set(a) if a.zero_shot_imagenet_root is not None else None
    device, dtype = (None if a.device == "auto" else a.device), DTYPES[a.encoder_dtype]
    image_enc = build_encoder(a.vision, "image", pooling=a.vision_pooling, image_size=a.image_size, device=device, dtype=dtype)
    text_enc = build_encoder(a.text, "text", pooling=a.text_pooling, device=device, dtype=dtype)
    m = extract_run(a.out, pairs, image_enc, text_enc, splits=splits, zero_shot_set=zs, templates=a.template,
                    batch_size=a.extract_batch_size)
    atomic_write_text(a.out / "recipe.json", json.dumps({"recipe": Path(__file__).name, "data": info,
                                                        "args": {k: str(v) for k, v in vars(a).items()}}, indent=1) + "\n")
    print(f"[extract] {len(pairs)} pairs / {len(pairs.images)} images ({info['train_pairs']} train, {info['val_pairs']} val, "
          f"{info['test_pairs']} test captions of {info['test_images']} images from {info['eval_source']}); "
          f"{len(m['image_encoder']['layers'])} image × {len(m['text_encoder']['layers'])} text layers"
          + (f"; zero-shot: {len(zs[0])} images, {len(zs[2])} classes" if zs else ""))


def load_run(run: Path):
    m = read_manifest(run)
    return m, run_features(run, m, "image_features"), run_features(run, m, "text_features")


def stage_select(a: argparse.Namespace) -> None:
    m, img, txt = load_run(a.out)
    rows = m["splits"]["train"]
    image_rows = [m["image_of"][j] for j in rows]
    k = int(a.k) if a.k.isdigit() else a.k
    scores = score_layers({n: t[image_rows] for n, t in img.items()}, {n: t[rows] for n, t in txt.items()},
                          metric=a.metric, k=k, subset=a.selection_subset, seed=a.seed, backend=a.backend)
    scores.provenance = selection_provenance(a.out, m)
    scores.save(a.out)
    layer_heatmap(scores, a.out / "layer_scores.png")
    (bi, bt), (li, lt) = scores.best(), scores.last()
    print(f"[select] {a.metric} on {scores.n} training pairs: best {bi} × {bt} = {scores.best_score:.4f}, "
          f"last {li} × {lt} = {scores.scores[-1, -1]:.4f}")


def stage_train(a: argparse.Namespace) -> None:
    cfg = TrainConfig(head=a.head, dim=a.dim, lam=a.lam, warmup=a.warmup, levels=a.levels, weighting=a.weighting,
                      temperature=a.temperature, lr=a.lr, weight_decay=a.weight_decay, epochs=a.epochs,
                      batch_size=a.batch_size, patience=a.patience, seed=a.seed, backend=a.backend, device=a.device,
                      checkpoint_every=a.checkpoint_every)
    name, out, res = train_run(a.out, a.layers, cfg, name=a.name, resume=a.resume)
    layers = res.layers
    training_curves({f"{a.head}, λ={a.lam:g}": res.history}, out / "training_curves.png")
    print(f"[train] {a.head} heads '{name}' on {layers[0]} × {layers[1]}: {len(res.history)} epochs, lr {res.lr:.3g}, "
          f"best val loss {res.best_val:.4f} at epoch {res.best_epoch}{' (stopped early)' if res.stopped_early else ''}")


def stage_evaluate(a: argparse.Namespace) -> dict:
    """The training run ``--name`` (or the only one) on the test split: <out>/metrics.json[name]["test"]."""
    from structure_ops.train.pipeline import resolve_name, trained_names

    name = a.name if a.name in trained_names(a.out) else resolve_name(a.out)  # e.g. trained by `structure-ops train`
    report = evaluate_run(a.out, name, "test")
    m, metrics, z, cfg, layers = read_manifest(a.out), report, report.get("zero_shot"), report["heads"]["config"], report["layers"]
    print(f"\n[evaluate] {report['n_images']} test images, {report['n_captions']} captions; "
          f"{cfg['head']} heads '{name}' (λ={cfg['lam']:g}) on {layers[0]} × {layers[1]}; "
          f"{len(m['splits']['train'])} training pairs\n")
    print("| direction  | R@1   | R@5   | R@10  |\n|------------|-------|-------|-------|")
    for name, key in (("image→text", "i2t"), ("text→image", "t2i")):
        print(f"| {name} | " + " | ".join(f"{metrics[f'{key}_R@{k}']:.3f}" for k in (1, 5, 10)) + " |")
    if z:
        print(f"\nzero-shot ({z['n_images']} images, {z['n_classes']} classes): top-1 {metrics['zeroshot_top1']:.3f}"
              + (f", top-5 {metrics['zeroshot_top5']:.3f}" if "zeroshot_top5" in metrics else ""))
    print(f"\nwrote {a.out / 'metrics.json'} ['{name}']['test']")
    return report


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    stages = {"extract": stage_extract, "select": stage_select, "train": stage_train, "evaluate": stage_evaluate}
    try:
        for name in STAGES:
            if name in a.stages:
                stages[name](a)
    except (FileNotFoundError, ValueError) as e:
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
