"""Calibrated layer selection (select-layers --calibrate): permutation nulls of mutual kNN from the kNN lists
computed once per layer, of CKA / RBF CKA from the kernels computed once per layer and of CKNNA from the kNN lists
and kernel values computed once per layer, per pair and for the max over pairs."""

from __future__ import annotations

import json

import pytest
import torch

from structure_ops import functional as so
from structure_ops.train.selection import LayerScores, calibrate, score_layers


def _layers(n, dims, seed, base=None, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {f"l{i}": torch.randn(n, d, generator=g) for i, d in enumerate(dims)}
    return {f"l{i}": base @ torch.randn(base.shape[1], d, generator=g) + noise * torch.randn(n, d, generator=g)
            for i, d in enumerate(dims)}


def test_permuted_neighbour_lists_equal_a_new_knn_search():
    """π⁻¹(N(π(i))) is the kNN list of the permuted rows: the null needs no recomputation."""
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k = 6
    idx = so.knn(x, k)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(4))
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(60))
    fresh = so.knn(x[perm], k)
    assert torch.equal(inv[idx[perm]].sort(1).values, fresh.sort(1).values)


def test_unrelated_features_calibrate_to_chance():
    n, k, P = 200, 8, 200
    img, txt = _layers(n, [6, 12, 24], 0), _layers(n, [6, 12, 24], 1)
    s = score_layers(img, txt, k=k, subset=None, permutations=P, seed=0)
    cal = s.calibration
    chance = k / (n - 1)
    assert cal["chance"] == pytest.approx(chance)
    null_mean = torch.tensor(cal["null_mean"])
    # The null mean of every pair is mutual kNN's chance level k/(n−1) (binomial-ish SE over n·P draws).
    se = (chance * (1 - chance) / (n * k * P)) ** 0.5
    assert (null_mean - chance).abs().max() < 6 * se + 0.002
    calibrated = torch.tensor(cal["calibrated"])
    assert s.scores.min() > 0.025 and calibrated.abs().max() < 0.015  # raw ≈ chance ≈ 0.04, calibrated ≈ 0
    # The max over the 9 pairs is inflated above chance, and the aggregation-aware null accounts for it.
    assert cal["best"]["raw"] > chance and cal["best"]["null_max_mean"] > float(null_mean.mean())
    assert cal["best"]["p_value"] > 0.05
    p_max = torch.tensor(cal["p_max"])
    assert (p_max >= torch.tensor(cal["p_value"])).all()  # family-wise p is never smaller than the per-pair one
    assert float(p_max.min()) > 0.05


def test_related_features_are_significant():
    n, k, P = 200, 8, 100
    base = torch.randn(n, 4, generator=torch.Generator().manual_seed(7))
    img = _layers(n, [6, 12], 0, base, noise=0.3)
    txt = _layers(n, [8, 16], 1, base, noise=0.3)
    txt["noise"] = torch.randn(n, 10, generator=torch.Generator().manual_seed(9))  # one unrelated text layer
    s = score_layers(img, txt, k=k, subset=None, permutations=P, seed=0)
    cal = s.calibration
    p, z = torch.tensor(cal["p_value"]), torch.tensor(cal["z"])
    assert (p[:, :2] == 1 / (P + 1)).all() and (z[:, :2] > 10).all()  # every related pair beats every null draw
    assert (torch.tensor(cal["p_max"])[:, :2] == 1 / (P + 1)).all()
    assert cal["best"]["p_value"] == 1 / (P + 1) and cal["best"]["calibrated"] > 0.2
    assert (p[:, 2] > 0.01).all()  # the unrelated layer is not significant


def test_calibrate_paths_agree(monkeypatch):
    """The all-masks, per-layer-mask and intersection (large n) paths give the same null."""
    from structure_ops.train import selection

    g = torch.Generator().manual_seed(2)
    xi = [so.knn(torch.randn(40, 4, generator=g), 4) for _ in range(2)]
    xt = [so.knn(torch.randn(40, 3, generator=g), 4) for _ in range(3)]
    ref, ref_max = calibrate(xi, xt, permutations=4, seed=1)
    monkeypatch.setattr(selection, "_MASKS_MAX_BYTES", 0)
    per_layer = calibrate(xi, xt, permutations=4, seed=1)
    monkeypatch.setattr(selection, "_DENSE_MAX_N", 10)
    chunked = calibrate(xi, xt, permutations=4, seed=1)
    for null, null_max in (per_layer, chunked):
        assert torch.equal(null, ref) and torch.equal(null_max, ref_max)
    assert ref.std() > 0


def test_calibrate_against_recomputed_null_and_json_round_trip(tmp_path):
    """Each null draw equals mutual kNN of freshly searched kNN lists of the permuted text rows."""
    n, k = 50, 5
    img, txt = _layers(n, [4], 0), _layers(n, [3, 5], 1)
    xi = [so.knn(img["l0"], k)]
    xt = [so.knn(t, k) for t in txt.values()]
    null, null_max = calibrate(xi, xt, permutations=3, seed=5)
    g = torch.Generator().manual_seed(5)
    for p in range(3):
        perm = torch.randperm(n, generator=g)
        for j, t in enumerate(txt.values()):
            want = so.mutual_knn_from_indices(xi[0], so.knn(t[perm], k))
            assert float(null[p, 0, j]) == pytest.approx(float(want), abs=1e-12)
        assert float(null_max[p]) == float(null[p].max())
    s = score_layers(img, txt, k=k, subset=None, permutations=20)
    s.save(tmp_path)
    back = LayerScores.from_json(json.loads((tmp_path / "layer_scores.json").read_text()))
    assert back.calibration["best"] == s.calibration["best"]
    header = (tmp_path / "layer_scores.csv").read_text().splitlines()[0]
    assert header == "image_layer,text_layer,mutual_knn,calibrated,z,p_value,p_max"
    with pytest.raises(ValueError, match="permutations must be an int >= 0"):
        score_layers(img, txt, metric="cka", subset=None, permutations=-1)


def test_select_layers_calibrate_cli(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from structure_ops.cli import main as cli

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    save_file({"a": x, "b": torch.randn(120, 6, generator=g)}, str(tmp_path / "img.safetensors"))
    save_file({"t": x @ torch.randn(6, 5, generator=g)}, str(tmp_path / "txt.safetensors"))
    run = str(tmp_path / "run")
    assert cli(["extract", "--image-features", str(tmp_path / "img.safetensors"), "--text-features",
                str(tmp_path / "txt.safetensors"), "--out", run]) == 0
    assert cli(["select-layers", "--run", run, "--k", "5", "--calibrate", "--permutations", "30"]) == 0
    out = capsys.readouterr().out
    assert "calibrated (30 permutations" in out and "p = 0.0323" in out  # 1/31: the related pair beats every draw
    cal = json.loads((tmp_path / "run" / "layer_scores.json").read_text())["calibration"]
    assert cal["p_value"][0][0] == 1 / 31 and cal["p_value"][1][0] > 0.05  # layer a related, layer b not
    for metric in ("rbf_cka", "cknna", "cka"):
        assert cli(["select-layers", "--run", run, "--metric", metric, "--k", "5", "--calibrate", "--permutations",
                    "30", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert f"({metric}" in out and "calibrated (30 permutations)" in out and "p = 0.0323" in out
        saved = json.loads((tmp_path / "run" / "layer_scores.json").read_text())
        cal = saved["calibration"]
        assert saved["metric"] == metric and cal["chance"] is None
        assert cal["p_value"][0][0] == 1 / 31 and cal["p_value"][1][0] > 0.05
        header = (tmp_path / "run" / "layer_scores.csv").read_text().splitlines()[0]
        assert header == f"image_layer,text_layer,{metric},calibrated,z,p_value,p_max"
    assert saved["params"]["kernel"] == "linear"
    assert cli(["select-layers", "--run", run, "--metric", "rbf_cka", "--sigma-frac", "0"]) == 2
    assert "--sigma-frac must be a positive number" in capsys.readouterr().err
    assert cli(["select-layers", "--run", run, "--metric", "rbf_cka", "--sigma-frac", "0.8"]) == 0
    params = json.loads((tmp_path / "run" / "layer_scores.json").read_text())["params"]
    assert params["sigma_frac"] == 0.8 and set(params["sigma"]) == {"image:a", "image:b", "text:t"}


@pytest.mark.parametrize("metric", ["rbf_cka", "rbf_cka_unbiased", "cknna"])
def test_kernel_metrics_unrelated_calibrate_to_zero(metric):
    """Unrelated layers: the raw scores can be far from 0 (biased RBF CKA of two independent 24-wide Gaussian
    layers is ≈ 0.77 at n = 200), the calibrated ones are ≈ 0 and nothing is significant."""
    n, P = 200, 60
    img, txt = _layers(n, [6, 24], 0), _layers(n, [6, 24], 1)
    s = score_layers(img, txt, metric=metric, k=8, subset=None, permutations=P, seed=0)
    cal = s.calibration
    calibrated, z = torch.tensor(cal["calibrated"]), torch.tensor(cal["z"])
    assert calibrated.abs().max() < 0.03 and z.abs().max() < 3.5
    assert float(torch.tensor(cal["p_max"]).min()) > 0.05 and cal["best"]["p_value"] > 0.05
    assert (torch.tensor(cal["p_max"]) >= torch.tensor(cal["p_value"])).all()
    if metric == "rbf_cka":
        assert float(s.scores.max()) > 0.5  # width-inflated raw score
        assert cal["best"]["null_max_mean"] > 0.5 and abs(cal["best"]["calibrated"]) < 0.02


@pytest.mark.parametrize("metric", ["rbf_cka", "cknna", "cka_unbiased"])
def test_kernel_metrics_related_are_significant(metric):
    n, P = 200, 60
    base = torch.randn(n, 4, generator=torch.Generator().manual_seed(7))
    img = _layers(n, [6, 12], 0, base, noise=0.3)
    txt = _layers(n, [8, 16], 1, base, noise=0.3)
    txt["noise"] = torch.randn(n, 10, generator=torch.Generator().manual_seed(9))
    s = score_layers(img, txt, metric=metric, k=8, subset=None, permutations=P, seed=0)
    cal = s.calibration
    p, z = torch.tensor(cal["p_value"]), torch.tensor(cal["z"])
    assert (p[:, :2] == 1 / (P + 1)).all() and (z[:, :2] > 10).all()
    assert (torch.tensor(cal["p_max"])[:, :2] == 1 / (P + 1)).all()
    assert cal["best"]["p_value"] == 1 / (P + 1) and cal["best"]["calibrated"] > 0.3
    assert (torch.tensor(cal["p_max"])[:, 2] > 0.01).all()  # the unrelated text layer
    assert s.best()[1] != "noise"
