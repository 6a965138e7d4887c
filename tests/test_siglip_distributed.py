"""structure_ops.distributed.siglip_loss (and its modules) over 2 and 3 gloo ranks on the CPU, against the
float64 oracle on the concatenated batch: the value on every rank, every rank's own rows' gradients, the
replicated logit_scale / logit_bias (each rank holds its share: the sum over ranks is the gradient), both
gradient contracts (grad_mode "exact" and "ddp"), uneven and empty shards, the cpu, triton (interpreter) and
reference backends, and an error that must reach every rank. Same harness as tests/test_distributed.py:
one spawn per world size, a timeout instead of a hang.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
from helpers import F64, spawn_ranks, structured
from test_distributed import _catch, _close, _loopback, _rows

import structure_ops
from structure_ops import distributed as D
from structure_ops import reference as R

SPAWN_TIMEOUT_S = 120
SCALE = 1.7
LAYOUTS = {2: {"even": [6, 6], "uneven": [9, 4]}, 3: {"empty-and-one-row": [6, 0, 1]}}
CASES = {
    "cpu-exact": dict(backend="cpu", grad_mode="exact", normalize=True),
    "cpu-ddp-raw": dict(backend="cpu", grad_mode="ddp", normalize=False),
    "reference-exact": dict(backend="reference", grad_mode="exact", normalize=True),
    "triton-ddp": dict(backend="triton", grad_mode="ddp", normalize=True),
}
S, BETA = 8.0, -4.0
# The Triton interpreter is slow in every rank: its sharded path runs on 2 ranks only (cases x worlds kept small).
WORLD_CASES = {2: tuple(CASES), 3: ("cpu-exact", "cpu-ddp-raw", "reference-exact")}


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _data(n):
    return structured(n, 6, 5, seed=21, noise=0.3)[1], structured(n, 6, 5, seed=22, noise=0.3)[1]


def _module_data(n, k):
    fi, ei = structured(n, 6, 4, seed=13)
    ft, et = structured(n, 5, 4, seed=14)
    xfi, xei = structured(2 * k, 6, 4, seed=15)
    xft, xet = structured(2 * k, 5, 4, seed=16)
    return fi, ei, ft, et, xfi, xei, xft, xet


def _worker(rank, k, init_file, out_dir):
    _loopback(os.environ)
    os.environ.pop("STRUCTURE_OPS_BACKEND", None)
    os.environ["STRUCTURE_OPS_CPU_PANEL_MB"] = "0.0002"  # 1–3 row panels: ragged panels in every shard
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=k, timeout=datetime.timedelta(seconds=60)
    )
    a0, _ = _data(4 * k)
    al = a0[_rows([4] * k, rank)]
    res = {
        "err-bias": _catch(lambda: D.siglip_loss(al, al, S, torch.ones(2, dtype=F64) if rank == 1 else BETA)),
    }
    narrow = al if rank else al[:, :3].contiguous()  # rank 0's rows are narrower than everyone else's
    res["err-width"] = _catch(lambda: D.siglip_loss(narrow, narrow, S, BETA))
    for layout, sizes in LAYOUTS[k].items():
        sl = _rows(sizes, rank)
        for case in WORLD_CASES[k]:
            c = CASES[case]
            if c["backend"] == "triton" and not _have_triton():
                continue
            a, b = _data(sum(sizes))
            a, b = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_()
            s = torch.tensor(S, dtype=F64, requires_grad=True)
            beta = torch.tensor(BETA, dtype=F64, requires_grad=True)
            loss = D.siglip_loss(a, b, s, beta, **c)
            (SCALE * loss).backward()
            res[f"{case}/{layout}"] = {"loss": loss.detach(), "image": a.grad, "text": b.grad, "scale": s.grad,
                                       "bias": beta.grad}  # fmt: skip
        # The sharded StructureSigLipLoss with unimodal extra rows, grad_mode="exact".
        data = _module_data(sum(sizes), k)
        fi, ei, ft, et = (t[sl].clone() for t in data[:4])
        xsl = slice(2 * rank, 2 * (rank + 1))
        xfi, xei, xft, xet = (t[xsl].clone() for t in data[4:])
        for t in (ei, et):
            t.requires_grad_()
        obj = D.StructureSigLipLoss(lam=2.0, warmup=0, grad_mode="exact", backend="cpu").double()
        out = obj(ei, et, fi, ft, image_extra=(xfi, xei), text_extra=(xft, xet))
        (SCALE * out.loss).backward()
        res[f"module/{layout}"] = {"loss": out.loss.detach(), "clip": out.clip.detach(), "ei": ei.grad, "et": et.grad,
                                   "theta": obj.clip.log_logit_scale.grad, "bias": obj.clip.logit_bias.grad}  # fmt: skip
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _spawn(k, tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    return spawn_ranks(_worker, k, (k, str(tmp / "store"), str(tmp)), tmp, SPAWN_TIMEOUT_S)


_RESULTS: dict[int, list] = {}


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda k: f"world{k}")
def world(request, tmp_path_factory):
    k = request.param
    if k not in _RESULTS:
        _RESULTS[k] = _spawn(k, tmp_path_factory.mktemp(f"siglip_world{k}"))
    return k, _RESULTS[k]


@pytest.mark.parametrize("case", sorted(CASES))
def test_siglip_loss_matches_oracle(world, case):
    k, res = world
    cfg = CASES[case]
    if cfg["backend"] == "triton" and not _have_triton():
        pytest.skip("triton is not installed")
    if case not in WORLD_CASES[k]:
        pytest.skip(f"{case} runs on {[w for w, cs in WORLD_CASES.items() if case in cs]} ranks only (run time)")
    c = k if cfg["grad_mode"] == "ddp" else 1
    for layout, sizes in LAYOUTS[k].items():
        a, b = _data(sum(sizes))
        a.requires_grad_()
        b.requires_grad_()
        s = torch.tensor(S, dtype=F64, requires_grad=True)
        beta = torch.tensor(BETA, dtype=F64, requires_grad=True)
        ref = R.siglip_loss(a, b, s, beta, normalize=cfg["normalize"])
        (SCALE * ref).backward()
        for rank in range(k):
            got, key = res[rank][f"{case}/{layout}"], f"{k}:siglip-{case}/{layout}/rank{rank}"
            sl = _rows(sizes, rank)
            _close(f"{key}/loss", got["loss"], ref)
            _close(f"{key}/image", got["image"], c * a.grad[sl])
            _close(f"{key}/text", got["text"], c * b.grad[sl])
        for name, want in (("scale", s.grad), ("bias", beta.grad)):
            total = sum(res[r][f"{case}/{layout}"][name] for r in range(k))
            _close(f"{k}:siglip-{case}/{layout}/{name}", total, c * want)
        assert len({res[r][f"{case}/{layout}"]["loss"].item() for r in range(k)}) == 1


def test_structure_siglip_module_matches_single_process(world):
    k, res = world
    for layout, sizes in LAYOUTS[k].items():
        fi, ei, ft, et, xfi, xei, xft, xet = _module_data(sum(sizes), k)
        ei.requires_grad_()
        et.requires_grad_()
        single = structure_ops.StructureSigLipLoss(lam=2.0, warmup=0, backend="reference").double()
        out = single(ei, et, fi, ft, image_extra=(xfi, xei), text_extra=(xft, xet))
        (SCALE * out.loss).backward()
        for rank in range(k):
            got, key = res[rank][f"module/{layout}"], f"{k}:siglip-module/{layout}/rank{rank}"
            sl = _rows(sizes, rank)
            _close(f"{key}/loss", got["loss"], out.loss)
            _close(f"{key}/clip", got["clip"], out.clip)
            _close(f"{key}/ei", got["ei"], ei.grad[sl])
            _close(f"{key}/et", got["et"], et.grad[sl])
        for name, want in (("theta", single.clip.log_logit_scale.grad), ("bias", single.clip.logit_bias.grad)):
            _close(f"{k}:siglip-module/{layout}/{name}", sum(res[r][f"module/{layout}"][name] for r in range(k)), want)


def test_errors_reach_every_rank(world):
    k, res = world
    for rank in range(k):
        exc, msg = res[rank]["err-bias"]
        if rank == 1:
            assert exc == "ValueError" and "logit_bias must be a scalar (one element)" in msg
        else:
            assert exc == "ValueError" and "rank(s) [1] of the process group rejected their inputs" in msg
        exc, msg = res[rank]["err-width"]
        assert exc == "ValueError" and "image must have the same width on every rank" in msg
