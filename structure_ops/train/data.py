"""Datasets of the training layer: image–caption pairs, class-labelled image folders, the embedded demo data.

An image is a path or a PIL image; a :class:`Pairs` holds the images, their captions and, per caption, the
index of its image (several captions may share one image: retrieval counts a hit on any of them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IMAGE_COLUMNS = ("image", "image_path", "file", "filename", "path")
_CAPTION_COLUMNS = ("caption", "text", "sentence")


@dataclass
class Pairs:
    """Paired data: ``images[image_of[j]]`` is the image of ``captions[j]``. ``labels`` per image, optional."""

    images: list
    captions: list[str]
    image_of: list[int]
    labels: list[int] | None = None
    class_names: list[str] | None = None
    name: str = "pairs"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.image_of):
            raise ValueError(f"captions ({len(self.captions)}) and image_of ({len(self.image_of)}) differ in length")
        if self.image_of and not 0 <= min(self.image_of) <= max(self.image_of) < len(self.images):
            raise ValueError(f"image_of must index the {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, caption_rows) -> Pairs:
        """The pairs of the given caption rows (images renumbered, order kept)."""
        rows = list(caption_rows)
        keep = sorted({self.image_of[j] for j in rows})
        new = {old: i for i, old in enumerate(keep)}
        return Pairs(
            images=[self.images[i] for i in keep],
            captions=[self.captions[j] for j in rows],
            image_of=[new[self.image_of[j]] for j in rows],
            labels=None if self.labels is None else [self.labels[i] for i in keep],
            class_names=self.class_names,
            name=self.name,
        )


def _pick_column(found: list[str], wanted: tuple[str, ...], what: str, path) -> str:
    lower = {c.lower().strip(): c for c in found}
    for w in wanted:
        if w in lower:
            return lower[w]
    raise ValueError(f"{path}: no {what} column; expected one of {list(wanted)}, found columns {found}")


def load_captions(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Pairs:
    """Read a captions file: CSV (header row) or JSONL, one (image path, caption) per row.

    Image paths are relative to ``image_root`` (default: the file's folder). Rows with the same image share it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root is not a folder: {root}")
    if path.suffix.lower() in (".jsonl", ".json"):
        records = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        columns = sorted({k for r in records for k in r}) if records else []
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            records, columns = list(reader), list(reader.fieldnames or [])
    if not records:
        raise ValueError(f"{path}: no rows")
    icol = _pick_column(columns, _IMAGE_COLUMNS, "image", path)
    ccol = _pick_column(columns, _CAPTION_COLUMNS, "caption", path)
    images, index, captions, image_of, missing = [], {}, [], [], []
    for n, r in enumerate(records, 1):
        rel, cap = r.get(icol), r.get(ccol)
        if not rel or not isinstance(cap, str) or not cap.strip():
            raise ValueError(f"{path}: row {n} lacks an image path or a caption: {r}")
        full = (root / str(rel)).resolve()
        if full not in index:
            if not full.is_file():
                missing.append(str(full))
            index[full] = len(images)
            images.append(str(full))
        captions.append(cap.strip())
        image_of.append(index[full])
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {path} not found, e.g. {missing[:3]}")
    return Pairs(images, captions, image_of, name=path.stem)


def load_image_folder(root: str | os.PathLike, class_names: str | os.PathLike | None = None
                      ) -> tuple[list[str], list[int], list[str]]:
    """A class-labelled folder ``root/<class name>/<image>``: (paths, labels, class names; sorted by folder).

    ``class_names``: a file mapping the folder names to class names (see :func:`load_class_names`); without it
    a folder's name is its class name (underscores read as spaces).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    if class_names is not None:
        return paths, labels, load_class_names(class_names, classes)
    return paths, labels, [c.replace("_", " ") for c in classes]


def fingerprint(items) -> str:
    """A content hash of images (paths: file bytes; PIL images: pixels) or strings, in order."""
    h = hashlib.sha256()
    for it in items:
        if isinstance(it, str) and os.path.isfile(it):
            h.update(Path(it).read_bytes())
        elif isinstance(it, str):
            h.update(it.encode())
        else:  # a PIL image
            buf = io.BytesIO()
            buf.write(repr((it.mode, it.size)).encode())
            buf.write(it.tobytes())
            h.update(buf.getvalue())
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The embedded demo data: scikit-learn's handwritten digits, captioned from their labels.

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten digit {name}.",
    "the number {numeral}, written by hand.",
    "a {stroke} handwritten {name}.",
    "a small, blurry scan of the digit {name}.",
    "a {stroke} {numeral} drawn with a pen.",
    "a {size} image of the number {name}.",
    "someone wrote the digit {numeral} in {stroke} strokes.",
    "a low-resolution picture of a {name}.",
]
# Zero-shot prompts are deliberately not the training templates.
ZERO_SHOT_TEMPLATES = ["a photo of the number {c}.", "a drawing of the digit {c}.", "{c}"]


def _digit_caption(rng: np.random.Generator, label: int, pixels: np.ndarray, ink_cuts, size_cuts) -> str:
    ink, extent = pixels.sum(), (pixels > 4).sum()
    stroke = ["thin", "regular", "bold"][int(np.searchsorted(ink_cuts, ink))]
    size = ["small", "medium-sized", "large"][int(np.searchsorted(size_cuts, extent))]
    t = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
    return t.format(name=DIGIT_NAMES[label], numeral=label, stroke=stroke, size=size)


def digits_pairs(limit: int | None = None, image_size: int = 64, seed: int = 0) -> Pairs:
    """scikit-learn's 1 797 handwritten digits (8×8, 10 classes) as RGB images with generated captions.

    Each caption names the digit in one of several templates and describes the stroke weight and the size of
    the figure (terciles of ink mass and extent), so a caption says more than the class.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    if limit is not None:
        order = order[:limit]
    data, target = d.images, d.target
    ink_cuts = np.quantile(data.reshape(len(data), -1).sum(1), [1 / 3, 2 / 3])
    size_cuts = np.quantile((data > 4).reshape(len(data), -1).sum(1), [1 / 3, 2 / 3])
    rng = np.random.default_rng(seed + 1)
    images, captions, labels = [], [], []
    for i in order:
        gray = (255 - data[i] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        images.append(Image.fromarray(gray, "L").resize((image_size, image_size), Image.BILINEAR).convert("RGB"))
        captions.append(_digit_caption(rng, int(target[i]), data[i], ink_cuts, size_cuts))
        labels.append(int(target[i]))
    return Pairs(images, captions, list(range(len(images))), labels, DIGIT_NAMES, name="sklearn-digits")


# ---------------------------------------------------------------------------------------------------------
# Checks that run before any extraction.

def check_image(path) -> str | None:
    """None when ``path`` decodes as an image, else the reason (missing, not an image, truncated, ...).

    Decodes the whole file (JPEGs at reduced scale, which still reads every byte), so a truncated file is
    caught here rather than hours into an extraction.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums (PNG CRCs)
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: DCT-domain downscale, every byte still decoded
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except FileNotFoundError:
        return "file not found"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_images(images, progress: bool = False) -> list[tuple[str, str]]:
    """``[(path, reason)]`` of the images (paths) that cannot be decoded; PIL images are taken as they are."""
    from .features import Progress

    bad = []
    paths = [im for im in images if isinstance(im, (str, os.PathLike))]
    bar = Progress(len(paths), "checking images", "image", progress and len(paths) > 1000)
    for p in paths:
        reason = check_image(p)
        if reason is not None:
            bad.append((str(p), reason))
        bar.update(1)
    bar.close()
    return bad


def without_images(pairs: Pairs, bad_paths) -> Pairs:
    """``pairs`` without the given images and their captions."""
    bad = {str(p) for p in bad_paths}
    rows = [j for j, i in enumerate(pairs.image_of) if str(pairs.images[i]) not in bad]
    if not rows:
        raise ValueError("no pairs left after leaving out the unreadable images")
    out = pairs.subset(rows)
    out.extra = dict(pairs.extra)
    return out


def check_templates(templates) -> list[str]:
    """Zero-shot prompt templates: each must use ``{c}`` (the class name) and no other field."""
    import string

    templates = list(templates or [])
    if not templates:
        raise ValueError("--template: no templates given")
    for t in templates:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as e:
            raise ValueError(f"--template {t!r} is not a valid format string ({e}); write the class as {{c}}") from None
        unknown = sorted({f for f in fields if f != "c"})
        if unknown:
            raise ValueError(f"--template {t!r} has unknown field(s) {unknown}: only {{c}} (the class name) is filled in")
        if "c" not in fields:
            raise ValueError(f"--template {t!r} does not contain {{c}} (where the class name goes), e.g. 'a photo of a {{c}}.'")
    return templates


def load_class_names(path: str | os.PathLike, folders: list[str]) -> list[str]:
    """Class names for the class folders ``folders`` (sorted folder names) from a text file, either

    * a mapping, one ``<folder><TAB or space><class name>`` per line (ImageNet's ``n01440764 tench`` form;
      every folder must appear), or
    * one class name per line, in the sorted order of the folders (as many lines as folders).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--class-names file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"--class-names {path}: no names")
    known = set(folders)
    split = [ln.split("\t", 1) if "\t" in ln else ln.split(None, 1) for ln in lines]
    if all(len(s) == 2 and s[0] in known for s in split):
        mapping = {s[0]: s[1].strip() for s in split}
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ValueError(f"--class-names {path} maps {len(mapping)} folders but not {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''} ({len(missing)} missing)")
        return [mapping[f] for f in folders]
    if len(lines) != len(folders):
        raise ValueError(f"--class-names {path} has {len(lines)} names for {len(folders)} class folders (expected one "
                         f"name per folder in sorted order, or lines '<folder> <name>', e.g. '{folders[0]} <name>')")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Karpathy's split files (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json).

KARPATHY_PROTOCOLS = ("karpathy", "val2014")


def load_karpathy(path: str | os.PathLike, image_root: str | os.PathLike, protocol: str = "karpathy",
                  val: float = 0.1, seed: int = 0) -> tuple[Pairs, dict[str, list[int]]]:
    """Read one of Karpathy's split files: ``{"images": [{"filepath", "filename", "split", "sentences":
    [{"raw"}, ...]}, ...]}``; the image is ``image_root/filepath/filename`` (``filepath`` absent, as in the
    Flickr30k file: ``image_root/filename``). Every caption is kept, in file order.

    Returns the pairs and the splits (caption rows, as :func:`structure_ops.train.pipeline.split_by_image`):

    * ``protocol="karpathy"`` (the standard one): train = ``train`` + ``restval``, val = ``val``, test =
      ``test`` (COCO: 113 287 / 5 000 / 5 000 images; Flickr30k: 29 000 / 1 014 / 1 000).
    * ``protocol="val2014"`` (COCO only; the STRUCTURE paper's public code): test = every image of
      ``val2014`` (40 504), train = the ``train2014`` images less ``val`` of them (a fraction < 1 or a count;
      seeded) held out for validation.
    """
    if protocol not in KARPATHY_PROTOCOLS:
        raise ValueError(f"--protocol must be one of {KARPATHY_PROTOCOLS}, got {protocol!r}")
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"--karpathy file not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"--images is not a folder: {root}")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--karpathy {path} is not valid JSON ({e})") from None
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--karpathy {path}: expected an object with a non-empty 'images' list (Karpathy's "
                         "dataset_coco.json / dataset_flickr30k.json format)")
    images, captions, image_of, split_of, folder_of, missing = [], [], [], [], [], []
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("filename") or e.get("split") not in ("train", "restval", "val", "test"):
            raise ValueError(f"--karpathy {path}: image {n} lacks a filename or a split in train|restval|val|test: "
                             f"{str(e)[:200]}")
        sents = [s.get("raw") if isinstance(s, dict) else None for s in e.get("sentences") or []]
        if not sents or not all(isinstance(s, str) and s.strip() for s in sents):
            raise ValueError(f"--karpathy {path}: image {n} ({e['filename']}) has no sentences or one without 'raw'")
        full = (root / str(e.get("filepath") or "") / str(e["filename"])).resolve()
        if not full.is_file():
            missing.append(str(full))
        for s in sents:
            captions.append(s.strip())
            image_of.append(len(images))
        images.append(str(full))
        split_of.append(e["split"])
        folder_of.append(str(e.get("filepath") or ""))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of {path} not found under {root}, e.g. {missing[:3]}")
    if protocol == "karpathy":
        part = ["train" if s == "restval" else s for s in split_of]
    else:
        folders = set(folder_of)
        if not {"train2014", "val2014"} <= folders:
            raise ValueError(f"--protocol val2014 needs COCO's train2014 and val2014 images (filepath), found "
                             f"{sorted(folders)[:5]}")
        part = ["test" if f == "val2014" else "train" if f == "train2014" else None for f in folder_of]
        train = [i for i, p in enumerate(part) if p == "train"]
        n_val = int(round(val * len(train))) if val < 1 else int(val)
        if not 2 <= n_val <= len(train) - 2:
            raise ValueError(f"--val {n_val}: cannot hold out that many of the {len(train)} train2014 images")
        perm = np.random.default_rng(seed).permutation(len(train))[:n_val]
        for i in perm:
            part[train[i]] = "val"
    splits = {"train": [], "val": [], "test": []}
    for j, i in enumerate(image_of):
        if part[i] is not None:
            splits[part[i]].append(j)
    for s, rows in splits.items():
        if len({image_of[j] for j in rows}) < 2:
            raise ValueError(f"--karpathy {path}: the {s} split has fewer than 2 images (protocol {protocol})")
    name = path.stem.removeprefix("dataset_") or path.stem
    return Pairs(images, captions, image_of, name=name, extra={"protocol": protocol}), splits


def splits_without_images(pairs: Pairs, splits: dict[str, list[int]], bad_paths) -> tuple[Pairs, dict[str, list[int]]]:
    """:func:`without_images` for pairs with given splits: the splits renumbered to the remaining caption rows."""
    out = without_images(pairs, bad_paths)
    bad = {str(p) for p in bad_paths}
    new_row, n = {}, 0
    for j, i in enumerate(pairs.image_of):
        if str(pairs.images[i]) not in bad:
            new_row[j] = n
            n += 1
    return out, {s: [new_row[j] for j in rows if j in new_row] for s, rows in splits.items()}
