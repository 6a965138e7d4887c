"""The paper's comparison in one runner and one table (``structure-ops protocol``).

On an existing run folder (features, splits and zero-shot set reused; nothing re-extracted) it trains and
evaluates every combination of

* layers: ``last`` (the encoders' last layers) and ``selected`` (the best-scoring pair of ``select-layers``),
* methods: ``clip`` (the CLIP objective alone, λ = 0), ``clip+structure`` (CLIP + λ·R_S), ``csa`` (the closed-form
  canonical-correlation baseline) and ``csa+structure`` (CSA refined with R_S as in the paper's code),
* seeds (initialisation and batch order of the trained methods; CSA is closed-form: one fit, std 0),

plus, given a CLIP model folder (``--clip-model``, a ``transformers`` ``CLIPModel`` saved locally) and the run's
image/caption source, a pretrained-CLIP reference row: the evaluation images and captions embedded by CLIP
itself (its projection outputs), scored by the same code. Every row reports retrieval R@1/5/10 both ways on
the chosen split, zero-shot top-1 (top-5 with more than 5 classes) on the run's zero-shot set, and a linear
probe (:func:`structure_ops.train.probe.linear_probe`, CLIP's protocol) on the aligned image embeddings of the
zero-shot set, split per class in halves with a fixed seed (the same split for every row). Mean ± sample
std (n − 1) over seeds; ``<run>/protocol/results.{md,json}`` (atomic). Every trained configuration is a named
training run ``<run>/train/protocol_...`` (``evaluate --name`` / ``export`` work on it; ``--resume`` continues
the trained ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .evaluate import class_embeddings, retrieval, zero_shot
from .features import atomic_write_text

METHODS = ("clip", "clip+structure", "csa", "csa+structure")
LAYER_RULES = {"last": "last", "selected": "best"}
RETRIEVAL = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
PROBE_SEED = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run folder (manifest.json; layer_scores.json for 'selected')")
    p.add_argument("--layers", nargs="+", default=["last", "selected"], choices=list(LAYER_RULES),
                   help="layer choices: last | selected (the best pair of select-layers)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the trained methods")
    p.add_argument("--split", default="test", choices=["val", "test"], help="evaluation split")
    p.add_argument("--lam", type=float, default=10.0, help="λ of clip+structure and of csa+structure")
    p.add_argument("--levels", type=int, default=1, help="R_S levels of the +structure methods")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"], help="heads of the clip methods")
    p.add_argument("--dim", type=int, default=512, help="shared space (CSA: at most min(d_image, d_text, n − 1))")
    p.add_argument("--temperature", type=float, default=0.05, help="CLIP T (and τ of R_S) of the clip methods")
    p.add_argument("--lr", type=float, help="clip methods' learning rate (default: LR range test)")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, help="clip methods (default: adapts to the training set)")
    p.add_argument("--patience", type=int, default=200)
    p.add_argument("--warmup-frac", type=float, help="λ warm-up as a fraction of the run (default 0.05)")
    p.add_argument("--ridge", type=float, default=1e-4, help="CSA covariance ridge")
    p.add_argument("--refine-epochs", type=int, default=10, help="csa+structure: Adam epochs")
    p.add_argument("--refine-lr", type=float, default=5e-4, help="csa+structure: Adam learning rate")
    p.add_argument("--refine-temperature", type=float, default=0.2, help="csa+structure: τ of R_S")
    p.add_argument("--refine-batch-size", type=int, default=4096, help="csa+structure: pairs per step")
    p.add_argument("--pairing-weight", type=float, default=1e-2, help="csa+structure: weight of the pairing term")
    p.add_argument("--no-probe", action="store_true", help="leave out the linear-probe columns")
    clip = p.add_argument_group("pretrained-CLIP reference row")
    clip.add_argument("--clip-model", help="a local transformers CLIPModel folder (with its tokenizer and preprocessor)")
    src = clip.add_mutually_exclusive_group()
    src.add_argument("--captions", help="the captions file the run was extracted from")
    src.add_argument("--karpathy", help="the Karpathy split file the run was extracted from")
    clip.add_argument("--images", help="the image folder the run was extracted with")
    clip.add_argument("--zero-shot", help="the zero-shot class folder the run was extracted with (zero-shot and probe "
                      "columns of the CLIP row)")
    clip.add_argument("--class-names", help="with --zero-shot: the class-names file the run was extracted with")
    clip.add_argument("--clip-batch-size", type=int, default=32, help="inputs per CLIP batch")
    suite = p.add_argument_group("zero-shot suite columns")
    suite.add_argument("--suite", metavar="ROOT", help="also evaluate every row on the zero-shot suite datasets under ROOT "
                       "(structure_ops.train.suite; the run's encoders are rebuilt from its manifest)")
    suite.add_argument("--suite-datasets", help="comma-separated suite dataset keys (default: every one present)")
    suite.add_argument("--suite-limit", type=int, help="at most this many images per split (a seeded subset; quick looks)")
    suite.add_argument("--suite-prompts", choices=["dataset", "simple"], default="dataset",
                       help="each dataset's CLIP templates, or only 'a photo of a {c}.'")
    suite.add_argument("--suite-probe", action="store_true", help="also a linear probe per suite dataset (train split)")
    p.add_argument("--resume", action="store_true", help="continue interrupted clip configurations from their checkpoints")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")


# ---------------------------------------------------------------------------------------------------------
# metrics of one set of aligned embeddings

def probe_split(labels, seed: int = PROBE_SEED) -> tuple[list[int], list[int]]:
    """(probe-train rows, probe-test rows) of a labelled set: per class, a seeded half (rounded down) for testing."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True):
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        test += rows[: len(rows) // 2].tolist()
        train += rows[len(rows) // 2 :].tolist()
    return sorted(train), sorted(test)


def score_embeddings(image_emb, text_emb, local_image_of, zs=None, probe: bool = True) -> dict:
    """Retrieval of (unique images, captions) embeddings; with ``zs`` = (zero-shot image embeddings, prompt
    embeddings (class-major), labels, number of classes): zero-shot accuracy and, with ``probe``, the linear probe."""
    out = retrieval(image_emb, text_emb, local_image_of)
    if zs is not None:
        zi, zt, labels, n_classes = zs
        cls = class_embeddings(zt, n_classes)
        topk = (1, 5) if n_classes > 5 else (1,)
        out.update({f"zeroshot_{k}": v for k, v in zero_shot(zi, cls, labels, topk).items()})
        if probe:
            from .probe import linear_probe

            tr, te = probe_split(labels)
            y = torch.as_tensor(labels)
            r = linear_probe(zi[tr], y[tr], zi[te], y[te], seed=PROBE_SEED)
            out.update(probe_top1=r["top1"], probe_mean_per_class=r["mean_per_class"], probe_C=r["C"])
    return out


# ---------------------------------------------------------------------------------------------------------
# the pretrained-CLIP reference

class ClipReference:
    """A local ``transformers`` CLIPModel: L2-normalized projection outputs of images (paths) and texts."""

    def __init__(self, folder: str, device: str = "auto", batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, CLIPModel

        from .trainer import resolve_device

        if not Path(folder).is_dir():
            raise ValueError(f"--clip-model {folder}: not a folder (a transformers CLIPModel saved with save_pretrained)")
        if not (Path(folder) / "preprocessor_config.json").is_file():
            raise ValueError(f"--clip-model {folder}: no preprocessor_config.json (CLIP's image preprocessing)")
        try:
            self.model = CLIPModel.from_pretrained(folder).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise ValueError(f"--clip-model {folder} is not a loadable CLIPModel folder: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}") from None
        try:  # the PIL implementation of CLIP's preprocessing (resize, center crop, normalize) needs no torchvision
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # older transformers
            from transformers import CLIPImageProcessor as Processor
        self.processor = Processor.from_pretrained(folder)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.batch_size, self.folder = batch_size, str(folder)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers ≥ 5: a model output

    @torch.inference_mode()
    def images(self, paths: list) -> torch.Tensor:
        from PIL import Image

        out = []
        for s in range(0, len(paths), self.batch_size):
            batch = []
            for p in paths[s : s + self.batch_size]:
                if hasattr(p, "convert"):  # a PIL image (the suite's array-backed datasets)
                    batch.append(p.convert("RGB"))
                    continue
                try:
                    with Image.open(p) as im:
                        batch.append(im.convert("RGB"))
                except Exception as e:
                    raise ValueError(f"cannot read image {p}: {type(e).__name__}: {e}") from None
            px = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self._features(self.model.get_image_features(pixel_values=px)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=1)

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[s : s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            out.append(self._features(self.model.get_text_features(**tok)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=1)


def _feature_fingerprint(run, entry: dict, key: str) -> str | None:
    from .features import read_meta
    from .pipeline import _feature_path

    return (read_meta(_feature_path(run, entry, key)).get("description") or {}).get("dataset")


def run_inputs(run, m: dict, *, captions=None, karpathy=None, images=None, zero_shot_dir=None, class_names=None):
    """The run's pairs (and zero-shot images) read again from the files it was extracted from; refused with one
    line unless their content fingerprints are those recorded in the run's feature files."""
    from . import data as D

    if not (captions or karpathy):
        raise ValueError("--clip-model needs the run's image/caption source: --captions FILE or --karpathy FILE "
                         "(with --images ROOT), as given to `extract`")
    if karpathy:
        if not images:
            raise ValueError("--karpathy needs --images (the folder holding <filepath>/<filename> of every image)")
        pairs, splits = D.load_karpathy(karpathy, images, m.get("protocol") or "karpathy", seed=0)
    else:
        pairs = D.load_captions(captions, images)
    bad = [s["path"] for s in m.get("skipped_images") or []]
    if bad:
        pairs = D.without_images(pairs, bad)
    for what, items, key in (("images", pairs.images, "image_features"), ("captions", pairs.captions, "text_features")):
        want = _feature_fingerprint(run, m, key)
        if want is None:
            raise ValueError(f"{run}: its {what} are precomputed features with no recorded source; the CLIP reference "
                             f"row needs a run extracted from images and captions")
        if D.fingerprint(items) != want:
            raise ValueError(f"the {what} of {karpathy or captions} are not the ones {run} was extracted from (content "
                             f"fingerprint differs); pass the same --captions/--karpathy and --images as to `extract`")
    zs = None
    if zero_shot_dir:
        z = m.get("zero_shot")
        if not z:
            raise ValueError(f"--zero-shot: {run} has no zero-shot set (extract it with --zero-shot)")
        paths, labels, names = D.load_image_folder(zero_shot_dir, class_names)
        if D.fingerprint(paths) != _feature_fingerprint(run, z, "image_features") or list(labels) != list(z["labels"]):
            raise ValueError(f"--zero-shot {zero_shot_dir}: not the images {run}'s zero-shot set was extracted from")
        zs = paths
    return pairs, zs


def clip_reference_row(clip: ClipReference, pairs, rows, m: dict, zs_paths=None, probe: bool = True, log=print) -> dict:
    """The metrics of the pretrained CLIP on the caption ``rows`` of ``pairs`` (and the zero-shot set)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    img_rows = torch.as_tensor(pairs.image_of)[rows]
    uniq, local = torch.unique(img_rows, return_inverse=True)
    t0 = time.perf_counter()
    img = clip.images([pairs.images[i] for i in uniq.tolist()])
    txt = clip.texts([pairs.captions[j] for j in rows.tolist()])
    zs = None
    if zs_paths is not None:
        z = m["zero_shot"]
        prompts = [t.format(c=c) for c in z["class_names"] for t in z["templates"]]
        zs = (clip.images(zs_paths), clip.texts(prompts), z["labels"], len(z["class_names"]))
    out = score_embeddings(img, txt, local, zs, probe)
    log(f"  CLIP reference ({clip.folder}): {len(uniq)} images, {len(rows)} captions embedded in "
        f"{time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------------------
# the zero-shot suite (structure_ops.train.suite.evaluate_suite) for every row

class FeatureCache:
    """Frozen-encoder features of inputs (paths, PIL images or texts), computed once per distinct input for the
    layers asked: every row of one layer choice (methods × seeds) reuses one encoder pass over a dataset."""

    def __init__(self, encoder, layers) -> None:
        self.encoder = encoder
        self.index = {layer: encoder.layer_names.index(layer) for layer in dict.fromkeys(layers)}
        self.store: dict = {}

    @staticmethod
    def key(item):
        if isinstance(item, str):
            return ("s", item)
        if isinstance(item, os.PathLike):
            return ("s", str(item))
        return ("i", hashlib.sha1(repr((item.mode, item.size)).encode() + item.tobytes()).hexdigest())

    def features(self, items: list, layer: str, batch_size: int) -> torch.Tensor:
        keys = [self.key(it) for it in items]
        first: dict = {}  # one encoder pass per distinct input not seen yet
        for i, k in enumerate(keys):
            if k not in self.store and k not in first:
                first[k] = i
        todo = list(first.values())
        for s in range(0, len(todo), batch_size):
            rows = todo[s : s + batch_size]
            outs = self.encoder.encode([items[i] for i in rows])
            for j, i in enumerate(rows):
                self.store[keys[i]] = {name: outs[ix][j].float().clone() for name, ix in self.index.items()}
        return torch.stack([self.store[k][layer] for k in keys])

    def clear(self) -> None:
        self.store.clear()


class _HeadsModel:
    """``encode_image`` / ``encode_text`` of one row (its heads on cached frozen features), for evaluate_suite."""

    def __init__(self, images: FeatureCache, texts: FeatureCache, folder: Path, batch_size: int) -> None:
        from .pipeline import load_heads

        self.image_head, self.text_head, meta = load_heads(folder / "heads.safetensors")
        self.layers, self.images, self.texts, self.batch_size = tuple(meta["layers"]), images, texts, batch_size
        self.meta = {"heads": str(folder / "heads.safetensors"), "layers": list(self.layers)}

    def __repr__(self) -> str:
        return f"heads {self.meta['heads']} on {self.layers[0]} × {self.layers[1]}"

    def encode_image(self, images, *, batch_size: int | None = None) -> torch.Tensor:
        from .aligned import AlignedModel

        feats = self.images.features(list(images), self.layers[0], batch_size or self.batch_size)
        return AlignedModel._embed(self.image_head, feats, "image")

    def encode_text(self, texts, *, batch_size: int | None = None) -> torch.Tensor:
        from .aligned import AlignedModel

        feats = self.texts.features(list(texts), self.layers[1], batch_size or self.batch_size)
        return AlignedModel._embed(self.text_head, feats, "text")


class _ClipModel:
    def __init__(self, clip: ClipReference) -> None:
        self.clip, self.meta = clip, {"clip_model": clip.folder}

    def __repr__(self) -> str:
        return f"CLIP {self.clip.folder}"

    def encode_image(self, images, *, batch_size: int | None = None) -> torch.Tensor:
        return self.clip.images(list(images))

    def encode_text(self, texts, *, batch_size: int | None = None) -> torch.Tensor:
        return self.clip.texts(list(texts))


SUITE_METRICS = ("top1", "top5", "mean_per_class")


def _suite_record(row: dict) -> dict:
    """One suite dataset's result as flat metric keys ``suite_<dataset>_<metric>``."""
    out = {f"suite_{row['dataset']}_{k}": row[k] for k in SUITE_METRICS if row.get(k) is not None}
    for k in ("top1", "mean_per_class"):
        if (row.get("probe") or {}).get(k) is not None:
            out[f"suite_{row['dataset']}_probe_{k}"] = row["probe"][k]
    return out


def _suite_means(r: dict, keys: list[str]) -> None:
    """Per seed: the means over the suite datasets (top-5 over those with more than 5 classes)."""
    for k in (*SUITE_METRICS, "probe_top1", "probe_mean_per_class"):
        vals = [r[f"suite_{d}_{k}"] for d in keys if f"suite_{d}_{k}" in r]
        if vals:
            r[f"suite_{k}"] = statistics.fmean(vals)


def discover_suite(a, run: Path, m: dict):
    """The suite datasets under ``--suite`` (indexed now, so a malformed one stops the run before any training)."""
    from . import suite as S

    if a.suite_limit is not None and a.suite_limit < 1:
        raise ValueError(f"--suite-limit must be >= 1, got {a.suite_limit}")
    for key in ("image_encoder", "text_encoder"):
        if not m.get(key):
            raise ValueError(f"--suite needs the run's encoders, but {run}/manifest.json has no {key} (precomputed "
                             f"features)")
    keys = [k.strip().lower() for k in a.suite_datasets.split(",") if k.strip()] if a.suite_datasets else None
    found, absent = S.discover(a.suite, keys, with_train=a.suite_probe)
    if not found:
        raise ValueError(f"--suite {a.suite}: none of the suite's datasets is there (see docs/evaluation.md)")
    return found, absent


def suite_columns(a, run: Path, m: dict, discovered, report_rows: dict, clip: ClipReference | None,
                  reference: dict | None, log=print) -> list[str]:
    """Evaluate every row (each seed's heads) and the CLIP reference on the suite; adds ``suite_*`` keys to the
    per-seed records (and the reference metrics). Returns the dataset keys evaluated."""
    from . import suite as S
    from .aligned import encoder_from_description

    found, absent = discovered
    log(f"zero-shot suite: {len(found)} dataset(s) under {a.suite} ({', '.join(d.key for d in found)}); absent: "
        f"{len(absent)}")
    device = None if a.device == "auto" else a.device
    encs = [encoder_from_description(m[key], base=run, device=device) for key in ("image_encoder", "text_encoder")]
    entries = [(e, r) for e in report_rows.values() for r in e["per_seed"]]
    images = FeatureCache(encs[0], [e["image_layer"] for e, _ in entries])
    texts = FeatureCache(encs[1], [e["text_layer"] for e, _ in entries])
    models = [(r, _HeadsModel(images, texts, run / "train" / r["name"], 64)) for _, r in entries]
    if clip is not None:
        models.append((reference["metrics"], _ClipModel(clip)))
    for i, ds in enumerate(found, 1):
        t0 = time.perf_counter()
        for rec, model in models:
            res = S.evaluate_suite(model, a.suite, linear_probe=a.suite_probe, limit=a.suite_limit, prompts=a.suite_prompts,
                                   progress=False, discovered=([ds], []))
            rec.update(_suite_record(res["datasets"][0]))
        images.clear()
        log(f"  suite [{i}/{len(found)}] {ds.name}: {len(models)} row(s) in {time.perf_counter() - t0:.1f} s")
    done = [d.key for d in found]
    for rec, _ in models:
        _suite_means(rec, done)
    return done


# ---------------------------------------------------------------------------------------------------------
# the runner

def _heads_metrics(folder: Path, layers, img, txt, m: dict, rows, zs_feats, probe: bool) -> dict:
    from .pipeline import load_heads
    from .trainer import embed

    hi, ht, _ = load_heads(folder / "heads.safetensors")  # evaluate what was saved
    li, lt = layers
    rows = torch.as_tensor(rows, dtype=torch.long)
    uniq, local = torch.unique(torch.as_tensor(m["image_of"])[rows], return_inverse=True)
    zs = None
    if zs_feats is not None:
        zi, zt, labels, n_classes = zs_feats
        zs = (embed(hi, zi[li]), embed(ht, zt[lt]), labels, n_classes)
    return score_embeddings(embed(hi, img[li][uniq]), embed(ht, txt[lt][rows]), local, zs, probe)


def _suite_names(keys: list[str]) -> dict[str, str]:
    from .suite import suite_data

    return {k: suite_data()["datasets"][k]["name"] for k in keys}


def row_label(rule: str, layers, method: str) -> str:
    return f"{rule} ({layers[0]} × {layers[1]}), {method}"


def _stat(values: list[float]) -> tuple[float, float]:
    """(mean, sample std with n − 1; 0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def protocol(a: argparse.Namespace, log=_log) -> dict:
    """Run every configuration of ``a`` (see :func:`add_arguments`); returns the report written to
    ``<run>/protocol/results.json``."""
    from .csa import RefineConfig, csa_run
    from .pipeline import pick_layers, read_manifest, run_features, train_run, zero_shot_features
    from .trainer import TrainConfig, resolve_device

    run = Path(a.run)
    m = read_manifest(run)
    if len(set(a.seeds)) != len(a.seeds):
        raise ValueError(f"--seeds must be distinct, got {a.seeds}")
    if a.lam < 0 or a.levels < 1:
        raise ValueError(f"--lam must be >= 0 and --levels >= 1, got {a.lam}, {a.levels}")
    layer_sets = {}
    for rule in dict.fromkeys(a.layers):
        try:
            layer_sets[rule] = pick_layers(run, LAYER_RULES[rule], m)
        except FileNotFoundError:  # 'selected' without layer scores
            raise ValueError(f"--layers selected needs {run}/layer_scores.json: run `structure-ops select-layers --run "
                             f"{run}` first (or pass --layers last)") from None
    clip = pairs = zs_paths = None
    if a.clip_batch_size < 1:
        raise ValueError(f"--clip-batch-size must be >= 1, got {a.clip_batch_size}")
    if a.clip_model:  # everything the CLIP row needs is checked before any training
        pairs, zs_paths = run_inputs(run, m, captions=a.captions, karpathy=a.karpathy, images=a.images,
                                     zero_shot_dir=a.zero_shot, class_names=a.class_names)
        clip = ClipReference(a.clip_model, a.device, a.clip_batch_size)
    elif a.captions or a.karpathy or a.zero_shot:
        raise ValueError("--captions/--karpathy/--zero-shot are the inputs of the CLIP reference row: give --clip-model")
    discovered = discover_suite(a, run, m) if a.suite else None
    has_zs = m.get("zero_shot") is not None
    probe = has_zs and not a.no_probe
    # every option is checked here, before the first fit
    base = TrainConfig(head=a.head, dim=a.dim, temperature=a.temperature, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size,
                       patience=a.patience, warmup_frac=a.warmup_frac, backend=a.backend, device=a.device)
    refine_base = RefineConfig(lam=a.lam, cca_weight=a.pairing_weight, levels=a.levels, temperature=a.refine_temperature,
                               epochs=a.refine_epochs, lr=a.refine_lr, batch_size=a.refine_batch_size, backend=a.backend,
                               device=str(resolve_device(a.device)))
    if not a.ridge >= 0:
        raise ValueError(f"--ridge must be >= 0, got {a.ridge}")
    rows = m["splits"][a.split]
    jobs = []
    for rule, layers in layer_sets.items():
        for method in a.methods:
            for seed in (a.seeds if method != "csa" else a.seeds[:1]):
                jobs.append((rule, layers, method, seed))
    log(f"protocol on {run}: {len(layer_sets)} layer choice(s) × {len(a.methods)} method(s), seeds {a.seeds} "
        f"({len(jobs)} fits{' + the CLIP reference' if clip else ''}); {len(m['splits']['train'])} training pairs, "
        f"evaluated on {len(rows)} {a.split} captions")
    report_rows: dict[str, dict] = {}
    t_all = time.perf_counter()
    feats: dict[tuple, tuple] = {}
    for i, (rule, layers, method, seed) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        tag = f"protocol_{rule}_{method.replace('+', '-')}" + (f"_seed{seed}" if method != "csa" else "")
        if method in ("clip", "clip+structure"):
            lam = 0.0 if method == "clip" else a.lam
            levels = a.levels if lam > 0 else 1
            cfg = dataclasses.replace(base, lam=lam, levels=levels, weighting="none" if levels == 1 else "inverse", seed=seed)
            name, folder, res = train_run(run, f"{layers[0]},{layers[1]}", cfg, name=tag, resume=a.resume, manifest=m)
            detail = f"lr {res.lr:.2g}, best epoch {res.best_epoch} of {len(res.history)}"
        else:
            refine = dataclasses.replace(refine_base, seed=seed) if method == "csa+structure" else None
            name, folder, fit = csa_run(run, f"{layers[0]},{layers[1]}", a.dim, a.ridge, name=tag, refine=refine, manifest=m)
            detail = f"{fit.w_x.shape[1]} directions" + (" (closed form: one fit for every seed)" if refine is None else "")
        if layers not in feats:
            feats[layers] = (run_features(run, m, "image_features", layers=[layers[0]]),
                             run_features(run, m, "text_features", layers=[layers[1]]),
                             zero_shot_features(run, m, layers))
        img, txt, zs = feats[layers]
        r = _heads_metrics(folder, layers, img, txt, m, rows, zs, probe)
        r.update(seed=seed if method != "csa" else None, name=name)
        label = row_label(rule, layers, method)
        entry = report_rows.setdefault(label, {"layers": rule, "image_layer": layers[0], "text_layer": layers[1],
                                               "method": method, "per_seed": []})
        entry["per_seed"].append(r)
        shown = "  ".join(f"{k} {r[k]:.3f}" for k in ("i2t_R@1", "t2i_R@1", "zeroshot_top1", "probe_top1") if k in r)
        log(f"[{i}/{len(jobs)}] {label}{'' if method == 'csa' else f', seed {seed}'}: {shown} ({detail}; "
            f"{time.perf_counter() - t0:.1f} s; run {name})")
    reference = None
    if clip is not None:
        log("CLIP reference row")
        r = clip_reference_row(clip, pairs, rows, m, zs_paths, probe, log)
        reference = {"model": clip.folder, "metrics": r}
    suite_keys = suite_columns(a, run, m, discovered, report_rows, clip, reference, log) if a.suite else []
    metrics = list(RETRIEVAL)
    if has_zs:
        n_classes = len(m["zero_shot"]["class_names"])
        metrics += ["zeroshot_top1"] + (["zeroshot_top5"] if n_classes > 5 else [])
        if probe:
            metrics += ["probe_top1", "probe_mean_per_class"]
    if suite_keys:
        metrics += [f"suite_{k}" for k in (*SUITE_METRICS, "probe_top1", "probe_mean_per_class")
                    if any(f"suite_{k}" in r for e in report_rows.values() for r in e["per_seed"])]
    per_dataset = [f"suite_{d}_top1" for d in suite_keys]
    for e in report_rows.values():
        e["n"] = len(e["per_seed"])
        e["mean"], e["std"] = {}, {}
        for k in metrics + per_dataset:
            vals = [r[k] for r in e["per_seed"] if k in r and r[k] is not None and not math.isnan(r[k])]
            if vals:
                e["mean"][k], e["std"][k] = _stat(vals)
    lines = ["| layers | method | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 3) + "|"]
    one_batch = len(m["splits"]["train"]) <= a.refine_batch_size  # csa+structure: the seed only permutes its rows
    for e in report_rows.values():
        if e["method"] == "csa+structure" and one_batch:
            e["seed_independent"] = "the training pairs fit in one refinement batch: the seed only permutes its rows"
        seeds = "1 (closed form)" if e["method"] == "csa" else f"{e['n']}{' (one batch)' if 'seed_independent' in e else ''}"
        cells = [_fmt(e["mean"][k], e["std"][k], e["n"]) if k in e["mean"] else "–" for k in metrics]
        lines.append(f"| {e['layers']} ({e['image_layer']} × {e['text_layer']}) | {e['method']} | {seeds} | "
                     + " | ".join(cells) + " |")
    if reference is not None:
        cells = [f"{reference['metrics'][k]:.3f}" if k in reference["metrics"] else "–" for k in metrics]
        lines.append(f"| pretrained CLIP ({Path(clip.folder).name}) | reference | – | " + " | ".join(cells) + " |")
    if per_dataset:  # the suite per dataset: top-1 (mean over seeds)
        names = _suite_names(suite_keys)
        lines += ["", "Zero-shot suite, top-1 per dataset:", "",
                  "| layers | method | " + " | ".join(names[d] for d in suite_keys) + " |", "|---" * (len(suite_keys) + 2) + "|"]
        for e in report_rows.values():
            lines.append(f"| {e['layers']} ({e['image_layer']} × {e['text_layer']}) | {e['method']} | "
                         + " | ".join(_fmt(e["mean"][k], e["std"][k], e["n"]) if k in e["mean"] else "–" for k in per_dataset)
                         + " |")
        if reference is not None:
            lines.append(f"| pretrained CLIP ({Path(clip.folder).name}) | reference | "
                         + " | ".join(f"{reference['metrics'][k]:.3f}" if k in reference["metrics"] else "–" for k in per_dataset)
                         + " |")
    table = "\n".join(lines)
    report = {
        "run": str(run), "split": a.split, "seeds": a.seeds, "methods": a.methods, "layers": {k: list(v) for k, v in layer_sets.items()},
        "lam": a.lam, "levels": a.levels, "metrics": metrics, "rows": report_rows, "clip_reference": reference,
        "probe": {"split": "per class, a seeded half of the zero-shot set held out for testing", "seed": PROBE_SEED} if probe else None,
        "protocol": m.get("protocol"), "n_captions": len(rows),
        "suite": {"root": str(a.suite), "datasets": suite_keys, "limit": a.suite_limit, "prompts": a.suite_prompts,
                  "probe": a.suite_probe} if a.suite else None,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    out = run / "protocol"
    atomic_write_text(out / "results.json", json.dumps(report, indent=1) + "\n")
    std_note = "mean ± sample std (n − 1) over seeds" if len(a.seeds) > 1 else "one seed"
    atomic_write_text(out / "results.md", f"# Protocol on {run} ({a.split} split, {len(rows)} captions; {std_note})\n\n"
                      f"{table}\n")
    log(f"{std_note}:\n\n{table}\n\nwrote {out}/results.{{md,json}} ({time.perf_counter() - t_all:.0f} s)")
    return report


def main(a: argparse.Namespace) -> None:  # the CLI entry (structure_ops.cli)
    protocol(a)
    sys.stdout.flush()
