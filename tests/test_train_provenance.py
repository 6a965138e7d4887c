"""Provenance and named runs: content-keyed shared feature cache, `cache` command, stale-state refusals,
named training runs with a lock, metrics keyed by name and split, `compare`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import tiny_bert

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from structure_ops.cli import main as cli  # noqa: E402
from structure_ops.train import data as D  # noqa: E402
from structure_ops.train.encoders import HFEncoder  # noqa: E402
from structure_ops.train.features import cached_features, features_dir, list_cache  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "bert"
    tiny_bert(folder, layers=2)
    return folder


class _Counting:
    def __init__(self, enc):
        self.enc, self.inputs = enc, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, batch):
        self.inputs += len(batch)
        return self.enc.encode(batch)


CAPS = [f"a handwritten digit {D.DIGIT_NAMES[i % 10]}, number {i}." for i in range(24)]


def test_cache_key_is_content_not_path(bert, tmp_path, monkeypatch, cache):
    fp = D.fingerprint(CAPS)
    first = cached_features(HFEncoder(str(bert), "text", device="cpu"), CAPS, fp, progress=False)
    assert first.meta["path"].startswith(str(cache / "features"))  # the shared cache, moved by STRUCTURE_OPS_CACHE
    monkeypatch.chdir(bert.parent)
    rel = _Counting(HFEncoder("bert", "text", device="cpu"))  # the same folder by a relative path
    again = cached_features(rel, CAPS, fp, progress=False)
    assert rel.inputs == 0 and again.meta["path"] == first.meta["path"] and again.meta["digest"] == first.meta["digest"]
    # the weights replaced in place: a new entry, extracted again
    copy = tmp_path / "bert2"
    shutil.copytree(bert, copy)
    from transformers import BertModel

    torch.manual_seed(1)
    BertModel(BertModel.config_class.from_pretrained(copy)).save_pretrained(copy)
    other = _Counting(HFEncoder(str(copy), "text", device="cpu"))
    changed = cached_features(other, CAPS, fp, progress=False)
    assert other.inputs == len(CAPS) and changed.meta["key"] != first.meta["key"]
    assert not torch.equal(changed["layer2"], first["layer2"])
    assert len([e for e in list_cache() if e["complete"]]) == 2


def test_cache_command_lists_and_clears(bert, capsys, cache):
    cached_features(HFEncoder(str(bert), "text", device="cpu"), CAPS, D.fingerprint(CAPS), progress=False)
    assert cli(["cache", "dir"]) == 0 and capsys.readouterr().out.strip() == str(features_dir())
    assert cli(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "text bert" in out and "n=24" in out
    assert cli(["cache", "clear"]) == 0 and "removed 1 entries" in capsys.readouterr().out
    assert list_cache() == [] and not list((cache / "features").glob("*.json"))


def _run(tmp_path, n=60, seed=0, name="run"):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    img = {"a": torch.tanh(z @ torch.randn(6, 12, generator=g)), "b": torch.randn(n, 5, generator=g)}
    txt = {"t": torch.tanh(z @ torch.randn(6, 10, generator=g)), "u": torch.randn(n, 4, generator=g)}
    save_file(img, str(tmp_path / f"i{seed}.safetensors"))
    save_file(txt, str(tmp_path / f"t{seed}.safetensors"))
    run = str(tmp_path / name)
    assert cli(["extract", "--image-features", str(tmp_path / f"i{seed}.safetensors"), "--text-features",
                str(tmp_path / f"t{seed}.safetensors"), "--out", run]) == 0
    return run


TRAIN = ["--epochs", "3", "--dim", "4", "--lr", "1e-2", "--warmup", "1"]


def test_named_runs_metrics_by_name_and_split(tmp_path, capsys):
    run = _run(tmp_path)
    assert cli(["train", "--run", run, "--layers", "a,t", *TRAIN]) == 0
    assert cli(["train", "--run", run, "--layers", "a,t", "--lam", "0", *TRAIN]) == 0  # no overwrite: another name
    assert sorted(os.listdir(os.path.join(run, "train"))) == ["linear_lam0_axt", "linear_lam10_axt"]
    capsys.readouterr()
    assert cli(["evaluate", "--run", run]) == 2
    assert "2 training runs (linear_lam0_axt, linear_lam10_axt); pick one with --name" in capsys.readouterr().err
    assert cli(["evaluate", "--run", run, "--name", "linear_lam10_axt"]) == 0
    assert cli(["evaluate", "--run", run, "--name", "linear_lam10_axt", "--split", "val"]) == 0
    assert cli(["evaluate", "--run", run, "--name", "linear_lam0_axt"]) == 0
    metrics = json.loads(open(os.path.join(run, "metrics.json")).read())
    assert sorted(metrics) == ["linear_lam0_axt", "linear_lam10_axt"]
    assert sorted(metrics["linear_lam10_axt"]) == ["test", "val"]  # --split val did not overwrite the test metrics
    r = metrics["linear_lam10_axt"]["test"]
    m = json.loads(open(os.path.join(run, "manifest.json")).read())
    assert r["n_captions"] == r["n_images"] == len(m["splits"]["test"]) == 6
    assert r["chance"]["t2i_R@1"] == pytest.approx(1 / 6) and r["chance"]["i2t_R@5"] == pytest.approx(5 / 6)
    heads = os.path.join(run, "train", "linear_lam10_axt", "heads.safetensors")
    import hashlib

    assert r["heads"]["sha256"] == hashlib.sha256(open(heads, "rb").read()).hexdigest()
    assert r["heads"]["trained_on"]["layers"] == ["a", "t"] and r["heads"]["config"]["lam"] == 10.0
    assert r["heads"]["trained_on"]["image_features"]["digest"] == m["feature_ids"]["image_features"]["digest"]
    per_run = json.loads(open(os.path.join(run, "train", "linear_lam10_axt", "metrics.json")).read())
    assert per_run["test"]["i2t_R@1"] == r["i2t_R@1"]


def test_resume_evaluate_and_best_refuse_stale_state(tmp_path, capsys):
    run = _run(tmp_path)
    assert cli(["train", "--run", run, "--layers", "a,t", "--name", "x", *TRAIN]) == 0
    capsys.readouterr()
    # --resume with other layers: refused (it used to restore heads trained on the old layers)
    assert cli(["train", "--run", run, "--layers", "b,t", "--name", "x", *TRAIN, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "the layers changed" in err and len(err.strip().splitlines()) == 1
    assert cli(["select-layers", "--run", run, "--k", "3"]) == 0
    # the run's features re-extracted from other data: heads, checkpoint and layer scores are stale
    _run(tmp_path, seed=1, name="other")
    shutil.copy(os.path.join(tmp_path, "other", "manifest.json"), os.path.join(run, "manifest.json"))
    for f in ("image", "text"):
        shutil.copy(os.path.join(tmp_path, "other", "features", f"{f}.safetensors"), os.path.join(run, "features", f"{f}.safetensors"))
    capsys.readouterr()
    assert cli(["evaluate", "--run", run, "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "trained on other data: the image features" in err and "re-train" in err
    assert cli(["train", "--run", run, "--layers", "a,t", "--name", "x", *TRAIN, "--resume"]) == 2
    assert "image features" in capsys.readouterr().err
    assert cli(["train", "--run", run, "--layers", "best", *TRAIN]) == 2
    assert "layer_scores.json is stale: the image features" in capsys.readouterr().err
    # a feature file replaced behind the manifest's back
    shutil.copy(os.path.join(tmp_path, "other", "manifest.json"), os.path.join(run, "manifest.json"))
    assert cli(["extract", "--image-features", str(tmp_path / "i0.safetensors"), "--text-features",
                str(tmp_path / "t0.safetensors"), "--out", str(tmp_path / "third")]) == 0
    shutil.copy(tmp_path / "third" / "features" / "image.safetensors", os.path.join(run, "features", "image.safetensors"))
    capsys.readouterr()
    assert cli(["train", "--run", run, "--layers", "a,t", *TRAIN]) == 2
    assert "changed since `extract`" in capsys.readouterr().err


def test_lock_keeps_a_second_writer_out(tmp_path, capsys):
    from filelock import FileLock

    run = _run(tmp_path)
    folder = os.path.join(run, "train", "x")
    os.makedirs(folder)
    with FileLock(os.path.join(folder, ".lock")):  # another process is training "x"
        assert cli(["train", "--run", run, "--layers", "a,t", "--name", "x", *TRAIN]) == 2
    assert "another process is writing the training run" in capsys.readouterr().err
    assert cli(["train", "--run", run, "--layers", "a,t", "--name", "x", *TRAIN]) == 0  # released: it trains


def test_compare_command(tmp_path, capsys):
    run = _run(tmp_path)
    assert cli(["compare", "--run", run, "--layers", "a,t", "--lams", "0", "5", "--seeds", "0", "1", "--epochs", "2",
                "--dim", "4", "--lr", "1e-2", "--warmup", "1"]) == 0
    report = json.loads(open(os.path.join(run, "compare", "results.json")).read())
    assert [c["lam"] for c in report["configurations"].values()] == [0.0, 5.0]
    assert all(len(v) == 2 for v in report["per_seed"].values())
    names = sorted(os.listdir(os.path.join(run, "train")))
    assert names == [f"compare_a-t_lam{lam}_L1_seed{s}" for lam in (0, 5) for s in (0, 1)]
    assert "λ=5" in capsys.readouterr().out
    assert cli(["evaluate", "--run", run, "--name", names[0]]) == 0  # each configuration is a normal named run
