"""The pipeline steps that the command line and the demo share: a *run directory* and its manifest.

    run/
      manifest.json            what was extracted: feature files, caption→image map, splits, zero-shot set
      features/*.safetensors   per-layer features (cached, validated; see features.py)
      layer_scores.{json,csv,png}
      train/                   checkpoint.pt, history.json, heads.safetensors, curves.png
      metrics.json

Splits are by image (all captions of an image fall in one split), seeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Pairs, fingerprint
from .encoders import Encoder
from .evaluate import class_embeddings, retrieval, zero_shot
from .features import LayerFeatures, atomic_write_text, cached_features, load_features
from .heads import build_head
from .trainer import TrainConfig, Trainer, embed


def split_by_image(pairs: Pairs, n_val: int, n_test: int | None, n_train: int | None = None, seed: int = 0) -> dict[str, list[int]]:
    """Caption rows of train / val / test, images assigned at random (``n_*`` count images)."""
    n_img = len(pairs.images)
    perm = torch.randperm(n_img, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = n_img - n_val - (n_train or 0) if n_test is None else n_test
    n_train = n_img - n_val - n_test if n_train is None else n_train
    if min(n_train, n_val, n_test) < 2 or n_train + n_val + n_test > n_img:
        raise ValueError(f"cannot split {n_img} images into train {n_train}, val {n_val}, test {n_test} (each ≥ 2)")
    part = {}
    for i in perm[:n_train]:
        part[i] = "train"
    for i in perm[n_train : n_train + n_val]:
        part[i] = "val"
    for i in perm[n_train + n_val : n_train + n_val + n_test]:
        part[i] = "test"
    out = {"train": [], "val": [], "test": []}
    for j, i in enumerate(pairs.image_of):
        if i in part:
            out[part[i]].append(j)
    return out


def write_manifest(run: Path, manifest: dict) -> None:
    atomic_write_text(run / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def read_manifest(run: str | os.PathLike) -> dict:
    path = Path(run) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `structure-ops extract --out {run} ...` first")
    return json.loads(path.read_text())


def extract_run(run: str | os.PathLike, pairs: Pairs, image_encoder: Encoder, text_encoder: Encoder, *,
                splits: dict[str, list[int]], zero_shot_set: tuple[list, list[int], list[str]] | None = None,
                templates: list[str] | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """Extract (or reuse from the cache) all-layer features of the pairs and of the zero-shot set."""
    run = Path(run)
    cache = run / "features"
    img = cached_features(image_encoder, pairs.images, fingerprint(pairs.images), cache, batch_size=batch_size, progress=progress)
    txt = cached_features(text_encoder, pairs.captions, fingerprint(pairs.captions), cache, batch_size=batch_size, progress=progress)
    rel = lambda feats: os.path.relpath(feats.meta["path"], run)  # noqa: E731 - the run folder can move
    manifest = {
        "dataset": pairs.name, "image_features": rel(img), "text_features": rel(txt), "image_of": pairs.image_of,
        "splits": splits, "zero_shot": None, "image_encoder": image_encoder.describe(),
        "text_encoder": text_encoder.describe(),
    }
    if zero_shot_set is not None:
        images, labels, class_names = zero_shot_set
        templates = templates or ["a photo of a {c}."]
        prompts = [t.format(c=c) for c in class_names for t in templates]
        zi = cached_features(image_encoder, images, fingerprint(images), cache, batch_size=batch_size, progress=progress)
        zt = cached_features(text_encoder, prompts, fingerprint(prompts), cache, batch_size=batch_size, progress=progress)
        manifest["zero_shot"] = {"image_features": rel(zi), "prompt_features": rel(zt),
                                 "labels": list(labels), "class_names": list(class_names), "templates": templates}
    write_manifest(run, manifest)
    return manifest


def run_features(run: str | os.PathLike, manifest: dict, key: str, section: str | None = None,
                 layers: list[str] | None = None) -> LayerFeatures:
    """A feature file of the run (``key`` of the manifest, or of its ``section``), optionally only some layers."""
    entry = manifest[section] if section else manifest
    return load_features(Path(run) / entry[key], layers)


def layer_names(run: str | os.PathLike, manifest: dict) -> tuple[list[str], list[str]]:
    """(image layers, text layers) of a run, read from the feature files' headers (no tensor is loaded)."""
    from safetensors import safe_open

    names = []
    for key in ("image_features", "text_features"):
        with safe_open(str(Path(run) / manifest[key]), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            names.append(meta.get("description", {}).get("encoder", {}).get("layers") or list(f.keys()))
    return names[0], names[1]


def pick_layers(run: str | os.PathLike, rule: str, manifest: dict | None = None) -> tuple[str, str]:
    """The (image layer, text layer) for ``rule``: "best" or "last" from ``layer_scores.json`` (written by
    layer selection; "last" also works without it), or an explicit "IMAGE_LAYER,TEXT_LAYER"."""
    manifest = manifest if manifest is not None else read_manifest(run)
    image_layers, text_layers = layer_names(run, manifest)
    if "," in rule:
        li, lt = (s.strip() for s in rule.split(",", 1))
        for name, layer, known in (("image", li, image_layers), ("text", lt, text_layers)):
            if layer not in known:
                raise ValueError(f"unknown {name} layer {layer!r}; layers: {known}")
        return li, lt
    if rule not in ("best", "last"):
        raise ValueError(f"layer rule must be 'best', 'last' or 'IMAGE_LAYER,TEXT_LAYER', got {rule!r}")
    path = Path(run) / "layer_scores.json"
    if path.is_file():
        from .selection import LayerScores

        return LayerScores.from_json(json.loads(path.read_text())).pick(rule)
    if rule == "last":
        return image_layers[-1], text_layers[-1]
    raise FileNotFoundError(f"layers 'best' need {path}: run `structure-ops select-layers --run {run}` first")


def zero_shot_features(run: str | os.PathLike, manifest: dict, layers: tuple[str, str] | None = None):
    """(image features, prompt features, labels, number of classes) of the run's zero-shot set, or None."""
    z = manifest.get("zero_shot")
    if not z:
        return None
    li, lt = ([layers[0]], [layers[1]]) if layers else (None, None)
    return (run_features(run, manifest, "image_features", "zero_shot", li),
            run_features(run, manifest, "prompt_features", "zero_shot", lt), z["labels"], len(z["class_names"]))


def paired_rows(img: dict, txt: dict, image_of, rows, layers: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features, text features) of the given caption rows for the chosen (image, text) layers."""
    li, lt = layers
    for name, feats, layer in (("image", img, li), ("text", txt, lt)):
        if layer not in feats:
            raise ValueError(f"unknown {name} layer {layer!r}; layers: {list(feats)}")
    rows = torch.as_tensor(rows, dtype=torch.long)
    return img[li][torch.as_tensor(image_of)[rows]], txt[lt][rows]


def train_heads(img: dict, txt: dict, image_of, splits: dict, layers: tuple[str, str], cfg: TrainConfig,
                out_dir: str | os.PathLike | None, *, resume: bool = False, progress: bool = True):
    xi, xt = paired_rows(img, txt, image_of, splits["train"], layers)
    vi, vt = paired_rows(img, txt, image_of, splits["val"], layers)
    return Trainer(cfg, xi, xt, vi, vt, out_dir=out_dir, progress=progress).fit(resume=resume)


def save_heads(path, result, layers: tuple[str, str], cfg: TrainConfig, d_in: tuple[int, int]) -> None:
    from safetensors.torch import save_file

    from .features import atomic_write

    tensors = {f"image.{k}": v.detach().cpu().contiguous() for k, v in result.image_head.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().cpu().contiguous() for k, v in result.text_head.state_dict().items()})
    meta = {"layers": list(layers), "config": cfg.to_json(), "d_in": list(d_in), "best_epoch": result.best_epoch, "lr": result.lr}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"structure_ops": json.dumps(meta)}))


def load_heads(path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"trained heads not found: {path} (run `structure-ops train` first)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["structure_ops"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = meta["config"]
    kw = {"rank": cfg["rank"]} if cfg["head"] == "mlp" else {}
    heads = []
    for side, d in zip(("image", "text"), meta["d_in"], strict=True):
        h = build_head(cfg["head"], d, cfg["dim"], **kw)
        h.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(side + ".")})
        heads.append(h.eval())
    return heads[0], heads[1], meta


def evaluate_heads(image_head, text_head, layers: tuple[str, str], img: dict, txt: dict, image_of, rows,
                   zero_shot_feats: tuple[dict, dict, list[int], int] | None = None) -> dict[str, float]:
    """Retrieval on the given caption rows (their images, deduplicated) and zero-shot classification."""
    li, lt = layers
    rows = torch.as_tensor(rows, dtype=torch.long)
    img_rows = torch.as_tensor(image_of)[rows]
    uniq, local = torch.unique(img_rows, return_inverse=True)
    metrics = retrieval(embed(image_head, img[li][uniq]), embed(text_head, txt[lt][rows]), local)
    if zero_shot_feats is not None:
        zi, zt, labels, n_classes = zero_shot_feats
        cls = class_embeddings(embed(text_head, zt[lt]), n_classes)
        metrics.update({f"zeroshot_{k}": v for k, v in zero_shot(embed(image_head, zi[li]), cls, labels).items()})
    return metrics


@dataclass
class Stat:
    mean: float
    std: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


def aggregate(values: list[float]) -> Stat:
    t = torch.tensor(values, dtype=torch.float64)
    return Stat(float(t.mean()), float(t.std()) if len(values) > 1 else 0.0)
