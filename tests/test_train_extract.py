"""Robust extraction (image checks, --skip-bad-images, resumable shards, NaN refusal, progress without a TTY)
and zero-shot / selection correctness (templates, --class-names, top-5, degenerate layers)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from helpers import tiny_bert, tiny_vit

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from structure_ops.cli import main as cli  # noqa: E402
from structure_ops.train import data as D  # noqa: E402
from structure_ops.train.features import cached_features, extract  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_bert(root / "bert", layers=1), tiny_vit(root / "vit", layers=1, image_size=16)


@pytest.fixture()
def data(tmp_path):
    pytest.importorskip("sklearn")
    digits = D.digits_pairs(limit=30, image_size=16)
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, (im, cap) in enumerate(zip(digits.images, digits.captions, strict=True)):
            im.save(tmp_path / "imgs" / f"{i}.png")
            w.writerow([f"imgs/{i}.png", cap])
    for i, (im, lab) in enumerate(zip(digits.images, digits.labels, strict=True)):
        (tmp_path / "zs" / f"n{lab:04d}").mkdir(parents=True, exist_ok=True)  # folders named like wnids
        im.save(tmp_path / "zs" / f"n{lab:04d}" / f"{i}.png")
    return tmp_path


def _extract(data, models, *extra):
    bert, vit = models
    return cli(["extract", "--captions", str(data / "pairs.csv"), "--vision", vit, "--text", bert, "--out",
                str(data / "run"), "--val", "6", "--test", "6", *extra])


def test_bad_images_named_up_front_or_skipped(data, models, capsys, cache):
    png = (data / "imgs" / "3.png").read_bytes()
    (data / "imgs" / "3.png").write_bytes(png[: len(png) // 2])  # truncated
    (data / "imgs" / "7.png").write_bytes(b"not an image")
    assert _extract(data, models) == 2
    err = capsys.readouterr().err
    assert "2 image(s) cannot be read" in err and "3.png" in err and "7.png" in err and "--skip-bad-images" in err
    assert len(err.strip().splitlines()) == 1 and not (cache / "features").exists()  # refused before any extraction
    assert _extract(data, models, "--skip-bad-images") == 0
    captured = capsys.readouterr()
    assert "skipped 2 unreadable image(s)" in captured.err
    m = json.loads((data / "run" / "manifest.json").read_text())
    assert sorted(os.path.basename(s["path"]) for s in m["skipped_images"]) == ["3.png", "7.png"]
    assert len(m["image_of"]) == 28 and sum(len(v) for v in m["splits"].values()) == 28
    assert "3.png" in (data / "run" / "skipped_images.txt").read_text()
    # a decoding failure during extraction (not caught up front) still names the file
    from structure_ops.train.encoders import ImageTransform

    with pytest.raises(ValueError, match=r"cannot read image .*7\.png"):
        ImageTransform(16)(str(data / "imgs" / "7.png"))


class _Flaky:
    """An encoder that dies after ``fail_after`` batches (a killed extraction) and counts what it encodes."""

    def __init__(self, enc, fail_after=None, nan_at=None):
        self.enc, self.fail_after, self.nan_at, self.batches, self.inputs = enc, fail_after, nan_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, batch):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.inputs += len(batch)
        out = self.enc.encode(batch)
        if self.nan_at in batch:
            out[-1] = out[-1].clone()
            out[-1][batch.index(self.nan_at), 0] = float("nan")
        return out


def test_extraction_resumes_from_shards_and_refuses_nan(models, cache, capsys):
    from structure_ops.train.encoders import HFEncoder

    caps = [f"caption number {i}" for i in range(40)]
    enc = HFEncoder(models[0], "text", device="cpu")
    first = _Flaky(enc, fail_after=9)  # batches of 4, shards of 8: killed at 90 %, after 4 finished shards
    with pytest.raises(KeyboardInterrupt):
        cached_features(first, caps, D.fingerprint(caps), batch_size=4, shard_size=8, progress=False)
    parts = list((cache / "features").glob("*.parts"))
    assert len(parts) == 1 and len(list(parts[0].glob("shard-*.safetensors"))) == 4
    second = _Flaky(enc)
    feats = cached_features(second, caps, D.fingerprint(caps), batch_size=4, shard_size=8, progress=True)
    assert second.inputs == 8  # only the last shard was extracted: 90 % of the work was kept
    assert "resuming, 32 of 40 inputs already extracted" in capsys.readouterr().err
    assert not list((cache / "features").glob("*.parts"))
    whole = extract(enc, caps, batch_size=4, progress=False)
    for k in whole:
        torch.testing.assert_close(feats[k], whole[k])

    # NaN features are refused where they are made, naming the input
    with pytest.raises(ValueError, match=r"NaN/Inf features in 1 of 3 rows, e.g. \['caption number 5'\]"):
        extract(_Flaky(enc, nan_at="caption number 5"), caps, batch_size=3, progress=False)


def test_progress_lines_without_a_tty(models, capsys):
    from structure_ops.train.encoders import HFEncoder

    extract(HFEncoder(models[0], "text", device="cpu"), [f"text {i}" for i in range(20)], batch_size=2, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "text features (bert)" in ln]
    assert len(lines) == 10 and lines[-1].split("] ", 1)[1].startswith("text features (bert): 20/20 inputs (100 %)")


def test_precomputed_nan_features_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    x = torch.randn(20, 4)
    x[3, 1] = float("inf")
    save_file({"a": x}, str(tmp_path / "i.safetensors"))
    save_file({"t": torch.randn(20, 3)}, str(tmp_path / "t.safetensors"))
    assert cli(["extract", "--image-features", str(tmp_path / "i.safetensors"), "--text-features",
                str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "run")]) == 2
    assert "layer 'a' has NaN/Inf features in 1 of 20 rows" in capsys.readouterr().err


@pytest.mark.parametrize("template, message", [
    ("a photo of a cat", "does not contain {c}"),
    ("a {c} on {background}", "unknown field(s) ['background']"),
    ("a {0} photo", "unknown field(s) ['0']"),
    ("a {c photo", "not a valid format string"),
])
def test_bad_templates_refused_before_extraction(data, models, capsys, cache, template, message):
    assert _extract(data, models, "--zero-shot", str(data / "zs"), "--template", template) == 2
    assert message in capsys.readouterr().err and not (cache / "features").exists()


def test_class_names_file_top5_and_metrics_record(data, models, capsys):
    folders = sorted(os.listdir(data / "zs"))
    (data / "map.txt").write_text("".join(f"{f}\t{D.DIGIT_NAMES[int(f[1:])]} digit\n" for f in reversed(folders)))
    assert _extract(data, models, "--zero-shot", str(data / "zs"), "--class-names", str(data / "map.txt"),
                    "--template", "a {c}.") == 0
    m = json.loads((data / "run" / "manifest.json").read_text())
    assert m["zero_shot"]["class_names"] == [f"{D.DIGIT_NAMES[int(f[1:])]} digit" for f in folders]
    assert m["image_encoder"]["source"] == os.path.abspath(models[1]) and m["image_encoder"]["weights"].startswith("sha256:")
    run = str(data / "run")
    assert cli(["train", "--run", run, "--layers", "last", "--epochs", "2", "--dim", "4", "--lr", "1e-2"]) == 0
    assert cli(["evaluate", "--run", run]) == 0
    (name,) = json.loads((data / "run" / "metrics.json").read_text())
    r = json.loads((data / "run" / "metrics.json").read_text())[name]["test"]
    n_classes = len(folders)
    assert ("zeroshot_top5" in r) == (n_classes > 5)
    assert r["zero_shot"]["n_classes"] == n_classes and r["zero_shot"]["chance"]["top1"] == pytest.approx(1 / n_classes)
    assert r["image_encoder"]["name"] == "vit" and r["text_encoder"]["name"] == "bert" and r["n_images"] == 6
    # positional names (one per folder, sorted order) work; a wrong count or an unmapped folder is refused
    (data / "pos.txt").write_text("\n".join(f"class {f}" for f in folders) + "\n")
    assert D.load_image_folder(data / "zs", data / "pos.txt")[2] == [f"class {f}" for f in folders]
    (data / "short.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match=f"2 names for {n_classes} class folders"):
        D.load_image_folder(data / "zs", data / "short.txt")
    (data / "partial.txt").write_text(f"{folders[0]} zero\n{folders[1]} one\n")
    with pytest.raises(ValueError, match="maps 2 folders but not"):
        D.load_image_folder(data / "zs", data / "partial.txt")


def test_zero_shot_top5_only_with_more_than_5_classes():
    from structure_ops.train.evaluate import zero_shot

    emb = torch.nn.functional.normalize(torch.randn(12, 6), dim=1)
    labels = torch.arange(12) % 5
    assert set(zero_shot(emb, torch.eye(6)[:5], labels)) == {"top1"}
    assert set(zero_shot(emb, torch.eye(6), labels)) == {"top1", "top5"}


def test_degenerate_layers_excluded_from_selection(tmp_path):
    from structure_ops.train.selection import LayerScores, score_layers

    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 8, generator=g)
    img = {"cls_embed": torch.randn(1, 6, generator=g).expand(40, 6).contiguous(),  # one vector for every sample
           "i1": base @ torch.randn(8, 6, generator=g), "i2": torch.randn(40, 6, generator=g)}
    txt = {"t0": base @ torch.randn(8, 5, generator=g), "zeros": torch.zeros(40, 5)}
    with pytest.warns(UserWarning, match=r"excluded 2 degenerate layer\(s\).*image:cls_embed, text:zeros"):
        s = score_layers(img, txt, k=4, subset=None)
    assert torch.isnan(s.scores[0]).all() and torch.isnan(s.scores[:, 1]).all()
    assert s.best() == ("i1", "t0") and s.excluded == ["image:cls_embed", "text:zeros"]
    s.save(tmp_path)
    back = LayerScores.from_json(json.loads((tmp_path / "layer_scores.json").read_text()))
    assert back.best() == ("i1", "t0") and torch.isnan(back.scores[0, 0])
    assert "excluded" in (tmp_path / "layer_scores.csv").read_text()
    with pytest.raises(ValueError, match="every text layer is degenerate"):
        score_layers(img, {"zeros": torch.zeros(40, 5)}, k=4, subset=None)
