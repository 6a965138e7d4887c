"""The emulation layer itself (cuda_emu.h, build.py): kernels with deliberate bugs must be exposed (an error, or a
result that changes with the block/thread order), a correct block reduction must be exact and order independent at
every block size, and the source rewrite must find every launch and launch bound of csrc/cuda/*.cu."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from . import build

ORDERS = {"inorder": 0, "reversed": 1, "shuffled": 2}


@pytest.fixture(scope="module")
def selftest():
    problem = build.compiler_problem()
    if problem:
        pytest.skip(problem)
    return build.build_selftest()


def run(lib, kernel, order="inorder", grid=3, block=96, n=300, seed=0):
    x = torch.randn(grid, n, generator=torch.Generator().manual_seed(0))
    out = torch.zeros(grid * max(block, 1))
    err = ctypes.create_string_buffer(4096)
    rc = lib.so_emu_selftest(kernel.encode(), ORDERS[order], seed, grid, block, x.data_ptr(), n, out.data_ptr(), err,
                             4096)  # fmt: skip
    return rc, err.value.decode(), out, x


@pytest.mark.parametrize("block", [32, 64, 96, 256, 1024])
def test_block_reduction_exact_at_every_size_and_order(selftest, block):
    outs = []
    for order, seed in (("inorder", 0), ("reversed", 0), ("shuffled", 1), ("shuffled", 2)):
        rc, err, out, x = run(selftest, "good_sum", order, block=block, seed=seed)
        assert rc == 0, err
        outs.append(out[:3])
    assert selftest.so_emu_selftest_max_block() >= block
    ref = x.double().sum(1)
    assert torch.allclose(outs[0].double(), ref, rtol=1e-5, atol=1e-4)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_ballot_shuffle_atomic_count(selftest):
    for order in ORDERS:
        rc, err, out, x = run(selftest, "ballot_count", order, seed=3)
        assert rc == 0, err
        assert out[:3].tolist() == (x > 0).sum(1).float().tolist()


def test_missing_barrier_changes_with_order(selftest):
    """Thread 0 reads the other threads' partials without a barrier: in order it reads poisoned shared memory
    (NaN), reversed it happens to be right. The order tests of the real kernels would flag exactly this."""
    results = [run(selftest, "racy_sum", order, seed=1)[2][:3] for order in ORDERS]
    assert torch.isnan(results[0]).all() and torch.isfinite(results[1]).all()


def test_block_order_dependence_changes_with_order(selftest):
    results = [run(selftest, "chain", order, grid=6, block=32, seed=4)[2][:6].tolist() for order in ORDERS]
    assert results[0] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert results[1] != results[0] and results[2] != results[0]


@pytest.mark.parametrize(
    ("kernel", "block", "message"),
    [
        ("early_exit", 96, r"__syncthreads reached by 48 threads while 48 had exited"),
        ("partial_warp", 64, r"warp-synchronous intrinsic .* reached by 16 of its 32 lanes"),
        ("bounded", 96, r"exceeds the kernel's __launch_bounds__\(64\)"),
        ("good_sum", 1056, r"invalid block \(1056,1,1\)"),
        ("good_sum", 0, r"invalid block"),
    ],
)
def test_errors(selftest, kernel, block, message):
    for order in ORDERS:
        rc, err, _, _ = run(selftest, kernel, order, block=block)
        assert rc == 1 and re.search(message, err), err


def test_uninitialized_shared_memory_reads_nan(selftest):
    rc, err, out, _ = run(selftest, "uninit_shared", grid=2, block=64)
    assert rc == 0, err
    assert torch.isnan(out[63]) and torch.isnan(out[127]) and (out[:63] == 1.0).all()


def test_every_cuda_file_is_emulated():
    """A new csrc/cuda/*.cu file must join build.NAMES (and get its emulated tests)."""
    assert sorted(p.name for p in build.CUDA_DIR.glob("*.cu")) == sorted(f"{n}_cuda.cu" for n in build.NAMES)


@pytest.mark.parametrize("name", build.NAMES)
def test_rewrite_is_complete(name):
    """Every launch and every __launch_bounds__ of the .cu file is rewritten (cheap: no compiler)."""
    src = (build.CUDA_DIR / f"{name}_cuda.cu").read_text()
    out = build.translate(name)
    code = "\n".join(ln for ln in out.splitlines() if not ln.strip().startswith("//"))
    assert "<<<" not in code and ">>>" not in code and "__launch_bounds__(" not in code
    launches = len(list(build._code_positions(src, "<<<")))
    assert out.count("::so_emu::launch(") == launches >= len(build.KERNELS[name])
    assert out.count("::so_emu::check_launch_bounds(") == len(list(build._code_positions(src, "__launch_bounds__(")))
    for kernel in build.BLOCK_GENERIC[name] + build.GRID_STRIDE[name]:
        assert kernel in build.KERNELS[name]
