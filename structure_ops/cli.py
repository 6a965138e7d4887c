"""The ``structure-ops`` command: demo, extract, select-layers, train, evaluate, bench, info.

A real-data workflow works in one run folder:

    structure-ops extract --captions pairs.csv --images imgs/ --vision facebook/dinov2-large --text minilm --out run
    structure-ops select-layers --run run
    structure-ops train --run run --layers best --lam 10
    structure-ops evaluate --run run

Multi-process training: ``torchrun --nproc_per_node=K --no-python -- structure-ops train --run run ...``
(the ``--`` keeps torchrun from reading ``--run`` as its own ``--run-path``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = __doc__.split("\n\n", 1)[1]


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _p(sub, name: str, help: str, description: str | None = None):
    return sub.add_parser(name, help=help, description=description or help, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structure-ops",
        description="Structure-preserving multimodal alignment: fused STRUCTURE / CLIP losses and a training layer "
        "(frozen encoders → layer selection → aligned heads → zero-shot / retrieval evaluation).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _p(sub, "demo", "the whole pipeline, offline, on real encoders and sklearn digits (~1 min on 2 cores)")
    demo.add_argument("--out", default="runs/demo", help="run folder (report.json, summary.md, plots; default runs/demo)")
    demo.add_argument("--backend", default="auto", help="loss backend: auto | reference | cpu | triton | cuda")
    demo.add_argument("--quick", action="store_true", help="300 images, 1 seed, 40 epochs (~10 s; what CI runs)")
    demo.add_argument("--seeds", type=int, default=3, help="seeds (splits and initialisations) to average over")

    ex = _p(sub, "extract", "extract and cache every layer of both encoders for a captions file",
            "Reads a captions file (CSV with a header or JSONL; columns image and caption) whose image paths are "
            "relative to --images, extracts all layers of both encoders (cached; a re-run reuses valid files), splits "
            "the pairs by image into train/val/test and writes <out>/manifest.json. Alternatively register precomputed "
            "per-layer features (safetensors files of (n, d) tensors, row j of both files paired).")
    ex.add_argument("--out", required=True, help="run folder")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="CSV/JSONL of (image, caption) rows")
    src.add_argument("--image-features", help="precomputed image features (.safetensors, one tensor per layer)")
    ex.add_argument("--text-features", help="precomputed text features, with --image-features")
    ex.add_argument("--images", help="folder the image paths are relative to (default: the captions file's folder)")
    ex.add_argument("--vision", default="efficientnet-lite0", help="image encoder: built-in name, HF folder or hub name")
    ex.add_argument("--text", default="minilm", help="text encoder: built-in name, HF folder or hub name")
    ex.add_argument("--vision-pooling", choices=["cls", "mean", "last"], help="default: cls (transformers), spatial mean (CNNs)")
    ex.add_argument("--text-pooling", choices=["cls", "mean", "last"], default="mean")
    ex.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    ex.add_argument("--batch-size", type=int, default=64)
    ex.add_argument("--val", type=float, default=0.1, help="validation images: a fraction (<1) or a count")
    ex.add_argument("--test", type=float, default=0.1, help="test images: a fraction (<1) or a count")
    ex.add_argument("--zero-shot", help="class-labelled image folder (<dir>/<class>/<image>) for zero-shot evaluation")
    ex.add_argument("--template", action="append", help="zero-shot prompt with {c} (repeatable; default 'a photo of a {c}.')")
    ex.add_argument("--seed", type=int, default=0)

    sel = _p(sub, "select-layers", "score every (image layer, text layer) pair on the training pairs")
    sel.add_argument("--run", required=True)
    sel.add_argument("--metric", default="mutual_knn", choices=["mutual_knn", "cka", "cka_unbiased"])
    sel.add_argument("--k", default="rice", help="mutual kNN k: an int or rice | sqrt | sturges")
    sel.add_argument("--subset", type=int, default=5000, help="random training pairs to score on (paper: 5000)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--backend", default="auto")

    tr = _p(sub, "train", "train the two heads with CLIP + λ·STRUCTURE (checkpointed; --resume continues)")
    tr.add_argument("--run", required=True)
    tr.add_argument("--layers", default="best", help="best | last | IMAGE_LAYER,TEXT_LAYER (default best: needs select-layers)")
    tr.add_argument("--head", default="linear", choices=["linear", "mlp"])
    tr.add_argument("--dim", type=int, default=512)
    tr.add_argument("--lam", type=float, default=10.0, help="λ of STRUCTURE (0: CLIP only)")
    tr.add_argument("--warmup", type=int, default=1000, help="λ warm-up in optimizer steps")
    tr.add_argument("--levels", type=int, default=1)
    tr.add_argument("--temperature", type=float, default=0.05)
    tr.add_argument("--lr", type=float, help="learning rate (default: LR range test)")
    tr.add_argument("--epochs", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=4096)
    tr.add_argument("--patience", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--backend", default="auto")
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    tr.add_argument("--resume", action="store_true", help="continue from <run>/train/checkpoint.pt")

    ev = _p(sub, "evaluate", "retrieval (R@1/5/10 both ways) on the test split and zero-shot accuracy")
    ev.add_argument("--run", required=True)
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])

    bench = _p(sub, "bench", "run the op benchmarks (benchmarks/ of a source checkout); extra args go to the script")
    bench.add_argument("op", choices=["structure", "clip", "knn", "gpu"],
                       help="a CPU op benchmark, or gpu: the GPU suite (all ops, all GPU backends and baselines)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on, e.g. --n 1024,4096 (see --help of the script)")

    _p(sub, "info", "versions, devices, built extensions, which backend runs each op")
    return parser


def _count(value: float, n: int) -> int:
    return int(round(value * n)) if value < 1 else int(value)


def _cmd_extract(a) -> None:
    from .train import data as D
    from .train.encoders import build_encoder
    from .train.features import load_features, save_features
    from .train.pipeline import extract_run, split_by_image, write_manifest

    run = Path(a.out)
    if a.image_features:
        if not a.text_features:
            raise CliError("--image-features needs --text-features")
        img, txt = load_features(a.image_features), load_features(a.text_features)
        if img.n != txt.n:
            raise CliError(f"--image-features has {img.n} rows but --text-features has {txt.n}; rows must be paired")
        pairs = D.Pairs(list(range(img.n)), [str(j) for j in range(img.n)], list(range(img.n)), name="precomputed")
        splits = split_by_image(pairs, _count(a.val, img.n), _count(a.test, img.n), seed=a.seed)
        for name, feats in (("image", img), ("text", txt)):
            desc = {"encoder": {"name": f"precomputed:{name}", "modality": name, "layers": list(feats)}, "n": feats.n}
            save_features(run / "features" / f"{name}.safetensors", feats, desc)
        write_manifest(run, {"dataset": "precomputed", "image_features": "features/image.safetensors",
                             "text_features": "features/text.safetensors", "image_of": pairs.image_of,
                             "splits": splits, "zero_shot": None})
        print(f"registered {img.n} precomputed pairs ({len(img)} image layers, {len(txt)} text layers) in {run}")
        return
    pairs = D.load_captions(a.captions, a.images)
    n_img = len(pairs.images)
    splits = split_by_image(pairs, _count(a.val, n_img), _count(a.test, n_img), seed=a.seed)
    zs = None
    if a.zero_shot:
        paths, labels, classes = D.load_image_folder(a.zero_shot)
        zs = (paths, labels, classes)
    image_enc = build_encoder(a.vision, "image", pooling=a.vision_pooling, image_size=a.image_size)
    text_enc = build_encoder(a.text, "text", pooling=a.text_pooling)
    m = extract_run(run, pairs, image_enc, text_enc, splits=splits, zero_shot_set=zs, templates=a.template,
                    batch_size=a.batch_size)
    print(f"extracted {len(pairs)} pairs ({n_img} images): {len(m['image_encoder']['layers'])} image layers, "
          f"{len(m['text_encoder']['layers'])} text layers; splits {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
          f"manifest {run / 'manifest.json'}")


def _load_run(run):
    from .train.pipeline import read_manifest, run_features

    m = read_manifest(run)
    return m, run_features(run, m, "image_features"), run_features(run, m, "text_features")


def _cmd_select(a) -> None:
    from .train.plots import layer_heatmap
    from .train.selection import score_layers

    m, img, txt = _load_run(a.run)
    rows = m["splits"]["train"]
    image_rows = [m["image_of"][j] for j in rows]
    k = int(a.k) if a.k.isdigit() else a.k
    scores = score_layers({n: t[image_rows] for n, t in img.items()}, {n: t[rows] for n, t in txt.items()},
                          metric=a.metric, k=k, subset=a.subset, seed=a.seed, backend=a.backend)
    scores.save(a.run)
    layer_heatmap(scores, Path(a.run) / "layer_scores.png")
    (bi, bt), (li, lt) = scores.best(), scores.last()
    print(f"scored {scores.scores.numel()} layer pairs ({a.metric}{f', k={scores.k}' if scores.k else ''}, n={scores.n}): "
          f"best {bi} × {bt} = {scores.scores.max():.4f}; last {li} × {lt} = {scores.scores[-1, -1]:.4f}; "
          f"wrote {a.run}/layer_scores.{{json,csv,png}}")


def _init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (NCCL on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), f"cuda:{local}" if torch.cuda.is_available() else "cpu"


def _cmd_train(a) -> None:
    from .train.pipeline import pick_layers, read_manifest, run_features, save_heads, train_heads
    from .train.plots import training_curves
    from .train.trainer import TrainConfig

    rank, device = _init_distributed()
    m = read_manifest(a.run)
    layers = pick_layers(a.run, a.layers, m)
    img = run_features(a.run, m, "image_features", layers=[layers[0]])  # only the two layers it trains on
    txt = run_features(a.run, m, "text_features", layers=[layers[1]])
    cfg = TrainConfig(head=a.head, dim=a.dim, lam=a.lam, warmup=a.warmup, levels=a.levels, temperature=a.temperature,
                      lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, patience=a.patience, seed=a.seed,
                      backend=a.backend, device=device or a.device)
    out = Path(a.run) / "train"
    res = train_heads(img, txt, m["image_of"], m["splits"], layers, cfg, out, resume=a.resume, progress=rank == 0)
    if rank == 0:
        save_heads(out / "heads.safetensors", res, layers, cfg, (img[layers[0]].shape[1], txt[layers[1]].shape[1]))
        training_curves({f"{a.head}, λ={a.lam:g}": res.history}, out / "training_curves.png")
        last = res.history[-1] if res.history else {}
        print(f"trained {a.head} heads on {layers[0]} × {layers[1]}: {len(res.history)} epochs, best val loss "
              f"{res.best_val:.4f} at epoch {res.best_epoch} (lr {res.lr:.3g}{', stopped early' if res.stopped_early else ''}); "
              f"last train CLIP {last.get('train_clip', float('nan')):.4f}; wrote {out}/heads.safetensors")


def _cmd_evaluate(a) -> None:
    from .train.features import atomic_write_text
    from .train.pipeline import evaluate_heads, load_heads, read_manifest, run_features, zero_shot_features

    m = read_manifest(a.run)
    hi, ht, meta = load_heads(Path(a.run) / "train" / "heads.safetensors")
    layers = tuple(meta["layers"])
    img = run_features(a.run, m, "image_features", layers=[layers[0]])
    txt = run_features(a.run, m, "text_features", layers=[layers[1]])
    zs = zero_shot_features(a.run, m, layers)
    metrics = evaluate_heads(hi, ht, layers, img, txt, m["image_of"], m["splits"][a.split], zs)
    atomic_write_text(Path(a.run) / "metrics.json", json.dumps({"split": a.split, "layers": meta["layers"], **metrics}, indent=1) + "\n")
    for k, v in metrics.items():
        print(f"{k:16s} {v:.4f}")


def _cmd_bench(a) -> None:
    name = "gpu_suite.py" if a.op == "gpu" else f"bench_{a.op}.py"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.is_file():
        raise CliError(f"{script} not found: `bench` runs the benchmarks of a source checkout (pip install -e .)")
    raise SystemExit(subprocess.call([sys.executable, str(script), *a.args]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.command == "info":
            from .info import main as info_main

            info_main()
        elif a.command == "demo":
            if a.seeds < 1:
                parser.error("--seeds must be >= 1")
            from .demo import run

            run(a.out, backend=a.backend, quick=a.quick, seeds=a.seeds)
        else:
            {"extract": _cmd_extract, "select-layers": _cmd_select, "train": _cmd_train,
             "evaluate": _cmd_evaluate, "bench": _cmd_bench}[a.command](a)
    except (CliError, FileNotFoundError, ValueError) as e:
        print(f"structure-ops {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
