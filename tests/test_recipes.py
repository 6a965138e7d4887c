"""Smoke tests of the recipes in python/: the same code path as on a GPU with real data, at tiny sizes.

Tiny random Hugging Face models (a 2-layer DINOv2 and a 2-layer BERT with a 30-word vocabulary, built in
milliseconds) stand in for DINOv2-L and all-roberta-large-v1; a generated folder in the COCO 2014 layout
(annotation JSON files + PNG images) stands in for COCO; a class-labelled folder for ImageNet. Only sizes
change through the recipes' own arguments.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "python"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe", "dot")
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "photo", "picture", "image", "with", "on",
         "small", "large", "background", "white", *COLORS, *SHAPES, "cat", "dog", "bird", ".", ","]
N_LAYERS = 2  # transformer blocks of the tiny models: embeddings + 2 hidden states = 3 layers each


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# Generated models and data.

def tiny_models(root: Path) -> tuple[str, str]:
    from transformers import BertConfig, BertModel, BertTokenizerFast, Dinov2Config, Dinov2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar
    torch.manual_seed(0)
    vision = root / "tiny-dinov2"
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                             mlp_ratio=2)).save_pretrained(vision)
    (vision / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    text = root / "tiny-bert"
    text.mkdir()
    (text / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(text / "vocab.txt")).save_pretrained(text)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(text)
    return str(vision), str(text)


def _picture(rng: np.random.Generator, color: str, shape: str, size: int = 40):
    from PIL import Image

    a = np.full((size, size, 3), 245, np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
    c = np.array(COLORS[color], np.uint8)
    if shape == "square":
        a[10:30, 10:30] = c
    elif shape == "stripe":
        a[:, 15:25] = c
    else:
        yy, xx = np.mgrid[:size, :size]
        a[(yy - 20) ** 2 + (xx - 20) ** 2 < 64] = c
    return Image.fromarray(a)


def fake_coco(root: Path, n_train: int = 40, n_val: int = 20, captions_per_image: int = 3, seed: int = 0) -> Path:
    """COCO 2014 layout: annotations/captions_{train,val}2014.json + {train,val}2014/<file_name>."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    ann_id = 0
    for split, n in (("train2014", n_train), ("val2014", n_val)):
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(n):
            image_id = (100 if split == "val2014" else 1) * 1000 + 7 * i  # ids not in file order
            color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            name = f"COCO_{split}_{image_id:012d}.png"
            _picture(rng, color, shape).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "width": 40, "height": 40})
            for t in ("a {c} {s} on a white background.", "  the {s} is {c}\n", "a small picture of a {c} {s}.")[:captions_per_image]:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "caption": t.format(c=color, s=shape)})
        rng.shuffle(annotations)
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root


def fake_imagenet(root: Path, per_class: int = 4) -> tuple[Path, Path]:
    """Class folders named like WordNet ids + a class-names file in sorted folder order."""
    rng = np.random.default_rng(1)
    names = []
    for k, color in enumerate(COLORS):
        folder = root / f"n0000000{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            _picture(rng, color, SHAPES[i % len(SHAPES)]).save(folder / f"img{i}.png")
        names.append(f"{color} thing")
    (root.parent / "classes.txt").write_text("\n".join(names) + "\n")
    return root, root.parent / "classes.txt"


TINY_TRAINING = ["--dim", "16", "--epochs", "4", "--batch-size", "16", "--warmup", "3", "--patience", "10",
                 "--checkpoint-every", "2", "--device", "cpu"]


def coco_args(coco: Path, out: Path, vision: str, text: str, *extra: str) -> list[str]:
    return ["--coco-root", str(coco), "--out", str(out), "--vision", vision, "--text", text, "--max-pairs", "30",
            "--val-images", "6", "--test-images", "8", "--test-captions", "2", "--selection-subset", "24", "--k", "4",
            "--extract-batch-size", "16", *TINY_TRAINING, *extra]


@pytest.fixture(scope="module", autouse=True)
def _feature_cache(tmp_path_factory):
    """The module's own shared feature cache (never the user's)."""
    old = os.environ.get("STRUCTURE_OPS_CACHE")
    os.environ["STRUCTURE_OPS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("STRUCTURE_OPS_CACHE", None)
    else:
        os.environ["STRUCTURE_OPS_CACHE"] = old


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    vision, text = tiny_models(root)
    coco = fake_coco(root / "coco")
    imagenet, classes = fake_imagenet(root / "imagenet" / "val")
    return {"root": root, "vision": vision, "text": text, "coco": coco, "imagenet": imagenet, "classes": classes}


@pytest.fixture(scope="module")
def coco_run(world):
    """The COCO recipe run end to end once (all four stages, LR range test, zero-shot); shared by the tests."""
    out = world["root"] / "run"
    recipe = load_recipe("coco_dinov2_roberta")
    argv = coco_args(world["coco"], out, world["vision"], world["text"], "--zero-shot-imagenet-root", str(world["imagenet"]),
                     "--zero-shot-class-names", str(world["classes"]), "--template", "a photo of a {c}.",
                     "--template", "a {c}.")
    assert recipe.main(argv) == 0
    return out


# ---------------------------------------------------------------------------------------------------------
# coco_dinov2_roberta.py

def _check_retrieval(metrics: dict) -> None:
    for d in ("i2t", "t2i"):
        r = [metrics[f"{d}_R@{k}"] for k in (1, 5, 10)]
        assert all(0.0 <= v <= 1.0 for v in r), metrics
        assert r[0] <= r[1] <= r[2], metrics


def test_coco_recipe_writes_metrics_heads_and_layer_scores(world, coco_run):
    from structure_ops.train.pipeline import load_heads, read_manifest

    metrics = json.loads((coco_run / "metrics.json").read_text())["paper"]["test"]
    _check_retrieval(metrics)
    assert 0.0 <= metrics["zeroshot_top1"] <= 1.0 and "zeroshot_top5" not in metrics  # 4 classes: top-5 is meaningless
    assert metrics["n_images"] == 8 and metrics["n_captions"] == 16 and len(read_manifest(coco_run)["splits"]["train"]) == 30
    assert metrics["zero_shot"]["n_images"] == 16 and metrics["heads"]["config"]["lam"] == 10.0

    scores = json.loads((coco_run / "layer_scores.json").read_text())
    assert np.array(scores["scores"]).shape == (N_LAYERS + 1, N_LAYERS + 1)
    assert scores["metric"] == "mutual_knn" and scores["k"] == 4 and scores["n"] == 24  # ≤ --selection-subset rows
    # the tiny ViT's embeddings-layer CLS token is one vector for every image: excluded (null), never "best"
    assert scores["excluded"] == ["image:embeddings"] and scores["scores"][0] == [None] * (N_LAYERS + 1)
    assert all(0.0 <= s <= 1.0 for row in scores["scores"][1:] for s in row)

    image_head, text_head, meta = load_heads(coco_run / "train" / "paper" / "heads.safetensors")
    assert meta["layers"] == scores["best"] == metrics["layers"]
    assert meta["config"]["dim"] == 16 and meta["config"]["lr"] is None and meta["lr"] > 0  # the LR range test ran
    assert image_head(torch.zeros(3, 32)).shape == (3, 16) and text_head(torch.zeros(3, 24)).shape == (3, 16)
    history = json.loads((coco_run / "train" / "paper" / "history.json").read_text())
    assert len(history["history"]) == 4 and len(history["lr_curve"]) >= 3

    for png in ("layer_scores.png", "train/paper/training_curves.png"):
        assert (coco_run / png).read_bytes()[:4] == b"\x89PNG"

    m = read_manifest(coco_run)
    assert m["zero_shot"]["class_names"] == [f"{c} thing" for c in COLORS]
    assert m["zero_shot"]["templates"] == ["a photo of a {c}.", "a {c}."]


def test_coco_recipe_splits_follow_coco_conventions(world, coco_run):
    from structure_ops.train.pipeline import read_manifest

    m = read_manifest(coco_run)
    recorded = json.loads((coco_run / "recipe.json").read_text())
    assert recorded["data"]["eval_source"] == "val2014" and recorded["args"]["one_caption_per_image"] == "True"
    image_of, splits = m["image_of"], m["splits"]
    per_split = {s: [image_of[j] for j in rows] for s, rows in splits.items()}
    assert len(splits["train"]) == len(set(per_split["train"])) == 30  # one caption per image
    assert len(splits["val"]) == len(set(per_split["val"])) == 6
    assert len(splits["test"]) == 16 and len(set(per_split["test"])) == 8  # --test-captions 2
    sets = {s: set(v) for s, v in per_split.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])

    # The same arguments give the same pairs: train from train2014 with each image's first caption (annotation
    # order, whitespace normalized), val/test from val2014.
    recipe = load_recipe("coco_dinov2_roberta")
    pairs, again, _ = recipe.coco_pairs(recipe.parse_args(coco_args(world["coco"], coco_run, world["vision"], world["text"])))
    assert again == splits and pairs.image_of == image_of
    first = {}
    for split in ("train2014", "val2014"):
        data = json.loads((world["coco"] / "annotations" / f"captions_{split}.json").read_text())
        files = {im["id"]: str(world["coco"] / split / im["file_name"]) for im in data["images"]}
        for a in data["annotations"]:
            first.setdefault(files[a["image_id"]], []).append(" ".join(a["caption"].split()))
    for split, folder in (("train", "train2014"), ("val", "val2014"), ("test", "val2014")):
        for j in splits[split]:
            path = pairs.images[image_of[j]]
            assert Path(path).parent.name == folder
            if split != "test":
                assert pairs.captions[j] == first[path][0]
    for i in sets["test"]:
        path = pairs.images[i]
        assert [pairs.captions[j] for j in splits["test"] if image_of[j] == i] == first[path][:2]


def test_coco_recipe_stages_reuse_the_cache_and_share_the_cli_run_folder(world, coco_run, tmp_path, capsys):
    """The README's multi-GPU workflow: recipe extract+select, `structure-ops train` (torchrun), recipe evaluate."""
    from structure_ops.cli import main as cli
    from structure_ops.train.pipeline import read_manifest

    recipe = load_recipe("coco_dinov2_roberta")
    m = read_manifest(coco_run)
    feature_files = [Path(m[k]) for k in ("image_features", "text_features")] + [
        Path(m["zero_shot"][k]) for k in ("image_features", "prompt_features")]
    assert len(set(feature_files)) == 4  # pairs (image, text) + zero-shot (images, prompts), in the shared cache
    stamps = {p: p.stat().st_mtime_ns for p in feature_files}
    run = tmp_path / "run"
    # A second run folder on the same data: no extraction at all (the shared cache is keyed by content).
    argv = coco_args(world["coco"], run, world["vision"], world["text"])
    assert recipe.main([*argv, "--stages", "extract,select"]) == 0
    new_files = [Path(read_manifest(run)[k]) for k in ("image_features", "text_features")]
    assert set(new_files) <= set(feature_files)  # same data, encoders → same cache entries
    stamps_new = {p: p.stat().st_mtime_ns for p in new_files}
    assert recipe.main([*argv, "--stages", "extract"]) == 0
    assert {p: p.stat().st_mtime_ns for p in new_files} == stamps_new  # cache hit: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in feature_files} == stamps

    assert cli(["train", "--run", str(run), "--layers", "best", "--dim", "8", "--epochs", "2", "--batch-size", "16",
                "--lr", "0.01", "--warmup", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert recipe.main([*argv, "--stages", "evaluate"]) == 0
    printed = capsys.readouterr().out
    assert "image→text" in printed and "text→image" in printed and "zero-shot" not in printed
    (name,) = json.loads((run / "metrics.json").read_text())  # the run `structure-ops train` named
    metrics = json.loads((run / "metrics.json").read_text())[name]["test"]
    _check_retrieval(metrics)
    assert metrics["heads"]["lr"] == 0.01 and "zero_shot" not in metrics


def test_coco_recipe_all_captions_and_no_val2014(world, tmp_path):
    """--no-one-caption-per-image keeps every training caption; without val2014 the eval images leave train2014."""
    from structure_ops.train.pipeline import read_manifest

    coco = fake_coco(tmp_path / "coco", n_train=30, n_val=0)
    (coco / "annotations" / "captions_val2014.json").unlink()
    recipe = load_recipe("coco_dinov2_roberta")
    out = tmp_path / "run"
    argv = coco_args(coco, out, world["vision"], world["text"], "--no-one-caption-per-image", "--stages", "extract")
    argv[argv.index("--max-pairs") + 1] = "1000"
    assert recipe.main(argv) == 0
    m = read_manifest(out)
    info = json.loads((out / "recipe.json").read_text())["data"]
    assert info["eval_source"] == "train2014 (held out)"
    assert info["train_images"] == 30 - 6 - 8 and len(m["splits"]["train"]) == 3 * 16  # all 3 captions of 16 images
    train_imgs = {m["image_of"][j] for j in m["splits"]["train"]}
    assert not train_imgs & {m["image_of"][j] for j in m["splits"]["val"] + m["splits"]["test"]}
    assert not (out / "layer_scores.json").exists()  # only the extract stage ran


def test_coco_recipe_reports_a_bad_layout(world, tmp_path, capsys):
    recipe = load_recipe("coco_dinov2_roberta")
    (tmp_path / "coco").mkdir()
    argv = coco_args(tmp_path / "coco", tmp_path / "run", world["vision"], world["text"])
    assert recipe.main(argv) == 2
    assert "captions_train2014.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args(["--out", str(tmp_path / "run")])  # extract needs --coco-root
    with pytest.raises(SystemExit):
        recipe.parse_args(["--out", str(tmp_path / "run"), "--stages", "train,deploy"])


# ---------------------------------------------------------------------------------------------------------
# compare_lambda.py

def test_compare_lambda_sweeps_lambda_and_levels(coco_run, capsys):
    from structure_ops.train.pipeline import load_heads

    recipe = load_recipe("compare_lambda")
    argv = ["--run", str(coco_run), "--lams", "0", "1", "--levels", "1", "2", "--seeds", "0", "1", "--lr", "0.01",
            "--dim", "8", "--epochs", "3", "--batch-size", "16", "--warmup", "2", "--device", "cpu"]
    assert recipe.main(argv) == 0
    out = coco_run / "compare"
    report = json.loads((out / "results.json").read_text())
    configs = report["configurations"]
    assert [(c["lam"], c["levels"]) for c in configs.values()] == [(0.0, 1), (1.0, 1), (1.0, 2)]  # λ=0 trained once
    best = json.loads((coco_run / "layer_scores.json").read_text())["best"]
    assert all(c["layers"] == best for c in configs.values())
    for name, stats in report["results"].items():
        assert len(report["per_seed"][name]) == 2
        for key in ("i2t_R@1", "t2i_R@10", "zeroshot_top1"):  # (4 classes: no top-5)
            runs = [r[key] for r in report["per_seed"][name]]
            assert all(0.0 <= v <= 1.0 for v in runs)
            assert stats[key]["mean"] == pytest.approx(float(np.mean(runs)))
            assert stats[key]["std"] == pytest.approx(float(np.std(runs, ddof=1)))
    folders = sorted(p for p in (coco_run / "train").iterdir() if p.name.startswith("compare_"))  # named training runs
    assert [f.name for f in folders] == [f"compare_best_lam{lam}_L{lv}_seed{s}" for lam, lv in ((0, 1), (1, 1), (1, 2)) for s in (0, 1)]
    levels = sorted(load_heads(f / "heads.safetensors")[2]["config"]["levels"] for f in folders)
    weightings = {load_heads(f / "heads.safetensors")[2]["config"]["weighting"] for f in folders if "_L2_" in f.name}
    assert levels == [1, 1, 1, 1, 2, 2] and weightings == {"inverse"}
    for png in ("accuracy.png", "training_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "λ=1, L=2" in (out / "results.md").read_text() and "λ=1, L=2" in capsys.readouterr().out


def test_compare_lambda_rejects_unknown_layers(coco_run, capsys):
    recipe = load_recipe("compare_lambda")
    assert recipe.main(["--run", str(coco_run), "--layers", "embeddings,layer9", "--epochs", "1"]) == 2
    assert "layer9" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# python/README.md: its commands parse.

def _readme_commands() -> list[list[str]]:
    import re
    import shlex

    text = (RECIPES / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def test_readme_commands_parse():
    from torch.distributed.run import get_args_parser

    from structure_ops.cli import build_parser

    seen = {"recipe": 0, "torchrun": 0, "structure-ops": 0}
    for argv in _readme_commands():
        if argv[:2] == ["python", "-m"] or argv[0] == "hf":
            continue
        if argv[0] == "python":
            recipe = load_recipe(Path(argv[1]).stem)
            recipe.parse_args(argv[2:])  # SystemExit (a failure) on an unknown or malformed option
            seen["recipe"] += 1
        elif argv[0] == "torchrun":
            a = get_args_parser().parse_args(argv[1:])
            assert a.module and a.training_script == "structure_ops", argv
            assert build_parser().parse_args(a.training_script_args).command == "train"
            seen["torchrun"] += 1
        else:
            assert argv[0] == "structure-ops", f"unexpected command in python/README.md: {argv}"
            build_parser().parse_args(argv[1:])
            seen["structure-ops"] += 1
    assert seen["recipe"] >= 6 and seen["torchrun"] == 1 and seen["structure-ops"] == 4, seen
