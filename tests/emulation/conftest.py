"""Fixtures of the emulation tests: one emulated build per csrc/cuda file and test session (compiled on first use)."""

from __future__ import annotations

import pytest

from . import build

# Execution schedules the oracle tests rotate through: (order, seed, block size of the block-generic kernels;
# None = the host code's choice). Every order and block sizes from one warp to 1024 threads (96: three warps, not
# a power of two) appear; the order tests run every order at the same block size and compare bit for bit.
SCHEDULES = [
    dict(order="inorder", seed=0, block=None),
    dict(order="reversed", seed=0, block=32),
    dict(order="shuffled", seed=1, block=96),
    dict(order="shuffled", seed=2, block=1024),
]


def schedule_id(s: dict) -> str:
    return f"{s['order']}{s['seed'] if s['order'] == 'shuffled' else ''}-b{s['block'] or 'host'}"


def pytest_collection_modifyitems(session, config, items):
    """Compile the emulated builds the selected tests need in the background, two at a time, from the start."""
    needed = [n for n in build.NAMES if any(f"emu_{n}" in getattr(it, "fixturenames", ()) for it in items)]
    if needed and build.compiler_problem() is None:
        build.prebuild(needed)


def _emulated(name: str) -> build.Emulated:
    problem = build.compiler_problem()
    if problem:
        pytest.skip(problem)
    return build.build(name)


@pytest.fixture(scope="session")
def emu_structure():
    return _emulated("structure")


@pytest.fixture(scope="session")
def emu_clip():
    return _emulated("clip")


@pytest.fixture(scope="session")
def emu_knn():
    return _emulated("knn")


@pytest.fixture(scope="session")
def emu_siglip():
    return _emulated("siglip")


@pytest.fixture(autouse=True)
def _no_cuda_knobs(monkeypatch):
    for name in ("STRUCTURE_OPS_CUDA_PANEL_MB", "STRUCTURE_OPS_CUDA_MEM_LIMIT_MB"):
        monkeypatch.delenv(name, raising=False)
