"""The Triton kNN kernel's tile space, tile skipping and autotune wiring (structure_ops/_triton/knn.py).

Every configuration the autotuner may launch on a GPU (``KNN_SPACE``) runs here in Triton's interpreter (tests/
conftest.py sets TRITON_INTERPRET=1 without a GPU) and must equal the float64 oracle ``reference.knn`` index for
index on tie-heavy inputs (integer-valued features, duplicated rows: the tie rule decides most of the order), with
ragged N, k = 1 and k = N − 1. The skip statistics are checked on inputs whose skipped-tile count is known by
construction.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import F64

from structure_ops import reference

pytest.importorskip("triton")

from structure_ops._triton import _common as C  # noqa: E402 - after the importorskip
from structure_ops._triton import knn as tknn  # noqa: E402

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("cpu_ext")]

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
N = 70  # ragged for every BLOCK_M / BLOCK_N (32, 64, 128); N − 1 ≤ MAX_FUSED_K (k = N − 1 runs fused)


def _tied(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Integer features in [-2, 2] (exact in bf16/fp16/tf32, exact dot products) with duplicated rows, float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (n, d), generator=g).to(F64)
    a[n // 2] = a[1]
    a[n - 1] = a[1]
    a[n // 3] = a[n // 4]
    return a


def _space_cases():
    """(dtype name, float32 matmul precision, config index, d, k): every config of KNN_SPACE that is a candidate for
    some key, each with an input it is a candidate for (its d bucket, a k whose list length it takes)."""
    cases = []
    for name, dtype in DTYPES.items():
        dt = str(dtype).replace("torch.", "")
        for i, c in enumerate(tknn.KNN_SPACE.configs):
            d = (c["BLOCK_D"] // 2 + 3) if c["RESIDENT"] else tknn.STREAM_BLOCK_D[dt] + 5
            found = [(prec, k) for prec in (("highest", "high") if dt == "float32" else ("highest",))
                     for k in (1, 23, 40, N - 1)  # list lengths 16, 32, 64, 128 (k = 1 and k = N − 1 included)
                     if c in tknn.KNN_SPACE.candidates(tknn.tune_key(N, d, k, dtype, prec))]  # fmt: skip
            if found:
                cases.append((name, found[0][0], i, d, found[0][1]))
    return cases


SPACE_CASES = _space_cases()


def test_space_has_128x128_tiles_and_every_config_is_covered():
    # 128 × 128 tiles (half inputs with the row block on chip) are in the space; the cases below reach every config
    # that is a candidate for some key of the AOT sweep (so each launchable config runs in the interpreter).
    assert any(c["BLOCK_M"] == 128 and c["BLOCK_N"] == 128 for c in tknn.KNN_SPACE.configs)
    launchable = {(name, tknn.KNN_SPACE.index(c))
                  for name, dtype in DTYPES.items() for prec in C.PRECISIONS for d in tknn.AOT_D
                  for kp in (16, 32, 64, 128)
                  for c in tknn.KNN_SPACE.candidates(tknn.tune_key(N, d, kp, dtype, prec))}  # fmt: skip
    assert launchable == {(name, i) for name, _, i, _, _ in SPACE_CASES}
    assert any(c["BLOCK_M"] == 128 and c["BLOCK_N"] == 128 for _, _, i, _, _ in SPACE_CASES
               for c in [tknn.KNN_SPACE.configs[i]])  # fmt: skip


@pytest.mark.parametrize(("dtype", "precision", "index", "d", "k"), SPACE_CASES,
                         ids=[f"{n}-{p}-{tknn.KNN_SPACE.configs[i].name}-d{d}-k{k}" for n, p, i, d, k in SPACE_CASES])
def test_every_space_config_matches_the_oracle(dtype, precision, index, d, k, monkeypatch):
    """Forced config (STRUCTURE_OPS_AUTOTUNE_FORCE) through the public entry: exact index equality with the oracle."""
    a = _tied(N, d, seed=index)
    monkeypatch.setenv(C.AUTOTUNE_FORCE_ENV, f"knn.topk:{index}")
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        out = tknn.knn(a.to(DEV, DTYPES[dtype]), k)
    finally:
        torch.set_float32_matmul_precision(old)
    assert out.shape == (N, k) and out.dtype == torch.int64
    ref = reference.knn(a, k)
    assert torch.equal(out.cpu(), ref), (out.cpu() != ref).nonzero()[:5]


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_fp32_each_precision(precision):
    """fp32 at each float32 matmul precision: integer features are exact in tf32 too, so the order is the oracle's;
    random unit rows: the selected similarities equal the oracle's on the operands the dot sees (tf32-rounded at
    "high"/"medium") up to fp32 accumulation."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        a = _tied(N, 70, seed=3)
        for k in (1, N - 1):
            assert torch.equal(tknn.knn(a.to(DEV, torch.float32), k).cpu(), reference.knn(a, k))
        g = torch.Generator().manual_seed(4)
        x = F.normalize(torch.randn(N, 40, generator=g, dtype=F64), dim=1).float().double()
        if precision != "highest":
            from emulation import hardware as hw

            x = hw.tf32_round(x)
        out = tknn.knn(x.to(DEV, torch.float32), 9).cpu()
        ref = reference.knn(x, 9)
        sim = x @ x.T
        assert (sim.gather(1, out) - sim.gather(1, ref)).abs().max() <= 1e-6
        assert (out == ref).all(dim=1).float().mean() > 0.95
    finally:
        torch.set_float32_matmul_precision(old)


def _stats(a: torch.Tensor, k: int, bm: int, bn: int):
    """tile_stats with the space's (bm, bn) config for this input (resident when d fits; fp32: IEEE, else TF32, which
    is exact on the small integers the callers use)."""
    space = [c for prec in ("highest", "high") for c in tknn.tile_space(a.shape[1], k, a.dtype, prec, n=a.shape[0])]
    cfg = next(c for c in space if c["constexprs"]["BLOCK_M"] == bm and c["constexprs"]["BLOCK_N"] == bn)
    return tknn.tile_stats(a, k, config=cfg)


@pytest.mark.parametrize(("bm", "bn"), [(64, 64), (128, 64), (64, 128)])
def test_skip_when_the_first_tile_holds_every_rows_top_k(bm, bn):
    # sim(i, j) = (N − i)(N − j): strictly decreasing in j for every row, so each row's top k are the k lowest columns
    # ≠ i, all in the first column tile (k + 1 ≤ BLOCK_N): every later tile holds nothing that beats the k-th value and
    # must be skipped; the first is merged by every row block. Expected counts from the construction alone.
    n, k = 300, 7
    a = torch.zeros(n, 16, dtype=F64)
    a[:, 0] = n - torch.arange(n, dtype=F64)  # integers ≤ 300: exact in tf32, products exact in fp32
    st = _stats(a.float(), k, bm, bn)
    blocks, tiles = -(-n // bm), -(-n // bn)
    assert st["tiles"] == tiles and st["merged"].tolist() == [1] * blocks
    assert st["skipped"] == blocks * (tiles - 1) > 0
    assert torch.equal(st["out"], reference.knn(a, k))


def test_equal_values_in_later_tiles_lose_the_tie_and_are_skipped():
    # Every row identical: every similarity ties, so each row's neighbours are the lowest indices ≠ i, and a later
    # tile's candidates (equal value, higher index) can never enter. The skip must count only values strictly
    # above the k-th (an equal value entering would break the tie rule): exactly one merged tile per row block.
    n, k = 200, 5
    a = torch.ones(n, 8, dtype=F64)
    st = _stats(a.float(), k, 64, 64)
    assert st["merged"].tolist() == [1] * 4 and st["skipped"] == 4 * 3
    expect = torch.tensor([[j for j in range(k + 1) if j != i][:k] for i in range(n)])
    assert torch.equal(st["out"], expect)


def test_no_skip_when_every_tile_improves():
    # sim(i, j) = (i + 1)(j + 1) is increasing in j: each new tile beats every row's k-th value, so none is skipped and
    # the rounds are min(k, entering keys) per tile; the result is still the oracle's.
    n, k = 200, 6
    a = torch.zeros(n, 8, dtype=F64)
    a[:, 0] = (torch.arange(n, dtype=F64) + 1) / 256
    st = _stats(a.float(), k, 64, 64)
    assert st["skipped"] == 0 and st["merged"].tolist() == [st["tiles"]] * 4
    assert torch.equal(st["out"], reference.knn(a, k))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_clustered_data_skips_tiles_without_changing_results(dtype):
    # Rows sorted by cluster (tight clusters of 64 rows, far apart): after a row block's own cluster tile, the other
    # clusters' tiles cannot beat its k-th value. The skip must happen, and the result must be the oracle's.
    g = torch.Generator().manual_seed(7)
    centers = 4.0 * torch.eye(5, 32, dtype=F64)
    a = centers.repeat_interleave(64, 0)[:300] + torch.randint(-1, 2, (300, 32), generator=g).to(F64) / 8
    a = a.to(DTYPES[dtype]).to(F64)
    for k in (1, 30):
        st = _stats(a.to(DTYPES[dtype]), k, 64, 64)
        assert torch.equal(st["out"], reference.knn(a, k))
        # by construction (own-cluster similarities ≥ 14.5, others ≤ 1.5): every tile after a block's own cluster tile
        blocks = st["merged"].numel()
        assert st["skipped"] >= sum(st["tiles"] - 1 - b for b in range(blocks)) > 0, (k, st["skipped"])
        # rounds per merged tile never exceed k
        assert (st["rounds"] <= k * st["merged"]).all()


def test_stats_do_not_change_the_result_and_forced_matches_explicit_config(monkeypatch):
    a = _tied(N, 20, seed=11).float()
    space = tknn.tile_space(20, 9, torch.float32, n=N)
    for cfg in space[:2]:
        st = tknn.tile_stats(a, 9, config=cfg)
        assert torch.equal(st["out"], tknn.knn(a, 9, config=cfg))
    with pytest.raises(ValueError, match="does not fit"):
        tknn.knn(a, 40, config=space[0])  # list length of k = 9 (16 slots), not of k = 40
    with pytest.raises(NotImplementedError, match="fused kernel"):
        tknn.tile_stats(a.double(), 3)
    # a forced configuration that keeps a narrower row block on chip than d: an error, not a wrong answer
    narrow = next(i for i, c in enumerate(tknn.KNN_SPACE.configs) if c["RESIDENT"] and c["BLOCK_D"] == 64)
    monkeypatch.setenv(C.AUTOTUNE_FORCE_ENV, f"knn.topk:{narrow}")
    with pytest.raises(ValueError, match="BLOCK_D = 64 < d = 100"):
        tknn.knn(torch.ones(N, 100), 3)


def test_aot_covers_every_candidate_and_heuristic_choice():
    """aot.py compiles aot_configs() + aot_space_configs(): every candidate of every key a random sweep of shapes,
    dtypes, precisions and k reaches, and the heuristic's choice, is in that set (nothing launchable escapes the
    spill check), and each entry's constexprs are exactly the kernel's."""
    entries = tknn.aot_configs() + tknn.aot_space_configs()
    fn = getattr(tknn._knn_topk_kernel, "fn", tknn._knn_topk_kernel)
    kernel_cst = {n for n, ann in fn.__annotations__.items() if "constexpr" in str(ann)}
    keys = set()
    for fn, sig, cst, opts in entries:
        assert set(cst) == kernel_cst and list(sig) == fn.arg_names
        keys.add((sig["a_ptr"], tuple(sorted(cst.items())), tuple(sorted(opts.items()))))
    rng = random.Random(0)
    for _ in range(300):
        n, d, k = rng.randint(2, 300_000), rng.randint(1, 4096), rng.randint(1, tknn.MAX_FUSED_K)
        dtype = rng.choice(list(DTYPES.values()))
        prec = rng.choice(C.PRECISIONS)
        ptr = tknn._PTR[dtype]
        launches = tknn.tile_space(d, k, dtype, prec, n=n, interpret=False)
        assert launches, (n, d, k, dtype, prec)
        launches.append(tknn.fused_config(d, tknn.list_slots(k), dtype, prec, interpret=False, n=n))
        for c in launches:
            ident = (ptr, tuple(sorted(c["constexprs"].items())), tuple(sorted(c["options"].items())))
            assert ident in keys, (n, d, k, dtype, prec, c)
