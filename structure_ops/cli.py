"""The ``structure-ops`` command: demo, extract, select-layers, train, evaluate, embed, zero-shot, export, bench, info.

A real-data workflow works in one run folder:

    structure-ops extract --captions pairs.csv --images imgs/ --vision facebook/dinov2-large --text minilm --out run
    structure-ops select-layers --run run
    structure-ops train --run run --layers best --lam 10
    structure-ops evaluate --run run
    structure-ops zero-shot --run run --images photos/ --classes cat,dog
    structure-ops export --run run --out model/      # then AlignedModel.from_pretrained("model/")

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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (unless it is None/False or the help already says it)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if _no_default(action.default) or "default" in h or not action.option_strings:
            return h
        return super()._get_help_string(action)


def _no_default(value) -> bool:
    return value is None or value is False or value == argparse.SUPPRESS


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``structure-ops train: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _p(sub, name: str, help: str, description: str | None = None):
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="structure-ops",
        description="Structure-preserving multimodal alignment: fused STRUCTURE / CLIP losses and a training layer "
        "(frozen encoders → layer selection → aligned heads → zero-shot / retrieval evaluation).",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"structure-ops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    src.add_argument("--karpathy", help="Karpathy's split file (dataset_coco.json, dataset_flickr30k.json): every caption, "
                     "images at <--images>/<filepath>/<filename>, splits from the file (train + restval / val / test)")
    src.add_argument("--image-features", help="precomputed image features (.safetensors, one tensor per layer)")
    ex.add_argument("--text-features", help="precomputed text features, with --image-features")
    ex.add_argument("--images", help="folder the image paths are relative to (default: the captions file's folder)")
    ex.add_argument("--protocol", choices=["karpathy", "val2014"], default="karpathy",
                    help="with --karpathy: karpathy (the standard splits: COCO 5k / Flickr30k 1k test) or val2014 (COCO: "
                    "test on all of val2014, train on train2014 less --val held out, as the STRUCTURE paper's code)")
    ex.add_argument("--vision", default="efficientnet-lite0", help="image encoder: built-in name, HF folder or hub name")
    ex.add_argument("--text", default="minilm", help="text encoder: built-in name, HF folder or hub name")
    ex.add_argument("--vision-pooling", choices=["cls", "mean", "last"], help="default: cls (transformers), spatial mean (CNNs)")
    ex.add_argument("--text-pooling", choices=["cls", "mean", "last"], default="mean")
    ex.add_argument("--image-size", type=int, help="input resolution (default: the model's)")
    ex.add_argument("--batch-size", type=int, default=64, help="inputs per encoder batch")
    ex.add_argument("--val", type=float, default=0.1, help="validation images: a fraction (<1) or a count")
    ex.add_argument("--test", type=float, default=0.1, help="test images: a fraction (<1) or a count")
    ex.add_argument("--zero-shot", help="class-labelled image folder (<dir>/<class>/<image>) for zero-shot evaluation")
    ex.add_argument("--class-names", help="with --zero-shot: a file mapping class folders to class names, lines "
                    "'<folder> <name>' (e.g. ImageNet wnids 'n01440764 tench'), or one name per line in sorted folder order")
    ex.add_argument("--template", action="append", help="zero-shot prompt with {c} (repeatable; default 'a photo of a {c}.')")
    ex.add_argument("--skip-bad-images", action="store_true",
                    help="leave out images that cannot be decoded (and their captions) instead of stopping; the "
                    "skipped files are listed in <out>/skipped_images.txt")
    ex.add_argument("--shard-size", type=int, default=2048,
                    help="inputs per extraction shard: a killed extraction resumes from its last finished shard")
    ex.add_argument("--seed", type=int, default=0)

    sel = _p(sub, "select-layers", "score every (image layer, text layer) pair on the training pairs")
    sel.add_argument("--run", required=True)
    sel.add_argument("--metric", default="mutual_knn",
                     choices=["mutual_knn", "cka", "cka_unbiased", "rbf_cka", "rbf_cka_unbiased", "cknna"],
                     help="mutual_knn (default) | linear cka (biased/unbiased HSIC) | rbf_cka (Gaussian kernel, "
                     "Kornblith et al.) | cknna (kernel alignment on mutual nearest neighbours, Huh et al.)")
    sel.add_argument("--k", default="rice", help="mutual kNN / CKNNA k: an int or rice | sqrt | sturges")
    sel.add_argument("--sigma-frac", type=float, default=0.4,
                     help="rbf_cka: bandwidth σ = this fraction of each layer's median pairwise distance (default 0.4)")
    sel.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (where the kernel metrics compute)")
    sel.add_argument("--subset", type=int, default=5000, help="random training pairs to score on (paper: 5000)")
    sel.add_argument("--seed", type=int, default=0)
    sel.add_argument("--backend", default="auto")
    sel.add_argument("--calibrate", action="store_true",
                     help="add permutation-null calibrated scores and p-values (per pair, and for the max over pairs "
                     "against the null of the max) to layer_scores.{json,csv}; the per-layer kNN lists / kernels are "
                     "reused (cka and rbf_cka: O(P·L_image·L_text·n²))")
    sel.add_argument("--permutations", type=int, default=200, help="null draws of --calibrate")

    tr = _p(sub, "train", "train the two heads with CLIP + λ·STRUCTURE (checkpointed; --resume continues)")
    tr.add_argument("--run", required=True)
    tr.add_argument("--layers", default="best", help="best | last | IMAGE_LAYER,TEXT_LAYER (default best: needs select-layers)")
    tr.add_argument("--method", default="structure", choices=["structure", "csa", "csa+structure"],
                    help="structure: heads trained with CLIP + λ·STRUCTURE; csa: the closed-form canonical-correlation "
                    "baseline (linear heads onto the top --dim canonical directions of the training pairs; no training); "
                    "csa+structure: CSA fine-tuned with --lam·R_S (--levels) and re-whitened, as in the paper's code")
    tr.add_argument("--ridge", type=float, default=1e-4, help="--method csa: covariance ridge, relative to its mean eigenvalue")
    tr.add_argument("--refine-epochs", type=int, default=10, help="--method csa+structure: Adam epochs")
    tr.add_argument("--refine-lr", type=float, default=5e-4, help="--method csa+structure: Adam learning rate")
    tr.add_argument("--refine-temperature", type=float, default=0.2, help="--method csa+structure: τ of R_S")
    tr.add_argument("--refine-batch-size", type=int, default=4096, help="--method csa+structure: pairs per step")
    tr.add_argument("--pairing-weight", type=float, default=1e-2,
                    help="--method csa+structure: weight of −Σ⟨ẑ_image, ẑ_text⟩/dim (keeps the pairs aligned)")
    tr.add_argument("--head", default="linear", choices=["linear", "mlp"])
    tr.add_argument("--dim", type=int, default=512)
    tr.add_argument("--lam", type=float, default=10.0, help="λ of STRUCTURE (0: CLIP only)")
    wu = tr.add_mutually_exclusive_group()
    wu.add_argument("--warmup", type=int, help="λ warm-up in optimizer steps (the paper: 1000 at batch 4096 on COCO, "
                    "~3%% of its run); default: --warmup-frac 0.05")
    wu.add_argument("--warmup-epochs", type=float, help="λ warm-up in epochs")
    wu.add_argument("--warmup-frac", type=float, help="λ warm-up as a fraction of the run (epochs × steps per epoch); "
                    "the default when no warm-up is given is 0.05")
    tr.add_argument("--levels", type=int, default=1)
    tr.add_argument("--temperature", type=float, default=0.05)
    tr.add_argument("--loss", choices=("clip", "siglip"), default="clip",
                    help="contrastive term: clip (InfoNCE at --temperature) or siglip (pairwise sigmoid, learnable "
                         "scale and bias initialised at 10 and -10; R_S keeps τ = --temperature)")
    tr.add_argument("--lr", type=float, help="learning rate (default: LR range test)")
    tr.add_argument("--epochs", type=int, default=1000, help="at most; early stopping ends sooner")
    tr.add_argument("--batch-size", type=int, help="default: adapts to the training set (a power of two near n/8, "
                    "at least 32, at most the paper's 4096); one larger than the training set is lowered to it")
    tr.add_argument("--patience", type=int, default=200,
                    help="epochs at full λ without a better validation loss before stopping (the warm-up does not count)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--backend", default="auto")
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    tr.add_argument("--name", help="training run name: heads etc. go to <run>/train/<name>/ (default: from the "
                    "configuration, e.g. linear_lam10_<image layer>x<text layer>)")
    tr.add_argument("--resume", action="store_true", help="continue from <run>/train/<name>/checkpoint.pt")

    ev = _p(sub, "evaluate", "retrieval (R@1/5/10 both ways) on the test split and zero-shot accuracy; --suite: the "
            "26-dataset zero-shot suite",
            "With --run: retrieval and zero-shot metrics of a training run on its split (<run>/metrics.json). With --suite "
            "ROOT: every dataset of the zero-shot suite found under ROOT (class folders ROOT/<dataset>/{train,test}/<class>/ "
            "or torchvision's on-disk formats; see docs/evaluation.md) is classified with CLIP's class names and templates; "
            "top-1, top-5 and mean-per-class recall per dataset go to one table (suite.md, suite.json).")
    ev_src = ev.add_mutually_exclusive_group(required=True)
    ev_src.add_argument("--run", help="run folder with trained heads")
    ev_src.add_argument("--model", help="with --suite: a folder written by structure-ops export")
    ev.add_argument("--name", help="training run to evaluate (default: the only one)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--suite", metavar="ROOT", help="evaluate the zero-shot suite on the datasets under ROOT")
    ev.add_argument("--datasets", help="with --suite: comma-separated dataset keys (default: all 26 of the suite)")
    ev.add_argument("--linear-probe", action="store_true",
                    help="with --suite: also fit a logistic-regression probe on the aligned image embeddings of each "
                    "dataset's train split and report its test accuracy")
    ev.add_argument("--limit", type=int, help="with --suite: at most this many images per split (a seeded subset; for "
                    "quick looks, not comparable to published numbers)")
    ev.add_argument("--prompts", choices=["dataset", "simple"], default="dataset",
                    help="with --suite: each dataset's CLIP templates, or only 'a photo of a {c}.'")
    ev.add_argument("--out", help="with --suite: folder for suite.{md,json} (default <run>/suite/<training run>; "
                    "required with --model)")
    ev.add_argument("--device", default="auto", help="with --suite: auto | cpu | cuda | cuda:N (where the encoders run)")
    ev.add_argument("--batch-size", type=int, default=32, help="with --suite: inputs per encoder batch")

    ca = _p(sub, "cache", "list or clear the shared feature cache",
            "Features are cached by content (encoder weights, preprocessing, pooling, dtype, data) in one folder: "
            "$STRUCTURE_OPS_CACHE/features if that variable is set, else the user cache folder.")
    ca.add_argument("action", choices=["list", "clear", "dir"], help="list entries | clear them all | print the folder")

    from .train.compare import add_arguments as compare_arguments

    cmp_ = _p(sub, "compare", "sweep λ / levels / layers / seeds on a run folder and compare the trained heads",
              "Every configuration is a named training run (<run>/train/compare_...); the mean ± std table over seeds "
              "goes to <run>/compare/results.{json,md} with plots. Nothing is re-extracted.")
    compare_arguments(cmp_)

    from .train.protocol import add_arguments as protocol_arguments

    prot = _p(sub, "protocol", "the paper's comparison: layers {last, selected} × {clip, clip+structure, csa, "
              "csa+structure} × seeds (+ a pretrained-CLIP row) in one table",
              "Trains and evaluates every configuration on a run folder (named training runs <run>/train/protocol_...), "
              "then writes one table, mean ± std over seeds, to <run>/protocol/results.{md,json}: retrieval R@1/5/10 "
              "both ways, zero-shot accuracy and a linear probe on the zero-shot set when the run has one. With "
              "--clip-model (a local CLIPModel folder) and the run's --captions/--karpathy and --images, a reference "
              "row of the pretrained CLIP itself. See docs/training.md for which paper table each setting matches.")
    protocol_arguments(prot)

    bench = _p(sub, "bench", "run the op benchmarks (benchmarks/ of a source checkout); extra args go to the script")
    bench.add_argument("op", choices=["structure", "clip", "knn", "gpu"],
                       help="a CPU op benchmark, or gpu: the GPU suite (all ops, all GPU backends and baselines)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed on, e.g. --n 1024,4096 (see --help of the script)")

    def model_args(p):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", help="run folder with trained heads (structure-ops train)")
        src.add_argument("--model", help="folder written by structure-ops export")
        p.add_argument("--name", help="training run inside --run, when it holds several")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (where the encoders run)")
        p.add_argument("--batch-size", type=int, default=32, help="inputs per encoder batch")

    emb = _p(sub, "embed", "aligned, L2-normalized embeddings of images or texts with a trained model",
             "Writes one (n, dim) float32 tensor 'embeddings' to a .safetensors file (the inputs, in order, in its "
             "header and in a .json beside it). Cosine similarity of an image and a text = dot product of their rows.")
    model_args(emb)
    what = emb.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="image files or folders (searched recursively)")
    what.add_argument("--texts", nargs="+", help="texts")
    what.add_argument("--text-file", help="a text file, one text per line")
    emb.add_argument("--out", required=True, help="output .safetensors file")

    zs = _p(sub, "zero-shot", "classify images by class names with a trained model (100·cos to prompt means)",
            "Prints, per image, the top classes with their probabilities; --out writes them as CSV. With a class "
            "folder (<dir>/<class>/<image>) and no --classes, the sub-folder names are the classes and the accuracy "
            "is reported.")
    model_args(zs)
    zs.add_argument("--images", nargs="+", required=True, help="image files, folders, or one class folder")
    zs.add_argument("--classes", help="comma-separated class names")
    zs.add_argument("--class-file", help="class names, one per line")
    zs.add_argument("--template", action="append",
                    help="prompt with {c} (repeatable; default: the run's zero-shot templates, else 'a photo of a {c}.')")
    zs.add_argument("--top", type=int, default=3, help="classes shown per image")
    zs.add_argument("--out", help="CSV file: image, top-1 class, its probability, then every class's probability")

    exp = _p(sub, "export", "write a trained model as a self-contained folder (AlignedModel.from_pretrained)",
             "The folder holds aligned.json (encoder references, pooling, layer names, preprocessing, selected "
             "layers, head configuration, templates, provenance) and heads.safetensors; local Hugging Face encoder "
             "folders are copied into encoders/ unless --no-copy-encoders.")
    exp.add_argument("--run", required=True, help="run folder with trained heads")
    exp.add_argument("--name", help="training run inside --run, when it holds several")
    exp.add_argument("--out", required=True, help="new (or earlier exported) folder")
    exp.add_argument("--no-copy-encoders", action="store_true", help="reference local encoder folders by absolute path")

    _p(sub, "info", "versions, devices, built extensions, which backend runs each op")
    for p in sub.choices.values():  # options without a help text still show their default
        for act in p._actions:
            if act.option_strings and not act.help and not _no_default(act.default):
                act.help = "default: %(default)s"
    return parser


def _count(value: float, n: int) -> int:
    return int(round(value * n)) if value < 1 else int(value)


def _cmd_extract(a) -> None:
    from .train import data as D
    from .train.encoders import build_encoder
    from .train.features import atomic_write_text, load_features
    from .train.pipeline import extract_run, register_features, split_by_image

    run = Path(a.out)
    if a.image_features:
        if not a.text_features:
            raise CliError("--image-features needs --text-features")
        img, txt = load_features(a.image_features), load_features(a.text_features)
        if img.n != txt.n:
            raise CliError(f"--image-features has {img.n} rows but --text-features has {txt.n}; rows must be paired")
        pairs = D.Pairs(list(range(img.n)), [str(j) for j in range(img.n)], list(range(img.n)), name="precomputed")
        splits = split_by_image(pairs, _count(a.val, img.n), _count(a.test, img.n), seed=a.seed)
        register_features(run, img, txt, splits, pairs.image_of)
        print(f"registered {img.n} precomputed pairs ({len(img)} image layers, {len(txt)} text layers) in {run}")
        return
    # Everything that can be checked before an encoder runs is checked first: templates, class names, images.
    templates = D.check_templates(a.template) if a.template else None
    if a.class_names and not a.zero_shot:
        raise CliError("--class-names needs --zero-shot")
    if a.shard_size < 1 or a.batch_size < 1:
        raise CliError(f"--shard-size and --batch-size must be >= 1, got {a.shard_size}, {a.batch_size}")
    ksplits = None
    if a.karpathy:
        if not a.images:
            raise CliError("--karpathy needs --images (the folder holding <filepath>/<filename> of every image)")
        pairs, ksplits = D.load_karpathy(a.karpathy, a.images, a.protocol, val=a.val, seed=a.seed)
    else:
        pairs = D.load_captions(a.captions, a.images)
    zs = None
    if a.zero_shot:
        zs = D.load_image_folder(a.zero_shot, a.class_names)
    bad = D.check_images(pairs.images, progress=True)
    zbad = D.check_images(zs[0]) if zs else []
    skipped = bad + zbad
    if skipped and not a.skip_bad_images:
        shown = "; ".join(f"{p} ({r})" for p, r in skipped[:3])
        raise CliError(f"{len(skipped)} image(s) cannot be read: {shown}{' …' if len(skipped) > 3 else ''}; fix or "
                       "remove them, or pass --skip-bad-images to leave them out")
    if skipped:
        if bad and ksplits is not None:
            pairs, ksplits = D.splits_without_images(pairs, ksplits, [p for p, _ in bad])
        elif bad:
            pairs = D.without_images(pairs, [p for p, _ in bad])
        if zbad:
            drop = {p for p, _ in zbad}
            keep = [i for i, p in enumerate(zs[0]) if p not in drop]
            zs = ([zs[0][i] for i in keep], [zs[1][i] for i in keep], zs[2])
        atomic_write_text(run / "skipped_images.txt", "".join(f"{p}\t{r}\n" for p, r in skipped))
        print(f"skipped {len(skipped)} unreadable image(s) (listed in {run / 'skipped_images.txt'}), e.g. "
              f"{skipped[0][0]} ({skipped[0][1]})", file=sys.stderr)
    n_img = len(pairs.images)
    splits = ksplits if ksplits is not None else split_by_image(pairs, _count(a.val, n_img), _count(a.test, n_img), seed=a.seed)
    image_enc = build_encoder(a.vision, "image", pooling=a.vision_pooling, image_size=a.image_size)
    text_enc = build_encoder(a.text, "text", pooling=a.text_pooling)
    m = extract_run(run, pairs, image_enc, text_enc, splits=splits, zero_shot_set=zs, templates=templates,
                    batch_size=a.batch_size, shard_size=a.shard_size, skipped=skipped)
    if ksplits is not None:  # which protocol the splits follow (a note in the manifest; the splits are its data)
        from .train.pipeline import write_manifest

        m["protocol"] = a.protocol
        write_manifest(run, m)
    print(f"extracted {len(pairs)} pairs ({n_img} images): {len(m['image_encoder']['layers'])} image layers, "
          f"{len(m['text_encoder']['layers'])} text layers; splits {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
          f"manifest {run / 'manifest.json'}")


def _load_run(run):
    from .train.pipeline import read_manifest, run_features

    m = read_manifest(run)
    return m, run_features(run, m, "image_features"), run_features(run, m, "text_features")


def _cmd_select(a) -> None:
    from .train.pipeline import selection_provenance
    from .train.plots import layer_heatmap
    from .train.selection import score_layers

    m, img, txt = _load_run(a.run)
    rows = m["splits"]["train"]
    image_rows = [m["image_of"][j] for j in rows]
    import warnings

    k = int(a.k) if a.k.isdigit() else a.k
    if a.calibrate and a.permutations < 1:
        raise CliError(f"--permutations must be >= 1, got {a.permutations}")
    if not (a.sigma_frac > 0 and a.sigma_frac < float("inf")):
        raise CliError(f"--sigma-frac must be a positive number, got {a.sigma_frac}")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        scores = score_layers({n: t[image_rows] for n, t in img.items()}, {n: t[rows] for n, t in txt.items()},
                              metric=a.metric, k=k, subset=a.subset, seed=a.seed, backend=a.backend,
                              permutations=a.permutations if a.calibrate else 0, sigma_frac=a.sigma_frac,
                              device=device)
    for w in caught:
        print(f"structure-ops select-layers: warning: {w.message}", file=sys.stderr)
    scores.provenance = selection_provenance(a.run, m)
    scores.save(a.run)
    layer_heatmap(scores, Path(a.run) / "layer_scores.png")
    (bi, bt), (li, lt) = scores.best(), scores.last()
    print(f"scored {scores.scores.numel()} layer pairs ({a.metric}{f', k={scores.k}' if scores.k else ''}, n={scores.n}): "
          f"best {bi} × {bt} = {scores.best_score:.4f}; last {li} × {lt} = {scores.scores[-1, -1]:.4f}; "
          f"wrote {a.run}/layer_scores.{{json,csv,png}}")
    if scores.calibration:
        b = scores.calibration["best"]
        chance = scores.calibration["chance"]
        print(f"calibrated ({scores.calibration['permutations']} permutations"
              f"{f'; chance k/(n-1) = {chance:.4f}' if chance is not None else ''}): best {b['raw']:.4f} vs the "
              f"null of the max over pairs "
              f"{b['null_max_mean']:.4f} → calibrated {b['calibrated']:+.4f}, p = {b['p_value']:.3g}")


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
    import warnings

    from .train.pipeline import train_run
    from .train.plots import training_curves
    from .train.trainer import TrainConfig, TrainingWarning, resolve_device

    if a.method in ("csa", "csa+structure"):
        from .train.csa import RefineConfig, csa_run

        if a.resume:
            raise CliError(f"--resume does not apply to --method {a.method} (a closed-form fit"
                           f"{' and a short refinement' if a.method != 'csa' else ''})")
        refine = None
        if a.method == "csa+structure":
            refine = RefineConfig(lam=a.lam, cca_weight=a.pairing_weight, levels=a.levels, temperature=a.refine_temperature,
                                  epochs=a.refine_epochs, lr=a.refine_lr, batch_size=a.refine_batch_size, seed=a.seed,
                                  backend=a.backend, device=str(resolve_device(a.device)))
        log = (lambda h: print(f"  refine epoch {h['epoch']}: loss {h['loss']:.4f}, R_S {h['structure']:.4f}, "
                               f"pairing {h['pairing']:.4f}", flush=True)) if refine else None
        name, out, fit = csa_run(a.run, a.layers, a.dim, a.ridge, name=a.name, refine=refine, log=log)
        corr = fit.correlations
        what = "CSA" if refine is None else "CSA + STRUCTURE"
        print(f"fitted {what} '{name}': {corr.numel()} {'canonical ' if refine is None else ''}directions, correlations "
              f"{float(corr[0]):.4f} … {float(corr[-1]):.4f}; wrote {out}/heads.safetensors")
        return
    rank, device = _init_distributed()
    cfg = TrainConfig(head=a.head, dim=a.dim, lam=a.lam, warmup=a.warmup, warmup_epochs=a.warmup_epochs,
                      warmup_frac=a.warmup_frac, levels=a.levels, temperature=a.temperature, lr=a.lr, epochs=a.epochs,
                      batch_size=a.batch_size, patience=a.patience, seed=a.seed, backend=a.backend,
                      device=device or a.device, loss=a.loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingWarning)
        warnings.simplefilter("always", UserWarning)
        name, out, res = train_run(a.run, a.layers, cfg, name=a.name, resume=a.resume, progress=rank == 0, write=rank == 0)
    if rank == 0:
        for w in caught:
            print(f"structure-ops train: warning: {w.message}", file=sys.stderr)
        training_curves({f"{a.head}, λ={a.lam:g}": res.history}, out / "training_curves.png")
        last = res.history[-1] if res.history else {}
        lam_best = next((h["lambda"] for h in res.history if h["epoch"] == res.best_epoch), float("nan"))
        print(f"trained {a.head} heads '{name}' on {res.layers[0]} × {res.layers[1]}: {len(res.history)} epochs of {res.batch_size}-pair batches, λ warm-up "
              f"{res.warmup_steps} steps; best val loss {res.best_val:.4f} at epoch {res.best_epoch} (λ_t {lam_best:g}; "
              f"lr {res.lr:.3g}{', stopped early' if res.stopped_early else ''}); last train CLIP "
              f"{last.get('train_clip', float('nan')):.4f}; wrote {out}/heads.safetensors")


def _cmd_evaluate(a) -> None:
    from .train.pipeline import evaluate_run, read_manifest

    if a.suite:
        return _cmd_evaluate_suite(a)
    if a.model:
        raise CliError("--model goes with --suite; evaluate a run folder with --run")
    r = evaluate_run(a.run, a.name, a.split)
    protocol = read_manifest(a.run).get("protocol")
    print(f"{r['name']} on the {a.split} split{f' ({protocol} protocol)' if protocol else ''}: {r['n_images']} images, "
          f"{r['n_captions']} captions"
          + (f"; zero-shot {r['zero_shot']['n_images']} images, {r['zero_shot']['n_classes']} classes" if "zero_shot" in r else ""))
    for k, v in r.items():
        if isinstance(v, float):
            chance = r["chance"].get(k)
            if chance is None and k.startswith("zeroshot_"):
                chance = r["zero_shot"]["chance"].get(k.removeprefix("zeroshot_"))
            print(f"{k:16s} {v:.4f}" + (f"   (chance {chance:.4f})" if chance is not None else ""))
    print(f"wrote {Path(a.run) / 'metrics.json'} ['{r['name']}']['{a.split}']")


def _cmd_evaluate_suite(a) -> None:
    from .train.suite import discover, evaluate_suite, suite_keys, write_table

    if a.limit is not None and a.limit < 1:
        raise CliError(f"--limit must be >= 1, got {a.limit}")
    if a.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {a.batch_size}")
    if not Path(a.suite).is_dir():
        raise CliError(f"--suite {a.suite}: no such folder")
    if a.model and not a.out:
        raise CliError("--suite with --model needs --out (the folder for suite.md and suite.json)")
    if a.out:
        _check_folder(a.out, "--out")
    keys = None
    if a.datasets:
        keys = [k.strip().lower() for k in a.datasets.split(",") if k.strip()]
        unknown = [k for k in keys if k not in suite_keys()]
        if unknown:
            raise CliError(f"--datasets: unknown {', '.join(unknown)}; the suite has {', '.join(suite_keys())}")
    # every dataset is indexed before the model loads: a malformed one stops here, in one line
    found, absent = discover(a.suite, keys, with_train=a.linear_probe)
    present = [ds.key for ds in found]
    if not present:
        raise CliError(f"--suite {a.suite}: none of the suite's datasets is there (expected e.g. "
                       f"{Path(a.suite) / 'cifar10' / 'test' / '<class>' / '<image>'} or {Path(a.suite) / 'cifar-10-batches-py'}; "
                       "see docs/evaluation.md)")
    print(f"zero-shot suite under {a.suite}: {len(present)} of {len(keys or suite_keys())} datasets present "
          f"({', '.join(present)})", flush=True)
    model = _load_model(a)

    def show(i, n, r):
        line = (f"[{i}/{n}] {r['name']}: {r['n_test']} test images, {r['n_classes']} classes: top-1 {r['top1']:.4f}"
                + (f", top-5 {r['top5']:.4f}" if r["top5"] is not None else "")
                + f", mean per class {r['mean_per_class']:.4f}")
        if a.linear_probe:
            line += (f"; probe top-1 {r['probe']['top1']:.4f}" if r.get("probe") else f"; probe skipped ({r.get('probe_note')})")
        print(line + f" ({r['seconds']:.0f} s)", flush=True)

    res = evaluate_suite(model, a.suite, linear_probe=a.linear_probe, limit=a.limit, prompts=a.prompts,
                         batch_size=a.batch_size, on_dataset=show, discovered=(found, absent))
    out = Path(a.out) if a.out else Path(a.run) / "suite" / str(model.meta.get("name") or "model")
    js, md = write_table(res, out)
    m = res["mean"]
    print(f"mean over {m['n_top1']} datasets: top-1 {m['top1']:.4f}, mean per class {m['mean_per_class']:.4f}"
          + (f"; absent: {', '.join(res['absent'])}" if res["absent"] else "") + f"; wrote {md} and {js}")


def _cmd_cache(a) -> None:
    from .train.features import clear_cache, features_dir, list_cache

    root = features_dir()
    if a.action == "dir":
        print(root)
    elif a.action == "list":
        entries = list_cache()
        print(f"{root}: {len(entries)} entries, {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB")
        for e in entries:
            what = (f"{e.get('modality')} {e.get('encoder')}, n={e.get('n')}, {e.get('layers')} layers, {e.get('created')}"
                    if e.get("complete") else f"{e.get('encoder')}" + (f", {e['shards']} shards" if "shards" in e else ""))
            print(f"  {Path(e['path']).name}  {e['bytes'] / 2**20:8.1f} MiB  {what}")
    else:
        n, size = clear_cache()
        print(f"removed {n} entries ({size / 2**20:.1f} MiB) from {root}")


def _cmd_compare(a) -> None:
    from .train.compare import compare

    compare(a)


def _cmd_protocol(a) -> None:
    from .train.protocol import protocol

    protocol(a)


def _cmd_bench(a) -> None:
    name = "gpu_suite.py" if a.op == "gpu" else f"bench_{a.op}.py"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.is_file():
        raise CliError(f"{script} not found: `bench` runs the benchmarks of a source checkout (pip install -e .)")
    args = list(a.args)
    asked = any(x == "--out" or x.startswith("--out=") for x in args) or any(x in ("-h", "--help") for x in args)
    if not asked:  # results go to a new temporary folder, never into the source tree, unless --out says so
        import tempfile

        out = tempfile.mkdtemp(prefix=f"structure-ops-bench-{a.op}-")
        args += ["--out", out]
        print(f"results go to {out} (pass --out DIR to choose the folder)", flush=True)
    raise SystemExit(subprocess.call([sys.executable, str(script), *args]))


# ---------------------------------------------------------------------------------------------------------
# using a trained model
def _image_files(items: list[str]) -> list[str]:
    from .train.data import IMAGE_SUFFIXES

    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files = sorted(str(q) for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise CliError(f"--images {it}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out += files
        elif p.is_file():
            out.append(str(p))
        else:
            raise CliError(f"--images {it}: no such file or folder")
    return out


def _load_model(a):
    from .train.aligned import AlignedModel

    device = None if a.device == "auto" else a.device
    if a.model:
        return AlignedModel.from_pretrained(a.model, device=device, batch_size=a.batch_size)
    return AlignedModel.from_run(a.run, a.name, device=device, batch_size=a.batch_size)


def _cmd_embed(a) -> None:
    from .train.features import atomic_write, atomic_write_text

    if not a.out.endswith(".safetensors"):
        raise CliError(f"--out {a.out}: name a .safetensors file")
    if a.images:
        inputs, modality = _image_files(a.images), "image"
    else:
        if a.text_file:
            if not Path(a.text_file).is_file():
                raise CliError(f"--text-file {a.text_file}: no such file")
            inputs = [line.strip() for line in Path(a.text_file).read_text().splitlines() if line.strip()]
        else:
            inputs = list(a.texts)
        modality = "text"
        if not inputs:
            raise CliError("no texts to embed")
    model = _load_model(a)
    emb = model.encode_image(inputs) if modality == "image" else model.encode_text(inputs)
    from safetensors.torch import save_file

    meta = {"modality": modality, "model": repr(model), "layers": list(model.layers), "inputs": inputs}
    atomic_write(a.out, lambda tmp: save_file({"embeddings": emb.contiguous()}, tmp,
                                              metadata={"structure_ops": json.dumps(meta)}))
    atomic_write_text(Path(a.out).with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    print(f"embedded {len(inputs)} {modality}s with {model}: "
          f"{tuple(emb.shape)} float32, rows L2-normalized; wrote {a.out}")


def _cmd_zero_shot(a) -> None:
    from .train.aligned import check_templates

    templates = check_templates(a.template) if a.template else None  # refused before any model loads
    labels = None
    if a.classes or a.class_file:
        if a.classes and a.class_file:
            raise CliError("give --classes or --class-file, not both")
        if a.class_file:
            if not Path(a.class_file).is_file():
                raise CliError(f"--class-file {a.class_file}: no such file")
            classes = [c.strip() for c in Path(a.class_file).read_text().splitlines() if c.strip()]
        else:
            classes = [c.strip() for c in a.classes.split(",") if c.strip()]
        if len(classes) < 2:
            raise CliError(f"zero-shot needs at least 2 classes, got {classes}")
        paths = _image_files(a.images)
    else:
        from .train.data import load_image_folder

        if len(a.images) != 1 or not Path(a.images[0]).is_dir() or not any(p.is_dir() for p in Path(a.images[0]).iterdir()):
            raise CliError("give --classes or --class-file, or one class folder (<dir>/<class>/<image>) as --images")
        paths, labels, classes = load_image_folder(a.images[0])
    if len(classes) < 2:
        raise CliError(f"zero-shot needs at least 2 classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise CliError("class names repeat: " + ", ".join(sorted({c for c in classes if classes.count(c) > 1})))
    model = _load_model(a)
    res = model.zero_shot(paths, classes, templates)
    top = res.topk(max(1, a.top))
    shown = 50
    for path, row in list(zip(paths, top, strict=True))[:shown]:
        print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in row))
    if len(paths) > shown:
        print(f"... {len(paths) - shown} more images" + ("" if a.out else " (--out writes all)"))
    if labels is not None:
        ranked = res.logits.topk(min(5, len(classes)), dim=1).indices.tolist()
        hit1 = sum(int(p[0] == y) for p, y in zip(ranked, labels, strict=True)) / len(labels)
        line = f"accuracy on {len(labels)} images, {len(classes)} classes: top-1 {hit1:.4f} (chance {1 / len(classes):.4f})"
        if len(classes) > 5:
            hit5 = sum(int(y in p) for p, y in zip(ranked, labels, strict=True)) / len(labels)
            line += f", top-5 {hit5:.4f}"
        print(line)
    if a.out:
        import csv
        import io

        from .train.features import atomic_write_text

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "prediction", "probability", *classes])
        for path, pred, probs in zip(paths, res.predictions, res.probs.tolist(), strict=True):
            w.writerow([path, pred, f"{max(probs):.6f}", *(f"{p:.6f}" for p in probs)])
        atomic_write_text(a.out, buf.getvalue())
        print(f"wrote {a.out}")


def _cmd_export(a) -> None:
    from .train.aligned import export_run

    out = export_run(a.run, a.out, a.name, copy_encoders=not a.no_copy_encoders)
    print(f"exported {a.run} to {out}: load it with structure_ops.train.AlignedModel.from_pretrained({str(out)!r})")


# ---------------------------------------------------------------------------------------------------------
# checks that turn common mistakes into one-line errors before any work starts
def _check_device(device: str | None) -> None:
    if device in (None, "auto"):
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device!r} is not a device (auto | cpu | cuda | cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise CliError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif d.type != "cpu":
        raise CliError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def _check_backend(backend: str | None, device: str | None) -> None:
    if backend in (None, "auto"):
        return
    import torch

    from ._backends import BACKENDS, reasons

    if backend not in BACKENDS:
        raise CliError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    on_gpu = str(device).startswith("cuda") or (device in (None, "auto") and torch.cuda.is_available())
    dev = "cuda" if on_gpu else "cpu"
    why = reasons(backend, "structure_loss", (dev,), (torch.float32,))
    if why:
        raise CliError(f"--backend {backend} cannot run on {dev} here: {'; '.join(why)} "
                       "(python -m structure_ops.info lists what can)")


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_folder(path: str, what: str, *, must_exist: bool = False) -> None:
    """``path`` must be (or become) a folder we can write into."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CliError(f"{what} {path} is a file; it must name a folder")
    if must_exist and not p.is_dir():
        return  # the command itself says what is missing (e.g. manifest.json)
    base = _existing_ancestor(p)
    if not base.is_dir():
        raise CliError(f"{what} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CliError(f"{what} {path}: {base} is read-only; copy the folder somewhere writable or fix its permissions")


def _check_file_out(path: str, what: str = "--out") -> None:
    p = Path(path)
    if p.is_dir():
        raise CliError(f"{what} {path} is a folder; it must name a file")
    base = _existing_ancestor(p.parent)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise CliError(f"{what} {path}: {base} is not a writable folder")


def _preflight(a) -> None:
    _check_device(getattr(a, "device", None))
    _check_backend(getattr(a, "backend", None), getattr(a, "device", None))
    if a.command in ("extract", "demo", "export"):
        _check_folder(a.out, "--out")
    elif a.command in ("select-layers", "train", "evaluate") and getattr(a, "run", None):
        _check_folder(a.run, "--run", must_exist=True)
    elif a.command in ("embed", "zero-shot") and getattr(a, "out", None):
        _check_file_out(a.out)
    for name in ("vision", "text"):
        spec = getattr(a, name, None)
        if a.command == "extract" and getattr(a, "captions", None) and isinstance(spec, str):
            from .train.aligned import check_encoder_source

            check_encoder_source(spec, "image" if name == "vision" else "text")


# RuntimeErrors that come from the user's settings or data, not from a bug: a backend that cannot run the
# inputs (e.g. STRUCTURE_OPS_BACKEND=cuda on a CPU machine), an LR range test that diverges on the data.
_USER_RUNTIME_ERRORS = ("cannot run them:", "LR range test diverged")


def _error_message(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e} (a read-only folder?)"
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return _one_line(e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:  # a bare `structure-ops`
        parser.print_help()
        return 0
    try:
        _preflight(a)
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
             "evaluate": _cmd_evaluate, "bench": _cmd_bench, "embed": _cmd_embed, "zero-shot": _cmd_zero_shot,
             "export": _cmd_export, "cache": _cmd_cache, "compare": _cmd_compare, "protocol": _cmd_protocol}[a.command](a)
    except KeyboardInterrupt:
        print(f"structure-ops {a.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, OSError, ValueError) as e:  # user errors: one line, no traceback
        print(f"structure-ops {a.command}: error: {_error_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # only the runtime errors that a user causes: the rest keep their traceback
        if not any(s in str(e) for s in _USER_RUNTIME_ERRORS):
            raise
        print(f"structure-ops {a.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
