"""CSA (train --method csa): the closed-form CCA baseline against a float64 solution of its defining equations."""

from __future__ import annotations

import json

import pytest
import torch

from structure_ops.train.csa import fit_csa


def _paired(n=400, dx=7, dy=5, latent=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=g, dtype=torch.float64)
    x = z @ torch.randn(latent, dx, generator=g, dtype=torch.float64) + 0.7 * torch.randn(n, dx, generator=g, dtype=torch.float64) + 3.0
    y = z @ torch.randn(latent, dy, generator=g, dtype=torch.float64) + 0.7 * torch.randn(n, dy, generator=g, dtype=torch.float64) - 1.0
    return x, y


def _cov(a, b):
    return (a - a.mean(0)).T @ (b - b.mean(0)) / (a.shape[0] - 1)


def test_csa_solves_the_cca_eigenproblem():
    x, y = _paired()
    fit = fit_csa(x, y, dim=4, ridge=0.0)
    cxx, cyy, cxy = _cov(x, x), _cov(y, y), _cov(x, y)
    # Generalized eigenproblem C_xy C_yy⁻¹ C_yx w = ρ² C_xx w, made symmetric with the Cholesky factor of C_xx.
    L = torch.linalg.cholesky(cxx)
    Li = torch.linalg.inv(L)
    a = Li @ cxy @ torch.linalg.solve(cyy, cxy.T) @ Li.T
    rho2, v = torch.linalg.eigh((a + a.T) / 2)
    rho = rho2.flip(0).clamp_min(0).sqrt()[:4]
    assert torch.allclose(fit.correlations, rho, atol=1e-10)
    assert (fit.correlations[:-1] >= fit.correlations[1:]).all() and fit.correlations[2] > 0.5 > fit.correlations[3]
    for i in range(4):  # each direction satisfies its equation
        w = fit.w_x[:, i]
        lhs = cxy @ torch.linalg.solve(cyy, cxy.T @ w)
        assert torch.allclose(lhs, fit.correlations[i] ** 2 * (cxx @ w), atol=1e-10)
    # The projections: unit variance, uncorrelated within a side, correlated pairwise by ρ (sign-consistent).
    zx, zy = (x - fit.mu_x) @ fit.w_x, (y - fit.mu_y) @ fit.w_y
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(_cov(zx, zx), eye, atol=1e-10) and torch.allclose(_cov(zy, zy), eye, atol=1e-10)
    assert torch.allclose(_cov(zx, zy), torch.diag(fit.correlations), atol=1e-10)
    assert torch.allclose(zx.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-10)


def test_csa_heads_and_limits():
    x, y = _paired(n=60, dx=9, dy=4)
    fit = fit_csa(x.float(), y.float(), dim=16)
    assert fit.w_x.shape == (9, 4) and fit.w_y.shape == (4, 4)  # at most min(d_x, d_y) directions
    hi, ht = fit.heads()
    with torch.no_grad():
        assert torch.allclose(hi(x.float()).double(), (x - fit.mu_x) @ fit.w_x, atol=1e-4)
        assert torch.allclose(ht(y.float()).double(), (y - fit.mu_y) @ fit.w_y, atol=1e-4)
    wide = fit_csa(torch.randn(10, 30), torch.randn(10, 20), dim=8)  # more features than samples: ridge keeps it finite
    assert torch.isfinite(wide.w_x).all() and wide.correlations.max() <= 1 + 1e-9
    with pytest.raises(ValueError, match="same n"):
        fit_csa(torch.randn(10, 3), torch.randn(11, 3), dim=2)
    with pytest.raises(ValueError, match="NaN"):
        fit_csa(torch.full((10, 3), float("nan")), torch.randn(10, 3), dim=2)


def test_train_method_csa_cli(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from structure_ops.cli import main as cli

    x, y = _paired(n=200, dx=8, dy=6, latent=4, seed=1)
    save_file({"a": x.float().contiguous()}, str(tmp_path / "img.safetensors"))
    save_file({"t": y.float().contiguous()}, str(tmp_path / "txt.safetensors"))
    run = str(tmp_path / "run")
    assert cli(["extract", "--image-features", str(tmp_path / "img.safetensors"), "--text-features",
                str(tmp_path / "txt.safetensors"), "--out", run]) == 0
    assert cli(["train", "--run", run, "--method", "csa", "--layers", "a,t", "--dim", "4"]) == 0
    assert "fitted CSA 'csa_k4_axt': 4 canonical directions" in capsys.readouterr().out
    assert cli(["evaluate", "--run", run, "--name", "csa_k4_axt"]) == 0
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())["csa_k4_axt"]["test"]
    assert rec["heads"]["config"]["dim"] == 4 and rec["t2i_R@1"] > 5 * rec["chance"]["t2i_R@1"]
    assert cli(["train", "--run", run, "--method", "csa", "--layers", "a,t", "--resume"]) == 2


def _clustered(n, seed, dx=64, dy=48, latent=12, classes=10):
    """Paired views of a clustered latent (a nonlinear image view, a noisy linear text view): real neighbourhood
    structure, and more features than CSA directions, so that the refinement can pick another subspace."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(classes, latent, generator=torch.Generator().manual_seed(99))
    z = centres[torch.randint(0, classes, (n,), generator=g)] + 0.6 * torch.randn(n, latent, generator=g)
    a = torch.randn(latent, dx, generator=torch.Generator().manual_seed(1))
    b = torch.randn(latent, dy, generator=torch.Generator().manual_seed(2))
    x = torch.tanh(z @ a) + 0.3 * torch.randn(n, dx, generator=g)
    y = (z + 0.5 * torch.randn(n, latent, generator=g)) @ b + 0.3 * torch.randn(n, dy, generator=g)
    return x, y


def _r_s(fit, x, y, tau=0.2):
    """½[R_S(x, z_x) + R_S(y, z_y)] by the float64 oracle (independent of the op used in the refinement)."""
    from structure_ops.reference import structure_loss

    zx, zy = (x.double() - fit.mu_x) @ fit.w_x, (y.double() - fit.mu_y) @ fit.w_y
    kw = dict(levels=1, temperature=tau, weighting="inverse")
    return 0.5 * float(structure_loss(x.double(), zx, **kw) + structure_loss(y.double(), zy, **kw))


def test_csa_structure_lowers_r_s_without_collapsing_retrieval():
    from structure_ops.train.csa import RefineConfig, refine_csa
    from structure_ops.train.evaluate import retrieval, retrieval_chance

    x, y = _clustered(600, 0)
    xt, yt = _clustered(300, 1)
    fit = fit_csa(x, y, dim=4)
    ref, hist = refine_csa(fit, x, y, RefineConfig(epochs=20, lr=5e-3, seed=0))
    assert len(hist) == 20 and hist[-1]["structure"] < hist[0]["structure"]
    # the public code's final whitening: unit covariance of both projections on the training pairs
    for w, v, mu in ((ref.w_x, x, ref.mu_x), (ref.w_y, y, ref.mu_y)):
        z = (v.double() - mu) @ w
        assert torch.allclose(z.T @ z / len(z), torch.eye(4, dtype=torch.float64), atol=1e-8)
    # R_S of the final (whitened) maps is lower than CSA's, on the training pairs and on held-out pairs
    assert _r_s(ref, x, y) < 0.9 * _r_s(fit, x, y)
    assert _r_s(ref, xt, yt) < 0.9 * _r_s(fit, xt, yt)

    def r1(f):
        zx, zy = (xt.double() - f.mu_x) @ f.w_x, (yt.double() - f.mu_y) @ f.w_y
        return retrieval(zx.float(), zy.float(), torch.arange(len(xt)))["t2i_R@1"]

    chance = retrieval_chance(range(len(xt)))["t2i_R@1"]
    assert r1(ref) > 0.5 * r1(fit) and r1(ref) > 10 * chance  # no collapse
    # seeded batch order: the same seed gives the same maps, another seed other ones (with more than one batch)
    kw = dict(epochs=3, lr=5e-3, batch_size=128)
    a, _ = refine_csa(fit, x, y, RefineConfig(seed=0, **kw))
    b, _ = refine_csa(fit, x, y, RefineConfig(seed=0, **kw))
    c, _ = refine_csa(fit, x, y, RefineConfig(seed=1, **kw))
    assert torch.equal(a.w_x, b.w_x) and torch.equal(a.w_y, b.w_y) and not torch.allclose(a.w_x, c.w_x)
    with pytest.raises(ValueError, match="the CSA fit maps"):
        refine_csa(fit, y, x)
    with pytest.raises(ValueError, match="lr must be"):
        RefineConfig(lr=0.0)


def test_train_method_csa_structure_cli(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from structure_ops.cli import main as cli

    x, y = _clustered(300, 2)
    save_file({"a": x.contiguous()}, str(tmp_path / "img.safetensors"))
    save_file({"t": y.contiguous()}, str(tmp_path / "txt.safetensors"))
    run = str(tmp_path / "run")
    assert cli(["extract", "--image-features", str(tmp_path / "img.safetensors"), "--text-features",
                str(tmp_path / "txt.safetensors"), "--out", run]) == 0
    assert cli(["train", "--run", run, "--method", "csa+structure", "--layers", "a,t", "--dim", "4",
                "--refine-epochs", "3", "--refine-lr", "5e-3"]) == 0
    out = capsys.readouterr().out
    assert "refine epoch 3:" in out and "fitted CSA + STRUCTURE 'csa-structure_k4_lam10_L1_axt'" in out
    assert cli(["evaluate", "--run", run, "--name", "csa-structure_k4_lam10_L1_axt"]) == 0
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())["csa-structure_k4_lam10_L1_axt"]["test"]
    assert rec["heads"]["config"]["lam"] == 10 and rec["t2i_R@1"] > 3 * rec["chance"]["t2i_R@1"]
    from structure_ops.train.pipeline import load_heads

    assert any("R_S on the training pairs" in n for n in load_heads(rec["heads"]["file"])[2]["notes"])
