"""Using a trained model: AlignedModel.from_run / from_pretrained, the embed / zero-shot / export commands.

The central check: AlignedModel, given the training images and captions, reproduces the embeddings that the
training layer computes from its cached features (same encoder rebuilt from the manifest, same layer, pooling
and preprocessing, same heads), and the zero-shot accuracy that ``evaluate`` wrote. Tiny random HF models.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from helpers import tiny_bert, tiny_vit

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from structure_ops.cli import main as cli  # noqa: E402
from structure_ops.train import AlignedModel  # noqa: E402
from structure_ops.train import data as D  # noqa: E402
from structure_ops.train.aligned import check_templates, encoder_from_description  # noqa: E402
from structure_ops.train.evaluate import class_embeddings  # noqa: E402
from structure_ops.train.features import load_features  # noqa: E402
from structure_ops.train.trainer import embed  # noqa: E402

TEMPLATES = ["a {c}.", "the digit {c}."]
TRAIN = ["--layers", "layer1,layer1", "--head", "mlp", "--dim", "8", "--epochs", "4", "--lr", "1e-2", "--warmup", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder: tiny ViT + BERT, 48 captioned digits and a zero-shot folder, extracted, trained, evaluated."""
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("aligned")
    bert, vit = root / "models" / "bert", root / "models" / "vit"
    tiny_bert(bert, layers=2)
    tiny_vit(vit, layers=2)
    digits = D.digits_pairs(limit=48, image_size=16)
    (root / "imgs").mkdir()
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, (im, cap) in enumerate(zip(digits.images, digits.captions, strict=True)):
            im.save(root / "imgs" / f"{i}.png")
            w.writerow([f"imgs/{i}.png", cap])
    for i, (im, lab) in enumerate(zip(digits.images[:30], digits.labels[:30], strict=True)):
        (root / "zs" / D.DIGIT_NAMES[lab]).mkdir(parents=True, exist_ok=True)
        im.save(root / "zs" / D.DIGIT_NAMES[lab] / f"{i}.png")
    run = root / "run"
    args = ["--template", TEMPLATES[0], "--template", TEMPLATES[1]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRUCTURE_OPS_CACHE", str(root / "cache"))  # not the user's cache folder
        assert cli(["extract", "--captions", str(root / "pairs.csv"), "--vision", str(vit), "--text", str(bert),
                    "--out", str(run), "--zero-shot", str(root / "zs"), *args, "--val", "8", "--test", "8"]) == 0
        # layers that are not the last ones, so a wrong layer index would show
        assert cli(["train", "--run", str(run), *TRAIN]) == 0
        assert cli(["evaluate", "--run", str(run)]) == 0
    return root, run


def _metrics(run) -> dict:
    """metrics.json of the run, whatever nesting the evaluate command uses (by split / by training run)."""
    found = []

    def walk(d):
        if isinstance(d, dict):
            if "zeroshot_top1" in d:
                found.append(d)
            for v in d.values():
                walk(v)

    for p in run.glob("**/metrics.json"):
        walk(json.loads(p.read_text()))
    assert found, "evaluate wrote no zero-shot metrics"
    return found[-1]


def test_from_run_reproduces_training_embeddings(trained):
    root, run = trained
    m = json.loads((run / "manifest.json").read_text())
    model = AlignedModel.from_run(run)
    assert model.layers == ("layer1", "layer1") and model.dim == 8
    img = load_features(run / m["image_features"], ["layer1"])["layer1"]
    txt = load_features(run / m["text_features"], ["layer1"])["layer1"]
    train = m["splits"]["train"]
    image_rows = sorted({m["image_of"][j] for j in train})
    pairs = D.load_captions(root / "pairs.csv")
    # what the trainer's embedding function gives on the cached (training-time) features
    want_i = embed(model.image_head, img[image_rows])
    want_t = embed(model.text_head, txt[train])
    got_i = model.encode_image([pairs.images[i] for i in image_rows])
    got_t = model.encode_text([pairs.captions[j] for j in train])
    assert got_i.shape == (len(image_rows), 8) and got_t.shape == (len(train), 8)
    torch.testing.assert_close(got_i.norm(dim=1), torch.ones(len(image_rows)))
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-5)
    # PIL images give the same embeddings as their files; a single string is one row
    from PIL import Image

    with Image.open(pairs.images[image_rows[0]]) as im:
        torch.testing.assert_close(model.encode_image([im.copy()]), got_i[:1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.encode_text(pairs.captions[train[0]]), got_t[:1], atol=1e-6, rtol=1e-6)
    # a wrong layer would not match: the last layer's features give other embeddings
    last = load_features(run / m["image_features"], ["layer2"])["layer2"]
    assert (embed(model.image_head, last[image_rows]) - got_i).abs().max() > 1e-3


def test_zero_shot_matches_evaluate(trained):
    root, run = trained
    model = AlignedModel.from_run(run)
    assert model.templates == TEMPLATES  # the run's zero-shot prompts are the default
    paths, labels, classes = D.load_image_folder(root / "zs")
    res = model.zero_shot(paths, classes)
    assert res.logits.shape == (len(paths), len(classes)) and res.class_names == classes
    # the same class embeddings as the evaluation path (cached prompt features → head → mean → renormalize)
    m = json.loads((run / "manifest.json").read_text())
    zt = load_features(run / m["zero_shot"]["prompt_features"], ["layer1"])["layer1"]
    torch.testing.assert_close(model.class_embeddings(classes), class_embeddings(embed(model.text_head, zt), len(classes)),
                               atol=1e-5, rtol=1e-5)
    top1 = sum(int(p == y) for p, y in zip(res.indices, labels, strict=True)) / len(labels)
    assert top1 == pytest.approx(_metrics(run)["zeroshot_top1"], abs=1e-6)  # evaluate averages in fp32
    recalls = [sum(int(p == y) for p, y in zip(res.indices, labels, strict=True) if y == c) / labels.count(c)
               for c in sorted(set(labels))]  # per-class top-1 recall, counted by hand
    assert sum(recalls) / len(recalls) == pytest.approx(_metrics(run)["zeroshot_mean_per_class"], abs=1e-6)
    assert torch.allclose(res.probs.sum(1), torch.ones(len(paths)))
    assert [c for c, _ in res.topk(2)[0]][0] == res.predictions[0]


def test_encoder_descriptions_round_trip(trained, tmp_path):
    _, run = trained
    m = json.loads((run / "manifest.json").read_text())
    for key in ("image_encoder", "text_encoder"):
        desc = m[key]
        again = encoder_from_description(desc).describe()
        assert {k: v for k, v in again.items() if k != "name"} == {k: v for k, v in desc.items() if k != "name"}
    # the weights replaced in place: the rebuilt encoder is refused (strict) or warned about
    src = m["image_encoder"].get("source") or m["image_encoder"]["name"]
    replaced = tmp_path / "vit"
    shutil.copytree(src, replaced)
    tiny_vit(replaced, layers=2, seed=1)  # same architecture and preprocessing, other weights
    changed = {**m["image_encoder"], "source": str(replaced)}
    with pytest.raises(ValueError, match="no longer matches"):
        encoder_from_description(changed)
    with pytest.warns(UserWarning, match="no longer matches"):
        encoder_from_description(changed, strict=False)
    with pytest.raises(ValueError, match="precomputed"):
        encoder_from_description({"name": "precomputed:image", "modality": "image"})


def test_export_is_self_contained(trained, tmp_path):
    root, run = trained
    model = AlignedModel.from_run(run)
    paths = [str(root / "imgs" / f"{i}.png") for i in range(5)]
    want_i, want_t = model.encode_image(paths), model.encode_text(["a bold seven.", "a zero."])
    out = tmp_path / "exported"
    assert cli(["export", "--run", str(run), "--out", str(out)]) == 0
    cfg = json.loads((out / "aligned.json").read_text())
    assert cfg["layers"] == ["layer1", "layer1"] and cfg["image_encoder"]["source"] == "encoders/image"
    assert {p.name for p in out.iterdir()} == {"aligned.json", "heads.safetensors", "encoders"}
    # the original model folders are gone: the export still loads (it carries copies)
    moved = tmp_path / "models-moved"
    shutil.move(root / "models", moved)
    try:
        loaded = AlignedModel.from_pretrained(out)
        torch.testing.assert_close(loaded.encode_image(paths), want_i, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(loaded.encode_text(["a bold seven.", "a zero."]), want_t, atol=1e-6, rtol=1e-6)
        assert loaded.templates == TEMPLATES
        # save_pretrained of the loaded model round-trips too, and replaces an earlier export in place
        loaded.save_pretrained(out)
        again = AlignedModel.from_pretrained(out)
        torch.testing.assert_close(again.encode_text(["a zero."]), want_t[1:], atol=1e-6, rtol=1e-6)
    finally:
        shutil.move(moved, root / "models")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_embed_and_zero_shot_commands(trained, tmp_path, capsys):
    from safetensors import safe_open

    root, run = trained
    model = AlignedModel.from_run(run)
    imgs = [str(root / "imgs" / f"{i}.png") for i in range(4)]
    out = tmp_path / "e.safetensors"
    assert cli(["embed", "--run", str(run), "--images", *imgs, "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        emb = f.get_tensor("embeddings")
        meta = json.loads(f.metadata()["structure_ops"])
    assert meta["inputs"] == imgs and meta["modality"] == "image"
    torch.testing.assert_close(emb, model.encode_image(imgs), atol=1e-6, rtol=1e-6)
    (tmp_path / "t.txt").write_text("a one.\n\na two.\n")
    assert cli(["embed", "--run", str(run), "--text-file", str(tmp_path / "t.txt"), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor("embeddings"), model.encode_text(["a one.", "a two."]), atol=1e-6, rtol=1e-6)
    capsys.readouterr()
    # a class folder: classes from the sub-folders, accuracy = AlignedModel's
    csv_out = tmp_path / "pred.csv"
    assert cli(["zero-shot", "--run", str(run), "--images", str(root / "zs"), "--out", str(csv_out)]) == 0
    printed = capsys.readouterr().out
    paths, labels, classes = D.load_image_folder(root / "zs")
    res = model.zero_shot(paths, classes)
    top1 = sum(int(p == y) for p, y in zip(res.indices, labels, strict=True)) / len(labels)
    assert f"top-1 {top1:.4f}" in printed and ("top-5" in printed) == (len(classes) > 5)
    rows = list(csv.reader(csv_out.open()))
    assert rows[0][:3] == ["image", "prediction", "probability"] and [r[1] for r in rows[1:]] == res.predictions
    # explicit classes and a template
    assert cli(["zero-shot", "--run", str(run), "--images", *imgs, "--classes", "zero,one,two", "--template",
                "a photo of a {c}."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expect = model.zero_shot(imgs, ["zero", "one", "two"], ["a photo of a {c}."]).predictions
    assert [ln.split(": ", 1)[1].split(" ")[0] for ln in lines] == expect


def test_bad_templates_and_inputs(trained, tmp_path, capsys):
    _, run = trained
    for bad in ("a photo", "a {c} of {x}", "{0}", "a {c"):
        with pytest.raises(ValueError, match="template"):
            check_templates([bad])
        assert cli(["zero-shot", "--run", str(run), "--images", str(tmp_path), "--classes", "a,b", "--template", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "template" in err
    model = AlignedModel.from_run(run)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        model.encode_image([str(tmp_path / "nope.png")])
    with pytest.raises(TypeError, match="file paths or PIL"):
        model.encode_image([torch.zeros(3)])
    with pytest.raises(ValueError, match="no texts"):
        model.encode_text([])
    with pytest.raises(FileNotFoundError, match="no trained heads named 'other'"):
        AlignedModel.from_run(run, "other")


def test_named_runs(trained, tmp_path):
    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first = AlignedModel.from_run(copy)
    assert cli(["train", "--run", str(copy), *TRAIN, "--name", "second", "--seed", "1"]) == 0
    with pytest.raises(ValueError, match="--name"):
        AlignedModel.from_run(copy)  # two training runs: which one must be said
    second = AlignedModel.from_run(copy, "second")
    again = AlignedModel.from_run(copy, first.meta["name"])
    assert second.meta["name"] == "second" and again.meta["name"] == first.meta["name"]
    texts = ["a bold seven.", "a zero."]
    torch.testing.assert_close(again.encode_text(texts), first.encode_text(texts))
    assert (second.encode_text(texts) - first.encode_text(texts)).abs().max() > 1e-4  # another seed, other heads
