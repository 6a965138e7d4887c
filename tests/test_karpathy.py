"""Karpathy's split files (dataset_coco.json / dataset_flickr30k.json) and the standard retrieval protocol,
on a generated fixture in exactly that format; R@K checked against a brute-force computation written here."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import tiny_bert, tiny_vit

from structure_ops.train import data as D
from structure_ops.train.evaluate import retrieval

SPLITS = {"train": 4, "restval": 2, "val": 3, "test": 4}


def _karpathy_fixture(root, coco=True):
    """Tiny PNGs and a Karpathy-format JSON: every split, 5 sentences per image. COCO-like: train images in
    train2014/, the others in val2014/ (as in dataset_coco.json); Flickr-like: no filepath."""
    from PIL import Image

    images, n = [], 0
    for split, count in SPLITS.items():
        for _ in range(count):
            folder = ("train2014" if split == "train" else "val2014") if coco else ""
            fname = f"COCO_{folder}_{n:012d}.png" if coco else f"{n}.png"
            (root / "imgs" / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), ((37 * n) % 256, (91 * n) % 256, (13 * n) % 256)).save(root / "imgs" / folder / fname)
            entry = {"filename": fname, "imgid": n, "split": split, "cocoid": 1000 + n,
                     "sentences": [{"tokens": ["a"], "raw": f"Image {n}, caption {c}.", "imgid": n, "sentid": 5 * n + c}
                                   for c in range(5)],
                     "sentids": [5 * n + c for c in range(5)]}
            if coco:
                entry["filepath"] = folder
            images.append(entry)
            n += 1
    path = root / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr30k"}))
    return path


def _split_images(pairs, rows):
    return sorted({pairs.image_of[j] for j in rows})


@pytest.mark.parametrize("coco", [True, False])
def test_karpathy_splits_keep_every_caption(tmp_path, coco):
    path = _karpathy_fixture(tmp_path, coco)
    pairs, splits = D.load_karpathy(path, tmp_path / "imgs")
    entries = json.loads(path.read_text())["images"]
    assert len(pairs.images) == len(entries) and len(pairs) == 5 * len(entries)
    for j, cap in enumerate(pairs.captions):  # caption j is sentence j % 5 of image j // 5, in file order
        assert cap == entries[j // 5]["sentences"][j % 5]["raw"] and pairs.image_of[j] == j // 5
    for i, e in enumerate(entries):
        assert pairs.images[i] == str((tmp_path / "imgs" / e.get("filepath", "") / e["filename"]).resolve())
    want = {"train": [i for i, e in enumerate(entries) if e["split"] in ("train", "restval")],
            "val": [i for i, e in enumerate(entries) if e["split"] == "val"],
            "test": [i for i, e in enumerate(entries) if e["split"] == "test"]}
    for s in ("train", "val", "test"):
        assert _split_images(pairs, splits[s]) == want[s]
        assert len(splits[s]) == 5 * len(want[s])  # every caption of every image of the split
    assert pairs.name == ("coco" if coco else "flickr30k")


def test_val2014_protocol(tmp_path):
    path = _karpathy_fixture(tmp_path)
    pairs, splits = D.load_karpathy(path, tmp_path / "imgs", "val2014", val=2, seed=1)
    entries = json.loads(path.read_text())["images"]
    in_val2014 = [i for i, e in enumerate(entries) if e["filepath"] == "val2014"]
    assert _split_images(pairs, splits["test"]) == in_val2014  # Karpathy's val, test and restval: all of val2014
    train, val = _split_images(pairs, splits["train"]), _split_images(pairs, splits["val"])
    assert len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val) == [i for i, e in enumerate(entries) if e["filepath"] == "train2014"]
    (tmp_path / "f").mkdir()
    flickr = _karpathy_fixture(tmp_path / "f", coco=False)
    with pytest.raises(ValueError, match="train2014 and val2014"):
        D.load_karpathy(flickr, tmp_path / "f" / "imgs", "val2014")


def test_karpathy_bad_input_named(tmp_path):
    path = _karpathy_fixture(tmp_path)
    doc = json.loads(path.read_text())
    os.remove(tmp_path / "imgs" / doc["images"][3]["filepath"] / doc["images"][3]["filename"])
    with pytest.raises(FileNotFoundError, match="1 image"):
        D.load_karpathy(path, tmp_path / "imgs")
    doc["images"][0]["split"] = "holdout"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="image 0 lacks a filename or a split"):
        D.load_karpathy(path, tmp_path / "imgs")
    with pytest.raises(ValueError, match="protocol"):
        D.load_karpathy(path, tmp_path / "imgs", "coco5k")


def _brute_force_recall(image_emb, text_emb, image_of, k):
    """R@k by loops: a caption's rank is 1 + the number of images scored strictly higher than its own image;
    an image's rank is 1 + the number of captions scored strictly higher than its best-scored own caption."""
    img = [[float(v) for v in row / row.norm()] for row in image_emb.double()]
    txt = [[float(v) for v in row / row.norm()] for row in text_emb.double()]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    t2i_hits = 0
    for j, t in enumerate(txt):
        own = cos(img[image_of[j]], t)
        higher = sum(1 for i in range(len(img)) if i != image_of[j] and cos(img[i], t) > own)
        t2i_hits += higher < k
    i2t_hits = 0
    for i, v in enumerate(img):
        scores = [cos(v, t) for t in txt]
        best_own = max(scores[j] for j in range(len(txt)) if image_of[j] == i)
        higher = sum(1 for j in range(len(txt)) if image_of[j] != i and scores[j] > best_own)
        i2t_hits += higher < k
    return t2i_hits / len(txt), i2t_hits / len(img)


def test_retrieval_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    n_img, d = 12, 6
    image_of = [i for i in range(n_img) for _ in range(5)]  # 5 captions per image, as COCO / Flickr30k
    image_emb = torch.randn(n_img, d, generator=g)
    text_emb = image_emb[image_of] + 1.2 * torch.randn(len(image_of), d, generator=g)  # related but noisy
    got = retrieval(image_emb, text_emb, image_of, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = _brute_force_recall(image_emb, text_emb, image_of, k)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-6) and got[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert 0 < got["t2i_R@1"] < 1 and 0 < got["i2t_R@1"] < 1  # neither trivial nor hopeless: the check can fail


def test_extract_karpathy_cli_and_test_split_retrieval(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from structure_ops.cli import main as cli
    from structure_ops.train.pipeline import read_manifest, run_features

    monkeypatch.setenv("STRUCTURE_OPS_CACHE", str(tmp_path / "cache"))
    bert = tiny_bert(tmp_path / "bert", layers=1)
    vit = tiny_vit(tmp_path / "vit", layers=1, image_size=8, patch_size=4)
    path = _karpathy_fixture(tmp_path)
    run = tmp_path / "run"
    assert cli(["extract", "--karpathy", str(path), "--images", str(tmp_path / "imgs"), "--vision", str(vit),
                "--text", str(bert), "--out", str(run)]) == 0
    assert "splits train 30, val 15, test 20" in capsys.readouterr().out
    m = read_manifest(run)
    pairs, splits = D.load_karpathy(path, tmp_path / "imgs")
    assert m["splits"] == splits and m["image_of"] == pairs.image_of and m["protocol"] == "karpathy"
    # Retrieval on the test split of the extracted features (last layers, both 16-d) against the brute force.
    img, txt = run_features(run, m, "image_features"), run_features(run, m, "text_features")
    rows = m["splits"]["test"]
    imgs = sorted({m["image_of"][j] for j in rows})
    local = [imgs.index(m["image_of"][j]) for j in rows]
    xi, xt = list(img.values())[-1][imgs], list(txt.values())[-1][rows]
    got = retrieval(xi, xt, local, ks=(1, 2))
    for k in (1, 2):
        t2i, i2t = _brute_force_recall(xi, xt, local, k)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-6) and got[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-6)
    # end to end on the Karpathy splits: a CSA fit on train, evaluated on the test split (4 images, 20 captions)
    assert cli(["train", "--run", str(run), "--method", "csa", "--layers", "last", "--dim", "4", "--name", "csa"]) == 0
    assert cli(["evaluate", "--run", str(run), "--name", "csa"]) == 0
    assert "csa on the test split (karpathy protocol): 4 images, 20 captions" in capsys.readouterr().out
    # --karpathy without --images is refused in one line
    assert cli(["extract", "--karpathy", str(path), "--out", str(tmp_path / "run2")]) == 2
    assert "--karpathy needs --images" in capsys.readouterr().err


def test_zero_shot_mean_per_class_recall_by_loops():
    g = torch.Generator().manual_seed(1)
    n_cls = 4
    cls = torch.nn.functional.normalize(torch.randn(n_cls, 5, generator=g), dim=1)
    labels = [0] * 10 + [1] * 3 + [2] * 6 + [3] * 1  # unbalanced
    emb = cls[labels] + 0.9 * torch.randn(len(labels), 5, generator=g)
    from structure_ops.train.evaluate import zero_shot

    got = zero_shot(emb, cls, labels, topk=(1,), mean_per_class=True)
    recalls = []
    for c in range(n_cls):
        rows = [i for i, y in enumerate(labels) if y == c]
        correct = 0
        for i in rows:
            e = emb[i] / emb[i].norm()
            scores = [float(e @ cls[d]) for d in range(n_cls)]
            correct += max(range(n_cls), key=lambda d: scores[d]) == c
        recalls.append(correct / len(rows))
    assert got["mean_per_class"] == pytest.approx(sum(recalls) / n_cls, abs=1e-12)
    top1 = sum(r * sum(1 for y in labels if y == c) for c, r in enumerate(recalls)) / len(labels)
    assert got["top1"] == pytest.approx(top1, abs=1e-6) and got["mean_per_class"] != pytest.approx(got["top1"], abs=1e-3)
    assert "mean_per_class" not in zero_shot(emb, cls, labels, topk=(1,))
