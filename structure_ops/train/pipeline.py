"""The pipeline steps that the command line and the demo share: a *run directory* and its manifest.

    run/
      manifest.json              what was extracted: feature files (in the shared cache, by content key and
                                 digest), encoders, caption→image map, splits, zero-shot set, skipped images
      layer_scores.{json,csv,png}  layer selection, with the feature digests and training split it scored
      train/<name>/              one folder per named training run: checkpoint.pt, history.json,
                                 heads.safetensors (+ provenance), training_curves.png, metrics.json, .lock
      metrics.json               {name: {split: metrics}} of every evaluated run
      compare/                   results of `structure-ops compare`

Splits are by image (all captions of an image fall in one split), seeded.

Provenance: the manifest records each feature file's content key and tensor digest; layer scores, checkpoints,
heads and metrics record the digests, layers and splits they came from. ``--layers best``, ``--resume`` and
``evaluate`` compare them with the run's current state and refuse a mismatch with one line saying what changed.
Training runs are named (``--name``; by default derived from the configuration) so that configurations sit
side by side; a lock file keeps two processes from writing one training run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import Pairs, check_templates, fingerprint
from .encoders import Encoder
from .evaluate import class_embeddings, retrieval, retrieval_chance, zero_shot
from .features import (
    LayerFeatures,
    atomic_write,
    atomic_write_text,
    cached_features,
    feature_id,
    load_features,
    save_features,
)
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
    atomic_write_text(Path(run) / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def read_manifest(run: str | os.PathLike) -> dict:
    path = Path(run) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `structure-ops extract --out {run} ...` first")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run `structure-ops extract`") from None


def _fid(feats: LayerFeatures) -> dict:
    return {"key": feats.meta.get("key"), "digest": feats.meta.get("digest")}


def extract_run(run: str | os.PathLike, pairs: Pairs, image_encoder: Encoder, text_encoder: Encoder, *,
                splits: dict[str, list[int]], zero_shot_set: tuple[list, list[int], list[str]] | None = None,
                templates: list[str] | None = None, batch_size: int = 64, progress: bool = True,
                cache_dir: str | os.PathLike | None = None, shard_size: int = 2048,
                skipped: list[tuple[str, str]] | None = None) -> dict:
    """Extract (or reuse from the shared cache) all-layer features of the pairs and of the zero-shot set."""
    run = Path(run)
    templates = check_templates(templates or ["a photo of a {c}."]) if zero_shot_set is not None else None
    kw = {"batch_size": batch_size, "progress": progress, "shard_size": shard_size}
    img = cached_features(image_encoder, pairs.images, fingerprint(pairs.images), cache_dir, **kw)
    txt = cached_features(text_encoder, pairs.captions, fingerprint(pairs.captions), cache_dir, **kw)
    manifest = {
        "dataset": pairs.name, "image_features": img.meta["path"], "text_features": txt.meta["path"],
        "feature_ids": {"image_features": _fid(img), "text_features": _fid(txt)}, "image_of": pairs.image_of,
        "splits": splits, "zero_shot": None, "image_encoder": image_encoder.describe(),
        "text_encoder": text_encoder.describe(),
        "skipped_images": [{"path": p, "reason": r} for p, r in (skipped or [])],
    }
    if zero_shot_set is not None:
        images, labels, class_names = zero_shot_set
        prompts = [t.format(c=c) for c in class_names for t in templates]
        zi = cached_features(image_encoder, images, fingerprint(images), cache_dir, **kw)
        zt = cached_features(text_encoder, prompts, fingerprint(prompts), cache_dir, **kw)
        manifest["zero_shot"] = {"image_features": zi.meta["path"], "prompt_features": zt.meta["path"],
                                 "feature_ids": {"image_features": _fid(zi), "prompt_features": _fid(zt)},
                                 "labels": list(labels), "class_names": list(class_names), "templates": templates}
    write_manifest(run, manifest)
    return manifest


def register_features(run: str | os.PathLike, img: LayerFeatures, txt: LayerFeatures, splits: dict, image_of: list[int]) -> dict:
    """A run folder from precomputed features (row j of both paired): copied into ``<run>/features/``."""
    run = Path(run)
    ids = {}
    for name, feats in (("image", img), ("text", txt)):
        desc = {"encoder": {"name": f"precomputed:{name}", "modality": name, "layers": list(feats),
                            "source_file": feats.meta.get("path")}, "n": feats.n}
        meta = save_features(run / "features" / f"{name}.safetensors", feats, desc)
        ids[f"{name}_features"] = {"key": meta["key"], "digest": meta["digest"]}
    manifest = {"dataset": "precomputed", "image_features": "features/image.safetensors",
                "text_features": "features/text.safetensors", "feature_ids": ids, "image_of": image_of,
                "splits": splits, "zero_shot": None}
    write_manifest(run, manifest)
    return manifest


def _feature_path(run, entry: dict, key: str) -> Path:
    p = Path(entry[key])
    return p if p.is_absolute() else Path(run) / p


def run_features(run: str | os.PathLike, manifest: dict, key: str, section: str | None = None,
                 layers: list[str] | None = None) -> LayerFeatures:
    """A feature file of the run (``key`` of the manifest, or of its ``section``), optionally only some layers.

    Refused when the file's digest is not the one the manifest recorded (replaced since `extract`)."""
    entry = manifest[section] if section else manifest
    feats = load_features(_feature_path(run, entry, key), layers)
    want = (entry.get("feature_ids") or {}).get(key)
    if want and want.get("digest") and feats.meta.get("digest") != want["digest"]:
        raise ValueError(f"{feats.meta['path']} changed since `extract` wrote {Path(run) / 'manifest.json'} (digest "
                         f"{want['digest'][:12]} -> {str(feats.meta.get('digest'))[:12]}); re-run `structure-ops extract`")
    return feats


def split_digest(rows) -> str:
    return hashlib.sha256(json.dumps(list(rows)).encode()).hexdigest()[:16]


def run_provenance(run: str | os.PathLike, manifest: dict) -> dict:
    """What a run's derived state depends on: the feature files (content key + digest) and the splits."""
    ids = dict(manifest.get("feature_ids") or {})
    for key in ("image_features", "text_features"):
        if key not in ids:  # a run written before the digests were recorded: read them from the headers
            ids[key] = {k: v for k, v in feature_id(_feature_path(run, manifest, key)).items() if k in ("key", "digest")}
    return {"image_features": ids["image_features"], "text_features": ids["text_features"],
            **{f"{s}_split": split_digest(manifest["splits"][s]) for s in ("train", "val", "test")}}


def _what_changed(old: dict, now: dict) -> list[str]:
    out = []
    for k in sorted(set(old) & set(now)):
        if old[k] != now[k]:
            if isinstance(now[k], dict):
                out.append(f"{k.replace('_', ' ')} ({str((old[k] or {}).get('digest'))[:12]} -> {str(now[k].get('digest'))[:12]})")
            else:
                out.append(k.replace("_", " "))
    return out


def layer_names(run: str | os.PathLike, manifest: dict) -> tuple[list[str], list[str]]:
    """(image layers, text layers) of a run, read from the feature files' headers (no tensor is loaded)."""
    from .features import read_meta

    names = []
    for key in ("image_features", "text_features"):
        meta = read_meta(_feature_path(run, manifest, key))
        names.append(meta.get("description", {}).get("encoder", {}).get("layers") or meta["layers"])
    return names[0], names[1]


def selection_provenance(run, manifest: dict) -> dict:
    p = run_provenance(run, manifest)
    return {k: p[k] for k in ("image_features", "text_features", "train_split")}


def pick_layers(run: str | os.PathLike, rule: str, manifest: dict | None = None) -> tuple[str, str]:
    """The (image layer, text layer) for ``rule``: "best" or "last" from ``layer_scores.json`` (written by
    layer selection; "last" also works without it), or an explicit "IMAGE_LAYER,TEXT_LAYER".

    "best" is refused when the layer scores were computed on other features or another training split."""
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
    if rule == "last":
        return image_layers[-1], text_layers[-1]
    if not path.is_file():
        raise FileNotFoundError(f"layers 'best' need {path}: run `structure-ops select-layers --run {run}` first")
    from .selection import LayerScores

    scores = LayerScores.from_json(json.loads(path.read_text()))
    if scores.provenance:
        changed = _what_changed(scores.provenance, selection_provenance(run, manifest))
        if changed:
            raise ValueError(f"{path} is stale: the {', '.join(changed)} changed since `select-layers` scored the "
                             f"layers; re-run `structure-ops select-layers --run {run}`")
    if scores.image_layers != image_layers or scores.text_layers != text_layers:
        raise ValueError(f"{path} is stale: it scores other layers than the run's features have; re-run "
                         f"`structure-ops select-layers --run {run}`")
    return scores.pick(rule)


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
                out_dir: str | os.PathLike | None, *, resume: bool = False, progress: bool = True,
                provenance: dict | None = None):
    xi, xt = paired_rows(img, txt, image_of, splits["train"], layers)
    vi, vt = paired_rows(img, txt, image_of, splits["val"], layers)
    return Trainer(cfg, xi, xt, vi, vt, out_dir=out_dir, progress=progress, provenance=provenance).fit(resume=resume)


# ---------------------------------------------------------------------------------------------------------
# named training runs

def default_name(cfg: TrainConfig, layers: tuple[str, str]) -> str:
    """A training run's default name, from what distinguishes configurations: head, λ, levels, layers, seed."""
    parts = [cfg.head, f"lam{cfg.lam:g}"] + ([f"L{cfg.levels}"] if cfg.levels != 1 else []) + [
        f"{layers[0]}x{layers[1]}"] + ([f"seed{cfg.seed}"] if cfg.seed else [])
    return safe_name("_".join(parts))


def safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._=-]+", "-", str(name)).strip("-.")
    if not s:
        raise ValueError(f"--name {name!r}: a run name needs letters or digits")
    return s[:120]


def train_dir(run: str | os.PathLike, name: str) -> Path:
    return Path(run) / "train" / safe_name(name)


def trained_names(run: str | os.PathLike) -> list[str]:
    """Names of the training runs of a run folder that have heads."""
    root = Path(run) / "train"
    return sorted(p.name for p in root.iterdir() if (p / "heads.safetensors").is_file()) if root.is_dir() else []


def resolve_name(run: str | os.PathLike, name: str | None = None) -> str:
    """``name`` if that training run exists, the only one when ``name`` is None, else a one-line error."""
    names = trained_names(run)
    if name is not None:
        if safe_name(name) not in names:
            raise FileNotFoundError(f"{run}: no trained heads named {name!r}; trained: {names or 'none'}")
        return safe_name(name)
    if len(names) == 1:
        return names[0]
    if not names:
        raise FileNotFoundError(f"{run}: no trained heads (run `structure-ops train --run {run}` first)")
    raise ValueError(f"{run} holds {len(names)} training runs ({', '.join(names)}); pick one with --name")


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "training run"):
    """Hold ``<folder>/.lock`` (``filelock``) or fail at once with one line: one writer per folder."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / ".lock"), timeout=0)
        lock.acquire()
    except Timeout:
        raise ValueError(f"another process is writing the {what} {folder} (lock {folder / '.lock'} is held); wait for "
                         f"it to finish or use another --name") from None
    except OSError as e:
        raise ValueError(f"cannot write the {what} {folder}: {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


def train_run(run: str | os.PathLike, layers_rule: str, cfg: TrainConfig, *, name: str | None = None,
              resume: bool = False, progress: bool = True, write: bool = True, manifest: dict | None = None):
    """Train one named run of a run folder (locked); returns (name, folder, TrainResult)."""
    m = manifest if manifest is not None else read_manifest(run)
    layers = pick_layers(run, layers_rule, m)
    name = safe_name(name) if name else default_name(cfg, layers)
    folder = train_dir(run, name)
    img = run_features(run, m, "image_features", layers=[layers[0]])  # only the two layers it trains on
    txt = run_features(run, m, "text_features", layers=[layers[1]])
    prov = {"layers": list(layers), **run_provenance(run, m)}
    lock = run_lock(folder) if write else contextlib.nullcontext()
    with lock:
        if write and not resume and (folder / "heads.safetensors").is_file():
            import warnings

            warnings.warn(f"training run {name!r} exists: it is overwritten (pass --name to keep both, --resume to "
                          f"continue it)", stacklevel=2)
        res = train_heads(img, txt, m["image_of"], m["splits"], layers, cfg, folder if write else None, resume=resume,
                          progress=progress, provenance=prov)
        res.layers = layers
        if write:
            save_heads(folder / "heads.safetensors", res, layers, cfg, (img[layers[0]].shape[1], txt[layers[1]].shape[1]),
                       provenance=prov, name=name)
    return name, folder, res


def save_heads(path, result, layers: tuple[str, str], cfg: TrainConfig, d_in: tuple[int, int], *,
               provenance: dict | None = None, name: str | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"image.{k}": v.detach().cpu().contiguous() for k, v in result.image_head.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().cpu().contiguous() for k, v in result.text_head.state_dict().items()})
    meta = {"layers": list(layers), "config": cfg.to_json(), "d_in": list(d_in), "best_epoch": result.best_epoch,
            "lr": result.lr, "batch_size": getattr(result, "batch_size", None),
            "warmup_steps": getattr(result, "warmup_steps", None), "epochs_run": len(result.history),
            "notes": list(getattr(result, "notes", [])), "name": name, "provenance": provenance or {}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"structure_ops": json.dumps(meta)}))


def load_heads(path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"trained heads not found: {path} (run `structure-ops train` first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["structure_ops"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable structure-ops heads file ({type(e).__name__}: {e})") from None
    cfg = meta["config"]
    kw = {"rank": cfg["rank"]} if cfg["head"] == "mlp" else {}
    heads = []
    for side, d in zip(("image", "text"), meta["d_in"], strict=True):
        h = build_head(cfg["head"], d, cfg["dim"], **kw)
        h.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(side + ".")})
        heads.append(h.eval())
    return heads[0], heads[1], meta


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def evaluate_heads(image_head, text_head, layers: tuple[str, str], img: dict, txt: dict, image_of, rows,
                   zero_shot_feats: tuple[dict, dict, list[int], int] | None = None) -> dict[str, float]:
    """Retrieval on the given caption rows (their images, deduplicated) and zero-shot classification: top-1,
    top-5 (only with more than 5 classes) and mean-per-class recall."""
    li, lt = layers
    rows = torch.as_tensor(rows, dtype=torch.long)
    img_rows = torch.as_tensor(image_of)[rows]
    uniq, local = torch.unique(img_rows, return_inverse=True)
    metrics = retrieval(embed(image_head, img[li][uniq]), embed(text_head, txt[lt][rows]), local)
    if zero_shot_feats is not None:
        zi, zt, labels, n_classes = zero_shot_feats
        cls = class_embeddings(embed(text_head, zt[lt]), n_classes)
        topk = (1, 5) if n_classes > 5 else (1,)
        zs = zero_shot(embed(image_head, zi[li]), cls, labels, topk, mean_per_class=True)
        metrics.update({f"zeroshot_{k}": v for k, v in zs.items()})
    return metrics


def evaluate_run(run: str | os.PathLike, name: str | None = None, split: str = "test") -> dict:
    """Evaluate training run ``name`` on ``split``; writes ``<run>/train/<name>/metrics.json`` ({split: record})
    and ``<run>/metrics.json`` ({name: {split: record}}). Refuses heads trained on other features or splits."""
    m = read_manifest(run)
    name = resolve_name(run, name)
    heads_path = train_dir(run, name) / "heads.safetensors"
    hi, ht, meta = load_heads(heads_path)
    layers = tuple(meta["layers"])
    old = meta.get("provenance") or {}
    if old:
        changed = _what_changed(old, {"layers": list(layers), **run_provenance(run, m)})
        if changed:
            raise ValueError(f"{heads_path} was trained on other data: the {', '.join(changed)} changed since; "
                             f"re-train (`structure-ops train --run {run} --name {name}`)")
    img = run_features(run, m, "image_features", layers=[layers[0]])
    txt = run_features(run, m, "text_features", layers=[layers[1]])
    for side, feats, layer, d in (("image", img, layers[0], meta["d_in"][0]), ("text", txt, layers[1], meta["d_in"][1])):
        if feats[layer].shape[1] != d:
            raise ValueError(f"{heads_path}: its {side} head takes {d} features but layer {layer!r} has {feats[layer].shape[1]}")
    zs = zero_shot_features(run, m, layers)
    rows = m["splits"][split]
    metrics = evaluate_heads(hi, ht, layers, img, txt, m["image_of"], rows, zs)
    image_of = [m["image_of"][j] for j in rows]
    record = {
        "name": name, "split": split, "layers": list(layers), **metrics,
        "n_images": len(set(image_of)), "n_captions": len(rows), "chance": retrieval_chance(image_of),
        "image_encoder": m.get("image_encoder"), "text_encoder": m.get("text_encoder"),
        "heads": {"file": str(heads_path), "sha256": file_digest(heads_path), "config": meta["config"],
                  "best_epoch": meta.get("best_epoch"), "lr": meta.get("lr"), "batch_size": meta.get("batch_size"),
                  "warmup_steps": meta.get("warmup_steps"), "trained_on": old},
        "run_provenance": run_provenance(run, m),
    }
    if zs is not None:
        n_classes = zs[3]
        record["zero_shot"] = {"n_images": len(zs[2]), "n_classes": n_classes,
                               "chance": {**{f"top{k}": min(k, n_classes) / n_classes for k in ((1, 5) if n_classes > 5 else (1,))},
                                          "mean_per_class": 1 / n_classes},
                               "templates": m["zero_shot"].get("templates")}
    with run_lock(Path(run) / "train" / name, "training run"):
        _merge_json(train_dir(run, name) / "metrics.json", {split: record})
    with run_lock(Path(run) / ".metrics", "metrics of run"):
        _merge_json(Path(run) / "metrics.json", {name: {split: record}})
    return record


def _merge_json(path: Path, update: dict) -> None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict) and k not in ("train", "val", "test"):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


@dataclass
class Stat:
    mean: float
    std: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


def aggregate(values: list[float]) -> Stat:
    t = torch.tensor(values, dtype=torch.float64)
    return Stat(float(t.mean()), float(t.std()) if len(values) > 1 else 0.0)
