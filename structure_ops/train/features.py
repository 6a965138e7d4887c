"""Per-layer features of a dataset, extracted once and cached on disk, keyed by content.

A cache entry is one safetensors file (one (n, d) fp32 tensor per layer, in layer order) whose header
metadata holds the JSON description: encoder (name, source, weights hash or hub commit, pooling, layers,
preprocessing, dtype), dataset fingerprint (a hash of the image bytes / caption text), n, the content key and
a digest of the tensors. A human-readable copy of that JSON sits beside it.

* **One shared cache folder**: ``$STRUCTURE_OPS_CACHE/features`` when that environment variable is set, else
  the user cache folder (``~/.cache/structure-ops/features`` on Linux; ``structure-ops cache list|clear``).
* **Keyed by content**: the key is a hash of the encoder's *weights* (file hashes of a local model folder, the
  hub commit of a hub model, the parameters of a torch module), its preprocessing, pooling, layers and dtype,
  and of the data fingerprint, not of the path the model was given by: relative and absolute paths share
  one entry, weights replaced in place get a new one.
* **Resumable**: extraction writes shards of ``shard_size`` inputs into ``<entry>.parts/``; a killed
  extraction keeps its finished shards and a re-run computes only the rest.
* **Checked**: NaN/Inf features are refused when extracted and when loaded; a mismatching or truncated entry
  is rebuilt (with a warning), never silently used. Every file is written atomically (temporary file +
  ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

FORMAT = "structure-ops-features/2"
CACHE_ENV = "STRUCTURE_OPS_CACHE"


class LayerFeatures(dict):
    """``{layer name: (n, d) float32 tensor}`` in layer order, plus ``meta`` (the cache description)."""

    def __init__(self, tensors: dict, meta: dict) -> None:
        super().__init__(tensors)
        self.meta = meta

    @property
    def n(self) -> int:
        return next(iter(self.values())).shape[0]


# ---------------------------------------------------------------------------------------------------------
# files

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


def cache_root() -> Path:
    """The shared cache folder: ``$STRUCTURE_OPS_CACHE``, else the platform's user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # the XDG default (what platformdirs returns on Linux)
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "structure-ops"
    return Path(user_cache_dir("structure-ops", appauthor=False))


def features_dir() -> Path:
    return cache_root() / "features"


# ---------------------------------------------------------------------------------------------------------
# progress: a bar on a terminal, periodic log lines otherwise (logs of batch jobs, CI, `nohup`)

class Progress:
    """``update(k)`` / ``close()``; a tqdm bar when stderr is a terminal, else a log line every 10 % or 60 s."""

    def __init__(self, total: int, desc: str, unit: str = "item", enabled: bool = True, initial: int = 0,
                 every_s: float = 60.0) -> None:
        self.total, self.desc, self.unit, self.done = max(int(total), 1), desc, unit, int(initial)
        self.enabled, self.bar, self.every_s = enabled, None, every_s
        self.t0 = self.last_t = time.perf_counter()
        self.last_decile = self.done * 10 // self.total
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)

    def update(self, k: int = 1, **postfix) -> None:
        self.done += k
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(k)
            if postfix:
                self.bar.set_postfix(**postfix)
            return
        now, decile = time.perf_counter(), self.done * 10 // self.total
        if decile > self.last_decile or now - self.last_t >= self.every_s or self.done >= self.total:
            self.last_decile, self.last_t = decile, now
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            print(f"[{time.strftime('%H:%M:%S')}] {self.desc}: {self.done}/{self.total} {self.unit}s "
                  f"({100 * self.done / self.total:.0f} %){extra}, {now - self.t0:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------
# extraction

def _label(item, i: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"input {i}"


def check_finite(features: dict[str, torch.Tensor], what: str, labels=None) -> None:
    """ValueError naming the layer and the first bad rows when a feature is NaN or ±Inf."""
    for name, t in features.items():
        bad = ~torch.isfinite(t).all(dim=1) if t.dim() == 2 else ~torch.isfinite(t)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            shown = [labels[r] if labels is not None else f"row {r}" for r in rows[:3]]
            raise ValueError(f"{what}: layer {name!r} has NaN/Inf features in {len(rows)} of {t.shape[0]} rows, "
                             f"e.g. {shown} (a broken input, or an encoder that overflows in its dtype: try float32)")


def extract(encoder, inputs: list, batch_size: int = 64, progress: bool = True, *, shard_dir=None,
            shard_size: int = 2048, shard_meta: dict | None = None) -> dict[str, torch.Tensor]:
    """Encode ``inputs`` (captions or images) in batches: {layer name: (n, d) float32}.

    With ``shard_dir``, every ``shard_size`` inputs are written there as one shard file (atomically) and
    shards already there (with the same ``shard_meta``) are reused: an interrupted extraction resumes.
    """
    if not inputs:
        raise ValueError("extract: no inputs")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"extract: batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    n, names = len(inputs), list(encoder.layer_names)
    shard_size = max(shard_size, batch_size) if shard_dir is not None else n
    starts = list(range(0, n, shard_size))
    what = f"{encoder.modality} features ({Path(str(encoder.name)).name})"
    shards: list[dict[str, torch.Tensor] | None] = [None] * len(starts)
    if shard_dir is not None:
        for i, s in enumerate(starts):
            shards[i] = _load_shard(Path(shard_dir) / f"shard-{i:06d}.safetensors", shard_meta, s, min(s + shard_size, n), names)
    done = sum(min(s + shard_size, n) - s for s, sh in zip(starts, shards, strict=True) if sh is not None)
    bar = Progress(n, what, "input", progress, initial=done)
    if done and progress:
        print(f"{what}: resuming, {done} of {n} inputs already extracted", file=sys.stderr)
    for i, s in enumerate(starts):
        if shards[i] is not None:
            continue
        e = min(s + shard_size, n)
        chunks = []
        for b in range(s, e, batch_size):
            batch = inputs[b : min(b + batch_size, e)]
            out = encoder.encode(batch)
            feats = dict(zip(names, [t.float() for t in out], strict=True))
            check_finite(feats, what, [_label(x, b + j) for j, x in enumerate(batch)])
            chunks.append(feats)
            bar.update(len(batch))
        shard = {k: torch.cat([c[k] for c in chunks]).contiguous() for k in names}
        if shard_dir is not None:
            _save_shard(Path(shard_dir) / f"shard-{i:06d}.safetensors", shard, {**(shard_meta or {}), "start": s, "stop": e})
        shards[i] = shard
    bar.close()
    return {k: torch.cat([sh[k] for sh in shards]).contiguous() for k in names}


def _save_shard(path: Path, shard: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(shard, tmp, metadata={"structure_ops": json.dumps(meta)}))


def _load_shard(path: Path, meta: dict | None, start: int, stop: int, names: list[str]):
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            got = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    if got != {**(meta or {}), "start": start, "stop": stop} or set(tensors) != set(names):
        return None
    if any(t.dim() != 2 or t.shape[0] != stop - start or not torch.isfinite(t).all() for t in tensors.values()):
        return None
    return {k: tensors[k] for k in names}


# ---------------------------------------------------------------------------------------------------------
# the content key and the cache entries

def content_identity(encoder_description: dict) -> dict:
    """What determines an encoder's features: its description without the path it was loaded from
    (and without its display name once the weights themselves are hashed)."""
    drop = {"source"} | ({"name"} if encoder_description.get("weights") else set())
    return {k: v for k, v in encoder_description.items() if k not in drop}


def cache_key(description: dict) -> str:
    """A hash of a cache description, with the encoder reduced to its :func:`content_identity`."""
    d = dict(description)
    if isinstance(d.get("encoder"), dict):
        d["encoder"] = content_identity(d["encoder"])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def tensor_digest(features: dict[str, torch.Tensor]) -> str:
    """sha256 over the layer names, shapes and fp32 bytes of the tensors, in order."""
    h = hashlib.sha256()
    for k, v in features.items():
        t = v.detach().float().contiguous().cpu()
        h.update(f"{k}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON header of a feature file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            meta.setdefault("layers", list(f.keys()))
            return meta
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors feature file: {type(e).__name__}: {e}") from None


def feature_id(path: str | os.PathLike) -> dict:
    """How a run, a checkpoint or a head file refers to a feature file: its content key and tensor digest
    (read from its header) and its size."""
    meta = read_meta(path)
    return {"key": meta.get("key"), "digest": meta.get("digest"), "bytes": os.path.getsize(path)}


def _load_valid(path: Path, description: dict, key: str) -> LayerFeatures | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("structure_ops", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or corrupt file: rebuilt by the caller
        warnings.warn(f"feature cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", stacklevel=3)
        return None
    problems = []
    if meta.get("key") != key:
        problems.append("its content key differs (encoder weights, pooling, layers, preprocessing or dataset)")
    layers, n = description["encoder"]["layers"], description["n"]
    if set(tensors) != set(layers):
        problems.append(f"layers {sorted(tensors)} != {sorted(layers)}")
    bad = [k for k, t in tensors.items() if t.dim() != 2 or t.shape[0] != n or t.dtype != torch.float32]
    if bad:
        problems.append(f"tensors {bad} are not ({n}, d) float32")
    elif not problems and meta.get("digest") != tensor_digest({k: tensors[k] for k in layers}):
        problems.append("its tensors do not match the digest in its header")
    if problems:
        warnings.warn(f"feature cache {path} does not match: {'; '.join(problems)}; rebuilding it", stacklevel=3)
        return None
    return LayerFeatures({k: tensors[k] for k in layers}, meta)


def save_features(path: str | os.PathLike, features: dict[str, torch.Tensor], description: dict) -> dict:
    """Write features + description atomically (safetensors with the description in its header, JSON
    beside); returns the header (with ``key`` and ``digest``)."""
    from safetensors.torch import save_file

    path = Path(path)
    check_finite(features, str(path))
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in features.items()}
    meta = {"format": FORMAT, "description": description, "key": cache_key(description),
            "digest": tensor_digest(tensors), "dims": {k: int(v.shape[1]) for k, v in tensors.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"structure_ops": json.dumps(meta)}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return meta


def load_features(path: str | os.PathLike, layers: list[str] | None = None) -> LayerFeatures:
    """Load a feature file written by :func:`save_features` (or any safetensors file of (n, d) tensors).

    ``layers``: load only these (safetensors reads tensors one at a time; training needs two of dozens).
    NaN/Inf features are refused.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}" + (
            " (the shared feature cache was cleared or moved? re-run `structure-ops extract`)" if path.parent.name == "features" else ""))
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
        raise ValueError(f"{path} is not a readable safetensors feature file (truncated?): {type(e).__name__}: {e}") from None
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if not tensors or any(len(s) != 2 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise ValueError(f"{path}: expected (n, d) tensors with one n, got {shapes}")
    check_finite(tensors, str(path))
    meta["path"] = str(path)
    return LayerFeatures(tensors, meta)


def _entry_name(modality: str, name: str, key: str) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(str(name)).name)[:60]
    return f"{modality}-{stem}-{key}.safetensors"


def cached_features(encoder, inputs: list, dataset_fingerprint: str, cache_dir: str | os.PathLike | None = None,
                    *, batch_size: int = 64, progress: bool = True, shard_size: int = 2048) -> LayerFeatures:
    """Features of ``inputs`` from the cache when a valid entry exists, else extracted (in resumable shards)
    and cached. ``cache_dir`` defaults to the shared cache (:func:`features_dir`)."""
    description = {"encoder": encoder.describe(), "dataset": dataset_fingerprint, "n": len(inputs)}
    key = cache_key(description)
    cache_dir = Path(cache_dir) if cache_dir is not None else features_dir()
    path = cache_dir / _entry_name(encoder.modality, encoder.name, key)
    if path.exists():
        cached = _load_valid(path, description, key)
        if cached is not None:
            cached.meta["path"] = str(path)
            return cached
    parts = path.with_suffix(".parts")
    feats = extract(encoder, inputs, batch_size, progress, shard_dir=parts, shard_size=shard_size,
                    shard_meta={"key": key})
    meta = save_features(path, feats, description)
    shutil.rmtree(parts, ignore_errors=True)
    return LayerFeatures(feats, {**meta, "path": str(path)})


# ---------------------------------------------------------------------------------------------------------
# `structure-ops cache list|clear`

def list_cache(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One record per cache entry (complete files and unfinished ``.parts`` folders), oldest first."""
    root = Path(cache_dir) if cache_dir is not None else features_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.glob("*.safetensors")):
        try:
            meta = read_meta(p)
            d = meta.get("description", {})
            enc = d.get("encoder", {})
            out.append({"path": str(p), "bytes": p.stat().st_size, "modality": enc.get("modality"),
                        "encoder": enc.get("name"), "n": d.get("n"), "layers": len(meta.get("layers") or []),
                        "created": meta.get("created"), "complete": True})
        except ValueError:
            out.append({"path": str(p), "bytes": p.stat().st_size, "complete": False, "encoder": "(unreadable)"})
    for p in sorted(root.glob("*.parts")):
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        out.append({"path": str(p), "bytes": size, "complete": False, "encoder": "(unfinished extraction)",
                    "shards": len(list(p.glob("shard-*.safetensors")))})
    return sorted(out, key=lambda r: os.path.getmtime(r["path"]))


def clear_cache(cache_dir: str | os.PathLike | None = None) -> tuple[int, int]:
    """Remove every feature-cache entry; (entries removed, bytes freed)."""
    entries = list_cache(cache_dir)
    for r in entries:
        p = Path(r["path"])
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
    return len(entries), sum(r["bytes"] for r in entries)
