"""The ops demo (``structure-ops demo``): exactness, an alignment run and a speed check, on the CPU.

1. Exactness: the SPEC.md anchoring values recomputed by the selected backend in float64.
2. Alignment: two linear heads align two synthetic "modalities" (nonlinear views of a shared latent)
   from few pairs, CLIP alone vs CLIP + λ·STRUCTURE, scored by held-out retrieval R@1. The data is
   synthetic and generated from a fixed seed; the real-encoder pipeline is the training layer's job.
3. Speed: the selected backend vs the eager reference on one realistic shape (memory comparisons live in
   benchmarks/, which measure each call in a fresh process).

Writes ``<out>/report.json`` atomically and prints the tables.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time

import torch
import torch.nn.functional as F

from . import functional as so
from . import reference
from .modules import StructureClipLoss

_G = lambda n, d, f, a, b: torch.tensor(  # noqa: E731 - SPEC.md's structured test matrices
    [[f(a * (i * d + j) + b) for j in range(d)] for i in range(n)], dtype=torch.float64
)


def anchors(backend: str) -> list[dict]:
    """SPEC.md anchoring values, recomputed."""
    x2, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    x, z = _G(6, 4, math.sin, 1, 1), _G(6, 3, math.cos, 0.5, 0.3).requires_grad_()
    r = so.structure_loss(x, z, backend=backend)
    (gz,) = torch.autograd.grad(r, z)
    a, b = _G(4, 3, math.sin, 1, 0), _G(4, 3, math.cos, 1, 0)
    rows = [
        ("R_S two points, tau=1", 0.0140896209, so.structure_loss(x2, z2, temperature=1.0, backend=backend)),
        ("R_S G-matrices, tau=0.05", 1.921506772, r),
        ("R_S G-matrices, tau=0.1", 1.73567932, so.structure_loss(x, z, temperature=0.1, backend=backend)),
        ("R_S G-matrices, tau=0.5", 0.3334592893, so.structure_loss(x, z, temperature=0.5, backend=backend)),
        ("||dR_S/dZ||_F", 3.0836637247, gz.norm()),
        ("CLIP, T=0.05", 4.601090522, so.clip_loss(a, b, 20.0, backend=backend)),
        ("CLIP, T=1", 1.356212372, so.clip_loss(a, b, 1.0, backend=backend)),
        ("mutual kNN k=2", 0.1875, so.mutual_knn(_G(8, 4, math.sin, 1, 1), _G(8, 3, math.cos, 0.5, 0.3), 2, backend=backend)),
    ]
    return [{"quantity": q, "spec": s, "ours": float(v.detach()), "rel_err": abs(float(v.detach()) - s) / abs(s)} for q, s, v in rows]


def _views(n: int, seed: int):
    """Two nonlinear views (64-d and 48-d) of a shared clustered 16-d latent."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 16, generator=g) * 2.0
    latent = centers[torch.randint(0, 10, (n,), generator=g)] + 0.7 * torch.randn(n, 16, generator=g)
    mix = torch.Generator().manual_seed(1234)  # the "encoders" are fixed across seeds
    a, b = torch.randn(16, 64, generator=mix), torch.randn(16, 48, generator=mix)
    img = torch.tanh(latent @ a / 4.0) + 0.1 * torch.randn(n, 64, generator=g)
    txt = torch.sin(latent @ b / 4.0) + 0.1 * torch.randn(n, 48, generator=g)
    return img, txt


def _recall_at_1(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> float:
    sim = F.normalize(img_emb, dim=1) @ F.normalize(txt_emb, dim=1).T
    target = torch.arange(sim.shape[0])
    return 0.5 * float((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean())


def align(lam: float, seed: int, backend: str, steps: int = 300, n_train: int = 256, n_test: int = 1000) -> float:
    torch.manual_seed(seed)
    img, txt = _views(n_train + n_test, seed)
    head_i, head_t = torch.nn.Linear(64, 32), torch.nn.Linear(48, 32)
    params = list(head_i.parameters()) + list(head_t.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    loss_fn = StructureClipLoss(lam=lam, warmup=50, temperature=0.05, backend=backend)
    xi, xt = img[:n_train], txt[:n_train]
    for _ in range(steps):
        out = loss_fn(head_i(xi), head_t(xt), xi, xt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        return _recall_at_1(head_i(img[n_train:]), head_t(txt[n_train:]))


def _timed(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def speed(n: int, backend: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 768, generator=g)
    z = (x @ torch.randn(768, 512, generator=g) / 768**0.5 + 0.5 * torch.randn(n, 512, generator=g)).requires_grad_()

    def run(fn):
        def step():
            fn(x, z).backward()
            z.grad = None

        return step

    rows = []
    for name, fn in (
        ("reference (eager)", reference.structure_loss),
        (f"structure_ops backend={backend}", lambda a, b: so.structure_loss(a, b, backend=backend)),
    ):
        rows.append({"provider": name, "N": n, "d_x": 768, "d_z": 512, "fwd+bwd_s": _timed(run(fn))})
    return rows


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run(out_dir: str = "runs/demo", backend: str = "auto", quick: bool = False, seeds: int = 3) -> dict:
    t0 = time.perf_counter()
    print(f"structure-ops demo (backend={backend}, threads={torch.get_num_threads()})\n")
    rows = anchors(backend)
    print("1. Exactness: SPEC.md anchoring values recomputed in float64")
    print(f"   {'quantity':28s} {'SPEC':>14s} {'ours':>16s} {'rel. err':>9s}")
    for r in rows:
        print(f"   {r['quantity']:28s} {r['spec']:14.10f} {r['ours']:16.12f} {r['rel_err']:9.1e}")

    steps = 60 if quick else 300
    seed_list = list(range(1 if quick else seeds))
    print(f"\n2. Alignment from 256 synthetic pairs, {steps} steps, held-out retrieval R@1 over seeds {seed_list}")
    results = {}
    for name, lam in (("CLIP only", 0.0), ("CLIP + 10*STRUCTURE", 10.0)):
        scores = [align(lam, s, backend, steps=steps) for s in seed_list]
        results[name] = scores
        mean = sum(scores) / len(scores)
        print(f"   {name:22s} R@1 = {mean:.3f}  (per seed: {', '.join(f'{s:.3f}' for s in scores)})")

    n = 1024 if quick else 4096
    print(f"\n3. Speed: STRUCTURE level 1, fwd+bwd, N={n}, d_x=768, d_z=512, fp32 (best of 3)")
    timing = speed(n, backend)
    base = timing[0]["fwd+bwd_s"]
    for r in timing:
        print(f"   {r['provider']:32s} {r['fwd+bwd_s']:7.3f} s   x{base / r['fwd+bwd_s']:.2f}")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "backend": backend,
        "anchors": rows,
        "alignment_r_at_1": results,
        "speed": timing,
        "peak_rss_mb": peak_rss_mb,
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    path = os.path.join(out_dir, "report.json")
    _write_json(path, report)
    print(f"\nwrote {path} ({report['seconds']:.0f} s)")
    return report
