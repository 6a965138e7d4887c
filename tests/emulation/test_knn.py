"""csrc/cuda/knn_cuda.cu, emulated on the CPU (README.md): exactly the float64 oracle and the C++ CPU op.

Inputs with exact integer similarities and many ties (ties → lower index), NaN rows and values (NaN ranks as −inf),
signed zeros, the fused streaming path with buffer compactions (N > 1024), the sort path (k > 1024), panels of
1–3 rows, fp32/fp64/bf16/fp16, every block/thread order (the append order into the candidate buffer changes with
the schedule; the result must not).
"""

from __future__ import annotations

import pytest
import torch

from structure_ops import reference

from .cases import F64, AtenLog, emulate_panel_memory, expected_panel_rows, knn_oracle, tied
from .conftest import SCHEDULES, schedule_id

KNN_CASES = [(5, 3, 1), (5, 17, 4), (13, 3, 12), (13, 17, 5), (37, 3, 1), (37, 17, 5), (37, 17, 36)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "f64", "bf16", "f16"]


def check(emu, a, k, **sched):
    """The emulated op on ``a`` equals the float64 oracle and the C++ CPU op exactly; returns the result."""
    with emu.schedule(**sched):
        out = emu.ops.knn(a, k)
    assert out.dtype == torch.int64 and out.shape == (a.shape[0], k)
    ref = knn_oracle(a, k)
    assert torch.equal(out, ref), (out != ref).nonzero()[:5]
    assert torch.equal(out, torch.ops.structure_ops.knn(a, k))
    return out


PARAMS = [(c, dt, SCHEDULES[(i + j) % 4]) for i, c in enumerate(KNN_CASES) for j, dt in enumerate(DTYPES)]


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize("panels", ["default", "tiny"])
@pytest.mark.parametrize(
    ("case", "dtype", "sched"), PARAMS,
    ids=[f"{n}x{d}k{k}-{DT_IDS[DTYPES.index(dt)]}-{schedule_id(s)}" for (n, d, k), dt, s in PARAMS],
)  # fmt: skip
def test_ties_lower_index(emu_knn, case, dtype, sched, panels, monkeypatch):
    n, d, k = case
    if panels == "tiny":
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "0.0005")
    check(emu_knn, tied(n, d).to(dtype), k, **sched)


@pytest.mark.usefixtures("cpu_ext")
def test_duplicates_rank_by_index(emu_knn):
    """Rows 1, 6 and 12 are identical: for row 1 the best neighbours are 6 then 12 (equal similarities)."""
    out = check(emu_knn, tied(13, 17).to(torch.float32), 3, order="reversed")
    assert out[1, :2].tolist() == [6, 12] and out[6, :2].tolist() == [1, 12] and out[12, :2].tolist() == [1, 6]


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_nan_rows_and_values(emu_knn, k, dtype):
    a = tied(13, 5, seed=1)
    a[2] = float("nan")  # every similarity with row 2 is NaN → −inf, ranked by index
    a[7, 3] = float("nan")
    check(emu_knn, a.to(dtype), k, order="shuffled", seed=k)


def _with_inf(dtype):
    a = tied(13, 5, seed=1)
    a[2] = float("nan")
    a[7, 3] = float("nan")
    a[9, 0] = float("inf")  # ±inf similarities with row 9 (and 0·inf = NaN ones)
    return a.to(dtype)


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_inf_values_match_cpu_op(emu_knn, dtype):
    """±inf similarities next to NaN ones: the kernel ranks exactly as the C++ CPU op (NaN = −inf, ties by index)."""
    a = _with_inf(dtype)
    for k in (4, 12):
        with emu_knn.schedule("shuffled", seed=k):
            out = emu_knn.ops.knn(a, k)
        assert torch.equal(out, torch.ops.structure_ops.knn(a, k))


def test_inf_values_match_oracle(emu_knn):
    """±inf and NaN similarities: NaN ranks as −inf, ties by index, in the oracle as in the kernel."""
    a = _with_inf(torch.float64)
    assert torch.equal(emu_knn.ops.knn(a, 12), knn_oracle(a, 12))


@pytest.mark.usefixtures("cpu_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_signed_zero_ties(emu_knn, dtype):
    """−0.0 and +0.0 similarities are equal: the lower index wins."""
    a = torch.zeros(6, 2, dtype=dtype)
    a[:, 0] = torch.tensor([1.0, 0.0, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
    a[:, 1] = torch.tensor([0.0, 1.0, -1.0, 1.0, 0.0, 0.0], dtype=dtype)
    check(emu_knn, a, 5, order="reversed")


@pytest.mark.usefixtures("cpu_ext")
def test_compaction(emu_knn):
    """N = 700 with 3 features in {−1, 0, 1}: few distinct similarities, so every row is mostly ties and the
    candidate buffer overflows its 512-key room after the second chunk: a compaction (bitonic sort, cut to k,
    threshold) while streaming, then the final sort."""
    g = torch.Generator().manual_seed(9)
    a = torch.randint(-1, 2, (700, 3), generator=g).to(F64)
    a[100] = float("nan")
    check(emu_knn, a.to(torch.float32), 35, order="shuffled", seed=5)


@pytest.mark.usefixtures("cpu_ext")
def test_sort_path(emu_knn, monkeypatch):
    """k = 1025 > 1024: at::sort per panel (several panels), the sanitize kernel at a 2-block grid (grid-stride
    loop) and the drop-diagonal kernel at 64 threads."""
    g = torch.Generator().manual_seed(9)
    a = torch.randint(-1, 2, (1030, 3), generator=g).to(F64)
    a[100] = float("nan")
    monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", "2")
    emu_knn.reset_stats()
    check(emu_knn, a, 1025, order="reversed", block=64, grid=2)
    blocks = emu_knn.kernel_blocks()
    assert blocks["knn_drop_diag_kernel"] == 64 and blocks["knn_sanitize_kernel"] == 64
    assert "knn_topk_rows_kernel" not in blocks


@pytest.mark.usefixtures("cpu_ext")
def test_order_independent_random(emu_knn):
    """Random normalized rows (no exact ties): every order gives the same indices, which match the oracle on the
    rounded inputs up to fp32 near-ties (compared through the selected similarities)."""
    g = torch.Generator().manual_seed(10)
    x = torch.nn.functional.normalize(torch.randn(200, 17, generator=g, dtype=F64), dim=1).to(torch.float32)
    outs = []
    for order, seed in (("inorder", 0), ("shuffled", 3)):
        with emu_knn.schedule(order, seed=seed):
            outs.append(emu_knn.ops.knn(x, 20))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[0], torch.ops.structure_ops.knn(x, 20))
    xr = x.to(F64)
    sim = xr @ xr.T
    ref = reference.knn(xr, 20)
    assert (sim.gather(1, outs[0]) - sim.gather(1, ref)).abs().max() <= 1e-6


def test_checks(emu_knn):
    a = torch.randn(5, 3)
    for k in (0, 5):
        with pytest.raises(RuntimeError, match="1 <= k <= N - 1"):
            emu_knn.ops.knn(a, k)
    with pytest.raises(RuntimeError, match="2-D"):
        emu_knn.ops.knn(a[0], 1)


@pytest.mark.parametrize(
    ("free_rows", "knob_rows", "want"),
    [(40, None, 40), (100, None, 96), (None, None, 300), (None, 10, 10), (40, 1000, 40)],
    ids=["mem-40", "mem-100-mult16", "default-one-panel", "knob-below-mem", "knob-above-mem"],
)  # fmt: skip
def test_panels_sized_from_free_memory(emu_knn, free_rows, knob_rows, want, monkeypatch):
    """knn sizes its panels by the CUDA level-1 rule (csrc/cuda/common.cuh panel_rows_from_memory): half of the
    free device memory the (emulated) GPU reports, capped by STRUCTURE_OPS_CUDA_PANEL_MB when set (else
    2048 MiB), a multiple of 16 from 64 rows on. Heights read from the panel GEMMs S_I = A_I Aᵀ, expected from
    cases.expected_panel_rows and by hand (N = 300, fp32: one fp32 similarity row, 1200 B, per panel row)."""
    n, d, k = 300, 17, 20
    bpr = 4 * n
    free, knob = emulate_panel_memory(monkeypatch, bpr, free_rows, knob_rows)
    rows = expected_panel_rows(n, bpr, free_bytes=free, knob_mb=knob)
    assert rows == want
    a = tied(n, d, seed=12).to(torch.float32)
    with AtenLog() as log:
        out = emu_knn.ops.knn(a, k)
    full, last = divmod(n, rows)
    assert [c["args"][0][1][0] for c in log.find("mm", "out")] == [rows] * full + ([last] if last else [])
    assert torch.equal(out, knn_oracle(a, k))
