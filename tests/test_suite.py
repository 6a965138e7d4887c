"""The zero-shot suite (structure_ops.train.suite, ``structure-ops evaluate --suite``).

Fixtures are written in the real on-disk formats: CIFAR-10/100 pickles, MNIST idx (one gzipped), STL-10 binaries
(column-major, written by explicit loops), EuroSAT's 2750/<class> folder, class-folder trees. The zero-shot
checks use a fake model whose embeddings give a known ranking per image (the image's red value r ranks class r
first, then r+1, … mod C), so top-1 / top-5 / mean-per-class are counted here by brute force from (label, r)
alone. The CLI test runs a tiny random exported model and recomputes its top-1 with plain loops.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from structure_ops.train import suite as S
from structure_ops.train.data import check_templates

# class counts of the 26 datasets, as their papers / downloads define them
SIZES = {"stl10": 10, "caltech101": 102, "food101": 101, "cifar10": 10, "cifar100": 100, "imagenet": 1000,
         "ucf101": 101, "kinetics700": 700, "sun397": 397, "eurosat": 10, "resisc45": 45, "mnist": 10, "dtd": 47,
         "gtsrb": 43, "hatefulmemes": 2, "sst": 2, "kitti": 4, "country211": 211, "fer2013": 7, "clevr": 8, "pcam": 2,
         "birdsnap": 500, "cars": 196, "aircraft": 100, "pets": 37, "flowers": 102}
# evaluation.zero_shot_datasets of the authors' configs/default.yaml, in its order
AUTHORS_ORDER = ["stl10", "caltech101", "food101", "cifar10", "cifar100", "imagenet", "ucf101", "kinetics700", "sun397",
                 "eurosat", "resisc45", "mnist", "dtd", "gtsrb", "hatefulmemes", "sst", "kitti", "country211", "fer2013",
                 "clevr", "pcam", "birdsnap", "cars", "aircraft", "pets", "flowers"]


# ---------------------------------------------------------------------------------------------------------
# fixture writers (the real formats)
def write_cifar10(root, train, test):
    """``train`` / ``test``: (uint8 (n, 32, 32, 3) images, labels). Pickles as in the download: bytes keys,
    'data' (n, 3072) channel-major, 'labels' a list; the train set split over data_batch_1…5."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)

    def dump(path, x, y):
        flat = np.stack([np.concatenate([im[:, :, c].reshape(-1) for c in range(3)]) for im in x]).astype(np.uint8)
        with open(path, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": [int(v) for v in y], b"data": flat,
                         b"filenames": [b"f%d.png" % i for i in range(len(y))]}, f, protocol=2)

    parts = np.array_split(np.arange(len(train[1])), 5)
    for i, rows in enumerate(parts, 1):
        dump(d / f"data_batch_{i}", train[0][rows], train[1][rows])
    dump(d / "test_batch", *test)
    return d


def write_idx(path, array: np.ndarray, gz: bool = False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", s) for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_stl10_split(d, name, images: np.ndarray, labels: np.ndarray):
    """STL-10's binaries: per image, channel by channel, each channel column by column; labels 1…10."""
    out = bytearray()
    for im in images:
        for c in range(3):
            for col in range(96):
                for row in range(96):
                    out.append(int(im[row, col, c]))
    (d / f"{name}_X.bin").write_bytes(bytes(out))
    (d / f"{name}_y.bin").write_bytes(bytes(int(v) + 1 for v in labels))


def red_images(reds, size=32) -> np.ndarray:
    """uint8 (n, size, size, 3): image i is flat with red = reds[i] (other channels vary, to catch channel mix-ups)."""
    x = np.zeros((len(reds), size, size, 3), dtype=np.uint8)
    for i, r in enumerate(reds):
        x[i, :, :, 0] = r
        x[i, :, :, 1] = (7 * i + 3) % 256
        x[i, :, :, 2] = 200
    return x


def save_png(path, red: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(red_images([red], size=8)[0]).save(path)


# ---------------------------------------------------------------------------------------------------------
class FakeModel:
    """Text: a prompt of dataset k's class c → one-hot c. Image with red value r → Σ_j 0.5^j · e_{(r+j) mod C},
    C the number of classes of the dataset whose prompts were encoded last: the ranking is r, r+1, … mod C."""

    meta = {"name": "fake"}

    def __init__(self, keys, extra_templates=(S.SIMPLE_TEMPLATE,)):
        self.tables = {}
        for k in keys:
            spec = S.suite_data()["datasets"][k]
            table = {}
            for i, c in enumerate(spec["classes"]):
                for name in [c] if isinstance(c, str) else c:
                    for t in [*spec["templates"], *extra_templates]:
                        p = t.format(c=name)
                        assert table.get(p, i) == i, f"prompt {p!r} names two classes of {k}"
                        table[p] = i
            self.tables[k] = (table, len(spec["classes"]))
        self.dim = max([c for _, c in self.tables.values()], default=1)
        self.C = None
        self.images_seen = 0
        self.text_calls = []

    def encode_text(self, texts, batch_size=None):
        owners = [k for k, (t, _) in self.tables.items() if all(p in t for p in texts)]
        assert len(owners) == 1, owners
        table, self.C = self.tables[owners[0]]
        self.text_calls.append((owners[0], len(texts)))
        out = torch.zeros(len(texts), self.dim)
        for i, p in enumerate(texts):
            out[i, table[p]] = 1.0
        return out

    def encode_image(self, images, batch_size=None):
        out = torch.zeros(len(images), self.dim, dtype=torch.float64)
        for i, im in enumerate(images):
            im = Image.open(im) if isinstance(im, str) else im
            r = im.convert("RGB").getpixel((0, 0))[0]
            for j in range(self.C):
                out[i, (r + j) % self.C] = 0.5**j
        self.images_seen += len(images)
        return F.normalize(out, dim=1).float()


def brute_force(labels, reds, n_classes):
    """top-1 / top-5 / mean-per-class recall of the ranking r, r+1, … mod C, counted image by image."""
    hit1 = [int(y == r % n_classes) for y, r in zip(labels, reds, strict=True)]
    hit5 = [int(any((r + j) % n_classes == y for j in range(5))) for y, r in zip(labels, reds, strict=True)]
    per_class = {}
    for y, h in zip(labels, hit1, strict=True):
        per_class.setdefault(y, []).append(h)
    return {"top1": sum(hit1) / len(hit1), "top5": sum(hit5) / len(hit5) if n_classes > 5 else None,
            "mean_per_class": sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)}


# ---------------------------------------------------------------------------------------------------------
def test_data_file():
    data = S.suite_data()
    assert data["order"] == AUTHORS_ORDER == S.suite_keys()
    for k in AUTHORS_ORDER:
        spec = data["datasets"][k]
        assert len(spec["classes"]) == SIZES[k], k
        assert check_templates(spec["templates"]) == spec["templates"]
        if "folders" in spec:
            assert len(set(spec["folders"])) == len(spec["classes"])
    # spot checks against CLIP's published lists (independent of the file's order of keys)
    assert data["datasets"]["cifar10"]["classes"][:3] == ["airplane", "automobile", "bird"]
    assert data["datasets"]["stl10"]["classes"][7] == "monkey"
    assert len(data["datasets"]["imagenet"]["templates"]) == 80
    assert data["datasets"]["fer2013"]["classes"][3] == ["happy", "smiling"]


def test_binary_formats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    # CIFAR-10 pickles
    tr = (rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 10))
    te = (rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([3, 1, 4, 1]))
    write_cifar10(tmp_path, tr, te)
    ds = S.find_dataset(tmp_path, "cifar10")
    assert ds.layout == "CIFAR-10 pickles"
    assert np.array_equal(ds.test.images.array, te[0]) and ds.test.labels.tolist() == [3, 1, 4, 1]
    assert np.array_equal(ds.train.images.array, tr[0]) and ds.train.labels.tolist() == tr[1].tolist()
    # CIFAR-100: one train and one test file, fine labels
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", 6), ("test", 3)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n}, f, protocol=2)
    ds = S.find_dataset(tmp_path / "c100", "cifar100")
    assert ds.test.labels.tolist() == [90, 91, 92] and len(ds.train) == 6
    # MNIST idx under MNIST/raw (test images gzipped)
    raw = tmp_path / "m" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", x, gz=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([9, 8, 7, 6, 5]))
    ds = S.find_dataset(tmp_path / "m", "mnist")
    assert np.array_equal(ds.test.images.array, x) and ds.test.labels.tolist() == [9, 8, 7, 6, 5]
    assert ds.train is None  # no train files
    assert ds.test.images[0].size == (28, 28)
    # STL-10 binaries
    d = tmp_path / "s" / "stl10_binary"
    d.mkdir(parents=True)
    imgs = rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    write_stl10_split(d, "test", imgs, np.array([0, 9]))
    ds = S.find_dataset(tmp_path / "s", "stl10")
    assert np.array_equal(ds.test.images.array, imgs) and ds.test.labels.tolist() == [0, 9]
    assert np.array_equal(np.asarray(ds.test.images[1]), imgs[1])


def test_bad_binary_files(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR batch file"):
        S.find_dataset(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            import os

            return (os.getcwd, ())

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        S.find_dataset(tmp_path, "cifar10")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 4, 4)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1]))  # says 5 labels, has 1
    with pytest.raises(ValueError, match="IDX header says"):
        S.find_dataset(tmp_path, "mnist")


def test_class_folder_rules(tmp_path):
    # pets: a subset of the breeds, matched by name (case and '_' ignored), train + val merged since test exists
    for split, names in (("train", ["Abyssinian", "american_bulldog"]), ("val", ["Bengal"]),
                         ("test", ["Abyssinian", "american_bulldog", "Bengal"])):
        for n in names:
            save_png(tmp_path / "pets" / split / n / "a.png", 0)
    ds = S.find_dataset(tmp_path, "pets")
    classes = S.suite_data()["datasets"]["pets"]["classes"]
    assert [classes[i] for i in ds.test.labels] == ["Abyssinian", "Bengal", "american bulldog"]  # folders sorted
    assert sorted(classes[i] for i in ds.train.labels) == ["Abyssinian", "Bengal", "american bulldog"]
    assert ds.layout == "class folders (train+val / test)"
    # hateful memes: folders 0 / 1 are class indices; KITTI: the distance-bin folders; CLEVR: count folders
    for f in ("0", "1"):
        save_png(tmp_path / "hatefulmemes" / "test" / f / "a.png", 0)
    assert S.find_dataset(tmp_path, "hatefulmemes").test.labels.tolist() == [0, 1]
    for f in ("above_20", "below_20", "below_8", "no_vehicle"):
        save_png(tmp_path / "Kitti" / "val" / f / "a.png", 0)
    ds = S.find_dataset(tmp_path, "kitti")
    kitti = S.suite_data()["datasets"]["kitti"]["classes"]
    assert [kitti[i] for i in ds.test.labels] == ["a photo i took with a car in the distance.", "a photo i took with a car nearby.",
                                                  "a photo i took of a car on my left or right side.", "a photo i took with no car."]
    assert ds.train is None
    for f in ("10", "3"):
        save_png(tmp_path / "clevr" / "test" / f / "a.png", 0)
    clevr = S.suite_data()["datasets"]["clevr"]["classes"]
    assert [clevr[i] for i in S.find_dataset(tmp_path, "clevr").test.labels] == ["10", "3"]
    # Stanford Cars folders with the words in another order (the year first); CLIP's names have it last
    for f in ("2000 AM General Hummer SUV", "2012 smart fortwo Convertible"):
        save_png(tmp_path / "cars" / "test" / f / "a.png", 0)
    cars = S.suite_data()["datasets"]["cars"]["classes"]
    assert [cars[i] for i in S.find_dataset(tmp_path, "cars").test.labels] == ["AM General Hummer SUV 2000",
                                                                                 "smart fortwo Convertible 2012"]
    # folders that match nothing and are not one per class: one line naming the dataset
    save_png(tmp_path / "dtd" / "test" / "weird" / "a.png", 0)
    with pytest.raises(ValueError, match=r"DTD at .*1 class folders \(e\.g\. weird\)"):
        S.find_dataset(tmp_path, "dtd")
    # one folder per class with other names: sorted order (torchvision ImageFolder), as GTSRB's 00000…00042
    for i in range(43):
        save_png(tmp_path / "gtsrb" / "test" / f"{i:05d}" / "a.png", 0)
    assert S.find_dataset(tmp_path, "gtsrb").test.labels.tolist() == list(range(43))
    assert S.find_dataset(tmp_path, "mnist") is None


def test_eurosat_split(tmp_path):
    """EuroSAT's download layout (2750/<CamelCase class>), with the authors' per-class seed-42 split."""
    folders = S.suite_data()["datasets"]["eurosat"]["folders"]
    for f in folders[:3]:
        for i in range(6):
            save_png(tmp_path / "eurosat" / "2750" / f / f"{f}_{i}.png", 0)
    ds = S.find_dataset(tmp_path, "eurosat")
    classes = S.suite_data()["datasets"]["eurosat"]["classes"]
    assert sorted({classes[i] for i in ds.test.labels}) == sorted(classes[:3])  # forest, permanent crop, residential
    for c in range(3):  # 6 images of a class (< 1500): 4 train, 2 test, disjoint, from a seed-42 permutation
        tr = [p for p, y in zip(ds.train.images, ds.train.labels, strict=True) if y == c]
        te = [p for p, y in zip(ds.test.images, ds.test.labels, strict=True) if y == c]
        assert len(tr) == 4 and len(te) == 2 and not set(tr) & set(te)
        files = sorted(p for p in ds.train.images + ds.test.images if f"/{folders[c]}/" in p)
        perm = np.random.RandomState(42).permutation(6)
        assert sorted(tr) == sorted(files[i] for i in perm[:4])


def test_zero_shot_known_confusion(tmp_path):
    rng = np.random.default_rng(1)
    # CIFAR-10 test set: labels and intended rank-1 classes r chosen so every case occurs (r = y, y within the
    # top 5 but not first, y outside the top 5), with unbalanced classes
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 9, 9, 5, 7])
    reds = np.array([0, 1, 9, 1, 6, 8, 3, 0, 1, 2, 9, 7, 5, 4])
    write_cifar10(tmp_path, (red_images(rng.integers(0, 10, 10)), rng.integers(0, 10, 10)), (red_images(reds), labels))
    # hateful memes (2 classes: no top-5) as class folders
    hm = [(0, 0), (0, 1), (1, 1), (1, 1), (1, 0)]
    for i, (y, r) in enumerate(hm):
        save_png(tmp_path / "hatefulmemes" / "test" / str(y) / f"{i}.png", r)
    model = FakeModel(["cifar10", "hatefulmemes"])
    rows = []
    res = S.evaluate_suite(model, tmp_path, progress=False, on_dataset=lambda i, n, r: rows.append((i, n, r["dataset"])))
    assert rows == [(1, 2, "cifar10"), (2, 2, "hatefulmemes")]
    got = {r["dataset"]: r for r in res["datasets"]}
    want = brute_force(labels.tolist(), reds.tolist(), 10)
    assert want["top1"] == 5 / 14  # the construction gives a non-trivial value
    for k in ("top1", "top5", "mean_per_class"):
        assert got["cifar10"][k] == pytest.approx(want[k], abs=1e-12), k
    want = brute_force([y for y, _ in hm], [r for _, r in hm], 2)
    assert got["hatefulmemes"]["top5"] is None
    for k in ("top1", "mean_per_class"):
        assert got["hatefulmemes"][k] == pytest.approx(want[k], abs=1e-12), k
    assert set(res["absent"]) == set(AUTHORS_ORDER) - {"cifar10", "hatefulmemes"}
    assert model.images_seen == len(labels) + len(hm)  # the train split is not encoded without a probe
    assert model.text_calls == [("cifar10", 10 * 18), ("hatefulmemes", 2 * 1)]  # every CLIP template of each class
    assert res["mean"]["top1"] == pytest.approx((got["cifar10"]["top1"] + got["hatefulmemes"]["top1"]) / 2)
    assert res["mean"]["n_top5"] == 1
    # the table, written atomically, with both files agreeing
    js, md = S.write_table(res, tmp_path / "out")
    assert json.loads(js.read_text())["datasets"][0]["top1"] == got["cifar10"]["top1"]
    text = md.read_text()
    assert f"| CIFAR-10 | 10 | 14 | {100 * 5 / 14:.2f} |" in text and "Absent: STL-10, Caltech-101" in text
    # simple prompts: one template per class
    model.text_calls.clear()
    S.evaluate_suite(model, tmp_path, datasets=["cifar10"], prompts="simple", progress=False)
    assert model.text_calls == [("cifar10", 10)]


def test_multi_name_classes_average_all_prompts():
    """FER2013 has classes with several names: every name × template is a prompt of that class."""
    model = FakeModel(["fer2013"])
    spec = S.suite_data()["datasets"]["fer2013"]
    emb = S.class_embeddings(model, spec["classes"], spec["templates"])
    n_names = sum(1 if isinstance(c, str) else len(c) for c in spec["classes"])
    assert model.text_calls == [("fer2013", n_names * len(spec["templates"]))]
    assert torch.allclose(emb, torch.eye(7))
    # with one name per class it is evaluate.class_embeddings
    from structure_ops.train.evaluate import class_embeddings

    g = torch.Generator().manual_seed(0)
    txt = torch.randn(3 * 4, 5, generator=g)

    class M:
        def encode_text(self, prompts):
            return txt[: len(prompts)]

    ours = S.class_embeddings(M(), ["a", "b", "c"], ["{c}1", "{c}2", "{c}3", "{c}4"])
    assert torch.allclose(ours, class_embeddings(txt, 3), atol=1e-6)


def test_linear_probe_column(tmp_path):
    pytest.importorskip("sklearn")
    # train images of class y rank y first (separable); test images rank r first: a probe predicts r
    train_y = np.repeat(np.arange(10), 5)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    reds = np.array([0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 9, 2])
    write_cifar10(tmp_path, (red_images(train_y), train_y), (red_images(reds), labels))
    for y in (0, 1):  # a dataset without a train split
        save_png(tmp_path / "hatefulmemes" / "test" / str(y) / "a.png", y)
    model = FakeModel(["cifar10", "hatefulmemes"])
    res = S.evaluate_suite(model, tmp_path, linear_probe=True, progress=False)
    row = res["datasets"][0]
    assert row["probe"]["top1"] == pytest.approx(np.mean(labels == reds))  # 7 / 12
    assert row["probe"]["n_train"] == 50
    assert res["datasets"][1]["probe"] is None and res["datasets"][1]["probe_note"] == "no train split"
    assert "linear probe skipped (no train split)" in S.markdown_table(res)


def test_limit_and_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        S.evaluate_suite(FakeModel([]), tmp_path / "nope", progress=False)
    with pytest.raises(ValueError, match="none of the 26 datasets"):
        S.evaluate_suite(FakeModel([]), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown dataset.*imagenet2"):
        S.discover(tmp_path, ["imagenet2"])
    labels = np.arange(10).repeat(3)
    write_cifar10(tmp_path, (red_images(labels), labels), (red_images(labels), labels))
    res = S.evaluate_suite(FakeModel(["cifar10"]), tmp_path, limit=7, progress=False)
    assert res["datasets"][0]["n_test"] == 7 and res["datasets"][0]["limited_from"] == 30
    assert res["datasets"][0]["top1"] == 1.0
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        S.evaluate_suite(FakeModel(["cifar10"]), tmp_path, limit=0, progress=False)


# ---------------------------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    pytest.importorskip("sklearn")
    from helpers import tiny_bert, tiny_vit

    from structure_ops.cli import main as cli
    from structure_ops.train import AlignedModel
    from structure_ops.train.encoders import build_encoder
    from structure_ops.train.heads import build_head

    torch.manual_seed(0)
    enc_t = build_encoder(tiny_bert(tmp_path / "bert"), "text", device="cpu", dtype=torch.float32)
    enc_i = build_encoder(tiny_vit(tmp_path / "vit", image_size=32), "image", device="cpu", dtype=torch.float32)
    model = AlignedModel(enc_i, enc_t, build_head("linear", 16, 8), build_head("linear", 16, 8),
                         (enc_i.layer_names[-1], enc_t.layer_names[-1]))
    model.save_pretrained(tmp_path / "model")
    root = tmp_path / "data"
    rng = np.random.default_rng(2)
    train_y = np.repeat(np.arange(10), 3)
    test_y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 5])
    test_x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    write_cifar10(root, (rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), train_y), (test_x, test_y))
    for y in ("negative", "positive"):  # rendered SST2 as class folders (test only)
        save_png(root / "rendered-sst2" / "test" / y / "a.png", 10)
    out = tmp_path / "out"
    assert cli(["evaluate", "--suite", str(root), "--model", str(tmp_path / "model"), "--out", str(out),
                "--linear-probe", "--device", "cpu", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "2 of 26 datasets present (cifar10, sst)" in printed and "[1/2] CIFAR-10: 12 test images" in printed
    res = json.loads((out / "suite.json").read_text())
    assert [r["dataset"] for r in res["datasets"]] == ["cifar10", "sst"] and len(res["absent"]) == 24
    assert (out / "suite.md").read_text().startswith("# Zero-shot suite (2 of 26 datasets)")
    # top-1 recomputed with loops from the reloaded model's raw embeddings
    m = AlignedModel.from_pretrained(tmp_path / "model", device="cpu")
    spec = S.suite_data()["datasets"]["cifar10"]
    img = m.encode_image([Image.fromarray(a) for a in test_x]).double()
    cls = []
    for c in spec["classes"]:
        e = m.encode_text([t.format(c=c) for t in spec["templates"]]).double()
        mean = sum(e[i] / e[i].norm() for i in range(len(e))) / len(e)
        cls.append(mean / mean.norm())
    hits = 0
    for i, y in enumerate(test_y):
        scores = [float(img[i] @ c) for c in cls]
        hits += int(max(range(10), key=lambda j: scores[j]) == y)
    assert res["datasets"][0]["top1"] == pytest.approx(hits / 12)
    assert res["datasets"][0]["probe"]["n_train"] == 30 and res["datasets"][1]["probe"] is None
    # bad input: one line, exit code 2
    for argv, msg in ((["--suite", str(tmp_path / "missing"), "--model", str(tmp_path / "model"), "--out", str(out)], "no such folder"),
                      (["--suite", str(root), "--model", str(tmp_path / "model")], "needs --out"),
                      (["--suite", str(root), "--model", str(tmp_path / "model"), "--out", str(out), "--datasets", "cifar11"],
                       "unknown cifar11"),
                      (["--suite", str(tmp_path / "bert"), "--model", str(tmp_path / "model"), "--out", str(out)],
                       "none of the suite's datasets"),
                      (["--model", str(tmp_path / "model")], "--model goes with --suite")):
        assert cli(["evaluate", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err


def test_listed_formats(tmp_path):
    """Food-101, DTD, Flowers-102, GTSRB, Caltech-101, Oxford-IIIT Pets, SUN397, FGVC-Aircraft and FER2013 in their
    download layouts: each image's label names the class it was written under."""
    data = S.suite_data()["datasets"]

    def names(key, split):
        return [data[key]["classes"][i] for i in split.labels]

    # Food-101: images/<class>/<id>.jpg listed in meta/{train,test}.json
    d = tmp_path / "food-101"
    for c, i in (("apple_pie", 1), ("waffles", 2), ("apple_pie", 3)):
        save_png(d / "images" / c / f"{i}.jpg", 0)
    (d / "meta").mkdir()
    (d / "meta" / "test.json").write_text(json.dumps({"waffles": ["waffles/2"], "apple_pie": ["apple_pie/1"]}))
    (d / "meta" / "train.json").write_text(json.dumps({"apple_pie": ["apple_pie/3"]}))
    ds = S.find_dataset(tmp_path, "food101")
    assert names("food101", ds.test) == ["apple pie", "waffles"] and names("food101", ds.train) == ["apple pie"]
    # DTD: dtd/dtd/images/<class>/..., labels/{train,val,test}1.txt
    d = tmp_path / "dtd" / "dtd"
    for c in ("banded", "zigzagged"):
        save_png(d / "images" / c / f"{c}_0001.jpg", 0)
    (d / "labels").mkdir()
    (d / "labels" / "test1.txt").write_text("zigzagged/zigzagged_0001.jpg\nbanded/banded_0001.jpg\n")
    (d / "labels" / "train1.txt").write_text("banded/banded_0001.jpg\n")
    (d / "labels" / "val1.txt").write_text("zigzagged/zigzagged_0001.jpg\n")
    ds = S.find_dataset(tmp_path, "dtd")
    assert names("dtd", ds.test) == ["zigzagged", "banded"] and names("dtd", ds.train) == ["banded", "zigzagged"]
    # Flowers-102: jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat (1-based ids)
    scipy_io = pytest.importorskip("scipy.io")
    d = tmp_path / "flowers-102"
    for i in range(1, 5):
        save_png(d / "jpg" / f"image_{i:05d}.jpg", 0)
    scipy_io.savemat(d / "imagelabels.mat", {"labels": np.array([[1, 102, 5, 1]])})
    scipy_io.savemat(d / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]), "tstid": np.array([[3, 4]])})
    ds = S.find_dataset(tmp_path, "flowers")
    assert ds.test.labels.tolist() == [4, 0] and ds.train.labels.tolist() == [0, 101]
    # GTSRB: GTSRB/Training/<00000>/*.ppm and GTSRB/Final_Test/Images/*.ppm with GT-final_test.csv
    d = tmp_path / "gtsrb"
    for c in ("00000", "00042"):
        save_png(d / "GTSRB" / "Training" / c / "00000_00000.ppm", 0)
    for f in ("00000.ppm", "00001.ppm"):
        save_png(d / "GTSRB" / "Final_Test" / "Images" / f, 0)
    (d / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                         "00000.ppm;8;8;0;0;7;7;16\n00001.ppm;8;8;0;0;7;7;1\n")
    ds = S.find_dataset(tmp_path, "gtsrb")
    assert ds.test.labels.tolist() == [16, 1] and sorted(ds.train.labels.tolist()) == [0, 42]
    # Caltech-101: 101_ObjectCategories/<102 folders>, sorted folder order; the authors' per-class split
    d = tmp_path / "caltech-101" / "101_ObjectCategories"
    for i in range(102):
        for j in range(3):
            save_png(d / f"c{i:03d}" / f"image_{j:04d}.jpg", 0)
    ds = S.find_dataset(tmp_path, "caltech101")
    assert len(ds.train) == 2 * 102 and len(ds.test) == 102 and sorted(set(ds.test.labels.tolist())) == list(range(102))
    assert all(f"/c{y:03d}/" in p for p, y in zip(ds.test.images, ds.test.labels, strict=True))
    # Oxford-IIIT Pets: images/<Breed_id>.jpg listed in annotations/{trainval,test}.txt
    d = tmp_path / "oxford-iiit-pet"
    for f in ("Abyssinian_1", "american_bulldog_10", "Sphynx_3"):
        save_png(d / "images" / f"{f}.jpg", 0)
    (d / "annotations").mkdir()
    (d / "annotations" / "test.txt").write_text("american_bulldog_10 2 2 1\nSphynx_3 34 1 12\n")
    (d / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\n")
    ds = S.find_dataset(tmp_path, "pets")
    assert names("pets", ds.test) == ["american bulldog", "Sphynx"] and names("pets", ds.train) == ["Abyssinian"]
    # SUN397: ClassName.txt (397 lines), images under /<letter>/<class>/, partition 1 lists
    d = tmp_path / "SUN397"
    d.mkdir()
    classes = [f"/c/class{i:03d}" for i in range(397)]
    (d / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for i in (5, 300):
        save_png(d / "c" / f"class{i:03d}" / "sun_a.jpg", 0)
    (d / "Testing_01.txt").write_text("/c/class300/sun_a.jpg\n/c/class005/sun_a.jpg\n")
    ds = S.find_dataset(tmp_path, "sun397")
    assert ds.test.labels.tolist() == [300, 5] and ds.train is None
    # FGVC-Aircraft: data/images/<id>.jpg, images_variant_{trainval,test}.txt, variants.txt in class order
    d = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = data["aircraft"]["classes"]
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    for i in ("0034309", "0056978"):
        save_png(d / "images" / f"{i}.jpg", 0)
    (d / "images_variant_test.txt").write_text(f"0034309 {variants[3]}\n0056978 {variants[99]}\n")
    ds = S.find_dataset(tmp_path, "aircraft")
    assert ds.test.labels.tolist() == [3, 99]
    # FER2013: the Kaggle fer2013.csv (emotion, pixels, Usage)
    d = tmp_path / "fer2013"
    d.mkdir()
    pix = " ".join(str(v % 256) for v in range(2304))
    (d / "fer2013.csv").write_text("emotion,pixels,Usage\n" + f"3,{pix},Training\n6,{pix},PublicTest\n0,{pix},PrivateTest\n")
    ds = S.find_dataset(tmp_path, "fer2013")
    assert ds.test.labels.tolist() == [6, 0] and ds.train.labels.tolist() == [3]
    assert np.asarray(ds.test.images[0]).reshape(-1).tolist() == [v % 256 for v in range(2304)]
    # a listed file that is missing: one line naming the list
    (tmp_path / "food-101" / "images" / "waffles" / "2.jpg").unlink()
    with pytest.raises(ValueError, match=r"test\.json: 1 listed image\(s\) not found"):
        S.find_dataset(tmp_path, "food101")
