"""Per-layer features of a dataset, extracted once and cached on disk.

A cache entry is one safetensors file (one (n, d) fp32 tensor per layer, in layer order) whose header
metadata holds the JSON description: encoder (name, pooling, layers, preprocessing), dataset fingerprint,
n. A human-readable copy of that JSON sits beside it. Both are written atomically (temporary file +
``os.replace``). On load the header and every tensor shape are checked: a mismatch or a truncated file means
the entry is rebuilt (with a warning), never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .encoders import Encoder

FORMAT = "structure-ops-features/1"


class LayerFeatures(dict):
    """``{layer name: (n, d) float32 tensor}`` in layer order, plus ``meta`` (the cache description)."""

    def __init__(self, tensors: dict, meta: dict) -> None:
        super().__init__(tensors)
        self.meta = meta

    @property
    def n(self) -> int:
        return next(iter(self.values())).shape[0]


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=None)  # None: off without a TTY


def extract(encoder: Encoder, inputs: list, batch_size: int = 64, progress: bool = True) -> dict[str, torch.Tensor]:
    """Encode ``inputs`` (captions or images) in batches: {layer name: (n, d) float32}."""
    if not inputs:
        raise ValueError("extract: no inputs")
    chunks: list[list[torch.Tensor]] = []
    batches = range(0, len(inputs), batch_size)
    for s in _progress(batches, len(batches), f"{encoder.modality} features ({encoder.name.split('/')[-1]})", progress):
        chunks.append(encoder.encode(inputs[s : s + batch_size]))
    layers = [torch.cat([c[i] for c in chunks]).float().contiguous() for i in range(len(encoder.layer_names))]
    return dict(zip(encoder.layer_names, layers, strict=True))


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _load_valid(path: Path, description: dict) -> LayerFeatures | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt file: rebuilt by the caller
        warnings.warn(f"feature cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", stacklevel=3)
        return None
    problems = []
    if meta.get("description") != description:
        problems.append("its description differs (encoder, pooling, layers, preprocessing or dataset)")
    layers, n = description["encoder"]["layers"], description["n"]
    if set(tensors) != set(layers):
        problems.append(f"layers {sorted(tensors)} != {sorted(layers)}")
    bad = [k for k, t in tensors.items() if t.dim() != 2 or t.shape[0] != n or t.dtype != torch.float32]
    if bad:
        problems.append(f"tensors {bad} are not ({n}, d) float32")
    if problems:
        warnings.warn(f"feature cache {path} does not match: {'; '.join(problems)}; rebuilding it", stacklevel=3)
        return None
    return LayerFeatures({k: tensors[k] for k in layers}, meta)


def save_features(path: str | os.PathLike, features: dict[str, torch.Tensor], description: dict) -> None:
    """Write features + description atomically (safetensors with the description in its header, JSON beside)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "description": description, "dims": {k: int(v.shape[1]) for k, v in features.items()}}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in features.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"structure_ops": json.dumps(meta)}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def load_features(path: str | os.PathLike, layers: list[str] | None = None) -> LayerFeatures:
    """Load a feature file written by :func:`save_features` (or any safetensors file of (n, d) tensors).

    ``layers``: load only these (safetensors reads tensors one at a time; training needs two of dozens).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            names = meta.get("description", {}).get("encoder", {}).get("layers") or list(f.keys())
            unknown = sorted(set(layers or ()) - set(f.keys()))
            if unknown:
                raise KeyError(f"unknown layers {unknown}; layers: {names}")
            tensors = {k: f.get_tensor(k).float() for k in names if layers is None or k in layers}
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors feature file: {type(e).__name__}: {e}") from None
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if not tensors or any(len(s) != 2 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise ValueError(f"{path}: expected (n, d) tensors with one n, got {shapes}")
    return LayerFeatures(tensors, meta)


def cached_features(encoder: Encoder, inputs: list, dataset_fingerprint: str, cache_dir: str | os.PathLike,
                    *, batch_size: int = 64, progress: bool = True) -> LayerFeatures:
    """Features of ``inputs`` from the cache when a valid entry exists, else extracted and cached."""
    description = {"encoder": encoder.describe(), "dataset": dataset_fingerprint, "n": len(inputs)}
    path = Path(cache_dir) / f"{encoder.modality}-{Path(encoder.name).name}-{cache_key(description)}.safetensors"
    if path.exists():
        cached = _load_valid(path, description)
        if cached is not None:
            cached.meta["path"] = str(path)
            return cached
    feats = extract(encoder, inputs, batch_size, progress)
    save_features(path, feats, description)
    return LayerFeatures(feats, {"format": FORMAT, "description": description, "path": str(path)})
