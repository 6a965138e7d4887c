"""Using a trained model: frozen encoders + the chosen layers + the trained heads, as one object.

    from structure_ops.train import AlignedModel

    model = AlignedModel.from_run("run")                     # or .from_pretrained("exported/")
    img = model.encode_image(["cat.jpg", pil_image])          # (2, dim), rows L2-normalized
    txt = model.encode_text(["a photo of a cat."])            # (1, dim)
    scores = img @ txt.T                                      # cosine similarities
    res = model.zero_shot(["cat.jpg"], ["cat", "dog"], ["a photo of a {c}."])
    model.save_pretrained("exported/")                       # self-contained folder

An image goes through exactly what training saw: the run's encoder (rebuilt from the encoder description
stored in the run's manifest), its preprocessing, the pooled hidden state of the selected layer, then the
trained head and an L2 normalization. ``encode_image`` on the training images therefore reproduces the
embeddings the trainer computed from the cached features (tested).

An exported folder holds ``aligned.json`` (format, encoder references with pooling, layer names and
preprocessing, the selected layers, the head configuration, the zero-shot templates, provenance) and
``heads.safetensors`` (both heads). Encoders are referenced, not duplicated: a built-in name, a hub name, or
a local Hugging Face folder, which ``save_pretrained`` copies into ``encoders/`` by default so that the
folder works on another machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .encoders import BUILTIN, Encoder, build_encoder
from .heads import build_head

FORMAT = "structure-ops-aligned/1"
CONFIG_NAME = "aligned.json"
HEADS_NAME = "heads.safetensors"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
# Built-in encoders describe themselves by model name; these map the name back to the built-in.
_BUILTIN_BY_NAME = {"all-MiniLM-L6-v2": "minilm", "efficientnet-lite0": "efficientnet-lite0"}
# Keys of an encoder description that must match between the run and the rebuilt encoder: what it
# computes (pooling, layers, preprocessing, text length) and the content hash of its weights.
_IDENTITY_KEYS = ("pooling", "layers", "transform", "max_length", "weights")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------------------------------------------------
# encoder references
def _is_path_like(spec: str) -> bool:
    """A reference that names a local path rather than a hub model ("org/name")."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") != 1 or spec.endswith("/"):
        return True
    return Path(spec).parent.is_dir()  # "models/vti" where ./models exists: a mistyped local folder


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the Hugging Face endpoint (``HF_ENDPOINT``) opens within ``timeout`` s."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().lower() in ("1", "true", "yes", "on")


def _go_offline() -> None:
    """Make the Hugging Face libraries use their cache only (no retries against an unreachable hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def check_encoder_source(spec: str, modality: str, *, check_hub: bool = True) -> None:
    """Fail fast, with one clear line, on an encoder reference that cannot load.

    A built-in name or an existing local folder passes. Something that looks like a path but is not a folder
    (a typo, a file) is refused *before* any hub lookup. A hub name (``org/name``) passes if it is in the local
    Hugging Face cache; otherwise, when ``HF_HUB_OFFLINE`` is set or the hub does not answer within a few
    seconds, it is refused at once instead of after the libraries' retries (about 40 s).
    """
    if spec in BUILTIN:
        return
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{modality} encoder {spec!r} is a file; expected a built-in name, a Hugging Face model "
                             "folder or a hub name")
        if not (p / "config.json").is_file():
            raise ValueError(f"{modality} encoder folder {spec!r} has no config.json: not a Hugging Face model folder")
        return
    if _is_path_like(spec) or not _HUB_NAME.match(spec):
        raise ValueError(f"{modality} encoder {spec!r}: no such local folder (and not a hub name 'org/name' or a "
                         f"built-in: {', '.join(BUILTIN)})")
    if not check_hub:
        return
    set_offline = _offline()
    if not set_offline and not hub_reachable():
        _go_offline()  # a cached copy then loads at once, without the libraries' retries
    elif not set_offline:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        why = "HF_HUB_OFFLINE is set" if set_offline else "the Hugging Face hub is unreachable"
        raise ValueError(f"{modality} encoder {spec!r} is not in the local Hugging Face cache and {why}; pass a "
                         "local model folder, or download it on a machine with network first")


def encoder_source(description: dict) -> str:
    """The ``build_encoder`` argument that rebuilds the encoder a description came from."""
    src = description.get("source") or description.get("spec")
    if src:
        return str(src)
    name = str(description.get("name", ""))
    if not name or name.startswith("precomputed"):
        raise ValueError(f"encoder {name or '?'!r} cannot be rebuilt: the run was made from precomputed features; "
                         "pass image_encoder= / text_encoder= explicitly")
    return _BUILTIN_BY_NAME.get(name, name)


def encoder_from_description(description: dict, *, base: str | os.PathLike | None = None, device=None,
                             dtype: torch.dtype | None = None, strict: bool = True) -> Encoder:
    """Rebuild the encoder that produced a run's features from its description (``Encoder.describe()``).

    ``base``: folder that relative local references are resolved against (a run or an exported folder).
    The rebuilt encoder must describe itself the same way (pooling, layers, preprocessing and any recorded
    content hash); otherwise ValueError, or a warning with ``strict=False``.
    """
    modality = description.get("modality")
    if modality not in ("image", "text"):
        raise ValueError(f"encoder description has no modality 'image' or 'text': {description}")
    src = encoder_source(description)
    if src not in BUILTIN and base is not None and not Path(src).expanduser().is_absolute():
        if (Path(base) / src).is_dir() and not Path(src).is_dir():
            src = str(Path(base) / src)
    check_encoder_source(src, modality)
    if dtype is None and isinstance(description.get("dtype"), str):
        dtype = getattr(torch, description["dtype"], None)
    image_size = (description.get("transform") or {}).get("size") if modality == "image" else None
    pooling = description.get("pooling") if src not in BUILTIN else None
    enc = build_encoder(src, modality, pooling=pooling, image_size=image_size, device=device, dtype=dtype)
    if "max_length" in description and hasattr(enc, "max_length"):
        enc.max_length = int(description["max_length"])
    now = enc.describe()
    keys = [k for k in description if k in _IDENTITY_KEYS]
    diff = [f"{k}: {description[k]!r} -> {now.get(k)!r}" for k in keys if now.get(k) != description[k]]
    if diff:
        msg = f"{modality} encoder {src!r} no longer matches the one the heads were trained on ({'; '.join(diff)})"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return enc


# ---------------------------------------------------------------------------------------------------------
# where a run keeps its trained heads
def find_heads(run: str | os.PathLike, name: str | None = None) -> Path:
    """The heads file of training run ``name`` of a run folder (``<run>/train/<name>/heads.safetensors``; with
    ``name=None`` the only training run). Run folders written before named runs keep ``<run>/train/heads.safetensors``."""
    from .pipeline import resolve_name, train_dir

    run = Path(run)
    legacy = run / "train" / HEADS_NAME
    if name is None and legacy.is_file():
        return legacy
    return train_dir(run, resolve_name(run, name)) / HEADS_NAME


def _read_heads(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable heads file ({type(e).__name__}: {e})") from None
    if not {"layers", "config", "d_in"} <= set(meta):
        raise ValueError(f"{path} is not a structure-ops heads file (its header lacks layers / config / d_in)")
    return state, meta


def _build_heads(state: dict, meta: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = meta["config"]
    kw = {"rank": cfg["rank"]} if cfg["head"] == "mlp" else {}
    heads = []
    for side, d in zip(("image", "text"), meta["d_in"], strict=True):
        h = build_head(cfg["head"], int(d), int(cfg["dim"]), **kw)
        h.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(side + ".")})
        heads.append(h.eval().requires_grad_(False))
    return heads[0], heads[1]


# ---------------------------------------------------------------------------------------------------------
@dataclass
class ZeroShotResult:
    """``logits`` (n_images, n_classes) = 100·cos(image, class); ``class_names`` in column order."""

    logits: torch.Tensor
    class_names: list[str]

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    @property
    def indices(self) -> list[int]:
        return self.logits.argmax(dim=1).tolist()

    @property
    def predictions(self) -> list[str]:
        return [self.class_names[i] for i in self.indices]

    def topk(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the k best classes with their probabilities."""
        p = self.probs
        v, i = p.topk(min(k, p.shape[1]), dim=1)
        return [[(self.class_names[c], float(s)) for s, c in zip(vs, cs, strict=True)] for vs, cs in zip(v.tolist(), i.tolist(), strict=True)]


def check_templates(templates) -> list[str]:
    """Zero-shot prompt templates (default ``a photo of a {c}.``): each must contain ``{c}`` and no other field."""
    from .data import check_templates as check

    if isinstance(templates, str):
        templates = [templates]
    return check(list(templates) if templates else list(DEFAULT_TEMPLATES))


class AlignedModel:
    """Two frozen encoders, the layer of each that was aligned, and the two trained heads.

    Build it with :meth:`from_run` (a run folder after ``structure-ops train``) or :meth:`from_pretrained`
    (a folder written by :meth:`save_pretrained` / ``structure-ops export``).
    """

    def __init__(self, image_encoder: Encoder, text_encoder: Encoder, image_head: torch.nn.Module,
                 text_head: torch.nn.Module, layers: tuple[str, str], *, templates=None, meta: dict | None = None,
                 batch_size: int = 64) -> None:
        for enc, layer, modality in ((image_encoder, layers[0], "image"), (text_encoder, layers[1], "text")):
            if getattr(enc, "modality", None) != modality:
                raise ValueError(f"{modality} encoder expected, got a {getattr(enc, 'modality', '?')} encoder")
            if layer not in enc.layer_names:
                raise ValueError(f"{modality} layer {layer!r} is not a layer of encoder {enc.name!r}: {enc.layer_names}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_head, self.text_head = image_head.eval(), text_head.eval()
        self.layers = (layers[0], layers[1])
        self.templates = check_templates(templates)
        self.meta = dict(meta or {})
        self.batch_size = int(batch_size)
        dev = image_encoder.device
        self.image_head.to(dev)
        self.text_head.to(text_encoder.device)

    @property
    def dim(self) -> int:
        """Width of the shared space."""
        w = self.image_head.weight if hasattr(self.image_head, "weight") else self.image_head.proj.weight
        return int(w.shape[0])

    def __repr__(self) -> str:
        return (f"AlignedModel(image={self.image_encoder.name!r}[{self.layers[0]}], text={self.text_encoder.name!r}"
                f"[{self.layers[1]}], dim={self.dim})")

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run: str | os.PathLike, name: str | None = None, *, device=None, dtype=None,
                 image_encoder: Encoder | None = None, text_encoder: Encoder | None = None, strict: bool = True,
                 batch_size: int = 64) -> AlignedModel:
        """The model trained in run folder ``run`` (training run ``name`` when the folder holds several).

        The encoders are rebuilt from the manifest's descriptions unless given (runs made from precomputed
        features need them given). ``strict``: refuse an encoder whose description changed since extraction.
        """
        from .pipeline import read_manifest

        run = Path(run)
        manifest = read_manifest(run)
        heads_path = find_heads(run, name)
        state, meta = _read_heads(heads_path)
        encs = []
        for given, key in ((image_encoder, "image_encoder"), (text_encoder, "text_encoder")):
            if given is None:
                desc = manifest.get(key)
                if not desc:
                    raise ValueError(f"{run}/manifest.json has no {key} description (precomputed features?); pass "
                                     f"{key}= explicitly")
                given = encoder_from_description(desc, base=run, device=device, dtype=dtype, strict=strict)
            encs.append(given)
        image_head, text_head = _build_heads(state, meta)
        zs = manifest.get("zero_shot") or {}
        info = {"run": str(run.resolve()), "name": meta.get("name") or heads_path.parent.name,
                "heads": str(heads_path.resolve()), "config": meta.get("config"), "best_epoch": meta.get("best_epoch"),
                "dataset": manifest.get("dataset"), "trained_on": meta.get("provenance")}
        return cls(encs[0], encs[1], image_head, text_head, tuple(meta["layers"]), templates=zs.get("templates"),
                   meta=info, batch_size=batch_size)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device=None, dtype=None, strict: bool = True,
                        batch_size: int = 64) -> AlignedModel:
        """A model exported with :meth:`save_pretrained` (or ``structure-ops export``)."""
        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} is not an exported structure-ops model (no {CONFIG_NAME})")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e.msg})") from None
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
        state, meta = _read_heads(folder / HEADS_NAME)
        encs = [encoder_from_description(cfg[k], base=folder, device=device, dtype=dtype, strict=strict)
                for k in ("image_encoder", "text_encoder")]
        image_head, text_head = _build_heads(state, meta)
        return cls(encs[0], encs[1], image_head, text_head, tuple(cfg["layers"]), templates=cfg.get("templates"),
                   meta={**cfg.get("provenance", {}), "folder": str(folder.resolve())}, batch_size=batch_size)

    def save_pretrained(self, folder: str | os.PathLike, *, copy_encoders: bool = True) -> Path:
        """Write a self-contained folder: ``aligned.json`` + ``heads.safetensors`` (+ ``encoders/<modality>/``
        copies of local Hugging Face folders when ``copy_encoders``). Replaces an earlier export in place,
        atomically; refuses a folder that holds anything else."""
        tensors = {f"image.{k}": v for k, v in self.image_head.state_dict().items()}
        tensors.update({f"text.{k}": v for k, v in self.text_head.state_dict().items()})
        head_cfg = self._head_config()
        meta = {"layers": list(self.layers), "config": head_cfg, "d_in": head_cfg["d_in"]}
        descs = {}
        for key, enc in (("image_encoder", self.image_encoder), ("text_encoder", self.text_encoder)):
            d = dict(enc.describe())
            d.setdefault("source", getattr(enc, "source", None) or encoder_source(d))
            descs[key] = d
        provenance = {k: v for k, v in self.meta.items() if k != "folder"}
        return write_export(folder, descs, tensors, meta, self.templates, provenance, copy_encoders=copy_encoders)

    def _head_config(self) -> dict:
        from .heads import MLPHead

        mlp = isinstance(self.image_head, MLPHead)
        d_in = [int((h.proj if isinstance(h, MLPHead) else h).weight.shape[1]) for h in (self.image_head, self.text_head)]
        cfg = {"head": "mlp" if mlp else "linear", "dim": self.dim, "d_in": d_in}
        if mlp:
            cfg["rank"] = int(self.image_head.down.weight.shape[0])
        return cfg

    # -- use ----------------------------------------------------------------------------------------------
    def _features(self, encoder: Encoder, layer: str, inputs: list, batch_size: int | None) -> torch.Tensor:
        i = encoder.layer_names.index(layer)
        bs = int(batch_size or self.batch_size)
        # the same batching and fp32 conversion as extraction (features.extract)
        parts = [encoder.encode(inputs[s : s + bs])[i] for s in range(0, len(inputs), bs)]
        return torch.cat(parts).float().contiguous()

    @staticmethod
    def _embed(head: torch.nn.Module, feats: torch.Tensor, what: str) -> torch.Tensor:
        d = (head.proj if hasattr(head, "proj") else head).weight.shape[1]
        if feats.shape[1] != d:
            raise ValueError(f"{what} features are {feats.shape[1]}-d but the head expects {d}-d: the encoder is not the "
                             "one the heads were trained on")
        dev = next(head.parameters()).device
        with torch.inference_mode():
            out = head(feats.to(dev, torch.float32)).float().cpu()
        return F.normalize(out, dim=1)

    def encode_image(self, images, *, batch_size: int | None = None) -> torch.Tensor:
        """(n, dim) L2-normalized embeddings of images: file paths or PIL images (one, or a list)."""
        if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
            images = [images]
        images = list(images)
        if not images:
            raise ValueError("encode_image: no images")
        paths = [str(im) for im in images if isinstance(im, (str, os.PathLike))]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}")
        bad = [type(im).__name__ for im in images if not isinstance(im, (str, os.PathLike)) and not hasattr(im, "convert")]
        if bad:
            raise TypeError(f"encode_image takes file paths or PIL images, got {sorted(set(bad))}")
        return self._embed(self.image_head, self._features(self.image_encoder, self.layers[0], images, batch_size), "image")

    def encode_text(self, texts, *, batch_size: int | None = None) -> torch.Tensor:
        """(n, dim) L2-normalized embeddings of texts (one string, or a list)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text: no texts")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode_text takes strings, got {sorted(set(bad))}")
        return self._embed(self.text_head, self._features(self.text_encoder, self.layers[1], texts, batch_size), "text")

    def class_embeddings(self, class_names, templates=None) -> torch.Tensor:
        """(C, dim): per class, the mean of its normalized prompt embeddings, renormalized."""
        from .evaluate import class_embeddings

        class_names = [class_names] if isinstance(class_names, str) else list(class_names)
        if not class_names:
            raise ValueError("zero_shot: no class names")
        templates = check_templates(templates if templates is not None else self.templates)
        prompts = [t.format(c=c) for c in class_names for t in templates]  # class-major
        return class_embeddings(self.encode_text(prompts), len(class_names))

    def zero_shot(self, images, class_names, templates=None) -> ZeroShotResult:
        """Zero-shot classification: 100·cos(image, class embedding). ``templates`` default: the run's."""
        cls = self.class_embeddings(class_names, templates)
        img = self.encode_image(images)
        return ZeroShotResult(100.0 * img @ cls.T, [class_names] if isinstance(class_names, str) else list(class_names))


# ---------------------------------------------------------------------------------------------------------
# export
def write_export(folder: str | os.PathLike, encoders: dict[str, dict], tensors: dict, heads_meta: dict,
                 templates, provenance: dict, *, copy_encoders: bool = True) -> Path:
    """Write an exported model folder atomically (see :meth:`AlignedModel.save_pretrained`)."""
    from safetensors.torch import save_file

    from .. import __version__

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"export folder {folder} is a file")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"export folder {folder} is not empty and not an earlier export; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        descs = {}
        for key, desc in encoders.items():
            d = dict(desc)
            src = d.get("source") or encoder_source(d)
            if src not in BUILTIN and Path(src).is_dir():
                if copy_encoders:
                    modality = d.get("modality", key.split("_")[0])
                    shutil.copytree(src, tmp / "encoders" / modality)
                    src = f"encoders/{modality}"
                else:
                    src = str(Path(src).resolve())
            d["source"] = src
            descs[key] = d
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(state, str(tmp / HEADS_NAME), metadata={"structure_ops": json.dumps(heads_meta)})
        cfg = {"format": FORMAT, "structure_ops_version": __version__, "layers": list(heads_meta["layers"]),
               "dim": int(heads_meta["config"]["dim"]), "head": heads_meta["config"], "d_in": heads_meta["d_in"],
               **descs, "templates": check_templates(templates), "provenance": provenance}
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if folder.exists():  # an earlier export: swap it out, then remove it
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / "x")
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_run(run: str | os.PathLike, folder: str | os.PathLike, name: str | None = None, *,
               copy_encoders: bool = True) -> Path:
    """Export the trained model of a run folder without loading its encoders (``structure-ops export``)."""
    from .pipeline import read_manifest

    run = Path(run)
    manifest = read_manifest(run)
    heads_path = find_heads(run, name)
    state, meta = _read_heads(heads_path)
    descs = {}
    for key in ("image_encoder", "text_encoder"):
        desc = manifest.get(key)
        if not desc:
            raise ValueError(f"{run}/manifest.json has no {key} description (precomputed features?): nothing to "
                             "reference; use AlignedModel(...).save_pretrained with your encoders")
        d = dict(desc)
        src = encoder_source(d)
        if src not in BUILTIN and not Path(src).expanduser().is_absolute() and (run / src).is_dir():
            src = str(run / src)
        if src not in BUILTIN and not Path(src).is_dir() and _is_path_like(src):
            raise ValueError(f"{key.split('_')[0]} encoder folder {src} of the run no longer exists")
        d["source"] = src
        descs[key] = d
    zs = manifest.get("zero_shot") or {}
    provenance = {"run": str(run.resolve()), "name": meta.get("name") or heads_path.parent.name,
                  "config": meta.get("config"), "best_epoch": meta.get("best_epoch"), "dataset": manifest.get("dataset"),
                  "trained_on": meta.get("provenance")}
    heads_meta = {"layers": meta["layers"], "config": meta["config"], "d_in": meta["d_in"]}
    return write_export(folder, descs, state, heads_meta, zs.get("templates"), provenance, copy_encoders=copy_encoders)
