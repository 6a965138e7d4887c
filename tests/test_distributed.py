"""structure_ops.distributed over 2 and 3 gloo ranks on the CPU, against the float64 oracle.

One process group per world size runs every case (spawning is the expensive part); each rank saves its
loss values and gradients, and the tests here compare them with structure_ops.reference (or the
single-process modules with backend="reference") on the concatenated batch: the value on every rank,
the gradient of every rank's own rows, logit_scale's gradient, a DDP step, and errors that must reach
every rank instead of leaving the others blocked. Set STRUCTURE_OPS_DIST_REPORT=path to write the
measured max abs/rel differences as JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
from helpers import F64, spawn_ranks, structured
from torch import nn

import structure_ops
from structure_ops import distributed as D
from structure_ops import modules as M
from structure_ops import reference as R

TOL = 1e-10
SPAWN_TIMEOUT_S = 90  # a hang in a collective fails the run instead of blocking CI
SCALE = 1.7  # backward runs on SCALE·loss: the gradients must carry grad_output through the collectives

# Row counts per rank: even, uneven (N = 13 over 3 ranks) and a rank with no rows at all.
LAYOUTS = {
    2: {"even": [6, 6], "uneven": [9, 4]},
    3: {"even": [4, 4, 4], "uneven": [5, 4, 4], "empty-rank": [6, 0, 7]},
}

STRUCTURE_CASES = {
    "default-cpu": dict(backend="cpu"),
    "default-reference": dict(backend="reference"),
    "frozen-x-cpu": dict(backend="cpu", temperature=0.1, _grad_x=False),
    "rbf-js-standard-cpu": dict(similarity="rbf", gamma=1.5, divergence="js", centering="standard", backend="cpu"),
    "rbf-js-standard-reference": dict(
        similarity="rbf", gamma=1.5, divergence="js", centering="standard", backend="reference"
    ),
    "none-center_first-margin-cpu": dict(centering="none", center_first=True, margin=0.05, temperature=0.1),
    "margin-closed-cpu": dict(margin=100.0, backend="cpu"),
    "levels2-inverse-cpu": dict(levels=2, weighting="inverse", temperature=0.2, backend="cpu"),
    "levels3-rbf-js-reference": dict(levels=3, similarity="rbf", divergence="js", backend="reference"),
    "ddp-mode-cpu": dict(backend="cpu", _grad_mode="ddp"),
}
CLIP_CASES = {
    "clip-normalize": dict(normalize=True, scale=7.3, grad_mode="exact"),
    "clip-raw": dict(normalize=False, scale=0.9, grad_mode="exact"),
    "clip-ddp-mode": dict(normalize=True, scale=12.0, grad_mode="ddp"),
}
N_EXTRA = 2  # unimodal extra rows per rank in the module case


def _rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _structure_data(n):
    return structured(n, 5, 4, seed=11)


def _clip_data(n):
    return structured(n, 6, 6, seed=12, noise=0.3)


def _module_data(n, k):
    fi, ei = structured(n, 6, 4, seed=13)
    ft, et = structured(n, 5, 4, seed=14)
    xfi, xei = structured(N_EXTRA * k, 6, 4, seed=15)
    xft, xet = structured(N_EXTRA * k, 5, 4, seed=16)
    return fi, ei, ft, et, xfi, xei, xft, xet


def _split(opts):
    """Case options without the test-only keys (_grad_x, _grad_mode), and those keys."""
    clean = {k: v for k, v in opts.items() if not k.startswith("_")}
    return clean, opts.get("_grad_x", True), opts.get("_grad_mode", "exact")


class _Model(nn.Module):
    """Two linear heads and a StructureClipLoss with a learnable temperature: what DDP wraps."""

    def __init__(self, objective):
        super().__init__()
        torch.manual_seed(0)
        self.image_head, self.text_head = nn.Linear(6, 4), nn.Linear(5, 4)
        self.objective = objective

    def forward(self, fi, ft):
        return self.objective(self.image_head(fi), self.text_head(ft), fi, ft).loss


_OBJECTIVE = dict(lam=10.0, warmup=0, temperature=0.1, learnable_temperature=True)


# ---------------------------------------------------------------------------------------------------
# What every rank runs
# ---------------------------------------------------------------------------------------------------
def _catch(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        return type(exc).__name__, str(exc)
    return None


def _error_cases(rank, k):
    x, z = _structure_data(4 * k)
    sl = _rows([4] * k, rank)
    xl, zl = x[sl], z[sl]
    out = {}
    # Rank 0's z is wider than everyone else's.
    out["err-width"] = _catch(lambda: D.structure_loss(xl, zl if rank else torch.cat([zl, zl], 1)))
    # Rank 1 alone passes x and z with different row counts: it raises its own error, the others name it.
    out["err-local"] = _catch(lambda: D.structure_loss(xl, zl[:-1] if rank == 1 else zl))
    out["err-options"] = _catch(lambda: D.structure_loss(xl, zl, temperature=0.1 if rank else 0.2))
    out["err-grad"] = _catch(lambda: D.structure_loss(xl, zl.clone().requires_grad_(rank == 0)))
    # The last rank's image and text are float32, everyone else's float64.
    al = xl.float() if rank == k - 1 else xl
    out["err-dtype"] = _catch(lambda: D.clip_loss(al, al, 10.0))
    out["err-grad_mode"] = _catch(lambda: D.clip_loss(xl, xl, 10.0, grad_mode="mean"))
    return out


def _loopback(env) -> None:
    # gloo picks its interface from the hostname, which does not resolve in every container: use loopback.
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = "lo"


def _worker(rank, k, init_file, out_dir):
    _loopback(os.environ)
    os.environ.pop("STRUCTURE_OPS_BACKEND", None)
    # Row panels of 2 rows: every shard runs several panels with a ragged last one in the CPU kernel.
    os.environ["STRUCTURE_OPS_CPU_PANEL_MB"] = "0.001"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=k, timeout=datetime.timedelta(seconds=60)
    )
    res = {"errors": _error_cases(rank, k)}  # first: the group must still work after them

    for layout, sizes in LAYOUTS[k].items():
        sl = _rows(sizes, rank)
        n = sum(sizes)
        for case, opts in STRUCTURE_CASES.items():
            opts, grad_x, grad_mode = _split(opts)
            x, z = _structure_data(n)
            xl, zl = x[sl].clone().requires_grad_(grad_x), z[sl].clone().requires_grad_()
            loss = D.structure_loss(xl, zl, grad_mode=grad_mode, **opts)
            (SCALE * loss).backward()
            res[f"{case}/{layout}"] = {"loss": loss.detach(), "x": xl.grad, "z": zl.grad}

        for case, c in CLIP_CASES.items():
            a, b = _clip_data(n)
            al, bl = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_()
            s = torch.tensor(c["scale"], dtype=F64, requires_grad=True)
            loss = D.clip_loss(al, bl, s, normalize=c["normalize"], grad_mode=c["grad_mode"])
            (SCALE * loss).backward()
            res[f"{case}/{layout}"] = {"loss": loss.detach(), "image": al.grad, "text": bl.grad, "scale": s.grad}

        # The module, with unimodal extra rows, grad_mode="exact".
        data = [t.clone() for t in _module_data(n, k)]
        fi, ei, ft, et = (t[sl] for t in data[:4])
        xsl = slice(N_EXTRA * rank, N_EXTRA * (rank + 1))
        xfi, xei, xft, xet = (t[xsl] for t in data[4:])
        for t in (ei, et, xei, xet):
            t.requires_grad_()
        obj = D.StructureClipLoss(grad_mode="exact", **_OBJECTIVE).double()
        out = obj(ei, et, fi, ft, image_extra=(xfi, xei), text_extra=(xft, xet))
        (SCALE * out.loss).backward()
        res[f"module/{layout}"] = {
            **{f: getattr(out, f).detach() for f in ("loss", "clip", "structure", "structure_image", "structure_text")},
            "lambda_t": out.lambda_t,
            **{name: t.grad for name, t in zip(("ei", "et", "xei", "xet"), (ei, et, xei, xet), strict=True)},
            "theta": obj.clip.log_logit_scale.grad,
        }

        # DDP(model) + the default "ddp" contract: one SGD step.
        fi, ft = (t[sl] for t in _module_data(n, k)[0:3:2])
        model = _Model(D.StructureClipLoss(**_OBJECTIVE)).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        loss = ddp(fi, ft)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        opt.step()
        res[f"ddp/{layout}"] = {
            "loss": loss.detach(),
            **{f"grad:{name}": g for name, g in grads.items()},
            **{f"param:{name}": p.detach().clone() for name, p in model.named_parameters()},
        }

        # gather_with_grad alone: rank-dependent upstream gradients must be summed over the ranks.
        t = (rank + 1.0) * torch.arange(sizes[rank] * 3, dtype=F64).reshape(-1, 3)
        t.requires_grad_()
        g = D.gather_with_grad(t)
        ((g * torch.cos(rank + torch.arange(n * 3, dtype=F64)).reshape(n, 3)).sum()).backward()
        res[f"gather/{layout}"] = {"value": g.detach(), "grad": t.grad}

    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(k, tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    return spawn_ranks(_worker, k, (k, str(tmp / "store"), str(tmp)), tmp, SPAWN_TIMEOUT_S)


_RESULTS: dict[int, list] = {}
_DIFFS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("STRUCTURE_OPS_DIST_REPORT")
    if path and _DIFFS:
        worst = {
            f"world{k}": {
                m: max(v[m] for key, v in _DIFFS.items() if key.startswith(f"{k}:")) for m in ("max_abs", "max_rel")
            }
            for k in LAYOUTS
            if any(key.startswith(f"{k}:") for key in _DIFFS)
        }
        with open(path, "w") as f:
            json.dump({"tolerance": TOL, "worst": worst, "per_case": _DIFFS}, f, indent=1, sort_keys=True)


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda k: f"world{k}")
def world(request, tmp_path_factory):
    k = request.param
    if k not in _RESULTS:
        t0 = time.perf_counter()
        _RESULTS[k] = _spawn(k, tmp_path_factory.mktemp(f"world{k}"))
        print(f"world size {k}: {time.perf_counter() - t0:.1f} s")
    return k, _RESULTS[k]


def _close(key: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """max |out − ref| and that over max |ref| (absolute where ref is all zero) ≤ TOL; recorded for the report."""
    out, ref = torch.as_tensor(out).detach().to(F64), torch.as_tensor(ref).detach().to(F64)
    assert out.shape == ref.shape, (key, out.shape, ref.shape)
    abs_err = (out - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rel_err = abs_err / scale if scale > 0 else abs_err
    group = key.rsplit("/", 1)[0]
    rec = _DIFFS.setdefault(group, {"max_abs": 0.0, "max_rel": 0.0})
    rec["max_abs"], rec["max_rel"] = max(rec["max_abs"], abs_err), max(rec["max_rel"], rel_err)
    assert abs_err <= TOL and rel_err <= TOL, f"{key}: max abs {abs_err:.3e}, max rel {rel_err:.3e}"


def _layouts(k):
    return LAYOUTS[k].items()


# ---------------------------------------------------------------------------------------------------
# Comparisons with the oracle
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(STRUCTURE_CASES))
def test_structure_loss_matches_oracle(world, case):
    k, res = world
    opts, grad_x, grad_mode = _split(STRUCTURE_CASES[case])
    opts.pop("backend", None)
    c = k if grad_mode == "ddp" else 1
    for layout, sizes in _layouts(k):
        x, z = _structure_data(sum(sizes))
        x.requires_grad_(grad_x)
        z.requires_grad_()
        ref = R.structure_loss(x, z, **opts)
        (SCALE * ref).backward()
        if case == "margin-closed-cpu":
            assert ref.item() == 0.0 and z.grad.abs().max() == 0  # the case exercises the closed hinge
        for rank in range(k):
            got, key = res[rank][f"{case}/{layout}"], f"{k}:{case}/{layout}/rank{rank}"
            sl = _rows(sizes, rank)
            _close(f"{key}/loss", got["loss"], ref)
            _close(f"{key}/z", got["z"], c * z.grad[sl])
            if grad_x:
                _close(f"{key}/x", got["x"], c * x.grad[sl])
            else:
                assert got["x"] is None
        # Every rank returns the very same value (one all-reduce for level 1).
        assert len({res[r][f"{case}/{layout}"]["loss"].item() for r in range(k)}) == 1


@pytest.mark.parametrize("case", sorted(CLIP_CASES))
def test_clip_loss_matches_oracle(world, case):
    k, res = world
    cfg = CLIP_CASES[case]
    c = k if cfg["grad_mode"] == "ddp" else 1
    for layout, sizes in _layouts(k):
        a, b = _clip_data(sum(sizes))
        a.requires_grad_()
        b.requires_grad_()
        s = torch.tensor(cfg["scale"], dtype=F64, requires_grad=True)
        ref = R.clip_loss(a, b, s, normalize=cfg["normalize"])
        (SCALE * ref).backward()
        for rank in range(k):
            got, key = res[rank][f"{case}/{layout}"], f"{k}:{case}/{layout}/rank{rank}"
            sl = _rows(sizes, rank)
            _close(f"{key}/loss", got["loss"], ref)
            _close(f"{key}/image", got["image"], c * a.grad[sl])
            _close(f"{key}/text", got["text"], c * b.grad[sl])
        # logit_scale is replicated: each rank holds c × its share, so the sum over ranks is c × the gradient.
        total = sum(res[r][f"{case}/{layout}"]["scale"] for r in range(k))
        _close(f"{k}:{case}/{layout}/logit_scale", total, c * s.grad)


def test_module_matches_single_process(world):
    k, res = world
    for layout, sizes in _layouts(k):
        fi, ei, ft, et, xfi, xei, xft, xet = _module_data(sum(sizes), k)
        for t in (ei, et, xei, xet):
            t.requires_grad_()
        obj = M.StructureClipLoss(backend="reference", **_OBJECTIVE).double()
        out = obj(ei, et, fi, ft, image_extra=(xfi, xei), text_extra=(xft, xet))
        (SCALE * out.loss).backward()
        assert out.structure.item() > 1e-3  # the regularizer is really in the loss
        for rank in range(k):
            got, key = res[rank][f"module/{layout}"], f"{k}:module/{layout}/rank{rank}"
            for f in ("loss", "clip", "structure", "structure_image", "structure_text"):
                _close(f"{key}/{f}", got[f], getattr(out, f))
            assert got["lambda_t"] == out.lambda_t
            sl, xsl = _rows(sizes, rank), slice(N_EXTRA * rank, N_EXTRA * (rank + 1))
            for name, t, rows in (("ei", ei, sl), ("et", et, sl), ("xei", xei, xsl), ("xet", xet, xsl)):
                _close(f"{key}/{name}", got[name], t.grad[rows])
        theta = sum(res[r][f"module/{layout}"]["theta"] for r in range(k))
        _close(f"{k}:module/{layout}/theta", theta, obj.clip.log_logit_scale.grad)


def test_ddp_step_matches_single_process(world):
    """DDP(model) + the default grad_mode="ddp": DDP's gradient average is the single-process gradient."""
    k, res = world
    for layout, sizes in _layouts(k):
        fi, _, ft, *_ = _module_data(sum(sizes), k)
        model = _Model(M.StructureClipLoss(backend="reference", **_OBJECTIVE)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = model(fi, ft)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        assert set(grads) == {
            "image_head.weight",
            "image_head.bias",
            "text_head.weight",
            "text_head.bias",
            "objective.clip.log_logit_scale",
        }
        opt.step()
        for rank in range(k):
            got, key = res[rank][f"ddp/{layout}"], f"{k}:ddp/{layout}/rank{rank}"
            _close(f"{key}/loss", got["loss"], loss)
            for name, p in model.named_parameters():
                _close(f"{key}/grad:{name}", got[f"grad:{name}"], grads[name])
                _close(f"{key}/param:{name}", got[f"param:{name}"], p)


def test_gather_with_grad(world):
    k, res = world
    for layout, sizes in _layouts(k):
        n = sum(sizes)
        parts = [(r + 1.0) * torch.arange(sizes[r] * 3, dtype=F64).reshape(-1, 3) for r in range(k)]
        upstream = sum(torch.cos(r + torch.arange(n * 3, dtype=F64)).reshape(n, 3) for r in range(k))
        for rank in range(k):
            got = res[rank][f"gather/{layout}"]
            assert torch.equal(got["value"], torch.cat(parts))
            _close(f"{k}:gather/{layout}/rank{rank}/grad", got["grad"], upstream[_rows(sizes, rank)])


def test_errors_reach_every_rank(world):
    """An input that is wrong on one rank raises on every rank (nobody is left blocked in a collective),
    with a message that names the argument and the per-rank values; the group keeps working afterwards
    (every other case ran after these)."""
    k, res = world
    errs = [res[r]["errors"] for r in range(k)]
    for r in range(k):
        assert errs[r]["err-width"] == ("ValueError", errs[r]["err-width"][1])
        assert "z must have the same width on every rank, got widths [8" in errs[r]["err-width"][1]
        assert errs[r]["err-options"][0] == "ValueError" and "options differ across ranks" in errs[r]["err-options"][1]
        assert errs[r]["err-grad"][0] == "ValueError" and "z requires grad on some ranks only" in errs[r]["err-grad"][1]
        assert errs[r]["err-dtype"][0] == "TypeError" and "same dtype on every rank" in errs[r]["err-dtype"][1]
        assert errs[r]["err-grad_mode"][0] == "ValueError" and "grad_mode must be one of" in errs[r]["err-grad_mode"][1]
        kind, msg = errs[r]["err-local"]
        assert kind == "ValueError"
        if r == 1:
            assert "x and z must have the same number of rows N" in msg
        else:
            assert "rank(s) [1] of the process group rejected their inputs" in msg


# ---------------------------------------------------------------------------------------------------
# In-process: the row-range kernel, and the world-size-1 fallback
# ---------------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("cpu_ext", "tiny_panels")
@pytest.mark.parametrize(("similarity", "divergence"), [("cosine", "structure"), ("rbf", "js")])
def test_rows_kernel_partials_sum_to_the_oracle(similarity, divergence):
    x, z = _structure_data(13)
    xh, zh = R.prepare(x).requires_grad_(), R.prepare(z).requires_grad_()
    ref = R.structure_core(xh, zh, temperature=0.1, similarity_kind=similarity, gamma=1.5, divergence=divergence)
    ref_gx, ref_gz = torch.autograd.grad(ref, (xh, zh))
    parts = [
        torch.ops.structure_ops.structure_rows_fwd(xh, zh, a, b, 0.1, int(similarity == "rbf"), 1.5, int(divergence == "js"), 1e-12, True, True)
        for a, b in ((0, 5), (5, 5), (5, 13))
    ]  # fmt: skip
    _close("1:rows-kernel/loss", sum(p[0] for p in parts), ref)
    _close("1:rows-kernel/x", sum(p[1] for p in parts), ref_gx)
    _close("1:rows-kernel/z", sum(p[2] for p in parts), ref_gz)
    with pytest.raises(RuntimeError, match="row_begin <= row_end <= N = 13"):
        torch.ops.structure_ops.structure_rows_fwd(xh, zh, 4, 14, 0.1, 0, 1.0, 0, 1e-12, False, False)


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_structure_rows_fwd(dtype):
    x, z = _structure_data(9)
    xh, zh = R.prepare(x).to(dtype).requires_grad_(), R.prepare(z).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.structure_ops.structure_rows_fwd, (xh, zh, 2, 7, 0.1, 0, 1.0, 0, 1e-12, True, True))


def _fallback_checks():
    x, z = _structure_data(10)
    a, b = _clip_data(10)
    for opts in ({}, {"levels": 2, "similarity": "rbf"}):
        xd, zd = x.clone().requires_grad_(), z.clone().requires_grad_()
        got = D.structure_loss(xd, zd, grad_mode="exact", **opts)
        got.backward()
        xs, zs = x.clone().requires_grad_(), z.clone().requires_grad_()
        want = structure_ops.structure_loss(xs, zs, **opts)
        want.backward()
        assert torch.equal(got, want) and torch.equal(xd.grad, xs.grad) and torch.equal(zd.grad, zs.grad)
    assert torch.equal(D.clip_loss(a, b, 5.0), structure_ops.clip_loss(a, b, 5.0))
    assert D.gather_with_grad(a) is a
    args = (a[:, :4], b[:, :4], x, b[:, :5])
    got, want = D.StructureClipLoss(lam=2.0, warmup=0)(*args), M.StructureClipLoss(lam=2.0, warmup=0)(*args)
    assert all(torch.equal(torch.as_tensor(g), torch.as_tensor(w)) for g, w in zip(got, want, strict=True))


def test_world_size_one_fallback_without_process_group():
    assert not dist.is_initialized()
    assert D.world_size() == 1
    _fallback_checks()
    with pytest.raises(ValueError, match="not initialized"):
        D.world_size(object())
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        D.structure_loss(*_structure_data(4), grad_mode="sum")


def test_world_size_one_fallback_with_process_group(tmp_path, monkeypatch):
    env = {}
    _loopback(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert D.world_size() == 1
        _fallback_checks()
    finally:
        dist.destroy_process_group()
