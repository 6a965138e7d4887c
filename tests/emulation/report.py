"""Error table of the emulated CUDA builds against the float64 oracle: ``cd tests && python -m emulation.report``.

For each kernel file and dtype, the largest relative error ‖out − ref‖/‖ref‖ over the awkward shapes and options of
the tests (every output: loss/value, gradients, statistics), under a shuffled block/thread order; knn: the number
of rows that differ from the oracle. Prints one table and the build and run times (measured, this machine).
"""

from __future__ import annotations

import platform
import time

import torch

from . import build
from .cases import GRAD, L1_CASES, ML_CASES, call, clip_data, clip_oracle, pick_margin, prepared, tied


def _rel(out, ref):
    from helpers import rel_err

    return rel_err(out, ref)


def structure_rows(emu):
    from helpers import oracle

    worst: dict[str, float] = {}
    cases = [(c, None) for c in L1_CASES] + [(c, c["margin"]) for c in ML_CASES]
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for case, margin in cases:
            xh, zh = prepared(case["n"], case["dx"], case["dz"], dtype=dtype, seed=1)
            o = pick_margin(xh, zh, case["o"], margin)
            ref = oracle(xh, zh, o)
            with emu.schedule("shuffled", seed=7, block=96):
                out = call(emu.ops.structure_fwd, xh, zh, o)
            key = str(dtype).replace("torch.", "")
            worst[key] = max(worst.get(key, 0.0), *(_rel(u, r) for u, r in zip(out, ref, strict=True)))
    return worst


def clip_rows(emu):
    worst: dict[str, float] = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for n, d in ((5, 3), (13, 17), (37, 17), (300, 5)):
            a64, b64 = clip_data(n, d)
            a, b = a64.to(dtype), b64.to(dtype)
            s = torch.tensor(7.3, dtype=dtype)
            with emu.schedule("shuffled", seed=7, block=64, grid=3):
                loss, r, c = emu.ops.clip_fwd(a, b, s)
                da, db, ds = emu.ops.clip_bwd(torch.tensor(GRAD, dtype=dtype), a, b, s, r, c)
            ref = clip_oracle(a, b, s)
            key = str(dtype).replace("torch.", "")
            errs = [_rel(u, v) for u, v in zip((loss, r, c, da, db, ds), ref, strict=True)]
            worst[key] = max(worst.get(key, 0.0), *errs)
    return worst


def knn_rows(emu):
    from .cases import knn_oracle

    bad: dict[str, int] = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for n, d, k in ((5, 3, 1), (13, 17, 5), (37, 3, 1), (37, 17, 36), (700, 3, 35)):
            a = tied(n, d).to(dtype)
            if n > 13:
                a[n // 3] = float("nan")
            with emu.schedule("shuffled", seed=7):
                out = emu.ops.knn(a, k)
            key = str(dtype).replace("torch.", "")
            bad[key] = bad.get(key, 0) + int((out != knn_oracle(a, k)).any(dim=1).sum())
    return bad


def siglip_rows(emu):
    from .test_siglip import oracle, run

    worst: dict[str, float] = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for n, d in ((5, 3), (13, 17), (37, 5), (300, 3)):
            a64, b64 = clip_data(n, d, seed=2)
            a, b = a64.to(dtype), b64.to(dtype)
            s, beta = torch.tensor(10.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)
            with emu.schedule("shuffled", seed=7, block=64, grid=3):
                out = run(emu.ops.siglip_fwd, a, b, s, beta)
            key = str(dtype).replace("torch.", "")
            errs = [_rel(u, v) for u, v in zip(out, oracle(a, b, s, beta), strict=True)]
            worst[key] = max(worst.get(key, 0.0), *errs)
    return worst


def main() -> None:
    t0 = time.perf_counter()
    build.prebuild(build.NAMES)
    emus = {name: build.build(name) for name in build.NAMES}
    t_build = time.perf_counter() - t0
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"emulated builds (in parallel, two at a time): {t_build:.1f} s wall; per build: "
          + ", ".join(f"{n} {e.build_seconds:.1f} s" for n, e in emus.items()))  # fmt: skip
    rows = (("structure_cuda.cu", structure_rows), ("clip_cuda.cu", clip_rows), ("knn_cuda.cu", knn_rows),
            ("siglip_cuda.cu", siglip_rows))
    for name, fn in rows:
        t1 = time.perf_counter()
        res = fn(emus[name.split("_")[0]])
        what = "rows differing from the oracle" if name.startswith("knn") else "max rel. error vs the float64 oracle"
        print(f"{name:18s} {what}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in res.items()) + f"   ({time.perf_counter() - t1:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
