"""Training defaults for the low-data regime (issue: λ warm-up, batch size, best epoch, warnings, NaN).

The end-to-end check that the default flags come within 10 % (R@1) of a tuned configuration on a fresh set of
a few hundred pairs with real encoders takes minutes: it is ``python/low_data_defaults.py`` (numbers in
docs/training.md). These tests pin the mechanisms on toy features in seconds.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from structure_ops.train.trainer import DEFAULT_WARMUP_FRAC, TrainConfig, Trainer, TrainingWarning, auto_batch_size


def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    return torch.tanh(z @ torch.randn(6, 20, generator=g)), torch.tanh(z @ torch.randn(6, 14, generator=g))


def _fit(n_train=72, val=None, **kw):
    xi, xt = _toy(n_train + 24)
    vi, vt = val if val is not None else (xi[n_train:], xt[n_train:])
    cfg = TrainConfig(**{"dim": 8, "lr": 3e-3, "epochs": 12, "patience": 50, **kw})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Trainer(cfg, xi[:n_train], xt[:n_train], vi, vt, progress=False)
        res = t.fit()
    return t, res, [str(w.message) for w in caught if issubclass(w.category, TrainingWarning)]


def test_auto_batch_size_adapts_to_the_training_set():
    assert auto_batch_size(10) == 10 and auto_batch_size(32) == 32
    assert auto_batch_size(100) == 32 and auto_batch_size(360) == 32 and auto_batch_size(600) == 64
    assert auto_batch_size(3000) == 512
    assert auto_batch_size(118_000) == 4096  # COCO: the paper's batch
    for n in (3, 50, 300, 5000, 10**6):
        assert 2 <= auto_batch_size(n) <= min(n, 4096)
        assert n < 64 or n / auto_batch_size(n) >= 4  # several steps per epoch on any small set


def test_warmup_given_in_steps_epochs_or_as_a_fraction():
    assert TrainConfig(warmup=1000).warmup_steps(7) == 1000  # the paper's form keeps its meaning
    assert TrainConfig(warmup_epochs=2.5).warmup_steps(4) == 10
    assert TrainConfig(epochs=100, warmup_frac=0.1).warmup_steps(3) == 30
    assert TrainConfig(epochs=100).warmup_steps(3) == round(DEFAULT_WARMUP_FRAC * 300)
    with pytest.raises(ValueError, match="one way"):
        TrainConfig(warmup=10, warmup_frac=0.1)
    with pytest.raises(ValueError, match="warmup_frac must be in"):
        TrainConfig(warmup_frac=1.5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0)


def test_default_batch_and_warmup_in_a_run():
    t, res, notes = _fit(epochs=20)
    assert res.batch_size == t.batch_size == 32 and t.steps_per_epoch == 3  # 72 pairs: 32 + 32 + 8
    assert res.warmup_steps == round(DEFAULT_WARMUP_FRAC * 20 * 3) == 3
    assert not notes


def test_batch_larger_than_the_training_set_is_lowered_with_a_warning():
    t, res, notes = _fit(batch_size=4096, warmup=2)
    assert res.batch_size == 72 and t.steps_per_epoch == 1
    assert any("larger than the 72 training pairs" in n for n in notes) and notes == res.notes


def test_warmup_longer_than_the_run_warns_and_is_never_the_best_epoch():
    # the case: --warmup 1000 --batch-size 4096 on a small set (1 step per epoch, 12 epochs)
    _, res, notes = _fit(warmup=1000, batch_size=4096)
    assert any("not shorter than the run" in n for n in notes)
    assert any("no epoch reached the full λ" in n for n in notes)
    assert res.best_epoch == res.history[-1]["epoch"]  # the closest to the full λ, not an early ramp epoch


def test_best_epoch_and_patience_ignore_the_ramp():
    # Validation pairs that are mismatched: the better the heads fit, the worse the validation loss, so the
    # lowest validation loss would be the earliest epoch; the ramp epochs (λ_t < λ) must not be picked, nor
    # use up the patience.
    xi, xt = _toy(96)  # the training pairs, with the texts of the validation rows reversed
    _, res, notes = _fit(val=(xi[:24], xt[:24].flip(0)), warmup_epochs=4, patience=2, epochs=40, lr=3e-2)
    ramp = [h for h in res.history if not h["full_lambda"]]
    assert [h["epoch"] for h in ramp] == [1, 2, 3, 4]  # 3 steps per epoch; λ_t reaches λ at step 13 (epoch 5)
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    assert best["full_lambda"] and best["lambda"] == 10.0
    assert res.stopped_early and len(res.history) >= len(ramp) + 1 + 2  # patience counted after the ramp only


def test_restored_epoch_near_initialisation_warns():
    xi, xt = _toy(96)
    _, res, notes = _fit(val=(xi[:24], xt[:24].flip(0)), warmup=0, lam=0.0, patience=30, epochs=30, lr=3e-2)
    assert res.best_epoch <= 2 and any("close to the initialisation" in n for n in notes)


def test_nan_features_and_a_diverging_loss_are_errors():
    xi, xt = _toy()
    bad = xi.clone()
    bad[5, 3] = float("nan")
    cfg = TrainConfig(dim=8, lr=1e-2, epochs=2, warmup=0)
    with pytest.raises(ValueError, match="train features.*NaN/Inf.*row 5"):
        Trainer(cfg, bad[:72], xt[:72], xi[72:], xt[72:], progress=False)
    with pytest.raises(ValueError, match="val features"):
        Trainer(cfg, xi[:72], xt[:72], bad[:24] * float("inf"), xt[72:], progress=False)

    class Diverging(Trainer):  # heads whose output is NaN (what an exploding run ends in)
        def _heads(self):
            hi, ht = super()._heads()
            with torch.no_grad():
                hi.bias[0] = float("nan")
            return hi, ht

    with pytest.raises(ValueError, match="training diverged: the loss is nan at epoch 1, step 1"):
        Diverging(cfg, xi[:72], xt[:72], xi[72:], xt[72:], progress=False).fit()
