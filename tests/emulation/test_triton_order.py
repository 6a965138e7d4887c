"""Triton kernels with their programs run reversed and shuffled in the interpreter (triton_order.py): outputs must
equal the in-order run bit for bit. Small shapes and small blocks, so that every launch has several programs.

The Triton modules are called through their module functions (structure_fwd, structure_level1_flash, clip_fwd,
clip_bwd, knn, siglip_fwd) with small tile overrides; a deliberately order-dependent kernel shows that the mode can fail.
"""

from __future__ import annotations

import pytest
import torch

from . import triton_order

pytestmark = pytest.mark.skipif(triton_order.available() is not None, reason=str(triton_order.available()))

if triton_order.available() is None:
    import triton
    import triton.language as tl

    @triton.jit
    def _chain_kernel(out_ptr):
        # BUG (deliberate): program p reads what program p − 1 wrote in the same launch.
        pid = tl.program_id(0)
        prev = tl.load(out_ptr + pid - 1, mask=pid > 0, other=0.0)
        tl.store(out_ptr + pid, prev + 1.0)

    @triton.jit
    def _own_kernel(out_ptr):
        pid = tl.program_id(0)
        tl.store(out_ptr + pid, pid.to(tl.float32) * 2.0 + 1.0)


ALT = [("reversed", 0), ("shuffled", 1)]


def _run_orders(fn):
    """fn() in order, then under each order of ALT; returns (in-order result, [(order, seed, result, counts)])."""
    base = fn()
    runs = []
    for order, seed in ALT:
        with triton_order.program_order(order, seed) as counts:
            runs.append((order, seed, fn(), dict(counts)))
    return base, runs


def _assert_same(base, runs):
    base = base if isinstance(base, tuple | list) else (base,)
    moved = 0
    for order, seed, out, counts in runs:
        out = out if isinstance(out, tuple | list) else (out,)
        assert counts["launches"] > 0
        moved += counts["moved"]
        for u, v in zip(base, out, strict=True):
            assert torch.equal(u, v), (order, seed)
    assert moved > 0, "no launch had more than one program: the test would prove nothing"


def test_mode_detects_order_dependence():
    out = torch.zeros(8)
    _chain_kernel[(8,)](out)
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    for order, seed in ALT:
        out = torch.zeros(8)
        with triton_order.program_order(order, seed) as counts:
            _chain_kernel[(8,)](out)
        assert counts == {"launches": 1, "programs": 8, "moved": counts["moved"]} and counts["moved"] > 0
        assert out.tolist() != [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], (order, seed)
    # an order-independent kernel is unaffected, every program ran exactly once
    with triton_order.program_order("shuffled", 3):
        out = torch.full((8,), float("nan"))
        _own_kernel[(8,)](out)
    assert out.tolist() == [2.0 * i + 1.0 for i in range(8)]


@pytest.mark.parametrize(
    ("levels", "similarity", "divergence", "dtype"),
    [(1, 1, 1, torch.float64), (2, 0, 1, torch.float32)],
    ids=["L1-rbf-js-f64", "L2-js"],
)
def test_structure_rows(levels, similarity, divergence, dtype, monkeypatch):
    from helpers import opts, oracle, rel_err

    from structure_ops._triton import structure as S

    from .cases import prepared

    monkeypatch.setattr(S, "panel_rows", lambda n, bytes_per_row, budget_mb=None, device=None: min(n, 12))
    monkeypatch.setattr(S, "MAX_BLOCK_M", 4)
    monkeypatch.setattr(S, "MAX_BLOCK_N", 16)
    xh, zh = prepared(19, 5, 3, dtype=dtype, seed=1)
    o = opts(levels=levels, similarity=similarity, divergence=divergence, temperature=0.1, margin=0.0)

    def fn():
        return S.structure_fwd(xh, zh, levels, 0.1, 0, 0.0, similarity, 1.0, divergence, 1e-12, True, True, mode="rows")

    base, runs = _run_orders(fn)
    _assert_same(base, runs)
    ref = oracle(xh, zh, o)
    assert rel_err(base[0], ref[0]) <= (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize(("similarity", "divergence"), [(0, 0), (1, 1)], ids=["cosine", "rbf-js"])
def test_structure_flash(similarity, divergence):
    from structure_ops._triton import structure_flash as SF

    from .cases import prepared

    xh, zh = prepared(20, 5, 3, dtype=torch.float32, seed=2)
    blocks = dict(block_m=16, block_n=16, block_k=16, block_d=16)

    def fn():
        return SF.structure_level1_flash(xh, zh, 0.1, similarity, 1.5, divergence, 1e-12, True, True, **blocks)

    _assert_same(*_run_orders(fn))


@pytest.mark.parametrize("dtype", [torch.float32], ids=["f32"])
def test_clip(dtype):
    from structure_ops._triton import clip as C

    from .cases import clip_data

    a64, b64 = clip_data(20, 5, seed=4)
    a, b = a64.to(dtype), b64.to(dtype)
    s = torch.tensor(7.0, dtype=dtype)
    blocks = dict(block_m=16, block_n=16, block_d=16)

    def fn():
        loss, r, c = C.clip_fwd(a, b, s, **blocks)
        grads = C.clip_bwd(torch.tensor(1.75, dtype=dtype), a, b, s, r, c, block_do=16, **blocks)
        return (loss, r, c, *grads)

    _assert_same(*_run_orders(fn))


@pytest.mark.parametrize("path", ["fused", "panel"])
def test_knn(path):
    from structure_ops._triton import knn as K

    from .cases import tied

    a = tied(20, 5, seed=3).to(torch.float32)

    def fn():
        if path == "fused":
            return K.knn(a, 6, block_m=16, block_n=16, block_d=16, path="fused")
        return K.knn(a, 6, path="panel")

    base, runs = _run_orders(fn)
    if path == "panel":  # the panel path may be plain torch (no Triton launch): still check the result
        for _, _, out, _ in runs:
            assert torch.equal(out, base)
    else:
        _assert_same(base, runs)
    from .cases import knn_oracle

    assert torch.equal(base, knn_oracle(a, 6))


def test_siglip():
    from structure_ops._triton import siglip as G

    from .cases import clip_data

    a64, b64 = clip_data(20, 5, seed=5)
    a, b = a64.to(torch.float32), b64.to(torch.float32)
    s, beta = torch.tensor(10.0), torch.tensor(-3.0)

    def fn():
        return G.siglip_fwd(a, b, s, beta, 0, True, True, block_m=16, block_n=16, block_d=16, block_do=16)

    _assert_same(*_run_orders(fn))
