"""The training layer: encoders, feature cache, layer selection, heads, trainer, evaluation, CLI.

Models are tiny random transformers built in a temporary folder (milliseconds); the tokenizer files come from
the installed all-MiniLM-L6-v2 package. The pipeline's real-model run is the demo (CI runs its quick mode).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from helpers import tiny_bert, tiny_vit

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from structure_ops import functional as so  # noqa: E402
from structure_ops.cli import main as cli  # noqa: E402
from structure_ops.train import data as D  # noqa: E402
from structure_ops.train.encoders import HFEncoder, HookedEncoder, ImageTransform, build_encoder  # noqa: E402
from structure_ops.train.evaluate import class_embeddings, retrieval, zero_shot  # noqa: E402
from structure_ops.train.features import cached_features, load_features  # noqa: E402
from structure_ops.train.heads import MLPHead, build_head  # noqa: E402
from structure_ops.train.selection import LayerScores, score_layers  # noqa: E402
from structure_ops.train.trainer import TrainConfig, Trainer  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# fixtures: tiny random models and a small captioned image set
@pytest.fixture(autouse=True)
def _feature_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own shared feature cache (never the user's)."""
    monkeypatch.setenv("STRUCTURE_OPS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_bert(root / "bert", layers=2), tiny_vit(root / "vit", layers=3)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return D.digits_pairs(limit=60, image_size=16)


@pytest.fixture()
def captions_dir(tmp_path, digits):
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, (im, cap) in enumerate(zip(digits.images, digits.captions, strict=True)):
            im.save(tmp_path / "imgs" / f"{i}.png")
            w.writerow([f"imgs/{i}.png", cap])
    for i, (im, lab) in enumerate(zip(digits.images, digits.labels, strict=True)):
        (tmp_path / "zs" / D.DIGIT_NAMES[lab]).mkdir(parents=True, exist_ok=True)
        im.save(tmp_path / "zs" / D.DIGIT_NAMES[lab] / f"{i}.png")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# data
def test_digits_pairs(digits):
    assert len(digits) == len(digits.images) == 60 and digits.class_names == D.DIGIT_NAMES
    for cap, lab in zip(digits.captions, digits.labels, strict=True):
        assert D.DIGIT_NAMES[lab] in cap or str(lab) in cap
    assert len(set(digits.captions)) > 20  # varied templates and attributes, not one caption per class


def test_load_captions_csv_jsonl_and_errors(captions_dir):
    p = D.load_captions(captions_dir / "pairs.csv")
    assert len(p) == 60 and os.path.isfile(p.images[0])
    rows = list(csv.DictReader(open(captions_dir / "pairs.csv")))
    with open(captions_dir / "pairs.jsonl", "w") as f:
        for r in rows[:5] + rows[:2]:  # repeated images share one entry
            f.write(json.dumps({"file": r["image"], "text": r["caption"]}) + "\n")
    q = D.load_captions(captions_dir / "pairs.jsonl")
    assert len(q) == 7 and len(q.images) == 5 and q.image_of[5:] == [0, 1]
    (captions_dir / "bad.csv").write_text("picture,words\na.png,hi\n")
    with pytest.raises(ValueError, match=r"no image column.*found columns \['picture', 'words'\]"):
        D.load_captions(captions_dir / "bad.csv")
    (captions_dir / "missing.csv").write_text("image,caption\nnope.png,hi\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        D.load_captions(captions_dir / "missing.csv")
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        D.load_captions(captions_dir / "absent.csv")


def test_image_folder(captions_dir):
    paths, labels, classes = D.load_image_folder(captions_dir / "zs")
    assert len(paths) == 60 and classes == sorted(classes) and max(labels) == len(classes) - 1


def test_subset_renumbers_images():
    p = D.Pairs(["a", "b", "c"], ["x", "y", "z", "w"], [0, 2, 2, 1])
    s = p.subset([1, 2, 3])
    assert s.images == ["b", "c"] and s.image_of == [1, 1, 0]


# ---------------------------------------------------------------------------------------------------------
# encoders
def test_text_pooling_matches_manual(tiny_models):
    from transformers import AutoModel, AutoTokenizer

    bert, _ = tiny_models
    texts = ["a handwritten digit seven.", "one"]
    tok = AutoTokenizer.from_pretrained(bert)(texts, padding=True, return_tensors="pt")
    hidden = AutoModel.from_pretrained(bert)(**tok, output_hidden_states=True).hidden_states
    m = tok["attention_mask"].float()
    for pooling, manual in (
        ("mean", [(h * m[..., None]).sum(1) / m.sum(1, keepdim=True) for h in hidden]),
        ("cls", [h[:, 0] for h in hidden]),
        ("last", [h[torch.arange(2), m.sum(1).long() - 1] for h in hidden]),
    ):
        enc = HFEncoder(bert, "text", pooling, device="cpu")
        got = enc.encode(texts)
        assert enc.layer_names == ["embeddings", "layer1", "layer2"]
        for g, e in zip(got, manual, strict=True):
            torch.testing.assert_close(g, e.detach(), rtol=1e-5, atol=1e-5)


def test_vision_encoder_and_hooks(tiny_models, digits):
    _, vit = tiny_models
    enc = build_encoder(vit, "image", device="cpu")
    feats = enc.encode(digits.images[:3])
    assert len(feats) == 4 and all(f.shape == (3, 16) for f in feats) and enc.pooling == "cls"
    assert enc.transform.size == 32 and enc.transform.mean.tolist() == [0.5] * 3

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    hooked = HookedEncoder(net, ["0", "2"], "tiny-cnn", ImageTransform(12), device="cpu")
    out = hooked.encode(digits.images[:2])
    with torch.no_grad():
        x = torch.stack([hooked.transform(im) for im in digits.images[:2]])
        torch.testing.assert_close(out[1], net(x).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="no sub-module named"):
        HookedEncoder(net, ["7"], "tiny-cnn", ImageTransform(12), device="cpu")


def test_unknown_encoder_message():
    with pytest.raises(ValueError, match="unknown image encoder 'resnet9000'.*built-in"):
        build_encoder("resnet9000", "image")
    with pytest.raises(ValueError, match="text encoder"):
        build_encoder("minilm", "image")


# ---------------------------------------------------------------------------------------------------------
# feature cache
class _Counting:
    def __init__(self, enc):
        self.enc, self.calls = enc, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, batch):
        self.calls += 1
        return self.enc.encode(batch)


def test_feature_cache_hit_corruption_and_mismatch(tiny_models, digits, tmp_path):
    enc = _Counting(HFEncoder(tiny_models[0], "text", device="cpu"))
    caps = digits.captions[:20]
    fp = D.fingerprint(caps)
    first = cached_features(enc, caps, fp, tmp_path, batch_size=8, progress=False)
    calls = enc.calls
    assert calls == 3 and set(first) == set(enc.layer_names)
    again = cached_features(enc, caps, fp, tmp_path, batch_size=8, progress=False)
    assert enc.calls == calls  # served from the cache
    for k in first:
        assert torch.equal(first[k], again[k])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    path = again.meta["path"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a truncated file (killed writer, full disk)
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = cached_features(enc, caps, fp, tmp_path, batch_size=8, progress=False)
    assert enc.calls == 2 * calls and torch.equal(rebuilt["layer2"], first["layer2"])

    # A file whose header claims the right description but whose tensors are wrong is not trusted either.
    from safetensors.torch import save_file

    meta = json.loads(open(path[: -len(".safetensors")] + ".json").read())
    save_file({k: torch.zeros(5, 16) for k in first}, path, metadata={"structure_ops": json.dumps(meta)})
    with pytest.warns(UserWarning, match="does not match"):
        cached_features(enc, caps, fp, tmp_path, batch_size=8, progress=False)
    assert enc.calls == 3 * calls
    assert load_features(path).n == 20


def test_load_features_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_features(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_features(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------------------
# layer selection
def test_layer_scores_match_direct_mutual_knn(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 8, generator=g)
    img = {f"i{j}": base @ torch.randn(8, 6, generator=g) + j * torch.randn(40, 6, generator=g) for j in range(3)}
    txt = {f"t{j}": base @ torch.randn(8, 5, generator=g) + j * torch.randn(40, 5, generator=g) for j in range(2)}
    s = score_layers(img, txt, k=4, subset=None)
    for i, a in enumerate(img):
        for j, b in enumerate(txt):
            # same neighbour sets: equal hit counts (the direct op returns the fp32 of the same ratio)
            assert float(s.scores[i, j]) == pytest.approx(float(so.mutual_knn(img[a], txt[b], 4)), rel=1e-6)
    bi, bt = divmod(int(s.scores.argmax()), 2)
    assert s.best() == (f"i{bi}", f"t{bt}")
    assert s.last() == ("i2", "t1") and s.pick("best") == s.best()
    with pytest.raises(ValueError, match="'best' or 'last'"):
        s.pick("first")
    c = score_layers(img, txt, metric="cka", subset=30)
    assert c.n == 30 and c.k is None and torch.all((c.scores > 0) & (c.scores <= 1))
    s.save(tmp_path)
    back = LayerScores.from_json(json.loads((tmp_path / "layer_scores.json").read_text()))
    assert torch.equal(back.scores, s.scores) and back.best() == s.best()
    assert len((tmp_path / "layer_scores.csv").read_text().splitlines()) == 1 + 6


def test_best_layer_is_the_argmax():
    s = LayerScores(torch.tensor([[0.1, 0.5], [0.5, 0.2]]), ["a", "b"], ["x", "y"], "mutual_knn", 3, 10)
    assert s.best() == ("a", "y")  # first maximum in row-major order


# ---------------------------------------------------------------------------------------------------------
# heads
def test_mlp_head_starts_linear_and_residual_trains():
    torch.manual_seed(0)
    head = MLPHead(12, 6, rank=4, dropout=0.0)
    x = torch.randn(9, 12)
    torch.testing.assert_close(head(x), head.proj(x))  # W₂ = 0: the output is P x at initialisation
    w = head.proj.weight
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)  # orthogonal rows
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        head(x).pow(2).sum().backward()
        if step == 0:
            assert head.up.weight.grad.abs().sum() > 0  # the gate is open: W₂ learns from step 1
        opt.step()
    assert head.down.weight.grad.abs().sum() > 0  # ... and W₁ once W₂ ≠ 0
    assert head.gate_logit.grad is not None and head.gate_logit.grad != 0
    closed = MLPHead(12, 6, rank=4, gate_init=1e-12)  # ≈ the public code's sigmoid(−∞) gate
    closed(x).pow(2).sum().backward()
    assert closed.up.weight.grad.abs().max() < 1e-9
    with pytest.raises(ValueError, match="head must be one of"):
        build_head("transformer", 3, 3)


# ---------------------------------------------------------------------------------------------------------
# trainer
def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    return (torch.tanh(z @ torch.randn(6, 20, generator=g)), torch.tanh(z @ torch.randn(6, 14, generator=g)))


def _trainer(tmp_path, **kw):
    xi, xt = _toy()
    cfg = TrainConfig(**{"dim": 8, "lam": 10.0, "warmup": 3, "lr": 3e-3, "epochs": 12, "batch_size": 32,
                         "patience": 50, "head": "mlp", "rank": 4, "checkpoint_every": 2, **kw})
    return Trainer(cfg, xi[:72], xt[:72], xi[72:], xt[72:], out_dir=tmp_path, progress=False)


def test_training_reduces_validation_loss(tmp_path):
    res = _trainer(tmp_path, head="linear", epochs=30).fit()
    assert res.history[-1]["train_clip"] < res.history[0]["train_clip"]
    assert res.best_val < res.history[0]["val_loss"]
    assert res.history[0]["lambda"] < 10.0 == res.history[-1]["lambda"]  # λ warm-up
    assert json.loads((tmp_path / "history.json").read_text())["history"] == res.history


def test_resume_after_kill_is_exact(tmp_path):
    full = _trainer(tmp_path / "a").fit()
    _trainer(tmp_path / "b").fit(stop_after_epoch=5)  # "killed" after epoch 5 (checkpoint written)
    resumed = _trainer(tmp_path / "b").fit(resume=True)
    assert [h["epoch"] for h in resumed.history] == list(range(1, 13))
    assert resumed.history == full.history
    for a, b in zip(full.image_head.state_dict().values(), resumed.image_head.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="config differs"):
        _trainer(tmp_path / "b", lam=1.0).fit(resume=True)


def test_early_stopping_and_best_weights(tmp_path):
    res = _trainer(tmp_path, lr=0.3, epochs=200, patience=3, head="linear").fit()
    assert res.stopped_early and len(res.history) == res.best_epoch + 3
    assert res.best_val == min(h["val_loss"] for h in res.history)


def test_lr_range_test_and_unimodal_extras(tmp_path):
    t = _trainer(tmp_path, lr=None, epochs=2)
    lr, curve = t.lr_range_test(steps=40)
    assert curve[4][0] / 5 <= lr <= curve[-1][0] / 5 and curve[0][0] < curve[-1][0]  # skips the EMA warm-up
    losses = [c[1] for c in curve]
    assert min(losses) < losses[0]  # the sweep did reach learning rates that train
    xi, xt = _toy(40, seed=1)
    cfg = TrainConfig(dim=8, lr=1e-2, epochs=2, batch_size=32, warmup=0, unimodal_only=True)
    res = Trainer(cfg, *_toy(64), *_toy(16, seed=2), image_extra=xi, text_extra=xt, progress=False).fit()
    assert res.history[-1]["train_structure"] > 0
    with pytest.raises(ValueError, match="unimodal_only=True needs"):
        Trainer(cfg, *_toy(64), *_toy(16), progress=False)


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        TrainConfig(epochs=0)


# ---------------------------------------------------------------------------------------------------------
# evaluation
def test_retrieval_and_zero_shot():
    e = torch.eye(4)
    assert all(v == 1.0 for v in retrieval(e, e, [0, 1, 2, 3]).values())
    # captions 0 and 1 both belong to image 0; caption 2's nearest image is wrong
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.1], [0.9, 0.0], [1.0, 0.05]])
    r = retrieval(img, txt, [0, 0, 1], ks=(1, 2))
    assert r["t2i_R@1"] == pytest.approx(2 / 3) and r["t2i_R@2"] == 1.0
    assert r["i2t_R@1"] == 0.5 and r["i2t_R@2"] == 1.0  # image 1's own caption ranks second
    prompts = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]])  # 2 classes × 2 templates
    cls = class_embeddings(prompts, 2)
    acc = zero_shot(torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 0.0]]), cls, [0, 1, 1], topk=(1, 2))
    assert acc == {"top1": pytest.approx(2 / 3)}  # top-2 of 2 classes is always a hit: not reported
    with pytest.raises(ValueError, match="do not split"):
        class_embeddings(prompts[:3], 2)


# ---------------------------------------------------------------------------------------------------------
# the command line, end to end on tiny models
def test_cli_pipeline(tiny_models, captions_dir, capsys):
    bert, vit = tiny_models
    run = str(captions_dir / "run")
    assert cli(["extract", "--captions", str(captions_dir / "pairs.csv"), "--vision", vit, "--text", bert, "--out", run,
                "--zero-shot", str(captions_dir / "zs"), "--template", "a {c}.", "--template", "the digit {c}.",
                "--val", "0.2", "--test", "10"]) == 0
    m = json.loads(open(os.path.join(run, "manifest.json")).read())
    assert {k: len(v) for k, v in m["splits"].items()} == {"train": 38, "val": 12, "test": 10}
    assert not set(m["splits"]["train"]) & set(m["splits"]["test"])
    assert cli(["train", "--run", run, "--layers", "best"]) == 2
    assert "select-layers" in capsys.readouterr().err
    assert cli(["select-layers", "--run", run, "--k", "3"]) == 0
    assert os.path.isfile(os.path.join(run, "layer_scores.png"))
    args = ["train", "--run", run, "--epochs", "5", "--warmup", "2", "--dim", "8", "--lr", "1e-2", "--head", "mlp", "--name", "m"]
    assert cli(args) == 0
    assert cli(["evaluate", "--run", run]) == 0
    metrics = json.loads(open(os.path.join(run, "metrics.json")).read())["m"]["test"]
    assert 0.0 <= metrics["t2i_R@1"] <= metrics["t2i_R@5"] <= metrics["t2i_R@10"] <= 1.0
    assert metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] and metrics["layers"] == json.loads(
        open(os.path.join(run, "layer_scores.json")).read())["best"]
    # resume of a finished run trains no more and gives the same heads
    before = open(os.path.join(run, "train", "m", "heads.safetensors"), "rb").read()
    assert cli([*args, "--resume"]) == 0
    assert open(os.path.join(run, "train", "m", "heads.safetensors"), "rb").read() == before


def test_cli_precomputed_features_and_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    xi, xt = _toy(50)
    save_file({"a": xi, "b": xi * 2}, str(tmp_path / "img.safetensors"))
    save_file({"t": xt}, str(tmp_path / "txt.safetensors"))
    run = str(tmp_path / "run")
    assert cli(["extract", "--image-features", str(tmp_path / "img.safetensors"), "--text-features",
                str(tmp_path / "txt.safetensors"), "--out", run]) == 0
    assert cli(["train", "--run", run, "--layers", "b,t", "--epochs", "3", "--dim", "4", "--lr", "1e-2"]) == 0
    assert cli(["train", "--run", run, "--layers", "zz,t", "--epochs", "3"]) == 2
    assert "unknown image layer 'zz'" in capsys.readouterr().err
    save_file({"t": xt[:10]}, str(tmp_path / "short.safetensors"))
    assert cli(["extract", "--image-features", str(tmp_path / "img.safetensors"), "--text-features",
                str(tmp_path / "short.safetensors"), "--out", run]) == 2
    assert "rows must be paired" in capsys.readouterr().err
    assert cli(["extract", "--captions", str(tmp_path / "nope.csv"), "--out", run]) == 2
    assert "captions file not found" in capsys.readouterr().err
    assert cli(["select-layers", "--run", str(tmp_path / "empty")]) == 2
    assert "manifest.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--help"])
    assert "select-layers" in capsys.readouterr().out


def test_torchrun_training_matches_single_process(tmp_path):
    """`torchrun … structure-ops train` on 2 gloo ranks (uneven shards) trains the same heads as one process."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    xi, xt = _toy(90)
    save_file({"a": xi}, str(tmp_path / "i.safetensors"))
    save_file({"t": xt}, str(tmp_path / "t.safetensors"))
    assert cli(["extract", "--image-features", str(tmp_path / "i.safetensors"), "--text-features",
                str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "one")]) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    args = ["train", "--layers", "a,t", "--epochs", "4", "--dim", "8", "--lr", "1e-2", "--batch-size", "25", "--warmup", "2"]
    assert cli([*args, "--run", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python", "--",
           sys.executable, "-m", "structure_ops", *args, "--run", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "train" / "linear_lam10_axt" / "heads.safetensors"))
    two = load_file(str(tmp_path / "two" / "train" / "linear_lam10_axt" / "heads.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


def test_load_selected_layers_and_pick_layers(tmp_path):
    from safetensors.torch import save_file

    from structure_ops.train.pipeline import pick_layers, read_manifest

    xi, xt = _toy(30)
    save_file({"a": xi, "b": xi[:, :3].contiguous()}, str(tmp_path / "i.safetensors"))
    save_file({"t": xt, "u": xt[:, :2].contiguous()}, str(tmp_path / "t.safetensors"))
    only = load_features(tmp_path / "i.safetensors", ["b"])
    assert list(only) == ["b"] and torch.equal(only["b"], xi[:, :3])
    with pytest.raises(ValueError, match=r"unknown layers \['c'\]"):
        load_features(tmp_path / "i.safetensors", ["c"])
    run = tmp_path / "run"
    assert cli(["extract", "--image-features", str(tmp_path / "i.safetensors"), "--text-features",
                str(tmp_path / "t.safetensors"), "--out", str(run)]) == 0
    assert pick_layers(run, "last") == ("b", "u")  # no layer_scores.json needed for "last"
    assert pick_layers(run, " a , t") == ("a", "t")
    with pytest.raises(FileNotFoundError, match="select-layers"):
        pick_layers(run, "best")
    with pytest.raises(ValueError, match="unknown text layer 'v'"):
        pick_layers(run, "a,v", read_manifest(run))
    with pytest.raises(ValueError, match="layer rule must be"):
        pick_layers(run, "first")
