"""The zero-shot classification suite: 26 datasets read from their standard local layouts, one table.

The dataset list and its order are ``evaluation.zero_shot_datasets`` of the default configuration of the
STRUCTURE authors' code; the class names and prompt templates are CLIP's published ones (``zero_shot_suite.json``
beside this file; docs/evaluation.md names the sources). Per dataset:

* class embedding = mean over the class's prompts (every template × every name of the class) of the normalized
  aligned text embeddings, renormalized; logits = 100·cos(image, class) (docs/spec.md §5);
* top-1, top-5 (only with more than 5 classes) and mean-per-class recall (top-1 recall of each class present in
  the test split, averaged) on the test split;
* optionally a linear probe (:func:`structure_ops.train.probe.linear_probe`) fitted on the aligned image
  embeddings of the train split, scored on the test split.

A dataset is found under ``ROOT`` as a class-folder tree ``ROOT/<dir>/<split>/<class>/<image>`` (``<dir>``: the
dataset's key or one of its usual folder names; test split ``test``, else ``val``/``valid``/``val_images``;
train split ``train``/``trainval``/``train_images``, plus ``val``/``valid`` when the test split is ``test``) or in
the on-disk format torchvision reads offline (CIFAR pickles, MNIST idx, STL-10 binaries, Food-101, DTD,
Flowers-102, GTSRB, EuroSAT, Caltech-101, Oxford-IIIT Pets, SUN397, FGVC-Aircraft, FER2013 CSV); anything else
is reported as absent. Everything is indexed (file lists, labels) before any image is encoded, so a malformed
dataset stops the run at once with one line naming it.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_FILE = Path(__file__).with_name("zero_shot_suite.json")
FORMAT = "structure-ops-suite/1"
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_SPLITS = ("test", "val", "valid", "val_images")
TRAIN_SPLITS = ("train", "trainval", "train_images")
SIMPLE_TEMPLATE = "a photo of a {c}."

# Folder names a dataset is looked up under (beside its key): the names of its downloads and of the folders
# the STRUCTURE authors' preparation scripts write.
DIRS = {
    "caltech101": ("caltech-101",), "food101": ("food-101",), "cifar10": ("cifar-10",), "cifar100": ("cifar-100",),
    "kinetics700": ("k700",), "sun397": ("SUN397",), "sst": ("sst2", "rendered-sst2"), "kitti": ("Kitti",),
    "clevr": ("CLEVR_v1.0",), "cars": ("stanford_cars",), "aircraft": ("fgvc-aircraft",), "pets": ("oxford-iiit-pet",),
    "flowers": ("flowers102", "flowers-102"),
}


@functools.lru_cache(maxsize=1)
def suite_data() -> dict:
    """The class names / templates file: ``{"order": [...26 keys], "datasets": {key: {name, classes, templates,
    [folders]}}}``."""
    return json.loads(DATA_FILE.read_text())


def suite_keys() -> list[str]:
    return list(suite_data()["order"])


# ---------------------------------------------------------------------------------------------------------
# images and splits
class ArrayImages:
    """Images held as a uint8 array (n, h, w) or (n, h, w, 3), as read from a binary format; indexing with a
    slice or an index list gives PIL images."""

    def __init__(self, array: np.ndarray) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] != 3):
            raise ValueError(f"image array must be uint8 (n, h, w) or (n, h, w, 3), got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, rows):
        from PIL import Image

        if isinstance(rows, (int, np.integer)):
            return Image.fromarray(self.array[rows])
        return [Image.fromarray(a) for a in self.array[rows]]

    def take(self, rows) -> ArrayImages:
        return ArrayImages(self.array[np.asarray(rows)])


@dataclass
class Split:
    """``images`` (a list of file paths or an :class:`ArrayImages`) and their integer ``labels``."""

    images: object
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows) -> Split:
        rows = np.asarray(rows, dtype=np.int64)
        imgs = self.images.take(rows) if isinstance(self.images, ArrayImages) else [self.images[i] for i in rows]
        return Split(imgs, self.labels[rows])

    def limit(self, n: int | None, seed: int = 0) -> Split:
        """At most ``n`` rows: a seeded random subset, in the original order (all rows when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.take(rows)

    def batch(self, start: int, stop: int) -> list:
        return self.images[start:stop] if isinstance(self.images, ArrayImages) else list(self.images[start:stop])


@dataclass
class SuiteDataset:
    """One dataset of the suite as found on disk. ``train`` is indexed on first use (a linear probe needs it;
    zero-shot does not)."""

    key: str
    name: str
    classes: list  # per class a name, or a list of names (all are prompted and averaged)
    templates: list[str]
    test: Split
    layout: str  # how it was found, e.g. "class folders (train / test)" or "CIFAR-10 pickles"
    path: str
    train_fn: Callable[[], Split | None] | None = field(default=None, repr=False)

    @functools.cached_property
    def train(self) -> Split | None:
        split = self.train_fn() if self.train_fn is not None else None
        if split is not None:
            _check_labels(self.name, self.path, "train", split, len(self.classes))
        return split


Found = tuple  # (train thunk, test split, layout, path)


# ---------------------------------------------------------------------------------------------------------
# class folders
def _norm(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def _words(name: str) -> str:
    return " ".join(sorted(_norm(name).split()))


def _class_names(spec: dict) -> list[list[str]]:
    return [[c] if isinstance(c, str) else list(c) for c in spec["classes"]]


def folder_labels(key: str, folders: list[str], where: str) -> list[int]:
    """The class index of each class folder name of dataset ``key``, by the first rule that covers every folder:
    the dataset's known folder names (``folders`` in the data file), the class names (case, ``_`` and ``-``
    ignored; any name of a class with several; then in any word order), integers 0…C−1, and, when there is one folder per class, the
    sorted folder order (what torchvision's ImageFolder and the authors' code use)."""
    spec = suite_data()["datasets"][key]
    n = len(spec["classes"])
    if spec.get("folders"):
        known = {_norm(f): i for i, f in enumerate(spec["folders"])}
        if all(_norm(f) in known for f in folders):
            return [known[_norm(f)] for f in folders]
    for norm in (_norm, _words):  # the names as written, then as word multisets ("AM General Hummer SUV 2000")
        by_name: dict[str, set[int]] = {}
        for i, names in enumerate(_class_names(spec)):
            for nm in names:
                by_name.setdefault(norm(nm), set()).add(i)
        if all(len(by_name.get(norm(f), ())) == 1 for f in folders):
            return [next(iter(by_name[norm(f)])) for f in folders]
    if all(f.isdigit() and int(f) < n for f in folders):
        return [int(f) for f in folders]
    if len(folders) == n:
        order = {f: i for i, f in enumerate(sorted(folders))}
        return [order[f] for f in folders]
    raise ValueError(f"{spec['name']} at {where}: {len(folders)} class folders (e.g. {', '.join(sorted(folders)[:3])}) "
                     f"match neither its {n} class names nor 0…{n - 1}, and are not one folder per class")


def _images_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def read_class_folders(key: str, split_dirs: list[Path]) -> Split:
    """One split from one or more ``<split>/<class>/<images>`` folders (their images concatenated)."""
    paths, labels = [], []
    for d in split_dirs:
        folders = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not folders:
            raise ValueError(f"{d}: expected one sub-folder per class, found none")
        for f, lab in zip(folders, folder_labels(key, folders, str(d)), strict=True):
            files = _images_under(d / f)
            paths += files
            labels += [lab] * len(files)
    if not paths:
        raise ValueError(f"{', '.join(map(str, split_dirs))}: no images ({', '.join(SUFFIXES)}) in the class folders")
    return Split(paths, np.asarray(labels))


def _has_class_dirs(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() for p in d.iterdir())


def find_class_folder_tree(key: str, base: Path) -> Found | None:
    """A tree ``base/{train,test}/<class>/...`` (see the module docstring for the split names), or None."""
    test_name = next((s for s in TEST_SPLITS if _has_class_dirs(base / s)), None)
    if test_name is None:
        return None
    train_names = [s for s in TRAIN_SPLITS if _has_class_dirs(base / s)][:1]
    if train_names and test_name == "test":  # the authors' code trains on train + val where a test split exists
        train_names += [s for s in ("val", "valid") if _has_class_dirs(base / s)]
    test = read_class_folders(key, [base / test_name])
    train_dirs = [base / s for s in train_names]
    return ((lambda: read_class_folders(key, train_dirs)) if train_dirs else None, test,
            f"class folders ({'+'.join(train_names) or 'no train'} / {test_name})", base)


# ---------------------------------------------------------------------------------------------------------
# torchvision's on-disk formats, read without torchvision
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists and numpy arrays) and refuses any other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR batch file ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR batch file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_split(files: list[Path], label_key: str) -> Split | None:
    if not all(p.is_file() for p in files):
        return None
    data, labels = [], []
    for p in files:
        d = _unpickle(p)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{p}: a CIFAR batch needs 'data' and '{label_key}', found {sorted(d)}")
        x = np.asarray(d["data"], dtype=np.uint8)
        y = np.asarray(d[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise ValueError(f"{p}: 'data' must be (n, 3072) uint8 (32×32 RGB, channel-major) with n labels, got "
                             f"{x.shape} and {len(y)} labels")
        data.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return Split(ArrayImages(np.ascontiguousarray(np.concatenate(data))), np.concatenate(labels))


def read_cifar10(base: Path) -> Found | None:
    d = base / "cifar-10-batches-py"
    if not (d / "test_batch").is_file():
        return None
    train = [d / f"data_batch_{i}" for i in range(1, 6)]
    return (lambda: _cifar_split(train, "labels")), _cifar_split([d / "test_batch"], "labels"), "CIFAR-10 pickles", d


def read_cifar100(base: Path) -> Found | None:
    d = base / "cifar-100-python"
    if not (d / "test").is_file():
        return None
    return ((lambda: _cifar_split([d / "train"], "fine_labels")), _cifar_split([d / "test"], "fine_labels"),
            "CIFAR-100 pickles", d)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format; ``.gz`` too): magic 0x0000 <type> <ndim>, big-endian int32 sizes, data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(x) for x in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    need = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != need:
        raise ValueError(f"{path}: IDX header says {dims} ({need} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(d: Path, stem: str) -> Path | None:
    return next((p for p in (d / stem, d / f"{stem}.gz") if p.is_file()), None)


def _mnist_split(d: Path, prefix: str) -> Split | None:
    i, la = _idx_file(d, f"{prefix}-images-idx3-ubyte"), _idx_file(d, f"{prefix}-labels-idx1-ubyte")
    if i is None or la is None:
        return None
    x, y = read_idx(i), read_idx(la)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{i}: expected (n, h, w) images and (n,) labels, got {x.shape} and {y.shape}")
    return Split(ArrayImages(np.ascontiguousarray(x)), y)


def read_mnist(base: Path) -> Found | None:
    for d in (base / "MNIST" / "raw", base / "raw"):
        if _idx_file(d, "t10k-images-idx3-ubyte") and _idx_file(d, "t10k-labels-idx1-ubyte"):
            return functools.partial(_mnist_split, d, "train"), _mnist_split(d, "t10k"), "MNIST idx", d
    return None


def _stl_split(d: Path, s: str) -> Split | None:
    xf, yf = d / f"{s}_X.bin", d / f"{s}_y.bin"
    if not (xf.is_file() and yf.is_file()):
        return None
    x = np.fromfile(xf, dtype=np.uint8)
    y = np.fromfile(yf, dtype=np.uint8).astype(np.int64) - 1  # labels 1…10 on disk
    if x.size % (3 * 96 * 96) or x.size // (3 * 96 * 96) != y.size:
        raise ValueError(f"{xf}: {x.size} bytes are not {y.size} images of 3×96×96 (per {yf.name})")
    # each image is stored channel by channel, column-major: [n, c, col, row] → [n, row, col, c]
    return Split(ArrayImages(np.ascontiguousarray(x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))), y)


def read_stl10(base: Path) -> Found | None:
    d = base / "stl10_binary"
    if not (d / "test_X.bin").is_file():
        return None
    test = _stl_split(d, "test")
    if test is None:
        raise ValueError(f"{d}: test_X.bin without test_y.bin")
    return (lambda: _stl_split(d, "train")), test, "STL-10 binaries", d


def _listed(key: str, image_root: Path, entries: list[str], classes_of: list[str], where: str) -> Split:
    """Images ``image_root/<entry>`` whose class folder names are ``classes_of`` (one per entry)."""
    names = sorted(set(classes_of))
    labels = dict(zip(names, folder_labels(key, names, where), strict=True))
    paths = [str(image_root / e) for e in entries]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{where}: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
    return Split(paths, np.asarray([labels[c] for c in classes_of]))


def _food_split(d: Path, s: str) -> Split | None:
    f = d / "meta" / f"{s}.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())  # {class: ["class/image_id", ...]}
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e.msg})") from None
    entries = [e for c in sorted(meta) for e in meta[c]]
    return _listed("food101", d / "images", [e + ".jpg" for e in entries], [e.split("/")[0] for e in entries], str(f))


def read_food101(base: Path) -> Found | None:
    d = base / "food-101"
    if not (d / "meta" / "test.json").is_file():
        return None
    return (lambda: _food_split(d, "train")), _food_split(d, "test"), "Food-101 (meta/*.json)", d


def _dtd_split(d: Path, names: list[str]) -> Split | None:
    entries = [ln.strip() for n in names if (d / "labels" / n).is_file()
               for ln in (d / "labels" / n).read_text().splitlines() if ln.strip()]
    return _listed("dtd", d / "images", entries, [e.split("/")[0] for e in entries], str(d / "labels")) if entries else None


def read_dtd(base: Path) -> Found | None:
    for d in (base / "dtd" / "dtd", base / "dtd"):
        if (d / "labels" / "test1.txt").is_file() and (d / "images").is_dir():
            # partition 1; train + val, as the authors' code
            return functools.partial(_dtd_split, d, ["train1.txt", "val1.txt"]), _dtd_split(d, ["test1.txt"]), "DTD (labels/*1.txt)", d
    return None


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"{path}: reading .mat files needs scipy (pip install scipy)") from None
    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable .mat file ({type(e).__name__}: {e})") from None


def _flowers_split(d: Path, keys: list[str]) -> Split:
    labels = np.atleast_1d(_loadmat(d / "imagelabels.mat")["labels"]).astype(np.int64) - 1
    ids = _loadmat(d / "setid.mat")
    missing_keys = [k for k in keys if k not in ids]
    if missing_keys:
        raise ValueError(f"{d / 'setid.mat'}: no {', '.join(missing_keys)} (expected trnid, valid, tstid)")
    rows = np.concatenate([np.atleast_1d(ids[k]).astype(np.int64) for k in keys])  # image ids, 1-based
    if rows.min() < 1 or rows.max() > len(labels):
        raise ValueError(f"{d / 'setid.mat'}: image ids {rows.min()}…{rows.max()} outside the {len(labels)} labels")
    paths = [str(d / "jpg" / f"image_{i:05d}.jpg") for i in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{d}: {len(missing)} image(s) of setid.mat not found, e.g. {missing[0]}")
    return Split(paths, labels[rows - 1])


def read_flowers(base: Path) -> Found | None:
    d = base / "flowers-102"
    if not (d / "setid.mat").is_file():
        return None
    # train + val, as the authors' code
    return (lambda: _flowers_split(d, ["trnid", "valid"])), _flowers_split(d, ["tstid"]), "Flowers-102 (setid.mat)", d


def read_gtsrb(base: Path) -> Found | None:
    d = base / "gtsrb"
    test_csv, test_dir = d / "GT-final_test.csv", d / "GTSRB" / "Final_Test" / "Images"
    if not (test_csv.is_file() and test_dir.is_dir()):
        return None
    with open(test_csv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise ValueError(f"{test_csv}: expected ';'-separated columns Filename … ClassId")
    paths = [str(test_dir / r["Filename"]) for r in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{test_csv}: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
    try:
        test = Split(paths, np.asarray([int(r["ClassId"]) for r in rows]))
    except ValueError:
        raise ValueError(f"{test_csv}: ClassId must be an integer") from None
    tr = d / "GTSRB" / "Training"
    return ((lambda: read_class_folders("gtsrb", [tr])) if _has_class_dirs(tr) else None, test,
            "GTSRB (Training/ + GT-final_test.csv)", d)


def _paper_split(split: Split, n_train: int, n_total: int | None) -> tuple[Split, Split]:
    """The authors' per-class split: for each class (in label order), ``np.random.seed(42)`` then
    ``np.random.choice(rows, size, replace=False)``, i.e. the first ``size`` rows of a seed-42 permutation. EuroSAT
    (``n_total`` 1500): the first 1000 train, the next 500 test. Caltech-101 (``n_total`` None): 30 train, every
    other row test. A class smaller than that (where their code stops) keeps ⅔ (EuroSAT) or all but one row
    (Caltech-101) for training."""
    train, test = [], []
    for c in np.unique(split.labels):
        rows = np.flatnonzero(split.labels == c)
        perm = rows[np.random.RandomState(42).permutation(len(rows))]
        if n_total is None:
            k = min(n_train, len(rows) - 1)
            train.append(perm[:k])
            test.append(perm[k:])
        else:
            size = min(n_total, len(rows))
            k = n_train if size == n_total else size * 2 // 3
            train.append(perm[:k])
            test.append(perm[k:size])
    return split.take(np.sort(np.concatenate(train))), split.take(np.sort(np.concatenate(test)))


def _same(x):
    return x


def read_eurosat(base: Path) -> Found | None:
    for d in (base / "eurosat" / "2750", base / "eurosat" / "EuroSAT_RGB", base / "2750"):
        if _has_class_dirs(d):
            train, test = _paper_split(read_class_folders("eurosat", [d]), 1000, 1500)  # per class 1000 / 500
            return functools.partial(_same, train), test, "EuroSAT (2750/<class>, the authors' 1000/500 per-class split)", d
    return None


def read_caltech101(base: Path) -> Found | None:
    for d in (base / "caltech-101" / "101_ObjectCategories", base / "caltech101" / "101_ObjectCategories",
              base / "101_ObjectCategories"):
        if _has_class_dirs(d):
            train, test = _paper_split(read_class_folders("caltech101", [d]), 30, None)  # per class 30 / the rest
            return functools.partial(_same, train), test, "Caltech-101 (101_ObjectCategories, the authors' 30-per-class split)", d
    return None


def _pets_split(d: Path, s: str) -> Split | None:
    f = d / "annotations" / f"{s}.txt"
    if not f.is_file():
        return None
    ids = [ln.split()[0] for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return _listed("pets", d / "images", [i + ".jpg" for i in ids], [i.rsplit("_", 1)[0] for i in ids], str(f))


def read_pets(base: Path) -> Found | None:
    d = base / "oxford-iiit-pet"
    if not (d / "annotations" / "test.txt").is_file():
        return None
    return (lambda: _pets_split(d, "trainval")), _pets_split(d, "test"), "Oxford-IIIT Pets (annotations/*.txt)", d


def _sun_split(d: Path, f: Path, index: dict[str, int]) -> Split | None:
    if not f.is_file():
        return None
    entries = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]  # /a/abbey/sun_x.jpg
    paths = [str(d / e.lstrip("/")) for e in entries]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{f}: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
    try:
        labels = [index[e.rsplit("/", 1)[0]] for e in entries]
    except KeyError as e:
        raise ValueError(f"{f}: class {e.args[0]} is not in ClassName.txt") from None
    return Split(paths, np.asarray(labels))


def read_sun397(base: Path) -> Found | None:
    for d in (base / "SUN397", base / "sun397"):
        if (d / "ClassName.txt").is_file() and (d / "Testing_01.txt").is_file():
            names = [ln.strip() for ln in (d / "ClassName.txt").read_text().splitlines() if ln.strip()]
            n = len(suite_data()["datasets"]["sun397"]["classes"])
            if len(names) != n:
                raise ValueError(f"{d / 'ClassName.txt'}: {len(names)} classes, SUN397 has {n}")
            index = {c: i for i, c in enumerate(names)}
            return (functools.partial(_sun_split, d, d / "Training_01.txt", index), _sun_split(d, d / "Testing_01.txt", index),
                    "SUN397 (partition 1)", d)
    return None


def _aircraft_split(d: Path, s: str, index: dict[str, int]) -> Split | None:
    f = d / f"images_variant_{s}.txt"
    if not f.is_file():
        return None
    rows = [ln.strip().split(" ", 1) for ln in f.read_text().splitlines() if ln.strip()]
    try:
        labels = [index[r[1].strip()] for r in rows]
    except (KeyError, IndexError):
        raise ValueError(f"{f}: lines must be '<image id> <variant>' with a variant of variants.txt") from None
    paths = [str(d / "images" / f"{r[0]}.jpg") for r in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{f}: {len(missing)} listed image(s) not found, e.g. {missing[0]}")
    return Split(paths, np.asarray(labels))


def read_aircraft(base: Path) -> Found | None:
    for d in (base / "fgvc-aircraft-2013b" / "data", base / "aircraft" / "fgvc-aircraft-2013b" / "data"):
        if (d / "images_variant_test.txt").is_file():
            n = len(suite_data()["datasets"]["aircraft"]["classes"])
            vf = d / "variants.txt"
            variants = [v.strip() for v in vf.read_text().splitlines() if v.strip()] if vf.is_file() else []
            if len(variants) != n:
                raise ValueError(f"{vf}: expected the {n} variants of FGVC-Aircraft, one per line, found {len(variants)}")
            index = {v: i for i, v in enumerate(variants)}
            return (functools.partial(_aircraft_split, d, "trainval", index), _aircraft_split(d, "test", index),
                    "FGVC-Aircraft (images_variant_*.txt)", d)
    return None


def _fer_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "pixels" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with a 'pixels' column (FER2013)")
    return rows


def _fer_split(rows: list[dict], where: str) -> Split | None:
    if not rows:
        return None
    if any(str(r.get("emotion", "")).strip() == "" for r in rows):
        raise ValueError(f"{where}: rows without an 'emotion' label")
    try:
        pix = [np.asarray(r["pixels"].split(), dtype=np.int64) for r in rows]
        emo = [int(r["emotion"]) for r in rows]
    except ValueError:
        raise ValueError(f"{where}: 'pixels' must be space-separated integers and 'emotion' an integer") from None
    if any(len(p) != 48 * 48 for p in pix) or any(p.min() < 0 or p.max() > 255 for p in pix):
        raise ValueError(f"{where}: 'pixels' must be 2304 values 0…255 (48×48) per row")
    x = np.stack(pix).astype(np.uint8).reshape(-1, 48, 48)
    return Split(ArrayImages(np.ascontiguousarray(x)), np.asarray(emo))


def read_fer2013(base: Path) -> Found | None:
    d = base / "fer2013"
    if (d / "fer2013.csv").is_file():  # the Kaggle file: a Usage column (Training / PublicTest / PrivateTest)
        f = d / "fer2013.csv"
        rows = _fer_rows(f)
        test = _fer_split([r for r in rows if r.get("Usage") in ("PublicTest", "PrivateTest")], str(f))
        if test is None:
            raise ValueError(f"{f}: no PublicTest / PrivateTest rows in its 'Usage' column")
        return (lambda: _fer_split([r for r in rows if r.get("Usage") == "Training"], str(f))), test, "FER2013 (fer2013.csv)", d
    if (d / "test.csv").is_file():
        test = _fer_split(_fer_rows(d / "test.csv"), str(d / "test.csv"))
        if test is None:
            raise ValueError(f"{d / 'test.csv'}: no rows")
        train_fn = (lambda: _fer_split(_fer_rows(d / "train.csv"), str(d / "train.csv"))) if (d / "train.csv").is_file() else None
        return train_fn, test, "FER2013 (train.csv / test.csv)", d
    return None


NATIVE = {"cifar10": read_cifar10, "cifar100": read_cifar100, "mnist": read_mnist, "stl10": read_stl10,
          "food101": read_food101, "dtd": read_dtd, "flowers": read_flowers, "gtsrb": read_gtsrb,
          "eurosat": read_eurosat, "caltech101": read_caltech101, "pets": read_pets, "sun397": read_sun397,
          "aircraft": read_aircraft, "fer2013": read_fer2013}


def _check_labels(name: str, path: str, split_name: str, s: Split, n: int) -> None:
    if len(s) == 0:
        raise ValueError(f"{name} at {path}: empty {split_name} split")
    lo, hi = int(s.labels.min()), int(s.labels.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{name} at {path}: {split_name} labels span {lo}…{hi}, outside the {n} classes 0…{n - 1}")


def find_dataset(root: str | Path, key: str) -> SuiteDataset | None:
    """Dataset ``key`` under ``root``: a class-folder tree first, then its torchvision format; None if absent.
    A dataset that is there but malformed raises ValueError (one line naming it). The train split is indexed on
    first use of ``.train``."""
    data = suite_data()["datasets"]
    if key not in data:
        raise ValueError(f"unknown suite dataset {key!r}; the suite has {', '.join(suite_keys())}")
    spec, root = data[key], Path(root)
    found = None
    for name in (key, *DIRS.get(key, ())):
        if (root / name).is_dir():
            found = find_class_folder_tree(key, root / name)
            if found is not None:
                break
    if found is None and key in NATIVE:
        found = NATIVE[key](root)
        if found is None and (root / key).is_dir():
            found = NATIVE[key](root / key)
    if found is None:
        return None
    train_fn, test, layout, path = found
    if test is None:
        raise ValueError(f"{spec['name']} at {path}: no test split")
    _check_labels(spec["name"], str(path), "test", test, len(spec["classes"]))
    return SuiteDataset(key, spec["name"], list(spec["classes"]), list(spec["templates"]), test, layout, str(path), train_fn)


# ---------------------------------------------------------------------------------------------------------
# evaluation
def class_embeddings(model, classes: list, templates: list[str]) -> torch.Tensor:
    """(C, dim): per class, the mean of the normalized aligned embeddings of all its prompts (each template with
    each of its names), renormalized; with one name per class this is ``evaluate.class_embeddings``."""
    names = [[c] if isinstance(c, str) else list(c) for c in classes]
    prompts, owner = [], []
    for i, ns in enumerate(names):
        for nm in ns:
            for t in templates:
                prompts.append(t.format(c=nm))
                owner.append(i)
    emb = F.normalize(model.encode_text(prompts).float(), dim=1)
    owner_t = torch.as_tensor(owner)
    out = torch.zeros(len(names), emb.shape[1], dtype=emb.dtype).index_add_(0, owner_t, emb)
    return F.normalize(out / torch.bincount(owner_t, minlength=len(names))[:, None].to(emb.dtype), dim=1)


def embed_split(model, split: Split, *, batch_size: int = 64, desc: str = "images", progress: bool = True) -> torch.Tensor:
    """(n, dim) aligned, L2-normalized embeddings of a split's images, in chunks (a progress line per chunk)."""
    from .features import Progress

    bar = Progress(len(split), desc, unit="image", enabled=progress)
    parts, chunk = [], max(1, batch_size) * 8
    try:
        for s in range(0, len(split), chunk):
            batch = split.batch(s, s + chunk)
            parts.append(model.encode_image(batch, batch_size=batch_size).float())
            bar.update(len(batch))
    finally:
        bar.close()
    out = torch.cat(parts)
    if not torch.isfinite(out).all():
        raise ValueError(f"{desc}: the model gave NaN/Inf image embeddings")
    return out


def discover(root: str | Path, keys: list[str] | None = None, *, with_train: bool = False
             ) -> tuple[list[SuiteDataset], list[str]]:
    """(the datasets of ``keys`` (default: all 26) found under ``root``, in suite order; the keys absent).
    ``with_train``: index the train splits now too (a linear probe needs them), so a malformed one fails here."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--suite {root}: not a folder")
    keys = suite_keys() if keys is None else list(keys)
    unknown = [k for k in keys if k not in suite_data()["datasets"]]
    if unknown:
        raise ValueError(f"--datasets: unknown dataset(s) {', '.join(unknown)}; the suite has {', '.join(suite_keys())}")
    found, absent = [], []
    for k in keys:
        ds = find_dataset(root, k)
        if ds is not None and with_train:
            _ = ds.train
        (found if ds is not None else absent).append(ds if ds is not None else k)
    return found, absent


def evaluate_suite(model, root: str | Path, *, datasets: list[str] | None = None, linear_probe: bool = False,
                   limit: int | None = None, prompts: str = "dataset", batch_size: int = 64, seed: int = 0,
                   progress: bool = True, on_dataset=None, discovered=None) -> dict:
    """Zero-shot top-1 / top-5 / mean-per-class recall (and a linear probe) on every suite dataset under ``root``.

    ``model``: an :class:`~structure_ops.train.AlignedModel` (anything with ``encode_image`` / ``encode_text``).
    ``limit``: at most this many images per split (a seeded subset; for quick looks, not comparable to papers).
    ``prompts``: ``dataset`` (CLIP's templates of each dataset) or ``simple`` (``a photo of a {c}.`` only).
    ``on_dataset(index, total, row)`` is called after each dataset. ``discovered``: the result of
    :func:`discover` when the caller has it already. Returns the table as a dict (see :func:`write_table`).
    """
    from .evaluate import zero_shot

    if prompts not in ("dataset", "simple"):
        raise ValueError(f"--prompts must be 'dataset' or 'simple', got {prompts!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    found, absent = discovered if discovered is not None else discover(root, datasets, with_train=linear_probe)
    if not found:
        raise ValueError(f"--suite {root}: none of the {len(absent)} datasets is there ({', '.join(absent[:6])}"
                         f"{' …' if len(absent) > 6 else ''}); expected e.g. {root}/cifar10/test/<class>/<image> or "
                         f"{root}/cifar-10-batches-py (see docs/evaluation.md)")
    if linear_probe:
        from .probe import linear_probe as probe_fn
    rows = []
    for i, ds in enumerate(found, 1):
        t0 = time.perf_counter()
        test = ds.test.limit(limit, seed)
        templates = [SIMPLE_TEMPLATE] if prompts == "simple" else ds.templates
        cls = class_embeddings(model, ds.classes, templates)
        img = embed_split(model, test, batch_size=batch_size, desc=f"{ds.key} test", progress=progress)
        m = zero_shot(img, cls.to(img.device), torch.as_tensor(test.labels), topk=(1, 5), mean_per_class=True)
        row = {"dataset": ds.key, "name": ds.name, "n_classes": len(ds.classes), "n_test": len(test),
               "n_templates": len(templates), "layout": ds.layout, "path": ds.path,
               "top1": m["top1"], "top5": m.get("top5"), "mean_per_class": m["mean_per_class"],
               "chance_top1": 1.0 / len(ds.classes)}
        if limit is not None and len(test) < len(ds.test):
            row["limited_from"] = len(ds.test)
        if linear_probe:
            if ds.train is None:
                row["probe"] = None
                row["probe_note"] = "no train split"
            else:
                train = ds.train.limit(limit, seed)
                tx = embed_split(model, train, batch_size=batch_size, desc=f"{ds.key} train", progress=progress)
                try:
                    p = probe_fn(tx, torch.as_tensor(train.labels), img, torch.as_tensor(test.labels), seed=seed)
                except ValueError as e:  # e.g. test classes absent from train
                    row["probe"], row["probe_note"] = None, str(e)
                else:
                    row["probe"] = {k: p[k] for k in ("top1", "top5", "mean_per_class", "C", "n_train") if k in p}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if on_dataset is not None:
            on_dataset(i, len(found), row)
    return summarize(rows, absent, root=str(Path(root).resolve()), prompts=prompts, limit=limit,
                     linear_probe=linear_probe, model=repr(model), model_meta=getattr(model, "meta", None))


def summarize(rows: list[dict], absent: list[str], **info) -> dict:
    """The table: rows, the datasets absent, and means over the evaluated datasets (top-5 over those with one)."""
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return (sum(vals) / len(vals), len(vals)) if vals else (None, 0)

    means = {}
    for k in ("top1", "top5", "mean_per_class"):
        means[k], means[f"n_{k}"] = mean(r.get(k) for r in rows)
    if info.get("linear_probe"):
        for k in ("top1", "mean_per_class"):
            means[f"probe_{k}"], means[f"n_probe_{k}"] = mean((r.get("probe") or {}).get(k) for r in rows)
    from .. import __version__

    return {"format": FORMAT, "structure_ops_version": __version__, **info, "datasets": rows, "absent": list(absent),
            "mean": means, "n_evaluated": len(rows), "suite": suite_keys(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def markdown_table(res: dict) -> str:
    probe = bool(res.get("linear_probe"))
    head = ["Dataset", "Classes", "Test images", "Top-1", "Top-5", "Mean per class"]
    if probe:
        head += ["Probe top-1", "Probe mean per class"]
    head.append("Layout")
    lines = [f"# Zero-shot suite ({res['n_evaluated']} of {len(res['suite'])} datasets)", "",
             f"Model: `{res.get('model')}`; data: `{res.get('root')}`; prompts: {res.get('prompts')}"
             + (f"; at most {res['limit']} images per split (a seeded subset: not comparable to published numbers)"
                if res.get("limit") else "") + ". Accuracies in %; top-5 only with more than 5 classes.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" if i in (0, len(head) - 1) else "---:" for i in range(len(head))) + "|"]
    for r in res["datasets"]:
        cells = [r["name"], str(r["n_classes"]), str(r["n_test"]), _pct(r["top1"]), _pct(r["top5"]), _pct(r["mean_per_class"])]
        if probe:
            p = r.get("probe") or {}
            cells += [_pct(p.get("top1")), _pct(p.get("mean_per_class"))]
        cells.append(r["layout"])
        lines.append("| " + " | ".join(cells) + " |")
    m = res["mean"]
    cells = [f"**Mean** ({m['n_top1']})", "", "", _pct(m["top1"]), _pct(m["top5"]) + (f" ({m['n_top5']})" if m["top5"] is not None else ""),
             _pct(m["mean_per_class"])]
    if probe:
        cells += [_pct(m.get("probe_top1")), _pct(m.get("probe_mean_per_class"))]
    cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{r['name']}: linear probe skipped ({r['probe_note']})" for r in res["datasets"] if r.get("probe_note")]
    if res["absent"]:
        names = suite_data()["datasets"]
        notes.append("Absent: " + ", ".join(names[k]["name"] for k in res["absent"]) + ".")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_table(res: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``out_dir/suite.json`` and ``out_dir/suite.md``, each written atomically."""
    from .features import atomic_write_text

    out_dir = Path(out_dir)
    js, md = out_dir / "suite.json", out_dir / "suite.md"
    atomic_write_text(js, json.dumps(res, indent=1, allow_nan=False) + "\n")
    atomic_write_text(md, markdown_table(res))
    return js, md

