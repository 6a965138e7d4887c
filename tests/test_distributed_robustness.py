"""structure_ops.distributed under misuse, over 2 gloo ranks on the CPU: nothing may hang.

Every case where one rank differs (an unavailable backend, an "auto" that resolves differently, a different
logit_scale, λ or step, trailing dims that agree only in their product) must raise on every rank before any
collective; numerically equal options of different Python types and mixed input dtypes must work and match
the float64 oracle. One process group runs every case, after which the group must still work (a barrier).
The spawn has a deadline and the group a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import F64, require_cpu_extension, spawn_ranks, structured

from structure_ops import distributed as D
from structure_ops import reference as R

K = 2
SIZES = [5, 3]  # uneven shards
SPAWN_TIMEOUT_S = 60  # the whole run; a hang in a collective fails here


def _catch(fn):
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        return type(exc).__name__, str(exc)
    return "ok", out


def _worker(rank, init_file, out_dir):
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.pop("STRUCTURE_OPS_BACKEND", None)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=K, timeout=datetime.timedelta(seconds=20)
    )
    start = sum(SIZES[:rank])
    sl = slice(start, start + SIZES[rank])
    x, z = structured(sum(SIZES), 5, 4, seed=3)
    xl, zl = x[sl], z[sl]
    res = {}
    # A backend this rank cannot run: it raises its own error, the other rank names it (no hang).
    res["backend-unavailable"] = _catch(lambda: D.structure_loss(xl, zl, backend="cuda" if rank == 1 else "cpu"))
    # "auto" resolving to different backends on the ranks (here through STRUCTURE_OPS_BACKEND on rank 1).
    if rank == 1:
        os.environ["STRUCTURE_OPS_BACKEND"] = "reference"
    res["backend-resolves-differently"] = _catch(lambda: D.structure_loss(xl, zl))
    os.environ.pop("STRUCTURE_OPS_BACKEND", None)
    res["logit-scale-differs"] = _catch(
        lambda: D.clip_loss(xl, xl, torch.tensor(7.0 if rank else 7.5, dtype=F64))
    )  # fmt: skip
    # Numerically equal options of different Python types are the same options.
    tau = [1, 1.0][rank]
    gamma = [np.float64(2.0), 2][rank]
    res["equal-options-other-types"] = _catch(
        lambda: D.structure_loss(xl, zl, temperature=tau, similarity="rbf", gamma=gamma, backend="cpu").detach()
    )
    s = [20, torch.tensor(20.0, dtype=F64)][rank]
    res["equal-logit-scale-other-types"] = _catch(lambda: D.clip_loss(xl, xl, s).detach())
    # λ_t = 0 on one rank only (a different step during warm-up): the structure term's collectives would
    # run on one rank only.
    obj = D.StructureClipLoss(lam=1.0, warmup=10).double()
    fi, ft = xl, x[sl, :4]
    res["lambda_t-differs"] = _catch(lambda: obj(zl, zl, fi, ft, step=1 if rank == 0 else 5).loss.detach())
    res["lam-differs"] = _catch(
        lambda: D.StructureClipLoss(lam=1.0 + rank, warmup=0).double()(zl, zl, fi, ft, step=3).loss.detach()
    )
    # A different step with the same λ_t (after warm-up) is harmless.
    obj0 = D.StructureClipLoss(lam=2.0, warmup=0).double()
    res["step-differs-same-lambda"] = _catch(lambda: obj0(zl, zl, fi, ft, step=3 + rank).loss.detach())
    # Trailing dims that agree only in their product.
    t = torch.zeros(2, 2, 3) if rank == 0 else torch.zeros(2, 3, 2)
    res["gather-trailing-dims"] = _catch(lambda: D.gather_with_grad(t))
    # Mixed precision: fp32 features, bf16 embeddings; value and each gradient in its input's dtype.
    xm, zm = xl.float(), zl.to(torch.bfloat16).requires_grad_()

    def mixed():
        loss = D.structure_loss(xm, zm, backend="cpu")
        loss.backward()
        return loss.detach(), zm.grad

    res["mixed-dtype"] = _catch(mixed)
    dist.barrier()  # the group still works after every error above
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    require_cpu_extension()
    tmp = tmp_path_factory.mktemp("dist_robust")
    return spawn_ranks(_worker, K, (str(tmp / "store"), str(tmp)), tmp, SPAWN_TIMEOUT_S)


def test_a_rank_that_cannot_run_raises_on_every_rank(results):
    kind1, msg1 = results[1]["backend-unavailable"]
    assert kind1 == "RuntimeError" and "backend='cuda' cannot run them" in msg1
    kind0, msg0 = results[0]["backend-unavailable"]
    assert kind0 == "ValueError" and "rank(s) [1] of the process group rejected their inputs" in msg0


def test_backend_resolved_differently_raises_on_every_rank(results):
    for r in range(K):
        kind, msg = results[r]["backend-resolves-differently"]
        assert kind == "ValueError" and "options differ across ranks" in msg, msg


def test_logit_scale_must_agree(results):
    for r in range(K):
        kind, msg = results[r]["logit-scale-differs"]
        assert kind == "ValueError" and "options differ across ranks" in msg and "logit_scale" in msg, msg


def test_numerically_equal_options_of_other_types_are_accepted(results):
    x, z = structured(sum(SIZES), 5, 4, seed=3)
    ref = R.structure_loss(x, z, temperature=1.0, similarity="rbf", gamma=2.0)
    ref_clip = R.clip_loss(x, x, 20.0)
    for r in range(K):
        kind, val = results[r]["equal-options-other-types"]
        assert kind == "ok", val
        assert abs(val.item() - ref.item()) < 1e-10
        kind, val = results[r]["equal-logit-scale-other-types"]
        assert kind == "ok", val
        assert abs(val.item() - ref_clip.item()) < 1e-10


def test_lambda_t_or_lam_differing_raises_on_every_rank_and_same_lambda_runs(results):
    for r in range(K):
        kind, msg = results[r]["lambda_t-differs"]
        assert kind == "ValueError" and "lambda_t, lam must be equal on every rank" in msg, msg
        assert "'step': [1.0, 5.0]" in msg
        kind, msg = results[r]["lam-differs"]
        assert kind == "ValueError" and "'lam': [1.0, 2.0]" in msg, msg
    vals = [results[r]["step-differs-same-lambda"] for r in range(K)]
    assert all(v[0] == "ok" for v in vals), vals
    assert vals[0][1].item() == vals[1][1].item()


def test_gather_with_grad_rejects_mismatched_trailing_dims(results):
    for r in range(K):
        kind, msg = results[r]["gather-trailing-dims"]
        assert kind == "ValueError" and "same trailing dims" in msg, msg


def test_mixed_dtypes_compute_in_the_wider_dtype(results):
    x, z = structured(sum(SIZES), 5, 4, seed=3)
    xm, zm = x.float().double(), z.to(torch.bfloat16).double().requires_grad_()
    ref = R.structure_loss(xm, zm)
    (gref,) = torch.autograd.grad(ref, zm)
    for r in range(K):
        kind, val = results[r]["mixed-dtype"]
        assert kind == "ok", val
        loss, gz = val
        assert loss.dtype == torch.float32 and gz.dtype == torch.bfloat16
        assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
        start = sum(SIZES[:r])
        # "ddp" grad mode: this rank's rows get K × ∂L/∂(its rows)
        expect = K * gref[start : start + SIZES[r]]
        assert ((gz.double() - expect).norm() / expect.norm()).item() < 2e-2
